"""Choose examples from a scores file: by a score, by data-map region, or JTT's error set.

- ``by``: keep the fraction ``keep`` with the highest (or lowest) values of a score, after
  dropping the ``exclude_top`` fraction at the top (e.g. prune by EL2N but leave out the
  most extreme, likely mislabeled, examples as Data Diet suggests);
- ``regions``: the cartography regions, each a fraction of the data: easy-to-learn
  (highest confidence), ambiguous (highest variability), hard-to-learn (lowest
  confidence), in the shape of TrainingDynamics' ``three_regions_data_indices.json``;
- ``jtt``: the error set of one checkpoint (JTT uses an early model) and per-example
  weights, ``upweight`` for errors and 1 otherwise, for the second training run.
Indices are row positions in the scores file; ids are the data's ``ids``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..config import as_path, checked_fraction, checked_number, checked_whole, whole
from ..io.atomic import atomic_json, atomic_path
from ..exceptions import ConfigError, DataError, GradscoreError
from ..io.datasets import scored_labels
from ..io.outputs import MARK, claim
from ..io.store import checkpoint_rows, load_scores
from ..scores.registry import missing_scores_fix


def _weights_path(out: Path) -> Path:
    """Where JTT's weights go beside the selection ``out``."""
    return out.with_name(out.stem + "_weights.npz")

REGIONS = ("easy", "ambiguous", "hard")


def _score(res: dict[str, Any], name: str) -> np.ndarray:
    if name not in res["scores"]:
        raise GradscoreError(f"score '{name}' is not in the scores file (it has: {', '.join(sorted(res['scores']))}); "
                             f"{missing_scores_fix(res['config'], [name], res['scores'])}")
    return res["scores"][name]


def _finite(res: dict[str, Any], names: tuple[str, ...], allow_nonfinite: bool) -> np.ndarray:
    """(N,) bool: the examples whose scores ``names`` are all finite. Others are refused in
    one line naming them, or with ``allow_nonfinite`` left out of the selection."""
    ok = np.logical_and.reduce([np.isfinite(_score(res, name)) for name in names])
    if not ok.all() and not allow_nonfinite:
        bad = _ids(res, np.flatnonzero(~ok))
        raise DataError(f"{len(bad)} example(s) (ids {', '.join(map(str, bad[:5]))}{', …' if len(bad) > 5 else ''}) "
                        f"have a NaN/Inf {' or '.join(names)}; pass --allow-nonfinite to leave them out of the "
                        f"selection (they are listed in its 'nonfinite_ids')")
    return ok


def by_score(values: np.ndarray, *, keep: float, highest: bool = True, exclude_top: float = 0.0,
             classes: np.ndarray | None = None, sample: str | None = None, temperature: float = 1.0,
             seed: int = 0) -> np.ndarray:
    """Indices (by rank) of the ``keep`` fraction of examples by ``values``, after dropping
    the ``exclude_top`` fraction at the top of the ranking (the highest values; with
    ``highest=False``, the lowest): ranks round(exclude_top·n) up to (not including)
    round((exclude_top + keep)·n), Python's round (half to even).

    classes: (N,) labels: the fractions are taken within each class (so a class whose
    scores run high cannot take every slot), the classes' picks concatenated.
    sample="gumbel": a weighted sample without replacement instead of the hard top-k,
    example n drawn with weight exp(±value_n / temperature) (the Gumbel-top-k trick,
    seeded); temperature → 0 gives the top-k back.
    """
    checked_fraction("keep", keep)
    checked_fraction("exclude_top", exclude_top, allow_zero=True)
    if keep + exclude_top > 1 + 1e-9:   # else the selection is shorter than asked
        raise ConfigError(f"invalid value for 'keep': {keep} after exclude_top {exclude_top} asks for more examples "
                          f"than are left; keep at most {1 - exclude_top:g}")
    if sample not in (None, "gumbel"):
        raise ConfigError(f"invalid value for 'sample': '{sample}'; choose gumbel (or none for the top-k)")
    if sample:
        temperature = _positive("temperature", temperature)
        seed = checked_whole("seed", seed, 0)
    if classes is not None:
        parts = [members[by_score(values[members], keep=keep, highest=highest, exclude_top=exclude_top,
                                  sample=sample, temperature=temperature, seed=seed + int(c))]
                 for c in np.unique(classes) for members in [np.flatnonzero(classes == c)]]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n = len(values)
    signed = values if highest else -values
    if sample == "gumbel":
        signed = signed / temperature + np.random.default_rng(seed).gumbel(size=n)
    order = np.argsort(-signed, kind="stable")
    start = int(round(exclude_top * n))   # the slice's ends rounded, so kept and excluded partition the ranking
    return order[start:int(round((exclude_top + keep) * n))]


def regions(confidence: np.ndarray, variability: np.ndarray, fraction: float = 0.33) -> dict[str, np.ndarray]:
    """{region: indices} of the three data-map regions, each ``fraction`` of the data."""
    checked_fraction("fraction", fraction)
    k = int(round(fraction * len(confidence)))
    return {"easy": np.argsort(-confidence, kind="stable")[:k],
            "ambiguous": np.argsort(-variability, kind="stable")[:k],
            "hard": np.argsort(confidence, kind="stable")[:k]}


def _positive(name: str, value: float) -> float:
    """``value`` as a float where it is a finite number > 0, else one ConfigError naming ``name``."""
    return checked_number(name, value, lambda v: v > 0, "a finite number > 0")


def jtt_weights(correct: np.ndarray, upweight: float) -> np.ndarray:
    """(N,) float64 weights: ``upweight`` for the error set (correct == 0), 1 otherwise."""
    return np.where(correct.astype(bool), 1.0, _positive("upweight", upweight))


def _ids(res: dict[str, Any], idx: np.ndarray) -> list:
    return res["ids"][idx].tolist()


def select(scores: str | Path, *, by: str | None = None, keep: float = 0.5, highest: bool = True,
           exclude_top: float = 0.0, region: str | None = None, fraction: float = 0.33,
           jtt: bool = False, upweight: float = 20.0, checkpoint: int = -1,
           out: str | Path | None = None, overwrite: bool = False,
           allow_nonfinite: bool = False, per_class: bool = False, data: str | Path | None = None,
           sample: str | None = None, temperature: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Select examples from a scores file; write the result as JSON to ``out`` if given
    (an existing ``out`` only with ``overwrite``, and only if it is a gradscore report).

    Exactly one of ``by`` (a score name), ``region`` (easy, ambiguous, hard or all) or
    ``jtt`` is used. With ``jtt`` the weights are also written next to ``out`` as
    ``<out stem>_weights.npz`` (arrays ``ids``, ``weights``, ``written_by``). Examples with a NaN/Inf
    score are refused (:class:`DataError`), or with ``allow_nonfinite`` left out, the
    fractions then taken of the rest, and listed in ``nonfinite_ids``. ``by`` only:
    ``per_class`` takes the fraction within each class of ``data``'s labels; ``sample``,
    ``temperature``, ``seed``: see :func:`by_score`. The result's ``warnings`` are the scores
    file's (what its run warned of about the scores).
    """
    if per_class and data is None:
        raise ConfigError("--per-class needs --data, the scored data whose labels give the classes")
    modes = [by is not None, region is not None, jtt]
    if sum(modes) != 1:
        raise ConfigError("give exactly one of --by SCORE, --region REGION or --jtt")
    if out is not None:
        inputs = {"the scores file": [scores], "the --data file": [data]}
        claim(out, "json", inputs=inputs, overwrite=overwrite)
        if jtt:
            claim(_weights_path(Path(out)), "weights", inputs=inputs, overwrite=overwrite)
    res = load_scores(as_path(scores, "scores"), per_checkpoint=False)
    if jtt:   # JTT's error set: one checkpoint's row of `correct`
        res["per_checkpoint"] = checkpoint_rows(scores, ("correct",))
        if "correct" not in res["per_checkpoint"]:
            what = ("is an in-run recording (gs.InRun), whose records are training steps, not checkpoints"
                    if res["config"].get("inrun") else "has no per-checkpoint `correct` rows")
            raise ConfigError(f"{scores}: {what}; JTT's error set is a checkpoint's mistakes: score the "
                              f"checkpoints with `gradscore run`, or select the examples predicted right least "
                              f"often with --by correctness --lowest")
    result: dict[str, Any]
    weights = None
    if by is not None:
        finite = np.flatnonzero(_finite(res, (by,), allow_nonfinite))
        classes = scored_labels(data, res["ids"], scores)[0][finite] if per_class else None
        idx = finite[by_score(_score(res, by)[finite], keep=keep, highest=highest, exclude_top=exclude_top,
                              classes=classes, sample=sample, temperature=temperature, seed=seed)]
        # the numbers by_score checked, as JSON's: a user's numpy float32 or int64 does not save
        result = {"by": by, "highest": highest, "keep": float(keep), "exclude_top": float(exclude_top),
                  "per_class": per_class, "sample": sample, "temperature": float(temperature) if sample else None,
                  "seed": int(seed) if sample else None,
                  "n_selected": int(len(idx)), "indices": idx.tolist(), "ids": _ids(res, idx)}
    elif region is not None:
        if region not in REGIONS + ("all",):
            raise ConfigError(f"invalid value for 'region': '{region}' is not one of "
                              f"{', '.join(REGIONS + ('all',))}")
        finite = np.flatnonzero(_finite(res, ("confidence", "variability"), allow_nonfinite))
        found = {r: finite[i] for r, i in regions(_score(res, "confidence")[finite],
                                                  _score(res, "variability")[finite], fraction).items()}
        names = REGIONS if region == "all" else (region,)
        result = {f"{r}_region": found[r].tolist() for r in names}
        result.update({f"{r}_ids": _ids(res, found[r]) for r in names})
    else:
        correct = res["per_checkpoint"]["correct"]
        if whole(checkpoint) is None:
            raise ConfigError(f"invalid value for 'checkpoint': {checkpoint!r}; give a whole number (the position "
                              f"of a checkpoint of the scores file; -1: the last)")
        if not -correct.shape[0] <= checkpoint < correct.shape[0]:
            raise ConfigError(f"invalid value for 'checkpoint': {checkpoint} is not one of the "
                              f"{correct.shape[0]} checkpoints")
        weights = jtt_weights(correct[checkpoint], upweight)
        err = np.flatnonzero(~correct[checkpoint].astype(bool))   # upweight 1 leaves them at weight 1
        result = {"jtt_checkpoint": int(checkpoint) % correct.shape[0], "upweight": float(upweight),
                  "n_errors": int(len(err)), "error_set": err.tolist(), "error_ids": _ids(res, err)}
    if by is not None or region is not None:
        result["nonfinite_ids"] = _ids(res, np.setdiff1d(np.arange(len(res["ids"])), finite))
    result["warnings"] = res["warnings"]   # what the scores file warns of: a selection made from it carries it
    if out is not None:
        out = Path(out)
        atomic_json(out, {**result, "gradscore_version": __version__})
        if weights is not None:
            wpath = _weights_path(out)
            with atomic_path(wpath) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, ids=res["ids"], weights=weights, written_by=np.array(MARK))   # outputs.claim reads it
            result["weights_file"] = str(wpath)
    return result
