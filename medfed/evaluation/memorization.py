"""Memorization audit: does the model reproduce training images?

For every generated image we find its two nearest training images, in pixel space and in a feature network's
space. A generated image is a **near-copy** when, in pixel space, its nearest training image is closer than
``near_copy_threshold`` (default 1/3) times the distance to the second-nearest one: the criterion of Yoon et al.
(2023, "Diffusion probabilistic models generalize when they fail to memorize") and Gu et al. (2023, "On
memorization in diffusion models"). The ratio is scale-free and does not flag an image merely because the
training set is dense around it. Exact duplicates in the training set are removed first, so a copy of a
duplicated image still has a distinct second neighbour. Near-duplicates (e.g. the same patient imaged twice) can
still hide a copy: the pixel distance statistics are reported too, and the closest pairs are drawn on a sheet.

The audit is a JSON document with a fixed schema (``kind = "memorization-audit"``, ``version = 1``) that other
tools gate on (the clinician-review export). In federated runs it runs at each site against that site's own
training images, and only its numbers leave the site (:mod:`medfed.federation.evaluation`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medfed import __version__
from medfed.errors import MedfedError
from medfed.evaluation.features import FeatureNetwork, extract_features
from medfed.images import to_uint8

KIND = "memorization-audit"
VERSION = 1
DEFAULT_THRESHOLD = 1 / 3

# The fields and types every version-1 audit has; consumers may rely on them.
REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "kind": str, "version": int, "passed": bool, "near_copy_threshold": float, "near_copy_fraction": float,
    "max_near_copy_fraction": float, "num_generated": int, "num_reference": int, "generated_sha256": str,
    "feature_network": str,
}


@dataclass(frozen=True)
class Neighbours:
    """The two nearest reference rows of each query row.

    Attributes:
        nearest: (N,) distance to the nearest reference.
        second: (N,) distance to the second-nearest reference.
        index: (N,) index of the nearest reference.
    """

    nearest: torch.Tensor
    second: torch.Tensor
    index: torch.Tensor

    @property
    def ratio(self) -> torch.Tensor:
        """nearest / second (0 when both are 0); small means "much closer to one training image than to any other"."""
        return torch.where(self.second > 0, self.nearest / self.second.clamp_min(1e-12), torch.zeros_like(self.nearest))


def nearest_two(queries: torch.Tensor, reference: torch.Tensor, chunk: int = 256) -> Neighbours:
    """Euclidean two nearest neighbours of (N, D) ``queries`` among (M, D) ``reference`` rows (M >= 2)."""
    if len(reference) < 2:
        raise MedfedError(f"the memorization audit needs at least 2 reference images (got {len(reference)})")
    reference = reference.double()
    nearest, second, index = [], [], []
    for start in range(0, len(queries), chunk):
        d = torch.cdist(queries[start:start + chunk].double(), reference)
        values, idx = d.topk(2, dim=1, largest=False)
        nearest.append(values[:, 0])
        second.append(values[:, 1])
        index.append(idx[:, 0])
    return Neighbours(torch.cat(nearest), torch.cat(second), torch.cat(index))


def images_sha256(images: torch.Tensor) -> str:
    """sha256 of (N, C, H, W) images in [-1, 1] as uint8 (:func:`medfed.images.to_uint8`) contiguous bytes, in order."""
    return hashlib.sha256(to_uint8(images).contiguous().numpy().tobytes()).hexdigest()


def drop_exact_duplicates(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the first of each set of identical images (compared as uint8); returns (images, kept indices)."""
    pixels = to_uint8(images).reshape(len(images), -1).numpy()
    seen: dict[bytes, int] = {}
    keep = [seen.setdefault(row.tobytes(), i) for i, row in enumerate(pixels)]
    kept = torch.tensor(sorted(set(keep)), dtype=torch.long)
    return images[kept], kept


def summary(values: torch.Tensor) -> dict[str, float]:
    """min, 1st/5th percentile, median, mean and max of a 1-D tensor."""
    v = values.double()
    q = torch.quantile(v, torch.tensor([0.01, 0.05, 0.5], dtype=torch.float64))
    return {"min": float(v.min()), "p01": float(q[0]), "p05": float(q[1]), "median": float(q[2]),
            "mean": float(v.mean()), "max": float(v.max())}


def audit_memorization(
    generated: torch.Tensor,
    reference: torch.Tensor,
    *,
    reference_source: str,
    network: FeatureNetwork | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    max_fraction: float = 0.0,
    batch_size: int = 64,
    sheet_path: str | Path | None = None,
    sheet_pairs: int = 16,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Audit (N, C, H, W) generated images in [-1, 1] against the (M, C, H, W) training images they may copy.

    Args:
        reference_source: what the reference images are (file and split), recorded in the audit.
        network: feature network for the feature-space distances (reported, not used for the verdict); None
            skips them (``feature_network`` is then ``"none"``).
        threshold: near-copy ratio threshold (nearest / second-nearest pixel distance).
        max_fraction: the audit passes when at most this fraction of generated images are near-copies.
        sheet_path: where to draw the closest pairs (PNG); None draws nothing. The sheet shows training images:
            it stays with whoever holds the training data.

    Returns:
        The audit document (see the module docstring and :data:`REQUIRED_FIELDS`). Pixel distances are root mean
        square differences per pixel in [-1, 1] units (2.0 = black versus white everywhere).
    """
    if generated.shape[1:] != reference.shape[1:]:
        raise MedfedError(f"generated images are {tuple(generated.shape[1:])} but the reference images "
                          f"({reference_source}) are {tuple(reference.shape[1:])}; convert them to one shape")
    generated = generated.float().clamp(-1, 1)
    unique, kept = drop_exact_duplicates(reference.float())
    dim = math.prod(generated.shape[1:])
    pixel = nearest_two(generated.reshape(len(generated), -1), unique.reshape(len(unique), -1))
    ratio = pixel.ratio
    flagged = ratio < threshold
    fraction = float(flagged.double().mean())
    order = torch.argsort(ratio)
    audit: dict[str, Any] = {
        "kind": KIND,
        "version": VERSION,
        "passed": fraction <= max_fraction,
        "near_copy_threshold": float(threshold),
        "near_copy_fraction": fraction,
        "max_near_copy_fraction": float(max_fraction),
        "num_generated": int(len(generated)),
        "num_reference": int(len(unique)),
        "generated_sha256": images_sha256(generated),
        "feature_network": network.name if network is not None else "none",
        "criterion": "pixel-space nearest / second-nearest training-image distance < near_copy_threshold",
        "near_copy_count": int(flagged.sum()),
        "near_copy_indices": [int(i) for i in torch.nonzero(flagged).flatten()],
        "reference_source": reference_source,
        "reference_exact_duplicates_removed": int(len(reference) - len(unique)),
        "image_shape": list(generated.shape[1:]),
        "pixel": {"nn_rms_distance": summary(pixel.nearest / math.sqrt(dim)), "nn_ratio": summary(ratio)},
        "closest_pairs": [{"generated_index": int(i), "reference_index": int(kept[pixel.index[i]]),
                           "nn_rms_distance": float(pixel.nearest[i] / math.sqrt(dim)), "nn_ratio": float(ratio[i])}
                          for i in order[:sheet_pairs]],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "medfed_version": __version__,
    }
    if network is not None:
        gen_f = extract_features(network, generated, source="generated", batch_size=batch_size,
                                 show_progress=show_progress).features
        ref_f = extract_features(network, unique, source=reference_source, batch_size=batch_size,
                                 show_progress=show_progress).features
        feat = nearest_two(gen_f, ref_f)
        audit["feature"] = {"nn_distance": summary(feat.nearest), "nn_ratio": summary(feat.ratio),
                            "ratio_below_threshold_fraction": float((feat.ratio < threshold).double().mean())}
    if sheet_path is not None:
        pairs = order[:sheet_pairs]
        audit["closest_pairs_sheet"] = str(draw_pairs(generated[pairs], unique[pixel.index[pairs]],
                                                      [float(ratio[i]) for i in pairs], sheet_path, threshold))
    return audit


def draw_pairs(generated: torch.Tensor, reference: torch.Tensor, ratios: list[float], path: str | Path,
               threshold: float = DEFAULT_THRESHOLD, per_row: int = 4) -> Path:
    """A PNG sheet of (generated, nearest training image) pairs labelled with their distance ratio (red: near-copy)."""
    from medfed.plots import plt  # headless matplotlib, configured once there

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = max(1, len(generated))
    rows, cols = math.ceil(n / per_row), 2 * min(per_row, n)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (gen, ref, ratio) in enumerate(zip(to_uint8(generated), to_uint8(reference), ratios, strict=True)):
        r, c = divmod(i, per_row)
        for j, (img, title) in enumerate(((gen, f"generated\nratio {ratio:.2f}"), (ref, "nearest training"))):
            ax = axes[r][2 * c + j]
            pixels = img.permute(1, 2, 0).numpy()
            ax.imshow(pixels[..., 0] if pixels.shape[2] == 1 else pixels, cmap="gray", vmin=0, vmax=255)
            ax.set_title(title, fontsize=7, color="red" if ratio < threshold and j == 0 else "black")
    fig.suptitle("closest generated / training pairs (smallest nearest / second-nearest ratio first)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_audit(audit: dict[str, Any]) -> dict[str, Any]:
    """Validate a version-1 audit document's required fields and types; returns it, or raises MedfedError."""
    if audit.get("kind") != KIND or audit.get("version") != VERSION:
        raise MedfedError(f"not a {KIND} version {VERSION} document (kind={audit.get('kind')!r}, "
                          f"version={audit.get('version')!r})")
    for key, kind in REQUIRED_FIELDS.items():
        value = audit.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            expected = getattr(kind, "__name__", kind)
            raise MedfedError(f"memorization audit field '{key}' is {value!r}, expected {expected}")
    if len(audit["generated_sha256"]) != 64:
        raise MedfedError("memorization audit field 'generated_sha256' is not a sha256 hex digest")
    return audit


def write_audit(audit: dict[str, Any], path: str | Path) -> Path:
    """Write the audit as JSON (after :func:`check_audit`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(check_audit(audit), indent=2) + "\n")
    return path
