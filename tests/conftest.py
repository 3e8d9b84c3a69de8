"""Shared fixtures. Real data comes from ../shared/data (or $MEDFED_SHARED_DATA); nothing is downloaded."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDFED_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()

# Flower: no telemetry, no update check, no per-run dependency installation, and a private FLWR_HOME.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
os.environ["FLWR_HOME"] = tempfile.mkdtemp(prefix="medfed-test-flwr-home-")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA}; set MEDFED_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def breastmnist(shared_data: Path) -> Path:
    return shared_data / "medmnist" / "breastmnist.npz"


@pytest.fixture(scope="session")
def pneumoniamnist(shared_data: Path) -> Path:
    return shared_data / "medmnist" / "pneumoniamnist.npz"


def small_run_config(out_dir: Path, name: str, **flat):
    """A RunConfig for fast federated tests: micro UNet, small batches, few sampling steps, CPU."""
    from medfed.config import from_flat

    base = {"model.preset": "micro", "train.batch-size": 32, "train.num-samples": 4, "diffusion.sample-steps": 4,
            "train.device": "cpu", "federation.round-timeout": 600.0, "output.dir": str(out_dir),
            "output.name": name}
    base.update(flat)
    return from_flat(base)
