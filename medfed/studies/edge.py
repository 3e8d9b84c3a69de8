"""What an edge site needs to run an exported model: a fresh process loads the TorchScript file and samples on the
CPU with :func:`medfed.diffusion.sample_images`; its peak resident set is the memory to plan for.

The probe runs as ``python -m medfed.studies.edge '<spec JSON>'`` and prints one JSON line. It imports only torch
and medfed's sampler (MONAI's schedulers), as a minimal edge deployment of medfed would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from medfed.config import DiffusionConfig
from medfed.errors import MedfedError


def status_kib(field: str) -> int | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in KiB, or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Load ``spec["file"]`` and sample ``spec["num"]`` images (DDIM ``spec["steps"]``, ``spec["batch_size"]``;
    None = ``sample_images``' default) on the CPU; memory in MiB."""
    from medfed.diffusion import sample_images

    imported = status_kib("VmRSS")
    model = torch.jit.load(spec["file"], map_location="cpu")
    loaded = status_kib("VmRSS")
    start = time.perf_counter()
    sample_images(model, DiffusionConfig(**spec["diffusion"]), spec["num"], tuple(spec["shape"]),
                  device=torch.device("cpu"), seed=spec["seed"], sampler="ddim", steps=spec["steps"],
                  batch_size=spec["batch_size"], precision=spec["precision"])
    wall = time.perf_counter() - start
    peak = status_kib("VmHWM")
    if imported is None or loaded is None or peak is None:
        raise MedfedError("/proc/self/status has no VmRSS/VmHWM: cannot measure memory on this system")
    return {"rss_after_imports_mib": imported / 1024, "rss_after_loading_mib": loaded / 1024,
            "peak_rss_mib": peak / 1024, "wall_s": wall, "torch_threads": torch.get_num_threads(),
            "device": "cpu", "images": spec["num"], "batch_size": spec["batch_size"] or "sample_images default",
            "steps": spec["steps"]}


def measure_fresh_process(file: Path, diffusion: DiffusionConfig, shape: tuple[int, int, int], steps: int,
                          seed: int, precision: str, num: int = 1, batch_size: int | None = 1,
                          timeout_s: float = 900) -> dict[str, Any]:
    """Run :func:`probe` in a new Python process (a process's peak memory only grows, so each model needs its
    own); returns its measurements.

    Raises:
        MedfedError: the probe failed; the message carries the end of its stderr.
    """
    spec = {"file": str(file), "diffusion": dataclasses.asdict(diffusion), "shape": list(shape), "steps": steps,
            "seed": seed, "precision": precision, "num": num, "batch_size": batch_size}
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        proc = subprocess.run([sys.executable, "-m", "medfed.studies.edge", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as err:
        raise MedfedError(f"{file}: the edge memory probe did not finish within {timeout_s:.0f} s") from err
    if proc.returncode != 0:
        raise MedfedError(f"{file}: the edge memory probe failed (status {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
