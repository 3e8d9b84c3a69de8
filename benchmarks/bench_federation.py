"""Round wall time and peak memory against the number of simulated sites (Flower simulation engine).

Each setting is a real ``medfed run``-equivalent simulation: ``tiny`` UNet, 200 MNIST images per site (IID),
1 local epoch, batch 64, 2 rounds. The round time reported is round 2 (round 1 also pays Ray's start-up; with
more rounds, the mean of rounds 2 and later).
Peak memory is the largest sum of proportional set sizes (PSS: shared pages split between the processes that
share them), sampled every 0.5 s, over every process of the run (SuperLink, simulation process, Ray) plus this
process.

Usage: python benchmarks/bench_federation.py [--quick] [--sites 3,10,30,50] [--per-sample-chunk N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import write_results

from medfed.config import from_flat
from medfed.launch.processes import pids_with_env, memory_bytes
from medfed.launch.simulation import run_simulation

SHARED = Path(os.environ.get("MEDFED_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def measure(sites: int, images_per_site: int, preset: str, out: Path, extra: dict | None = None,
            name: str | None = None, per_sample_chunk: int = 0, rounds: int = 2, **simulation: Any) -> dict:
    """One real simulated run (defaults: DP-SGD and SecAgg+ on); round times, memory, bytes.

    ``steady_round_wall_s`` is the mean wall time of rounds 2..``rounds`` (round 1 also pays Ray's start-up).
    ``simulation``: more arguments of ``run_simulation`` (another ServerApp, e.g.)."""
    name = name or f"sites-{sites}"
    out = out / name  # each run its own sites' state (privacy ledgers): no run spends another's budget
    cfg = from_flat({"data.dataset": "npz", "data.path": str(SHARED / "mnist" / "mnist.npz"),
                     "data.limit": sites * images_per_site, "model.preset": preset, "federation.num-sites": sites,
                     "federation.rounds": rounds, "federation.sample-every": 0, "train.batch-size": 64,
                     "train.num-samples": 4, "diffusion.sample-steps": 4, "train.device": "cpu",
                     "privacy.per-sample-chunk": per_sample_chunk,
                     "output.dir": str(out), "output.name": name, **(extra or {})})
    flwr_home = out / name / "flower" / "home"
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            pids = pids_with_env("FLWR_HOME", str(flwr_home)) + [os.getpid()]
            peak[0] = max(peak[0], memory_bytes(pids))
            time.sleep(0.5)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    start = time.perf_counter()
    try:
        run = run_simulation(cfg, show_progress=False, **simulation)
    finally:
        stop.set()
        watcher.join()
    total = time.perf_counter() - start
    records = run.rounds()
    if len(records[-1].participants) != sites:
        raise RuntimeError(f"{name}: only {len(records[-1].participants)} of {sites} sites took part in "
                           f"the last round: {records[-1].summary_line()}")
    return {"sites": sites, "images_per_site": images_per_site, "preset": preset,
            "privacy": cfg.privacy.enabled, "secure_aggregation": cfg.secagg.enabled,
            "per_sample_chunk": cfg.privacy.per_sample_chunk, "rounds": len(records),
            "round_wall_s": [r.wall_s for r in records],
            "round_secure": [r.secure_aggregation is not None for r in records],
            "round_bytes_up": [r.bytes_up for r in records],
            "round_site_seconds": [sum(r.site_seconds.values()) for r in records],  # NOT PRIVATE runs only
            "steady_round_wall_s": sum(r.wall_s for r in records[1:]) / (len(records) - 1),
            "sites_participating_last_round": len(records[-1].participants),
            "run_wall_s": total, "peak_memory_gib": peak[0] / 2**30,
            "bytes_up_per_round": records[-1].bytes_up, "bytes_down_per_round": records[-1].bytes_down}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 and 10 sites, 64 images each")
    parser.add_argument("--sites", default="", help="comma-separated site counts (default 3,10,30,50)")
    parser.add_argument("--per-sample-chunk", type=int, default=0,
                        help="privacy.per-sample-chunk of every run (0 = whole batch, medfed's default; 16 bounds "
                             "the memory of sites training at batch 64)")
    args = parser.parse_args()
    counts = [int(s) for s in args.sites.split(",") if s] or ([3, 10] if args.quick else [3, 10, 30, 50])
    images = 64 if args.quick else 200
    rows = []
    with tempfile.TemporaryDirectory(prefix="medfed-bench-fed-") as tmp:
        for sites in counts:
            row = measure(sites, images, "tiny", Path(tmp), per_sample_chunk=args.per_sample_chunk)
            print(row, flush=True)
            rows.append(row)
    goal = next((r for r in rows if r["sites"] == 50), None)
    write_results("federation", {
        "rows": rows,
        "goal": "50 sites complete on 2 cores with peak memory < 6 GiB",
        "goal_met": None if goal is None else bool(goal["peak_memory_gib"] < 6 and
                                                   goal["sites_participating_last_round"] == 50),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
