"""The files of a reader study: the raters' manifest, the coordinator's unblinding key, and the questions.

The manifest goes to raters and says nothing about where an image came from: only random ids and file names.
The unblinding key stays with the study coordinator and maps each id to its source (``synthetic`` or ``real``)
and class label. Both carry the study id; the key also holds the SHA-256 of the manifest it belongs to.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.errors import MedfedError

MANIFEST_KIND = "medfed-review-manifest"
KEY_KIND = "medfed-review-key"
RATINGS_KIND = "medfed-review-ratings"
TABLE_KIND = "medfed-review-ratings-table"
FORMAT_VERSION = 1

SOURCES = ("real", "synthetic")
CALLS = ("real", "synthetic")
POSITIVE_CLASS = "synthetic"

QUESTIONS: dict[str, dict[str, Any]] = {
    "realism": {
        "text": "How realistic is this image?",
        "required": True,
        "scale": {1: "clearly artificial", 2: "probably artificial", 3: "undecided", 4: "probably real",
                  5: "indistinguishable from a real image"},
    },
    "call": {
        "text": "Is this a real or a synthetic (AI-generated) image?",
        "required": True,
        "choices": list(CALLS),
    },
    "confidence": {
        "text": "How confident are you in your real/synthetic call?",
        "required": True,
        "scale": {1: "guessing", 2: "slightly", 3: "moderately", 4: "quite", 5: "certain"},
    },
    "usefulness": {
        "text": "Diagnostic usefulness: could you read this image clinically?",
        "required": False,
        "scale": {1: "not usable", 2: "poor", 3: "limited", 4: "good", 5: "fully diagnostic"},
    },
    "comment": {"text": "Comment", "required": False},
}
"""What a rater answers for each image. Likert scales run 1-5; ``usefulness`` and ``comment`` may be blank."""

STUDY_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")


class ReviewError(MedfedError):
    """A review file (manifest, key, ratings, audit) is missing or malformed, or an export is not allowed."""


def new_study_id() -> str:
    """A random study id such as ``study-3f9a0c1e``."""
    return f"study-{secrets.token_hex(4)}"


def new_image_ids(count: int) -> list[str]:
    """``count`` distinct random image ids such as ``img-7c01d2aa`` (letters first, so spreadsheets keep them
    as text rather than reading ``12e45`` as a number)."""
    ids: set[str] = set()
    while len(ids) < count:
        ids.add(f"img-{secrets.token_hex(4)}")
    return list(ids)


def check_study_id(study_id: str) -> str:
    if not STUDY_ID_PATTERN.match(study_id):
        raise ReviewError(f"study id '{study_id}' must be 1-40 letters, digits, '.', '_' or '-' and start with a "
                          "letter or digit")
    return study_id


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write JSON atomically (temporary file, then rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | Path, kind: str, what: str) -> dict[str, Any]:
    """Read a JSON object whose ``kind`` field is ``kind``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ReviewError(f"{path}: {what} does not exist")
    try:
        payload = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReviewError(f"{path}: {what} is not valid JSON ({err})") from err
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        found = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
        raise ReviewError(f"{path}: not a {what} (kind is {found!r}, expected '{kind}')")
    if payload.get("version") != FORMAT_VERSION:
        raise ReviewError(f"{path}: {what} version {payload.get('version')!r} is not supported "
                          f"(this medfed reads version {FORMAT_VERSION})")
    return payload


@dataclass(frozen=True)
class Manifest:
    """What raters receive: the study id, image ids in presentation order and their files (relative paths).

    Attributes:
        image_shape: (C, H, W) of every image.
        images: one ``{"id", "png", "dicom"}`` per image (``dicom`` is None when no DICOM was written).
        sha256: SHA-256 of the manifest file as read (empty for a manifest not yet written).
    """

    study_id: str
    created: str
    image_shape: tuple[int, int, int]
    images: tuple[dict[str, str | None], ...]
    sha256: str = ""

    @property
    def image_ids(self) -> list[str]:
        return [str(im["id"]) for im in self.images]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": MANIFEST_KIND, "version": FORMAT_VERSION, "study_id": self.study_id,
                "created": self.created, "image_shape": list(self.image_shape), "num_images": len(self.images),
                "questions": QUESTIONS, "images": list(self.images)}


def read_manifest(path: str | Path) -> Manifest:
    payload = read_json(path, MANIFEST_KIND, "review manifest")
    try:
        images = tuple({"id": str(im["id"]), "png": im.get("png"), "dicom": im.get("dicom")}
                       for im in payload["images"])
        manifest = Manifest(study_id=str(payload["study_id"]), created=str(payload.get("created", "")),
                            image_shape=tuple(int(v) for v in payload["image_shape"]),  # type: ignore[arg-type]
                            images=images, sha256=file_sha256(path))
    except (KeyError, TypeError, ValueError) as err:
        raise ReviewError(f"{path}: review manifest is missing or has a malformed field ({err})") from err
    if len(set(manifest.image_ids)) != len(manifest.images):
        raise ReviewError(f"{path}: review manifest lists an image id twice")
    return manifest


@dataclass(frozen=True)
class KeyEntry:
    """The truth about one image: ``source`` is ``synthetic`` or ``real``; ``label`` the class, None if unknown."""

    id: str
    source: str
    label: int | None


@dataclass(frozen=True)
class UnblindingKey:
    """The study coordinator's key (never given to raters).

    Attributes:
        manifest_sha256: SHA-256 of the manifest file written with this key.
        provenance: how the images were made (generator settings; for real images the site approval used).
    """

    study_id: str
    manifest_sha256: str
    entries: tuple[KeyEntry, ...]
    provenance: dict[str, Any]

    def by_id(self) -> dict[str, KeyEntry]:
        return {e.id: e for e in self.entries}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KEY_KIND, "version": FORMAT_VERSION, "study_id": self.study_id,
                "manifest_sha256": self.manifest_sha256, "positive_class": POSITIVE_CLASS,
                "provenance": self.provenance,
                "images": [{"id": e.id, "source": e.source, "label": e.label} for e in self.entries]}


def read_key(path: str | Path) -> UnblindingKey:
    payload = read_json(path, KEY_KIND, "unblinding key")
    try:
        entries = tuple(KeyEntry(id=str(e["id"]), source=str(e["source"]),
                                 label=None if e.get("label") is None else int(e["label"]))
                        for e in payload["images"])
        key = UnblindingKey(study_id=str(payload["study_id"]), manifest_sha256=str(payload["manifest_sha256"]),
                            entries=entries, provenance=dict(payload.get("provenance") or {}))
    except (KeyError, TypeError, ValueError) as err:
        raise ReviewError(f"{path}: unblinding key is missing or has a malformed field ({err})") from err
    bad = [e.id for e in key.entries if e.source not in SOURCES]
    if bad:
        raise ReviewError(f"{path}: image {bad[0]} has a source other than {' or '.join(SOURCES)}")
    return key
