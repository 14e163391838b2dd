"""Just Train Twice on a spurious-feature variant of digits (:func:`.digits.spurious`):
ERM against JTT, whose error set is what an early ERM checkpoint gets wrong (read from
gradscore's per-checkpoint ``correct``), upsampled λ_up times; average and worst-group
test accuracy over the 4 (label, patch) groups."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...reports.select import jtt_weights
from .common import (Mode, Setup, cell, digits_splits, fit, markdown_table, mean_std, paired_bars, predict,
                     claim_results, reference_run, write_results)
from .digits import spurious

UPWEIGHTS = (5, 20, 50)


def spurious_setup(n_train: int | None = None, train_agree: float = 0.95, test_agree: float = 0.5) -> Setup:
    d = digits_splits()
    x, y, _ = spurious(d["x_train"][:n_train], d["y_train"][:n_train], train_agree, seed=1)
    xv, yv, _ = spurious(d["x_val"], d["y_val"], train_agree, seed=2)
    xt, yt, gt = spurious(d["x_test"], d["y_test"], test_agree, seed=3)
    return Setup(x, y, xv, yv, xt, yt, model_kwargs={"n_classes": 2}, groups_test=gt)


def group_accuracies(model, st: Setup) -> dict[str, float]:
    correct = predict(model, st.x_test) == st.y_test
    per_group = [float(correct[st.groups_test == g].mean()) for g in np.unique(st.groups_test)]
    return {"average": float(correct.mean()), "worst_group": min(per_group)}


def run(out: Path, mode: Mode, *, upweights: tuple[int, ...] = UPWEIGHTS, early_epoch: int = 1,
        echo: Any = print, overwrite: bool = False) -> dict[str, Any]:
    """ERM vs JTT table into ``out/jtt.{json,md,png}``; returns the result dict.

    Existing results are replaced only with ``overwrite`` (checked before any training)."""
    work = claim_results(out, "jtt", overwrite)
    st = spurious_setup(mode.n_train)
    n = len(st.y_train)
    ref = reference_run(st, work / "jtt", epochs=mode.epochs, scores=("loss",))
    correct = ref["per_checkpoint"]["correct"][early_epoch - 1]   # checkpoint of epoch `early_epoch`
    rows = []
    for label, lam in [("ERM", None)] + [(f"JTT λ_up={u}", u) for u in upweights]:
        counts = None if lam is None else jtt_weights(correct, lam).astype(np.int64)
        accs = [group_accuracies(fit(st, np.arange(n), epochs=mode.epochs, seed=s, counts=counts), st)
                for s in range(mode.seeds)]
        rows.append({"method": label, "upweight": lam, "error_set": int((correct == 0).sum()),
                     "average": mean_std([a["average"] for a in accs]),
                     "worst_group": mean_std([a["worst_group"] for a in accs]), "runs": accs})
        echo(f"  {label:<14} average {rows[-1]['average']['mean']:.3f}  worst group {rows[-1]['worst_group']['mean']:.3f}")
    result = {"experiment": "jtt", "mode": mode, "early_epoch": early_epoch, "n_train": n, "rows": rows,
              "train_patch_agreement": 0.95, "test_patch_agreement": 0.5}
    md = markdown_table(["method", "error set", "average accuracy", "worst-group accuracy"],
                        [[r["method"], str(r["error_set"]) if r["upweight"] else "—", cell(r["average"]),
                          cell(r["worst_group"])] for r in rows])
    paths = write_results(out, "jtt", result, f"binary digit ≥ 5 with a spurious corner patch (95% agreement in "
                          f"training, 50% in test); mean ± std over {mode.seeds} seed(s)\n\n{md}", ref["warnings"])
    paired_bars(rows, ("average", "worst_group"), ("average", "worst group"), [r["method"] for r in rows],
                "ERM vs JTT, spurious corner patch", "test accuracy", out / "jtt.png")
    echo(f"-> {paths['json']}, {paths['md']}, {out / 'jtt.png'}")
    return result

