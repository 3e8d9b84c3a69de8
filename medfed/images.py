"""Converting model-range images to pixels and writing PNG files and grids."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torchvision.io import write_png
from torchvision.utils import make_grid


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map (N, C, H, W) floats in [-1, 1] to uint8 in [0, 255] (clamping first, never wrapping)."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """Write one (C, H, W) image in [-1, 1] as an 8-bit grayscale or RGB PNG."""
    write_png(to_uint8(image.unsqueeze(0))[0], str(path))


def save_grid(images: torch.Tensor, path: str | Path, pad: int = 2, nrow: int | None = None) -> Path:
    """Write (N, C, H, W) images in [-1, 1] as one PNG grid of ``nrow`` images per row (default: roughly square);
    returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(images)
    if pixels.shape[1] == 1:
        pixels = pixels.repeat(1, 3, 1, 1)
    grid = make_grid(pixels, nrow=nrow or math.ceil(math.sqrt(len(pixels))), padding=pad, pad_value=128)
    write_png(grid, str(path))
    return path
