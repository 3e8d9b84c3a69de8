"""The local training step, shared by centralized training and a site's non-private rounds.

A non-private step is: class labels (:func:`~medfed.diffusion.ddpm.condition_labels`) -> the DDPM loss
(:func:`~medfed.diffusion.ddpm.per_sample_loss`, under bfloat16 autocast when ``train.precision`` resolves to it)
-> mean -> backward -> global gradient-norm clip -> optimizer step. DP-SGD (``medfed.privacy.dp_sgd``) draws the
same labels and noisy inputs, and differs only where privacy needs it: per-image gradients, clipped and noised by
Opacus' ``DPOptimizer``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from monai.networks.schedulers import DDPMScheduler
from torch import nn

from medfed.config import RunConfig
from medfed.diffusion.ddpm import condition_labels, per_sample_loss
from medfed.diffusion.sampling import resolve_precision
from medfed.errors import ConfigError

TRAIN_PRECISIONS = ("auto", "float32", "bfloat16")
"""``train.precision`` values: ``auto`` is ``bfloat16`` on CPUs with AMX units (as sampling decides), else
``float32``."""


def resolve_train_precision(precision: str, device: torch.device) -> str:
    """``float32`` or ``bfloat16`` for ``train.precision`` on ``device``."""
    if precision not in TRAIN_PRECISIONS:
        raise ConfigError(f"config key 'train.precision': '{precision}' is not one of {', '.join(TRAIN_PRECISIONS)}")
    return resolve_precision(precision, device)


def training_autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The autocast context of a forward pass at a resolved precision (``float32``: none)."""
    if precision == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@dataclass(frozen=True)
class StepOptions:
    """What a non-private step needs from the run config.

    Attributes:
        num_classes: ``model.num-classes`` (0 = unconditional).
        label_dropout: ``train.label-dropout``, probability of training a label as the null class.
        grad_clip: ``train.grad-clip``, global gradient-norm clip (0 = off).
        precision: resolved ``train.precision``: ``float32`` or ``bfloat16``.
    """

    num_classes: int = 0
    label_dropout: float = 0.0
    grad_clip: float = 0.0
    precision: str = "float32"

    @staticmethod
    def from_config(cfg: RunConfig, device: torch.device) -> StepOptions:
        return StepOptions(num_classes=cfg.model.num_classes, label_dropout=cfg.train.label_dropout,
                           grad_clip=cfg.train.grad_clip, precision=resolve_train_precision(cfg.train.precision,
                                                                                            device))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: DDPMScheduler, x0: torch.Tensor,
               labels: torch.Tensor, generator: torch.Generator | None, options: StepOptions) -> float:
    """One non-private optimizer step on a batch; returns its mean loss.

    Args:
        model: the UNet, in train mode, on ``x0``'s device.
        optimizer: e.g. AdamW over ``model``'s parameters.
        scheduler: the training noise schedule.
        x0: (B, C, H, W) clean images in [-1, 1].
        labels: (B,) int64 dataset labels (-1 = unknown), used when ``options.num_classes`` > 0.
        generator: source of label dropout, t and eps (on ``x0``'s device).
        options: see :class:`StepOptions`.
    """
    y = condition_labels(labels, options.num_classes, options.label_dropout, generator)
    with training_autocast(options.precision, x0.device):
        loss = per_sample_loss(model, scheduler, x0, generator, y).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if options.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
    optimizer.step()
    return loss.item()
