"""Figures a user reads: a grid of histograms with a real title, a data-map legend that
covers no region label, and log-scale tick labels that never overlap."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from gradscore.reports import plots


@pytest.fixture
def figures(monkeypatch) -> list:
    """The matplotlib figures the plot functions build, drawn, instead of written."""
    caught = []

    def keep(fig, path):
        fig.tight_layout()
        fig.canvas.draw()
        caught.append(fig)
        return path
    monkeypatch.setattr(plots, "save_figure", keep)
    yield caught
    for fig in caught:
        plots.pyplot().close(fig)


def _boxes(texts) -> list:
    return [t.get_window_extent() for t in texts if t.get_visible() and t.get_text()]


def _overlap(boxes) -> bool:
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


@pytest.mark.parametrize("lo, hi", [(1e-3, 1.2e-3), (0.3, 0.36), (0.05, 0.6), (0.3, 6.0), (2.2, 9.5),
                                    (0.45, 3.1), (0.8, 30.0), (3e-3, 4e4), (1e-9, 1e12)])
def test_norm_vs_cos_tick_labels_never_overlap(figures, lo, hi):
    rng = np.random.default_rng(0)
    g = np.exp(rng.uniform(np.log(lo), np.log(hi), 400))
    plots.norm_vs_cos(g, rng.normal(size=400) * 0.2, "x.png", noisy=rng.random(400) < 0.2, title="t")
    ax = figures[0].axes[0]
    lo_x, hi_x = ax.get_xlim()
    ticks = ax.xaxis.get_major_ticks() + ax.xaxis.get_minor_ticks()
    labels = [t.label1 for t in ticks if lo_x <= t.get_loc() <= hi_x]   # the ones drawn
    boxes = _boxes(labels)
    assert len(boxes) >= 2, [t.get_text() for t in labels]
    assert not _overlap(boxes), [t.get_text() for t in labels if t.get_text()]


def test_histograms_are_a_grid_with_a_title(figures):
    rng = np.random.default_rng(0)
    scores = {f"s{k}": rng.normal(size=200) for k in range(9)}
    scores["s3"][:5] = np.nan
    plots.score_histograms(scores, rng.random(200) < 0.2, "x.png", title="score distributions")
    fig = figures[0]
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 9 and fig._suptitle.get_text() == "score distributions"
    rows = {round(ax.get_position().y0, 3) for ax in visible}
    assert len(rows) == 3                                    # 4 + 4 + 1, not 9 in a row
    assert "5 NaN/Inf left out" in visible[3].get_title()
    assert not _overlap(_boxes([ax.title for ax in visible] + [fig._suptitle]))


@pytest.mark.parametrize("scale", [1e-6, 8e-3, 9e-3, 0.15, 0.9, 3e4])
def test_histogram_tick_labels_never_overlap(figures, scale):
    """Scores of both signs in a narrow panel (the cosine variant of a PDS score spans
    ±0.008: its labels "-0.0075" to "0.0075" ran into each other)."""
    rng = np.random.default_rng(0)
    scores = {f"s{k}": scale * np.concatenate([rng.normal(-0.6, 0.18, 100), rng.normal(0.6, 0.18, 100)])
              for k in range(5)}
    plots.score_histograms(scores, rng.random(200) < 0.2, "x.png")
    for ax in figures[0].axes:
        if ax.get_visible():
            for axis in (ax.xaxis, ax.yaxis):
                lo, hi = axis.get_view_interval()
                labels = [t.label1 for t in axis.get_major_ticks() if lo <= t.get_loc() <= hi]
                assert not _overlap(_boxes(labels)), [t.get_text() for t in labels if t.get_text()]


def test_the_histogram_legend_counts_what_its_panel_draws(figures):
    rng = np.random.default_rng(0)
    noisy = np.arange(100) < 20
    s = rng.normal(size=100)
    s[:5] = s[50:60] = np.nan     # 5 noisy and 10 clean examples have no value
    plots.score_histograms({"s": s}, noisy, "x.png")
    labels = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert labels == ["clean (70)", "known noisy (15)"]


@pytest.mark.parametrize("noisy", [np.zeros(30, bool), np.ones(30, bool)])
def test_a_histogram_with_no_clean_or_no_noisy_example_warns_nothing(figures, noisy):
    """A data set whose noisy mask is all False (a clean split), or one example: numpy's
    "invalid value encountered in divide" (the density of no values) was on stderr."""
    s = np.random.default_rng(0).normal(size=30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.score_histograms({"s": s}, noisy, "x.png")
    labels = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert labels == [f"clean ({int((~noisy).sum())})", f"known noisy ({int(noisy.sum())})"]


def test_data_map_legend_covers_no_region_label(figures):
    rng = np.random.default_rng(0)
    n = 500
    noisy = rng.random(n) < 0.2
    conf = np.where(noisy, rng.uniform(0, 0.2, n), rng.uniform(0.3, 1, n))
    plots.data_map(conf, rng.uniform(0, 0.1, n), (conf > 0.5).astype(float), "x.png", noisy=noisy)
    ax = figures[0].axes[0]
    legend = ax.get_legend().get_window_extent()
    labels = [t for t in ax.texts if t.get_text() in ("easy-to-learn", "hard-to-learn", "ambiguous")]
    assert len(labels) == 3
    assert not any(legend.overlaps(box) for box in _boxes(labels))


@pytest.mark.parametrize("lo, hi", [(0.45, 13.0), (0.3, 6.0), (2.2, 9.5), (0.9, 4.0), (0.03, 3.0), (0.05, 0.6),
                                    (1e-3, 1e3), (1.2, 1.8)])
def test_norm_vs_cos_labels_every_stretch_of_the_norms(figures, lo, hi):
    """Clean norms near 1 and noisy ones near 10 (the demo's picture): the labels were 3, 6,
    9 and 12 (a linear locator on a log axis), none near the clean cluster. No stretch
    between labels (or to the ends of the values) is over half the log range."""
    rng = np.random.default_rng(0)
    g = np.exp(rng.uniform(np.log(lo), np.log(hi), 400))
    g[:2] = lo, hi
    plots.norm_vs_cos(g, rng.normal(size=400) * 0.2, "x.png", noisy=rng.random(400) < 0.2, title="t")
    ax = figures[0].axes[0]
    labelled = sorted(t.get_loc() for t in ax.xaxis.get_major_ticks()
                      if t.label1.get_visible() and t.label1.get_text() and lo <= t.get_loc() <= hi)
    stops = np.log10([lo, *labelled, hi])
    assert len(labelled) >= 2 and np.diff(stops).max() <= 0.5 * (stops[-1] - stops[0]), \
        [t.label1.get_text() for t in ax.xaxis.get_major_ticks()]


@pytest.mark.parametrize("with_mask", [True, False])
def test_norm_vs_cos_of_many_examples_is_a_hexbin_of_the_noisy_share(figures, with_mask):
    """10⁶ examples drew 10⁶ dots (a blot, 20 s) and matplotlib warned, on the user's
    terminal, that placing the legend "can be slow with large amounts of data". Above
    ``max_points`` a hexbin: the share of known-noisy examples per cell, or the count."""
    import warnings
    from matplotlib.collections import PolyCollection
    rng = np.random.default_rng(0)
    n = 3000
    noisy = rng.random(n) < 0.2
    g = np.where(noisy, 10.0, 1.0) * rng.uniform(0.5, 1.5, n)
    g[:5] = 0.0   # examples never measured: no place on a log axis
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.norm_vs_cos(g, rng.normal(size=n) * 0.2, "x.png", noisy=noisy if with_mask else None, max_points=1000)
    fig = figures[0]
    ax = fig.axes[0]
    (cells,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    values = cells.get_array()
    assert ax.get_xscale() == "log" and ax.get_legend() is None and "hexbin of 2,995 examples" in ax.get_title()
    assert "5 with no gradient left out" in ax.get_title()
    label = fig.axes[1].get_ylabel()
    if with_mask:   # the share of noisy per cell: 1 where the noisy norms are, 0 where the clean ones
        assert label == "share known noisy" and values.min() == 0 and values.max() == 1
    else:
        assert label == "examples" and values.sum() == n - 5
