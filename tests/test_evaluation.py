"""Evaluation on real images from ../shared/data: feature networks, FID/KID/PRDC, the Tun-compat protocol."""

import hashlib
import json

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from medfed.config import DataConfig
from medfed.datasets import load_dataset
from medfed.errors import CheckpointError, MedfedError
from medfed.evaluation.classifier import load_classifier, save_classifier, train_classifier
from medfed.evaluation.features import (
    FeatureNetworkUnavailable,
    extract_features,
    find_inception_weights,
    load_feature_network,
    network_pixels,
)
from medfed.evaluation.memorization import audit_memorization, check_audit, write_audit
from medfed.evaluation.metrics import compute_scores, frechet_distance, generated_score, kernel_distance, prdc
from medfed.images import to_uint8

# Stated in README ("Evaluation"): the PneumoniaMNIST domain classifier (3 epochs, seed 0) reaches 0.84 test
# accuracy on the 624 official test images (majority class: 0.625). The check leaves room for CPU nondeterminism.
PNEUMONIA_CLASSIFIER_MIN_ACCURACY = 0.80


@pytest.fixture(scope="module")
def pneumonia(pneumoniamnist):
    train = load_dataset(DataConfig(dataset="npz", path=str(pneumoniamnist), split="train"))
    test = load_dataset(DataConfig(dataset="npz", path=str(pneumoniamnist), split="test"))
    return train, test


@pytest.fixture(scope="module")
def classifier(pneumonia, pneumoniamnist, tmp_path_factory):
    train, test = pneumonia
    network = train_classifier(train, test, dataset=str(pneumoniamnist), epochs=3, seed=0, show_progress=False)
    path = save_classifier(network, tmp_path_factory.mktemp("clf") / "pneumonia.pt")
    return network, path


def test_domain_classifier_reaches_stated_test_accuracy_and_is_versioned(classifier, pneumonia):
    network, path = classifier
    _, test = pneumonia
    assert network.info["test_accuracy"] >= PNEUMONIA_CLASSIFIER_MIN_ACCURACY, network.info
    assert network.info["num_test"] == len(test) == 624
    majority = max(float((test.labels == k).float().mean()) for k in (0, 1))
    assert network.info["test_accuracy"] > majority + 0.15
    assert network.name == f"medfed-clf/pneumoniamnist/{network.info['sha256'][:12]}"
    loaded = load_classifier(path)
    assert loaded.name == network.name and loaded.info["test_accuracy"] == network.info["test_accuracy"]
    pixels = network_pixels(test.images[:8])
    assert torch.equal(loaded(pixels), network(pixels))
    # A modified weight no longer matches the recorded hash.
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["head.2.bias"] = payload["state_dict"]["head.2.bias"] + 0.01
    tampered = path.with_name("tampered.pt")
    torch.save(payload, tampered)
    with pytest.raises(CheckpointError, match="do not match their recorded sha256"):
        load_classifier(tampered)


def blurred(images, sigma):
    return images if sigma == 0 else TF.gaussian_blur(images, kernel_size=2 * int(3 * sigma) + 1, sigma=sigma)


def noised(images, std):
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    return (images + std * noise).clamp(-1, 1)


def test_fid_is_zero_on_itself_and_grows_with_blur_and_noise_and_kid_agrees(classifier, pneumonia):
    network, _ = classifier
    _, test = pneumonia
    real = extract_features(network, test.images, source="pneumonia test")
    for degrade, levels in ((blurred, [0, 0.7, 1.5, 3.0]), (noised, [0, 0.05, 0.15, 0.4])):
        fids, kids, coverage = [], [], []
        for level in levels:
            fake = extract_features(network, degrade(test.images, level), source=f"{degrade.__name__} {level}")
            scores = {s.metric: s for s in compute_scores(real, fake, kid_subset_size=300, kid_subsets=50)}
            assert {s.network for s in scores.values()} == {network.name}
            assert scores["fid"].num_real == scores["fid"].num_generated == 624
            fids.append(scores["fid"].value)
            kids.append(scores["kid"].value)
            coverage.append(scores["coverage"].value)
        assert abs(fids[0]) < 1e-6, fids
        assert fids == sorted(fids) and fids[1] > 0.5, (degrade.__name__, fids)
        assert kids == sorted(kids) and abs(kids[0]) < 0.1 * kids[1], (degrade.__name__, kids)
        assert coverage[0] == 1.0 and coverage[-1] < 0.5, coverage


def test_prdc_matches_a_hand_computed_example():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.5], [10.0]])
    # k=1: real radii are 1; 0.5 lies in the balls of 0 and 1, 10 in none. Fake radii are 9.5.
    out = prdc(real, fake, k=1)
    assert out == {"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.5}
    same = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    assert prdc(same, same, k=3)["precision"] == prdc(same, same, k=3)["coverage"] == 1.0


def test_scores_of_different_networks_are_never_mixed(classifier, pneumonia):
    network, _ = classifier
    _, test = pneumonia
    a = extract_features(network, test.images[:20], source="a")
    b = a.__class__(**{**a.__dict__, "network": "fid-helper-inception-2015-12-05"})
    with pytest.raises(MedfedError, match="cannot compare"):
        compute_scores(a, b)


def test_fid_helper_inception_offline_on_a_few_real_images(pneumonia):
    _, test = pneumonia
    network = load_feature_network("fid-helper")
    assert network.name == "fid-helper-inception-2015-12-05" and network.num_features == 2048
    images = test.images[:8]  # the TorchScript Inception takes ~0.1-0.4 s per image on a 2-core CPU
    features = extract_features(network, torch.cat([images, blurred(images, 1.0), blurred(images, 2.5)]), source="x")
    clean, light, heavy = features.features[:8], features.features[8:16], features.features[16:]
    assert 0 < frechet_distance(clean, light) < frechet_distance(clean, heavy)  # 2048-d FID: slow eigvals on CPU
    assert kernel_distance(clean, light)[0] < kernel_distance(clean, heavy)[0]
    score = generated_score(features)
    assert score.value is None and score.metric == "inception-score" and "has no logits" in score.note


def test_standard_inception_without_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(FeatureNetworkUnavailable) as err:
        find_inception_weights()
    message = str(err.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in message and str(tmp_path / "torch-home") in message
    with pytest.raises(FeatureNetworkUnavailable, match="missing.pth: Inception weights file does not exist"):
        load_feature_network("inception", inception_weights=str(tmp_path / "missing.pth"))


def test_network_pixels_reproduce_the_tun_compat_wrap():
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0]).view(1, 1, 2, 2)
    assert network_pixels(x).flatten().tolist() == [0, 64, 128, 255]
    assert network_pixels(x, "tun-compat").flatten().tolist() == [1, 129, 0, 255]


def test_tun_compat_protocol_reproduces_the_torchmetrics_call(tmp_path):
    """Tun et al.: FrechetInceptionDistance(feature=2048, normalize=True) on [-1, 1] tensors. The standard Inception
    weights are a download, so a same-architecture file with random weights stands in; the pipeline is identical."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchvision.models.inception import Inception3

    torch.manual_seed(0)
    state = {k: v for k, v in Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict().items()
             if "num_batches_tracked" not in k}
    weights = tmp_path / "random-inception.pth"
    torch.save(state, weights)
    g = torch.Generator().manual_seed(0)
    real, fake = torch.rand(4, 1, 28, 28, generator=g) * 2 - 1, torch.rand(4, 1, 28, 28, generator=g) - 1
    paper = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(weights))
    paper.update(real.repeat(1, 3, 1, 1), real=True)
    paper.update(fake.repeat(1, 3, 1, 1), real=False)
    expected = float(paper.compute())
    network = load_feature_network("inception", inception_weights=str(weights), protocol="tun-compat")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert network.name == f"inception-v3-{digest[:12]}-antialias"  # not claimed to be the standard weights
    ours = frechet_distance(extract_features(network, real, source="r", protocol="tun-compat").features,
                            extract_features(network, fake, source="f", protocol="tun-compat").features)
    assert ours == pytest.approx(expected, rel=1e-4)
    with pytest.raises(MedfedError, match="tun-compat"):
        load_feature_network("fid-helper", protocol="tun-compat")


def test_memorization_audit_flags_planted_near_copies_but_not_held_out_images(classifier, pneumonia, tmp_path):
    network, _ = classifier
    train, test = pneumonia
    g = torch.Generator().manual_seed(0)
    picked = torch.randperm(len(train), generator=g)[:40]
    copies = (train.images[picked] + 0.03 * torch.randn(train.images[picked].shape, generator=g)).clamp(-1, 1)
    held_out = test.images[:160]
    generated = torch.cat([copies, held_out])
    audit = audit_memorization(generated, train.images, reference_source="pneumonia train", network=network,
                               sheet_path=tmp_path / "pairs.png", sheet_pairs=8)
    check_audit(json.loads(write_audit(audit, tmp_path / "audit.json").read_text()))
    flagged = set(audit["near_copy_indices"])
    planted_rate = len(flagged & set(range(40))) / 40
    held_out_rate = len(flagged - set(range(40))) / 160
    assert planted_rate >= 0.95 and held_out_rate <= 0.02, (planted_rate, held_out_rate)
    assert audit["passed"] is False and audit["near_copy_fraction"] == pytest.approx(len(flagged) / 200)
    unique = len(np.unique(to_uint8(train.images).reshape(len(train), -1).numpy(), axis=0))  # 17 exact duplicates
    assert audit["num_generated"] == 200 and audit["num_reference"] == unique < len(train)
    assert audit["feature_network"] == network.name and audit["near_copy_threshold"] == pytest.approx(1 / 3)
    assert audit["generated_sha256"] == hashlib.sha256(to_uint8(generated).numpy().tobytes()).hexdigest()
    assert {p["generated_index"] for p in audit["closest_pairs"]} <= set(range(40))
    assert audit["feature"]["nn_distance"]["min"] < audit["feature"]["nn_distance"]["median"]
    assert (tmp_path / "pairs.png").read_bytes()[:4] == b"\x89PNG"
    clean = audit_memorization(held_out, train.images, reference_source="pneumonia train", max_fraction=0.02)
    assert clean["passed"] is True and clean["feature_network"] == "none"


def test_memorization_audit_sees_through_duplicated_training_images(pneumonia):
    train, _ = pneumonia
    reference = torch.cat([train.images[:300], train.images[:10]])  # 10 exact duplicates
    generated = (train.images[:10] + 0.02 * torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(2)))
    audit = audit_memorization(generated.clamp(-1, 1), reference, reference_source="dup")
    assert audit["reference_exact_duplicates_removed"] == 10 and audit["num_reference"] == 300
    assert audit["near_copy_count"] == 10


def test_audit_schema_check_rejects_malformed_documents():
    with pytest.raises(MedfedError, match="not a memorization-audit"):
        check_audit({"kind": "something-else", "version": 1})
    good = {"kind": "memorization-audit", "version": 1, "passed": True, "near_copy_threshold": 0.33,
            "near_copy_fraction": 0.0, "max_near_copy_fraction": 0.0, "num_generated": 3, "num_reference": 9,
            "generated_sha256": "0" * 64, "feature_network": "none"}
    assert check_audit(dict(good)) == good
    with pytest.raises(MedfedError, match="'passed'"):
        check_audit({**good, "passed": "yes"})
