"""``medfed privacy``: budget reports, noise planning and ledger verification."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

if TYPE_CHECKING:
    from medfed.privacy.anchors import AnchorStore

app = typer.Typer(help="Differential-privacy budgets: reports, planning, ledger checks.", no_args_is_help=True)
console = Console(soft_wrap=True)


@app.command()
def report(
    run_dir: Annotated[Optional[Path], typer.Argument(help="A run folder (uses what sites reported).")] = None,
    site: Annotated[Optional[list[Path]], typer.Option(help="A site state folder or ledger file (repeatable); "
                                                       "its verified ledger is the authoritative record.")] = None,
    site_name: Annotated[Optional[list[str]], typer.Option(help="The name of each --site, in order (default: the "
                                                           "name its ledger records); the key of its anchor.")]
    = None,
    anchors: Annotated[Optional[Path], typer.Option(help="The coordinator's anchors.json: also check that each "
                                                    "--site ledger extends what the coordinator saw.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: <run>/privacy-report).")] = None,
) -> None:
    """Per site, per round cumulative epsilon(delta) and cap, the ledger chain check and (with --anchors) the
    anchor check: JSON, Markdown, HTML and a plot. Exits non-zero when a check fails (the report is written)."""
    from medfed.errors import MedfedError
    from medfed.privacy.report import from_ledger, from_run, write_report

    if run_dir is None and not site:
        raise MedfedError("give a run folder and/or --site STATE_DIR")
    names = list(site_name or [])
    if names and len(names) != len(site or []):
        raise MedfedError(f"--site-name given {len(names)} times for {len(site or [])} --site folders; give one "
                          "per --site, in the same order")
    store = _anchor_store(anchors) if anchors else None
    reports = (from_run(run_dir) if run_dir else []) + [
        from_ledger(s, names[i] if names else None, anchors=store, strict=False) for i, s in enumerate(site or [])]
    folder = out or (run_dir / "privacy-report" if run_dir else Path("privacy-report"))
    paths = write_report(reports, folder)
    for r in reports:
        spent = "NOT PRIVATE" if not r.private else f"epsilon {r.spent:.4f}"
        console.print(f"{r.site}: {spent} (cap {r.cap if r.cap is not None else '-'}), {len(r.rows)} rounds, "
                      f"{len(r.refusals)} refusals  [{r.source}]", highlight=False)
        if r.chain != "-":
            console.print(f"  ledger chain: {r.chain}", highlight=False)
        if r.anchor != "-":
            console.print(f"  coordinator anchor: {r.anchor}", highlight=False)
    console.print(f"report: {paths['html']}")
    failed = [f"{r.site}: {p}" for r in reports for p in r.problems]
    if failed:
        raise MedfedError(f"{len(failed)} check(s) failed (see {paths['html']}): " + "; ".join(failed))


def _anchor_store(path: Path) -> AnchorStore:
    from medfed.errors import MedfedError
    from medfed.privacy.anchors import AnchorStore

    if not path.is_file():
        raise MedfedError(f"--anchors {path}: no such file (the coordinator's anchors.json, next to sites.json)")
    return AnchorStore(path)


PLAN_SIGMA_LIMIT = 1000.0
"""``privacy plan`` refuses an epsilon that this noise multiplier cannot reach (no useful model trains above it)."""


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
    import math

    from medfed.config import ACCOUNTANTS, check_choice
    from medfed.errors import MedfedError, require

    for flag, value in (("--examples", examples), ("--rounds", rounds), ("--batch-size", batch_size),
                        ("--local-epochs", local_epochs)):
        require(value >= 1, f"{flag} {value}:", "must be >= 1")
    require(math.isfinite(epsilon) and epsilon > 0, f"--epsilon {epsilon:g}:", "must be a number > 0")
    require(0 < delta < 1, f"--delta {delta:g}:", "must be in (0, 1), well below 1 / --examples")
    check_choice(accountant, ACCOUNTANTS, "--accountant")
    from medfed.privacy.accounting import epsilon as spent, plan_noise, sampling_for

    unreachable = (f"--epsilon {epsilon:g}: no noise level reaches epsilon {epsilon:g} at delta {delta:g} over "
                   f"{rounds} round(s) with the {accountant} accountant; raise --epsilon or --delta, or lower "
                   "--rounds or --local-epochs")
    if epsilon < 1:  # may lie below the accountant's floor, where Opacus' search doubles sigma for minutes
        sampling = sampling_for(examples, batch_size, local_epochs)
        floor = spent([(PLAN_SIGMA_LIMIT, sampling.sample_rate, rounds * sampling.steps_per_round)], delta, accountant)
        if floor > epsilon:
            raise MedfedError(f"{unreachable} (even noise multiplier {PLAN_SIGMA_LIMIT:g} gives epsilon {floor:.3g})")
    try:
        p = plan_noise(examples, batch_size, local_epochs, rounds, epsilon, delta, accountant)
    except ValueError as err:  # Opacus: no noise multiplier in its search range reaches the target
        raise MedfedError(f"{unreachable} ({err})") from None
    console.print(f"noise multiplier {p.noise_multiplier:.4f}, sample rate {p.sample_rate:.5f}, "
                  f"{p.steps_per_round} steps per round, {p.steps_per_round * rounds} steps in all -> "
                  f"epsilon {epsilon:g} at delta {delta:g} ({accountant})", highlight=False)


@app.command()
def verify(
    state_dir: Annotated[Path, typer.Argument(help="A site state folder or its ledger file.")],
    anchors: Annotated[Optional[Path], typer.Option(help="The coordinator's anchors.json: also check that the "
                                                    "ledger still extends the head the coordinator saw.")] = None,
    site: Annotated[Optional[str], typer.Option(help="The site's name in --anchors (default: the name its ledger "
                                                "records).")] = None,
) -> None:
    """Check a site ledger's hash chain and signatures (and, with --anchors, that it was not deleted, truncated
    or rewritten since the coordinator saw it), and show what it has spent."""
    from medfed.errors import MedfedError
    from medfed.privacy.report import from_ledger

    r = from_ledger(state_dir, site, anchors=_anchor_store(anchors) if anchors else None, strict=False)
    if r.problems:
        raise MedfedError("; ".join(r.problems))
    console.print(f"ledger {r.chain}: {len(r.rows)} rounds, {len(r.refusals)} refusals, epsilon spent "
                  f"{r.spent:.4f} (cap {r.cap if r.cap is not None else '-'})", highlight=False)
    if r.anchor != "-":
        console.print(f"coordinator anchor: {r.anchor}", highlight=False)


@app.command()
def repair(
    ledger: Annotated[Path, typer.Argument(help="A site state folder or its ledger file.")],
    sign_legacy: Annotated[bool, typer.Option("--sign-legacy", help="Also sign entries written before medfed "
                                              "signed its ledgers, with the site's ledger key (run at the "
                                              "site).")] = False,
) -> None:
    """Repair a ledger after a crash without losing evidence: an incomplete last line moves to
    <ledger>.torn-<time> and a `repair` entry records its size and SHA-256. Nothing else is changed; a ledger
    that was edited still fails `medfed privacy verify`."""
    from medfed.privacy.ledger import LEDGER_FILE, Ledger, repair_ledger

    path = ledger / LEDGER_FILE if ledger.is_dir() else ledger
    result = repair_ledger(Ledger(path), sign_legacy=sign_legacy)
    if result.torn_evidence:
        console.print(f"moved an incomplete last line ({result.torn_bytes} bytes) to {result.torn_evidence}",
                      highlight=False)
    if result.unsigned_original:
        console.print(f"signed {result.signed_legacy} entries written before signing; the unsigned original is "
                      f"{result.unsigned_original}", highlight=False)
    if not result.entries:
        console.print(f"{path}: nothing to repair (the ledger verifies)", highlight=False)
    for entry in result.entries:
        console.print(f"recorded repair entry {entry.index} ({entry.data['action']})", highlight=False)


@app.command()
def audit(
    checkpoint: Annotated[Path, typer.Argument(help="A medfed checkpoint (e.g. <run>/checkpoints/latest.pt).")],
    members_dataset: Annotated[str, typer.Option(help="Format of the training images (default: the "
                                                 "checkpoint's data.dataset).")] = "",
    members_path: Annotated[str, typer.Option(help="The site's training images (default: the checkpoint's "
                                              "data.path).")] = "",
    members_split: Annotated[str, typer.Option(help="Split of the training images.")] = "train",
    members_limit: Annotated[int, typer.Option(help="At most N training images, as training drew them "
                                               "(-1: the checkpoint's data.limit, 0: all).")] = -1,
    held_out_dataset: Annotated[str, typer.Option(help="Format of the held-out images (default: as members).")] = "",
    held_out_path: Annotated[str, typer.Option(help="Images of the same distribution the model never saw "
                                               "(default: as members).")] = "",
    held_out_split: Annotated[str, typer.Option(help="Split of the held-out images.")] = "test",
    held_out_limit: Annotated[int, typer.Option(help="At most N held-out images (-1: as members, 0: all).")] = -1,
    timesteps: Annotated[str, typer.Option(help="Diffusion steps t to score at, comma-separated.")] = "50,100,200",
    draws: Annotated[int, typer.Option(help="Fixed noise draws per image and timestep (loss attack).")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the noise draws.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per network call.")] = 64,
    delta: Annotated[float, typer.Option(help="Delta of the empirical bound (default: the accountant's, "
                                         "else 1e-5).")] = -1.0,
    confidence: Annotated[float, typer.Option(help="Confidence of the empirical lower bound.")] = 0.95,
    ledger: Annotated[Optional[Path], typer.Option(help="The site's state folder or ledger file: the "
                                                   "accountant's epsilon, recomputed from its verified history "
                                                   "(default: the run's summary.json, if any).")] = None,
    site: Annotated[Optional[str], typer.Option(help="Site name in the run's summary.json (federated runs).")]
    = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Audit JSON (default: <checkpoint>.audit.json).")] = None,
) -> None:
    """Membership-inference audit at the site: attack AUC, TPR at 1%/10% FPR and the empirical epsilon lower
    bound of a loss-threshold and a PIA attack, next to the accountant's epsilon. Numbers only, no images."""
    from medfed.privacy.audit import AuditOptions, ImageSource, parse_timesteps, run_audit, table

    members = ImageSource(members_dataset, members_path, members_split, members_limit)
    held_out = ImageSource(held_out_dataset or members_dataset, held_out_path or members_path, held_out_split,
                           members_limit if held_out_limit < 0 else held_out_limit)
    options = AuditOptions(timesteps=parse_timesteps(timesteps), draws=draws, seed=seed, batch_size=batch_size,
                           delta=delta, confidence=confidence)
    result, path = run_audit(checkpoint, members, held_out, options, ledger=ledger, site=site, device=device,
                             out=out)
    console.print(table(result), highlight=False, markup=False)
    console.print(f"audit: {path}", highlight=False)
