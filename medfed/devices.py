"""Choosing the compute device."""

from __future__ import annotations

import torch

from medfed.errors import ConfigError


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; ``cpu``, ``cuda`` and ``cuda:N`` are taken as given."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu" or spec.startswith("cuda"):
        if spec.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"config key 'train.device': '{spec}' requested but CUDA is not available")
        return torch.device(spec)
    raise ConfigError(f"config key 'train.device': '{spec}' is not one of auto, cpu, cuda, cuda:N")
