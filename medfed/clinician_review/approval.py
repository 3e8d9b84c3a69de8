"""The site-approval gate for real images: they leave a site only with its recorded approval and a passed audit.

A site approves with ``medfed review approve``, which appends an ``approval`` entry for the action
``export-real-images`` to the site's hash-chained, signed privacy ledger, naming who approved, the SHA-256 of the
memorization audit they read, and the most real images they allow. The audit itself is produced by
``medfed evaluate memorization`` (``medfed.evaluation``); this module only reads its JSON contract::

    {"kind": "memorization-audit", "version": 1, "passed": bool, "near_copy_threshold": float,
     "near_copy_fraction": float, "max_near_copy_fraction": float, "num_generated": int,
     "num_reference": int, "generated_sha256": hex, "feature_network": str, ...}

where ``generated_sha256`` is :func:`medfed.evaluation.memorization.images_sha256` of the audited images.
:func:`authorize_real_export` checks every link of that chain before an export may include real images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medfed.clinician_review.study import ReviewError, file_sha256
from medfed.errors import MedfedError
from medfed.evaluation.memorization import check_audit, images_sha256
from medfed.privacy.ledger import Ledger, LedgerEntry, LedgerTamperedError, site_ledger

EXPORT_ACTION = "export-real-images"


@dataclass(frozen=True)
class MemorizationAudit:
    """The fields of an audit file this gate relies on; ``sha256`` is the file's own hash."""

    path: Path
    sha256: str
    passed: bool
    near_copy_fraction: float
    max_near_copy_fraction: float
    num_generated: int
    generated_sha256: str
    feature_network: str


def read_audit(path: str | Path) -> MemorizationAudit:
    """Read and check a memorization audit file.

    Raises:
        ReviewError: missing file, not JSON, wrong kind or a missing field, naming the file and field.
    """
    path = Path(path)
    if not path.is_file():
        raise ReviewError(f"{path}: memorization audit file does not exist (run `medfed evaluate memorization`)")
    try:
        payload: Any = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReviewError(f"{path}: memorization audit is not valid JSON ({err})") from err
    if not isinstance(payload, dict):
        raise ReviewError(f"{path}: not a memorization audit (a JSON object is expected)")
    try:
        check_audit(payload)
    except MedfedError as err:
        raise ReviewError(f"{path}: {err}") from err
    return MemorizationAudit(path=path, sha256=file_sha256(path), passed=payload["passed"],
                             near_copy_fraction=float(payload["near_copy_fraction"]),
                             max_near_copy_fraction=float(payload["max_near_copy_fraction"]),
                             num_generated=int(payload["num_generated"]),
                             generated_sha256=str(payload["generated_sha256"]),
                             feature_network=str(payload.get("feature_network", "unknown")))


def _require_passed(audit: MemorizationAudit) -> None:
    if not audit.passed:
        raise ReviewError(f"{audit.path}: the memorization audit did not pass (near-copy fraction "
                          f"{audit.near_copy_fraction:.4g} > allowed {audit.max_near_copy_fraction:.4g}); real "
                          "images may not leave the site")


def _existing_state_dir(state_dir: str | Path) -> Path:
    path = Path(state_dir)
    if not path.is_dir():
        raise ReviewError(f"{path}: site state folder does not exist (the folder holding the site's privacy ledger)")
    return path


def approve_real_export(state_dir: str | Path, audit_path: str | Path, by: str, max_real_images: int | None = None,
                        note: str = "") -> LedgerEntry:
    """Record in the site's ledger that ``by`` lets up to ``max_real_images`` real images (None: no cap) leave
    the site for a reader study whose generated images passed the audit at ``audit_path``."""
    state = _existing_state_dir(state_dir)
    if not by.strip():
        raise ReviewError("--by: the approving person's name must not be empty")
    if max_real_images is not None and max_real_images < 1:
        raise ReviewError(f"--max-real must be at least 1 (got {max_real_images}); to withdraw, revoke instead")
    audit = read_audit(audit_path)
    _require_passed(audit)
    return site_ledger(state).append("approval", {
        "action": EXPORT_ACTION, "granted": True, "by": by.strip(), "audit_sha256": audit.sha256,
        "max_real_images": max_real_images, "note": note,
    })


def revoke_real_export(state_dir: str | Path, by: str, note: str = "") -> LedgerEntry:
    """Record that the site withdraws its approval; later exports with real images are refused."""
    ledger = site_ledger(_existing_state_dir(state_dir))
    if ledger.approval(EXPORT_ACTION) is None:
        raise ReviewError(f"{ledger.path}: no active approval to export real images; nothing to revoke")
    if not by.strip():
        raise ReviewError("--by: the revoking person's name must not be empty")
    return ledger.append("approval", {"action": EXPORT_ACTION, "granted": False, "by": by.strip(), "note": note})


def _verified_approval(ledger: Ledger) -> LedgerEntry | None:
    """The site's latest export decision, from a ledger whose chain and signatures verify against the site's own
    key: an approval rewritten or forged without that key (e.g. a raised cap with recomputed hashes) is refused."""
    if ledger.path.exists() and ledger.trusted_signer() is None:
        raise ReviewError(f"{ledger.key_path}: the site's ledger key is not in its state folder, so the approval's "
                          "signature cannot be checked; export real images at the site")
    try:
        return ledger.approval(EXPORT_ACTION)
    except LedgerTamperedError as err:
        raise LedgerTamperedError(f"real images may not leave the site: its approval cannot be trusted, because "
                                  f"{err}") from None


@dataclass(frozen=True)
class RealExportApproval:
    """Proof that a site allowed real images to leave for these generated images; made only by
    :func:`authorize_real_export`, required by the export."""

    ledger_path: Path
    entry_index: int
    entry_hash: str
    approved_by: str
    approved_at: str
    audit_sha256: str
    generated_sha256: str
    max_real_images: int | None

    def provenance(self) -> dict[str, Any]:
        """What the unblinding key records about the approval (no site data)."""
        return {"ledger_entry": self.entry_index, "ledger_entry_hash": self.entry_hash,
                "approved_by": self.approved_by, "approved_at": self.approved_at,
                "audit_sha256": self.audit_sha256, "max_real_images": self.max_real_images}


def authorize_real_export(state_dir: str | Path | None, audit_path: str | Path | None, generated: torch.Tensor,
                          num_real: int) -> RealExportApproval:
    """Check that ``num_real`` real images may be exported beside the (N, C, H, W) ``generated`` images.

    The site's ledger must verify (hash chain intact, every entry signed by the site's key), its latest ``export-real-images`` decision must be an
    approval, that approval must name this audit file's SHA-256, the audit must have passed, it must have
    audited exactly these generated images, and ``num_real`` must not exceed the approved maximum.

    Raises:
        ReviewError: naming the first missing or failing link.
        LedgerTamperedError: the site's ledger was edited or its approval forged (the reason is named).
    """
    if state_dir is None:
        raise ReviewError("exporting real images needs --state-dir: the site's state folder whose privacy ledger "
                          "records the approval")
    if audit_path is None:
        raise ReviewError("exporting real images needs --audit: the memorization audit of these generated images "
                          "(`medfed evaluate memorization`)")
    ledger = site_ledger(_existing_state_dir(state_dir))
    entry = _verified_approval(ledger)
    if entry is None:
        revoked = any(e.data.get("action") == EXPORT_ACTION for e in ledger.of_kind("approval"))
        why = "its approval was revoked" if revoked else "it records no approval"
        raise ReviewError(f"{ledger.path}: the site has not approved exporting real images ({why}); the site runs "
                          "`medfed review approve --state-dir ... --audit ... --by NAME`")
    audit = read_audit(audit_path)
    if entry.data.get("audit_sha256") != audit.sha256:
        raise ReviewError(f"{audit.path}: this audit (sha256 {audit.sha256[:12]}...) is not the one the site "
                          f"approved in {ledger.path} entry {entry.index} (sha256 "
                          f"{str(entry.data.get('audit_sha256'))[:12]}...)")
    _require_passed(audit)
    generated_sha = images_sha256(generated)
    if audit.generated_sha256 != generated_sha or audit.num_generated != len(generated):
        raise ReviewError(f"{audit.path}: the audit covers other generated images than the {len(generated)} being "
                          "exported (generated_sha256 differs); audit these images and have the site approve again")
    cap = entry.data.get("max_real_images")
    if cap is not None and num_real > int(cap):
        raise ReviewError(f"{ledger.path}: the site approved at most {cap} real images (entry {entry.index}); "
                          f"{num_real} requested")
    return RealExportApproval(ledger_path=ledger.path, entry_index=entry.index, entry_hash=entry.hash,
                              approved_by=str(entry.data.get("by", "")), approved_at=entry.time,
                              audit_sha256=audit.sha256, generated_sha256=generated_sha,
                              max_real_images=None if cap is None else int(cap))
