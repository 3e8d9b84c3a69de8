"""``medfed run``: a federated run of N simulated sites on one machine, through Flower's simulation engine.

It starts a private SuperLink in simulation mode on a free 127.0.0.1 port, submits the app with ``flwr run``,
shows progress per round from the run's ``metrics.jsonl``, checks the final status with ``flwr ls`` (``flwr run
--stream`` exits 0 even when the ServerApp fails) and always stops every process it started.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from medfed.config import RunConfig
from medfed.datasets import load_dataset
from medfed.errors import ConfigError, MedfedError
from medfed.federation.flower_app import CLIENT_APP, SERVER_APP, write_flower_app
from medfed.federation.site import site_data_entry
from medfed.federation.processes import ProcessSession, free_port, log_tail
from medfed.progress import progress_bar
from medfed.runs import RunDir, run_name

CONNECTION = "medfed-sim"


def resolve_for_federation(cfg: RunConfig) -> RunConfig:
    """Fix what the server must know before any site reports: absolute output folder, run name, image shape.

    In simulation the data is local, so a missing ``data.image-size``/``data.channels`` is read off the dataset.
    """
    data = cfg.data
    if data.image_size <= 0 or data.channels <= 0:
        probe_cfg = dataclasses.replace(data, limit=1)
        if data.site_paths:
            fmt, path = site_data_entry(data, 0)
            probe_cfg = dataclasses.replace(probe_cfg, dataset=fmt, path=path)
        probe = load_dataset(probe_cfg, seed=cfg.train.seed)
        c, h, w = probe.image_shape
        if h != w and data.image_size <= 0:
            raise ConfigError(f"images are {h}x{w}; set data.image-size to train on square images")
        data = dataclasses.replace(data, image_size=data.image_size or h, channels=data.channels or c)
    output = dataclasses.replace(cfg.output, dir=str(Path(cfg.output.dir).expanduser().resolve()),
                                 name=run_name(cfg))
    return dataclasses.replace(cfg, data=data, output=output)


def write_connection(session: ProcessSession, port: int) -> None:
    (session.flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n')


def run_simulation(
    cfg: RunConfig,
    *,
    parallel_sites: int = 1,
    cpus_per_site: int = 1,
    serverapp: str = SERVER_APP,
    clientapp: str = CLIENT_APP,
    extra_files: dict[str, str] | None = None,
    show_progress: bool = True,
    timeout: float | None = None,
) -> RunDir:
    """Run ``cfg`` with ``federation.num-sites`` simulated sites; returns the run folder.

    Args:
        parallel_sites: sites training at the same time (Ray actors); 1 suits a 2-core machine.
        cpus_per_site: CPU threads each training site may use.
        serverapp, clientapp: Flower components (``module:attribute``), e.g. a wrapped ClientApp in tests.
        extra_files: extra files (relative path -> text) shipped in the app bundle, e.g. such a wrapper.
        timeout: give up after this many seconds (default: rounds x round timeout + 10 min).

    Raises:
        MedfedError: the run did not reach ``finished:completed``; the message carries Flower's status and the
            end of the server log.
    """
    cfg = resolve_for_federation(cfg)
    run = RunDir(Path(cfg.output.dir) / cfg.output.name)
    if cfg.output.resume and not run.latest_checkpoint.exists():
        raise ConfigError(f"{run.root}: nothing to resume (no checkpoints/latest.pt)")
    if not cfg.output.resume and run.config_path.exists():
        raise ConfigError(f"{run.root}: run folder already exists; pass --resume or choose another --name")
    flower_dir = run.root / "flower"
    app_dir = write_flower_app(flower_dir / "app", cfg, serverapp, clientapp, extra_files)
    timeout = timeout or cfg.federation.rounds * cfg.federation.round_timeout + 600
    port = free_port()
    with ProcessSession(flwr_home=flower_dir / "home", log_dir=flower_dir) as session:
        superlink = session.start("superlink", ["flower-superlink", "--insecure", "--simulation", "--host",
                                                "127.0.0.1", "--port", str(port),
                                                "--disable-runtime-dependency-installation"])
        session.wait_healthy("superlink", superlink, port)
        write_connection(session, port)
        federation = (f"num-supernodes={cfg.federation.num_sites} client-resources-num-cpus={cpus_per_site} "
                      f"init-args-num-cpus={parallel_sites * cpus_per_site}")
        started = session.flwr_json(["run", str(app_dir), CONNECTION, "--federation-config", federation])
        run_id = started.get("run-id")
        if run_id is None:
            raise MedfedError(f"flwr run did not start a run: {json.dumps(started)[:500]}")
        status = wait_for_run(session, int(run_id), run, cfg, timeout, show_progress)
        logs = session.flwr(["log", str(run_id), CONNECTION, "--show"], check=False)
        (flower_dir / "serverapp.log").write_text(logs.stdout + logs.stderr)
    if status.get("status") != "finished:completed":
        raise MedfedError(f"federated run {run_id} ended as {status.get('status')}: "
                          f"{status.get('status-details', '')}\n{log_tail(flower_dir / 'serverapp.log')}\n"
                          f"{log_tail(flower_dir / 'superlink.log')}")
    return run


def wait_for_run(session: ProcessSession, run_id: int, run: RunDir, cfg: RunConfig, timeout: float,
                 show_progress: bool, status_every: float = 15.0) -> dict:
    """Wait until the run finishes, advancing a progress bar per completed round.

    ``flwr ls`` starts a Python process, which is costly on 2 cores, so it is asked every ``status_every``
    seconds, or as soon as the server has written ``summary.json``.
    """
    deadline = time.monotonic() + timeout
    shown, last_status = 0, 0.0
    with progress_bar(f"federated run ({cfg.federation.num_sites} sites)", total=cfg.federation.rounds,
                      enabled=show_progress) as advance:
        while True:
            rounds = [r for r in run.read_metrics() if "round" in r]
            if len(rounds) > shown:
                loss = rounds[-1]["train_loss"]
                advance(len(rounds) - shown, round=rounds[-1]["round"],
                        loss=sum(loss.values()) / len(loss) if loss else float("nan"))
                shown = len(rounds)
            if run.summary_path.exists() or time.monotonic() - last_status > status_every:
                last_status = time.monotonic()
                runs = session.flwr_json(["ls", CONNECTION, "--run-id", str(run_id)]).get("runs") or []
                status = runs[0] if runs else {}
                if str(status.get("status", "")).startswith("finished"):
                    return status
            if time.monotonic() > deadline:
                raise MedfedError(f"federated run {run_id} did not finish within {timeout:.0f} s")
            time.sleep(1.0)
