"""The fast sampling path (channels-last, inference mode, autocast, compile) against the plain eager loop.

Float32 paths must give the same images as the plain loop up to float rounding: channels-last convolutions sum in
another order, which moved the images of these 20-step chains by at most 4e-7; ``ATOL`` leaves a wide margin.
"""

import pytest
import torch

from medfed.config import DiffusionConfig
from medfed.diffusion.sampling import (
    default_batch_size,
    denoise,
    make_sampler,
    noise_predictor,
    resolve_precision,
    sample_images,
)
from medfed.errors import ConfigError
from medfed.models import build_unet

CPU = torch.device("cpu")
CFG = DiffusionConfig(timesteps=20, sample_steps=5)
ATOL = 1e-4


def perturbed_micro(channels: int = 1, seed: int = 0) -> torch.nn.Module:
    """``micro`` with weights off MONAI's zero-initialised output layer, so images depend on every step."""
    torch.manual_seed(seed)
    net = build_unet("micro", channels)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net


def plain_loop(net, scheduler, x, generator):
    """The straightforward MONAI loop: eval mode, no_grad, default memory format, float32."""
    net.eval()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = net(x, torch.full((x.shape[0],), int(t), dtype=torch.long))
            x, _ = scheduler.step(eps, int(t), x, generator=generator)
    return x


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_fast_path_gives_the_plain_loops_images(sampler):
    net = perturbed_micro()
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    expected = plain_loop(net, make_sampler(CFG, sampler, 5), x, torch.Generator().manual_seed(7))
    with noise_predictor(net, CPU, channels_last=True, precision="float32") as predict, torch.inference_mode():
        got = denoise(predict, make_sampler(CFG, sampler, 5), x, generator=torch.Generator().manual_seed(7))
    assert got.abs().max() > 0.1  # a real image, not an all-zero output that would match anything
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_channels_last_does_not_change_sample_images():
    net = perturbed_micro(3)
    run = lambda **kw: sample_images(net, CFG, 5, (3, 32, 32), device=CPU, seed=4, batch_size=2,  # noqa: E731
                                     sampler="ddpm", precision="float32", **kw)
    fast, plain = run(channels_last=True), run()
    assert fast.is_contiguous() and fast.shape == (5, 3, 32, 32)
    torch.testing.assert_close(fast, plain, atol=ATOL, rtol=0)


def test_sampling_leaves_the_model_as_it_was():
    net = perturbed_micro().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    sample_images(net, CFG, 2, (1, 28, 28), device=CPU, channels_last=True)
    assert net.training
    assert all(p.is_contiguous() for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_model_is_restored_when_sampling_fails():
    net = perturbed_micro().train()
    with pytest.raises(RuntimeError):  # 2 channels into a 1-channel UNet: the forward pass fails
        sample_images(net, CFG, 2, (2, 28, 28), device=CPU, channels_last=True)
    assert net.training and all(p.is_contiguous() for p in net.parameters())


def test_bfloat16_changes_images_only_slightly():
    net = perturbed_micro()
    run = lambda precision: sample_images(net, CFG, 4, (1, 28, 28), device=CPU, seed=1,  # noqa: E731
                                          precision=precision)
    exact, low = run("float32"), run("bfloat16")
    assert low.dtype == torch.float32 and low.min() >= -1 and low.max() <= 1
    diff = (low - exact).abs()
    assert diff.max() > 0  # autocast really ran in bfloat16 ...
    assert diff.mean() < 0.02  # ... and moved pixels by about one uint8 level (2/255) on average, not more


@pytest.mark.slow  # compiling the UNet takes one to two minutes on 2 CPU cores
def test_compiled_sampler_matches_eager_for_each_model_and_a_partial_last_batch():
    first, second = perturbed_micro().train(), perturbed_micro(seed=1)
    before = {k: v.clone() for k, v in first.state_dict().items()}
    run = lambda net, **kw: sample_images(net, CFG, 3, (1, 28, 28), device=CPU, seed=2,  # noqa: E731
                                          batch_size=2, precision="float32", **kw)
    torch.testing.assert_close(run(first, compile=True), run(first), atol=ATOL, rtol=0)
    assert first.training and all(torch.equal(v, before[k]) for k, v in first.state_dict().items())
    # compile freezes the weights into the graph: a second model of the same shape must not reuse them
    torch.testing.assert_close(run(second, compile=True), run(second), atol=ATOL, rtol=0)


def test_unknown_sampler_or_precision_is_a_config_error():
    net = perturbed_micro()
    with pytest.raises(ConfigError, match="precision 'fp8'"):
        sample_images(net, CFG, 1, (1, 28, 28), device=CPU, precision="fp8")
    with pytest.raises(ConfigError, match="sampler 'euler'"):
        sample_images(net, CFG, 1, (1, 28, 28), device=CPU, sampler="euler")


@pytest.mark.parametrize("has_amx,expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_precision_is_bfloat16_only_on_cpus_with_amx(monkeypatch, has_amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: has_amx)
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("auto", torch.device("cuda")) == "float32"  # until measured on GPUs
    assert resolve_precision("float32", CPU) == "float32"


def test_default_batch_size_grows_on_gpus_and_shrinks_with_image_size():
    cuda = torch.device("cuda")
    assert default_batch_size(CPU, (1, 28, 28)) == 64
    assert default_batch_size(cuda, (3, 32, 32)) == 1024
    assert default_batch_size(cuda, (1, 64, 64)) == 256
    assert default_batch_size(cuda, (1, 512, 512)) == 16
