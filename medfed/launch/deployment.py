"""Starting a SuperLink and SuperNodes, submitting a run and waiting for its final status.

Used by ``medfed run`` (a SuperLink in simulation mode), by the deployment commands and by the end-to-end tests.
Nothing here is a network layer of its own: these are Flower's own processes and CLI.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from medfed.errors import MedfedError
from medfed.launch.processes import ProcessSession, log_tail
from medfed.progress import progress_bar
from medfed.runs import RunDir

Scalar = bool | int | float | str


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for TLS: the CA certificate (what sites trust) and the SuperLink's certificate and key."""

    ca_cert: Path
    server_cert: Path | None = None
    server_key: Path | None = None


def node_config_arg(values: Mapping[str, Scalar]) -> str:
    """Render a SuperNode ``--node-config``: TOML values, so strings are quoted."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def start_superlink(session: ProcessSession, port: int, *, simulation: bool = False, tls: TLSFiles | None = None,
                    supernode_auth: bool = False, database: Path | None = None, host: str = "127.0.0.1",
                    name: str = "superlink", health_timeout: float = 60.0) -> subprocess.Popen:
    """Start ``flower-superlink`` on ``host:port`` (all of its APIs share that port) and wait until healthy."""
    args = ["flower-superlink", "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if simulation:
        args.append("--simulation")
    if tls is None:
        args.append("--insecure")
    else:
        args += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                 "--ssl-keyfile", str(tls.server_key)]
    if supernode_auth:
        args.append("--enable-supernode-auth")
    if database is not None:
        args += ["--database", str(database)]
    proc = session.start(name, args)
    context = ssl.create_default_context(cafile=str(tls.ca_cert)) if tls else None
    session.wait_healthy(name, proc, port, timeout=health_timeout, tls_context=context,
                         host="127.0.0.1" if host in ("0.0.0.0", "::", "") else host)
    return proc


def start_supernode(session: ProcessSession, superlink: str, port: int, node_config: Mapping[str, Scalar], *,
                    ca_cert: Path | None = None, auth_key: Path | None = None, name: str = "supernode",
                    max_wait_time: float | None = None, executor_secret: Path | None = None) -> subprocess.Popen:
    """Start Flower's SuperNode connecting out to ``superlink`` (host:port); ``port`` is its local runtime API
    port (127.0.0.1). It runs as :mod:`medfed.launch.supernode`: ``flower-supernode`` itself, polling the SuperLink
    every 0.5 s instead of 3 s when idle, so a site sees each stage of a round without waiting seconds for it.

    Without ``executor_secret`` the SuperNode runs each task in Flower's ``flwr-clientapp``, which loads the
    ClientApp named in the run's app bundle. With it (a 0600 file), the SuperNode runs with ``--isolation
    process`` and ``--superexec-auth-secret-file``: it starts no ClientApp itself, and only a process holding the
    secret can claim its tasks (a deployed site's :mod:`medfed.deploy.app_guard`)."""
    args = [sys.executable, "-m", "medfed.launch.supernode", "--superlink", superlink, "--host", "127.0.0.1", "--port", str(port),
            "--node-config", node_config_arg(node_config)]
    if executor_secret is not None:
        args += ["--isolation", "process", "--superexec-auth-secret-file", str(executor_secret)]
    args += ["--root-certificates", str(ca_cert)] if ca_cert else ["--insecure"]
    if auth_key is not None:
        args += ["--auth-supernode-private-key", str(auth_key)]
    if max_wait_time is not None:
        args += ["--max-wait-time", str(max_wait_time)]
    return session.start(name, args)


def write_connection(session: ProcessSession, name: str, address: str, ca_cert: Path | None = None) -> None:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection, used by ``flwr run/ls/log``."""
    security = f'root-certificates = "{ca_cert}"' if ca_cert else "insecure = true"
    (session.flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n')


def submit_run(session: ProcessSession, app_dir: Path, connection: str, federation_config: str | None = None) -> int:
    """``flwr run`` the app; returns the run id."""
    args = ["run", str(app_dir), connection]
    if federation_config:
        args += ["--federation-config", federation_config]
    started = session.flwr_json(args)
    if started.get("run-id") is None:
        raise MedfedError(f"flwr run did not start a run: {json.dumps(started)[:500]}")
    return int(started["run-id"])


def run_status(session: ProcessSession, connection: str, run_id: int) -> dict:
    """The run's entry in ``flwr ls --format json`` (``status`` is e.g. ``running``, ``finished:completed``)."""
    runs = session.flwr_json(["ls", connection, "--run-id", str(run_id)]).get("runs") or []
    return runs[0] if runs else {}


def wait_finished(session: ProcessSession, connection: str, run_id: int, timeout: float,
                  on_tick: Callable[[], bool] | None = None, status_every: float = 15.0,
                  closing_every: float = 2.0) -> dict:
    """Wait until the run's status starts with ``finished``; returns its ``flwr ls`` entry.

    ``flwr ls`` starts a Python process, which is costly on small machines, so it is asked every
    ``status_every`` seconds; once ``on_tick`` (called every second) has returned True (the run has written its
    last output and is shutting down), every ``closing_every`` seconds.
    """
    deadline = time.monotonic() + timeout
    last = 0.0
    closing = False
    while True:
        closing = closing or (on_tick() if on_tick else False)
        if time.monotonic() - last > (closing_every if closing else status_every):
            last = time.monotonic()
            status = run_status(session, connection, run_id)
            if str(status.get("status", "")).startswith("finished"):
                return status
        if time.monotonic() > deadline:
            raise MedfedError(f"federated run {run_id} did not finish within {timeout:.0f} s")
        time.sleep(1.0)


def save_run_log(session: ProcessSession, connection: str, run_id: int, path: Path) -> Path:
    """Write the run's ServerApp log (``flwr log --show``) to ``path``."""
    logs = session.flwr(["log", str(run_id), connection, "--show"], check=False)
    path.write_text(logs.stdout + logs.stderr)
    return path


def follow_run(session: ProcessSession, connection: str, run_id: int, run: RunDir, rounds: int, timeout: float,
               *, show_progress: bool = True, label: str = "federated run") -> dict:
    """Wait for a submitted run with a progress bar per round (from its ``metrics.jsonl``), save the ServerApp
    log to ``<run>/flower/serverapp.log`` and return the final ``flwr ls`` entry.

    Raises:
        MedfedError: the run did not reach ``finished:completed``; the message carries Flower's status and the
            end of the ServerApp log.
    """
    shown = 0
    with progress_bar(label, total=rounds, enabled=show_progress) as advance:
        def on_tick() -> bool:
            nonlocal shown
            records = run.rounds()
            if len(records) > shown:
                for record in records[shown:]:
                    if show_progress and (not record.aggregated or len(record.participants) < len(record.sites)):
                        Console(stderr=True).print(record.summary_line(), highlight=False, markup=False)
                last = records[-1]
                advance(len(records) - shown, round=last.round, trained=len(last.participants))
                shown = len(records)
            return run.summary_path.exists()

        status = wait_finished(session, connection, run_id, timeout, on_tick)
    log = run.root / "flower" / "serverapp.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    save_run_log(session, connection, run_id, log)
    if status.get("status") != "finished:completed":
        raise MedfedError(f"federated run {run_id} ended as {status.get('status')}: "
                          f"{status.get('status-details', '')}\n{log_tail(log)}")
    return status
