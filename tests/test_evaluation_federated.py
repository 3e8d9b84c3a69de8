"""Per-site evaluation: a real Flower simulation where each site scores the global model's samples and replies
with numbers only; plus the server-side rules (refusing non-numeric replies, never mixing networks)."""

import math
import time

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import Code, EvaluateIns, EvaluateRes, Metadata, Status, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import (evaluateins_to_recorddict, evaluateres_to_recorddict,
                                                  recorddict_to_evaluateres)

from medfed.config import DataConfig, from_flat, to_flat
from medfed.contracts import Reason, Refusal
from medfed.datasets import load_dataset
from medfed.evaluation.classifier import save_classifier, train_classifier
from medfed.federation.evaluation import (
    MAX_TEXT,
    evaluation_due,
    handle_evaluate,
    numbers_only,
    read_records,
    weighted_means,
)
from medfed.federation.client_app import site_guard_mod
from medfed.federation.policy import simulated_node
from medfed.launch.simulation import run_simulation
from medfed.federation.site import load_site, remember_global_model
from medfed.federation.weights import get_weights
from medfed.images import to_uint8
from medfed.models import build_unet

SITES = ("site-0", "site-1", "site-2")


@pytest.mark.slow  # a Flower simulation
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
        "policy.share-evaluation": True,  # the simulated hospitals opt in (the default policy shares nothing)
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
        assert metrics["reference"] == "test split"
        # of the memorization audit only the verdict and the count leave the site
        assert isinstance(metrics["memorization-passed"], bool) and 0 <= metrics["near-copy-count"] <= num_generated
        assert not [k for k in metrics if k.startswith(("nn-", "feature-nn")) or "distance" in k]
        for value in metrics.values():  # numbers and short labels only
            assert isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= MAX_TEXT)
    (group,) = record["weighted"]
    weights = record["weights"]
    expected = sum(weights[s] * record["sites"][s]["fid"] for s in SITES) / sum(weights.values())
    assert group["feature_network"] == classifier.name and group["means"]["fid"] == expected
    assert group["means"]["num-real"] == sum(weights.values())
    # No images and no model went down (the sites sample the model they hold, with the run's seed); only a few
    # hundred bytes of numbers came back up.
    one_set = num_generated * 28 * 28
    assert record["bytes_down"] < 3 * 100 < one_set
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
              "near-copy-count": 0},
        "b": {"feature-network": "clf", "protocol": "standard", "fid": 40.0, "num-real": 300,
              "near-copy-count": 3},
        "c": {"feature-network": "fid-helper", "protocol": "standard", "fid": 99.0, "num-real": 50},
    }
    groups = {g["feature_network"]: g for g in weighted_means(sites, {"a": 100, "b": 300, "c": 50})}
    assert groups["clf"]["means"]["fid"] == (10 * 100 + 40 * 300) / 400
    assert groups["clf"]["means"]["num-real"] == 400 and groups["clf"]["means"]["near-copy-count-max"] == 3
    assert groups["fid-helper"]["means"]["fid"] == 99.0 and groups["fid-helper"]["sites"] == ["c"]


def test_evaluation_schedule_and_site_opt_out():
    cfg = from_flat({"federation.rounds": 5, "evaluation.every-rounds": 2})
    assert [r for r in range(1, 6) if evaluation_due(cfg, r)] == [2, 4, 5]
    assert not any(evaluation_due(from_flat({"federation.rounds": 5}), r) for r in range(1, 6))
    assert not simulated_node(cfg, 0, 3).policy.share_evaluation  # the strict default: no evaluation answered
    shared = from_flat({"evaluation.every-rounds": 2, "policy.share-evaluation": True})
    assert simulated_node(shared, 0, 3).policy.share_evaluation


def evaluate_message(pixels: np.ndarray) -> Message:
    """An evaluation request as the old protocol let a server send it: pixels of its choosing."""
    content = evaluateins_to_recorddict(EvaluateIns(ndarrays_to_parameters([pixels]), {"round": 1}), True)
    return Message(content=content, metadata=Metadata(
        run_id=7, message_id="e1", src_node_id=1, dst_node_id=2, reply_to_message_id="", group_id="evaluate-1",
        created_at=time.time(), ttl=3600.0, message_type=MessageType.EVALUATE))


def test_a_server_cannot_choose_the_images_a_site_is_compared_against(tmp_path, pneumoniamnist):
    """The membership oracle of the old protocol: a training image planted among the server's images. The site
    now ignores whatever the request carries and scores samples of the model it holds, so the reply is the same
    for a member and a non-member; without share-evaluation it answers nothing."""
    data = load_dataset(DataConfig(dataset="npz", path=str(pneumoniamnist), split="train", limit=200))
    clf = save_classifier(train_classifier(data, data, dataset=str(pneumoniamnist), epochs=1, show_progress=False),
                          tmp_path / "clf.pt")
    flat = {"data.dataset": "npz", "data.path": str(pneumoniamnist), "data.limit": 200, "data.image-size": 28,
            "data.channels": 1, "model.preset": "pico", "federation.num-sites": 3, "train.device": "cpu",
            "diffusion.sample-steps": 2, "evaluation.num-samples": 8, "evaluation.feature-network": str(clf),
            "privacy.site-state-root": str(tmp_path / "state"), "output.dir": str(tmp_path)}
    shared = from_flat({**flat, "policy.share-evaluation": True})
    site = load_site(shared, simulated_node(shared, 0, 3))
    remember_global_model(site, 7, 1, get_weights(build_unet("pico", 1)))  # what the site trained from
    member = to_uint8(site.data.images[:1]).numpy()
    outsider = to_uint8(load_dataset(DataConfig(dataset="npz", path=str(pneumoniamnist), split="test",
                                                limit=1)).images).numpy()
    fillers = np.full((63, 1, 28, 28), 128, np.uint8)
    replies = []
    for planted in (member, outsider):
        context = Context(run_id=7, node_id=2, node_config={"partition-id": 0, "num-partitions": 3},
                          state=RecordDict(), run_config=to_flat(shared))
        reply = site_guard_mod(evaluate_message(np.concatenate([planted, fillers])), context,
                               handle_evaluate)
        assert reply.has_content()
        replies.append(dict(recorddict_to_evaluateres(reply.content).metrics))
    assert replies[0] == replies[1] and replies[0]["num-generated"] == 8
    closed = from_flat(flat)  # the default policy: share-evaluation = false
    context = Context(run_id=7, node_id=2, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config=to_flat(closed))
    reply = site_guard_mod(evaluate_message(np.concatenate([member, fillers])), context, handle_evaluate)
    assert reply.has_error() and Refusal.find(reply.error.reason).reason == Reason.POLICY_SHARE_EVALUATION
