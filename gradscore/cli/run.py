"""``gradscore run`` and ``gradscore costate``: score a training run."""
from __future__ import annotations

import contextlib
import argparse
import os

from ..config import (AVAILABLE_SCORES, DEVICES, DTYPES, ENGINES, GRADIENT_SCORES, TARGET_SCORES, RunConfig,
                      as_names)
from .common import (StoreNoted, StoreTrueNoted, add_lm_reduction, add_overwrite, add_quiet, command, refuse_unused,
                     show_loss_trend, warn)

def _add_run(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "run", help="score every example at every checkpoint",
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
                   help="score only the parameters whose names match these shell patterns ('head.*'; a weight "
                   "tied to another layer's matches by either layer's name); default: every trainable parameter")
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
    p.add_argument("--steps", default=None, metavar="A:B",
                   help="aggregate only over checkpoints with A <= step < B (either end may be left out)")
    p.add_argument("--target", default=None, metavar="FILE", action=StoreNoted,
                   help="target (downstream) dataset: needed by pds, target_dot, target_cos; or its sketch file "
                   "(gradscore sketch at the same checkpoints): ∇J is then estimated from the sketches")
    p.add_argument("--costate", default=None, metavar="FILE", action=StoreNoted,
                   help="co-state file (default CHECKPOINTS/costate.h5; computed when missing, reused when made "
                   "with these settings, refused when made with others, recomputed then under --overwrite). "
                   "Without pds, target_dot and target_cos need only ∇J(θ_t): CHECKPOINTS/target_gradient.h5 by "
                   "default, with no co-states (no Hessian-vector products over the data)")
    p.add_argument("--lr-scale-steps", action=StoreTrueNoted,
                   help="PDS with sparse checkpoints: η_t = lr × optimizer steps to the next checkpoint")
    p.add_argument("--variants", default="", metavar="V,...",
                   help="also store pds_<V>/target_dot_<V> for V in cos (direction only), clip (‖g‖ clipped "
                   "at --clip-quantile), rank (per-checkpoint ranks), resid (log‖g‖ regressed out)")
    p.add_argument("--clip-quantile", type=float, default=0.9, metavar="Q", action=StoreNoted,
                   help="the clip variant clips ‖g_nt‖ at this quantile of all ‖g_nt‖")
    add_lm_reduction(p)
    p.add_argument("--store-logits", action="store_true",
                   help="also keep every checkpoint's logits (T, N, C) as float16 in /logits, for other tools "
                   "(cleanlab, your own analysis)")
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
    add_quiet(p)


#: the scores that read --target (and its co-states, and their step sizes)
TARGETED = "--scores pds, target_dot or target_cos"
#: run's options that apply to some runs only: dest -> (option, the run it needs)
RUN_OPTIONS = {"clip_quantile": ("--clip-quantile", "--variants clip"), "target": ("--target", TARGETED),
               "costate": ("--costate", TARGETED), "lr_scale_steps": ("--lr-scale-steps", TARGETED)}


def _cmd_run(args: argparse.Namespace) -> int:
    from ..pipeline import run
    scores = as_names(args.scores) if args.scores is not None else _default_scores(args.checkpoints)
    refuse_unused(args, RUN_OPTIONS, ({"--variants clip"} if "clip" in as_names(args.variants) else set())
                  | ({TARGETED} if TARGET_SCORES & set(scores) else set()))
    config = RunConfig(checkpoints=args.checkpoints, data=args.data, scores=scores,
                       params=as_names(args.params or ""),
                       engine=args.engine, device=args.device, dtype=args.dtype,
                       batch_size=args.batch_size, chunk_size=args.chunk_size,
                       chunk_bytes=args.chunk_mb * 2**20, epochs_upto=args.epochs_upto, steps=args.steps,
                       target=args.target, costate=args.costate, lr_scale_steps=args.lr_scale_steps,
                       variants=as_names(args.variants),
                       clip_quantile=args.clip_quantile, lm_reduction=args.lm_reduction,
                       allow_nonfinite=args.allow_nonfinite, ids=args.ids, index_range=args.index_range,
                       store_logits=args.store_logits)
    path = run(config, args.out, overwrite=args.overwrite, progress=not args.quiet,
               distributed=args.distributed)
    if int(os.environ.get("RANK", "0")) == 0:
        from ..io.store import load_scores
        print(f"scores -> {path}")
        warn("run", load_scores(path, per_checkpoint=False)["warnings"])
        show_loss_trend("run", path)
    return 0


def _default_scores(checkpoints: str) -> tuple[str, ...]:
    """--scores when not given: what the checkpoints' loss supports."""
    from ..io.checkpoints import CheckpointStore
    from ..losses import resolve_loss
    if resolve_loss(CheckpointStore(checkpoints).loss).output == "tokens":
        return ("loss", "grand")
    return RunConfig(checkpoints="", data="").scores


def _add_costate(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "costate", help="compute the PDS co-states λ_t from checkpoints",
                 description="Compute ∇J(θ_t) on the target set for every checkpoint and "
                 "the co-states λ_T = ∇J(θ_T), λ_t = ∇J(θ_t) + (I − η_t H_t) λ_{t+1} with "
                 "Hessian-vector products on the proxy set (γ_n = 1/N), backwards from the "
                 "last checkpoint. Resumable: rerun the same command after an interruption.")
    p.add_argument("--checkpoints", required=True, metavar="DIR",
                   help="directory of step_<n>.h5 files written by gradscore.CheckpointWriter")
    p.add_argument("--proxy", required=True, metavar="FILE", help="the training (proxy) set")
    p.add_argument("--target", required=True, metavar="FILE",
                   help="the target (downstream) set, or its sketch file (gradscore sketch at the same checkpoints)")
    p.add_argument("--out", default=None, metavar="FILE", help="default: CHECKPOINTS/costate.h5")
    p.add_argument("--hvp-batch", type=int, default=256, help="examples per gradient/HVP chunk")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="where to compute: auto takes cuda when available, else cpu")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="the model's dtype while computing")
    p.add_argument("--lr-scale-steps", action="store_true",
                   help="η_t = lr × optimizer steps to the next checkpoint (sparse checkpoints)")
    add_lm_reduction(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a co-state file made with other options; never an input, never another kind of file")
    add_quiet(p)


def _cmd_costate(args: argparse.Namespace) -> int:
    from ..scores.costate import CostateConfig, CostateFile, beside_checkpoints, compute_costate
    with beside_checkpoints(args.checkpoints, "--out FILE") if args.out is None else contextlib.nullcontext():
        path = compute_costate(CostateConfig(args.checkpoints, args.proxy, args.target, batch_size=args.hvp_batch,
                                             dtype=args.dtype, device=args.device,
                                             lr_scale_steps=args.lr_scale_steps,
                                             lm_reduction=args.lm_reduction),
                               args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"co-states -> {path}")
    warn("costate", CostateFile(path).warnings)
    return 0


def _add_aggregate(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "aggregate", help="another checkpoint window from a scores file's rows, without recomputing",
                description="Write a scores file for another --epochs-upto window (and, optionally, other scores "
                "of the same per-checkpoint pass) from the per-checkpoint rows of SCORES.h5: bit for bit what "
                "`gradscore run` with that window writes, without the model or the data. Of an in-run recording "
                "(gs.InRun), --steps A:B keeps the records of those training steps: what a recording of them "
                "alone writes (the examples they met, the scores over them). SCORES.h5 is not modified.")
    p.add_argument("scores", metavar="SCORES.h5", help="a scores file written by gradscore run, or by gs.InRun")
    p.add_argument("--epochs-upto", type=float, default=None, metavar="E",
                   help="aggregate over the checkpoints with epoch <= E (default: every checkpoint in the file; "
                   "an in-run recording has no epochs: give --steps)")
    p.add_argument("--steps", default=None, metavar="A:B",
                   help="aggregate only over checkpoints (in-run: training steps) with A <= step < B (either end "
                   "may be left out)")
    p.add_argument("--scores", dest="wanted", default=None, metavar="NAME,...",
                   help="the scores to write (default: those of SCORES.h5); they must need the same "
                   "per-checkpoint metrics (forward only, gradients, or target dots)")
    p.add_argument("--out", required=True, metavar="FILE", help="the scores file to write (HDF5)")
    add_overwrite(p)
    add_quiet(p)


def _cmd_aggregate(args: argparse.Namespace) -> int:
    from ..pipeline import reaggregate
    path = reaggregate(args.scores, args.out, epochs_upto=args.epochs_upto, steps=args.steps,
                       wanted=as_names(args.wanted) if args.wanted else None, overwrite=args.overwrite,
                       progress=not args.quiet)
    print(f"scores -> {path}")
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    """Register these commands."""
    _add_run(sub)
    _add_costate(sub)
    _add_aggregate(sub)
    sub.choices["run"].set_defaults(func=_cmd_run)
    sub.choices["costate"].set_defaults(func=_cmd_costate)
    sub.choices["aggregate"].set_defaults(func=_cmd_aggregate)
