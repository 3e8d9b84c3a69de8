"""A domain classifier trained on real images, frozen and versioned by a hash, used as a feature network.

For MNIST-like and medical images the FID authors advise a domain network's late-layer statistics instead of
ImageNet Inception (bioinf-jku/TTUR#24). The classifier's numbers depend on this classifier: its name
``medfed-clf/<dataset>/<sha256[:12]>`` pins the exact weights, and they are never tabulated beside Inception
numbers. Its softmax also gives an Inception-Score-like "classifier score" (at most the number of classes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfed import __version__
from medfed.checkpoint import load_payload, save_atomic
from medfed.datasets import ImageDataset, convert_channels, resize
from medfed.errors import CheckpointError, DatasetError
from medfed.evaluation.network import FeatureNetwork
from medfed.progress import progress_bar

FORMAT = "medfed-feature-classifier/1"


@dataclass(frozen=True)
class ClassifierSpec:
    """The architecture: input shape it resizes to, classes, width."""

    channels: int
    image_size: int
    num_classes: int
    width: int = 16
    feature_dim: int = 128


class DomainClassifier(FeatureNetwork):
    """A small CNN: two conv stages, a ``feature_dim`` embedding (the FID features, before the ReLU), a class head.

    It resizes and converts its input to the ``image_size``/``channels`` it was trained on.
    """

    score_name = "classifier-score"

    def __init__(self, spec: ClassifierSpec, name: str = "medfed-clf/untrained",
                 info: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.spec, self.name, self.info = spec, name, dict(info or {})
        self.num_features = spec.feature_dim
        w, c = spec.width, spec.channels
        self.body = nn.Sequential(
            nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(4 * w * 16, spec.feature_dim),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(spec.feature_dim, spec.num_classes))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) floats in [-1, 1] to the classifier's channels and size."""
        return resize(convert_channels(images, self.spec.channels), self.spec.image_size)

    def logits_of(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (N, K) of images in [-1, 1] (the training path)."""
        return self.head(self.body(self.prepare(images)))

    @torch.no_grad()
    def features_and_logits(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.prepare(pixels.float() / 127.5 - 1.0)
        features = self.body(x)
        return features, self.head(features)


def weights_sha256(spec: ClassifierSpec, state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the architecture and every weight (names, dtypes, shapes, bytes), independent of file format."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def dataset_slug(label: str) -> str:
    """A short name-safe dataset label (``../breastmnist.npz`` -> ``breastmnist``)."""
    stem = Path(label).stem if ("/" in label or "." in label) else label
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-") or "data"


def check_labelled(data: ImageDataset) -> int:
    """Number of classes of a fully labelled dataset; raises DatasetError when labels are missing."""
    if len(data) == 0 or bool((data.labels < 0).any()):
        raise DatasetError(f"{data.name}: the domain classifier needs class labels for every image")
    return int(data.labels.max()) + 1


@torch.no_grad()
def accuracy(network: DomainClassifier, data: ImageDataset, batch_size: int = 256) -> float:
    """Top-1 accuracy on ``data`` (images in [-1, 1], labels)."""
    network.eval()
    device = next(network.parameters()).device
    correct = 0
    for start in range(0, len(data), batch_size):
        logits = network.logits_of(data.images[start:start + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == data.labels[start:start + batch_size]).sum())
    return correct / len(data)


def train_classifier(train: ImageDataset, test: ImageDataset, *, dataset: str, epochs: int = 4,
                     batch_size: int = 64, lr: float = 1e-3, seed: int = 0, image_size: int = 0,
                     device: torch.device | str = "cpu", show_progress: bool = True) -> DomainClassifier:
    """Train a domain classifier on ``train`` and measure it on ``test``; returns it frozen, named and hashed.

    Args:
        dataset: label for the name (e.g. the data file); only its stem is kept.
        image_size: input side the classifier resizes to; 0 keeps the training images' size.

    The result's ``info`` holds ``test_accuracy``, ``num_train``, ``num_test``, ``epochs`` and ``seed``.
    """
    num_classes = max(check_labelled(train), check_labelled(test))
    c, h, _ = train.image_shape
    spec = ClassifierSpec(channels=c, image_size=image_size or h, num_classes=num_classes)
    torch.manual_seed(seed)
    network = DomainClassifier(spec).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, -(-len(train) // batch_size))
    with progress_bar("training the domain classifier", total=epochs * steps_per_epoch,
                      enabled=show_progress) as advance:
        for _ in range(epochs):
            network.train()
            order = torch.randperm(len(train), generator=generator)
            for start in range(0, len(train), batch_size):
                idx = order[start:start + batch_size]
                loss = F.cross_entropy(network.logits_of(train.images[idx].to(device)), train.labels[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                advance(loss=loss.item())
    network.eval().requires_grad_(False)
    state = {k: v.cpu() for k, v in network.state_dict().items()}
    digest = weights_sha256(spec, state)
    network.name = f"medfed-clf/{dataset_slug(dataset)}/{digest[:12]}"
    network.info = {"sha256": digest, "dataset": dataset, "test_accuracy": accuracy(network, test),
                    "num_train": len(train), "num_test": len(test), "epochs": epochs, "seed": seed,
                    "train_source": train.name, "test_source": test.name}
    return network


def save_classifier(network: DomainClassifier, path: str | Path) -> Path:
    """Write the frozen classifier (atomically) with its name, hash and test accuracy."""
    payload = {"format": FORMAT, "medfed_version": __version__, "name": network.name,
               "spec": dataclasses.asdict(network.spec), "state_dict": {k: v.cpu() for k, v in
                                                                          network.state_dict().items()},
               "info": network.info}
    return save_atomic(payload, path)


def load_classifier(path: str | Path) -> DomainClassifier:
    """Load a classifier written by :func:`save_classifier`, checking its weights against the recorded hash.

    Raises:
        CheckpointError: missing, foreign or modified file, naming the path.
    """
    payload = load_payload(path, FORMAT, "feature classifier")
    try:
        spec = ClassifierSpec(**payload["spec"])
        state, info = payload["state_dict"], dict(payload["info"])
        digest = weights_sha256(spec, state)
        if digest != info["sha256"] or not payload["name"].endswith(digest[:12]):
            raise CheckpointError(f"{path}: classifier weights do not match their recorded sha256 (file modified?)")
        network = DomainClassifier(spec, name=payload["name"], info=info)
        network.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{path}: classifier file is incomplete or incompatible ({err})") from err
    return network.eval().requires_grad_(False)
