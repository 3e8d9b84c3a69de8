"""Sampling throughput (images/s) of the `tiny` UNet: a plain eager MONAI loop against medfed's sampler.

The baseline is the straightforward loop: model in eval mode, ``torch.no_grad``, float32 in the default (NCHW)
memory format, batch 64, one ``scheduler.step`` per timestep. Each variant runs the real sampler
(``medfed.diffusion.sampling.noise_predictor`` + ``denoise``) with one setting changed, so the table shows what
each choice is worth; ``medfed default`` is what ``sample_images`` does when given no options.

Method: every reverse step costs the same (one UNet forward plus one scheduler step), so each repetition times the
first ``timed_steps`` steps of the real DDIM-50 or DDPM-1000 chain, and images/s = batch / (seconds per step x
50 or 1000). Variants are timed interleaved (the order rotates each repetition), and the speed-up is the median
over repetitions of variant / baseline measured back to back, so load from other processes hits both alike.
On the CPU the same ratio is also given in CPU time of this process (``time.process_time``), which other
processes' load hardly moves: on a busy machine it is the steadier estimate of the quiet-machine ratio.
Peak memory: on the CPU each variant runs once more in a fresh process (its peak RSS, which includes Python and
torch, and ``rss_before_mib`` just before sampling); on a GPU ``torch.cuda.max_memory_allocated`` per variant.
Exactness: the images after the timed DDIM steps, from the same starting noise, against the baseline's.
With ``--checkpoint`` a trained model also shows how much reduced precision changes full DDIM-50 and DDPM-1000
samples for the same seed, next to how much two different seeds differ.

Usage: ``python benchmarks/bench_sampling.py [--quick] [--device auto|cpu|cuda] [--checkpoint PATH]``; writes
``benchmarks/results/sampling.json``. Run time on the shared 2-core machine: 21 min (``--checkpoint``: 3 more),
``--quick`` 1 to 1.5 min.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# As the medfed CLI does: OpenMP threads spinning while they wait make timings erratic on shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# An empty compile cache, so the first compilation is timed cold, as a user's first `--compile` is.
COMPILE_CACHE = tempfile.TemporaryDirectory(prefix="medfed-bench-compile-")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", COMPILE_CACHE.name)
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(COMPILE_CACHE.name, "triton"))

import torch  # noqa: E402
from monai.networks.schedulers import DDIMScheduler  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mib, run_child, synchronize, write_results  # noqa: E402

from medfed.config import DiffusionConfig  # noqa: E402
from medfed.devices import resolve_device  # noqa: E402
from medfed.diffusion.sampling import (  # noqa: E402
    default_batch_size,
    denoise,
    make_sampler,
    noise_predictor,
    resolve_precision,
    sample_images,
)
from medfed.models import build_unet  # noqa: E402

SHAPES = [(1, 28, 28), (3, 32, 32)]
SAMPLERS = {"ddim-50": ("ddim", 50), "ddpm-1000": ("ddpm", 1000)}
BASELINE_BATCH = 64


@dataclass(frozen=True)
class Variant:
    """One way to run the sampler; ``batch_size`` None means ``default_batch_size``."""

    name: str
    batch_size: int | None = None
    channels_last: bool = False
    precision: str = "auto"
    compile: bool = False
    plain_loop: bool = False


BASELINE = Variant("baseline: eager no_grad float32, batch 64", batch_size=BASELINE_BATCH, precision="float32",
                   plain_loop=True)
DEFAULT = Variant("medfed default")


def variants(device: torch.device, quick: bool) -> list[Variant]:
    """Baseline, medfed's default, and the default with one or two switches changed."""
    if device.type == "cuda":  # the default is float32 here; batch 64 separates batching from the rest
        if quick:
            return [BASELINE, DEFAULT, Variant("default + float16", precision="float16")]
        return [BASELINE, Variant("inference_mode float32, batch 64", batch_size=BASELINE_BATCH), DEFAULT,
                Variant("default + channels_last", channels_last=True),
                Variant("default + bfloat16", precision="bfloat16"),
                Variant("default + float16", precision="float16"),
                Variant("default + float16 + channels_last", precision="float16", channels_last=True),
                Variant("default + compile", compile=True),
                Variant("default + float16 + compile", precision="float16", compile=True)]
    exact = Variant("float32", precision="float32")
    if quick:
        return [BASELINE, DEFAULT, exact]
    return [BASELINE, DEFAULT, exact,
            Variant("float32 + channels_last", precision="float32", channels_last=True),
            Variant("float32, batch 256", precision="float32", batch_size=256),
            Variant("bfloat16 + channels_last", precision="bfloat16", channels_last=True),
            Variant("default + compile", compile=True),
            Variant("float32 + compile", precision="float32", compile=True)]


def bench_model(shape: tuple[int, int, int]) -> nn.Module:
    """``tiny`` with seeded weights moved off MONAI's zero-initialised output layer, so outputs depend on inputs."""
    torch.manual_seed(0)
    model = build_unet("tiny", shape[0])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def plain_loop(model: nn.Module, scheduler, x: torch.Tensor, generator: torch.Generator, eta: float) -> torch.Tensor:
    """The baseline: the loop a MONAI tutorial writes."""
    model.eval()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = model(x, torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long))
            if isinstance(scheduler, DDIMScheduler):
                x, _ = scheduler.step(eps, int(t), x, eta=eta, generator=generator)
            else:
                x, _ = scheduler.step(eps, int(t), x, generator=generator)
    return x


def truncated(sampler: str, steps: int, timed_steps: int):
    """The real schedule, cut to its first ``timed_steps`` timesteps."""
    scheduler = make_sampler(DiffusionConfig(), sampler, steps)
    scheduler.timesteps = scheduler.timesteps[:timed_steps]
    return scheduler


class Runner:
    """One variant, ready to run: its own model copy, converted/compiled once."""

    def __init__(self, variant: Variant, model: nn.Module, device: torch.device, shape, stack: contextlib.ExitStack):
        self.variant, self.device, self.shape = variant, device, shape
        self.batch = variant.batch_size or default_batch_size(device, shape)
        self.precision = "float32" if variant.plain_loop else resolve_precision(variant.precision, device)
        self.model = copy.deepcopy(model).to(device)
        self.predict = None
        if not variant.plain_loop:
            self.predict = stack.enter_context(noise_predictor(
                self.model, device, channels_last=variant.channels_last, precision=variant.precision,
                compile=variant.compile))

    def run(self, scheduler, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator(device=self.device).manual_seed(seed)
        if self.predict is None:
            return plain_loop(self.model, scheduler, x, generator, eta=0.0)
        with torch.inference_mode():
            return denoise(self.predict, scheduler, x, generator=generator, eta=0.0)

    def first_call_s(self, x: torch.Tensor) -> float:
        """Seconds of the first reverse step: warm-up, and for a compiled variant its compilation."""
        return self.seconds_per_step(truncated("ddim", 50, 1), x)[0]

    def seconds_per_step(self, scheduler, x: torch.Tensor) -> tuple[float, float]:
        """Wall-clock and CPU seconds (this process, all threads) per reverse step."""
        synchronize(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        self.run(scheduler, x)
        synchronize(self.device)
        steps = len(scheduler.timesteps)
        return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def measure_memory(spec: dict) -> dict:
    """Peak memory of one variant sampling two DDIM steps; runs in a child process on the CPU."""
    device = resolve_device(spec["device"])
    shape = tuple(spec["shape"])
    variant = Variant(**spec["variant"])
    with contextlib.ExitStack() as stack:
        runner = Runner(variant, bench_model(shape), device, shape, stack)
        x = torch.randn((runner.batch, *shape), device=device)
        rss_before = peak_rss_mib()
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        runner.run(truncated("ddim", 50, 2), x)
        if device.type == "cuda":
            return {"peak_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                    "sampling_extra_mib": round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1),
                    "memory_measure": "torch.cuda.max_memory_allocated"}
        return {"peak_memory_mib": round(peak_rss_mib(), 1), "rss_before_mib": round(rss_before, 1),
                "memory_measure": "peak RSS (VmHWM) of a fresh process"}


def bench_shape(shape, device: torch.device, quick: bool, reps: int, timed_steps: int) -> dict:
    """Time every variant on one image shape, for both samplers."""
    model = bench_model(shape)
    chosen = variants(device, quick)
    result: dict = {"image_shape": list(shape), "variants": {}}
    with contextlib.ExitStack() as stack:
        runners = [Runner(v, model, device, shape, stack) for v in chosen]
        noise = torch.randn((max(r.batch for r in runners), *shape), generator=torch.Generator().manual_seed(0))
        noise = noise.to(device)
        reference = None
        for runner in runners:  # warm-up (and compilation): the first call, timed on its own
            first_call = runner.first_call_s(noise[:runner.batch])
            row = {**{k: v for k, v in asdict(runner.variant).items() if k != "name"}, "batch_size": runner.batch,
                   "resolved_precision": runner.precision, "first_call_s": round(first_call, 2)}
            if runner.precision == "float32":  # exactness; reduced precision: see --checkpoint
                out = runner.run(truncated("ddim", 50, timed_steps), noise[:runner.batch])[:BASELINE_BATCH].cpu()
                reference = out if runner.variant.plain_loop else reference
                row[f"max_abs_diff_vs_baseline_after_{timed_steps}_ddim_steps"] = float((out - reference).abs().max())
            result["variants"][runner.variant.name] = row
            print(f"  {runner.variant.name}: first call {first_call:.1f} s", flush=True)
        for label, (sampler, steps) in SAMPLERS.items():
            names = [r.variant.name for r in runners]
            wall: dict[str, list[float]] = {n: [] for n in names}
            wall_ratio: dict[str, list[float]] = {n: [] for n in names}
            cpu_ratio: dict[str, list[float]] = {n: [] for n in names}
            for rep in range(reps):
                order = runners[rep % len(runners):] + runners[:rep % len(runners)]
                per_image = {}  # seconds per image, wall and CPU, for this repetition
                for runner in order:
                    w, c = runner.seconds_per_step(truncated(sampler, steps, timed_steps), noise[:runner.batch])
                    wall[runner.variant.name].append(w)
                    per_image[runner.variant.name] = (w / runner.batch, c / runner.batch)
                base_w, base_c = per_image[BASELINE.name]
                for name, (w, c) in per_image.items():
                    wall_ratio[name].append(base_w / w)
                    cpu_ratio[name].append(base_c / c)
            for runner in runners:
                name = runner.variant.name
                median_s = statistics.median(wall[name])
                row = {"images_per_s": round(runner.batch / (median_s * steps), 3),
                       "seconds_per_step_median": round(median_s, 4),
                       "speedup_vs_baseline": round(statistics.median(wall_ratio[name]), 2),
                       "speedup_min_max": [round(min(wall_ratio[name]), 2), round(max(wall_ratio[name]), 2)]}
                if device.type == "cpu":
                    row["cpu_time_speedup_vs_baseline"] = round(statistics.median(cpu_ratio[name]), 2)
                result["variants"][name][label] = row
                cpu_note = f"  (CPU time x{row['cpu_time_speedup_vs_baseline']:.2f})" if device.type == "cpu" else ""
                print(f"  {label:>9} {name:<40} {row['images_per_s']:9.3f} images/s  "
                      f"x{row['speedup_vs_baseline']:.2f}{cpu_note}", flush=True)
    base = result["variants"][BASELINE.name]
    for variant in chosen:  # compilation pays off once the time it saves exceeds the time it takes
        if variant.compile:
            row, eager = result["variants"][variant.name], result["variants"][eager_twin(variant, chosen).name]
            compile_s = max(0.0, row["first_call_s"] - eager["first_call_s"])
            row["compile_s"] = round(compile_s, 1)
            for label in SAMPLERS:  # rates from the paired speed-ups, steadier than independent medians
                rate = {name: base[label]["images_per_s"] * r[label]["speedup_vs_baseline"]
                        for name, r in (("eager", eager), ("compiled", row))}
                saved_per_image = 1 / rate["eager"] - 1 / rate["compiled"]
                row[label]["compile_pays_off_after_images"] = (round(compile_s / saved_per_image)
                                                               if saved_per_image > 0 else None)
    return result


def eager_twin(variant: Variant, chosen: list[Variant]) -> Variant:
    """The variant that differs from ``variant`` only by not being compiled."""
    return next(v for v in chosen if not v.compile and not v.plain_loop and v.precision == variant.precision
                and v.batch_size == variant.batch_size and v.channels_last == variant.channels_last)


def precision_check(checkpoint: str, device: torch.device, quick: bool) -> dict:
    """How much reduced precision changes full-chain samples of a trained model, for the same seed.

    Differences are in the [-1, 1] image range (one uint8 level is 2/255); two different seeds give the scale of
    "entirely different images" to compare them with.
    """
    from medfed.generate import load_model

    model, ckpt = load_model(checkpoint, device)
    cfg, shape = ckpt.config.diffusion, ckpt.image_shape
    lows = ["bfloat16", "float16"] if device.type == "cuda" else ["bfloat16"]
    out: dict = {"checkpoint": str(checkpoint), "preset": ckpt.config.model.preset, "image_shape": list(shape),
                 "step": ckpt.step}
    for label, (sampler, steps) in SAMPLERS.items():
        num = (8 if quick else 64) if sampler == "ddim" else (4 if quick else 16)

        def sample(seed: int, precision: str = "float32") -> tuple[torch.Tensor, float]:
            start = time.perf_counter()
            images = sample_images(model, cfg, num, shape, device=device, seed=seed, sampler=sampler, steps=steps,
                                   precision=precision)
            return images, time.perf_counter() - start

        ref, ref_s = sample(0)
        other, _ = sample(1)
        row: dict = {"images": num, "float32_s": round(ref_s, 1),
                     "float32_seed0_vs_seed1_mean_abs_diff": round(float((ref - other).abs().mean()), 4)}
        for precision in lows:
            images, seconds = sample(0, precision)
            diff = (images - ref).abs()
            off = float((diff > 2 / 255).float().mean())
            row[precision] = {"seconds": round(seconds, 1), "mean_abs_diff": round(float(diff.mean()), 4),
                              "max_abs_diff": round(float(diff.max()), 4),
                              "pixels_off_by_more_than_one_uint8_level": round(off, 4)}
        out[label] = row
        print(f"  precision check {label}: {json.dumps(row)}", flush=True)
    return out


def cpu_bfloat16_units() -> dict[str, bool | None]:
    """Whether this CPU computes bfloat16 in hardware (without it, bfloat16 autocast is slower than float32)."""
    probe = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported"}
    return {name: getattr(torch.cpu, fn, lambda: None)() for name, fn in probe.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 variants, 2 timed steps (a smoke run, under 1 min)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--checkpoint", help="a trained checkpoint: also compare reduced precision with float32")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_memory(json.loads(args.child))))
        return
    device = resolve_device(args.device)
    reps = 3 if args.quick else 5
    if device.type == "cuda":
        timed_steps = 10 if args.quick else 50
    else:
        timed_steps = 2 if args.quick else 5
    start, load_at_start = time.perf_counter(), os.getloadavg()[0]
    results: dict = {"quick": args.quick, "device": str(device), "preset": "tiny", "repetitions": reps,
                     "timed_steps": timed_steps, "baseline": BASELINE.name, "load_average_1m_at_start": load_at_start,
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "cpu_bfloat16_units": cpu_bfloat16_units(),
                     "shapes": []}
    for shape in SHAPES:
        print(f"== tiny, images {'x'.join(map(str, shape))}", flush=True)
        row = bench_shape(shape, device, args.quick, reps, timed_steps)
        for variant in variants(device, args.quick):
            if variant.compile or (args.quick and variant not in (BASELINE, DEFAULT)):
                continue
            spec = {"device": args.device, "shape": shape, "variant": asdict(variant)}
            row["variants"][variant.name].update(run_child(__file__, spec) if device.type == "cpu"
                                                 else measure_memory(spec))
        results["shapes"].append(row)
    default_speedups = [row["variants"][DEFAULT.name][label]["speedup_vs_baseline"]
                        for row in results["shapes"] for label in SAMPLERS]
    results["goal"] = "medfed default >= 2x the baseline's images/s, both shapes and samplers"
    results["goal_met"] = min(default_speedups) >= 2
    if args.checkpoint:
        results["precision_check"] = precision_check(args.checkpoint, device, args.quick)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    write_results("sampling", results)


if __name__ == "__main__":
    main()
