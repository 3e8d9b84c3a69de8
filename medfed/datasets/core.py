"""The in-memory image dataset every loader returns, and the pixel conversions they share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medfed.errors import DatasetError

NO_LABEL = -1

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
"""Fashion-MNIST's class names in label order (Xiao et al. 2017, zalandoresearch/fashion-mnist README)."""
MNIST_CLASSES = tuple(str(digit) for digit in range(10))
"""MNIST's class names in label order: the digits."""


@dataclass(eq=False)
class ImageDataset(Dataset):
    """Images ready for the diffusion model.

    Attributes:
        images: (N, C, H, W) float32 in [-1, 1].
        labels: (N,) int64 class indices, ``NO_LABEL`` (-1) where unknown.
        name: a human-readable source description (never a patient identifier).
        classes: class names in label order where the source defines them (label i is ``classes[i]``); empty
            where it does not.
    """

    images: torch.Tensor
    labels: torch.Tensor
    name: str
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DatasetError(f"{self.name}: expected images of shape (N, C, H, W), got {tuple(self.images.shape)}")
        if len(self.labels) != len(self.images):
            raise DatasetError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, indices: np.ndarray | torch.Tensor | list[int], name: str | None = None) -> ImageDataset:
        """A new dataset holding only ``indices`` (used for limits and federated partitions)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ImageDataset(self.images[idx], self.labels[idx], name or self.name, self.classes)


def from_uint8(
    pixels: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | None,
    name: str,
    *,
    channels_last: bool,
    classes: tuple[str, ...] = (),
) -> ImageDataset:
    """Wrap uint8 pixels as an :class:`ImageDataset` scaled to [-1, 1].

    Args:
        pixels: (N, H, W), (N, H, W, C) if ``channels_last`` else (N, C, H, W), values 0-255.
        labels: (N,) or (N, 1) integer labels, or None.
        name: source description used in error messages.
        channels_last: layout of 4-D ``pixels``.
        classes: class names in label order, where the source defines them.
    """
    x = torch.tensor(np.asarray(pixels))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.ndim == 4 and channels_last:
        x = x.permute(0, 3, 1, 2)
    elif x.ndim != 4:
        raise DatasetError(f"{name}: expected images of 3 or 4 dimensions, got shape {tuple(x.shape)}")
    if len(x) == 0:
        raise DatasetError(f"{name}: contains no images")
    images = x.float().div(127.5).sub(1.0).contiguous()
    if labels is None:
        y = torch.full((len(images),), NO_LABEL, dtype=torch.long)
    else:
        y = torch.tensor(np.asarray(labels)).reshape(-1).long()
    return ImageDataset(images, y, name, classes)


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert (N, C, H, W) images to 1 (ITU-R 601 luma) or 3 (repeated gray) channels; 0 keeps them."""
    c = images.shape[1]
    if channels in (0, c):
        return images
    if channels == 3 and c == 1:
        return images.repeat(1, 3, 1, 1)
    if channels == 1 and c == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
        return (images * weights).sum(1, keepdim=True)
    raise DatasetError(f"cannot convert {c}-channel images to {channels} channels")


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N, C, H, W) images to (N, C, size, size) with antialiased bilinear filtering; 0 keeps them."""
    if size == 0 or tuple(images.shape[-2:]) == (size, size):
        return images
    out = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.clamp(-1.0, 1.0)
