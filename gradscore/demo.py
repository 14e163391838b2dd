"""``gradscore demo``: the embedded default, end to end, no download.

scikit-learn's bundled digits (1797 8×8 images): an 80/20 train/test split, 20% of the
training labels flipped with a fixed seed (mask kept as ``noisy``), the small CNN of
:func:`gradscore.models.digits_cnn` trained with SGD, one checkpoint per epoch, then
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

from .api import score
from .checkpoints import CheckpointWriter
from .data import save_dataset
from .models import digits_cnn
from .plots import score_histograms
from .store import load_scores

FACTORY = "gradscore.models:digits_cnn"


def make_digits(noise: float = 0.2, seed: int = 0) -> dict[str, np.ndarray]:
    """Digits as (N, 1, 8, 8) float32 in [0, 1]; train labels flipped at rate ``noise``."""
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=0.2, random_state=seed, stratify=y)
    rng = np.random.default_rng(seed)
    y_tr = y[tr].copy()
    flip = rng.choice(len(tr), size=int(round(noise * len(tr))), replace=False)
    y_tr[flip] = (y_tr[flip] + rng.integers(1, 10, size=len(flip))) % 10  # always a wrong label
    noisy = np.zeros(len(tr), dtype=bool)
    noisy[flip] = True
    return {"x_train": X[tr], "y_train": y_tr.astype(np.int64), "ids": tr.astype(np.int64),
            "noisy": noisy, "y_clean": y[tr].astype(np.int64), "x_test": X[te],
            "y_test": y[te].astype(np.int64)}


def train(data: dict[str, np.ndarray], ckpt_dir: Path, *, epochs: int, lr: float = 0.05,
          batch_size: int = 64, seed: int = 0) -> float:
    """Train the demo CNN with SGD, one checkpoint per epoch; return test accuracy."""
    torch.manual_seed(seed)
    model = digits_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    gen = torch.Generator().manual_seed(seed)
    step = 0
    with CheckpointWriter(ckpt_dir, model_factory=FACTORY, model_kwargs={}, loss="cross_entropy",
                          optimizer="SGD(momentum=0.9)") as writer:
        for epoch in range(1, epochs + 1):
            model.train()
            for batch in torch.randperm(len(x), generator=gen).split(batch_size):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                opt.step()
                step += 1
            writer.save(model, step=step, lr=lr, epoch=epoch)
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(data["x_test"])).argmax(1).numpy()
    return float((pred == data["y_test"]).mean())


def run_demo(out: str | Path = "gradscore_demo", *, epochs: int = 15, n_train: int | None = None,
             engine: str = "auto", progress: bool = True, echo: Any = print) -> dict[str, Any]:
    """Run the whole demo into ``out``; return a summary (AUROCs, counts, timings)."""
    t0 = time.perf_counter()
    out = Path(out)
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
    scores_path = score(ckpt_dir, train_path, out=out / "scores.h5", scores=("el2n", "grand", "loss"),
                        engine=engine, overwrite=True, progress=progress)
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
    for name, s in res["scores"].items():
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
    report = score_histograms(res["scores"], noisy, out / "report.png",
                              title=f"digits, {noisy.mean():.0%} flipped labels: clean vs flipped")
    summary["seconds"] = time.perf_counter() - t0
    echo(f"\nreport -> {report}; total {summary['seconds']:.1f}s")
    return summary
