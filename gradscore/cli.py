"""The ``gradscore`` command line. Exit codes: 0 success, 2 bad input (one line on stderr)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from .config import AVAILABLE_SCORES, DEVICES, DTYPES, ENGINES, GRADIENT_SCORES, LM_REDUCTIONS, RunConfig
from .exceptions import GradscoreError, one_line

EPILOG = """examples:
  gradscore demo --out demo/                       # train on digits, score, report
  gradscore run --checkpoints demo/ckpts --data demo/data/train.h5 --out scores.h5
  gradscore info scores.h5

A killed `run` resumes where it stopped when rerun with the same options."""
OVERWRITE_HELP = "replace an existing output of the same kind (never an input, never another kind of file)"


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Appends an option's default to its help, unless it is None, empty or a flag's bool."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, "") or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _command(sub: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose --help shows every option's default."""
    return sub.add_parser(name, formatter_class=_ShowDefaults, **kwargs)


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "run", help="score every example at every checkpoint",
                 description="Stream a dataset through every checkpoint of a training run "
                 "and write per-checkpoint metrics and aggregated scores to an HDF5 file.")
    d = RunConfig(checkpoints="", data="")
    p.add_argument("--checkpoints", required=True, metavar="DIR",
                   help="directory of step_<n>.h5 files written by gradscore.CheckpointWriter")
    p.add_argument("--data", required=True, metavar="FILE",
                   help=".h5/.npz with 'inputs' and 'targets' (optional 'ids', 'noisy'); for text "
                   "'input_ids' (+ 'attention_mask', 'labels' with -100 = ignored, or 'targets' for "
                   "classification); or a 'module:fn' returning a torch Dataset of (input, target)")
    p.add_argument("--out", required=True, metavar="FILE", help="scores file to write (HDF5)")
    p.add_argument("--scores", default=None,
                   help=f"comma-separated scores, from: {', '.join(AVAILABLE_SCORES)}; "
                   f"{', '.join(s for s in AVAILABLE_SCORES if s in GRADIENT_SCORES)} need per-example gradients "
                   f"(the others one forward pass); default: {','.join(d.scores)}, or loss,grand for a "
                   f"language-modelling loss")
    p.add_argument("--ids", default=None, metavar="FILE",
                   help="score only the examples with these ids: a text file with one id per line, or a "
                   ".npy array (positions 0..N-1 when the data has no 'ids' field)")
    p.add_argument("--range", dest="index_range", default=None, metavar="A:B",
                   help="score only the examples at positions A up to (not including) B, e.g. 0:1000 "
                   "or 5000: (the output holds those examples, with their ids); not with --ids")
    p.add_argument("--params", default=None, metavar="PATTERN,...",
                   help="score only the parameters whose names match these shell patterns ('head.*'); "
                   "default: every trainable parameter")
    p.add_argument("--engine", default=d.engine, choices=ENGINES,
                   help="per-example gradient engine: auto (= ghost) takes a ghost rule per layer, else vmap, "
                   "else the per-example loop, per parameter; vmap everywhere; loop, the slow reference")
    p.add_argument("--device", default=d.device, choices=DEVICES,
                   help="where to score: auto takes cuda when available, else cpu")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES,
                   help="the model's dtype while scoring (sums accumulate in float32, float64 for float64)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per engine call")
    p.add_argument("--chunk-size", type=int, default=d.chunk_size,
                   help="examples per resumable unit of work")
    p.add_argument("--chunk-mb", type=int, default=d.chunk_bytes // 2**20,
                   help="memory budget (MiB) of one per-example gradient block")
    p.add_argument("--epochs-upto", type=float, default=None, metavar="E",
                   help="aggregate only over checkpoints with epoch <= E (Data Diet's early scores)")
    p.add_argument("--target", default=None, metavar="FILE",
                   help="target (downstream) dataset: needed by pds, target_dot, target_cos")
    p.add_argument("--costate", default=None, metavar="FILE",
                   help="co-state file (default CHECKPOINTS/costate.h5; computed when missing)")
    p.add_argument("--lr-scale-steps", action="store_true",
                   help="PDS with sparse checkpoints: η_t = lr × optimizer steps to the next checkpoint")
    p.add_argument("--variants", default="", metavar="V,...",
                   help="also store pds_<V>/target_dot_<V> for V in cos (direction only), clip (‖g‖ clipped "
                   "at --clip-quantile), rank (per-checkpoint ranks), resid (log‖g‖ regressed out)")
    p.add_argument("--clip-quantile", type=float, default=0.9, metavar="Q",
                   help="the clip variant clips ‖g_nt‖ at this quantile of all ‖g_nt‖")
    _add_lm_reduction(p)
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="keep going past NaN/Inf inputs or scores and record those examples in /nonfinite "
                   "(default: stop with the first chunk's example ids and checkpoint)")
    p.add_argument("--distributed", action="store_true",
                   help="require torchrun (`torchrun --nproc-per-node N -m gradscore run ...`): ranks split "
                   "the chunks, rank 0 computes the co-states and joins the result; under torchrun "
                   "this is automatic")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a scores file (or discard an interrupted run) made with other options; "
                   "never an input, never a file that is not a gradscore scores file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_lm_reduction(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lm-reduction", default="mean", choices=LM_REDUCTIONS,
                   help="causal_lm checkpoints: an example's loss is the mean (or sum) of its "
                   "predicted tokens' losses; sum weighs long documents more")


def _add_costate(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "costate", help="compute the PDS co-states λ_t from checkpoints",
                 description="Compute ∇J(θ_t) on the target set for every checkpoint and "
                 "the co-states λ_T = ∇J(θ_T), λ_t = ∇J(θ_t) + (I − η_t H_t) λ_{t+1} with "
                 "Hessian-vector products on the proxy set (γ_n = 1/N), backwards from the "
                 "last checkpoint. Resumable: rerun the same command after an interruption.")
    p.add_argument("--checkpoints", required=True, metavar="DIR",
                   help="directory of step_<n>.h5 files written by gradscore.CheckpointWriter")
    p.add_argument("--proxy", required=True, metavar="FILE", help="the training (proxy) set")
    p.add_argument("--target", required=True, metavar="FILE", help="the target (downstream) set")
    p.add_argument("--out", default=None, metavar="FILE", help="default: CHECKPOINTS/costate.h5")
    p.add_argument("--hvp-batch", type=int, default=256, help="examples per gradient/HVP chunk")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="where to compute: auto takes cuda when available, else cpu")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="the model's dtype while computing")
    p.add_argument("--lr-scale-steps", action="store_true",
                   help="η_t = lr × optimizer steps to the next checkpoint (sparse checkpoints)")
    _add_lm_reduction(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a co-state file made with other options; never an input, never another kind of file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _cmd_costate(args: argparse.Namespace) -> int:
    from .costate import CostateConfig, CostateFile, compute_costate
    path = compute_costate(CostateConfig(args.checkpoints, args.proxy, args.target, batch_size=args.hvp_batch,
                                         dtype=args.dtype, device=args.device,
                                         lr_scale_steps=args.lr_scale_steps,
                                         lm_reduction=args.lm_reduction),
                           args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"co-states -> {path}")
    _warn("costate", CostateFile(path).warnings)
    return 0


def _warn(command: str, found: list[str]) -> None:
    """Warnings stored in an output, one line each on stderr."""
    for text in found:
        print(f"gradscore {command}: warning: {text}", file=sys.stderr)


def _cmd_run(args: argparse.Namespace) -> int:
    from .api import run
    config = RunConfig(checkpoints=args.checkpoints, data=args.data,
                       scores=_split(args.scores) if args.scores is not None else _default_scores(args.checkpoints),
                       params=_split(args.params or ""),
                       engine=args.engine, device=args.device, dtype=args.dtype,
                       batch_size=args.batch_size, chunk_size=args.chunk_size,
                       chunk_bytes=args.chunk_mb * 2**20, epochs_upto=args.epochs_upto,
                       target=args.target, costate=args.costate, lr_scale_steps=args.lr_scale_steps,
                       variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
                       clip_quantile=args.clip_quantile, lm_reduction=args.lm_reduction,
                       allow_nonfinite=args.allow_nonfinite, ids=args.ids, index_range=args.index_range)
    path = run(config, args.out, overwrite=args.overwrite, progress=not args.quiet,
               distributed=args.distributed)
    if int(os.environ.get("RANK", "0")) == 0:
        from .store import load_scores
        print(f"scores -> {path}")
        _warn("run", load_scores(path)["warnings"])
    return 0


def _split(text: str) -> tuple[str, ...]:
    """A comma-separated option as a tuple of its non-empty items."""
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _default_scores(checkpoints: str) -> tuple[str, ...]:
    """--scores when not given: what the checkpoints' loss supports."""
    from .checkpoints import CheckpointStore
    from .losses import resolve_loss
    if resolve_loss(CheckpointStore(checkpoints).loss).output == "tokens":
        return ("loss", "grand")
    return RunConfig(checkpoints="", data="").scores


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.lm:
        from .demo_lm import run_lm_demo
        extra = {} if args.steps is None else {"steps": args.steps}
        run_lm_demo(args.out or "gradscore_demo_lm", n_docs=args.docs, engine=args.engine,
                    progress=not args.quiet, **extra)
        return 0
    if args.pds:
        from .demo import run_pds_demo
        run_pds_demo(args.out or "gradscore_demo_pds", steps=args.steps or 30, engine=args.engine,
                     progress=not args.quiet)
        return 0
    from .demo import run_demo
    run_demo(args.out or "gradscore_demo", epochs=args.epochs, n_train=args.n_train,
             engine=args.engine, progress=not args.quiet)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import describe
    if args.env:
        from .info import environment
        print(json.dumps(environment(), indent=2))
    if args.path is not None:
        print(describe(Path(args.path)))
    elif not args.env:
        raise GradscoreError("info needs a PATH (checkpoint dir, dataset or scores file) or --env")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from .bench import end_to_end, model_cases, run_bench
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError as e:
        raise GradscoreError(f"--batches: '{args.batches}' is not a comma-separated list of integers") from e
    models = tuple(args.models.split(",")) if args.models else None
    unknown = set(models or ()) - set(model_cases("cpu"))
    if unknown:
        raise GradscoreError(f"--models: unknown {', '.join(sorted(unknown))}; choose from "
                             f"{', '.join(model_cases('cpu'))}")
    if args.json:
        from .outputs import claim
        claim(args.json, "json", overwrite=args.overwrite)   # before the timing, not after
    result = run_bench(batches, args.repeats, device=args.device, models=models)
    if args.end_to_end:
        from .bench import pds_timing
        result["end_to_end"] = end_to_end(args.epochs, args.repeats)
        result["pds"] = pds_timing(repeats=args.repeats)
    if args.json:
        from . import __version__
        from .atomic import atomic_path
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({**result, "gradscore_version": __version__}, indent=2))
        print(f"-> {args.json}")
    return 0


def _add_select_and_plot(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "select", help="choose examples by a score, a data-map region, or JTT",
                 description="Write the selected indices and ids as JSON. One of: --by SCORE "
                 "(keep a fraction by rank), --region easy|ambiguous|hard|all (cartography "
                 "regions), --jtt (error set of a checkpoint and per-example weights).")
    p.add_argument("scores", metavar="SCORES.h5", help="a scores file written by gradscore run")
    p.add_argument("--out", required=True, metavar="FILE.json", help="where to write the selection (JSON)")
    p.add_argument("--by", default=None, metavar="SCORE", help="e.g. el2n, grand, pds, confidence")
    p.add_argument("--keep", type=float, default=0.5, help="--by: fraction to keep")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--highest", dest="highest", action="store_true", default=True,
                       help="--by: keep the highest values")
    order.add_argument("--lowest", dest="highest", action="store_false", help="--by: keep the lowest")
    p.add_argument("--exclude-top", type=float, default=0.0, help="--by: first drop this fraction at the top")
    p.add_argument("--region", default=None, choices=("easy", "ambiguous", "hard", "all"),
                   help="Dataset Cartography region(s) by confidence and variability (needs those scores)")
    p.add_argument("--fraction", type=float, default=0.33, help="--region: fraction of the data per region")
    p.add_argument("--jtt", action="store_true", help="JTT: error set and weights (FILE_weights.npz)")
    p.add_argument("--upweight", type=float, default=20.0, help="--jtt: weight of the error set")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="--by/--region: leave out the examples whose score is NaN/Inf (a run with "
                   "--allow-nonfinite) and list them in 'nonfinite_ids'; default: stop, naming them")
    p.add_argument("--checkpoint", type=int, default=-1,
                   help="--jtt: index of the checkpoint whose errors are taken (an early one, as JTT does)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p = _command(sub, "plot", help="data map or score histograms from a scores file",
                 description="--kind datamap: confidence vs variability coloured by correctness, "
                 "regions shaded (needs the dynamics scores); --kind hist: every score, clean vs "
                 "known-noisy when the data marks it. PNG or SVG by the extension of --out.")
    p.add_argument("scores", metavar="SCORES.h5", help="a scores file written by gradscore run")
    p.add_argument("--kind", default="datamap", choices=("datamap", "hist"),
                   help="datamap: confidence vs variability; hist: every score's histogram")
    p.add_argument("--out", required=True, metavar="FILE.png|svg", help="figure to write (PNG or SVG)")
    p.add_argument("--max-points", type=int, default=20000, help="datamap: hexbin above this many examples")
    p.add_argument("--scores", dest="only", default=None, metavar="NAME,...",
                   help="hist: the scores to show (default: every score in the file)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def _add_import_export(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "import-dynamics", help="read training dynamics jsonl (cartography) into a scores file",
                 description="Read DIR/dynamics_epoch_<e>.jsonl (or DIR/training_dynamics/...) with "
                 "records {guid, gold, logits_epoch_<e> or logits}, streaming line by line, and "
                 "write per-epoch loss/el2n/p_gold/correct and the dynamics scores.")
    p.add_argument("directory", metavar="DIR", help="folder of the per-epoch dynamics jsonl files")
    p.add_argument("--format", default="cartography", choices=("cartography", "trainingdynamics"),
                   help="cartography: dynamics_epoch_<e>.jsonl; trainingdynamics: training_dynamics/ files")
    p.add_argument("--out", required=True, metavar="SCORES.h5", help="scores file to write (HDF5)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a scores file made from other files; never an input, never another kind of file")
    p = _command(sub, "export", help="write scores as td_metrics jsonl, csv or parquet",
                 description="td_metrics: one JSON line per example with guid, index, "
                 "threshold_closeness, confidence, variability, correctness, forgetfulness "
                 "(TrainingDynamics); csv/parquet: id and every score.")
    p.add_argument("scores", metavar="SCORES.h5", help="a scores file written by gradscore run")
    p.add_argument("--format", required=True, choices=("td_metrics", "csv", "parquet"),
                   help="td_metrics: jsonl as TrainingDynamics writes; csv or parquet: id and every score")
    p.add_argument("--out", required=True, metavar="FILE", help="file to write")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def _cmd_import(args: argparse.Namespace) -> int:
    from .dynamics_io import import_dynamics
    print(f"scores -> {import_dynamics(args.directory, args.out, fmt=args.format, overwrite=args.overwrite)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .dynamics_io import export_scores
    print(f"{args.format} -> {export_scores(args.scores, args.out, fmt=args.format, overwrite=args.overwrite)}")
    return 0


def _model_kwargs(text: str) -> dict:
    """--model-kwargs: a JSON object, or one line and exit 2."""
    try:
        kwargs = json.loads(text)
    except ValueError as e:
        raise GradscoreError(f"--model-kwargs: not valid JSON ({e})") from e
    if not isinstance(kwargs, dict):
        raise GradscoreError(f"--model-kwargs: must be a JSON object, got {text!r}")
    return kwargs


def _add_import_checkpoints(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "import-checkpoints", help="convert torch.save / safetensors checkpoints",
                 description="Convert a directory of existing checkpoints (torch.save state_dicts: .pt, "
                 ".pth, .bin; safetensors; directly in SRC_DIR or in subdirectories like checkpoint-1200/) "
                 "into gradscore checkpoints. The step is the last number in the file (or subdirectory) "
                 "name; the learning rate is --lr or --lr-schedule. Resumable.")
    p.add_argument("src", metavar="SRC_DIR", help="folder of torch.save / safetensors checkpoints")
    p.add_argument("--model", required=True, metavar="MODULE:FN", help="factory that rebuilds the model")
    p.add_argument("--model-kwargs", default="{}", metavar="JSON", help="keyword arguments of the factory")
    p.add_argument("--loss", default="cross_entropy",
                   help="cross_entropy, nll, mse, causal_lm or module:fn (per-example losses)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the gradscore checkpoints into")
    lr = p.add_mutually_exclusive_group(required=True)
    lr.add_argument("--lr", type=float, help="constant learning rate η_t")
    lr.add_argument("--lr-schedule", metavar="FILE.json", help='JSON {"step": lr, ...} covering every step')
    p.add_argument("--steps-per-epoch", type=int, default=None, help="epoch = step / this (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _cmd_import_checkpoints(args: argparse.Namespace) -> int:
    from .ckpt_import import import_checkpoints
    kwargs = _model_kwargs(args.model_kwargs)
    schedule = None
    if args.lr_schedule is not None:
        try:
            schedule = {int(k): float(v) for k, v in json.loads(Path(args.lr_schedule).read_text()).items()}
        except (OSError, ValueError, AttributeError) as e:
            raise GradscoreError(f"{args.lr_schedule}: not a JSON object {{step: lr}} ({e})") from e
    out = import_checkpoints(args.src, args.out, model_factory=args.model, model_kwargs=kwargs, loss=args.loss,
                             lr=args.lr, schedule=schedule, steps_per_epoch=args.steps_per_epoch,
                             progress=not args.quiet)
    print(f"checkpoints -> {out}")
    return 0


def _add_experiment(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "experiment", help="retrain on selected subsets: pruning curves, data-map regions, JTT",
                 description="Check a data-selection claim by retraining: 'prune' (Data Diet: keep 30-90% "
                 "of the training set by each score, with and without 20% flipped labels), 'regions' "
                 "(Dataset Cartography: train on 33% ambiguous/easy/hard/random vs all, test in and out of "
                 "distribution), 'jtt' (ERM vs Just Train Twice on a spurious-patch variant of digits: "
                 "average and worst-group accuracy). Embedded digits by default; prune and regions also "
                 "take --train/--test files and a --model factory. Writes OUT/<name>.json, .md and .png.")
    p.add_argument("name", choices=("prune", "regions", "jtt"), help="which experiment (see above)")
    p.add_argument("--out", default="gradscore_experiments", metavar="DIR",
                   help="folder for <name>.json, .md and .png")
    p.add_argument("--mode", default="fast", choices=("tiny", "fast", "full"),
                   help="fast: 1 seed, 8 epochs, fractions 30/50/100%% (< 3 min on 2 cores); full: 3 seeds, "
                   "15 epochs, 30/50/70/90/100%%; tiny: 300 examples, 2 epochs (a smoke test)")
    p.add_argument("--seeds", type=int, default=None, help="override the mode's number of seeds")
    p.add_argument("--fractions", default=None, metavar="F,...", help="prune: override the kept fractions")
    p.add_argument("--methods", default=None, metavar="M,...",
                   help="prune: el2n, grand, forgetting, pds, ambiguous, hard, random, each optionally with "
                   ":lowest (keep the lowest) and :exclude=F (drop the top F first)")
    p.add_argument("--keep", default="highest", choices=("highest", "lowest"),
                   help="prune: direction for methods given without ':lowest'")
    p.add_argument("--exclude-top", type=float, default=0.0, help="prune: default ':exclude=' for every method")
    p.add_argument("--train", default=None, metavar="FILE", help="prune/regions: your training set (.h5/.npz)")
    p.add_argument("--test", default=None, metavar="FILE", help="prune/regions: your test set")
    p.add_argument("--shifted-test", default=None, metavar="FILE", help="regions: your out-of-distribution test set")
    p.add_argument("--model", default=None, metavar="MODULE:FN", help="with --train: the model factory")
    p.add_argument("--model-kwargs", default="{}", metavar="JSON", help="with --model: its keyword arguments")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def _cmd_experiment(args: argparse.Namespace) -> int:
    import dataclasses

    from .experiments import MODES, file_setup
    mode = MODES[args.mode]
    if args.seeds is not None:
        mode = dataclasses.replace(mode, seeds=args.seeds)
    if args.fractions is not None:
        try:
            mode = dataclasses.replace(mode, fractions=tuple(float(f) for f in args.fractions.split(",")))
        except ValueError as e:
            raise GradscoreError(f"--fractions: '{args.fractions}' is not a comma-separated list of numbers") from e
    setup = None
    if args.train or args.test or args.model:
        if not (args.train and args.test and args.model) or args.name == "jtt":
            raise GradscoreError("your own data needs --train, --test and --model together (prune, regions)")
        setup = file_setup(args.train, args.test, args.model, _model_kwargs(args.model_kwargs),
                           shifted=args.shifted_test)
    out = Path(args.out)
    if args.name == "prune":
        from .experiments import prune
        methods = tuple(args.methods.split(",")) if args.methods else prune.DEFAULT_METHODS
        mods = (":lowest" if args.keep == "lowest" else "") + (f":exclude={args.exclude_top}" if args.exclude_top else "")
        methods = tuple(m if ":" in m or m == "random" else m + mods for m in methods)
        prune.run(out, mode, methods=methods, setup=setup, overwrite=args.overwrite)
    elif args.name == "regions":
        from .experiments import regions
        regions.run(out, mode, setup=setup, overwrite=args.overwrite)
    else:
        from .experiments import jtt
        jtt.run(out, mode, overwrite=args.overwrite)
    return 0


def _add_diagnose(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "diagnose", help="why examples score high: gradient norm vs direction",
                 description="Decompose a dot-product score (pds or target_dot) into ‖g‖·‖v‖·cos, measure "
                 "how much the gradient norm inflates it, and, with a known noisy mask, report AUROC / AP / "
                 "precision@k of every score and variant for flagging the noisy examples and the share of "
                 "noisy examples in the top and bottom of each variant. Writes diagnosis.json and plots.")
    p.add_argument("scores", metavar="SCORES.h5", help="a scores file with pds or target_dot")
    p.add_argument("--score", default="pds", choices=("pds", "target_dot"), help="the dot-product score to diagnose")
    mask = p.add_mutually_exclusive_group()
    mask.add_argument("--noisy-mask", default=None, metavar="FILE", help=".npy bool mask, or .npz with 'noisy'")
    mask.add_argument("--data", default=None, metavar="FILE",
                      help="the scored dataset: its 'noisy' field, and ‖x‖ as a baseline score")
    p.add_argument("--out", default=None, metavar="DIR", help="write diagnosis.json and plots here")
    p.add_argument("--top-fraction", type=float, default=0.1, help="size of the top/bottom sets")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from .diagnose import diagnose
    diagnose(args.scores, score=args.score, noisy_mask=args.noisy_mask, data=args.data, out=args.out,
             top_fraction=args.top_fraction, overwrite=args.overwrite)
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    from .select import select
    res = select(args.scores, by=args.by, keep=args.keep, highest=args.highest, exclude_top=args.exclude_top,
                 region=args.region, fraction=args.fraction, jtt=args.jtt, upweight=args.upweight,
                 checkpoint=args.checkpoint, out=args.out, overwrite=args.overwrite,
                 allow_nonfinite=args.allow_nonfinite)
    if res.get("nonfinite_ids"):
        _warn("select", [f"left out {len(res['nonfinite_ids'])} example(s) with a NaN/Inf score "
                         f"(listed in 'nonfinite_ids')"])
    n = res.get("n_selected", res.get("n_errors"))
    print(f"selection -> {args.out}" + (f" ({n} examples)" if n is not None else "")
          + (f"; weights -> {res['weights_file']}" if "weights_file" in res else ""))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .outputs import claim
    from .plots import data_map, score_histograms
    from .store import load_scores
    if Path(args.out).suffix.lower() not in (".png", ".svg"):
        raise GradscoreError(f"{args.out}: --out must end in .png or .svg")
    claim(args.out, "figure", inputs={"the scores file": [args.scores]}, overwrite=args.overwrite)
    res = load_scores(args.scores)
    s = res["scores"]
    if args.kind == "hist":
        names = _split(args.only) if args.only else sorted(s)
        unknown = [k for k in names if k not in s]
        if unknown:
            raise GradscoreError(f"--scores: {', '.join(unknown)} not in {args.scores} (it has: {', '.join(sorted(s))})")
        n, T = len(res["ids"]), len(next(iter(res["per_checkpoint"].values()), []))
        score_histograms({k: s[k] for k in names}, res["noisy"], args.out,
                         title=f"score distributions of {n:,} examples over {T} checkpoint(s) — {Path(args.scores).name}")
    else:
        missing = [k for k in ("confidence", "variability", "correctness") if k not in s]
        if missing:
            raise GradscoreError(f"{args.scores}: no {', '.join(missing)} scores; rerun `gradscore run "
                                 f"--scores confidence,variability,correctness,...`")
        data_map(s["confidence"], s["variability"], s["correctness"], args.out, noisy=res["noisy"],
                 max_points=args.max_points, title=Path(args.scores).name)
    print(f"plot -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradscore", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Per-example gradient scores (EL2N, GraNd, loss, optimal-control PDS, "
        "target alignment) for every training example at every checkpoint of a training run.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"gradscore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_costate(sub)
    _add_select_and_plot(sub)
    _add_import_export(sub)
    _add_import_checkpoints(sub)
    _add_experiment(sub)
    _add_diagnose(sub)
    p = _command(sub, "demo", help="train on the bundled digits, score, report (no download)",
                 description="Flip 20% of the digits training labels, train a small CNN "
                 "with a checkpoint per epoch, score every example with the same code "
                 "path as `run`, print how well each score finds the flipped labels, "
                 "and write DIR/data/train.h5, DIR/ckpts/, DIR/scores.h5, DIR/report.png.")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default gradscore_demo, gradscore_demo_pds or gradscore_demo_lm)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (one checkpoint each)")
    p.add_argument("--pds", action="store_true",
                   help="optimal-control (PDS) demo: full-batch GD on the noisy set, clean "
                   "held-out target, a checkpoint at every step")
    p.add_argument("--lm", action="store_true",
                   help="language-model demo: a tiny GPT-2 (needs the 'hf' extra) on the docstrings of "
                   "Python's standard library, 20%% of documents corrupted, clean held-out target; "
                   "loss, GraNd, target_dot and PDS per document")
    p.add_argument("--docs", type=int, default=800, help="--lm: training documents")
    p.add_argument("--steps", type=int, default=None,
                   help="--pds/--lm: gradient-descent steps (default 30 / 6)")
    p.add_argument("--n-train", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="per-example gradient engine (auto: ghost rules, else vmap, else the loop)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = _command(sub, "bench", help="time the engines against a plain forward+backward",
                 description="Time loop, vmap (torch and fused reduction) and ghost engines, "
                 "and Opacus/BackPACK when installed, as ratios to one plain batched "
                 "forward+backward, with peak memory, on an MLP, the demo CNN and its "
                 "128-channel version, a CNN on 32x32 inputs, a small transformer and (with "
                 "transformers installed) a small GPT-2; then `run` throughput and PDS "
                 "timings on the demo setup.")
    p.add_argument("--batches", default="64,256", help="comma-separated batch sizes")
    p.add_argument("--models", default=None, help="comma-separated subset of the models (default: all of "
                   "mlp_784_1024_1024, digits_cnn, digits_cnn_c128, cifar_cnn_dw, transformer_d128_T64, "
                   "resnet_bn_20k, torch_encoder_d64_T32, lstm_d64_T32, gru_attention_d64_T32, gpt2_d64_T128)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (best is kept)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--epochs", type=int, default=3, help="demo checkpoints for the end-to-end part")
    p.add_argument("--no-end-to-end", dest="end_to_end", action="store_false",
                   help="skip the end-to-end `run` throughput and the PDS timings (default: run them)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p = sub.add_parser("info", help="describe a checkpoint dir, dataset or scores file",
                       description="Describe a checkpoint directory, a dataset file or a scores "
                       "file; --env prints the kernel backends and library versions.")
    p.add_argument("path", nargs="?", default=None, help="checkpoint dir, dataset or scores file")
    p.add_argument("--env", action="store_true", help="print the environment (kernel backends, versions)")
    return parser


_COMMANDS = {"run": _cmd_run, "costate": _cmd_costate, "demo": _cmd_demo, "info": _cmd_info,
             "bench": _cmd_bench, "select": _cmd_select, "plot": _cmd_plot,
             "import-dynamics": _cmd_import, "export": _cmd_export, "diagnose": _cmd_diagnose,
             "import-checkpoints": _cmd_import_checkpoints, "experiment": _cmd_experiment}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradscore`` console script."""
    args = build_parser().parse_args(argv)
    try:
        code = _COMMANDS[args.command](args)
        sys.stdout.flush()   # a closed pipe shows here, inside the handlers below
        return code
    except GradscoreError as e:
        print(f"gradscore {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gradscore {args.command}: interrupted; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except BrokenPipeError:   # `gradscore info … | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:      # a read-only folder, a full disk: one line naming the file
        where = e.filename or "a file"
        print(f"gradscore {args.command}: error: cannot write or read {where}: {e.strerror or e}; "
              f"check the path and its permissions, or choose another output path", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
