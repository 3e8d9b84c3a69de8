"""A secure hospital deployment on 127.0.0.1, run the way docs/deployment.md tells people to run it.

One deployment is shared by the module (a deployed round costs 30-60 s): ``medfed server init/start`` (CA, TLS,
site authentication, persistent database), three sites made with ``medfed site init`` and registered, each
running ``medfed site start`` on its own data folder (BreastMNIST as .npz, BreastMNIST as PNGs, CT DICOMs with
identifying headers), plus an unregistered site and two SuperNodes that do not trust the coordinator's CA.
"""

from __future__ import annotations

import io
import json
import os
import signal
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

import medfed
from medfed.cli import app
from medfed.config import from_flat
from medfed.deploy.foreground import NOT_ACTIVATED, ServiceExited, explain_supernode_exit
from medfed.deploy.pki import create_ca
from medfed.deploy.coordinator import CONNECTION, ServerDir, node_statuses, site_table, submit_deployed_run
from medfed.deploy.hospital import run_site
from medfed.datasets.cache import decode_count
from medfed.deploy.sitecfg import read_site_config
from medfed.launch.deployment import run_status, start_supernode
from medfed.launch.processes import MARKER, ProcessSession, bin_dir, free_port, pids_with_env
from medfed.privacy.ledger import site_ledger
from medfed.runs import RunDir
from medical_files import find_leaks, write_planted_dicoms

pytestmark = pytest.mark.slow

SITES = ("hospital-a", "hospital-b", "hospital-c")
CAPS = {"hospital-a": 12.5, "hospital-b": 100.0, "hospital-c": 100.0}
"""hospital-a's cap fits run 1 (2 rounds planned to epsilon 8) and the one-round rollback run (planned to epsilon 8:
11.18 composed with run 1 by RDP), but no further such round (13.69)."""
RUN_SETTINGS = ["--set", "federation.sample-every=0", "--set", "train.num-samples=4", "--set",
                "diffusion.sample-steps=4", "--set", "train.device=cpu", "--set", "federation.round-timeout=300",
                "--set", "secagg.max-weight=64"]


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exit_code != 0:
        raise AssertionError(f"medfed {' '.join(map(str, args))} failed ({result.exit_code}): {result.output}"
                             ) from result.exception
    return result.output


def write_site_data(breastmnist: Path, root: Path) -> tuple[dict[str, tuple[Path, str]], list[str]]:
    """Three different site folders from real images; returns ``{site: (path, format)}`` and the DICOM secrets."""
    archive = np.load(breastmnist)
    npz = root / "a" / "ultrasound.npz"
    npz.parent.mkdir(parents=True)
    np.savez(npz, train_images=archive["train_images"][:64], train_labels=archive["train_labels"][:64])
    for i, (image, label) in enumerate(zip(archive["train_images"][64:128], archive["train_labels"][64:128, 0])):
        folder = root / "b" / ("malignant" if label == 0 else "benign-or-normal")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    secrets = write_planted_dicoms(root / "c", {"CT_small.dcm": 40})
    return {"hospital-a": (npz, "npz"), "hospital-b": (root / "b", "folder"), "hospital-c": (root / "c", "dicom")}, \
        secrets


@dataclass
class Deployment:
    root: Path
    server: ServerDir
    session: ProcessSession
    sites: dict[str, Path]
    secrets: list[str]
    outsiders: dict[str, subprocess.Popen] = field(default_factory=dict)
    left_running: list[int] | None = None

    def site_log(self, name: str) -> str:
        return self.session.log_path(name).read_text(errors="replace")

    def start_site(self, name: str, log_name: str | None = None) -> subprocess.Popen:
        return self.session.start(log_name or name, [str(bin_dir() / "medfed"), "site", "start", "--dir",
                                                     str(self.sites[name])])

    def wait_online(self, names: tuple[str, ...], timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            status = {r["name"]: r["status"] for r in site_table(self.server) if r["revoked_at"] is None}
            if all(status.get(n) == "online" for n in names):
                return
            assert time.monotonic() < deadline, f"sites not online: {status}"
            time.sleep(2)

    def flwr_homes(self) -> list[str]:
        return [str(self.server.root / "flwr-home"), *(str(p / "flwr-home") for p in self.sites.values())]

    def leftovers(self) -> list[int]:
        pids = pids_with_env(MARKER, self.session.marker)
        for home in self.flwr_homes():
            pids += pids_with_env("FLWR_HOME", home)
        return sorted(set(pids))

    def close(self) -> None:
        """Stop everything; what was still running afterwards is recorded, then killed."""
        if self.left_running is None:
            self.session.close()
            self.left_running = self.leftovers()
            for pid in self.left_running:
                os.kill(pid, signal.SIGKILL)


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"process {proc.args} still running after {timeout:.0f} s") from None


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, breastmnist):
    root = tmp_path_factory.mktemp("deploy")
    data, secrets = write_site_data(breastmnist, root / "data")
    port = free_port()
    srv = root / "coordinator"
    cli("server", "init", "--dir", srv, "--name", "localhost", "--port", port)
    sd = ServerDir(srv)
    session = ProcessSession(flwr_home=root / "test-flwr-home", log_dir=root / "logs")
    dep = Deployment(root=root, server=sd, session=session, sites={}, secrets=secrets)
    try:
        server = session.start("server", [str(bin_dir() / "medfed"), "server", "start", "--dir", str(srv)])
        session.wait_healthy("server", server, port, timeout=90,
                             tls_context=ssl.create_default_context(cafile=str(sd.ca.cert)))
        for name in [*SITES, "intruder"]:
            path, fmt = data.get(name, data["hospital-a"])
            dep.sites[name] = root / name
            cli("site", "init", "--dir", dep.sites[name], "--name", name, "--superlink", f"localhost:{port}",
                "--ca-cert", sd.ca.cert, "--data", path, "--format", fmt,
                "--cap-epsilon", CAPS.get(name, 100.0), "--runtime-port", free_port())
            if name in SITES:
                cli("site", "register", "--dir", dep.sites[name], "--server-dir", srv)
        for name in SITES:
            dep.start_site(name)
        # a SuperNode with a registered key that trusts another CA, and one with no CA (the system store)
        stranger_ca = create_ca(root / "stranger-ca")
        b = read_site_config(dep.sites["hospital-b"])
        dep.outsiders["wrong-ca"] = start_supernode(
            session, f"localhost:{port}", free_port(), b.node_config(), ca_cert=stranger_ca.cert,
            auth_key=b.private_key, name="wrong-ca", max_wait_time=30)
        dep.outsiders["no-ca"] = session.start("no-ca", [
            "flower-supernode", "--superlink", f"localhost:{port}", "--port", str(free_port()),
            "--auth-supernode-private-key", str(b.private_key), "--max-wait-time", "30"])
        dep.wait_online(SITES)
        yield dep
    finally:
        dep.close()


def run_config(name: str, rounds: int, *sets: str):
    return from_flat({"federation.num-sites": 3, "data.image-size": 28, "data.channels": 1, "federation.rounds": rounds,
                      "model.preset": "micro", "train.batch-size": 32, "output.name": name,
                      **dict(s.split("=", 1) for s in RUN_SETTINGS[1::2]), **dict(s.split("=", 1) for s in sets)})


@pytest.fixture(scope="module")
def first_run(deployment):
    """Two rounds with the defaults: DP-SGD at every site and secure aggregation."""
    out = cli("server", "run", "--dir", deployment.server.root, "--sites", 3, "--image-size", 28, "--channels", 1,
              "--rounds", 2, "--preset", "micro", "--batch-size", 32, "--name", "first", *RUN_SETTINGS)
    assert "finished:completed" in out, out
    return RunDir(deployment.server.runs / "first")


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def rollback_run(deployment, first_run):
    """Between runs, hospital-b's operator truncates its privacy ledger (drops the last round's entry, which would
    give the spent budget back). The next run's round is refused by hospital-b, whose ledger no longer extends the
    coordinator's anchor; the two others, left alone, withhold their key shares (a sum over 2 sites). The ledger is
    put back afterwards."""
    state = deployment.sites["hospital-b"] / "state"
    ledger = site_ledger(state).path
    original = ledger.read_bytes()
    ledger.write_bytes(b"".join(original.splitlines(keepends=True)[:-1]))
    try:
        verify = invoke("privacy", "verify", state, "--anchors", deployment.server.anchors, "--site", "hospital-b")
        report = invoke("privacy", "report", "--site", state, "--site-name", "hospital-b", "--anchors",
                        deployment.server.anchors, "--out", deployment.root / "rollback-report")
        _, run, status = submit_deployed_run(deployment.server, run_config("rollback", 1), show_progress=False)
        assert status["status"] == "finished:completed", status
    finally:
        ledger.write_bytes(original)
    return run, verify, report


@pytest.fixture(scope="module")
def second_run(deployment, rollback_run):
    """hospital-a's SuperNode is stopped and started again, then a second run of one round: hospital-a is at its
    cap and refuses; the other two would be a sum over 2 sites, below their policy's minimum (3), so they refuse
    too and nothing is aggregated."""
    site_a = dict(deployment.session.processes)["hospital-a"]
    site_a.send_signal(signal.SIGTERM)
    assert wait_exit(site_a, 60) == 128 + signal.SIGTERM
    home = str(deployment.sites["hospital-a"] / "flwr-home")
    assert not pids_with_env("FLWR_HOME", home), "hospital-a's SuperNode outlived `medfed site start`"
    status = {r["name"]: r["status"] for r in site_table(deployment.server)}
    assert status["hospital-a"] == "offline"  # it signed off at the SuperLink, so it can come back at once
    deployment.start_site("hospital-a", log_name="hospital-a-restarted")
    deployment.wait_online(SITES)
    run_id, run, status = submit_deployed_run(deployment.server, run_config("second", 1), show_progress=False)
    assert status["status"] == "finished:completed", status
    return run_id, run


@pytest.fixture(scope="module")
def policy_runs(deployment, second_run):
    """A coordinator submits, in turn, runs that break the sites' (default, strict) policy. Each site refuses,
    before it loads any data; the runs end cleanly with the refusals recorded."""
    before = {name: len(site_ledger(deployment.sites[name] / "state").entries()) for name in SITES}
    runs = {}
    for rule, setting in [("policy.require-dp", "privacy.enabled=false"),
                          ("policy.require-secure-aggregation", "secagg.enabled=false"),
                          ("policy.delta", "privacy.delta=0.5")]:
        cfg = run_config(f"breaks-{rule}", 1, setting, "federation.round-timeout=120")
        _, run, status = submit_deployed_run(deployment.server, cfg, show_progress=False)
        assert status["status"] == "finished:completed", (rule, status)
        runs[rule] = run
    return runs, before


def ledger_rounds(deployment, name):
    return [e for e in site_ledger(deployment.sites[name] / "state").entries() if e.kind == "round"]


def test_unregistered_site_is_refused(deployment):
    """What `medfed site start` runs: refused activation is retried once, then reported."""
    shown = io.StringIO()
    with pytest.raises(ServiceExited) as refused:
        run_site(deployment.session, read_site_config(deployment.sites["intruder"]), Console(file=shown),
                 retries=1, wait_s=1)
    assert NOT_ACTIVATED in refused.value.log
    assert "the SuperLink refused this site's key: it is not registered" in str(refused.value)
    assert shown.getvalue().count("connecting out to") == 2 and "retrying in 1 s" in shown.getvalue()
    assert len(node_statuses(deployment.server)) == len(SITES)  # Flower knows only the registered keys
    table = site_table(deployment.server)
    assert sorted(r["name"] for r in table) == sorted(SITES)
    assert len(json.loads(deployment.server.registry.read_text())["sites"]) == 3


def test_supernode_without_the_ca_certificate_cannot_connect(deployment):
    for name, proc in deployment.outsiders.items():
        assert wait_exit(proc, 120) != 0, name
        log = deployment.site_log(name)
        assert "CERTIFICATE_VERIFY_FAILED" in log, (name, log[-2000:])
        assert explain_supernode_exit(log).startswith("TLS:")
    status = {r["name"]: r["status"] for r in site_table(deployment.server)}
    assert status["hospital-b"] == "online"  # the key the outsiders used still works over the right TLS


def test_secure_private_run_completes_with_three_sites(deployment, first_run):
    with deployment.server.session() as session:
        runs = session.flwr_json(["ls", CONNECTION]).get("runs", [])
        assert [r["status"] for r in runs] == ["finished:completed"]
        assert run_status(session, CONNECTION, int(runs[0]["run-id"]))["status"] == "finished:completed"
    rounds = first_run.rounds()
    assert [r.round for r in rounds] == [1, 2]
    for r in rounds:
        assert r.aggregated and r.participants == list(SITES) and len(r.sites) == 3
        assert r.weights == {"hospital-a": 64.0, "hospital-b": 64.0, "hospital-c": 40.0}  # the declared sizes
    summary = json.loads(first_run.summary_path.read_text())
    assert summary["rounds_completed"] == 2 and summary["refusals"] == []
    assert summary["privacy"]["label"].startswith("DP-SGD")
    assert sorted(summary["privacy"]["sites"]) == list(SITES)
    assert summary["secure_aggregation"]["rounds"].keys() == {"1", "2"}
    out = cli("server", "rounds", first_run.root)
    assert "round 2: aggregated | trained: hospital-a, hospital-b, hospital-c" in out
    leaks = find_leaks([p for p in deployment.server.root.rglob("*") if p.is_file()], deployment.secrets)
    assert not leaks, leaks[:5]
    # every site answered 8 messages (4 SecAgg+ stages x 2 rounds), each in a fresh process, but decoded its
    # data once (the cache in its own state folder)
    for name in SITES:
        assert decode_count(deployment.sites[name] / "state") == 1, name


def test_each_site_ledger_and_privacy_report_show_the_budget_spent(deployment, first_run):
    summary = json.loads(first_run.summary_path.read_text())["privacy"]["sites"]
    versions = set()
    for name in SITES:
        rounds = [e for e in ledger_rounds(deployment, name) if e.data["run_name"] == "first"]
        assert [e.data["round"] for e in rounds] == [1, 2]
        assert 0 < rounds[0].data["epsilon"] < rounds[1].data["epsilon"] <= 8.0 + 1e-6
        assert rounds[1].data["epsilon"] == pytest.approx(summary[name]["epsilon"])
        version = rounds[0].data["code_version"]  # what ran on the site's data: its own installed medfed
        assert version["medfed"] == medfed.__version__ and len(version["medfed_sources_sha256"]) == 64
        versions.add(version["medfed_sources_sha256"])
        assert "intact" in cli("privacy", "verify", deployment.sites[name] / "state")
    assert len(versions) == 1  # one installed medfed, at every site
    report_dir = deployment.root / "privacy-report"
    out = cli("privacy", "report", *[a for n in SITES for a in ("--site", deployment.sites[n] / "state")],
              "--out", report_dir)
    report = {s["source"].split()[-1]: s for s in json.loads((report_dir / "privacy-report.json").read_text())["sites"]}
    for name in SITES:
        site = report[str(site_ledger(deployment.sites[name] / "state").path)]
        assert site["spent_epsilon"] >= summary[name]["epsilon"] - 1e-6 and site["cap_epsilon"] == CAPS[name]
        assert f"epsilon {site['spent_epsilon']:.4f}" in out


def test_a_rolled_back_ledger_is_refused_and_named(deployment, first_run, rollback_run):
    run, verify, report = rollback_run
    anchors = json.loads(deployment.server.anchors.read_text())["sites"]
    assert sorted(anchors) == list(SITES)  # the first run's heads, recorded by the coordinator
    for result in (verify, report):  # one-line errors (MedfedError: the console entry point prints it)
        said = result.output + str(result.exception)
        assert result.exit_code != 0 and "truncated" in said, said
    (record,) = run.rounds()
    reasons = {s.site: (s.status.value, s.reason.value if s.reason else None) for s in record.sites}
    assert reasons["hospital-b"] == ("refused", "ledger"), record
    assert not record.aggregated
    assert [e.data["run_name"] for e in ledger_rounds(deployment, "hospital-b")] == ["first", "first"]


def test_restarted_site_keeps_its_budget_and_refuses_at_its_cap(deployment, first_run, second_run):
    _, run = second_run
    restarted = deployment.site_log("hospital-a-restarted")
    spent_first = ledger_rounds(deployment, "hospital-a")[-1].data["epsilon"]
    assert f"epsilon spent {spent_first:.4f} of cap 12.5" in restarted  # read back from its ledger at start
    entries = [e for e in site_ledger(deployment.sites["hospital-a"] / "state").entries() if e.kind != "key-rotation"]
    refusals = [e for e in entries if e.kind == "refusal"]
    assert len(refusals) == 1 and refusals[0].data["run_name"] == "second"
    assert "privacy cap reached" in refusals[0].data["reason"]
    # run 1 (2 rounds), the rollback run (it trained; the round was not aggregated), then the refusal
    assert [e.kind for e in entries] == ["round", "round", "round", "refusal"]
    (record,) = run.rounds()
    reasons = {s.site: (s.status.value, s.reason.value if s.reason else None) for s in record.sites}
    assert reasons == {"hospital-a": ("refused", "privacy-cap"),
                       "hospital-b": ("refused", "policy.min-sites-per-round"),
                       "hospital-c": ("refused", "policy.min-sites-per-round")}, record
    assert not record.aggregated  # a sum over 2 sites would have revealed each to the other
    assert "privacy-cap" in cli("server", "rounds", run.root)
    for name in ("hospital-b", "hospital-c"):  # refused before training in this run: nothing spent
        assert "second" not in [e.data["run_name"] for e in ledger_rounds(deployment, name)]


def test_sites_refuse_runs_that_break_their_policy_and_spend_nothing(deployment, policy_runs):
    runs, before = policy_runs
    for rule, run in runs.items():
        (record,) = run.rounds()
        assert not record.aggregated
        assert {s.site: (s.status.value, s.reason.value) for s in record.sites} == {
            name: ("refused", rule) for name in SITES}, (rule, record)
        summary = json.loads(run.summary_path.read_text())
        assert summary["rounds_completed"] == 0 and {r["reason"] for r in summary["refusals"]} == {rule}
    for name in SITES:  # no round entry, no spend, no update: the ledgers did not move
        assert len(site_ledger(deployment.sites[name] / "state").entries()) == before[name], name


def test_revoked_site_is_disconnected(deployment, policy_runs):
    out = cli("server", "revoke-site", "hospital-c", "--dir", deployment.server.root)
    assert "revoked site 'hospital-c'" in out
    site_c = dict(deployment.session.processes)["hospital-c"]
    assert wait_exit(site_c, 120) == 2
    assert "the coordinator revoked this site's key" in deployment.site_log("hospital-c")
    status = {r["name"]: r["status"] for r in site_table(deployment.server)}
    assert status["hospital-c"] == "unregistered"


def test_every_process_is_cleaned_up(deployment, policy_runs):
    deployment.close()
    assert deployment.left_running == [], "processes left running after the deployment closed"
    assert all(p.poll() is not None for _, p in deployment.session.processes)
