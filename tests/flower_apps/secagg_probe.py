"""SecAgg+ probes: record each site's delta and the masked vector it uploads; crash sites on purpose."""

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

import flwr.compat.common.recorddict_compat as compat
from medfed.federation import client_app as real
from medfed.federation.secagg import is_secagg_message, stage_of
from medfed_test_apps.recording import output_folder, record_delta

def capture_upload(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost mod: save exactly the masked vector that leaves the site."""
    uploading = is_secagg_message(msg) and stage_of(msg) == Stage.COLLECT_MASKED_VECTORS
    reply = call_next(msg, context)  # Flower's mod pops the stage key from the message
    if uploading and reply.has_content():
        masked = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        arrays = [bytes_to_ndarray(b) for b in masked]
        pid = int(context.node_config["partition-id"])
        np.savez(output_folder(context, "test-uploads") / f"round{msg.metadata.group_id}-site-{pid}.npz",
                 **{f"a{i}": a for i, a in enumerate(arrays)})
    return reply


def make_app(crashes: dict[int, set[int]]) -> ClientApp:
    """A ClientApp whose sites in ``crashes[round]`` (partition ids) fail after key sharing."""
    app = ClientApp(mods=[real.site_guard_mod])
    app.query()(real.query)

    @app.train(mods=[capture_upload, *real.TRAIN_MODS])
    def train(msg: Message, context: Context) -> Message:
        server_round = int(compat.recorddict_to_fitins(msg.content, keep_input=True).config["round"])
        if int(context.node_config["partition-id"]) in crashes.get(server_round, ()):
            raise RuntimeError("simulated site crash after key sharing")
        reply = real.train(msg, context)
        record_delta(msg, reply, context)
        return reply

    return app


app = make_app({})
