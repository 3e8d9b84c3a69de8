"""Round time and upload with and without secure aggregation (SecAgg+), side by side in one run.

Real simulated runs (``tiny`` UNet, 200 MNIST images per site, 1 local epoch, DP-SGD on in both arms, as in
production), for 3, 10 and 30 sites; the two arms alternate for each site count. Each arm runs ``--rounds``
rounds (default 3) and the round time compared is the mean of rounds 2 and later (round 1 also pays Ray's
start-up; a single round moves by 10% with the machine's load). Upload is the payload of the last round.
``python benchmarks/bench_federation.py --secagg-compare`` measures the same arms while it measures the
federation (there the SecAgg+ arm runs first), and writes both result files.

Usage: python benchmarks/bench_secagg.py [--quick] [--sites 3,10,30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench_federation import measure
from common import write_results


def compare(sites: int, images: int, out: Path, secure_row: dict | None = None, rounds: int = 3) -> dict:
    """Both arms for ``sites`` (``secure_row``: an already measured SecAgg+ arm of the same setting, whose round
    count is then used)."""
    arms = {True: secure_row} if secure_row else {}
    chunk = secure_row["per_sample_chunk"] if secure_row else 0
    rounds = secure_row["rounds"] if secure_row else rounds
    for secure in (False, True) if sites % 2 else (True, False):
        if secure not in arms:
            arms[secure] = measure(sites, images, "tiny", out, {"secagg.enabled": secure},
                                   name=f"sites-{sites}-secagg-{secure}", per_sample_chunk=chunk, rounds=rounds)
            print(arms[secure], flush=True)
    plain, secure = arms[False], arms[True]
    return {"sites": sites, "images_per_site": images, "rounds": rounds,
            "round_wall_s_plain": plain["round_wall_s"], "round_wall_s_secagg": secure["round_wall_s"],
            "round_s_plain": plain["steady_round_wall_s"],
            "round_s_secagg": secure["steady_round_wall_s"],
            "secagg_overhead": secure["steady_round_wall_s"] / plain["steady_round_wall_s"] - 1,
            "upload_bytes_plain": plain["bytes_up_per_round"], "upload_bytes_secagg": secure["bytes_up_per_round"],
            "upload_ratio": secure["bytes_up_per_round"] / plain["bytes_up_per_round"],
            "peak_memory_gib_plain": plain["peak_memory_gib"], "peak_memory_gib_secagg": secure["peak_memory_gib"]}


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
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (the first is not compared)")
    args = parser.parse_args()
    counts = [int(s) for s in args.sites.split(",") if s] or ([3] if args.quick else [3, 10, 30])
    images = 64 if args.quick else 200
    with tempfile.TemporaryDirectory(prefix="medfed-bench-secagg-") as tmp:
        rows = [compare(sites, images, Path(tmp), rounds=args.rounds) for sites in counts]
    write(rows, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
