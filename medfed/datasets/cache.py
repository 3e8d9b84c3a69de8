"""A deployed site's decoded-data cache: decode the hospital's files once, not on every Flower message.

In a deployment every message (SecAgg+ stage, query, training) starts a fresh ClientApp process. Without a cache
each one decodes the site's whole DICOM/NIfTI/PNG folder again. The cache keeps the decoded pixels and labels
(nothing else: no header, no file name) in the site's own state folder (``<state-dir>/data-cache``, 0700, files
0600), keyed by the data settings and the size and modification time of every source file, so a changed,
added or removed file is decoded afresh. Only the newest entry is kept. Each decode is logged in
``decodes.jsonl`` beside it (time and key only), which is how an operator (and the tests) can see how often the
site really decoded its data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from medfed.config import DataConfig
from medfed.datasets.core import ImageDataset
from medfed.datasets.loading import load_dataset

CACHE_DIR = "data-cache"
DECODE_LOG = "decodes.jsonl"


def source_fingerprint(path: Path) -> list[tuple[str, int, int]]:
    """(relative name, size, mtime in ns) of every file under ``path`` (or of ``path`` itself), sorted."""
    path = path.expanduser()
    if path.is_file():
        st = path.stat()
        return [(path.name, st.st_size, st.st_mtime_ns)]
    out = []
    for root, _dirs, files in os.walk(path, followlinks=False):
        for name in files:
            full = Path(root) / name
            try:
                st = full.stat()
            except OSError:  # a dangling link: part of the key by name, so fixing it invalidates the cache
                out.append((str(full.relative_to(path)), -1, -1))
                continue
            out.append((str(full.relative_to(path)), st.st_size, st.st_mtime_ns))
    return sorted(out)


def cache_key(cfg: DataConfig, seed: int) -> str:
    """SHA-256 over the data settings, the seed and the source files' names, sizes and modification times."""
    doc = {"config": dataclasses.asdict(cfg), "seed": seed,
           "files": source_fingerprint(Path(cfg.path)) if cfg.path else []}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def load_cached(cfg: DataConfig, seed: int, state_dir: Path | None) -> ImageDataset:
    """The site's dataset from its cache, or decoded with :func:`load_dataset` (and cached) when the cache is
    missing or stale. Without a state folder it always decodes."""
    if state_dir is None:
        return load_dataset(cfg, seed=seed)
    folder = _private_dir(Path(state_dir) / CACHE_DIR)
    key = cache_key(cfg, seed)
    entry = folder / f"{key}.npz"
    if entry.is_file():
        try:
            with np.load(entry, allow_pickle=False) as z:
                return ImageDataset(torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]), str(z["name"]),
                                    tuple(str(c) for c in z["classes"]))
        except (OSError, ValueError, KeyError):
            entry.unlink(missing_ok=True)  # torn or foreign: decode again
    data = load_dataset(cfg, seed=seed)
    tmp = folder / f".{key}.{os.getpid()}.tmp.npz"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        np.savez(f, images=data.images.numpy(), labels=data.labels.numpy(), name=np.array(data.name),
                 classes=np.array(data.classes, dtype=str))
    os.replace(tmp, entry)
    for old in folder.glob("*.npz"):
        if old != entry:
            old.unlink(missing_ok=True)
    fd = os.open(folder / DECODE_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as log:
        log.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "key": key, "images": len(data)}) + "\n")
    return data


def decode_count(state_dir: Path) -> int:
    """How many times the site decoded its data into the cache (lines of ``decodes.jsonl``)."""
    log = Path(state_dir) / CACHE_DIR / DECODE_LOG
    return len(log.read_text().splitlines()) if log.is_file() else 0
