"""Exponential moving average of weights, the standard DDPM trick for better samples."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Move ``ema``'s parameters towards ``model``'s: ``ema = decay * ema + (1 - decay) * model``."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1.0 - decay)
