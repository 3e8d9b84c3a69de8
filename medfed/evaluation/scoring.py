"""Scoring a generator: what a checkpoint's images are worth, on a named feature network and by train-on-synthetic.

A :class:`Scorer` is one frozen feature network and how it scores generated images against real ones (FID, KID,
precision/recall/density/coverage, and the classifier score where the network has logits). A :class:`Yardstick`
is a scorer with the real images' features extracted once, so every model measured against it is compared with
the same reference. :func:`score_checkpoint` is the one way a class-conditional checkpoint is scored: draw
labelled images (every class equally often), train the fixed TSTR classifier on them and test it on the real
split (:func:`medfed.evaluation.utility.utility_report`), and score the images on every yardstick. ``medfed demo``
and ``benchmarks/bench_quality.py`` both use it; the studies use :class:`Scorer` directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medfed.datasets import ImageDataset
from medfed.evaluation.features import FeatureNetwork, FeatureSet, extract_features
from medfed.evaluation.metrics import compute_scores


@dataclass
class Scorer:
    """One feature network and how it scores generated images against real ones.

    Attributes:
        network: the frozen feature network.
        record: what it is: ``name`` (carried by every number), and where known ``spec``, ``file``, ``sha256``
            and, for a domain classifier, ``test_accuracy``, ``num_train``, ``num_test``.
        seed: seeds KID's subsets.
        batch_size: images per feature-extraction batch.
    """

    network: FeatureNetwork
    record: dict[str, Any]
    seed: int = 0
    batch_size: int = 256

    @property
    def name(self) -> str:
        return self.network.name

    def features(self, images: torch.Tensor, source: str) -> FeatureSet:
        """Features of (N, C, H, W) ``images`` in [-1, 1]; ``source`` names them in every error and record."""
        return extract_features(self.network, images, source=source, batch_size=self.batch_size)

    def score(self, reference: FeatureSet, generated: torch.Tensor) -> dict[str, float]:
        """FID, KID (+ std), precision, recall, density, coverage (and the classifier score where the network
        has logits) of ``generated`` (N, C, H, W) in [-1, 1] against ``reference``; the sample counts too."""
        scores = compute_scores(reference, self.features(generated, "generated"), seed=self.seed)
        out: dict[str, float] = {"num-real": reference.count, "num-generated": len(generated)}
        for s in scores:
            if s.value is None:  # unavailable at these counts or on this network; the note says why
                continue
            out[s.metric] = s.value
            if s.std is not None:
                out[f"{s.metric}-std"] = s.std
        return out


@dataclass
class Yardstick:
    """A scorer and the features of the real images every model is compared with (extracted once)."""

    scorer: Scorer
    reference: FeatureSet

    @classmethod
    def of(cls, scorer: Scorer, real: torch.Tensor, source: str) -> Yardstick:
        """The yardstick of (N, C, H, W) ``real`` images in [-1, 1] named ``source``."""
        return cls(scorer=scorer, reference=scorer.features(real, source))

    @property
    def name(self) -> str:
        return self.scorer.name


@dataclass
class SamplingSpec:
    """How the labelled images scored are drawn: ``num`` images (every class equally often), DDIM over ``steps``
    steps, classifier-free guidance ``guidance``, seeded."""

    num: int
    guidance: float
    steps: int
    seed: int = 0


@dataclass
class CheckpointScore:
    """What :func:`score_checkpoint` measured for one checkpoint.

    Attributes:
        samples: the labelled images drawn, (N, C, H, W) in [-1, 1] with (N,) labels.
        tstr: :func:`medfed.evaluation.utility.utility_report` of them on the real test split (``synthetic``:
            accuracy, balanced accuracy, AUC for two classes; the recipe; the test split).
        feature_scores: per yardstick name, :meth:`Scorer.score` of the samples.
        sampling_s: wall seconds spent drawing the images.
        evaluation_s: wall seconds in all (drawing, TSTR, feature scores).
    """

    samples: ImageDataset
    tstr: dict[str, Any]
    feature_scores: dict[str, dict[str, float]]
    sampling_s: float
    evaluation_s: float


def score_checkpoint(checkpoint: str | Path, test: ImageDataset, yardsticks: Sequence[Yardstick],
                     sampling: SamplingSpec, *, device: torch.device, source: str = "") -> CheckpointScore:
    """Draw ``sampling.num`` labelled images from a class-conditional ``checkpoint``, train the TSTR classifier on
    them and test it on ``test`` (real, labelled), and score them on every yardstick."""
    from medfed.evaluation.utility import sample_labelled, utility_report

    start = time.perf_counter()
    samples, _ = sample_labelled(checkpoint, sampling.num, guidance=sampling.guidance, sampler="ddim",
                                 steps=sampling.steps, seed=sampling.seed, device=str(device))
    sampling_s = time.perf_counter() - start
    tstr = utility_report(samples.images, samples.labels, test, source=source or str(checkpoint),
                          seed=sampling.seed, device=device)
    scores = {y.name: y.scorer.score(y.reference, samples.images) for y in yardsticks}
    return CheckpointScore(samples=samples, tstr=tstr, feature_scores=scores, sampling_s=sampling_s,
                           evaluation_s=time.perf_counter() - start)
