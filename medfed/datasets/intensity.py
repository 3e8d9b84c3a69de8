"""Intensity normalisation to [-1, 1] with MONAI's ScaleIntensityRange: CT windows, percentiles, bit depth.

CT window presets and ``data.ct-window`` parsing live in :mod:`medfed.config` (``CT_WINDOWS``,
``DataConfig.window``)."""

from __future__ import annotations

import numpy as np

from medfed.config import DataConfig


def method_for(kind: str, intensity: str) -> str:
    """``window``, ``percentile`` or ``bits`` for frames of ``kind`` (see :class:`Decoded`) under ``data.intensity``."""
    if intensity == "percentile":
        return "percentile"
    if kind == "bits":
        return "bits"
    if intensity == "window" or kind == "ct":
        return "window"
    return "percentile"


def value_range(frames: list[np.ndarray], method: str, cfg: DataConfig, max_value: float) -> tuple[float, float]:
    """The raw values that map to -1 and +1 for a group of frames (one series, volume or picture)."""
    if method == "window":
        level, width = cfg.window
        return level - width / 2, level + width / 2
    if method == "bits":
        return 0.0, max_value
    values = np.concatenate([f.reshape(-1) for f in frames])
    low, high = np.percentile(values, [cfg.percentile_low, cfg.percentile_high])
    return float(low), float(high)


def to_unit_range(frames: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``low`` .. ``high`` linearly to -1 .. 1 and clip; a group with no contrast (high <= low) becomes -1."""
    from monai.transforms import ScaleIntensityRange

    if high <= low:
        return np.full_like(frames, -1.0, dtype=np.float32)
    scale = ScaleIntensityRange(a_min=low, a_max=high, b_min=-1.0, b_max=1.0, clip=True, dtype=np.float32)
    return np.asarray(scale(frames), dtype=np.float32)
