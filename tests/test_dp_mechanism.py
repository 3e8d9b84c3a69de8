"""The DP-SGD mechanism a site runs: planned from the declared (public) dataset size, run exactly as planned, and
calibrated as the accountant assumes (noise std, clipping, normaliser), measured on ``train_private`` itself.

The mechanism tests train with ``optimizer="sgd"`` (no momentum, no weight decay), so the model update is exactly
``-lr`` times the sum over steps of the privatised gradient ``(sum of clipped per-image gradients + N(0, (sigma
C)^2 I)) / expected_batch_size``. With P parameters and S steps, the noise part of ``||update|| * normaliser / lr``
is ``sigma * C * sqrt(S) * chi(P)``; chi(P) has mean ~sqrt(P) and std ~0.71, so the tests allow 6 such stds (a
false failure has probability below 1e-8) plus the largest the clipped signal can be (C per image per step).
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from medfed.config import DataConfig, DiffusionConfig
from medfed.datasets import ImageDataset, load_dataset
from medfed.diffusion import make_scheduler
from medfed.diffusion.ddpm import draw_noisy_inputs
from medfed.models import build_unet
from medfed.privacy.accounting import (NoisePlan, batches_per_epoch, check_sampling, plan_noise,
                                       sampling_for)
from medfed.privacy.budget import PrivacyCap, commit_round
from medfed.privacy.dp_sgd import per_sample_grads, private_mechanism, train_private
from medfed.privacy.ledger import site_ledger

CPU = torch.device("cpu")
CHI_STDS = 6 * 0.71  # 6 standard deviations of chi(P), P large


def blank_images(n: int) -> ImageDataset:
    return ImageDataset(torch.zeros(n, 1, 2, 2), torch.zeros(n, dtype=torch.long), f"{n} blank images")


def mechanism_for(data: ImageDataset, plan: NoisePlan, seed: int = 0, max_grad_norm: float = 1.0):
    """The mechanism ``train_private`` builds, on a tiny model (nothing here runs a forward pass)."""
    model = torch.nn.Linear(2, 1)
    return private_mechanism(model, torch.optim.SGD(model.parameters(), lr=0.1), data, plan,
                             max_grad_norm=max_grad_norm, engine="layers",
                             noise_generator=torch.Generator().manual_seed(seed),
                             sampling_generator=torch.Generator().manual_seed(seed))


def plan_with(sampling, sigma=1.0) -> NoisePlan:
    """A plan without the (slow) noise search: the sweep checks sampling, not sigma."""
    return NoisePlan(noise_multiplier=sigma, sampling=sampling, rounds=1, target_epsilon=1.0, delta=1e-5,
                     accountant="rdp")


def recorded_step(mech) -> tuple[float, float, int]:
    """What the accountant records for one optimizer step (its hook, called as ``DPOptimizer.pre_step`` does)."""
    for p in mech.model.parameters():
        p.grad_sample = torch.zeros((1, *p.shape))
    mech.optimizer.step_hook(mech.optimizer)
    (entry,) = mech.accountant.history
    return entry


@pytest.mark.parametrize("batch", [64, 1])
def test_plan_equals_what_the_loader_and_optimizer_run_for_every_size_up_to_10000(batch):
    epochs = 2
    opacus_would_differ = []
    for n in range(1, 10_001):
        data = blank_images(n)
        s = sampling_for(n, batch, epochs)
        mech = mechanism_for(data, plan_with(s))
        sampler = mech.loader.batch_sampler
        per_epoch = batches_per_epoch(n, batch)
        assert len(mech.loader) * epochs == s.steps_per_round == epochs * per_epoch, n
        assert sampler.sample_rate == s.sample_rate == 1 / per_epoch and sampler.num_samples == n, n
        assert mech.optimizer.expected_batch_size == s.expected_batch_size == n / per_epoch, n
        assert s.expected_batch_size <= batch and mech.optimizer.max_grad_norm == 1.0, n
        assert recorded_step(mech) == (1.0, s.sample_rate, 1), n
        if int(1 / s.sample_rate) != per_epoch:  # Opacus' default step count would be one short here
            opacus_would_differ.append(n)
            if batch == 1 and n > 400:
                continue
            assert sum(1 for _ in sampler) == per_epoch, n  # really iterate the Poisson sampler
    assert opacus_would_differ  # the sweep covers the sizes that failed before (e.g. 93 x 64 at batch 64)
    if batch == 64:
        assert 93 * 64 in opacus_would_differ


@pytest.mark.parametrize("batch", [64, 8])
def test_neighbouring_datasets_get_the_same_sample_rate_steps_and_normaliser(batch):
    for n in range(2, 201):
        plan = plan_with(sampling_for(n, batch, 1))  # the declared size stays n for both datasets
        full, neighbour = mechanism_for(blank_images(n), plan, seed=n), mechanism_for(blank_images(n - 1), plan, seed=n)
        for mech in (full, neighbour):
            assert len(mech.loader) == plan.steps_per_round
            assert mech.loader.batch_sampler.sample_rate == plan.sample_rate
            assert mech.optimizer.expected_batch_size == plan.sampling.expected_batch_size
            assert mech.optimizer.noise_multiplier == plan.noise_multiplier and mech.optimizer.max_grad_norm == 1.0
        assert recorded_step(full) == recorded_step(neighbour)
        # the same sampling seed: each shared image is in the first batch of both or of neither
        first_full, first_neighbour = next(iter(full.loader.batch_sampler)), next(iter(neighbour.loader.batch_sampler))
        assert [i for i in first_full if i < n - 1] == first_neighbour
        # and no check tells the two apart: the site runs the same declared mechanism on n - 1 images
        check_sampling(plan.sampling)


@pytest.mark.slow  # 93 real DP-SGD steps of 64 images (about a minute on 2 CPU cores)
def test_a_real_round_at_93x64_images_runs_and_records_exactly_the_committed_plan(tmp_path):
    """93 batches of 64: Opacus' own loader would run int(1/q) = 92 steps; the round failed after committing."""
    n, batch = 93 * 64, 64
    mnist = load_dataset(DataConfig(dataset="embedded-mnist"))
    images = F.interpolate(mnist.images, size=(8, 8), mode="bilinear", antialias=True)  # speed only
    images = torch.cat([images, images])[:n]
    data = ImageDataset(images, torch.full((n,), -1), f"{n} MNIST images at 8x8")
    plan = plan_noise(n, batch, 1, 3, target_epsilon=8.0, delta=1e-5, accountant="rdp")
    assert int(1 / plan.sample_rate) == 92 and plan.steps_per_round == 93
    entry = commit_round(site_ledger(tmp_path), PrivacyCap(100.0, 1e-5), plan, site_name="site-x", run_id=1,
                         run_name="t", server_round=1, max_grad_norm=1.0, noise_multiplicity=1, num_examples=n)
    torch.manual_seed(0)
    done = train_private(build_unet("micro", 1), data, plan, batch_size=batch, lr=1e-3, local_epochs=1,
                         max_grad_norm=1.0, noise_multiplicity=1, engine="layers",
                         scheduler=make_scheduler(DiffusionConfig()), device=CPU)
    assert (done.noise_multiplier, done.sample_rate, done.steps) == (
        entry.data["noise_multiplier"], entry.data["sample_rate"], entry.data["steps"]) == (
        plan.noise_multiplier, plan.sample_rate, 93)
    assert done.expected_batch_size == entry.data["expected_batch_size"] == 64.0
    assert len(done.losses) + done.empty_batches == 93


def sgd_round(data, plan, *, max_grad_norm, lr, engine="layers", seed=0):
    """One site round on the real path with plain SGD; returns (P parameters, ||update||, the record)."""
    torch.manual_seed(seed)
    model = build_unet("micro", 1)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    done = train_private(model, data, plan, batch_size=plan.sampling.batch_size, lr=lr,
                         local_epochs=plan.sampling.local_epochs, max_grad_norm=max_grad_norm, noise_multiplicity=1,
                         engine=engine, scheduler=make_scheduler(DiffusionConfig()), device=CPU, optimizer="sgd")
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return before.numel(), float((after - before).double().norm()), done


def mnist(n):
    data = load_dataset(DataConfig(dataset="embedded-mnist", limit=n))
    return ImageDataset(data.images[:n], data.labels[:n], f"{n} MNIST images")


def test_update_noise_has_the_std_that_sigma_clip_and_normaliser_imply():
    n, batch, clip, lr = 16, 8, 0.5, 1e-3
    plan = plan_noise(n, batch, 1, 1, target_epsilon=1.0, delta=1e-5, accountant="rdp")  # sigma ~3.5, 2 steps
    params, moved, done = sgd_round(mnist(n), plan, max_grad_norm=clip, lr=lr)
    steps, norm = plan.steps_per_round, plan.sampling.expected_batch_size
    assert (steps, norm) == (2, 8)
    # ||update|| * normaliser / lr = ||sum of clipped gradients + N(0, steps (sigma C)^2 I_P)||
    measured = moved * norm / lr
    assert math.isfinite(measured)
    noise = plan.noise_multiplier * clip * math.sqrt(steps)
    signal_bound = steps * n * clip  # at most every image in every step, each clipped to C
    assert abs(measured - noise * math.sqrt(params)) <= signal_bound + noise * CHI_STDS, (measured, noise, params)
    assert signal_bound < 0.05 * noise * math.sqrt(params)  # the test resolves the noise to within 5%
    assert done.max_grad_norm == clip and done.expected_batch_size == norm


def unclipped_norms(data: ImageDataset, seed: int = 0, draws: int = 4) -> torch.Tensor:
    """(N,) each image's per-sample gradient norm at ``sgd_round``'s starting model, the smallest over draws."""
    torch.manual_seed(seed)
    model = build_unet("micro", 1)
    x_t, t, eps = draw_noisy_inputs(make_scheduler(DiffusionConfig()), data.images, draws,
                                    torch.Generator().manual_seed(seed))
    norms = []
    for k in range(draws):  # one (t, eps) draw at a time
        grads, _ = per_sample_grads(model, x_t[:, k:k + 1], t[:, k:k + 1], eps[:, k:k + 1])
        norms.append(torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], 1).norm(dim=1))
    return torch.stack(norms).min(0).values


def test_images_with_outsized_gradients_move_the_model_by_no_more_than_their_clipped_share():
    """Per-image gradients of the micro UNet are 0.4-4 (GroupNorm makes it blind to the pixel scale), so a
    clipping norm of 1e-4 makes every image's gradient thousands of times too large."""
    n, clip, lr = 5, 1e-4, 10.0
    data = mnist(n)
    plan = plan_noise(n, 64, 1, 1, target_epsilon=8.0, delta=1e-5, accountant="rdp")  # q = 1: always drawn
    params, moved, done = sgd_round(data, plan, max_grad_norm=clip, lr=lr)
    noise = plan.noise_multiplier * clip
    bound = n * clip + noise * (math.sqrt(params) + CHI_STDS)  # every image's clipped share, plus the noise
    assert moved * plan.sampling.expected_batch_size / lr <= bound
    assert (unclipped_norms(data) > 10 * bound).all()  # unclipped, any one image alone would break the bound


@pytest.mark.parametrize("engine", ["layers", "hooks"])
def test_the_clipping_norm_opacus_applies_is_the_configured_one(engine):
    """One image, noise negligible: one step moves the model by exactly C x lr / normaliser."""
    clip, lr = 3.7e-3, 10.0  # a privacy.max-grad-norm that is not a default, far below the image's gradient
    data = mnist(1)
    plan = dataclasses.replace(plan_noise(1, 64, 1, 1, target_epsilon=8.0, delta=1e-5, accountant="rdp"),
                               noise_multiplier=1e-5)
    params, moved, done = sgd_round(data, plan, max_grad_norm=clip, lr=lr, engine=engine)
    assert done.max_grad_norm == clip  # Opacus' own optimizer, read back
    assert plan.sampling.expected_batch_size == 1 and plan.steps_per_round == 1
    noise = 1e-5 * clip * (math.sqrt(params) + CHI_STDS)
    assert abs(moved / lr - clip) <= noise + 1e-3 * clip, (moved / lr, clip)
    assert unclipped_norms(data)[0] > 10 * clip


def test_data_that_does_not_hold_the_declared_count_runs_the_declared_mechanism():
    """No refusal (it would reveal whether the private count equals the declared one): 19 images declared as 20
    train exactly the declared plan's steps, sample rate and normaliser."""
    plan = plan_with(sampling_for(20, 8, 1))
    model = build_unet("micro", 1)
    before = [p.detach().clone() for p in model.parameters()]
    done = train_private(model, mnist(19), plan, batch_size=8, lr=1.0, local_epochs=1, max_grad_norm=1.0,
                         noise_multiplicity=1, engine="layers", scheduler=make_scheduler(DiffusionConfig()), device=CPU)
    assert (done.steps, done.sample_rate, done.expected_batch_size) == (
        plan.steps_per_round, plan.sample_rate, plan.sampling.expected_batch_size)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
