"""The blinded export: generated (and, with the site's approval, real) images under random ids, in random order.

Layout of an export folder::

    <out>/for-raters/           everything the raters receive
        manifest.json           study id, image ids and files; nothing about any image's source
        rating-page.html        the offline rating page (images embedded)
        rating-form.csv         the same questions as a spreadsheet, one row per image
        images/<id>.png         8-bit PNGs
        dicom/<id>.dcm          DICOM Secondary Capture files for PACS viewers
        README.txt
    <out>/coordinator/
        unblinding-key.json     id -> source (synthetic/real) and class label: never give it to raters

Ids come from :mod:`secrets` and the order from :class:`secrets.SystemRandom`, so neither can be reproduced from
a seed. The folder is written under a temporary name and renamed at the end: a failed export leaves nothing.
"""

from __future__ import annotations

import csv
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medfed.clinician_review.approval import RealExportApproval
from medfed.clinician_review.secondary_capture import series_header, write_secondary_capture
from medfed.clinician_review.page import write_rating_page
from medfed.clinician_review.study import (
    QUESTIONS,
    KeyEntry,
    Manifest,
    ReviewError,
    UnblindingKey,
    check_study_id,
    file_sha256,
    new_image_ids,
    new_study_id,
    utc_now,
    write_json,
)
from medfed.datasets import NO_LABEL, ImageDataset, convert_channels, resize
from medfed.errors import DatasetError
from medfed.evaluation.memorization import images_sha256
from medfed.images import save_png, to_uint8
from medfed.progress import progress_bar

FORM_COLUMNS = ("study_id", "rater_id", "image_id", "realism", "call", "confidence", "usefulness", "comment")


@dataclass(frozen=True)
class GeneratedImages:
    """Images from medfed's generator: (N, C, H, W) float in [-1, 1], and how they were made."""

    images: torch.Tensor
    provenance: dict[str, Any] = field(default_factory=dict)


def sample_generated(checkpoint: str | Path, num: int, *, sampler: str | None = None, steps: int | None = None,
                     seed: int = 0, batch_size: int | None = None, device: str = "auto") -> GeneratedImages:
    """Sample ``num`` images from a checkpoint, exactly as ``medfed sample`` with the same arguments would."""
    from medfed.devices import resolve_device
    from medfed.diffusion import sample_images
    from medfed.generate import load_model

    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, dev)
    images = sample_images(model, ckpt.config.diffusion, num, ckpt.image_shape, device=dev, seed=seed,
                           batch_size=batch_size, sampler=sampler, steps=steps, show_progress=True)
    diffusion = ckpt.config.diffusion
    return GeneratedImages(images, {"checkpoint": str(checkpoint), "checkpoint_step": ckpt.step,
                                    "preset": ckpt.config.model.preset, "sampler": sampler or diffusion.sampler,
                                    "steps": steps or diffusion.sample_steps, "seed": seed, "batch_size": batch_size})


def read_generated_folder(folder: str | Path) -> GeneratedImages:
    """The ``*.png`` files directly in ``folder`` in name order, except ``grid.png`` (the layout ``medfed
    sample`` writes). All must have one shape."""
    from torchvision.io import ImageReadMode, decode_image

    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder of generated images does not exist")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() == ".png" and f.name != "grid.png")
    if not files:
        raise DatasetError(f"{folder}: no generated .png images found")
    pixels = []
    for f in files:
        try:
            image = decode_image(str(f), mode=ImageReadMode.UNCHANGED)
        except (RuntimeError, OSError, ValueError) as err:
            raise DatasetError(f"{f}: cannot decode image ({err})") from err
        if image.shape[0] not in (1, 3):
            image = decode_image(str(f), mode=ImageReadMode.RGB)
        if pixels and image.shape != pixels[0].shape:
            raise DatasetError(f"{f}: shape {tuple(image.shape)} differs from {tuple(pixels[0].shape)} of "
                               f"{files[0].name}")
        pixels.append(image)
    images = torch.stack(pixels).float().div(127.5).sub(1.0)
    return GeneratedImages(images, {"folder": str(folder), "files": len(files)})


@dataclass(frozen=True)
class ExportResult:
    root: Path
    study_id: str
    manifest: Path
    key: Path
    page: Path
    form: Path
    num_generated: int
    num_real: int


def distinct_image_indices(images: torch.Tensor) -> list[int]:
    """Index of the first of each set of exact duplicates in (N, C, H, W) ``images``, by the SHA-256 of their
    8-bit pixels, in order: a dataset holding one image twice must not show it to raters twice."""
    first: dict[str, int] = {}
    for i in range(len(images)):
        first.setdefault(images_sha256(images[i: i + 1]), i)
    return sorted(first.values())


def _select_real(real: ImageDataset, num_real: int, shape: tuple[int, int, int]) -> tuple[torch.Tensor, list[int]]:
    distinct = distinct_image_indices(real.images)
    if num_real > len(distinct):
        duplicates = len(real) - len(distinct)
        raise DatasetError(f"{real.name}: {num_real} real images requested but it holds {len(distinct)} distinct "
                           f"images ({len(real)} with {duplicates} exact duplicates)")
    chosen = secrets.SystemRandom().sample(distinct, num_real)
    channels, height, width = shape
    if height != width:
        raise DatasetError(f"generated images are {height}x{width}; real images can only be matched to square ones")
    images = resize(convert_channels(real.images[chosen], channels), height)
    labels = [int(real.labels[i]) for i in chosen]
    return images, labels


def _write_form(path: Path, manifest: Manifest) -> None:
    with open(path, "w", newline="", encoding="utf-8-sig") as f:  # the BOM lets Excel read UTF-8
        writer = csv.writer(f)
        writer.writerow(FORM_COLUMNS)
        for image_id in manifest.image_ids:
            writer.writerow([manifest.study_id, "", image_id, "", "", "", "", ""])


def _write_readme(path: Path, manifest: Manifest) -> None:
    lines = [f"medfed reader study {manifest.study_id}: {len(manifest.images)} images", "",
             "Rate the images in ONE of two ways:",
             "  1. Open rating-page.html in a web browser (works offline). Enter your rater ID, rate each image,",
             "     and press 'Save ratings file'. Progress is kept in the browser, so you can resume later.",
             "  2. Or fill rating-form.csv in a spreadsheet: your rater ID on every row you rate. Open the images",
             "     in images/ (PNG) or load dicom/ into your PACS viewer.", "",
             "Send the ratings file (JSON) or the filled form (CSV) to the study coordinator.", "",
             "Questions (Likert scales run from 1 to 5):"]
    for name, q in QUESTIONS.items():
        options = q.get("choices") or [f"{v} = {t}" for v, t in q.get("scale", {}).items()]
        required = "required" if q["required"] else "optional"
        lines.append(f"  {name} ({required}): {q['text']}" + (f"  [{'; '.join(map(str, options))}]" if options else ""))
    path.write_text("\n".join(lines) + "\n")


def export_study(
    out: str | Path,
    generated: GeneratedImages,
    *,
    real: ImageDataset | None = None,
    num_real: int = 0,
    approval: RealExportApproval | None = None,
    study_id: str | None = None,
    dicom: bool = True,
    show_progress: bool = True,
) -> ExportResult:
    """Write a blinded reader study of the generated images, mixed with ``num_real`` images drawn at random
    from ``real`` when the site's ``approval`` (from :func:`authorize_real_export`) covers them.

    Real images are converted to the generated images' channels and size, so size gives nothing away.

    Raises:
        ReviewError: ``out`` is not empty, or real images are asked for without a matching approval.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReviewError(f"{out}: export folder exists and is not empty (a study's key must never be overwritten)")
    study_id = check_study_id(study_id or new_study_id())
    images = generated.images
    if images.ndim != 4 or len(images) == 0:
        raise ReviewError(f"expected (N, C, H, W) generated images, got shape {tuple(images.shape)}")
    shape = (int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))
    items: list[tuple[torch.Tensor, str, int | None]] = [(im, "synthetic", None) for im in images]
    provenance: dict[str, Any] = {"generated": generated.provenance, "num_generated": len(images), "num_real": num_real}
    if num_real < 0:
        raise ReviewError(f"--num-real must be >= 0 (got {num_real})")
    if num_real:
        if approval is None or real is None:
            raise ReviewError("exporting real images needs the site's approval (authorize_real_export) and its data")
        if approval.generated_sha256 != images_sha256(images):
            raise ReviewError(f"{approval.ledger_path}: the approval covers other generated images than these")
        if approval.max_real_images is not None and num_real > approval.max_real_images:
            raise ReviewError(f"{approval.ledger_path}: the site approved at most {approval.max_real_images} real "
                              f"images; {num_real} requested")
        real_images, labels = _select_real(real, num_real, shape)
        items += [(im, "real", None if label == NO_LABEL else label) for im, label in zip(real_images, labels)]
        provenance["real"] = {"dataset": real.name, **approval.provenance()}
    secrets.SystemRandom().shuffle(items)
    ids = new_image_ids(len(items))

    partial = out.with_name(f".{out.name}.partial-{secrets.token_hex(4)}")
    raters, coordinator = partial / "for-raters", partial / "coordinator"
    try:
        (raters / "images").mkdir(parents=True)
        coordinator.mkdir()
        if dicom:
            (raters / "dicom").mkdir()
        header = series_header(study_id, blinded_mix=num_real > 0)
        png_by_id: dict[str, bytes] = {}
        entries = []
        with progress_bar(f"exporting {len(items)} images", total=len(items), enabled=show_progress) as advance:
            for position, ((image, _, _), image_id) in enumerate(zip(items, ids), start=1):
                png = raters / "images" / f"{image_id}.png"
                save_png(image, png)
                png_by_id[image_id] = png.read_bytes()
                if dicom:
                    pixels = to_uint8(image.unsqueeze(0))[0].permute(1, 2, 0).numpy()
                    write_secondary_capture(pixels[..., 0] if pixels.shape[2] == 1 else pixels,
                                            raters / "dicom" / f"{image_id}.dcm", header, position)
                entries.append({"id": image_id, "png": f"images/{image_id}.png",
                                "dicom": f"dicom/{image_id}.dcm" if dicom else None})
                advance()
        manifest = Manifest(study_id=study_id, created=utc_now(), image_shape=shape, images=tuple(entries))
        manifest_path = write_json(raters / "manifest.json", manifest.to_dict())
        key = UnblindingKey(study_id=study_id, manifest_sha256=file_sha256(manifest_path),
                            entries=tuple(KeyEntry(i, source, label) for i, (_, source, label) in zip(ids, items)),
                            provenance=provenance)
        write_json(coordinator / "unblinding-key.json", key.to_dict())
        write_rating_page(manifest, png_by_id, raters / "rating-page.html")
        _write_form(raters / "rating-form.csv", manifest)
        _write_readme(raters / "README.txt", manifest)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    raters, coordinator = out / "for-raters", out / "coordinator"
    return ExportResult(root=out, study_id=study_id, manifest=raters / "manifest.json",
                        key=coordinator / "unblinding-key.json", page=raters / "rating-page.html",
                        form=raters / "rating-form.csv", num_generated=len(images), num_real=num_real)
