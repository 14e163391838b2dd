"""Plots of scores (matplotlib, headless Agg backend)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .._version import __version__
from ..config import DATA_MAP_POINTS
from ..io.atomic import atomic_path
from ..io.outputs import MARK


def pyplot():
    """matplotlib.pyplot on the headless Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write atomically as PNG or SVG (by the extension), close."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:   # the metadata marks it as gradscore's (see outputs.claim)
        fig.savefig(tmp, format=fmt, dpi=110, metadata={"Software" if fmt == "png" else "Creator": f"{MARK} {__version__}"})
    plt.close(fig)
    return path


def score_histograms(scores: dict[str, np.ndarray], noisy: np.ndarray | None, path: str | Path,
                     title: str = "", ncols: int = 4) -> Path:
    """One histogram per score in a grid of ``ncols`` columns, clean vs known-noisy examples
    overlaid (as densities) when ``noisy`` is given; NaN/Inf values are left out and counted.
    PNG or SVG by the extension of ``path``."""
    from matplotlib import ticker
    plt = pyplot()
    names = list(scores)
    ncols = max(1, min(ncols, len(names)))
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows + 0.5), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for k, (ax, name) in enumerate(zip(axes.flat, names)):
        s = scores[name]
        finite = np.isfinite(s)
        ax.set_title(name + (f" ({int((~finite).sum())} NaN/Inf left out)" if not finite.all() else ""), fontsize=10)
        if not finite.any():
            continue
        bins = np.histogram_bin_edges(s[finite], bins=40)
        if noisy is None:
            ax.hist(s[finite], bins=bins, color="tab:blue")
        else:
            groups = (("clean", finite & ~noisy, "tab:blue"), ("known noisy", finite & noisy, "tab:red"))
            for label, group, color in groups:
                n = int(group.sum())   # the counts of what this panel draws; no density of no values
                ax.hist(s[group], bins=bins, alpha=0.6, label=f"{label} ({n})", color=color, density=n > 0)
            if k == 0:
                ax.legend(fontsize=8)
        ax.tick_params(labelsize=8)   # few ticks, and a ×10ⁿ offset for small or large scores: labels that fit
        ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=4))
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3), useMathText=True)
        if k % ncols == 0:
            ax.set_ylabel("density" if noisy is not None else "count")
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def statistics_over(res: dict) -> str:
    """What the per-example statistics of a loaded scores file (``load_scores``) run over:
    an in-run recording's "presentations", else "checkpoints"."""
    return "presentations" if res["config"].get("inrun") else "checkpoints"


def data_map(confidence: np.ndarray, variability: np.ndarray, correctness: np.ndarray,
             path: str | Path, *, noisy: np.ndarray | None = None, fraction: float = 0.33,
             max_points: int = DATA_MAP_POINTS, title: str = "", over: str = "checkpoints") -> Path:
    """Dataset-cartography map: confidence vs variability, coloured by correctness; ``over``:
    what the statistics run over ("checkpoints", or an in-run file's "presentations").

    The three regions (easy, ambiguous, hard; each ``fraction`` of the data) are shaded.
    Above ``max_points`` examples a hexbin of mean correctness replaces the scatter, so
    10⁶ points stay readable; known-noisy examples are outlined when ``noisy`` is given.
    PNG or SVG by the extension of ``path``.
    """
    plt = pyplot()
    n = len(confidence)
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    hi_conf, lo_conf = np.quantile(confidence, 1 - fraction), np.quantile(confidence, fraction)
    hi_var = np.quantile(variability, 1 - fraction)
    vmax = max(float(variability.max()), 1e-6) * 1.05
    ax.axhspan(hi_conf, 1.0, color="tab:green", alpha=0.08)
    ax.axhspan(0.0, lo_conf, color="tab:red", alpha=0.08)
    ax.axvspan(hi_var, vmax, color="tab:orange", alpha=0.08)
    for text, x, y in (("easy-to-learn", 0.02 * vmax, 0.97), ("hard-to-learn", 0.5 * vmax, 0.02),
                       ("ambiguous", hi_var + 0.02 * vmax, 0.5)):
        ax.text(x, y, text, fontsize=9, va="top" if y > 0.5 else "bottom", zorder=5,
                bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0})
    if n > max_points:
        hb = ax.hexbin(variability, confidence, C=correctness, reduce_C_function=np.mean,
                       gridsize=70, cmap="coolwarm_r", mincnt=1)
        fig.colorbar(hb, ax=ax, label="mean correctness")
        note = f"hexbin of {n:,} examples"
    else:
        sc = ax.scatter(variability, confidence, c=correctness, cmap="coolwarm_r", s=6, alpha=0.7)
        fig.colorbar(sc, ax=ax, label="correctness")
        if noisy is not None and noisy.any():
            ax.scatter(variability[noisy], confidence[noisy], facecolors="none", edgecolors="k",
                       s=14, linewidths=0.5, label=f"known noisy ({int(noisy.sum())})")
            # below the axes: inside, it would cover a region's label or its points
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=8, frameon=False)
        note = f"{n:,} examples"
    ax.set_xlim(0, vmax)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"variability (std of p(gold) over {over})")
    ax.set_ylabel(f"confidence (mean p(gold) over {over})")
    ax.set_title(f"data map, {note}" + (f" — {title}" if title else ""), fontsize=10)
    return save_figure(fig, path)


def _log_x(ax, values: np.ndarray) -> None:
    """A log x axis whose tick labels never crowd and leave no stretch of the values
    unlabelled: over 2.5 decades or more one labelled tick per decade; under that plain
    numbers at 1, 2, 5 × 10^k, or at 1, 2, …, 9 × 10^k where those give fewer than three
    among the values, or evenly spaced ones over a range too narrow for either; minor
    ticks unlabelled."""
    from matplotlib import ticker
    ax.set_xscale("log")
    positive = values[np.isfinite(values) & (values > 0)]
    lo, hi = (positive.min(), positive.max()) if len(positive) else (1.0, np.inf)
    if np.log10(hi / lo) >= 2.5:
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10, numticks=8))
    else:
        locator: ticker.Locator = ticker.MaxNLocator(nbins=5)
        decades = range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
        for subs in ((1, 2, 5), range(1, 10)):
            ticks = [v for v in (float(f"{s}e{k}") for k in decades for s in subs) if lo <= v <= hi]
            if len(ticks) >= 3:
                locator = ticker.FixedLocator(ticks)
                break
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def norm_vs_cos(grad_norm: np.ndarray, cos: np.ndarray, path: str | Path, *, noisy: np.ndarray | None = None,
                title: str = "", over: str = "checkpoints", max_points: int = DATA_MAP_POINTS) -> Path:
    """Scatter of mean ‖g‖ (log x) against mean cos with the reference, noisy examples in red;
    ``over``: what the means run over ("checkpoints", or an in-run file's "presentations").
    Above ``max_points`` examples a hexbin of the share of known-noisy examples per cell (of
    the count, without ``noisy``); examples without a positive norm (never measured) are
    left out of it, and counted in the title."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 4.6))
    n = len(cos)
    if n > max_points:
        shown = np.isfinite(grad_norm) & (grad_norm > 0) & np.isfinite(cos)
        hb = ax.hexbin(grad_norm[shown], cos[shown], C=None if noisy is None else noisy[shown].astype(float),
                       reduce_C_function=np.mean, xscale="log", gridsize=70, mincnt=1,
                       cmap="viridis" if noisy is None else "coolwarm", bins="log" if noisy is None else None)
        fig.colorbar(hb, ax=ax, label="examples" if noisy is None else "share known noisy")
        left = n - int(shown.sum())
        title = ", ".join([*([title] if title else []), f"hexbin of {int(shown.sum()):,} examples"]
                          + ([f"{left:,} with no gradient left out"] if left else []))
    else:
        clean = np.ones(n, bool) if noisy is None else ~noisy
        ax.scatter(grad_norm[clean], cos[clean], s=5, alpha=0.5, color="tab:blue",
                   label="clean" if noisy is not None else None)
        if noisy is not None:
            ax.scatter(grad_norm[noisy], cos[noisy], s=5, alpha=0.6, color="tab:red",
                       label=f"noisy ({int(noisy.sum())})")
            ax.legend(fontsize=8)
    _log_x(ax, grad_norm)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel(f"mean ‖∇ℓ‖ over {over} (log)")
    ax.set_ylabel("η-weighted mean cos(∇ℓ, v)")
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)
