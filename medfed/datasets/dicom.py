"""DICOM files at a site: recognise them, decode their frames with MONAI's PydicomReader, group them by series.

Nothing read from a header leaves this module except non-identifying technical fields (modality, photometric
interpretation, bit depth, frame layout). Series are told apart by ``SeriesInstanceUID`` inside
:func:`series_groups` only; messages about bad files are scrubbed of every header string (:func:`redact`).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from medfed.datasets.decoded import Decoded, NotAnImage, UnreadableFile

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")

NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "KO", "PR", "REG",
                                  "DOC", "PLAN", "FID"})
"""Modalities whose pixel data (if any) is not an image of the patient: segmentations, dose grids, reports..."""

_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
                       "UR", "UT"})


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and its logger while reading: both may quote header values (an invalid UID,
    a malformed date), and logs can travel beyond the site."""
    logger = logging.getLogger("pydicom")
    disabled = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = disabled


def has_dicom_preamble(path: Path) -> bool:
    """True when ``path`` carries the DICOM Part 10 ``DICM`` marker at byte 128."""
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def looks_like_dicom(path: Path) -> bool:
    """A DICOM suffix or the ``DICM`` marker (PACS exports often have no suffix at all)."""
    return path.name.lower().endswith(DICOM_SUFFIXES) or has_dicom_preamble(path)


def header_strings(ds: object) -> set[str]:
    """Every text value in a pydicom dataset (names, IDs, dates, UIDs, ...), for :func:`redact`."""
    values: set[str] = set()
    datasets = [ds, getattr(ds, "file_meta", None)]
    for dataset in (d for d in datasets if d is not None):
        for element in dataset.iterall():
            if element.VR not in _TEXT_VRS or element.value is None:
                continue
            items = element.value if isinstance(element.value, (list, tuple)) else [element.value]
            for item in items:
                for text in {str(item), str(item).strip()}:
                    values.update(part for part in text.split("\\") if len(part.strip()) >= 3)
    return values


def redact(message: str, secrets: Iterable[str]) -> str:
    """``message`` with every header value replaced by ``<header value>``, longest first."""
    for value in sorted(secrets, key=len, reverse=True):
        message = message.replace(value, "<header value>")
    return message


def _reason(err: BaseException, secrets: Iterable[str]) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return redact(f"{type(err).__name__}: {text[:300]}", secrets)


def _is_image_object(ds: object) -> bool:
    """Image objects carry Rows or an image-storage SOP class; DICOMDIRs and reports carry neither."""
    sop_class = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None) or ds.get("SOPClassUID")
    return "Rows" in ds or (sop_class is not None and "Image Storage" in str(getattr(sop_class, "name", "")))


def read_dicom(path: Path) -> Decoded:
    """Decode one DICOM file into raw frames.

    Returns frames (F, C, H, W) float32 in rows x columns display order: Hounsfield units for CT (MONAI's
    reader applies RescaleSlope/Intercept), stored values otherwise. MONOCHROME1 images are negated so that
    bright means dense, PALETTE COLOR is expanded to RGB, YBR is converted to RGB by pydicom. Multi-frame
    files give one frame per frame.

    Raises:
        NotAnImage: a DICOM object without an image (DICOMDIR, structured report, segmentation, dose grid).
        UnreadableFile: not DICOM, truncated, or undecodable pixel data; the reason holds no header value.
    """
    from monai.data import PydicomReader
    from pydicom.errors import InvalidDicomError

    reader = PydicomReader(swap_ij=False, prune_metadata=True)
    with quiet_pydicom():
        try:
            ds = reader.read(str(path))
        except InvalidDicomError as err:
            raise UnreadableFile("not a DICOM file (no 'DICM' marker and no valid header)") from err
        except Exception as err:  # noqa: BLE001 - pydicom raises many types for corrupt files
            raise UnreadableFile(f"cannot parse the DICOM header ({type(err).__name__})") from err
        modality = code_string(ds.get("Modality"))
        if modality in NON_IMAGE_MODALITIES:
            raise NotAnImage(f"a DICOM {modality} object, not an image")
        if "PixelData" not in ds:
            if _is_image_object(ds):
                raise UnreadableFile("truncated or corrupt DICOM: an image object without pixel data")
            raise NotAnImage("a DICOM object without pixel data (e.g. DICOMDIR or a report)")
        try:
            array, _meta = reader.get_data(ds)
            photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
            if photometric == "PALETTE COLOR":
                from pydicom.pixels import apply_color_lut

                array = apply_color_lut(np.asarray(array), ds)
            samples = 3 if photometric == "PALETTE COLOR" else int(ds.get("SamplesPerPixel", 1) or 1)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            bits = int(ds.get("BitsStored", 8) or 8)
        except Exception as err:  # noqa: BLE001 - decoders raise many types for corrupt or unsupported data
            raise UnreadableFile(f"cannot decode the pixel data ({_reason(err, header_strings(ds))})") from err
    pixels = np.asarray(array, dtype=np.float32)
    if frames == 1:
        pixels = pixels[None]
    if samples == 1:
        pixels = pixels[..., None]
    if pixels.ndim != 4 or pixels.shape[0] != frames or pixels.shape[-1] != samples:
        raise UnreadableFile(f"unexpected pixel layout {tuple(np.shape(array))} for {frames} frame(s) of "
                             f"{samples} sample(s)")
    pixels = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
    if photometric == "MONOCHROME1":
        pixels = -pixels
    if samples == 3:
        return Decoded(pixels, kind="bits", max_value=float(2 ** min(bits, 16) - 1), modality=modality)
    return Decoded(pixels, kind="ct" if modality == "CT" else "scalar", max_value=0.0, modality=modality)


def series_groups(files: Iterable[Path]) -> Iterator[list[Path]]:
    """Group files by ``SeriesInstanceUID`` (first-seen order); a file without one is its own group.

    The UIDs stay inside this function: callers see only lists of paths.
    """
    import pydicom

    groups: dict[str, list[Path]] = {}
    for i, path in enumerate(files):
        key = f"file:{i}"
        try:
            with quiet_pydicom():
                header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            key = str(header.get("SeriesInstanceUID", "") or key)
        except Exception:  # noqa: BLE001 - unreadable files were reported by read_dicom already
            pass
        groups.setdefault(key, []).append(path)
    yield from groups.values()


def technical_summary(path: Path) -> dict[str, str | int]:
    """Non-identifying header fields for ``medfed data inspect``: an allow-list, never names, IDs, dates or UIDs."""
    import pydicom
    from pydicom._uid_dict import UID_dictionary

    with quiet_pydicom():
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return {
        "modality": code_string(ds.get("Modality")),
        "photometric": code_string(ds.get("PhotometricInterpretation")),
        "bits-stored": int(ds.get("BitsStored", 0) or 0),
        "transfer-syntax": UID_dictionary[syntax][0] if syntax in UID_dictionary else "?",
    }


def code_string(value: object) -> str:
    """A DICOM code string (``CT``, ``MONOCHROME2``) or ``?``: anything else could be free text."""
    text = str(value or "").strip()
    return text if re.fullmatch(r"[A-Z0-9 _]{1,16}", text) else "?"
