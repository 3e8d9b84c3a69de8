"""``federation.init-checkpoint`` and ``output.resume``: training continues from a checkpoint only when it is the
same model on the same noise schedule and parameterisation (a model trained on another schedule, or predicting the
velocity instead of the noise, gives the wrong estimate at every step)."""

from __future__ import annotations

import pytest
import torch

from medfed.checkpoint import Checkpoint, save_checkpoint
from medfed.centralized import train_centralized
from medfed.config import from_flat
from medfed.errors import ConfigError
from medfed.federation.server import load_initial_weights
from medfed.models import build_unet


def saved(tmp_path, **flat) -> tuple[str, dict[str, torch.Tensor]]:
    cfg = from_flat({"model.preset": "pico", **flat})
    weights = build_unet("pico", 1).state_dict()
    path = tmp_path / "public.pt"
    save_checkpoint(Checkpoint(model=weights, config=cfg, image_shape=(1, 28, 28), step=1), path)
    return str(path), weights


def test_same_schedule_loads_the_weights(tmp_path):
    path, weights = saved(tmp_path, **{"diffusion.schedule": "cosine"})
    model = build_unet("pico", 1)
    load_initial_weights(model, path, from_flat({"model.preset": "pico", "diffusion.schedule": "cosine"}), (1, 28, 28))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[name])


@pytest.mark.parametrize("run", [{"diffusion.schedule": "cosine"}, {"diffusion.beta-end": 0.03},
                                 {"diffusion.timesteps": 500}])
def test_another_schedule_is_refused_naming_the_key(tmp_path, run):
    path, _ = saved(tmp_path, **{"diffusion.schedule": "linear_beta"})
    cfg = from_flat({"model.preset": "pico", "diffusion.schedule": "linear_beta", **run})
    with pytest.raises(ConfigError, match="federation.init-checkpoint.*noise schedule"):
        load_initial_weights(build_unet("pico", 1), path, cfg, (1, 28, 28))


def test_another_prediction_is_refused_naming_the_key(tmp_path):
    """An epsilon model's output read as a velocity (or the reverse) is wrong at every step."""
    path, _ = saved(tmp_path, **{"diffusion.prediction": "epsilon"})
    cfg = from_flat({"model.preset": "pico", "diffusion.prediction": "v_prediction"})
    with pytest.raises(ConfigError, match="federation.init-checkpoint.*diffusion.prediction"):
        load_initial_weights(build_unet("pico", 1), path, cfg, (1, 28, 28))


def test_resuming_a_run_of_another_prediction_is_refused_before_training(tmp_path):
    """A run started before ``v_prediction`` became the default and resumed without the key would otherwise go on
    training a noise-predicting model to regress the velocity."""
    run = {"model.preset": "pico", "data.limit": 16, "train.steps": 1, "train.batch-size": 8,
           "train.sample-every": 1000, "train.num-samples": 4, "diffusion.sample-steps": 2, "train.device": "cpu",
           "output.dir": str(tmp_path), "output.name": "r", "diffusion.prediction": "epsilon"}
    first = train_centralized(from_flat(run), show_progress=False)
    saved = {p: p.read_bytes() for p in first.run.root.rglob("*") if p.is_file()}
    resumed = {**run, "output.resume": True, "train.steps": 2, "diffusion.prediction": "v_prediction"}
    with pytest.raises(ConfigError, match="output.resume.*predicts epsilon.*diffusion.prediction = v_prediction"):
        train_centralized(from_flat(resumed), show_progress=False)
    assert {p: p.read_bytes() for p in first.run.root.rglob("*") if p.is_file()} == saved  # config.json too
    train_centralized(from_flat({**resumed, "diffusion.prediction": "epsilon"}), show_progress=False)  # same: goes on
