"""How fast a site folder loads, per format, without and with ``data.cache-dir`` (MONAI PersistentDataset).

Folders are written from real files: DICOM copies of nibabel's 256x256 MR slice (one series), NIfTI copies of
nilearn's MNI152 template (197x233x189, axial slices), PNGs of PneumoniaMNIST. Each is loaded at
``data.image-size = 64``, one channel: first without a cache, then twice with one (fill, then hit). One file is
loaded first (timed apart) so one-off imports and decoder set-up do not count against the folder.

Usage: python benchmarks/bench_medical_loading.py [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the medfed command does; set before torch loads

import numpy as np  # noqa: E402
from common import peak_rss_mib, write_results  # noqa: E402

from medfed.config import DataConfig  # noqa: E402
from medfed.datasets import load_dataset  # noqa: E402

SHARED = Path(os.environ.get("MEDFED_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
NIBABEL_DATA = Path(importlib.util.find_spec("nibabel").origin).parent / "tests" / "data"


def write_dicom_series(folder: Path, count: int) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    series = generate_uid()
    for i in range(count):
        ds = pydicom.dcmread(NIBABEL_DATA / "0.dcm")
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = series, generate_uid(), i + 1
        ds.save_as(folder / f"slice_{i:04d}.dcm")


def write_nifti_volumes(folder: Path, count: int) -> None:
    import nibabel as nib
    from nilearn.datasets import load_mni152_template

    folder.mkdir(parents=True)
    template = load_mni152_template()
    for i in range(count):
        nib.save(template, folder / f"mni_{i}.nii.gz")


def write_pngs(folder: Path, count: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, image in enumerate(np.load(SHARED / "medmnist" / "pneumoniamnist.npz")["train_images"][:count]):
        Image.fromarray(image).save(folder / f"img_{i:05d}.png")


def timed_load(cfg: DataConfig) -> tuple[float, int]:
    start = time.perf_counter()
    ds = load_dataset(cfg)
    return time.perf_counter() - start, len(ds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small folders (a smoke run)")
    args = parser.parse_args()
    counts = {"dicom": 60, "nifti": 1, "folder": 300} if args.quick else {"dicom": 400, "nifti": 4, "folder": 3000}
    writers = {"dicom": write_dicom_series, "nifti": write_nifti_volumes, "folder": write_pngs}
    results = {}
    with tempfile.TemporaryDirectory(prefix="medfed-bench-loading-") as tmp:
        for fmt, count in counts.items():
            folder = Path(tmp) / fmt
            writers[fmt](folder, count)
            base = DataConfig(dataset=fmt, path=str(folder), image_size=64, channels=1)
            first = sorted(folder.iterdir())[0]
            warmup, _ = timed_load(DataConfig(**{**base.__dict__, "path": str(first)}))  # one-off imports
            cold, images = timed_load(base)
            cached = DataConfig(**{**base.__dict__, "cache_dir": str(Path(tmp) / f"cache-{fmt}")})
            fill, _ = timed_load(cached)
            hit, _ = timed_load(cached)
            results[fmt] = {"files": count, "images": images, "seconds_first_file_with_imports": round(warmup, 3),
                            "seconds_no_cache": round(cold, 3),
                            "seconds_cache_fill": round(fill, 3), "seconds_cache_hit": round(hit, 3),
                            "images_per_second_no_cache": round(images / cold, 1),
                            "images_per_second_cache_hit": round(images / hit, 1)}
    write_results("medical_loading", {"quick": args.quick, "image_size": 64, "formats": results,
                                      "peak_rss_mib": round(peak_rss_mib(), 1)})


if __name__ == "__main__":
    main()
