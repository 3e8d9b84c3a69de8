"""Image datasets for medfed: the paper's benchmarks, MedMNIST archives, an embedded default, and a hospital
site's own folders of PNG/JPEG, DICOM or NIfTI files (:mod:`medfed.datasets.medical`).

Every loader returns an :class:`ImageDataset` of (C, H, W) float images in [-1, 1] with integer labels.

Names are loaded on first use, so ``import medfed.datasets.cli`` (and ``medfed --help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {"DATASETS": "loading", "load_dataset": "loading", "NO_LABEL": "core", "ImageDataset": "core",
         "convert_channels": "core", "from_uint8": "core", "resize": "core"}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"medfed.datasets.{_HOME[name]}"), name)
    raise AttributeError(f"module 'medfed.datasets' has no attribute '{name}'")
