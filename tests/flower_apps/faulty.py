"""Sites that misbehave on purpose, by (round, site): raise, send NaN or wrongly shaped deltas."""

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from medfed.federation import client_app as real

FAULTS = {(1, 1): "raise", (2, 2): "nan", (2, 3): "shape"}

app = ClientApp(mods=[real.site_guard_mod])
app.query()(real.query)


@app.train(mods=real.TRAIN_MODS)
def train(msg: Message, context: Context) -> Message:
    server_round = int(compat.recorddict_to_fitins(msg.content, keep_input=True).config["round"])
    fault = FAULTS.get((server_round, int(context.node_config["partition-id"])))
    if fault == "raise":
        raise RuntimeError("simulated crash in local training")
    reply = real.train(msg, context)
    if fault in ("nan", "shape"):
        res = compat.recorddict_to_fitres(reply.content, keep_input=True)
        arrays = parameters_to_ndarrays(res.parameters)
        if fault == "nan":
            arrays[0] = np.full_like(arrays[0], np.nan)
        else:
            arrays[0] = np.zeros((3, 3), dtype=np.float32)
        res = FitRes(Status(Code.OK, "OK"), ndarrays_to_parameters(arrays), res.num_examples, res.metrics)
        reply = Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)
    return reply
