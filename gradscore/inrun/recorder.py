"""In-run scoring: every example's loss, gradient norm, margin and target alignment at the
training step that uses it, read from that step's own backward (``gs.InRun``).

Usage, in an existing training loop (three added lines)::

    rec = gs.InRun(model, loss="cross_entropy", out="inrun.h5", targets=(x_val, y_val))
    for ids, x, y in loader:
        with rec.step(ids, y, lr=scheduler.get_last_lr()[0]):   # hooks live for this step only
            loss = F.cross_entropy(model(x), y)                 # the user's own loss, any reduction
            loss.backward()
        opt.step(); opt.zero_grad()
    rec.close()      # a standard scores file: info, diagnose, select, plot, flag read it

How. Inside ``step`` the ghost engine's hooks (:mod:`gradscore.engines.ghost`) sit on the
model's layers; the identity probes on the layer outputs hand each layer's output
gradient δ to its rule *during the user's backward*. The probes pass δ on unchanged, so
every parameter gradient, and so training, is bit for bit what it is without the
recorder (tested); ``.grad`` is never read or written and ``backward`` never run twice.
The recorder's own forwards (the layout check on the first step, the target gradient)
run in eval mode with the random state forked, so dropout masks and BatchNorm statistics
of the training are untouched.

What is recorded for example b at step t (θ_t: the parameters this backward uses):

- ``loss`` ℓ_b, ``margin``, ``correct``, ``p_gold``, ``el2n`` from the step's own output
  (train mode: the minibatch predictions, as forgetting events are defined);
- its **share** s_b of the step's loss L = Σ_b s_b ℓ_b, read from the output gradient
  ∂L/∂z_b = s_b ∂ℓ_b/∂z_b and checked to be that for every example (1/B for a mean,
  1/(B·k) for a mean over k accumulated micro-batches, w_{y_b}/Σw for class weights);
  a loss that is not such a sum (e.g. label smoothing against a plain ``cross_entropy``)
  is refused with one line;
- ``share_sq_norm`` ‖∇L_b(θ_t)‖² from the rules and ``sq_norm`` ‖∇ℓ_b(θ_t)‖² = that / s_b²;
- ``dot`` ⟨∇L_b(θ_t), ∇J(θ_t)⟩ every ``every`` steps, J the mean ``loss`` of ``targets``
  in eval mode (one extra forward+backward of each target batch, with
  ``torch.autograd.grad``); with ``optimizer=`` an Adam/AdamW, the dot is with
  Γ_t ∇J(θ_t), Γ_t = diag(1/(√v̂_t + ε)) from its state before the step: the first-order
  change of J under Adam's update, an approximation (Adam's step is not linear in the
  gradient); with SGD the plain dot is exact to first order. Given the optimizer, each
  parameter's term is weighed by its group's learning rate over the step's (η_g/η).

Under fp16 training the loop scales its loss by a ``torch.amp.GradScaler`` before the
backward, by a scale that changes from step to step: given ``scaler=`` (the Hugging Face and
Lightning callbacks find it themselves), the shares and dots are divided by the scale the
backward used, so every record is of the loss the update uses; a step the scaler skips (it
found an infinite gradient) records lr 0, as it moved nothing.

Every trainable parameter needs a ghost rule (Linear, Conv, Embedding, norms, attention,
recurrent layers, ...); a model with others, a model whose output for an example depends
on its batch, or train-mode BatchNorm (which does) is refused with the parameters named.
Records stay on the device until a flush (every ``flush_every`` seconds, and at
:meth:`InRun.close`) appends them to the journal, and rank 0 rewrites the scores file
atomically from the journal (:mod:`.store`) when ten times its last rewrite's duration
has passed too: a killed training loses at most ``flush_every`` seconds of records (a
resumed recording reads them from the journal) and leaves a readable file.
"""
from __future__ import annotations

import atexit
import contextlib
import shutil
import time
import uuid
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..batch import Inputs
from ..config import as_names, checked_model, nonnegative, whole, whole_field
from ..engines.free import UNPLANNED
from ..engines.ghost import UNREPEATED, GhostEngine
from ..exceptions import ConfigError, ConfigMismatchError, EngineError, GradscoreError, OutputError, warn
from ..distributed import current_ranks, raise_everywhere
from ..io.checkpoints import checked_step
from ..io.journal import Journal, difference
from ..io.outputs import claim, lock
from ..losses import Loss, PerExampleLoss, check_head, resolve_loss
from ..scores import inrun as inrun_scores
from .step import Step
from .store import RowJournal, find_recording, joined, last_step, recorded_rows, row_files, write
from .targets import TargetGradient, aside, checked_targets, targets_sha256

DEFAULT_SCORES = ("loss", "grand", "el2n", "aum", "forgetting", "confidence", "variability", "correctness",
                  "inrun_value", "inrun_value_cos")
#: what a step does with a loss term on activations inside the model (OutputPaths finds one)
HIDDEN_TERMS = ("refuse", "per_example")


#: this process's recorders (rank 0) by their resolved ``out``: an earlier one not closed is
#: refused a second recorder of its file, or replaced by one with overwrite=True
_RECORDING: dict[Path, weakref.ref] = {}
_REPLACED = ("a newer gs.InRun of the same out took over its file (overwrite=True, or resume=True after this "
             "recorder's close() failed); this one records and writes nothing")


@dataclass(frozen=True)
class InRunConfig:
    """What an in-run recording computes; saved as the scores file's ``config``."""

    out: str
    loss: str = "cross_entropy"
    scores: tuple[str, ...] = DEFAULT_SCORES
    every: int = field(default=1, metadata={"help": "compute the target gradient every this many steps"})
    targets: int = field(default=0, metadata={"help": "number of target examples (0: none)"})
    preconditioner: str = field(default="none", metadata={"help": "'none' or 'adam' (Γ_t from the optimizer)"})
    hidden_terms: str = field(default="refuse", metadata={
        "help": "a loss term on activations inside the model: 'refuse' it, or record it in each example's "
                "gradient as 'per_example' terms (deep supervision, an activation penalty)"})
    inrun: bool = True

    def __post_init__(self) -> None:
        whole_field(self, "every", 1)
        if self.hidden_terms not in HIDDEN_TERMS:
            raise ConfigError(f"invalid value for 'hidden_terms': {self.hidden_terms!r}; give 'refuse' or "
                              f"'per_example'")
        if not self.scores:
            raise ConfigError("invalid value for 'scores': give at least one score")
        twice = sorted({s for s in self.scores if self.scores.count(s) > 1})
        if twice:
            raise ConfigError(f"invalid value for 'scores': {', '.join(twice)} is listed twice; name each score once")
        unknown = sorted(set(self.scores) - set(inrun_scores.NEEDS))
        if unknown:
            raise ConfigError(f"invalid value for 'scores': {', '.join(unknown)} cannot be recorded in-run; "
                              f"choose from {', '.join(inrun_scores.NEEDS)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scores"] = list(self.scores)
        return d


def _seconds(flush_every: Any) -> float:
    """``flush_every`` as seconds >= 0 (inf: at close only), else one ConfigError: a NaN never flushed."""
    seconds = nonnegative(flush_every, finite=False)
    if seconds is None:
        raise ConfigError(f"invalid value for 'flush_every': {flush_every!r}; give the seconds between flushes to "
                          f"disk, a number >= 0 (0: after every step)")
    return seconds


class _ModelEdits:
    """Whether a module registered a parameter or a submodule since the last :meth:`seen`
    (a loop that puts a new head or weight on the model between steps), from torch's global
    registration hooks: a flag set, so that a step walks the model only after an edit. The
    hooks go with :meth:`remove`, or with the recorder."""

    def __init__(self, owner: object) -> None:
        self.edited = False
        me = weakref.ref(self)

        def hook(module, name, value) -> None:
            edits = me()
            if edits is not None:
                edits.edited = True
        hooks = nn.modules.module
        self._handles = [hooks.register_module_parameter_registration_hook(hook),
                         hooks.register_module_module_registration_hook(hook)]
        weakref.finalize(owner, _ModelEdits._drop, self._handles)

    def seen(self) -> bool:
        """Whether an edit came since the last call."""
        edited, self.edited = self.edited, False
        return edited

    def remove(self) -> None:
        self._drop(self._handles)

    @staticmethod
    def _drop(handles: list) -> None:
        for h in handles:
            h.remove()


def _batchnorms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's BatchNorm modules, (name, module), whose train mode a step refuses."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _recording_id() -> str:
    """One id for a recording, the same on every rank (rank 0's, broadcast)."""
    import torch.distributed as dist
    token = [uuid.uuid4().hex]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    return token[0]


class InRun:
    """Records per-example scores from the training steps themselves (module docstring).

    model: the model being trained (never modified; hooks live for one step). Each step
    scores the parameters that require grad then: a loop may freeze, unfreeze or replace
    layers between steps (set ``optimizer`` anew if it makes a new one).
    loss: the per-example form of the step's loss ("cross_entropy", "nll", "mse", a
    function of (output, y), or a Loss).
    out: the scores file :meth:`close` writes (claimed now: an existing file needs
    ``overwrite`` or ``resume``). targets: the target examples of ``inrun_value`` (or None): one batch
    (x, y), or an iterable of such batches (a DataLoader, a generator; read once, now).
    every: steps between target gradients. optimizer: the torch optimizer that steps the
    model (or None): its parameter groups' learning rates weigh each parameter's term of the
    dot by η_g/η of the step's η, and an Adam/AdamW's state preconditions the target
    gradient; or "adam": the trainer's Adam, which a Hugging Face or Lightning callback sets
    as the attribute ``optimizer`` when training begins (those trainers make it after the
    recorder; they hand over any optimizer, for its groups). scores: what close() writes.
    flush_every: seconds between flushes to disk (a crash loses at most these steps).
    scaler: the ``torch.amp.GradScaler`` that scales the step's loss (fp16 training), or None;
    also settable as the attribute ``scaler`` before the first step. data_parallel: the
    processes whose gradients each update averages (DDP's world size); default: the world
    size if ``model`` is a DistributedDataParallel, else 1; the Hugging Face and Lightning
    callbacks set it from the trainer, whose DDP wraps the model the recorder is given.
    hidden_terms: a term of the step's loss on activations inside the model adds gradient
    there that no per-example share of the output's loss holds; "refuse" (default): the
    first step of each plan checks for one and refuses it, naming the layer; "per_example":
    the loop's such terms are each one example's (deep supervision, an activation penalty),
    recorded in that example's gradient, unchecked (a term over the batch, such as MoE load
    balancing, would make every record wrong).
    overwrite: replace a recording (or scores file) in ``out``. resume: continue the in-run
    recording in ``out`` (interrupted or closed; same model, loss, targets and options), for a
    training restarted from a saved state: each step then needs its ``step=`` number, and
    the records from the first step on replace those the earlier run made of those steps;
    with nothing to continue, a new recording.
    """

    def __init__(self, model: nn.Module, *, loss: str | Loss | PerExampleLoss = "cross_entropy", out: str | Path,
                 targets: tuple[Inputs, torch.Tensor] | Iterable[Any] | None = None, every: int = 1,
                 optimizer: torch.optim.Optimizer | str | None = None, scores: Sequence[str] = DEFAULT_SCORES,
                 flush_every: float = 60.0, overwrite: bool = False,
                 scaler: torch.amp.GradScaler | None = None, data_parallel: int | None = None,
                 hidden_terms: str = "refuse", resume: bool = False) -> None:
        if resume and overwrite:
            raise ConfigError("invalid value for 'resume': resume=True continues the recording in out and "
                              "overwrite=True replaces it; pass one of them")
        self.model, self.loss = checked_model(model), resolve_loss(loss)
        self.scaler = scaler
        if isinstance(optimizer, str) and optimizer != "adam":
            raise ConfigError(f"invalid value for 'optimizer': {optimizer!r}; give the torch optimizer that steps "
                              f"the model, 'adam' (the trainer's Adam, handed over by its callback), or leave it out")
        adam = optimizer == "adam" or isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
        targets = None if targets is None else checked_targets(targets, self.model)
        if targets is None and every != 1:
            raise ConfigError(f"invalid value for 'every': {every!r} spaces the target gradient's steps, and there "
                              f"are no targets; every step's records are taken: leave every out, or pass targets=")
        asked = as_names(scores)
        if targets is None and scores is DEFAULT_SCORES:
            asked = tuple(s for s in asked if s not in inrun_scores.TARGET_SCORES)  # none without targets
        elif targets is None and (needs := [s for s in asked if s in inrun_scores.TARGET_SCORES]):
            raise ConfigError(f"invalid value for 'scores': {' and '.join(needs)} "
                              f"{'need' if len(needs) > 1 else 'needs'} a target gradient; pass targets=(x, y) (a "
                              f"batch of target examples), or leave {'them' if len(needs) > 1 else 'it'} out")
        self.config = InRunConfig(out=str(out), loss=self.loss.name, scores=asked, every=every,
                                  targets=0 if targets is None else sum(len(y) for _, y in targets),
                                  preconditioner="adam" if adam else "none", hidden_terms=hidden_terms)
        self.optimizer = None if optimizer == "adam" else optimizer   # "adam": the trainer's, set later
        #: ∇J of the target examples, each ``every`` steps (None: no targets)
        self.target_gradient = None if targets is None else \
            TargetGradient(targets, every, self.config.preconditioner, self.loss)
        # the recorder's own forwards (layout, target gradient) call the network inside a DDP
        # wrapper directly, so that they never touch DDP's gradient reducer
        self.network = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        check_head(self.network, self.loss)
        names = [n for n, p in self.network.named_parameters() if p.requires_grad]
        if not names:
            raise ConfigError("the model has no trainable parameters; nothing is learned, nothing to record")
        self.params = dict(self.network.named_parameters())
        self._trains = tuple(p.requires_grad for p in self.params.values())   # the engine's, see _follow_training
        self._edits = _ModelEdits(self)
        # checked at every step (a loop may switch modes), listed once and after an edit: thousands of modules
        self.batchnorms = _batchnorms(model)
        self.engine = GhostEngine(self.network, self.loss, names)
        self._refuse_fallback()
        self.rank, self.world = current_ranks()
        # DDP averages the ranks' gradients: an example's share of the update is its share of its rank's loss / W
        self.data_parallel = (data_parallel if data_parallel is not None else
                              self.world if isinstance(model, nn.parallel.DistributedDataParallel) else 1)
        self.fingerprint = {"inrun": type(model).__name__,   # shapes too: a resize keeps the names
                            "parameters": [[n, list(self.params[n].shape)] for n in names],
                            "config": self.config.to_dict(), "target": targets_sha256(targets),
                            "recording": _recording_id()}
        failed, continued = None, None
        #: rank 0's lock of ``out`` from here to the written file: one writer (a second recorder
        #: of it, in this process or another, is refused while this one records)
        self._lock = contextlib.ExitStack()
        self._replaced = False   # a newer recorder of the same out took its file over (see _older)
        if self.rank == 0:
            try:
                self.out = claim(out, "scores", overwrite=overwrite, resumable=True)
                older = self._older(overwrite, resume)
                if older is None:
                    self._lock.enter_context(lock(self.out))
                else:   # its lock passes to this recorder, and back if this one fails
                    self._lock, older._lock = older._lock, self._lock
                try:
                    continued = self._claim_recording(overwrite, resume)
                except BaseException:
                    if older is not None:
                        self._lock, older._lock = older._lock, self._lock
                    raise
                if older is not None:   # it records and writes nothing more
                    if not older._closed:
                        older.detach()
                        older._edits.remove()
                    older._closed = older._written = older._replaced = True
                _RECORDING[self.out.resolve()] = weakref.ref(self)
            except OSError as e:
                failed = OutputError(f"{e.filename or out}: cannot be written ({e.strerror}); choose a writable "
                                     f"folder for the in-run scores")
            except GradscoreError as e:
                failed = e
            if failed is not None:
                self._lock.close()
        # every rank stops, none waits for rank 0 forever; each learns what rank 0 continues
        continued = raise_everywhere(failed, continued)
        if continued is not None:
            self.fingerprint = continued[0]
        if self.rank != 0:
            self.out = Path(out)
            self.journal = Journal.attach(self.out, self.fingerprint)
        #: the continued recording's (segment of this run's rows, last step recorded, kind of ids); None: a new one
        self._continued = None if continued is None else continued[1:]
        self._row_files = RowJournal(self.journal, self.rank, segment=0 if continued is None else continued[1])
        self.flush_every = _seconds(flush_every)
        self._spilled = self._rewritten = time.monotonic()   # the last journal append, the last file rewrite
        self._write_seconds, self._warnings = 0.0, []   # ... what the last rewrite's records show (write)
        self._given: list[str] = []   # the warnings about its scores this rank's steps gave (_warn), each once
        self._noted = 0               # ... of which the journal keeps the first (_spill)
        self._failing = False   # the last flush inside a step failed (it warned)
        self._on_host = 0       # the first records of _pending: blocks that failed flushes moved to the host
        self._laid_out = False
        self._count = 0                       # rec.step calls so far
        self._last_step: int | None = None    # the step of the last rec.step
        # "integers" or "strings": the ids of every step (a continued recording's, from its rows)
        self._id_kind: str | None = None if continued is None else continued[3]
        self._pending: list[dict[str, np.ndarray]] = []
        self._held: tuple[int, float, list[dict[str, np.ndarray]]] | None = None   # (step, scale, records)
        self._attached, self._open, self._next, self._keys = None, None, None, ("ids", "labels")
        self._closed = False    # no more steps (close() or the with-block ended)
        self._written = False   # close() wrote the scores file, or training stopped in the with-block
        self._busy = False   # the recorder's own forwards are running: its hooks stand aside
        self._loss_checked = False   # whether a user's loss reads the batch (Step._check_loss)
        self._output_checked = False   # whether the loss reads the output as its kind (Step._check_loss)
        atexit.register(_write_unclosed, weakref.ref(self))   # a recording never closed is not lost at exit

    def _older(self, overwrite: bool, resume: bool) -> "InRun | None":
        """An earlier recorder of ``out`` in this process that has not written it: refused,
        unless it holds no records (refused at its first step: it gives way), ``overwrite``
        (its recording is replaced) or, once its close() was called (its records are all in
        the journal), ``resume`` (continued); then it is returned."""
        held = _RECORDING.get(self.out.resolve())
        older = held() if held is not None else None
        if older is None or older._written:
            return None
        empty = not older._pending and older._held is None and not row_files(older.journal)
        if not (empty or overwrite or (resume and older._closed)):
            raise OutputError(f"{self.out}: an earlier gs.InRun of this process records it and is not closed; "
                              f"close() it first, pass overwrite=True to replace its recording, or choose another "
                              f"out")
        return older

    def _claim_recording(self, overwrite: bool, resume: bool) -> tuple[dict, int, int, str | None] | None:
        """Rank 0: open the journal of ``out``, a new recording's or (``resume``) the one found
        there with the same settings. Returns the continued recording's (fingerprint, this
        run's segment, its last recorded step, its kind of ids), or None for a new one."""
        found = None if overwrite else find_recording(self.out)
        if found is None and self.out.exists() and not overwrite:
            raise OutputError(f"{self.out}: exists and is not an in-run recording (a scores file of gradscore run); "
                              + ("resume=True continues an in-run recording: " if resume else "pass overwrite=True "
                                 "to replace it, or ") + "choose another out")
        if found is not None and not resume:
            raise OutputError(f"{self.out}: holds {'an interrupted' if not found.complete else 'a finished'} in-run "
                              f"recording; pass resume=True to continue it (a training resumed from its saved "
                              f"state), overwrite=True to replace it, or choose another out")
        if found is not None:
            def settings(fingerprint: dict) -> dict:   # what the records depend on: not the file's id or path
                config = {k: v for k, v in fingerprint.get("config", {}).items() if k != "out"}
                return {**{k: v for k, v in fingerprint.items() if k != "recording"}, "config": config}
            if settings(found.fingerprint) != settings(self.fingerprint):
                differ = difference(settings(found.fingerprint), settings(self.fingerprint))
                error = ConfigMismatchError(f"{self.out}: its recording was made with other settings ({differ}), "
                                            f"so this run cannot continue it; record with the same model, "
                                            f"loss, targets and options, pass overwrite=True to replace it, or "
                                            f"choose another out")
                error.differ = differ
                raise error
        fingerprint = self.fingerprint if found is None else found.fingerprint
        stale = Journal.attach(self.out, fingerprint)
        if found is not None and not found.in_journal and not row_files(stale):
            shutil.rmtree(stale.partial, ignore_errors=True)   # a recorder's that never flushed: not the recording's
        self.journal = Journal(self.out, fingerprint, overwrite=overwrite, replace=found is not None)
        self.journal.open()   # a read-only folder fails now, not at the first flush
        if found is None:
            self.journal.finish()   # made again by the first flush: a refused first step leaves no journal
            return None
        if not found.in_journal:   # a closed recording: its rows go back into the journal as segment 0
            rows = RowJournal(self.journal, 0)
            for chunk in recorded_rows(self.out):
                rows.append([chunk])
            rows.note(list(found.given))
        last, kind = last_step(self.journal) or (-1, None)   # (none: a recording of batches of no examples)
        return fingerprint, found.segment, last, kind

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The loss scaler of fp16 training (None: the loss is not scaled)."""
        return self._scaler

    @scaler.setter
    def scaler(self, scaler: torch.amp.GradScaler | None) -> None:
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise ConfigError(f"invalid value for 'scaler': {type(scaler).__name__}; give the torch.amp.GradScaler "
                              f"that scales the training loss, or leave it out")
        self._scaler = scaler

    @property
    def data_parallel(self) -> int:
        """The processes whose gradients each update averages (1: none)."""
        return self._data_parallel

    @data_parallel.setter
    def data_parallel(self, processes: int) -> None:
        if (whole(processes) or 0) < 1:
            raise ConfigError(f"invalid value for 'data_parallel': {processes!r}; give the number of processes whose "
                              f"gradients each update averages (DDP's world size), a whole number >= 1")
        self._data_parallel = processes

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer that steps the model (None: not given): its parameter groups' learning
        rates weigh the target per parameter, and an Adam/AdamW's state preconditions it where
        ``config.preconditioner`` is "adam"."""
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"invalid value for 'optimizer': {type(optimizer).__name__}; give the torch optimizer "
                              f"that steps the model")
        if (optimizer is not None and self.config.preconditioner == "adam"
                and not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))):
            raise ConfigError(f"invalid value for 'optimizer': {type(optimizer).__name__}; 'adam' asks for an "
                              f"Adam/AdamW, whose state preconditions the target")
        self._optimizer = optimizer

    def from_trainer(self, *, scaler: Any, optimizer: Any, world_size: int, clipping: str | None) -> None:
        """What a trainer's callback hands over when training begins, where the recorder was
        not given it: the trainer's loss scaler (or None), its optimizer (its groups' learning
        rates weigh the dots; with ``optimizer="adam"`` an Adam/AdamW, whose state preconditions
        them), the ranks its DDP averages; ``clipping``: the trainer's
        gradient-clipping option as set (None: off), which ``inrun_value`` does not see (a
        warning, if it is recorded)."""
        if self.scaler is None:
            self.scaler = scaler
        if self.optimizer is None and (self.config.preconditioner == "adam"
                                       or isinstance(optimizer, torch.optim.Optimizer)):
            self.optimizer = optimizer
        if world_size > 1 and self.data_parallel == 1:
            self.data_parallel = world_size
        if clipping and self.target_gradient is not None and "inrun_value" in self.config.scores:
            self._warn(f"{clipping}: the trainer clips the gradient, so a clipped step moves θ less than its "
                       f"learning rate says, and inrun_value (Σ_t η_t ⟨∇L_b, ∇J⟩) weighs every step by η_t "
                       f"alone; turn clipping off for the exact first-order value (inrun_value_cos, a mean "
                       f"cosine, is unaffected)")

    def _warn(self, text: str) -> None:
        """A :class:`GradscoreWarning` about the scores (at the user's line), kept for the scores
        file's ``warnings``."""
        if text not in self._given:
            self._given.append(text)
        warn(text)

    def _loss_scale(self) -> float:
        """The loss scale the next backward uses (1 without an enabled scaler)."""
        scaler = self._scaler
        return 1.0 if scaler is None or not scaler.is_enabled() else float(scaler.get_scale())

    def _follow_training(self, step: int) -> None:
        """Score the parameters this step trains: where a loop freezes or unfreezes some
        (gradual unfreezing), or puts a new layer or Parameter on the model, since the last
        step, a new engine over those that require grad now, laid out again on this step,
        and the target gradient computed again."""
        if self._edits.seen():
            params = dict(self.network.named_parameters())
            if [(n, id(p)) for n, p in params.items()] != [(n, id(p)) for n, p in self.params.items()]:
                self.params, self._trains = params, None
                self.batchnorms = _batchnorms(self.model)
        trains = tuple(p.requires_grad for p in self.params.values())
        if trains == self._trains:
            return
        names = [n for n, on in zip(self.params, trains) if on]
        if not names:
            raise ConfigError(f"step {step}: no parameter of the model requires grad; nothing is learned, "
                              f"nothing to record")
        self.engine = GhostEngine(self.network, self.loss, names)
        self._refuse_fallback()
        self._trains, self._laid_out = trains, False
        if self.target_gradient is not None:   # of other parameters now
            self.target_gradient.cached = None

    def _refuse_fallback(self) -> None:
        """One line naming the parameters without a ghost rule, those with one reason together."""
        if self.engine.fallback:
            by_reason: dict[str, list[str]] = {}
            for name, why in self.engine.fallback.items():
                by_reason.setdefault(why, []).append(name)
            listed = "; ".join(f"{', '.join(names)}: {why}" for why, names in list(by_reason.items())[:4])
            more = sum(len(names) for names in list(by_reason.values())[4:])
            # the recorder lays the model out in eval mode: a use in training mode only has no layout
            training_only = ("A parameter or layer the forward uses in training mode only (wav2vec2's "
                             "masked_spec_embed, with mask_time_prob > 0; an auxiliary head) is not used where the "
                             "recorder lays the model out, in eval mode: freeze it (requires_grad_(False)) or turn "
                             "that use off in training; or score" if any(UNPLANNED in why or UNREPEATED in why
                                                                         for why in by_reason) else "Score")
            raise EngineError(f"in-run scoring needs a ghost rule for every trainable parameter; "
                              f"{listed}{f'; and {more} more' if more > 0 else ''}. {training_only} saved "
                              f"checkpoints instead (gradscore run), where these parameters take the fallback "
                              f"(vmap, else the per-example loop)")

    def step(self, ids: Sequence | np.ndarray | torch.Tensor, y: torch.Tensor, *, lr: float | None = None,
             step: int | None = None) -> Step:
        """The context of one training step (or micro-batch) over the examples ``ids`` (B,)
        with targets ``y`` (B,): call the model once and ``backward`` once inside it.
        ids: integers (whole-number floats are their integers) or strings, one kind in every
        step, as the data's ids are, since reports pair the file's examples with it by id.
        lr: η of the optimizer step that follows (needed for ``inrun_value``); step: the
        optimizer step of the whole run, a whole number >= 0, never decreasing (default: a
        counter of ``step`` calls; micro-batches of one optimizer step share it, and its
        target gradient)."""
        if self._replaced:
            raise OutputError(f"{self.out}: {_REPLACED}")
        if self._closed:
            raise ConfigError(f"{self.out}: this recorder is closed; make a new gs.InRun")
        number = self._step_number(step)
        self._count += 1
        return Step(self, ids, y, lr, number)

    def _step_number(self, step: int | None) -> int:
        """``step`` as given, else the count of steps so far; a continued recording needs it given."""
        if step is None and self._continued is not None:
            raise ConfigError("invalid value for 'step': this recording continues an earlier one, so each step needs "
                              "its number in the whole run; pass rec.step(..., step=...), the optimizer step the "
                              "training resumed at and on (a trainer's global step)")
        return self._count if step is None else checked_step(step)

    def _resumed_at(self, step: int) -> None:
        """The first step of a continued recording: its rows from ``step`` on are this run's
        (:mod:`.store`), said once where that replaces records or leaves steps without any."""
        self._row_files.start = step
        last = self._continued[1]
        if self.rank != 0:
            return
        if step <= last:
            warn(f"{self.out}: resumed at step {step}: the records of steps {step} to {last} made before the "
                 f"interruption are replaced by this run's")
        elif step > last + 1:
            warn(f"{self.out}: resumed at step {step}, and the last recorded step is {last}: steps {last + 1} "
                 f"to {step - 1} have no records (trained after the last flush before the interruption), "
                 f"so the scores miss those presentations")

    def attach(self, *, ids_key: str = "ids", labels_key: str = "labels") -> None:
        """Record every training forward of the model from now on, without ``rec.step``: for
        trainers that call the model themselves (Hugging Face's Trainer). Each call in
        training mode with gradients on ends the step before it and opens one over the
        examples ``kwargs[ids_key]`` (removed before the model sees it) with targets
        ``kwargs[labels_key]``, at the step and learning rate of the last :meth:`set_step`.
        Call :meth:`end_step` after each backward (or let the next forward do it) and
        :meth:`detach` at the end."""
        if self._attached is not None:
            raise ConfigError("this recorder is already attached to the model")
        self._keys = (ids_key, labels_key)
        self._attached = self.model.register_forward_pre_hook(self._auto_step, with_kwargs=True)

    def detach(self) -> None:
        """End the open step and stop recording forwards (see :meth:`attach`)."""
        self.end_step()
        if self._attached is not None:
            self._attached.remove()
            self._attached = None

    def set_step(self, step: int, lr: float | None) -> None:
        """The optimizer step (a whole number >= 0) and learning rate of the forwards that
        follow (attached mode)."""
        self._next = (checked_step(step), lr)

    @contextlib.contextmanager
    def _own_forwards(self) -> Iterator[None]:
        """The recorder's forwards of the model (a layout): its hooks stand aside, and the
        model runs in eval mode with the random state forked (:func:`.targets.aside`)."""
        self._busy = True
        try:
            with aside(self.model):
                yield
        finally:
            self._busy = False

    def end_step(self) -> None:
        """Record the open step of attached mode (after its backward); no-op if none is open."""
        step, self._open = self._open, None
        if step is not None:
            step.__exit__(None, None, None)

    def _auto_step(self, module: nn.Module, args: tuple, kwargs: dict):
        if self._busy:
            return None
        ids_key, labels_key = self._keys
        if ids_key not in kwargs:
            raise ConfigError(f"invalid input: the model was called without '{ids_key}', the examples' ids the "
                              f"attached recorder reads: give the training set an '{ids_key}' column (each example's "
                              f"index or id), and keep it (a Trainer: remove_unused_columns=False)")
        kwargs = dict(kwargs)
        ids = kwargs.pop(ids_key)
        if not (module.training and torch.is_grad_enabled()):   # evaluation: not a training step
            return args, kwargs
        self.end_step()
        if labels_key not in kwargs:
            raise ConfigError(f"invalid input: the model was called without '{labels_key}'; the attached recorder "
                              f"reads the targets from it (a Hugging Face Trainer with label_smoothing_factor > 0 "
                              f"takes them out and smooths the loss itself: set it to 0 to record in-run; a "
                              f"compute_loss of your own must pass them to the model)")
        step, lr = self._next if self._next is not None else (self._step_number(None), None)
        self._count += 1
        opened = Step(self, ids, kwargs[labels_key], lr, step, auto=True)
        opened.__enter__()
        self._open = opened
        opened._pre(module, args, kwargs)
        return args, kwargs

    def _add(self, record: dict[str, np.ndarray], step: int, scale: float) -> None:
        """Queue a step's ``record``; with a loss scaler, hold the latest step's records until
        the scale of a later step (or the scaler's at close) says whether it was skipped."""
        if self._scaler is None:
            self._pending.append(record)
        else:
            if self._held is not None and self._held[0] != step:
                self._settle(scale)
            if self._held is None:
                self._held = (step, scale, [])
            self._held[2].append(record)
        now = time.monotonic()
        if now - self._spilled >= self.flush_every:   # the journal: a crash loses at most these seconds
            self._flush_in_step(now)

    def _flush_in_step(self, now: float) -> None:
        """The flush a step makes. A write that fails (an OSError: a full disk) must not stop
        the training: the records stay for the next flush, on the host (a block per failed
        flush), and one warning per failing stretch says so; :meth:`close` raises if it still
        cannot write."""
        stage = "the journal"
        try:
            self._spill()
            if self.rank == 0 and now - self._rewritten >= max(self.flush_every, 10 * self._write_seconds):
                stage = "the scores file"
                self._write(complete=False)
        except OSError as e:
            self._spilled = self._rewritten = time.monotonic()   # the next try: a flush later
            if self._pending[self._on_host:]:   # off the device while the disk stays full, a block per flush
                self._pending[self._on_host:] = [joined(self._pending[self._on_host:])]
                self._on_host = len(self._pending)
            if not self._failing:   # pointed at the with-block of rec.step
                kept = ("the records since the last flush stay in memory for the next flush (a crash now loses them)"
                        if stage == "the journal" else
                        "the journal holds every record; the file on disk stays its last rewrite's")
                warn(f"{self.out}: writing {stage} during training failed ({e}); the training goes on, "
                     f"{kept}, and close() raises if it still cannot write")
            self._failing = True
        else:
            self._failing = False

    def _settle(self, scale_after: float) -> None:
        """Queue the held step's records: lr 0 if the scale fell after it (the scaler backs off
        exactly when it skips a step, and grows otherwise)."""
        _, scale, records = self._held
        self._held = None
        if scale_after < scale:
            for r in records:
                r["lr"] = np.zeros_like(r["lr"])
        self._pending.extend(records)

    def flush(self) -> None:
        """Write the records since the last flush to the journal and (rank 0) rewrite the
        scores file from all of them. Steps do this themselves: the journal every
        ``flush_every`` seconds, the file then too if at least ten times its last rewrite's
        duration has passed (a rewrite reads every record so far, so it costs at most a
        tenth of the time); :meth:`close` writes the last of them."""
        self._spill()
        if self.rank == 0:
            self._write(complete=False)

    def _spill(self) -> None:
        """This rank's records since the last flush, as one row file in the journal; first a
        row file for each block that failed flushes left on the host (a flush's records each)."""
        while self._on_host:
            self._row_files.append(self._pending[:1])
            del self._pending[0]
            self._on_host -= 1
        self._row_files.append(self._pending)
        self._pending = []
        if self._row_files.count and len(self._given) > self._noted:   # beside rows: a journal of them
            self._row_files.note(self._given)
            self._noted = len(self._given)
        self._spilled = time.monotonic()

    def _write(self, complete: bool) -> None:
        t0 = time.monotonic()
        found = write(self.out, self.journal, config=self.config.to_dict(), fingerprint=self.fingerprint,
                      loss=self.loss.name, wanted=set(self.config.scores), complete=complete, given=self._given,
                      progress=complete)   # a bar at close(), not in the training's own output
        self._warnings = self._warnings if found is None else found
        self._rewritten = time.monotonic()
        self._write_seconds = self._rewritten - t0

    def close(self) -> Path:
        """Write the scores file (atomically), drop the journal and return the path; the
        recorder is done. Under torch.distributed every rank calls it; rank 0 writes. If
        writing fails (an OSError: a full disk), the journal is kept: call it again."""
        if self._replaced:
            raise OutputError(f"{self.out}: {_REPLACED}")
        if self._written:
            return self.out
        if not self._closed:
            self.detach()
            self._edits.remove()
            self._closed = True
            if self._held is not None:
                self._settle(self._loss_scale())   # the scaler's update after the last step has run
        failed = None
        try:
            self._spill()   # keeps the records if it fails
        except (GradscoreError, OSError) as e:
            failed = e
        # every rank's rows are in the journal, or every rank stops here; rank 0 writes every rank's warnings
        given = raise_everywhere(failed, self._given, every=True)
        if self.rank == 0:
            self._given = list(dict.fromkeys(text for texts in given for text in texts))
            try:
                if not row_files(self.journal):
                    self.journal.finish()
                    self._lock.close()
                    raise ConfigError(f"{self.out}: no step was recorded (call rec.step(...) around the training "
                                      f"steps); nothing written")
                self._write(complete=True)
                for text in self._warnings:
                    warn(f"{self.out}: {text}")
                self.journal.finish()
            except (GradscoreError, OSError) as e:
                failed = e   # the journal (and the lock) stay for another close()
        raise_everywhere(failed)
        self._written = True
        self._lock.close()
        return self.out

    def __enter__(self) -> "InRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        self._closed = self._written = True   # training stopped: the flushed steps stay readable in the file
        if self.rank == 0 and not row_files(self.journal):
            self.journal.finish()   # nothing was flushed: no journal left behind
        self._lock.close()   # a training resumed in this process may continue the file


def _write_unclosed(ref: "weakref.ref[InRun]") -> None:
    """At the interpreter's exit, a recorder with records that was never closed (forgotten, or
    an error ended the training) writes its records as an interrupted recording, and says
    so: a training shorter than ``flush_every`` had them in memory alone."""
    rec = ref()
    if rec is None or rec._closed or rec._written or not (rec._pending or rec._held or rec._row_files.count):
        return
    try:
        if rec._held is not None:
            rec._settle(rec._loss_scale())
        rec.flush()
    # the exit goes on, after a second Ctrl-C too: say what is lost
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001
        warn(f"{rec.out}: the recording was not closed, and writing it at exit failed ({e or type(e).__name__}); "
             f"the records since its last flush are lost")
        return
    warn(f"{rec.out}: the recording was not closed (call rec.close() after the training): its steps so far are "
         f"written as an interrupted recording; gs.InRun(..., resume=True).close() finishes it")


def step_lr(optimizer: Any) -> float:
    """The step's η that a trainer's callback records: the largest learning rate among the
    optimizer's parameter groups (the recorder weighs each group by its own over it, so a
    first group frozen at lr 0 does not zero the step); 0.0 without an optimizer."""
    if optimizer is None:
        return 0.0
    return max(float(g["lr"]) for g in optimizer.param_groups)


def checked_recorder(recorder: Any) -> InRun:
    """``recorder`` where it is a :class:`InRun`, else one ConfigError: what a trainer's
    callback checks when it is made, not inside the trainer's loop."""
    if not isinstance(recorder, InRun):
        raise ConfigError(f"invalid value for 'recorder': {recorder!r}; give the gs.InRun that records the training "
                          f"(gs.InRun(model, out=...))")
    return recorder
