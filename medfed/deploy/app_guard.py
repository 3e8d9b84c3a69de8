"""Only approved code runs at a site: medfed's own executor for a SuperNode in process isolation.

Flower's default (``flower-supernode --isolation subprocess``) starts ``flwr-clientapp``, which installs the run's
app bundle (FAB) and imports the ClientApp component the FAB's ``pyproject.toml`` names: any Python file the
coordinator put in the bundle. A medfed site instead starts its SuperNode with ``--isolation process`` and
``--superexec-auth-secret-file``, and ``medfed site start`` itself takes the SuperExec role:

1. :func:`serve_tasks` (a thread of ``medfed site start``) claims each pending ClientApp task from the SuperNode's
   runtime API (127.0.0.1, ``AcquireTask`` signed with the site's secret, so no other local process can claim
   tasks and get their tokens), and hands each task's token to the site's task process
   (``python -m medfed.deploy.app_guard --serve``, started once and restarted if it dies) on its standard input.
   One warm process runs the tasks one after another: no bundle code is ever loaded, so there is nothing to isolate
   between tasks, and each message no longer pays for importing torch and medfed (a deployed SecAgg+ round sends
   each site four).
2. That process (:func:`run_task`, once per task) pulls the task (message, context, run, FAB), checks the FAB with
   :func:`check_bundle` **before anything in it is loaded**, and then either runs the ClientApp of the medfed
   installed at this site (``medfed.federation.client_app:app``), never code from the bundle, or replies with an
   error whose reason is fixed text (the site's name, the bundle's hash and the rule; no site data).

A bundle passes when its SHA-256 equals that of the bundle this site's medfed itself would write for the run
config the bundle carries (:func:`medfed.launch.flower_app.flower_app_fab`): exactly ``pyproject.toml`` with
medfed's components, project table and version, and nothing else. A bundle that differs (other files, another
medfed version) passes only if the site approved its SHA-256 (``medfed site approve-app``, written to
``approved-apps.toml`` in the site folder); it must still name medfed's components, and the site still runs its
own installed ClientApp. Refused bundles are kept for inspection in ``<site>/logs/refused-apps/<sha256>.fab``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import secrets
import subprocess
import sys
import threading
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from medfed import __version__
from medfed.contracts import Reason, Refusal
from medfed.deploy.pki import write_private
from medfed.errors import ConfigError, MedfedError
from medfed.launch.flower_app import CLIENT_APP, SERVER_APP, flower_app_fab, run_config_from_app_table
from medfed.launch.supernode import tune_task_pulls
from medfed.logs import clock

if TYPE_CHECKING:
    from medfed.launch.processes import ProcessSession

APPROVALS_FILE = "approved-apps.toml"
SECRET_FILE = "superexec-secret"
REFUSED_DIR = "refused-apps"
CLIENTAPP_LOG = "clientapp"
MAX_PYPROJECT_BYTES = 1 << 20
"""medfed's own pyproject.toml is a few kB; a larger one is refused before it is decompressed."""
POLL_S = 0.1
"""Seconds between two claims of pending tasks (Flower's SuperExec polls every second): a request to the site's
own SuperNode on 127.0.0.1, so a short interval costs little and each SecAgg+ stage starts sooner."""


@dataclass(frozen=True)
class BundleCheck:
    """What a site decided about one app bundle.

    Attributes:
        sha256: the bundle's SHA-256 (hex), as computed here from its bytes.
        accepted: True when the site runs its own ClientApp for this bundle's tasks.
        reason: why it was refused (empty when accepted).
        approved: accepted because the site approved this hash, not because it is medfed's own bundle.
        approvable: refused, but approving its hash would admit it (it names medfed's components).
    """

    sha256: str
    accepted: bool
    reason: str = ""
    approved: bool = False
    approvable: bool = False


def check_bundle(fab_hash: str, content: bytes, approved: frozenset[str] = frozenset()) -> BundleCheck:
    """Decide whether a site runs tasks of the bundle ``content`` (the FAB zip Flower sent, claimed hash
    ``fab_hash``); ``approved`` holds the SHA-256 hashes the site approved. Loads nothing from the bundle: it
    reads the zip's file list and parses ``pyproject.toml`` as TOML."""
    sha = hashlib.sha256(content).hexdigest()

    def refuse(why: str, approvable: bool = False) -> BundleCheck:
        return BundleCheck(sha256=sha, accepted=False, reason=why, approvable=approvable)

    if sha != fab_hash:
        return refuse(f"its bytes do not match its announced hash {fab_hash[:12]}")
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            names = sorted(archive.namelist())
            if archive.getinfo("pyproject.toml").file_size > MAX_PYPROJECT_BYTES:
                return refuse("its pyproject.toml is larger than any medfed writes")
            doc = tomllib.loads(archive.read("pyproject.toml").decode())
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        return refuse(f"not a readable Flower app bundle ({type(err).__name__})")
    app = doc.get("tool", {}).get("flwr", {}).get("app", {}) if isinstance(doc.get("tool"), dict) else {}
    components = app.get("components") if isinstance(app, dict) else None
    if components != {"serverapp": SERVER_APP, "clientapp": CLIENT_APP}:
        return refuse("its components are not medfed's own ServerApp and ClientApp")
    if sha in approved:
        return BundleCheck(sha256=sha, accepted=True, approved=True)
    extra = [n for n in names if n not in ("pyproject.toml", ".info/CONTENT")]
    if extra:
        return refuse(f"it carries files medfed's bundle does not ({', '.join(extra[:5])}"
                      f"{', ...' if len(extra) > 5 else ''}) and the site has not approved it", approvable=True)
    written_by = doc.get("project", {}).get("dependencies") if isinstance(doc.get("project"), dict) else None
    if written_by != [f"medfed=={__version__}"]:
        return refuse(f"it was not written by the medfed this site runs (medfed {__version__}) and the site has "
                      "not approved it", approvable=True)
    try:
        expected = flower_app_fab(run_config_from_app_table(app.get("config", {})))
    except (ConfigError, TypeError, ValueError) as err:
        return refuse(f"its run config is not one of medfed {__version__} ({err})", approvable=True)
    if hashlib.sha256(expected).hexdigest() != sha:
        return refuse("its pyproject.toml differs from the one medfed writes for its own run config and the site "
                      "has not approved it", approvable=True)
    return BundleCheck(sha256=sha, accepted=True)


def refusal_reason(site: str, check: BundleCheck) -> str:
    """The error reason a site sends for a refused bundle: fixed text, no site data."""
    return (f"site {site} refused app bundle {check.sha256[:12]}: {check.reason}; a medfed site runs only its own "
            "installed ClientApp, for medfed's own bundle or one the site approved (medfed site approve-app)")


# --- approvals ----------------------------------------------------------------------------------------------


def approvals_path(site_dir: Path) -> Path:
    return Path(site_dir) / APPROVALS_FILE


def read_approvals(path: Path | None) -> frozenset[str]:
    """SHA-256 hashes of the bundles a site approved; none when ``path`` is None or does not exist.

    Raises:
        ConfigError: the file is not valid TOML or an entry is not a SHA-256 in hex.
    """
    if path is None or not path.exists():
        return frozenset()
    try:
        entries = tomllib.loads(path.read_text()).get("app", [])
        hashes = frozenset(str(e["sha256"]) for e in entries)
    except (tomllib.TOMLDecodeError, TypeError, KeyError, AttributeError) as err:
        raise ConfigError(f"{path}: not a list of approved app bundles ({err})") from None
    bad = sorted(h for h in hashes if not _is_sha256(h))
    if bad:
        raise ConfigError(f"{path}: '{bad[0]}' is not a SHA-256 (64 hex digits)")
    return hashes


def approve_app(site_dir: Path, sha256: str, note: str = "") -> Path:
    """Add a bundle's SHA-256 to the site's approvals (``approved-apps.toml``, 0600); returns the file.

    Raises:
        ConfigError: not a SHA-256, or already approved.
    """
    sha = sha256.strip().lower()
    if not _is_sha256(sha):
        raise ConfigError(f"'{sha256}' is not a SHA-256 (64 hex digits, as `medfed site start` logs a refused "
                          "bundle)")
    path = approvals_path(site_dir)
    if sha in read_approvals(path):
        raise ConfigError(f"{path}: {sha} is already approved")
    entries = tomllib.loads(path.read_text()).get("app", []) if path.exists() else []
    entries.append({"sha256": sha, "approved-at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "note": note})
    text = ("# app bundles (FAB SHA-256) this site runs besides medfed's own (medfed site approve-app);\n"
            "# the site still runs its own installed ClientApp for them\n" + tomli_w.dumps({"app": entries}))
    return write_private(path, text.encode(), overwrite=True)


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def write_superexec_secret(path: Path) -> Path:
    """A fresh 32-byte secret, 0600, shared by the SuperNode and this site's executor (nobody else)."""
    return write_private(path, secrets.token_bytes(32), overwrite=True)


# --- the executor: claim tasks, one fresh process each ---------------------------------------------------------


def runtime_client(address: str, component: str, interceptors: list, *, retry: bool = False) -> Any:
    """A client of a SuperNode's runtime API on 127.0.0.1 (plain HTTP, as Flower's own SuperExec uses it).

    ``retry`` uses Flower's retry policy, which answers a 401 by sending SIGINT to its own process: right for a
    one-task process, wrong for ``medfed site start`` (without it, errors are raised to the caller)."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeTracingInterceptor(), RuntimeVersionHttpInterceptor(component_name=component),
                      *interceptors], retry_invoker=make_simple_http_retry_invoker() if retry else None)


def serve_tasks(session: ProcessSession, runtime_address: str, secret: Path, site: str, stop: threading.Event,
                approvals: Path | None = None, poll_s: float = POLL_S) -> None:
    """Claim the SuperNode's pending ClientApp tasks until ``stop`` is set, starting for each one
    ``python -m medfed.deploy.app_guard`` (output appended to the session's ``clientapp.log``).

    Args:
        runtime_address: the SuperNode's runtime API (``127.0.0.1:<runtime-port>``).
        secret: the file passed to the SuperNode as ``--superexec-auth-secret-file``.
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

    client = runtime_client(runtime_address, "SuperExec", [SuperExecAuthHttpInterceptor(
        master_secret=secret.read_bytes(), protected_methods={"/flwr.proto.Runtime/AcquireTask"})])
    args = [sys.executable, "-m", "medfed.deploy.app_guard", "--runtime-api-address", runtime_address,
            "--site", site, "--refused-dir", str(session.log_dir / REFUSED_DIR), "--serve"]
    if approvals is not None:
        args += ["--approvals", str(approvals)]
    running: list[subprocess.Popen] = []
    worker: subprocess.Popen | None = None
    failures = 0
    try:
        while not stop.is_set():
            running = [p for p in running if p.poll() is None]
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                failures = 0
            except Exception as err:  # noqa: BLE001 - the SuperNode may be starting or restarting: try again
                failures += 1
                if failures % 60 == 5:  # not while the SuperNode starts; then every few minutes
                    print(f"site {site}: the SuperNode's runtime API on {runtime_address} does not answer "
                          f"({type(err).__name__}: {str(err)[:200]}); retrying", flush=True)
                stop.wait(3 * poll_s)
                continue
            if res.HasField("task") and res.token:
                for _ in range(2):  # a worker that died in between is replaced once
                    if worker is None or worker.poll() is not None:  # (re)start the site's warm task process
                        with session.log_path(CLIENTAPP_LOG).open("ab") as log:
                            worker = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=log,
                                                      stderr=subprocess.STDOUT, env=session.env,
                                                      start_new_session=True, cwd=session.log_dir)
                        running.append(worker)
                    try:
                        assert worker.stdin is not None
                        worker.stdin.write(res.token.encode() + b"\n")  # never on a command line: others read it
                        worker.stdin.flush()
                        break
                    except OSError:
                        worker = None
                continue
            stop.wait(poll_s)
    finally:
        client.close()
        for proc in running:
            if proc.poll() is None:
                proc.terminate()


def start_task_server(session: ProcessSession, runtime_address: str, secret: Path, site: str,
                      approvals: Path | None = None) -> tuple[threading.Thread, threading.Event]:
    """Run :func:`serve_tasks` in a daemon thread; set the returned event (then join) to stop it."""
    stop = threading.Event()
    thread = threading.Thread(target=serve_tasks, name="medfed-app-guard", daemon=True,
                              args=(session, runtime_address, secret, site, stop, approvals))
    thread.start()
    return thread, stop


# --- one task ---------------------------------------------------------------------------------------------


def _load_installed_clientapp() -> object:
    module, _, attr = CLIENT_APP.partition(":")
    return getattr(importlib.import_module(module), attr)


def run_task(runtime_address: str, token: str, site: str, approvals: Path | None, refused_dir: Path) -> int:
    """Pull one task, check its bundle, run the installed ClientApp or refuse; push the reply and the task's
    status. Returns the process exit status (0: replied with the ClientApp's answer)."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    client = runtime_client(runtime_address, "flwr-clientapp", [RuntimeTokenHttpInterceptor(token)], retry=True)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details, code = SubStatus.FAILED, "ClientApp task failed", 1
    wall, start = time.time(), time.monotonic()
    try:
        message, context, run, fab = pull_task_input(client)
        pulled = time.monotonic() - start
        check = check_bundle(fab.hash_str, fab.content, read_approvals(approvals))
        if check.accepted:
            print(f"[run {run.run_id}] app bundle {check.sha256}: "
                  f"{'approved by this site' if check.approved else 'medfed ' + __version__ + ' own bundle'}; "
                  f"running the installed {CLIENT_APP}", flush=True)
            reply = _load_installed_clientapp()(message=message, context=context)
            status, details, code = SubStatus.COMPLETED, "", 0
            print(f"[run {run.run_id}] {message.metadata.message_type} task at {clock(wall)}: pulled in "
                  f"{pulled:.2f} s, answered in {time.monotonic() - start - pulled:.2f} s", flush=True)
        else:
            details = refusal_reason(site, check)
            hint = (f"; if you trust it: medfed site approve-app {check.sha256}" if check.approvable
                    else "; no approval admits it")
            print(f"[run {run.run_id}] REFUSED app bundle {check.sha256}: {check.reason}; nothing in it was loaded. "
                  f"Kept for inspection in {refused_dir}{hint}", flush=True)
            write_private(refused_dir / f"{check.sha256}.fab", fab.content, overwrite=True)
            reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=details), reply_to=message)
    except Exception as ex:  # noqa: BLE001 - the text stays in the site's log; the coordinator gets a reason code
        print(f"ClientApp raised an exception: {type(ex).__name__}: {ex}", flush=True)
        details = Refusal(site, Reason.INTERNAL_ERROR).encode()
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        finally:
            push_task_output(client=client, context=context, sub_status=status, details=details)
            heartbeat.stop()
            client.close()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="medfed's ClientApp process for one task (started by "
                                                 "`medfed site start`; the task token comes on stdin)")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--site", required=True)
    parser.add_argument("--approvals", type=Path, default=None)
    parser.add_argument("--refused-dir", type=Path, required=True)
    parser.add_argument("--serve", action="store_true", help="run one task per token line on stdin until it closes")
    args = parser.parse_args(argv)
    tune_task_pulls()  # the task's objects are retried from 0.1 s, not 1 s, while the SuperNode still fetches them
    if args.serve:  # the site's warm task process: medfed imported once, each task checked and run in turn
        for line in sys.stdin:
            if line.strip():
                try:
                    run_task(args.runtime_api_address, line.strip(), args.site, args.approvals, args.refused_dir)
                except Exception as err:  # noqa: BLE001 - one task's failure (reported to Flower) ends only that task
                    print(f"task failed before it could reply: {type(err).__name__}: {err}", flush=True)
        return 0
    token = sys.stdin.readline().strip()
    if not token:
        raise MedfedError("no task token on standard input")
    return run_task(args.runtime_api_address, token, args.site, args.approvals, args.refused_dir)


if __name__ == "__main__":
    sys.exit(main())
