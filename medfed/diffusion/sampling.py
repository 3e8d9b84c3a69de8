"""Reverse-process samplers: ancestral DDPM over all T steps, or DDIM over k steps (MONAI schedulers).

Sampling costs one UNet forward per reverse step, so its speed is the network's speed. ``sample_images`` runs the
network under ``torch.inference_mode`` in batches of :func:`default_batch_size` images, and with
``precision="auto"`` in bfloat16 autocast on CPUs with AMX units (the chain itself stays float32), float32
elsewhere. ``benchmarks/bench_sampling.py`` measures each choice against a plain eager float32 loop:

- bfloat16 on an AMX CPU: about 2x the images/s; pixels move by under one grey level (of 255) on average for the
  same seed, a few by more. ``precision="float32"`` is exact (and the default on GPUs until measured there).
- ``compile=True``: ``torch.compile`` (CUDA graphs on a GPU). The first compilation takes one to three minutes on
  a CPU (10-20 s once the inductor cache is warm), so it pays off for long runs (DDPM, many images); on the CPU
  it adds about 1.2x to float32 and 1.3-1.5x to bfloat16.
- ``channels_last=True``: exact up to float rounding; about 1.1x for float32 on the CPU at 32x32, but slower
  below 32x32, and 2x slower with bfloat16 at 28x28 (PyTorch's channels-last GroupNorm is slow for small images).

Class-conditional models (``model.num-classes`` > 0) sample the classes asked for, by default every class in
turn; with a guidance scale w > 0 (classifier-free guidance) each step runs the conditional and the null-class
inputs as one doubled batch and uses ``eps = (1 + w) eps_cond - w eps_uncond`` (the same combination of the two
velocities for a ``diffusion.prediction = v_prediction`` model: the scheduler turns either into the next step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from medfed.config import DiffusionConfig
from medfed.diffusion.ddpm import predict_noise, schedule_args
from medfed.errors import ConfigError
from medfed.progress import progress_bar

PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Network precision under sampling: ``float32`` (exact), or an autocast dtype. ``auto`` picks one of them."""

NoisePredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``predict(x_t, t) -> eps`` (or v for a ``v_prediction`` model): (B, C, H, W) float32 noisy images and (B,) int64
timesteps to (B, C, H, W) float32."""


def num_classes_of(model: nn.Module) -> int:
    """The classes a model built by ``build_unet`` is conditional on (its class embeddings less the null one);
    0 for an unconditional model."""
    embeds = getattr(model, "num_class_embeds", None)
    return int(embeds) - 1 if embeds else 0


def class_cycle(num: int, num_classes: int) -> torch.Tensor:
    """(num,) int64 labels ``0, 1, ..., num_classes - 1, 0, 1, ...``: every class in turn."""
    return torch.arange(num) % num_classes


def class_rows(num: int, num_classes: int) -> torch.Tensor:
    """Labels of a grid with one row per class: ``ceil(num / num_classes)`` images of class 0, then of class 1...
    (``num`` rounded up to a multiple of ``num_classes``); save it with that many images per row."""
    return torch.arange(num_classes).repeat_interleave(math.ceil(num / num_classes))


def guided(predict: Callable[..., torch.Tensor], labels: torch.Tensor | None, null_class: int,
           guidance: float) -> NoisePredictor:
    """``predict(x, t, labels)`` as a :data:`NoisePredictor` for fixed (B,) ``labels``.

    ``guidance`` w = 0 (or no labels) is one pass; w > 0 is classifier-free guidance, one pass of the doubled batch
    (the images with their labels, then with the null class): ``eps = (1 + w) eps_cond - w eps_uncond``.
    """
    if labels is None or guidance == 0:
        return lambda x, t: predict(x, t, labels)
    both = torch.cat([labels, torch.full_like(labels, null_class)])

    def predict_guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps_cond, eps_uncond = predict(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return (1 + guidance) * eps_cond - guidance * eps_uncond

    return predict_guided


def make_sampler(cfg: DiffusionConfig, sampler: str, steps: int) -> DDPMScheduler | DDIMScheduler:
    """The reverse-process scheduler: DDPM over all ``cfg.timesteps`` steps, or DDIM over ``steps`` steps."""
    common = dict(**schedule_args(cfg), prediction_type=cfg.prediction, clip_sample=True)
    if sampler == "ddpm":
        scheduler: DDPMScheduler | DDIMScheduler = DDPMScheduler(**common)
        scheduler.set_timesteps(cfg.timesteps)
    elif sampler == "ddim":
        scheduler = DDIMScheduler(**common)
        scheduler.set_timesteps(steps)
    else:
        raise ConfigError(f"sampler '{sampler}' is unknown (choose 'ddpm' or 'ddim')")
    return scheduler


def default_batch_size(device: torch.device, image_shape: tuple[int, int, int]) -> int:
    """Images denoised together when the caller does not choose.

    On the CPU the convolutions are compute-bound by 32-64 images, and larger batches cost more CPU time per
    image (their activations no longer stay in cache; bench_sampling.py), so 64. On a GPU a small UNet is bound by
    kernel launches, so the batch grows to about 2**20 pixels (1024 images of 32x32, 256 of 64x64), which should
    keep the ``paper`` preset's activations within a few GiB (estimated, not yet measured on a GPU). The rule
    depends only on the device type and the image size, so seeded runs stay reproducible on a machine.
    """
    if device.type == "cuda":
        _, h, w = image_shape
        return int(max(16, min(1024, 2**20 // (h * w))))
    return 64


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bfloat16`` on CPUs with AMX bfloat16 units (measured about 2x faster), else ``float32``."""
    if precision == "auto":
        has_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return "bfloat16" if device.type == "cpu" and has_amx else "float32"
    if precision not in PRECISIONS:
        raise ConfigError(f"precision '{precision}' is unknown (choose auto or {', '.join(PRECISIONS)})")
    return precision


def _uses_channels_last(model: nn.Module) -> bool:
    weights = [p for p in model.parameters() if p.dim() == 4]
    return bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)


def _compile(model: nn.Module, device: torch.device) -> nn.Module:
    if device.type == "cuda":  # CUDA graphs remove the launch overhead that dominates small UNets
        return torch.compile(model, mode="reduce-overhead", dynamic=False)
    # freezing folds the (fixed) weights into the graph, so oneDNN can pre-pack them once
    return torch.compile(model, dynamic=False, options={"freezing": True})


@contextmanager
def noise_predictor(
    model: nn.Module,
    device: torch.device,
    *,
    channels_last: bool = False,
    precision: str = "auto",
    compile: bool = False,
) -> Iterator[Callable[..., torch.Tensor]]:
    """Yield the model as a fast :data:`NoisePredictor`; on exit the model is as it was (mode, memory format).

    The predictor also takes (B,) int64 ``labels`` as a third argument, for class-conditional models.

    Args:
        model: noise- (or velocity-) predicting UNet on ``device``; it is put in eval mode while the context is open.
        device: where it runs.
        channels_last: run in channels-last memory format (converted back on exit).
        precision: ``auto`` (see :func:`resolve_precision`) or a key of :data:`PRECISIONS`; anything but
            ``float32`` changes the images slightly.
        compile: wrap the model in ``torch.compile`` (compiled once for the first batch size it sees; other batch
            sizes, such as a last partial batch, run eagerly).
    """
    dtype = PRECISIONS[resolve_precision(precision, device)]
    was_training = model.training
    converted = channels_last and not _uses_channels_last(model)
    model.eval()
    if converted:
        model.to(memory_format=torch.channels_last)
    try:
        compiled = _compile(model, device) if compile else None
        compiled_batch: int | None = None
        autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else nullcontext

        def predict(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
            nonlocal compiled_batch
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            net = model
            if compiled is not None and compiled_batch in (None, x.shape[0]):
                compiled_batch, net = x.shape[0], compiled
                if device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()
            with autocast():
                return predict_noise(net, x, t, labels).float()

        yield predict
    finally:
        if converted:
            model.to(memory_format=torch.contiguous_format)
        model.train(was_training)


def denoise(
    predict: NoisePredictor,
    scheduler: DDPMScheduler | DDIMScheduler,
    x: torch.Tensor,
    *,
    generator: torch.Generator | None,
    eta: float = 0.0,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Run the reverse chain over ``scheduler.timesteps``, from noise ``x`` (B, C, H, W) to images (same shape).

    ``generator`` draws the noise of the DDPM steps (and of DDIM steps when ``eta`` > 0). Timesteps are handed to
    the scheduler as Python ints and to the network as (B,) tensors prepared up front, so the loop never waits
    for the GPU.
    """
    steps = [int(t) for t in scheduler.timesteps]
    step_tensors = torch.tensor(steps, dtype=torch.long, device=x.device)[:, None].repeat(1, x.shape[0])
    for t, t_batch in zip(steps, step_tensors, strict=True):
        eps = predict(x, t_batch)
        if isinstance(scheduler, DDIMScheduler):
            x, _ = scheduler.step(eps, t, x, eta=eta, generator=generator)
        else:
            x, _ = scheduler.step(eps, t, x, generator=generator)
        if on_step is not None:
            on_step()
    return x


@torch.inference_mode()
def sample_images(
    model: nn.Module,
    cfg: DiffusionConfig,
    num: int,
    image_shape: tuple[int, int, int],
    *,
    device: torch.device,
    seed: int = 0,
    batch_size: int | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    show_progress: bool = False,
    channels_last: bool = False,
    precision: str = "auto",
    compile: bool = False,
    class_labels: torch.Tensor | list[int] | None = None,
    guidance: float | None = None,
) -> torch.Tensor:
    """Generate ``num`` images from pure noise.

    Args:
        model: the UNet (predicting ``cfg.prediction``), already on ``device``; in eval mode while sampling, then
            left as it was.
        cfg: the diffusion settings the model was trained with (schedule, default sampler and step count).
        num: number of images.
        image_shape: (C, H, W).
        device: where to run.
        seed: images are reproducible for the same seed, batch size, sampler, steps and precision on one machine.
        batch_size: images denoised together; ``None`` picks :func:`default_batch_size` for the device.
        sampler: ``ddpm`` or ``ddim``; defaults to ``cfg.sampler``.
        steps: DDIM steps; defaults to ``cfg.sample_steps`` (DDPM always uses all T steps).
        show_progress: draw a progress bar.
        channels_last, precision, compile: speed switches, see :func:`noise_predictor`; ``precision="float32"``
            turns off the only default that changes the arithmetic (bfloat16 on CPUs with AMX).
        class_labels: conditional models only: (num,) class of each image in [0, num_classes); ``None`` draws every
            class in turn (:func:`class_cycle`).
        guidance: classifier-free guidance scale w >= 0 of conditional models; defaults to ``cfg.guidance``.

    Returns:
        (num, C, H, W) float32 images in [-1, 1], on the CPU.
    """
    sampler = sampler or cfg.sampler
    scheduler = make_sampler(cfg, sampler, steps or cfg.sample_steps)
    precision = resolve_precision(precision, device)
    batch_size = batch_size or default_batch_size(device, image_shape)
    batches = [min(batch_size, num - start) for start in range(0, num, batch_size)]
    labels = sample_labels(model, num, class_labels)
    guidance = cfg.guidance if guidance is None else guidance
    if guidance < 0:
        raise ConfigError(f"guidance scale {guidance} (--guidance, diffusion.guidance) must be >= 0")
    out = []
    total = len(batches) * len(scheduler.timesteps)
    with (progress_bar(f"sampling {num} images ({sampler})", total=total, enabled=show_progress) as advance,
          noise_predictor(model, device, channels_last=channels_last, precision=precision, compile=compile) as predict):
        for index, b in enumerate(batches):
            generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
            x = torch.randn((b, *image_shape), device=device, generator=generator)
            batch_labels = None if labels is None else labels[index * batch_size:index * batch_size + b].to(device)
            x = denoise(guided(predict, batch_labels, num_classes_of(model), guidance), scheduler, x,
                        generator=generator, eta=cfg.ddim_eta, on_step=advance)
            out.append(x.clamp(-1, 1).float().cpu().contiguous())
    return torch.cat(out)


def sample_labels(model: nn.Module, num: int, class_labels: torch.Tensor | list[int] | None) -> torch.Tensor | None:
    """The (num,) int64 class labels to sample a conditional ``model`` with (None for an unconditional one).

    Raises:
        ConfigError: labels for an unconditional model, a wrong count, or a class the model does not have.
    """
    classes = num_classes_of(model)
    if classes == 0:
        if class_labels is not None:
            raise ConfigError("class labels were given, but the model is unconditional (model.num-classes = 0)")
        return None
    if class_labels is None:
        return class_cycle(num, classes)
    labels = torch.as_tensor(class_labels, dtype=torch.long).flatten().cpu()
    if len(labels) != num:
        raise ConfigError(f"{len(labels)} class labels given for {num} images")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ConfigError(f"class labels must be in [0, {classes - 1}] (model.num-classes = {classes})")
    return labels
