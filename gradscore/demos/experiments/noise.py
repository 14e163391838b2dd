"""Finding mislabeled examples under three kinds of noise, against cleanlab and a kNN
baseline (``gradscore experiment noise``).

Noise on the digits training split (exact counts, fixed seed):

- ``symmetric`` 20%: a label changed to a uniformly drawn wrong class;
- ``pair`` 30%: c → c + 1 (mod 10), the confusion a systematic annotator makes;
- ``instance`` 20%: the examples with the lowest margin under out-of-fold probabilities
  of a model trained on the clean labels (5-fold logistic regression on the pixels),
  each flipped to its most likely wrong class: the confusable ones.

One training run of the digits CNN with a checkpoint per epoch gives every gradscore
score (oriented so that higher = more suspicious); early-window EL2N and AUM (the first
quarter of the epochs) come from the same rows through ``gs.reaggregate``, without
recomputing. Peers: cleanlab (``pip install cleanlab``; skipped with a line when absent)
on 5-fold cross-validated probabilities of the same network, trained for the same epochs
(``cleanlab``) and early-stopped at a quarter of them (``cleanlab_early``), ranked by its
label-quality score and counted by ``find_label_issues``; and ``knn``, the share of an
example's 10 nearest neighbours (pixels) that disagree with its label.

Reported per noise kind: AUROC, AP and precision@k (k = the true count) of each method and
its compute time; the count ``gs.flag`` estimates from ``mislabel`` and the one cleanlab
finds, with precision and recall; and the test accuracy after removing each flagged set
and retraining, against training on everything.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .common import (Mode, Setup, accuracy, claim_results, digits_setup, fit, markdown_table, reference_run,
                     write_results)

KINDS = {"symmetric": 0.2, "pair": 0.3, "instance": 0.2}
#: training epochs per mode: full trains long enough for the network to memorize the wrong labels
EPOCHS = {"tiny": 2, "fast": 8, "full": 40}
#: gradscore's scores in the run, and the sign that makes higher = more suspicious
SCORES = {"mislabel": 1, "aum": -1, "el2n": 1, "loss": 1, "grand": 1, "forgetting": 1, "confidence": -1}


def make_noise(kind: str, x: np.ndarray, y: np.ndarray, rate: float, seed: int = 0,
               n_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped mask) with exactly round(rate·N) labels changed, each to a
    wrong class, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    n_flip = int(round(rate * len(y)))
    y_noisy = y.copy()
    if kind == "symmetric":
        flip = rng.choice(len(y), size=n_flip, replace=False)
        y_noisy[flip] = (y[flip] + rng.integers(1, n_classes, size=n_flip)) % n_classes
    elif kind == "pair":
        flip = rng.choice(len(y), size=n_flip, replace=False)
        y_noisy[flip] = (y[flip] + 1) % n_classes
    elif kind == "instance":
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import cross_val_predict
        probs = cross_val_predict(LogisticRegression(max_iter=2000), x.reshape(len(x), -1), y, cv=5,
                                  method="predict_proba")
        given = probs[np.arange(len(y)), y]
        others = probs.copy()
        others[np.arange(len(y)), y] = -np.inf
        flip = np.argsort(given - others.max(1), kind="stable")[:n_flip]
        y_noisy[flip] = others[flip].argmax(1)
    else:
        raise ValueError(f"unknown noise kind '{kind}'; choose from {', '.join(KINDS)}")
    noisy = np.zeros(len(y), dtype=bool)
    noisy[flip] = True
    return y_noisy, noisy


def _metrics(noisy: np.ndarray, suspicion: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score
    k = int(noisy.sum())
    top = np.argsort(-suspicion, kind="stable")[:k]
    return {"auroc": float(roc_auc_score(noisy, suspicion)), "ap": float(average_precision_score(noisy, suspicion)),
            "precision_at_k": float(noisy[top].mean())}


def _cross_val_probs(setup: Setup, epochs: int, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold class probabilities (N, C) of the setup's network trained ``epochs``."""
    import torch
    from sklearn.model_selection import StratifiedKFold
    n = len(setup.y_train)
    probs = np.zeros((n, 10))
    for train, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(n), setup.y_train):
        model = fit(setup, train, epochs=epochs, seed=seed)
        with torch.no_grad():
            probs[held] = torch.softmax(model(torch.from_numpy(setup.x_train[held])), 1).numpy()
    return probs


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _retrained(setup: Setup, keep: np.ndarray, mode: Mode) -> float:
    return accuracy(fit(setup, np.flatnonzero(keep), epochs=mode.epochs, seed=0), setup.x_test, setup.y_test)


def one_kind(kind: str, mode: Mode, work: Path, echo: Callable[[str], None]) -> dict[str, Any]:
    """Every method on one noise kind: detection metrics, times, counts, retrained accuracy."""
    from ...io.store import load_scores
    from ...pipeline import reaggregate
    from ...reports.flag import flag
    base = digits_setup(0.0, mode.n_train)
    y_noisy, noisy = make_noise(kind, base.x_train, base.y_train, KINDS[kind])
    setup = Setup(base.x_train, y_noisy, base.x_val, base.y_val, base.x_test, base.y_test, noisy=noisy)
    early = max(1.0, mode.epochs / 4)
    ref, seconds = _timed(lambda: reference_run(setup, work, epochs=mode.epochs, scores=tuple(SCORES)))
    suspicion = {name: sign * ref["scores"][name] for name, sign in SCORES.items()}
    times = {name: seconds for name in SCORES}
    scores_file = next(work.glob(f"scores_{len(SCORES)}_None.h5"))
    window, t_early = _timed(lambda: load_scores(reaggregate(
        scores_file, work / "early.h5", epochs_upto=early, overwrite=True)))
    suspicion.update(el2n_early=window["scores"]["el2n"], aum_early=-window["scores"]["aum"])
    times.update(el2n_early=seconds + t_early, aum_early=seconds + t_early)
    from sklearn.neighbors import NearestNeighbors
    flat = setup.x_train.reshape(len(y_noisy), -1)

    def knn() -> np.ndarray:
        nearest = NearestNeighbors(n_neighbors=11).fit(flat).kneighbors(flat, return_distance=False)[:, 1:]
        return (y_noisy[nearest] != y_noisy[:, None]).mean(1)
    suspicion["knn"], times["knn"] = _timed(knn)
    found: dict[str, np.ndarray] = {}
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
        for name, epochs in (("cleanlab", mode.epochs), ("cleanlab_early", max(1, int(early)))):
            probs, times[name] = _timed(lambda: _cross_val_probs(setup, epochs))
            suspicion[name] = -get_label_quality_scores(y_noisy, probs)
            found[name] = find_label_issues(y_noisy, probs)
    except ImportError:
        echo("  cleanlab is not installed (pip install cleanlab): its rows are left out")
    flagged = flag(scores_file, score="mislabel")
    found["gradscore flag (mislabel)"] = np.isin(np.arange(len(y_noisy)), [f["index"] for f in flagged["flagged"]])
    detection = {name: {**_metrics(noisy, s), "seconds": times[name]} for name, s in suspicion.items()}
    counts = {name: {"flagged": int(f.sum()), "true": int(noisy.sum()), "precision": float(noisy[f].mean()) if f.any()
                     else 0.0, "recall": float(f[noisy].mean())} for name, f in found.items()}
    counts["gradscore flag (mislabel)"]["rough"] = flagged["rough"]   # what flag says of its own count
    retrained = {"all data": _retrained(setup, np.ones(len(y_noisy), dtype=bool), mode)}
    retrained.update({f"without {name}": _retrained(setup, ~f, mode) for name, f in found.items()})
    retrained["without the true noisy (oracle)"] = _retrained(setup, ~noisy, mode)
    best = max(detection, key=lambda m: detection[m]["auroc"])
    echo(f"  {kind:<10} mislabel AUROC {detection['mislabel']['auroc']:.3f} AP {detection['mislabel']['ap']:.3f}; "
         f"best {best} {detection[best]['auroc']:.3f}; flag {counts['gradscore flag (mislabel)']['flagged']} of "
         f"{int(noisy.sum())}")
    return {"kind": kind, "rate": KINDS[kind], "n_train": len(y_noisy), "n_noisy": int(noisy.sum()),
            "early_epochs": early, "detection": detection, "counts": counts, "test_accuracy": retrained,
            "warnings": ref["warnings"]}


def run(out: Path, mode: Mode, *, echo: Any = print, overwrite: bool = False) -> dict[str, Any]:
    """The noise experiment into ``out/noise.{json,md,png}``; returns the result dict.

    Existing results are replaced only with ``overwrite`` (checked before any training)."""
    work = claim_results(out, "noise", overwrite)
    mode = dataclasses.replace(mode, epochs=EPOCHS.get(mode.name, mode.epochs))
    rows = [one_kind(kind, mode, work / f"noise_{kind}", echo) for kind in KINDS]
    result = {"experiment": "noise", "mode": mode, "rows": rows}
    methods = list(rows[0]["detection"])
    md = [f"digits CNN, {mode.epochs} epochs, one checkpoint per epoch; early window: epochs ≤ "
          f"{rows[0]['early_epochs']:g}. AUROC / AP / precision@k (k = the true count), higher = better; "
          f"time in seconds (gradscore: training + scoring, shared by its scores).\n"]
    md.append(markdown_table(["method"] + [f"{r['kind']} {r['rate']:.0%}" for r in rows] + ["time (s)"], [
        [m] + [f"{r['detection'][m]['auroc']:.3f} / {r['detection'][m]['ap']:.3f} / "
               f"{r['detection'][m]['precision_at_k']:.3f}" for r in rows]
        + [f"{np.mean([r['detection'][m]['seconds'] for r in rows]):.1f}"] for m in methods]))
    md.append("\n**How many**: flagged / true (precision, recall); *rough*: flag calls its count rough\n")
    md.append(markdown_table(["method"] + [r["kind"] for r in rows], [
        [m] + [f"{r['counts'][m]['flagged']} / {r['counts'][m]['true']} ({r['counts'][m]['precision']:.2f}, "
               f"{r['counts'][m]['recall']:.2f})" + (", *rough*" if r["counts"][m].get("rough") else "")
               for r in rows] for m in rows[0]["counts"]]))
    md.append("\n**Test accuracy after removing the flagged examples and retraining**\n")
    md.append(markdown_table(["training set"] + [r["kind"] for r in rows], [
        [m] + [f"{r['test_accuracy'][m]:.3f}" for r in rows] for m in rows[0]["test_accuracy"]]))
    paths = write_results(out, "noise", result, "\n".join(md), [w for r in rows for w in r["warnings"]])
    _plot(rows, methods, out / "noise.png")
    echo(f"-> {paths['json']}, {paths['md']}, {out / 'noise.png'}")
    return result


def _plot(rows: list[dict], methods: list[str], path: Path) -> None:
    from ...reports.plots import pyplot, save_figure
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(7.0, 0.7 * len(methods) * len(rows) / 2), 4.2))
    width = 0.8 / len(rows)
    pos = np.arange(len(methods))
    for k, r in enumerate(rows):
        ax.bar(pos + (k - (len(rows) - 1) / 2) * width, [r["detection"][m]["auroc"] for m in methods], width,
               label=f"{r['kind']} {r['rate']:.0%}")
    ax.set_xticks(pos, methods, rotation=35, ha="right")
    lowest = min(r["detection"][m]["auroc"] for r in rows for m in methods)
    ax.set_ylim(max(0.0, np.floor((lowest - 0.05) * 20) / 20), 1.0)
    ax.set(ylabel="AUROC for the flipped labels", title="finding mislabeled digits, by noise kind")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # beside the bars, never over them
    save_figure(fig, path)
