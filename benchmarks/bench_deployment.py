"""Round time of a localhost deployment against a simulation of the same three sites, in one run.

Both arms train the same three site folders (MNIST digits as ``.npz``, 200 per site) with the same run config
(DP-SGD and SecAgg+ on, ``tiny`` UNet, 1 local epoch, batch 64): the simulation through ``data.site-paths`` and
Flower's simulation engine, the deployment exactly as docs/deployment.md runs it: ``medfed server init/start``
(TLS, site authentication), ``medfed site init/register/start`` per site (process isolation, medfed's own
ClientApp process per message, the decoded-data cache), ``medfed server run``. Round 1 (start-up, first decode)
is reported but not compared. ``deployed_over_simulated`` is the mean of rounds 2.. of the deployment over the
simulation's; the goal is <= 1.3. The deployment arm also reports how many times each site decoded its data.

Usage: python benchmarks/bench_deployment.py [--rounds 4] [--images 200] [--keep DIR]

``--keep DIR`` keeps the runs and every process log; the server log has one line per stage (replies and when
they came) and each site's ``clientapp.log`` one line per task (when it was pulled, how long it ran).
"""

from __future__ import annotations

import argparse
import os
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from statistics import mean

import numpy as np

from common import write_results
from medfed.config import from_flat
from medfed.datasets.cache import decode_count
from medfed.deploy.coordinator import ServerDir, site_table, submit_deployed_run
from medfed.launch.processes import ProcessSession, bin_dir, free_port
from medfed.launch.simulation import run_simulation

SITES = ("hospital-a", "hospital-b", "hospital-c")


def write_sites(root: Path, images: int) -> dict[str, Path]:
    """Three disjoint MNIST shards as site files (the shared data folder's MNIST, see its README)."""
    shared = Path(os.environ.get("MEDFED_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    mnist = np.load(shared / "mnist" / "mnist.npz")
    paths = {}
    for i, name in enumerate(SITES):
        sl = slice(images * i, images * (i + 1))
        paths[name] = root / f"{name}.npz"
        np.savez(paths[name], train_images=mnist["train_images"][sl], train_labels=mnist["train_labels"][sl])
    return paths


def run_flat(rounds: int, name: str, out: Path) -> dict[str, object]:
    return {"data.image-size": 28, "data.channels": 1, "federation.num-sites": 3, "federation.rounds": rounds,
            "model.preset": "tiny", "train.batch-size": 64, "train.device": "cpu", "federation.sample-every": 0,
            "train.num-samples": 4, "diffusion.sample-steps": 4, "federation.round-timeout": 600,
            "output.dir": str(out), "output.name": name}


def simulated(paths: dict[str, Path], rounds: int, out: Path) -> list[float]:
    flat = run_flat(rounds, "simulated", out)
    flat.update({"data.dataset": "npz", "data.site-paths": ";".join(f"npz:{paths[s]}" for s in SITES),
                 "privacy.site-state-root": str(out / "sim-state")})
    run = run_simulation(from_flat(flat), show_progress=False)
    return [r.wall_s for r in run.require_rounds(rounds)]


def medfed(*args: object) -> str:
    done = subprocess.run([str(bin_dir() / "medfed"), *map(str, args)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"medfed {' '.join(map(str, args))}: {done.stderr[-2000:]}")
    return done.stdout


def deployed(paths: dict[str, Path], rounds: int, root: Path) -> tuple[list[float], dict[str, int]]:
    port = free_port()
    srv = root / "coordinator"
    medfed("server", "init", "--dir", srv, "--name", "localhost", "--port", port)
    sd = ServerDir(srv)
    with ProcessSession(flwr_home=root / "bench-flwr-home", log_dir=root / "logs") as session:
        server = session.start("server", [str(bin_dir() / "medfed"), "server", "start", "--dir", str(srv)])
        session.wait_healthy("server", server, port, timeout=90,
                             tls_context=ssl.create_default_context(cafile=str(sd.ca.cert)))
        for name in SITES:
            medfed("site", "init", "--dir", root / name, "--name", name, "--superlink", f"localhost:{port}",
                   "--ca-cert", sd.ca.cert, "--data", paths[name], "--format", "npz", "--cap-epsilon", 100,
                   "--runtime-port", free_port())
            medfed("site", "register", "--dir", root / name, "--server-dir", srv)
            session.start(name, [str(bin_dir() / "medfed"), "site", "start", "--dir", str(root / name)])
        deadline = time.monotonic() + 300
        while {r["name"]: r["status"] for r in site_table(sd)} != {n: "online" for n in SITES}:
            if time.monotonic() > deadline:
                raise RuntimeError("sites did not come online")
            time.sleep(2)
        flat = run_flat(rounds, "deployed", sd.runs)
        _, run, status = submit_deployed_run(sd, from_flat(flat), show_progress=False)
        if status.get("status") != "finished:completed":
            raise RuntimeError(f"deployed run ended {status}")
        walls = [r.wall_s for r in run.require_rounds(rounds)]
    return walls, {name: decode_count(root / name / "state") for name in SITES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--images", type=int, default=200, help="images per site")
    parser.add_argument("--keep", type=Path, help="keep the runs and logs in this (new) folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medfed-bench-deploy-") as tmp:
        root = Path(tmp) if args.keep is None else args.keep
        if args.keep is not None:
            root.mkdir(parents=True)  # a new folder: an old run's ledgers would change what the sites may spend
        paths = write_sites(root, args.images)
        start = time.perf_counter()
        sim = simulated(paths, args.rounds, root / "sim")
        sim_s = time.perf_counter() - start
        start = time.perf_counter()
        dep, decodes = deployed(paths, args.rounds, root / "dep")
        dep_s = time.perf_counter() - start
    ratio = mean(dep[1:]) / mean(sim[1:])
    write_results("deployment", {
        "what": "round wall time (server side, rounds 2..) of a localhost deployment vs a simulation of the same 3 "
                "sites: tiny UNet, DP-SGD + SecAgg+, 1 local epoch, batch 64",
        "images_per_site": args.images, "rounds": args.rounds,
        "simulated_round_s": sim, "deployed_round_s": dep, "deployed_over_simulated": ratio,
        "goal": "<= 1.3", "goal_met": ratio <= 1.3, "site_decodes": decodes,
        "arm_wall_s": {"simulated": sim_s, "deployed": dep_s},
    })


if __name__ == "__main__":
    main()
