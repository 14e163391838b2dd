"""``demo``, ``experiment`` and ``bench``: runs on bundled data."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import ENGINES
from ..exceptions import GradscoreError
from .common import StoreNoted, add_overwrite, add_quiet, command, model_kwargs, refuse_unused

#: the demo's options that apply to some of its kinds: dest -> (option, the kinds)
DEMO_OPTIONS = {"docs": ("--docs", "--lm"), "steps": ("--steps", "--pds or --lm"),
                "epochs": ("--epochs", "the digits demo or --inrun"),
                "n_train": ("--n-train", "the digits demo or --inrun")}
#: the experiment's options that apply to some experiments: dest -> (option, the experiments)
EXPERIMENT_OPTIONS = {"fractions": ("--fractions", "prune"), "methods": ("--methods", "prune"),
                      "keep": ("--keep", "prune"), "exclude_top": ("--exclude-top", "prune"),
                      "shifted_test": ("--shifted-test", "regions")}


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "demo", help="train on the bundled digits, score, report (no download)",
                 description="Flip 20% of the digits training labels, train a small CNN "
                 "with a checkpoint per epoch, score every example with the same code "
                 "path as `run`, print how well each score finds the flipped labels, "
                 "and write DIR/data/train.h5, DIR/ckpts/, DIR/scores.h5, DIR/report.png.")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default gradscore_demo, gradscore_demo_pds, gradscore_demo_lm or "
                   "gradscore_demo_inrun): new, empty, or one a demo wrote before, whose files a rerun replaces; "
                   "never a folder of yours")
    p.add_argument("--epochs", type=int, default=15, action=StoreNoted, help="training epochs (one checkpoint each)")
    kind = p.add_mutually_exclusive_group()   # one demo at a time
    kind.add_argument("--pds", action="store_true",
                   help="optimal-control (PDS) demo: full-batch GD on the noisy set, clean "
                   "held-out target, a checkpoint at every step")
    kind.add_argument("--lm", action="store_true",
                   help="language-model demo: a tiny GPT-2 (needs the 'hf' extra) on the docstrings of "
                   "Python's standard library, 20%% of documents corrupted, clean held-out target; "
                   "loss, GraNd, target_dot and PDS per document")
    kind.add_argument("--inrun", action="store_true",
                   help="in-run demo: the same digits scored during training by gs.InRun (no checkpoint "
                   "needed), each score's AUROC next to the checkpoint-based one, and the recorder's "
                   "overhead as a ratio of training times in this run")
    p.add_argument("--docs", type=int, default=800, action=StoreNoted, help="--lm: training documents")
    p.add_argument("--steps", type=int, default=None, action=StoreNoted,
                   help="--pds/--lm: gradient-descent steps (default 30 / 6)")
    p.add_argument("--n-train", type=int, default=None, action=StoreNoted, help="use only the first N training examples")
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="per-example gradient engine (auto: ghost rules, else vmap, else the loop)")
    add_quiet(p)


def _cmd_demo(args: argparse.Namespace) -> int:
    kind = "--lm" if args.lm else "--pds" if args.pds else "--inrun" if args.inrun else "the digits demo"
    either = "--pds or --lm" if kind in ("--pds", "--lm") else "the digits demo or --inrun"
    refuse_unused(args, DEMO_OPTIONS, {kind, either})
    if args.lm:
        from ..demos.lm import run_lm_demo
        extra = {} if args.steps is None else {"steps": args.steps}
        run_lm_demo(args.out or "gradscore_demo_lm", n_docs=args.docs, engine=args.engine,
                    progress=not args.quiet, **extra)
        return 0
    if args.inrun:
        from ..demos.inrun import run_inrun_demo
        run_inrun_demo(args.out or "gradscore_demo_inrun", epochs=args.epochs, n_train=args.n_train,
                       engine=args.engine, progress=not args.quiet)
        return 0
    if args.pds:
        from ..demos.digits import run_pds_demo
        run_pds_demo(args.out or "gradscore_demo_pds", steps=args.steps or 30, engine=args.engine,
                     progress=not args.quiet)
        return 0
    from ..demos.digits import run_demo
    run_demo(args.out or "gradscore_demo", epochs=args.epochs, n_train=args.n_train,
             engine=args.engine, progress=not args.quiet)
    return 0


def _add_experiment(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "experiment", help="retrain on selected subsets: pruning curves, data-map regions, JTT",
                 description="Check a data-selection claim by retraining: 'prune' (Data Diet: keep 30-90% "
                 "of the training set by each score, with and without 20% flipped labels), 'regions' "
                 "(Dataset Cartography: train on 33% ambiguous/easy/hard/random vs all, test in and out of "
                 "distribution), 'jtt' (ERM vs Just Train Twice on a spurious-patch variant of digits: "
                 "average and worst-group accuracy), 'noise' (finding mislabeled examples under symmetric, pair and "
                 "instance-dependent noise, against cleanlab and a kNN baseline), 'attribution' (TracIn and TRAK-style from "
                 "gradient sketches against the traker package, by the linear datamodeling score over models retrained "
                 "on random halves, and the prediction flips when the top proponents are removed). Embedded digits by default; prune and regions also "
                 "take --train/--test files and a --model factory. Writes OUT/<name>.json, .md and .png.")
    p.add_argument("name", choices=("prune", "regions", "jtt", "noise", "attribution"),
                   help="which experiment (see above)")
    p.add_argument("--out", default="gradscore_experiments", metavar="DIR",
                   help="folder for <name>.json, .md and .png")
    p.add_argument("--mode", default="fast", choices=("tiny", "fast", "full"),
                   help="fast: 1 seed, 8 epochs, fractions 30/50/100%% (< 3 min on 2 cores); full: 3 seeds, "
                   "15 epochs, 30/50/70/90/100%%; tiny: 300 examples, 2 epochs (a smoke test)")
    p.add_argument("--seeds", type=int, default=None, help="override the mode's number of seeds")
    p.add_argument("--fractions", default=None, metavar="F,...", action=StoreNoted, help="prune: override the kept fractions")
    p.add_argument("--methods", default=None, metavar="M,...", action=StoreNoted,
                   help="prune: el2n, grand, forgetting, pds, ambiguous, hard, random, each optionally with "
                   ":lowest (keep the lowest), :exclude=F (drop the top F first) and :per_class (the fraction within "
                   "each class)")
    p.add_argument("--keep", default="highest", choices=("highest", "lowest"), action=StoreNoted,
                   help="prune: direction for methods given without ':lowest'")
    p.add_argument("--exclude-top", type=float, default=0.0, action=StoreNoted, help="prune: default ':exclude=' for every method")
    p.add_argument("--train", default=None, metavar="FILE", help="prune/regions: your training set (.h5/.npz)")
    p.add_argument("--test", default=None, metavar="FILE", help="prune/regions: your test set")
    p.add_argument("--shifted-test", default=None, metavar="FILE", action=StoreNoted, help="regions: your out-of-distribution test set")
    p.add_argument("--model", default=None, metavar="MODULE:FN", help="with --train: the model factory")
    p.add_argument("--model-kwargs", default="{}", metavar="JSON", help="with --model: its keyword arguments")
    add_overwrite(p)


def _cmd_experiment(args: argparse.Namespace) -> int:
    import dataclasses

    from ..demos.experiments import MODES, file_setup
    refuse_unused(args, EXPERIMENT_OPTIONS, {args.name})
    mode = MODES[args.mode]
    if args.seeds is not None:
        mode = dataclasses.replace(mode, seeds=args.seeds)
    if args.fractions is not None:
        try:
            fractions = tuple(float(f) for f in args.fractions.split(","))
        except ValueError as e:
            raise GradscoreError(f"--fractions: '{args.fractions}' is not a comma-separated list of numbers") from e
        mode = dataclasses.replace(mode, fractions=fractions)
    setup = None
    if args.train or args.test or args.model:
        if not (args.train and args.test and args.model) or args.name in ("jtt", "noise", "attribution"):
            raise GradscoreError("your own data needs --train, --test and --model together (prune, regions)")
        setup = file_setup(args.train, args.test, args.model, model_kwargs(args.model_kwargs),
                           shifted=args.shifted_test)
    out = Path(args.out)
    if args.name == "prune":
        from ..demos.experiments import prune
        methods = tuple(args.methods.split(",")) if args.methods else prune.DEFAULT_METHODS
        mods = (":lowest" if args.keep == "lowest" else "") + (f":exclude={args.exclude_top}" if args.exclude_top else "")
        methods = tuple(m if ":" in m or m == "random" else m + mods for m in methods)
        prune.run(out, mode, methods=methods, setup=setup, overwrite=args.overwrite)
    elif args.name == "regions":
        from ..demos.experiments import regions
        regions.run(out, mode, setup=setup, overwrite=args.overwrite)
    elif args.name == "attribution":
        from ..demos.experiments import attribution
        attribution.run(out, mode, overwrite=args.overwrite)
    elif args.name == "noise":
        from ..demos.experiments import noise
        noise.run(out, mode, overwrite=args.overwrite)
    else:
        from ..demos.experiments import jtt
        jtt.run(out, mode, overwrite=args.overwrite)
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    command(sub, "bench", help="time the engines against a plain forward+backward (from a source checkout)",
            description="Runs bench/engines.py of the source checkout this package is installed from "
            "(pip install -e .); `gradscore bench --help` lists its options.", add_help=False)


def run_bench(argv: list[str]) -> int:
    """``gradscore bench ARGS``: the checkout's ``bench/engines.py`` with ARGS; the
    benchmarks are not part of the installed package."""
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    if not (root / "bench" / "engines.py").is_file():
        raise GradscoreError("gradscore bench runs the benchmarks of a source checkout; clone the repository, "
                             "pip install -e . there, and run `gradscore bench` (or python -m bench.engines)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from bench.engines import main
    return main(argv)


def add(sub: argparse._SubParsersAction) -> None:
    """Register these commands."""
    _add_demo(sub)
    _add_experiment(sub)
    _add_bench(sub)
    for name, func in (("demo", _cmd_demo), ("experiment", _cmd_experiment)):   # both load the digits, plot
        sub.choices[name].set_defaults(func=func, libraries=("sklearn.datasets", "matplotlib.pyplot"))
