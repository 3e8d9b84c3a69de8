"""Run every benchmark (``benchmarks/bench_*.py``) in its own process; each writes ``results/<name>.json``.

Usage: ``python benchmarks/run_all.py [--quick] [names...]`` (``make bench`` runs them all at full size).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    names = [a for a in argv if not a.startswith("--")]
    scripts = sorted(HERE.glob("bench_*.py"))
    if names:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in names]
    failed = []
    for script in scripts:
        start = time.perf_counter()
        print(f"== {script.stem}", flush=True)
        code = subprocess.call([sys.executable, str(script), *(["--quick"] if quick else [])])
        print(f"== {script.stem}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(script.stem)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
