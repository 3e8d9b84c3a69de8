"""Only approved code runs at a site (docs/deployment.md, "Only approved code runs at a site").

Fast tests check the bundle rule on real app bundles built by Flower's own FAB builder and the coordinator's
default bind address. The slow ones run a real deployment on 127.0.0.1 (``medfed server init/start``, three
``medfed site start``): a coordinator's bundle with its own ClientApp is refused at every site and its code never
runs there, even once a site approved its hash; the site's task port refuses anyone without the site's secret;
medfed's own bundle still trains a round with DP-SGD and secure aggregation.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import stat
import time
import tomllib
from pathlib import Path

import httpx
import numpy as np
import pytest
import tomli_w
from flwr.cli.build import build_fab_from_disk, build_fab_from_files

from medfed import __version__
from medfed.config import RunConfig, from_flat
from medfed.deploy.app_guard import APPROVALS_FILE, CLIENTAPP_LOG, approve_app, check_bundle, read_approvals
from medfed.deploy.coordinator import CONNECTION, ServerDir, read_settings, site_table, submit_deployed_run
from medfed.errors import ConfigError
from medfed.launch.flower_app import CLIENT_APP, SERVER_APP, flower_app_fab, flower_app_pyproject
from medfed.launch.deployment import wait_finished
from medfed.launch.processes import ProcessSession, bin_dir, free_port
from medfed.privacy.ledger import site_ledger
from medfed.runs import RunDir
from test_deploy import cli

SITES = ("hospital-a", "hospital-b", "hospital-c")


def fab_of(files: dict[str, str]) -> tuple[str, bytes]:
    fab = build_fab_from_files({k: v.encode() for k, v in files.items()})[0]
    return hashlib.sha256(fab).hexdigest(), fab


def pyproject_with(cfg: RunConfig, edit) -> str:
    doc = tomllib.loads(flower_app_pyproject(cfg))
    edit(doc)
    return tomli_w.dumps(doc)


# --- the bundle rule, on real bundles ------------------------------------------------------------------------


def test_medfed_own_bundle_passes_and_is_what_flwr_run_builds(tmp_path):
    cfg = from_flat({"federation.rounds": 3, "privacy.target-epsilon": 4.0, "output.name": "x"})
    from medfed.launch.flower_app import write_flower_app

    built = build_fab_from_disk(write_flower_app(tmp_path / "app", cfg))
    assert built == flower_app_fab(cfg)
    check = check_bundle(hashlib.sha256(built).hexdigest(), built)
    assert check.accepted and not check.approved and check.reason == ""


def test_a_failing_clientapp_replies_with_a_reason_code_never_the_exception_text(tmp_path, monkeypatch, capsys):
    """``run_task``'s own failure branch (outside the site guard): the ClientApp raises with private text; the
    reply and the task status carry only ``Refusal(site, internal-error)``; the text stays in the site's log."""
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.app import Context, Message, RecordDict
    from flwr.common.constant import ErrorCode, SubStatus

    from flwr.supercore.task_identity import TaskIdentity

    from medfed.contracts import Reason, Refusal
    from medfed.deploy import app_guard

    for attr in ("_task_id", "_run_id", "_node_id"):  # what Flower's pull_task_input sets in a task process
        monkeypatch.setattr(TaskIdentity, attr, 1)
    cfg = from_flat({"federation.rounds": 1, "output.name": "x"})
    fab = flower_app_fab(cfg)
    task = Message(RecordDict(), dst_node_id=7, message_type="train")
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    bundle = type("Fab", (), {"hash_str": hashlib.sha256(fab).hexdigest(), "content": fab})()
    pushed: dict[str, object] = {}

    class Heartbeat:
        def __init__(self, *args):
            pass

        start = stop = lambda self: None

    def failing_clientapp(message, context):
        raise RuntimeError("/data/patient-7.dcm: losses [0.12, 0.31]")

    monkeypatch.setattr(app_guard, "runtime_client", lambda *a, **k: type("Client", (), {"close": lambda s: None})())
    monkeypatch.setattr(app_guard, "_load_installed_clientapp", lambda: failing_clientapp)
    monkeypatch.setattr(heartbeat, "HeartbeatSender", Heartbeat)
    monkeypatch.setattr(heartbeat, "make_task_heartbeat_fn_http", lambda client: None)
    monkeypatch.setattr(runtime, "pull_task_input", lambda client: (task, context, type("Run", (), {"run_id": 1})(),
                                                                     bundle))
    monkeypatch.setattr(runtime, "push_message", lambda client, reply, ctx: pushed.update(reply=reply))
    monkeypatch.setattr(runtime, "push_task_output", lambda **kw: pushed.update(kw))

    code = app_guard.run_task("127.0.0.1:1", "token", "hospital-a", None, tmp_path / "refused")

    expected = Refusal("hospital-a", Reason.INTERNAL_ERROR).encode()
    reply = pushed["reply"]
    assert code == 1 and reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason == expected and pushed["details"] == expected
    assert pushed["sub_status"] == SubStatus.FAILED
    assert "patient-7" not in reply.error.reason + pushed["details"]
    assert "patient-7.dcm" in capsys.readouterr().out  # the site's own log keeps the text


@pytest.mark.parametrize("case, files, why", [
    ("own ClientApp", {"pyproject.toml": flower_app_pyproject(RunConfig(), clientapp="evil.client:app"),
                       "evil/client.py": "print('x')"}, "components are not medfed's"),
    ("shadowing medfed", {"pyproject.toml": flower_app_pyproject(RunConfig()),
                          "medfed/federation/client_app.py": "app = None"}, "carries files"),
    ("a README too", {"pyproject.toml": flower_app_pyproject(RunConfig()), "README.md": "hi"}, "carries files"),
    ("unknown setting", {"pyproject.toml": pyproject_with(
        RunConfig(), lambda d: d["tool"]["flwr"]["app"]["config"]["privacy"].update({"off": True}))},
     "run config is not one of medfed"),
    ("another medfed", {"pyproject.toml": pyproject_with(
        RunConfig(), lambda d: d["project"].update({"dependencies": ["medfed==0.0.1"]}))}, "not written by"),
    ("other dependencies", {"pyproject.toml": pyproject_with(
        RunConfig(), lambda d: d["project"].update({"dependencies": [f"medfed=={__version__}", "evil"]}))},
     "not written by"),
    ("extra table", {"pyproject.toml": pyproject_with(
        RunConfig(), lambda d: d["tool"]["flwr"]["app"].update({"include": ["**/*.py"]}))}, "pyproject.toml differs"),
])
def test_bundles_medfed_would_not_write_are_refused(case, files, why):
    sha, fab = fab_of(files)
    check = check_bundle(sha, fab)
    assert not check.accepted and why in check.reason, (case, check)
    assert check.sha256 == sha and check.approvable == (case != "own ClientApp")


def test_bundle_whose_bytes_do_not_match_its_hash_is_refused():
    fab = flower_app_fab(RunConfig())
    check = check_bundle(hashlib.sha256(b"other").hexdigest(), fab)
    assert not check.accepted and "do not match" in check.reason
    assert not check_bundle("", b"not a zip").accepted


def test_approval_admits_a_differing_bundle_but_never_other_components(tmp_path):
    readme_sha, readme_fab = fab_of({"pyproject.toml": flower_app_pyproject(RunConfig()), "README.md": "notes"})
    evil_sha, evil_fab = fab_of({"pyproject.toml": flower_app_pyproject(RunConfig(), clientapp="evil:app"),
                                 "evil.py": "import os"})
    assert read_approvals(tmp_path / APPROVALS_FILE) == frozenset()
    path = approve_app(tmp_path, readme_sha.upper(), note="README added by the coordinator")
    approve_app(tmp_path, evil_sha)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    approved = read_approvals(path)
    assert approved == {readme_sha, evil_sha}
    check = check_bundle(readme_sha, readme_fab, approved)
    assert check.accepted and check.approved
    assert not check_bundle(evil_sha, evil_fab, approved).accepted  # components are never negotiable
    with pytest.raises(ConfigError, match="already approved"):
        approve_app(tmp_path, readme_sha)
    with pytest.raises(ConfigError, match="not a SHA-256"):
        approve_app(tmp_path, "abc")
    path.write_text('app = [{sha256 = "xyz"}]\n')
    with pytest.raises(ConfigError, match=f"{APPROVALS_FILE}: 'xyz' is not a SHA-256"):
        read_approvals(path)


def test_server_init_binds_to_localhost_unless_told(tmp_path):
    out = cli("server", "init", "--dir", tmp_path / "a", "--name", "coordinator.example.org")
    assert read_settings(ServerDir(tmp_path / "a")).host == "127.0.0.1"
    assert "Control API" in out and "no authentication" in out
    cli("server", "init", "--dir", tmp_path / "b", "--name", "coordinator.example.org", "--host", "0.0.0.0")
    assert read_settings(ServerDir(tmp_path / "b")).host == "0.0.0.0"
    cli("server", "init", "--dir", tmp_path / "b", "--renew-cert")  # renewing keeps the chosen bind address
    assert read_settings(ServerDir(tmp_path / "b")).host == "0.0.0.0"


# --- a real deployment ---------------------------------------------------------------------------------------

COORDINATOR_SERVER = '''
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()

@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.time() + 120
    nodes = list(grid.get_node_ids())
    while len(nodes) < 3 and time.time() < deadline:
        time.sleep(1)
        nodes = list(grid.get_node_ids())
    messages = [Message(RecordDict({"config": ConfigRecord({"note": "train"})}), dst_node_id=n, message_type="train")
                for n in nodes]
    replies = grid.send_and_receive(messages, timeout=180)
    Path(context.run_config["report"]).write_text(json.dumps(
        [{"node": r.metadata.src_node_id, "error": r.error.reason if r.has_error() else None} for r in replies]))
'''

COORDINATOR_CLIENT = '''
from pathlib import Path
from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

@app.train()
def train(msg, context):
    # the coordinator's own code, at the site, next to the site's privacy ledger
    Path(context.node_config["state-dir"], "coordinator-code-ran").write_text(context.node_config["data-path"])
    return Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=msg)
'''


def write_coordinator_app(folder: Path, report: Path) -> Path:
    """A bundle whose ServerApp and ClientApp are the coordinator's own code."""
    doc = {"build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
           "project": {"name": "coordinator-app", "version": "1.0.0", "description": "x", "license": "Apache-2.0",
                       "dependencies": []},
           "tool": {"flwr": {"app": {"publisher": "coordinator",
                                     "components": {"serverapp": "coord_app.server:app",
                                                    "clientapp": "coord_app.client:app"},
                                     "config": {"report": str(report)}}}}}
    (folder / "coord_app").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(tomli_w.dumps(doc))
    (folder / "coord_app" / "__init__.py").write_text("")
    (folder / "coord_app" / "server.py").write_text(COORDINATOR_SERVER)
    (folder / "coord_app" / "client.py").write_text(COORDINATOR_CLIENT)
    return folder


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, breastmnist):
    root = tmp_path_factory.mktemp("approved")
    archive = np.load(breastmnist)
    port = free_port()
    srv = root / "coordinator"
    cli("server", "init", "--dir", srv, "--name", "localhost", "--port", port)
    sd = ServerDir(srv)
    session = ProcessSession(flwr_home=root / "test-flwr-home", log_dir=root / "logs")
    sites: dict[str, Path] = {}
    try:
        server = session.start("server", [str(bin_dir() / "medfed"), "server", "start", "--dir", str(srv)])
        session.wait_healthy("server", server, port, timeout=90,
                             tls_context=ssl.create_default_context(cafile=str(sd.ca.cert)))
        for i, name in enumerate(SITES):
            data = root / "data" / f"{name}.npz"
            data.parent.mkdir(parents=True, exist_ok=True)
            np.savez(data, train_images=archive["train_images"][64 * i:64 * (i + 1)],
                     train_labels=archive["train_labels"][64 * i:64 * (i + 1)])
            sites[name] = root / name
            cli("site", "init", "--dir", sites[name], "--name", name, "--superlink", f"localhost:{port}",
                "--ca-cert", sd.ca.cert, "--data", data, "--format", "npz", "--cap-epsilon", 100.0,
                "--runtime-port", free_port())
            cli("site", "register", "--dir", sites[name], "--server-dir", srv)
            session.start(name, [str(bin_dir() / "medfed"), "site", "start", "--dir", str(sites[name])])
        deadline = time.monotonic() + 180
        while True:
            status = {r["name"]: r["status"] for r in site_table(sd)}
            if all(status.get(n) == "online" for n in SITES):
                break
            assert time.monotonic() < deadline, f"sites not online: {status}"
            time.sleep(2)
        yield root, sd, sites
    finally:
        session.close()


def submit_coordinator_app(sd: ServerDir, app_dir: Path) -> dict:
    with sd.session() as session:
        started = session.flwr_json(["run", str(app_dir), CONNECTION])
        return wait_finished(session, CONNECTION, int(started["run-id"]), timeout=400, status_every=5)


@pytest.mark.slow
def test_coordinator_code_never_runs_at_a_site(deployment):
    root, sd, sites = deployment
    report = root / "coordinator-report.json"
    app_dir = write_coordinator_app(root / "coordinator-app", report)
    fab_sha = hashlib.sha256(build_fab_from_disk(app_dir)).hexdigest()
    status = submit_coordinator_app(sd, app_dir)
    assert status["status"] == "finished:completed", status  # the coordinator's ServerApp ran, at the coordinator
    replies = json.loads(report.read_text())
    assert len(replies) == 3 and all(r["error"] for r in replies), replies
    for name, folder in sites.items():
        assert not (folder / "state" / "coordinator-code-ran").exists()
        assert any(r["error"].startswith(f"site {name} refused app bundle {fab_sha[:12]}: its components are not "
                                         "medfed's") for r in replies), (name, replies)
        log = (folder / "logs" / f"{CLIENTAPP_LOG}.log").read_text()
        assert f"REFUSED app bundle {fab_sha}" in log and "nothing in it was loaded" in log
        assert "no approval admits it" in log
        kept = folder / "logs" / "refused-apps" / f"{fab_sha}.fab"
        assert hashlib.sha256(kept.read_bytes()).hexdigest() == fab_sha and stat.S_IMODE(kept.stat().st_mode) == 0o600
    # approving its hash does not make a site run another ClientApp: the components rule still holds
    cli("site", "approve-app", fab_sha, "--dir", sites["hospital-a"])
    report.unlink()
    assert submit_coordinator_app(sd, app_dir)["status"] == "finished:completed"
    assert all("components are not medfed's" in r["error"] for r in json.loads(report.read_text()))
    assert not any((folder / "state" / "coordinator-code-ran").exists() for folder in sites.values())


@pytest.mark.slow
def test_only_the_site_executor_can_claim_tasks(deployment):
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

    from medfed.deploy.app_guard import runtime_client
    from medfed.deploy.sitecfg import read_site_config

    _, _, sites = deployment
    secret = sites["hospital-b"] / "flwr-home" / "superexec-secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(secret.read_bytes()) == 32
    address = f"127.0.0.1:{read_site_config(sites['hospital-b']).runtime_port}"
    for interceptors in ([], [SuperExecAuthHttpInterceptor(master_secret=b"guess" * 8,
                                                           protected_methods={"/flwr.proto.Runtime/AcquireTask"})]):
        client = runtime_client(address, "SuperExec", interceptors)
        try:
            with pytest.raises(httpx.HTTPStatusError) as refused:
                client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        finally:
            client.close()
        assert refused.value.response.status_code == 401 and "Authentication failed" in refused.value.response.text


@pytest.mark.slow
def test_medfed_bundle_still_trains_a_round(deployment):
    _, sd, sites = deployment
    cfg = from_flat({"federation.num-sites": 3, "data.image-size": 28, "data.channels": 1, "federation.rounds": 1,
                     "model.preset": "micro", "train.batch-size": 32, "output.name": "medfed-own",
                     "federation.sample-every": 0, "train.num-samples": 4, "diffusion.sample-steps": 4,
                     "train.device": "cpu", "federation.round-timeout": 300, "secagg.max-weight": 64})
    _, run, status = submit_deployed_run(sd, cfg, show_progress=False)
    assert status["status"] == "finished:completed", status
    (record,) = RunDir(run.root).rounds()
    assert record.aggregated and record.participants == sorted(SITES), record
    fab_sha = hashlib.sha256(build_fab_from_disk(run.root / "flower" / "app")).hexdigest()
    for folder in sites.values():
        log = (folder / "logs" / f"{CLIENTAPP_LOG}.log").read_text()
        assert f"app bundle {fab_sha}: medfed {__version__} own bundle; running the installed {CLIENT_APP}" in log
        assert [e.data["run_name"] for e in site_ledger(folder / "state").entries() if e.kind == "round"] == \
            ["medfed-own"]
    assert SERVER_APP in (run.root / "flower" / "app" / "pyproject.toml").read_text()
