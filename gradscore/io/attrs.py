"""Text attributes of the HDF5 files gradscore writes: stored where HDF5's checksums reach.

h5py stores a ``str`` attribute (and each string of a string dataset: ids) as a
variable-length string, whose bytes live in HDF5's global heap: the one part of an HDF5
file that no checksum covers, in any format. A flipped bit there read as another valid
config (a sketch's seed, a checkpoint's ``model_kwargs``: other numbers, no error), and
one in a string's length made HDF5 itself loop forever. So writers set text with
:func:`write_attrs`, as fixed-length UTF-8 strings (:func:`fixed_utf8`), which HDF5 keeps
in the object header its metadata checksums cover; h5py reads them as bytes, and
:func:`attributes` and :func:`json_attr` give str. (Rewriting an h5py ``str`` later would
leave its old bytes in an unreferenced heap: set text fixed-length from the start.)

When a file is complete, :func:`seal` (called by ``io.atomic.atomic_h5``) records a
CRC-32 of each text attribute's name and value in the numeric attribute :data:`SEAL`,
which readers :func:`verify`. It covers what HDF5's checksums do not: the text of files
of earlier releases (in the global heap), and, in a file of more than 8 attributes, a text
over about 4 KB (a fingerprint of many checkpoints), which HDF5 keeps as a "huge object"
without one. String ids are fixed-length too (``io.store.write_ids``, in checksummed
chunks) and carry the CRC-32 of their values (:data:`VALUES_CRC`, checked by
``read_ids``). A file written before the seal, or an attribute added after it, reads
unchecked.
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


def utf8(value: Any) -> bytes:
    """A string's UTF-8 bytes (bytes as they are; lone surrogates kept, as Python's str can hold)."""
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")


def as_text(value: Any) -> Any:
    """An attribute's value with its text as str (HDF5's fixed-length strings read as bytes)."""
    return value.decode("utf-8", "surrogatepass") if isinstance(value, bytes) else value


def fixed_utf8(values: Any) -> np.ndarray:
    """``values`` (a string, or an array of str or bytes) as HDF5 fixed-length UTF-8 strings:
    stored inline (an attribute in its object header, a dataset in its chunks), where HDF5's
    checksums reach, not in the global heap. At least one byte wide (HDF5 has no empty type).
    A string ending in NUL would read back without it: a ValueError naming it."""
    raw = np.asarray([utf8(v) for v in np.asarray(values, dtype=object).ravel()], dtype=object)
    ends = [v for v in raw if v.endswith(b"\0")]
    if ends:
        raise ValueError(f"{as_text(ends[0])!r} ends in NUL, which a fixed-length string cannot hold; give text "
                         f"without NUL characters")
    width = max([1, *map(len, raw)])
    return raw.astype(h5py.string_dtype("utf-8", width)).reshape(np.shape(values))


def write_attrs(obj: h5py.HLObject, values: dict[str, Any]) -> None:
    """Set ``obj``'s attributes: dicts and lists as JSON (keys sorted), text as fixed-length
    UTF-8 (:func:`fixed_utf8`), anything else as h5py stores it."""
    for name, value in values.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, sort_keys=True)
        obj.attrs[name] = fixed_utf8(value) if isinstance(value, str) else value


def attributes(obj: h5py.HLObject) -> dict[str, Any]:
    """``obj``'s attributes, text as str whichever way it is stored."""
    return {k: as_text(v) for k, v in obj.attrs.items()}


def _crc(*parts: str) -> int:
    return zlib.crc32("\0".join(parts).encode("utf-8", "surrogatepass"))


def values_crc(values: np.ndarray) -> int:
    """CRC-32 of the strings (str or bytes) ``values``, UTF-8, joined by NUL, in C order."""
    return zlib.crc32(b"\0".join(utf8(v) for v in np.asarray(values, dtype=object).ravel()))


def _texts(obj: h5py.HLObject) -> dict[str, str]:
    return {k: v for k, v in attributes(obj).items() if isinstance(v, str)}


def seal(obj: h5py.HLObject) -> None:
    """Record the CRC-32 of each text attribute's name and value of ``obj`` (a file's root)
    in :data:`SEAL`; one set as h5py's own ``str`` (by hand) is rewritten fixed-length."""
    texts = _texts(obj)
    for name in [k for k, v in obj.attrs.items() if isinstance(v, str)]:   # h5py's own str: the global heap
        obj.attrs[name] = fixed_utf8(texts[name])
    obj.attrs[SEAL] = np.array([(_crc(k), _crc(k, v)) for k, v in texts.items()], dtype=np.uint32).reshape(-1, 2)


def mismatched(obj: h5py.HLObject) -> str | None:
    """The first text attribute of ``obj`` whose CRC-32 differs from its seal (None: all match,
    or nothing is sealed)."""
    if SEAL not in obj.attrs:
        return None
    sealed = {int(k): int(v) for k, v in np.asarray(obj.attrs[SEAL]).reshape(-1, 2)}
    for name, value in _texts(obj).items():
        if sealed.get(_crc(name), _crc(name, value)) != _crc(name, value):
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
        return json.loads(as_text(raw))
    except ValueError as e:
        raise damaged(path, f"not JSON: {e}", f"attribute {name}") from e


#: what each kind of HDF5 file gradscore writes is called in a message
KIND_NAMES = {"sketch": "sketch file", "attribution": "attribution file", "costate": "co-state file",
              "scores": "scores file", "checkpoint": "checkpoint", "dataset": "dataset"}


def kind_of(f: h5py.File) -> str:
    """Which kind of file ``f`` is, from what gradscore writes into each: "sketch",
    "attribution", "costate", "scores" (a run's, a recording's, imported dynamics), "checkpoint",
    else "dataset"."""
    return ("sketch" if "sketch" in f.attrs else "attribution" if "attribution" in f.attrs else
            "costate" if "conventions" in f.attrs else "scores" if "fingerprint" in f.attrs else
            "checkpoint" if "params" in f else "dataset")
