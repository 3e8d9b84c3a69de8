"""Secure aggregation (Flower SecAgg+) with a cryptographically sound mask generator.

The server only ever sees each site's update masked; it learns the (weighted) sum. Flower's SecAgg+ provides the
protocol (pairwise masks, Shamir-shared keys, dropout recovery) on its legacy workflow. Three things are medfed's:

* **Mask generator.** Flower's ``pseudo_rand_gen`` XOR-folds the 256-bit seed to 32 bits and feeds NumPy's
  Mersenne Twister (flwrlabs/flower#7522), so a curious server could brute-force the masks. :func:`csprng_masks`
  replaces it on both sides: ChaCha20 keyed with SHA-256 of the *whole* seed. The replacement is installed when
  this module is imported (by the ClientApp and the ServerApp), and both sides check it before every use
  (:func:`require_csprng`), so a fallback to the weak generator fails loudly.
* **Compact upload.** With ``modulus_range = 2**32`` every masked value fits 32 bits, but Flower ships them as
  int64. The site-side mod re-encodes them as uint32: the upload is 4 bytes per parameter, like plain float32.
  The server's workflow then sums and unmasks uint32 arrays, whose wrap-around *is* arithmetic modulo 2**32.
* **Sizing.** Sites send model deltas. Values outside ``±clipping_range`` are clipped by SecAgg+, so each site
  reports how many values it had to clip. ``max_weight`` is the largest site's example count, asked for
  before the first round. :func:`aggregate_error_bound` is the documented error of the aggregate.

* **Overflow.** The server sums each site's quantized values (each in ``[0, quantization_range]``) modulo
  ``2**32``: with ``sampled sites x quantization_range >= 2**32`` the sum can wrap around into a plausible but
  wrong aggregate, so :func:`settings_for` refuses such a round.
* **Both shares of one node.** At the unmask stage a site returns, for every node the server lists as active,
  its share of that node's private mask seed, and for every node listed as dead its share of that node's private
  key. A node in both lists would have both its masks removed, and its update exposed; the site mod refuses such
  a request (:func:`check_unmask_request`) before Flower's mod answers it.

Threat model (SecAgg+'s): an honest-but-curious server; there is no check that the server reports dropouts
truthfully.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from medfed.config import RunConfig
from medfed.errors import ConfigError, MedfedError

MODULUS_RANGE = 2**32
FLOWER_MODULES = ("flwr.client.mod.secure_aggregation.secaggplus_mod",
                  "flwr.server.workflow.secure_aggregation.secaggplus_workflow")


class WeakMaskGeneratorError(MedfedError):
    """Flower's weak SecAgg+ mask generator would be used; medfed refuses to aggregate with it."""


class UnmaskRefusedError(MedfedError):
    """The server asked a site for both secret shares of one node, which would expose that node's update."""


def csprng_masks(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Uniform masks in ``[0, num_range)`` for each shape, cut in order from one ChaCha20 keystream.

    The key is SHA-256(seed) and the nonce zero: every seed (a pairwise shared secret or a private mask seed)
    is fresh each round and keys exactly one stream.

    Args:
        seed: the full shared secret or private mask seed (every byte matters).
        num_range: a power of two, at most 2**32.
        dimensions_list: the array shapes to fill.

    Returns:
        uint32 arrays of the given shapes (read-only). Flower's SecAgg+ arithmetic adds them to int64 vectors,
        which promotes them; with ``num_range = 2**32`` uint32 arithmetic alone is already modular.
    """
    if num_range & (num_range - 1) or not 2 <= num_range <= 2**32:
        raise ValueError(f"mask range must be a power of two in [2, 2**32], got {num_range}")
    key = hashlib.sha256(seed).digest()
    counts = [math.prod(dims) for dims in dimensions_list]
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(4 * sum(counts)))
    values = np.frombuffer(stream, dtype="<u4")
    if num_range < 2**32:
        values = values & np.uint32(num_range - 1)
    out = []
    start = 0
    for count, dims in zip(counts, dimensions_list):
        out.append(values[start:start + count].reshape(dims))
        start += count
    return out


def install_csprng() -> None:
    """Make Flower's SecAgg+ client mod and server workflow draw masks from :func:`csprng_masks`."""
    for name in FLOWER_MODULES:
        # import_module, not `import x.y as m`: the latter binds the *function* re-exported under that name.
        importlib.import_module(name).pseudo_rand_gen = csprng_masks


def require_csprng() -> None:
    """Raise unless both Flower modules use :func:`csprng_masks`."""
    for name in FLOWER_MODULES:
        if importlib.import_module(name).pseudo_rand_gen is not csprng_masks:
            raise WeakMaskGeneratorError(f"{name}.pseudo_rand_gen is not medfed's CSPRNG mask generator; "
                                         "refusing to run secure aggregation with Flower's 32-bit-seeded one")


install_csprng()


# ----------------------------------------------------------------------------------------------- site side


def is_secagg_message(msg: Message) -> bool:
    return msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records


def stage_of(msg: Message) -> str:
    return str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The site's SecAgg+ mod: CSPRNG check, then Flower's ``secaggplus_mod``, then a compact upload.

    Plain (non-SecAgg) train messages go straight to the handler.
    """
    if not is_secagg_message(msg):
        return call_next(msg, context)
    require_csprng()
    if stage_of(msg) == Stage.UNMASK:
        check_unmask_request(msg.content.config_records[RECORD_KEY_CONFIGS])
    reply = secaggplus_mod(msg, context, call_next)
    if reply.has_content() and RECORD_KEY_CONFIGS in reply.content.config_records:
        configs = reply.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in configs:
            configs[Key.MASKED_PARAMETERS] = narrow(cast(list[bytes], configs[Key.MASKED_PARAMETERS]))
    return reply


def check_unmask_request(configs: ConfigRecord) -> None:
    """Refuse an unmask-stage request that lists a node both as active (asking for its mask-seed share) and as
    dead (asking for its private-key share): with both, the server removes the node's pairwise *and* private
    masks and sees its update alone. Flower's ``secaggplus_mod`` (``_unmask``) would return both.

    Raises:
        UnmaskRefusedError: naming the nodes listed as both.
    """
    active = cast(list[int], configs.get(Key.ACTIVE_NODE_ID_LIST, []))
    dead = cast(list[int], configs.get(Key.DEAD_NODE_ID_LIST, []))
    both = sorted(set(active) & set(dead))
    if both:
        raise UnmaskRefusedError(f"SecAgg+ unmask: the server listed node(s) {both} as both active and dead; "
                                 "returning both secret shares would expose their updates, so this site refuses")


def narrow(arrays: list[bytes]) -> list[bytes]:
    """Re-encode masked int64 arrays (values < 2**32) as uint32."""
    out = []
    for raw in arrays:
        array = bytes_to_ndarray(raw)
        if array.size and (array.min() < 0 or array.max() >= MODULUS_RANGE):
            raise ValueError("masked values exceed 32 bits; modulus_range must be 2**32")
        out.append(ndarray_to_bytes(array.astype(np.uint32)))
    return out


def clipped_values(delta: list[np.ndarray], weight_ratio: float, clipping_range: float) -> int:
    """How many values of ``weight_ratio * delta`` SecAgg+ will clip to ``±clipping_range``."""
    return int(sum(np.count_nonzero(np.abs(d) * weight_ratio > clipping_range) for d in delta))


# --------------------------------------------------------------------------------------------- server side


@dataclass(frozen=True)
class SecAggSettings:
    """The SecAgg+ parameters of one round."""

    num_shares: int | float
    reconstruction_threshold: int | float
    neighbourhood: int
    threshold: int
    max_weight: float
    clipping_range: float
    quantization_range: int
    timeout: float

    def as_record(self) -> dict[str, float | int]:
        return {"neighbourhood": self.neighbourhood, "reconstruction_threshold": self.threshold,
                "max_weight": self.max_weight, "clipping_range": self.clipping_range,
                "quantization_range": self.quantization_range, "modulus_range": MODULUS_RANGE,
                "stage_timeout_s": self.timeout, "mask_generator": "ChaCha20 keyed by SHA-256(seed)"}


def neighbourhood_size(sampled: int) -> int:
    """Default SecAgg+ neighbourhood: everyone up to 21 sites, else an odd ~3 log2(n) (at least 21)."""
    if sampled <= 21:
        return sampled
    k = max(21, 3 * math.ceil(math.log2(sampled)))
    return min(sampled, k | 1)


def settings_for(cfg: RunConfig, sampled: int, max_weight: float) -> SecAggSettings:
    """Resolve ``secagg.*`` for a round with ``sampled`` sites.

    Raises:
        ConfigError: ``sampled x secagg.quantization-range`` reaches 2**32 (the sum would wrap), or the
            reconstruction threshold does not fit the neighbourhood.
    """
    s = cfg.secagg
    if sampled * s.quantization_range >= MODULUS_RANGE:
        raise ConfigError(f"secagg.quantization-range ({s.quantization_range}) x {sampled} sampled sites reaches "
                          "2**32, the SecAgg+ modulus: the masked sum could wrap around; lower "
                          f"secagg.quantization-range to at most {(MODULUS_RANGE - 1) // sampled} or sample fewer "
                          "sites", key="secagg.quantization-range")
    k = min(s.num_shares or neighbourhood_size(sampled), sampled)
    t = s.reconstruction_threshold or k // 2 + 1
    if not 2 <= t <= k:
        raise MedfedError(f"config key 'secagg.reconstruction-threshold': {t} must be in [2, {k}] "
                          f"(neighbourhood of {k} sites)")
    if k >= 3 and t < k:
        num_shares: int | float = k
        threshold: int | float = t
    else:  # tiny federations: Flower's integer form needs num_shares > 2 and threshold < num_shares
        num_shares, threshold = k / sampled, t / k
    return SecAggSettings(num_shares=num_shares, reconstruction_threshold=threshold, neighbourhood=k, threshold=t,
                          max_weight=max_weight, clipping_range=s.clipping_range,
                          quantization_range=s.quantization_range,
                          timeout=s.timeout or cfg.federation.round_timeout)


def aggregate_error_bound(clipping_range: float, quantization_range: int, weight_ratios: list[float],
                          max_abs_delta: float) -> float:
    """Largest possible |SecAgg+ aggregate - exact FedAvg| for one value, when no value was clipped.

    With ``r_i = num_examples_i / max_weight``, site i quantizes ``r_i * delta_i`` stochastically with step
    ``2 * clipping_range / quantization_range`` (error below one step) and its weight is rounded to a multiple of
    ``1 / quantization_range``. The aggregate divides the sum by the sum of the rounded weights, so the error is
    at most ``n * step / sum(r)`` plus the weight rounding, ``max|delta| * n / (quantization_range * sum(r))``.
    """
    n = len(weight_ratios)
    total = sum(weight_ratios)
    step = 2 * clipping_range / quantization_range
    return n * step / total + max_abs_delta * n / (quantization_range * total)


def ask_example_counts(grid: Grid, timeout: float) -> dict[int, int]:
    """Ask every connected site how many training images it holds (the count FedAvg reveals anyway)."""
    nodes = list(grid.get_node_ids())
    out = [Message(content=RecordDict({"config": ConfigRecord({"query": "num-examples"})}), dst_node_id=node,
                   message_type=MessageType.QUERY, group_id="secagg-max-weight") for node in nodes]
    counts = {}
    for reply in grid.send_and_receive(out, timeout=timeout):
        if reply.has_content() and "metrics" in reply.content.metric_records:
            counts[reply.metadata.src_node_id] = int(cast(MetricRecord, reply.content.metric_records["metrics"])
                                                     ["num-examples"])
    return counts


class SetupDropoutSafeWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, minus sites that left during setup, and keeping the failures of a halted round.

    In flwr 1.42 a site that errors at the setup stage (a site refusing a round over its privacy cap) stays in
    ``sampled_node_ids``: the unmask stage then asks the survivors for key shares of a site that never shared
    any, they fail with ``KeyError`` and the round halts. Such a site holds no masks in anyone's vector, so it
    is simply forgotten after setup. ``failures`` keeps the error replies when the workflow halts before
    ``aggregate_fit`` (which otherwise is the only place Flower reports them).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.failures: list[BaseException] = []
        self.completed = False

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        self.failures = state.failures
        super().setup_stage(grid, context, state)  # its threshold check still counts the departed sites
        gone = state.sampled_node_ids - state.active_node_ids
        state.sampled_node_ids = set(state.active_node_ids)
        state.nid_to_neighbours = {nid: neighbours - gone for nid, neighbours in state.nid_to_neighbours.items()
                                   if nid not in gone}
        return bool(state.active_node_ids) and self._check_threshold(state)  # all refused: the round stops here

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return super().share_keys_stage(grid, context, state) and bool(state.active_node_ids)

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return super().collect_masked_vectors_stage(grid, context, state) and bool(state.active_node_ids)

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        self.completed = super().unmask_stage(grid, context, state)
        return self.completed


@dataclass
class SecureRound:
    """How one SecAgg+ round ran: its settings, and whether it got as far as aggregation."""

    settings: SecAggSettings
    completed: bool
    halted_failures: list[BaseException]
    """Error replies of a round that halted before aggregation (empty when it completed)."""


def secure_fit_round(grid: Grid, context: LegacyContext, cfg: RunConfig, sampled: int,
                     max_weight: float) -> SecureRound:
    """Run one FedAvg round through SecAgg+ (the strategy's ``aggregate_fit`` sees only the unmasked sum)."""
    require_csprng()
    settings = settings_for(cfg, sampled, max_weight)
    workflow = SetupDropoutSafeWorkflow(
        num_shares=settings.num_shares, reconstruction_threshold=settings.reconstruction_threshold,
        max_weight=settings.max_weight, clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range, modulus_range=MODULUS_RANGE, timeout=settings.timeout)
    workflow(grid, context)
    return SecureRound(settings, workflow.completed, [] if workflow.completed else list(workflow.failures))

