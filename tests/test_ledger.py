"""A privacy budget that cannot be rolled back: signed ledger entries, coordinator anchors, torn-line repair,
forged approvals, key rotation and content-keyed simulated budgets. Real keys, real files, real CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
from typer.testing import CliRunner

from medfed.cli import app
from medfed.clinician_review.approval import approve_real_export, authorize_real_export
from medfed.deploy.pki import create_site_key, load_site_private_key
from medfed.evaluation.memorization import images_sha256
from medfed.privacy.anchors import AnchorError, AnchorStore, LedgerHead, check_extends, check_ledger_against, \
    ledger_head
from medfed.privacy.ledger import (KEY_FILE, LedgerTamperedError, LedgerTornError, LedgerUnsignedError, entry_hash,
                                   repair_ledger, sign_entry_hash, site_ledger)
from medfed.privacy.report import from_ledger, write_report


def mode(path):
    return path.stat().st_mode & 0o777


def ledger_with_rounds(state, n=4, site="hospital-a"):
    ledger = site_ledger(state)
    for r in range(1, n + 1):
        ledger.append("round", {"site": site, "run_id": 1, "run_name": "r", "round": r, "noise_multiplier": 1.2,
                                "sample_rate": 0.1, "steps": 10, "max_grad_norm": 1.0, "accountant": "rdp",
                                "epsilon": 0.5 * r, "delta": 1e-5, "cap_epsilon": 10.0})
    return ledger


def rewrite(ledger, at, change, key=None, drop_signatures=False):
    """Change entry ``at`` and recompute every later hash (what someone editing the file would do); re-sign with
    ``key`` if given (someone else's key), else keep the stale signatures or drop them."""
    raw = [json.loads(line) for line in ledger.path.read_text().splitlines()]
    change(raw[at]["data"])
    prev = raw[at - 1]["hash"] if at else "0" * 64
    for e in raw[at:]:
        e["prev_hash"] = prev
        e["hash"] = prev = entry_hash(e["index"], e["kind"], e["time"], e["data"], prev)
    for e in raw if key is not None else raw[at:]:
        if key is not None:
            from medfed.deploy.pki import openssh_public

            e["signer"], e["signature"] = openssh_public(key.public_key()), sign_entry_hash(key, e["hash"])
        elif drop_signatures:
            e.pop("signer"), e.pop("signature")
    ledger.path.write_text("".join(json.dumps(e) + "\n" for e in raw))


def test_entries_are_signed_and_files_are_private(tmp_path):
    ledger = ledger_with_rounds(tmp_path / "state", 2)
    entries = ledger.entries()
    assert all(e.signer.startswith("ecdsa-sha2-nistp384 ") and e.signature for e in entries)
    assert mode(tmp_path / "state") == 0o700
    for f in (ledger.path, ledger.path.with_name(ledger.path.name + ".lock"), tmp_path / "state" / KEY_FILE):
        assert mode(f) == 0o600, f


@pytest.mark.parametrize("how", ["stale-signatures", "unsigned", "other-key"])
def test_a_chain_rebuilt_without_the_site_key_fails_verification(tmp_path, how):
    ledger = ledger_with_rounds(tmp_path / "state")
    other = load_site_private_key(create_site_key(tmp_path / "attacker-key", "x").private)

    def raise_noise(data):
        data["noise_multiplier"] = 50.0  # epsilon of every round would be recomputed near 0

    if how == "other-key":  # the whole chain rebuilt and re-signed, consistently, with another key
        rewrite(ledger, 0, raise_noise, key=other)
        match = "rebuilt without the site's key"
    else:
        rewrite(ledger, 1, raise_noise, drop_signatures=how == "unsigned")
        match = "entry 1 .* not signed" if how == "unsigned" else "entry 1 .*no valid signature"
    with pytest.raises(LedgerTamperedError, match=match):
        ledger.verify()
    with pytest.raises(LedgerTamperedError):  # and nothing can be appended on top of it
        ledger.append("round", {"round": 9})


def anchored(tmp_path, n=4):
    ledger = ledger_with_rounds(tmp_path / "state", n)
    store = AnchorStore(tmp_path / "server" / "anchors.json")
    for i in range(1, n + 1):  # the coordinator saw the head after every round
        entries = ledger.entries()[:i]
        store.update("hospital-a", LedgerHead(i, entries[-1].hash))
    return ledger, store


@pytest.mark.parametrize("attack,gap", [("truncate", "truncated: it holds 2 entries, but the coordinator saw 4"),
                                        ("delete", "deleted or empty, but the coordinator saw 4 entries"),
                                        ("rewrite", "rewritten at entry 2"),
                                        ("rewrite-resigned", "rewritten at entry 2")])
def test_verify_with_anchors_names_the_gap(tmp_path, attack, gap):
    ledger, store = anchored(tmp_path)
    assert check_ledger_against(ledger, store.history("hospital-a")).extends
    lines = ledger.path.read_text().splitlines(keepends=True)
    if attack == "truncate":
        ledger.path.write_text("".join(lines[:2]))
    elif attack == "delete":
        ledger.path.unlink()
    elif attack == "rewrite":
        rewrite(ledger, 2, lambda d: d.update(noise_multiplier=50.0))
    else:  # even the site itself, re-signing with its own key, cannot hide a rewrite from the anchors
        rewrite(ledger, 2, lambda d: d.update(noise_multiplier=50.0),
                key=load_site_private_key(tmp_path / "state" / KEY_FILE))
    check = check_ledger_against(ledger, store.history("hospital-a"))
    assert not check.extends and gap in check.message
    result = CliRunner().invoke(app, ["privacy", "verify", str(tmp_path / "state"), "--anchors",
                                      str(store.path), "--site", "hospital-a"])
    assert result.exit_code != 0 and gap in str(result.exception)
    # the privacy report shows the anchor check next to the chain check, and exits non-zero
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["privacy", "report", "--site", str(tmp_path / "state"), "--site-name",
                                      "hospital-a", "--anchors", str(store.path), "--out", str(out)])
    assert result.exit_code != 0 and gap in str(result.exception)
    page = (out / "privacy-report.html").read_text()
    assert "coordinator anchor" in page and "ledger chain" in page and gap in page
    chain_ok = attack in ("truncate", "rewrite-resigned")
    assert ("intact: 2 entries" in page) if attack == "truncate" else (("intact" in page) == chain_ok)


def test_verify_with_anchors_passes_on_a_ledger_that_grew(tmp_path):
    ledger, store = anchored(tmp_path, 2)
    ledger_with_rounds(tmp_path / "state", 1)
    result = CliRunner().invoke(app, ["privacy", "verify", str(ledger.path), "--anchors", str(store.path)])
    assert result.exit_code == 0, result.output
    assert "extends the coordinator's anchor (2 entries" in result.output and "1 entries since" in result.output


def test_anchor_store_only_moves_forward_and_is_private(tmp_path):
    ledger, store = anchored(tmp_path, 3)
    assert mode(store.path) == 0o600 and store.get("hospital-a") == ledger_head(ledger)
    assert not store.update("hospital-a", ledger_head(ledger))  # the same head: no change
    first = ledger.entries()[0]
    with pytest.raises(AnchorError, match="only moves forward"):
        store.update("hospital-a", LedgerHead(1, first.hash))
    with pytest.raises(AnchorError, match="only moves forward"):
        store.update("hospital-a", LedgerHead(3, "f" * 64))
    assert len(store.history("hospital-a")) == 3 and store.get("elsewhere") is None
    assert check_extends([], LedgerHead(0, "0" * 64)).extends  # nothing anchored yet


def test_torn_last_line_is_repaired_keeping_the_evidence(tmp_path):
    ledger = ledger_with_rounds(tmp_path / "state", 2)
    head = ledger_head(ledger)
    torn = b'{"index": 2, "kind": "round", "time": "2026-'
    with open(ledger.path, "ab") as f:  # a crash in the middle of an append
        f.write(torn)
    with pytest.raises(LedgerTornError, match="medfed privacy repair"):
        ledger.verify()
    result = CliRunner().invoke(app, ["privacy", "verify", str(ledger.path)])
    assert result.exit_code != 0 and "medfed privacy repair" in str(result.exception)

    result = CliRunner().invoke(app, ["privacy", "repair", str(tmp_path / "state")])
    assert result.exit_code == 0, result.output
    evidence = list((tmp_path / "state").glob("privacy-ledger.jsonl.torn-*"))
    assert len(evidence) == 1 and evidence[0].read_bytes() == torn and mode(evidence[0]) == 0o600
    entries = ledger.entries()
    assert [e.kind for e in entries] == ["round", "round", "repair"]
    assert entries[2].data["torn_sha256"] == hashlib.sha256(torn).hexdigest()
    assert entries[2].data["evidence"] == evidence[0].name and entries[2].data["torn_bytes"] == len(torn)
    assert check_extends(entries, head).extends  # the repair appends: the coordinator's anchor still holds
    ledger_with_rounds(tmp_path / "state", 1)
    assert ledger.verify() == 4
    again = CliRunner().invoke(app, ["privacy", "repair", str(ledger.path)])
    assert again.exit_code == 0 and "nothing to repair" in again.output


def test_repair_refuses_an_edited_ledger(tmp_path):
    ledger = ledger_with_rounds(tmp_path / "state", 3)
    rewrite(ledger, 1, lambda d: d.update(noise_multiplier=9.0))
    with open(ledger.path, "ab") as f:
        f.write(b'{"ind')
    with pytest.raises(LedgerTamperedError, match="entry 1"):
        repair_ledger(ledger)
    assert not list((tmp_path / "state").glob("*.torn-*"))


def test_legacy_unsigned_ledger_fails_with_the_migration_and_migrates_keeping_hashes(tmp_path):
    ledger = ledger_with_rounds(tmp_path / "state", 3)
    # a ledger written before signing: the same entries without signer and signature
    raw = [json.loads(line) for line in ledger.path.read_text().splitlines()]
    for e in raw:
        del e["signer"], e["signature"]
    ledger.path.write_text("".join(json.dumps(e) + "\n" for e in raw))
    (tmp_path / "state" / KEY_FILE).unlink()
    (tmp_path / "state" / (KEY_FILE + ".pub")).unlink()
    head = LedgerHead(3, raw[-1]["hash"])
    with pytest.raises(LedgerUnsignedError, match="--sign-legacy"):
        ledger.verify()
    result = CliRunner().invoke(app, ["privacy", "repair", str(ledger.path), "--sign-legacy"])
    assert result.exit_code == 0, result.output
    entries = ledger.entries()
    assert [e.hash for e in entries[:3]] == [e["hash"] for e in raw] and entries[3].kind == "repair"
    assert entries[3].data["entries"] == 3 and check_extends(entries, head).extends
    original = tmp_path / "state" / entries[3].data["original"]
    assert [json.loads(line)["hash"] for line in original.read_text().splitlines()] == [e["hash"] for e in raw]


def test_forged_review_approval_is_refused(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    generated = torch.rand(4, 1, 8, 8) * 2 - 1
    audit = tmp_path / "audit.json"
    audit.write_text(json.dumps({
        "kind": "memorization-audit", "version": 1, "passed": True, "near_copy_threshold": 0.1,
        "near_copy_fraction": 0.0, "max_near_copy_fraction": 0.05, "num_generated": 4, "num_reference": 50,
        "generated_sha256": images_sha256(generated), "feature_network": "pixels (test)"}))
    approve_real_export(state, audit, "Dr. A", max_real_images=6)
    assert authorize_real_export(state, audit, generated, 6).max_real_images == 6
    ledger = site_ledger(state)
    rewrite(ledger, 0, lambda d: d.update(max_real_images=1000))  # hashes recomputed, no key to sign with
    with pytest.raises(LedgerTamperedError, match="approval cannot be trusted.*no valid signature"):
        authorize_real_export(state, audit, generated, 7)


def test_key_rotation_keeps_the_ledger_verifiable_and_the_anchor(tmp_path, breastmnist):
    from medfed.deploy.pki import create_ca, key_fingerprint, public_key_fingerprint
    from medfed.deploy.hospital import init_site

    ca = create_ca(tmp_path / "ca")
    cfg = init_site(tmp_path / "site", name="hospital-a", superlink="coord.example.org:9092", ca_cert=ca.cert,
                    data_path=breastmnist, data_format="npz", cap_epsilon=10.0)
    assert (cfg.state_dir / KEY_FILE).resolve() == cfg.private_key  # the ledger is signed with the site's key
    ledger = ledger_with_rounds(cfg.state_dir, 2)
    head = ledger_head(ledger)
    old_fp = public_key_fingerprint(cfg.private_key.with_name("site-key.pub"))
    assert {key_fingerprint(e.signer) for e in ledger.entries()} == {old_fp}

    result = CliRunner().invoke(app, ["site", "rotate-key", "--dir", str(tmp_path / "site")])
    assert result.exit_code == 0, result.output
    new_fp = public_key_fingerprint(cfg.private_key.with_name("site-key.pub"))
    rotation = ledger.entries()[-1]
    assert rotation.kind == "key-rotation" and key_fingerprint(rotation.signer) == old_fp != new_fp
    assert rotation.data["new_fingerprint"] == new_fp
    ledger_with_rounds(cfg.state_dir, 1)
    entries = ledger.entries()
    assert len(entries) == 4 and key_fingerprint(entries[-1].signer) == new_fp
    assert check_extends(entries, head).extends
    # an entry signed with the retired key after the rotation does not verify
    old_key = load_site_private_key(tmp_path / "site" / "site-key.old")
    raw = [json.loads(line) for line in ledger.path.read_text().splitlines()]
    from medfed.deploy.pki import openssh_public

    raw[3]["signer"], raw[3]["signature"] = openssh_public(old_key.public_key()), sign_entry_hash(old_key,
                                                                                                raw[3]["hash"])
    ledger.path.write_text("".join(json.dumps(e) + "\n" for e in raw))
    with pytest.raises(LedgerTamperedError, match="entry 3 .* not by this ledger's key"):
        ledger.verify()


def test_privacy_report_tables_carry_the_mechanism_and_the_checks(tmp_path):
    ledger_with_rounds(tmp_path / "state", 1)
    report = from_ledger(tmp_path / "state")
    assert report.chain.startswith("intact: 1 entries signed by SHA256:")
    paths = write_report([report], tmp_path / "out")
    page = paths["html"].read_text()
    for column in ("noise multiplier", "sample rate", "steps", "ledger chain"):
        assert f"<th>{column}</th>" in page
    assert "<td>1.2</td><td>0.1</td><td>10</td>" in page
    assert paths["plot"].stat().st_size > 10_000


def test_simulated_budget_is_keyed_by_the_shard_content_not_the_seed(tmp_path, breastmnist):
    from medfed.datasets import ImageDataset
    from medfed.federation.site import shard_fingerprint, simulated_state_dir

    images, labels = torch.rand(6, 1, 8, 8), torch.arange(6)
    shard = ImageDataset(images, labels, "shard")
    shuffled = ImageDataset(images.flip(0), labels.flip(0), "same images, other order")
    other = ImageDataset(images[:5], labels[:5], "one image fewer")
    assert shard_fingerprint(shard) == shard_fingerprint(shuffled) != shard_fingerprint(other)
    from medfed.config import from_flat

    cfg = from_flat({"privacy.site-state-root": str(tmp_path)})
    assert simulated_state_dir(cfg, 0, shard_fingerprint(shard)) == simulated_state_dir(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=99)), 0, shard_fingerprint(shuffled))
    from medfed.federation.policy import simulated_node
    from medfed.federation.site import load_site

    def state_dir(seed):
        cfg = from_flat({"data.dataset": "npz", "data.site-paths": ";".join([f"npz:{breastmnist}"] * 3),
                         "data.image-size": 28, "data.channels": 1, "federation.num-sites": 3,
                         "train.seed": seed, "privacy.site-state-root": str(tmp_path / "state")})
        return load_site(cfg, simulated_node(cfg, 0, 3)).state_dir

    # (without data.limit: a limit draws a seed-dependent subset, i.e. another shard, hence another budget)
    assert state_dir(0) == state_dir(7)  # the same shard under another seed continues the same budget
