"""FID, KID, Inception/classifier score (through torchmetrics) and precision/recall/density/coverage, on features.

Features are extracted once per image set (:func:`medfed.evaluation.features.extract_features`) and handed to
torchmetrics through :class:`Precomputed`, a feature "network" that returns its input, so one extraction serves
every metric. Each result is a :class:`Score` that carries its feature network, protocol and sample counts.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from medfed.errors import MedfedError
from medfed.evaluation.features import STANDARD, FeatureSet


@dataclass(frozen=True)
class Score:
    """One number and everything needed to read it.

    Attributes:
        metric: ``fid``, ``kid``, ``precision``, ``recall``, ``density``, ``coverage``, ``inception-score`` or
            ``classifier-score``.
        value: the score, or None when unavailable (``note`` says why).
        std: spread where the metric has one (KID over subsets, IS over splits).
        network: the feature network's stable name.
        protocol: ``standard`` or ``tun-compat`` (non-standard, only to compare with Tun et al.).
        num_real, num_generated: sample counts (0 real for scores of generated images alone).
        reference: what the real images were (file and split).
    """

    metric: str
    value: float | None
    std: float | None
    network: str
    protocol: str
    num_real: int
    num_generated: int
    reference: str
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Precomputed(nn.Module):
    """Identity feature module: torchmetrics accumulates its statistics on features we already extracted."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check_comparable(real: FeatureSet, generated: FeatureSet) -> None:
    if (real.network, real.protocol) != (generated.network, generated.protocol):
        raise MedfedError(f"cannot compare features of '{real.network}' ({real.protocol}) with "
                          f"'{generated.network}' ({generated.protocol})")


def frechet_distance(real: torch.Tensor, generated: torch.Tensor, chunk: int = 4096) -> float:
    """FID between two (N, D) feature sets (torchmetrics: float64 statistics, eigenvalue matrix square root)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(generated) < 2:
        raise MedfedError(f"FID needs at least 2 images on each side (got {len(real)} real, {len(generated)} "
                          "generated)")
    metric = FrechetInceptionDistance(feature=Precomputed(real.shape[1]))
    for start in range(0, len(real), chunk):
        metric.update(real[start:start + chunk].double(), real=True)
    for start in range(0, len(generated), chunk):
        metric.update(generated[start:start + chunk].double(), real=False)
    return float(metric.compute())


def kernel_distance(real: torch.Tensor, generated: torch.Tensor, *, subset_size: int = 1000, subsets: int = 100,
                    seed: int = 0) -> tuple[float, float, int]:
    """KID (mean, std over ``subsets`` random subsets) between (N, D) feature sets; returns the subset size used.

    The subset size is capped at the smaller set (torchmetrics refuses larger ones); the subsets are seeded.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(generated))
    if size < 2:
        raise MedfedError(f"KID needs at least 2 images on each side (got {len(real)} real, {len(generated)} "
                          "generated)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=Precomputed(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.float(), real=True)  # float32 kernels, as the reference implementation; float64 is ~4x slower
    metric.update(generated.float(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size


def logit_score(logits: torch.Tensor, *, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """Inception-Score formula exp(E KL(p(y|x) || p(y))) over ``splits`` seeded splits (torchmetrics); mean, std."""
    from torchmetrics.image.inception import InceptionScore

    splits = max(1, min(splits, len(logits)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = InceptionScore(feature=Precomputed(logits.shape[1]), splits=splits)
    metric.update(logits.double())
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std) if splits > 1 else 0.0


def _kth_neighbour_distance(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row (the point itself excluded)."""
    out = []
    for start in range(0, len(x), chunk):
        d = torch.cdist(x[start:start + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the smallest is the point itself (0)
    return torch.cat(out)


def prdc(real: torch.Tensor, generated: torch.Tensor, k: int = 5, chunk: int = 1024) -> dict[str, float]:
    """Precision, recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020) of (N, D) features.

    A k-NN ball around each real feature (radius: distance to its k-th nearest real neighbour) estimates the real
    manifold; likewise for generated features. Exact, as in the reference ``prdc`` package, but in float64 torch
    and in chunks, so memory stays O(chunk x N).

    * precision: share of generated features inside some real ball.
    * recall: share of real features inside some generated ball.
    * density: mean number of real balls containing each generated feature, divided by k.
    * coverage: share of real balls that contain at least one generated feature.
    """
    if min(len(real), len(generated)) <= k:
        raise MedfedError(f"precision/recall need more than k={k} images on each side (got {len(real)} real, "
                          f"{len(generated)} generated)")
    real, generated = real.double(), generated.double()
    real_radius = _kth_neighbour_distance(real, k, chunk)
    gen_radius = _kth_neighbour_distance(generated, k, chunk)
    in_real_balls = torch.zeros(len(generated), dtype=torch.long)  # per generated: real balls containing it
    real_recalled = torch.zeros(len(real), dtype=torch.bool)
    nearest_generated = torch.full((len(real),), float("inf"), dtype=torch.float64)
    for start in range(0, len(generated), chunk):
        d = torch.cdist(real, generated[start:start + chunk])  # (N_real, chunk)
        in_real_balls[start:start + chunk] = (d < real_radius[:, None]).sum(0)
        real_recalled |= (d < gen_radius[None, start:start + chunk]).any(1)
        nearest_generated = torch.minimum(nearest_generated, d.min(1).values)
    return {
        "precision": float((in_real_balls > 0).double().mean()),
        "recall": float(real_recalled.double().mean()),
        "density": float(in_real_balls.double().mean() / k),
        "coverage": float((nearest_generated < real_radius).double().mean()),
    }


def generated_score(generated: FeatureSet, *, splits: int = 10, seed: int = 0) -> Score:
    """The network's IS-like score of generated images (Inception Score or classifier score), or unavailable."""
    name = generated.score_name or "inception-score"
    if generated.logits is None:
        return Score(name, None, None, generated.network, generated.protocol, 0, generated.count, "",
                     note=f"unavailable: {generated.network} has no logits")
    mean, std = logit_score(generated.logits, splits=splits, seed=seed)
    return Score(name, mean, std, generated.network, generated.protocol, 0, generated.count, "")


def compute_scores(real: FeatureSet, generated: FeatureSet, *, kid_subset_size: int = 1000, kid_subsets: int = 100,
                   prdc_k: int = 5, is_splits: int = 10, seed: int = 0) -> list[Score]:
    """Every score of ``generated`` against ``real`` on their (shared) feature network.

    Under the Tun-compat protocol only FID and IS are computed (the paper's metrics). Scores that cannot be
    computed at these sample counts (e.g. PRDC with N <= k) come back with ``value=None`` and a note.

    Raises:
        MedfedError: the two sets come from different networks or protocols.
    """
    _check_comparable(real, generated)
    ref, net, proto = real.source, real.network, real.protocol
    nr, ng = real.count, generated.count

    def score(metric: str, value: float | None, std: float | None = None, note: str = "") -> Score:
        return Score(metric, value, std, net, proto, nr, ng, ref, note)

    scores = [score("fid", frechet_distance(real.features, generated.features))]
    if proto == STANDARD:
        mean, std, size = kernel_distance(real.features, generated.features, subset_size=kid_subset_size,
                                          subsets=kid_subsets, seed=seed)
        scores.append(score("kid", mean, std, note=f"subset size {size}, {kid_subsets} subsets"))
        try:
            scores += [score(name, value, note=f"k={prdc_k}") for name, value in
                       prdc(real.features, generated.features, k=prdc_k).items()]
        except MedfedError as err:
            scores += [score(name, None, note=str(err)) for name in ("precision", "recall", "density", "coverage")]
    gen = generated_score(generated, splits=is_splits, seed=seed)
    scores.append(Score(gen.metric, gen.value, gen.std, net, proto, 0, ng, "", gen.note))
    return scores
