"""``medfed data inspect``: what a site's folder holds, before it joins a federation.

Counts per format, image shapes, intensity ranges, DICOM modalities and series counts, NIfTI volume shapes,
orientations and slice counts, class labels from subfolders, and every path that cannot be used with the reason
(unreadable files, files without an image, dangling links, hidden and other files). It never raises for a bad
file: each becomes an entry with its reason. It reads the same way the loaders do, so a
file listed as unreadable here is one ``data.on-error`` would act on. From DICOM headers it reports only an
allow-list of technical fields (:func:`medfed.datasets.dicom.technical_summary`); never names, IDs, dates, UIDs,
institutions or physicians.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from medfed.config import DataConfig
from medfed.datasets import dicom, nifti
from medfed.datasets.decoded import NotAnImage, UnreadableFile
from medfed.datasets.pictures import PICTURE_SUFFIXES, read_picture
from medfed.datasets.sources import existing_path
from medfed.progress import progress_bar

Report = dict[str, Any]


def file_format(path: Path) -> str | None:
    """``nifti``, ``picture``, ``npz``, ``dicom`` or None (not a file medfed reads)."""
    name = path.name.lower()
    if nifti.is_nifti(path):
        return "nifti"
    if name.endswith(PICTURE_SUFFIXES):
        return "picture"
    if name.endswith(".npz"):
        return "npz"
    return "dicom" if dicom.looks_like_dicom(path) else None


def data_files(root: Path) -> list[Path]:
    """``root`` itself, or every non-hidden file under it."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def skipped_paths(root: Path) -> list[Report]:
    """What :func:`data_files` leaves out under ``root``, with the reason: dangling symbolic links, hidden
    files and folders, and anything that is neither a file nor a folder."""
    if not root.is_dir():
        return []
    out: list[Report] = []
    for p in sorted(root.rglob("*")):
        parts = p.relative_to(root).parts
        if any(part.startswith(".") for part in parts[:-1]):
            continue  # inside a hidden folder, which is listed itself
        if p.name.startswith("."):
            reason = "hidden (names starting with '.' are never read)"
        elif p.is_symlink() and not p.exists():
            reason = f"dangling symbolic link (target {os.readlink(p)} does not exist)"
        elif not p.is_file() and not p.is_dir():
            reason = "not a regular file"
        else:
            continue
        out.append({"file": p.relative_to(root).as_posix(), "reason": reason})
    return out


def frame_stats(frames: np.ndarray) -> Report:
    """Count, (H, W) shape, channels and value range of decoded (F, C, H, W) frames."""
    f, c, h, w = frames.shape
    return {"images": f, "range": [float(frames.min()), float(frames.max())], "shapes": f"{h}x{w}",
            "channels": str(c)}


def describe_dicom(path: Path) -> Report:
    return {**frame_stats(dicom.read_dicom(path).frames), **dicom.technical_summary(path)}


def describe_nifti(path: Path) -> Report:
    """A NIfTI file's slices along the default ``data.nifti-axis`` (before ``nifti-slices`` and the foreground
    filter), value range, volume shape, orientation and voxel size."""
    import nibabel as nib

    voxels = nifti.read_volume(path)  # UnreadableFile for anything nibabel cannot read
    image = nib.load(path)
    axis = DataConfig().nifti_axis
    return {"images": int(voxels.shape[axis]), "range": [float(voxels.min()), float(voxels.max())],
            "volumes": "x".join(str(s) for s in image.shape),
            "orientation": "".join(nib.aff2axcodes(image.affine)),
            "voxel-mm": "x".join(f"{z:g}" for z in image.header.get_zooms()[:3])}


def describe_picture(path: Path) -> Report:
    decoded = read_picture(path)
    bits = {255.0: "8", 65535.0: "16"}.get(decoded.max_value, "float")
    return {**frame_stats(decoded.frames), "bit-depth": bits}


def describe_npz(path: Path) -> Report:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files if k == "images" or k.endswith("_images")}
    except Exception as err:  # noqa: BLE001 - numpy raises many types for corrupt files
        raise UnreadableFile(f"not a readable .npz archive ({type(err).__name__})") from err
    if not arrays or not all(v.size for v in arrays.values()):
        raise UnreadableFile("no (non-empty) 'images' or '<split>_images' array")
    return {"images": sum(len(v) for v in arrays.values()),
            "range": [min(float(v.min()) for v in arrays.values()), max(float(v.max()) for v in arrays.values())],
            "arrays": [f"{k}: {v.shape[0]} x {'x'.join(str(s) for s in v.shape[1:])} {v.dtype}"
                       for k, v in arrays.items()]}


DESCRIBE = {"dicom": describe_dicom, "nifti": describe_nifti, "picture": describe_picture, "npz": describe_npz}


def inspect_path(path: str | Path, *, show_progress: bool = False) -> Report:
    """A JSON-ready report of the files under ``path`` (see the module doc for what it holds and never holds).

    Raises:
        DatasetError: ``path`` does not exist.
    """
    root = existing_path(str(path), "path to inspect")
    files = data_files(root)
    report: Report = {"path": str(root), "files": len(files), "formats": {}, "unreadable": [], "not-images": [],
                      "other-files": [], "skipped": skipped_paths(root)}
    readable_dicom: list[Path] = []
    with progress_bar("inspecting files", total=len(files), enabled=show_progress) as advance:
        for file in files:
            relative = file.name if root.is_file() else file.relative_to(root).as_posix()
            fmt = file_format(file)
            if fmt is None:
                report["other-files"].append(relative)
            else:
                try:
                    described = DESCRIBE[fmt](file)
                except NotAnImage as err:
                    report["not-images"].append({"file": relative, "reason": str(err)})
                except UnreadableFile as err:
                    report["unreadable"].append({"file": relative, "format": fmt, "reason": str(err)})
                except Exception as err:  # noqa: BLE001 - a bad file is a finding, never a crash
                    reason = (str(err).strip().splitlines() or [""])[0][:200]
                    report["unreadable"].append({"file": relative, "format": fmt,
                                                 "reason": f"{type(err).__name__}: {reason}".rstrip(": ")})
                else:
                    if fmt == "picture" and len(Path(relative).parts) > 1:  # data.labels = auto: subfolders
                        described["labels (subfolders)"] = Path(relative).parts[0]
                    add(report["formats"].setdefault(fmt, {"files": 0, "images": 0}), described)
                    if fmt == "dicom":
                        readable_dicom.append(file)
            advance()
    if readable_dicom:
        try:
            report["formats"]["dicom"]["series"] = sum(1 for _ in dicom.series_groups(readable_dicom))
        except Exception as err:  # noqa: BLE001 - grouping reads headers again; report, never crash
            report["formats"]["dicom"]["series"] = f"unknown ({type(err).__name__})"
    return report


def usable_images(report: Report) -> int:
    """2D images (NIfTI: slices) a loader could use from the inspected path."""
    return sum(int(stats.get("images", 0)) for stats in report["formats"].values())


def add(stats: Report, described: Report) -> None:
    """Fold one file's description into its format's running statistics (values are counted)."""
    stats["files"] += 1
    stats["images"] += described.pop("images")
    low, high = described.pop("range")
    old = stats.get("range", [low, high])
    stats["range"] = [min(old[0], low), max(old[1], high)]
    for key, value in described.items():
        counts = stats.setdefault(key, {})
        for text in value if isinstance(value, list) else [str(value)]:
            counts[text] = counts.get(text, 0) + 1


def render_text(report: Report) -> str:
    """The report as lines for a terminal."""
    lines = [f"{report['path']}: {report['files']} file(s)"]
    for fmt, stats in report["formats"].items():
        head = f"  {fmt}: {stats['files']} file(s)"
        if stats.get("images"):
            kind = f"slice(s) along axis {DataConfig().nifti_axis}" if fmt == "nifti" else "2D image(s)"
            head += f", {stats['images']} {kind}"
        if "series" in stats:
            head += f", {stats['series']} series"
        low, high = stats["range"]
        lines.append(f"{head}, intensity {low:g} .. {high:g}")
        for key, counts in stats.items():
            if isinstance(counts, dict):
                top = Counter(counts).most_common(6)
                more = f" (+{len(counts) - 6} more)" if len(counts) > 6 else ""
                lines.append(f"    {key}: " + ", ".join(f"{v} ({n})" for v, n in top) + more)
    if report["not-images"]:
        lines.append(f"  without an image (always left out): {len(report['not-images'])}")
        lines += [f"    {e['file']}: {e['reason']}" for e in report["not-images"]]
    if report["unreadable"]:
        lines.append(f"  unreadable: {len(report['unreadable'])}")
        lines += [f"    {e['file']} ({e['format']}): {e['reason']}" for e in report["unreadable"]]
    if report["other-files"]:
        shown = report["other-files"][:20]
        more = f" (+{len(report['other-files']) - 20} more)" if len(report["other-files"]) > 20 else ""
        lines.append(f"  other files (not read by medfed): {len(report['other-files'])}: {', '.join(shown)}{more}")
    if report.get("skipped"):
        lines.append(f"  skipped: {len(report['skipped'])}")
        lines += [f"    {e['file']}: {e['reason']}" for e in report["skipped"]]
    return "\n".join(lines)
