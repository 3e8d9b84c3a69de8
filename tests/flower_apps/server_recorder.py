"""medfed's real ServerApp, with every message the sites send recorded as it arrives at the server."""

from pathlib import Path

from flwr.app import Context, Message
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid, ServerApp

from medfed.config import from_flat
from medfed.federation.server import run_server
from medfed.federation.workflow import DelegatingGrid


class RecordingGrid(DelegatingGrid):
    """Saves each reply (content as protobuf bytes, or the error's text) under ``<run>/server-received/``."""

    def __init__(self, inner: Grid, out: Path) -> None:
        super().__init__(inner)
        self.out = out
        self.count = 0

    def save(self, replies: list[Message]) -> list[Message]:
        self.out.mkdir(parents=True, exist_ok=True)
        for msg in replies:
            self.count += 1
            stem = self.out / f"{self.count:05d}-{msg.metadata.message_type}-{msg.metadata.group_id}"
            if msg.has_content():
                stem.with_suffix(".pb").write_bytes(recorddict_to_proto(msg.content).SerializeToString())
            else:
                stem.with_suffix(".error").write_text(msg.error.reason)
        return replies

    def pull_messages(self, message_ids):  # medfed's send_and_receive pulls through here
        return self.save(list(self.inner.pull_messages(message_ids)))


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = from_flat(context.run_config)
    run_server(RecordingGrid(grid, Path(cfg.output.dir) / cfg.output.name / "server-received"), context)
