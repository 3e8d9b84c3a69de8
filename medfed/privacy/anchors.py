"""Anchors: the coordinator's memory of each site's ledger, so a site's budget cannot be rolled back.

A ledger's **head** is ``(count, hash)``: how many entries it holds and the hash of the last one. Each round a
site reports its head; the coordinator keeps the heads it saw (:class:`AnchorStore`, ``anchors.json`` next to
``sites.json``, 0600) and, before it accepts the site again, the site must show that its ledger still
**extends** the last head it saw (:func:`check_extends`): at least ``count`` entries and entry ``count - 1``
still has that hash. The hash chain makes that a check of the whole prefix. Deleting the ledger, truncating
it, or rewriting it with recomputed hashes (and even re-signing it with the site's own key) all fail it, and
:func:`check_extends` names the gap:

* ``deleted``: the ledger is gone or empty; the coordinator saw ``count`` entries,
* ``truncated``: fewer entries than the coordinator saw,
* ``rewritten``: entry ``count - 1`` has another hash; with the store's history of heads the first changed
  entry is narrowed to the entries after the last head that still matches.

Key rotation appends to the same ledger, so the anchor carries over; revoking a site keeps its anchor.

Round-time exchange (wired by the federation code): the site sends ``ledger_head(ledger)`` and the result of
``check_extends(ledger.entries(), heads)`` for the heads the coordinator sent it; the coordinator refuses a
site whose check fails and, after a round it accepted, calls ``AnchorStore.update(site, head)``.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.errors import MedfedError
from medfed.privacy.ledger import GENESIS, Ledger, LedgerEntry, signature_valid

ANCHORS_FILE = "anchors.json"


class AnchorError(MedfedError):
    """An anchor store is unreadable, or an update would move a site's anchor backwards."""


@dataclass(frozen=True)
class LedgerHead:
    """A ledger's head: ``count`` entries, the last of which has hash ``hash`` (GENESIS when empty)."""

    count: int
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "hash": self.hash}

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> LedgerHead:
        return LedgerHead(count=int(raw["count"]), hash=str(raw["hash"]))


def head_of(entries: Sequence[LedgerEntry]) -> LedgerHead:
    return LedgerHead(len(entries), entries[-1].hash if entries else GENESIS)


def ledger_head(ledger: Ledger) -> LedgerHead:
    """The head of a ledger after verifying it (chain and signatures)."""
    return head_of(ledger.entries())


@dataclass(frozen=True)
class AnchorCheck:
    """Whether a ledger still extends the head(s) the coordinator saw.

    Attributes:
        extends: True when it does.
        gap: ``""``, ``deleted``, ``truncated`` or ``rewritten``.
        first_changed: the lowest entry index that may have changed (None when it extends).
        last_changed: the highest entry index known changed (None when it extends).
        message: one line for people.
    """

    extends: bool
    gap: str
    first_changed: int | None
    last_changed: int | None
    message: str


def check_extends(entries: Sequence[LedgerEntry], heads: LedgerHead | Sequence[LedgerHead],
                  where: str = "the ledger") -> AnchorCheck:
    """Check that ``entries`` (a site's ledger, oldest first) extend the coordinator's head(s).

    ``heads`` is the last head the coordinator saw, or its whole history (oldest first): with the history a
    rewrite is located between the last head that still matches and the first that does not. ``where`` names
    the ledger in the message.
    """
    history = [heads] if isinstance(heads, LedgerHead) else sorted(heads, key=lambda h: h.count)
    history = [h for h in history if h.count > 0]
    if not history:
        return AnchorCheck(True, "", None, None, f"{where}: no anchor yet (nothing recorded by the coordinator)")
    latest = history[-1]
    if not entries:
        return AnchorCheck(False, "deleted", 0, latest.count - 1,
                           f"{where} is deleted or empty, but the coordinator saw {latest.count} entries "
                           f"(head {latest.hash[:12]}...): the site's spent budget was erased")
    matched = 0
    for h in history:
        if h.count > len(entries) or entries[h.count - 1].hash != h.hash:
            break
        matched = h.count
    if matched == latest.count:
        return AnchorCheck(True, "", None, None, f"{where} extends the coordinator's anchor ({latest.count} entries, "
                           f"head {latest.hash[:12]}...); {len(entries) - latest.count} entries since")
    first_bad = next(h for h in history if h.count > matched)
    if first_bad.count > len(entries):  # every head within the remaining entries still matches
        return AnchorCheck(False, "truncated", len(entries), latest.count - 1,
                           f"{where} is truncated: it holds {len(entries)} entries, but the coordinator saw "
                           f"{latest.count}; entries {len(entries)}..{latest.count - 1} were removed")
    last = first_bad.count - 1
    at = f"entry {matched}" if matched >= last else f"an entry between {matched} and {last}"
    if len(entries) < latest.count:
        return AnchorCheck(False, "rewritten", matched, last,
                           f"{where} is rewritten at {at} and truncated to {len(entries)} entries (the coordinator "
                           f"saw {latest.count}); the chain was rebuilt from there")
    return AnchorCheck(False, "rewritten", matched, last,
                       f"{where} is rewritten at {at}: entry {first_bad.count - 1} has hash "
                       f"{entries[first_bad.count - 1].hash[:12]}..., the coordinator saw {first_bad.hash[:12]}... "
                       "(entries changed and hashes recomputed)")


def check_ledger_against(ledger: Ledger, heads: LedgerHead | Sequence[LedgerHead],
                         where: str | None = None) -> AnchorCheck:
    """:func:`check_extends` on a ledger file as written (its chain is checked separately: a rewritten ledger
    may also fail verification, and this still names the gap)."""
    entries = ledger.unverified_entries() if ledger.path.exists() else []
    where = where or str(ledger.path)
    check = check_extends(entries, heads, where)
    if check.gap != "rewritten" or check.first_changed is None or check.last_changed is None:
        return check
    # Without the site's key a rewriter cannot re-sign: the first entry whose signature fails is where it began.
    bad = next((e.index for e in entries[check.first_changed: check.last_changed + 1]
                if not signature_valid(e.signer, e.hash, e.signature)), None)
    if bad is None or bad == check.first_changed == check.last_changed:
        return check
    return AnchorCheck(False, "rewritten", bad, bad,
                       f"{where} is rewritten at entry {bad}: its hash differs from what the coordinator saw and "
                       f"its signature does not verify (entries changed and hashes recomputed from entry {bad})")


class AnchorStore:
    """The coordinator's ``anchors.json`` (0600): per site name, the heads of its ledger it has seen.

    Format: ``{"version": 1, "sites": {name: {"heads": [{"count", "hash", "time"}, ...]}}}`` (oldest first).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"version": 1, "sites": {}}
        try:
            doc = json.loads(self.path.read_text())
            if not isinstance(doc.get("sites"), dict):
                raise TypeError("no 'sites' object")
            return doc
        except (json.JSONDecodeError, TypeError, AttributeError) as err:
            raise AnchorError(f"{self.path}: not an anchor store ({err})") from None

    def sites(self) -> list[str]:
        return sorted(self._read()["sites"])

    def history(self, site: str) -> list[LedgerHead]:
        """Every head of ``site``'s ledger the coordinator recorded, oldest first (empty if none)."""
        raw = self._read()["sites"].get(site, {}).get("heads", [])
        try:
            return [LedgerHead.from_dict(h) for h in raw]
        except (KeyError, TypeError, ValueError) as err:
            raise AnchorError(f"{self.path}: site '{site}' has a malformed head ({err})") from None

    def get(self, site: str) -> LedgerHead | None:
        """The last head recorded for ``site``, or None."""
        heads = self.history(site)
        return heads[-1] if heads else None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def update(self, site: str, head: LedgerHead) -> bool:
        """Record ``head`` for ``site`` if it moves forward; returns whether it changed anything.

        Call it only for a head whose ledger the site showed to extend the previous one (:func:`check_extends`).

        Raises:
            AnchorError: ``head`` has fewer entries than the recorded one, or as many with another hash.
        """
        with self._locked():
            doc = self._read()
            heads = doc["sites"].setdefault(site, {"heads": []})["heads"]
            if heads:
                last = LedgerHead.from_dict(heads[-1])
                if head.count < last.count or (head.count == last.count and head.hash != last.hash):
                    raise AnchorError(f"{self.path}: site '{site}' reported {head.count} entries (head "
                                      f"{head.hash[:12]}...), behind the anchor {last.count} ({last.hash[:12]}...); "
                                      "an anchor only moves forward")
                if head == last:
                    return False
            heads.append({**head.to_dict(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            tmp = self.path.with_name(self.path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, (json.dumps(doc, indent=1) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            return True
