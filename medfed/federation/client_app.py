"""The Flower ClientApp run at every hospital site (simulation and deployment alike).

It speaks Flower's legacy fit format, which SecAgg+ requires, and delegates the work to
:func:`medfed.federation.site.fit_site`.
"""

from __future__ import annotations

import flwr.compat.common.recorddict_compat as compat
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from medfed.config import from_flat
from medfed.federation.site import fit_site, load_site

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's images and reply with the weight delta."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    cfg = from_flat(context.run_config)
    site = load_site(cfg, context.node_config)
    server_round = int(fitins.config["round"])
    update = fit_site(parameters_to_ndarrays(fitins.parameters), cfg, site, server_round)
    res = FitRes(Status(Code.OK, "OK"), ndarrays_to_parameters(update.delta), update.num_examples,
                 dict(update.metrics))
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)
