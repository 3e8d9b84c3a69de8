"""The Flower ClientApp run at every hospital site (simulation and deployment alike).

It speaks Flower's legacy fit format, which SecAgg+ requires, and delegates the work to
:func:`medfed.federation.site.fit_site`. Every message first passes :func:`site_guard_mod`, which enforces the
site's policy (:mod:`medfed.federation.policy`) before any data is loaded and turns every refusal or failure into
a reason code (:class:`medfed.contracts.Refusal`). Train messages then pass two more mods:

1. :func:`privacy_gate_mod`: at SecAgg+'s setup stage a site whose privacy cap would be exceeded leaves the
   round before any key is exchanged (plain rounds are gated inside the handler);
2. :func:`medfed.federation.secagg.secure_aggregation_mod`: Flower's SecAgg+ with medfed's mask generator.

What reaches the server is the update (masked), the declared dataset size and values computed from public
settings; exception text, file paths, losses and timing stay in the site's own log. Weights travel as one vector
(:func:`medfed.federation.weights.to_wire`). Site logic (torch, MONAI, Opacus) is imported only where a message
needs it (SecAgg+'s key-exchange stages need none of it); a deployed site runs every message in one warm process
(:mod:`medfed.deploy.app_guard`), which imports it once.
"""

from __future__ import annotations

import traceback
from logging import ERROR, INFO, WARNING
from typing import TYPE_CHECKING

import flwr.compat.common.recorddict_compat as compat
from flwr.app import Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage

from medfed.config import RunConfig
from medfed.contracts import FitConfig, NodeConfig, Reason, Refusal
from medfed.errors import ConfigError, DatasetError
from medfed.federation.context import run_config_of
from medfed.federation.policy import Refused, check_run, node_of
from medfed.federation.secagg import (UnmaskRefusedError, clipped_values, is_secagg_message, secure_aggregation_mod,
                                     stage_of)

if TYPE_CHECKING:
    from medfed.federation.site import Site


def refusal_reply(msg: Message, site: str, reason: Reason) -> Message:
    """The error reply a site sends when it does not take part: its name and a reason code, nothing else."""
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=Refusal(site, reason).encode()),
                   reply_to=msg)


def check_message(msg: Message, node: NodeConfig) -> Reason | None:
    """The first policy rule a message itself breaks: a plain (unmasked) train message where the policy requires
    secure aggregation, a SecAgg+ round over fewer sites than the policy's minimum (:func:`secagg_round_size`),
    or an evaluation request the policy does not share."""
    pol = node.policy
    if msg.metadata.message_type == MessageType.EVALUATE and not pol.share_evaluation:
        return Reason.POLICY_SHARE_EVALUATION
    if msg.metadata.message_type != MessageType.TRAIN:
        return None
    if not is_secagg_message(msg):
        return Reason.POLICY_REQUIRE_SECURE_AGGREGATION if pol.require_secure_aggregation else None
    if secagg_round_size(msg) < pol.min_sites_per_round:
        return Reason.POLICY_MIN_SITES
    return None


def secagg_round_size(msg: Message) -> int:
    """How many sites a SecAgg+ stage message says the round has: sampled (setup), exchanging keys with this site
    (share keys), or still in the sum this site is asked to help unmask (unmask). A site refusing at the unmask
    stage withholds its key shares, so a sum over fewer sites than its policy allows is never revealed.
    (With more than 21 sites SecAgg+ uses neighbourhoods and these counts are the neighbourhood's.)"""
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage = stage_of(msg)
    if stage == Stage.SETUP:
        return int(configs[Key.SAMPLE_NUMBER])
    if stage == Stage.SHARE_KEYS:
        return sum(1 for key in configs if key.isdigit())
    if stage == Stage.UNMASK:
        return len(configs[Key.ACTIVE_NODE_ID_LIST])
    return 1 << 30  # collecting masked vectors: the count was checked when keys were shared


def _reason_of(err: Exception) -> Reason:
    from medfed.privacy.budget import BudgetExceededError
    from medfed.privacy.ledger import LedgerTamperedError

    if isinstance(err, Refused):
        return err.reason
    if isinstance(err, UnmaskRefusedError):
        return Reason.PROTOCOL
    if isinstance(err, BudgetExceededError):
        return Reason.PRIVACY_CAP
    if isinstance(err, LedgerTamperedError):
        return Reason.LEDGER
    if isinstance(err, DatasetError):
        return Reason.DATA_ERROR
    if isinstance(err, ConfigError):
        return Reason.CONFIG_ERROR
    return Reason.INTERNAL_ERROR


def site_guard_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The site's outermost mod, on every message: enforce its policy before anything else runs, and turn any
    failure into a :class:`~medfed.contracts.Refusal` (a reason code). Exception text, paths, losses and counts
    stay in the site's own log; nothing of them reaches the coordinator."""
    name = NodeConfig.name_in(context.node_config)
    try:
        cfg = run_config_of(context)
        node = node_of(cfg, context.node_config)
    except ConfigError as err:
        log(ERROR, "[site %s] refused message: the run config or node config is not usable: %s", name, err)
        return refusal_reply(msg, name, Reason.CONFIG_ERROR)
    name = node.site_name or name
    broken = check_run(cfg, node) or check_message(msg, node)
    if broken is not None:
        log(WARNING, "[site %s] refused %s message of run %s: policy rule %s (%s)", name,
            msg.metadata.message_type, context.run_id, broken.value, Refusal(name, broken).text)
        return refusal_reply(msg, name, broken)
    try:
        return call_next(msg, context)
    except Exception as err:  # noqa: BLE001 -- every failure becomes a reason code; details stay here
        reason = _reason_of(err)
        level = ERROR if reason == Reason.INTERNAL_ERROR else INFO
        log(level, "[site %s] did not take part (%s): %s", name, reason.value, err)
        if reason == Reason.INTERNAL_ERROR:
            log(ERROR, "%s", traceback.format_exc())
        return refusal_reply(msg, name, reason)


app = ClientApp(mods=[site_guard_mod])


def site_from(context: Context, cfg: RunConfig) -> Site:
    from medfed.federation.site import load_site

    return load_site(cfg, node_of(cfg, context.node_config))


def privacy_gate_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Refuse a SecAgg+ round at its setup stage when it would exceed the site's privacy cap."""
    if is_secagg_message(msg) and stage_of(msg) == Stage.SETUP:
        cfg = run_config_of(context)
        if cfg.privacy.enabled:
            from medfed.federation.site import gate_round

            round_ = int(msg.metadata.group_id) if msg.metadata.group_id.isdigit() else 0
            gate_round(cfg, site_from(context, cfg), round_, context.run_id, record_spend=False)
    return call_next(msg, context)


TRAIN_MODS = [privacy_gate_mod, secure_aggregation_mod]


@app.train(mods=TRAIN_MODS)
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's images and reply with the weight delta.

    The reply carries the delta (masked by SecAgg+ when the round is secure), the declared dataset size and the
    public metrics of :class:`~medfed.federation.site.LocalUpdate`; what depends on private data (loss, timing,
    values SecAgg+ clipped) is written to the site's own log."""
    from medfed.federation.site import fit_site
    from medfed.federation.weights import from_wire, to_wire
    from medfed.models.unet import state_shapes

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    cfg = run_config_of(context)
    site = site_from(context, cfg)
    fit = FitConfig.from_config(fitins.config)
    server_round = fit.round
    shapes = list(state_shapes(cfg.model.preset, site.data.image_shape[0], cfg.model.num_classes))
    update = fit_site(from_wire(parameters_to_ndarrays(fitins.parameters), shapes), cfg, site, server_round,
                      run_id=context.run_id, anchors=fit.anchors)
    local = dict(update.local_metrics)
    secagg_state = context.state.config_records.get(RECORD_KEY_STATE)
    if is_secagg_message(msg) and secagg_state is not None and "max_weight" in secagg_state:
        ratio = update.num_examples / float(secagg_state["max_weight"])
        local["secagg-clipped-values"] = clipped_values(update.delta, ratio, float(secagg_state["clipping_range"]))
        local["max-abs-delta"] = float(max(abs(d).max() for d in update.delta if d.size))
    log(INFO, "[site %s] round %s: %s", site.name, server_round,
        ", ".join(f"{k}={v}" for k, v in sorted(local.items())))
    res = FitRes(Status(Code.OK, "OK"), ndarrays_to_parameters(to_wire(update.delta)), update.num_examples,
                 update.reply.to_metrics())
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Numbers the coordinator may ask before a round: the site's declared (public) dataset size, its weight."""
    site = site_from(context, run_config_of(context))
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": site.declared_size})}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model's samples against this site's own images; reply with numbers only (only when the
    site's policy shares evaluation: ``site_guard_mod`` refuses otherwise)."""
    from medfed.federation.evaluation import handle_evaluate

    return handle_evaluate(msg, context)
