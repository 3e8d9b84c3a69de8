"""The DDPM training objective (Ho et al. 2020, epsilon prediction) on a MONAI noise schedule."""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDPMScheduler
from torch import nn

from medfed.config import DiffusionConfig


def make_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The training-time noise schedule (betas, alphas_cumprod over ``cfg.timesteps`` steps)."""
    return DDPMScheduler(
        num_train_timesteps=cfg.timesteps,
        schedule=cfg.schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type="epsilon",
    )


def per_sample_loss(
    model: nn.Module,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Denoising loss of each image: ``|| eps_theta(x_t, t) - eps ||^2`` averaged over pixels.

    Args:
        model: maps (B, C, H, W) noisy images and (B,) timesteps to (B, C, H, W) predicted noise.
        scheduler: the noise schedule.
        x0: clean images, (B, C, H, W) in [-1, 1].
        generator: source of t and eps, for reproducible runs.

    Returns:
        (B,) loss per image. A mean over images gives the usual DDPM loss; DP-SGD clips per image.
    """
    b = x0.shape[0]
    t = torch.randint(0, scheduler.num_train_timesteps, (b,), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_t = scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)
    pred = model(x_t, t)
    return (pred - noise).pow(2).flatten(1).mean(1)
