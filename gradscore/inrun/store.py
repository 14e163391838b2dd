"""Where in-run records go: a journal of row files, and the scores file made from them.

Each rank appends its records as immutable files ``<out>.partial/rank<r>_<k>.npz``
(written atomically, so a crash loses only the rows not yet flushed). Rank 0 writes
``out`` from every row file present, atomically, at each flush of its own and at the
end: the file on disk is always a complete, readable scores file of the steps flushed so
far (``inrun_complete`` says whether the recording ended). Rows are ordered by step
(stable: rank, then recording order), so the scores do not depend on the flush times or
the number of ranks.

A resumed recording (a training restarted from a saved state at step s) writes a new
*segment* of row files, ``seg<g>_rank<r>_<k>.npz``, each holding s as ``segment_start``:
the training runs steps s, s+1, … again, so the rows of earlier segments from step s on
are void. That cut is made when rows are read, never by changing a file, so a crash at
any point leaves the journal consistent.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .._version import __version__
from ..io.atomic import atomic_h5, atomic_path
from ..io.attrs import write_attrs
from ..exceptions import OutputError
from ..io.journal import Journal, read_fingerprint
from ..io.store import damage_named, put, read_ids, read_numpy, write_ids
from ..scores import inrun as inrun_scores

#: per-row fields and their stored dtype (ids are kept as given: int64 or str)
FIELDS = {"step": np.int64, "lr": np.float64, "loss": np.float64, "share": np.float64, "share_sq_norm": np.float64,
          "sq_norm": np.float64, "el2n": np.float64, "p_gold": np.float64, "correct": np.int8,
          "margin": np.float64, "dot": np.float64, "target_norm": np.float64}
#: the fields every record has (a classifier's loss adds el2n, p_gold, correct and margin)
RECORDED = ("step", "lr", "loss", "share", "share_sq_norm", "sq_norm", "dot", "target_norm")


def _concat(parts: list) -> np.ndarray:
    """One array from per-step numpy arrays or (device) tensors, copied to the host once. A
    field may be both: a step without a target gradient records its dots as a NaN array."""
    like = next((p for p in parts if isinstance(p, torch.Tensor)), None)
    if like is None:
        return np.concatenate(parts)
    parts = [p.detach() if isinstance(p, torch.Tensor) else torch.from_numpy(np.asarray(p)).to(like.device)
             for p in parts]
    return torch.cat([p.double() if p.is_floating_point() else p for p in parts]).cpu().numpy()


#: a row file's name: segment (absent: 0, a recording's first), rank, order
_ROW_FILE = re.compile(r"^(?:seg(\d+)_)?rank(\d+)_(\d+)\.npz$")


class RowJournal:
    """One rank's row files in the journal of ``out``, in ``segment`` (see the module
    docstring); ``start``, the segment's first step, is set by its first step."""

    def __init__(self, journal: Journal, rank: int, segment: int = 0) -> None:
        self.journal, self.rank, self.segment, self.count = journal, rank, segment, 0
        self.start: int | None = None

    def append(self, records: list[dict[str, np.ndarray]]) -> None:
        """Write ``records`` (dicts of (B,) arrays or tensors, ``ids`` and :data:`FIELDS`) as one
        row file."""
        if not records:
            return
        rows = {k: _concat([r[k] for r in records]) for k in records[0]}
        rows = {k: (v if k == "ids" else v.astype(FIELDS[k])) for k, v in rows.items()}
        if rows["ids"].dtype.kind in "OUS":
            rows["ids"] = rows["ids"].astype(str)
        name = f"rank{self.rank:03d}_{self.count:06d}.npz"
        if self.segment:
            name, rows["segment_start"] = f"seg{self.segment:03d}_{name}", np.int64(self.start)
        self.journal.open()
        with atomic_path(self.journal.unit(name)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **rows)
        self.count += 1


def _row_files(partial: Path) -> list[tuple[int, Path]]:
    """(segment, path) of every row file in the journal folder ``partial``, in (segment,
    rank, order) order."""
    found = [(m, p) for p in (partial.iterdir() if partial.is_dir() else ()) if (m := _ROW_FILE.match(p.name))]
    found.sort(key=lambda mp: (int(mp[0][1] or 0), int(mp[0][2]), int(mp[0][3])))
    return [(int(m[1] or 0), p) for m, p in found]


def row_files(journal: Journal) -> list[Path]:
    """Every rank's row files in the journal, in (segment, rank, order) order."""
    return [p for _, p in _row_files(journal.partial)]


def read_rows(journal: Journal) -> dict[str, np.ndarray] | None:
    """Every rank's rows in step order (None if there are none yet), without the rows that
    a later segment's steps replace (the module docstring)."""
    parts, starts = [], {}
    for segment, path in _row_files(journal.partial):
        try:
            rows = read_numpy(path)
        except ValueError as e:   # damaged on disk (row files are written atomically)
            raise OutputError(f"{path}: a row file of this in-run recording cannot be read ({e}); its records "
                              f"cannot be made again: delete the file to write the recording without them") from e
        if "segment_start" in rows:
            start = int(rows.pop("segment_start"))
            starts[segment] = min(start, starts.get(segment, start))
        parts.append((segment, rows))
    if not parts:
        return None
    kept = []
    for segment, rows in parts:
        cut = min((s for g, s in starts.items() if g > segment), default=None)
        if cut is not None:
            rows = {k: v[rows["step"] < cut] for k, v in rows.items()}
        kept.append(rows)
    rows = {}
    for k in list(kept[0]):   # field by field, each file's part let go once joined: one copy at a time
        rows[k] = np.concatenate([p.pop(k) for p in kept])
    step = rows["step"]
    if len(step) and (step[1:] < step[:-1]).any():   # one rank's rows of one segment come in order already
        order = np.argsort(step, kind="stable")
        for k in rows:
            rows[k] = rows[k][order]
    return rows


@dataclass(frozen=True)
class Recording:
    """An in-run recording found at ``out``: its fingerprint, whether its rows are in the
    journal (an interrupted recording's; else only in the finished scores file), its next
    segment and whether it ended (:meth:`InRun.close`)."""

    fingerprint: dict
    in_journal: bool
    segment: int
    complete: bool


def find_recording(out: Path) -> Recording | None:
    """The in-run recording in ``out`` and its journal, or None where there is none: no
    file, or a scores file of ``gradscore run``."""
    files = _row_files(Journal.partial_of(out))
    if files:
        try:
            fingerprint = json.loads((files[0][1].parent / "meta.json").read_text())
        except (OSError, ValueError):
            fingerprint = None
        if isinstance(fingerprint, dict) and "inrun" in fingerprint:
            return Recording(fingerprint, True, files[-1][0] + 1, False)
    fingerprint = read_fingerprint(out) if out.is_file() else None
    if not (isinstance(fingerprint, dict) and "inrun" in fingerprint):
        return None
    with damage_named(out), h5py.File(out, "r") as f:
        complete = bool(f.attrs.get("inrun_complete", True))
    return Recording(fingerprint, False, 1, complete)


def recorded_rows(out: Path) -> dict[str, np.ndarray]:
    """The rows of the in-run scores file ``out`` (its ``/inrun`` group), in step order, as
    :class:`RowJournal` writes them: what a resumed recording continues when its journal is
    gone (the recording was closed)."""
    with damage_named(out), h5py.File(out, "r") as f:
        group = f["inrun"]
        missing = [k for k in (*RECORDED, "row") if k not in group]
        if missing:
            raise OutputError(f"{out}: its in-run records lack {', '.join(missing)} (written by an older gradscore), "
                              f"so it cannot be continued; record into another file")
        ids = read_ids(f["ids"])
        return {"ids": ids[group["row"][()]], **{k: group[k][()] for k in FIELDS if k in group}}


def _verb(n: int, one: str, many: str) -> str:
    """``one`` for a count of 1, else ``many`` ("1 record is", "2 records are")."""
    return one if n == 1 else many


def _first(rows: dict[str, np.ndarray], mask: np.ndarray) -> str:
    """"step s, id i" of the first record in ``mask``."""
    i = int(np.flatnonzero(mask)[0])
    first = rows["ids"][i]
    return f"step {int(rows['step'][i])}, id {first.item() if hasattr(first, 'item') else first}"


def warnings_of(rows: dict[str, np.ndarray]) -> list[str]:
    """What the scores leave out or may get wrong, in words: records with a non-finite loss or
    gradient (a diverging step, a corrupt input), shares above 1 (a scaled loss), shares of 0
    (examples the step's loss leaves out), and records whose share was unreadable."""
    bad = ~np.isfinite(rows["loss"]) | ~np.isfinite(rows["share_sq_norm"])
    counted = [   # (records, what they have), each phrased "n of N records have ..."
        (bad, lambda m: f"a non-finite loss or gradient (first at {_first(rows, m)}): a diverging step, a corrupt "
                        f"input, or an overflow that a loss scaler skips; the scores leave those records out"),
        ((rows["share"] > 1 + 1e-6) & ~bad,     # NaN compares False
         lambda m: "a share above 1 (the step's loss weighs the example more than its own loss): if the loss was "
                   "scaled (torch.amp.GradScaler, fp16 training), pass scaler= to gs.InRun, as share, "
                   "share_sq_norm, dot and inrun_value are then the scale times too large"),
        ((rows["share"] == 0) & ~bad,
         lambda m: f"share 0 (the step's loss leaves the example out: a mask, a detached output, a weight 0; first "
                   f"at {_first(rows, m)}): no gradient of it to read, so its sq_norm is NaN and grand leaves it "
                   f"out; inrun_value counts it as 0"),
    ]
    out = [f"{n} of {len(m)} records {_verb(n, 'has', 'have')} {what(m)}" for m, what in counted if (n := int(m.sum()))]
    unread = np.isnan(rows["share"]) & ~bad
    if unread.any():
        n = int(unread.sum())
        out.append(f"{n} {_verb(n, 'record is', 'records are')} of examples the loss no longer moves, with no "
                   f"readable share (a batch of them, or a language model's): their sq_norm is NaN and grand leaves "
                   f"them out")
    return out


def _unmeasured(fields: dict[str, np.ndarray], n: int, every: int, wanted: set[str]) -> list[str]:
    """A warning naming how many of the ``n`` examples have no measured presentation (their
    inrun_value and inrun_value_cos are NaN), where a target gradient was recorded."""
    if not wanted & inrun_scores.TARGET_SCORES or not np.isfinite(fields["target_norm"]).any():
        return []
    k = int((np.bincount(fields["row"][inrun_scores.measured(fields)], minlength=n) == 0).sum())
    why = (f"met no step with a target gradient (every={every})" if every > 1
           else "have no finite dot with the target gradient")
    return [f"{k} of {n} examples {why}: their inrun_value and inrun_value_cos are NaN"
            + ("; a smaller every measures more of them" if every > 1 else "")] if k else []


def write(out: Path, rows: dict[str, np.ndarray], *, config: dict[str, Any], fingerprint: dict, loss: str,
          wanted: set[str], complete: bool) -> list[str]:
    """The scores file ``out`` from step-ordered ``rows``: ``/ids`` (sorted unique), ``/scores``
    (:mod:`gradscore.scores.inrun`), ``/inrun/<field>`` with ``/inrun/row`` (index into
    ``/ids``), an empty ``/per_checkpoint`` and the run's attributes, with
    :func:`warnings_of` the rows; atomically. Returns those warnings."""
    ids, row = np.unique(rows["ids"], return_inverse=True)
    fields = {k: v for k, v in rows.items() if k != "ids"}
    fields["row"] = row.reshape(-1).astype(np.int64)
    found = warnings_of(rows) + _unmeasured(fields, len(ids), config.get("every", 1), wanted)
    scores = inrun_scores.aggregate(fields, len(ids), wanted)
    with atomic_h5(out) as f:
        write_attrs(f, {"config": config, "fingerprint": fingerprint, "gradscore_version": __version__,
                        "loss": loss, "warnings": found, "inrun_complete": complete})
        write_ids(f, "ids", ids if ids.dtype.kind in "OUS" else ids.astype(np.int64))
        group = f.create_group("scores")
        for k, v in scores.items():
            put(group, k, v)
        f.create_group("per_checkpoint")   # none: the records are per (step, example)
        rec = f.create_group("inrun")
        for k, v in fields.items():
            put(rec, k, v, compression="gzip", chunks=True)
    return found
