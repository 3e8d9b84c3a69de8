"""``medfed demo``: the main job end to end on the embedded real dataset."""

from __future__ import annotations

from medfed.centralized import train_centralized
from medfed.config import from_flat


def run_demo(out: str = "runs", name: str = "demo", device: str = "auto") -> None:
    cfg = from_flat({"data.dataset": "embedded-mnist", "model.preset": "micro", "train.steps": 1500,
                     "train.lr": 1e-3, "train.checkpoint-every": 500, "train.sample-every": 500,
                     "train.device": device, "output.dir": out, "output.name": name})
    train_centralized(cfg)
