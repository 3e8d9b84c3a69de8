"""Bad inputs a user can type, across every command: each must end in one ``error:`` line that names the option,
file or key, a non-zero exit, no traceback, no new file or folder in the working directory, and return quickly.

Each case runs the real ``medfed`` console script in a subprocess, from an empty working directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

MEDFED = Path(sys.executable).with_name("medfed")
pytestmark = pytest.mark.slow  # 51 cases, each a fresh medfed process: the largest share of the quick tier's time


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A real medfed checkpoint (tiny, untrained: pico UNet, 8x8, 100 diffusion steps)."""
    from medfed.checkpoint import Checkpoint, save_checkpoint
    from medfed.config import from_flat
    from medfed.models import build_unet

    cfg = from_flat({"model.preset": "pico", "diffusion.timesteps": 100, "diffusion.sample-steps": 10})
    path = tmp_path_factory.mktemp("checkpoint") / "model.pt"
    save_checkpoint(Checkpoint(model=build_unet("pico", 1).state_dict(), config=cfg, image_shape=(1, 8, 8), step=0),
                    path)
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, breastmnist) -> dict[str, str]:
    """Files the cases point at, outside the working directory: a file that is not a checkpoint, an empty folder,
    a folder of unusable files and a config file with a bad value."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "notes.pt").write_text("not a checkpoint\n")
    (root / "empty").mkdir()
    bad = root / "unusable"
    bad.mkdir()
    (bad / "zero.nii.gz").write_bytes(b"")
    (bad / "gone.png").symlink_to(root / "no-such-file.png")
    (root / "bad.toml").write_text('[train]\nlr = "fast"\n')
    return {"notckpt": str(root / "notes.pt"), "empty": str(root / "empty"),
            "unusable": str(bad), "badtoml": str(root / "bad.toml"), "breastmnist": str(breastmnist)}


CASES = [
    # medfed config
    pytest.param(["config", "--set", "model.presett=tiny"], "did you mean model.preset?", id="config-unknown-key"),
    pytest.param(["config", "--set", "model.preset=huge"], "model.preset", id="config-preset"),
    pytest.param(["config", "--set", "data.dataset=foo"], "data.dataset", id="config-dataset"),
    pytest.param(["config", "--set", "train.device=tpu"], "train.device", id="config-device"),
    pytest.param(["config", "--set", "diffusion.schedule=cosin"], "diffusion.schedule", id="config-schedule"),
    pytest.param(["config", "--set", "train.lr"], "train.lr", id="config-set-form"),
    pytest.param(["config", "--config", "missing.toml"], "missing.toml", id="config-file-missing"),
    pytest.param(["config", "--config", "{badtoml}"], "train.lr", id="config-file-bad-value"),
    # medfed train / run: refused before anything heavy, no run folder left behind
    pytest.param(["train", "--batch-size", "0"], "--batch-size", id="train-batch-size"),
    pytest.param(["train", "--preset", "huge", "--out", "runs"], "--preset", id="train-preset"),
    pytest.param(["train", "--lr", "-1"], "--lr", id="train-lr"),
    pytest.param(["train", "--steps", "-5"], "--steps", id="train-steps"),
    pytest.param(["train", "--lr", "abc"], "--lr", id="train-lr-not-a-number"),
    pytest.param(["train", "--dataset", "npz", "--data-path", "missing.npz"], "data.path", id="train-data-path"),
    pytest.param(["train", "--set", "model.presett=tiny"], "did you mean model.preset?", id="train-unknown-key"),
    pytest.param(["run", "--sites", "1"], "federation.num-sites", id="run-one-site-secagg"),
    pytest.param(["run", "--sites", "70", "--set", "secagg.quantization-range=67108864"],
                 "secagg.quantization-range", id="run-secagg-overflow"),
    pytest.param(["run", "--rounds", "0"], "--rounds", id="run-rounds"),
    pytest.param(["run", "--epsilon", "0"], "--epsilon", id="run-epsilon"),
    pytest.param(["run", "--partition", "dirichet"], "did you mean dirichlet?", id="run-partition"),
    pytest.param(["run", "--parallel-sites", "0"], "--parallel-sites", id="run-parallel-sites"),
    pytest.param(["run", "--set", "federation.min-sites=2"], "federation.min-sites", id="run-min-sites-secagg"),
    pytest.param(["run", "--device", "gpu"], "--device", id="run-device"),
    # medfed sample
    pytest.param(["sample", "--checkpoint", "missing.pt"], "missing.pt", id="sample-missing-checkpoint"),
    pytest.param(["sample", "--checkpoint", "{ckpt}", "--num", "-3"], "--num", id="sample-num"),
    pytest.param(["sample", "--checkpoint", "{ckpt}", "--steps", "5000", "--num", "1"], "--steps",
                 id="sample-steps-beyond-timesteps"),
    pytest.param(["sample", "--checkpoint", "{notckpt}"], "notes.pt", id="sample-not-a-checkpoint"),
    pytest.param(["sample", "--checkpoint", "{ckpt}", "--sampler", "euler"], "--sampler", id="sample-sampler"),
    # medfed privacy
    pytest.param(["privacy", "plan", "--examples", "100", "--rounds", "0"], "--rounds", id="plan-rounds-0"),
    pytest.param(["privacy", "plan", "--examples", "100", "--rounds", "-3"], "--rounds", id="plan-rounds-negative"),
    pytest.param(["privacy", "plan", "--examples", "100", "--rounds", "5", "--epsilon", "0"], "--epsilon",
                 id="plan-epsilon-0"),
    pytest.param(["privacy", "plan", "--examples", "100", "--rounds", "5", "--batch-size", "0"], "--batch-size",
                 id="plan-batch-size"),
    pytest.param(["privacy", "plan", "--examples", "100", "--rounds", "5", "--delta", "2"], "--delta",
                 id="plan-delta"),
    pytest.param(["privacy", "plan", "--examples", "100", "--rounds", "5", "--epsilon", "0.001"], "--epsilon",
                 id="plan-epsilon-unreachable"),
    pytest.param(["privacy", "verify", "missing-state"], "missing-state", id="privacy-verify"),
    pytest.param(["privacy", "report"], "--site", id="privacy-report-nothing"),
    # medfed data inspect
    pytest.param(["data", "inspect", "missing-folder"], "missing-folder", id="inspect-missing"),
    pytest.param(["data", "inspect", "{empty}"], "empty", id="inspect-empty-folder"),
    pytest.param(["data", "inspect", "{unusable}"], "unusable", id="inspect-nothing-readable"),
    # medfed evaluate / review
    pytest.param(["evaluate", "report", "missing-run"], "missing-run", id="evaluate-report"),
    pytest.param(["review", "approve", "--state-dir", "missing-state", "--audit", "audit.json", "--by", "dr-a"],
                 "missing-state", id="review-approve"),
    pytest.param(["review", "import", "ratings.json", "--manifest", "manifest.json", "--out", "out"],
                 "manifest.json", id="review-import"),
    pytest.param(["review", "report", "--ratings", "r.json", "--key", "k.json", "--out", "out"], "r.json",
                 id="review-report"),
    # medfed server / site / study
    pytest.param(["server", "run", "--dir", "srv", "--sites", "1", "--image-size", "28", "--channels", "1"],
                 "--sites", id="server-run-one-site"),
    pytest.param(["server", "run", "--dir", "srv", "--sites", "3", "--image-size", "28", "--channels", "2"],
                 "--channels", id="server-run-channels"),
    pytest.param(["server", "init", "--dir", "srv", "--port", "0"], "port", id="server-init-port"),
    pytest.param(["server", "rounds", "missing-run"], "missing-run", id="server-rounds"),
    pytest.param(["site", "start", "--dir", "missing-site"], "missing-site", id="site-start"),
    pytest.param(["site", "init", "--dir", "site", "--name", "a", "--superlink", "host:9092", "--ca-cert", "ca.crt",
                  "--data", "{breastmnist}", "--format", "npz", "--cap-epsilon", "10"], "ca.crt", id="site-init-ca"),
    pytest.param(["study", "lightweight", "--data-path", "{breastmnist}", "--presets", "huge"], "--presets",
                 id="study-presets"),
    pytest.param(["server", "register-site", "missing.pub", "--name", "a", "--dir", "srv"], "missing.pub",
                 id="server-register-site"),
]


@pytest.mark.parametrize("args,names", CASES)
def test_bad_input_is_one_line_error(args, names, inputs, tmp_path, request):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "MEDFED_LOG_DIR": str(tmp_path / "logs"), "COLUMNS": "100"}
    paths = {**inputs, "ckpt": request.getfixturevalue("checkpoint") if "{ckpt}" in args else ""}
    argv = [a.format(**paths) for a in args]
    done = subprocess.run([str(MEDFED), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert names in errors[0], output
    assert "Traceback" not in output
    assert not (tmp_path / "logs").exists(), f"an unexpected exception: {output}"
    assert list(cwd.iterdir()) == []
