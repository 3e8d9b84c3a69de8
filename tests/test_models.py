import copy

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator

from medfed.models import PRESETS, build_unet, count_parameters, ema_update, warmup_decay


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


def test_ema_warm_up_follows_a_short_run():
    assert [round(warmup_decay(n, 0.999), 4) for n in (0, 8, 80, 10_000)] == [0.1, 0.5, 0.9, 0.999]
    assert warmup_decay(5, 0.3) == 0.3  # never above the configured decay
    torch.manual_seed(0)
    start, trained = build_unet("pico", 1), build_unet("pico", 1)
    warm, fixed = copy.deepcopy(start), copy.deepcopy(start)
    for n in range(20):  # 20 updates towards the trained weights
        ema_update(warm, trained, warmup_decay(n, 0.999))
        ema_update(fixed, trained, 0.999)
    gap = lambda m: sum((a - b).norm() ** 2 for a, b in zip(m.parameters(), trained.parameters())) ** 0.5  # noqa: E731
    assert gap(warm) < 0.01 * gap(start) and gap(fixed) > 0.95 * gap(start)


def test_conditional_unet_has_a_null_class_embedding():
    model = build_unet("pico", 1, num_classes=4)
    assert model.class_embedding.num_embeddings == 5
    x = torch.randn(2, 1, 28, 28)
    assert model(x, torch.tensor([0, 999]), class_labels=torch.tensor([3, 4])).shape == x.shape
    assert not hasattr(build_unet("pico", 1), "class_embedding")


def test_weights_travel_as_one_vector_and_come_back_exactly():
    from medfed.federation.weights import from_wire, get_weights, shapes_of, to_wire
    from medfed.models.unet import state_shapes

    arrays = get_weights(build_unet("pico", 1, 3))
    wire = to_wire(arrays)
    assert len(wire) == 1 and wire[0].dtype == np.float32 and wire[0].size == sum(a.size for a in arrays)
    back = from_wire(wire, shapes_of(arrays))
    assert all(np.array_equal(a, b) for a, b in zip(arrays, back))
    assert list(state_shapes("pico", 1, 3)) == shapes_of(arrays)
    with pytest.raises(ValueError, match="one vector of"):
        from_wire([wire[0][:-1]], shapes_of(arrays))
    with pytest.raises(ValueError, match="one vector of"):
        from_wire(arrays, shapes_of(arrays))
