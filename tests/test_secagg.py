"""Secure aggregation: the mask generator, and real SecAgg+ runs against plain FedAvg of the same deltas."""

import importlib
import json

import numpy as np
import pytest
from scipy.stats import chisquare

from conftest import small_run_config
from flower_apps import app_files
from medfed.checkpoint import load_checkpoint
from medfed.federation import client_app, server_app  # noqa: F401  (importing them installs the generator)
from medfed.federation.secagg import (FLOWER_MODULES, WeakMaskGeneratorError, aggregate_error_bound, csprng_masks,
                                      require_csprng)
from medfed.federation.simulation import run_simulation


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


def check_against_fedavg(run, round_, sites):
    """The SecAgg+ aggregate equals plain FedAvg of the same deltas within the documented bound."""
    before = [v.numpy() for v in load_checkpoint(run.checkpoints / f"round_{round_ - 1:04d}.pt").model.values()]
    after = [v.numpy() for v in load_checkpoint(run.checkpoints / f"round_{round_:04d}.pt").model.values()]
    sent = deltas_of(run, round_)
    assert sorted(sent) == sorted(sites)
    record = next(r for r in run.read_metrics() if r.get("round") == round_)
    settings = record["secure_aggregation"]
    weights = np.array([float(sent[s]["num_examples"]) for s in sites])
    ratios = list(weights / settings["max_weight"])
    largest = max(float(np.abs(sent[s][f"a{i}"]).max()) for s in sites for i in range(len(before)))
    bound = aggregate_error_bound(settings["clipping_range"], settings["quantization_range"], ratios, largest)
    assert all(v == 0 for v in record["secagg_clipped_values"].values())
    worst = 0.0
    for i, (b, a) in enumerate(zip(before, after)):
        fedavg = b + sum(w * sent[s][f"a{i}"] for w, s in zip(weights, sites)) / weights.sum()
        worst = max(worst, float(np.abs(a - fedavg).max()))
    assert worst <= bound, (worst, bound)
    return worst, bound


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory, breastmnist):
    cfg = small_run_config(tmp_path_factory.mktemp("secagg"), "probe", **{
        "data.dataset": "npz", "data.path": str(breastmnist), "data.limit": 150, "federation.num-sites": 3,
        "federation.rounds": 1, "federation.partition": "dirichlet", "federation.dirichlet-beta": 1.0})
    return run_simulation(cfg, clientapp="medfed_test_apps.secagg_probe:app",
                          extra_files=app_files("recording", "secagg_probe"), show_progress=False)


def test_secure_aggregate_matches_plain_fedavg(probed_run):
    worst, bound = check_against_fedavg(probed_run, 1, ["site-0", "site-1", "site-2"])
    assert bound < 1e-4  # the documented bound is small next to the deltas themselves


def test_server_sees_uniform_noise_not_the_update(probed_run):
    record = next(r for r in probed_run.read_metrics() if r.get("round") == 1)
    max_weight = record["secure_aggregation"]["max_weight"]
    qr, cr = record["secure_aggregation"]["quantization_range"], record["secure_aggregation"]["clipping_range"]
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


def test_run_records_secure_aggregation_and_small_upload(probed_run):
    summary = json.loads(probed_run.summary_path.read_text())
    assert summary["secure_aggregation"]["used"] is True
    params = sum(v.numel() for v in load_checkpoint(probed_run.latest_checkpoint).model.values())
    record = next(r for r in probed_run.read_metrics() if r.get("round") == 1)
    assert record["secure_aggregation"]["mask_generator"].startswith("ChaCha20")
    plain_upload = 3 * params * 4
    assert record["bytes_up"] <= 2 * plain_upload, (record["bytes_up"], plain_upload)


def test_dropouts_recovered_or_round_skipped(tmp_path, breastmnist):
    cfg = small_run_config(tmp_path, "dropout", **{
        "data.dataset": "npz", "data.path": str(breastmnist), "data.limit": 200, "federation.num-sites": 5,
        "federation.rounds": 3, "secagg.reconstruction-threshold": 3})
    run = run_simulation(cfg, clientapp="medfed_test_apps.secagg_dropout:app",
                         extra_files=app_files("recording", "secagg_probe", "secagg_dropout"), show_progress=False)
    rounds = {r["round"]: r for r in run.read_metrics() if "round" in r}
    # round 1: site-4 crashed after key sharing; its masks were removed and the 4 survivors averaged
    assert rounds[1]["aggregated"] and rounds[1]["secure_aggregation"]["reconstruction_threshold"] == 3
    assert sorted(rounds[1]["sites_participating"]) == ["site-0", "site-1", "site-2", "site-3"]
    check_against_fedavg(run, 1, ["site-0", "site-1", "site-2", "site-3"])
    # round 2: three crashed, two survivors are below the threshold: skipped, reported, model unchanged
    assert not rounds[2]["aggregated"]
    assert json.loads(run.summary_path.read_text())["rounds_skipped"] == [2]
    unchanged = [load_checkpoint(run.checkpoints / f"round_{r:04d}.pt").model for r in (1, 2)]
    assert all(np.array_equal(unchanged[0][k].numpy(), unchanged[1][k].numpy()) for k in unchanged[0])
    # round 3: everyone is back
    assert rounds[3]["aggregated"] and len(rounds[3]["sites_participating"]) == 5
