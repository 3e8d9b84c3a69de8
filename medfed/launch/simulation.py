"""``medfed run``: a federated run of N simulated sites on one machine, through Flower's simulation engine.

It starts a private SuperLink in simulation mode on a free 127.0.0.1 port, submits the app with ``flwr run``,
shows progress per round from the run's ``metrics.jsonl``, checks the final status with ``flwr ls`` (``flwr run
--stream`` exits 0 even when the ServerApp fails) and always stops every process it started, also when it is
interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from medfed.config import RunConfig
from medfed.datasets import load_dataset
from medfed.errors import ConfigError
from medfed.launch.deployment import follow_run, start_superlink, submit_run, write_connection
from medfed.federation.policy import check_simulation
from medfed.launch.flower_app import CLIENT_APP, SERVER_APP, write_flower_app
from medfed.launch.processes import ProcessSession, exit_on_sigterm, free_port
from medfed.runs import RunDir, run_name

CONNECTION = "medfed-sim"


def resolve_for_federation(cfg: RunConfig) -> RunConfig:
    """Fix what the server must know before any site reports: absolute output folder, run name, image shape.

    In simulation the data is local, so a missing ``data.image-size``/``data.channels`` is read off the dataset
    (the first site's entry of ``data.site-paths`` when given).
    """
    data = cfg.data
    if data.image_size <= 0 or data.channels <= 0:
        probe_cfg = dataclasses.replace(data, limit=1)
        if data.site_entries:
            fmt, path = data.site_entries[0]
            probe_cfg = dataclasses.replace(probe_cfg, dataset=fmt, path=path)
        c, h, w = load_dataset(probe_cfg, seed=cfg.train.seed).image_shape
        if h != w and data.image_size <= 0:
            raise ConfigError(f"images are {h}x{w}; set data.image-size to train on square images")
        data = dataclasses.replace(data, image_size=data.image_size or h, channels=data.channels or c)
    output = dataclasses.replace(cfg.output, dir=str(Path(cfg.output.dir).expanduser().resolve()),
                                 name=run_name(cfg))
    return dataclasses.replace(cfg, data=data, output=output)


def check_site_lists(cfg: RunConfig) -> None:
    """Every simulated site has its entry in the per-site lists: ``data.site-paths`` (when set) and a per-site
    ``privacy.site-cap-epsilon`` (more than one value, in a private run) list at least ``federation.num-sites``.

    Raises:
        ConfigError: naming the key, its count and the number of sites.
    """
    sites = cfg.federation.num_sites
    paths, caps = len(cfg.data.site_entries), len(cfg.privacy.site_caps)
    if 0 < paths < sites:
        raise ConfigError(f"config key 'data.site-paths' lists {paths} sites, but federation.num-sites is {sites}; "
                          "give one format:path entry per site", key="data.site-paths")
    if cfg.privacy.enabled and 1 < caps < sites:
        raise ConfigError(f"config key 'privacy.site-cap-epsilon' lists {caps} caps, but federation.num-sites is "
                          f"{sites}; give one cap for all sites or one per site", key="privacy.site-cap-epsilon")


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
        ConfigError: before Flower starts: a per-site list shorter than the sites (:func:`check_site_lists`), a run
            the simulated sites would refuse, or a run folder that exists (or has nothing to resume).
        MedfedError: the run did not reach ``finished:completed``; the message carries Flower's status and the
            end of the server log.
    """
    check_site_lists(cfg)
    check_simulation(cfg)
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
    with exit_on_sigterm(), ProcessSession(flwr_home=flower_dir / "home", log_dir=flower_dir) as session:
        start_superlink(session, port, simulation=True)
        write_connection(session, CONNECTION, f"127.0.0.1:{port}")
        run_id = submit_run(session, app_dir, CONNECTION,
                            f"num-supernodes={cfg.federation.num_sites} client-resources-num-cpus={cpus_per_site} "
                            f"init-args-num-cpus={parallel_sites * cpus_per_site}")
        follow_run(session, CONNECTION, run_id, run, cfg.federation.rounds, timeout, show_progress=show_progress,
                   label=f"federated run ({cfg.federation.num_sites} sites)")
    return run
