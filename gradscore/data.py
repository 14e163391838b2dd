"""Datasets to score: ``.h5``/``.npz`` files or a ``"module:fn"`` factory.

File fields: ``inputs`` (N, ...), ``targets`` (N, ...) (class indices for classification),
optional ``ids`` (N,) and ``noisy`` (N,) bool (a known-corrupted mask, for evaluation
only). HDF5 files are read chunk by chunk, so N never has to fit in memory; ``.npz``
files are loaded whole (zip members cannot be memory-mapped).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import torch

from .atomic import atomic_path
from .exceptions import DataError
from .imports import import_ref

REQUIRED_FIELDS = ("inputs", "targets")
#: Dataset files larger than this are fingerprinted by size and mtime instead of SHA-256.
_HASH_LIMIT = 1 << 30
OPTIONAL_FIELDS = ("ids", "noisy", "attention_mask")


class Dataset(ABC):
    """N examples readable by contiguous index ranges."""

    #: where the data came from (a path or a factory reference), used in error messages
    source: str

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples ``start:stop`` as ``(inputs (B, ...), targets (B, ...))`` tensors."""

    def chunks(self, size: int = 4096) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(start, inputs, targets)`` for consecutive chunks of at most ``size`` examples."""
        for start in range(0, len(self), size):
            yield (start, *self.read(start, min(len(self), start + size)))

    def ids(self) -> np.ndarray:
        """(N,) example ids; ``arange(N)`` unless the data provides them."""
        return np.arange(len(self), dtype=np.int64)

    def noisy(self) -> np.ndarray | None:
        """(N,) bool known-corrupted mask, or None."""
        return None

    def fingerprint(self) -> dict[str, Any]:
        """What identifies these examples, for refusing to resume on other data."""
        return {"source": self.source, "n": len(self)}

    def check_labels(self, start: int, targets: torch.Tensor, n_classes: int) -> None:
        """Raise :class:`DataError` if integer targets fall outside ``[0, n_classes)``."""
        if targets.dtype.is_floating_point or targets.numel() == 0:
            return
        bad = (targets < 0) | (targets >= n_classes)
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            raise DataError(f"{self.source}: field 'targets' has label {int(targets[j])} at "
                            f"index {start + j}, outside [0, {n_classes}) of the model's "
                            f"{n_classes} outputs")


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype == np.bool_:
        arr = arr.astype(np.int64)
    elif arr.dtype.kind in "iu":
        arr = arr.astype(np.int64, copy=False)
    return torch.from_numpy(np.ascontiguousarray(arr))


class ArrayFileDataset(Dataset):
    """A ``.h5`` (read lazily) or ``.npz`` (loaded whole) file with the fields above."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.source = str(self.path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: dataset file does not exist")
        self._h5: h5py.File | None = None
        try:
            if self.path.suffix == ".npz":
                with np.load(self.path, allow_pickle=False) as z:
                    self._arrays: Any = {k: z[k] for k in z.files}
            elif self.path.suffix in (".h5", ".hdf5"):
                self._h5 = h5py.File(self.path, "r")
                self._arrays = self._h5
            else:
                raise DataError(f"{self.path}: unknown dataset extension '{self.path.suffix}'; "
                                f"use .h5, .npz or a 'module:fn' factory")
        except (OSError, ValueError) as e:
            raise DataError(f"{self.path}: cannot read dataset file ({e})") from e
        keys = set(self._arrays.keys())
        for key in REQUIRED_FIELDS:
            if key not in keys:
                raise DataError(f"{self.path}: missing field '{key}' (found: "
                                f"{', '.join(sorted(keys)) or 'none'}); a dataset needs "
                                f"'inputs' and 'targets'")
        self._n = int(self._arrays["inputs"].shape[0])
        for key in REQUIRED_FIELDS + OPTIONAL_FIELDS:
            if key in keys and int(self._arrays[key].shape[0]) != self._n:
                raise DataError(f"{self.path}: field '{key}' has {self._arrays[key].shape[0]} "
                                f"rows but 'inputs' has {self._n}")
        if "ids" in keys and len(np.unique(self._arrays["ids"][()])) != self._n:
            raise DataError(f"{self.path}: field 'ids' has duplicate values")

    def __len__(self) -> int:
        return self._n

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.asarray(self._arrays["inputs"][start:stop])
        y = np.asarray(self._arrays["targets"][start:stop])
        return _as_tensor(x), _as_tensor(y)

    def ids(self) -> np.ndarray:
        if "ids" in self._arrays:
            return np.asarray(self._arrays["ids"][()])
        return super().ids()

    def noisy(self) -> np.ndarray | None:
        if "noisy" in self._arrays:
            return np.asarray(self._arrays["noisy"][()]).astype(bool)
        return None

    def fingerprint(self) -> dict[str, Any]:
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

    def __len__(self) -> int:
        return self._n

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.dataset[i] for i in range(start, stop)]
        try:
            xs, ys = zip(*items)
        except (TypeError, ValueError) as e:
            raise DataError(f"{self.source}: items must be (input, target) pairs") from e
        return torch.stack([torch.as_tensor(x) for x in xs]), torch.stack([torch.as_tensor(y) for y in ys])


def probe_model(model: torch.nn.Module, ds: Dataset, x: torch.Tensor, ckpt: str | Path, role: str = "") -> int:
    """Run ``model`` on the first example of ``x``; return its output's last dimension.

    A shape or dtype mismatch becomes one :class:`DataError` naming the data and checkpoint.
    """
    like = next(model.parameters())
    x = x[:1].to(like.device)
    try:
        with torch.no_grad():
            out = model(x.to(like.dtype) if x.is_floating_point() else x)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise DataError(f"{ds.source}: {role + ' ' if role else ''}field 'inputs' (per-example shape "
                        f"{tuple(x.shape[1:])}, {x.dtype}) does not fit the model of {ckpt}: {e}") from e
    return int(out.shape[-1])


def load_dataset(spec: str | Path | Dataset) -> Dataset:
    """Open a dataset from a ``.h5``/``.npz`` path or a ``"module:fn"`` factory."""
    if isinstance(spec, Dataset):
        return spec
    s = str(spec)
    if Path(s).suffix in (".h5", ".hdf5", ".npz") or Path(s).exists():
        return ArrayFileDataset(s)
    if ":" in s:
        return TorchDataset(import_ref(s, "dataset factory", DataError)(), source=s)
    raise DataError(f"{s}: dataset file does not exist (and it is not a 'module:fn' factory)")


def save_dataset(path: str | Path, inputs: np.ndarray, targets: np.ndarray, *,
                 ids: np.ndarray | None = None, noisy: np.ndarray | None = None) -> Path:
    """Write a dataset HDF5 file atomically (chunked, so it can be read lazily)."""
    path = Path(path)
    fields = {"inputs": inputs, "targets": targets, "ids": ids, "noisy": noisy}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key, arr in fields.items():
            if arr is not None:
                f.create_dataset(key, data=np.asarray(arr), chunks=True)
    return path
