"""``gradscore sketch`` and ``gradscore attribute``: gradient sketches, then per-query attribution."""
from __future__ import annotations

import argparse

from ..config import ATTRIBUTION_METHODS, DEVICES, DTYPES, STORE_DTYPES, AttributeConfig, SketchConfig, as_names
from .common import StoreNoted, add_quiet, command, refuse_unused, show_loss_trend


def _add_sketch(sub: argparse._SubParsersAction) -> None:
    d = SketchConfig(checkpoints="", data="")
    p = command(sub, "sketch", help="store a random projection of every example's gradient at every checkpoint",
                description="Project every example's per-example gradient at every checkpoint to about --dim numbers "
                "(Kronecker-factored per Linear, Embedding and Conv weight from the ghost hooks, dense for the other "
                "parameters; the gradient is never formed) and store them, for `gradscore attribute`. "
                "Resumable: rerun the same command after an interruption.")
    p.add_argument("--checkpoints", required=True, metavar="DIR",
                   help="directory of step_<n>.h5 files written by gradscore.CheckpointWriter")
    p.add_argument("--data", required=True, metavar="FILE", help="the training set (.h5/.npz, as for `run`)")
    p.add_argument("--out", required=True, metavar="FILE", help="the sketch file to write (HDF5)")
    p.add_argument("--dim", type=int, default=d.dim,
                   help="numbers per example and checkpoint, about: split over the parameters in proportion to "
                   "their size, a weight's k_out x k_in block rounding to whole rows, so the total may differ by a few "
                   "(the file records the exact split; at most the number of parameters)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the projection: queries reuse it")
    p.add_argument("--store-dtype", default=d.store_dtype, choices=STORE_DTYPES,
                   help="how the sketches are stored (float16 halves the file; float32 for TRAK on well-fit data)")
    p.add_argument("--params", default=None, metavar="PATTERN,...",
                   help="sketch only the parameters whose names match these shell patterns (a tied weight: by "
                   "any of its layers' names); default: all trainable")
    p.add_argument("--device", default=d.device, choices=DEVICES, help="auto takes cuda when available")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES, help="the model's dtype while sketching")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per forward+backward")
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, help="examples per resumable unit of work")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a sketch file (or discard an interrupted run) made with other options; "
                   "never an input, never another kind of file")
    add_quiet(p)


def _cmd_sketch(args: argparse.Namespace) -> int:
    from ..sketches.store import SketchFile, run_sketch
    config = SketchConfig(checkpoints=args.checkpoints, data=args.data, dim=args.dim, seed=args.seed,
                          store_dtype=args.store_dtype, params=as_names(args.params or ""), device=args.device,
                          dtype=args.dtype, batch_size=args.batch_size, chunk_size=args.chunk_size)
    path = run_sketch(config, args.out, overwrite=args.overwrite, progress=not args.quiet)
    T, N, dim = SketchFile.open(path).shape
    print(f"sketches ({T} checkpoints x {N} examples x {dim}) -> {path}")
    show_loss_trend("sketch", path)
    return 0


def _add_attribute(sub: argparse._SubParsersAction) -> None:
    d = AttributeConfig(sketch="", query="")
    p = command(sub, "attribute", help="the training examples that most raised or lowered each query's loss",
                description="Sketch each query example with the sketch file's projection and score it against "
                "every training example: TracIn-CP (Σ_t η_t ⟨Φ g_n, Φ g_q⟩ over the checkpoints) or a TRAK-style "
                "estimator (preconditioned by the training sketches' kernel, out-to-loss weighted). Writes the top "
                "proponents (positive: training on them lowers the query's loss) and opponents of every query.")
    p.add_argument("--sketch", required=True, metavar="FILE", help="the training set's sketch file (gradscore sketch)")
    p.add_argument("--query", required=True, metavar="FILE", help="the query examples (.h5/.npz, as for --data)")
    p.add_argument("--checkpoints", default="", metavar="DIR",
                   help="the checkpoints the sketch file was made from (default: the folder it names); a changed "
                   "or missing checkpoint is refused")
    p.add_argument("--method", default=d.method, choices=ATTRIBUTION_METHODS, help="tracin: TracIn-CP; trak: TRAK-style")
    p.add_argument("--top", type=int, default=d.top, help="proponents and opponents kept per query")
    p.add_argument("--full", action="store_true", help="also write the whole N x Q score matrix as /scores")
    p.add_argument("--ridge", type=float, default=d.ridge, action=StoreNoted,
                   help="trak: λ of (XᵀX + λI), relative to the mean of XᵀX's diagonal")
    p.add_argument("--trak-checkpoints", default=d.trak_checkpoints, choices=("last", "all"), action=StoreNoted,
                   help="trak: the checkpoints whose estimates are averaged")
    p.add_argument("--block-size", type=int, default=d.block_size, help="training rows per GEMM block")
    p.add_argument("--device", default=d.device, choices=DEVICES, help="where the queries are sketched")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES, help="the model's dtype while sketching queries")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="query examples per forward+backward")
    p.add_argument("--out", required=True, metavar="FILE", help="the attribution file to write (HDF5)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an attribution file; never an input, never another kind of file")
    add_quiet(p)


def _cmd_attribute(args: argparse.Namespace) -> int:
    import h5py

    from ..sketches.attribute import run_attribute
    trak_only = {"ridge": ("--ridge", "--method trak"), "trak_checkpoints": ("--trak-checkpoints", "--method trak")}
    refuse_unused(args, trak_only, {f"--method {args.method}"})
    config = AttributeConfig(sketch=args.sketch, query=args.query, checkpoints=args.checkpoints, method=args.method,
                             top=args.top, full=args.full, ridge=args.ridge, trak_checkpoints=args.trak_checkpoints,
                             block_size=args.block_size, device=args.device, dtype=args.dtype,
                             batch_size=args.batch_size)
    path = run_attribute(config, args.out, overwrite=args.overwrite, progress=not args.quiet)
    with h5py.File(path, "r") as f:   # what it kept: --top, or every training example where they are fewer
        kept, n_train = f["proponents/ids"].shape[1], len(f["train_ids"])
    print(f"attribution ({args.method}, top {kept} of {n_train}) -> {path}")
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    """Register these commands."""
    _add_sketch(sub)
    _add_attribute(sub)
    sub.choices["sketch"].set_defaults(func=_cmd_sketch)
    sub.choices["attribute"].set_defaults(func=_cmd_attribute)
