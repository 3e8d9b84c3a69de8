"""Denoising networks: MONAI ``DiffusionModelUNet`` presets and weight averaging."""

from medfed.models.ema import ema_update, warmup_decay
from medfed.models.unet import PRESETS, UNetPreset, build_unet, count_parameters

__all__ = ["PRESETS", "UNetPreset", "build_unet", "count_parameters", "ema_update", "warmup_decay"]
