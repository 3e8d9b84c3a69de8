"""Runs medfed's real ClientApp (its mods included) and saves what each site sent, for exact checks."""

from pathlib import Path

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import parameters_to_ndarrays

from medfed.config import from_flat
from medfed.federation import client_app as real


def output_folder(context: Context, name: str) -> Path:
    cfg = from_flat(context.run_config)
    out = Path(cfg.output.dir) / cfg.output.name / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def record_delta(msg: Message, reply: Message, context: Context) -> None:
    """Save the site's delta and example count as ``test-deltas/round<r>-<site>.npz``."""
    res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    server_round = compat.recorddict_to_fitins(msg.content, keep_input=True).config["round"]
    arrays = parameters_to_ndarrays(res.parameters)
    np.savez(output_folder(context, "test-deltas") / f"round{server_round}-{res.metrics['site']}.npz",
             num_examples=res.num_examples, **{f"a{i}": a for i, a in enumerate(arrays)})


app = ClientApp(mods=[real.site_guard_mod])
app.query()(real.query)


@app.train(mods=real.TRAIN_MODS)
def train(msg: Message, context: Context) -> Message:
    reply = real.train(msg, context)
    record_delta(msg, reply, context)
    return reply
