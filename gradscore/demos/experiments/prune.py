"""Pruning curves (Data Diet): keep a fraction of the training set chosen by a score,
retrain from scratch, report test accuracy mean ± std over seeds.

Methods (``--methods``; each ``name[:lowest][:exclude=F]``):

- ``el2n``, ``grand``: Data Diet's scores, averaged over the early checkpoints (epoch
  ≤ ``early`` × epochs), higher = harder. Data Diet scores CIFAR-10 at ~10% of training,
  when its network is already ~80% accurate; the digits CNN is only ~35% accurate after
  its first epoch (and EL2N then ranks whole classes first), so the default window is
  the first half of training;
- ``forgetting`` (Toneva et al.), ``pds`` (optimal-control score: the validation set is
  the target, η_t = lr × steps between the per-epoch checkpoints);
- ``ambiguous`` (highest variability) and ``hard`` (lowest confidence): Dataset
  Cartography's regions as rankings;
- ``random``: a fresh random subset per seed.

Scores rank "highest first" by default (``:lowest`` reverses, ``:exclude=F`` first drops
the top F of the ranking, the "drop the very hardest, then keep the hardest" rule,
``:per_class`` keeps the fraction within each class of the given labels).
Run once on the clean labels and once with 20% of them flipped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...config import checked_fraction
from ...exceptions import ConfigError
from ...reports.select import by_score
from .common import (Mode, Setup, accuracy, cell, digits_setup, fit, markdown_table, mean_std,
                     claim_results, reference_run, write_results)

DEFAULT_METHODS = ("el2n", "el2n:lowest", "el2n:exclude=0.1", "grand", "forgetting", "pds",
                   "ambiguous", "hard", "random")
#: method -> (score in the scores file, sign): the ranking is sign * score, highest first
RANKINGS = {"el2n": ("el2n", 1), "grand": ("grand", 1), "forgetting": ("forgetting", 1), "pds": ("pds", 1),
            "ambiguous": ("variability", 1), "hard": ("confidence", -1)}


def parse_method(spec: str) -> tuple[str, bool, float, bool]:
    """'el2n:lowest:exclude=0.1:per_class' -> ('el2n', highest=False, exclude_top=0.1, per_class=True)."""
    name, *mods = spec.split(":")
    if name not in RANKINGS and name != "random":
        raise ConfigError(f"invalid value for 'methods': unknown '{name}'; choose from "
                          f"{', '.join([*RANKINGS, 'random'])}")
    highest, exclude, per_class = True, 0.0, False
    for m in mods:
        if m == "lowest":
            highest = False
        elif m == "per_class":
            per_class = True
        elif m.startswith("exclude="):
            text = m.split("=", 1)[1]
            try:
                value: float | str = float(text)
            except ValueError:   # not a number: named as given
                value = text
            exclude = checked_fraction("exclude", value, allow_zero=True)
        else:
            raise ConfigError(f"invalid value for 'methods': unknown modifier '{m}' in '{spec}'")
    return name, highest, exclude, per_class


def rankings(setup: Setup, work: Path, mode: Mode, early: float) -> tuple[dict[str, np.ndarray], list[str]]:
    """(N,) values per method from two scoring runs (early checkpoints, all checkpoints),
    and what the runs warned of."""
    late = reference_run(setup, work, epochs=mode.epochs, scores=(
        "forgetting", "pds", "confidence", "variability"))
    first = reference_run(setup, work, epochs=mode.epochs, scores=("el2n", "grand"),
                          epochs_upto=max(1.0, early * mode.epochs))
    s = {**late["scores"], **first["scores"]}
    return {m: sign * s[key] for m, (key, sign) in RANKINGS.items()}, late["warnings"] + first["warnings"]


def subset(method: str, values: dict[str, np.ndarray], fraction: float, n: int, seed: int,
           highest: bool = True, exclude_top: float = 0.0, classes: np.ndarray | None = None) -> np.ndarray:
    """Indices of the kept examples (round(fraction·n) of them; with ``classes``, that
    fraction of each class)."""
    if fraction >= 1.0:
        return np.arange(n)
    if method == "random":
        return np.sort(np.random.default_rng(1000 + seed).permutation(n)[:int(round(fraction * n))])
    return np.sort(by_score(values[method], keep=fraction, highest=highest, exclude_top=exclude_top, classes=classes))


def run(out: Path, mode: Mode, *, methods: tuple[str, ...] = DEFAULT_METHODS,
        noise_levels: tuple[float, ...] = (0.0, 0.2),
        early: float = 0.5, setup: Setup | None = None, echo: Any = print,
        overwrite: bool = False) -> dict[str, Any]:
    """Pruning curves into ``out/prune.{json,md,png}``; returns the result dict.

    Existing results are replaced only with ``overwrite`` (checked before any training)."""
    parsed = [parse_method(m) for m in methods]
    for spec, (_, _, exclude, _) in zip(methods, parsed):   # before any training
        over = [f for f in mode.fractions if f < 1.0 and f + exclude > 1 + 1e-9]
        if over:
            raise ConfigError(f"invalid value for 'methods': {spec} keeps {over[0]:g} of the examples after excluding "
                              f"the top {exclude:g}, more than are left; give fractions of at most {1 - exclude:g}")
    work = claim_results(out, "prune", overwrite)
    rows, said = [], []
    conditions = [("user data", setup)] if setup is not None else [
        (f"{noise:.0%} flipped labels", digits_setup(noise, mode.n_train)) for noise in noise_levels]
    for label, st in conditions:
        n = len(st.y_train)
        values, warned = rankings(st, work / label.replace(" ", "_").replace("%", "pct"), mode, early)
        said += warned
        full = [accuracy(fit(st, np.arange(n), epochs=mode.epochs, seed=s), st.x_test, st.y_test)
                for s in range(mode.seeds)]
        for spec, (name, highest, exclude, per_class) in zip(methods, parsed):
            for f in mode.fractions:
                accs, flipped = (full, []) if f >= 1.0 else ([], [])
                if f < 1.0:
                    for s in range(mode.seeds):
                        idx = subset(name, values, f, n, s, highest, exclude, st.y_train if per_class else None)
                        accs.append(accuracy(fit(st, idx, epochs=mode.epochs, seed=s), st.x_test, st.y_test))
                        if st.noisy is not None:
                            flipped.append(float(st.noisy[idx].mean()))
                rows.append({"condition": label, "method": spec, "fraction": f, "n_kept": int(round(f * n)),
                             "accuracy": accs, **mean_std(accs),
                             "flipped_share": float(np.mean(flipped)) if flipped else None})
            echo(f"  {label:<20} {spec:<18} " + "  ".join(
                f"{r['fraction']:.0%}: {r['mean']:.3f}" for r in rows if r["condition"] == label and r["method"] == spec))
    result = {"experiment": "prune", "mode": mode, "methods": list(methods), "early": early, "rows": rows}
    md = []
    for label, _ in conditions:
        md.append(f"**{label}** — test accuracy (mean ± std over {mode.seeds} seed(s)), by kept fraction\n")
        md.append(markdown_table(["method"] + [f"{f:.0%}" for f in mode.fractions], [
            [spec] + [cell(r) for r in rows if r["condition"] == label and r["method"] == spec]
            for spec in methods]) + "\n")
    paths = write_results(out, "prune", result, "\n".join(md), said)
    _plot(rows, methods, [c for c, _ in conditions], out / "prune.png")
    echo(f"-> {paths['json']}, {paths['md']}, {out / 'prune.png'}")
    return result


def _plot(rows: list[dict], methods, conditions: list[str], path: Path) -> None:
    from ...reports.plots import pyplot, save_figure
    plt = pyplot()
    fig, axes = plt.subplots(1, len(conditions), figsize=(5.5 * len(conditions), 4), squeeze=False)
    for ax, label in zip(axes[0], conditions):
        for spec in methods:
            pts = [r for r in rows if r["condition"] == label and r["method"] == spec]
            ax.errorbar([r["fraction"] for r in pts], [r["mean"] for r in pts], yerr=[r["std"] for r in pts],
                        marker="o", ms=3, capsize=2, label=spec)
        ax.set(title=label, xlabel="fraction of the training set kept", ylabel="test accuracy")
    axes[0][-1].legend(fontsize=7)
    save_figure(fig, path)
