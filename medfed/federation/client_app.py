"""The Flower ClientApp run at every hospital site (simulation and deployment alike).

It speaks Flower's legacy fit format, which SecAgg+ requires, and delegates the work to
:func:`medfed.federation.site.fit_site`. Train messages pass two mods, outermost first:

1. :func:`privacy_gate_mod`: at SecAgg+'s setup stage a site whose privacy cap would be exceeded leaves the
   round before any key is exchanged (plain rounds are gated inside the handler);
2. :func:`medfed.federation.secagg.secure_aggregation_mod`: Flower's SecAgg+ with medfed's mask generator.

Errors sent to the server say what failed, never file paths or header values: the full message stays in the
site's own log. Site logic (torch, MONAI, Opacus) is imported only where a message needs it: in deployment every
message starts a fresh process, and SecAgg+'s key-exchange stages need none of it.
"""

from __future__ import annotations

from logging import ERROR
from typing import TYPE_CHECKING

import flwr.compat.common.recorddict_compat as compat
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE, Stage

from medfed.config import RunConfig, from_flat
from medfed.errors import DatasetError
from medfed.federation.secagg import clipped_values, is_secagg_message, secure_aggregation_mod, stage_of

if TYPE_CHECKING:
    from medfed.federation.site import Site

app = ClientApp()


class SiteError(RuntimeError):
    """What the server is told when a site cannot take part (details stay in the site's log)."""


def site_from(context: Context, cfg: RunConfig) -> Site:
    from medfed.federation.site import load_site

    try:
        return load_site(cfg, context.node_config)
    except DatasetError as err:
        log(ERROR, "site data could not be loaded: %s", err)
        raise SiteError("the site's data could not be loaded (details in the site's own log)") from None


def privacy_gate_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Refuse a SecAgg+ round at its setup stage when it would exceed the site's privacy cap."""
    if is_secagg_message(msg) and stage_of(msg) == Stage.SETUP:
        cfg = from_flat(context.run_config)
        if cfg.privacy.enabled:
            from medfed.federation.site import gate_round

            round_ = int(msg.metadata.group_id) if msg.metadata.group_id.isdigit() else 0
            gate_round(cfg, site_from(context, cfg), round_, context.run_id, record_spend=False)
    return call_next(msg, context)


TRAIN_MODS = [privacy_gate_mod, secure_aggregation_mod]


@app.train(mods=TRAIN_MODS)
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's images and reply with the weight delta."""
    from medfed.federation.site import fit_site

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    cfg = from_flat(context.run_config)
    site = site_from(context, cfg)
    server_round = int(fitins.config["round"])
    update = fit_site(parameters_to_ndarrays(fitins.parameters), cfg, site, server_round, run_id=context.run_id)
    metrics = dict(update.metrics)
    secagg_state = context.state.config_records.get(RECORD_KEY_STATE)
    if is_secagg_message(msg) and secagg_state is not None and "max_weight" in secagg_state:
        ratio = update.num_examples / float(secagg_state["max_weight"])
        metrics["secagg-clipped-values"] = clipped_values(update.delta, ratio, float(secagg_state["clipping_range"]))
        metrics["max-abs-delta"] = float(max(abs(d).max() for d in update.delta if d.size))
    res = FitRes(Status(Code.OK, "OK"), ndarrays_to_parameters(update.delta), update.num_examples, metrics)
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Numbers the coordinator may ask before a round: the site's example count (FedAvg reveals it anyway)."""
    site = site_from(context, from_flat(context.run_config))
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": len(site.data)})}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model's samples against this site's own images; reply with numbers only."""
    from medfed.evaluation.federated import handle_evaluate

    return handle_evaluate(msg, context)
