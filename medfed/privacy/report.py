"""Privacy-budget reports: per site, per round, cumulative epsilon at delta, against the site's cap.

Two sources, never mixed in one row:

* a site's own **ledger** (authoritative: its hash chain is verified, and epsilon is recomputed from the
  recorded noise multipliers, sample rates and steps with the ledger's accountant), and
* a **run folder**'s ``metrics.jsonl`` (what each site reported to the coordinator each round).

Outputs: ``privacy-report.json``, ``privacy-report.md``, ``privacy-report.html`` and ``privacy-epsilon.png``.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medfed.errors import MedfedError
from medfed.plots import line_plot
from medfed.privacy.accounting import epsilon
from medfed.privacy.budget import history_of
from medfed.privacy.ledger import LEDGER_FILE, Ledger


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

    @property
    def spent(self) -> float | None:
        return self.rows[-1]["epsilon"] if self.rows else 0.0

    @property
    def cap(self) -> float | None:
        caps = [r.get("cap_epsilon") for r in self.rows if r.get("cap_epsilon") is not None]
        return caps[-1] if caps else None


def from_ledger(state_dir: str | Path, name: str | None = None) -> SiteReport:
    """Rebuild a site's spending from its ledger, recomputing each cumulative epsilon."""
    path = Path(state_dir)
    ledger = Ledger(path / LEDGER_FILE if path.is_dir() else path)
    if not ledger.path.exists():
        raise MedfedError(f"{ledger.path}: no privacy ledger there")
    entries = ledger.entries()
    recorded = next((e.data["site"] for e in reversed(entries) if "site" in e.data), None)
    report = SiteReport(site=name or recorded or ledger.path.parent.name, source=f"ledger {ledger.path}")
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
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rounds = [r for r in records if "round" in r]
    private = all(r.get("privacy") != "NOT PRIVATE" for r in records)
    reports: dict[str, SiteReport] = {}
    for r in rounds:
        for site, eps in r.get("epsilon", {}).items():
            rep = reports.setdefault(site, SiteReport(site=site, source=f"run {Path(run_dir)}"))
            rep.rows.append({"run": Path(run_dir).name, "round": r["round"], "epsilon": eps,
                             "delta": r.get("delta", {}).get(site), "cap_epsilon": r.get("cap_epsilon", {}).get(site)})
        for failure in r.get("failures", []):
            if "privacy cap reached" in failure:
                site = failure.split("site ", 1)[-1].split(" ", 1)[0]
                reports.setdefault(site, SiteReport(site=site, source=f"run {Path(run_dir)}")).refusals.append(
                    {"round": r["round"], "reason": failure})
    if not private:
        sites = {s for r in rounds for s in r.get("train_loss", {})}
        return [SiteReport(site=s, source=f"run {Path(run_dir)}", private=False) for s in sorted(sites)]
    return list(reports.values())


def write_report(reports: list[SiteReport], out_dir: str | Path) -> dict[str, Path]:
    """Write the JSON, Markdown and HTML reports and the epsilon plot; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"sites": [{**asdict(r), "spent_epsilon": r.spent, "cap_epsilon": r.cap} for r in reports],
               "notes": NOTES}
    paths = {"json": out / "privacy-report.json", "markdown": out / "privacy-report.md",
             "html": out / "privacy-report.html", "plot": out / "privacy-epsilon.png"}
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    series = {f"{r.site} ({r.source.split()[0]})": (list(range(1, len(r.rows) + 1)), [row["epsilon"] for row in r.rows])
              for r in reports if r.rows}
    caps = {f"cap {r.site}": r.cap for r in reports if r.cap is not None}
    line_plot([("cumulative privacy spent per site", "epsilon", series)], paths["plot"], xlabel="round (in order)",
              hlines={0: caps})
    paths["markdown"].write_text(markdown(reports))
    paths["html"].write_text(to_html(reports, paths["plot"].name))
    return paths


NOTES = [
    "Sample-level (epsilon, delta)-differential privacy of each site's images, from Opacus DP-SGD with Poisson "
    "sampling at that site; composition over rounds and runs by the site's accountant.",
    "FedAvg and secure aggregation are post-processing of the sites' DP outputs and do not weaken the guarantee.",
    "Not covered: the training loss and example counts sites report, and per-site evaluation scores.",
    "Opacus secure_mode is unavailable on torch 2.x (torchcsprng); noise is drawn from an OS-entropy-seeded "
    "generator at the site, never from the run's seed.",
]


def _summary_rows(reports: list[SiteReport]) -> list[list[str]]:
    rows = []
    for r in reports:
        if not r.private:
            rows.append([r.site, "NOT PRIVATE", "-", "-", "-", "-", r.source])
            continue
        delta = r.rows[-1]["delta"] if r.rows else None
        rows.append([r.site, f"{r.spent:.4f}", "-" if r.cap is None else f"{r.cap:g}",
                     "-" if delta is None else f"{delta:g}", str(len(r.rows)), str(len(r.refusals)), r.source])
    return rows


HEAD = ["site", "epsilon spent", "cap", "delta", "rounds", "refusals", "source"]


def markdown(reports: list[SiteReport]) -> str:
    lines = ["# Privacy budget report", "", "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(row) + " |" for row in _summary_rows(reports)]
    for r in reports:
        if not r.rows and not r.refusals:
            continue
        lines += ["", f"## {r.site}", "", "| run | round | epsilon | delta | noise multiplier | sample rate | steps |",
                  "|---|---|---|---|---|---|---|"]
        for row in r.rows:
            lines.append(f"| {row['run']} | {row['round']} | {row['epsilon']:.4f} | {row['delta']} | "
                         f"{_fmt(row.get('noise_multiplier'))} | {_fmt(row.get('sample_rate'))} | "
                         f"{row.get('steps', '-')} |")
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
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>",
             "<h1>Privacy budget report</h1>", table(HEAD, _summary_rows(reports)),
             f"<p><img src='{html.escape(plot_name)}' alt='epsilon per round' width='600'></p>"]
    for r in reports:
        if r.rows:
            parts.append(f"<h2>{html.escape(r.site)}</h2>")
            parts.append(table(["run", "round", "epsilon", "delta"],
                               [[str(x["run"]), str(x["round"]), f"{x['epsilon']:.4f}", str(x["delta"])]
                                for x in r.rows]))
        for ref in r.refusals:
            parts.append(f"<p>Refused round {ref.get('round')}: {html.escape(str(ref.get('reason')))}</p>")
    parts.append("<h2>What the numbers mean</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in NOTES) +
                 "</ul></body></html>")
    return "\n".join(parts)
