"""Clinician review: export -> rate -> import -> report on a real generated set, the site-approval gate, the
DICOM files, rating validation, and the statistics against independent computations.

The memorization audit JSON is produced by ``medfed.evaluation.memorization`` (``medfed evaluate memorization``).
Most gate tests write it themselves from its contract (fields computed here for the test images) so that they
can vary one field at a time; ``test_a_real_memorization_audit_gates_the_export`` uses the real audit.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from scipy import optimize
from scipy import stats as scipy_stats
from sklearn.metrics import cohen_kappa_score
from torchvision.io import decode_image
from typer.testing import CliRunner

from medfed.centralized import train_centralized
from medfed.cli import app
from medfed.clinician_review.approval import (
    approve_real_export,
    authorize_real_export,
    revoke_real_export,
)
from medfed.clinician_review.export import export_study, read_generated_folder
from medfed.clinician_review.ratings import import_ratings, read_ratings_table
from medfed.clinician_review.report import build_report, write_report
from medfed.clinician_review.stats import cohen_kappa, fleiss_kappa, t_interval, wilson_interval
from medfed.clinician_review.study import ReviewError, read_key, read_manifest
from medfed.config import DataConfig, from_flat
from medfed.datasets import from_uint8, load_dataset
from medfed.errors import MedfedError
from medfed.generate import generate_from_checkpoint
from medfed.privacy.ledger import LedgerTamperedError, site_ledger

NUM_GENERATED, NUM_REAL = 12, 6


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: a briefly trained micro model, its generated images, an audit, a site that approved, an export.


def png_pixels(paths: list[Path]) -> np.ndarray:
    return np.stack([decode_image(str(p)).numpy() for p in paths])


def write_audit(path: Path, generated_pngs: list[Path], passed: bool = True) -> Path:
    """An audit file following medfed.evaluation's contract, with generated_sha256 computed here from the PNGs."""
    pixels = np.ascontiguousarray(png_pixels(generated_pngs))
    path.write_text(json.dumps({
        "kind": "memorization-audit", "version": 1, "passed": passed, "near_copy_threshold": 0.1,
        "near_copy_fraction": 0.0 if passed else 0.25, "max_near_copy_fraction": 0.05,
        "num_generated": len(generated_pngs), "num_reference": 546,
        "generated_sha256": hashlib.sha256(pixels.tobytes()).hexdigest(), "feature_network": "pixels (test)",
    }))
    return path


@pytest.fixture(scope="module")
def generated_dir(tmp_path_factory, breastmnist) -> Path:
    tmp = tmp_path_factory.mktemp("generator")
    cfg = from_flat({"data.dataset": "npz", "data.path": str(breastmnist), "model.preset": "micro",
                     "train.steps": 3, "train.batch-size": 8, "train.log-every": 1, "train.num-samples": 2,
                     "diffusion.sample-steps": 4, "train.device": "cpu", "output.dir": str(tmp), "output.name": "m"})
    checkpoint = train_centralized(cfg, show_progress=False).run.latest_checkpoint
    return generate_from_checkpoint(checkpoint, NUM_GENERATED, out=tmp / "generated", steps=4, device="cpu")


def generated_pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.png") if p.name != "grid.png")


def run_cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def study(tmp_path_factory, generated_dir, breastmnist) -> dict:
    """An export of 12 generated + 6 real BreastMNIST test images, approved by the site, through the CLI."""
    tmp = tmp_path_factory.mktemp("study")
    state = tmp / "site-state"
    state.mkdir()
    audit = write_audit(tmp / "audit.json", generated_pngs(generated_dir))
    run_cli("review", "approve", "--state-dir", str(state), "--audit", str(audit), "--by", "Dr. Privacy Officer",
            "--max-real", str(NUM_REAL), "--note", "reader study 1")
    out = tmp / "export"
    run_cli("review", "export", "--out", str(out), "--generated", str(generated_dir), "--num-real", str(NUM_REAL),
            "--real-data", str(breastmnist), "--real-format", "npz", "--real-split", "test",
            "--state-dir", str(state), "--audit", str(audit), "--study-id", "breast-rs1")
    return {"root": out, "raters": out / "for-raters", "key": out / "coordinator" / "unblinding-key.json",
            "state": state, "audit": audit, "tmp": tmp}


# ---------------------------------------------------------------------------------------------------------------
# Export: what raters get, what the coordinator keeps.


def test_export_mixes_generated_and_approved_real_images_blinded(study, generated_dir, breastmnist):
    manifest = read_manifest(study["raters"] / "manifest.json")
    key = read_key(study["key"])
    assert manifest.study_id == key.study_id == "breast-rs1"
    assert key.manifest_sha256 == manifest.sha256
    assert len(manifest.images) == NUM_GENERATED + NUM_REAL
    assert [e.id for e in key.entries] == manifest.image_ids
    assert sum(e.source == "real" for e in key.entries) == NUM_REAL
    # The manifest says nothing about sources: only ids and file names.
    for image in json.loads((study["raters"] / "manifest.json").read_text())["images"]:
        assert set(image) == {"id", "png", "dicom"}
    assert "real" not in json.dumps(json.loads((study["raters"] / "manifest.json").read_text())["images"])
    assert not list(study["raters"].rglob("*key*"))

    # Synthetic images are exactly the generated ones; real ones are BreastMNIST test images, labels kept.
    truth = key.by_id()
    exported = {i: decode_image(str(study["raters"] / "images" / f"{i}.png")).numpy() for i in manifest.image_ids}
    generated = {hashlib.sha256(p.tobytes()).hexdigest() for p in png_pixels(generated_pngs(generated_dir))}
    synthetic = {hashlib.sha256(exported[i].tobytes()).hexdigest() for i in exported if truth[i].source == "synthetic"}
    assert synthetic == generated
    archive = np.load(breastmnist)
    test_images = {hashlib.sha256(im[None].tobytes()).hexdigest(): int(lab[0])
                   for im, lab in zip(archive["test_images"], archive["test_labels"])}
    for i in exported:
        if truth[i].source == "real":
            assert test_images[hashlib.sha256(exported[i].tobytes()).hexdigest()] == truth[i].label
    # The key records which ledger approval let the real images out.
    approval = site_ledger(study["state"]).approval("export-real-images")
    assert key.provenance["real"]["ledger_entry_hash"] == approval.hash

    # Rating form: one row per image, in manifest order, study id prefilled.
    with open(study["raters"] / "rating-form.csv", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    assert [r["image_id"] for r in rows] == manifest.image_ids
    assert {r["study_id"] for r in rows} == {"breast-rs1"}

    # The rating page is self-contained: every image embedded, no external reference.
    page = (study["raters"] / "rating-page.html").read_text()
    assert page.count("data:image/png;base64,") == len(manifest.images)
    assert "http://" not in page and "https://" not in page and "src=\"" not in page.replace('src="data:', "")


def test_mixed_export_dicoms_are_identically_labelled_so_headers_do_not_unblind(study):
    key = read_key(study["key"])
    per_instance = {"SOPInstanceUID", "InstanceNumber", "PixelData"}
    headers = {}
    for entry in key.entries:
        ds = pydicom.dcmread(study["raters"] / "dicom" / f"{entry.id}.dcm")
        assert "SYNTHETIC" in ds.SeriesDescription and "SYNTHETIC" in ds.ImageComments
        assert "SYNTHETIC" in ds.DerivationDescription.upper()
        headers[entry.id] = {el.keyword: str(el.value) for el in ds if el.keyword not in per_instance}
    reference = next(iter(headers.values()))
    assert all(h == reference for h in headers.values())


# ---------------------------------------------------------------------------------------------------------------
# Export -> rate (3 raters: two CSV forms and one page file) -> import -> report, checked independently.


def simulate_ratings(key, seed=7):
    """Ratings of three raters of different skill; rater dr-c leaves one image unrated."""
    rng = np.random.default_rng(seed)
    ratings = {}
    for rater, skill in (("dr-a", 0.85), ("dr-b", 0.7), ("dr-c", 0.55)):
        rows = []
        for n, entry in enumerate(key.entries):
            if rater == "dr-c" and n == 3:
                continue
            correct = rng.random() < skill
            call = entry.source if correct else ("real" if entry.source == "synthetic" else "synthetic")
            base = 3.8 if entry.source == "real" else 2.4
            rows.append({"image_id": entry.id, "realism": int(np.clip(round(base + rng.normal(0, 1.0)), 1, 5)),
                         "call": call, "confidence": int(rng.integers(1, 6)),
                         "usefulness": None if rng.random() < 0.2 else int(rng.integers(1, 6)),
                         "comment": "edge, blur" if n == 0 else ""})
        ratings[rater] = rows
    return ratings


def write_csv(path: Path, rater: str, rows: list[dict], study_id: str, delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8-sig") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["study_id", "rater_id", "image_id", "realism", "call", "confidence", "usefulness", "comment"])
        for r in rows:
            writer.writerow([study_id, rater, r["image_id"], r["realism"], r["call"].upper(), r["confidence"],
                             "" if r["usefulness"] is None else r["usefulness"], r["comment"]])
    return path


def write_page_file(path: Path, rater: str, rows: list[dict], study_id: str) -> Path:
    path.write_text(json.dumps({"kind": "medfed-review-ratings", "version": 1, "study_id": study_id,
                                "rater_id": rater, "ratings": rows}))
    return path


def fleiss_by_definition(table: np.ndarray) -> float:
    """Fleiss (1971): kappa = (P_bar - P_e) / (1 - P_e), written out term by term."""
    n_items = len(table)
    n_raters = table[0].sum()
    p_j = [table[:, j].sum() / (n_items * n_raters) for j in range(table.shape[1])]
    p_i = [sum(c * (c - 1) for c in row) / (n_raters * (n_raters - 1)) for row in table]
    p_bar, p_e = sum(p_i) / n_items, sum(p * p for p in p_j)
    return (p_bar - p_e) / (1 - p_e)


def test_export_rate_import_report_matches_independent_statistics(study, tmp_path):
    key = read_key(study["key"])
    manifest_path = study["raters"] / "manifest.json"
    simulated = simulate_ratings(key)
    files = [write_csv(tmp_path / "dr-a.csv", "dr-a", simulated["dr-a"], key.study_id),
             write_csv(tmp_path / "dr-b.csv", "dr-b", simulated["dr-b"], key.study_id, delimiter=";"),
             write_page_file(tmp_path / "ratings-dr-c.json", "dr-c", simulated["dr-c"], key.study_id)]
    table_path = tmp_path / "ratings.json"
    run_cli("review", "import", *map(str, files), "--manifest", str(manifest_path), "--out", str(table_path))
    run_cli("review", "report", "--ratings", str(table_path), "--key", str(study["key"]), "--out",
            str(tmp_path / "report"))
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Fleiss" in html and html.count("data:image/png;base64,") == 2
    assert (tmp_path / "report" / "plots" / "realism.png").stat().st_size > 1000

    truth = {e.id: e.source for e in key.entries}
    label = {e.id: e.label for e in key.entries}
    rows = [(rater, r) for rater, rs in simulated.items() for r in rs]
    assert report["num_ratings"] == len(rows) == 3 * len(key.entries) - 1

    # Realism per source: mean of per-image means, Student t interval over images (scipy).
    for source in ("real", "synthetic"):
        image_means = [np.mean([r["realism"] for _, r in rows if r["image_id"] == i])
                       for i in truth if truth[i] == source]
        if np.ptp(image_means) > 0:
            low, high = scipy_stats.t.interval(0.95, len(image_means) - 1, loc=np.mean(image_means),
                                               scale=scipy_stats.sem(image_means))
        else:  # every image rated alike (the export's shuffle decides): scipy says nan, the interval is a point
            low = high = np.mean(image_means)
        got = report["realism"][source]["mean"]
        assert got["n"] == len(image_means)
        assert got["value"] == pytest.approx(np.mean(image_means))
        assert (got["low"], got["high"]) == (pytest.approx(low), pytest.approx(high))
    real_means = list(report["realism"]["real"]["image_means"].values())
    synth_means = list(report["realism"]["synthetic"]["image_means"].values())
    assert report["realism"]["real_vs_synthetic"]["p_value"] == pytest.approx(
        scipy_stats.mannwhitneyu(real_means, synth_means).pvalue)

    # Visual Turing test, positive class synthetic: counted here directly.
    for rater, rs in simulated.items():
        tp = sum(truth[r["image_id"]] == "synthetic" and r["call"] == "synthetic" for r in rs)
        tn = sum(truth[r["image_id"]] == "real" and r["call"] == "real" for r in rs)
        n_syn = sum(truth[r["image_id"]] == "synthetic" for r in rs)
        got = report["turing_test"]["per_rater"][rater]
        assert got["accuracy"]["value"] == pytest.approx((tp + tn) / len(rs))
        assert got["sensitivity"]["value"] == pytest.approx(tp / n_syn)
        assert got["specificity"]["value"] == pytest.approx(tn / (len(rs) - n_syn))
        assert got["accuracy"]["low"] <= got["accuracy"]["value"] <= got["accuracy"]["high"]
    pooled_correct = sum(truth[r["image_id"]] == r["call"] for _, r in rows)
    assert report["turing_test"]["pooled"]["accuracy"]["value"] == pytest.approx(pooled_correct / len(rows))

    # Agreement of three raters: Fleiss over the images all three rated; pairwise Cohen against sklearn.
    by = {(rater, r["image_id"]): r for rater, r in rows}
    common = [i for i in truth if all((rater, i) in by for rater in simulated)]
    assert report["agreement"]["method"] == "fleiss" and report["agreement"]["num_images"] == len(common)
    calls = np.array([[sum(by[(rt, i)]["call"] == c for rt in simulated) for c in ("real", "synthetic")]
                      for i in common])
    scores = np.array([[sum(by[(rt, i)]["realism"] == v for rt in simulated) for v in range(1, 6)] for i in common])
    assert report["agreement"]["call"]["kappa"] == pytest.approx(fleiss_by_definition(calls))
    assert report["agreement"]["realism"]["kappa"] == pytest.approx(fleiss_by_definition(scores))
    for pair in report["agreement"]["pairwise_cohen"]:
        a, b = pair["raters"]
        assert pair["call"]["kappa"] == pytest.approx(
            cohen_kappa_score([by[(a, i)]["call"] for i in common], [by[(b, i)]["call"] for i in common]))
        assert pair["realism"]["kappa"] == pytest.approx(
            cohen_kappa_score([by[(a, i)]["realism"] for i in common], [by[(b, i)]["realism"] for i in common],
                              labels=[1, 2, 3, 4, 5], weights="quadratic"))

    # Per class: the real images carry BreastMNIST labels (0 malignant, 1 normal/benign).
    for cls, summary in report["per_class"].items():
        images = [i for i in truth if label[i] == int(cls) and truth[i] == "real"]
        means = [np.mean([r["realism"] for _, r in rows if r["image_id"] == i]) for i in images]
        assert summary["realism"]["real"]["mean"]["value"] == pytest.approx(np.mean(means))
    assert sum(summary["realism"]["real"]["num_images"] for summary in report["per_class"].values()) == NUM_REAL

    # Two raters: Cohen's kappa, call unweighted and realism quadratic-weighted, as sklearn computes them.
    table = read_ratings_table(table_path)
    pair = type(table)(table.study_id, table.manifest_sha256, tuple(r for r in table.ratings if r.rater_id != "dr-c"))
    two = build_report(pair, key)["agreement"]
    ids = sorted(truth)
    assert two["method"] == "cohen" and two["num_images"] == len(ids)
    assert two["call"]["kappa"] == pytest.approx(
        cohen_kappa_score([by[("dr-a", i)]["call"] for i in ids], [by[("dr-b", i)]["call"] for i in ids]))
    assert two["realism"]["kappa"] == pytest.approx(
        cohen_kappa_score([by[("dr-a", i)]["realism"] for i in ids], [by[("dr-b", i)]["realism"] for i in ids],
                          labels=[1, 2, 3, 4, 5], weights="quadratic"))


def test_report_refuses_a_key_of_another_study(study, tmp_path):
    manifest = read_manifest(study["raters"] / "manifest.json")
    rows = simulate_ratings(read_key(study["key"]))["dr-a"]
    table = import_ratings([write_page_file(tmp_path / "r.json", "dr-a", rows, manifest.study_id)], manifest)
    other = read_key(study["key"])
    other = type(other)("another-study", other.manifest_sha256, other.entries, other.provenance)
    with pytest.raises(ReviewError, match="key is for study 'another-study'"):
        build_report(table, other)


# ---------------------------------------------------------------------------------------------------------------
# Ratings validation: clear errors naming the file and row; nothing already saved is lost.


@pytest.fixture()
def manifest(study):
    return read_manifest(study["raters"] / "manifest.json")


def form_rows(manifest):
    return [{"study_id": manifest.study_id, "rater_id": "dr-x", "image_id": i, "realism": "3", "call": "real",
             "confidence": "4", "usefulness": "", "comment": ""} for i in manifest.image_ids[:3]]


def write_form(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("change,message", [
    ({(1, "image_id"): "img-00000000"}, r"line 3: unknown image id 'img-00000000'"),
    ({(2, "realism"): "6"}, r"line 4: 'realism' must be a whole number from 1 to 5, got '6'"),
    ({(0, "confidence"): "0"}, r"line 2: 'confidence' must be a whole number from 1 to 5"),
    ({(0, "usefulness"): "2.5"}, r"line 2: 'usefulness' must be a whole number"),
    ({(1, "rater_id"): " "}, r"line 3: the rater id is missing"),
    ({(1, "call"): "maybe"}, r"line 3: 'call' must be real or synthetic"),
    ({(0, "realism"): ""}, r"line 2: 'realism' is missing"),
    ({(0, "study_id"): "other-study"}, r"line 2: ratings are for study 'other-study'"),
    ({(2, "image_id"): "FIRST"}, r"rated image .* again"),
])
def test_bad_csv_ratings_give_one_line_errors_naming_file_and_row(manifest, tmp_path, change, message):
    rows = form_rows(manifest)
    for (n, column), value in change.items():
        rows[n][column] = manifest.image_ids[0] if value == "FIRST" else value
    path = write_form(tmp_path / "dr-x.csv", rows)
    with pytest.raises(ReviewError, match=message) as err:
        import_ratings([path], manifest)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_duplicates_across_files_and_json_errors_are_named(manifest, tmp_path):
    csv_path = write_form(tmp_path / "a.csv", form_rows(manifest))
    page = [{"image_id": manifest.image_ids[2], "realism": 2, "call": "synthetic", "confidence": 5}]
    json_path = write_page_file(tmp_path / "a.json", "dr-x", page, manifest.study_id)
    with pytest.raises(ReviewError, match=rf"{json_path}: rater 'dr-x' rated image {manifest.image_ids[2]} again "
                                          rf"\(entry 1; first in {csv_path}\)"):
        import_ratings([csv_path, json_path], manifest)
    bad = write_page_file(tmp_path / "b.json", "", page, manifest.study_id)
    with pytest.raises(ReviewError, match=rf"{bad}: rating 1: the rater id is missing"):
        import_ratings([bad], manifest)
    other = write_page_file(tmp_path / "c.json", "dr-y", page, "another-study")
    with pytest.raises(ReviewError, match="ratings are for study 'another-study'"):
        import_ratings([other], manifest)
    (tmp_path / "d.json").write_text("{not json")
    with pytest.raises(ReviewError, match="d.json: ratings file is not valid JSON"):
        import_ratings([tmp_path / "d.json"], manifest)


def test_blank_form_rows_are_unrated_and_a_failed_import_keeps_the_saved_table(manifest, tmp_path, study):
    rows = form_rows(manifest)
    rows.append({"study_id": manifest.study_id, "rater_id": "", "image_id": manifest.image_ids[3], "realism": "",
                 "call": "", "confidence": "", "usefulness": "", "comment": ""})
    rows[0]["comment"] = 'looks "odd", grainy'
    good = write_form(tmp_path / "good.csv", rows)
    table = import_ratings([good], manifest)
    assert len(table.ratings) == 3 and table.ratings[0].comment == 'looks "odd", grainy'
    out = tmp_path / "ratings.json"
    manifest_path = str(study["raters"] / "manifest.json")
    run_cli("review", "import", str(good), "--manifest", manifest_path, "--out", str(out))
    saved = out.read_bytes()
    bad = write_form(tmp_path / "bad.csv", [dict(form_rows(manifest)[0], rater_id="dr-y", realism="9")])
    proc = subprocess.run([sys.executable, "-m", "medfed.cli", "review", "import", str(good), str(bad), "--manifest",
                           manifest_path, "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and "error:" in proc.stderr and "bad.csv: line 2" in proc.stderr
    assert out.read_bytes() == saved


# ---------------------------------------------------------------------------------------------------------------
# The site-approval gate.


@pytest.fixture()
def gate(tmp_path, generated_dir):
    state = tmp_path / "state"
    state.mkdir()
    pngs = generated_pngs(generated_dir)
    return {"state": state, "audit": write_audit(tmp_path / "audit.json", pngs),
            "images": read_generated_folder(generated_dir).images, "pngs": pngs, "tmp": tmp_path}


def test_a_real_memorization_audit_gates_the_export(gate, breastmnist):
    from medfed.evaluation import memorization

    reference = load_dataset(DataConfig(dataset="npz", path=str(breastmnist), split="train")).images
    audit = memorization.audit_memorization(gate["images"], reference, reference_source="breastmnist train")
    assert audit["passed"]  # the briefly trained model's images copy no training image
    path = memorization.write_audit(audit, gate["tmp"] / "memorization.json")
    approve_real_export(gate["state"], path, "Dr. A", max_real_images=2)
    approval = authorize_real_export(gate["state"], path, gate["images"], 2)
    pixels = np.ascontiguousarray(png_pixels(gate["pngs"]))
    assert approval.generated_sha256 == audit["generated_sha256"] == hashlib.sha256(pixels.tobytes()).hexdigest()

    # A set holding a copy of a training image fails its audit, and that audit cannot be approved.
    copied = torch.cat([gate["images"][:-1], reference[:1]])
    failing = memorization.audit_memorization(copied, reference, reference_source="breastmnist train")
    assert not failing["passed"]
    with pytest.raises(ReviewError, match="did not pass"):
        approve_real_export(gate["state"], memorization.write_audit(failing, gate["tmp"] / "failed.json"), "Dr. A")


def test_real_export_is_refused_without_the_sites_recorded_approval(gate):
    state, audit, images = gate["state"], gate["audit"], gate["images"]
    with pytest.raises(ReviewError, match="needs --state-dir"):
        authorize_real_export(None, audit, images, 2)
    with pytest.raises(ReviewError, match="needs --audit"):
        authorize_real_export(state, None, images, 2)
    with pytest.raises(ReviewError, match="it records no approval"):
        authorize_real_export(state, audit, images, 2)
    # Without an approval object the export itself refuses too (API callers cannot skip the gate).
    with pytest.raises(ReviewError, match="needs the site's approval"):
        export_study(gate["tmp"] / "out", read_generated_folder(gate["pngs"][0].parent), num_real=1,
                     real=from_uint8(np.zeros((2, 28, 28), np.uint8), None, "x", channels_last=False))
    assert not (gate["tmp"] / "out").exists()

    approve_real_export(state, audit, "Dr. A", max_real_images=3)
    approval = authorize_real_export(state, audit, images, 3)
    assert approval.max_real_images == 3 and approval.approved_by == "Dr. A"
    with pytest.raises(ReviewError, match="approved at most 3 real images"):
        authorize_real_export(state, audit, images, 4)
    with pytest.raises(ReviewError, match="other generated images"):
        authorize_real_export(state, audit, images[:-1], 3)
    edited = gate["tmp"] / "audit-edited.json"
    edited.write_text(audit.read_text().replace('"num_reference": 546', '"num_reference": 547'))
    with pytest.raises(ReviewError, match="is not the one the site approved"):
        authorize_real_export(state, edited, images, 3)

    revoke_real_export(state, "Dr. A", note="study stopped")
    with pytest.raises(ReviewError, match="its approval was revoked"):
        authorize_real_export(state, audit, images, 1)


def test_failed_audit_cannot_be_approved_nor_used(gate):
    failed = write_audit(gate["tmp"] / "failed.json", gate["pngs"], passed=False)
    with pytest.raises(ReviewError, match="did not pass"):
        approve_real_export(gate["state"], failed, "Dr. A")
    # Even an approval written to the ledger by hand does not let a failed audit through.
    site_ledger(gate["state"]).append("approval", {"action": "export-real-images", "granted": True, "by": "x",
                                                    "audit_sha256": hashlib.sha256(failed.read_bytes()).hexdigest(),
                                                    "max_real_images": None, "note": ""})
    with pytest.raises(ReviewError, match="did not pass"):
        authorize_real_export(gate["state"], failed, gate["images"], 1)


def test_tampered_ledger_refuses_the_export(gate):
    approve_real_export(gate["state"], gate["audit"], "Dr. A", max_real_images=2)
    ledger = site_ledger(gate["state"])
    ledger.path.write_text(ledger.path.read_text().replace('"max_real_images": 2', '"max_real_images": 200'))
    with pytest.raises(LedgerTamperedError, match="was modified"):
        authorize_real_export(gate["state"], gate["audit"], gate["images"], 100)


def test_cli_refuses_real_images_without_approval_and_writes_nothing(gate, breastmnist):
    out = gate["tmp"] / "refused"
    args = ["review", "export", "--out", str(out), "--generated", str(gate["pngs"][0].parent), "--num-real", "2",
            "--real-data", str(breastmnist), "--real-format", "npz"]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, ReviewError) and "--state-dir" in str(result.exception)
    proc = subprocess.run([sys.executable, "-m", "medfed.cli", *args, "--state-dir", str(gate["state"]), "--audit",
                           str(gate["audit"])], capture_output=True, text=True)
    assert proc.returncode == 2 and "error:" in proc.stderr and "records no approval" in proc.stderr
    assert not out.exists() and not list(gate["tmp"].glob(".refused.partial-*"))


# ---------------------------------------------------------------------------------------------------------------
# DICOM: loads in pydicom and MONAI, carries the synthetic label, holds nothing from any source header.

PLANTED = {
    "PatientName": "Quixotrel^Zebulonia", "PatientID": "PID-PLANTED-8675309", "PatientBirthDate": "19010203",
    "InstitutionName": "Saint Planted General Hospital", "AccessionNumber": "ACC-PLANT-4242",
    "ReferringPhysicianName": "Vantwerpen^Ottilie", "StudyDescription": "PLANTED STUDY DESCRIPTION XQ",
    "SeriesDescription": "PLANTED SERIES DESCRIPTION XQ", "StudyID": "PLSTUDY77", "StationName": "PLANTSTATION9",
    "DeviceSerialNumber": "SN-PLANTED-9931", "OperatorsName": "Hollowmere^Ignatius",
    "StudyInstanceUID": "1.2.826.0.1.3680043.2.1143.777001", "SeriesInstanceUID": "1.2.826.0.1.3680043.2.1143.777002",
}
TEXT_VRS = {"AE", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UI", "UT"}


def planted_sources(folder: Path) -> list[Path]:
    """pydicom's CT_small and MR_small with distinctive values planted in identifying attributes."""
    from pydicom.data import get_testdata_file

    folder.mkdir()
    paths = []
    for n, name in enumerate(("CT_small.dcm", "MR_small.dcm")):
        ds = pydicom.dcmread(get_testdata_file(name))
        for element in ds.iterall():
            if element.VR == "DA":
                element.value = "19010203"
            elif element.VR == "TM":
                element.value = "010203"
        for keyword, value in PLANTED.items():
            setattr(ds, keyword, value)
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.2.1143.77710{n}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        paths.append(folder / name)
        ds.save_as(paths[-1])
    return paths


def string_values(ds: pydicom.Dataset) -> set[str]:
    values = set()
    for element in ds.iterall():
        if element.VR in TEXT_VRS and element.value not in (None, ""):
            items = element.value if isinstance(element.value, pydicom.multival.MultiValue) else [element.value]
            values |= {str(v) for v in items if str(v) and not str(v).startswith("1.2.840.10008.")}
    return values


def test_dicoms_load_in_pydicom_and_monai_and_hold_no_source_header_value(gate):
    from monai.transforms import LoadImage

    sources = planted_sources(gate["tmp"] / "site-dicoms")
    source_values = set().union(*(string_values(pydicom.dcmread(p)) for p in sources))
    assert set(PLANTED.values()) <= source_values
    approve_real_export(gate["state"], gate["audit"], "Dr. A", max_real_images=2)
    root = gate["tmp"] / "out"
    # The site's DICOM folder is read by medfed's own DICOM loader (MONAI PydicomReader), as in deployment.
    run_cli("review", "export", "--out", str(root), "--generated", str(gate["pngs"][0].parent), "--num-real", "2",
            "--real-data", str(sources[0].parent), "--real-format", "dicom", "--state-dir", str(gate["state"]),
            "--audit", str(gate["audit"]))
    assert [e.source for e in read_key(root / "coordinator" / "unblinding-key.json").entries].count("real") == 2

    planted = [v.encode() for v in PLANTED.values()] + [p.encode() for v in PLANTED.values() for p in v.split("^")]
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not [p for p in planted if p in data], path

    load = LoadImage(image_only=True)
    dicoms = sorted((root / "for-raters" / "dicom").glob("*.dcm"))
    assert len(dicoms) == NUM_GENERATED + 2
    uids = set()
    for path in dicoms:
        ds = pydicom.dcmread(path)
        assert not string_values(ds) & source_values, path
        assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert "SYNTHETIC" in ds.ImageComments and "SYNTHETIC" in ds.SeriesDescription
        assert ds.PatientIdentityRemoved == "YES" and ds.BurnedInAnnotation == "NO"
        png = decode_image(str(root / "for-raters" / "images" / f"{path.stem}.png"))[0].numpy()
        np.testing.assert_array_equal(ds.pixel_array, png)
        image = load(str(path))
        assert tuple(image.shape) == (28, 28)
        np.testing.assert_array_equal(np.asarray(image).T, png)  # MONAI's reader puts columns first
        uids |= {ds.SOPInstanceUID}
    assert len(uids) == len(dicoms)


def test_rgb_images_become_rgb_secondary_captures(tmp_path):
    from medfed.clinician_review.secondary_capture import series_header, write_secondary_capture

    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = write_secondary_capture(pixels, tmp_path / "rgb.dcm", series_header("rgb-study", blinded_mix=False), 1)
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    np.testing.assert_array_equal(ds.pixel_array, pixels)


def test_exact_duplicate_real_images_are_never_exported_twice(gate, breastmnist):
    # Two distinct BreastMNIST test images, the first stored ten times: a draw of 2 without deduplication picks
    # two copies of it 82% of the time.
    archive = np.load(breastmnist)
    pixels = archive["test_images"][[0] * 10 + [1]]
    real = from_uint8(pixels, archive["test_labels"][[0] * 10 + [1]], "duplicated", channels_last=True)
    approve_real_export(gate["state"], gate["audit"], "Dr. A", max_real_images=3)
    generated = read_generated_folder(gate["pngs"][0].parent)
    for attempt in range(5):
        out = gate["tmp"] / f"dedup-{attempt}"
        approval = authorize_real_export(gate["state"], gate["audit"], gate["images"], 2)
        export_study(out, generated, real=real, num_real=2, approval=approval, show_progress=False)
        truth = read_key(out / "coordinator" / "unblinding-key.json").by_id()
        exported = {hashlib.sha256(decode_image(str(out / "for-raters" / "images" / f"{i}.png")).numpy().tobytes())
                    .hexdigest() for i in truth if truth[i].source == "real"}
        assert exported == {hashlib.sha256(pixels[j][None].tobytes()).hexdigest() for j in (0, 10)}
    approval = authorize_real_export(gate["state"], gate["audit"], gate["images"], 3)
    with pytest.raises(MedfedError, match="3 real images requested but it holds 2 distinct images"):
        export_study(gate["tmp"] / "dedup-too-many", generated, real=real, num_real=3, approval=approval,
                     show_progress=False)
    assert not (gate["tmp"] / "dedup-too-many").exists()


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's (Debian dicom3tools) Error lines for one file; it reports on stderr."""
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy not installed (apt-get install dicom3tools; .ci/run installs it)")
def test_exported_dicoms_pass_dciodvfy(study, tmp_path):
    from medfed.clinician_review.secondary_capture import series_header, write_secondary_capture

    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    files = [*sorted((study["raters"] / "dicom").glob("*.dcm")),  # blinded mix of synthetic and real, grayscale
             write_secondary_capture(rgb, tmp_path / "rgb.dcm", series_header("rgb", blinded_mix=False), 1)]
    assert len(files) == NUM_GENERATED + NUM_REAL + 1
    for path in files:
        assert dciodvfy_errors(path) == [], path
    # The check itself finds errors: without the Type 2C attributes the same file fails.
    broken = pydicom.dcmread(files[0])
    del broken.Laterality, broken.PatientOrientation
    broken.save_as(tmp_path / "broken.dcm", enforce_file_format=True)
    assert len(dciodvfy_errors(tmp_path / "broken.dcm")) == 2


def test_synthetic_only_export_from_a_checkpoint_labels_each_dicom_synthetic(generated_dir, tmp_path):
    checkpoint = next(generated_dir.parent.rglob("latest.pt"))
    out = tmp_path / "synthetic-only"
    run_cli("review", "export", "--out", str(out), "--checkpoint", str(checkpoint), "--num", "3", "--steps", "2",
            "--device", "cpu")
    key = read_key(out / "coordinator" / "unblinding-key.json")
    assert [e.source for e in key.entries] == ["synthetic"] * 3
    assert key.provenance["generated"]["checkpoint"] == str(checkpoint)
    for path in (out / "for-raters" / "dicom").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        assert ds.ConversionType == "SYN" and ds.PatientName == "SYNTHETIC^MEDFED"
        assert ds.ImageComments.startswith("SYNTHETIC IMAGE") and "SYNTHETIC" in ds.ImageType
    with pytest.raises(MedfedError, match="exists and is not empty"):
        export_study(out, read_generated_folder(generated_dir), show_progress=False)

    # One rater, no real images: what cannot be computed is reported as such, not as a number.
    rows = [{"image_id": e.id, "realism": 2, "call": "synthetic" if n else "real", "confidence": 3}
            for n, e in enumerate(key.entries)]
    page_file = write_page_file(tmp_path / "r.json", "dr-solo", rows, key.study_id)
    report = build_report(import_ratings([page_file], read_manifest(out / "for-raters" / "manifest.json")), key)
    assert report["turing_test"]["pooled"]["sensitivity"]["value"] == pytest.approx(2 / 3)
    assert report["turing_test"]["pooled"]["specificity"]["value"] is None
    assert report["agreement"]["method"] is None and "two raters" in report["agreement"]["reason"]
    assert "real" not in report["realism"] and report["per_class"] == {}
    paths = write_report(report, tmp_path / "report")
    assert "n/a" in paths["html"].read_text()


# ---------------------------------------------------------------------------------------------------------------
# The statistics on their own, against textbook values and independent computations.


def test_fleiss_kappa_matches_the_textbook_example():
    # Fleiss (1971) as worked in the literature: 10 subjects, 14 raters, 5 categories -> kappa 0.210.
    table = np.array([[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
                      [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]])
    assert fleiss_by_definition(table) == pytest.approx(0.2099, abs=5e-4)
    assert fleiss_kappa(table) == pytest.approx(fleiss_by_definition(table))
    assert fleiss_kappa(np.array([[3, 0], [3, 0]])) is None  # one category only: undefined, not a number
    with pytest.raises(ValueError):
        fleiss_kappa(np.array([[2, 1], [1, 1]]))


@pytest.mark.parametrize("weights", [None, "linear", "quadratic"])
def test_cohen_kappa_matches_sklearn(weights):
    rng = np.random.default_rng(3)
    a = rng.integers(1, 6, 40)
    b = np.clip(a + rng.integers(-1, 2, 40), 1, 5)
    expected = cohen_kappa_score(a, b, labels=[1, 2, 3, 4, 5], weights=weights)
    assert cohen_kappa(list(a), list(b), [1, 2, 3, 4, 5], weights) == pytest.approx(expected)
    assert cohen_kappa([1, 1], [1, 1], [1, 2]) is None


def test_intervals_match_their_definitions():
    values = [2, 3, 3, 4, 5, 1, 4]
    got = t_interval(values)
    low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert (got.value, got.low, got.high) == (pytest.approx(np.mean(values)), pytest.approx(low), pytest.approx(high))
    assert t_interval([4]).low is None
    # Wilson bounds are the proportions p where the score statistic |p_hat - p| / sqrt(p(1-p)/n) equals z.
    k, n, z = 8, 10, scipy_stats.norm.ppf(0.975)
    score = lambda p: abs(k / n - p) / np.sqrt(p * (1 - p) / n) - z  # noqa: E731
    got = wilson_interval(k, n)
    assert got.low == pytest.approx(optimize.brentq(score, 1e-9, k / n))
    assert got.high == pytest.approx(optimize.brentq(score, k / n, 1 - 1e-9))
    assert wilson_interval(0, 0).value is None


def test_every_pair_of_raters_is_reported(study, tmp_path):
    key = read_key(study["key"])
    manifest = read_manifest(study["raters"] / "manifest.json")
    simulated = simulate_ratings(key, seed=11)
    files = [write_page_file(tmp_path / f"{r}.json", r, rows, key.study_id) for r, rows in simulated.items()]
    report = build_report(import_ratings(files, manifest), key)
    pairs = [tuple(p["raters"]) for p in report["agreement"]["pairwise_cohen"]]
    assert pairs == list(itertools.combinations(sorted(simulated), 2))
