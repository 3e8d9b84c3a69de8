"""DP-SGD local training of the diffusion UNet with Opacus.

Opacus owns the privacy mechanism: Poisson sampling (its ``UniformWithReplacementSampler``), per-sample clipping
and Gaussian noise (``DPOptimizer``) and the step count (its accountant hook). medfed builds these pieces from the
noise plan alone (:func:`private_mechanism`), not with ``PrivacyEngine.make_private``, which derives the sample
rate from the loader's length, the normaliser from the real image count (``int(N * q)``) and runs
``int(1 / q)`` steps (one fewer than planned for some sizes). Here the sample rate q, the steps and the
normaliser (``expected_batch_size``) are those of :func:`medfed.privacy.accounting.sampling_for` of the site's
declared (public) dataset size; the loader draws each of the real images with probability q and runs exactly the
planned steps. medfed only supplies per-sample gradients, with one of three engines:

``layers`` (default, fastest on CPU)
    Per-layer per-sample gradients from each layer's input and output gradient, after one backward pass that skips
    the weight gradients (:mod:`medfed.privacy.layer_grads`); handed to Opacus through ``grad_sample_mode="no_op"``.
``vmap``
    Whole-model per-sample gradients with ``torch.func`` (``vmap(grad_and_value(loss of one image))``), also
    ``no_op``; works for any layer type, and in chunks of images to save memory.
``hooks``
    Opacus' own per-layer hooks.

Noise multiplicity K (DPDM): each image's loss is the mean over K independent (t, eps) draws, and that mean is
clipped once, so the sensitivity stays the clipping norm. (Feeding K copies as separate samples would clip each
copy and silently multiply the sensitivity by K.)

The noise and the Poisson sampling draw from fresh OS entropy (``secrets``) in every round, never from the run's
seed: a seed the server knows would let it regenerate and subtract the noise. Opacus' ``secure_mode`` (a CSPRNG
for the noise) needs ``torchcsprng``, which has no release for torch 2.x.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from monai.networks.schedulers import DDPMScheduler
from opacus.accountants import IAccountant, create_accountant
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils.data import DataLoader, default_collate

from medfed.config import PER_SAMPLE_ENGINES
from medfed.datasets import ImageDataset
from medfed.diffusion.ddpm import check_labels, condition_labels, denoising_error, draw_noisy_inputs, predict_noise
from medfed.errors import ConfigError
from medfed.privacy.accounting import NoisePlan, Sampling, check_sampling
from medfed.privacy.layer_grads import check_supported, per_layer_grads



OPTIMIZERS = ("adamw", "sgd")
"""The optimizer that applies the privatised gradient: ``adamw`` (training) or ``sgd`` (no momentum, no weight
decay: the update is exactly ``-lr`` times the privatised gradient, which the mechanism's tests measure)."""


@dataclass(frozen=True)
class PrivateTraining:
    """What one private round did: Opacus' own record of the noise, sample rate, steps, clipping norm and
    normaliser (read back from its accountant and optimizer, not copied from the plan). ``losses`` stay at the
    site: they are left out of the text form, so no error message carries them."""

    losses: list[float] = field(repr=False)
    noise_multiplier: float
    sample_rate: float
    steps: int
    empty_batches: int
    max_grad_norm: float
    expected_batch_size: float


@dataclass(frozen=True)
class Mechanism:
    """Opacus' pieces of one private round, built from the noise plan by :func:`private_mechanism`.

    Attributes:
        model: the per-sample-gradient wrapper of the plain model (``hooks``, or ``no_op`` for medfed's engines).
        optimizer: clips each image's gradient to ``max_grad_norm``, adds N(0, (sigma * max_grad_norm)^2) noise
            to the sum and divides by the plan's constant ``expected_batch_size``.
        loader: Poisson batches of the real images at the plan's sample rate, one epoch's steps per pass.
        accountant: records (sigma, q, steps) at every optimizer step.
    """

    model: nn.Module
    optimizer: DPOptimizer
    loader: DataLoader
    accountant: IAccountant


def per_sample_grads(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor,
                     chunk_size: int = 0,
                     labels: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Whole-model per-sample gradients of each image's loss (mean over its K draws and pixels).

    Args:
        model: the plain (unwrapped) UNet.
        x_t, t, target: from :func:`~medfed.diffusion.ddpm.draw_noisy_inputs` (the target: noise or velocity).
        chunk_size: images per ``vmap`` chunk (peak activation memory scales with it); 0 = all at once.
        labels: (B, K) class labels of a conditional model (each image's label, per draw), else None.

    Returns:
        ``{parameter name: (B, *parameter shape)}`` gradients and the (B,) losses.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_of_one(p: dict[str, torch.Tensor], xt_i: torch.Tensor, t_i: torch.Tensor, target_i: torch.Tensor,
                    y_i: torch.Tensor | None) -> torch.Tensor:
        kwargs = {} if y_i is None else {"class_labels": y_i}
        return denoising_error(functional_call(model, p, (xt_i, t_i), kwargs), target_i).mean()

    grads, losses = vmap(grad_and_value(loss_of_one), in_dims=(None, 0, 0, 0, None if labels is None else 0),
                         chunk_size=chunk_size or None)(params, x_t, t, target, labels)
    return grads, losses


def attach_grad_samples(engine: str, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor,
                        chunk_size: int = 0, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Compute per-sample gradients with ``engine`` (``layers`` or ``vmap``) and set them as each parameter's
    ``grad_sample``, where Opacus' ``no_op`` mode reads them; returns the (B,) losses. ``labels``: (B, K) or
    None, as :func:`per_sample_grads`."""
    grads, losses = (per_layer_grads(model, x_t, t, target, labels) if engine == "layers"
                     else per_sample_grads(model, x_t, t, target, chunk_size, labels))
    for name, p in model.named_parameters():
        p.grad_sample = grads[name]
    return losses


def os_entropy_generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def poisson_loader(data: ImageDataset, sampling: Sampling, generator: torch.Generator) -> DataLoader:
    """One epoch of Poisson batches: ``steps_per_round / local_epochs`` steps, each holding every one of the
    ``len(data)`` real images independently with probability ``sampling.sample_rate`` (Opacus' sampler; empty
    batches come out as (0, C, H, W) images and (0,) labels). Iterating again draws a fresh epoch."""
    sampler = UniformWithReplacementSampler(num_samples=len(data), sample_rate=sampling.sample_rate,
                                            generator=generator,
                                            steps=sampling.steps_per_round // sampling.local_epochs)
    first = data[0]
    collate = wrap_collate_with_empty(collate_fn=default_collate,
                                      sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
                                      dtypes=[dtype_safe(x) for x in first])
    return DataLoader(data, batch_sampler=sampler, collate_fn=collate)


def private_mechanism(model: nn.Module, optimizer: torch.optim.Optimizer, data: ImageDataset, plan: NoisePlan, *,
                      max_grad_norm: float, engine: str, noise_generator: torch.Generator,
                      sampling_generator: torch.Generator) -> Mechanism:
    """Opacus' loader, per-sample-gradient wrapper, DP optimizer and accountant for one round, all from ``plan``:
    sample rate, steps and normaliser depend on the declared dataset size only, so neighbouring datasets (one
    image more or less) get the same mechanism; only the sampler sees the real images. Refusing data that does
    not hold the declared count is the site's policy, checked before this by :func:`check_runnable`.
    """
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError(f"model.preset: Opacus cannot train this model privately: {errors[0]}")
    private_model = prepare_module(model, "hooks" if engine == "hooks" else "no_op", batch_first=True,
                                   loss_reduction="mean")
    private_model.forbid_grad_accumulation()  # Poisson sampling: one batch, one step
    dp_optimizer = DPOptimizer(optimizer, noise_multiplier=plan.noise_multiplier, max_grad_norm=max_grad_norm,
                               expected_batch_size=plan.sampling.expected_batch_size, loss_reduction="mean",
                               generator=noise_generator)
    accountant = create_accountant(plan.accountant)
    dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
    return Mechanism(model=private_model, optimizer=dp_optimizer,
                     loader=poisson_loader(data, plan.sampling, sampling_generator), accountant=accountant)


def check_runnable(model: nn.Module, data: ImageDataset, plan: NoisePlan, *, engine: str, batch_size: int,
                   local_epochs: int, num_classes: int = 0) -> None:
    """Everything that would stop :func:`train_private` before its first step, checked without training: call
    it before the round's spend is committed, so a round that cannot run commits nothing.

    Raises:
        ConfigError: an unknown engine, a layer the ``layers`` engine cannot handle, or labels that do not fit.
        ValueError: ``batch_size`` or ``local_epochs`` differ from the plan's.
    """
    check_labels(data.labels, num_classes, f"dataset {data.name}")
    if engine not in PER_SAMPLE_ENGINES:
        raise ConfigError(f"config key 'privacy.per-sample-grads': '{engine}' is not one of "
                          f"{', '.join(PER_SAMPLE_ENGINES)}")
    if engine == "layers":
        check_supported(model)
    check_sampling(plan.sampling)
    if (batch_size, local_epochs) != (plan.sampling.batch_size, plan.sampling.local_epochs):
        raise ValueError(f"batch size {batch_size} and local epochs {local_epochs} differ from the plan's "
                         f"{plan.sampling.batch_size} and {plan.sampling.local_epochs}")


def check_record(done: PrivateTraining, plan: NoisePlan, max_grad_norm: float) -> None:
    """Raise unless Opacus ran exactly the planned mechanism: noise, sample rate, steps, clipping norm and
    normaliser (the message carries no loss)."""
    ran = (done.noise_multiplier, done.sample_rate, done.steps, done.max_grad_norm, done.expected_batch_size)
    planned = (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round, max_grad_norm,
               plan.sampling.expected_batch_size)
    if ran != planned:
        raise RuntimeError(f"Opacus ran (noise multiplier, sample rate, steps, clipping norm, normaliser) = {ran}, "
                           f"the plan is {planned}")


def train_private(model: nn.Module, data: ImageDataset, plan: NoisePlan, *, batch_size: int, lr: float,
                  local_epochs: int, max_grad_norm: float, noise_multiplicity: int, engine: str,
                  scheduler: DDPMScheduler, device: torch.device, chunk_size: int = 0,
                  num_classes: int = 0, label_dropout: float = 0.0, optimizer: str = "adamw",
                  on_step: Callable[[float], None] | None = None) -> PrivateTraining:
    """Train ``model`` in place with DP-SGD: exactly ``plan.steps_per_round`` Poisson steps at ``plan.sample_rate``,
    clipping at ``max_grad_norm``, noise ``plan.noise_multiplier * max_grad_norm``, normalised by the plan's
    constant ``expected_batch_size`` (all from the declared dataset size, see
    :func:`~medfed.privacy.accounting.sampling_for`).

    ``model`` must be the plain UNet in train mode; it stays plain (Opacus wraps a reference to it). A
    class-conditional model (``num_classes`` > 0, built with that many classes) trains on each image's own label
    (dropped to the null class at ``label_dropout``, as in non-private training); the label is part of the private
    sample, inside its clipped gradient, and never leaves the site.

    Everything that could stop the round is checked first (:func:`check_runnable`); after the last step Opacus'
    own record must equal the plan (:func:`check_record`).

    Raises:
        ValueError: the plan's sampling, batch size or epochs are not the ones it was planned with (before any step).
    """
    check_runnable(model, data, plan, engine=engine, batch_size=batch_size, local_epochs=local_epochs,
                   num_classes=num_classes)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer '{optimizer}' is not one of {', '.join(OPTIMIZERS)}")
    model.train()
    base = (torch.optim.AdamW(model.parameters(), lr=lr) if optimizer == "adamw"
            else torch.optim.SGD(model.parameters(), lr=lr))
    mechanism = private_mechanism(model, base, data, plan, max_grad_norm=max_grad_norm, engine=engine,
                                  noise_generator=os_entropy_generator(device),
                                  sampling_generator=os_entropy_generator(torch.device("cpu")))
    private_model, dp_optimizer, dp_loader = mechanism.model, mechanism.optimizer, mechanism.loader
    draws_rng = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    losses: list[float] = []
    empty = 0
    for _ in range(local_epochs):
        for x0, labels in dp_loader:
            x0 = x0.to(device)
            dp_optimizer.zero_grad(set_to_none=True)
            if len(x0) == 0:  # an empty Poisson batch: a noise-only step, still accounted
                empty += 1
                for p in model.parameters():
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
                dp_optimizer.step()
                continue
            y = condition_labels(labels.to(device), num_classes, label_dropout, draws_rng)
            x_t, t, target = draw_noisy_inputs(scheduler, x0, noise_multiplicity, draws_rng)
            y_k = None if y is None else y[:, None].expand_as(t)  # (B, K): an image's label in each draw
            if engine != "hooks":
                loss = attach_grad_samples(engine, model, x_t, t, target, chunk_size, y_k).mean()
            else:
                # K forwards of the same B images, one backward: Opacus sums the K contributions per image.
                per_draw = [denoising_error(predict_noise(private_model, x_t[:, k], t[:, k],
                                                          None if y_k is None else y_k[:, k]), target[:, k])
                            for k in range(noise_multiplicity)]
                loss = torch.stack(per_draw, 1).mean()
                loss.backward()
            dp_optimizer.step()
            losses.append(float(loss.detach()))
            if on_step:
                on_step(losses[-1])
    private_model.cleanup()  # remove Opacus' hooks and per-sample attributes from the plain model
    history = mechanism.accountant.history
    if len(history) != 1:
        raise RuntimeError(f"expected one noise setting in a round, Opacus recorded {history}")
    sigma, q, steps = history[0]
    done = PrivateTraining(losses=losses, noise_multiplier=float(sigma), sample_rate=float(q), steps=int(steps),
                           empty_batches=empty, max_grad_norm=float(dp_optimizer.max_grad_norm),
                           expected_batch_size=float(dp_optimizer.expected_batch_size))
    check_record(done, plan, max_grad_norm)
    return done
