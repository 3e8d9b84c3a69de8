import pytest
import torch
from opacus.validators import ModuleValidator

from medfed.models import PRESETS, build_unet, count_parameters, ema_update


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_passes_opacus_validator(preset):
    model = build_unet(preset, 3)
    assert ModuleValidator.validate(model, strict=False) == []


@pytest.mark.parametrize("preset", list(PRESETS))
def test_parameter_count_matches_preset_table(preset):
    assert count_parameters(build_unet(preset, 1)) == PRESETS[preset].parameters_1ch


def test_preset_sizes():
    assert count_parameters(build_unet("tiny", 3)) <= 1_500_000
    assert 20_000_000 <= count_parameters(build_unet("paper", 3)) <= 26_000_000
    assert count_parameters(build_unet("micro", 1)) < count_parameters(build_unet("tiny", 1))


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_unet_maps_noise_to_same_shape(shape):
    model = build_unet("micro", shape[0])
    x = torch.randn(2, *shape)
    assert model(x, torch.tensor([0, 999])).shape == x.shape


def test_ema_moves_towards_model():
    a, b = build_unet("micro", 1), build_unet("micro", 1)
    before = [p.clone() for p in a.parameters()]
    ema_update(a, b, decay=0.75)
    for old, new, target in zip(before, a.parameters(), b.parameters()):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * target)
