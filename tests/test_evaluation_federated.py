"""Per-site evaluation: a real Flower simulation where each site scores the global model's samples and replies
with numbers only; plus the server-side rules (refusing non-numeric replies, never mixing networks)."""

import math

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common import Code, EvaluateRes, Status
from flwr.compat.common.recorddict_compat import evaluateres_to_recorddict

from medfed.config import DataConfig, from_flat
from medfed.datasets import load_dataset
from medfed.evaluation.classifier import save_classifier, train_classifier
from medfed.evaluation.federated import (
    MAX_TEXT,
    declines,
    evaluation_due,
    numbers_only,
    read_records,
    weighted_means,
)
from medfed.federation.simulation import run_simulation

SITES = ("site-0", "site-1", "site-2")


def test_every_site_scores_the_global_model_and_sends_no_images(tmp_path, pneumoniamnist):
    train = load_dataset(DataConfig(dataset="npz", path=str(pneumoniamnist), split="train", limit=600))
    test = load_dataset(DataConfig(dataset="npz", path=str(pneumoniamnist), split="test", limit=200))
    classifier = train_classifier(train, test, dataset=str(pneumoniamnist), epochs=1, show_progress=False)
    clf_path = save_classifier(classifier, tmp_path / "clf.pt")
    num_generated = 24
    cfg = from_flat({
        "data.dataset": "npz", "data.path": str(pneumoniamnist), "data.limit": 300, "data.image-size": 28,
        "data.channels": 1, "model.preset": "micro", "federation.num-sites": 3, "federation.rounds": 1,
        "train.batch-size": 32, "train.num-samples": 4, "diffusion.sample-steps": 3, "train.device": "cpu",
        "evaluation.every-rounds": 1, "evaluation.num-samples": num_generated,
        "evaluation.feature-network": str(clf_path), "output.dir": str(tmp_path / "runs"), "output.name": "fed",
    })
    run = run_simulation(cfg, show_progress=False)

    (record,) = read_records(run)
    assert record["round"] == 1 and record["num_generated"] == num_generated
    assert record["refused"] == {} and record["failures"] == [] and record["declined"] == []
    assert set(record["sites"]) == set(SITES)
    for site, metrics in record["sites"].items():
        assert metrics["site"] == site and metrics["feature-network"] == classifier.name
        assert math.isfinite(metrics["fid"]) and metrics["fid"] > 0 and math.isfinite(metrics["kid"])
        assert metrics["num-generated"] == num_generated and metrics["num-real"] > 0
        assert metrics["reference"] == "test split" and metrics["feature-nn-ratio-median"] > 0
        assert isinstance(metrics["memorization-passed"], bool) and 0 <= metrics["near-copy-fraction"] <= 1
        for value in metrics.values():  # numbers and short labels only
            assert isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= MAX_TEXT)
    (group,) = record["weighted"]
    weights = record["weights"]
    expected = sum(weights[s] * record["sites"][s]["fid"] for s in SITES) / sum(weights.values())
    assert group["feature_network"] == classifier.name and group["means"]["fid"] == expected
    assert group["means"]["num-real"] == sum(weights.values())
    # Images went down (synthetic samples, uint8); only a few hundred bytes of numbers came back up.
    one_set = num_generated * 28 * 28
    assert record["bytes_down"] >= 3 * one_set
    assert record["bytes_up"] < 3 * 600 < one_set
    assert (run.root / "evaluation.png").exists()


def test_server_refuses_replies_that_carry_arrays_bytes_or_long_text():
    numbers = evaluateres_to_recorddict(EvaluateRes(Status(Code.OK, "OK"), 1.0, 10, {"fid": 1.0, "site": "a"}))
    assert numbers_only(numbers) is None
    with_arrays = RecordDict({"images": ArrayRecord([np.zeros((2, 1, 4, 4), dtype=np.uint8)])})
    assert numbers_only(with_arrays) == "reply carries arrays"
    assert "bytes" in numbers_only(RecordDict({"m": ConfigRecord({"thumb": b"\x89PNG"})}))
    assert "long text" in numbers_only(RecordDict({"m": ConfigRecord({"note": "x" * (MAX_TEXT + 1)})}))


def test_weighted_means_never_mix_feature_networks():
    sites = {
        "a": {"feature-network": "clf", "protocol": "standard", "fid": 10.0, "num-real": 100,
              "near-copy-fraction": 0.0},
        "b": {"feature-network": "clf", "protocol": "standard", "fid": 40.0, "num-real": 300,
              "near-copy-fraction": 0.1},
        "c": {"feature-network": "fid-helper", "protocol": "standard", "fid": 99.0, "num-real": 50},
    }
    groups = {g["feature_network"]: g for g in weighted_means(sites, {"a": 100, "b": 300, "c": 50})}
    assert groups["clf"]["means"]["fid"] == (10 * 100 + 40 * 300) / 400
    assert groups["clf"]["means"]["num-real"] == 400 and groups["clf"]["means"]["near-copy-fraction-max"] == 0.1
    assert groups["fid-helper"]["means"]["fid"] == 99.0 and groups["fid-helper"]["sites"] == ["c"]


def test_evaluation_schedule_and_site_opt_out():
    cfg = from_flat({"federation.rounds": 5, "evaluation.every-rounds": 2})
    assert [r for r in range(1, 6) if evaluation_due(cfg, r)] == [2, 4, 5]
    assert not any(evaluation_due(from_flat({"federation.rounds": 5}), r) for r in range(1, 6))
    assert declines({"share-evaluation": "false"}) and not declines({"partition-id": 0})
