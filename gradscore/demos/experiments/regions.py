"""Data-map regions (Dataset Cartography): train on 33% ambiguous, easy, hard or random
examples, or on all of them, and test in and out of distribution (the shifted test
split of :mod:`.digits`; a user's ``--shifted-test`` file otherwise)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from ...reports.select import regions as data_map_regions
from .common import (Mode, Setup, accuracy, cell, digits_setup, fit, markdown_table, mean_std, paired_bars,
                     claim_results, reference_run, write_results)
from .digits import shift

SUBSETS = ("ambiguous", "easy", "hard", "random", "all")


def run(out: Path, mode: Mode, *, fraction: float = 0.33, noise: float = 0.0, setup: Setup | None = None,
        echo: Any = print, overwrite: bool = False) -> dict[str, Any]:
    """Region table into ``out/regions.{json,md,png}``; returns the result dict.

    Existing results are replaced only with ``overwrite`` (checked before any training)."""
    work = claim_results(out, "regions", overwrite)
    st = setup or digits_setup(noise, mode.n_train)
    if st.x_shift is None:
        st = dataclasses.replace(st, x_shift=shift(st.x_test), y_shift=st.y_test)
    n = len(st.y_train)
    ref = reference_run(st, work / "regions", epochs=mode.epochs, scores=("confidence", "variability", "correctness"))
    s = ref["scores"]
    chosen = data_map_regions(s["confidence"], s["variability"], fraction)
    rows = []
    for name in SUBSETS:
        ind, ood, sizes = [], [], []
        for seed in range(mode.seeds):
            if name == "all":
                idx = np.arange(n)
            elif name == "random":
                idx = np.sort(np.random.default_rng(1000 + seed).permutation(n)[:int(round(fraction * n))])
            else:
                idx = np.sort(chosen[name])
            model = fit(st, idx, epochs=mode.epochs, seed=seed)
            ind.append(accuracy(model, st.x_test, st.y_test))
            ood.append(accuracy(model, st.x_shift, st.y_shift))
            sizes.append(len(idx))
        rows.append({"subset": name, "n_train": sizes[0], "in_distribution": ind, "out_of_distribution": ood,
                     "id": mean_std(ind), "ood": mean_std(ood)})
        echo(f"  {name:<10} n={sizes[0]:>5}  ID {rows[-1]['id']['mean']:.3f}  OOD {rows[-1]['ood']['mean']:.3f}")
    result = {"experiment": "regions", "mode": mode, "fraction": fraction, "noise": noise, "rows": rows}
    md = markdown_table(["training subset", "examples", "test (ID)", "shifted test (OOD)"],
                        [[r["subset"], str(r["n_train"]), cell(r["id"]), cell(r["ood"])] for r in rows])
    paths = write_results(out, "regions", result, f"test accuracy, mean ± std over {mode.seeds} seed(s)\n\n{md}",
                          ref["warnings"])
    paired_bars(rows, ("id", "ood"), ("test (ID)", "shifted test (OOD)"), [r["subset"] for r in rows],
                "training on data-map regions", "accuracy", out / "regions.png")
    echo(f"-> {paths['json']}, {paths['md']}, {out / 'regions.png'}")
    return result

