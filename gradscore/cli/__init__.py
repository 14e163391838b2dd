"""The ``gradscore`` command line: one module per command group (run, reports, files,
demos), the options several share in :mod:`.common`. Exit codes: 0 success, 2 bad input
(one line on stderr), 130 interrupted, 141 closed pipe."""
from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import os
import sys
from typing import Any, Callable, Sequence

from ..exceptions import GradscoreError, lock_fix, one_line
from ..interrupts import interrupt_after
from . import demos, files, reports, run, sketch
from .common import warnings_as_lines

EPILOG = """examples:
  gradscore demo --out demo/                       # train on digits, score, report
  gradscore run --checkpoints demo/ckpts --data demo/data/train.h5 --out scores.h5
  gradscore info scores.h5

A killed `run` resumes where it stopped when rerun with the same options."""


#: what every command loads first (seconds, for torch), with a command's own ``libraries``
LIBRARIES = ("numpy", "h5py", "torch")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; each sets ``func``, the function that runs it."""
    parser = argparse.ArgumentParser(
        prog="gradscore", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Per-example gradient scores (EL2N, GraNd, loss, optimal-control PDS, "
        "target alignment) for every training example at every checkpoint of a training run.")
    from .._version import __version__
    parser.add_argument("--version", action="version", version=f"gradscore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (run, sketch, reports, files, demos):
        group.add(sub)
    parser.set_defaults(command_parsers=sub.choices)   # {command: its parser}, for refuse_unknown
    return parser


def refuse_unknown(command: argparse.ArgumentParser, unknown: list[str]) -> None:
    """Exit 2 with ``command``'s own usage and error line naming the arguments it does not
    take, and the nearest of its options to each unknown one (a typo) where one is near."""
    options = {o.lstrip("-"): o for action in command._actions for o in action.option_strings if o.startswith("--")}
    near = [options[m[0]] for arg in unknown if arg.startswith("--")
            for m in [difflib.get_close_matches(arg.split("=")[0].lstrip("-"), options, n=1, cutoff=0.75)] if m]
    hint = f" (did you mean {', '.join(dict.fromkeys(near))}?)" if near else ""
    command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradscore`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    working_folder_importable()
    if argv[:1] == ["bench"]:   # the checkout's benchmark parses its own options
        return run_and_report("bench", demos.run_bench, argv[1:])
    try:
        with interrupt_after():   # the command modules load (no torch: --help answers at once)
            parser = build_parser()
    except KeyboardInterrupt:
        return interrupted(argv[0] if argv and not argv[0].startswith("-") else None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:   # argparse would answer with the top-level usage, naming neither the command nor its options
        refuse_unknown(args.command_parsers[args.command], unknown)
    return run_and_report(args.command, args.func, args)


def working_folder_importable() -> None:
    """Put the working folder on the import path, after the installed packages, as
    ``python -m gradscore`` has it (first): a model factory, loss or dataset in the user's
    own file there ("mymodels:net") imports, and shadows no installed package."""
    try:
        here = os.getcwd()
    except OSError:   # a removed working folder: nothing to import from it
        return
    if "" not in sys.path and here not in sys.path:
        sys.path.append(here)


#: commands whose rerun resumes the work an interrupted run saved (a journal of finished units)
RESUMABLE = frozenset({"run", "sketch", "costate", "import-dynamics", "import-checkpoints", "demo"})


def interrupted(command: str | None) -> int:
    """Ctrl-C: one line on stderr (the rerun resumes, where the command saves its work as it
    goes), exit code 130."""
    then = " to resume" if command in RESUMABLE else ""
    print(f"gradscore{f' {command}' if command else ''}: interrupted; rerun the same command{then}", file=sys.stderr)
    return 130


def run_and_report(command: str, fn: Callable[[Any], int], arg: Any) -> int:
    """``fn(arg)``'s exit code; a gradscore error, an OS error, Ctrl-C or a closed pipe
    become one line on stderr and exit codes 2, 2, 130 and 141."""
    try:
        with interrupt_after():
            for name in (*LIBRARIES, *getattr(arg, "libraries", ())):
                importlib.import_module(name)
        with warnings_as_lines(command):
            code = fn(arg)
        sys.stdout.flush()   # a closed pipe shows here, inside the handlers below
        return code
    except GradscoreError as e:
        print(f"gradscore {command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return interrupted(command)
    except BrokenPipeError:   # `gradscore info … | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:      # a read-only folder, a full disk: one line naming the file
        where = e.filename or "a file"
        print(f"gradscore {command}: error: cannot write or read {where}: {e.strerror or e}; {_fix(e)}",
              file=sys.stderr)
        return 2


def _fix(e: OSError) -> str:
    """What to do about an OS error, by its errno (or HDF5's refusal of a file another process holds)."""
    fix = lock_fix(e)
    if fix:
        return fix
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space on that disk (or choose another output path) and rerun the same command"
    if e.errno == errno.EFBIG:
        return "the file system or a limit (ulimit -f) caps a file's size there: choose another output path"
    return "check the path and its permissions, or choose another output path"


if __name__ == "__main__":
    sys.exit(main())
