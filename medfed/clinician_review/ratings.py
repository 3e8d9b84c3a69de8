"""Reading raters' files (the page's JSON or the CSV form), validated against the study's manifest.

Every problem is reported as one line naming the file and the row (CSV: the line number in the file; JSON: the
position in its ``ratings`` list): unknown image ids, a rating given twice by one rater, scores out of range,
a missing rater id, a file from another study. Rows of the CSV form left entirely blank are images not rated.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medfed.clinician_review.study import (
    CALLS,
    FORMAT_VERSION,
    QUESTIONS,
    RATINGS_KIND,
    TABLE_KIND,
    Manifest,
    ReviewError,
    file_sha256,
    read_json,
    utc_now,
    write_json,
)

ANSWER_FIELDS = ("realism", "call", "confidence", "usefulness", "comment")


@dataclass(frozen=True)
class Rating:
    """One rater's answers for one image. Likert scores are 1-5; ``usefulness`` is None when not given."""

    rater_id: str
    image_id: str
    realism: int
    call: str
    confidence: int
    usefulness: int | None
    comment: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _likert(value: object, name: str, where: str) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if QUESTIONS[name]["required"]:
            raise ReviewError(f"{where}: '{name}' is missing")
        return None
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    low, high = min(QUESTIONS[name]["scale"]), max(QUESTIONS[name]["scale"])
    if not number.is_integer() or not low <= number <= high:
        raise ReviewError(f"{where}: '{name}' must be a whole number from {low} to {high}, got {value!r}")
    return int(number)


def _rating(answers: dict[str, Any], rater_id: object, image_id: object, manifest: Manifest, where: str) -> Rating:
    rater = str(rater_id or "").strip()
    if not rater:
        raise ReviewError(f"{where}: the rater id is missing")
    image = str(image_id or "").strip()
    if not image:
        raise ReviewError(f"{where}: the image id is missing")
    if image not in manifest.image_ids:
        raise ReviewError(f"{where}: unknown image id '{image}' (not in study {manifest.study_id}'s manifest)")
    call = str(answers.get("call") or "").strip().lower()
    if not call:
        raise ReviewError(f"{where}: 'call' is missing")
    if call not in CALLS:
        raise ReviewError(f"{where}: 'call' must be {' or '.join(CALLS)}, got {answers.get('call')!r}")
    comment = answers.get("comment")
    return Rating(rater_id=rater, image_id=image, realism=_likert(answers.get("realism"), "realism", where),
                  call=call, confidence=_likert(answers.get("confidence"), "confidence", where),
                  usefulness=_likert(answers.get("usefulness"), "usefulness", where),
                  comment="" if comment is None else str(comment).strip())


def _check_study(found: object, manifest: Manifest, where: str) -> None:
    if found not in (None, "") and str(found).strip() != manifest.study_id:
        raise ReviewError(f"{where}: ratings are for study '{found}', but the manifest is study '{manifest.study_id}'")


def read_csv_ratings(path: Path, manifest: Manifest) -> list[Rating]:
    """Ratings from a CSV form (comma, semicolon or tab separated; columns as in ``rating-form.csv``)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ReviewError(f"{path}: cannot read ratings CSV ({err})") from err
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:  # spreadsheets on Windows save "CSV" in the ANSI code page unless told UTF-8
            text = data.decode("cp1252")
        except UnicodeDecodeError as err:
            raise ReviewError(f"{path}: ratings CSV is neither UTF-8 nor Windows-1252 text ({err})") from err
    first = text.splitlines()[0] if text.strip() else ""
    delimiter = max((",", ";", "\t"), key=first.count)
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in ("rater_id", "image_id", "realism", "call", "confidence") if c not in columns]
    if missing:
        raise ReviewError(f"{path}: ratings CSV lacks the column(s) {', '.join(missing)} "
                          f"(expected the columns of rating-form.csv)")
    ratings = []
    for raw in reader:
        where = f"{path}: line {reader.line_num}"
        if None in raw and any(str(cell).strip() for cell in raw[None]):  # DictReader's key for extra cells
            raise ReviewError(f"{where}: has more cells than the header has columns (a comma in a comment "
                              "needs quotes)")
        row = {k.strip(): v for k, v in raw.items() if k is not None}
        if not any(str(row.get(f) or "").strip() for f in ANSWER_FIELDS):
            continue  # an image this rater left unrated
        _check_study(row.get("study_id"), manifest, where)
        ratings.append(_rating(row, row.get("rater_id"), row.get("image_id"), manifest, where))
    return ratings


def read_json_ratings(path: Path, manifest: Manifest) -> list[Rating]:
    """Ratings from the file the rating page saves (kind ``medfed-review-ratings``)."""
    payload = read_json(path, RATINGS_KIND, "ratings file")
    _check_study(payload.get("study_id"), manifest, str(path))
    rater = payload.get("rater_id")
    entries = payload.get("ratings")
    if not isinstance(entries, list):
        raise ReviewError(f"{path}: 'ratings' must be a list")
    ratings = []
    for number, entry in enumerate(entries, start=1):
        where = f"{path}: rating {number}"
        if not isinstance(entry, dict):
            raise ReviewError(f"{where}: must be an object")
        ratings.append(_rating(entry, entry.get("rater_id", rater), entry.get("image_id"), manifest, where))
    return ratings


def read_ratings_file(path: str | Path, manifest: Manifest) -> list[Rating]:
    """Ratings from one ``.csv`` or ``.json`` file, validated against ``manifest``."""
    path = Path(path)
    if not path.is_file():
        raise ReviewError(f"{path}: ratings file does not exist")
    if path.suffix.lower() == ".csv":
        return read_csv_ratings(path, manifest)
    if path.suffix.lower() == ".json":
        return read_json_ratings(path, manifest)
    raise ReviewError(f"{path}: ratings must be a .csv form or the rating page's .json file")


@dataclass(frozen=True)
class RatingsTable:
    """Every rater's ratings of one study, checked: known ids, one rating per (rater, image)."""

    study_id: str
    manifest_sha256: str
    ratings: tuple[Rating, ...]
    sources: tuple[dict[str, Any], ...] = ()

    @property
    def raters(self) -> list[str]:
        return sorted({r.rater_id for r in self.ratings})

    def to_dict(self) -> dict[str, Any]:
        return {"kind": TABLE_KIND, "version": FORMAT_VERSION, "study_id": self.study_id,
                "manifest_sha256": self.manifest_sha256, "imported": utc_now(), "raters": self.raters,
                "sources": list(self.sources), "ratings": [r.to_dict() for r in self.ratings]}


def import_ratings(paths: list[str | Path], manifest: Manifest) -> RatingsTable:
    """Read and validate every file; a (rater, image) pair rated twice, in one file or across files, is an error.

    Raises:
        ReviewError: naming the file and row of the first problem.
    """
    if not paths:
        raise ReviewError("no ratings files given")
    seen: dict[tuple[str, str], str] = {}
    ratings: list[Rating] = []
    sources = []
    for path in map(Path, paths):
        file_ratings = read_ratings_file(path, manifest)
        for number, rating in enumerate(file_ratings, start=1):
            pair = (rating.rater_id, rating.image_id)
            if pair in seen:
                raise ReviewError(f"{path}: rater '{rating.rater_id}' rated image {rating.image_id} again "
                                  f"(entry {number}; first in {seen[pair]})")
            seen[pair] = str(path)
        ratings += file_ratings
        sources.append({"file": path.name, "sha256": file_sha256(path), "ratings": len(file_ratings),
                        "raters": sorted({r.rater_id for r in file_ratings})})
    if not ratings:
        raise ReviewError(f"no ratings found in {', '.join(str(p) for p in paths)}")
    return RatingsTable(study_id=manifest.study_id, manifest_sha256=manifest.sha256, ratings=tuple(ratings),
                        sources=tuple(sources))


def write_ratings_table(table: RatingsTable, path: str | Path) -> Path:
    return write_json(path, table.to_dict())


def read_ratings_table(path: str | Path) -> RatingsTable:
    payload = read_json(path, TABLE_KIND, "imported ratings table")
    try:
        ratings = tuple(Rating(**{k: r[k] for k in Rating.__dataclass_fields__}) for r in payload["ratings"])
        return RatingsTable(study_id=str(payload["study_id"]), manifest_sha256=str(payload["manifest_sha256"]),
                            ratings=ratings, sources=tuple(payload.get("sources") or ()))
    except (KeyError, TypeError) as err:
        raise ReviewError(f"{path}: imported ratings table has a malformed rating ({err})") from err


def describe(table: RatingsTable, manifest_size: int) -> list[str]:
    """One line per rater: how many of the study's images they rated."""
    counts: dict[str, int] = {}
    for r in table.ratings:
        counts[r.rater_id] = counts.get(r.rater_id, 0) + 1
    return [f"{rater}: {n} of {manifest_size} images rated" for rater, n in sorted(counts.items())]
