"""Privacy-budget reports: per site, per round, cumulative epsilon at delta, against the site's cap.

Two sources, never mixed in one row:

* a site's own **ledger** (authoritative: its hash chain and signatures are verified, and epsilon is recomputed
  from the recorded noise multipliers, sample rates and steps with the ledger's accountant), optionally checked
  against the coordinator's **anchors** (:mod:`medfed.privacy.anchors`: the ledger must still extend the heads
  the coordinator saw; a deleted, truncated or rewritten ledger is named), and
* a **run folder**'s ``metrics.jsonl`` (what each site reported to the coordinator each round).

Outputs: ``privacy-report.json``, ``privacy-report.md``, ``privacy-report.html`` and ``privacy-epsilon.png``.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medfed.contracts import Status
from medfed.errors import MedfedError
from medfed.privacy.accounting import epsilon
from medfed.privacy.budget import history_of
from medfed.privacy.anchors import AnchorStore, check_ledger_against
from medfed.privacy.ledger import LEDGER_FILE, Ledger, LedgerTamperedError, next_signer, signer_fingerprint
from medfed.runs import RunDir


@dataclass
class SiteReport:
    """One site's spending, round by round."""

    site: str
    source: str
    """``ledger <path>`` or ``run <path>``."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    """Per round: run, round, epsilon (cumulative), delta, cap_epsilon, noise_multiplier, sample_rate, steps."""
    refusals: list[dict[str, Any]] = field(default_factory=list)
    private: bool = True
    chain: str = "-"
    """Ledger only: ``intact ...`` or why the chain or a signature does not verify."""
    anchor: str = "-"
    """Ledger checked against anchors only: whether it extends the coordinator's anchor, or the gap."""
    problems: list[str] = field(default_factory=list)
    """Failed checks (chain, anchor), one line each; empty when every check passed."""

    @property
    def spent(self) -> float | None:
        return self.rows[-1]["epsilon"] if self.rows else 0.0

    @property
    def cap(self) -> float | None:
        caps = [r.get("cap_epsilon") for r in self.rows if r.get("cap_epsilon") is not None]
        return caps[-1] if caps else None


def from_ledger(state_dir: str | Path, name: str | None = None, *, anchors: AnchorStore | None = None,
                strict: bool = True) -> SiteReport:
    """Rebuild a site's spending from its ledger, recomputing each cumulative epsilon.

    Args:
        name: the site's name (default: the name its entries record, else the folder's name); with ``anchors``
            it is the key of the site's anchor.
        anchors: the coordinator's anchor store: check that the ledger still extends what the coordinator saw.
        strict: raise when the chain does not verify (else the report carries the reason and no rows).

    Raises:
        MedfedError: no ledger there (without ``anchors``: with them, a missing ledger is a ``deleted`` gap).
        LedgerTamperedError: with ``strict``, the chain or a signature does not verify.
    """
    path = Path(state_dir)
    ledger = Ledger(path / LEDGER_FILE if path.is_dir() else path)
    if not ledger.path.exists() and anchors is None:
        raise MedfedError(f"{ledger.path}: no privacy ledger there")
    written = ledger.unverified_entries() if ledger.path.exists() else []
    recorded = next((e.data["site"] for e in reversed(written) if "site" in e.data), None)
    report = SiteReport(site=name or recorded or ledger.path.parent.name, source=f"ledger {ledger.path}")
    entries: list = []
    try:
        entries = ledger.entries()
        report.chain = (f"intact: {len(entries)} entries signed by {signer_fingerprint(next_signer(entries))}"
                        if entries else "no entries")
    except LedgerTamperedError as err:
        if strict:
            raise
        report.chain = f"BROKEN: {err}"
        report.problems.append(str(err))
    if anchors is not None:
        heads = anchors.history(report.site)
        if not heads:
            report.anchor = f"no anchor for site '{report.site}' in {anchors.path}"
            report.problems.append(report.anchor)
        else:
            check = check_ledger_against(ledger, heads)
            report.anchor = check.message if check.extends else f"{check.gap.upper()}: {check.message}"
            if not check.extends:
                report.problems.append(check.message)
    if report.chain.startswith("BROKEN"):
        return report
    rounds = [e for e in entries if e.kind == "round"]
    for i, e in enumerate(rounds):
        d = e.data
        recomputed = epsilon(history_of(rounds[: i + 1]), d["delta"], d["accountant"])
        report.rows.append({"run": d.get("run_name") or d.get("run_id"), "round": d["round"], "epsilon": recomputed,
                            "epsilon_recorded": d["epsilon"], "delta": d["delta"], "cap_epsilon": d["cap_epsilon"],
                            "noise_multiplier": d["noise_multiplier"], "sample_rate": d["sample_rate"],
                            "steps": d["steps"], "max_grad_norm": d["max_grad_norm"],
                            "noise_multiplicity": d.get("noise_multiplicity", 1), "accountant": d["accountant"],
                            "time": e.time, "code": d.get("code_version", {}).get("medfed_sources_sha256", "")[:12]})
    report.refusals = [{"time": e.time, **e.data} for e in entries if e.kind == "refusal"]
    return report


def from_run(run_dir: str | Path) -> list[SiteReport]:
    """What each site reported to the coordinator, from a run folder's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise MedfedError(f"{path}: not a run folder (no metrics.jsonl)")
    rounds = RunDir(Path(run_dir)).rounds()
    private = all(r.privacy != "NOT PRIVATE" for r in rounds)
    reports: dict[str, SiteReport] = {}
    for r in rounds:
        for s in r.sites:
            rep = reports.setdefault(s.site, SiteReport(site=s.site, source=f"run {Path(run_dir)}"))
            if s.epsilon is not None:
                rep.rows.append({"run": Path(run_dir).name, "round": r.round, "epsilon": s.epsilon,
                                 "delta": s.delta, "cap_epsilon": s.cap_epsilon})
            if s.status == Status.REFUSED and s.reason is not None:
                rep.refusals.append({"round": r.round, "reason": f"{s.reason.value}: {s.reason_text}"})
    if not private:
        sites = sorted({s.site for r in rounds for s in r.sites})
        return [SiteReport(site=s, source=f"run {Path(run_dir)}", private=False) for s in sites]
    return [rep for rep in reports.values() if rep.rows or rep.refusals]


def write_report(reports: list[SiteReport], out_dir: str | Path) -> dict[str, Path]:
    """Write the JSON, Markdown and HTML reports and the epsilon plot; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"sites": [{**asdict(r), "spent_epsilon": r.spent, "cap_epsilon": r.cap} for r in reports],
               "notes": NOTES}
    paths = {"json": out / "privacy-report.json", "markdown": out / "privacy-report.md",
             "html": out / "privacy-report.html", "plot": out / "privacy-epsilon.png"}
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    epsilon_plot(reports, paths["plot"])
    paths["markdown"].write_text(markdown(reports))
    paths["html"].write_text(to_html(reports, paths["plot"].name))
    return paths


NOTES = [
    "Sample-level (epsilon, delta)-differential privacy of each site's images, from Opacus DP-SGD with Poisson "
    "sampling at that site; composition over rounds and runs by the site's accountant.",
    "Adjacency: adding or removing one image at one site. The sample rate, steps and noise normaliser come from the "
    "site's declared (public) dataset size, never from its exact image count, so the mechanism that runs is the one "
    "the accountant analyses whatever that count is.",
    "FedAvg and secure aggregation are post-processing of the sites' DP outputs and do not weaken the guarantee.",
    "Not covered: per-site evaluation scores (only when a site's policy shares evaluation). Training losses, timing "
    "and exact image counts stay in each site's own log; the coordinator sees declared sizes and epsilons only.",
    "Opacus secure_mode is unavailable on torch 2.x (torchcsprng); noise is drawn from an OS-entropy-seeded "
    "generator at the site, never from the run's seed.",
]


def epsilon_plot(reports: list[SiteReport], path: Path) -> Path:
    """``privacy-epsilon.png``: each site's cumulative epsilon and cap, readable from one round to dozens of sites.

    One round entry per site: a bar per site with its value and a dash at its cap. More: a line per site over
    its round entries (integer ticks), the legend beside the axes in columns past 10 sites, and one dashed line
    per distinct cap naming how many sites share it.
    """
    from matplotlib.ticker import MaxNLocator

    from medfed.plots import plt

    shown = [r for r in reports if r.rows]
    rounds = max((len(r.rows) for r in shown), default=1)
    many = len(shown) > 10
    columns = 1 + (len(shown) - 1) // 18 if many and rounds > 1 else 0
    width = max(6.5, 0.32 * len(shown) + 2) if rounds == 1 else 6.5 + 2.2 * columns
    fig, ax = plt.subplots(figsize=(width, 4.4 + (0.8 if rounds == 1 and many else 0)))
    palette = plt.get_cmap("tab10" if not many else "turbo")
    colours = [palette(i if not many else i / max(len(shown) - 1, 1)) for i in range(len(shown))]
    caps: dict[float, list[str]] = {}
    for r in reports:
        if r.cap is not None:
            caps.setdefault(float(r.cap), []).append(r.site)
    if rounds == 1:
        xs = list(range(len(shown)))
        values = [r.rows[0]["epsilon"] for r in shown]
        ax.bar(xs, values, color=colours, width=0.6)
        for x, r, v in zip(xs, shown, values):
            if r.cap is not None:
                ax.plot([x - 0.4, x + 0.4], [r.cap, r.cap], linestyle="--", color="dimgrey", linewidth=1.2)
            if len(shown) <= 15:
                ax.annotate(f"{v:.2f}", (x, v), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
        ax.set_xticks(xs, [r.site for r in shown], rotation=90 if many else 0, fontsize=7 if many else 9)
        ax.set_xlim(-0.6, max(len(shown) - 0.4, 0.6))
        ax.set_xlabel("site (one round entry each; dashes: each site's cap)")
    else:
        for r, colour in zip(shown, colours):
            ax.plot(range(1, len(r.rows) + 1), [row["epsilon"] for row in r.rows], marker="o",
                    markersize=5 if rounds <= 5 else 3, linewidth=1.4, color=colour,
                    label=f"{r.site} ({r.source.split()[0]})")
        for cap, sites in sorted(caps.items()):
            who = sites[0] if len(sites) == 1 else f"{len(sites)} sites"
            ax.axhline(cap, linestyle="--", color="dimgrey", linewidth=1)
            ax.annotate(f"cap {cap:g} ({who})", (0.5, cap), xycoords=("axes fraction", "data"), ha="center",
                        va="bottom", fontsize=8, color="dimgrey")
        ax.set_xlim(0.5, rounds + 0.5)
        if rounds <= 12:
            ax.set_xticks(range(1, rounds + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
        ax.set_xlabel("round entry at the site (in order)")
        if columns:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=columns, frameon=False)
        else:
            ax.legend(fontsize=8, loc="lower right")
    top = max([cap for cap in caps] + [y for r in shown for y in (row["epsilon"] for row in r.rows)] + [1e-3])
    ax.set_ylim(0, top * 1.12)
    ax.set_title(f"cumulative privacy spent per site ({len(shown)} site{'s' if len(shown) != 1 else ''})")
    ax.set_ylabel("epsilon")
    ax.grid(alpha=0.3, axis="y" if rounds == 1 else "both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _summary_rows(reports: list[SiteReport]) -> list[list[str]]:
    rows = []
    for r in reports:
        checks = [r.chain, r.anchor]
        if not r.private:
            rows.append([r.site, "NOT PRIVATE", "-", "-", "-", "-", *checks, r.source])
            continue
        delta = r.rows[-1]["delta"] if r.rows else None
        spent = "UNKNOWN (ledger does not verify)" if r.chain.startswith("BROKEN") else f"{r.spent:.4f}"
        rows.append([r.site, spent, "-" if r.cap is None else f"{r.cap:g}",
                     "-" if delta is None else f"{delta:g}", str(len(r.rows)), str(len(r.refusals)), *checks,
                     r.source])
    return rows


HEAD = ["site", "epsilon spent", "cap", "delta", "rounds", "refusals", "ledger chain", "coordinator anchor",
        "source"]
ROUND_HEAD = ["run", "round", "epsilon", "delta", "noise multiplier", "sample rate", "steps", "max grad norm"]


def _round_cells(row: dict[str, Any]) -> list[str]:
    return [str(row["run"]), str(row["round"]), f"{row['epsilon']:.4f}", str(row["delta"]),
            _fmt(row.get("noise_multiplier")), _fmt(row.get("sample_rate")), str(row.get("steps", "-")),
            _fmt(row.get("max_grad_norm"))]


def markdown(reports: list[SiteReport]) -> str:
    lines = ["# Privacy budget report", "", "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(row) + " |" for row in _summary_rows(reports)]
    lines += [f"\n**{r.site}: {problem}**" for r in reports for problem in r.problems]
    for r in reports:
        if not r.rows and not r.refusals:
            continue
        lines += ["", f"## {r.site}", "", "| " + " | ".join(ROUND_HEAD) + " |", "|" + "---|" * len(ROUND_HEAD)]
        lines += ["| " + " | ".join(_round_cells(row)) + " |" for row in r.rows]
        for ref in r.refusals:
            lines.append(f"\nRefused round {ref.get('round')}: {ref.get('reason')}")
    lines += ["", "## What the numbers mean", ""] + [f"- {n}" for n in NOTES] + [""]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


def to_html(reports: list[SiteReport], plot_name: str) -> str:
    def table(head: list[str], rows: list[list[str]]) -> str:
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Privacy budget report</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}.problem{color:#b00020}</style>"
             "</head><body>",
             "<h1>Privacy budget report</h1>", table(HEAD, _summary_rows(reports)),
             f"<p><img src='{html.escape(plot_name)}' alt='epsilon per round' style='max-width:100%'></p>"]
    for r in reports:
        for problem in r.problems:
            parts.append(f"<p class='problem'>{html.escape(r.site)}: {html.escape(problem)}</p>")
    for r in reports:
        if r.rows:
            parts.append(f"<h2>{html.escape(r.site)}</h2>")
            parts.append(table(ROUND_HEAD, [_round_cells(x) for x in r.rows]))
        for ref in r.refusals:
            parts.append(f"<p>Refused round {ref.get('round')}: {html.escape(str(ref.get('reason')))}</p>")
    parts.append("<h2>What the numbers mean</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in NOTES) +
                 "</ul></body></html>")
    return "\n".join(parts)
