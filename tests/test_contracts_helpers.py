"""One version check, one typed parse, one run-config parse per ClientApp process (issue #16).

Fast: no Flower processes. The contracts' readers share ``_require_version`` and ``_typed_fields``; ``site.toml``'s
``[policy]`` and the node config's ``policy-*`` keys share :meth:`SitePolicy.from_keys`; every mod and handler of
the ClientApp reads its run config through :func:`run_config_of`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common import FitIns, Metadata, ndarrays_to_parameters

from medfed.config import RunConfig, to_flat
from medfed.contracts import CONTRACT_VERSION, NodeConfig, RoundRecord, SiteOutcome, SitePolicy, SiteReply, Status
from medfed.deploy.sitecfg import SiteConfig, read_site_config, write_site_config
from medfed.errors import ConfigError
from medfed.federation import context as context_module
from medfed.federation.client_app import site_guard_mod
from medfed.federation.context import run_config_of

NODE = NodeConfig(data_path="/d", policy=SitePolicy(delta=1e-5)).to_flower()
REPLY = SiteReply(site="hospital-a", private=True, steps=3, epsilon=1.0).to_metrics()
RECORD = RoundRecord(round=1, aggregated=True, privacy="DP-SGD", wall_s=1.0,
                     sites=(SiteOutcome("a", Status.TRAINED),)).to_dict()
READERS = [(NodeConfig.from_flower, NODE, "medfed-node-config", "node config"),
           (SiteReply.from_metrics, REPLY, "medfed-reply", "site reply"),
           (RoundRecord.from_dict, RECORD, "version", "round record")]


@pytest.mark.parametrize("read, good, key, what", READERS)
def test_every_contract_reader_refuses_a_missing_or_foreign_version_the_same_way(read, good, key, what):
    read(good)
    for version in (CONTRACT_VERSION + 1, 0, True, "1", "one", 1.5):
        with pytest.raises(ConfigError, match=f"^{what} version .* is not supported \\(this medfed reads version "
                                              f"{CONTRACT_VERSION}\\)"):
            read({**good, key: version})
    with pytest.raises(ConfigError, match=f"^{what} has no contract version \\('{key}'\\)"):
        read({k: v for k, v in good.items() if k not in (key, "partition-id")})  # Flower's key: a simulated node


def test_version_errors_keep_their_advice():
    with pytest.raises(ConfigError, match="update medfed at the site or the coordinator"):
        NodeConfig.from_flower({**NODE, "medfed-node-config": 2})
    with pytest.raises(ConfigError, match="`medfed site start`"):
        NodeConfig.from_flower({k: v for k, v in NODE.items() if k not in ("medfed-node-config", "partition-id")})
    with pytest.raises(ConfigError, match="written by another medfed version"):
        RoundRecord.from_dict({**RECORD, "version": 2})
    # a simulated node (Flower's own partition keys) carries no version and is read as this one
    assert NodeConfig.from_flower({"partition-id": 1, "num-partitions": 3}).partition_id == 1


def test_typed_parse_names_the_contract_and_the_key():
    with pytest.raises(ConfigError, match=r"^site reply: 'steps' must be int, got '3'$"):
        SiteReply.from_metrics({**REPLY, "steps": "3"})
    with pytest.raises(ConfigError, match=r"^site reply: unknown metric 'loss'$"):
        SiteReply.from_metrics({**REPLY, "loss": 0.1})
    with pytest.raises(ConfigError, match=r"^site reply: missing metric 'site'$"):  # was a TypeError
        SiteReply.from_metrics({k: v for k, v in REPLY.items() if k != "site"})
    with pytest.raises(ConfigError, match=r"^node config: 'policy-require-dp' must be bool, got 1$"):
        NodeConfig.from_flower({**NODE, "policy-require-dp": 1})
    with pytest.raises(ConfigError, match=r"^node config: unknown key 'policy-sharing'$"):
        NodeConfig.from_flower({**NODE, "policy-sharing": True})
    with pytest.raises(ConfigError, match=r"^node config: unknown key 'policy'$"):
        NodeConfig.from_flower({**NODE, "policy": "strict"})
    assert SiteReply.from_metrics({**REPLY, "epsilon": 2}).epsilon == 2.0  # an int is a float


def test_site_policy_from_keys_checks_types_and_ranges_naming_the_source_and_key():
    policy = SitePolicy.from_keys({"delta": 1e-6, "dataset-size": 1200, "share-evaluation": True}, "site.toml")
    assert policy == SitePolicy(delta=1e-6, dataset_size=1200, share_evaluation=True)
    for values, why in [({"min-sites-per-round": True}, "'policy.min-sites-per-round' must be int, got True"),
                        ({"delta": "1e-5"}, "'policy.delta' must be float"),
                        ({"delta": 2.0}, "'policy.delta' must be in"),
                        ({"colour": 1}, "unknown key 'policy.colour'")]:
        with pytest.raises(ConfigError, match=f"^site.toml: {why}".replace(".", r"\.").replace("(", r"\(")):
            SitePolicy.from_keys(values, "site.toml")


def test_site_toml_policy_is_read_by_the_contracts_parser(tmp_path: Path):
    path = tmp_path / "site.toml"
    cfg = SiteConfig(name="hospital-a", superlink="coord:9092", ca_cert=tmp_path / "ca.crt",
                     private_key=tmp_path / "site-key", data_path=tmp_path / "data", data_format="npz",
                     state_dir=tmp_path / "state", cap_epsilon=10.0,
                     policy=SitePolicy(delta=1e-6, dataset_size=546, max_run_epsilon=4))
    write_site_config(cfg, path)
    assert read_site_config(tmp_path).policy == cfg.policy
    text = path.read_text()
    for old, new, why in [("min-sites-per-round = 3", "min-sites-per-round = true",
                           "'policy.min-sites-per-round' must be int, got True"),
                          ("require-dp = true", 'require-dp = "yes"', "'policy.require-dp' must be bool"),
                          ("dataset-size = 546", "dataset-size = -1", "'policy.dataset-size' must be >= 0")]:
        assert old in text
        path.write_text(text.replace(old, new))
        with pytest.raises(ConfigError, match=f"^{path}: {why}"):
            read_site_config(tmp_path)


def flower_context(run_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                   run_config=run_config)


FLAT = {**to_flat(RunConfig()), "data.image-size": 28, "federation.num-sites": 3}


def test_run_config_of_parses_a_run_config_once_per_process():
    context_module._parsed.cache_clear()
    first = run_config_of(flower_context(dict(FLAT)))
    again = run_config_of(flower_context(dict(reversed(list(FLAT.items())))))  # same content, other order
    assert again is first and first.data.image_size == 28
    assert context_module._parsed.cache_info().misses == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.train.seed = 3  # type: ignore[misc]
    other = run_config_of(flower_context({**FLAT, "train.seed": 3}))
    assert other is not first and other.train.seed == 3


def test_run_config_of_tells_equal_values_of_other_types_apart():
    """``1 == True`` in Python: a cached ``train.seed = 1`` must not answer for ``train.seed = true``."""
    assert run_config_of(flower_context({**FLAT, "train.seed": 1})).train.seed == 1
    with pytest.raises(ConfigError, match="train.seed"):
        run_config_of(flower_context({**FLAT, "train.seed": True}))
    with pytest.raises(ConfigError, match="unknown config key"):  # a bad config is never cached
        run_config_of(flower_context({**FLAT, "train.sed": 1}))
    with pytest.raises(ConfigError, match="unknown config key"):
        run_config_of(flower_context({**FLAT, "train.sed": 1}))


def train_message() -> Message:
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([np.zeros(2, np.float32)]), {"round": 1}),
                                          True)
    return Message(content=content, metadata=Metadata(
        run_id=1, message_id="m1", src_node_id=1, dst_node_id=7, reply_to_message_id="", group_id="1",
        created_at=time.time(), ttl=3600.0, message_type=MessageType.TRAIN))


def test_every_message_of_a_run_reuses_one_parsed_run_config():
    """The real site guard on two messages of one run: the run config is parsed once."""
    context_module._parsed.cache_clear()
    seen = []

    def handler(msg, context):
        seen.append(run_config_of(context))
        raise RuntimeError("stop here")

    for _ in range(2):
        node = NodeConfig(data_path="/d", cap_epsilon=10,
                          policy=SitePolicy(delta=1e-5, require_secure_aggregation=False)).to_flower()
        context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=dict(FLAT))
        assert site_guard_mod(train_message(), context, handler).has_error()
    assert len(seen) == 2 and seen[0] is seen[1]
    assert context_module._parsed.cache_info().misses == 1

