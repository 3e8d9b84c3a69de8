"""Runs medfed's real ClientApp handler and saves each reply exactly as serialised for the wire (protobuf)."""

from pathlib import Path

import flwr.compat.common.recorddict_compat as compat
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_to_proto

from medfed.config import from_flat
from medfed.federation import client_app as real

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = real.train(msg, context)
    cfg = from_flat(context.run_config)
    server_round = compat.recorddict_to_fitins(msg.content, keep_input=True).config["round"]
    out = Path(cfg.output.dir) / f"{cfg.output.name}-sent"
    out.mkdir(parents=True, exist_ok=True)
    site = context.node_config["partition-id"]
    (out / f"round{server_round}-site{site}.pb").write_bytes(recorddict_to_proto(reply.content).SerializeToString())
    return reply
