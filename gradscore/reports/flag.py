"""How many examples are mislabeled, and which: ``gradscore flag``.

The chosen score is oriented so that higher = more suspicious (``aum`` and ``confidence``
are negated), then a two-component Gaussian mixture is fitted to it (scikit-learn, fixed
seed). If two components explain the scores better than one (lower BIC), the examples
more likely in the upper component are flagged; their number is the estimated count.
Otherwise nothing is flagged and the report says there is no second population. The
count is said to be rough where the two components overlap, or where a three-component
mixture counts more than a quarter more or fewer: a population that is not Gaussian (a
broad, flat one) is fitted by two components side by side, which a third one moves. It is
also rough where the model has not fit its data (at the end of what the scores average
over, it predicts under :data:`FIT_CLEAN` of the examples the count calls clean as
labelled: clean examples it has not learned score as mislabeled ones do), and for a score
whose counts ``bench.flag_counts`` has not checked against the truth (:data:`CALIBRATED`).
With the labels (``data``), the estimated noise rate per class; with a known-noisy mask
(in the scores file or the data), the flagged set's precision and recall against it.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..config import as_path
from ..exceptions import ConfigError, DataError, GradscoreError
from ..io.atomic import atomic_json
from ..io.datasets import scored_labels
from ..io.outputs import claim
from ..io.checkpoints import checkpoint_files, read_info
from ..io.store import checkpoint_rows, inrun_blocks, load_scores
from ..losses import builtin_output
from ..scores.registry import how_to_add, missing_scores_fix

#: +1: higher = more suspicious as stored; -1: lower is (the sign flag applies)
ORIENTATION = {"mislabel": 1, "aum": -1, "el2n": 1, "loss": 1, "grand": 1, "forgetting": 1, "confidence": -1,
               "correctness": -1, "target_cos": -1}
#: the score flagged when none is named: the first of these the file has
DEFAULT_SCORES = ("mislabel", "aum", "el2n", "loss")


def default_score(scores: dict[str, np.ndarray]) -> str | None:
    """The score flagged when none is named: the first of :data:`DEFAULT_SCORES` present."""
    return next((s for s in DEFAULT_SCORES if s in scores), None)


def suspicion(scores: dict[str, np.ndarray], name: str) -> np.ndarray:
    """(N,) score ``name`` oriented so that higher = more suspicious."""
    return scores[name] * ORIENTATION[name]


#: Ashman's D of two components at which they separate cleanly; below it the count is rough
CLEAR_SEPARATION = 2.0
#: the share of the count by which a three-component fit may move it before the count is rough
COUNT_SHIFT = 0.25
#: the share of the examples a count calls clean that the model must predict as labelled at
#: the end of the scores' window; below it the model has not fit its data and the count is rough
FIT_CLEAN = 0.95
#: the scores whose counts ``bench.flag_counts`` checks against the truth; a count by another is rough
CALIBRATED = ("mislabel", "aum")
#: the mixtures are fitted on a fixed random sample of at most this many values (their
#: parameters are then known to a fraction of a percent), and every value is assigned
FIT_SAMPLE = 1 << 17
#: values assigned to the components at a time
ASSIGN_BLOCK = 1 << 20
#: what :func:`estimate` found, where it gives no count, as a user reads it
NO_COUNT = {
    "one population": "one component fits the scores as well as two (BIC)",
    "suspicious majority": "the suspicious of two components would hold most examples",
}


def estimate(suspicion: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Two-component mixture on (N,) finite ``suspicion`` values (higher = more suspicious):
    ``flagged`` (N,) bool, ``count`` (None where no suspicious minority separates: then
    nothing is flagged, which says nothing about how many labels are wrong), ``finding``
    ("two populations" or a key of :data:`NO_COUNT`), ``separation`` (Ashman's D of the two
    components, √2·|μ₁ − μ₂| / √(σ₁² + σ₂²)), ``count_three`` (the examples most likely in
    the components of a three-component fit whose means are nearer the upper of the two
    than the lower; None without a count), ``rough`` (the count can be off by many: a
    separation under :data:`CLEAR_SEPARATION`, or a ``count_three`` over :data:`COUNT_SHIFT`
    of the count away from it), ``threshold`` (the lowest flagged value, or None) and the
    BIC of one and two components (over the fitted sample: :data:`FIT_SAMPLE`; NaN for a
    constant score, which is one population without a fit).

    The mixtures fit the standardized values (median 0, standard deviation 1): the result is
    the same in any unit of the score (scikit-learn's covariance floor, ``reg_covar``, is set
    for unit-scale data), and the BICs are given in the score's own unit."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture
    x = suspicion.astype(np.float64)
    if len(x) > FIT_SAMPLE:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), FIT_SAMPLE, replace=False))]
    center, spread = float(np.median(x)), float(np.ptp(x))
    if not spread > 0:   # a constant: one population, and no mixture to fit
        return {"bic_one": np.nan, "bic_two": np.nan, "separation": np.nan, "flagged": np.zeros(len(suspicion), bool),
                "finding": "one population", "count": None, "count_three": None, "rough": False, "threshold": None}
    scale = float(np.std((x - center) / spread)) * spread   # (the ptp first: no overflow of a huge score's square)

    def standard(v: np.ndarray) -> np.ndarray:
        return ((v.astype(np.float64) - center) / scale).reshape(-1, 1)

    z = standard(x)

    def fitted(k: int) -> GaussianMixture:   # a score of fewer distinct values than k: a fit all the same
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return GaussianMixture(k, random_state=seed, n_init=3).fit(z)
    fits = [fitted(k) for k in (1, 2)]
    bic = [float(m.bic(z)) + 2 * len(z) * np.log(scale) for m in fits]   # in the score's unit

    def assigned(fit: GaussianMixture) -> np.ndarray:   # (N,) each value's most likely component
        return np.concatenate([fit.predict(standard(suspicion[a:a + ASSIGN_BLOCK]))
                               for a in range(0, len(suspicion), ASSIGN_BLOCK)])
    out: dict[str, Any] = {"bic_one": bic[0], "bic_two": bic[1]}
    two = fits[1]
    mu, var = two.means_[:, 0], two.covariances_.reshape(-1)
    out["separation"] = float(np.sqrt(2) * abs(mu[0] - mu[1]) / np.sqrt(var.sum()))
    upper = int(np.argmax(mu))
    flagged = assigned(two) == upper   # of two components, the more likely
    if bic[1] >= bic[0]:
        finding = "one population"
    elif flagged.sum() * 2 > len(flagged):   # the "suspicious" population cannot be the majority
        finding = "suspicious majority"
    else:
        finding = "two populations"
    count, three = None, None
    if finding == "two populations":
        count = int(flagged.sum())
        fit3 = fitted(3)
        means = fit3.means_[:, 0]
        nearer_upper = np.abs(means - mu[upper]) < np.abs(means - mu[1 - upper])
        three = int(nearer_upper[assigned(fit3)].sum())
    else:
        flagged = np.zeros(len(flagged), dtype=bool)
    out.update(flagged=flagged, finding=finding, count=count, count_three=three,
               rough=count is not None and (out["separation"] < CLEAR_SEPARATION
                                            or abs(three - count) > COUNT_SHIFT * count),
               threshold=float(suspicion[flagged].min()) if flagged.any() else None)
    return out


def last_correct(path: str | Path, res: dict[str, Any]) -> np.ndarray | None:
    """(N,) float64 of the scores file ``path`` (``res``: its :func:`load_scores`): 1 where the
    model predicted the example's given label at the end of what its scores average over
    (the last selected checkpoint; in a recording of training steps, the last step the
    example was in), 0 where it did not, NaN for an example never seen; None where the file
    holds no predictions."""
    if res["config"].get("inrun"):
        out = np.full(len(res["ids"]), np.nan)
        for block in inrun_blocks(path)(("row", "correct")):   # in step order: the later record wins
            out[block["row"]] = block["correct"]
        return out
    rows = checkpoint_rows(path, ("correct",)).get("correct")
    if rows is None:
        return None
    selected = np.flatnonzero(res["checkpoints"].get("selected", np.ones(len(rows), bool)))
    return rows[int(selected[-1])].astype(np.float64) if len(selected) else None


def flag_by(res: dict[str, Any]) -> str | None:
    """How to count by a score of :data:`CALIBRATED` in the scores file of ``res``
    (:func:`load_scores`): the option, or the command that adds one; None where the loss
    has no classes to take a margin over (language modelling, regression)."""
    have = [s for s in CALIBRATED if s in res["scores"]]
    if have:
        return f"--score {have[0]}"
    config, loss = res["config"], None
    if config.get("inrun"):
        loss = config.get("loss")
    elif config.get("checkpoints"):   # the run's checkpoints, where they still are
        with contextlib.suppress(GradscoreError, OSError):   # moved, damaged: the plain hint
            files = checkpoint_files(config["checkpoints"])
            loss = read_info(next(iter(files.values()))).loss if files else None
    return None if builtin_output(str(loss)) in ("tokens", "regression") else how_to_add(config, list(CALIBRATED))


def count_fields(est: dict[str, Any], n: int, score: str, correct: np.ndarray | None = None,
                 res: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a report holds of :func:`estimate`'s count of ``score``, over ``n`` examples;
    :func:`count_line` reads it. ``correct``: :func:`last_correct` of the estimated examples
    (as ``est["flagged"]``), or None: then the fit is not checked (``fit_clean`` None);
    ``res``: the scores file's :func:`load_scores`, for ``flag_by`` (:func:`flag_by`) where
    ``score`` is not calibrated."""
    fit = None
    if correct is not None and est["count"] is not None:
        seen = ~est["flagged"] & np.isfinite(correct)
        fit = float(correct[seen].mean()) if seen.any() else None
    return {"estimated_count": est["count"], "finding": est["finding"], "separation": est["separation"],
            "count_three": est["count_three"], "fit_clean": fit, "calibrated": score in CALIBRATED,
            "flag_by": None if score in CALIBRATED or res is None else flag_by(res),
            "rough": est["count"] is not None and (est["rough"] or score not in CALIBRATED
                                                   or (fit is not None and fit < FIT_CLEAN)),
            "estimated_rate": None if est["count"] is None else est["count"] / n}


def counted(path: str | Path, res: dict[str, Any], name: str, values: np.ndarray) -> tuple[dict, dict]:
    """:func:`estimate` on the finite of ``values`` (N,) (score ``name`` of the scores file
    ``path``, ``res`` its :func:`load_scores`, oriented by :func:`suspicion`) and what a
    report holds of it (:func:`count_fields`, with the model's fit)."""
    finite = np.isfinite(values)
    est = estimate(values[finite])
    correct = last_correct(path, res)
    return est, count_fields(est, len(values), name, None if correct is None else correct[finite], res)


def count_line(report: dict[str, Any]) -> str:
    """What a user reads of a count (``report``: :func:`flag`'s, or ``diagnose``'s "flag"):
    the count and rate, said to be rough where the populations overlap or a third component
    moves the count (``rough``), or why there is none."""
    score, count = report["score"], report["estimated_count"]
    if count is None:
        return (f"{score}: no count: {NO_COUNT[report['finding']]}, so nothing is flagged. That does not mean "
                f"the labels are clean: where clean and mislabeled examples score alike, their number cannot be "
                f"read from the scores; rank by {score} instead (gradscore select)")
    line = f"{score}: estimated {count} mislabeled of {report['n']} ({report['estimated_rate']:.1%})"
    fit = report.get("fit_clean")
    if fit is not None and fit < FIT_CLEAN:
        line += (f", a rough count: the model predicts {fit:.1%} of the examples it calls clean as labelled "
                 f"(under {FIT_CLEAN:.0%}), so the examples it has not learned count as mislabeled; train longer, "
                 f"or rank by {score} instead (gradscore select)")
    elif not report.get("calibrated", True):
        how = report.get("flag_by")
        line += (f", a rough count: counts by {score} are not checked against the truth (by {' or '.join(CALIBRATED)} "
                 f"they are: bench.flag_counts), so it can be off by many; "
                 + (f"flag by {' or '.join(CALIBRATED)} ({how}), or " if how else "")
                 + f"rank by {score} instead (gradscore select)")
    elif report["separation"] < CLEAR_SEPARATION:
        line += (f", a rough count: the two populations overlap (separation {report['separation']:.2f}, "
                 f"under {CLEAR_SEPARATION:g}), so it can be off by many; rank by {score} instead (gradscore select)")
    elif report["rough"]:
        line += (f", a rough count: a three-component mixture counts {report['count_three']}, so the number "
                 f"depends on the shape of the mixture and can be off by many; rank by {score} instead "
                 f"(gradscore select)")
    return line


def flag(scores: str | Path, *, score: str | None = None, data: str | Path | None = None,
         out: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Estimate how many examples of ``scores`` are mislabeled and which (see the module
    docstring); write the report as JSON to ``out`` if given. Returns the report:
    ``estimated_count`` and ``estimated_rate`` (None, with ``finding`` saying why, where no
    suspicious minority separates), ``rough`` (the count can be off by many: see the module
    docstring), ``separation``, ``count_three``, ``fit_clean`` (the share of the examples
    not flagged that the model predicts as labelled at the end; None where the file holds
    no predictions), ``calibrated`` and ``flag_by`` (how to count by a calibrated score),
    ``flagged`` (index, id, score, most suspicious first), ``per_class`` (with ``data``),
    ``against_known_noisy`` (with a mask), ``warnings`` (the scores file's)."""
    if out is not None:
        claim(out, "json", inputs={"the scores file": [scores], "the --data file": [data]}, overwrite=overwrite)
    res = load_scores(as_path(scores, "scores"), per_checkpoint=False)
    name = score or default_score(res["scores"])
    if name is None or name not in res["scores"]:
        raise ConfigError(f"invalid value for 'score': {scores} has no {name or ' or '.join(DEFAULT_SCORES)} score "
                          f"(it has: {', '.join(sorted(res['scores']))}); "
                          f"{missing_scores_fix(res['config'], [name or 'aum'], res['scores'])}")
    if name not in ORIENTATION:
        raise ConfigError(f"invalid value for 'score': '{name}' is not a mislabel score; choose from "
                          f"{', '.join(s for s in ORIENTATION if s in res['scores'])}")
    values = suspicion(res["scores"], name)
    finite = np.isfinite(values)
    if finite.sum() < 10:
        raise DataError(f"{scores}: {int(finite.sum())} finite '{name}' values; flagging needs at least 10")
    est, fields = counted(scores, res, name, values)
    flagged = np.zeros(len(values), dtype=bool)
    flagged[np.flatnonzero(finite)[est["flagged"]]] = True
    order = np.flatnonzero(flagged)[np.argsort(-values[flagged], kind="stable")]
    ids = res["ids"]
    report: dict[str, Any] = {
        "scores_file": str(scores), "score": name, "orientation": "higher = more suspicious" if ORIENTATION[name] > 0
        else "lower = more suspicious", "method": "two-component Gaussian mixture on the score (BIC against one; "
        "a three-component one checks the count)",
        "n": int(len(values)), **fields,
        "bic_one": est["bic_one"], "bic_two": est["bic_two"],
        "threshold": None if est["threshold"] is None else est["threshold"] * ORIENTATION[name],
        "flagged": [{"index": int(i), "id": ids[i].item() if hasattr(ids[i], "item") else ids[i],
                     "score": float(res["scores"][name][i])} for i in order],
        "warnings": res["warnings"]}   # what the scores file warns of
    noisy = res["noisy"]
    if data is not None:
        labels, data_noisy = scored_labels(data, res["ids"], scores)
        report["per_class"] = {int(c): {"n": int((labels == c).sum()), "flagged": int(flagged[labels == c].sum()),
                                        "estimated_rate": None if est["count"] is None
                                        else float(flagged[labels == c].mean())}
                               for c in np.unique(labels)}
        noisy = data_noisy if noisy is None else noisy
    if noisy is not None:
        hit = int((flagged & noisy).sum())
        report["against_known_noisy"] = {"true_count": int(noisy.sum()), "flagged": int(flagged.sum()), "correct": hit,
                                         "precision": hit / max(1, int(flagged.sum())),
                                         "recall": hit / max(1, int(noisy.sum()))}
    if out is not None:
        atomic_json(Path(out), {**report, "gradscore_version": __version__}, indent=1)
    return report
