"""Seconds per DP-SGD step against a non-private step, per per-sample-gradient engine, and peak memory.

The full DDPM epsilon-prediction step of the ``tiny`` UNet at batch 64 (AdamW, clipping norm 1, noise 1), on
28x28x1 and 32x32x3. Engines: Opacus ``hooks``, Opacus ``functorch`` (per-layer vmap inside the hooks), Opacus
``ghost`` (fast gradient clipping) and medfed's ``vmap`` (whole-model ``torch.func`` per-sample gradients with
Opacus' ``no_op`` mode, in chunks of ``privacy.per-sample-chunk`` images: what medfed trains with). Each (engine, shape) runs in its own process, so peak memory
is its own; the list of processes is run ``--repeats`` times in interleaved order and the median taken, so
machine load affects every engine alike. Fixed-size batches are used for timing only (training uses Poisson).

Usage: python benchmarks/bench_privacy.py [--quick] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ENGINES = ("non-private", "hooks", "functorch", "ghost", "vmap")
SHAPES = {"28x28x1": (1, 28, 28), "32x32x3": (3, 32, 32)}


def child(engine: str, shape_name: str, steps: int, batch: int) -> dict:
    import resource

    import torch
    from opacus import PrivacyEngine
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from medfed.config import DiffusionConfig, PrivacyConfig
    from medfed.diffusion import make_scheduler, per_sample_loss
    from medfed.models import build_unet
    from medfed.privacy.dp_sgd import draw_noisy_inputs, per_sample_grads

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
            per_sample = (pred - target).pow(2).flatten(1).mean(1)
            return per_sample if self.reduction == "none" else per_sample.mean()

    if engine == "non-private":
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            per_sample_loss(model, scheduler, x0).mean().backward()
            optimizer.step()
    else:
        mode = {"vmap": "no_op"}.get(engine, engine)
        extra = {"criterion": PerSampleMSE()} if engine == "ghost" else {}
        made = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False, grad_sample_mode=mode, **extra)
        private, dp_opt = made[0], made[1]
        criterion = made[2] if engine == "ghost" else None

        def step() -> None:
            dp_opt.zero_grad(set_to_none=True)
            x_t, t, eps = draw_noisy_inputs(scheduler, x0, 1, None)
            if engine == "vmap":
                grads, _ = per_sample_grads(model, x_t, t, eps, PrivacyConfig().per_sample_chunk)
                for name, p in model.named_parameters():
                    p.grad_sample = grads[name]
            elif engine == "ghost":
                criterion(private(x_t[:, 0], t[:, 0]), eps[:, 0]).backward()
            else:
                (private(x_t[:, 0], t[:, 0]) - eps[:, 0]).pow(2).flatten(1).mean(1).mean().backward()
            dp_opt.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"engine": engine, "shape": shape_name, "batch": batch, "step_s": statistics.median(times),
            "step_times_s": times, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 timed steps, batch 16, one repeat")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("ENGINE", "SHAPE"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.steps, args.batch)))
        return 0
    steps, batch, repeats = (2, 16, 1) if args.quick else (args.steps, args.batch, args.repeats)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    samples: dict[tuple[str, str], list[dict]] = {}
    for repeat in range(repeats):
        order = ENGINES if repeat % 2 == 0 else tuple(reversed(ENGINES))
        for shape in SHAPES:
            for engine in order:
                out = subprocess.run([sys.executable, __file__, "--child", engine, shape, "--steps", str(steps),
                                      "--batch", str(batch)], capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    raise SystemExit(f"{engine} {shape} failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{engine:12s} {shape}: {row['step_s']:.3f} s/step, {row['peak_rss_mib']:.0f} MiB", flush=True)
                samples.setdefault((engine, shape), []).append(row)
    rows = []
    for shape in SHAPES:
        base = statistics.median(r["step_s"] for r in samples[("non-private", shape)])
        for engine in ENGINES:
            runs = samples[(engine, shape)]
            step_s = statistics.median(r["step_s"] for r in runs)
            rows.append({"engine": engine, "shape": shape, "batch": batch, "step_s": step_s,
                         "ratio_to_non_private": step_s / base,
                         "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "repeats": len(runs)})
    medfed_rows = [r for r in rows if r["engine"] == "vmap"]
    from common import write_results

    write_results("privacy", {
        "rows": rows, "model": "tiny", "noise_multiplicity": 1,
        "goal": "medfed's DP-SGD step <= 1.6x the non-private step (tiny, batch 64, 2 CPU cores)",
        "goal_met": all(r["ratio_to_non_private"] <= 1.6 for r in medfed_rows) if not args.quick else None,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
