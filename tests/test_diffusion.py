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


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
def test_per_sample_loss_is_one_value_per_image_and_seeded(prediction):
    model, sched = build_unet("micro", 1), make_scheduler(DiffusionConfig(prediction=prediction))
    x0 = torch.rand(5, 1, 28, 28) * 2 - 1
    a = per_sample_loss(model, sched, x0, torch.Generator().manual_seed(3))
    b = per_sample_loss(model, sched, x0, torch.Generator().manual_seed(3))
    assert a.shape == (5,)
    torch.testing.assert_close(a, b)
    # MONAI zero-initialises the output convolution, so an untrained net predicts 0 and each image's loss is the
    # mean square of its own target (the same draws): E[eps^2] = 1 for the noise, a_t + (1 - a_t) E[x0^2] for v.
    _, t, target = draw_noisy_inputs(sched, x0, 1, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, target[:, 0].pow(2).mean(dim=(1, 2, 3)))
    if prediction == "epsilon":
        assert a.mean().item() == pytest.approx(1.0, abs=0.15)
    else:
        abar = sched.alphas_cumprod[t[:, 0]]
        torch.testing.assert_close(a, abar + (1 - abar) * x0.pow(2).mean(dim=(1, 2, 3)), atol=0.06, rtol=0)


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


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_per_sample_loss_is_the_denoising_error_of_one_noise_draw(prediction):
    """The loss is the error against the model's own target: the drawn noise, or for a v model the velocity of
    (x0, that noise) - not the noise."""
    cfg = DiffusionConfig(prediction=prediction)
    model, sched = build_unet("pico", 1), make_scheduler(cfg)
    assert sched.prediction_type == prediction
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x0 = torch.rand(3, 1, 28, 28) * 2 - 1
    loss = per_sample_loss(model, sched, x0, torch.Generator().manual_seed(5))
    x_t, t, target = draw_noisy_inputs(sched, x0, 1, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # draw_noisy_inputs draws t first, then the noise
    t_again = torch.randint(0, sched.num_train_timesteps, (3, 1), generator=g)
    eps = torch.randn((3, 1, 1, 28, 28), generator=g)
    torch.testing.assert_close(t, t_again)
    expected = eps[:, 0] if prediction == "epsilon" else sched.get_velocity(x0, eps[:, 0], t[:, 0])
    torch.testing.assert_close(target[:, 0], expected)
    torch.testing.assert_close(loss, denoising_error(model(x_t[:, 0], t[:, 0]), target[:, 0]))
    if prediction == "v_prediction":
        assert not torch.allclose(loss, denoising_error(model(x_t[:, 0], t[:, 0]), eps[:, 0]))
    torch.testing.assert_close(denoising_error(torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)), torch.ones(2))
    out = sample_images(build_unet("pico", 1), cfg, 2, (1, 28, 28), device=torch.device("cpu"), steps=3)
    assert out.shape == (2, 1, 28, 28) and out.min() >= -1 and out.max() <= 1

class Oracle(nn.Module):
    """A "network" that outputs the true regression target of the one (x0, eps) it was built for."""

    def __init__(self, scheduler, x0, eps):
        super().__init__()
        self.scheduler, self.x0, self.eps = scheduler, x0, eps

    def forward(self, x_t, t):
        from medfed.diffusion.ddpm import regression_target

        return regression_target(self.scheduler, self.x0, self.eps, t)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_training_target_and_both_samplers_share_the_parameterisation(prediction):
    """What training regresses (the noise, or the velocity sqrt(a) eps - sqrt(1 - a) x0) is what both samplers
    read: fed the true target, DDIM and DDPM recover x0 exactly from x_t at any step, and the noise estimate read
    back from the output is the noise."""
    from medfed.diffusion.ddpm import predicted_noise, regression_target
    from medfed.diffusion.sampling import make_sampler

    cfg = DiffusionConfig(prediction=prediction)
    train = make_scheduler(cfg)
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    eps = torch.randn(3, 1, 8, 8)
    oracle = Oracle(train, x0, eps)
    for t in (5, 400, 990):
        tt = torch.full((3,), t)
        x_t = train.add_noise(original_samples=x0, noise=eps, timesteps=tt)
        target = regression_target(train, x0, eps, tt)
        ab = train.alphas_cumprod[t]
        expected = eps if prediction == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
        torch.testing.assert_close(target, expected)
        torch.testing.assert_close(predicted_noise(train, target, x_t, tt), eps, atol=1e-4, rtol=1e-4)
        for name in ("ddim", "ddpm"):
            sampler = make_sampler(cfg, name, 10)
            recovered = sampler.step(oracle(x_t, tt), t, x_t)[1]
            torch.testing.assert_close(recovered, x0, atol=2e-3 if t < 900 else 5e-2, rtol=0)

