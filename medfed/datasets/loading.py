"""``load_dataset``: one entry point for every dataset source (see the package docstring)."""

from __future__ import annotations

import numpy as np

from medfed.config import DATASETS, DataConfig
from medfed.datasets import medical, sources
from medfed.datasets.core import ImageDataset, convert_channels, resize
from medfed.errors import ConfigError

__all__ = ["DATASETS", "load_dataset"]


def load_dataset(cfg: DataConfig, seed: int = 0) -> ImageDataset:
    """Load, convert channels, resize and (optionally) subsample the dataset ``cfg`` describes.

    Raises:
        DatasetError: missing path, unreadable file or malformed arrays, naming the path.
        ConfigError: unknown dataset name or split.
    """
    if cfg.split not in sources.SPLITS:
        raise ConfigError(f"config key 'data.split': '{cfg.split}' is not one of {', '.join(sources.SPLITS)}")
    name = cfg.dataset
    if name == "embedded-mnist":
        ds = sources.load_embedded_mnist(cfg.split)
    elif name in ("mnist", "fashion-mnist"):
        ds = sources.load_mnist_like(name, cfg.path, cfg.split, cfg.download)
    elif name in ("cifar10", "svhn"):
        ds = sources.load_torchvision(name, cfg.path, cfg.split, cfg.download)
    elif name == "npz":
        ds = sources.load_npz(cfg.path, cfg.split)
    elif name == "idx":
        ds = sources.load_idx(cfg.path, cfg.split)
    elif name in medical.FORMATS:  # folder (PNG/JPEG), dicom, nifti: a hospital site's own files
        ds = medical.load_site_folder(cfg, name)
    else:
        raise ConfigError(f"config key 'data.dataset': unknown dataset '{name}' (choose from {', '.join(DATASETS)})")
    images = resize(convert_channels(ds.images, cfg.channels), cfg.image_size)
    ds = ImageDataset(images, ds.labels, ds.name, ds.classes)
    if cfg.limit and cfg.limit < len(ds):
        keep = np.sort(np.random.default_rng(seed).permutation(len(ds))[: cfg.limit])
        ds = ds.subset(keep)
    return ds

