"""medfed's SuperNode launcher: Flower's ``flower-supernode`` with its waits shortened (medfed.launch.supernode)."""

import inspect
import time

from medfed.launch import supernode


def test_pinned_flower_still_waits_where_medfed_shortens_it():
    """The tuning replaces ``time`` and two pull functions inside Flower modules; a Flower that no longer waits
    there (or not through those names) must be noticed here, not by slower rounds."""
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode import start_client_internal
    from flwr.supernode.runtime import run_clientapp

    source = inspect.getsource(start_client_internal)
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source and "pull_objects(" in source
    assert "pull_and_inflate_object_from_tree(" in inspect.getsource(run_clientapp.pull_task_input)
    for pull in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        assert {"initial_backoff", "backoff_cap"} <= set(inspect.signature(pull).parameters)


def test_tuned_sleep_shortens_idle_and_local_waits(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    tuned = supernode.TunedSleep(idle_s=0.5, local_s=0.05)
    tuned.sleep(3)
    tuned.sleep(0.5)
    tuned.sleep(0.01)
    assert slept == [0.5, 0.05, 0.01]
    assert tuned.monotonic is time.monotonic


def test_tuning_patches_flower_once(monkeypatch):
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode import start_client_internal
    from flwr.supernode.runtime import run_clientapp

    for module, name in ((start_client_internal, "time"), (start_client_internal, "pull_objects"),
                         (run_clientapp, "pull_and_inflate_object_from_tree")):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    for _ in range(2):  # idempotent
        supernode.tune_supernode()
        supernode.tune_task_pulls()
    assert isinstance(start_client_internal.time, supernode.TunedSleep)
    pull = start_client_internal.pull_objects
    assert pull.func is inflatable_utils.pull_objects
    assert pull.keywords == {"initial_backoff": 0.1, "backoff_cap": 1.0}
    assert run_clientapp.pull_and_inflate_object_from_tree.func is inflatable_utils.pull_and_inflate_object_from_tree


def test_start_supernode_runs_the_launcher():
    """``start_supernode`` starts medfed's launcher module with Flower's options (the deployment tests run it)."""
    from medfed.launch.deployment import start_supernode

    class Session:
        def start(self, name, args):
            self.args = args

    session = Session()
    start_supernode(session, "localhost:9092", 9094, {"medfed-node-config": 1}, max_wait_time=1)
    assert session.args[1:3] == ["-m", "medfed.launch.supernode"]
    assert session.args[3:5] == ["--superlink", "localhost:9092"]
