"""Reverse-process samplers: ancestral DDPM over all T steps, or DDIM over k steps (MONAI schedulers)."""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from medfed.config import DiffusionConfig
from medfed.progress import progress_bar


def _make_sampler(cfg: DiffusionConfig, sampler: str, steps: int) -> DDPMScheduler | DDIMScheduler:
    common = dict(num_train_timesteps=cfg.timesteps, schedule=cfg.schedule, beta_start=cfg.beta_start,
                  beta_end=cfg.beta_end, prediction_type="epsilon", clip_sample=True)
    if sampler == "ddpm":
        scheduler: DDPMScheduler | DDIMScheduler = DDPMScheduler(**common)
        scheduler.set_timesteps(cfg.timesteps)
    elif sampler == "ddim":
        scheduler = DDIMScheduler(**common)
        scheduler.set_timesteps(steps)
    else:
        raise ValueError(f"unknown sampler '{sampler}' (choose 'ddpm' or 'ddim')")
    return scheduler


@torch.inference_mode()
def sample_images(
    model: nn.Module,
    cfg: DiffusionConfig,
    num: int,
    image_shape: tuple[int, int, int],
    *,
    device: torch.device,
    seed: int = 0,
    batch_size: int = 256,
    sampler: str | None = None,
    steps: int | None = None,
    show_progress: bool = False,
) -> torch.Tensor:
    """Generate ``num`` images from pure noise.

    Args:
        model: epsilon-predicting UNet, already on ``device``; it is put in eval mode.
        cfg: the diffusion settings the model was trained with (schedule, default sampler and step count).
        num: number of images.
        image_shape: (C, H, W).
        device: where to run.
        seed: images are reproducible for the same seed, batch size, sampler and steps.
        batch_size: images denoised together; larger batches are faster until memory runs out.
        sampler: ``ddpm`` or ``ddim``; defaults to ``cfg.sampler``.
        steps: DDIM steps; defaults to ``cfg.sample_steps`` (DDPM always uses all T steps).
        show_progress: draw a progress bar.

    Returns:
        (num, C, H, W) float32 images in [-1, 1], on the CPU.
    """
    sampler = sampler or cfg.sampler
    scheduler = _make_sampler(cfg, sampler, steps or cfg.sample_steps)
    was_training = model.training
    model.eval()
    out = []
    batches = [(start, min(batch_size, num - start)) for start in range(0, num, batch_size)]
    total = len(batches) * len(scheduler.timesteps)
    with progress_bar(f"sampling {num} images ({sampler})", total=total, enabled=show_progress) as advance:
        for index, (_, b) in enumerate(batches):
            generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
            x = torch.randn((b, *image_shape), device=device, generator=generator)
            for t in scheduler.timesteps:
                eps = model(x, torch.full((b,), int(t), device=device, dtype=torch.long))
                if sampler == "ddim":
                    x, _ = scheduler.step(eps, int(t), x, eta=cfg.ddim_eta, generator=generator)
                else:
                    x, _ = scheduler.step(eps, int(t), x, generator=generator)
                advance()
            out.append(x.clamp(-1, 1).float().cpu())
    model.train(was_training)
    return torch.cat(out)
