"""UNet presets built on MONAI's ``DiffusionModelUNet`` (residual blocks, GroupNorm, self-attention).

Every preset has three resolution levels, so any even image side divisible by 4 works (28 and 32 included), uses
GroupNorm (no BatchNorm, no buffers) and passes Opacus' ``ModuleValidator``.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

from monai.networks.nets import DiffusionModelUNet
from torch import nn

from medfed.errors import ConfigError


@dataclass(frozen=True)
class UNetPreset:
    """Architecture of one preset; ``parameters_1ch`` is the parameter count for 1-channel images."""

    channels: tuple[int, int, int]
    attention_levels: tuple[bool, bool, bool]
    num_res_blocks: int
    num_head_channels: int
    norm_num_groups: int
    parameters_1ch: int
    purpose: str


PRESETS: dict[str, UNetPreset] = {
    "pico": UNetPreset((4, 8, 8), (False, False, True), 1, 8, 4, 18_253,
                       "the smallest edge model (medfed study lightweight)"),
    "nano": UNetPreset((8, 16, 16), (False, False, True), 1, 16, 8, 71_033,
                       "edge devices with little memory (medfed study lightweight)"),
    "micro": UNetPreset((16, 32, 32), (False, False, True), 1, 32, 16, 280_177,
                        "edge devices and fast CPU runs"),
    "tiny": UNetPreset((32, 64, 64), (False, False, True), 1, 32, 32, 1_112_801,
                       "edge sites and CPU tests"),
    "small": UNetPreset((64, 128, 128), (False, False, True), 2, 32, 32, 6_469_889,
                        "GPU sites, better quality"),
    "paper": UNetPreset((128, 192, 256), (False, True, True), 2, 64, 32, 22_527_425,
                        "the size used by Tun et al. (about 23M parameters)"),
}


def build_unet(preset: str, channels: int, num_classes: int = 0) -> DiffusionModelUNet:
    """Build the epsilon-predicting UNet of a preset for images with ``channels`` channels.

    The network maps ``x_t`` of shape (B, C, H, W) and integer timesteps of shape (B,) to predicted noise of
    shape (B, C, H, W). With ``num_classes`` > 0 (``model.num-classes``) it is class-conditional: it also takes
    ``class_labels`` of shape (B,) in [0, num_classes], through ``num_classes + 1`` class embeddings (MONAI's
    ``num_class_embeds``) added to the timestep embedding; index ``num_classes`` is the null class of
    classifier-free guidance.
    """
    if preset not in PRESETS:
        raise ConfigError(f"config key 'model.preset': unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    if num_classes < 0:
        raise ConfigError(f"config key 'model.num-classes' must be >= 0, got {num_classes}")
    p = PRESETS[preset]
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=channels,
        out_channels=channels,
        channels=p.channels,
        attention_levels=p.attention_levels,
        num_res_blocks=p.num_res_blocks,
        num_head_channels=p.num_head_channels,
        norm_num_groups=p.norm_num_groups,
        num_class_embeds=num_classes + 1 if num_classes > 0 else None,
    )


@functools.lru_cache(maxsize=16)
def state_shapes(preset: str, channels: int, num_classes: int = 0) -> tuple[tuple[int, ...], ...]:
    """Shapes of :func:`build_unet`'s ``state_dict`` tensors, in order (the model is built once per process)."""
    return tuple(tuple(t.shape) for t in build_unet(preset, channels, num_classes).state_dict().values())


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
