"""Planning DP-SGD noise for a whole run and computing epsilon with Opacus' accountants.

Adjacency: add or remove one image. Under it a site's exact image count N is private, so nothing in the mechanism
may depend on it. The site declares its dataset size (public, ``policy.dataset-size``); the sample rate, the steps
of a round and the DP-SGD normaliser are functions of that declared size, the batch size and the epochs only
(:func:`sampling_for`). Whatever number of images the site really holds, it runs that same mechanism (Poisson
draws at the declared rate over its images): the sampled Gaussian mechanism the accountant analyses, for any count,
and no refusal or other behaviour that would reveal whether the count equals the declared one (a different count
only changes utility and how FedAvg should weigh the site; the site logs it locally).
Planning and accounting use the same Opacus accountant (``rdp`` or ``prv``) with
exactly that sample rate and step count, which are also what the site's Poisson loader and DP optimizer run
(:func:`medfed.privacy.dp_sgd.private_mechanism`).
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
class Sampling:
    """How one round of DP-SGD draws and averages, from public numbers only.

    Attributes:
        declared_size: training images the site declares public (``policy.dataset-size``).
        batch_size: expected Poisson batch size B (``train.batch-size``), in images.
        local_epochs: epochs per round.
        sample_rate: q = 1 / ceil(declared_size / B), each image's probability of being in a step's batch.
        steps_per_round: local_epochs x ceil(declared_size / B).
        expected_batch_size: declared_size / ceil(declared_size / B) = declared_size x q (images): the constant
            the noisy sum of clipped per-image gradients is divided by, whatever the real batch size.
    """

    declared_size: int
    batch_size: int
    local_epochs: int
    sample_rate: float
    steps_per_round: int
    expected_batch_size: float


@dataclass(frozen=True)
class NoisePlan:
    """The noise a site uses in every round of a run, planned so the whole run spends ``target_epsilon``.

    Attributes:
        noise_multiplier: sigma, the Gaussian noise std in units of the clipping norm.
        sampling: the round's sample rate, steps and normaliser (from the declared size only).
        rounds: rounds the run plans.
        target_epsilon, delta: the (epsilon, delta) the plan reaches after all rounds.
        accountant: ``rdp`` or ``prv``.
    """

    noise_multiplier: float
    sampling: Sampling
    rounds: int
    target_epsilon: float
    delta: float
    accountant: str

    @property
    def sample_rate(self) -> float:
        return self.sampling.sample_rate

    @property
    def steps_per_round(self) -> int:
        return self.sampling.steps_per_round

    @property
    def declared_size(self) -> int:
        return self.sampling.declared_size


def batches_per_epoch(declared_size: int, batch_size: int) -> int:
    """ceil(declared_size / batch_size), at least 1: the steps of one epoch."""
    return max(1, math.ceil(declared_size / batch_size))


def sampling_for(declared_size: int, batch_size: int, local_epochs: int) -> Sampling:
    """The round's sampling from the declared (public) size; see :class:`Sampling`.

    Raises:
        ConfigError: a non-positive size, batch size or epoch count.
    """
    for value, what in ((declared_size, "the declared dataset size (policy.dataset-size)"),
                        (batch_size, "train.batch-size"), (local_epochs, "federation.local-epochs")):
        if value < 1:
            raise ConfigError(f"{what} must be >= 1 to train privately (got {value})")
    per_epoch = batches_per_epoch(declared_size, batch_size)
    q = 1.0 / per_epoch
    return Sampling(declared_size=declared_size, batch_size=batch_size, local_epochs=local_epochs, sample_rate=q,
                    steps_per_round=local_epochs * per_epoch, expected_batch_size=declared_size / per_epoch)


def check_sampling(sampling: Sampling) -> None:
    """Refuse a round whose sampling is not :func:`sampling_for` of its own public numbers. Called before a
    round's spend is committed and again before training, so a round that could not run commits nothing.

    The real image count is deliberately not checked against the declared one: the mechanism (Poisson draws at
    the declared rate over whatever images the site holds, the declared steps and normaliser) is the sampled
    Gaussian mechanism the accountant analyses under add/remove-one adjacency for *any* count, while refusing on
    a different count would itself reveal whether the private count equals the declared one.

    Raises:
        ValueError: ``sampling`` was not made by :func:`sampling_for` (a programming error).
    """
    expected = sampling_for(sampling.declared_size, sampling.batch_size, sampling.local_epochs)
    if sampling != expected:
        raise ValueError(f"sampling {sampling} is not the one planned from its declared size: {expected}")


@functools.lru_cache(maxsize=1024)  # a pure function, and Opacus' search takes seconds at sample rates below 1
def plan_noise(declared_size: int, batch_size: int, local_epochs: int, rounds: int, target_epsilon: float,
               delta: float, accountant: str) -> NoisePlan:
    """The smallest noise multiplier whose ``rounds x steps_per_round`` Poisson steps at the sample rate of
    :func:`sampling_for` spend ``target_epsilon`` at ``delta``.

    Args:
        declared_size: the site's public dataset size (images), never its measured count.
    """
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"config key 'privacy.accountant': '{accountant}' is not one of {', '.join(ACCOUNTANTS)}")
    sampling = sampling_for(declared_size, batch_size, local_epochs)
    sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sampling.sample_rate,
                                 steps=rounds * sampling.steps_per_round, accountant=accountant)
    return NoisePlan(noise_multiplier=float(sigma), sampling=sampling, rounds=rounds, target_epsilon=target_epsilon,
                     delta=delta, accountant=accountant)


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
