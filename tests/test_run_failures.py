"""A federated run that fails says so: a non-zero exit and, per round, which site refused and why."""

import subprocess
import sys

import pytest

from medical_files import write_pngs


def medfed(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "medfed.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow  # a Flower simulation
def test_a_run_with_one_broken_site_exits_non_zero_naming_the_site_and_the_reason(tmp_path, breastmnist):
    for i in range(3):
        write_pngs(tmp_path / f"site-{i}", breastmnist, 12)
    (tmp_path / "site-1" / "img_005.png").write_bytes(b"\x89PNG not really")  # data.on-error = fail (default)
    paths = ";".join(f"folder:{tmp_path / f'site-{i}'}" for i in range(3))
    done = medfed("run", "--sites", 3, "--rounds", 1, "--preset", "pico", "--out", tmp_path / "runs", "--name", "b",
                  "--image-size", 28, "--batch-size", 8, "--device", "cpu",
                  "--set", "data.dataset=folder", "--set", "data.channels=1", "--set", f"data.site-paths={paths}",
                  "--set", "diffusion.sample-steps=2", "--set", "train.num-samples=4")
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    assert "site-1 refused (data-error: the site's data could not be loaded)" in out, out[-3000:]
    assert "0 of 1 rounds aggregated" in out and "Traceback" not in out
    # the file name stays at the site: in its log, never in the coordinator's records
    records = (tmp_path / "runs" / "b" / "metrics.jsonl").read_text()
    assert "img_005" not in records and '"reason": "data-error"' in records


def test_a_run_that_cannot_work_is_refused_before_flower_starts(tmp_path):
    done = medfed("run", "--sites", 1, "--out", tmp_path, "--name", "one", timeout=120)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "federation.num-sites" in lines[0] and "at least 3" in lines[0], done.stderr
    assert not (tmp_path / "one").exists()
