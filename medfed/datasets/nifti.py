"""NIfTI volumes as 2D slices: MONAI's LoadImage (NibabelReader), EnsureChannelFirst and Orientation to RAS.

Every volume is reoriented to RAS first, so files stored in LPS, LAS or any other orientation give the same
slices. A slice is shown the way viewers in neurological convention (nilearn's) show it: the first in-plane
RAS axis runs left to right and the second bottom to top (axial: patient's left on the left, anterior at the
top; coronal and sagittal: superior at the top).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from medfed.datasets.decoded import Decoded, UnreadableFile

NIFTI_SUFFIXES = (".nii", ".nii.gz")

FOREGROUND_LEVEL = -0.9
"""A normalised pixel above this (5% of the [-1, 1] range) counts as foreground for empty-slice filtering."""


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def read_volume(path: Path, volume: int = 0) -> np.ndarray:
    """The RAS-oriented (X, Y, Z) float32 volume of a 2D, 3D or 4D NIfTI file (``volume`` picks a 4D file's volume).

    Raises:
        UnreadableFile: not NIfTI, corrupt, more than 4 dimensions, ``volume`` out of range, NaN or infinite voxels.
    """
    from monai.data import NibabelReader
    from monai.transforms import LoadImage, Orientation

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = LoadImage(reader=NibabelReader(), image_only=True, dtype=np.float32,
                              ensure_channel_first=True)(str(path), NibabelReader())
            spatial = image.ndim - 1
            if spatial not in (2, 3):
                raise UnreadableFile(f"has {image.ndim} dimensions; only 2D, 3D and 4D (a series of 3D) NIfTI "
                                     "files can be sliced")
            image = Orientation(axcodes="RAS"[:spatial])(image)
    except UnreadableFile:
        raise
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for corrupt files
        raise UnreadableFile(f"cannot read as NIfTI ({type(err).__name__}: {str(err)[:200]})") from err
    if volume >= image.shape[0]:
        raise UnreadableFile(f"has {image.shape[0]} volume(s); data.nifti-volume={volume} is out of range")
    voxels = np.asarray(image.array[volume], dtype=np.float32)
    if voxels.ndim == 2:
        voxels = voxels[..., None]
    bad = int(np.isnan(voxels).sum()), int(np.isinf(voxels).sum())
    if bad[0] or bad[1]:
        raise UnreadableFile(f"contains {bad[0]} NaN and {bad[1]} infinite voxels (of {voxels.size})")
    return voxels


def volume_slices(voxels: np.ndarray, axis: int) -> np.ndarray:
    """(S, H, W) slices of a RAS (X, Y, Z) volume along ``axis``, in display orientation (see the module doc)."""
    stacked = np.moveaxis(voxels, axis, 0)  # (S, A, B): A runs left to right, B bottom to top
    return np.ascontiguousarray(stacked.transpose(0, 2, 1)[:, ::-1, :])


def read_nifti(path: Path, axis: int, volume: int) -> Decoded:
    """All slices of one NIfTI file as raw frames (S, 1, H, W)."""
    return Decoded(volume_slices(read_volume(path, volume), axis)[:, None], kind="scalar")


def foreground_fraction(frames: np.ndarray) -> np.ndarray:
    """(S,) fraction of each normalised frame's pixels above :data:`FOREGROUND_LEVEL`."""
    return (frames > FOREGROUND_LEVEL).reshape(len(frames), -1).mean(axis=1)
