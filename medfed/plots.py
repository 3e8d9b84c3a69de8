"""Line plots for reports (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def line_plot(
    panels: Sequence[tuple[str, str, Mapping[str, tuple[Sequence[float], Sequence[float]]]]],
    path: str | Path,
    xlabel: str,
    hlines: Mapping[int, Mapping[str, float]] | None = None,
) -> Path:
    """Write a PNG with one panel per ``(title, ylabel, {series name: (xs, ys)})``, side by side.

    ``hlines`` maps a panel index to labelled horizontal reference lines (e.g. a privacy cap).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for i, (ax, (title, ylabel, series)) in enumerate(zip(axes[0], panels)):
        for name, (xs, ys) in series.items():
            ax.plot(list(xs), list(ys), marker="o", markersize=3, label=name)
        for label, y in (hlines or {}).get(i, {}).items():
            ax.axhline(y, linestyle="--", color="grey", linewidth=1, label=label)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if series or (hlines or {}).get(i):
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
