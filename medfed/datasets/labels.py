"""Class labels of a site folder: from subfolder names or from a ``file,label`` CSV."""

from __future__ import annotations

import csv
from pathlib import Path

from medfed.config import DataConfig
from medfed.datasets.core import NO_LABEL
from medfed.errors import DatasetError


def labels_source(cfg: DataConfig, fmt: str) -> str:
    """``subfolders``, ``csv`` or ``none`` for ``data.labels`` with format ``fmt`` (``auto`` resolved)."""
    if cfg.labels != "auto":
        return cfg.labels
    if cfg.labels_csv:
        return "csv"
    return "subfolders" if fmt == "folder" else "none"


def labels_csv_path(cfg: DataConfig, root: Path) -> Path | None:
    """The labels CSV, a relative path looked up in the site's data folder first; None when unused."""
    if not cfg.labels_csv:
        return None
    given = Path(cfg.labels_csv).expanduser()
    folder = root if root.is_dir() else root.parent
    return given if given.is_absolute() or not (folder / given).exists() else folder / given


def read_labels_csv(path: Path) -> dict[str, str]:
    """``{relative file path: label}`` from a CSV with a ``file,label`` header.

    Raises:
        DatasetError: missing file, no such columns, or an empty label, naming the CSV (and the line).
    """
    if not path.is_file():
        raise DatasetError(f"{path}: labels CSV (data.labels-csv) does not exist")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"file", "label"} <= {n.strip() for n in reader.fieldnames}:
            raise DatasetError(f"{path}: labels CSV needs a 'file,label' header (found: "
                               f"{','.join(reader.fieldnames or []) or 'nothing'})")
        table: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            if not row["file"] or not row["label"]:
                raise DatasetError(f"{path}:{line}: empty file or label")
            table[Path(row["file"]).as_posix()] = row["label"]
    return table


def label_names(cfg: DataConfig, fmt: str, root: Path, files: list[Path]) -> list[str | None]:
    """Each file's class name, or None where it has none."""
    source = labels_source(cfg, fmt)
    if source == "none" or not root.is_dir():
        return [None] * len(files)
    relative = [f.relative_to(root) for f in files]
    if source == "subfolders":
        return [r.parts[0] if len(r.parts) > 1 else None for r in relative]
    csv_path = labels_csv_path(cfg, root)
    assert csv_path is not None  # validate() requires labels-csv with labels = csv
    table = read_labels_csv(csv_path)
    return [table.get(r.as_posix()) for r in relative]


def label_indices(names: list[str | None], classes: tuple[str, ...], where: Path) -> list[int]:
    """Class indices for ``names``: by ``data.classes`` when given, else integers as they are, else sorted names.

    Raises:
        DatasetError: a name not in ``data.classes``, naming ``where``.
    """
    found = sorted({n for n in names if n is not None})
    if classes:
        order = list(classes)
        unknown = [n for n in found if n not in order]
        if unknown:
            raise DatasetError(f"{where}: labels {', '.join(unknown[:5])} are not in data.classes "
                               f"({', '.join(order)})")
        index = {c: i for i, c in enumerate(order)}
    elif found and all(n.lstrip("-").isdigit() for n in found):
        index = {n: int(n) for n in found}
    else:
        index = {n: i for i, n in enumerate(found)}
    return [NO_LABEL if n is None else index[n] for n in names]
