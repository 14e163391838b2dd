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

from typing import Callable, Collection, Iterable, Iterator

import numpy as np

from .quantile import streamed_quantile

#: the scores that need a target gradient (a recorder's ``targets=``)
TARGET_SCORES = frozenset({"inrun_value", "inrun_value_cos"})
#: the scores :func:`aggregate` can make, with the rows each needs
NEEDS = {"loss": {"loss"}, "el2n": {"el2n"}, "grand": {"sq_norm"}, "aum": {"margin"},
         "confidence": {"p_gold"}, "variability": {"p_gold"}, "correctness": {"correct"},
         "forgetting": {"correct"}, "threshold_closeness": {"p_gold"}, "inrun_value": {"dot", "lr", "target_norm"},
         "inrun_value_cos": {"dot", "share_sq_norm", "target_norm"}}


def _add(total: np.ndarray, row: np.ndarray, values: np.ndarray) -> None:
    """``total[row] += values`` one record after another: over chunks of records in order,
    the same sums to the bit as one ``np.bincount`` over all of them."""
    np.add.at(total, row, values.astype(np.float64))


def _add_finite(total: np.ndarray, count: np.ndarray, row: np.ndarray, values: np.ndarray) -> None:
    """Add the finite ``values`` to their rows' ``total`` and count them in ``count``: the
    running sums of a per-example mean over finite values."""
    ok = np.isfinite(values)
    _add(total, row[ok], values[ok])
    count += np.bincount(row[ok], minlength=len(count))


def _ratio(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """total / count, NaN where count is 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def measured(rows: dict[str, np.ndarray]) -> np.ndarray:
    """(M,) bool: the records of a step with a target gradient whose dot can be read, or
    that moved nothing (η = 0: a step the loss scaler skipped, whatever its dot)."""
    target = np.isfinite(rows["target_norm"])
    with np.errstate(invalid="ignore", over="ignore"):   # 0 · inf at a skipped step
        return target & ((rows["lr"] == 0) | np.isfinite(rows["lr"] * rows["dot"]))


#: the per-example means that are scores as they are: (quantity averaged, score)
_MEAN_SCORES = (("loss", "loss"), ("el2n", "el2n"), ("margin", "aum"), ("correct", "correctness"),
                ("grand", "grand"), ("cos", "inrun_value_cos"))


class Aggregator:
    """The ``wanted`` scores (module docstring) over records given in step-ordered chunks:
    (n,) sums and counts per score, so memory is O(n) however many records there are, and
    the scores are those of one pass over all records to the bit, however they are chunked.
    ``have``: the record fields there are (a score needing another is left out)."""

    def __init__(self, n: int, wanted: set[str], have: set[str]) -> None:
        self.n = n
        self.pick = {s for s in wanted if s in NEEDS and NEEDS[s] <= have}
        zeros = lambda: np.zeros(n)   # noqa: E731
        self.total = {k: zeros() for k in self._means()}          # sums of finite values
        self.count = {k: np.zeros(n, np.int64) for k in self._means()}
        self.seen = np.zeros(n, np.int64)                         # presentations
        self.value, self.measured = zeros(), np.zeros(n, np.int64)   # Σ η·dot, its (measured) records
        self.events, self.ever = zeros(), np.zeros(n, bool)       # forgetting
        self.last = np.full(n, -1, np.int8)                       # correct at the last presentation; -1: none yet

    def _means(self) -> list[str]:
        """The per-example means the wanted scores read, by the quantity averaged."""
        p = self.pick
        return ([k for k, s in _MEAN_SCORES if s in p]
                + (["p_gold", "p_gold_sq"] if p & {"confidence", "variability", "threshold_closeness"} else []))

    def add(self, rows: dict[str, np.ndarray]) -> None:
        """Count the records ``rows`` ((m,) arrays with ``row``, the index of each record's
        example), the next in step order."""
        row = rows["row"]
        self.seen += np.bincount(row, minlength=self.n)
        for k in self.total:
            _add_finite(self.total[k], self.count[k], row, self._quantity(k, rows))
        if self.pick & TARGET_SCORES:
            ok = measured(rows)
            self.measured += np.bincount(row[ok], minlength=self.n)
        if "inrun_value" in self.pick:
            with np.errstate(invalid="ignore", over="ignore"):
                term = np.where(rows["lr"] == 0, 0.0, rows["lr"].astype(np.float64) * rows["dot"].astype(np.float64))
            _add(self.value, row[ok], term[ok])
        if "forgetting" in self.pick:
            self._forget(row, rows["correct"].astype(bool))

    @staticmethod
    def _quantity(k: str, rows: dict[str, np.ndarray]) -> np.ndarray:
        """(m,) float64: the records' values of quantity ``k`` (see :meth:`_means`)."""
        if k == "grand":
            return np.sqrt(rows["sq_norm"].astype(np.float64))
        if k == "cos":
            with np.errstate(invalid="ignore", divide="ignore"):
                return (rows["dot"] / (np.sqrt(rows["share_sq_norm"]) * rows["target_norm"])).astype(np.float64)
        if k == "p_gold_sq":
            p = rows["p_gold"].astype(np.float64)
            return p * p
        return rows[k].astype(np.float64)

    def _forget(self, row: np.ndarray, c: np.ndarray) -> None:
        """Forgetting events of the chunk: per example, its presentations in order, the first
        after the one before this chunk (``self.last``)."""
        order = np.argsort(row, kind="stable")   # per example, in step order
        r, c = row[order], c[order]
        first = np.ones(len(r), bool)
        first[1:] = r[1:] != r[:-1]
        before = np.empty(len(r), np.int8)
        before[1:] = c[:-1]
        before[first] = self.last[r[first]]
        self.events += np.bincount(r[(before == 1) & ~c], minlength=self.n)
        self.ever[r[c]] = True
        final = np.ones(len(r), bool)
        final[:-1] = r[1:] != r[:-1]
        self.last[r[final]] = c[final]

    def result(self) -> dict[str, np.ndarray]:
        """{score: (n,) float64} for the wanted scores whose rows exist."""
        mean = {k: _ratio(self.total[k], self.count[k]) for k in self.total}
        out = {s: mean[k] for k, s in _MEAN_SCORES if s in self.pick}
        if "p_gold" in mean:
            p = mean["p_gold"]
            var = np.maximum(mean["p_gold_sq"] - p * p, 0.0)
            out.update({k: v for k, v in (("confidence", p), ("variability", np.sqrt(var)),
                                          ("threshold_closeness", p * (1 - p))) if k in self.pick})
        if "forgetting" in self.pick:
            out["forgetting"] = np.where(self.ever, self.events, self.seen.astype(np.float64))
        if "inrun_value" in self.pick:
            out["inrun_value"] = _ratio(self.value * self.seen, self.measured)
        return {s: out[s] for s in sorted(out, key=list(NEEDS).index)}


def aggregate(rows: dict[str, np.ndarray], n: int, wanted: set[str]) -> dict[str, np.ndarray]:
    """{score: (n,) float64} for the ``wanted`` scores whose rows exist (module docstring),
    from step-ordered ``rows``; :class:`Aggregator` gives the same over chunks of them."""
    scores = Aggregator(n, wanted, {k for k, v in rows.items() if v is not None})
    scores.add(rows)
    return scores.result()


#: the record fields :func:`dot_terms` reads
DOT_TERM_FIELDS = ("row", "lr", "dot", "share_sq_norm", "sq_norm", "target_norm")
#: those the passes for the clip's quantile read: which records moved, and their share norms
QUANTILE_FIELDS = ("lr", "dot", "share_sq_norm", "target_norm")


def dot_terms(blocks: Callable[[Collection[str]], Iterable[dict[str, np.ndarray]]], n: int,
              clip_quantile: float = 0.9) -> dict[str, np.ndarray]:
    """``inrun_value`` read as norm × direction, per example (N,), over the records with a
    target gradient: ``mean_grad_norm`` (mean ‖∇ℓ_b‖), ``mean_cos``, and the variants of
    :func:`gradscore.scores.pds.variants` that records allow (``mean_cos`` η-weighted): ``raw`` (= inrun_value),
    ``cos`` (Σ_t η_t cos) and ``clip`` (each term's ‖∇L_b‖ clipped at the ``clip_quantile``
    of all records' share norms); each sum over the measured presentations times
    presentations / measured ones, as ``inrun_value`` is. ``blocks(keys)`` gives those fields
    of the records in blocks, anew at each call: one pass for the quantile
    (:data:`QUANTILE_FIELDS`; three passes where more than :data:`quantile.HOLD` records
    moved), one for the sums (:data:`DOT_TERM_FIELDS`); memory is O(N) and a block, not
    O(records)."""
    def moved_of(rows: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:   # the measured, those that moved
        ok = measured(rows)
        return ok, ok & (rows["lr"] != 0)   # the records that enter the norm, the cosine and the clip

    def share_norm(rows: dict[str, np.ndarray], moved: np.ndarray) -> np.ndarray:
        return np.sqrt(np.maximum(rows["share_sq_norm"][moved].astype(np.float64), 0.0))

    def norms() -> Iterator[np.ndarray]:
        return (share_norm(rows, moved_of(rows)[1]) for rows in blocks(QUANTILE_FIELDS))
    c = streamed_quantile(norms, clip_quantile, empty=0.0)
    sums = {k: np.zeros(n) for k in ("raw", "cos", "clip", "grad_norm", "weight", "weighted_cos")}
    counts = {k: np.zeros(n, np.int64) for k in ("measured", "seen", "grad_norm")}
    for rows in blocks(DOT_TERM_FIELDS):
        ok, moved = moved_of(rows)
        row, r = rows["row"], rows["row"][moved]
        eta, dot, tn = (rows[k][moved].astype(np.float64) for k in ("lr", "dot", "target_norm"))
        g = share_norm(rows, moved)
        denom = g * tn
        cos = np.divide(dot, denom, out=np.zeros_like(denom), where=denom > 0)
        per = {"raw": eta * dot, "cos": eta * cos, "clip": eta * np.minimum(g, c) * tn * cos}
        for k, v in per.items():   # 0 for the records of skipped steps, then over all presentations
            terms = np.zeros(len(ok))
            terms[moved] = v
            _add(sums[k], row[ok], terms[ok])
        counts["measured"] += np.bincount(row[ok], minlength=n)
        counts["seen"] += np.bincount(row, minlength=n)
        _add_finite(sums["grad_norm"], counts["grad_norm"], r,
                    np.sqrt(np.maximum(rows["sq_norm"][moved].astype(np.float64), 0.0)))
        _add(sums["weight"], r, eta)
        _add(sums["weighted_cos"], r, per["cos"])
    out = {k: _ratio(sums[k] * counts["seen"], counts["measured"]) for k in ("raw", "cos", "clip")}
    out["mean_grad_norm"] = _ratio(sums["grad_norm"], counts["grad_norm"])
    with np.errstate(invalid="ignore", divide="ignore"):   # η-weighted, as for checkpoints
        out["mean_cos"] = np.where(sums["weight"] > 0, sums["weighted_cos"] / sums["weight"], np.nan)
    return out
