"""Plots of scores (matplotlib, headless Agg backend)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path


def score_histograms(scores: dict[str, np.ndarray], noisy: np.ndarray | None, path: str | Path,
                     title: str = "") -> Path:
    """One histogram per score, clean vs known-noisy examples overlaid; written as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(scores)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        s = scores[name]
        bins = np.histogram_bin_edges(s[np.isfinite(s)], bins=40)
        if noisy is None:
            ax.hist(s, bins=bins, color="tab:blue")
        else:
            ax.hist(s[~noisy], bins=bins, alpha=0.6, label=f"clean ({int((~noisy).sum())})",
                    color="tab:blue", density=True)
            ax.hist(s[noisy], bins=bins, alpha=0.6, label=f"noisy ({int(noisy.sum())})",
                    color="tab:red", density=True)
            ax.legend(fontsize=8)
        ax.set_xlabel(name)
        ax.set_ylabel("density" if noisy is not None else "count")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
