"""``gradscore demo --inrun``: the digits demo scored during training, with no checkpoint.

The digits CNN (no BatchNorm) on the demo's 20%-flipped training labels is trained three
times from the same seed, bit-identically: plainly (timed, a checkpoint per epoch saved
outside the timing), with :class:`gradscore.InRun` recording norms, losses and margins,
and with the recorder also taking the gradient of 64 clean held-out digits at every step
(``inrun_value``). Prints each in-run score's AUROC / AP for the flipped labels
next to the same score from the checkpoints (the path of ``gradscore demo``; for
``inrun_value`` its checkpoint twin ``target_dot``), and the recorder's overhead as the
ratio of training times measured in this run.
"""
from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from ..inrun import InRun
from ..io.checkpoints import CheckpointWriter
from ..io.datasets import save_dataset
from ..io.store import load_scores
from ..pipeline import score
from .digits import FACTORY, demo_folder, make_digits
from .models import digits_cnn
from .training import train_sgd

#: the scores compared, and the sign that makes higher = more likely flipped
SIGNS = {"loss": 1, "el2n": 1, "grand": 1, "aum": -1, "forgetting": 1, "confidence": -1,
         "inrun_value": -1, "inrun_value_cos": -1}
#: the checkpoint score beside an in-run one where the names differ (TracIn-like dots)
CHECKPOINT_TWIN = {"inrun_value": "target_dot", "inrun_value_cos": "target_cos"}


def _train(data: dict[str, np.ndarray], epochs: int, *, on_epoch: Any = None,
           recorder: Callable[[torch.nn.Module], InRun] | None = None) -> tuple[torch.nn.Module, float]:
    """(model, seconds of training excluding ``on_epoch``) from the demo's seed; with
    ``recorder(model)`` every step recorded, the recorder closed (timed: it is overhead)."""
    torch.manual_seed(0)
    model = digits_cnn()
    spent = [0.0]

    def timed(m, epoch, steps):
        t = time.perf_counter()
        on_epoch(m, epoch, steps)
        spent[0] += time.perf_counter() - t
    t0 = time.perf_counter()
    rec = None if recorder is None else recorder(model)
    train_sgd(model, torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"]), epochs=epochs, seed=0,
              lr=0.05, on_epoch=timed if on_epoch else None, recorder=rec, ids=data["ids"])
    if rec is not None:
        rec.close()
    return model, time.perf_counter() - t0 - spent[0]


def _metrics(noisy: np.ndarray, values: np.ndarray, sign: int) -> tuple[float, float]:
    """AUROC, AP of ``sign · values`` for ``noisy``; NaN (an example never at a target step)
    ranks as least suspicious."""
    v = sign * values
    v = np.where(np.isfinite(v), v, np.nanmin(v) - 1.0)
    return float(roc_auc_score(noisy, v)), float(average_precision_score(noisy, v))


def run_inrun_demo(out: str | Path = "gradscore_demo_inrun", *, epochs: int = 15, n_train: int | None = None,
                   every: int = 1, n_target: int = 64, engine: str = "auto", progress: bool = True, echo: Any = print
                   ) -> dict[str, Any]:
    """Run the in-run demo into ``out`` (``inrun.h5``, ``ckpts/``, ``scores.h5``); return the
    AUROC/AP of each score in-run and from checkpoints, and the overhead ratios."""
    out = demo_folder(out)
    data = make_digits()
    if n_train is not None:
        for k in ("x_train", "y_train", "ids", "noisy", "y_clean"):
            data[k] = data[k][:n_train]
    train_path = save_dataset(out / "data" / "train.h5", data["x_train"], data["y_train"], ids=data["ids"],
                              noisy=data["noisy"])
    target = (torch.from_numpy(data["x_test"][:n_target]), torch.from_numpy(data["y_test"][:n_target]))
    echo(f"data: {len(data['y_train'])} training digits, {int(data['noisy'].sum())} labels flipped; target: "
         f"{len(target[1])} clean held-out digits")
    with tempfile.TemporaryDirectory() as scratch:   # warm-up, untimed: lazy init and kernel loading
        _train(data, 1)                                  # would land on whichever run came first
        _train(data, 1, recorder=lambda m: InRun(m, out=Path(scratch) / "warmup.h5", targets=target))
    with CheckpointWriter(out / "ckpts", model_factory=FACTORY, model_kwargs={}, loss="cross_entropy",
                          optimizer="SGD(momentum=0.9)", overwrite=True) as writer:
        plain, t_plain = _train(data, epochs, on_epoch=lambda m, e, s: writer.save(m, step=s, lr=0.05, epoch=e))
    _, t_norms = _train(data, epochs, recorder=lambda m: InRun(m, out=out / "inrun_norms.h5", overwrite=True))
    recorded, t_target = _train(data, epochs, recorder=lambda m: InRun(
        m, out=out / "inrun.h5", targets=target, every=every, overwrite=True))
    same = all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), recorded.state_dict().values()))
    echo(f"trained {epochs} epochs three times: plain {t_plain:.1f}s; recording norms, losses, margins "
         f"{t_norms:.1f}s ({t_norms / t_plain:.2f}x); and the target gradient every {every} step(s) "
         f"{t_target:.1f}s ({t_target / t_plain:.2f}x). Parameters bit-identical with the recorder: {same}")
    t1 = time.perf_counter()
    target_path = save_dataset(out / "data" / "target.h5", target[0].numpy(), target[1].numpy())
    with warnings.catch_warnings():   # the momentum caveat of the first-order values: said once, below the table
        warnings.filterwarnings("ignore", message=".*only an approximation")
        ckpt_scores = score(out / "ckpts", train_path, out=out / "scores.h5", target=target_path, engine=engine,
                            scores=("el2n", "grand", "loss", "aum", "forgetting", "confidence", "target_dot",
                                    "target_cos"), overwrite=True, progress=progress)
    t_ckpt = time.perf_counter() - t1
    inrun, ckpt = load_scores(out / "inrun.h5"), load_scores(ckpt_scores)
    order = {int(i): k for k, i in enumerate(data["ids"])}
    noisy = data["noisy"][[order[int(i)] for i in inrun["ids"]]]
    echo(f"scoring the {epochs} checkpoints afterwards took {t_ckpt:.1f}s more\n")
    echo(f"{'score':<17}{'in-run AUROC':>13}{'AP':>7}{'checkpoints AUROC':>19}{'AP':>7}   (finding the flipped labels)")
    summary: dict[str, Any] = {"overhead_norms": t_norms / t_plain, "overhead_target": t_target / t_plain,
                               "bit_identical": same, "inrun": {}, "checkpoints": {}}
    for name, sign in SIGNS.items():
        summary["inrun"][name] = _metrics(noisy, inrun["scores"][name], sign)
        row = f"{name:<17}{summary['inrun'][name][0]:>13.3f}{summary['inrun'][name][1]:>7.3f}"
        twin = CHECKPOINT_TWIN.get(name, name)
        summary["checkpoints"][twin] = _metrics(ckpt["noisy"], ckpt["scores"][twin], sign)
        row += f"{summary['checkpoints'][twin][0]:>19.3f}{summary['checkpoints'][twin][1]:>7.3f}"
        row += f"   ({twin})" if twin != name else ""
        echo(row)
    echo("(inrun_value and target_dot are first-order: Σ_t η_t ⟨∇J, g_n⟩; with this demo's momentum 0.9 both "
         "only approximate J's change)")
    unseen = int(np.isnan(inrun["scores"]["inrun_value_cos"]).sum())
    if unseen:
        echo(f"({unseen} examples were never in a batch with a target gradient: their inrun_value and cos are NaN)")
    echo(f"\nin-run scores -> {out / 'inrun.h5'} (gradscore info / diagnose / select / flag read it)")
    return summary
