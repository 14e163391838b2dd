"""Text attributes of the HDF5 files gradscore writes, checksummed.

h5py stores a ``str`` attribute (and each string of a string dataset: ids) as a
variable-length string, whose bytes live in HDF5's global heap: the one part of an HDF5
file that no checksum covers, in any format. A flipped bit in a JSON config there reads
as another valid config (a sketch's seed, a checkpoint's ``model_kwargs``: other
numbers, no error). So every writer's root attributes are sealed when its file is
complete (:func:`seal`, called by ``io.atomic.atomic_h5``): a CRC-32 of each text
attribute's name and of its value, in the numeric attribute :data:`SEAL`, which HDF5's
metadata checksums do cover. Readers :func:`verify` them. String ids
carry the CRC-32 of their values (:data:`VALUES_CRC`, written by ``io.store.write_ids``,
checked by ``read_ids``). A file written before the seal, or an attribute added after
it, reads unchecked.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Any

import h5py
import numpy as np

from ..exceptions import RESTORE, damaged

#: (n, 2) uint32: per sealed text attribute, CRC-32 of its name and of name NUL value
SEAL = "text_crc32"
#: a string dataset's attribute: CRC-32 of its values, UTF-8, joined by NUL (:func:`values_crc`)
VALUES_CRC = "values_crc32"


def _crc(*parts: str) -> int:
    return zlib.crc32("\0".join(parts).encode("utf-8", "surrogatepass"))


def values_crc(values: np.ndarray) -> int:
    """CRC-32 of the strings (str or bytes) ``values``, UTF-8, joined by NUL, in C order."""
    return zlib.crc32(b"\0".join(v if isinstance(v, bytes) else str(v).encode("utf-8", "surrogatepass")
                                 for v in np.asarray(values, dtype=object).ravel()))


def seal(obj: h5py.HLObject) -> None:
    """Record the CRC-32 of every text attribute of ``obj`` (a file's root) in :data:`SEAL`."""
    rows = [(_crc(k), _crc(k, v)) for k, v in obj.attrs.items() if isinstance(v, str)]
    obj.attrs[SEAL] = np.array(rows, dtype=np.uint32).reshape(-1, 2)


def mismatched(obj: h5py.HLObject) -> str | None:
    """The first text attribute of ``obj`` whose CRC-32 differs from its seal (None: all match,
    or nothing is sealed)."""
    if SEAL not in obj.attrs:
        return None
    sealed = {int(k): int(v) for k, v in np.asarray(obj.attrs[SEAL]).reshape(-1, 2)}
    for name, value in obj.attrs.items():
        if isinstance(value, str) and sealed.get(_crc(name), _crc(name, value)) != _crc(name, value):
            return name
    return None


def verify(obj: h5py.HLObject, path: str | os.PathLike, fix: str = RESTORE) -> None:
    """A GradscoreError naming ``path``, the attribute and ``fix`` where a text attribute of
    ``obj`` does not match its seal."""
    name = mismatched(obj)
    if name is not None:
        raise damaged(path, "its CRC-32 does not match", f"attribute {name}", fix)


def json_attr(obj: h5py.HLObject, path: str | os.PathLike, name: str, default: str | None = None) -> Any:
    """The JSON attribute ``name`` of ``obj`` (``default``'s JSON where it has none; KeyError
    without a default); one that does not parse is a GradscoreError naming it. Readers
    :func:`verify` the file's attributes once before reading them."""
    raw = obj.attrs[name] if default is None else obj.attrs.get(name, default)
    try:
        return json.loads(raw)
    except ValueError as e:
        raise damaged(path, f"not JSON: {e}", f"attribute {name}") from e
