"""Server-side round plumbing on Flower's legacy workflow: byte metering and a fit round with a timeout.

Flower's ``default_fit_workflow`` waits forever for replies; :func:`plain_fit_round` is the same round with a
deadline, so a hung site cannot stall the federation. With secure aggregation, ``SecAggPlusWorkflow`` (which has
per-stage timeouts) runs the round instead.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO
from typing import cast

import flwr.compat.common.recorddict_compat as compat
from flwr.app import Message, MessageType, RecordDict
from flwr.common import Code, FitRes
from flwr.common.logger import log
from flwr.server import LegacyContext
from flwr.server.client_proxy import ClientProxy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from medfed.logs import clock


def payload_nbytes(msg: Message) -> int:
    """Bytes of arrays, byte strings and text a message carries (its payload, not protocol overhead)."""
    if not msg.has_content():
        return 0
    total = 0
    content: RecordDict = msg.content
    for record in content.array_records.values():
        total += sum(len(array.data) for array in record.values())
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            for item in items:
                total += len(item) if isinstance(item, bytes) else len(str(item).encode()) if isinstance(item, str) \
                    else 8
    for record in content.metric_records.values():
        total += 8 * sum(len(v) if isinstance(v, list) else 1 for v in record.values())
    return total


class DelegatingGrid(Grid):
    """A Grid that forwards everything to ``inner``; subclasses override what they change."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's push-then-pull loop, pulling every :data:`PULL_INTERVAL_S`: Flower's deployment grid sleeps
        3 s between pulls, which added up to 3 s to every stage of a deployed round (4 with SecAgg+)."""
        messages = list(messages)
        wall, start = time.time(), time.monotonic()
        pending = set(self.push_messages(messages))
        pushed = time.monotonic() - start
        end = start + (timeout or 0.0)
        replies: list[Message] = []
        arrivals: list[float] = []
        while timeout is None or time.monotonic() < end:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            arrivals += [time.monotonic() - start] * len(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending:
                break
            time.sleep(PULL_INTERVAL_S)
        kind = messages[0].metadata.message_type if messages else "-"
        log(INFO, "stage %s at %s: %d of %d replies, pushed in %.2f s, replies after %s s", kind, clock(wall),
            len(replies), len(messages), pushed, ", ".join(f"{a:.1f}" for a in sorted(arrivals)) or "-")
        return replies


PULL_INTERVAL_S = 0.1
"""How often the server asks the SuperLink for replies while a stage waits (Flower's simulation grid: 0.1 s)."""


class MeteredGrid(DelegatingGrid):
    """Counts the payload bytes sent to and received from sites (as they travel, after any re-encoding)."""

    def __init__(self, inner: Grid) -> None:
        super().__init__(inner)
        self.bytes_down = 0
        self.bytes_up = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.bytes_down += sum(payload_nbytes(m) for m in messages)
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self.bytes_up += sum(payload_nbytes(m) for m in replies)
        return replies


def plain_fit_round(grid: Grid, context: LegacyContext, timeout: float) -> None:
    """One FedAvg round without secure aggregation: send FitIns, wait up to ``timeout`` s, aggregate."""
    cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
    current_round = cast(int, cfg[Key.CURRENT_ROUND])
    parameters = compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    instructions = context.strategy.configure_fit(server_round=current_round, parameters=parameters,
                                                  client_manager=context.client_manager)
    if not instructions:
        return
    proxies = {proxy.node_id: proxy for proxy, _ in instructions}
    out = [Message(content=compat.fitins_to_recorddict(fitins, True), dst_node_id=proxy.node_id,
                   message_type=MessageType.TRAIN, group_id=str(current_round)) for proxy, fitins in instructions]
    replies = list(grid.send_and_receive(out, timeout=timeout))
    # the SuperLink answers for an unreachable site itself (from its own node id): match replies by request
    node_of_request = {m.metadata.message_id: m.metadata.dst_node_id for m in out if m.metadata.message_id}
    results: list[tuple[ClientProxy, FitRes]] = []
    failures: list[tuple[ClientProxy, FitRes] | BaseException] = []
    answered = set()
    for msg in replies:
        node = node_of_request.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        answered.add(node)
        if not msg.has_content():
            failures.append(Exception(f"node {node}: {msg.error.reason}"))
            continue
        res = compat.recorddict_to_fitres(msg.content, False)
        if res.status.code == Code.OK:
            results.append((proxies[node], res))
        else:
            failures.append((proxies[node], res))
    for node in proxies.keys() - answered:
        failures.append(Exception(f"node {node}: no reply within {timeout:g} s"))
    parameters_aggregated, metrics = context.strategy.aggregate_fit(current_round, results, failures)
    if parameters_aggregated is not None:
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(parameters_aggregated,
                                                                                           True)
        context.history.add_metrics_distributed_fit(server_round=current_round, metrics=metrics)
