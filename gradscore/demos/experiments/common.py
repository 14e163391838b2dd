"""What every experiment shares: modes, the data setup, one training loop, the reference
scoring run, and writing results as JSON + Markdown (+ a PNG by each experiment).

Retraining is gradscore's own small loop (:func:`fit`): SGD with momentum 0.9, batch 64,
a fixed seed for the initialization and for the shuffling, so the same seed gives the
same numbers. A subset is trained for as many optimizer steps as the whole training set
would be in ``epochs`` epochs (so more epochs over fewer examples): a smaller subset
must not also mean a less trained model. Upweighting (JTT) is done by upsampling: an
example of integer weight w appears w times per epoch (those runs keep their epochs).
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from ..._version import __version__
from ...io.atomic import atomic_json, atomic_path
from ...io.outputs import MARKDOWN_MARK, claim, claim_folder
from ...io.checkpoints import CheckpointWriter, build_model as checkpoint_model
from ...io.datasets import check_targets, load_dataset, probe_model, save_dataset
from ..digits import flip_labels, load_digit_images
from ...config import checked_fraction, whole_field
from ...exceptions import ConfigError, GradscoreWarning
from ...imports import import_ref
from ...losses import resolve_loss
from ..training import train_sgd


@dataclass(frozen=True)
class Mode:
    """How much work: training epochs, seeds, kept fractions, data subsample (None = all)."""

    name: str
    epochs: int
    seeds: int
    fractions: tuple[float, ...]
    n_train: int | None = None

    def __post_init__(self) -> None:
        whole_field(self, "epochs", 1)
        whole_field(self, "seeds", 1)
        if self.n_train is not None:
            whole_field(self, "n_train", 1)
        object.__setattr__(self, "fractions", tuple(checked_fraction("fractions", f) for f in self.fractions))


MODES = {
    "tiny": Mode("tiny", epochs=2, seeds=1, fractions=(0.5, 1.0), n_train=300),
    "fast": Mode("fast", epochs=8, seeds=1, fractions=(0.3, 0.5, 1.0)),
    "full": Mode("full", epochs=15, seeds=3, fractions=(0.3, 0.5, 0.7, 0.9, 1.0)),
}


@dataclass
class Setup:
    """Arrays of one experiment: a training set (maybe noisy), a clean validation set
    (the PDS target), a test set, optionally a shifted test set, and the model."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    model_factory: str = "gradscore.demos.models:digits_cnn"
    model_kwargs: dict = field(default_factory=dict)
    noisy: np.ndarray | None = None
    x_shift: np.ndarray | None = None
    y_shift: np.ndarray | None = None
    groups_test: np.ndarray | None = None

    def model(self) -> torch.nn.Module:
        return build_model(self.model_factory, self.model_kwargs)


def build_model(factory: str, kwargs: dict | None) -> torch.nn.Module:
    """``factory(**kwargs)`` of a 'module:fn' reference: one error where it cannot be imported,
    rejects the keyword arguments, fails its own check or builds no nn.Module
    (:func:`gradscore.io.checkpoints.build_model`)."""
    return checkpoint_model(import_ref(factory, "model factory", ConfigError), dict(kwargs or {}), factory)


def digits_splits(seed: int = 0) -> dict[str, np.ndarray]:
    """Digits split 70/10/20 into train / validation / test, stratified, fixed seed."""
    X, y = load_digit_images()
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=0.2, random_state=seed, stratify=y)
    train, val = train_test_split(rest, test_size=0.125, random_state=seed, stratify=y[rest])
    return {"x_train": X[train], "y_train": y[train], "x_val": X[val], "y_val": y[val],
            "x_test": X[test], "y_test": y[test]}


def digits_setup(noise: float = 0.0, n_train: int | None = None, seed: int = 0) -> Setup:
    """The embedded digits with ``noise`` of the training labels flipped (mask kept)."""
    d = digits_splits(seed)
    x, y = d["x_train"][:n_train], d["y_train"][:n_train]
    y_noisy, noisy = flip_labels(y, noise, np.random.default_rng(seed))
    return Setup(x, y_noisy, d["x_val"], d["y_val"], d["x_test"], d["y_test"], noisy=noisy)


def file_setup(train: str, test: str, model: str, model_kwargs: dict | None = None,
               val: str | None = None, shifted: str | None = None) -> Setup:
    """A user's data: .h5/.npz files with inputs/targets (validation: 10% of train if not given).
    The model is built and run on each file's first example, and the labels checked against
    its outputs, before any training: a mismatch is one DataError naming the file."""
    built = build_model(model, model_kwargs)

    def arrays(path: str) -> tuple[np.ndarray, np.ndarray]:
        ds = load_dataset(path)
        x, y = ds.read(0, len(ds))
        check_targets(ds, resolve_loss("cross_entropy"), 0, y, probe_model(built, ds, x, f"--model {model}"))
        return x.numpy(), y.numpy()
    x, y = arrays(train)
    if val is None:
        tr, va = train_test_split(np.arange(len(y)), test_size=0.1, random_state=0)
        xv, yv, x, y = x[va], y[va], x[tr], y[tr]
    else:
        xv, yv = arrays(val)
    xt, yt = arrays(test)
    xs, ys = arrays(shifted) if shifted else (None, None)
    return Setup(x, y, xv, yv, xt, yt, model_factory=model, model_kwargs=dict(model_kwargs or {}),
                 x_shift=xs, y_shift=ys)


def fit(setup: Setup, idx: np.ndarray, *, epochs: int, seed: int, lr: float = 0.05, batch_size: int = 64,
        counts: np.ndarray | None = None,
        on_epoch: Callable[[torch.nn.Module, int, int], None] | None = None,
        record: Callable[[torch.nn.Module], Any] | None = None) -> torch.nn.Module:
    """Train a fresh model on the examples ``idx`` of the training set; deterministic.

    counts: (len(idx),) int, how often each appears per epoch (upsampling); on_epoch:
    called as (model, epoch, optimizer steps) after every epoch; record: gives the fresh
    model's :class:`gradscore.InRun`, which records every step (ids: training set indices).
    """
    torch.manual_seed(seed)
    model = setup.model()
    order = np.repeat(np.asarray(idx), counts) if counts is not None else np.asarray(idx)
    if counts is None and len(order) < len(setup.y_train):   # same number of steps as the full set
        epochs = int(np.ceil(epochs * len(setup.y_train) / max(1, len(order))))
    return train_sgd(model, torch.from_numpy(setup.x_train), torch.from_numpy(setup.y_train), order,
                     epochs=epochs, seed=seed, lr=lr, batch_size=batch_size, on_epoch=on_epoch,
                     recorder=None if record is None else record(model))


def predict(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).argmax(1).numpy()


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict(model, x) == y).mean())


def checkpointed_run(setup: Setup, work: Path, *, epochs: int, seed: int = 0, lr: float = 0.05,
                     record: Callable[[torch.nn.Module], Any] | None = None) -> tuple[Path, Path]:
    """Train on the whole training set with a checkpoint per epoch: (``work/ckpts``, the
    training set written as ``work/train.h5``); ``record``: as :func:`fit`'s (training is
    the same with it)."""
    train = save_dataset(work / "train.h5", setup.x_train, setup.y_train, noisy=setup.noisy)
    with CheckpointWriter(work / "ckpts", model_factory=setup.model_factory, model_kwargs=setup.model_kwargs,
                          loss="cross_entropy", optimizer="SGD(momentum=0.9)", overwrite=True) as w:
        fit(setup, np.arange(len(setup.y_train)), epochs=epochs, seed=seed, lr=lr,
            on_epoch=lambda m, e, s: w.save(m, step=s, lr=lr, epoch=e), record=record)
    return work / "ckpts", train


def reference_run(setup: Setup, work: Path, *, epochs: int, scores: tuple[str, ...], seed: int = 0,
                  record: Callable[[torch.nn.Module], Any] | None = None, **options: Any) -> dict[str, Any]:
    """Train on the whole training set with a checkpoint per epoch, then score every
    training example with ``gradscore.score`` (PDS target: the validation set);
    ``record``: as :func:`fit`'s. The scores file's contents, and under "warnings" what the
    scoring warned of (a diverging co-state: its PDS is not meaningful), for the results."""
    from ...pipeline import score
    from ...io.store import load_scores
    ckpts, train = checkpointed_run(setup, work, epochs=epochs, seed=seed, record=record)
    if {"pds", "target_dot", "target_cos"} & set(scores):
        options.update(target=save_dataset(work / "val.h5", setup.x_val, setup.y_val), lr_scale_steps=True)
    with warnings.catch_warnings(record=True) as caught:
        path = score(work / "ckpts", train, out=work / f"scores_{len(scores)}_{options.get('epochs_upto')}.h5",
                     scores=scores, overwrite=True, progress=False, **options)
    for w in caught:   # shown as they would have been, and kept for the results
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    said = [str(w.message) for w in caught if issubclass(w.category, GradscoreWarning)]
    return {**load_scores(path), "warnings": said}


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def cell(stats: dict[str, float]) -> str:
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def claim_results(out: Path, name: str, overwrite: bool = False) -> Path:
    """Check, before any training, that ``out/<name>.{json,md,png}`` may be written (see
    :func:`gradscore.io.outputs.claim`); return the experiment's scratch folder ``out/work``."""
    for suffix, kind in ((".json", "json"), (".md", "markdown"), (".png", "figure")):
        claim(out / f"{name}{suffix}", kind, overwrite=overwrite)
    return claim_folder(out / "work", ".gradscore-experiment", "a gradscore experiment's scratch folder")


def write_results(out: Path, name: str, result: dict[str, Any], markdown: str,
                  said: list[str] | tuple[str, ...] = ()) -> dict[str, Path]:
    """``out/<name>.json`` and ``out/<name>.md``, atomically, with what the scoring warned of
    (``said``, each once: the rows it concerns are read with it); returns their paths."""
    said = list(dict.fromkeys(said))
    if said:
        result = {**result, "warnings": said}
        markdown += "\n\n**What the scoring warned of in this run** (read the rows it concerns with it):\n\n" + \
            "\n".join(f"- {text}" for text in said)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    atomic_json(paths["json"], {**result, "gradscore_version": __version__}, indent=2, default=_jsonable)
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(f"{MARKDOWN_MARK} {__version__} -->\n{markdown}\n")
    return paths


def _jsonable(o: Any) -> Any:
    if isinstance(o, Mode):
        return asdict(o)
    raise TypeError(type(o).__name__)


def paired_bars(rows: list[dict], keys: tuple[str, str], labels: tuple[str, str], names: list[str],
                title: str, ylabel: str, path: Path) -> Path:
    """Two bars (mean ± std of ``row[key]``) per row, for the region and JTT tables."""
    from ...reports.plots import pyplot, save_figure
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    pos = np.arange(len(rows))
    for k, (key, label) in enumerate(zip(keys, labels)):
        ax.bar(pos + 0.2 * (2 * k - 1), [r[key]["mean"] for r in rows], 0.4,
               yerr=[r[key]["std"] for r in rows], capsize=2, label=label)
    ax.set_xticks(pos, names)
    ax.set(ylabel=ylabel, title=title)
    ax.legend()
    return save_figure(fig, path)
