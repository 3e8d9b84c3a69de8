"""Real Flower runs: simulation (Ray) and a localhost SuperLink with SuperNodes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import small_run_config
from flower_apps import app_files
from medfed.checkpoint import load_checkpoint
from medfed.federation.processes import pids_with_env
from medfed.federation.simulation import run_simulation


def checkpoint_arrays(run, round_):
    return [v.numpy() for v in load_checkpoint(run.checkpoints / f"round_{round_:04d}.pt").model.values()]


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory, breastmnist):
    cfg = small_run_config(tmp_path_factory.mktemp("fed"), "three-sites", **{
        "data.dataset": "npz", "data.path": str(breastmnist), "data.limit": 240, "federation.num-sites": 3,
        "federation.rounds": 2, "federation.partition": "dirichlet", "federation.dirichlet-beta": 0.5,
        "secagg.enabled": False})  # exact FedAvg; tests/test_secagg.py checks the secure path
    return run_simulation(cfg, clientapp="medfed_test_apps.recording:app", extra_files=app_files("recording"),
                          show_progress=False)


def test_fedavg_is_example_weighted_mean_of_site_deltas(recorded_run):
    for r in (1, 2):
        before, after = checkpoint_arrays(recorded_run, r - 1), checkpoint_arrays(recorded_run, r)
        sent = [np.load(f) for f in sorted((recorded_run.root / "test-deltas").glob(f"round{r}-*.npz"))]
        assert len(sent) == 3
        weights = np.array([float(s["num_examples"]) for s in sent])
        assert len(set(weights)) > 1, "Dirichlet split should give sites different sizes"
        for i, (b, a) in enumerate(zip(before, after)):
            expected = b + sum(w * s[f"a{i}"] for w, s in zip(weights, sent)) / weights.sum()
            np.testing.assert_allclose(a, expected, rtol=1e-5, atol=1e-6)


def test_global_model_changes_every_round(recorded_run):
    models = [checkpoint_arrays(recorded_run, r) for r in (0, 1, 2)]
    for old, new in zip(models, models[1:]):
        assert max(float(np.abs(a - b).max()) for a, b in zip(old, new)) > 1e-4


def test_round_metrics_report_each_site(recorded_run):
    rounds = [r for r in recorded_run.read_metrics() if "round" in r]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert sorted(r["train_loss"]) == ["site-0", "site-1", "site-2"]
        assert all(0 < v < 2 for v in r["train_loss"].values())
        assert r["sites_missing"] == [] and r["aggregated"]
        assert sum(r["num_examples"].values()) == 240
        assert r["bytes_down"] > 3 * 280_177 * 4 and r["bytes_up"] > 3 * 280_177 * 4
        assert r["wall_s"] > 0
        assert sorted(r["site_seconds"]) == ["site-0", "site-1", "site-2"]
        assert 0 < sum(r["site_seconds"].values()) < r["wall_s"]  # the sites train one after another here
    summary = json.loads(recorded_run.summary_path.read_text())
    assert summary["rounds_completed"] == 2
    assert (recorded_run.root / "rounds.png").stat().st_size > 0
    assert (recorded_run.samples / "round_0002.png").exists()


def test_faulty_sites_do_not_stop_the_run(tmp_path, breastmnist):
    cfg = small_run_config(tmp_path, "faulty", **{
        "data.dataset": "npz", "data.path": str(breastmnist), "data.limit": 160, "federation.num-sites": 4,
        "federation.rounds": 2, "federation.min-sites": 1, "secagg.enabled": False})
    run = run_simulation(cfg, clientapp="medfed_test_apps.faulty:app", extra_files=app_files("faulty"),
                         show_progress=False)
    rounds = {r["round"]: r for r in run.read_metrics() if "round" in r}
    assert rounds[1]["aggregated"] and rounds[2]["aggregated"]
    # round 1: site-1 raised; the others were averaged, the failure is recorded with its reason
    assert sorted(rounds[1]["train_loss"]) == ["site-0", "site-2", "site-3"]
    assert len(rounds[1]["sites_missing"]) == 1
    assert any("simulated crash in local training" in f for f in rounds[1]["failures"])
    # round 2: NaN and wrongly shaped updates are rejected with reasons, never averaged
    assert sorted(rounds[2]["rejected"]) == ["site-2", "site-3"]
    assert "NaN" in rounds[2]["rejected"]["site-2"] and "shape" in rounds[2]["rejected"]["site-3"]
    assert sorted(rounds[2]["sites_participating"]) == ["site-0", "site-1"]
    assert sorted(rounds[2]["sites_missing"]) == ["site-2", "site-3"]
    assert all(np.isfinite(a).all() for a in checkpoint_arrays(run, 2))


def medfed_cli(*args):
    return [sys.executable, "-m", "medfed.cli", *args]


def flower_processes_of(flwr_home: Path) -> list[int]:
    return pids_with_env("FLWR_HOME", str(flwr_home))


def test_interrupted_run_resumes_from_last_checkpoint(tmp_path):
    args = ["run", "--sites", "2", "--rounds", "2", "--preset", "micro", "--out", str(tmp_path), "--name", "resume",
            "--set", "data.limit=120", "--set", "train.num-samples=4", "--set", "diffusion.sample-steps=4",
            "--set", "train.device=cpu", "--set", "train.batch-size=32"]
    run_dir = tmp_path / "resume"
    proc = subprocess.Popen(medfed_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "round_0001.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert flower_processes_of(run_dir / "flower" / "home") == [], "interrupted run left Flower processes behind"
    interrupted_at = load_checkpoint(run_dir / "checkpoints" / "latest.pt").step
    assert interrupted_at == 1
    done = subprocess.run(medfed_cli(*args, "--resume"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(run_dir / "checkpoints" / "latest.pt").step == 2
    rounds = [r["round"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if "round" in r]
    assert rounds[-1] == 2 and set(rounds) == {1, 2}
    assert json.loads((run_dir / "summary.json").read_text())["last_round"] == 2
    assert flower_processes_of(run_dir / "flower" / "home") == []
