"""Planning DP-SGD noise for a whole run and computing epsilon with Opacus' accountants.

Both planning and accounting use the same Opacus accountant (``rdp`` or ``prv``), and the sample rate that
Opacus' Poisson data loader really uses: ``q = 1 / len(DataLoader(data, batch_size))``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from medfed.config import ACCOUNTANTS
from medfed.errors import ConfigError

Step = tuple[float, float, int]
"""One accountant history entry: (noise multiplier, sample rate, steps)."""


@dataclass(frozen=True)
class NoisePlan:
    """The noise a site uses in every round of a run, planned so the whole run spends ``target_epsilon``.

    Attributes:
        noise_multiplier: sigma, the Gaussian noise std in units of the clipping norm.
        sample_rate: Poisson sampling probability q of each image per step.
        steps_per_round: local epochs x batches per epoch.
        rounds: rounds the run plans.
        target_epsilon, delta: the (epsilon, delta) the plan reaches after all rounds.
        accountant: ``rdp`` or ``prv``.
    """

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    target_epsilon: float
    delta: float
    accountant: str


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    """``len(DataLoader(range(num_examples), batch_size))``: what Opacus derives the sample rate from."""
    return max(1, math.ceil(num_examples / batch_size))


@functools.lru_cache(maxsize=1024)  # a pure function, and Opacus' search takes seconds at sample rates below 1
def plan_noise(num_examples: int, batch_size: int, local_epochs: int, rounds: int, target_epsilon: float,
               delta: float, accountant: str) -> NoisePlan:
    """The smallest noise multiplier whose ``rounds x local_epochs x batches`` Poisson steps spend
    ``target_epsilon`` at ``delta``."""
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"config key 'privacy.accountant': '{accountant}' is not one of {', '.join(ACCOUNTANTS)}")
    if num_examples < 1:
        raise ConfigError("a site with no images cannot train")
    per_epoch = batches_per_epoch(num_examples, batch_size)
    q = 1.0 / per_epoch
    steps = local_epochs * per_epoch
    sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=q,
                                 steps=rounds * steps, accountant=accountant)
    return NoisePlan(noise_multiplier=float(sigma), sample_rate=q, steps_per_round=steps, rounds=rounds,
                     target_epsilon=target_epsilon, delta=delta, accountant=accountant)


def epsilon(history: Sequence[Step], delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` after all steps of ``history`` (0 for an empty history).

    Entries with the same noise and sample rate are one mechanism composed with itself, so they are merged
    (steps summed) before Opacus composes them: the same guarantee, at a cost that does not grow with the rounds.
    """
    steps: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        mechanism = (float(s), float(q))
        steps[mechanism] = steps.get(mechanism, 0) + int(n)
    return _epsilon(tuple((s, q, n) for (s, q), n in steps.items()), delta, accountant)


@functools.lru_cache(maxsize=1024)  # pure; a site's gate asks the same question at SecAgg+ setup and in training
def _epsilon(history: tuple[Step, ...], delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))
