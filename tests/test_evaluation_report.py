"""The `medfed evaluate` commands end to end: train-features, the run report and the memorization audit."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from medfed.centralized import train_centralized
from medfed.cli import app
from medfed.config import DataConfig, from_flat
from medfed.datasets import load_dataset
from medfed.evaluation.memorization import check_audit
from medfed.generate import generate_from_checkpoint
from medfed.images import save_png

runner = CliRunner()


@pytest.mark.slow  # samples, scores on two feature networks and audits a run (about 8 s)
def test_evaluate_run_dir_writes_scores_report_and_audit(tmp_path, breastmnist):
    clf = tmp_path / "breast-clf.pt"
    trained = runner.invoke(app, ["evaluate", "train-features", "--data-path", str(breastmnist), "--out", str(clf),
                                  "--epochs", "1", "--device", "cpu"])
    assert trained.exit_code == 0, trained.output
    assert "medfed-clf/breastmnist/" in trained.output and "test accuracy" in trained.output

    cfg = from_flat({"data.dataset": "npz", "data.path": str(breastmnist), "model.preset": "micro",
                     "train.steps": 2, "train.batch-size": 16, "train.num-samples": 4, "diffusion.sample-steps": 2,
                     "train.device": "cpu", "output.dir": str(tmp_path), "output.name": "run"})
    run = train_centralized(cfg, show_progress=False).run
    result = runner.invoke(app, ["evaluate", str(run.root), "-f", str(clf), "--num-samples", "24", "--device", "cpu",
                                 "--set", "evaluation.kid-subset-size=20"])
    assert result.exit_code == 0, result.output
    out = run.root / "evaluation" / "latest-n24"
    scores = json.loads((out / "scores.json").read_text())
    (table,) = scores["tables"]
    assert table["network"].startswith("medfed-clf/breastmnist/") and table["protocol"] == "standard"
    by_metric = {s["metric"]: s for s in table["scores"]}
    assert by_metric["fid"]["num_generated"] == 24 and by_metric["fid"]["num_real"] == 156  # BreastMNIST test split
    assert by_metric["kid"]["note"].startswith("subset size 20")
    assert by_metric["classifier-score"]["value"] is not None
    audit = check_audit(json.loads((out / "memorization.json").read_text()))
    assert audit["num_generated"] == 24 and audit["feature_network"] == table["network"]
    assert audit["generated_sha256"] == scores["generated_sha256"]
    report = (out / "report.md").read_text()
    assert table["network"] in report and "Memorization audit" in report and "| FID |" in report
    assert "<table>" in (out / "report.html").read_text()
    for png in ("samples.png", "closest_pairs.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # Offline without the standard Inception weights: one line naming the missing file, before any sampling.
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "empty-torch-home")}
    proc = subprocess.run([sys.executable, "-m", "medfed.cli", "evaluate", str(run.root), "-f", "inception",
                           "--out", str(tmp_path / "never")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "pt_inception-2015-12-05-6726825d.pth" in proc.stderr and not (tmp_path / "never").exists()


def test_memorization_command_fails_on_copied_training_images(tmp_path, breastmnist):
    train = load_dataset(DataConfig(dataset="npz", path=str(breastmnist), split="train"))
    copies = tmp_path / "copies"
    copies.mkdir()
    for i in range(6):
        save_png(train.images[i * 7], copies / f"{i:05d}.png")
    save_png(train.images[0], copies / "grid.png")  # ignored, as `medfed sample` writes one beside the images
    result = runner.invoke(app, ["evaluate", "memorization", "--generated", str(copies), "--reference",
                                 str(breastmnist)])
    assert result.exit_code == 1, result.output
    audit = check_audit(json.loads((copies / "memorization.json").read_text()))
    assert audit["passed"] is False and audit["near_copy_count"] == 6 and audit["num_generated"] == 6

    cfg = from_flat({"data.dataset": "npz", "data.path": str(breastmnist), "model.preset": "micro",
                     "train.steps": 1, "train.num-samples": 2, "diffusion.sample-steps": 2, "train.device": "cpu",
                     "output.dir": str(tmp_path), "output.name": "noise"})
    run = train_centralized(cfg, show_progress=False).run
    samples = generate_from_checkpoint(run.latest_checkpoint, num=6, steps=2, device="cpu")
    result = runner.invoke(app, ["evaluate", "memorization", "--generated", str(samples), "--reference",
                                 str(breastmnist)])
    assert result.exit_code == 0, result.output  # an untrained model makes noise, not copies
    assert json.loads((samples / "memorization.json").read_text())["near_copy_count"] == 0
