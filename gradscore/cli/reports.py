"""``select``, ``plot``, ``diagnose`` and ``info``: read a scores file."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..exceptions import GradscoreError
from ..config import DATA_MAP_POINTS, as_names
from .common import (StoreFalseNoted, StoreNoted, StoreTrueNoted, add_overwrite, add_scores_file, command,
                     refuse_unused, warn)

def _add_select_and_plot(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "select", help="choose examples by a score, a data-map region, or JTT",
                 description="Write the selected indices and ids as JSON. One of: --by SCORE "
                 "(keep a fraction by rank), --region easy|ambiguous|hard|all (cartography "
                 "regions), --jtt (error set of a checkpoint and per-example weights).")
    add_scores_file(p)
    p.add_argument("--out", required=True, metavar="FILE.json", help="where to write the selection (JSON)")
    p.add_argument("--by", default=None, metavar="SCORE", help="e.g. el2n, grand, pds, confidence")
    p.add_argument("--keep", type=float, default=0.5, action=StoreNoted, help="--by: fraction to keep")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--highest", dest="highest", action=StoreTrueNoted, default=True,
                       help="--by: keep the highest values (the default)")
    order.add_argument("--lowest", dest="highest", action=StoreFalseNoted, help="--by: keep the lowest")
    p.add_argument("--exclude-top", type=float, default=0.0, action=StoreNoted,
                   help="--by: first drop this fraction at the top of the ranking: the highest "
                        "values (with --lowest, the lowest), e.g. likely mislabeled examples")
    p.add_argument("--region", default=None, choices=("easy", "ambiguous", "hard", "all"),
                   help="Dataset Cartography region(s) by confidence and variability (needs those scores)")
    p.add_argument("--fraction", type=float, default=0.33, action=StoreNoted,
                   help="--region: fraction of the data per region")
    p.add_argument("--jtt", action="store_true", help="JTT: error set and weights (FILE_weights.npz)")
    p.add_argument("--upweight", type=float, default=20.0, action=StoreNoted, help="--jtt: weight of the error set")
    p.add_argument("--per-class", action=StoreTrueNoted,
                   help="--by: keep the fraction within each class (the labels of --data), so no class is lost")
    p.add_argument("--data", default=None, metavar="FILE", action=StoreNoted,
                   help="--per-class: the scored data, for its labels")
    p.add_argument("--sample", default=None, choices=("gumbel",), action=StoreNoted,
                   help="--by: draw a weighted sample without replacement (weight exp(score / T)) instead of "
                   "the hard top-k, for diversity")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", action=StoreNoted,
                   help="--sample: T; smaller = closer to top-k")
    p.add_argument("--seed", type=int, default=0, action=StoreNoted, help="--sample: the random seed")
    p.add_argument("--allow-nonfinite", action=StoreTrueNoted,
                   help="--by/--region: leave out the examples whose score is NaN/Inf (a run with "
                   "--allow-nonfinite) and list them in 'nonfinite_ids'; default: stop, naming them")
    p.add_argument("--checkpoint", type=int, default=-1, action=StoreNoted,
                   help="--jtt: index of the checkpoint whose errors are taken (an early one, as JTT does)")
    add_overwrite(p)
    p = command(sub, "plot", help="data map or score histograms from a scores file",
                 description="--kind datamap: confidence vs variability coloured by correctness, "
                 "regions shaded (needs the dynamics scores); --kind hist: every score, clean vs "
                 "known-noisy when the data marks it. PNG or SVG by the extension of --out.")
    add_scores_file(p)
    p.add_argument("--kind", default=None, choices=("datamap", "hist"),
                   help="datamap: confidence vs variability; hist: every score's histogram (default: hist "
                   "with --scores, else datamap)")
    p.add_argument("--out", required=True, metavar="FILE.png|svg", help="figure to write (PNG or SVG)")
    p.add_argument("--max-points", type=int, default=DATA_MAP_POINTS, action=StoreNoted,
                   help="datamap: hexbin above this many examples")
    p.add_argument("--scores", dest="only", default=None, metavar="NAME,...", action=StoreNoted,
                   help="hist: the scores to show (default: every score in the file)")
    add_overwrite(p)


#: select's options that apply to one way of selecting: dest -> (option, the way)
SELECT_OPTIONS = {"keep": ("--keep", "--by"), "highest": ("--highest/--lowest", "--by"),
                  "exclude_top": ("--exclude-top", "--by"), "per_class": ("--per-class", "--by"),
                  "sample": ("--sample", "--by"), "temperature": ("--temperature", "--sample"),
                  "seed": ("--seed", "--sample"), "fraction": ("--fraction", "--region"),
                  "upweight": ("--upweight", "--jtt"), "checkpoint": ("--checkpoint", "--jtt"),
                  "allow_nonfinite": ("--allow-nonfinite", "--by or --region"), "data": ("--data", "--per-class")}


def _cmd_select(args: argparse.Namespace) -> int:
    from ..reports.select import select
    used = ({"--by"} if args.by else set()) | ({"--region"} if args.region else set()) | \
        ({"--jtt"} if args.jtt else set()) | ({"--sample"} if args.sample else set()) | \
        ({"--per-class"} if args.per_class else set())
    refuse_unused(args, SELECT_OPTIONS, used | ({"--by or --region"} if used & {"--by", "--region"} else set()))
    res = select(args.scores, by=args.by, keep=args.keep, highest=args.highest, exclude_top=args.exclude_top,
                 region=args.region, fraction=args.fraction, jtt=args.jtt, upweight=args.upweight,
                 checkpoint=args.checkpoint, out=args.out, overwrite=args.overwrite,
                 allow_nonfinite=args.allow_nonfinite, per_class=args.per_class, data=args.data,
                 sample=args.sample, temperature=args.temperature, seed=args.seed)
    warn("select", res["warnings"])
    if res.get("nonfinite_ids"):
        warn("select", [f"left out {len(res['nonfinite_ids'])} example(s) with a NaN/Inf score "
                         f"(listed in 'nonfinite_ids')"])
    n = res.get("n_selected", res.get("n_errors"))
    print(f"selection -> {args.out}" + (f" ({n} examples)" if n is not None else "")
          + (f"; weights -> {res['weights_file']}" if "weights_file" in res else ""))
    return 0


#: plot's options that apply to one kind of figure: dest -> (option, the kind)
PLOT_OPTIONS = {"max_points": ("--max-points", "--kind datamap"), "only": ("--scores", "--kind hist")}


def _cmd_plot(args: argparse.Namespace) -> int:
    from ..io.outputs import claim
    from ..reports.plots import data_map, score_histograms, statistics_over
    from ..io.store import load_scores
    from ..scores.registry import how_to_add, missing_scores_fix
    if Path(args.out).suffix.lower() not in (".png", ".svg"):
        raise GradscoreError(f"{args.out}: --out must end in .png or .svg")
    kind = args.kind or ("hist" if args.only else "datamap")   # --scores alone: the histograms
    refuse_unused(args, PLOT_OPTIONS, {f"--kind {kind}"})
    claim(args.out, "figure", inputs={"the scores file": [args.scores]}, overwrite=args.overwrite)
    res = load_scores(args.scores, per_checkpoint=False)
    warn("plot", res["warnings"])
    s = res["scores"]
    if kind == "hist":
        shown = as_names(args.only) if args.only else sorted(s)
        unknown = [k for k in shown if k not in s]
        if unknown:
            raise GradscoreError(f"--scores: {', '.join(unknown)} not in {args.scores} (it has: "
                                 f"{', '.join(sorted(s))}); {missing_scores_fix(res['config'], unknown, s)}")
        n, T = len(res["ids"]), len(res["checkpoints"].get("step", ()))   # the checkpoints the file's rows hold
        span = "recorded in training" if res["config"].get("inrun") else f"over {T} checkpoint{'s' * (T != 1)}"
        score_histograms({k: s[k] for k in shown}, res["noisy"], args.out,
                         title=f"score distributions of {n:,} examples {span} — {Path(args.scores).name}")
    else:
        missing = [k for k in ("confidence", "variability", "correctness") if k not in s]
        if missing:
            raise GradscoreError(f"{args.scores}: no {', '.join(missing)} scores for the data map; "
                                 f"{how_to_add(res['config'], missing)}")
        data_map(s["confidence"], s["variability"], s["correctness"], args.out, noisy=res["noisy"],
                 max_points=args.max_points, title=Path(args.scores).name,
                 over=statistics_over(res))
    print(f"plot -> {args.out}")
    return 0


def _add_diagnose(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "diagnose", help="why examples score high: gradient norm vs direction",
                 description="Decompose a dot-product score (pds, target_dot, or inrun_value of a file "
                 "written by gs.InRun) into ‖g‖·‖v‖·cos, measure "
                 "how much the gradient norm inflates it, and, with a known noisy mask, report AUROC / AP / "
                 "precision@k of every score and variant for flagging the noisy examples and the share of "
                 "noisy examples in the top and bottom of each variant. Writes diagnosis.json and plots.")
    p.add_argument("scores", metavar="SCORES.h5", help="a scores file with pds or target_dot, or an in-run file")
    p.add_argument("--score", default="pds", choices=("pds", "target_dot", "inrun_value"),
                   help="the dot-product score to diagnose (inrun_value: a file written by gs.InRun)")
    mask = p.add_mutually_exclusive_group()
    mask.add_argument("--noisy-mask", default=None, metavar="FILE",
                      help="the known-noisy examples: a .npy mask (bool, or 0 and 1), one entry per example of the "
                           "scores file in its order, or an .npz with it as 'noisy'")
    mask.add_argument("--data", default=None, metavar="FILE",
                      help="the scored dataset: its 'noisy' field, and ‖x‖ as a baseline score")
    p.add_argument("--out", default=None, metavar="DIR", help="write diagnosis.json and plots here")
    p.add_argument("--top-fraction", type=float, default=0.1, help="size of the top/bottom sets")
    add_overwrite(p)


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from ..reports.diagnose import diagnose
    refuse_unused(args, {"overwrite": ("--overwrite", "--out")}, {"--out"} if args.out is not None else set())
    diagnose(args.scores, score=args.score, noisy_mask=args.noisy_mask, data=args.data, out=args.out,
             top_fraction=args.top_fraction, overwrite=args.overwrite)
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a checkpoint dir, dataset or scores file",
                       description="Describe a checkpoint directory, a dataset file, or a file gradscore "
                       "wrote (scores, in-run, co-state, sketch, attribution); --env prints the kernel "
                       "backends and library versions.")
    p.add_argument("path", nargs="?", default=None,
                   help="checkpoint dir, dataset, or a scores, co-state, sketch or attribution file")
    p.add_argument("--env", action="store_true", help="print the environment (kernel backends, versions)")


def _cmd_info(args: argparse.Namespace) -> int:
    from ..reports.info import describe
    if args.env:
        from ..reports.info import environment
        print(json.dumps(environment(), indent=2))
    if args.path is not None:
        print(describe(Path(args.path)))
    elif not args.env:
        raise GradscoreError("info needs a PATH (checkpoint dir, dataset or scores file) or --env")
    return 0


def _add_flag(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "flag", help="estimate how many examples are mislabeled, and which",
                description="Fit a two-component mixture to a mislabel score (higher or lower = more suspicious, "
                "as the score says) and flag the examples of the suspicious component; write their ids and "
                "scores, the estimated count and rate, the rate per class (with --data) and precision/recall "
                "against a known-noisy mask when there is one. Where no suspicious minority separates from the "
                "rest, it flags nothing and gives no count (which does not mean the labels are clean). It calls "
                "the count rough where the two populations overlap, where a three-component mixture moves it by "
                "over a quarter, where the model predicts under 95% of the examples the count calls clean as "
                "labelled (it has not fit its data: train longer), and for a score other than mislabel or aum "
                "(whose counts bench/flag_counts.py checks against the truth). Under instance-dependent noise "
                "(labels flipped on the most confusable examples) a count can still be several times the truth "
                "with no caution: rank instead (gradscore select).")
    add_scores_file(p)
    p.add_argument("--score", default=None, metavar="NAME",
                   help="the score to flag by (default: the first of mislabel, aum, el2n, loss in the file)")
    p.add_argument("--data", default=None, metavar="FILE", help="the scored data: its labels give the rate per class")
    p.add_argument("--out", required=True, metavar="FILE.json", help="where to write the report (JSON)")
    add_overwrite(p)


def _cmd_flag(args: argparse.Namespace) -> int:
    from ..reports.flag import count_line, flag
    rep = flag(args.scores, score=args.score, data=args.data, out=args.out, overwrite=args.overwrite)
    warn("flag", rep["warnings"])
    known = rep.get("against_known_noisy")
    print(count_line(rep) + (f"; against the {known['true_count']} known: precision {known['precision']:.3f}, "
                             f"recall {known['recall']:.3f}" if known and rep["estimated_count"] is not None else ""))
    print(f"flagged -> {args.out}")
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    """Register these commands."""
    _add_select_and_plot(sub)
    _add_diagnose(sub)
    _add_flag(sub)
    _add_info(sub)
    sub.choices["select"].set_defaults(func=_cmd_select)
    sub.choices["plot"].set_defaults(func=_cmd_plot)
    sub.choices["diagnose"].set_defaults(func=_cmd_diagnose)
    sub.choices["info"].set_defaults(func=_cmd_info)
    sub.choices["flag"].set_defaults(func=_cmd_flag)
