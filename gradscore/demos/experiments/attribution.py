"""Attribution against the peer, by the linear datamodeling score (``gradscore experiment
attribution``).

On the embedded digits (the digits CNN, 38k parameters), one model is trained on the
whole training set with a checkpoint per epoch, and every method attributes each test
example's margin f_q = z_y − log Σ_{j≠y} e^{z_j} to the training examples:

- gradscore ``tracin``, ``trak`` (TRAK-style, last checkpoint) and ``trak all
  checkpoints`` (averaged over every checkpoint, TRAK's ensemble taken over one run's
  checkpoints) from a sketch file at k = 2048 and 8192 (``gs.sketch`` + ``gs.attribute``);
- ``traker``, TRAK's reference implementation (``pip install traker``; its CPU projector,
  dense normal; skipped with a line when absent) on the same last checkpoint, same k.

Then M models are trained on random halves S_j of the training set (seed 1000 + j) and
their test margins recorded. The LDS of a method is the mean over test examples of the
Spearman correlation, across the M subsets, between the predicted Σ_{n∈S_j} τ(n, q) and
the actual margin. Times are each method's whole cost (sketching or featurizing the
training set included), measured in the same run.

The counterfactual check: for the correctly classified test examples with the smallest
margins, the model is retrained (same seed as the reference) without each one's 20 top
proponents, and without 20 random examples; a method's flip rate is the share of those
test examples whose prediction changes.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .common import (Mode, claim_results, checkpointed_run, digits_setup, fit, markdown_table, predict,
                     write_results)

#: subset models per mode (LDS), and test examples in the counterfactual check
MODELS = {"tiny": 4, "fast": 20, "full": 100}
FLIP_QUERIES = {"tiny": 3, "fast": 20, "full": 50}
DIMS = {"tiny": (256,), "fast": (2048, 8192), "full": (2048, 8192)}
TOP = 20


def margins(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """f = z_y − log Σ_{j≠y} e^{z_j} (N,): TRAK's log-odds margin of the given label."""
    with torch.no_grad():
        z = model(torch.from_numpy(x)).double()
    zy = z.gather(1, torch.from_numpy(y)[:, None])[:, 0]
    others = z.scatter(1, torch.from_numpy(y)[:, None], -torch.inf)
    return (zy - torch.logsumexp(others, 1)).numpy()


def lds(scores: np.ndarray, masks: np.ndarray, actual: np.ndarray) -> float:
    """Mean over queries of Spearman(masks @ scores, actual) across the subsets.
    scores (N, Q), masks (M, N) bool, actual (M, Q)."""
    from scipy.stats import spearmanr
    predicted = masks.astype(np.float64) @ scores
    rhos = [spearmanr(predicted[:, q], actual[:, q]).statistic for q in range(actual.shape[1])]
    return float(np.nanmean(rhos))


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def gradscore_scores(ckpts: Path, train: Path, test: Path, work: Path, dim: int) -> dict[str, tuple[np.ndarray, float]]:
    """{method: (scores (N, Q), seconds)} for TracIn and TRAK-style from one sketch file."""
    import h5py

    from ...sketches.attribute import attribute
    from ...sketches.store import sketch
    path, t_sketch = _timed(lambda: sketch(ckpts, train, out=work / f"train_{dim}.sketch.h5", dim=dim,
                                           store_dtype="float32", overwrite=True, progress=False))
    out = {}
    for name, method, over in (("tracin", "tracin", "last"), ("trak", "trak", "last"),
                               ("trak all checkpoints", "trak", "all")):
        attr, t = _timed(lambda: attribute(path, test, out=work / f"attr_{method}_{over}_{dim}.h5", method=method,
                                           trak_checkpoints=over, full=True, overwrite=True, progress=False))
        with h5py.File(attr) as f:
            out[name] = (f["scores"][:].astype(np.float64), t_sketch + t)
    return out


def traker_scores(ckpts: Path, setup, work: Path, dim: int) -> tuple[np.ndarray, float] | None:
    """TRAK's own library on the last checkpoint: scores (N, Q) and seconds, or None."""
    try:
        from trak import TRAKer
    except ImportError:
        return None
    import logging
    import shutil

    from ...io.checkpoints import CheckpointStore
    store = CheckpointStore(ckpts)
    model = store.build_model(len(store) - 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_dir = work / f"traker_{dim}"
    shutil.rmtree(save_dir, ignore_errors=True)

    def run() -> np.ndarray:
        traker = TRAKer(model=model, task="image_classification", train_set_size=len(setup.y_train),
                        save_dir=str(save_dir), device="cpu", proj_dim=dim, use_half_precision=False,
                        logging_level=logging.ERROR)
        traker.load_checkpoint(state, model_id=0)
        x, y = torch.from_numpy(setup.x_train), torch.from_numpy(setup.y_train)
        for a in range(0, len(y), 128):
            traker.featurize(batch=(x[a:a + 128], y[a:a + 128]), num_samples=len(y[a:a + 128]))
        traker.finalize_features()
        xt, yt = torch.from_numpy(setup.x_test), torch.from_numpy(setup.y_test)
        traker.start_scoring_checkpoint(exp_name="test", checkpoint=state, model_id=0, num_targets=len(yt))
        for a in range(0, len(yt), 128):
            traker.score(batch=(xt[a:a + 128], yt[a:a + 128]), num_samples=len(yt[a:a + 128]))
        return np.asarray(traker.finalize_scores(exp_name="test"), dtype=np.float64)
    return _timed(run)


def run(out: Path, mode: Mode, overwrite: bool = False, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The experiment; writes OUT/attribution.{json,md,png}."""
    from ...io.datasets import save_dataset
    work = claim_results(out, "attribution", overwrite)
    setup = digits_setup(0.0, mode.n_train)
    N, Q = len(setup.y_train), len(setup.y_test)
    ckpts, train = checkpointed_run(setup, work, epochs=mode.epochs, seed=0)
    test = save_dataset(work / "test.h5", setup.x_test, setup.y_test)
    methods: dict[str, tuple[np.ndarray, float]] = {}
    for dim in DIMS[mode.name]:
        for method, result in gradscore_scores(ckpts, train, test, work, dim).items():
            methods[f"gradscore {method}, k={dim}"] = result
        peer = traker_scores(ckpts, setup, work, dim)
        if peer is None:
            echo("traker: skipped (pip install traker to compare)")
        else:
            methods[f"traker, k={dim}"] = peer
    echo(f"attribution: {len(methods)} methods; training {MODELS[mode.name]} models on random halves")
    rng = np.random.default_rng(0)
    masks = np.zeros((MODELS[mode.name], N), dtype=bool)
    actual = np.zeros((MODELS[mode.name], Q))
    for j in range(len(masks)):
        masks[j, rng.choice(N, size=N // 2, replace=False)] = True
        actual[j] = margins(fit(setup, np.flatnonzero(masks[j]), epochs=mode.epochs, seed=1000 + j),
                            setup.x_test, setup.y_test)
    rows = [{"method": name, "lds": lds(scores, masks, actual), "seconds": seconds}
            for name, (scores, seconds) in methods.items()]
    largest = f"k={max(DIMS[mode.name])}"   # the counterfactual check: gradscore's methods at the largest k
    flips = _flips(setup, mode, {k: v[0] for k, v in methods.items()
                                 if k.startswith("gradscore") and k.endswith(largest)}, echo)
    result = {"mode": mode, "n_train": N, "n_test": Q, "subset_models": len(masks), "lds": rows, "flips": flips}
    md = ["# Attribution: linear datamodeling score (digits CNN)", "",
          f"{len(masks)} models on random halves of {N} training examples; LDS over {Q} test examples.", "",
          markdown_table(["method", "LDS", "seconds"], [[r["method"], f"{r['lds']:.3f}", f"{r['seconds']:.1f}"]
                                                       for r in rows]), "",
          f"Removing each of {flips['queries']} fragile test examples' top {TOP} proponents and retraining:", "",
          markdown_table(["removed", "prediction flipped"], [[k, f"{v:.0%}"] for k, v in flips["rates"].items()])]
    paths = write_results(out, "attribution", result, "\n".join(md))
    _plot(rows, out / "attribution.png")
    for r in rows:
        echo(f"  {r['method']:<28} LDS {r['lds']:.3f}  ({r['seconds']:.1f} s)")
    for k, v in flips["rates"].items():
        echo(f"  without the top {TOP} of {k:<24} {v:.0%} of predictions flip")
    echo(f"results -> {paths['md']}")
    return result


def _flips(setup, mode: Mode, scores: dict[str, np.ndarray], echo) -> dict[str, Any]:
    """Flip rates after removing each fragile test example's top proponents (or random ones)."""
    reference = fit(setup, np.arange(len(setup.y_train)), epochs=mode.epochs, seed=0)
    correct = np.flatnonzero(predict(reference, setup.x_test) == setup.y_test)
    m = margins(reference, setup.x_test, setup.y_test)
    queries = correct[np.argsort(m[correct], kind="stable")[:FLIP_QUERIES[mode.name]]]
    rng = np.random.default_rng(1)
    removal = {name: [np.argsort(-s[:, q], kind="stable")[:TOP] for q in queries] for name, s in scores.items()}
    removal["random examples"] = [rng.choice(len(setup.y_train), size=TOP, replace=False) for _ in queries]
    rates = {}
    for name, drops in removal.items():
        flipped = 0
        for q, drop in zip(queries, drops):
            keep = np.setdiff1d(np.arange(len(setup.y_train)), drop)
            model = fit(setup, keep, epochs=mode.epochs, seed=0)
            flipped += int(predict(model, setup.x_test[q:q + 1])[0] != setup.y_test[q])
        rates[name] = flipped / max(1, len(queries))
    return {"queries": len(queries), "top": TOP, "rates": rates}


def _plot(rows: list[dict], path: Path) -> Path:
    """Horizontal bars of the LDS per method (gradscore blue, traker orange), seconds beside."""
    from ...reports.plots import pyplot, save_figure
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.2))
    pos = np.arange(len(rows))[::-1]
    lds_values = [r["lds"] for r in rows]
    ax.barh(pos, lds_values, color=["C0" if r["method"].startswith("gradscore") else "C1" for r in rows])
    ax.set_yticks(pos, [r["method"] for r in rows], fontsize=8)
    for p, r in zip(pos, rows):
        ax.annotate(f" {r['lds']:.3f} ({r['seconds']:.0f} s)", (max(r["lds"], 0.0), p), va="center", fontsize=8)
    ax.set_xlim(min(0.0, min(lds_values)) * 1.1, max(lds_values + [0.01]) * 1.35)
    ax.axvline(0.0, color="0.5", lw=0.8)
    ax.set(xlabel="LDS (Spearman, mean over test examples)", title="Attribution on digits: gradscore vs traker")
    fig.tight_layout()
    return save_figure(fig, path)
