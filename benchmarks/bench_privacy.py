"""Seconds per DP-SGD step against a non-private step, per per-sample-gradient engine, and peak memory.

The full DDPM epsilon-prediction step of the ``tiny`` UNet at batch 64 (AdamW, clipping norm 1, noise 1), on
28x28x1 and 32x32x3. Engines: Opacus ``hooks``, Opacus ``functorch`` (per-layer vmap inside the hooks), Opacus
``ghost`` (fast gradient clipping), medfed's ``vmap`` (whole-model ``torch.func`` per-sample gradients with
Opacus' ``no_op`` mode, in chunks of ``privacy.per-sample-chunk`` images) and medfed's ``layers`` (per-layer
per-sample gradients after one weight-free backward pass, also ``no_op``: the default, what medfed trains with).

Step time: one process per shape builds every engine (each its own model, same initial weights) and steps them
round-robin, the order rotating every round, ``--rounds`` times; the median per engine is reported. Every engine
thus sees the same machine load, which on a shared VM moves by 25% within minutes. Peak memory: each (engine,
shape) also runs alone in its own process (its step time there is reported as ``alone_step_s``, for reference).
Fixed-size batches are used for timing only (training uses Poisson).

Usage: python benchmarks/bench_privacy.py [--quick] [--rounds 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

ENGINES = ("non-private", "hooks", "functorch", "ghost", "vmap", "layers")
MEDFED_ENGINE = "layers"
SHAPES = {"28x28x1": (1, 28, 28), "32x32x3": (3, 32, 32)}


def make_step(engine: str, shape_name: str, batch: int) -> Callable[[], None]:
    """A closure running one training step of ``engine`` on its own ``tiny`` UNet (seed 0)."""
    import torch
    from opacus import PrivacyEngine
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from medfed.config import DiffusionConfig, PrivacyConfig
    from medfed.diffusion import denoising_error, draw_noisy_inputs, make_scheduler, per_sample_loss
    from medfed.models import build_unet
    from medfed.privacy.dp_sgd import attach_grad_samples

    torch.manual_seed(0)
    shape = SHAPES[shape_name]
    model = build_unet("tiny", shape[0])
    scheduler = make_scheduler(DiffusionConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.rand(batch, *shape) * 2 - 1
    loader = DataLoader(TensorDataset(x0), batch_size=batch)

    class PerSampleMSE(nn.Module):
        reduction = "mean"

        def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            per_sample = denoising_error(pred, target)
            return per_sample if self.reduction == "none" else per_sample.mean()

    if engine == "non-private":
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            per_sample_loss(model, scheduler, x0).mean().backward()
            optimizer.step()
        return step

    mode = {"vmap": "no_op", "layers": "no_op"}.get(engine, engine)
    extra = {"criterion": PerSampleMSE()} if engine == "ghost" else {}
    made = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=False, grad_sample_mode=mode, **extra)
    private, dp_opt = made[0], made[1]
    criterion = made[2] if engine == "ghost" else None

    def dp_step() -> None:
        dp_opt.zero_grad(set_to_none=True)
        x_t, t, eps = draw_noisy_inputs(scheduler, x0, 1, None)
        if engine in ("vmap", "layers"):
            attach_grad_samples(engine, model, x_t, t, eps, PrivacyConfig().per_sample_chunk)
        elif engine == "ghost":
            criterion(private(x_t[:, 0], t[:, 0]), eps[:, 0]).backward()
        else:
            denoising_error(private(x_t[:, 0], t[:, 0]), eps[:, 0]).mean().backward()
        dp_opt.step()
    return dp_step


def timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def alone(engine: str, shape_name: str, steps: int, batch: int) -> dict:
    """One engine in this process: median step time and the process' peak memory."""
    from common import peak_rss_mib

    step = make_step(engine, shape_name, batch)
    for _ in range(2):
        step()
    times = [timed(step) for _ in range(steps)]
    return {"engine": engine, "shape": shape_name, "alone_step_s": statistics.median(times),
            "peak_rss_mib": peak_rss_mib()}


def interleaved(shape_name: str, rounds: int, batch: int) -> dict[str, list[float]]:
    """Every engine in this process, stepped round-robin; the step times of each."""
    steps = {engine: make_step(engine, shape_name, batch) for engine in ENGINES}
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {engine: [] for engine in ENGINES}
    for r in range(rounds):
        order = ENGINES[r % len(ENGINES):] + ENGINES[:r % len(ENGINES)]
        for engine in order:
            times[engine].append(timed(steps[engine]))
    return times


def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 16, 3 rounds, 2 steps alone")
    parser.add_argument("--rounds", type=int, default=12, help="round-robin rounds (one step per engine each)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps of each engine alone")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--alone", nargs=2, metavar=("ENGINE", "SHAPE"), help=argparse.SUPPRESS)
    parser.add_argument("--interleaved", metavar="SHAPE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.alone:
        print(json.dumps(alone(args.alone[0], args.alone[1], args.steps, args.batch)))
        return 0
    if args.interleaved:
        print(json.dumps(interleaved(args.interleaved, args.rounds, args.batch)))
        return 0
    batch, rounds, steps = (16, 3, 2) if args.quick else (args.batch, args.rounds, args.steps)
    sizes = ["--batch", str(batch)]
    rows = []
    for shape in SHAPES:
        times = run_child(["--interleaved", shape, "--rounds", str(rounds), *sizes])
        base = statistics.median(times["non-private"])
        for engine in ENGINES:
            mem = run_child(["--alone", engine, shape, "--steps", str(steps), *sizes])
            step_s = statistics.median(times[engine])
            rows.append({"engine": engine, "shape": shape, "batch": batch, "step_s": step_s,
                         "ratio_to_non_private": step_s / base, "step_times_s": times[engine],
                         "alone_step_s": mem["alone_step_s"], "peak_rss_mib": mem["peak_rss_mib"]})
            print(f"{engine:12s} {shape}: {step_s:.3f} s/step ({step_s / base:.2f}x), alone "
                  f"{mem['alone_step_s']:.3f} s, {mem['peak_rss_mib']:.0f} MiB", flush=True)
    medfed_rows = [r for r in rows if r["engine"] == MEDFED_ENGINE]
    from common import write_results

    write_results("privacy", {
        "rows": rows, "model": "tiny", "noise_multiplicity": 1, "medfed_engine": MEDFED_ENGINE,
        "rounds": rounds,
        "goal": "medfed's DP-SGD step <= 1.6x the non-private step (tiny, batch 64, 2 CPU cores)",
        "goal_met": all(r["ratio_to_non_private"] <= 1.6 for r in medfed_rows) if not args.quick else None,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
