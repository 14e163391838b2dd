"""Dot-score decomposition and variants on hand-made inputs."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from gradscore.scores.pds import decompose, dot_terms, variants


def test_decomposition_reproduces_dots():
    rng = np.random.default_rng(0)
    dot, sq = rng.normal(size=(3, 5)), rng.uniform(0.5, 4, size=(3, 5))
    ref = np.array([2.0, 0.5, 1.0])
    g, cos = decompose(dot, sq, ref)
    np.testing.assert_allclose(g * ref[:, None] * cos, dot, rtol=1e-12)
    g0, cos0 = decompose(dot, sq, np.array([0.0, 0.5, 1.0]))
    assert (cos0[0] == 0).all()


def test_variants_hand_made():
    # two checkpoints, three examples; ‖v‖ = (1, 2); weights η = (1, 0.5)
    sq = np.array([[1.0, 4.0, 100.0], [1.0, 4.0, 100.0]])      # ‖g‖ = 1, 2, 10
    cos = np.array([[0.5, -0.5, 0.1], [0.5, -0.5, 0.1]])
    ref, w = np.array([1.0, 2.0]), np.array([1.0, 0.5])
    dot = np.sqrt(sq) * ref[:, None] * cos
    out = variants(dot, sq, ref, w, clip_quantile=0.5)
    np.testing.assert_allclose(out["cos"], 1.5 * cos[0])
    # the median of all ‖g‖ is 2: example 3's norm 10 is clipped to 2
    np.testing.assert_allclose(out["clip"], [1 * 0.5 * (1 + 0.5 * 2), 2 * -0.5 * (1 + 0.5 * 2), 2 * 0.1 * (1 + 0.5 * 2)])
    # dots at both t: ex1 0.5·‖v‖, ex2 −1·‖v‖, ex3 1.0·‖v‖ (norm 10 × cos 0.1: the inflation)
    np.testing.assert_allclose(out["rank"], [0.5, 0.0, 1.0])
    raw = (w[:, None] * dot).sum(0)
    logg = np.log([1.0, 2.0, 10.0])
    slope, intercept = np.polyfit(logg, raw, 1)
    np.testing.assert_allclose(out["resid"], raw - (slope * logg + intercept), atol=1e-12)


def _whole_arrays(dot, sq_norm, ref_norm, weight, clip_quantile=0.9):
    """The variants and the decomposition from whole (T, N) arrays, as numpy reads them:
    the reference for the row-by-row :func:`dot_terms`."""
    dot = dot.astype(np.float64)
    g, cos = decompose(dot, sq_norm, ref_norm)
    w = weight[:, None]
    raw = (w * dot).sum(0)
    c = np.quantile(g, clip_quantile)
    n = dot.shape[1]
    ranks = dot.argsort(1, kind="stable").argsort(1, kind="stable") / max(1, n - 1)
    logg = np.log(np.maximum(g.mean(0), 1e-300))
    A = np.stack([logg, np.ones(n)], 1)
    coef, *_ = np.linalg.lstsq(A, raw, rcond=None)
    return {"raw": raw, "cos": (w * cos).sum(0), "clip": (w * np.minimum(g, c) * ref_norm[:, None] * cos).sum(0),
            "rank": (w * ranks).sum(0) / max(weight.sum(), 1e-300), "resid": raw - A @ coef,
            "mean_grad_norm": g.mean(0), "mean_cos": (w * cos).sum(0) / weight.sum(),
            "abs_error": np.abs(g * ref_norm[:, None] * cos - dot).max(0), "abs_dot": np.abs(dot).max(0)}


@pytest.mark.parametrize("seed", range(12))
def test_row_by_row_equals_whole_arrays_to_the_bit(seed, tmp_path):
    """Ties among the dots, zero norms and a zero reference norm, float32 rows, N = 1, and
    the rows read from an HDF5 file; the quantile held or streamed."""
    from gradscore.scores import quantile
    rng = np.random.default_rng(seed)
    T, n = int(rng.integers(1, 9)), int(rng.choice([1, 2, 7, 300]))
    dot = rng.normal(size=(T, n)) * np.exp(rng.normal(0, 2, (T, n)))
    dot[:, rng.random(n) < 0.2] = 0.5                      # tied dots
    sq = dot ** 2 / rng.uniform(0.01, 4, (T, n))
    sq[rng.random((T, n)) < 0.1] = 0.0                     # zero norms: cos 0
    ref = rng.uniform(0.1, 3, T)
    ref[rng.random(T) < 0.2] = 0.0
    weight = np.append(rng.uniform(0, 0.1, T - 1), 0.0)
    if seed % 2:
        dot, sq = dot.astype(np.float32), sq.astype(np.float32)
    q = float(rng.choice([0.5, 0.9, 1.0]))
    expected = _whole_arrays(dot, sq, ref, weight, q)
    with h5py.File(tmp_path / "pc.h5", "w") as f:
        f["dot"], f["sq"] = dot, sq
    for hold in (None, 1):   # the quantile's values held, or selected in passes
        with h5py.File(tmp_path / "pc.h5", "r") as f:
            for rows in ((dot, sq), (f["dot"], f["sq"])):
                with np.errstate(divide="ignore", invalid="ignore"):
                    got = dot_terms(*rows, ref, weight, clip_quantile=q) if hold is None else \
                        _with_hold(quantile, hold, lambda: dot_terms(*rows, ref, weight, clip_quantile=q))
                assert got.keys() == expected.keys()
                for k in expected:
                    np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


def _with_hold(quantile, hold, fn):
    saved, quantile.HOLD = quantile.HOLD, hold
    try:
        return fn()
    finally:
        quantile.HOLD = saved


def test_whole_dataset_scores_read_a_checkpoint_at_a_time(tmp_path, monkeypatch):
    """A run's variants of a dot score and its non-finite scan need every example at once:
    they read the (T, N) rows a checkpoint at a time, so memory grows with N, not T·N (at
    10⁷ examples and 50 checkpoints one (T, N) float64 array is 4 GB)."""
    import tracemalloc

    from gradscore.scores import quantile, registry
    monkeypatch.setattr(quantile, "HOLD", 10_000)
    T, n = 256, 20_000
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        for k in ("dot_target", "sq_grad_norm", "loss"):
            d = f.create_dataset(f"per_checkpoint/{k}", (T, n), np.float32, chunks=(1, n))
            for t in range(T):
                x = rng.standard_normal(n).astype(np.float32)
                d[t] = x * x if k == "sq_grad_norm" else x
    window = registry.Window(np.ones(T, bool), np.full(T - 1, 0.1), np.ones(T))
    tracemalloc.start()
    try:
        with h5py.File(tmp_path / "s.h5", "r") as f:
            pc = f["per_checkpoint"]
            out = registry.whole_dataset(pc, window, {"target_dot"}, {"ref_norm_target": np.ones(T)},
                                         ("cos", "clip", "rank", "resid"))
            bad = registry.nonfinite(pc)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sorted(out) == ["target_dot_clip", "target_dot_cos", "target_dot_rank", "target_dot_resid"]
    assert not bad.any() and bad.shape == (n,)
    assert peak < 0.25 * T * n * 8, peak / (T * n * 8)
