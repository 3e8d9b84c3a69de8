"""Secure aggregation: the mask generator, and real SecAgg+ runs against plain FedAvg of the same deltas."""

import importlib
import json

import numpy as np
import pytest
from flwr.common.serde import recorddict_from_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from scipy.stats import chisquare

from conftest import small_run_config
from flower_apps import app_files
from medfed.checkpoint import load_checkpoint
from medfed.federation import client_app, server_app  # noqa: F401  (importing them installs the generator)
from medfed.config import from_dict
from medfed.contracts import Refusal, SiteReply
from medfed.datasets import load_dataset
from medfed.federation.partition import partition
from medfed.federation.secagg import (FLOWER_MODULES, WeakMaskGeneratorError, aggregate_error_bound, clipped_values,
                                      csprng_masks, require_csprng)
from medfed.launch.simulation import run_simulation


def test_both_flower_modules_use_the_csprng():
    for name in FLOWER_MODULES:
        assert importlib.import_module(name).pseudo_rand_gen is csprng_masks
    require_csprng()


def test_falling_back_to_the_weak_generator_is_refused(monkeypatch):
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as weak

    monkeypatch.setattr(importlib.import_module(FLOWER_MODULES[0]), "pseudo_rand_gen", weak)
    with pytest.raises(WeakMaskGeneratorError, match="32-bit"):
        require_csprng()


def test_mask_is_keyed_by_all_256_bits():
    seed = bytes(range(32))
    base = csprng_masks(seed, 2**32, [(1000,)])[0]
    for i in range(32):
        for flip in (0x01, 0x80):
            changed = bytearray(seed)
            changed[i] ^= flip
            other = csprng_masks(bytes(changed), 2**32, [(1000,)])[0]
            assert np.mean(other == base) < 0.01, f"byte {i} bit {flip:#x} does not change the mask"
    # deterministic for the same seed (both ends of a pair must derive the same mask), distinct per array
    again = csprng_masks(seed, 2**32, [(1000,), (1000,), ()])
    assert np.array_equal(again[0], base) and not np.array_equal(again[0], again[1]) and again[2].shape == ()


def test_masks_are_uniform_over_the_range():
    mask = csprng_masks(b"\x01" * 32, 2**32, [(200_000,)])[0]
    assert mask.min() >= 0 and mask.max() < 2**32
    counts = np.bincount((mask >> 24).astype(np.int64), minlength=256)
    assert chisquare(counts).pvalue > 1e-4


def deltas_of(run, round_):
    files = sorted((run.root / "test-deltas").glob(f"round{round_}-*.npz"))
    return {f.stem.split("-", 1)[1]: np.load(f) for f in files}


def real_shard_sizes(run) -> dict[str, int]:
    """Each simulated site's real image count, recomputed from the run's config (not from anything a site sent)."""
    cfg = from_dict(json.loads(run.config_path.read_text()))
    labels = load_dataset(cfg.data, seed=cfg.train.seed).labels.numpy()
    shards = partition(labels, cfg.federation.num_sites, cfg.federation.partition, cfg.federation.dirichlet_beta,
                       seed=cfg.train.seed)
    return {f"site-{i}": len(shard) for i, shard in enumerate(shards)}


def check_against_fedavg(run, round_, sites):
    """The SecAgg+ aggregate equals plain FedAvg of the same deltas within the documented bound."""
    before = [v.numpy() for v in load_checkpoint(run.checkpoints / f"round_{round_ - 1:04d}.pt").model.values()]
    after = [v.numpy() for v in load_checkpoint(run.checkpoints / f"round_{round_:04d}.pt").model.values()]
    sent = deltas_of(run, round_)
    assert sorted(sent) == sorted(sites)
    record = next(r for r in run.rounds() if r.round == round_)
    settings = record.secure_aggregation
    weights = np.array([float(sent[s]["num_examples"]) for s in sites])
    # the weights are the sites' real shard sizes (declared, in simulation, as each shard's count), not whatever
    # the sites chose to report
    real = real_shard_sizes(run)
    assert list(weights) == [real[s] for s in sites] and record.weights == {s: real[s] for s in sites}
    ratios = list(weights / settings["max_weight"])
    assert all(sent[s].files == ["num_examples", "a0"] for s in sites)  # one vector on the wire (weights.to_wire)
    largest = max(float(np.abs(sent[s]["a0"]).max()) for s in sites)
    bound = aggregate_error_bound(settings["clipping_range"], settings["quantization_range"], ratios, largest)
    for s, ratio in zip(sites, ratios):  # nothing was clipped (the count stays at the site; recomputed here)
        assert clipped_values([sent[s]["a0"]], ratio, settings["clipping_range"]) == 0
    b, a = (np.concatenate([x.ravel() for x in arrays]) for arrays in (before, after))
    fedavg = b + sum(w * sent[s]["a0"] for w, s in zip(weights, sites)) / weights.sum()
    worst = float(np.abs(a - fedavg).max())
    assert worst <= bound, (worst, bound)
    return worst, bound


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory, breastmnist):
    cfg = small_run_config(tmp_path_factory.mktemp("secagg"), "probe", **{
        "data.dataset": "npz", "data.path": str(breastmnist), "data.limit": 150, "federation.num-sites": 3,
        "federation.rounds": 1, "federation.partition": "dirichlet", "federation.dirichlet-beta": 1.0})
    return run_simulation(cfg, clientapp="medfed_test_apps.secagg_probe:app",
                          serverapp="medfed_test_apps.server_recorder:app",
                          extra_files=app_files("recording", "secagg_probe", "server_recorder"), show_progress=False)


@pytest.mark.slow  # a Flower simulation
def test_secure_aggregate_matches_plain_fedavg(probed_run):
    worst, bound = check_against_fedavg(probed_run, 1, ["site-0", "site-1", "site-2"])
    assert bound < 1e-4  # the documented bound is small next to the deltas themselves


PRIVATE_METRICS = {"train-loss", "seconds", "empty-batches", "max-abs-delta", "secagg-clipped-values"}


@pytest.mark.slow  # a Flower simulation
def test_the_server_receives_no_per_site_value_of_private_data(probed_run):
    """Every message the sites sent, as the server received it: metrics are the public SiteReply fields (epsilon and
    its inputs, from the declared dataset size), counts are the declared sizes, and no loss, timing, update
    statistic or exception text arrives."""
    received = sorted((probed_run.root / "server-received").iterdir())
    assert len(received) >= 3 * 4  # the query for max-weight (if asked) and four SecAgg+ stages per site
    public = {f.replace("_", "-") for f in SiteReply.__dataclass_fields__} | {"medfed-reply"}
    declared = set(real_shard_sizes(probed_run).values())
    for path in received:
        if path.suffix == ".error":
            assert Refusal.find(path.read_text()) is not None, path.read_text()[:300]
            continue
        content = recorddict_from_proto(ProtoRecordDict.FromString(path.read_bytes()))
        for name, record in content.metric_records.items():
            keys = set(record)
            assert not keys & PRIVATE_METRICS, (path.name, name, keys)
            if name == "fitres.metrics":
                assert keys <= public, (path.name, keys - public)
                reply = SiteReply.from_metrics(dict(record))
                assert reply.private and reply.train_loss is None and reply.seconds is None
            if "num-examples" in record:
                assert int(record["num-examples"]) in declared
        for name, record in content.config_records.items():
            for key, value in record.items():
                assert key not in PRIVATE_METRICS, (path.name, key)
                for item in value if isinstance(value, list) else [value]:
                    assert not (isinstance(item, str) and ("Traceback" in item or "Error" in item)), (path.name, item)


@pytest.mark.slow  # a Flower simulation
def test_server_sees_uniform_noise_not_the_update(probed_run):
    record = next(r for r in probed_run.rounds() if r.round == 1)
    max_weight = record.secure_aggregation["max_weight"]
    qr, cr = record.secure_aggregation["quantization_range"], record.secure_aggregation["clipping_range"]
    for site, delta in deltas_of(probed_run, 1).items():
        upload = np.load(probed_run.root / "test-uploads" / f"round1-{site}.npz")
        masked = np.concatenate([upload[k].ravel() for k in upload.files])[1:].astype(np.int64)  # [0]: weight
        assert upload["a1"].dtype == np.uint32  # 4 bytes a value on the wire
        counts = np.bincount(masked >> 24, minlength=256)
        assert chisquare(counts).pvalue > 1e-4, f"{site}'s upload is not uniform"
        ratio = float(delta["num_examples"]) / max_weight
        plain = np.concatenate([delta[f"a{i}"].ravel() for i in range(len(delta.files) - 1)])
        quantized = np.round((np.clip(plain * ratio, -cr, cr) + cr) * qr / (2 * cr)).astype(np.int64)
        assert np.mean(masked == quantized) < 0.001
        assert chisquare(np.bincount(quantized >> 24, minlength=256)).pvalue < 1e-10  # the test has power


@pytest.mark.slow  # a Flower simulation
def test_run_records_secure_aggregation_and_small_upload(probed_run):
    summary = json.loads(probed_run.summary_path.read_text())
    assert summary["secure_aggregation"]["used"] is True
    params = sum(v.numel() for v in load_checkpoint(probed_run.latest_checkpoint).model.values())
    record = next(r for r in probed_run.rounds() if r.round == 1)
    assert record.secure_aggregation["mask_generator"].startswith("ChaCha20")
    plain_upload = 3 * params * 4
    assert record.bytes_up <= 2 * plain_upload, (record.bytes_up, plain_upload)


@pytest.mark.slow  # a Flower simulation
def test_dropouts_recovered_or_round_skipped(tmp_path, breastmnist):
    cfg = small_run_config(tmp_path, "dropout", **{
        "data.dataset": "npz", "data.path": str(breastmnist), "data.limit": 200, "federation.num-sites": 5,
        "federation.rounds": 3, "secagg.reconstruction-threshold": 3})
    run = run_simulation(cfg, clientapp="medfed_test_apps.secagg_dropout:app",
                         extra_files=app_files("recording", "secagg_probe", "secagg_dropout"), show_progress=False)
    rounds = {r.round: r for r in run.rounds()}
    # round 1: site-4 crashed after key sharing; its masks were removed and the 4 survivors averaged
    assert rounds[1].aggregated and rounds[1].secure_aggregation["reconstruction_threshold"] == 3
    assert rounds[1].participants == ["site-0", "site-1", "site-2", "site-3"]
    check_against_fedavg(run, 1, ["site-0", "site-1", "site-2", "site-3"])
    # round 2: three crashed, two survivors are below the threshold: skipped, reported, model unchanged
    assert not rounds[2].aggregated and rounds[2].skipped
    assert json.loads(run.summary_path.read_text())["rounds_skipped"] == [2]
    unchanged = [load_checkpoint(run.checkpoints / f"round_{r:04d}.pt").model for r in (1, 2)]
    assert all(np.array_equal(unchanged[0][k].numpy(), unchanged[1][k].numpy()) for k in unchanged[0])
    # round 3: everyone is back
    assert rounds[3].aggregated and len(rounds[3].participants) == 5


def test_a_round_whose_masked_sum_could_wrap_around_is_refused():
    from medfed.config import from_flat
    from medfed.errors import ConfigError
    from medfed.federation.secagg import settings_for

    cfg = from_flat({"secagg.quantization-range": 2**26, "federation.num-sites": 3})
    assert settings_for(cfg, 63, 100.0).quantization_range == 2**26  # 63 x 2**26 < 2**32
    for sampled in (64, 70):  # 64 x 2**26 = 2**32 already wraps to 0
        with pytest.raises(ConfigError, match=rf"quantization-range \(67108864\) x {sampled} sampled sites "
                                              r"reaches 2\*\*32.*at most \d+"):
            settings_for(cfg, sampled, 100.0)


def unmask_request(active, dead):
    """The server's unmask-stage message to node 1, as the site receives it."""
    import time

    from flwr.app import ConfigRecord, Message, MessageType, Metadata, RecordDict
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    configs = ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead})
    return Message(content=RecordDict({RECORD_KEY_CONFIGS: configs}), metadata=Metadata(
        run_id=1, message_id="unmask", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
        created_at=time.time(), ttl=3600.0, message_type=MessageType.TRAIN))


def site_after_collecting_masked_vectors():
    """Node 1's SecAgg+ state after stage 2: it holds shares of nodes 1-3 (Flower's own state type)."""
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE, Stage

    state = SecAggPlusState()
    state.current_stage, state.nid, state.threshold = Stage.COLLECT_MASKED_VECTORS, 1, 2
    state.rd_seed_share_dict = {n: f"seed share of {n}".encode() for n in (1, 2, 3)}
    state.sk1_share_dict = {n: f"key share of {n}".encode() for n in (1, 2, 3)}
    return Context(run_id=1, node_id=1, node_config={}, run_config={},
                   state=RecordDict({RECORD_KEY_STATE: ConfigRecord(state.to_dict())}))


def test_site_refuses_to_return_both_secret_shares_of_one_node():
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from medfed.federation.secagg import UnmaskRefusedError, check_unmask_request, secure_aggregation_mod

    def no_training(msg, ctx):
        raise AssertionError("the unmask stage does not train")

    # Flower's own mod answers a lying server with both shares of node 2: its update would be exposed
    reply = secaggplus_mod(unmask_request([1, 2, 3], [2]), site_after_collecting_masked_vectors(), no_training)
    sent = list(reply.content.config_records[RECORD_KEY_CONFIGS][Key.SHARE_LIST])
    assert b"seed share of 2" in sent and b"key share of 2" in sent
    # medfed's site mod refuses the same request against the same state
    with pytest.raises(UnmaskRefusedError, match=r"node\(s\) \[2\] as both active and dead"):
        secure_aggregation_mod(unmask_request([1, 2, 3], [2]), site_after_collecting_masked_vectors(), no_training)
    # and answers an honest one: seed shares of the active nodes, the key share of the dead one
    reply = secure_aggregation_mod(unmask_request([1, 3], [2]), site_after_collecting_masked_vectors(), no_training)
    configs = reply.content.config_records[RECORD_KEY_CONFIGS]
    assert list(configs[Key.NODE_ID_LIST]) == [1, 3, 2]
    assert list(configs[Key.SHARE_LIST]) == [b"seed share of 1", b"seed share of 3", b"key share of 2"]
    check_unmask_request(unmask_request([1, 3], [2]).content.config_records[RECORD_KEY_CONFIGS])
