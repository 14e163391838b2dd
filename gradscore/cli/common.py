"""What several commands share: the help formatter, option helpers, list parsing."""
from __future__ import annotations

import argparse
import json
import sys

from ..config import LM_REDUCTIONS
from ..exceptions import GradscoreError

OVERWRITE_HELP = "replace an existing output of the same kind (never an input, never another kind of file)"


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Appends an option's default to its help, unless it is None, empty or a flag's bool."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, "") or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def command(sub: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose --help shows every option's default."""
    return sub.add_parser(name, formatter_class=_ShowDefaults, **kwargs)


def add_lm_reduction(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lm-reduction", default="mean", choices=LM_REDUCTIONS,
                   help="causal_lm checkpoints: an example's loss is the mean (or sum) of its "
                   "predicted tokens' losses; sum weighs long documents more")


def add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def warn(command: str, found: list[str]) -> None:
    """Warnings stored in an output, one line each on stderr."""
    for text in found:
        print(f"gradscore {command}: warning: {text}", file=sys.stderr)


def split(text: str) -> tuple[str, ...]:
    """A comma-separated option as a tuple of its non-empty items."""
    return tuple(s.strip() for s in text.split(",") if s.strip())


def model_kwargs(text: str) -> dict:
    """--model-kwargs: a JSON object, or one line and exit 2."""
    try:
        kwargs = json.loads(text)
    except ValueError as e:
        raise GradscoreError(f"--model-kwargs: not valid JSON ({e})") from e
    if not isinstance(kwargs, dict):
        raise GradscoreError(f"--model-kwargs: must be a JSON object, got {text!r}")
    return kwargs

