"""Intensity normalisation to [-1, 1] with MONAI's ScaleIntensityRange: CT windows, percentiles, bit depth."""

from __future__ import annotations

import numpy as np

from medfed.config import DataConfig
from medfed.errors import ConfigError

CT_WINDOWS: dict[str, tuple[float, float]] = {
    # (level, width) in Hounsfield units; standard presets as listed by Radiopaedia ("Windowing (CT)").
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (50.0, 400.0),
    "liver": (30.0, 150.0),
    "bone": (400.0, 1800.0),
    "soft-tissue": (40.0, 400.0),
    "full": (1023.5, 4095.0),  # -1024 .. 3071 HU, the whole 12-bit CT range
}


def ct_window(text: str) -> tuple[float, float]:
    """``(level, width)`` of ``data.ct-window``: a preset name or ``level,width``.

    Raises:
        ConfigError: unknown preset or a width that is not positive.
    """
    name = text.strip().lower()
    if name in CT_WINDOWS:
        return CT_WINDOWS[name]
    level, sep, width = name.partition(",")
    try:
        window = float(level), float(width)
    except ValueError:
        window = (0.0, 0.0)
    if not sep or window[1] <= 0:
        raise ConfigError(f"config key 'data.ct-window': '{text}' is neither a preset ({', '.join(CT_WINDOWS)}) "
                          "nor 'level,width' with width > 0")
    return window


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
        level, width = ct_window(cfg.ct_window)
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
