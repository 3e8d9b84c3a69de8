"""DP-SGD local training of the diffusion UNet with Opacus.

Opacus owns the privacy mechanism: Poisson sampling (``DPDataLoader``), per-sample clipping and Gaussian noise
(``DPOptimizer``) and the step count (its accountant hook). medfed only supplies per-sample gradients, with one of
three engines:

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
from dataclasses import dataclass

import torch
from monai.networks.schedulers import DDPMScheduler
from opacus import PrivacyEngine
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils.data import DataLoader

from medfed.config import PER_SAMPLE_ENGINES
from medfed.datasets import ImageDataset
from medfed.errors import ConfigError
from medfed.privacy.accounting import NoisePlan
from medfed.privacy.layer_grads import check_supported, per_layer_grads



@dataclass(frozen=True)
class PrivateTraining:
    """What one private round did: Opacus' own record of the noise, sample rate and steps taken."""

    losses: list[float]
    noise_multiplier: float
    sample_rate: float
    steps: int
    empty_batches: int


def draw_noisy_inputs(scheduler: DDPMScheduler, x0: torch.Tensor, draws: int,
                      generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K noise draws per image: ``x_t`` (B, K, C, H, W), ``t`` (B, K), ``eps`` (B, K, C, H, W)."""
    b = x0.shape[0]
    t = torch.randint(0, scheduler.num_train_timesteps, (b, draws), device=x0.device, generator=generator)
    eps = torch.randn((b, draws, *x0.shape[1:]), device=x0.device, dtype=x0.dtype, generator=generator)
    x0k = x0.unsqueeze(1).expand_as(eps)
    x_t = scheduler.add_noise(original_samples=x0k.flatten(0, 1), noise=eps.flatten(0, 1), timesteps=t.flatten())
    return x_t.view_as(eps), t, eps


def per_sample_grads(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                     chunk_size: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Whole-model per-sample gradients of each image's loss (mean over its K draws and pixels).

    Args:
        model: the plain (unwrapped) UNet.
        x_t, t, eps: from :func:`draw_noisy_inputs`.
        chunk_size: images per ``vmap`` chunk (peak activation memory scales with it); 0 = all at once.

    Returns:
        ``{parameter name: (B, *parameter shape)}`` gradients and the (B,) losses.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_of_one(p: dict[str, torch.Tensor], xt_i: torch.Tensor, t_i: torch.Tensor,
                    eps_i: torch.Tensor) -> torch.Tensor:
        return (functional_call(model, p, (xt_i, t_i)) - eps_i).pow(2).mean()

    grads, losses = vmap(grad_and_value(loss_of_one), in_dims=(None, 0, 0, 0),
                         chunk_size=chunk_size or None)(params, x_t, t, eps)
    return grads, losses


def attach_grad_samples(engine: str, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                        chunk_size: int = 0) -> torch.Tensor:
    """Compute per-sample gradients with ``engine`` (``layers`` or ``vmap``) and set them as each parameter's
    ``grad_sample``, where Opacus' ``no_op`` mode reads them; returns the (B,) losses."""
    grads, losses = (per_layer_grads(model, x_t, t, eps) if engine == "layers"
                     else per_sample_grads(model, x_t, t, eps, chunk_size))
    for name, p in model.named_parameters():
        p.grad_sample = grads[name]
    return losses


def os_entropy_generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def train_private(model: nn.Module, data: ImageDataset, plan: NoisePlan, *, batch_size: int, lr: float,
                  local_epochs: int, max_grad_norm: float, noise_multiplicity: int, engine: str,
                  scheduler: DDPMScheduler, device: torch.device, chunk_size: int = 0,
                  on_step: Callable[[float], None] | None = None) -> PrivateTraining:
    """Train ``model`` in place for ``local_epochs`` with DP-SGD at ``plan.noise_multiplier``.

    ``model`` must be the plain UNet in train mode; it stays plain (Opacus wraps a reference to it).
    """
    if engine not in PER_SAMPLE_ENGINES:
        raise ConfigError(f"config key 'privacy.per-sample-grads': '{engine}' is not one of "
                          f"{', '.join(PER_SAMPLE_ENGINES)}")
    if engine == "layers":
        check_supported(model)
    loader = DataLoader(data, batch_size=batch_size)
    if abs(1.0 / len(loader) - plan.sample_rate) > 1e-12:
        raise ValueError(f"noise plan sample rate {plan.sample_rate} does not match the loader's {1 / len(loader)}")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    engine_ = PrivacyEngine(accountant=plan.accountant)
    sampling_rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with sampling_rng:
        torch.manual_seed(secrets.randbits(63))  # Poisson sampling draws from the global generator
        private_model, dp_optimizer, dp_loader = engine_.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=plan.noise_multiplier,
            max_grad_norm=max_grad_norm, poisson_sampling=True, noise_generator=os_entropy_generator(device),
            grad_sample_mode="hooks" if engine == "hooks" else "no_op")
        draws_rng = torch.Generator(device=device).manual_seed(secrets.randbits(63))
        losses: list[float] = []
        empty = 0
        for _ in range(local_epochs):
            for x0, _labels in dp_loader:
                x0 = x0.to(device)
                dp_optimizer.zero_grad(set_to_none=True)
                if len(x0) == 0:  # an empty Poisson batch: a noise-only step, still accounted
                    empty += 1
                    for p in model.parameters():
                        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
                    dp_optimizer.step()
                    continue
                x_t, t, eps = draw_noisy_inputs(scheduler, x0, noise_multiplicity, draws_rng)
                if engine != "hooks":
                    loss = attach_grad_samples(engine, model, x_t, t, eps, chunk_size).mean()
                else:
                    # K forwards of the same B images, one backward: Opacus sums the K contributions per image.
                    per_draw = [(private_model(x_t[:, k], t[:, k]) - eps[:, k]).pow(2).flatten(1).mean(1)
                                for k in range(noise_multiplicity)]
                    loss = torch.stack(per_draw, 1).mean()
                    loss.backward()
                dp_optimizer.step()
                losses.append(float(loss.detach()))
                if on_step:
                    on_step(losses[-1])
    private_model.cleanup()  # remove Opacus' hooks and per-sample attributes from the plain model
    history = engine_.accountant.history
    if len(history) != 1:
        raise RuntimeError(f"expected one noise setting in a round, Opacus recorded {history}")
    sigma, q, steps = history[0]
    return PrivateTraining(losses=losses, noise_multiplier=float(sigma), sample_rate=float(q), steps=int(steps),
                           empty_batches=empty)
