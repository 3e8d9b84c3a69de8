"""Real medical files for tests: pydicom's and nibabel's bundled files, copied or rewritten into site folders."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np

NIBABEL_DATA = Path(importlib.util.find_spec("nibabel").origin).parent / "tests" / "data"

UID_ROOT = "1.2.826.0.1.3680043.8.498.7319468"
"""Planted UIDs start with this (pydicom's UID root plus a distinctive suffix)."""

PLANTED = {
    "PatientName": "Qzxwvik^Jorunnelle",
    "PatientID": "MEDFED-PID-731946",
    "PatientBirthDate": "19230417",
    "StudyDate": "19870623",
    "SeriesDate": "19870624",
    "AcquisitionDate": "19870625",
    "ContentDate": "19870626",
    "InstitutionName": "Sankt Qzxwvik Hospital",
    "ReferringPhysicianName": "Vbnmqo^Ottoline",
    "AccessionNumber": "ACC-93751-QZ",
}
"""Distinctive identifying header values written into test DICOMs, to search for everywhere afterwards."""


def pydicom_file(name: str) -> Path:
    """A DICOM file bundled with pydicom (only files that ship in the wheel; nothing is downloaded)."""
    from pydicom.data import get_testdata_file

    found = get_testdata_file(name, download=False)
    assert found is not None, f"{name} does not ship with pydicom"
    return Path(found)


def write_planted_dicoms(folder: Path, sources: dict[str, int], series_tag: str = "1") -> list[str]:
    """Copies of pydicom/nibabel DICOMs with :data:`PLANTED` header values and planted UIDs.

    Args:
        sources: file name (pydicom's, or ``nibabel:<name>``) -> copies; copies of one source form one series,
            and each copy's pixels are scaled a little differently so the series is not constant.

    Returns:
        every planted value (names, IDs, dates, UIDs), for leak searches.
    """
    import pydicom

    folder.mkdir(parents=True, exist_ok=True)
    secrets = list(PLANTED.values()) + [UID_ROOT]
    for s, (source, copies) in enumerate(sources.items()):
        path = NIBABEL_DATA / source.split(":", 1)[1] if source.startswith("nibabel:") else pydicom_file(source)
        series_uid = f"{UID_ROOT}.{series_tag}.{s + 1}"
        for i in range(copies):
            ds = pydicom.dcmread(path)
            for keyword, value in PLANTED.items():
                setattr(ds, keyword, value)
            ds.StudyInstanceUID = f"{UID_ROOT}.{series_tag}"
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = f"{series_uid}.{i + 1}"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = i + 1
            pixels = ds.pixel_array
            scaled = (pixels.astype(np.float64) * (1.0 - 0.05 * i)).astype(pixels.dtype)
            ds.PixelData = scaled.tobytes()
            ds.save_as(folder / f"{Path(source).stem.replace(':', '_')}_{i:03d}.dcm")
            secrets += [ds.SOPInstanceUID, series_uid]
    return sorted(set(secrets))


PRIVATE_TRANSFER_SYNTAX = f"{UID_ROOT}.77.1"
"""A vendor's private transfer syntax under the hospital's UID root: the header parses, the pixel data cannot be
decoded, and pydicom's error quotes the UID (``... 'Transfer Syntax UID' value of '<uid>' is not supported``)."""


def write_undecodable_dicom(folder: Path, name: str = "private_syntax.dcm") -> list[str]:
    """A planted copy of ``CT_small.dcm`` (all :data:`PLANTED` values, own UIDs) whose pixel data no decoder
    reads because its transfer syntax is :data:`PRIVATE_TRANSFER_SYNTAX`: the decoder's error message carries a
    header value, so only the reader's redaction keeps it out of the reason a site logs or reports.

    Returns:
        every planted value of the file, for leak searches.
    """
    import pydicom

    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    for keyword, value in PLANTED.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = f"{UID_ROOT}.88"
    ds.SeriesInstanceUID = f"{UID_ROOT}.88.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{UID_ROOT}.88.1.1"
    ds.file_meta.TransferSyntaxUID = PRIVATE_TRANSFER_SYNTAX
    ds.save_as(folder / name)
    return sorted({*PLANTED.values(), UID_ROOT, PRIVATE_TRANSFER_SYNTAX, ds.SOPInstanceUID, ds.SeriesInstanceUID})


def write_pngs(folder: Path, npz: Path, count: int, split: str = "train") -> np.ndarray:
    """The first ``count`` images of a MedMNIST archive as PNGs in ``folder``; returns them (N, H, W) uint8."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images = np.load(npz)[f"{split}_images"][:count]
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img_{i:03d}.png")
    return images


def copy_nifti(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(NIBABEL_DATA / n, folder / n)) for n in names]


def find_leaks(paths: list[Path], secrets: list[str]) -> list[str]:
    """``file: value`` for every secret found in the bytes of any file."""
    leaks = []
    for path in paths:
        data = path.read_bytes()
        leaks += [f"{path}: {s}" for s in secrets if s.encode() in data]
    return leaks
