"""What several commands share: the help formatter, option helpers, list parsing."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from typing import Iterator

from ..config import LM_REDUCTIONS
from ..exceptions import GradscoreError, GradscoreWarning

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
    p.add_argument("--lm-reduction", default=None, choices=LM_REDUCTIONS,
                   help="causal_lm and masked_lm checkpoints: an example's loss is the mean (or sum) of "
                   "its predicted tokens' losses; sum weighs long documents more (default: the checkpoints' "
                   "loss: mean for causal_lm, sum for causal_lm_sum)")


def add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action=StoreTrueNoted, help=OVERWRITE_HELP)


class _Noted:
    """An action that also notes its option was given (``namespace.given``: dests), where
    the default cannot tell (``--keep 0.5`` is the default's value too)."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        namespace.given = getattr(namespace, "given", set()) | {self.dest}


class StoreNoted(_Noted, argparse._StoreAction):
    """``action="store"``, noted as given."""


class StoreTrueNoted(_Noted, argparse._StoreTrueAction):
    """``action="store_true"``, noted as given."""


class StoreFalseNoted(_Noted, argparse._StoreFalseAction):
    """``action="store_false"``, noted as given."""


def refuse_unused(args: argparse.Namespace, belongs: dict[str, tuple[str, str]], used: set[str]) -> None:
    """One GradscoreError for an option given (noted) whose mode is not used: ``belongs``
    maps its dest to (its option, the mode it needs, as the user writes it)."""
    for dest in sorted(getattr(args, "given", ())):
        if dest in belongs and belongs[dest][1] not in used:
            option, mode = belongs[dest]
            raise GradscoreError(f"{option} applies to {mode} only; leave it out, or use it with {mode}")


def add_scores_file(p: argparse.ArgumentParser) -> None:
    """The positional scores file of a command that reads any gradscore scores file."""
    p.add_argument("scores", metavar="SCORES.h5", help="a scores file: of gradscore run, gs.InRun, "
                   "import-dynamics, or a sketch file (its self_influence)")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar")


_shown: list[str] = []   # the warnings the running command has printed


def warn(command: str, found: list[str]) -> None:
    """Warnings stored in an output, one line each on stderr; one printed already (also as
    the part of a longer text that names the file) is not printed again."""
    for text in found:
        if any(text in s or s in text for s in _shown):
            continue
        _shown.append(text)
        print(f"gradscore {command}: warning: {text}", file=sys.stderr)


def show_loss_trend(command: str, path) -> None:
    """Print how the scored examples' mean loss went over the checkpoints of output ``path``
    (:func:`~gradscore.reports.info.loss_trend`), and warn where it rose."""
    from ..reports.info import loss_trend
    trend = loss_trend(path)
    if trend is not None:
        print(trend[0])
        warn(command, [trend[1]] if trend[1] else [])


@contextlib.contextmanager
def warnings_as_lines(command: str) -> Iterator[None]:
    """While ``command`` runs, gradscore's Python warnings print as its warning lines (:func:`warn`),
    not as Python's file-and-source-line display; other warnings as Python shows them. Each
    command prints its own: Python's once-per-line registry would hide a second command's,
    run from the same line (``main`` called in a loop)."""
    _shown.clear()
    python_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, GradscoreWarning):
            warn(command, [str(message)])
        else:
            python_show(message, category, filename, lineno, file, line)
    with warnings.catch_warnings():
        warnings.simplefilter("always", GradscoreWarning)
        warnings.showwarning = show
        yield


def model_kwargs(text: str) -> dict:
    """--model-kwargs: a JSON object, or one line and exit 2."""
    try:
        kwargs = json.loads(text)
    except ValueError as e:
        raise GradscoreError(f"--model-kwargs: not valid JSON ({e})") from e
    if not isinstance(kwargs, dict):
        raise GradscoreError(f"--model-kwargs: must be a JSON object, got {text!r}")
    return kwargs

