import subprocess
import sys

import pytest
import torch

from medfed.centralized import train_centralized
from medfed.checkpoint import load_checkpoint
from medfed.config import from_flat


def config(tmp_path, name, **flat):
    base = {"model.preset": "micro", "train.batch-size": 16, "train.lr": 1e-3, "train.log-every": 10,
            "train.checkpoint-every": 1000, "train.sample-every": 1000, "train.num-samples": 4,
            "diffusion.sample-steps": 5, "train.device": "cpu", "output.dir": str(tmp_path), "output.name": name}
    base.update(flat)
    return from_flat(base)


@pytest.mark.slow  # 200 training steps of the tiny UNet
def test_tiny_loss_falls_on_real_breast_ultrasound(tmp_path, breastmnist):
    cfg = config(tmp_path, "breast", **{"model.preset": "tiny", "train.steps": 200, "data.dataset": "npz",
                                        "data.path": str(breastmnist)})
    result = train_centralized(cfg, show_progress=False)
    assert result.last_loss < 0.5 * result.first_loss, (result.first_loss, result.last_loss)
    run = result.run
    assert run.latest_checkpoint.exists() and result.grid.exists()
    steps = [r["step"] for r in run.read_metrics() if "step" in r]
    assert steps == list(range(10, 201, 10))


@pytest.mark.slow  # 60 training steps in three runs
def test_resumed_run_matches_uninterrupted_run(tmp_path):
    straight = train_centralized(config(tmp_path, "straight", **{"train.steps": 30}), show_progress=False)
    train_centralized(config(tmp_path, "resumed", **{"train.steps": 15, "train.checkpoint-every": 15}),
                      show_progress=False)
    resumed = train_centralized(config(tmp_path, "resumed", **{"train.steps": 30, "output.resume": True}),
                                show_progress=False)
    a = load_checkpoint(straight.run.latest_checkpoint)
    b = load_checkpoint(resumed.run.latest_checkpoint)
    assert a.step == b.step == 30
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), key
    for key in a.ema:
        assert torch.equal(a.ema[key], b.ema[key]), key


def medfed(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "medfed.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow  # a medfed process that trains and samples (about 8 s)
def test_sample_command_writes_pngs_and_grid(tmp_path):
    result = train_centralized(config(tmp_path, "s", **{"train.steps": 2}), show_progress=False)
    out = tmp_path / "samples"
    proc = medfed("sample", "--checkpoint", str(result.run.latest_checkpoint), "--num", "5", "--sampler", "ddim",
                  "--steps", "3", "--out", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "00002.png", "00003.png",
                                                         "00004.png", "grid.png"]


def test_corrupt_checkpoint_is_one_line_error_naming_path(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    proc = medfed("sample", "--checkpoint", str(bad), "--num", "1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "not a readable checkpoint" in lines[0]
    assert "Traceback" not in proc.stderr


def test_missing_dataset_root_is_one_line_error(tmp_path):
    missing = tmp_path / "no-such-root"
    proc = medfed("train", "--centralized", "--dataset", "cifar10", "--data-path", str(missing), "--out",
                  str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and str(missing) in proc.stderr and "does not exist" in proc.stderr


def test_bfloat16_steps_follow_float32_steps():
    import copy

    from medfed.config import DataConfig, DiffusionConfig
    from medfed.datasets import load_dataset
    from medfed.diffusion import StepOptions, make_scheduler, train_step
    from medfed.models import build_unet

    data = load_dataset(DataConfig(dataset="embedded-mnist", limit=16))
    scheduler = make_scheduler(DiffusionConfig())
    torch.manual_seed(0)
    start = build_unet("pico", 1)
    losses = {}
    for precision in ("float32", "bfloat16"):
        model = copy.deepcopy(start)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        options = StepOptions(grad_clip=1.0, precision=precision)
        losses[precision] = [train_step(model, optimizer, scheduler, data.images, data.labels,
                                        torch.Generator().manual_seed(step), options) for step in range(4)]
    assert losses["float32"] != losses["bfloat16"]  # autocast ran
    for a, b in zip(losses["float32"], losses["bfloat16"]):
        assert abs(a - b) < 0.02 * a
