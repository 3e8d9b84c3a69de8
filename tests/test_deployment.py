"""A real localhost deployment: SuperLink and SuperNodes as separate processes, sites reading their own files."""

import signal
import time

import numpy as np
import pytest

from conftest import small_run_config
from medfed.checkpoint import load_checkpoint
from medfed.contracts import NodeConfig, SitePolicy
from medfed.datasets.cache import decode_count
from medfed.launch.deployment import (run_status, save_run_log, start_superlink, start_supernode, submit_run,
                                          wait_finished, write_connection)
from medfed.launch.flower_app import write_flower_app
from medfed.launch.processes import ProcessSession, free_port
from medfed.runs import RunDir

pytestmark = pytest.mark.slow  # starts a real SuperLink and SuperNodes


def write_site_files(breastmnist, folder, names):
    archive = np.load(breastmnist)
    paths = {}
    for i, name in enumerate(names):
        sl = slice(60 * i, 60 * (i + 1))
        paths[name] = folder / f"{name}.npz"
        np.savez(paths[name], train_images=archive["train_images"][sl], train_labels=archive["train_labels"][sl])
    return paths


def test_superlink_and_supernodes_on_localhost(tmp_path, breastmnist):
    sites = ["hospital-a", "hospital-b", "hospital-c"]
    data = write_site_files(breastmnist, tmp_path, sites)
    cfg = small_run_config(tmp_path / "runs", "deployed", **{
        "data.dataset": "npz", "data.image-size": 28, "data.channels": 1, "federation.num-sites": 3,
        "federation.min-sites": 2, "federation.rounds": 1, "federation.round-timeout": 300.0,
        "federation.sample-every": 0, "secagg.enabled": False})  # SecAgg+ deployments: tests/test_deploy_*.py
    run = RunDir(tmp_path / "runs" / "deployed")
    app = write_flower_app(tmp_path / "app", cfg)
    port = free_port()
    with ProcessSession(flwr_home=tmp_path / "flwr-home", log_dir=tmp_path / "logs") as session:
        start_superlink(session, port, database=tmp_path / "superlink.db")
        for name in sites:
            start_supernode(session, f"127.0.0.1:{port}", free_port(), name=name,
                            node_config=NodeConfig(
                                site_name=name, data_path=str(data[name]), data_format="npz",
                                state_dir=str(tmp_path / "state" / name), cap_epsilon=50.0,
                                policy=SitePolicy(delta=1e-5, dataset_size=60, min_sites_per_round=2,
                                                  require_secure_aggregation=False)).to_flower())
        write_connection(session, "local", f"127.0.0.1:{port}")
        run_id = submit_run(session, app, "local")
        # hospital-c's SuperNode disappears mid-round, once it has received the round's model: the round must
        # go on with the other two
        deadline = time.monotonic() + 300
        while "Receiving: train message" not in (tmp_path / "logs" / "hospital-c.log").read_text():
            assert time.monotonic() < deadline, "hospital-c never received round 1"
            time.sleep(0.2)
        victim = dict(session.processes)["hospital-c"]
        victim.send_signal(signal.SIGKILL)
        status = wait_finished(session, "local", run_id, timeout=400, on_tick=run.summary_path.exists)
        save_run_log(session, "local", run_id, tmp_path / "serverapp.log")
        assert status["status"] == "finished:completed", (status, (tmp_path / "serverapp.log").read_text()[-3000:])
        assert run_status(session, "local", run_id)["status"] == "finished:completed"
    (round_1,) = run.rounds()
    assert round_1.participants == ["hospital-a", "hospital-b"] and round_1.aggregated
    # the SuperLink's own reply for the vanished site, matched to it: sampled, then missing
    (missing,) = [s for s in round_1.sites if s.status.value != "trained"]
    assert missing.status.value == "missing" and len(round_1.sites) == 3
    # each site decoded its data once, though it answered several messages (cache in its state folder)
    assert all(decode_count(tmp_path / "state" / name) == 1 for name in ("hospital-a", "hospital-b"))
    assert load_checkpoint(run.latest_checkpoint).step == 1
    for name in sites[:2]:  # each site's own ledger holds what it spent
        assert (tmp_path / "state" / name / "privacy-ledger.jsonl").exists()
    assert not session._marked_pids(), "processes left running after the session closed"
