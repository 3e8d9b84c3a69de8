"""The site's policy, enforced at the site on every message, before any data is loaded.

A hospital's :class:`~medfed.contracts.SitePolicy` is the source of truth: whatever the coordinator's run
config or messages say, a round that breaks a rule is refused with that rule's :class:`~medfed.contracts.Reason`
code. The checks here read only the run config and the node config: no data, no model, no Flower (the ClientApp's
``site_guard_mod`` adds the checks of the messages themselves).
"""

from __future__ import annotations

from collections.abc import Mapping

from medfed.config import RunConfig
from medfed.contracts import NodeConfig, Reason, Scalar, SitePolicy
from medfed.errors import ConfigError, MedfedError


class Refused(MedfedError):
    """The site declines the round under one of its rules. Only :attr:`reason` leaves the site; the message
    (which may name files or counts) stays in its own log."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def simulated_node(cfg: RunConfig, partition_id: int, num_partitions: int) -> NodeConfig:
    """A simulated site's node config: its shard, and the simulated hospitals' policy from ``policy.*``.

    In simulation one operator plays coordinator and hospitals, so the policy comes from the run config; its
    delta is the run's ``privacy.delta`` and its dataset size is the shard's own count (declared when the site
    loads its shard)."""
    p = cfg.policy
    policy = SitePolicy(require_dp=p.require_dp, require_secure_aggregation=p.require_secure_aggregation,
                        delta=cfg.privacy.delta, min_sites_per_round=p.min_sites_per_round,
                        share_evaluation=p.share_evaluation, max_run_epsilon=p.max_run_epsilon,
                        min_noise_multiplier=p.min_noise_multiplier)
    return NodeConfig(site_name=f"site-{partition_id}", policy=policy, partition_id=partition_id,
                      num_partitions=num_partitions)


def node_of(cfg: RunConfig, node_config: Mapping[str, Scalar]) -> NodeConfig:
    """The typed node config of this ClientApp: a deployed site's own, or a simulated site's."""
    node = NodeConfig.from_flower(node_config)
    return node if node.deployed else simulated_node(cfg, node.partition_id, node.num_partitions)


def sites_per_round(cfg: RunConfig) -> int:
    """The fewest sites the run's config lets a round aggregate over."""
    return cfg.federation.min_sites or cfg.federation.num_sites


def check_run(cfg: RunConfig, node: NodeConfig) -> Reason | None:
    """The first policy rule the run config breaks, or None. Reads no data."""
    pol = node.policy
    if pol.require_dp and not cfg.privacy.enabled:
        return Reason.POLICY_REQUIRE_DP
    if pol.require_secure_aggregation and not cfg.secagg.enabled:
        return Reason.POLICY_REQUIRE_SECURE_AGGREGATION
    if cfg.privacy.enabled and pol.delta and cfg.privacy.delta != pol.delta:
        return Reason.POLICY_DELTA
    if sites_per_round(cfg) < pol.min_sites_per_round:
        return Reason.POLICY_MIN_SITES
    if cfg.privacy.enabled and pol.max_run_epsilon and cfg.privacy.target_epsilon > pol.max_run_epsilon:
        return Reason.POLICY_MAX_RUN_EPSILON
    return None


def check_noise(noise_multiplier: float, policy: SitePolicy) -> Reason | None:
    """The planned DP-SGD noise multiplier against the policy's floor."""
    if policy.min_noise_multiplier and noise_multiplier < policy.min_noise_multiplier:
        return Reason.POLICY_MIN_NOISE
    return None


_HOW_TO_RELAX = {
    Reason.POLICY_REQUIRE_DP: "set policy.require-dp=false to run NOT PRIVATE (medfed run --no-privacy does both)",
    Reason.POLICY_REQUIRE_SECURE_AGGREGATION: "set policy.require-secure-aggregation=false as well "
                                              "(medfed run --no-secure-aggregation does both)",
    Reason.POLICY_MIN_SITES: "use more sites (federation.num-sites / federation.min-sites) or lower "
                             "policy.min-sites-per-round",
    Reason.POLICY_MAX_RUN_EPSILON: "lower privacy.target-epsilon or raise policy.max-run-epsilon",
}


def check_simulation(cfg: RunConfig) -> None:
    """Refuse, before Flower starts, a simulation its simulated sites' policy would refuse every round.

    Raises:
        ConfigError: naming the policy rule and the keys that would make the run work.
    """
    broken = check_run(cfg, simulated_node(cfg, 0, cfg.federation.num_sites))
    if broken is not None:
        from medfed.contracts import REASON_TEXT

        raise ConfigError(f"the simulated sites would refuse every round: {REASON_TEXT[broken]} "
                          f"({broken.value}); {_HOW_TO_RELAX.get(broken, 'change the run config')}")
