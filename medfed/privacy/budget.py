"""A site's privacy budget: the cap its hospital set, what the ledger says it spent, and the round gate.

A round's spend is committed to the ledger *before* the site trains (check and append under the ledger's lock),
so two runs at one site cannot both pass the gate with the same remaining budget, and a crash mid-round never
leaves spent budget unrecorded. A round that could not run (its data does not hold the declared number of images,
or its sampling is not the planned one) is refused before anything is committed. After training, Opacus' own
record of the steps must match the commitment.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import flwr
import opacus

from medfed import __version__
from medfed.errors import MedfedError
from medfed.privacy.accounting import NoisePlan, Step, check_sampling, epsilon
from medfed.privacy.ledger import Ledger, LedgerEntry


class BudgetExceededError(MedfedError):
    """The site refused a round because it would exceed the site's privacy cap."""


@dataclass(frozen=True)
class PrivacyCap:
    """The (epsilon, delta) a hospital allows its data to be spent on, over all runs."""

    epsilon: float
    delta: float


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """SHA-256 over the installed medfed package's Python sources: what code ran on the site's data."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def code_version() -> dict[str, str]:
    return {"medfed": __version__, "medfed_sources_sha256": code_fingerprint(), "opacus": opacus.__version__,
            "flwr": flwr.__version__}


def history_of(entries: list[LedgerEntry]) -> list[Step]:
    """The accountant history recorded by a ledger's round entries."""
    return [(e.data["noise_multiplier"], e.data["sample_rate"], e.data["steps"]) for e in entries if e.kind == "round"]


def spent_epsilon(ledger: Ledger, delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of everything the ledger records."""
    return epsilon(history_of(ledger.entries()), delta, accountant)


def commit_round(ledger: Ledger, cap: PrivacyCap, plan: NoisePlan, *, site_name: str, run_id: int,
                 run_name: str, server_round: int, max_grad_norm: float, noise_multiplicity: int,
                 num_examples: int, record_spend: bool = True) -> LedgerEntry | None:
    """Record the round's spend if it keeps the site within ``cap``; otherwise record a refusal and raise.

    With ``record_spend=False`` only the gate runs (a refusal is still recorded); nothing is spent. Secure
    aggregation uses that at its setup stage, so a site over its cap leaves before keys are exchanged.

    Raises:
        BudgetExceededError: the round would take epsilon(cap.delta) above ``cap.epsilon``.
        ValueError: the plan's sampling is not the one its declared size gives; nothing is recorded.
    """
    check_sampling(plan.sampling)  # a round that could not run commits nothing
    step: Step = (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    with ledger.transaction() as tx:
        history = history_of(tx.entries)
        before = epsilon(history, cap.delta, plan.accountant)
        after = epsilon([*history, step], cap.delta, plan.accountant)
        if after > cap.epsilon:
            reason = (f"site {site_name} refused round {server_round}: privacy cap reached: the round would "
                      f"raise epsilon from {before:.4f} to "
                      f"{after:.4f} (delta {cap.delta:g}), above the site's cap {cap.epsilon:g}")
            tx.add("refusal", {"site": site_name, "run_id": run_id, "run_name": run_name, "round": server_round,
                               "reason": reason,
                               "epsilon_spent": before, "epsilon_projected": after, "cap_epsilon": cap.epsilon,
                               "delta": cap.delta, "code_version": code_version()})
            raise BudgetExceededError(reason)
        if not record_spend:
            return None
        return tx.add("round", {
            "site": site_name, "run_id": run_id, "run_name": run_name, "round": server_round,
            "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
            "steps": plan.steps_per_round, "max_grad_norm": max_grad_norm,
            "noise_multiplicity": noise_multiplicity, "num_examples": num_examples,
            "declared_size": plan.declared_size, "expected_batch_size": plan.sampling.expected_batch_size,
            "accountant": plan.accountant,
            "epsilon": after, "delta": cap.delta, "cap_epsilon": cap.epsilon,
            "planned_target_epsilon": plan.target_epsilon, "planned_rounds": plan.rounds,
            "code_version": code_version()})
