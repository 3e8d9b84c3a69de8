"""Choose the guidance scale on validation data that is neither private nor test: TSTR of each checkpoint's samples
at each scale, tested on the 4,500 public embedded MNIST digits (``embedded-mnist``, ``train`` split).

The quality benchmark (``bench_quality.py``) samples at the scale this chooses (``Budget.guidance``). Same sampling
as the benchmark: 1,000 samples, every class equally often, DDIM 25 steps, seed 0; the fixed CNN of
``medfed.evaluation.utility``.

Usage:
    python benchmarks/guidance_sweep.py --guidance 0,0.5,1.5 runs/quality-v/cpu/mnist/runs/arm-1/checkpoints/latest.pt
Writes ``benchmarks/results/guidance-sweep.json`` (one entry per checkpoint and scale, merged with earlier runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "guidance-sweep.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--guidance", default="0,0.5,1.5", help="comma-separated scales")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from medfed.checkpoint import load_checkpoint
    from medfed.config import DataConfig
    from medfed.datasets import load_dataset
    from medfed.evaluation.utility import sample_labelled, utility_report

    validation = load_dataset(DataConfig(dataset="embedded-mnist", split="train"))
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"validation": validation.name, "runs": []}
    for path in args.checkpoints:
        prediction = load_checkpoint(path).config.diffusion.prediction
        for scale in (float(x) for x in args.guidance.split(",")):
            samples, _ = sample_labelled(path, args.num, guidance=scale, sampler="ddim", steps=25, seed=0,
                                         device=args.device)
            tstr = utility_report(samples.images, samples.labels, validation, source=str(path), seed=0,
                                  device=args.device)["synthetic"]
            results["runs"].append({"checkpoint": str(path), "prediction": prediction, "guidance": scale,
                                    "num": args.num, "accuracy": tstr["accuracy"]})
            print(f"{path} ({prediction}) w={scale:g}: TSTR on the validation digits {tstr['accuracy']:.4f}",
                  file=sys.stderr, flush=True)
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
