"""Starting, watching and always cleaning up Flower's own processes (SuperLink, SuperNode, ``flwr`` CLI).

Flower detaches some children into new sessions (SuperExec, the simulation process, Ray), so killing a process
group is not enough. Every process started here carries a session marker in its environment, which its
descendants inherit; :meth:`ProcessSession.close` terminates everything that carries it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from medfed.errors import MedfedError

MARKER = "MEDFED_PROCESS_SESSION"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bin_dir() -> Path:
    """Folder of the running Python's console scripts (``flwr``, ``flower-superlink``, ...)."""
    return Path(sys.executable).parent


def log_tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class ProcessSession:
    """A group of Flower processes sharing one ``FLWR_HOME`` and one cleanup marker."""

    flwr_home: Path
    log_dir: Path
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            MARKER: self.marker,
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{bin_dir()}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        """Start ``args`` in its own session, logging to ``<log_dir>/<name>.log``."""
        log = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
                                cwd=self.log_dir)
        log.close()
        self.processes.append((name, proc))
        return proc

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def wait_healthy(self, name: str, proc: subprocess.Popen, port: int, timeout: float = 60.0,
                     tls_context: object | None = None, host: str = "127.0.0.1") -> None:
        """Poll ``GET /health`` on ``host:port`` until it answers; fail early if the process dies."""
        scheme = "https" if tls_context is not None else "http"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise MedfedError(f"{name} exited with status {proc.returncode}; log "
                                  f"{self.log_path(name)}:\n{log_tail(self.log_path(name))}")
            try:
                with urllib.request.urlopen(f"{scheme}://{host_for_url(host)}:{port}/health", timeout=2,
                                            context=tls_context) as response:  # type: ignore[arg-type]
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.3)
        raise MedfedError(f"{name} did not become healthy on port {port} within {timeout:.0f} s; log "
                          f"{self.log_path(name)}")

    def flwr(self, args: list[str], timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI with this session's ``FLWR_HOME``."""
        result = subprocess.run([str(bin_dir() / "flwr"), *args], capture_output=True, text=True, env=self.env,
                                timeout=timeout, cwd=self.log_dir)
        if check and result.returncode != 0:
            raise MedfedError(f"flwr {' '.join(args[:1])} failed (status {result.returncode}): "
                              f"{(result.stderr or result.stdout).strip()[-2000:]}")
        return result

    def flwr_json(self, args: list[str], timeout: float = 120.0) -> dict:
        result = self.flwr([*args, "--format", "json"], timeout=timeout)
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError as err:
            raise MedfedError(f"flwr {args[0]} returned no JSON: {result.stdout[-500:]}") from err

    def close(self, grace: float = 15.0) -> None:
        """Stop every process of the session: SIGTERM, then SIGKILL after ``grace`` seconds.

        Each process gets SIGTERM once: Flower restores the default handler on the first signal, so a second
        SIGTERM kills a SuperNode before it deactivates at the SuperLink (which then counts it online for a minute
        and refuses its restart)."""
        groups = set()
        for _, proc in self.processes:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
                groups.add(proc.pid)
        for pid in self._marked_pids():
            if _process_group(pid) not in groups:
                _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (self._marked_pids() or
                                               any(p.poll() is None for _, p in self.processes)):
            time.sleep(0.2)
        for pid in self._marked_pids():
            _signal(pid, signal.SIGKILL)
        for _, proc in self.processes:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def _marked_pids(self) -> list[int]:
        """Processes carrying the marker, and every process in their sessions: some of Ray's helpers clear
        their environment but stay in the session of the Ray process that started them."""
        marked = pids_with_env(MARKER, self.marker)
        own = os.getsid(0)
        sessions = {s for s in map(_session_of, marked) if s is not None and s != own}
        return sorted(set(marked) | set(pids_in_sessions(sessions)))

    def __enter__(self) -> ProcessSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit`` so ``with`` blocks (process cleanup) run; restore the handler after."""
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def host_for_url(host: str) -> str:
    """``host`` as it goes in a URL (IPv6 addresses in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def pids_with_env(key: str, value: str) -> list[int]:
    """Live PIDs (other than this one) whose environment has ``key=value`` (Linux ``/proc``; else empty)."""
    needle = f"{key}={value}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                if (entry / "stat").read_text().rsplit(") ", 1)[-1][:1] != "Z":
                    found.append(pid)
        except OSError:
            continue
    return found


def _session_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[-1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def pids_in_sessions(sessions: set[int]) -> list[int]:
    """Live PIDs (other than this one) whose session id is in ``sessions``."""
    if not sessions:
        return []
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid != os.getpid() and _session_of(pid) in sessions:
            try:
                if (entry / "stat").read_text().rsplit(") ", 1)[-1][:1] != "Z":
                    found.append(pid)
            except OSError:
                continue
    return found


def memory_bytes(pids: list[int]) -> int:
    """Summed proportional set size (PSS) of ``pids``: shared pages are split between the processes sharing
    them, so the sum is the memory the group really uses (falls back to RSS where PSS is unavailable)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            total += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")) * 1024
        except (OSError, StopIteration, ValueError):
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
            except (OSError, IndexError, ValueError):
                continue
    return total


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
