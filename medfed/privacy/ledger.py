"""A site's append-only, tamper-evident, signed privacy ledger.

One JSON object per line. Each entry holds the SHA-256 of the previous entry, and its own hash covers its
content and that link, so editing, deleting or reordering any entry breaks the chain at that point and
:meth:`Ledger.verify` names it. The ledger is the single source of truth for what the site has spent: the
privacy accountant's history is rebuilt from its ``round`` entries.

**Signatures.** Every entry is signed with the site's key: ``signer`` is the OpenSSH public key line and
``signature`` an ECDSA signature over the entry's hash. A chain rebuilt by anyone without the key (e.g. with
recomputed hashes after lowering a noise multiplier or raising an approval cap) fails verification. All entries
carry the same signer, except that after a ``key-rotation`` entry (signed by the old key, naming the new one)
the new key signs. The signing key is ``<ledger folder>/ledger-key`` (OpenSSH, 0600): at a deployed site a
symbolic link to the site's own key (``site-key``, made by ``medfed site init`` / ``medfed site start``), at a
simulated site a key of its own, created on the first append. When that key is present, the ledger's current
signer must be its public key, so a chain rebuilt and re-signed with another key fails too. The hash chain
does not cover the signatures, so signing old entries leaves every hash (and every coordinator anchor,
:mod:`medfed.privacy.anchors`) unchanged.

**Ledgers written before signing** (no ``signer``) fail verification with a message naming the migration:
``medfed privacy repair LEDGER --sign-legacy`` at the site signs them with the site's key, keeps the unsigned
original beside the ledger and records a ``repair`` entry.

**A torn last line** (a crash in the middle of an append) fails verification with a message naming
``medfed privacy repair LEDGER``, which moves the torn bytes to a sibling file (``*.torn-<time>``) and records
a ``repair`` entry with their size and SHA-256: nothing is truncated away.

Entry kinds:

``round``
    Budget spent in one federated round (run id, round, noise multiplier, sample rate, steps, clipping norm,
    accountant, epsilon after the round, delta, code version).
``refusal``
    A round the site declined (e.g. it would have exceeded the cap), with the reason.
``approval``
    An explicit decision by the site (e.g. to let real images leave for a clinician study).
``key-rotation``
    The site's key changed (``medfed site rotate-key``): ``new_signer`` signs every later entry.
``repair``
    A torn last line moved aside, or legacy entries signed (``medfed privacy repair``).

Files: the ledger and its ``.lock`` are 0600 in a 0700 folder.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medfed.errors import MedfedError

GENESIS = "0" * 64
KINDS = ("round", "refusal", "approval", "key-rotation", "repair")
LEDGER_FILE = "privacy-ledger.jsonl"
KEY_FILE = "ledger-key"
"""The ledger's signing key, in the ledger's folder (a link to ``site-key`` at a deployed site)."""
SIGNATURE_CONTEXT = b"medfed-ledger-entry-v1:"


class LedgerTamperedError(MedfedError):
    """The ledger does not verify: an entry was edited, removed, reordered, unsigned or signed by another key."""


class LedgerTornError(LedgerTamperedError):
    """The ledger's last line is incomplete (a crash during an append); ``medfed privacy repair`` fixes it."""


class LedgerUnsignedError(LedgerTamperedError):
    """The ledger holds entries written before medfed signed them; ``repair --sign-legacy`` migrates it."""


@dataclass(frozen=True)
class LedgerEntry:
    index: int
    kind: str
    time: str
    data: dict[str, Any]
    prev_hash: str
    hash: str
    signer: str = ""
    """OpenSSH public key line of the key that signed this entry ("" in ledgers from before signing)."""
    signature: str = ""
    """Base64 DER ECDSA (SHA-384) signature over ``SIGNATURE_CONTEXT + hash``."""

    def to_json(self) -> str:
        raw = {"index": self.index, "kind": self.kind, "time": self.time, "data": self.data,
               "prev_hash": self.prev_hash, "hash": self.hash}
        if self.signer:
            raw.update(signer=self.signer, signature=self.signature)
        return json.dumps(raw, sort_keys=True)


def entry_hash(index: int, kind: str, when: str, data: dict[str, Any], prev_hash: str) -> str:
    """SHA-256 over the canonical JSON of an entry's content and its link to the previous entry."""
    canonical = json.dumps({"index": index, "kind": kind, "time": when, "data": data, "prev_hash": prev_hash},
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def sign_entry_hash(key: ec.EllipticCurvePrivateKey, digest: str) -> str:
    return base64.b64encode(key.sign(SIGNATURE_CONTEXT + digest.encode(), ec.ECDSA(hashes.SHA384()))).decode()


def _public_key(signer: str) -> ec.EllipticCurvePublicKey | None:
    try:
        key = serialization.load_ssh_public_key(signer.encode())
    except (ValueError, TypeError):
        return None
    return key if isinstance(key, ec.EllipticCurvePublicKey) else None


def signature_valid(signer: str, digest: str, signature: str) -> bool:
    """Whether ``signature`` is ``signer``'s signature over the entry hash ``digest``."""
    key = _public_key(signer)
    if key is None:
        return False
    try:
        key.verify(base64.b64decode(signature, validate=True), SIGNATURE_CONTEXT + digest.encode(),
                   ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        return False
    return True


def signer_fingerprint(signer: str) -> str:
    """``SHA256:...`` of a signer (what ``ssh-keygen -lf site-key.pub`` and ``medfed site init`` print)."""
    from medfed.deploy.pki import key_fingerprint

    return key_fingerprint(signer) if signer else "unsigned"


@dataclass(frozen=True)
class _Parsed:
    entries: list[LedgerEntry]
    lines: list[int]
    """The file line number of each entry."""
    torn: bytes
    """The bytes of an incomplete last line (b"" if none)."""
    good_size: int
    """Bytes of the file before the torn line."""


def _parse(path: Path, data: bytes) -> _Parsed:
    """Entries of the ledger bytes, without any check; a last line that is not JSON is returned as torn."""
    core = data[:-1] if data.endswith(b"\n") else data
    cut = core.rfind(b"\n") + 1
    tail = data[cut:]
    torn = b""
    if tail.strip():
        try:
            json.loads(tail)
        except (json.JSONDecodeError, UnicodeDecodeError):
            torn, data = tail, data[:cut]
    entries, lines = [], []
    for lineno, line in enumerate(data.decode(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            entries.append(LedgerEntry(index=raw["index"], kind=raw["kind"], time=raw["time"], data=raw["data"],
                                       prev_hash=raw["prev_hash"], hash=raw["hash"], signer=raw.get("signer", ""),
                                       signature=raw.get("signature", "")))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise LedgerTamperedError(f"{path}: line {lineno} is not a ledger entry ({err})") from err
        lines.append(lineno)
    return _Parsed(entries, lines, torn, len(data))


def next_signer(entries: list[LedgerEntry]) -> str:
    """The key that must sign the next entry: the last signer, or the key a final ``key-rotation`` names."""
    if not entries:
        return ""
    last = entries[-1]
    return str(last.data.get("new_signer", "")) if last.kind == "key-rotation" else last.signer


def _verify(path: Path, parsed: _Parsed, trusted: str | None, *, allow_unsigned: bool = False) -> None:
    if parsed.torn:
        raise LedgerTornError(f"{path}: the last line is incomplete ({len(parsed.torn)} bytes after entry "
                              f"{len(parsed.entries) - 1}: an append was cut off, e.g. by a crash); run "
                              f"`medfed privacy repair {path}` to move it aside and record the repair")
    prev, expected = GENESIS, ""
    for position, (entry, lineno) in enumerate(zip(parsed.entries, parsed.lines)):
        where = f"{path}: entry {position} (line {lineno})"
        if entry.index != position or entry.prev_hash != prev:
            raise LedgerTamperedError(f"{where} does not follow the previous entry: an entry was removed, inserted "
                                      "or reordered")
        if entry_hash(entry.index, entry.kind, entry.time, entry.data, entry.prev_hash) != entry.hash:
            raise LedgerTamperedError(f"{where} was modified: its content no longer matches its hash")
        if not entry.signer:
            if not allow_unsigned:
                raise LedgerUnsignedError(f"{where} is not signed (written before medfed signed its ledgers); at "
                                          f"the site run `medfed privacy repair {path} --sign-legacy`")
        else:
            if expected and entry.signer != expected:
                raise LedgerTamperedError(
                    f"{where} is signed by key {signer_fingerprint(entry.signer)}, not by this ledger's key "
                    f"{signer_fingerprint(expected)}: entries were rewritten without the site's key")
            if not signature_valid(entry.signer, entry.hash, entry.signature):
                raise LedgerTamperedError(f"{where} has no valid signature by its key "
                                          f"{signer_fingerprint(entry.signer)}: the entry was rewritten (e.g. hashes "
                                          "recomputed) without the site's key")
        prev = entry.hash
        expected = next_signer([entry]) or expected
    current = next_signer(parsed.entries)
    if trusted and current and current != trusted:
        raise LedgerTamperedError(f"{path}: signed by key {signer_fingerprint(current)}, but this site's ledger key "
                                  f"is {signer_fingerprint(trusted)}: the ledger was rebuilt without the site's key "
                                  "(or the key was replaced without `medfed site rotate-key`)")


class Ledger:
    """The ledger file at ``path`` (created on first append), signed with ``key`` (default: ``ledger-key`` in
    the same folder, created for a new ledger). Appends are serialised with a file lock."""

    def __init__(self, path: str | Path, key: str | Path | None = None) -> None:
        self.path = Path(path)
        self.key_path = Path(key) if key is not None else self.path.with_name(KEY_FILE)

    def _read(self) -> _Parsed:
        data = self.path.read_bytes() if self.path.exists() else b""
        return _parse(self.path, data)

    def trusted_signer(self) -> str | None:
        """The public key of this ledger's signing key, or None where the key is not here (e.g. a copied file)."""
        if not self.key_path.exists():
            return None
        from medfed.deploy.pki import KeyFileError, load_site_private_key, load_site_public_key, openssh_public

        try:
            return openssh_public(load_site_private_key(self.key_path).public_key())
        except (KeyFileError, PermissionError):  # a reader without access to the key: its public half
            public = self.key_path.resolve().with_name(self.key_path.resolve().name + ".pub")
            return openssh_public(load_site_public_key(public)) if public.exists() else None

    def entries(self) -> list[LedgerEntry]:
        """All entries, after verifying the whole chain and every signature.

        Raises:
            LedgerTamperedError: naming the file and the first entry that does not verify
                (:class:`LedgerTornError`: an incomplete last line; :class:`LedgerUnsignedError`: legacy entries).
        """
        parsed = self._read()
        _verify(self.path, parsed, self.trusted_signer())
        return parsed.entries

    def unverified_entries(self) -> list[LedgerEntry]:
        """The entries as written, without any check (to describe a ledger that does not verify)."""
        return self._read().entries

    def verify(self) -> int:
        """Check the chain and signatures; returns the number of entries."""
        return len(self.entries())

    @contextmanager
    def _locked(self) -> Iterator[None]:
        folder = self.path.parent
        if not folder.exists():
            folder.mkdir(parents=True, mode=0o700)
            folder.chmod(0o700)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _signing_key(self, entries: list[LedgerEntry]) -> ec.EllipticCurvePrivateKey:
        from medfed.deploy.pki import create_site_key, load_site_private_key

        if not self.key_path.exists():
            if entries:
                raise LedgerTamperedError(f"{self.key_path}: the signing key of {self.path} is missing; without it "
                                          "no entry can be added (restore it, or link the site's key there)")
            create_site_key(self.key_path, comment=f"medfed ledger {self.path.parent.name}")
        return load_site_private_key(self.key_path)

    @contextmanager
    def transaction(self) -> Iterator[LedgerTransaction]:
        """Hold the ledger's lock: read the verified entries, decide, and append, with no writer in between."""
        with self._locked():
            entries = self.entries()
            yield LedgerTransaction(self, entries, lambda: self._signing_key(entries))

    def append(self, kind: str, data: dict[str, Any]) -> LedgerEntry:
        """Verify the chain, then append one signed entry and flush it to disk."""
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

    def __init__(self, ledger: Ledger, entries: list[LedgerEntry], key: Any) -> None:
        self.ledger = ledger
        self.entries = entries
        self._key_loader = key
        self._key: ec.EllipticCurvePrivateKey | None = None

    def add(self, kind: str, data: dict[str, Any]) -> LedgerEntry:
        if kind not in KINDS:
            raise ValueError(f"unknown ledger entry kind '{kind}' (one of {', '.join(KINDS)})")
        json.dumps(data)  # fail before touching the file if data is not JSON
        if self._key is None:
            self._key = self._key_loader()
        from medfed.deploy.pki import openssh_public

        signer = openssh_public(self._key.public_key())
        expected = next_signer(self.entries)
        if expected and signer != expected:
            raise LedgerTamperedError(f"{self.ledger.key_path}: key {signer_fingerprint(signer)} is not the key that "
                                      f"signs {self.ledger.path} ({signer_fingerprint(expected)})")
        prev = self.entries[-1].hash if self.entries else GENESIS
        index = len(self.entries)
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        digest = entry_hash(index, kind, when, data, prev)
        entry = LedgerEntry(index=index, kind=kind, time=when, data=data, prev_hash=prev, hash=digest,
                            signer=signer, signature=sign_entry_hash(self._key, digest))
        _append_line(self.ledger.path, entry.to_json())
        self.entries.append(entry)
        return entry


def _append_line(path: Path, line: str) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)
        size = os.fstat(fd).st_size
        ends_open = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        os.write(fd, (("\n" if ends_open else "") + line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


@dataclass(frozen=True)
class RepairResult:
    """What :func:`repair_ledger` did: the evidence files it kept and the ``repair`` entries it recorded."""

    torn_bytes: int
    torn_evidence: Path | None
    signed_legacy: int
    unsigned_original: Path | None
    entries: tuple[LedgerEntry, ...]


def repair_ledger(ledger: Ledger, *, sign_legacy: bool = False) -> RepairResult:
    """Repair what a crash or an upgrade leaves, keeping the evidence; everything else must still verify.

    * A torn last line: its bytes move to ``<ledger>.torn-<UTC time>`` (0600) and a ``repair`` entry records
      their size and SHA-256 and the entry they followed.
    * With ``sign_legacy``: entries written before medfed signed its ledgers are signed with the ledger's key
      (hashes unchanged); the unsigned original is kept as ``<ledger>.unsigned-<UTC time>`` and a ``repair``
      entry records how many entries were signed.

    Raises:
        LedgerTamperedError: anything else fails (an edited, removed or foreign-signed entry), or unsigned
            entries remain without ``sign_legacy``.
    """
    path = ledger.path
    if not path.exists():
        raise MedfedError(f"{path}: no privacy ledger there")
    with ledger._locked():
        data = path.read_bytes()
        parsed = _parse(path, data)
        good = replace(parsed, torn=b"")
        _verify(path, good, ledger.trusted_signer(), allow_unsigned=sign_legacy)
        unsigned = [e for e in parsed.entries if not e.signer]
        if unsigned and unsigned[-1].index >= len(unsigned):
            raise LedgerTamperedError(f"{path}: entry {unsigned[-1].index} is unsigned but follows signed entries: "
                                      "it was added without the site's key, not written before signing")
        key = ledger._signing_key([] if len(unsigned) == len(parsed.entries) else parsed.entries)
        from medfed.deploy.pki import openssh_public

        signer = openssh_public(key.public_key())
        recorded: list[LedgerEntry] = []
        torn_file = unsigned_file = None
        stamp = _stamp()
        entries = list(parsed.entries)
        if parsed.torn:
            torn_file = path.with_name(f"{path.name}.torn-{stamp}")
            _write_private(torn_file, parsed.torn)
            with open(path, "r+b") as f:
                f.truncate(parsed.good_size)
                f.flush()
                os.fsync(f.fileno())
        if unsigned:
            if next_signer(entries) not in ("", signer):
                raise LedgerTamperedError(f"{path}: signed entries use another key than {ledger.key_path}; cannot "
                                          "sign the legacy entries with it")
            unsigned_file = path.with_name(f"{path.name}.unsigned-{stamp}")
            _write_private(unsigned_file, path.read_bytes())
            entries = [e if e.signer else replace(e, signer=signer, signature=sign_entry_hash(key, e.hash))
                       for e in entries]
            tmp = path.with_name(path.name + ".tmp")
            tmp.unlink(missing_ok=True)
            _write_private(tmp, "".join(e.to_json() + "\n" for e in entries).encode())
            os.replace(tmp, path)
        tx = LedgerTransaction(ledger, entries, lambda: key)
        if torn_file is not None:
            recorded.append(tx.add("repair", {
                "action": "moved-torn-line", "torn_bytes": len(parsed.torn),
                "torn_sha256": hashlib.sha256(parsed.torn).hexdigest(), "evidence": torn_file.name,
                "after_entry": len(parsed.entries) - 1}))
        if unsigned_file is not None:
            recorded.append(tx.add("repair", {
                "action": "signed-legacy-entries", "entries": len(unsigned), "original": unsigned_file.name,
                "original_sha256": hashlib.sha256(unsigned_file.read_bytes()).hexdigest()}))
    return RepairResult(torn_bytes=len(parsed.torn), torn_evidence=torn_file, signed_legacy=len(unsigned),
                        unsigned_original=unsigned_file, entries=tuple(recorded))


def site_ledger(state_dir: str | Path) -> Ledger:
    """The ledger of the site whose state folder is ``state_dir`` (signed with ``<state_dir>/ledger-key``)."""
    return Ledger(Path(state_dir) / LEDGER_FILE)


def link_site_key(state_dir: str | Path, private_key: str | Path) -> Path:
    """Make a deployed site's own key (``site-key``) the signing key of its ledger: ``<state_dir>/ledger-key``
    becomes a symbolic link to it (so ``medfed site rotate-key`` carries over). Idempotent.

    Raises:
        MedfedError: ``ledger-key`` already exists and is another key.
    """
    link = Path(state_dir) / KEY_FILE
    target = Path(private_key).expanduser().resolve()
    if link.is_symlink() or link.exists():
        if link.resolve() == target:
            return link
        if not link.exists():  # a dangling link (the site folder moved): point it at the key again
            link.unlink()
        else:
            raise MedfedError(f"{link}: the ledger's signing key is not the site's key {target}; a ledger signed with "
                              "another key cannot be continued with this one (move the state folder aside, or rotate "
                              "keys with `medfed site rotate-key`)")
    link.symlink_to(target)
    return link
