"""The one site-folder loader: a hospital's PNG/JPEG, DICOM or NIfTI files as an :class:`ImageDataset`.

Steps, each a small function: find the files (recursively; hidden files, the labels CSV and the cache are not
data) → decode each with MONAI (optionally cached by MONAI's PersistentDataset) → normalise intensities per
DICOM series / NIfTI volume / picture → NIfTI slice range and empty-slice filter → channels, pad to square and
resize (MONAI SpatialPad, Resize) → one (N, C, H, W) tensor in [-1, 1] with labels.

A bad file is handled by ``data.on-error``: ``fail`` raises :class:`DatasetError` naming it, ``skip`` leaves it
out and logs it. Either way the problem surfaces while the site loads its data, before any training starts.
"""

from __future__ import annotations

import itertools
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medfed.config import DataConfig
from medfed.datasets import dicom, intensity, nifti
from medfed.datasets.core import ImageDataset, convert_channels
from medfed.datasets.decoded import Decoded, NotAnImage, UnreadableFile
from medfed.datasets.labels import label_indices, label_names, labels_csv_path
from medfed.datasets.pictures import PICTURE_SUFFIXES, read_picture
from medfed.datasets.sources import existing_path
from medfed.errors import DatasetError
from medfed.progress import progress_bar

FORMATS = {"folder": "PNG/JPEG", "dicom": "DICOM", "nifti": "NIfTI"}
"""``data.dataset`` names of site folders and the file type each reads."""

CACHE_VERSION = "medfed-decode-1"
"""Part of every cache key: bump it when decoding changes so stale cache entries are not reused."""

log = logging.getLogger(__name__)
# MONAI warns for every image it loads on machines without nvImageCodec (an optional GPU DICOM decoder);
# pydicom decodes instead, so the warning says nothing a site can act on.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)


@dataclass(frozen=True)
class LeftOut:
    """A file the loader did not use, and why (the reason never quotes a header value)."""

    file: Path
    reason: str


@dataclass(frozen=True)
class SiteFolder:
    """A loaded site folder.

    Attributes:
        dataset: the images.
        skipped: bad files left out under ``data.on-error = skip``.
        ignored: files that hold no image (a DICOMDIR, a report), always left out.
    """

    dataset: ImageDataset
    skipped: tuple[LeftOut, ...]
    ignored: tuple[LeftOut, ...]


@dataclass
class ErrorPolicy:
    """``data.on-error`` applied file by file: raise at the first bad file, or collect them."""

    skip: bool
    skipped: list[LeftOut] = field(default_factory=list)

    def bad_file(self, file: Path, reason: str) -> None:
        if not self.skip:
            raise DatasetError(f"{file}: {reason} (data.on-error=skip leaves such files out)")
        self.skipped.append(LeftOut(file, reason))


def load_site_folder(cfg: DataConfig, fmt: str) -> ImageDataset:
    """:func:`read_site_folder`, logging a warning that lists every skipped file."""
    folder = read_site_folder(cfg, fmt)
    if folder.skipped:
        log.warning("%s: left out %d bad file(s) (data.on-error=skip):\n%s", cfg.path, len(folder.skipped),
                    "\n".join(f"  {s.file}: {s.reason}" for s in folder.skipped))
    return folder.dataset


def read_site_folder(cfg: DataConfig, fmt: str) -> SiteFolder:
    """Load the ``fmt`` files under ``cfg.path`` (a folder, or one DICOM/NIfTI/picture file).

    Args:
        cfg: ``path``, ``image-size``, ``channels`` and the DICOM/NIfTI/label/error settings of ``DataConfig``.
        fmt: ``folder`` (PNG/JPEG/TIFF/BMP), ``dicom`` or ``nifti``.

    Raises:
        DatasetError: missing or empty folder, no usable image, or (``on-error = fail``) the first bad file.
        (A bad ``ct-window`` or ``nifti-slices`` is a ConfigError when ``cfg`` is built.)
    """
    root = existing_path(cfg.path, f"{FORMATS[fmt]} folder")
    candidates, others = find_files(root, fmt, not_data(cfg, root))
    if not candidates and not others:
        raise DatasetError(f"{root}: empty folder (no files)")
    policy = ErrorPolicy(skip=cfg.on_error == "skip")
    for other in others:
        policy.bad_file(other.file, other.reason)
    names = dict(zip(candidates, label_names(cfg, fmt, root, candidates)))

    # One group (DICOM series, or file) at a time, so raw pixels of only one series are held at once.
    groups = list(dicom.series_groups(candidates)) if fmt == "dicom" else [[path] for path in candidates]
    stream = decode_files([path for group in groups for path in group], fmt, cfg)
    fitted: dict[Path, torch.Tensor] = {}
    ignored: list[LeftOut] = []
    for group in groups:
        decoded: dict[Path, Decoded] = {}
        for path, result in itertools.islice(stream, len(group)):
            if isinstance(result, NotAnImage):
                ignored.append(LeftOut(path, str(result)))
            elif isinstance(result, UnreadableFile):
                policy.bad_file(path, str(result))
            else:
                decoded[path] = result
        for path, frames in normalise(decoded, cfg).items():
            if fmt == "nifti":
                frames = select_slices(path, frames, cfg, policy)
            if frames is not None:
                fitted[path] = fit(frames, cfg)
    fitted = keep_common_shape(fitted, policy)
    if not fitted:
        left_out = policy.skipped[0] if policy.skipped else (ignored[0] if ignored else None)
        detail = f"; e.g. {left_out.file}: {left_out.reason}" if left_out else ""
        raise DatasetError(f"{root}: no usable {FORMATS[fmt]} image among {len(candidates) + len(others)} "
                           f"file(s) ({len(policy.skipped)} bad, {len(ignored)} without an image){detail}")

    files = sorted(fitted)
    indices = dict(zip(files, label_indices([names[f] for f in files], cfg.class_names, root)))
    images = torch.cat([fitted[f] for f in files])
    labels = torch.cat([torch.full((len(fitted[f]),), indices[f], dtype=torch.long) for f in files])
    name = f"{FORMATS[fmt]} folder '{root.name}' ({len(images)} images from {len(files)} files)"
    return SiteFolder(ImageDataset(images.contiguous(), labels, name), tuple(policy.skipped), tuple(ignored))


def not_data(cfg: DataConfig, root: Path) -> list[Path]:
    """Paths under the data folder that are settings, not data: the labels CSV and the decode cache."""
    paths = [labels_csv_path(cfg, root)]
    if cfg.cache_dir:
        paths.append(Path(cfg.cache_dir).expanduser())
    return [p.resolve() for p in paths if p is not None]


def find_files(root: Path, fmt: str, exclude: list[Path]) -> tuple[list[Path], list[LeftOut]]:
    """Files ``fmt`` should read, and the other (non-hidden) files, each with the reason it is not data.

    DICOM files are recognised when read (PACS exports often have no suffix), so every file is a DICOM candidate.
    """
    if root.is_file():
        return [root], []
    candidates, others = [], []
    for path in sorted(root.rglob("*")):
        parts = path.relative_to(root).parts
        if not path.is_file() or any(p.startswith(".") for p in parts):
            continue
        resolved = path.resolve()
        if any(resolved == e or e in resolved.parents for e in exclude):
            continue
        if fmt == "dicom" or (fmt == "nifti" and nifti.is_nifti(path)) or (
                fmt == "folder" and path.suffix.lower() in PICTURE_SUFFIXES):
            candidates.append(path)
        else:
            others.append(LeftOut(path, f"not a {FORMATS[fmt]} file (unexpected file type)"))
    return candidates, others


def decode(path: Path, fmt: str, cfg: DataConfig) -> Decoded:
    """Raw frames of one file (raises :class:`UnreadableFile` or :class:`NotAnImage`)."""
    if fmt == "dicom":
        return dicom.read_dicom(path)
    if fmt == "nifti":
        return nifti.read_nifti(path, cfg.nifti_axis, cfg.nifti_volume)
    return read_picture(path)


def decode_files(files: list[Path], fmt: str, cfg: DataConfig) -> Iterator[tuple[Path, Decoded | Exception]]:
    """Decode each file; with ``data.cache-dir`` through MONAI's PersistentDataset, so later rounds skip decoding.

    Yields ``(path, Decoded)``, or ``(path, UnreadableFile | NotAnImage)`` for a file that cannot be used.
    """
    from monai.data import PersistentDataset
    from monai.transforms import Compose, Transform

    class DecodeFile(Transform):
        """MONAI transform: a cache item (path + settings) -> decoded frames as cacheable tensors."""

        def __call__(self, item: dict) -> dict:
            d = decode(Path(item["path"]), fmt, cfg)
            return {"frames": torch.from_numpy(d.frames), "kind": d.kind, "max_value": d.max_value,
                    "modality": d.modality}

    cached = None
    if cfg.cache_dir:
        items = [cache_item(path, fmt, cfg) for path in files]
        cached = PersistentDataset(items, transform=Compose([DecodeFile()]), cache_dir=cfg.cache_dir)
    show = sys.stderr.isatty() and len(files) >= 100
    with progress_bar(f"reading {FORMATS[fmt]} files", total=len(files), enabled=show) as advance:
        for i, path in enumerate(files):
            try:
                if cached is None:
                    yield path, decode(path, fmt, cfg)
                else:
                    out = cached[i]
                    yield path, Decoded(np.asarray(out["frames"]), out["kind"], out["max_value"], out["modality"])
            except Exception as err:  # noqa: BLE001 - MONAI wraps transform errors in RuntimeError
                problem = file_problem(err)
                if problem is None:
                    raise
                yield path, problem
            advance()


def cache_item(path: Path, fmt: str, cfg: DataConfig) -> dict[str, str]:
    """A PersistentDataset item; its hash is the cache key, so it holds everything decoding depends on."""
    stat = path.stat()
    settings = f"{fmt}:{cfg.nifti_axis}:{cfg.nifti_volume}" if fmt == "nifti" else fmt
    return {"path": str(path.resolve()), "stamp": f"{stat.st_size}:{stat.st_mtime_ns}", "settings": settings,
            "version": CACHE_VERSION}


def file_problem(err: BaseException | None) -> UnreadableFile | NotAnImage | None:
    """The :class:`UnreadableFile` or :class:`NotAnImage` in ``err``'s chain of causes, if any."""
    while err is not None and not isinstance(err, (UnreadableFile, NotAnImage)):
        err = err.__cause__
    return err


def normalise(group: dict[Path, Decoded], cfg: DataConfig) -> dict[Path, np.ndarray]:
    """Frames of one group (a DICOM series, a NIfTI volume, a picture) in [-1, 1]; percentiles span the group."""
    by_method: dict[tuple[str, float], list[Path]] = {}
    for path, d in group.items():
        by_method.setdefault((intensity.method_for(d.kind, cfg.intensity), d.max_value), []).append(path)
    out: dict[Path, np.ndarray] = {}
    for (method, max_value), paths in by_method.items():
        low, high = intensity.value_range([group[p].frames for p in paths], method, cfg, max_value)
        for path in paths:
            out[path] = intensity.to_unit_range(group[path].frames, low, high)
    return out


def select_slices(path: Path, frames: np.ndarray, cfg: DataConfig, policy: ErrorPolicy) -> np.ndarray | None:
    """NIfTI: the ``data.nifti-slices`` of one volume's normalised slices that have enough foreground."""
    kept = frames[list(cfg.slices.indices(len(frames)))]
    if cfg.nifti_min_foreground > 0 and len(kept):
        kept = kept[nifti.foreground_fraction(kept) >= cfg.nifti_min_foreground]
    if len(kept):
        return kept
    policy.bad_file(path, f"no slice left of {len(frames)} along axis {cfg.nifti_axis} after data.nifti-slices="
                          f"'{cfg.nifti_slices}' and data.nifti-min-foreground={cfg.nifti_min_foreground:g}")
    return None


def fit(frames: np.ndarray, cfg: DataConfig) -> torch.Tensor:
    """(F, C, H, W) in [-1, 1] → ``data.channels`` channels; with ``data.image-size``, padded to a square with
    background (-1) and resized (MONAI SpatialPad, Resize)."""
    from monai.transforms import Resize, SpatialPad

    x = convert_channels(torch.from_numpy(frames), cfg.channels)
    size = cfg.image_size
    if size <= 0:
        return x
    f, c, h, w = x.shape
    flat = x.reshape(f * c, h, w)
    if h != w:
        flat = SpatialPad(spatial_size=(max(h, w),) * 2, method="symmetric", mode="constant", value=-1.0)(flat)
    if flat.shape[-1] != size:
        # Area averaging when shrinking (MONAI's anti_aliasing smooths with zero padding, which lifts the -1
        # background at the borders); bilinear when enlarging.
        mode = "area" if flat.shape[-1] > size else "bilinear"
        flat = Resize(spatial_size=(size, size), mode=mode)(flat)
    flat = flat.as_tensor() if hasattr(flat, "as_tensor") else flat
    return flat.reshape(f, c, size, size).clamp(-1.0, 1.0).float()


def keep_common_shape(images: dict[Path, torch.Tensor], policy: ErrorPolicy) -> dict[Path, torch.Tensor]:
    """Every image must end up with one (C, H, W) shape (``data.image-size`` and ``data.channels`` convert them):
    files of another shape are bad files."""
    shapes = Counter(tuple(t.shape[1:]) for t in images.values())
    if len(shapes) <= 1:
        return images
    common = shapes.most_common(1)[0][0]
    out = {}
    for path, frames in images.items():
        shape = tuple(frames.shape[1:])
        if shape == common:
            out[path] = frames
        else:
            policy.bad_file(path, f"image shape {shape_text(shape)} differs from the folder's common "
                                  f"{shape_text(common)}; set data.image-size (and data.channels) to convert all")
    return out


def shape_text(shape: tuple[int, ...]) -> str:
    """(C, H, W) as ``HxW`` plus the channel count, e.g. ``128x128 (1 channel)``."""
    c, h, w = shape
    return f"{h}x{w} ({c} channel{'s' if c != 1 else ''})"
