"""The ``gradscore`` command line: one module per command group (run, reports, files,
demos), the options several share in :mod:`.common`. Exit codes: 0 success, 2 bad input
(one line on stderr), 130 interrupted, 141 closed pipe."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Sequence

from ..exceptions import GradscoreError, one_line
from . import demos, files, reports, run, sketch

EPILOG = """examples:
  gradscore demo --out demo/                       # train on digits, score, report
  gradscore run --checkpoints demo/ckpts --data demo/data/train.h5 --out scores.h5
  gradscore info scores.h5

A killed `run` resumes where it stopped when rerun with the same options."""


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradscore`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:   # the checkout's benchmark parses its own options
        return run_and_report("bench", demos.run_bench, argv[1:])
    args = build_parser().parse_args(argv)
    return run_and_report(args.command, args.func, args)


def run_and_report(command: str, fn: Callable[[Any], int], arg: Any) -> int:
    """``fn(arg)``'s exit code; a gradscore error, an OS error, Ctrl-C or a closed pipe
    become one line on stderr and exit codes 2, 2, 130 and 141."""
    try:
        code = fn(arg)
        sys.stdout.flush()   # a closed pipe shows here, inside the handlers below
        return code
    except GradscoreError as e:
        print(f"gradscore {command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gradscore {command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:   # `gradscore info … | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:      # a read-only folder, a full disk: one line naming the file
        where = e.filename or "a file"
        print(f"gradscore {command}: error: cannot write or read {where}: {e.strerror or e}; "
              f"check the path and its permissions, or choose another output path", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
