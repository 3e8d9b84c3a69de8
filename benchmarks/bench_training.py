"""Training throughput (images/s), peak memory and the loss, float32 eager against bfloat16 autocast, at batch 64.

Each configuration (preset x image shape) runs in a fresh child process, so its peak memory is its own: on the CPU
the child's peak resident set size (which includes Python, torch, MONAI and one model per precision;
``rss_before_mib`` is the same figure measured just before the first step), on a GPU
``torch.cuda.max_memory_allocated``. The step is the one centralized training and a site's non-private round take:
``medfed.diffusion.train_step`` (DDPM loss, backward, gradient-norm clip 1.0, AdamW) plus an EMA update, at each
``train.precision`` compared (default ``float32`` and ``bfloat16``). Inside the child every precision has its own
model from the same initial weights and sees the same batches of real images (the embedded MNIST digits, resized
to the shape) and the same label dropout, timesteps and noise; their steps alternate, the order flipping every
step, so both see the same machine load. Reported per precision: images/s (batch / median step time), and the
mean loss over all steps and over the last quarter, to show that bfloat16 trains as float32 does.

Usage: ``python benchmarks/bench_training.py [--quick] [--device auto|cpu|cuda] [--precisions float32,bfloat16]
[--num-classes 10]``; writes ``benchmarks/results/training.json``.
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

from medfed.config import DataConfig, DiffusionConfig  # noqa: E402
from medfed.datasets import load_dataset  # noqa: E402
from medfed.devices import resolve_device  # noqa: E402
from medfed.diffusion import StepOptions, make_scheduler, train_step  # noqa: E402
from medfed.diffusion.training import resolve_train_precision  # noqa: E402
from medfed.models import build_unet, count_parameters, ema_update, warmup_decay  # noqa: E402

BATCH = 64
SHAPES = [(1, 28, 28), (3, 32, 32)]


def measure(spec: dict) -> dict:
    """Run ``spec['warmup']`` untimed and ``spec['steps']`` timed steps per precision, alternating; in the child."""
    device = resolve_device(spec["device"])
    shape = tuple(spec["shape"])
    classes = spec["num_classes"]
    data = load_dataset(DataConfig(dataset="embedded-mnist", channels=shape[0], image_size=shape[1]))
    scheduler = make_scheduler(DiffusionConfig())
    torch.manual_seed(0)
    initial = build_unet(spec["preset"], shape[0], classes).to(device).train()
    arms = {}
    for precision in spec["precisions"]:
        model = copy.deepcopy(initial)
        arms[precision] = {"model": model, "ema": copy.deepcopy(model).requires_grad_(False),
                           "optimizer": torch.optim.AdamW(model.parameters(), lr=2e-4),
                           "options": StepOptions(num_classes=classes, label_dropout=0.1, grad_clip=1.0,
                                                  precision=resolve_train_precision(precision, device)),
                           "times": [], "losses": []}

    def step(arm: dict, n: int) -> float:
        index = torch.randperm(len(data), generator=torch.Generator().manual_seed(n))[:BATCH]
        generator = torch.Generator(device=device).manual_seed(n)
        synchronize(device)
        start = time.perf_counter()
        loss = train_step(arm["model"], arm["optimizer"], scheduler, data.images[index].to(device),
                          data.labels[index].to(device), generator, arm["options"])
        ema_update(arm["ema"], arm["model"], warmup_decay(n, 0.999))
        synchronize(device)
        arm["losses"].append(loss)
        return time.perf_counter() - start

    rss_before = peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    names = list(arms)
    for n in range(spec["warmup"] + spec["steps"]):
        for precision in names if n % 2 == 0 else names[::-1]:
            seconds = step(arms[precision], n)
            if n >= spec["warmup"]:
                arms[precision]["times"].append(seconds)
    rows = []
    for precision, arm in arms.items():
        times, losses = arm["times"], arm["losses"]
        median = statistics.median(times)
        row = {"preset": spec["preset"], "image_shape": list(shape), "batch_size": BATCH, "num_classes": classes,
               "precision": precision, "resolved_precision": arm["options"].precision,
               "parameters": count_parameters(arm["model"]), "device": str(device), "timed_steps": len(times),
               "median_step_s": round(median, 4), "images_per_s": round(BATCH / median, 1),
               "step_s_min_max": [round(min(times), 4), round(max(times), 4)],
               "loss_mean_all_steps": round(statistics.fmean(losses), 4),
               "loss_mean_last_quarter": round(statistics.fmean(losses[-max(1, len(losses) // 4):]), 4)}
        if device.type == "cuda":
            row["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            row["memory_measure"] = "torch.cuda.max_memory_allocated (all precisions' models)"
        else:
            row["peak_memory_mib"] = round(peak_rss_mib(), 1)
            row["rss_before_mib"] = round(rss_before, 1)
            row["memory_measure"] = "peak RSS (VmHWM) of the child process (all precisions' models)"
        rows.append(row)
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset only, 4 timed steps (numbers are rough)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precisions", default="float32,bfloat16", help="train.precision values to compare")
    parser.add_argument("--num-classes", type=int, default=0, help="model.num-classes (0 = unconditional)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per precision (default 20, quick 4)")
    parser.add_argument("--presets", default="", help="comma-separated presets (default tiny,micro; quick tiny)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return
    presets = args.presets.split(",") if args.presets else (["tiny"] if args.quick else ["tiny", "micro"])
    steps, warmup = (args.steps or (4 if args.quick else 20)), (1 if args.quick else 2)
    precisions = args.precisions.split(",")
    start, load_at_start = time.perf_counter(), os.getloadavg()[0]
    rows = []
    for preset in presets:
        for shape in SHAPES:
            result = run_child(__file__, {"preset": preset, "shape": shape, "device": args.device, "steps": steps,
                                          "warmup": warmup, "precisions": precisions,
                                          "num_classes": args.num_classes})
            base = result["rows"][0]["images_per_s"]
            for row in result["rows"]:
                row["speedup_vs_first"] = round(row["images_per_s"] / base, 2)
                print(f"{preset:>6} {'x'.join(map(str, shape)):>8} {row['precision']:>9}  "
                      f"{row['images_per_s']:8.1f} images/s ({row['speedup_vs_first']:.2f}x)  "
                      f"loss {row['loss_mean_all_steps']:.4f} (last quarter {row['loss_mean_last_quarter']:.4f})  "
                      f"peak {row['peak_memory_mib']:.0f} MiB", flush=True)
                rows.append(row)
    write_results("training", {
        "quick": args.quick,
        "what": ("one training step: medfed.diffusion.train_step (DDPM loss, backward, clip 1.0, AdamW) + EMA, "
                 f"batch {BATCH}, real images, per train.precision, alternating in one process"),
        "goal": "bfloat16 >= 1.5x the images/s of float32 on CPUs with AMX, same loss over the same steps",
        "rows": rows,
        "load_average_1m_at_start": load_at_start, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "wall_s": round(time.perf_counter() - start, 1),
    })


if __name__ == "__main__":
    main()
