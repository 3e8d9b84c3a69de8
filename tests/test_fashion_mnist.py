"""Fashion-MNIST offline: ``data.dataset = fashion-mnist`` reads the shared .npz archive, an idx folder in the
original format (written here from the archive), and Debian's ``dataset-fashion-mnist`` folder where installed."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from medfed.config import DataConfig
from medfed.datasets import load_dataset
from medfed.datasets import sources
from medfed.errors import DatasetError


@pytest.fixture(scope="module")
def archive_path(shared_data: Path) -> Path:
    return shared_data / "fashion-mnist" / "fashion_mnist.npz"


def write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte idx file (LeCun's format: magic 0x0000 0x08 ndim, big-endian int32 dims, the bytes)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


@pytest.fixture(scope="module")
def idx_folder(tmp_path_factory, archive_path: Path) -> Path:
    """The archive's first 2,000 training and all 10,000 test images as idx files: train gzip'd, test raw."""
    folder = tmp_path_factory.mktemp("fashion-idx")
    archive = np.load(archive_path)
    write_idx(folder / "train-images-idx3-ubyte.gz", archive["train_images"][:2000])
    write_idx(folder / "train-labels-idx1-ubyte.gz", archive["train_labels"][:2000])
    write_idx(folder / "t10k-images-idx3-ubyte", archive["test_images"])
    write_idx(folder / "t10k-labels-idx1-ubyte", archive["test_labels"])
    return folder


def load(path: str | Path, split: str, **kw):
    return load_dataset(DataConfig(dataset="fashion-mnist", path=str(path), split=split, **kw))


def test_archive_and_idx_folder_load_the_same_images_labels_and_class_names(archive_path, idx_folder):
    archive = np.load(archive_path)
    for split, count in (("train", 2000), ("test", 10000)):
        from_npz, from_idx = load(archive_path, split), load(idx_folder, split)
        assert tuple(from_idx.images.shape) == (count, 1, 28, 28)
        torch.testing.assert_close(from_idx.images, from_npz.images[:count], rtol=0, atol=0)
        assert from_idx.labels.tolist() == from_npz.labels[:count].tolist()
        assert from_npz.labels.tolist() == archive[f"{split}_labels"].tolist()
        # Pixels map 0 -> -1 and 255 -> 1 exactly; the README's training mean 0.2860 checks the scaling.
        expected = torch.from_numpy(archive[f"{split}_images"][:count]).float().div(127.5).sub(1).unsqueeze(1)
        torch.testing.assert_close(from_idx.images, expected, rtol=0, atol=0)
    assert float(load(archive_path, "train").images.add(1).div(2).mean()) == pytest.approx(0.2860, abs=5e-5)
    test = load(archive_path, "test")
    assert test.classes[9] == "Ankle boot" and test.classes[0] == "T-shirt/top" and len(test.classes) == 10
    assert sorted(set(test.labels.tolist())) == list(range(10))
    # Fashion-MNIST has no validation split: val reads the test split, as torchvision's loader does.
    assert load(idx_folder, "val").labels.tolist() == test.labels.tolist()
    # The usual config keys apply and keep the class names.
    small = load(archive_path, "test", limit=50, image_size=32, channels=3)
    assert tuple(small.images.shape) == (50, 3, 32, 32) and small.classes == test.classes
    assert small.subset([0, 1]).classes == test.classes


def test_missing_sources_name_data_path(tmp_path, archive_path, monkeypatch):
    with pytest.raises(DatasetError, match=r"data.path .*nowhere: no fashion-mnist .npz archive or idx folder"):
        load(tmp_path / "nowhere", "train")
    readme = tmp_path / "notes.txt"
    readme.write_text("not images")
    with pytest.raises(DatasetError, match=r"data.path .*notes.txt: fashion-mnist reads a .npz archive or a folder"):
        load(readme, "train")
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "empty")  # a machine without the package
    with pytest.raises(DatasetError, match="data.path is empty and .*empty holds no idx files.*dataset-fashion-mnist"):
        load("", "train")
    # An idx folder missing the split asked for names the file it looked for.
    (tmp_path / "half").mkdir()
    write_idx(tmp_path / "half" / "t10k-images-idx3-ubyte", np.load(archive_path)["test_images"][:5])
    with pytest.raises(DatasetError, match="no train-images-idx3-ubyte"):
        load(tmp_path / "half", "train")


@pytest.mark.skipif(not sources.has_idx_files(sources.DEBIAN_FASHION_MNIST),
                    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
def test_debian_package_is_read_when_data_path_is_empty_and_matches_the_archive(archive_path):
    debian = load("", "test")
    assert "idx" in debian.name
    torch.testing.assert_close(debian.images, load(archive_path, "test").images, rtol=0, atol=0)
    assert debian.labels.tolist() == np.load(archive_path)["test_labels"].tolist()
    assert debian.classes == load(sources.DEBIAN_FASHION_MNIST, "test").classes
