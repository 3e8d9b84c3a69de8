"""Runs medfed's real ClientApp (its mods included) and saves every reply exactly as serialised for the wire.

The recorder is the outermost mod, so what it saves is what leaves the site: with SecAgg+ on, the public keys,
encrypted key shares, masked vector and unmasking shares of each stage.
"""

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.serde import recorddict_to_proto

from medfed.config import from_flat
from medfed.federation import client_app as real


def wire_recorder(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, context)
    if not reply.has_content():
        return reply
    cfg = from_flat(context.run_config)
    out = Path(cfg.output.dir) / f"{cfg.output.name}-sent"
    out.mkdir(parents=True, exist_ok=True)
    site = context.node_config["partition-id"]
    name = f"round{msg.metadata.group_id}-site{site}-{msg.metadata.message_id[:12]}.pb"
    (out / name).write_bytes(recorddict_to_proto(reply.content).SerializeToString())
    return reply


app = ClientApp(mods=[wire_recorder, real.site_guard_mod])  # the recorder sees every reply as it leaves the site
app.query()(real.query)
app.train(mods=real.TRAIN_MODS)(real.train)
