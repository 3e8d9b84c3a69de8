import gzip

import numpy as np
import pytest
import torch

from medfed.config import DataConfig
from medfed.datasets import load_dataset
from medfed.errors import DatasetError


def check_images(ds, n, shape):
    assert len(ds) == n
    assert ds.image_shape == shape
    x, y = ds[0]
    assert x.shape == shape and x.dtype == torch.float32 and y.dtype == torch.int64
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert ds.images.max() - ds.images.min() > 1.0  # real content, not a blank set


def test_embedded_mnist_ships_in_a_wheel():
    train, test = load_dataset(DataConfig(split="train")), load_dataset(DataConfig(split="test"))
    check_images(train, 4500, (1, 28, 28))
    check_images(test, 500, (1, 28, 28))
    assert set(train.labels.tolist()) == set(range(10))


@pytest.mark.parametrize("name,split,n", [("breastmnist", "train", 546), ("breastmnist", "test", 156),
                                          ("pneumoniamnist", "val", 524)])
def test_medmnist_npz(shared_data, name, split, n):
    ds = load_dataset(DataConfig(dataset="npz", path=str(shared_data / "medmnist" / f"{name}.npz"), split=split))
    check_images(ds, n, (1, 28, 28))
    assert set(ds.labels.tolist()) == {0, 1}


def test_cifar_npz_resize_and_gray(shared_data):
    path = str(shared_data / "cifar10" / "cifar10_test.npz")
    check_images(load_dataset(DataConfig(dataset="npz", path=path, limit=100)), 100, (3, 32, 32))
    check_images(load_dataset(DataConfig(dataset="npz", path=path, limit=50, channels=1, image_size=16)),
                 50, (1, 16, 16))


def test_idx_gz_files_hold_the_same_images_as_the_npz_export(shared_data):
    idx = load_dataset(DataConfig(dataset="idx", path=str(shared_data / "mnist"), split="test"))
    npz = load_dataset(DataConfig(dataset="npz", path=str(shared_data / "mnist" / "mnist.npz"), split="test"))
    check_images(idx, 10000, (1, 28, 28))
    # The README: the export's test pixels are identical to the idx files (in another order).
    position = {x.numpy().tobytes(): i for i, x in enumerate(idx.images)}
    order = [position[x.numpy().tobytes()] for x in npz.images]
    assert sorted(order) == list(range(10000))
    torch.testing.assert_close(idx.labels[order], npz.labels)


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_mnist_class_reads_real_idx_root(shared_data, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(gzip.decompress((shared_data / "mnist" / f"{name}.gz").read_bytes()))
    train = np.load(shared_data / "mnist" / "mnist.npz")
    write_idx(raw / "train-images-idx3-ubyte", train["train_images"][:1000])
    write_idx(raw / "train-labels-idx1-ubyte", train["train_labels"][:1000])
    test = load_dataset(DataConfig(dataset="mnist", path=str(tmp_path), split="test"))
    check_images(test, 10000, (1, 28, 28))
    check_images(load_dataset(DataConfig(dataset="mnist", path=str(tmp_path), split="train")), 1000, (1, 28, 28))


def test_image_folder_with_class_subfolders(shared_data, tmp_path):
    from medfed.images import save_png

    ds = load_dataset(DataConfig(dataset="npz", path=str(shared_data / "medmnist" / "breastmnist.npz"), limit=12))
    for i, (x, y) in enumerate(ds):
        (tmp_path / f"class{int(y)}").mkdir(exist_ok=True)
        save_png(x, tmp_path / f"class{int(y)}" / f"{i}.png")
    folder = load_dataset(DataConfig(dataset="folder", path=str(tmp_path), image_size=32, channels=3))
    check_images(folder, 12, (3, 32, 32))
    assert sorted(folder.labels.tolist()) == sorted(ds.labels.tolist())


def test_missing_root_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    for dataset in ("npz", "folder", "cifar10", "idx"):
        with pytest.raises(DatasetError, match=str(missing)):
            load_dataset(DataConfig(dataset=dataset, path=str(missing)))


def test_npz_with_wrong_keys_names_file_and_keys(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, pictures=np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(DatasetError, match=r"bad\.npz.*no 'train_images'.*found: pictures"):
        load_dataset(DataConfig(dataset="npz", path=str(bad)))


def test_folder_with_unreadable_image_names_the_file(tmp_path):
    from medfed.images import save_png

    save_png(torch.zeros(1, 8, 8), tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(DatasetError, match="broken.png"):
        load_dataset(DataConfig(dataset="folder", path=str(tmp_path)))
