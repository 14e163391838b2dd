"""``import-dynamics``, ``export`` and ``import-checkpoints``: other tools' files in and out."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..exceptions import GradscoreError
from .common import add_overwrite, add_quiet, add_scores_file, command, model_kwargs

def _add_import_export(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "import-dynamics", help="read training dynamics jsonl (cartography) into a scores file",
                 description="Read DIR/dynamics_epoch_<e>.jsonl (or DIR/training_dynamics/...) with "
                 "records {guid, gold, logits_epoch_<e> or logits}, streaming line by line, and "
                 "write per-epoch loss/el2n/p_gold/correct and the dynamics scores.")
    p.add_argument("directory", metavar="DIR", help="folder of the per-epoch dynamics jsonl files")
    p.add_argument("--format", default="cartography", choices=("cartography", "trainingdynamics"),
                   help="cartography: dynamics_epoch_<e>.jsonl; trainingdynamics: training_dynamics/ files")
    p.add_argument("--out", required=True, metavar="SCORES.h5", help="scores file to write (HDF5)")
    p.add_argument("--probabilities", action="store_true",
                   help="the records hold class probabilities (softmax outputs), not logits; without it, files "
                   "whose every first-epoch row is a probability vector are refused")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a scores file made from other files; never an input, never another kind of file")
    add_quiet(p)
    p = command(sub, "export", help="write scores as td_metrics jsonl, csv or parquet",
                 description="td_metrics: one JSON line per example with guid, index, "
                 "threshold_closeness, confidence, variability, correctness, forgetfulness "
                 "(TrainingDynamics); csv/parquet: id and every score.")
    add_scores_file(p)
    p.add_argument("--format", default=None, choices=("td_metrics", "csv", "parquet"),
                   help="td_metrics: jsonl as TrainingDynamics writes; csv or parquet: id and every score "
                   "(default: the one --out's suffix names: .jsonl, .csv, .parquet)")
    p.add_argument("--out", required=True, metavar="FILE", help="file to write")
    add_overwrite(p)
    add_quiet(p)


def _cmd_import(args: argparse.Namespace) -> int:
    from ..io.dynamics import import_dynamics
    out = import_dynamics(args.directory, args.out, fmt=args.format, overwrite=args.overwrite,
                          progress=not args.quiet, probabilities=args.probabilities)
    print(f"scores -> {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ..io.dynamics import EXPORT_SUFFIXES, export_scores
    out = export_scores(args.scores, args.out, fmt=args.format, overwrite=args.overwrite, progress=not args.quiet)
    print(f"{args.format or EXPORT_SUFFIXES[out.suffix.lower()]} -> {out}")
    return 0


def _add_import_checkpoints(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "import-checkpoints", help="convert torch.save / Lightning / safetensors checkpoints",
                 description="Convert a directory of existing checkpoints (torch.save state_dicts: .pt, "
                 ".pth, .bin; Lightning's .ckpt; safetensors; directly in SRC_DIR or in subdirectories like "
                 "checkpoint-1200/, as a Hugging Face Trainer or Accelerate's save_state writes them; a checkpoint in "
                 "shards, model-00001-of-00003.safetensors and its siblings, as one) "
                 "into gradscore checkpoints. The step is the one a torch.save dict records "
                 "(global_step, else step), else the number the file (or subdirectory) name marks as one "
                 "(step_1200, step=1200, iter1200, checkpoint-1200), else its last number (a name with a decimal "
                 "number, a metric, needs the mark); a LightningModule's model is found "
                 "under the attribute that holds it. The learning rate is --lr or --lr-schedule. Resumable: a rerun imports "
                 "the steps still missing, and refuses an --out that another source, a changed file or other "
                 "options filled. A Trainer's model rebuilds from the config.json it saved: --model "
                 "gradscore.integrations.hf:from_config --model-kwargs \"{\\\"config\\\": $(cat "
                 "SRC_DIR/checkpoint-N/config.json)}\" --loss causal_lm.")
    p.add_argument("src", metavar="SRC_DIR", help="folder of torch.save / Lightning / safetensors checkpoints")
    p.add_argument("--model", required=True, metavar="MODULE:FN", help="factory that rebuilds the model")
    p.add_argument("--model-kwargs", default="{}", metavar="JSON", help="keyword arguments of the factory")
    p.add_argument("--loss", default="cross_entropy",
                   help="cross_entropy, nll, mse, causal_lm, masked_lm or module:fn (per-example losses)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the gradscore checkpoints into")
    lr = p.add_mutually_exclusive_group(required=True)
    lr.add_argument("--lr", type=float, help="constant learning rate η_t")
    lr.add_argument("--lr-schedule", metavar="FILE.json", help='JSON {"step": lr, ...} covering every step')
    p.add_argument("--steps-per-epoch", type=int, default=None, help="epoch = step / this (default: 0)")
    add_quiet(p)


def _cmd_import_checkpoints(args: argparse.Namespace) -> int:
    from ..io.checkpoint_import import import_checkpoints
    kwargs = model_kwargs(args.model_kwargs)
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


def add(sub: argparse._SubParsersAction) -> None:
    """Register these commands."""
    _add_import_export(sub)
    _add_import_checkpoints(sub)
    sub.choices["import-dynamics"].set_defaults(func=_cmd_import)
    sub.choices["export"].set_defaults(func=_cmd_export)
    sub.choices["import-checkpoints"].set_defaults(func=_cmd_import_checkpoints)
