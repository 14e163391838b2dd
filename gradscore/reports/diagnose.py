"""``gradscore diagnose``: why does an example score high — its gradient norm or its direction?

For a dot-product score s_n = Σ_t η_t ⟨g_nt, v_t⟩ (``pds``: v_t = λ_{t+1}; ``target_dot``:
v_t = ∇J(θ_t)) each term is ‖g_nt‖·‖v_t‖·cos_nt. A mislabeled example has a gradient many
times longer than a clean one, so a weak alignment still yields the largest |s|. This
module reports:

- the decomposition (mean ‖g‖, η-weighted mean cos) and how well it reproduces the dots;
- the inflation index: Spearman correlation of |s| with mean ‖g‖, and the share of Σ|s|
  carried by the examples with the top 1% gradient norms;
- with a known noisy mask: AUROC, average precision and precision@k (k = number flagged
  noisy) of every available score for flagging the noisy examples (scikit-learn), and the
  share of noisy examples in the top-k and bottom-k (k = 10% of N) of each variant;
- the variants of ``scores.pds.variants``: cosine-only, norm-clipped, per-checkpoint
  rank-normalized, norm-residualized.
For an in-run file (``gs.InRun``), ``inrun_value`` = Σ_t η_t ⟨∇L_b, ∇J(θ_t)⟩ is read the same
way from its records, with the variants records allow (raw, cos, clip).
Output: a text table, ``diagnosis.json`` and plots in ``--out``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .._version import __version__
from ..config import as_path, checked_fraction
from ..io.atomic import atomic_json
from ..io.datasets import Dataset, check_scored, load_dataset, mask_problem, positions_of
from ..exceptions import GradscoreError
from ..io.outputs import claim
from ..scores.inrun import dot_terms as inrun_dot_terms
from ..scores.pds import DOT_SCORES, VARIANTS, dot_terms
from .flag import ORIENTATION, count_line, counted, default_score, suspicion
from ..io.store import checkpoint_rows, inrun_blocks, load_scores, read_numpy

#: the dot-product score of an in-run file (gs.InRun), diagnosed from its records
INRUN_SCORE = "inrun_value"


def _mask(res: dict[str, Any], noisy_mask: str | None, ds: Dataset | None) -> tuple[np.ndarray | None, str]:
    if noisy_mask is not None:
        path = Path(noisy_mask)
        try:
            arr = read_numpy(path)
            arr = arr["noisy"] if isinstance(arr, dict) else arr
        except (OSError, ValueError, KeyError) as e:
            raise GradscoreError(f"{path}: cannot read a noisy mask (.npy, or .npz with 'noisy'): {e}") from e
        source = str(path)
    elif ds is not None:
        arr = ds.noisy()
        if arr is None:
            return None, f"{ds.source} has no 'noisy' field"
        arr, source = arr[positions_of(ds, res["ids"])], ds.source   # the scored examples, by id
    elif res["noisy"] is not None:
        return res["noisy"].astype(bool), "the scores file"
    else:
        return None, "no noisy mask in the scores file; pass --noisy-mask FILE or --data FILE"
    arr = np.asarray(arr)
    problem = mask_problem(arr) if noisy_mask is not None else None   # a dataset's field: checked at its opening
    if problem is not None:
        raise GradscoreError(f"{source}: noisy mask {problem}")
    if arr.shape != res["ids"].shape:
        raise GradscoreError(f"{source}: noisy mask has {arr.shape[0]} entries, the scores file {len(res['ids'])}; "
                             f"give one per example of the scores file, in its order")
    return arr.astype(bool), source


def _flag_metrics(noisy: np.ndarray, s: np.ndarray) -> dict[str, float]:
    """AUROC, AP and precision at k (k = the noisy ones) of ``s`` for the ``noisy`` mask, over
    the examples whose score is finite (``scored``: how many; an in-run value is NaN where no
    target step met the example)."""
    from sklearn.metrics import average_precision_score, roc_auc_score
    ok = np.isfinite(s)
    noisy, s = noisy[ok], s[ok]
    k = int(noisy.sum())
    top = np.argsort(-s, kind="stable")[:k]
    both = 0 < k < len(noisy)   # AUROC and AP need both kinds of example
    return {"auroc": float(roc_auc_score(noisy, s)) if both else float("nan"),
            "ap": float(average_precision_score(noisy, s)) if both else float("nan"),
            "precision_at_k": float(noisy[top].mean()) if k else float("nan"), "scored": int(ok.sum())}


def diagnose(scores: str | Path, *, score: str = "pds", noisy_mask: str | None = None, data: str | None = None,
             out: str | Path | None = None, top_fraction: float = 0.1, clip_quantile: float = 0.9,
             echo: Callable[[str], None] = print, overwrite: bool = False, rerun: str | None = None
             ) -> dict[str, Any]:
    """Diagnose a scores file (see module docstring); returns what ``diagnosis.json`` holds,
    with the decomposition's per-example ``mean_grad_norm`` and ``mean_cos`` ((N,) float64).
    Files already in ``out`` are replaced only with ``overwrite``, and only gradscore's.
    ``rerun``: what gives the dot score where the file has none (default: a ``gradscore run``
    command line with a target)."""
    if out is not None:
        inputs = {"the scores file": [scores], "the --data file": [data], "the noisy mask": [noisy_mask]}
        for name, kind in OUTPUT_FILES.items():
            claim(Path(out) / name, kind, inputs=inputs, overwrite=overwrite)
    checked_fraction("top_fraction", top_fraction)   # each tail's share; 0 read as one example, 1.5 as every one
    checked_fraction("clip_quantile", clip_quantile)   # as RunConfig checks it for the variants
    if score not in (*DOT_SCORES, INRUN_SCORE):
        raise GradscoreError(f"--score must be one of {', '.join((*DOT_SCORES, INRUN_SCORE))}, got '{score}'")
    res = load_scores(as_path(scores, "scores"), per_checkpoint=False)
    if score in DOT_SCORES:   # what the decomposition reads, a checkpoint at a time: the dots, the norms
        res["per_checkpoint"] = checkpoint_rows(scores, (DOT_SCORES[score][0], "sq_grad_norm"))
    if score == INRUN_SCORE:
        res["inrun"] = inrun_blocks(scores)   # the records, read block by block
    ds = load_dataset(data) if data is not None else None
    if ds is not None:
        check_scored(ds, scores)
    noisy, source = _mask(res, noisy_mask, ds)
    report, var = compute(res, str(scores), score=score, noisy=noisy, source=source, ds=ds,
                          top_fraction=top_fraction, clip_quantile=clip_quantile, rerun=rerun)
    for line in render(report, top_fraction):
        echo(line)
    if out is not None:
        _write(Path(out), report, res, noisy, var, score)
        echo(f"\ndiagnosis -> {Path(out) / 'diagnosis.json'}")
    return report


def _flags(res: dict[str, Any], ds: Dataset | None, skip: Callable[[str], None]) -> dict[str, np.ndarray]:
    """Candidates for flagging noisy examples, each (N,), higher = more suspicious."""
    s = res["scores"]
    flags = {name if sign > 0 else f"-{name}": suspicion(s, name) for name, sign in ORIENTATION.items() if name in s}
    if ds is not None:
        norms = [x.reshape(len(x), -1).double().norm(dim=1).numpy() for _, x, _ in ds.chunks()
                 if isinstance(x, torch.Tensor)]
        if norms:
            flags["input_norm"] = np.concatenate(norms)[positions_of(ds, res["ids"])]
        else:
            skip("input_norm: token inputs have no meaningful norm")
    return flags


def _inflation(var: dict[str, np.ndarray], mean_g: np.ndarray, top1: np.ndarray) -> dict[str, dict[str, float]]:
    """How much each variant's |score| follows the gradient norm ``mean_g``: Spearman's ρ of
    the two and the share of Σ|score| held by the ``top1`` examples by norm, over the finite
    values; NaN where undefined (fewer than two values, a constant, a Σ|score| of 0)."""
    from scipy.stats import spearmanr
    out = {}
    for v, x in var.items():
        a = np.abs(x)
        ok = np.isfinite(a) & np.isfinite(mean_g)
        varies = ok.sum() > 1 and np.ptp(a[ok]) > 0 and np.ptp(mean_g[ok]) > 0
        total = np.nansum(a)
        out[v] = {"spearman_abs_score_vs_norm": float(spearmanr(a[ok], mean_g[ok])[0]) if varies else np.nan,
                  "top1pct_norm_share_of_abs_score": float(np.nansum(a[top1]) / total) if total > 0 else np.nan}
    return out


def compute(res: dict[str, Any], source_file: str, *, score: str, noisy: np.ndarray | None, source: str,
            ds: Dataset | None = None, top_fraction: float = 0.1, clip_quantile: float = 0.9,
            rerun: str | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The diagnosis of a loaded scores file ``res``: (report, {variant: (N,) score});
    ``rerun`` as in :func:`diagnose`.

    Nothing is printed or written: :func:`render` turns the report into text lines."""
    pc, ck = res["per_checkpoint"], res["checkpoints"]
    n = len(res["ids"])
    report: dict[str, Any] = {"scores_file": source_file, "n": n, "score": score, "skipped": [],
                              "warnings": res["warnings"]}
    skip = report["skipped"].append
    flags = _flags(res, ds, skip)
    var: dict[str, np.ndarray] = {}
    dot_key, norm_key = DOT_SCORES.get(score, (None, None))
    recording = bool(res["config"].get("inrun"))
    if score == INRUN_SCORE and recording and not res["config"].get("targets"):
        skip(f"{source_file} has no inrun_value: it was recorded without a target gradient; record with "
             f"gs.InRun(..., targets=...) for the decomposition and the variants")
    elif score == INRUN_SCORE and "inrun" in res:   # recorded in training: per (step, example) records
        terms = inrun_dot_terms(res["inrun"], n, clip_quantile)
        mean_g = np.nan_to_num(terms.pop("mean_grad_norm"))
        mean_cos = np.nan_to_num(terms.pop("mean_cos"))
        var = terms
        top1 = np.argsort(-mean_g, kind="stable")[:max(1, n // 100)]
        report["decomposition"] = {"max_abs_error": 0.0, "max_rel_error": 0.0, "mean_grad_norm": mean_g,
                                   "mean_cos": mean_cos}   # cos is read from the dot: exact by construction
        report["inflation"] = _inflation(var, mean_g, top1)   # over the examples a target step met (NaN: none)
        flags[f"|{score}|"] = np.abs(var["raw"])
        flags.update({f"-{score}_{v}": -x for v, x in var.items()})
    elif dot_key in pc and "sq_grad_norm" in pc and norm_key in ck and "eta" in ck:
        T = pc[dot_key].shape[0]
        weight = np.append(ck["eta"], np.zeros(T - len(ck["eta"])))
        terms = dot_terms(pc[dot_key], pc["sq_grad_norm"], ck[norm_key], weight, clip_quantile=clip_quantile)
        raw, mean_g = terms["raw"], terms["mean_grad_norm"]
        var = {k: terms[k] for k in ("raw", *VARIANTS)}
        top1 = np.argsort(-mean_g, kind="stable")[:max(1, n // 100)]
        error = float(terms["abs_error"].max(initial=0.0))
        report["decomposition"] = {
            "max_abs_error": error,
            "max_rel_error": error / max(float(terms["abs_dot"].max(initial=0.0)), np.finfo(float).tiny),
            "mean_grad_norm": mean_g, "mean_cos": terms["mean_cos"]}
        report["inflation"] = _inflation(var, mean_g, top1)
        flags[f"|{score}|"] = np.abs(raw)
        flags.update({f"-{score}_{v}": -x for v, x in var.items()})
    elif recording:   # a recording's dot score is inrun_value
        skip(f"{source_file} is a recording of training steps, without {score}: {score} comes from saved "
             f"checkpoints (`gradscore run --target FILE --scores {score},grand`); the recording's dot score is "
             f"--score {INRUN_SCORE}")
    else:
        rerun = rerun or f"rerun `gradscore run --target FILE --scores {score},grand`"
        skip(f"no per-checkpoint {dot_key} with reference norms in {source_file}: {rerun} for the decomposition "
             f"and the variants")
    name = default_score(res["scores"])
    values = None if name is None else suspicion(res["scores"], name)
    if values is not None and np.isfinite(values).sum() >= 10:   # how many look mislabeled (gradscore flag)
        report["flag"] = {"score": name, "n": n, **counted(source_file, res, name, values)[1]}
    if noisy is None:
        skip(f"mask-based figures ({source})")
        return report, var
    report["noisy_source"], report["n_noisy"] = source, int(noisy.sum())
    report["base_rate"] = float(noisy.mean())
    report["flagging"] = {name: _flag_metrics(noisy, x) for name, x in flags.items()}
    if var:
        k = max(1, int(round(top_fraction * n)))
        finite = {v: np.flatnonzero(np.isfinite(x)) for v, x in var.items()}   # NaN: not measured, in no tail
        report["contamination"] = {
            v: {"top": float(noisy[finite[v][np.argsort(-x[finite[v]], kind="stable")[:k]]].mean()),
                "bottom": float(noisy[finite[v][np.argsort(x[finite[v]], kind="stable")[:k]]].mean())}
            for v, x in var.items()}
    return report, var


def render(report: dict[str, Any], top_fraction: float = 0.1) -> list[str]:
    """The report as the text lines ``gradscore diagnose`` prints."""
    lines = [f"warning: {text}" for text in report["warnings"]]   # a diverged co-state first
    score = report["score"]
    if "decomposition" in report:
        d = report["decomposition"]
        lines += [f"{score} = Σ_t η_t ‖g‖‖v‖cos: decomposition error {d['max_rel_error']:.2e} "
                  f"of the largest |⟨g, v⟩| ({d['max_abs_error']:.2e} absolute)",
                  f"{'variant':<10}{'spearman(|s|, ‖g‖)':>22}{'top-1% ‖g‖ share of Σ|s|':>28}"]
        lines += [f"{v:<10}{x['spearman_abs_score_vs_norm']:>22.3f}{x['top1pct_norm_share_of_abs_score']:>28.3f}"
                  for v, x in report["inflation"].items()]
    if "flag" in report:
        f = report["flag"]
        lines.append("gradscore flag by " + count_line(f))
    lines += [f"skipped: {why}" for why in report["skipped"]]
    if "flagging" in report:
        lines += [f"\nflagging the {report['n_noisy']} noisy examples ({report['noisy_source']}); "
                  f"higher = more suspicious", f"{'score':<22}{'AUROC':>8}{'AP':>8}{'P@k':>8}"]
        lines += [f"{name:<22}{m['auroc']:>8.3f}{m['ap']:>8.3f}{m['precision_at_k']:>8.3f}"
                  + (f"   over the {m['scored']} of {report['n']} with a value" if m.get("scored", report["n"])
                     < report["n"] else "") for name, m in report["flagging"].items()]
    if "contamination" in report:
        lines.append(f"\nshare noisy in the top / bottom {top_fraction:.0%} by {score} "
                     f"(base rate {report['base_rate']:.3f})")
        lines += [f"  {v:<8} top {c['top']:.3f}   bottom {c['bottom']:.3f}" for v, c in report["contamination"].items()]
    return lines


#: what :func:`diagnose` may write into its ``out`` directory, and of which kind
OUTPUT_FILES = {"diagnosis.json": "json", "norm_vs_cos.png": "figure", "variants.png": "figure",
                "datamap.png": "figure"}


def _write(out: Path, report: dict, res: dict, noisy: np.ndarray | None, var: dict, score: str) -> None:
    from .plots import data_map, norm_vs_cos, score_histograms, statistics_over
    out.mkdir(parents=True, exist_ok=True)
    decomposition = report.get("decomposition", {})
    atomic_json(out / "diagnosis.json", {k: v for k, v in report.items() if k != "decomposition"}
                | {f"decomposition_{k}": decomposition[k] for k in ("max_abs_error", "max_rel_error") if decomposition}
                | {"gradscore_version": __version__}, indent=2)
    if var:
        norm_vs_cos(report["decomposition"]["mean_grad_norm"], report["decomposition"]["mean_cos"],
                    out / "norm_vs_cos.png", noisy=noisy, title=f"{score}: gradient norm vs direction",
                    over=statistics_over(res))
        score_histograms({f"{score}_{v}": x for v, x in var.items()}, noisy, out / "variants.png")
    s = res["scores"]
    if all(k in s for k in ("confidence", "variability", "correctness")):
        data_map(s["confidence"], s["variability"], s["correctness"], out / "datamap.png", noisy=noisy,
                 over=statistics_over(res))
