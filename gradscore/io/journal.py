"""The journal of an output being written: resumable units of work in ``<out>.partial/``.

A directory of atomically renamed files survives SIGKILL where an HDF5 file being
written does not: a killed run resumes where it stopped. The journal also decides
whether a finished ``out`` is this run's (same fingerprint), may be replaced, or must be
refused, naming what differs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py

from ..exceptions import ConfigMismatchError, GradscoreError
from .atomic import atomic_path
from .attrs import mismatched


def read_fingerprint(path: Path) -> dict | None:
    """The fingerprint stored in a finished scores file, or None if unreadable."""
    try:
        with h5py.File(path, "r") as f:
            return None if mismatched(f) else json.loads(f.attrs["fingerprint"])
    except (OSError, KeyError, ValueError):
        return None


def difference(old: dict | None, new: dict) -> str:
    """What differs between two run fingerprints, by field, as a clause: "the target set
    differs", "scores (...), engine (...) differ", "the checkpoints differ" …; "the
    settings differ" when it cannot say."""
    if not isinstance(old, dict):
        return "the settings differ"
    names = {"checkpoints_sha256": "the checkpoints", "data": "the data", "costate": "the co-states",
             "proxy": "the proxy set", "target": "the target set", "files": "the dynamics files"}
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "config" and isinstance(a, dict) and isinstance(b, dict):
            found += [f"{f} ({a.get(f)!r} before, {b.get(f)!r} now)" for f in sorted(set(a) | set(b))
                      if a.get(f) != b.get(f)]
        elif key == "code":
            found.append(code_difference(a if isinstance(a, dict) else {}, b if isinstance(b, dict) else {}))
        else:
            found.append(names.get(key, key))
    if not found:
        return "the settings differ"
    plural = len(found) > 1 or found[0].split(" (")[0].endswith("s")   # "the checkpoints", "scores (...)"
    return ", ".join(found) + (" differ" if plural else " differs")


def code_difference(a: dict, b: dict) -> str:
    """"the code (...)", with :func:`code_parts` of two code fingerprints."""
    return f"the code ({code_parts(a, b)})"


def code_parts(a: dict, b: dict) -> str:
    """Which part of two code fingerprints (:func:`gradscore.imports.code_fingerprint`)
    differs: gradscore's version, the model's code, the loss's, or by name the user's code
    they call."""
    parts = []
    if a.get("gradscore") != b.get("gradscore"):
        parts.append(f"gradscore {a.get('gradscore')} before, {b.get('gradscore')} now")
    if a.get("model") != b.get("model"):
        parts.append("the model's factory, classes or structure")
    if a.get("loss") != b.get("loss"):
        parts.append("the loss function")
    ha, hb = a.get("helpers") or {}, b.get("helpers") or {}
    ha, hb = (ha if isinstance(ha, dict) else {}), (hb if isinstance(hb, dict) else {})
    changed = sorted(k for k in set(ha) | set(hb) if ha.get(k) != hb.get(k))
    if changed:
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        parts.append(f"code they call: {', '.join(changed[:5])}{more}")
    return '; '.join(parts) or 'the model or the loss'


class Journal:
    """A resumable unit-of-work journal for an output file ``out``.

    Units are files in ``<out>.partial/`` written atomically; ``meta.json`` there holds
    the fingerprint of the run. The folder is made when the first unit is written, so a
    run that fails before any work leaves nothing behind. A finished ``out`` with the
    same fingerprint makes the journal ``complete``; a different fingerprint (of ``out``
    or of a partial run with work in it) is refused with :class:`ConfigMismatchError`,
    naming what differs (its ``differ`` attribute), unless ``overwrite`` (or, for ``out``
    alone, ``replace``: the new run only adds to it; for the partial run alone, ``discard``);
    a partial run without work is discarded.
    """

    def __init__(self, out: str | Path, fingerprint: dict, *, overwrite: bool = False,
                 replace: bool = False, discard: bool = False) -> None:
        self.out = Path(out)
        self.partial = self.partial_of(self.out)
        self._meta = self.partial / "meta.json"
        self.fingerprint = fingerprint
        self.complete = False
        if self.out.exists():
            found = read_fingerprint(self.out)
            if found == fingerprint and not overwrite:
                self.complete = True
                return
            if not (overwrite or replace):
                differ = difference(found, fingerprint)
                error = ConfigMismatchError(f"{self.out}: exists and was made with other settings ({differ}); "
                                            f"pass --overwrite to replace it or choose another --out")
                error.differ = differ
                raise error
        if self.partial.exists():
            try:
                old = json.loads(self._meta.read_text())
            except (OSError, ValueError):
                old = None
            if old != fingerprint:
                has_work = any(p.name != "meta.json" and not p.name.endswith(".tmp") for p in self.partial.iterdir())
                if has_work and not (overwrite or discard):
                    raise ConfigMismatchError(
                        f"{self.partial}: an interrupted run with other settings ({difference(old, fingerprint)}) "
                        f"is in progress here; rerun it with the same options to resume, or pass "
                        f"--overwrite to discard it")
                shutil.rmtree(self.partial)

    @staticmethod
    def partial_of(out: str | Path) -> Path:
        """The journal folder of ``out``: ``<out>.partial``."""
        out = Path(out)
        return out.with_name(out.name + ".partial")

    @classmethod
    def attach(cls, out: str | Path, fingerprint: dict) -> "Journal":
        """The journal of ``out`` that another process (rank 0) has checked: no checks, no
        cleanup, only :meth:`open` and :meth:`unit`."""
        self = cls.__new__(cls)
        self.out = Path(out)
        self.partial = self.partial_of(self.out)
        self._meta, self.fingerprint, self.complete = self.partial / "meta.json", fingerprint, False
        return self

    def open(self) -> None:
        """Make the journal's folder and its fingerprint; writers call it before each unit."""
        if not self._meta.exists():
            self.partial.mkdir(parents=True, exist_ok=True)
            with atomic_path(self._meta) as tmp:
                tmp.write_text(json.dumps(self.fingerprint, sort_keys=True))

    def unit(self, name: str) -> Path:
        """Path of one unit of work inside the journal."""
        return self.partial / name

    def done(self, name: str) -> bool:
        return self.complete or (self.partial / name).exists()

    def keep_warnings(self, name: str, lines: list[str]) -> None:
        """Keep the warnings ``lines`` given while a unit of work was made, as the unit
        ``<name>.warnings.json`` (a rerun or resumed run that finds the work done does not give
        them again); None given: nothing written. :meth:`kept_warnings` reads them."""
        if not lines:
            return
        self.open()
        with atomic_path(self.unit(f"{name}.warnings.json")) as tmp:
            tmp.write_text(json.dumps(lines))

    def kept_warnings(self, what: str, fix: str) -> list[str]:
        """The warnings kept by :meth:`keep_warnings`, by unit name, each once. A damaged unit:
        a GradscoreError naming it, ``what`` it held and ``fix`` (formatted with ``{name}``, the
        unit's name without ``.warnings.json``)."""
        found: list[str] = []
        for path in sorted(self.partial.glob("*.warnings.json")):
            try:
                lines = json.loads(path.read_text())
                if not (isinstance(lines, list) and all(isinstance(line, str) for line in lines)):
                    raise ValueError("not a list of strings")
            except (OSError, ValueError) as e:
                raise GradscoreError(f"{path}: unreadable {what} ({e}); "
                                     + fix.format(name=path.name[:-len(".warnings.json")])) from e
            found += lines
        return list(dict.fromkeys(found))

    def finish(self) -> None:
        """Drop the journal once ``out`` has been written."""
        shutil.rmtree(self.partial, ignore_errors=True)
