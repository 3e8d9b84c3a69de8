"""A site's append-only, tamper-evident privacy ledger.

One JSON object per line. Each entry holds the SHA-256 of the previous entry, and its own hash covers its
content and that link, so editing, deleting or reordering any entry breaks the chain at that point and
:meth:`Ledger.verify` names it. The ledger is the single source of truth for what the site has spent: the
privacy accountant's history is rebuilt from its ``round`` entries.

Entry kinds:

``round``
    Budget spent in one federated round (run id, round, noise multiplier, sample rate, steps, clipping norm,
    accountant, epsilon after the round, delta, code version).
``refusal``
    A round the site declined (e.g. it would have exceeded the cap), with the reason.
``approval``
    An explicit decision by the site (e.g. to let real images leave for a clinician study).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.errors import MedfedError

GENESIS = "0" * 64
KINDS = ("round", "refusal", "approval")


class LedgerTamperedError(MedfedError):
    """The ledger's hash chain is broken: an entry was edited, removed or reordered."""


@dataclass(frozen=True)
class LedgerEntry:
    index: int
    kind: str
    time: str
    data: dict[str, Any]
    prev_hash: str
    hash: str

    def to_json(self) -> str:
        return json.dumps({"index": self.index, "kind": self.kind, "time": self.time, "data": self.data,
                           "prev_hash": self.prev_hash, "hash": self.hash}, sort_keys=True)


def entry_hash(index: int, kind: str, when: str, data: dict[str, Any], prev_hash: str) -> str:
    """SHA-256 over the canonical JSON of an entry's content and its link to the previous entry."""
    canonical = json.dumps({"index": index, "kind": kind, "time": when, "data": data, "prev_hash": prev_hash},
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class Ledger:
    """The ledger file at ``path`` (created on first append). Appends are serialised with a file lock."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def entries(self) -> list[LedgerEntry]:
        """All entries, after verifying the whole chain.

        Raises:
            LedgerTamperedError: naming the file and the first entry that does not verify.
        """
        if not self.path.exists():
            return []
        entries: list[LedgerEntry] = []
        prev = GENESIS
        for lineno, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                entry = LedgerEntry(index=raw["index"], kind=raw["kind"], time=raw["time"], data=raw["data"],
                                    prev_hash=raw["prev_hash"], hash=raw["hash"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise LedgerTamperedError(f"{self.path}: line {lineno} is not a ledger entry ({err})") from err
            if entry.index != len(entries) or entry.prev_hash != prev:
                raise LedgerTamperedError(f"{self.path}: entry {len(entries)} (line {lineno}) does not follow the "
                                          "previous entry: an entry was removed, inserted or reordered")
            if entry_hash(entry.index, entry.kind, entry.time, entry.data, entry.prev_hash) != entry.hash:
                raise LedgerTamperedError(f"{self.path}: entry {entry.index} (line {lineno}) was modified: its "
                                          "content no longer matches its hash")
            entries.append(entry)
            prev = entry.hash
        return entries

    def verify(self) -> int:
        """Check the chain; returns the number of entries."""
        return len(self.entries())

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @contextmanager
    def transaction(self) -> Iterator[LedgerTransaction]:
        """Hold the ledger's lock: read the verified entries, decide, and append, with no writer in between."""
        with self._locked():
            yield LedgerTransaction(self, self.entries())

    def append(self, kind: str, data: dict[str, Any]) -> LedgerEntry:
        """Verify the chain, then append one entry and flush it to disk."""
        with self.transaction() as tx:
            return tx.add(kind, data)

    def of_kind(self, kind: str) -> list[LedgerEntry]:
        return [e for e in self.entries() if e.kind == kind]

    def approval(self, action: str) -> LedgerEntry | None:
        """The latest approval of ``action`` (e.g. ``export-real-images``) not revoked since, or None."""
        latest = None
        for e in self.of_kind("approval"):
            if e.data.get("action") == action:
                latest = e if e.data.get("granted", True) else None
        return latest


class LedgerTransaction:
    """The verified entries of a locked ledger, and :meth:`add` to append to it (see :meth:`Ledger.transaction`)."""

    def __init__(self, ledger: Ledger, entries: list[LedgerEntry]) -> None:
        self.ledger = ledger
        self.entries = entries

    def add(self, kind: str, data: dict[str, Any]) -> LedgerEntry:
        if kind not in KINDS:
            raise ValueError(f"unknown ledger entry kind '{kind}' (one of {', '.join(KINDS)})")
        json.dumps(data)  # fail before touching the file if data is not JSON
        prev = self.entries[-1].hash if self.entries else GENESIS
        index = len(self.entries)
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        entry = LedgerEntry(index=index, kind=kind, time=when, data=data, prev_hash=prev,
                            hash=entry_hash(index, kind, when, data, prev))
        with open(self.ledger.path, "a") as f:
            f.write(entry.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(entry)
        return entry


LEDGER_FILE = "privacy-ledger.jsonl"


def site_ledger(state_dir: str | Path) -> Ledger:
    """The ledger of the site whose state folder is ``state_dir``."""
    return Ledger(Path(state_dir) / LEDGER_FILE)
