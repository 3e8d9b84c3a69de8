"""Choose the guidance scale on validation data that is neither private nor test: TSTR of each checkpoint's samples
at each scale, tested on the 4,500 public embedded MNIST digits (``embedded-mnist``, ``train`` split).

The quality benchmark (``bench_quality.py``) samples at the scale this chooses (``Budget.guidance``). Same sampling
as the benchmark: 1,000 samples, every class equally often, DDIM 25 steps, seed 0; the fixed CNN of
``medfed.evaluation.utility``.

Usage:
    python benchmarks/guidance_sweep.py --guidance 0,0.5,1.5 runs/quality-v/cpu/mnist/runs/arm-1/checkpoints/latest.pt
Writes ``benchmarks/results/guidance-sweep.json`` (one entry per checkpoint and scale, merged with earlier runs;
the command and machine of the latest).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_quality import BUDGETS
from common import RESULTS, write_results

NAME = "guidance-sweep"


def main() -> None:
    budget = BUDGETS["cpu"]["mnist"]  # the benchmark's sampling: num_samples, sample_steps
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--guidance", default="0,0.5,1.5", help="comma-separated scales")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from medfed.checkpoint import load_checkpoint
    from medfed.config import DataConfig
    from medfed.datasets import load_dataset
    from medfed.devices import resolve_device
    from medfed.evaluation.scoring import SamplingSpec, score_checkpoint

    device = resolve_device(args.device)
    validation = load_dataset(DataConfig(dataset="embedded-mnist", split="train"))
    path = RESULTS / f"{NAME}.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    for checkpoint in args.checkpoints:
        prediction = load_checkpoint(checkpoint).config.diffusion.prediction
        for scale in (float(x) for x in args.guidance.split(",")):
            sampling = SamplingSpec(num=budget.num_samples, guidance=scale, steps=budget.sample_steps, seed=0)
            tstr = score_checkpoint(checkpoint, validation, [], sampling, device=device).tstr["synthetic"]
            runs.append({"checkpoint": str(checkpoint), "prediction": prediction, "guidance": scale,
                         "num": sampling.num, "steps": sampling.steps, "accuracy": tstr["accuracy"]})
            print(f"{checkpoint} ({prediction}) w={scale:g}: TSTR on the validation digits {tstr['accuracy']:.4f}",
                  file=sys.stderr, flush=True)
            write_results(NAME, {"validation": validation.name, "runs": runs})


if __name__ == "__main__":
    main()
