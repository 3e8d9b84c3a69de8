"""Exported pictures (PNG, JPEG, TIFF, BMP) through MONAI's LoadImage with its PIL reader."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from medfed.datasets.decoded import Decoded, UnreadableFile

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

_KEEP_MODES = {"L", "RGB", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def _plain_mode(image: object) -> object:
    """Palette, alpha, 1-bit and CMYK/YCbCr pictures become L or RGB; 8/16-bit gray and RGB stay as stored."""
    mode = image.mode
    if mode in _KEEP_MODES:
        return image
    return image.convert("L" if mode in ("1", "LA", "La") else "RGB")


def read_picture(path: Path) -> Decoded:
    """Decode one picture into a single frame (1, C, H, W) of stored values (0-255 for 8-bit, 0-65535 for 16-bit).

    MONAI's PIL reader swaps rows and columns by default (ITK convention); here it keeps numpy's (H, W) order so
    pictures are never transposed.

    Raises:
        UnreadableFile: not a picture, or a truncated/corrupt one.
    """
    from monai.data import PILReader
    from monai.transforms import LoadImage

    reader = PILReader(converter=_plain_mode, reverse_indexing=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = LoadImage(reader=reader, image_only=True, dtype=None, ensure_channel_first=True)(str(path),
                                                                                                  reader)
        pixels = np.asarray(image.array)
    except Exception as err:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise UnreadableFile(f"cannot decode as an image ({type(err).__name__}: {str(err)[:200]})") from err
    if pixels.dtype == np.uint8:
        return Decoded(pixels[None].astype(np.float32), kind="bits", max_value=255.0)
    if np.issubdtype(pixels.dtype, np.integer) and pixels.min() >= 0 and pixels.max() <= 65535:
        return Decoded(pixels[None].astype(np.float32), kind="bits", max_value=65535.0)
    return Decoded(pixels[None].astype(np.float32), kind="scalar")
