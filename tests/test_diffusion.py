import pytest
import torch
from torch import nn

from medfed.config import DiffusionConfig
from medfed.diffusion import denoising_error, draw_noisy_inputs, make_scheduler, per_sample_loss, sample_images
from medfed.models import build_unet


class CountingNet(nn.Module):
    """Wraps a UNet and counts forward calls (one per reverse step)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x, t):
        self.calls += 1
        return self.net(x, t)


def test_per_sample_loss_is_one_value_per_image_and_seeded():
    model, sched = build_unet("micro", 1), make_scheduler(DiffusionConfig())
    x0 = torch.rand(5, 1, 28, 28) * 2 - 1
    a = per_sample_loss(model, sched, x0, torch.Generator().manual_seed(3))
    b = per_sample_loss(model, sched, x0, torch.Generator().manual_seed(3))
    assert a.shape == (5,)
    torch.testing.assert_close(a, b)
    # MONAI zero-initialises the output convolution, so an untrained net predicts 0 and the loss is E[eps^2] = 1.
    assert a.mean().item() == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("sampler,steps,expected_calls", [("ddim", 7, 7), ("ddpm", None, 20)])
def test_samplers_run_their_step_counts(sampler, steps, expected_calls):
    cfg = DiffusionConfig(timesteps=20)
    net = CountingNet(build_unet("micro", 1))
    out = sample_images(net, cfg, 3, (1, 28, 28), device=torch.device("cpu"), sampler=sampler, steps=steps)
    assert out.shape == (3, 1, 28, 28)
    assert out.min() >= -1 and out.max() <= 1
    assert net.calls == expected_calls


@pytest.mark.parametrize("schedule", ["linear_beta", "cosine"])
def test_training_and_both_samplers_share_the_schedule(schedule):
    """The cosine schedule (no beta range) and a beta schedule give the same alphas_cumprod to training, DDPM and
    DDIM; cosine keeps more signal mid-way (Nichol and Dhariwal 2021) and ends near pure noise."""
    from medfed.diffusion.sampling import make_sampler

    cfg = DiffusionConfig(schedule=schedule)
    train = make_scheduler(cfg).alphas_cumprod
    for sampler in ("ddpm", "ddim"):
        torch.testing.assert_close(make_sampler(cfg, sampler, 10).alphas_cumprod, train)
    assert 0 < train[-1] < 1e-3 and train[0] > 0.99 and bool((train[1:] < train[:-1]).all())
    linear = make_scheduler(DiffusionConfig(schedule="linear_beta")).alphas_cumprod
    if schedule == "cosine":
        assert train[500] > 4 * linear[500]
    net = CountingNet(build_unet("pico", 1))
    out = sample_images(net, cfg, 2, (1, 28, 28), device=torch.device("cpu"), sampler="ddim", steps=4)
    assert out.shape == (2, 1, 28, 28) and net.calls == 4


def test_sampling_is_reproducible_per_seed():
    cfg = DiffusionConfig(timesteps=10, sample_steps=5)
    torch.manual_seed(0)
    net = build_unet("micro", 1)
    for p in net.parameters():  # leave the zero-initialised output conv behind, so outputs depend on the seed path
        p.data.add_(0.01 * torch.randn_like(p))
    run = lambda seed: sample_images(net, cfg, 4, (1, 28, 28), device=torch.device("cpu"), seed=seed)  # noqa: E731
    torch.testing.assert_close(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_per_sample_loss_is_the_denoising_error_of_one_noise_draw():
    model, sched = build_unet("pico", 1), make_scheduler(DiffusionConfig())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x0 = torch.rand(3, 1, 28, 28) * 2 - 1
    loss = per_sample_loss(model, sched, x0, torch.Generator().manual_seed(5))
    x_t, t, eps = draw_noisy_inputs(sched, x0, 1, torch.Generator().manual_seed(5))
    torch.testing.assert_close(loss, denoising_error(model(x_t[:, 0], t[:, 0]), eps[:, 0]))
    torch.testing.assert_close(denoising_error(torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)), torch.ones(2))
