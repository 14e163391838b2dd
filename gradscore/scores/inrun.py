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
- ``inrun_value`` = Σ_t η_t ⟨∇L_b(θ_t), ∇J(θ_t)⟩ over the steps with a target gradient:
  the first-order decrease of the target loss J caused by b's share of the updates
  (In-Run Data Shapley's first-order term; exact to first order for plain SGD).
  Larger = more helpful; units: target loss. ``inrun_value_cos``: the mean cosine.
"""
from __future__ import annotations

import numpy as np

#: the scores :func:`aggregate` can make, with the rows each needs
NEEDS = {"loss": {"loss"}, "el2n": {"el2n"}, "grand": {"sq_norm"}, "aum": {"margin"},
         "confidence": {"p_gold"}, "variability": {"p_gold"}, "correctness": {"correct"},
         "forgetting": {"correct"}, "threshold_closeness": {"p_gold"}, "inrun_value": {"dot", "lr"},
         "inrun_value_cos": {"dot", "share_sq_norm", "target_norm"}}


def _mean(values: np.ndarray, row: np.ndarray, n: int) -> np.ndarray:
    """(n,) float64 mean of ``values`` per row, over the finite values (NaN where none)."""
    ok = np.isfinite(values)
    total = np.bincount(row[ok], values[ok].astype(np.float64), minlength=n)
    count = np.bincount(row[ok], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


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
        term = rows["lr"].astype(np.float64) * rows["dot"].astype(np.float64)
        ok = np.isfinite(term)
        out["inrun_value"] = np.bincount(row[ok], term[ok], minlength=n)
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
    of all records' share norms)."""
    ok = np.isfinite(rows["dot"]) & np.isfinite(rows["target_norm"])
    row, eta, dot = rows["row"][ok], rows["lr"][ok].astype(np.float64), rows["dot"][ok].astype(np.float64)
    g = np.sqrt(np.maximum(rows["share_sq_norm"][ok].astype(np.float64), 0.0))
    denom = g * rows["target_norm"][ok]
    cos = np.divide(dot, denom, out=np.zeros_like(denom), where=denom > 0)
    c = np.quantile(g, clip_quantile) if len(g) else 0.0
    per = {"raw": eta * dot, "cos": eta * cos, "clip": eta * np.minimum(g, c) * rows["target_norm"][ok] * cos}
    out = {k: np.bincount(row, v, minlength=n) for k, v in per.items()}
    out["mean_grad_norm"] = _mean(np.sqrt(np.maximum(rows["sq_norm"][ok].astype(np.float64), 0.0)), row, n)
    weight = np.bincount(row, eta, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["mean_cos"] = np.where(weight > 0, out["cos"] / weight, np.nan)   # η-weighted, as for checkpoints
    return out
