"""Exponential moving average of weights, the standard DDPM trick for better samples."""

from __future__ import annotations

import torch
from torch import nn


def warmup_decay(update: int, decay: float) -> float:
    """The EMA decay of update ``update`` (0-based): ``min(decay, (1 + n) / (10 + n))``.

    Early updates move the average fast (0.1 at the first, 0.5 at the eighth, 0.9 by the 81st), so a short run's
    EMA follows its training instead of staying near the random initial weights; from about ``9 / (1 - decay)``
    updates on it is ``decay``.
    """
    return min(decay, (1.0 + update) / (10.0 + update))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Move ``ema``'s parameters towards ``model``'s: ``ema = decay * ema + (1 - decay) * model``.

    Pass :func:`warmup_decay` of the update count as ``decay`` for the warm-up.
    """
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1.0 - decay)
