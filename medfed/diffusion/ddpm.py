"""The DDPM training objective (Ho et al. 2020) on a MONAI noise schedule, written once.

The network regresses the noise eps (``diffusion.prediction = epsilon``, DDPM's parameterisation) or the velocity
v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (``v_prediction``, Salimans and Ho 2022), a_t being the schedule's
``alphas_cumprod``; :func:`regression_target` is the one place that says which. Every training path builds on
the pieces here: :func:`draw_noisy_inputs` (t, x_t and the target), :func:`predict_noise` (the network call, with
class labels when the model is conditional) and :func:`denoising_error` (the squared error per image). Centralized
training and a site's non-private loop take :func:`per_sample_loss`; the DP-SGD engines (``medfed.privacy.dp_sgd``,
``medfed.privacy.layer_grads``) take the pieces, because they need per-image gradients. Under DP-SGD the choice of
target changes nothing in the guarantee: each image's gradient is clipped whatever loss it comes from.

Class-conditional models (``model.num-classes`` > 0) have ``num_classes + 1`` class embeddings: the last one,
index ``num_classes``, is the null class of classifier-free guidance (Ho & Salimans 2022), trained by replacing a
label with it at probability ``train.label-dropout`` (:func:`condition_labels`) and used for unlabelled images.
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDPMScheduler
from torch import nn

from medfed.config import DiffusionConfig
from medfed.errors import ConfigError


def schedule_args(cfg: DiffusionConfig) -> dict[str, object]:
    """MONAI scheduler arguments of ``cfg``'s noise schedule: the beta range for the beta schedules; ``cosine``
    (Nichol and Dhariwal 2021) is defined by its ``alphas_cumprod`` alone and takes none."""
    args: dict[str, object] = {"num_train_timesteps": cfg.timesteps, "schedule": cfg.schedule}
    if cfg.schedule != "cosine":
        args.update(beta_start=cfg.beta_start, beta_end=cfg.beta_end)
    return args


def make_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The training-time noise schedule (betas, alphas_cumprod over ``cfg.timesteps`` steps) and what the network
    regresses (``prediction_type`` = ``cfg.prediction``)."""
    return DDPMScheduler(**schedule_args(cfg), prediction_type=cfg.prediction)


def regression_target(scheduler: DDPMScheduler, x0: torch.Tensor, eps: torch.Tensor,
                      t: torch.Tensor) -> torch.Tensor:
    """What the network is trained to output for ``x_t`` = sqrt(a_t) x0 + sqrt(1 - a_t) eps: ``eps`` itself, or
    for ``v_prediction`` the velocity sqrt(a_t) eps - sqrt(1 - a_t) x0. ``x0``, ``eps`` (N, C, H, W), ``t`` (N,)."""
    if scheduler.prediction_type == "epsilon":
        return eps
    if scheduler.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, eps, t)
    raise ConfigError(f"diffusion.prediction '{scheduler.prediction_type}' is unknown "
                      "(choose epsilon or v_prediction)")


def predicted_noise(scheduler: DDPMScheduler, output: torch.Tensor, x_t: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """The noise estimate in a network ``output`` (N, C, H, W) for ``x_t`` at ``t`` (N,): the output itself for an
    epsilon model; sqrt(a_t) v + sqrt(1 - a_t) x_t for a ``v_prediction`` model."""
    if scheduler.prediction_type == "epsilon":
        return output
    ab = scheduler.alphas_cumprod.to(device=x_t.device, dtype=output.dtype)[t].view(-1, *[1] * (x_t.dim() - 1))
    return ab.sqrt() * output + (1 - ab).sqrt() * x_t


def draw_noisy_inputs(scheduler: DDPMScheduler, x0: torch.Tensor, draws: int,
                      generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K noise draws per image: ``x_t`` (B, K, C, H, W), ``t`` (B, K) int64 in [0, T) and the regression target
    (B, K, C, H, W) of each draw (:func:`regression_target`: the noise eps, or the velocity).

    ``x0`` is (B, C, H, W) in [-1, 1]; t and eps come from ``generator`` (t first, then eps).
    """
    b = x0.shape[0]
    t = torch.randint(0, scheduler.num_train_timesteps, (b, draws), device=x0.device, generator=generator)
    eps = torch.randn((b, draws, *x0.shape[1:]), device=x0.device, dtype=x0.dtype, generator=generator)
    x0k, flat_eps, flat_t = x0.unsqueeze(1).expand_as(eps).flatten(0, 1), eps.flatten(0, 1), t.flatten()
    x_t = scheduler.add_noise(original_samples=x0k, noise=flat_eps, timesteps=flat_t)
    return x_t.view_as(eps), t, regression_target(scheduler, x0k, flat_eps, flat_t).view_as(eps)


def predict_noise(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                  labels: torch.Tensor | None = None) -> torch.Tensor:
    """The network's output (N, C, H, W) for ``x_t`` (N, C, H, W), ``t`` (N,) and, for a class-conditional
    model, ``labels`` (N,) int64 in [0, num_classes] (``num_classes`` = the null class): the predicted noise, or
    the predicted velocity for a ``v_prediction`` model."""
    return model(x_t, t) if labels is None else model(x_t, t, class_labels=labels)


def denoising_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The DDPM objective of each row: ``|| pred - target ||^2`` averaged over pixels, (N, ...) -> (N,)."""
    return (pred.float() - target).pow(2).flatten(1).mean(1)


def per_sample_loss(
    model: nn.Module,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Denoising loss of each image: ``|| f_theta(x_t, t[, y]) - target ||^2`` averaged over pixels (the target is
    the noise, or the velocity for ``v_prediction``: :func:`regression_target`).

    Args:
        model: maps (B, C, H, W) noisy images and (B,) timesteps (and (B,) labels) to (B, C, H, W) predictions.
        scheduler: the noise schedule.
        x0: clean images, (B, C, H, W) in [-1, 1].
        generator: source of t and eps, for reproducible runs.
        labels: (B,) class indices from :func:`condition_labels` for a conditional model, else None.

    Returns:
        (B,) loss per image. A mean over images gives the usual DDPM loss; DP-SGD clips per image.
    """
    x_t, t, target = draw_noisy_inputs(scheduler, x0, 1, generator)
    return denoising_error(predict_noise(model, x_t[:, 0], t[:, 0], labels), target[:, 0])


def check_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """Raise :class:`ConfigError` when a conditional model (``num_classes`` > 0) meets a label it has no
    embedding for; unlabelled images (label -1) are fine, they train the null class."""
    if num_classes > 0 and len(labels) and int(labels.max()) >= num_classes:
        raise ConfigError(f"config key 'model.num-classes' is {num_classes}, but {where} has label "
                          f"{int(labels.max())}; set it to at least {int(labels.max()) + 1}")


def condition_labels(labels: torch.Tensor, num_classes: int, dropout: float,
                     generator: torch.Generator | None) -> torch.Tensor | None:
    """The class labels a conditional model trains on, or None for an unconditional one (``num_classes`` 0).

    Args:
        labels: (B,) int64 dataset labels, -1 where unknown.
        num_classes: ``model.num-classes``.
        dropout: probability that a label is replaced by the null class ``num_classes`` (classifier-free guidance).
        generator: source of the dropout draws, on the labels' device.

    Returns:
        (B,) int64 labels in [0, num_classes]: unknown and dropped labels are ``num_classes``.
    """
    if num_classes <= 0:
        return None
    null = torch.full_like(labels, num_classes)
    y = torch.where(labels < 0, null, labels)
    if dropout > 0:
        drop = torch.rand(labels.shape, device=labels.device, generator=generator) < dropout
        y = torch.where(drop, null, y)
    return y
