"""``medfed study lightweight``: how small a diffusion model, and how few DDIM steps, can still serve at an edge
site.

Each preset (``pico``, ``nano`` and ``micro`` are smaller than ``tiny``) is trained by a real Flower run (DP-SGD,
SecAgg+), exported for inference with TorchScript (``torch.jit.trace``: one ``.pt`` file that libtorch or
``torch.jit.load`` runs without medfed or MONAI; ONNX export needs the onnx/onnxscript packages, not installed),
and the exported model is sampled through :func:`medfed.diffusion.sample_images` at each DDIM step count. For
each (preset, steps): parameters, file size on disk, peak memory and latency per image (a batch of
``num_samples`` and one image at a time), and FID/KID on the study's feature network against the test split.

Peak memory is measured in fresh processes (:mod:`medfed.studies.edge`): a process's peak only grows, and memory
freed by earlier work is reused without showing. Latency is wall time after two warm-up calls of each batch shape
(TorchScript optimises a graph on its first runs), together with the CPU time, which a shared machine disturbs
less.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfed.config import RunConfig, to_flat, validate
from medfed.diffusion import sample_images
from medfed.errors import ConfigError
from medfed.generate import load_model
from medfed.models import PRESETS, count_parameters
from medfed.plots import line_plot
from medfed.studies.edge import measure_fresh_process
from medfed.studies.common import (
    NOT_PRIVATE,
    CpuMeter,
    announce,
    document,
    federated_run,
    fmt,
    md_table,
    network_line,
    open_study,
    prepare_scorer,
    round_records,
    sample_grid,
    simulated_ledgers,
    study_header,
    write_study,
)
from medfed.studies.settings import StudySetup, run_config, study_base

NAME = "lightweight"
PLOT = "lightweight.png"
MIB = 1024 * 1024


@dataclass(frozen=True)
class LightweightOptions:
    """The lightweight-model study (``setup.sample_steps`` sets only each run's sample grid: scores use
    ``step_counts``).

    Attributes:
        setup: data, federated training, privacy and scoring settings (``setup.base.model.preset`` is not used:
            ``presets`` are).
        presets: UNet presets to train and export.
        step_counts: DDIM steps to sample each exported model with.
        sites: simulated sites of each federated run.
        edge_images: images sampled one at a time (batch 1) for the single-image latency (median).
        precision: ``sample_images`` precision (``auto``: bfloat16 on CPUs with AMX, else float32).
    """

    setup: StudySetup
    presets: tuple[str, ...] = ("micro", "nano", "pico")
    step_counts: tuple[int, ...] = (50, 20, 10)
    sites: int = 3
    edge_images: int = 4
    precision: str = "auto"


def small_options(data_path: str) -> LightweightOptions:
    """The default: 1,000 training images over 3 sites, 3 rounds; micro, nano and pico; 50, 20 and 10 steps."""
    return LightweightOptions(StudySetup(study_base(data_path, limit=1000, rounds=3)))


def full_options(data_path: str) -> LightweightOptions:
    """``--full``, for a GPU machine: the whole train split, 20 rounds, every preset up to ``small``, 100 to 5
    DDIM steps, 1,000 samples."""
    return LightweightOptions(StudySetup(study_base(data_path, limit=0, rounds=20, lr=2e-4), num_samples=1000,
                                         parallel_sites=2, cpus_per_site=4),
                              presets=("small", "tiny", "micro", "nano", "pico"), step_counts=(100, 50, 20, 10, 5),
                              edge_images=16)


def check_options(options: LightweightOptions) -> None:
    unknown = [p for p in options.presets if p not in PRESETS]
    if not options.presets or unknown:
        raise ConfigError(f"--presets: {','.join(unknown) or 'empty'} (choose from {', '.join(PRESETS)})")
    if not options.step_counts or min(options.step_counts) < 1:
        raise ConfigError("--steps: give DDIM step counts >= 1")
    if options.sites < 3:
        raise ConfigError(f"--sites {options.sites}: must be >= 3 (secure aggregation over 2 sites would show each "
                          "site the other's update)")
    if options.edge_images < 1:
        raise ConfigError(f"--edge-images {options.edge_images}: must be >= 1")


def preset_config(cfg: RunConfig, preset: str, sites: int) -> RunConfig:
    """The study's run config ``cfg`` for ``preset`` over ``sites`` sites, with its own ledgers
    (``<site-state-root>/<preset>``: a site deploys one of these models; training all of them on the same images
    would compose their budgets, and soon meet the cap); checked."""
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, preset=preset),
        federation=dataclasses.replace(cfg.federation, num_sites=sites),
        privacy=dataclasses.replace(cfg.privacy, site_state_root=str(Path(cfg.privacy.site_state_root) / preset)))
    validate(cfg)
    return cfg


# ------------------------------------------------------------------------------------------------ measuring

@dataclass(frozen=True)
class Timed:
    """Wall and CPU seconds of one sampling call; on CUDA also the allocator's peak above what was in use before."""

    images: torch.Tensor
    wall_s: float
    cpu_s: float
    cuda_peak_mib: float | None


def timed_sampling(model: torch.nn.Module, cfg: RunConfig, num: int, shape: tuple[int, int, int], steps: int,
                   device: torch.device, seed: int, precision: str, batch_size: int | None = None,
                   show_progress: bool = False) -> Timed:
    """:func:`sample_images` with DDIM ``steps``, timed (wall and process CPU)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        in_use = torch.cuda.memory_allocated(device)
    wall, cpu = time.perf_counter(), time.process_time()
    images = sample_images(model, cfg.diffusion, num, shape, device=device, seed=seed, sampler="ddim", steps=steps,
                           batch_size=batch_size, precision=precision, show_progress=show_progress)
    if cuda:
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = (torch.cuda.max_memory_allocated(device) - in_use) / MIB if cuda else None
    return Timed(images, wall, cpu, peak)


def export_torchscript(model: torch.nn.Module, shape: tuple[int, int, int], path: Path, device: torch.device,
                       timesteps: int, seed: int) -> dict[str, Any]:
    """Trace ``model`` (x_t (B, C, H, W), t (B,) -> eps) to a TorchScript file; reload it and compare it with the
    eager model on a batch of another size. Returns the file, its size and the largest difference."""
    model = model.eval()
    generator = torch.Generator().manual_seed(seed)
    example = (torch.randn(2, *shape, generator=generator).to(device), torch.tensor([0, timesteps - 1]).to(device))
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on MONAI's shape checks, and jit's deprecation notice
        torch.jit.trace(model, example).save(str(path))
        exported = torch.jit.load(str(path), map_location=device)
        probe = (torch.randn(5, *shape, generator=generator).to(device),
                 torch.randint(0, timesteps, (5,), generator=generator).to(device))
        difference = float((exported(*probe) - model(*probe)).abs().max())
    return {"file": str(path), "bytes": path.stat().st_size, "format": "TorchScript (torch.jit.trace)",
            "max_abs_difference_vs_eager": difference, "torch": torch.__version__}


def load_exported(path: str, device: torch.device) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        return torch.jit.load(path, map_location=device)


# -------------------------------------------------------------------------------------------------- the study

def run_lightweight_study(options: LightweightOptions, out: str | Path | None = None, command: str = "",
                          show_progress: bool = True) -> Path:
    """Train, export and measure each preset at each DDIM step count; returns the study folder (``study.json``,
    ``report.md``, ``lightweight.png``, ``edge/<preset>.torchscript.pt``)."""
    from medfed.diffusion.sampling import resolve_precision

    setup = options.setup
    seed = setup.base.train.seed
    check_options(options)
    train, test, device, folder = open_study(NAME, setup, out)
    precision = resolve_precision(options.precision, device)
    configs = {p: preset_config(run_config(setup, folder, f"preset-{p}", train.image_shape), p, options.sites)
               for p in options.presets}
    payload = study_header(NAME, options, command)
    payload.update({"training_images": len(train), "precision": precision, "presets": [], "results": []})
    start = time.perf_counter()
    with CpuMeter(folder) as meter:
        scorer = prepare_scorer(setup, folder, device, show_progress)
        reference = scorer.features(test.images, f"{test.name} ({len(test)} images)")
        payload.update({"feature_network": scorer.record, "reference": reference.source})
        for index, (preset, cfg) in enumerate(configs.items(), start=1):
            announce(f"[{index}/{len(configs)}] preset {preset}: federated run of {len(train)} images")
            t0 = time.perf_counter()
            run, used = federated_run(cfg, setup, show_progress)
            trained_s = time.perf_counter() - t0
            model, ckpt = load_model(run.latest_checkpoint, device)
            shape = tuple(ckpt.image_shape)
            # Traces record the device they ran on: the edge file is traced on the CPU (what edge sites run);
            # on a GPU the measurements below use a second trace made there.
            cpu = torch.device("cpu")
            export = export_torchscript(copy.deepcopy(model).to(cpu), shape,
                                        folder / "edge" / f"{preset}.torchscript.pt", cpu, used.diffusion.timesteps,
                                        seed)
            measured = export if device.type == "cpu" else export_torchscript(
                model, shape, folder / "edge" / f"{preset}.{device.type}.torchscript.pt", device,
                used.diffusion.timesteps, seed)
            edge = load_exported(measured["file"], device)
            for num, batch_size in ((setup.num_samples, None), (1, 1)):  # every batch shape timed below
                for _ in range(2):  # the TorchScript executor profiles, then optimises, the first calls of a shape
                    sample_images(edge, used.diffusion, num, shape, device=device, seed=seed, sampler="ddim",
                                  steps=2, batch_size=batch_size, precision=precision)
            announce(f"[{index}/{len(configs)}] preset {preset}: peak memory in fresh processes (CPU)")
            fresh = {name: measure_fresh_process(Path(export["file"]), used.diffusion, shape, min(options.step_counts),
                                                 seed, precision, num=num, batch_size=batch_size)
                     for name, num, batch_size in (("one_image", 1, 1), ("batch", setup.num_samples, None))}
            eager = timed_sampling(model, used, 8, shape, min(options.step_counts), device, seed, precision)
            exported = timed_sampling(edge, used, 8, shape, min(options.step_counts), device, seed, precision)
            records = round_records(run)
            ledgers = simulated_ledgers(used) if used.privacy.enabled else {}
            payload["presets"].append({
                "preset": preset, "parameters": count_parameters(model), "export": export, "fresh_process": fresh,
                "measured_file": measured["file"],
                "samples_match_eager": float((eager.images - exported.images).abs().max()),
                "run": str(run.root), "sample_grid": sample_grid(run), "train_wall_s": trained_s,
                "final_train_loss": (float(np.mean(list(records[-1].train_loss.values())))
                                     if records and records[-1].train_loss else None),  # NOT PRIVATE runs only
                "epsilon": max(v["epsilon"] for v in ledgers.values()) if ledgers else None,
                "config": to_flat(used)})
            for steps in sorted(options.step_counts, reverse=True):
                announce(f"[{index}/{len(configs)}] preset {preset}: {setup.num_samples} samples with {steps} "
                         "DDIM steps (exported model)")
                batch = timed_sampling(edge, used, setup.num_samples, shape, steps, device, seed, precision,
                                       show_progress=show_progress)
                single = [timed_sampling(edge, used, 1, shape, steps, device, seed + 1 + i, precision,
                                         batch_size=1) for i in range(options.edge_images)]
                payload["results"].append({
                    "preset": preset, "steps": steps, "feature_network": scorer.name,
                    "scores": scorer.score(reference, batch.images),
                    "batch": {"images": setup.num_samples, "batch_size": "sample_images default",
                              "ms_per_image": 1000 * batch.wall_s / setup.num_samples,
                              "cpu_ms_per_image": 1000 * batch.cpu_s / setup.num_samples,
                              "cuda_peak_mib": batch.cuda_peak_mib},
                    "single": {"images": options.edge_images, "batch_size": 1,
                               "ms_per_image": 1000 * float(np.median([t.wall_s for t in single])),
                               "cpu_ms_per_image": 1000 * float(np.median([t.cpu_s for t in single])),
                               "ms_each": [1000 * t.wall_s for t in single]}})
                write_study(folder, payload, markdown, start, meter)
                plot(payload, folder / PLOT)
        payload["complete"] = True
    write_study(folder, payload, markdown, start, meter)
    return folder


def plot(payload: dict[str, Any], path: Path) -> Path:
    """FID and latency per image (in a batch, and one at a time) against DDIM steps, one line per preset."""
    panels: list[tuple[str, str, dict[str, tuple[list[float], list[float]]]]] = [
        (f"FID ({payload['feature_network']['name']})", "FID (lower is better)", {}),
        (f"latency per image, batch of {payload['options']['setup']['num_samples']}", "ms", {}),
        ("latency per image, one at a time", "ms", {})]
    for r in sorted(payload["results"], key=lambda r: r["steps"]):
        values = (r["scores"]["fid"], r["batch"]["ms_per_image"], r["single"]["ms_per_image"])
        for (_, _, series), y in zip(panels, values):
            xs, ys = series.setdefault(r["preset"], ([], []))
            xs.append(r["steps"])
            ys.append(y)
    return line_plot(panels, path, xlabel="DDIM steps")


def markdown(payload: dict[str, Any]) -> str:
    setup = payload["options"]["setup"]
    presets = {p["preset"]: p for p in payload["presets"]}
    preset_header = ["preset", "parameters", "TorchScript file (KiB)",
                     "peak memory, one image (MiB): total / above imports",
                     f"peak memory, batch of {setup['num_samples']} (MiB): total / above imports",
                     "epsilon (max over sites)", "final training loss", "federated run (min)",
                     "export vs eager, largest difference (noise / samples)"]
    preset_rows = [[p["preset"], f"{p['parameters']:,}", fmt(p["export"]["bytes"] / 1024, 0),
                    *[f"{fmt(m['peak_rss_mib'], 0)} / {fmt(m['peak_rss_mib'] - m['rss_after_imports_mib'], 0)}"
                      for m in (p["fresh_process"]["one_image"], p["fresh_process"]["batch"])],
                    fmt(p["epsilon"], 2) if p["epsilon"] is not None else NOT_PRIVATE,
                    fmt(p["final_train_loss"], 3), fmt(p["train_wall_s"] / 60, 1),
                    f"{p['export']['max_abs_difference_vs_eager']:.1e} / {p['samples_match_eager']:.1e}"]
                   for p in payload["presets"]]
    header = ["preset", "parameters", "DDIM steps", "FID", "KID", f"ms / image (batch of {setup['num_samples']})",
              "ms / image (one at a time, median)"]
    rows = [[r["preset"], f"{presets[r['preset']]['parameters']:,}", str(r["steps"]), fmt(r["scores"]["fid"], 1),
             fmt(r["scores"]["kid"], 3), fmt(r["batch"]["ms_per_image"], 1), fmt(r["single"]["ms_per_image"], 1)]
            for r in payload["results"]]
    fresh = next(iter(presets.values()))["fresh_process"]["one_image"] if presets else {}
    lines = [
        "# Study: lightweight edge models", "",
        f"Each preset trained by a real Flower run ({payload['options']['sites']} sites, {payload['training_images']}"
        f" training images, {setup['rounds']} rounds x {setup['local_epochs']} local epoch(s), DP-SGD planned for "
        f"epsilon {setup['target_epsilon']:g}, SecAgg+), exported with TorchScript (`torch.jit.trace`) and sampled "
        f"from the exported file with `medfed.diffusion.sample_images` (DDIM, precision {payload['precision']}).",
        "",
        md_table(preset_header, preset_rows), "",
        f"Scores: {setup['num_samples']} samples against {payload.get('reference', 'the test split')}. "
        f"{network_line(payload['feature_network'])}", "",
        md_table(header, rows), "",
        f"![FID and latency against DDIM steps]({PLOT})", "",
        "- epsilon: each preset's run has its own ledgers (`site-state/<preset>`): a site would deploy one of "
        "these models, and training all of them on the same images would compose their budgets.",
        "- peak memory: the peak resident set of a fresh Python process that imports torch and medfed's sampler, "
        f"loads the TorchScript file and samples on the CPU ({min(payload['options']['step_counts'])} DDIM steps), "
        f"one image, or the batch at `sample_images`' default batch size; after the imports alone a process holds "
        f"{fresh.get('rss_after_imports_mib', 0):.0f} MiB. What an edge site must provide. On CUDA `study.json` also "
        "has the allocator's peak per row.",
        "- latency: wall time per image after two warm-up calls of each batch shape (one at a time: the median over "
        f"{payload['options']['edge_images']} images); `study.json` also has the CPU time per image. On a shared "
        "machine wall times vary with the load.",
        "- export check: largest difference of the network's output (float32) and of 8 samples (at the sampling "
        "precision) between the eager model and the TorchScript file.",
        "- the TorchScript file (`edge/<preset>.torchscript.pt`, traced on the CPU: a trace records its device) "
        "runs without medfed and MONAI (`torch.jit.load`, or libtorch in C++); its input is x_t (B, C, H, W) "
        "float32 and t (B,) int64, its output the predicted noise or velocity (the run's `diffusion.prediction`). "
        "On a GPU the latencies are measured with a second trace made on that device.",
    ]
    return document(lines, payload, f"{len(payload['results'])} rows")
