"""``gradscore import-checkpoints``: existing training checkpoints -> gradscore checkpoints.

Sources: ``torch.save`` state_dicts (``.pt``, ``.pth``, ``.bin``; a dict nested under
``state_dict``/``model``/``model_state_dict`` is found; the key prefixes of a
DistributedDataParallel (``module.``) or ``torch.compile`` (``_orig_mod.``) model are
stripped, nested either way, also under a LightningModule's attribute), Lightning's ``.ckpt``
files and safetensors files, directly in SRC_DIR or one level down (Hugging Face's ``checkpoint-1200/model.safetensors``; the
Trainer's ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``, ``training_args.bin`` beside
it, and Accelerate's ``optimizer.bin``, ``scheduler.bin``, ``sampler.bin``, are not the model and
are left alone). A checkpoint saved in shards
(``model-00001-of-00003.safetensors``, ``pytorch_model-00001-of-00002.bin``) is one checkpoint,
refused while a shard is missing. A tied tensor stored under one of its names (``save_pretrained``
keeps ``transformer.wte.weight`` of GPT-2's tied ``lm_head.weight``) is loaded under each; a file
holding two different tensors for one tied weight (a model trained untied) is refused. Tensors
finer than the factory's model (float32 weights, a config's "dtype" bfloat16) are stored as they
are, not rounded to it.

The step is the one a ``torch.save`` dict records at its top level (``global_step``, as
Lightning's ``.ckpt`` files do, else ``step``); else the number the file's name (or its
folder's below SRC_DIR) marks as one (``step_1200.pt``, ``step=1200``, ``iter1200``,
``checkpoint-1200/…``); else the name's last number. A name with a decimal number (a
metric: ``val_loss=0.25``) and no mark is refused, and so is a name whose marked step is
not the one the file records. Lightning's ``last.ckpt`` is left out where it repeats the
step of another file. Where the keys are not the
model's, its weights are taken from under the one first key component whose keys are
exactly the model's (the attribute of a LightningModule that holds it: ``net.``); two
such components are refused, naming both.

The learning rate η_t comes from one constant ``lr`` or a schedule ``{step: lr}``; the
epoch from ``steps_per_epoch`` (else 0). Each file is loaded into
``model_factory(**model_kwargs)`` with strict key and shape checks, and written
atomically; files already imported (same step) are skipped, so an interrupted import
resumes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoints import (IMPORTED, SUFFIXES, CheckpointStore, build_model, check_rebuildable, checked_lr, finer_dtype,
                          checkpoint_filename, checkpoint_files, kwargs_text, read_info, tied_aliases,
                          trained_code, write_checkpoint)
from ..exceptions import CheckpointError, OutputError
from ..losses import check_head, resolve_loss

#: what a Hugging Face Trainer's checkpoint-<step>/ and Accelerate's save_state hold beside the
#: model: never its weights
_TRAINER_FILES = re.compile(r"(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth|training_args\.bin"
                            r"|(optimizer|scheduler|sampler)(_\d+)?\.bin)")
_NESTED = ("state_dict", "model_state_dict", "model")
#: key prefixes of wrapped models' state_dicts: DistributedDataParallel, torch.compile
_WRAPPERS = ("module.", "_orig_mod.")
#: one shard of a checkpoint saved in several: <stem>-<i>-of-<count>
_SHARD = re.compile(r"(.+)-(\d+)-of-(\d+)")


@dataclass(frozen=True)
class Source:
    """One checkpoint to import: a file, or the shards of one (Hugging Face's
    ``model-00001-of-00003.safetensors`` and its siblings), in order."""

    files: tuple[Path, ...]

    def __str__(self) -> str:
        if len(self.files) == 1:
            return str(self.files[0])
        first = self.files[0]
        stem, _, count = _SHARD.fullmatch(first.stem).groups()
        return str(first.parent / f"{stem}-*-of-{count}{first.suffix}")


def _checkpoints(paths: list[Path]) -> list[Source]:
    """The checkpoints among ``paths``: each file, and each set of shards together, all of
    them present."""
    found, shards = [], {}
    for path in paths:
        match = _SHARD.fullmatch(path.stem)
        if match is None:
            found.append(Source((path,)))
        else:
            stem, i, count = match.groups()
            shards.setdefault((path.parent, stem, count, path.suffix), {})[int(i)] = path
    for (folder, stem, count, suffix), parts in shards.items():
        extra = sorted(i for i in parts if not 1 <= i <= int(count))
        if extra:
            raise CheckpointError(f"{parts[extra[0]]}: shard {extra[0]} of {int(count)}? keep the shards of one "
                                  f"save_pretrained together, and nothing else under their names")
        missing = [i for i in range(1, int(count) + 1) if i not in parts]
        if missing:
            name = folder / f"{stem}-{missing[0]:0{len(count)}d}-of-{count}{suffix}"
            raise CheckpointError(f"{name} is missing: a checkpoint saved in {int(count)} shards needs all of them "
                                  f"(copy it back, or move the folder's other shards out)")
        found.append(Source(tuple(parts[i] for i in sorted(parts))))
    return found


def find_sources(src: str | Path) -> list[tuple[int, Source]]:
    """(step, source) of every checkpoint in ``src`` (or one directory down), by step."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src}: source directory does not exist")
    candidates = [path for path in sorted(list(src.glob("*")) + list(src.glob("*/*")))
                  if path.suffix in SUFFIXES and path.is_file() and not _TRAINER_FILES.fullmatch(path.name)]
    found: dict[int, Source] = {}
    for source in _checkpoints(candidates):
        path = source.files[0]
        rel = path.relative_to(src)
        stem = rel.stem if len(source.files) == 1 else _SHARD.fullmatch(rel.stem).group(1)   # shards: their stem
        name = rel.parts[0] if len(rel.parts) > 1 else stem
        step = None if path.suffix == ".safetensors" else _recorded_step(path)
        marked = _MARKED_STEP.findall(name)
        if step is None:
            step = _step_in_name(name, path)
        elif any(int(n) != step for n in marked):
            raise CheckpointError(f"{path}: the name says step {marked[-1]}, the file records step {step}; keep the "
                                  f"two in agreement")
        if step in found:
            copies = [s for s in (found[step], source) if s.files[0].suffix == ".ckpt"
                      and s.files[0].stem.startswith("last")]
            if len(copies) != 1:
                raise CheckpointError(f"{source}: step {step} also names {found[step]}; keep one file per step")
            source = found[step] if copies[0] == source else source   # Lightning's last.ckpt repeats a named file
        found[step] = source
    if not found:
        raise CheckpointError(f"{src}: no checkpoint files ({', '.join(SUFFIXES)})")
    return sorted(found.items())


#: a number marked as the step in a file name: step_1200, step=1200, iter1200, checkpoint-1200
_MARKED_STEP = re.compile(r"(?:step|iter|iteration|checkpoint)[-_=]?(\d+)", re.IGNORECASE)


def _step_in_name(name: str, path: Path) -> int:
    """The step a file or folder name gives: the number marked as one, else the last
    number, which a name holding a decimal number (a metric: ``val_loss=0.25``) leaves in
    doubt."""
    marked = _MARKED_STEP.findall(name)
    if marked:
        return int(marked[-1])
    if re.search(r"\d\.\d", name):
        raise CheckpointError(f"{path}: cannot tell the step from the name: it holds a decimal number (a metric?) "
                              f"and no step_<n>; rename it (e.g. step_1200.pt)")
    numbers = re.findall(r"\d+", name)
    if not numbers:
        raise CheckpointError(f"{path}: no step number in the name (e.g. step_1200.pt, checkpoint-1200/)")
    return int(numbers[-1])


def _recorded_step(path: Path) -> int | None:
    """The step a ``torch.save`` dict records at its top level (``global_step``, Lightning's
    and many loops'; else ``step``), read with the tensors mapped, not loaded; None where it
    records none."""
    state = _read(path, mapped=True)
    if not isinstance(state, dict):
        return None
    step = state.get("global_step", state.get("step"))
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _tie_groups(model: torch.nn.Module) -> list[list[str]]:
    """The state_dict names of each tensor the model holds under several (tied weights:
    GPT-2's ``transformer.wte.weight`` and ``lm_head.weight``), its parameter name first."""
    groups: dict[str, list[str]] = {}
    for alias, name in tied_aliases(model).items():
        groups.setdefault(name, [name]).append(alias)
    return list(groups.values())


def _with_ties(state: dict[str, torch.Tensor], ties: list[list[str]]) -> dict[str, torch.Tensor]:
    """``state`` with a tied tensor under each of its names where the file keeps only some
    (``save_pretrained`` and safetensors' ``save_model`` keep one)."""
    out = dict(state)
    for names in ties:
        kept = next((n for n in names if n in state), None)
        if kept is not None:
            out.update({n: state[kept] for n in names if n not in state})
    return out


def model_keys(state: dict[str, torch.Tensor], keys: set[str], ties: list[list[str]],
               source: Source) -> dict[str, torch.Tensor]:
    """``state`` as the model's keys ``keys`` (its tied names ``ties`` filled in): itself where
    its keys are those, else the part under the one first key component (``net.``) whose keys
    are exactly those; unchanged where none is (the strict load then names the mismatch)."""
    if set(whole := _with_ties(state, ties)) == keys:
        return whole
    under = {}
    for prefix in sorted({k.split(".", 1)[0] + "." for k in state if "." in k}):
        part = _with_ties(_unwrapped({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}), ties)
        if set(part) == keys:
            under[prefix] = part
    if len(under) > 1:
        raise CheckpointError(f"{source}: the model's weights are under each of {', '.join(map(repr, under))}; "
                              f"save the one to score as its own state_dict "
                              f"(torch.save(module.<name>.state_dict(), ...)) and import that")
    return next(iter(under.values()), state)


def _check_ties(state: dict[str, torch.Tensor], ties: list[list[str]], source: Source, model_factory: str) -> None:
    """Each tied tensor's names hold one value in ``state``: loading two different ones into
    the model's one tensor would keep the last silently."""
    for first, *others in ties:
        other = next((n for n in others if first in state and n in state and not torch.equal(state[first], state[n])),
                     None)
        if other is not None:
            raise CheckpointError(f"{source}: '{first}' and '{other}' are one tensor in {model_factory}, but the file "
                                  f"holds two different ones (a model trained untied); build the model untied "
                                  f"(Hugging Face: \"tie_word_embeddings\": false in its config)")


def _read(path: Path, mapped: bool = False):
    """What one source file holds, on the CPU (tensors and plain data only). ``mapped``: a
    ``torch.save`` file's tensors mapped, not read (one in torch's legacy format is read)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        if mapped:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:   # a file in torch's legacy format cannot be mapped
                if "mmap" not in str(e):
                    raise
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every reader's own error type
        raise CheckpointError(f"{path}: cannot read checkpoint{_why_unread(e)}") from e


def _why_unread(e: Exception) -> str:
    """Why a source file did not load, in a line: torch's refusal under weights_only=True is a
    paragraph advising weights_only=False, which gradscore never does (it runs code)."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split())   # one line, without torch's terminal bold
    if "Weights only load failed" not in text:
        return f" ({type(e).__name__}: {text})"
    found = re.search(r"WeightsUnpickler error: (.+?)(?:\. | Check the documentation|\.?$)", text)
    return (f": torch.load(weights_only=True) refuses it ({found.group(1) if found else type(e).__name__}); "
            f"gradscore loads tensors and plain data only: move a file that is not a checkpoint out of the "
            f"folder, or save the model's state_dict alone with torch.save")


def read_state_dict(source: Source) -> dict[str, torch.Tensor]:
    """The tensors of one checkpoint (see the module docstring), its shards' together."""
    state: dict[str, torch.Tensor] = {}
    for path in source.files:
        part = _file_state_dict(path)
        twice = next((k for k in part if k in state), None)
        if twice is not None:
            raise CheckpointError(f"{path}: tensor '{twice}' is in two shards of {source}; keep the shards of one "
                                  f"save_pretrained together, and nothing else under their names")
        state.update(part)
    return state


def _file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one file: a dict nested under a key of :data:`_NESTED` found, the
    wrappers' key prefixes stripped."""
    state = _read(path)
    for key in _NESTED:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state_dict of tensors")
    return _unwrapped(state)


def _unwrapped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the key prefixes of :data:`_WRAPPERS` that all its keys share, nested
    either way round."""
    while state and (prefix := next((w for w in _WRAPPERS if all(k.startswith(w) for k in state)), None)):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _claim_out(src: Path, out: Path, model_factory: str, model_kwargs: dict, loss: str) -> Path:
    """``out`` made, or checked to be a folder that holds nothing but checkpoints of this
    same model (an earlier, maybe interrupted, import); never the source folder."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory; give the folder to write the checkpoints into")
    if out.exists() and os.path.samefile(out, src):
        raise OutputError(f"{out}: is the source folder, an input of this command; gradscore never writes "
                          f"into its inputs: choose another --out")
    found = checkpoint_files(out)
    if found:
        first = read_info(next(iter(found.values())))
        if (first.model, first.model_kwargs, first.loss) != (model_factory, model_kwargs, loss):
            raise OutputError(f"{out}: holds the checkpoints of another model "
                              f"({first.model}({kwargs_text(first.model_kwargs)}), "
                              f"loss {first.loss}); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _source_of(source: Source) -> str:
    """What an imported checkpoint records of the file (or shards) it came from (JSON): the
    path, size and modification time, which change when a training run writes it anew."""
    stats = [path.stat() for path in source.files]
    record = {"file": [str(p.resolve()) for p in source.files], "bytes": [st.st_size for st in stats],
              "mtime_ns": [st.st_mtime_ns for st in stats]}
    if len(source.files) == 1:   # one file: as imports before shards recorded it
        record = {k: v[0] for k, v in record.items()}
    return json.dumps(record, sort_keys=True)


def _check_earlier_import(out: Path, src: Path, sources: list[tuple[int, Source]]) -> None:
    """A resumed import's folder holds no step that ``src`` lacks (another run's)."""
    stale = sorted(set(checkpoint_files(out)) - {s for s, _ in sources})
    if stale:
        raise OutputError(f"{out}: holds step {stale[0]}, which {src} has no checkpoint of: it is another run's, "
                          f"and a folder holds one run; choose another --out")


def _check_imported(done: Path, source: Source, lr: float, epoch: float) -> None:
    """``done`` (a checkpoint in --out at ``source``'s step) is ``source`` imported as this
    import would: from that file as it is now, with its learning rate and epoch; else one
    OutputError, since keeping it would put another run's weights in the folder."""
    info = read_info(done)
    fix = "choose another --out, or delete the folder to import again"
    try:
        was = json.loads(info.source)
    except ValueError:
        raise OutputError(f"{done}: was not imported from {source} (gradscore.CheckpointWriter wrote it); "
                          f"{fix}") from None
    now = json.loads(_source_of(source))
    if was["file"] != now["file"]:
        raise OutputError(f"{done}: was imported from {was['file']}, not {source}; {fix}")
    if was != now:
        raise OutputError(f"{done}: was imported from {source}, which has changed since; {fix}")
    differ = [f"{k} {getattr(info, k):g}, not {v:g}" for k, v in (("lr", lr), ("epoch", epoch)) if getattr(info, k) != v]
    if differ:
        raise OutputError(f"{done}: was imported with {', and '.join(differ)}; {fix}")


def import_checkpoints(src: str | Path, out: str | Path, *, model_factory: str, model_kwargs: dict | None = None,
                       loss: str = "cross_entropy", lr: float | None = None,
                       schedule: dict[int, float] | None = None, steps_per_epoch: int | None = None,
                       progress: bool = True) -> Path:
    """Convert every source checkpoint in ``src`` into ``out/step_<n>.h5``; returns ``out``."""
    if (lr is None) == (schedule is None):
        raise CheckpointError("import-checkpoints: give either a constant lr or a schedule {step: lr}")
    factory = check_rebuildable(model_factory, model_kwargs, loss)
    model = build_model(factory, model_kwargs or {}, model_factory)
    resolved = resolve_loss(loss)
    check_head(model, resolved)   # now, not when the checkpoints are scored
    code = trained_code(model, factory, resolved.fn)   # the code at import: scoring says if it changes
    keys, ties = set(model.state_dict()), _tie_groups(model)
    sources = find_sources(src)
    if schedule is None:
        checked_lr(lr)
    else:
        for step, source in sources:   # every step's η, before anything is written
            if step not in schedule:
                raise CheckpointError(f"{source}: step {step} has no learning rate in the schedule")
            checked_lr(schedule[step], step)
    made = not Path(out).exists()
    out = _claim_out(Path(src), Path(out), model_factory, model_kwargs or {}, loss)
    _check_earlier_import(out, src, sources)
    run = "import-" + hashlib.sha256(str(Path(src).resolve()).encode()).hexdigest()[:16]   # one run: one source
    try:
        for step, source in tqdm(sources, desc="import", unit="ckpt", disable=None if progress else True):
            step_lr = float(lr if schedule is None else schedule[step])
            epoch = step / steps_per_epoch if steps_per_epoch else 0.0
            if (out / checkpoint_filename(step)).exists():   # imported before: the same file, the same options
                _check_imported(out / checkpoint_filename(step), source, step_lr, epoch)
                continue
            try:
                state = model_keys(read_state_dict(source), keys, ties, source)
                _check_ties(state, ties, source, model_factory)
                finer = finer_dtype(state, model)
                if finer is not None:   # stored as trained, as CheckpointWriter stores the training's model
                    model = model.to(finer)
                model.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise CheckpointError(f"{source}: does not fit {model_factory}({kwargs_text(model_kwargs or {})}): "
                                      f"{' '.join(str(e).split())[:300]}") from e
            write_checkpoint(out / checkpoint_filename(step), model, step=step, lr=step_lr, epoch=epoch,
                             model_factory=model_factory, model_kwargs=model_kwargs, loss=loss,
                             optimizer=IMPORTED, source=_source_of(source), run=run, code=code)
    except BaseException:
        if made and not any(out.iterdir()):   # a folder made for nothing goes with the failure
            out.rmdir()
        raise
    CheckpointStore(out)  # the same checks as `run` makes
    return out
