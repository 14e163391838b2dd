"""``gradscore demo``: the embedded default, end to end, no download.

scikit-learn's bundled digits (1797 8×8 images): an 80/20 train/test split, 20% of the
training labels flipped with a fixed seed (mask kept as ``noisy``), the small CNN of
:func:`gradscore.demos.models.digits_cnn` trained with SGD, one checkpoint per epoch, then
the same code path as ``gradscore run`` scores every training example.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import train_test_split

from ..pipeline import score
from ..io.checkpoints import CheckpointWriter
from ..io.datasets import save_dataset
from ..io.outputs import claim_folder
from ..reports.diagnose import diagnose
from .models import digits_cnn
from ..reports.plots import data_map, score_histograms
from ..scores.dynamics import NAMES as DYNAMICS
from ..reports.select import regions
from ..io.store import load_scores
from .training import train_sgd

FACTORY = "gradscore.demos.models:digits_cnn"
#: the file that marks a folder as a demo's own, which a demo may write over
DEMO_MARKER = ".gradscore-demo"


def demo_folder(out: str | Path) -> Path:
    """``out`` made, or checked to be a demo's folder (empty, or written by a demo before),
    before anything is written: never a folder of the user's. Inside it a demo replaces
    its own files of an earlier run (its checkpoints first, so no stale ones are scored)."""
    return claim_folder(out, DEMO_MARKER, "a gradscore demo folder")


def flip_labels(y: np.ndarray, rate: float, rng: np.random.Generator, n_classes: int = 10
                ) -> tuple[np.ndarray, np.ndarray]:
    """A copy of ``y`` with exactly round(rate·N) labels changed, always to a wrong class;
    returns (labels, flipped mask)."""
    y = y.copy()
    flip = rng.choice(len(y), size=int(round(rate * len(y))), replace=False)
    y[flip] = (y[flip] + rng.integers(1, n_classes, size=len(flip))) % n_classes
    noisy = np.zeros(len(y), dtype=bool)
    noisy[flip] = True
    return y, noisy


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (1797, 1, 8, 8) float32 in [0, 1] and labels (1797,)."""
    X, y = load_digits(return_X_y=True)
    return (X / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), y.astype(np.int64)


def make_digits(noise: float = 0.2, seed: int = 0) -> dict[str, np.ndarray]:
    """Digits as (N, 1, 8, 8) float32 in [0, 1]; train labels flipped at rate ``noise``."""
    X, y = load_digit_images()
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=0.2, random_state=seed, stratify=y)
    y_tr, noisy = flip_labels(y[tr], noise, np.random.default_rng(seed))
    return {"x_train": X[tr], "y_train": y_tr.astype(np.int64), "ids": tr.astype(np.int64),
            "noisy": noisy, "y_clean": y[tr].astype(np.int64), "x_test": X[te],
            "y_test": y[te].astype(np.int64)}


def train(data: dict[str, np.ndarray], ckpt_dir: Path, *, epochs: int, lr: float = 0.05,
          batch_size: int = 64, seed: int = 0) -> float:
    """Train the demo CNN with SGD, one checkpoint per epoch; return test accuracy."""
    torch.manual_seed(seed)
    model = digits_cnn()
    x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    with CheckpointWriter(ckpt_dir, model_factory=FACTORY, model_kwargs={}, loss="cross_entropy",
                          optimizer="SGD(momentum=0.9)", overwrite=True) as writer:
        train_sgd(model, x, y, epochs=epochs, seed=seed, lr=lr, batch_size=batch_size,
                  on_epoch=lambda m, epoch, step: writer.save(m, step=step, lr=lr, epoch=epoch))
    with torch.no_grad():
        pred = model(torch.from_numpy(data["x_test"])).argmax(1).numpy()
    return float((pred == data["y_test"]).mean())


def run_demo(out: str | Path = "gradscore_demo", *, epochs: int = 15, n_train: int | None = None,
             engine: str = "auto", progress: bool = True, echo: Any = print) -> dict[str, Any]:
    """Run the whole demo into ``out``; return a summary (AUROCs, counts, timings)."""
    t0 = time.perf_counter()
    out = demo_folder(out)
    data = make_digits()
    if n_train is not None:
        for k in ("x_train", "y_train", "ids", "noisy", "y_clean"):
            data[k] = data[k][:n_train]
    train_path = save_dataset(out / "data" / "train.h5", data["x_train"], data["y_train"],
                              ids=data["ids"], noisy=data["noisy"])
    echo(f"data: {len(data['y_train'])} training digits, {int(data['noisy'].sum())} labels "
         f"flipped -> {train_path}")
    ckpt_dir = out / "ckpts"
    acc = train(data, ckpt_dir, epochs=epochs)
    t_train = time.perf_counter() - t0
    echo(f"trained digits_cnn for {epochs} epochs ({t_train:.1f}s), clean test accuracy "
         f"{acc:.3f}; checkpoints -> {ckpt_dir}")
    t1 = time.perf_counter()
    scores_path = score(ckpt_dir, train_path, out=out / "scores.h5",
                        scores=("el2n", "grand", "loss", "mislabel", "aum", *DYNAMICS), engine=engine,
                        overwrite=True, progress=progress)
    t_score = time.perf_counter() - t1
    res = load_scores(scores_path)
    noisy = res["noisy"]
    summary: dict[str, Any] = {"test_accuracy": acc, "n_train": int(len(noisy)),
                               "n_noisy": int(noisy.sum()), "epochs": epochs,
                               "train_seconds": t_train, "score_seconds": t_score,
                               "auroc": {}, "average_precision": {}, "top10_noisy": {}}
    echo(f"scored {len(noisy)} examples x {epochs} checkpoints in {t_score:.1f}s -> {scores_path}")
    echo("")
    echo(f"{'score':<8}{'AUROC':>8}{'AP':>8}   top-10 flipped   (flipped = {noisy.mean():.0%} of data)")
    for name in ("el2n", "grand", "loss"):
        s = res["scores"][name]
        top = np.argsort(-s, kind="stable")[:10]
        summary["auroc"][name] = float(roc_auc_score(noisy, s))
        summary["average_precision"][name] = float(average_precision_score(noisy, s))
        summary["top10_noisy"][name] = int(noisy[top].sum())
        echo(f"{name:<8}{summary['auroc'][name]:>8.3f}{summary['average_precision'][name]:>8.3f}"
             f"   {summary['top10_noisy'][name]:>2d}/10")
    for name in ("el2n", "grand"):
        top = np.argsort(-res["scores"][name], kind="stable")[:10]
        echo(f"\ntop-10 by {name}: id (label -> true label, score)")
        echo("  " + ", ".join(f"{res['ids'][i]} ({data['y_train'][i]}->{data['y_clean'][i]}"
                              f"{'*' if noisy[i] else ''}, {res['scores'][name][i]:.3g})" for i in top))
    echo("  (* = flipped label)")
    sc = res["scores"]
    found = regions(sc["confidence"], sc["variability"], 0.33)
    summary["flipped_in_region"] = {r: int(noisy[idx].sum()) for r, idx in found.items()}
    echo("\ndata map regions (33% of the data each), flipped labels in each: "
         + ", ".join(f"{r} {n}/{int(noisy.sum())}" for r, n in summary["flipped_in_region"].items()))
    data_map(sc["confidence"], sc["variability"], sc["correctness"], out / "datamap.png", noisy=noisy,
             title="digits, 20% flipped labels (outlined)")
    report = score_histograms({k: sc[k] for k in ("el2n", "grand", "loss")}, noisy, out / "report.png",
                              title=f"digits, {noisy.mean():.0%} flipped labels: clean vs flipped")
    echo("\ndiagnosis of this run:")
    summary["diagnosis"] = diagnose(scores_path, data=str(train_path), out=out / "diagnosis", echo=echo,
                                    overwrite=True, rerun="`gradscore demo --pds` computes them,")
    summary["seconds"] = time.perf_counter() - t0
    echo(f"\nreport -> {report}, data map -> {out / 'datamap.png'}; total {summary['seconds']:.1f}s")
    return summary


def train_full_batch(data: dict[str, np.ndarray], ckpt_dir: Path, *, steps: int, lr: float = 0.05,
                     warmup_epochs: int = 8, seed: int = 0) -> None:
    """Warm up with minibatch SGD (not recorded), then full-batch gradient descent on the
    mean loss with a checkpoint at every step, so that PDS is exact for θ_0 … θ_steps.

    The step size is kept well below 2/sharpness: at the edge of stability (I − ηH) has
    eigenvalues below −1 and the co-states oscillate and grow backwards in time.
    """
    torch.manual_seed(seed)
    model = digits_cnn()
    for m in model.modules():  # plain GD: no dropout noise in the trajectory
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    train_sgd(model, x, y, epochs=warmup_epochs, seed=seed)
    with CheckpointWriter(ckpt_dir, model_factory=FACTORY, model_kwargs={}, loss="cross_entropy",
                          optimizer="GD(full batch)", overwrite=True) as writer:
        for step in range(steps + 1):
            writer.save(model, step=step, lr=lr, epoch=step)
            if step == steps:
                break
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= lr * p.grad


def run_pds_demo(out: str | Path = "gradscore_demo_pds", *, steps: int = 30, engine: str = "auto",
                 progress: bool = True, echo: Any = print) -> dict[str, Any]:
    """PDS on digits: noisy training set as proxy, clean held-out split as target.

    Prints the most helpful and most harmful examples by PDS with their gradient norms,
    and shows the trap: flipped labels reach the largest |PDS| through their norms.
    """
    t0 = time.perf_counter()
    out = demo_folder(out)
    data = make_digits()
    proxy = save_dataset(out / "data" / "train.h5", data["x_train"], data["y_train"],
                         ids=data["ids"], noisy=data["noisy"])
    target = save_dataset(out / "data" / "target.h5", data["x_test"], data["y_test"])
    echo(f"proxy: {len(data['y_train'])} training digits, {int(data['noisy'].sum())} flipped; "
         f"target: {len(data['y_test'])} clean held-out digits")
    train_full_batch(data, out / "ckpts", steps=steps)
    echo(f"SGD warm-up, then full-batch GD for {steps} steps with a checkpoint at every step "
         f"(PDS is exact for this trajectory) -> {out / 'ckpts'}")
    path = score(out / "ckpts", proxy, out=out / "scores.h5", target=target, engine=engine,
                 scores=("pds", "target_dot", "target_cos", "grand", "el2n", "mislabel", "aum"), overwrite=True,
                 variants=("cos", "clip", "rank", "resid"), progress=progress)
    res = load_scores(path)
    s, noisy = res["scores"], res["noisy"]
    order = np.argsort(-s["pds"], kind="stable")

    def table(idx, title):
        echo(f"\n{title}: id  label->true  pds  mean ‖g‖  mean cos")
        for i in idx:
            echo(f"  {res['ids'][i]:>5}  {data['y_train'][i]}->{data['y_clean'][i]}{'*' if noisy[i] else ' '}"
                 f"  {s['pds'][i]:>+9.4f}  {s['grand'][i]:>7.2f}  {s['target_cos'][i]:>+6.3f}")
    table(order[:10], "10 most helpful by PDS")
    table(order[::-1][:10], "10 most harmful by PDS")
    summary = {
        "auroc_neg_pds": float(roc_auc_score(noisy, -s["pds"])),
        "auroc_neg_target_cos": float(roc_auc_score(noisy, -s["target_cos"])),
        "auroc_grand": float(roc_auc_score(noisy, s["grand"])),
        **norm_trap(s, noisy, "pds"),
    }
    echo(f"\nthe trap: {summary['noisy_in_top50_abs_pds']}/50 of the largest |PDS| are flipped "
         f"({noisy.mean():.0%} of the data); flipped examples have {summary['grad_norm_ratio_noisy_over_clean']:.1f}x "
         f"the gradient norm of clean ones, while their mean |cos| with ∇J is "
         f"{summary['cos_abs_noisy']:.3f} vs {summary['cos_abs_clean']:.3f} for clean ones.")
    echo(f"AUROC for finding flipped labels: -pds {summary['auroc_neg_pds']:.3f}, "
         f"-target_cos {summary['auroc_neg_target_cos']:.3f}, grand {summary['auroc_grand']:.3f}")
    return diagnose_and_finish(summary, path, proxy, out, t0, echo)


def norm_trap(s: dict[str, np.ndarray], noisy: np.ndarray, score: str) -> dict[str, Any]:
    """The norm trap of a dot-product ``score``: noisy examples among its 50 largest |values|,
    their mean GraNd over the clean ones', and the mean |target_cos| of both groups."""
    top = np.argsort(-np.abs(s[score]), kind="stable")[:50]
    return {f"noisy_in_top50_abs_{score}": int(noisy[top].sum()),
            "grad_norm_ratio_noisy_over_clean": float(s["grand"][noisy].mean() / s["grand"][~noisy].mean()),
            "cos_abs_noisy": float(np.abs(s["target_cos"][noisy]).mean()),
            "cos_abs_clean": float(np.abs(s["target_cos"][~noisy]).mean())}


def diagnose_and_finish(summary: dict[str, Any], path: Path, proxy: Path, out: Path, t0: float,
                        echo: Any) -> dict[str, Any]:
    """Print ``gradscore diagnose`` of the demo's scores, add it and the total time to ``summary``."""
    echo("\ndiagnosis of this run:")
    summary["diagnosis"] = diagnose(path, data=str(proxy), out=out / "diagnosis", echo=echo, overwrite=True)
    summary["seconds"] = time.perf_counter() - t0
    echo(f"scores -> {path}; total {summary['seconds']:.1f}s")
    return summary
