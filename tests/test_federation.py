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
from medfed.launch.processes import pids_with_env
from medfed.launch.simulation import run_simulation
from medfed.runs import RunDir

pytestmark = pytest.mark.slow  # every test starts a Flower simulation


def checkpoint_arrays(run, round_):
    return [v.numpy() for v in load_checkpoint(run.checkpoints / f"round_{round_:04d}.pt").model.values()]


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory, breastmnist):
    cfg = small_run_config(tmp_path_factory.mktemp("fed"), "three-sites", **{
        "data.dataset": "npz", "data.path": str(breastmnist), "data.limit": 240, "federation.num-sites": 3,
        "federation.rounds": 2, "federation.partition": "dirichlet", "federation.dirichlet-beta": 0.5,
        "secagg.enabled": False, "policy.require-secure-aggregation": False})  # exact FedAvg; SecAgg+: test_secagg
    return run_simulation(cfg, clientapp="medfed_test_apps.recording:app", extra_files=app_files("recording"),
                          show_progress=False)


def test_fedavg_is_example_weighted_mean_of_site_deltas(recorded_run):
    for r in (1, 2):
        before, after = checkpoint_arrays(recorded_run, r - 1), checkpoint_arrays(recorded_run, r)
        sent = [np.load(f) for f in sorted((recorded_run.root / "test-deltas").glob(f"round{r}-*.npz"))]
        assert len(sent) == 3
        weights = np.array([float(s["num_examples"]) for s in sent])
        assert len(set(weights)) > 1, "Dirichlet split should give sites different sizes"
        assert all(s.files == ["num_examples", "a0"] for s in sent)  # one vector on the wire (weights.to_wire)
        b, a = (np.concatenate([x.ravel() for x in arrays]) for arrays in (before, after))
        expected = b + sum(w * s["a0"] for w, s in zip(weights, sent)) / weights.sum()
        np.testing.assert_allclose(a, expected, rtol=1e-5, atol=1e-6)


def test_global_model_changes_every_round(recorded_run):
    models = [checkpoint_arrays(recorded_run, r) for r in (0, 1, 2)]
    for old, new in zip(models, models[1:]):
        assert max(float(np.abs(a - b).max()) for a, b in zip(old, new)) > 1e-4


def test_server_keeps_an_ema_of_the_global_model(recorded_run):
    """federation.ema-decay 0.9 with the warm-up: after round 1 the EMA is 0.1 x start + 0.9 x round 1, after round
    2 (decay 2/11) it is 2/11 x that + 9/11 x round 2; checkpoints sample with it."""
    start, one, two = (load_checkpoint(recorded_run.checkpoints / f"round_{r:04d}.pt") for r in (0, 1, 2))
    expect_one = {k: 0.1 * start.model[k] + 0.9 * one.model[k] for k in one.model}
    expect_two = {k: (2 / 11) * expect_one[k] + (9 / 11) * two.model[k] for k in two.model}
    for k in two.model:
        if two.model[k].is_floating_point():
            np.testing.assert_allclose(two.ema[k].numpy(), expect_two[k].numpy(), rtol=1e-5, atol=1e-6)
    assert two.sampling_weights() is two.ema


def test_round_records_report_each_site_and_nothing_that_depends_on_its_data(recorded_run):
    rounds = recorded_run.rounds()
    assert [r.round for r in rounds] == [1, 2]
    for r in rounds:
        assert r.participants == ["site-0", "site-1", "site-2"] and r.aggregated
        assert sum(r.weights.values()) == 240  # the declared sizes (in simulation: each shard's count)
        assert all(0 < eps <= 8.0 + 1e-6 for eps in r.epsilon.values()) and len(r.epsilon) == 3
        # a private run: losses and timing stay at the sites
        assert r.train_loss == {} and r.site_seconds == {}
        assert r.bytes_down > 3 * 280_177 * 4 and r.bytes_up > 3 * 280_177 * 4
        assert r.wall_s > 0
    summary = json.loads(recorded_run.summary_path.read_text())
    assert summary["rounds_completed"] == 2 and summary["rounds_asked"] == 2 and summary["refusals"] == []
    assert (recorded_run.root / "rounds.png").stat().st_size > 0
    assert (recorded_run.samples / "round_0002.png").exists()


def test_faulty_sites_do_not_stop_the_run(tmp_path, breastmnist):
    cfg = small_run_config(tmp_path, "faulty", **{
        "data.dataset": "npz", "data.path": str(breastmnist), "data.limit": 160, "federation.num-sites": 4,
        "federation.rounds": 2, "federation.min-sites": 1, "secagg.enabled": False, "privacy.enabled": False,
        "policy.require-dp": False, "policy.require-secure-aggregation": False, "policy.min-sites-per-round": 1})
    run = run_simulation(cfg, clientapp="medfed_test_apps.faulty:app", extra_files=app_files("faulty"),
                         show_progress=False)
    rounds = {r.round: r for r in run.rounds()}
    assert rounds[1].aggregated and rounds[2].aggregated
    # round 1: site-1 raised; the others were averaged; the server records a reason code, not the text
    assert sorted(rounds[1].train_loss) == ["site-0", "site-2", "site-3"]  # NOT PRIVATE: losses are reported
    (failed,) = [s for s in rounds[1].sites if s.status.value != "trained"]
    assert (failed.site, failed.status.value, failed.reason.value) == ("site-1", "refused", "internal-error")
    assert "simulated crash" not in run.metrics_path.read_text()
    # round 2: NaN and wrongly shaped updates are rejected, never averaged
    rejected = {s.site: s.reason.value for s in rounds[2].sites if s.status.value == "rejected"}
    assert rejected == {"site-2": "invalid-update", "site-3": "invalid-update"}
    assert rounds[2].participants == ["site-0", "site-1"]
    assert all(np.isfinite(a).all() for a in checkpoint_arrays(run, 2))


def medfed_cli(*args):
    return [sys.executable, "-m", "medfed.cli", *args]


def flower_processes_of(flwr_home: Path) -> list[int]:
    return pids_with_env("FLWR_HOME", str(flwr_home))


def test_interrupted_run_resumes_from_last_checkpoint(tmp_path):
    args = ["run", "--sites", "3", "--rounds", "2", "--preset", "micro", "--out", str(tmp_path), "--name", "resume",
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
    rounds = [r.round for r in RunDir(run_dir).rounds()]
    assert rounds[-1] == 2 and set(rounds) == {1, 2}
    assert json.loads((run_dir / "summary.json").read_text())["last_round"] == 2
    assert flower_processes_of(run_dir / "flower" / "home") == []
