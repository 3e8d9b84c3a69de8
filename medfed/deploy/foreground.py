"""Keep a service (SuperLink or SuperNode) in the foreground until Ctrl-C, and say why it stopped if it did."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable

from rich.console import Console

from medfed.errors import MedfedError
from medfed.launch.processes import ProcessSession, log_tail

NOT_ACTIVATED = "Failed to activate SuperNode"

# What Flower writes when a SuperNode gives up, and what it means for a hospital's IT team.
SUPERNODE_FAILURES = (
    ("CERTIFICATE_VERIFY_FAILED", "TLS: the SuperLink's certificate is not signed by the CA certificate this site "
                                  "trusts, or does not name the address in 'superlink' (check ca-cert and the "
                                  "coordinator's CA fingerprint)"),
    ("401 Unauthorized", "the coordinator revoked this site's key (or the SuperLink restarted without its "
                         "database); ask the coordinator"),
    (NOT_ACTIVATED, "the SuperLink refused this site's key: it is not registered (send the public key to the "
                     "coordinator: `medfed site register`), or this site's previous "
                     "SuperNode stopped uncleanly less than a minute ago"),
    ("Unable to parse the private key", "the private key file is not an OpenSSH ECDSA key"),
    ("WRONG_VERSION_NUMBER", "TLS: the SuperLink does not speak TLS on that port"),
    # a SuperNode stops itself (SIGINT) when its heartbeat is answered 401; last, as it matches any clean stop
    ("SuperNode terminated gracefully", "the coordinator revoked this site's key (the SuperNode stops itself once "
                                        "the SuperLink no longer accepts it), or someone stopped the SuperNode"),
)


class ServiceExited(MedfedError):
    """A service stopped on its own; ``log`` is what it wrote since it was started."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(message)
        self.log = log


def explain_supernode_exit(log: str) -> str:
    """A one-line reason for a SuperNode's exit, from its log; empty if the log does not say."""
    for needle, reason in SUPERNODE_FAILURES:
        if needle in log:
            return reason
    return ""


def log_size(session: ProcessSession, name: str) -> int:
    """Bytes already in a process's log (logs are appended to across restarts)."""
    path = session.log_path(name)
    return path.stat().st_size if path.exists() else 0


def serve(session: ProcessSession, name: str, proc: subprocess.Popen, *, log_offset: int = 0,
          explain: Callable[[str], str] = lambda log: "", console: Console | None = None) -> None:
    """Block until Ctrl-C/SIGTERM (then the caller's ``with`` block stops every process) or until ``proc``
    exits on its own, which raises :class:`ServiceExited` with the reason (from its log after ``log_offset``)."""
    console = console or Console(stderr=True)
    path = session.log_path(name)
    console.print(f"{name} running (pid {proc.pid}); log: {path}; Ctrl-C stops it", highlight=False)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    try:
        while proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.print(f"stopping {name}", highlight=False)
        return
    finally:
        signal.signal(signal.SIGINT, previous)
    with path.open("rb") as f:
        f.seek(log_offset)
        log = f.read().decode(errors="replace")
    reason = explain(log)
    raise ServiceExited(f"{name} exited with status {proc.returncode}" + (f": {reason}" if reason else "") +
                        f"\nlog {path}:\n{log_tail(path, 15)}", log)
