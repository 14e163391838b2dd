"""Scores from in-run records: one row per (step, example) seen in training.

Rows (M,) arrays, in the order they were recorded: ``row`` (index of the example's id),
``step``, ``lr`` (η of that step), ``loss`` ℓ_b, ``sq_norm`` ‖∇ℓ_b‖², ``share_sq_norm``
‖∇L_b‖² (L_b = s_b ℓ_b, the example's share of the step's loss), ``p_gold``, ``correct``,
``margin``, ``el2n``, and ``dot`` ⟨∇L_b, ∇J(θ_t)⟩ with ``target_norm`` ‖∇J(θ_t)‖ (NaN at
steps without a target gradient). Every score is over the presentations of an example:

- ``loss``, ``el2n``, ``grand`` (mean of √sq_norm), ``aum`` (mean margin), ``confidence``,
  ``variability`` (mean, std of p_gold), ``correctness``: means over its presentations;
- ``forgetting``: correct → incorrect transitions between consecutive presentations, on
  the minibatch predictions (Toneva et al. 2019); never correct: its number of presentations;
- ``inrun_value`` = Σ_t η_t ⟨∇L_b(θ_t), ∇J(θ_t)⟩ over b's presentations: the first-order
  decrease of the target loss J caused by b's share of the updates (In-Run Data Shapley's
  first-order term; exact to first order for plain SGD). Larger = more helpful; units:
  target loss. With a target gradient every k > 1 steps only the presentations at those
  steps are measured: their sum times presentations / measured, an estimate of the whole
  sum in its units, whatever k; NaN for an example no target step met. A step with η_t = 0
  (one a loss scaler skipped) is measured as 0. ``inrun_value_cos``: the mean cosine over
  the measured presentations.
"""
from __future__ import annotations

import numpy as np

#: the scores that need a target gradient (a recorder's ``targets=``)
TARGET_SCORES = frozenset({"inrun_value", "inrun_value_cos"})
#: the scores :func:`aggregate` can make, with the rows each needs
NEEDS = {"loss": {"loss"}, "el2n": {"el2n"}, "grand": {"sq_norm"}, "aum": {"margin"},
         "confidence": {"p_gold"}, "variability": {"p_gold"}, "correctness": {"correct"},
         "forgetting": {"correct"}, "threshold_closeness": {"p_gold"}, "inrun_value": {"dot", "lr", "target_norm"},
         "inrun_value_cos": {"dot", "share_sq_norm", "target_norm"}}


def _mean(values: np.ndarray, row: np.ndarray, n: int) -> np.ndarray:
    """(n,) float64 mean of ``values`` per row, over the finite values (NaN where none)."""
    ok = np.isfinite(values)
    total = np.bincount(row[ok], values[ok].astype(np.float64), minlength=n)
    count = np.bincount(row[ok], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def measured(rows: dict[str, np.ndarray]) -> np.ndarray:
    """(M,) bool: the records of a step with a target gradient whose dot can be read, or
    that moved nothing (η = 0: a step the loss scaler skipped, whatever its dot)."""
    target = np.isfinite(rows["target_norm"])
    with np.errstate(invalid="ignore", over="ignore"):   # 0 · inf at a skipped step
        return target & ((rows["lr"] == 0) | np.isfinite(rows["lr"] * rows["dot"]))


def over_presentations(terms: np.ndarray, ok: np.ndarray, row: np.ndarray, n: int) -> np.ndarray:
    """(n,) float64: per example, the sum of ``terms`` (M,) over its records ``ok`` (M,) bool
    times its presentations / those records: the whole sum where every presentation is
    measured, an estimate of it where some are; NaN where none is."""
    total = np.bincount(row[ok], terms[ok].astype(np.float64), minlength=n)
    count = np.bincount(row[ok], minlength=n)
    seen = np.bincount(row, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total * seen / np.maximum(count, 1), np.nan)


def forgetting(correct: np.ndarray, row: np.ndarray, step: np.ndarray, n: int) -> np.ndarray:
    """(n,) float64 forgetting events: per example, in step order, the presentations where
    it was correct and at the next one incorrect; an example never correct gets its number
    of presentations (as the checkpoint score gives T)."""
    order = np.lexsort((step, row))
    r, c = row[order], correct[order].astype(bool)
    same = r[1:] == r[:-1]
    events = np.bincount(r[1:][same & c[:-1] & ~c[1:]], minlength=n).astype(np.float64)
    seen = np.bincount(r, minlength=n)
    ever = np.bincount(r, c.astype(np.int64), minlength=n) > 0
    return np.where(ever, events, seen.astype(np.float64))


def aggregate(rows: dict[str, np.ndarray], n: int, wanted: set[str]) -> dict[str, np.ndarray]:
    """{score: (n,) float64} for the ``wanted`` scores whose rows exist (module docstring)."""
    row = rows["row"]
    have = {k for k, v in rows.items() if v is not None}
    out: dict[str, np.ndarray] = {}
    pick = {s for s in wanted if s in NEEDS and NEEDS[s] <= have}
    for name, key in (("loss", "loss"), ("el2n", "el2n"), ("aum", "margin"), ("correctness", "correct")):
        if name in pick:
            out[name] = _mean(rows[key].astype(np.float64), row, n)
    if "grand" in pick:
        out["grand"] = _mean(np.sqrt(rows["sq_norm"].astype(np.float64)), row, n)
    if pick & {"confidence", "variability", "threshold_closeness"}:
        p = rows["p_gold"].astype(np.float64)
        mean = _mean(p, row, n)
        var = np.maximum(_mean(p * p, row, n) - mean * mean, 0.0)
        out.update({k: v for k, v in (("confidence", mean), ("variability", np.sqrt(var)),
                                      ("threshold_closeness", mean * (1 - mean))) if k in pick})
    if "forgetting" in pick:
        out["forgetting"] = forgetting(rows["correct"], row, rows["step"], n)
    if "inrun_value" in pick:
        ok = measured(rows)
        with np.errstate(invalid="ignore", over="ignore"):
            term = np.where(rows["lr"] == 0, 0.0, rows["lr"].astype(np.float64) * rows["dot"].astype(np.float64))
        out["inrun_value"] = over_presentations(term, ok, row, n)
    if "inrun_value_cos" in pick:
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = rows["dot"] / (np.sqrt(rows["share_sq_norm"]) * rows["target_norm"])
        out["inrun_value_cos"] = _mean(cos.astype(np.float64), row, n)
    return out


def dot_terms(rows: dict[str, np.ndarray], n: int, clip_quantile: float = 0.9) -> dict[str, np.ndarray]:
    """``inrun_value`` read as norm × direction, per example (N,), over the records with a
    target gradient: ``mean_grad_norm`` (mean ‖∇ℓ_b‖), ``mean_cos``, and the variants of
    :func:`gradscore.scores.pds.variants` that records allow (``mean_cos`` η-weighted): ``raw`` (= inrun_value),
    ``cos`` (Σ_t η_t cos) and ``clip`` (each term's ‖∇L_b‖ clipped at the ``clip_quantile``
    of all records' share norms); each sum over the measured presentations, scaled to all
    as ``inrun_value`` is (:func:`over_presentations`)."""
    ok = measured(rows)
    moved = ok & (rows["lr"] != 0)   # the records that enter the norm, the cosine and the clip
    row, eta, dot = rows["row"][moved], rows["lr"][moved].astype(np.float64), rows["dot"][moved].astype(np.float64)
    g = np.sqrt(np.maximum(rows["share_sq_norm"][moved].astype(np.float64), 0.0))
    denom = g * rows["target_norm"][moved]
    cos = np.divide(dot, denom, out=np.zeros_like(denom), where=denom > 0)
    c = np.quantile(g, clip_quantile) if len(g) else 0.0
    per = {"raw": eta * dot, "cos": eta * cos, "clip": eta * np.minimum(g, c) * rows["target_norm"][moved] * cos}
    out = {}
    for k, v in per.items():   # 0 for the records of skipped steps, then over all presentations
        terms = np.zeros(len(ok))
        terms[moved] = v
        out[k] = over_presentations(terms, ok, rows["row"], n)
    out["mean_grad_norm"] = _mean(np.sqrt(np.maximum(rows["sq_norm"][moved].astype(np.float64), 0.0)), row, n)
    weight, total = np.bincount(row, eta, minlength=n), np.bincount(row, per["cos"], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["mean_cos"] = np.where(weight > 0, total / weight, np.nan)   # η-weighted, as for checkpoints
    return out
