"""``medfed privacy``: budget reports, noise planning and ledger verification."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(help="Differential-privacy budgets: reports, planning, ledger checks.", no_args_is_help=True)
console = Console(soft_wrap=True)


@app.command()
def report(
    run_dir: Annotated[Optional[Path], typer.Argument(help="A run folder (uses what sites reported).")] = None,
    site: Annotated[Optional[list[Path]], typer.Option(help="A site state folder or ledger file (repeatable); "
                                                       "its verified ledger is the authoritative record.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: <run>/privacy-report).")] = None,
) -> None:
    """Per site, per round cumulative epsilon(delta) and cap: JSON, Markdown, HTML and a plot."""
    from medfed.errors import MedfedError
    from medfed.privacy.report import from_ledger, from_run, write_report

    if run_dir is None and not site:
        raise MedfedError("give a run folder and/or --site STATE_DIR")
    reports = (from_run(run_dir) if run_dir else []) + [from_ledger(s) for s in site or []]
    folder = out or (run_dir / "privacy-report" if run_dir else Path("privacy-report"))
    paths = write_report(reports, folder)
    for r in reports:
        spent = "NOT PRIVATE" if not r.private else f"epsilon {r.spent:.4f}"
        console.print(f"{r.site}: {spent} (cap {r.cap if r.cap is not None else '-'}), {len(r.rows)} rounds, "
                      f"{len(r.refusals)} refusals  [{r.source}]", highlight=False)
    console.print(f"report: {paths['html']}")


@app.command()
def plan(
    examples: Annotated[int, typer.Option(help="Images at the site.")],
    rounds: Annotated[int, typer.Option(help="Rounds of the run.")],
    batch_size: Annotated[int, typer.Option(help="Expected Poisson batch size.")] = 64,
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = 1,
    epsilon: Annotated[float, typer.Option(help="Target epsilon for the run.")] = 8.0,
    delta: Annotated[float, typer.Option(help="Delta.")] = 1e-5,
    accountant: Annotated[str, typer.Option(help="rdp or prv.")] = "rdp",
) -> None:
    """The noise multiplier a site would use for a run (same planner as training)."""
    from medfed.privacy.accounting import plan_noise

    p = plan_noise(examples, batch_size, local_epochs, rounds, epsilon, delta, accountant)
    console.print(f"noise multiplier {p.noise_multiplier:.4f}, sample rate {p.sample_rate:.5f}, "
                  f"{p.steps_per_round} steps per round, {p.steps_per_round * rounds} steps in all -> "
                  f"epsilon {epsilon:g} at delta {delta:g} ({accountant})", highlight=False)


@app.command()
def verify(
    state_dir: Annotated[Path, typer.Argument(help="A site state folder or its ledger file.")],
) -> None:
    """Check a site ledger's hash chain and show what it has spent."""
    from medfed.privacy.report import from_ledger

    r = from_ledger(state_dir)
    console.print(f"ledger intact: {len(r.rows)} rounds, {len(r.refusals)} refusals, epsilon spent "
                  f"{r.spent:.4f} (cap {r.cap if r.cap is not None else '-'})", highlight=False)
