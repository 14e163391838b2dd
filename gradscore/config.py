"""Validated run configuration, saved as JSON in every output file.

A later run against an existing output compares :meth:`RunConfig.fingerprint` and is
refused (:class:`~gradscore.exceptions.ConfigMismatchError`) unless ``overwrite`` is asked.
"""
from __future__ import annotations

import json
import math
import operator
import os
from pathlib import Path
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterable, Sequence

from .exceptions import ConfigError

#: Aggregated scores `gradscore run` can produce (see gradscore/scores/).
AVAILABLE_SCORES = ("el2n", "grand", "loss", "pds", "target_dot", "target_cos", "confidence",
                    "variability", "correctness", "forgetting", "threshold_closeness", "aum", "mislabel")
#: Scores that need a target set and the co-states (gradscore/scores/costate.py).
TARGET_SCORES = frozenset({"pds", "target_dot", "target_cos"})
#: Scores that need per-example gradients (all others need a forward pass only).
GRADIENT_SCORES = frozenset({"grand"}) | TARGET_SCORES
ENGINES = ("auto", "ghost", "vmap", "loop")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float64")
LM_REDUCTIONS = ("mean", "sum")
#: dtypes a sketch file may store its sketches in
STORE_DTYPES = ("float16", "float32")
#: ways `gradscore attribute` scores a query against the sketches
ATTRIBUTION_METHODS = ("tracin", "trak")
#: the score a sketch file holds (TracIn's self-influence), beside its sketches
SELF_INFLUENCE = "self_influence"
#: examples above which a data map is a hexbin instead of a scatter
DATA_MAP_POINTS = 20000
#: Scores read from class probabilities: not defined for a language-modelling loss.
CLASS_SCORES = frozenset({"el2n", "confidence", "variability", "correctness", "forgetting",
                          "threshold_closeness", "aum", "mislabel"})


#: suffixes of dataset files (a name with one is a file even if it holds a ':')
DATA_SUFFIXES = (".h5", ".hdf5", ".npz")


def names_a_factory(spec: str) -> bool:
    """True when the dataset ``spec`` is a ``"module:fn"`` factory, not a file: a ':' in a
    name that is no dataset file and no existing path."""
    return ":" in spec and os.path.splitext(spec)[1] not in DATA_SUFFIXES and not os.path.exists(spec)


def absolute_paths(d: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """``d`` with its paths ``names`` absolute and normalized, as fingerprints compare them:
    `ckpts`, `./ckpts/` and `/work/ckpts` are one input (a dataset factory and None stay)."""
    return {**d, **{k: os.path.abspath(d[k]) for k in names
                    if isinstance(d.get(k), str) and d[k] and not names_a_factory(d[k])}}


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; refuse "cuda" without one."""
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("invalid value for 'device': cuda was asked for but torch sees no CUDA device")
    return device


def as_names(value: str | Iterable[str]) -> tuple[str, ...]:
    """Names given as one string (one name, or several separated by commas, as on the command
    line) or as a sequence of them, as a tuple; a string is never taken letter by letter."""
    if isinstance(value, str):
        return tuple(s.strip() for s in value.split(",") if s.strip())
    return tuple(value)


#: what to give for a field of examples (the configs' ``data``, ``target``, ``proxy``, ``query``)
EXAMPLES_PATH = ("the path of a dataset file (.h5/.npz) or a 'module:fn' factory; examples held in memory: "
                 "write them with gs.save_dataset(path, inputs, targets), or name a function that returns them")


def shown(value: Any) -> str:
    """``value`` for an error line: its repr where it is a short scalar, else its type
    (a list of tensors is not printed whole)."""
    text = repr(value) if value is None or isinstance(value, (bool, int, float, str)) else ""
    return text if text and len(text) <= 80 else f"a {type(value).__name__}"


def as_path(value: str | os.PathLike, name: str, want: str = "a path") -> Path:
    """``value`` as a Path; a ConfigError naming the argument ``name`` where it is no path
    (None: a variable not set; a list of examples), not pathlib's TypeError."""
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"invalid value for '{name}': {shown(value)}; give {want}")
    return Path(value)


def path_fields(config: Any, names: Sequence[str], want: str = "a path") -> None:
    """The frozen dataclass ``config``'s fields ``names`` as str paths (os.PathLike's text);
    None (an option not given) stays; anything else is one ConfigError (:func:`as_path`)."""
    for name in names:
        value = getattr(config, name)
        if value is not None:
            object.__setattr__(config, name, os.fspath(as_path(value, name, want)) if not isinstance(value, str)
                               else value)


def checked_fraction(name: str, value: float, allow_zero: bool = False) -> float:
    """``value``, a number in (0, 1] ([0, 1] with ``allow_zero``), else one ConfigError naming ``name``."""
    number = nonnegative(value)
    if number is None or number > 1 or (number == 0 and not allow_zero):
        raise ConfigError(f"invalid value for '{name}': {value!r} is not a fraction in "
                          f"{'[0, 1]' if allow_zero else '(0, 1]'}")
    return number


def checked_model(model: Any) -> Any:
    """``model`` where it is a torch.nn.Module whose parameters have their shapes and values,
    else a ConfigError naming what it is, the lazy layer not yet run or the parameter on the
    meta device: where gs.Scorer, gs.InRun and CheckpointWriter.save take the user's model."""
    from torch import nn
    if not isinstance(model, nn.Module):
        raise ConfigError(f"invalid value for 'model': a {type(model).__name__}; give the torch.nn.Module itself "
                          f"(not a function that builds it, a path or a state_dict)")
    for prefix, module in model.named_modules():
        for name, t in module.named_parameters(prefix=prefix, recurse=False):
            if nn.parameter.is_lazy(t):
                raise ConfigError(f"parameter '{name}' of a lazy layer ({type(module).__name__}) has no shape yet: run "
                                  f"the model on one batch before giving it here (as torch asks before making the "
                                  f"optimizer)")
            if t.is_meta:
                raise ConfigError(f"parameter '{name}' is on the meta device, a shape without values: load the "
                                  f"weights first (model.to_empty(device=...) and load_state_dict)")
    return model


def nonnegative(value: Any, finite: bool = True) -> float | None:
    """``value`` as a float where it is a number >= 0, finite unless not ``finite`` (numpy's
    and a 0-d tensor's too); None for anything else: a string, None, NaN, a negative."""
    if isinstance(value, (str, bytes, bool)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):   # RuntimeError: a tensor of several values
        return None
    return number if number >= 0 and (math.isfinite(number) or not finite) else None


def whole(value: Any) -> int | None:
    """``value`` as an int where it is a whole number (an int, numpy's, a 0-d integer
    tensor); None for anything else: a float, a string, None, a bool."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _require(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"invalid value for '{name}': {why}")


def checked_whole(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int where it is a whole number >= ``minimum`` (:func:`whole`), else one
    ConfigError naming ``name``."""
    number = whole(value)
    _require(number is not None and number >= minimum, name, f"{value!r}; give a whole number >= {minimum}")
    return number


def checked_number(name: str, value: Any, ok: Callable[[float], bool], want: str) -> float:
    """``value`` as a float where it is a finite number >= 0 that ``ok`` accepts, else one
    ConfigError naming ``name`` and what to give (``want``)."""
    number = nonnegative(value)
    _require(number is not None and ok(number), name, f"{value!r}; give {want}")
    return number


def whole_field(config: Any, name: str, minimum: int) -> None:
    """:func:`checked_whole` on the frozen dataclass ``config``'s field, kept as a plain int
    (numpy's does not save as JSON)."""
    object.__setattr__(config, name, checked_whole(name, getattr(config, name), minimum))


def number_field(config: Any, name: str, ok: Callable[[float], bool], want: str) -> None:
    """:func:`checked_number` on the frozen dataclass ``config``'s field; a plain int or float
    kept as given (the saved config's text stays the same), numpy's and a tensor's as a
    float. None (an option not given) stays."""
    value = getattr(config, name)
    if value is not None:
        number = checked_number(name, value, ok, want)
        object.__setattr__(config, name, value if type(value) in (int, float) else number)


def parse_range(text: str, name: str = "range") -> tuple[int | None, int | None]:
    """"A:B" -> (A, B) of a half-open range of positions (or steps); an end left out is None."""
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        a, b = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise ConfigError(f"invalid value for '{name}': {text!r}; give A:B, from A up to (not including) B, "
                          f"e.g. 0:1000 or 5000:") from None
    _require((a is None or a >= 0) and (b is None or b >= 0), name, f"{text!r} has a negative value")
    _require(a is None or b is None or b > a, name, f"{text!r} is empty; B must be larger than A")
    return a, b


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines the numbers a scoring run writes.

    Two runs with equal configs (and equal checkpoint/data checksums) write
    bit-identical scores, which is what makes resuming safe.
    """

    checkpoints: str = field(metadata={"help": "directory of step_*.h5 checkpoint files"})
    data: str = field(metadata={"help": ".h5/.npz dataset or 'module:fn' factory"})
    scores: tuple[str, ...] = field(default=("el2n", "grand", "loss"),
                                    metadata={"help": "aggregated scores to compute"})
    engine: str = field(default="auto", metadata={"help": "per-example gradient engine"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto"})
    dtype: str = field(default="float32", metadata={"help": "model/computation dtype"})
    batch_size: int = field(default=256, metadata={"help": "examples per engine call"})
    chunk_size: int = field(default=4096,
                            metadata={"help": "examples per resumable unit of work"})
    chunk_bytes: int = field(default=256 * 2**20,
                             metadata={"help": "memory budget of one (B, P) gradient block"})
    epochs_upto: float | None = field(default=None, metadata={
        "help": "aggregate over checkpoints with epoch <= this (Data Diet's early scores)"})
    steps: str | None = field(default=None, metadata={
        "help": "aggregate over checkpoints with step in A:B (A <= step < B; either end may be left out)"})
    target: str | None = field(default=None, metadata={
        "help": "target (downstream) dataset for pds, target_dot, target_cos"})
    costate: str | None = field(default=None, metadata={
        "help": "co-state file (default <checkpoints>/costate.h5, computed when missing; without pds, "
                "<checkpoints>/target_gradient.h5 with ∇J(θ_t) alone)"})
    lr_scale_steps: bool = field(default=False, metadata={
        "help": "PDS: η_t = lr × optimizer steps between checkpoints t and t+1"})
    variants: tuple[str, ...] = field(default=(), metadata={
        "help": "also store <score>_<variant> for pds/target_dot: cos, clip, rank, resid"})
    clip_quantile: float = field(default=0.9, metadata={"help": "the 'clip' variant's ‖g‖ quantile"})
    lm_reduction: str | None = field(default=None, metadata={
        "help": "token loss (causal_lm, masked_lm) per example: mean or sum over its predicted tokens; None: "
                "the checkpoints' own"})
    params: tuple[str, ...] = field(default=(), metadata={
        "help": "names or shell patterns of the parameters to score ('head.*'); empty: every trainable one"})
    allow_nonfinite: bool = field(default=False, metadata={
        "help": "keep going past NaN/Inf inputs or scores, recording the examples in /nonfinite"})
    store_logits: bool = field(default=False, metadata={
        "help": "also keep every checkpoint's logits (T, N, C) as float16 in /logits, for other tools"})
    ids: str | None = field(default=None, metadata={
        "help": "score only these examples: a file of their ids (one per line, or .npy)"})
    index_range: str | None = field(default=None, metadata={
        "help": "score only the examples at positions A:B of the data (either end may be left out)"})

    def __post_init__(self) -> None:
        path_fields(self, ("checkpoints", "costate", "ids"))
        path_fields(self, ("data", "target"), EXAMPLES_PATH)
        scores = as_names(self.scores)
        object.__setattr__(self, "scores", scores)
        _require(len(scores) > 0, "scores", "give at least one score")
        for s in scores:
            _require(s in AVAILABLE_SCORES, "scores",
                     f"unknown score '{s}'; choose from {', '.join(AVAILABLE_SCORES)}")
        _require(len(set(scores)) == len(scores), "scores", "a score is listed twice")
        _require(self.engine in ENGINES, "engine", f"'{self.engine}' is not one of {ENGINES}")
        _require(self.device in DEVICES, "device", f"'{self.device}' is not one of {DEVICES}")
        _require(self.dtype in DTYPES, "dtype", f"'{self.dtype}' is not one of {DTYPES}")
        for name in ("batch_size", "chunk_size", "chunk_bytes"):
            whole_field(self, name, 1)
        number_field(self, "epochs_upto", lambda v: True, "an epoch >= 0")
        object.__setattr__(self, "variants", as_names(self.variants))
        object.__setattr__(self, "params", as_names(self.params))
        for v in self.variants:
            _require(v in ("cos", "clip", "rank", "resid"), "variants",
                     f"unknown variant '{v}'; choose from cos, clip, rank, resid")
        _require(self.lm_reduction is None or self.lm_reduction in LM_REDUCTIONS, "lm_reduction",
                 f"'{self.lm_reduction}' is not one of {LM_REDUCTIONS}")
        number_field(self, "clip_quantile", lambda v: 0 < v <= 1, "a quantile in (0, 1]")
        _require(not self.variants or bool({"pds", "target_dot"} & set(scores)), "variants",
                 "variants apply to pds or target_dot; ask for one of them in scores")
        _require(self.ids is None or self.index_range is None, "ids",
                 "give the examples to score by --ids or by --range, not both")
        if self.index_range is not None:
            parse_range(self.index_range)
        if self.steps is not None:
            parse_range(self.steps, "steps")
        wants_target = sorted(TARGET_SCORES & set(scores))
        _require(self.target is not None or not wants_target, "target",
                 f"scores {', '.join(wants_target)} need a target set (--target FILE)")

    @property
    def needs_target(self) -> bool:
        """True when a requested score needs the target set and the co-states."""
        return bool(TARGET_SCORES & set(self.scores))

    @property
    def needs_gradients(self) -> bool:
        """True when any requested score needs per-example gradients."""
        return any(s in GRADIENT_SCORES for s in self.scores)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON types (tuples as lists, paths absolute), as saved beside the
        scores and compared on resume."""
        d = asdict(self)
        d["scores"] = list(self.scores)
        d["variants"] = list(self.variants)
        d["params"] = list(self.params)
        return absolute_paths(d, ("checkpoints", "data", "target", "costate", "ids"))

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text, keys sorted (the same config gives the same text)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """A validated config from :meth:`to_dict`'s dict; keys it does not know are left out."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k in ("scores", "variants") else v) for k, v in d.items() if k in known})


@dataclass(frozen=True)
class SketchConfig:
    """What ``gradscore sketch`` computes; saved as the sketch file's ``config``."""

    checkpoints: str
    data: str
    dim: int = 8192
    seed: int = 0
    store_dtype: str = "float16"
    params: tuple[str, ...] = ()
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 256
    chunk_size: int = 4096

    def __post_init__(self) -> None:
        path_fields(self, ("checkpoints",))
        path_fields(self, ("data",), EXAMPLES_PATH)
        object.__setattr__(self, "params", as_names(self.params))
        whole_field(self, "dim", 1)
        whole_field(self, "seed", 0)
        _require(self.store_dtype in STORE_DTYPES, "store_dtype", f"{self.store_dtype!r}; choose {STORE_DTYPES}")
        _require(self.device in DEVICES, "device", f"{self.device!r}; choose {DEVICES}")
        _require(self.dtype in DTYPES, "dtype", f"{self.dtype!r}; choose {DTYPES}")
        whole_field(self, "batch_size", 1)
        whole_field(self, "chunk_size", 1)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON types (paths absolute), as saved in the sketch file and
        compared on resume."""
        d = asdict(self)
        d["params"] = list(self.params)
        return absolute_paths(d, ("checkpoints", "data"))


@dataclass(frozen=True)
class AttributeConfig:
    """What ``gradscore attribute`` computes; saved as the attribution file's ``config``."""

    sketch: str
    query: str
    checkpoints: str = ""            # default: those the sketch file was made from
    method: str = "tracin"
    top: int = 20
    full: bool = False
    ridge: float = 1e-3
    trak_checkpoints: str = "last"   # "last" or "all"
    block_size: int = 65536
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 256

    def __post_init__(self) -> None:
        path_fields(self, ("sketch", "checkpoints"))
        path_fields(self, ("query",), EXAMPLES_PATH)
        _require(self.method in ATTRIBUTION_METHODS, "method", f"{self.method!r}; choose {', '.join(ATTRIBUTION_METHODS)}")
        whole_field(self, "top", 1)
        number_field(self, "ridge", lambda v: v > 0, "a number > 0")
        _require(self.trak_checkpoints in ("last", "all"), "trak_checkpoints",
                 f"{self.trak_checkpoints!r}; choose last or all")
        whole_field(self, "block_size", 1)
        whole_field(self, "batch_size", 1)
        _require(self.device in DEVICES, "device", f"{self.device!r}; choose {DEVICES}")
        _require(self.dtype in DTYPES, "dtype", f"{self.dtype!r}; choose {DTYPES}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
