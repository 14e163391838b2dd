"""One registry of aggregators: how (T, N) per-checkpoint metrics become (N,) scores.

Every writer of a scores file (``gradscore run``, ``gradscore import-dynamics``) calls
:func:`aggregate` per chunk of examples and :func:`whole_dataset` once; an aggregator
returns the scores it can make from the metrics present and leaves the rest out.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping

import numpy as np

from ..config import AVAILABLE_SCORES
from . import datadiet, dynamics, inrun, mislabel, pds

#: every score a writer of a scores file makes: a name outside it is a typo, not a score to compute
KNOWN_SCORES = frozenset(AVAILABLE_SCORES) | set(inrun.NEEDS) | {f"{d}_{v}" for d in pds.DOT_SCORES
                                                                 for v in pds.VARIANTS}


@dataclass(frozen=True)
class Window:
    """Which checkpoints a score averages over, and the PDS step weights.

    select: (T,) bool, the checkpoints the Data Diet and dynamics scores average over;
    eta: (T-1,) η_t and grad_target_norm: (T,) ‖∇J(θ_t)‖ when the co-states exist.
    """

    select: np.ndarray
    eta: np.ndarray | None = None
    grad_target_norm: np.ndarray | None = None


#: name -> aggregator(per_checkpoint (T, n) arrays, window) -> {score: (n,) float64}
AGGREGATORS: dict[str, Callable[[dict[str, np.ndarray], Window], dict[str, np.ndarray]]] = {
    "datadiet": lambda pc, w: datadiet.aggregate(pc, w.select),
    "dynamics": lambda pc, w: dynamics.aggregate(pc, w.select),
    "mislabel": lambda pc, w: mislabel.aggregate(pc, w.select),
    "pds": lambda pc, w: pds.aggregate(pc, w.eta, w.grad_target_norm) if w.eta is not None else {},
}


def aggregate(per_checkpoint: dict[str, np.ndarray], window: Window,
              wanted: set[str] | None = None) -> dict[str, np.ndarray]:
    """Every registered aggregator's scores (N,) float64 for these examples; only those
    in ``wanted`` when given."""
    out: dict[str, np.ndarray] = {}
    for fn in AGGREGATORS.values():
        out.update(fn(per_checkpoint, window))
    return out if wanted is None else {k: v for k, v in out.items() if k in wanted}


def nonfinite(per_checkpoint: Mapping[str, Any]) -> np.ndarray:
    """(N,) bool: the examples with a NaN/Inf float metric at any checkpoint (one checkpoint's
    row (N,) read at a time)."""
    bad = np.zeros(next(iter(per_checkpoint.values())).shape[1], bool)
    for v in per_checkpoint.values():
        if v.dtype.kind == "f":
            for t in range(v.shape[0]):
                bad |= ~np.isfinite(v[t])
    return bad


def whole_dataset(per_checkpoint: Mapping[str, Any], window: Window, wanted: set[str],
                  ref_norms: dict[str, np.ndarray] | None = None, variant_names: tuple[str, ...] = (),
                  clip_quantile: float = 0.9) -> dict[str, np.ndarray]:
    """The scores that need every example at once: ``<score>_<variant>`` of the dot scores
    (ranks, quantile clipping, a regression over all examples; see :func:`pds.variants`,
    with ``window.eta`` and ref_norms {"ref_norm_target", "ref_norm_costate"}: (T,) ‖v_t‖).
    ``per_checkpoint``: (T, N) arrays or the HDF5 group holding them; only the metrics a
    wanted score needs are read, a checkpoint's row at a time."""
    out: dict[str, np.ndarray] = {}
    if window.eta is None or ref_norms is None:
        return out
    weight = np.append(window.eta, 0.0)
    for name, (dot_key, norm_key) in pds.DOT_SCORES.items():
        if name in wanted and variant_names:
            v = pds.variants(per_checkpoint[dot_key], per_checkpoint["sq_grad_norm"], ref_norms[norm_key],
                             weight, clip_quantile=clip_quantile)
            out.update({f"{name}_{k}": v[k] for k in variant_names})
    return out


def how_to_add(config: Mapping[str, Any], names: Collection[str]) -> str:
    """What gives the scores ``names`` that a scores file lacks, by what wrote it (its
    ``config``): a ``gs.InRun`` recording records what training gives; the rest comes from
    saved checkpoints, by rerunning ``gradscore run`` where it wrote the file (a run's config
    names its engine; a rerun computes only what is missing)."""
    names = list(names)
    if "engine" in config and not config.get("inrun"):
        return f"rerun `gradscore run --scores {','.join(names)}`"
    recordable = [n for n in names if n in inrun.NEEDS] if config.get("inrun") else []
    rest = [n for n in names if n not in recordable]
    said = []
    if recordable:
        said.append(f"record {'it' if len(recordable) == 1 else 'them'} in training: gs.InRun(..., scores=(..., "
                    f"{', '.join(map(repr, recordable))}))")
    if rest:
        said.append(f"{', '.join(rest)} {'comes' if len(rest) == 1 else 'come'} from saved checkpoints: "
                    f"`gradscore run --scores {','.join(rest)}`")
    return "; ".join(said)


def missing_scores_fix(config: Mapping[str, Any], names: Collection[str], present: Collection[str]) -> str:
    """What to do about the scores ``names`` a file lacks: where one is no score at all
    but near one of the file's ``present`` (a typo), that one; else :func:`how_to_add`."""
    near = [m[0] for n in names if n not in KNOWN_SCORES
            for m in [difflib.get_close_matches(n, sorted(present), n=1, cutoff=0.75)] if m]
    return f"did you mean {', '.join(near)}?" if near else how_to_add(config, names)
