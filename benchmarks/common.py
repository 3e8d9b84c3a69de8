"""Shared plumbing for benchmark scripts: results JSON with machine context, timing and peak memory."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from medfed.devices import describe_machine

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB.

    Reads ``VmHWM`` from ``/proc/self/status`` where there is one: Linux carries ``ru_maxrss`` over fork and exec,
    so a child process started by a big parent would report at least the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a clock read after it measures the work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_child(script: str | Path, spec: dict[str, Any], timeout_s: float = 1800) -> dict[str, Any]:
    """Run ``python <script> --child '<spec as JSON>'`` in a fresh process; return the JSON of its last stdout line.

    Peak memory (``ru_maxrss``) only grows within a process, so each configuration measured in its own child
    reports its own peak instead of the largest one measured before it.
    """
    proc = subprocess.run([sys.executable, str(script), "--child", json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(script).name} --child {spec} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_results(name: str, results: dict[str, Any]) -> Path:
    """Write ``results/<name>.json`` with the command line and machine context."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": describe_machine(), **results}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    return path
