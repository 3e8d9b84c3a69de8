"""The typed contracts at process boundaries, and the site policy enforced by the real ClientApp mod.

Fast: no Flower processes. The end-to-end refusals run in tests/test_site_policy.py (a real deployment).
"""

from __future__ import annotations

import time

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common import FitIns, Metadata, ndarrays_to_parameters

from medfed.config import from_flat, to_flat
from medfed.contracts import (REASON_TEXT, FitConfig, NodeConfig, Reason, Refusal, RoundRecord, SiteOutcome,
                              SitePolicy, SiteReply, Status, round_records)
from medfed.errors import ConfigError
from medfed.federation.client_app import site_guard_mod
from medfed.federation.policy import check_run, check_simulation, simulated_node


def test_node_config_round_trips_through_flowers_flat_form():
    node = NodeConfig(site_name="hospital-a", data_path="/data/x", data_format="dicom", test_data_path="/data/t",
                      state_dir="/state", cap_epsilon=9.5,
                      policy=SitePolicy(delta=1e-6, share_evaluation=True, dataset_size=1200, min_sites_per_round=5,
                                        max_run_epsilon=4.0, min_noise_multiplier=0.8))
    flat = node.to_flower()
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert NodeConfig.from_flower(flat) == node


@pytest.mark.parametrize("change, key", [({"policy-delta": 2.0}, "policy.delta"),
                                         ({"sharing": True}, "'sharing'"),
                                         ({"policy-min-sites-per-round": "three"}, "policy-min-sites-per-round"),
                                         ({"medfed-node-config": 99}, "version 99")])
def test_node_config_errors_name_the_key(change, key):
    flat = {**NodeConfig(data_path="/d", policy=SitePolicy(delta=1e-5)).to_flower(), **change}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        NodeConfig.from_flower(flat)


def test_a_refusal_carries_only_a_site_name_and_a_code_and_is_found_in_wrapped_text():
    refusal = Refusal("hospital a", Reason.PRIVACY_CAP)
    wrapped = f"<class 'flwr.Exception'>:<'Traceback ...\n  {refusal.encode()}\n'>"
    assert Refusal.find(wrapped) == Refusal("hospital_a", Reason.PRIVACY_CAP)
    assert Refusal.find("KeyError: '/data/patient-7.dcm'") is None
    assert set(REASON_TEXT) == set(Reason)


def test_round_records_round_trip_and_skip_other_lines():
    record = RoundRecord(round=3, aggregated=False, privacy="DP-SGD", wall_s=1.5,
                         sites=(SiteOutcome("a", Status.TRAINED, epsilon=1.2, cap_epsilon=10.0, delta=1e-5),
                                SiteOutcome("b", Status.REFUSED, Reason.POLICY_DELTA),
                                SiteOutcome("c", Status.MISSING, Reason.NO_REPLY)), skipped="no valid update arrived")
    lines = [{"event": "start"}, record.to_dict()]
    (back,) = round_records(lines)
    assert back == record and back.participants == ["a"] and back.epsilon == {"a": 1.2}
    line = back.summary_line()
    assert "b refused (policy.delta" in line and "c missing (no-reply" in line and "NOT aggregated" in line
    with pytest.raises(ConfigError, match="version"):
        RoundRecord.from_dict({**record.to_dict(), "version": 0})


def run_cfg(**flat):
    return from_flat({"data.image-size": 28, "data.channels": 1, "federation.num-sites": 3, **flat})


@pytest.mark.parametrize("flat, reason", [
    ({"privacy.enabled": False}, Reason.POLICY_REQUIRE_DP),
    ({"secagg.enabled": False}, Reason.POLICY_REQUIRE_SECURE_AGGREGATION),
    ({"privacy.delta": 0.5}, Reason.POLICY_DELTA),
    ({"federation.num-sites": 4, "federation.min-sites": 3}, Reason.POLICY_MIN_SITES),
    ({"privacy.target-epsilon": 20.0}, Reason.POLICY_MAX_RUN_EPSILON),
    ({}, None),
])
def test_policy_checks_name_the_rule_a_run_breaks(flat, reason):
    node = NodeConfig(data_path="/d", cap_epsilon=10,
                      policy=SitePolicy(delta=1e-5, min_sites_per_round=4, max_run_epsilon=10.0))
    cfg = run_cfg(**{"federation.num-sites": 4, **flat})
    assert check_run(cfg, node) == reason


def test_a_simulation_its_sites_would_refuse_is_refused_before_flower_starts():
    with pytest.raises(ConfigError, match="policy.require-dp=false"):
        check_simulation(run_cfg(**{"privacy.enabled": False}))
    check_simulation(run_cfg(**{"privacy.enabled": False, "policy.require-dp": False}))
    assert simulated_node(run_cfg(), 1, 3).policy.delta == 1e-5


def train_message() -> Message:
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([np.zeros(2, np.float32)]), {"round": 1}),
                                          True)
    return Message(content=content, metadata=Metadata(
        run_id=1, message_id="m1", src_node_id=1, dst_node_id=7, reply_to_message_id="", group_id="1",
        created_at=time.time(), ttl=3600.0, message_type=MessageType.TRAIN))


def test_site_guard_refuses_before_the_handler_runs_and_sends_only_a_code(tmp_path):
    """The real mod with a real Flower message: a plain train message where the policy requires SecAgg+, and a
    run config that turns DP off, are refused with the rule's code; the handler (which would load data) never
    runs; an exception inside the handler leaves only a reason code."""
    node = NodeConfig(site_name="hospital-a", data_path=str(tmp_path / "no-such-data"), state_dir=str(tmp_path),
                      cap_epsilon=10, policy=SitePolicy(delta=1e-5, dataset_size=10))
    calls = []

    def handler(msg, context):
        calls.append(msg)
        raise FileNotFoundError("/data/patient-7.dcm: losses [0.12, 0.08]")

    def ask(flat, **policy):
        n = NodeConfig(**{**node.__dict__, "policy": SitePolicy(**{**node.policy.__dict__, **policy})})
        context = Context(run_id=1, node_id=7, node_config=n.to_flower(), state=RecordDict(),
                          run_config=to_flat(run_cfg(**flat)))
        reply = site_guard_mod(train_message(), context, handler)
        assert reply.has_error()
        return reply.error.reason

    assert Refusal.find(ask({})).reason == Reason.POLICY_REQUIRE_SECURE_AGGREGATION  # plain message
    assert Refusal.find(ask({"privacy.enabled": False})).reason == Reason.POLICY_REQUIRE_DP
    assert not calls
    reason = ask({}, require_secure_aggregation=False)
    assert calls and Refusal.find(reason) == Refusal("hospital-a", Reason.INTERNAL_ERROR)
    assert "patient" not in reason and "0.12" not in reason and "FileNotFound" not in reason


def test_site_reply_round_trips_and_refuses_unknown_metrics():
    reply = SiteReply(site="hospital-a", private=True, steps=4, epsilon=1.5, delta=1e-5, cap_epsilon=10.0,
                      noise_multiplier=1.1, sample_rate=0.5, max_grad_norm=1.0, noise_multiplicity=2, accountant="rdp")
    metrics = reply.to_metrics()
    assert SiteReply.from_metrics(metrics) == reply
    assert "train-loss" not in metrics and "seconds" not in metrics
    with pytest.raises(ConfigError, match="max-abs-delta"):
        SiteReply.from_metrics({**metrics, "max-abs-delta": 0.3})
    with pytest.raises(ConfigError, match="version"):
        SiteReply.from_metrics({"site": "x", "private": True, "steps": 1})


def test_fit_config_carries_the_round_and_the_coordinators_anchors():
    fit = FitConfig(round=4, anchors={"hospital-a": (3, "ab" * 32), "hospital-b": (5, "cd" * 32)})
    config = fit.to_config()
    assert all(isinstance(v, (int, str)) for v in config.values())
    assert FitConfig.from_config(config) == fit
    assert FitConfig.from_config({"round": 2}) == FitConfig(round=2)
    with pytest.raises(ConfigError, match="malformed"):
        FitConfig.from_config({"round": 2, "ledger-anchors": "[not json"})


def test_a_site_refuses_to_train_when_its_ledger_no_longer_extends_the_anchor(tmp_path):
    """The check the site runs with the coordinator's anchor before every round (fit_site): deleted, truncated
    and rewritten-with-recomputed-hashes ledgers are refused with the ``ledger`` reason; an extended one is not."""
    import json

    from medfed.datasets.core import from_uint8
    from medfed.federation.policy import Refused
    from medfed.federation.site import Site, check_anchor
    from medfed.privacy.anchors import ledger_head
    from medfed.privacy.ledger import entry_hash, site_ledger

    ledger = site_ledger(tmp_path)
    for i in range(3):
        ledger.append("refusal", {"round": i, "reason": "test"})
    head = ledger_head(ledger)
    site = Site(name="hospital-a", data=from_uint8(np.zeros((2, 4, 4), np.uint8), None, "x", channels_last=False),
                state_dir=tmp_path)
    check_anchor(site, (head.count, head.hash))
    ledger.append("refusal", {"round": 3, "reason": "test"})
    check_anchor(site, (head.count, head.hash))  # the ledger grew: it still extends the anchor
    original = ledger.path.read_bytes()

    def refused(why: str) -> None:
        with pytest.raises(Refused, match=why) as err:
            check_anchor(site, (head.count, head.hash))
        assert err.value.reason == Reason.LEDGER

    ledger.path.write_bytes(b"".join(original.splitlines(keepends=True)[:2]))
    refused("truncated")
    ledger.path.unlink()
    refused("deleted")
    lines = [json.loads(line) for line in original.splitlines()]
    prev = lines[0]["prev_hash"]
    for raw in lines:  # rewrite entry 1 and recompute every hash after it (without the site's key)
        if raw["index"] == 1:
            raw["data"] = {"round": 1, "reason": "rewritten"}
        raw["prev_hash"] = prev
        raw["hash"] = prev = entry_hash(raw["index"], raw["kind"], raw["time"], raw["data"], prev)
    ledger.path.write_text("".join(json.dumps(raw) + "\n" for raw in lines))
    refused("rewritten")
