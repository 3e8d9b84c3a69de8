"""Choosing the compute device, and describing the machine a number was measured on."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

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


def describe_machine() -> dict[str, Any]:
    """Where a number was measured: platform, versions, CPU count, torch threads, load averages (the machine may
    be shared), CUDA device and git commit. Recorded by the benchmarks and the studies."""
    load = os.getloadavg()
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": load[0],
        "load_average_5m": load[1],
        "load_average_15m": load[2],
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info
