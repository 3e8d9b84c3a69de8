"""Training throughput (images/s) and peak memory of the UNet presets at batch 64, one configuration per process.

Each configuration (preset x image shape) runs in a fresh child process, so its peak memory is its own: on the CPU
the child's peak resident set size (which includes Python, torch and MONAI; ``rss_before_mib`` is the same figure
measured just before the first step), on a GPU ``torch.cuda.max_memory_allocated``. The step is the centralized
trainer's: ``medfed.diffusion.per_sample_loss`` -> mean -> backward -> gradient-norm clip 1.0 -> AdamW -> EMA
update. Inputs are random images in [-1, 1]; the work per step does not depend on pixel values.
Throughput is batch / median step time over the timed steps (medians resist other processes' load spikes).

Usage: ``python benchmarks/bench_training.py [--quick] [--device auto|cpu|cuda]``; writes
``benchmarks/results/training.json``. Run time on the shared 2-core machine: 2.2 min (``--quick``: ``tiny`` only, 25 s).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

# As the medfed CLI does: OpenMP threads spinning while they wait make timings erratic on shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mib, run_child, synchronize, write_results  # noqa: E402

from medfed.config import DiffusionConfig  # noqa: E402
from medfed.devices import resolve_device  # noqa: E402
from medfed.diffusion import make_scheduler, per_sample_loss  # noqa: E402
from medfed.models import build_unet, count_parameters, ema_update  # noqa: E402

BATCH = 64
SHAPES = [(1, 28, 28), (3, 32, 32)]


def measure(spec: dict) -> dict:
    """Time ``spec['steps']`` training steps after ``spec['warmup']`` untimed ones; runs inside the child."""
    device = resolve_device(spec["device"])
    shape = tuple(spec["shape"])
    torch.manual_seed(0)
    model = build_unet(spec["preset"], shape[0]).to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    scheduler = make_scheduler(DiffusionConfig())
    generator = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand((BATCH, *shape), device=device, generator=generator) * 2 - 1

    def step() -> None:
        loss = per_sample_loss(model, scheduler, x0, generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, model, 0.999)

    rss_before = peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["steps"]):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    row = {"preset": spec["preset"], "image_shape": list(shape), "batch_size": BATCH,
           "parameters": count_parameters(model), "device": str(device), "timed_steps": len(times),
           "median_step_s": round(median, 4), "images_per_s": round(BATCH / median, 1),
           "step_s_min_max": [round(min(times), 4), round(max(times), 4)]}
    if device.type == "cuda":
        row["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        row["memory_measure"] = "torch.cuda.max_memory_allocated"
    else:
        row["peak_memory_mib"] = round(peak_rss_mib(), 1)
        row["rss_before_mib"] = round(rss_before, 1)
        row["memory_measure"] = "peak RSS (VmHWM) of the child process"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset only, 3 timed steps (numbers are rough)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return
    presets = ["tiny"] if args.quick else ["tiny", "micro"]
    steps, warmup = (3, 1) if args.quick else (20, 2)
    start, load_at_start = time.perf_counter(), os.getloadavg()[0]
    rows = []
    for preset in presets:
        for shape in SHAPES:
            row = run_child(__file__, {"preset": preset, "shape": shape, "device": args.device, "steps": steps,
                                       "warmup": warmup})
            print(f"{preset:>6} {'x'.join(map(str, shape)):>8}  {row['images_per_s']:8.1f} images/s  "
                  f"peak {row['peak_memory_mib']:.0f} MiB", flush=True)
            rows.append(row)
    write_results("training", {
        "quick": args.quick,
        "what": "one centralized training step: per_sample_loss, backward, clip 1.0, AdamW, EMA; batch 64",
        "rows": rows,
        "load_average_1m_at_start": load_at_start, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "wall_s": round(time.perf_counter() - start, 1),
    })


if __name__ == "__main__":
    main()
