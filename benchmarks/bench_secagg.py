"""Round time and upload with and without secure aggregation (SecAgg+), side by side in one run.

Real simulated runs (``tiny`` UNet, 200 MNIST images per site, 1 local epoch, DP-SGD on, as in production) for
3, 10 and 30 sites. Each site count is *one* run whose rounds switch SecAgg+ on and off
(``secagg_alternating_app.py``): round 1 (SecAgg+, also Ray's start-up) is not compared, then blocks of four rounds
go plain, SecAgg+, SecAgg+, plain. Both arms thus run in the same processes, minutes apart, and a steady drift of
the machine's speed falls on both equally (separate runs per arm moved by 10-20% on this VM). ``secagg_overhead`` is
the mean SecAgg+ round over the mean plain round. The sites' training itself still moves by up to 10% from one round
to the next, so the run also records each site's training time (``site_seconds`` in ``metrics.jsonl``) and
``secagg_added_s`` compares what is left of a round outside training: the time SecAgg+ adds, without that jitter.
Upload is the payload of the last round of each arm.

Usage: python benchmarks/bench_secagg.py [--quick] [--sites 3,10,30] [--blocks 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from statistics import mean

from bench_federation import measure
from common import write_results

APP_MODULE = "medfed_bench_apps/secagg_alternating_app.py"


def compare(sites: int, images: int, out: Path, blocks: int = 2) -> dict:
    """One alternating run of ``1 + 4 * blocks`` rounds with ``sites`` sites."""
    app = (Path(__file__).parent / "secagg_alternating_app.py").read_text()
    # the benchmark's simulated hospitals allow plain rounds explicitly (their default policy would refuse them)
    row = measure(sites, images, "tiny", out, name=f"sites-{sites}", rounds=1 + 4 * blocks,
                  extra={"policy.require-secure-aggregation": False},
                  serverapp="medfed_bench_apps.secagg_alternating_app:app",
                  extra_files={"medfed_bench_apps/__init__.py": "", APP_MODULE: app})
    print(row, flush=True)
    rounds = [{"wall": wall, "secure": secure, "up": up, "training": training} for wall, secure, up, training
              in zip(row["round_wall_s"], row["round_secure"], row["round_bytes_up"], row["round_site_seconds"])][1:]
    plain = [r for r in rounds if not r["secure"]]
    secure = [r for r in rounds if r["secure"]]
    round_plain, round_secure = mean(r["wall"] for r in plain), mean(r["wall"] for r in secure)
    # what is not the sites' training: SecAgg+'s added time without the training's round-to-round jitter. Private
    # sites keep their training time in their own log (it reveals their Poisson draws), so it is not reported here
    # any more: these figures are None for DP runs.
    timed = all(r["training"] > 0 for r in rounds)
    rest_plain = mean(r["wall"] - r["training"] for r in plain) if timed else None
    rest_secure = mean(r["wall"] - r["training"] for r in secure) if timed else None
    return {"sites": sites, "images_per_site": images, "rounds": row["rounds"],
            "round_wall_s": row["round_wall_s"], "round_secure": row["round_secure"],
            "round_site_training_s": row["round_site_seconds"],
            "round_s_plain": round_plain, "round_s_secagg": round_secure,
            "secagg_overhead": round_secure / round_plain - 1,
            "round_s_outside_training_plain": rest_plain, "round_s_outside_training_secagg": rest_secure,
            "secagg_added_s": rest_secure - rest_plain if timed else None,
            "secagg_added_fraction": (rest_secure - rest_plain) / round_plain if timed else None,
            "upload_bytes_plain": plain[-1]["up"], "upload_bytes_secagg": secure[-1]["up"],
            "upload_ratio": secure[-1]["up"] / plain[-1]["up"], "peak_memory_gib": row["peak_memory_gib"]}


def write(rows: list[dict], quick: bool) -> None:
    write_results("secagg", {
        "rows": rows,
        "goal": "SecAgg+ adds <= 10% to a simulated round; its upload <= 2x the plain float32 upload",
        "goal_met": None if quick else all(r["secagg_overhead"] <= 0.10 and r["upload_ratio"] <= 2 for r in rows),
    })


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 sites, 64 images each")
    parser.add_argument("--sites", default="", help="comma-separated site counts (default 3,10,30)")
    parser.add_argument("--blocks", type=int, default=2,
                        help="blocks of four compared rounds (plain, SecAgg+, SecAgg+, plain) per run")
    args = parser.parse_args()
    counts = [int(s) for s in args.sites.split(",") if s] or ([3] if args.quick else [3, 10, 30])
    images = 64 if args.quick else 200
    with tempfile.TemporaryDirectory(prefix="medfed-bench-secagg-") as tmp:
        rows = [compare(sites, images, Path(tmp), args.blocks) for sites in counts]
    write(rows, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
