"""The statistics of a reader study, in numpy/scipy: intervals, the visual Turing test, Cohen's and Fleiss' kappa.

Every function returns ``None`` where a statistic is undefined (e.g. a kappa when every rating falls in one
category), never a made-up number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a two-sided confidence interval (``low``/``high`` are None when undefined)."""

    value: float | None
    low: float | None
    high: float | None
    n: int

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def t_interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> Estimate:
    """Mean of ``values`` with Student's t interval (``n - 1`` degrees of freedom); no interval for n < 2."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return Estimate(None, None, None, 0)
    mean = float(x.mean())
    if n < 2:
        return Estimate(mean, None, None, n)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> Estimate:
    """Proportion ``successes / n`` with the Wilson score interval (well-behaved near 0 and 1 and for small n)."""
    if n == 0:
        return Estimate(None, None, None, 0)
    p = successes / n
    z = float(stats.norm.ppf(0.5 + level / 2))
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n)


def cohen_kappa(a: Sequence[object], b: Sequence[object], categories: Sequence[object],
                weights: str | None = None) -> float | None:
    """Cohen's kappa of two raters' paired ratings.

    Args:
        a, b: the two raters' ratings of the same items, in the same order.
        categories: all possible ratings, in order (the order matters for weighted kappa).
        weights: None (unweighted: any disagreement counts fully), ``"linear"`` (disagreement weight
            ``|i - j| / (k - 1)``) or ``"quadratic"`` (``((i - j) / (k - 1))**2``), for ordinal scales.

    Returns:
        ``1 - sum(w * observed) / sum(w * expected)``, or None when the expected disagreement is 0.
    """
    if len(a) != len(b):
        raise ValueError("cohen_kappa needs two rating lists of the same length")
    if not a:
        return None
    index = {c: i for i, c in enumerate(categories)}
    k = len(categories)
    observed = np.zeros((k, k))
    for x, y in zip(a, b):
        observed[index[x], index[y]] += 1
    observed /= observed.sum()
    expected = np.outer(observed.sum(1), observed.sum(0))
    i, j = np.indices((k, k))
    if weights is None:
        w = (i != j).astype(float)
    elif weights == "linear":
        w = np.abs(i - j) / max(k - 1, 1)
    elif weights == "quadratic":
        w = ((i - j) / max(k - 1, 1)) ** 2
    else:
        raise ValueError(f"unknown kappa weights '{weights}' (None, 'linear' or 'quadratic')")
    expected_disagreement = float((w * expected).sum())
    if expected_disagreement <= 1e-12:
        return None
    return 1.0 - float((w * observed).sum()) / expected_disagreement


def fleiss_kappa(counts: np.ndarray) -> float | None:
    """Fleiss' kappa (nominal categories, unweighted) from an (items, categories) table of rating counts.

    Every item must be rated by the same number of raters n >= 2 (each row sums to n). Returns
    ``(P_bar - P_e) / (1 - P_e)``, or None when the chance agreement ``P_e`` is 1 (all ratings in one category).
    """
    table = np.asarray(counts, dtype=float)
    if table.ndim != 2 or len(table) == 0:
        return None
    per_item = table.sum(1)
    n = per_item[0]
    if n < 2 or not np.all(per_item == n):
        raise ValueError("fleiss_kappa needs the same number (>= 2) of ratings for every item")
    p_category = table.sum(0) / table.sum()
    p_item = ((table * table).sum(1) - n) / (n * (n - 1))
    p_bar, p_chance = float(p_item.mean()), float((p_category ** 2).sum())
    if p_chance >= 1 - 1e-12:
        return None
    return (p_bar - p_chance) / (1 - p_chance)


def kappa_strength(kappa: float | None) -> str | None:
    """Landis and Koch (1977) wording for a kappa value."""
    if kappa is None:
        return None
    if kappa < 0:
        return "poor"
    for bound, word in ((0.2, "slight"), (0.4, "fair"), (0.6, "moderate"), (0.8, "substantial")):
        if kappa <= bound:
            return word
    return "almost perfect"


@dataclass(frozen=True)
class TuringTest:
    """Confusion counts of real/synthetic calls. The positive class is *synthetic*: a true positive is a
    synthetic image called synthetic, a false positive a real image called synthetic."""

    tp: int
    fn: int
    tn: int
    fp: int

    @classmethod
    def from_calls(cls, is_synthetic: Sequence[bool], called_synthetic: Sequence[bool]) -> TuringTest:
        truth, call = np.asarray(is_synthetic, dtype=bool), np.asarray(called_synthetic, dtype=bool)
        return cls(tp=int((truth & call).sum()), fn=int((truth & ~call).sum()),
                   tn=int((~truth & ~call).sum()), fp=int((~truth & call).sum()))

    def summary(self, level: float = 0.95) -> dict[str, object]:
        """Accuracy, sensitivity (synthetic images detected) and specificity (real images recognised), each
        with a Wilson interval; None where the denominator is 0 (e.g. specificity without real images)."""
        n = self.tp + self.fn + self.tn + self.fp
        return {
            "counts": {"tp": self.tp, "fn": self.fn, "tn": self.tn, "fp": self.fp},
            "accuracy": wilson_interval(self.tp + self.tn, n, level).to_dict(),
            "sensitivity": wilson_interval(self.tp, self.tp + self.fn, level).to_dict(),
            "specificity": wilson_interval(self.tn, self.tn + self.fp, level).to_dict(),
        }
