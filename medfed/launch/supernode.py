"""``python -m medfed.launch.supernode [flower-supernode options]``: Flower's SuperNode with shorter waits.

Flower 1.42's SuperNode (``flwr/supernode/start_client_internal.py``) pulls the SuperLink for a message; when none
is waiting it sleeps **3 s** before the next pull, and while its ClientApp works it checks its own state for the
reply every 0.5 s. An object of a message that is not yet available (the coordinator is still uploading it) is
retried after 1 s, 2 s, 4 s ... (``pull_objects``). A SecAgg+ round has four stages, and after each reply a site
usually finds nothing (the coordinator is still waiting for the other sites), so every stage started seconds late:
in the localhost benchmark (docs/benchmarks.md) these waits were most of a deployed round's overhead.

This module runs Flower's unchanged ``flower-supernode`` entry point with those waits shortened
(:func:`tune_supernode`): the idle pull every :data:`IDLE_POLL_S`, checks of its own state every
:data:`LOCAL_WAIT_S`, retries of a missing object from :data:`PULL_BACKOFF_S`. A site's own ClientApp process
(:mod:`medfed.deploy.app_guard`) shortens its retries the same way (:func:`tune_task_pulls`). Nothing else changes:
the same options, connection, TLS, node authentication and process isolation. What it costs: an idle site sends
one small authenticated pull every 0.5 s instead of every 3 s. A newer Flower that no longer waits this way makes
this a no-op; a test checks that the pinned version still does.
"""

from __future__ import annotations

import functools
import sys
import time
from types import ModuleType

IDLE_POLL_S = 0.5
"""Seconds between the SuperNode's pulls while no message waits (Flower: 3 s); a request to the SuperLink."""

LOCAL_WAIT_S = 0.05
"""Seconds between the SuperNode's checks of its own state (its ClientApp's reply; Flower: 0.5 s); no network."""

PULL_BACKOFF_S = (0.1, 1.0)
"""First and longest wait before pulling again an object that is not yet available (Flower: 1 s and 10 s)."""


class TunedSleep:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: a wait of a second or more (the idle pull)
    becomes ``idle_s``, a shorter one (a check of local state) ``local_s``; everything else is ``time``."""

    def __init__(self, idle_s: float = IDLE_POLL_S, local_s: float = LOCAL_WAIT_S) -> None:
        self.idle_s, self.local_s = idle_s, local_s

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.idle_s if seconds >= 1 else self.local_s))

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def _with_backoff(pull: object) -> object:
    """``pull`` (one of Flower's object-pulling functions) retrying from :data:`PULL_BACKOFF_S` instead."""
    pull = getattr(pull, "__wrapped__", pull)  # idempotent
    tuned = functools.partial(pull, initial_backoff=PULL_BACKOFF_S[0], backoff_cap=PULL_BACKOFF_S[1])
    tuned.__wrapped__ = pull  # type: ignore[attr-defined]
    return tuned


def tune_supernode() -> ModuleType:
    """Shorten the waits of Flower's SuperNode loop in this process; returns the module it changed."""
    from flwr.supernode import start_client_internal

    start_client_internal.time = TunedSleep()  # type: ignore[assignment]
    start_client_internal.pull_objects = _with_backoff(start_client_internal.pull_objects)  # type: ignore[assignment]
    return start_client_internal


def tune_task_pulls() -> ModuleType:
    """Shorten the retry waits of a ClientApp process pulling its task from the SuperNode (127.0.0.1)."""
    from flwr.supernode.runtime import run_clientapp

    run_clientapp.pull_and_inflate_object_from_tree = _with_backoff(  # type: ignore[assignment]
        run_clientapp.pull_and_inflate_object_from_tree)
    return run_clientapp


def main() -> None:
    """Run ``flower-supernode`` with the options on the command line."""
    tune_supernode()
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
