"""What a reader of one medical file returns, and the two ways reading can fail."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Decoded:
    """The frames of one file before intensity normalisation.

    Attributes:
        frames: (F, C, H, W) float32 in display orientation (row 0 at the top), raw units: Hounsfield units for
            CT, stored values otherwise.
        kind: how ``data.intensity = auto`` normalises them: ``ct`` (CT window), ``scalar`` (percentiles of the
            series or volume) or ``bits`` (the full range of the stored bit depth, ``max_value``).
        max_value: full-scale value for ``bits`` (255 for 8-bit, 65535 for 16-bit); 0 otherwise.
        modality: DICOM modality code (``CT``, ``MR``, ...); empty for other formats.
    """

    frames: np.ndarray
    kind: str
    max_value: float = 0.0
    modality: str = ""


class UnreadableFile(Exception):
    """A file that should hold an image but cannot be used; the message is the reason (no header values)."""


class NotAnImage(Exception):
    """A file that legitimately holds no image (a DICOMDIR, a report); always left out, never an error."""
