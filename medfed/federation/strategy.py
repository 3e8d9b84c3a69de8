"""FedAvg over model deltas (Flower legacy strategy, as SecAgg+ requires), with update validation.

Sites send ``delta = local - global``. The aggregate is the example-weighted mean of the accepted deltas, added to
the current global model. With secure aggregation every result carries the same, already-aggregated delta (one
``Parameters`` object): it is validated once and is itself the mean; validation then sees only the aggregate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import Error
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from medfed.contracts import FitConfig, Reason, Refusal, SiteReply
from medfed.errors import ConfigError
from medfed.federation.weights import from_wire, shapes_of, to_wire

Scalar = bool | int | float | str


@dataclass(frozen=True)
class Accepted:
    """An update the server averaged: the site's reply (public metrics) and its weight (declared dataset size)."""

    reply: SiteReply
    num_examples: int


@dataclass
class RoundOutcome:
    """What happened to the sampled sites of one round, for the round's :class:`~medfed.contracts.RoundRecord`."""

    sampled: list[int] = field(default_factory=list)
    accepted: dict[int, Accepted] = field(default_factory=dict)
    """node id -> the site's reply and FedAvg weight."""
    rejected: dict[int, Reason] = field(default_factory=dict)
    """node id -> why the server refused the update."""
    refusals: list[Refusal] = field(default_factory=list)
    """Sites that declined (their reason codes)."""
    unexplained: list[Reason] = field(default_factory=list)
    """Failures without a readable refusal: no reply, or a reply medfed cannot read (text stays in the log)."""
    aggregated: bool = False

    def add_failure(self, text: str) -> None:
        """Classify one failure's text: a site's encoded refusal, a timeout, or unknown (the text itself is logged
        by the server, never recorded)."""
        refusal = Refusal.find(text)
        if refusal is not None:
            if refusal not in self.refusals:  # Flower may report one error reply in more than one stage
                self.refusals.append(refusal)
        else:
            log(WARNING, "site failure without a medfed reason code: %s", short_reason(text))
            self.unexplained.append(Reason.NO_REPLY if "no reply within" in text else Reason.UNKNOWN)


def short_reason(text: str, limit: int = 300) -> str:
    """The informative last line of an error report (Ray and Flower wrap exceptions in long tracebacks)."""
    lines = [line.strip(" '>\"") for line in text.splitlines() if line.strip(" '>\"")]
    reason = lines[-1] if lines else text
    prefix = text.split(":", 1)[0] if text.startswith("node ") else ""
    reason = f"{prefix}: {reason}" if prefix and not reason.startswith(prefix) else reason
    return reason[:limit]


def failure_text(failure: BaseException) -> str:
    """The text of a workflow failure; Flower's SecAgg+ workflow wraps error replies as ``Exception(Error)``."""
    error = failure.args[0] if failure.args else None
    return error.reason if isinstance(error, Error) else str(failure)


def validate_delta(delta: list[np.ndarray], reference: list[np.ndarray]) -> str | None:
    """Return why ``delta`` cannot be averaged into a model shaped like ``reference``, or None if it can."""
    if len(delta) != len(reference):
        return f"{len(delta)} arrays, expected {len(reference)}"
    for i, (d, r) in enumerate(zip(delta, reference)):
        if d.shape != r.shape:
            return f"array {i} has shape {d.shape}, expected {r.shape}"
        if not np.all(np.isfinite(d)):
            return f"array {i} contains NaN or Inf"
    return None


class DeltaFedAvg(FedAvg):
    """Example-weighted FedAvg of site deltas, keeping the global model as float32 arrays.

    Args:
        initial_weights: the global model before the first round of this run.
        num_sites: sites expected; round 1 waits for all of them, so none is left out while connecting.
        min_sites: minimum sites per round from round 2 on (dropouts beyond that stall the round).
        fraction_fit: fraction of available sites sampled each round.
        round_offset: rounds already done (when resuming), so sites see the run's true round number.
        wait_timeout: seconds to wait for enough sites before sampling anyway.
    """

    def __init__(self, initial_weights: list[np.ndarray], *, num_sites: int, min_sites: int,
                 fraction_fit: float, round_offset: int = 0, wait_timeout: float = 3600.0) -> None:
        super().__init__(fraction_fit=fraction_fit, fraction_evaluate=0.0, min_fit_clients=min_sites,
                         min_evaluate_clients=min_sites, min_available_clients=min_sites,
                         initial_parameters=ndarrays_to_parameters(to_wire(initial_weights)), accept_failures=True)
        self.current = [np.asarray(w, dtype=np.float32) for w in initial_weights]
        self.num_sites, self.min_sites = num_sites, min_sites
        self.round_offset, self.wait_timeout = round_offset, wait_timeout
        self.outcome = RoundOutcome()
        self.anchors: Callable[[], dict[str, tuple[int, str]]] = dict

    def __repr__(self) -> str:
        return f"DeltaFedAvg(num_sites={self.num_sites}, min_sites={self.min_sites})"

    def sample_size(self, available: int) -> int:
        """Sites sampled for a round when ``available`` are connected."""
        return min(max(math.ceil(available * self.fraction_fit), self.min_sites), available)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        self.outcome = RoundOutcome()
        client_manager.wait_for(self.num_sites if server_round == 1 else self.min_sites,
                                timeout=int(self.wait_timeout))
        clients = client_manager.sample(num_clients=self.sample_size(client_manager.num_available()),
                                        min_num_clients=self.min_sites)
        self.outcome.sampled = [c.node_id for c in clients]
        config = FitConfig(round=self.round_offset + server_round, anchors=self.anchors()).to_config()
        return [(client, FitIns(parameters, dict(config))) for client in clients]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]) -> tuple[Parameters | None,
                                                                                          dict[str, Scalar]]:
        accepted = []
        reasons: dict[int, str | None] = {}  # SecAgg+ gives every result the same Parameters: check it once
        on_wire = to_wire(self.current)
        for proxy, res in results:
            if id(res.parameters) not in reasons:
                reasons[id(res.parameters)] = validate_delta(parameters_to_ndarrays(res.parameters), on_wire)
            reason = reasons[id(res.parameters)]
            try:
                reply = SiteReply.from_metrics(res.metrics)
            except ConfigError as err:
                reason, reply = reason or str(err), None
            if reason is None and reply is not None:
                accepted.append((proxy, res))
                self.outcome.accepted[proxy.node_id] = Accepted(reply, res.num_examples)
            else:
                log(WARNING, "rejected update from node %s: %s", proxy.node_id, reason)
                self.outcome.rejected[proxy.node_id] = Reason.INVALID_UPDATE
        for failure in failures:
            if isinstance(failure, BaseException):
                self.outcome.add_failure(failure_text(failure))
            else:
                self.outcome.add_failure(f"node {failure[0].node_id}: {failure[1].status.message}")
        if not accepted:
            return None, {}
        if len({id(res.parameters) for _, res in accepted}) == 1:  # one (securely aggregated) delta: its own mean
            aggregated: Parameters | None = accepted[0][1].parameters
        else:
            aggregated, _ = super().aggregate_fit(server_round, accepted, [])
        if aggregated is None:
            return None, {}
        delta = from_wire(parameters_to_ndarrays(aggregated), shapes_of(self.current))
        self.current = [(w + d).astype(np.float32) for w, d in zip(self.current, delta)]  # SecAgg returns float64
        self.outcome.aggregated = True
        return ndarrays_to_parameters(to_wire(self.current)), {}
