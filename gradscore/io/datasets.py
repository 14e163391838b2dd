"""Datasets to score: ``.h5``/``.npz`` files or a ``"module:fn"`` factory.

File fields: ``inputs`` (N, ...), ``targets`` (N, ...) (class indices for classification),
optional ``ids`` (N,) and ``noisy`` (N,) bool (a known-corrupted mask, for evaluation
only). HDF5 files are read chunk by chunk, so N never has to fit in memory; ``.npz``
files are loaded whole (zip members cannot be memory-mapped).

Text (token sequences) instead of ``inputs``: ``input_ids`` (N, T) int, optional
``attention_mask`` (N, T) (1 = real token, 0 = padding), and either ``labels`` (N, T)
for language modelling (−100 = no loss at that position; default: ``input_ids`` with
padding set to −100; a masked LM's are needed: the masked positions' tokens, −100 at the
others) or ``targets`` (N,) for sequence classification. The model is then
called as ``model(input_ids=…, attention_mask=…)``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic import atomic_h5
from .attrs import KIND_NAMES, attributes, kind_of
from .outputs import claim
from .store import DamagedFile, damage_named, put, read_ids, read_numpy, write_ids
from ..batch import Inputs, call_model, concat, describe, hash_batch, move, take
from ..config import DATA_SUFFIXES, EXAMPLES_PATH, as_path, names_a_factory
from ..exceptions import DataError, lock_refused, warn
from ..losses import IGNORE_INDEX, Loss, one_logit, token_family
from ..imports import import_ref

REQUIRED_FIELDS = ("inputs", "targets")
#: Model keyword inputs of a text dataset, in the order they are passed.
TEXT_INPUTS = ("input_ids", "attention_mask")
#: Dataset files larger than this are fingerprinted by size and mtime instead of SHA-256.
_HASH_LIMIT = 1 << 30
OPTIONAL_FIELDS = ("ids", "noisy", "attention_mask", "labels", "targets")


class Dataset(ABC):
    """N examples readable by contiguous index ranges."""

    #: where the data came from (a path or a factory reference), used in error messages
    source: str
    #: the field that holds the targets, used in error messages
    target_field: str = "targets"
    #: text without a labels field: the labels are the input_ids (padding ignored)
    default_labels: bool = False

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def read(self, start: int, stop: int) -> tuple[Inputs, torch.Tensor]:
        """Examples ``start:stop`` as ``(inputs, targets (B, ...))``; inputs are a tensor
        (B, ...) or, for text, a dict of (B, T) tensors (see the module docstring)."""

    def chunks(self, size: int = 4096) -> Iterator[tuple[int, Inputs, torch.Tensor]]:
        """``(start, inputs, targets)`` for consecutive chunks of at most ``size`` examples."""
        for start in range(0, len(self), size):
            yield (start, *self.read(start, min(len(self), start + size)))

    def ids(self) -> np.ndarray:
        """(N,) example ids; ``arange(N)`` unless the data provides them."""
        return np.arange(len(self), dtype=np.int64)

    def has_ids(self) -> bool:
        """Whether the data provides its ids (else :meth:`ids` are its positions)."""
        return False

    def noisy(self) -> np.ndarray | None:
        """(N,) bool known-corrupted mask, or None."""
        return None

    def stored_dtype(self, field: str) -> str | None:
        """The numpy dtype name ``field`` has in the file (``read`` widens integers and bools
        to int64), or None where the data is not a file."""
        return None

    def fingerprint(self, progress: bool = False) -> dict[str, Any]:
        """What identifies these examples, for refusing to resume on other data: the SHA-256
        of every example's inputs and target (one pass over the data; a factory's data can
        change under the same name). ``progress``: a bar over that pass."""
        h = hashlib.sha256()
        with tqdm(total=len(self), desc="fingerprint", unit="ex", leave=False,
                  disable=None if progress else True) as bar:
            for start, x, y in self.chunks(1024):
                hash_batch(h, x, y)
                bar.update(len(y))
        return {"source": self.source, "n": len(self), "sha256": h.hexdigest()}

    def nonfinite(self, rows: np.ndarray, what: str, ckpt: str | os.PathLike, fix: str) -> DataError:
        """The DataError for the examples at positions ``rows`` whose ``what`` is NaN or
        infinite at checkpoint ``ckpt``: their count, their first five ids, and ``fix``."""
        ids = ", ".join(map(str, self.ids()[rows[:5]]))
        return DataError(f"{self.source}: {len(rows)} example(s) (ids {ids}{', …' if len(rows) > 5 else ''}) give "
                         f"non-finite {what} at checkpoint {ckpt}: NaN/Inf in their inputs, or a diverged "
                         f"checkpoint; {fix}")

    def check_labels(self, start: int, targets: torch.Tensor, n_classes: int,
                     ignore_index: int | None = None) -> None:
        """Raise :class:`DataError` if integer targets fall outside ``[0, n_classes)``
        (values equal to ``ignore_index`` excepted)."""
        if targets.dtype.is_floating_point or targets.numel() == 0:
            return
        bad = (targets < 0) | (targets >= n_classes)
        if ignore_index is not None:
            bad &= targets != ignore_index
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            raise DataError(f"{self.source}: field '{self.target_field}' has label "
                            f"{int(targets.flatten()[bad.flatten()][0])} at index {start + j}, outside "
                            f"[0, {n_classes}) of the model's {n_classes} outputs; relabel or drop those "
                            f"examples (run --ids scores the others), or give a model with an output per class")


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype == np.bool_:
        arr = arr.astype(np.int64)
    elif arr.dtype.kind in "iu":
        arr = arr.astype(np.int64, copy=False)
    return torch.from_numpy(np.ascontiguousarray(arr))


class ArrayFileDataset(Dataset):
    """A ``.h5`` (read lazily) or ``.npz`` (loaded whole) file with the fields above."""

    #: what to do with a damaged dataset file
    FIX = "restore it from a copy or save it again"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.source = str(self.path)
        if self.path.is_dir():
            raise DataError(f"{self.path}: is a directory, not a dataset file; give an .h5 or .npz file, or a "
                            f"'module:fn' factory that returns a torch Dataset (an ImageFolder with its evaluation "
                            f"transform)")
        if not self.path.is_file():
            raise DataError(f"{self.path}: dataset file does not exist")
        self._h5: h5py.File | None = None
        try:
            if self.path.suffix == ".npz":
                self._arrays: Any = read_numpy(self.path)
                if not isinstance(self._arrays, dict):
                    raise DataError(f"{self.path}: holds one array (a .npy), not the named fields of a "
                                    f".npz; save it with np.savez(path, inputs=..., targets=...)")
            elif self.path.suffix in (".h5", ".hdf5"):
                self._h5 = h5py.File(self.path, "r")
                self._arrays = self._h5
            else:
                raise DataError(f"{self.path}: unknown dataset extension '{self.path.suffix}'; "
                                f"use .h5, .npz or a 'module:fn' factory")
        except DamagedFile as e:
            raise DataError(f"{self.path}: cannot read dataset file ({e}); {self.FIX}") from e
        except (OSError, ValueError) as e:
            raise lock_refused(self.path, e) or DataError(f"{self.path}: cannot read dataset file ({e})") from e
        try:
            with damage_named(self.path, fix=self.FIX):   # an HDF5 object header failing its checksum
                self._check_fields()
        except BaseException:
            self.close()
            raise

    def _check_fields(self) -> None:
        """The fields are there, of one length (and text's of one shape), ids unique."""
        keys = set(self._arrays.keys())
        self.text = "input_ids" in keys
        missing = [k for k in (("input_ids",) if self.text else REQUIRED_FIELDS) if k not in keys]
        kind = "dataset" if not missing or self._h5 is None else kind_of(self._h5)
        if kind != "dataset":   # a file gradscore wrote, given for the examples
            raise DataError(f"{self.path}: is a gradscore {KIND_NAMES[kind]}, not a dataset; give the examples' "
                            f"file (.h5 or .npz with 'inputs' and 'targets', or 'input_ids')")
        problem = fields_problem(self._arrays, self.ids)
        if problem is not None:
            raise DataError(f"{self.path}: {problem}")
        self._n = int(self._arrays["input_ids" if self.text else "inputs"].shape[0])
        if self.text:
            self.target_field = "labels" if "labels" in keys or "targets" not in keys else "targets"
            self.default_labels = self.target_field not in keys

    def __len__(self) -> int:
        return self._n

    def _get(self, key: str, index: Any = ()) -> np.ndarray:
        """``field[index]``; one error naming the file where it fails its checksum (damaged)."""
        with damage_named(self.path):
            return np.asarray(self._arrays[key][index])

    def _field(self, key: str, start: int, stop: int) -> torch.Tensor:
        return _as_tensor(self._get(key, slice(start, stop)))

    def read(self, start: int, stop: int) -> tuple[Inputs, torch.Tensor]:
        if not self.text:
            return self._field("inputs", start, stop), self._field("targets", start, stop)
        x = {k: self._field(k, start, stop) for k in TEXT_INPUTS if k in self._arrays}
        if self.target_field in self._arrays:
            return x, self._field(self.target_field, start, stop)
        labels = x["input_ids"].clone()
        if "attention_mask" in x:
            labels[x["attention_mask"] == 0] = IGNORE_INDEX
        return x, labels

    def ids(self) -> np.ndarray:
        if "ids" in self._arrays and self._h5 is not None:   # strings as str, checked (io.store.read_ids)
            with damage_named(self.path, self.FIX):
                return read_ids(self._arrays["ids"])
        if "ids" in self._arrays:
            return self._get("ids")
        return super().ids()

    def has_ids(self) -> bool:
        return "ids" in self._arrays

    def stored_dtype(self, field: str) -> str | None:
        return str(self._arrays[field].dtype) if field in self._arrays else None

    def noisy(self) -> np.ndarray | None:
        if "noisy" in self._arrays:
            return self._get("noisy").astype(bool)
        return None

    def fingerprint(self, progress: bool = False) -> dict[str, Any]:
        """Path, size and SHA-256 (size and mtime for files over 1 GiB)."""
        from .checkpoints import file_sha256
        st = self.path.stat()
        fp: dict[str, Any] = {"file": str(self.path.resolve()), "size": st.st_size}
        if st.st_size <= _HASH_LIMIT:
            fp["sha256"] = file_sha256(self.path)
        else:
            fp["mtime_ns"] = st.st_mtime_ns
        return fp

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None


class TorchDataset(Dataset):
    """Wrap a map-style ``torch.utils.data.Dataset`` whose items are ``(input, target)``."""

    def __init__(self, dataset: Any, source: str = "<torch dataset>") -> None:
        self.dataset = dataset
        self.source = source
        try:
            self._n = len(dataset)
        except TypeError as e:
            raise DataError(f"{source}: dataset has no len(); give a map-style Dataset") from e
        self._check_repeatable()

    def _check_repeatable(self, n: int = 16) -> None:
        """A DataError where one of the first ``n`` examples differs between two reads (a
        random transform: every score would be of a random draw). torch's, numpy's and
        Python's global random states are left as they were."""
        n = min(n, self._n)
        if not n:
            return
        kept = np.random.get_state(), random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                reads = [self.read(0, n), self.read(0, n)]
        finally:
            np.random.set_state(kept[0])
            random.setstate(kept[1])
        for i in range(n):
            digests = []
            for x, y in reads:
                h = hashlib.sha256()
                hash_batch(h, take(x, i, i + 1), y[i:i + 1])
                digests.append(h.digest())
            if digests[0] != digests[1]:
                raise DataError(f"{self.source}: example {i} differs between two reads (a random transform, such as "
                                f"training's crops or flips?), so every score would be of a random draw; give the "
                                f"dataset with its evaluation transform")

    def __len__(self) -> int:
        return self._n

    def read(self, start: int, stop: int) -> tuple[Inputs, torch.Tensor]:
        items = [self.dataset[i] for i in range(start, stop)]
        try:
            xs, ys = zip(*items)
        except (TypeError, ValueError) as e:
            raise DataError(f"{self.source}: items must be (input, target) pairs") from e
        ys_t = self._stacked(ys, ("target", "targets"), start)
        if isinstance(xs[0], Mapping):  # text: dicts of model keyword inputs
            return {k: self._stacked([x[k] for x in xs], (f"input '{k}'", f"inputs '{k}'"), start)
                    for k in xs[0]}, ys_t
        return self._stacked(xs, ("input", "inputs"), start), ys_t

    def _stacked(self, values: Sequence[Any], names: tuple[str, str], start: int) -> torch.Tensor:
        """``values`` (examples ``start``…) as one tensor (B, ...); a value torch does not read
        as numbers, or values of other shapes, one DataError naming the example (``names``:
        what a value is, in the singular and the plural)."""
        one, what = names
        tensors = []
        for i, v in enumerate(values):
            try:
                tensors.append(torch.as_tensor(v))
            except (TypeError, ValueError, RuntimeError) as e:
                fix = "class indices (ints)" if one == "target" else "tensors or arrays (a transform such as ToTensor)"
                raise DataError(f"{self.source}: {one} of example {start + i} is a "
                                f"{type(v).__name__} ({repr(v)[:40]}), which torch does not read as numbers; give "
                                f"{fix}") from e
        shapes = list(dict.fromkeys(tuple(t.shape) for t in tensors))
        if len(shapes) > 1:
            raise DataError(f"{self.source}: {what} of examples {start} to {start + len(values) - 1} differ in shape: "
                            f"{', '.join(map(str, shapes[:3]))}; give examples of one shape (resize them, or pad "
                            f"to one length)")
        return torch.stack(tensors)


class SubsetDataset(Dataset):
    """The examples of ``base`` at ``positions`` ((M,) sorted, unique), in the base's order."""

    def __init__(self, base: Dataset, positions: np.ndarray, what: str) -> None:
        self.base, self.positions, self.what = base, np.asarray(positions, dtype=np.int64), what
        self.source, self.target_field = f"{base.source} ({what})", base.target_field
        self.default_labels = base.default_labels

    def __len__(self) -> int:
        return len(self.positions)

    def read(self, start: int, stop: int) -> tuple[Inputs, torch.Tensor]:
        pos = self.positions[start:stop]
        if len(pos) == 0:
            return self.base.read(0, 0)
        breaks = np.flatnonzero(np.diff(pos) != 1) + 1   # one base read per run of consecutive positions
        parts = [self.base.read(int(run[0]), int(run[-1]) + 1) for run in np.split(pos, breaks)]
        return concat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    def ids(self) -> np.ndarray:
        return self.base.ids()[self.positions]

    def has_ids(self) -> bool:
        return self.base.has_ids()

    def noisy(self) -> np.ndarray | None:
        noisy = self.base.noisy()
        return None if noisy is None else noisy[self.positions]

    def fingerprint(self, progress: bool = False) -> dict[str, Any]:
        return {**self.base.fingerprint(progress), "subset": self.what,
                "positions_sha256": hashlib.sha256(self.positions.tobytes()).hexdigest()}


def _read_ids(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: does not exist; give a file of example ids, one per line (or .npy)")
    try:
        if path.suffix == ".npy":
            loaded = read_numpy(path)
            if isinstance(loaded, dict):
                raise ValueError("a .npz archive, not one array")
            return np.asarray(loaded).reshape(-1)
        return np.array([line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()])
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read as example ids ({e}); give one id per line, or a .npy array") from e


def subset(ds: Dataset, *, ids: str | Path | None = None, index_range: str | None = None) -> Dataset:
    """``ds`` restricted to the examples whose ids are listed in the file ``ids``, or to the
    positions ``index_range`` ("A:B"); ``ds`` itself when neither is given. The examples keep
    the data's order; an id listed twice is scored once; an unknown id is a :class:`DataError`."""
    from ..config import parse_range
    n = len(ds)
    if index_range is not None:
        a, b = parse_range(index_range)
        a, b = 0 if a is None else a, n if b is None else b
        if b > n:
            raise DataError(f"{ds.source}: has {n} examples; the range {index_range} (--range) goes past them")
        return SubsetDataset(ds, np.arange(a, b), f"positions {a}:{b}")
    if ids is None:
        return ds
    path = Path(ids)
    wanted = _read_ids(path)
    have = ds.ids()
    keys = have.astype(str) if have.dtype.kind in "OUS" or wanted.dtype.kind in "OUS" else have
    wanted = wanted.astype(keys.dtype) if keys.dtype.kind in "OUS" else wanted
    found = np.isin(keys, wanted)
    missing = np.setdiff1d(wanted, keys[found])
    if len(missing):
        raise DataError(f"{path}: {len(missing)} id(s) are not in {ds.source} (e.g. "
                        f"{', '.join(map(str, missing[:5]))}); list ids from its 'ids' field (positions 0..N-1 "
                        f"when it has none)")
    if not found.any():
        raise DataError(f"{path}: lists no example id; there is nothing to score")
    return SubsetDataset(ds, np.flatnonzero(found), f"ids of {path.name}")


def positions_of(ds: Dataset, ids: np.ndarray) -> np.ndarray:
    """(N,) int64: where each of a scores file's ``ids`` sits in ``ds``, matched by id — the
    data's order need not be the scores file's (an in-run file lists its ids sorted; a
    subset run holds some). Data without ids of its own and of the same length is read in
    the scores file's row order. DataError naming an id the data does not have."""
    have = ds.ids()
    if len(have) == len(ids) and np.array_equal(have, ids):
        return np.arange(len(ids))
    order = np.argsort(have, kind="stable")
    pos = order[np.minimum(np.searchsorted(have, ids, sorter=order), max(len(have) - 1, 0))]
    missing = ~(have[pos] == ids) if len(have) else np.ones(len(ids), dtype=bool)
    if not missing.any():
        return pos
    if not ds.has_ids() and len(have) == len(ids):
        return np.arange(len(ids))
    first = ids[np.flatnonzero(missing)[0]]
    raise DataError(f"{ds.source}: has no example with id {first.item() if hasattr(first, 'item') else first} "
                    f"({int(missing.sum())} of the scores file's {len(ids)} ids are missing); give the data "
                    f"that was scored")


def check_scored(ds: Dataset, scores: str | Path) -> None:
    """A GradscoreWarning where ``ds`` is not the dataset the scores (or sketch) file ``scores``
    was computed from, by the fingerprint it records (the file's SHA-256, else its size and
    time; a factory's content hash): its labels and noisy mask are matched to the scored
    examples by id, so another dataset's would be read as theirs. A file that records no
    dataset (in-run, imported dynamics) is not checked."""
    with h5py.File(scores, "r") as f:
        recorded = json.loads(attributes(f).get("fingerprint", "{}")).get("data")
    if not isinstance(recorded, dict):
        return
    given = ds.fingerprint()
    keys = ("sha256",) if "sha256" in recorded and "sha256" in given else ("size", "mtime_ns")
    if all(k in recorded and k in given for k in keys) and any(recorded[k] != given[k] for k in keys):
        warn(f"{ds.source}: is not the data {scores} was scored from ({recorded.get('file', recorded.get('source'))}),"
             f" or has changed since: its labels and noisy mask are matched to the scored examples by id (by row, "
             f"where it has no ids); if it is another dataset, every figure read from them is of its examples")


def scored_labels(data: str | Path | Dataset, ids: np.ndarray,
                  scores: str | Path | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(N,) labels and the known-noisy mask (or None) of the scores file's examples ``ids``
    (N,), read from the data they were scored from, matched by id; ``scores``: that file,
    against whose record the data is checked (:func:`check_scored`)."""
    ds = load_dataset(data) if not isinstance(data, Dataset) else data
    if scores is not None:
        check_scored(ds, scores)
    pos = positions_of(ds, np.asarray(ids))
    labels = np.concatenate([y.numpy() for _, _, y in ds.chunks()])
    noisy = ds.noisy()
    return labels[pos], None if noisy is None else noisy[pos]


def probe_model(model: torch.nn.Module, ds: Dataset, x: Inputs, ckpt: str | Path, role: str = "") -> int:
    """Run ``model`` on the first example of ``x``; return its output's last dimension.

    A shape or dtype mismatch becomes one :class:`DataError` naming the data and checkpoint.
    """
    x = take(x, 0)
    field = "input_ids" if isinstance(x, Mapping) else "inputs"
    like = next(model.parameters())
    try:
        with torch.no_grad():
            out = call_model(model, move(x, like))
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        said = f"{e}"
        if _fits_as_floats(model, x, like):   # images stored as uint8: torch names only the two dtypes
            said = (f"its inputs are integers, the model's parameters {str(like.dtype).removeprefix('torch.')}: "
                    f"store them as float32, scaled as in training ({e})")
        raise DataError(f"{ds.source}: {role + ' ' if role else ''}field '{field}' (per-example "
                        f"{described(ds, field, x)}) does not fit the model of {ckpt}: {said}") from e
    return int(out.shape[-1])


def described(ds: Dataset, field: str, x: Inputs) -> str:
    """``x``'s per-example shapes and dtypes (:func:`~gradscore.batch.describe`), with the
    dtype ``field`` has in the file where reading widened it (uint8 images read as int64)."""
    stored = None if isinstance(x, Mapping) else ds.stored_dtype(field)
    if stored is None or stored == str(x.dtype).removeprefix("torch."):
        return describe(x)
    return f"shape {tuple(x.shape[1:])}, {stored} in the file, read as {x.dtype}"


def _fits_as_floats(model: torch.nn.Module, x: Inputs, like: torch.Tensor) -> bool:
    """Whether integer inputs ``x`` that ``model`` refused run as ``like``'s float dtype."""
    if not (isinstance(x, torch.Tensor) and not x.is_floating_point() and like.is_floating_point()):
        return False
    try:
        with torch.no_grad():
            call_model(model, move(x.to(like.dtype), like))
    except Exception:  # noqa: BLE001 - they do not: torch's own error is the message
        return False
    return True


def check_targets(ds: Dataset, loss: Loss, start: int, targets: torch.Tensor, n_out: int) -> None:
    """Targets of a built-in classification or language-modelling loss must be integers that
    index the model's ``n_out`` outputs (classes, or the vocabulary, where −100 marks an
    ignored token). Float targets are refused: one-hot or soft labels (N, C) would give right
    losses but wrong EL2N and no p_gold, and float class indices are ambiguous. A user's
    loss function takes its targets as it reads them (float values, or 0/1 labels for one
    logit); integer targets of a model with several outputs must index them, since the
    class metrics do."""
    if not (loss.is_classification or loss.output == "tokens"):
        return
    if loss.is_cross_entropy and n_out == 1:   # before its labels are said to be out of range
        raise one_logit((len(targets), 1))
    if ds.default_labels and token_family(loss) == "masked_lm":
        raise DataError(f"{ds.source}: no field 'labels', and a masked LM's labels say which positions are "
                        f"masked: store 'labels' (N, T), the masked positions' tokens and −100 at the others, "
                        f"with those positions masked in 'input_ids'")
    if loss.output != "tokens" and not loss.indexes_classes:   # a user's function reads its targets its own way
        if not targets.dtype.is_floating_point and n_out >= 2:   # the class metrics index the outputs with them
            ds.check_labels(start, targets, n_out)
        return
    if targets.dtype.is_floating_point:
        field = f"{ds.source}: field '{ds.target_field}'"
        if targets.dim() >= 2 and targets.shape[-1] == n_out:
            raise DataError(f"{field} holds float targets of shape (N, {n_out}), one-hot or soft labels, "
                            f"which the loss '{loss.name}' does not take; store the class indices "
                            f"(targets.argmax(1), int64) instead")
        raise DataError(f"{field} holds float values (e.g. {float(targets.flatten()[0]):g} at index {start}); "
                        f"class targets must be integers: store them as int64 (targets.astype('int64'))")
    if loss.output != "tokens" and targets.dim() != 1:
        raise DataError(f"{ds.source}: field '{ds.target_field}' has per-example shape {tuple(targets.shape[1:])}; "
                        f"the loss '{loss.name}' takes one class index per example: store them with shape (N,) "
                        f"(targets.reshape(-1) for a column)")
    ds.check_labels(start, targets, n_out, IGNORE_INDEX if loss.output == "tokens" else None)


def load_dataset(spec: str | Path | Dataset) -> Dataset:
    """Open a dataset from a ``.h5``/``.npz`` path or a ``"module:fn"`` factory."""
    if isinstance(spec, Dataset):
        return spec
    s = os.fspath(as_path(spec, "data", EXAMPLES_PATH))
    if names_a_factory(s):
        return TorchDataset(import_ref(s, "dataset factory", DataError)(), source=s)
    if os.path.splitext(s)[1] in DATA_SUFFIXES or os.path.exists(s):
        return ArrayFileDataset(s)
    raise DataError(f"{s}: dataset file does not exist (and it is not a 'module:fn' factory)")


def fields_problem(arrays: Mapping[str, Any], ids: Callable[[], np.ndarray]) -> str | None:
    """What keeps the fields ``arrays`` (arrays or HDF5 datasets, by name) from being a
    dataset, or None: a field missing, fields of other lengths (text: other shapes), inputs
    or targets that are not numbers, ids (read by ``ids()``) repeated."""
    keys = set(arrays.keys())
    text = "input_ids" in keys
    required = ("input_ids",) if text else REQUIRED_FIELDS
    for key in required:
        if key not in keys:
            return (f"missing field '{key}' (found: {', '.join(sorted(keys)) or 'none'}); a dataset needs "
                    f"'inputs' and 'targets', or 'input_ids' for text")
    first = required[0]
    n = int(arrays[first].shape[0])
    for key in REQUIRED_FIELDS + OPTIONAL_FIELDS + ("input_ids",):
        if key in keys and int(arrays[key].shape[0]) != n:
            return f"field '{key}' has {arrays[key].shape[0]} rows but '{first}' has {n}"
    for key in REQUIRED_FIELDS + ("input_ids", "attention_mask", "labels"):
        if key in keys and arrays[key].dtype.kind not in "biuf":   # torch reads numbers only
            fix = ("store class indices (np.unique(targets, return_inverse=True)[1])" if key in ("targets", "labels")
                   else "store numbers (token ids as 'input_ids' for text)")
            return f"field '{key}' holds text ({arrays[key].dtype.str}), not numbers; {fix}"
    if text:
        shape = tuple(arrays["input_ids"].shape)
        for key in ("attention_mask", "labels"):
            if key in keys and tuple(arrays[key].shape) != shape:
                return f"field '{key}' has shape {tuple(arrays[key].shape)} but 'input_ids' has {shape}"
    if "ids" in keys and len(np.unique(ids())) != n:
        return "field 'ids' has duplicate values"
    if "noisy" in keys:
        problem = mask_problem(np.asarray(arrays["noisy"][()]))
        if problem is not None:
            return f"field 'noisy' {problem}"
    return None


#: how to make a known-noisy mask, in what :func:`mask_problem` says
MASK_FIX = "give True for each known-noisy example, one entry per example (from indices: mask = np.zeros(N, bool); " \
           "mask[indices] = True)"


def mask_problem(values: np.ndarray) -> str | None:
    """What keeps ``values`` from being a known-noisy mask (N,) (bools, or numbers 0 and 1
    only), or None: read as bools, a field of labels or of indices would mark every
    nonzero one noisy, and every figure against the mask would be of that."""
    if values.ndim != 1:
        return f"has shape {values.shape}; {MASK_FIX}"
    if values.dtype == bool:
        return None
    if values.dtype.kind not in "iuf":
        return f"holds {values.dtype.str} values, not True/False; {MASK_FIX}"
    other = (values != 0) & (values != 1)
    if other.any():
        return f"holds {values[other][0].item()!r} at position {int(np.argmax(other))}, not only 0 and 1; {MASK_FIX}"
    return None


def _as_array(values: Any) -> np.ndarray:
    """``values`` as a numpy array; a tensor by its values (one that requires grad, on a GPU),
    bfloat16 as float32 (HDF5 has no bfloat16; the float32 holds each value exactly)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        values = values.float() if values.dtype == torch.bfloat16 else values
        return values.numpy()
    return np.asarray(values)


def save_dataset(path: str | Path, inputs: np.ndarray | Mapping[str, np.ndarray],
                 targets: np.ndarray | None, *, ids: np.ndarray | None = None,
                 noisy: np.ndarray | None = None) -> Path:
    """Write a dataset HDF5 file atomically (chunked, so it can be read lazily). Each field
    is a numpy array, a list or a torch tensor (saved by its values; bfloat16 as float32).
    An existing file at ``path`` is replaced only where it is a dataset this function
    wrote; any other is refused (:class:`~gradscore.exceptions.OutputError`), left as it was.

    ``inputs``: an array (N, ...), or for text a dict with ``input_ids`` (N, T) and
    optionally ``attention_mask`` (N, T); its ``targets`` are then written as ``labels``
    when they are per token (N, T), else as ``targets`` (N,); None: default LM labels.
    """
    path = claim(as_path(path, "path"), "dataset", overwrite=True)   # never over a file of another kind
    if isinstance(inputs, Mapping):
        fields = dict(inputs)
        if targets is not None:
            per_token = np.ndim(targets) == 2 and np.shape(targets) == np.shape(inputs["input_ids"])
            fields["labels" if per_token else "targets"] = targets
        fields.update(ids=ids, noisy=noisy)
    else:
        fields = {"inputs": inputs, "targets": targets, "ids": ids, "noisy": noisy}
    fields = {k: _as_array(v) for k, v in fields.items() if v is not None}
    problem = fields_problem(fields, lambda: fields["ids"])   # what loading it would refuse
    if problem is not None:
        raise DataError(f"{path}: {problem}; nothing written")
    with atomic_h5(path) as f:
        for key, arr in fields.items():
            (write_ids if key == "ids" else put)(f, key, arr, chunks=True)
    return path
