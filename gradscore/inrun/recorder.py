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

import contextlib
import hashlib
import math
import shutil
import time
import uuid
import warnings
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..batch import Inputs, batch_len, call_model, check_batch, hash_batch, move, output_tensor, take
from ..engines.free import UNPLANNED
from ..engines.ghost import UNREPEATED, GhostEngine, probe
from ..engines.workarounds import torch_workarounds, wrong_in_torch
from ..engines.rules.registry import FactoredRef
from ..exceptions import (ConfigError, ConfigMismatchError, DataError, EngineError, GradscoreError, GradscoreWarning,
                          OutputError, cause, model_fix)
from ..distributed import current_ranks, raise_everywhere
from ..io.journal import Journal, difference
from ..io.outputs import claim, lock
from ..kernels.dispatch import numba_on_cpu
from ..kernels.reference import acc_dtype
from ..losses import CLASS_INDEX_DTYPES, IGNORE_INDEX, Loss, PerExampleLoss, check_head, reads_the_batch, resolve_loss
from ..scores import inrun as inrun_scores
from ..scores.datadiet import classification_metrics
from .store import RowJournal, find_recording, joined, last_step, recorded_rows, row_files, write

DEFAULT_SCORES = ("loss", "grand", "el2n", "aum", "forgetting", "confidence", "variability", "correctness",
                  "inrun_value", "inrun_value_cos")
#: relative residual of δ_b − s_b ∂ℓ_b/∂z_b allowed, by the output gradient's dtype (others, under
#: autocast: 3e-2). 1e-3 also for float64: a loss may compute in float32 (Hugging Face's upcasts
#: its logits with .float()); a loss that is not a weighted sum is off by far more.
_SHARE_TOL = {torch.float64: 1e-3, torch.float32: 1e-3}
#: a softmax loss's ∂ℓ_b/∂z is off by up to ~2 eps per output row, in units of the row's weight in
#: ℓ_b (p − 1 at the label, and the other classes' relative rounding together): a share is read
#: where that stays below the tolerance
_ROW_ROUNDING = 2


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
        if not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"invalid value for 'every': {self.every!r}; give a whole number of steps >= 1")
        if self.hidden_terms not in HIDDEN_TERMS:
            raise ConfigError(f"invalid value for 'hidden_terms': {self.hidden_terms!r}; give 'refuse' or "
                              f"'per_example'")
        unknown = sorted(set(self.scores) - set(inrun_scores.NEEDS))
        if unknown:
            raise ConfigError(f"invalid value for 'scores': {', '.join(unknown)} cannot be recorded in-run; "
                              f"choose from {', '.join(inrun_scores.NEEDS)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scores"] = list(self.scores)
        return d


@contextlib.contextmanager
def _aside(model: nn.Module) -> Iterator[None]:
    """Run the recorder's own forwards in eval mode with the random state forked: the
    training's dropout masks, random numbers and BatchNorm statistics are untouched. A
    module whose class has a ``train`` of its own is given its mode back through it: what
    it keeps from an eval forward (timm's LeViT and EfficientFormer cache their attention
    biases until ``train(True)``) would otherwise be read, stale, by the user's next eval."""
    modes = [(m, m.training) for m in model.modules()]
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        model.eval()
        try:
            yield
        finally:
            for m, mode in modes:
                if type(m).train is not nn.Module.train:
                    m.train(mode)
            for m, mode in modes:   # each module's own mode again (train() sets its children's too)
                m.training = mode


class _TargetFactors:
    """A Linear layer's inputs and output gradients in the target's forward and backward:
    ∇J(W) = Σ_rows δ aᵀ, whatever the layout, since J sums over all of them."""

    def __init__(self, layer: nn.Linear) -> None:
        self.layer, self.acts, self.deltas = layer, [], {}
        self.off = False   # the layer takes the dense form: nothing more to capture

    def cheaper(self, scale: float = 1.0) -> bool:
        """Whether the Gram form (M·(d_out + d_in) per position, M rows: those seen so far
        times ``scale``) beats forming ∇J."""
        M = scale * sum(a.numel() // a.shape[-1] for a in self.acts)
        rows, cols = self.layer.out_features, self.layer.in_features
        return M * (rows + cols) < rows * cols

    def ref(self) -> FactoredRef:
        """The factors as one reference block; a call whose δ never came (its output did
        not reach J) adds nothing."""
        rows, cols = self.layer.out_features, self.layer.in_features
        calls = sorted(self.deltas)
        if not calls:
            like = self.layer.weight
            return FactoredRef(like.new_zeros((0, rows)), like.new_zeros((0, cols)))
        return FactoredRef(torch.cat([self.deltas[c].reshape(-1, rows) for c in calls]),
                           torch.cat([self.acts[c].reshape(-1, cols) for c in calls]))


def _checked_targets(targets: Any) -> list[tuple[Inputs, torch.Tensor]]:
    """The target batches [(x, y)], each y a tensor: ``targets`` is one pair (x, y) (a tuple or
    list), or any other iterable of batches (a DataLoader, a generator), read once now; a
    batch is a pair, or a dict holding 'labels' (the other keys are x). One ConfigError
    unless there is at least one example, every batch with its examples in dimension 0 of
    every input and of y, and no DistributedSampler (every rank needs the same ∇J)."""
    fix = "give the target batch as a pair (x, y), or several batches as a DataLoader or iter([...])"
    if isinstance(targets, (tuple, list)):
        batches, where = [targets], ""
    elif isinstance(targets, (torch.Tensor, dict, str)) or not hasattr(targets, "__iter__"):
        raise ConfigError(f"invalid value for 'targets': {type(targets).__name__}; {fix}")
    elif isinstance(getattr(targets, "sampler", None), torch.utils.data.distributed.DistributedSampler):
        raise ConfigError("invalid value for 'targets': a loader with a DistributedSampler gives each rank other "
                          "target examples, so other ∇J; give every rank the same target batches")
    else:
        batches, where = list(targets), "of the target batches "
    out = []
    for i, batch in enumerate(batches):
        at = f"batch {i} {where}" if where else ""
        if isinstance(batch, dict) and "labels" in batch and where:
            batch = ({k: v for k, v in batch.items() if k != "labels"}, batch["labels"])
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            what = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else \
                type(batch).__name__
            raise ConfigError(f"invalid value for 'targets': {at or 'it '}is {what}; {fix}")
        try:
            x, y = batch[0], torch.as_tensor(batch[1])
        except (TypeError, ValueError, RuntimeError):
            raise ConfigError(f"invalid value for 'targets': {at}its y ({type(batch[1]).__name__}) is not a tensor "
                              f"of targets; {fix}") from None
        try:
            check_batch(x, y)
        except GradscoreError as e:
            raise ConfigError(f"invalid value for 'targets': {at.rstrip() + ': ' if at else ''}{e}") from None
        if len(y):
            out.append((x, y))
    if not out:
        raise ConfigError("invalid value for 'targets': no examples; give at least one target example, or leave "
                          "targets out")
    return out


def _targets_sha256(targets: list[tuple[Inputs, torch.Tensor]] | None) -> str | None:
    """SHA-256 of the target examples (their values, dtypes and shapes) in any order and
    batching (a shuffled loader's): a resumed recording needs the same ∇J, not only as many
    target examples."""
    if targets is None:
        return None
    digests = []
    for x, y in targets:
        for i in range(len(y)):
            h = hashlib.sha256()
            hash_batch(h, take(x, i, i + 1), y[i:i + 1])
            digests.append(h.digest())
    return hashlib.sha256(b"".join(sorted(digests))).hexdigest()


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


def _target_grads(J: torch.Tensor, wanted: list[torch.Tensor]) -> tuple:
    """∂J/∂wanted (None where unused): torch.autograd.grad, which leaves ``.grad`` alone. A
    reentrant torch.utils.checkpoint refuses it, and a model's backward can fail in eval
    mode (a state updated in place): one EngineError with the cause and the fix."""
    if not wanted:
        return ()
    try:
        return torch.autograd.grad(J, wanted, allow_unused=True)
    except RuntimeError as e:
        if "use_reentrant=True" in str(e):
            raise EngineError("the target gradient: the model calls torch.utils.checkpoint with use_reentrant=True, "
                              "which refuses torch.autograd.grad (the recorder's way to leave .grad alone); pass "
                              "use_reentrant=False to it (the same gradients), or record without targets") from None
        if isinstance(e, torch.OutOfMemoryError):
            raise
        fix = model_fix(e) or "the model's backward fails on the target batch: record without targets"
        raise EngineError(f"the target gradient, taken in eval mode, failed ({cause(e)}); {fix}") from e


def _recording_id() -> str:
    """One id for a recording, the same on every rank (rank 0's, broadcast)."""
    import torch.distributed as dist
    token = [uuid.uuid4().hex]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    return token[0]


def _inputs(args: tuple, kwargs: dict) -> Inputs:
    if len(args) == 1 and not kwargs:
        return args[0]
    if not args and kwargs:
        return kwargs
    raise EngineError("in-run scoring needs the model called as model(x) or model(**inputs); "
                      f"it was called with {len(args)} positional and {len(kwargs)} keyword arguments")


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
        self.model, self.loss = model, resolve_loss(loss)
        self.scaler = scaler
        if isinstance(optimizer, str) and optimizer != "adam":
            raise ConfigError(f"invalid value for 'optimizer': {optimizer!r}; give the torch optimizer that steps "
                              f"the model, 'adam' (the trainer's Adam, handed over by its callback), or leave it out")
        adam = optimizer == "adam" or isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
        targets = None if targets is None else _checked_targets(targets)
        if targets is None and every != 1:
            raise ConfigError(f"invalid value for 'every': {every!r} spaces the target gradient's steps, and there "
                              f"are no targets; every step's records are taken: leave every out, or pass targets=")
        asked = (scores,) if isinstance(scores, str) else tuple(scores)
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
        self.targets = targets
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
                            "config": self.config.to_dict(), "target": _targets_sha256(targets),
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
        self.flush_every = float(flush_every)
        self._spilled = self._rewritten = time.monotonic()   # the last journal append, the last file rewrite
        self._write_seconds, self._warnings = 0.0, []
        self._failing = False   # the last flush inside a step failed (it warned)
        self._on_host = 0       # the first records of _pending: blocks that failed flushes moved to the host
        self._laid_out = False
        self._count = 0                       # rec.step calls so far
        self._last_step: int | None = None    # the step of the last rec.step
        # "integers" or "strings": the ids of every step (a continued recording's, from its rows)
        self._id_kind: str | None = None if continued is None else continued[3]
        self._refs: tuple[Any, list[torch.Tensor], float] | None = None   # (step, refs, ‖∇J‖) cached
        self._pending: list[dict[str, np.ndarray]] = []
        self._held: tuple[int, float, list[dict[str, np.ndarray]]] | None = None   # (step, scale, records)
        self._attached, self._open, self._next, self._keys = None, None, None, ("ids", "labels")
        self._closed = False    # no more steps (close() or the with-block ended)
        self._written = False   # close() wrote the scores file, or training stopped in the with-block
        self._warned_groups = False
        self._warned_stray: set[str] = set()   # trainable parameters the optimizer does not hold, named once
        self._busy = False   # the recorder's own forwards are running: its hooks stand aside
        self._loss_checked = False   # whether a user's loss reads the batch (_Step._check_loss)

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
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
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
        if clipping and self.targets is not None and "inrun_value" in self.config.scores:
            warnings.warn(f"{clipping}: the trainer clips the gradient, so a clipped step moves θ less than its "
                          f"learning rate says, and inrun_value (Σ_t η_t ⟨∇L_b, ∇J⟩) weighs every step by η_t "
                          f"alone; turn clipping off for the exact first-order value (inrun_value_cos, a mean "
                          f"cosine, is unaffected)", GradscoreWarning, stacklevel=3)

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
        self._trains, self._laid_out, self._refs = trains, False, None

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
             step: int | None = None) -> "_Step":
        """The context of one training step (or micro-batch) over the examples ``ids`` (B,)
        with targets ``y`` (B,): call the model once and ``backward`` once inside it.
        ids: integers (whole-number floats are their integers) or strings, one kind in every
        step, as the data's ids are, since reports pair the file's examples with it by id.
        lr: η of the optimizer step that follows (needed for ``inrun_value``); step: the
        optimizer step of the whole run, never decreasing (default: a counter of ``step``
        calls; micro-batches of one optimizer step share it, and its target gradient)."""
        if self._replaced:
            raise OutputError(f"{self.out}: {_REPLACED}")
        if self._closed:
            raise ConfigError(f"{self.out}: this recorder is closed; make a new gs.InRun")
        number = self._step_number(step)
        self._count += 1
        return _Step(self, ids, y, lr, number)

    def _step_number(self, step: int | None) -> int:
        """``step`` as given, else the count of steps so far; a continued recording needs it given."""
        if step is None and self._continued is not None:
            raise ConfigError("invalid value for 'step': this recording continues an earlier one, so each step needs "
                              "its number in the whole run; pass rec.step(..., step=...), the optimizer step the "
                              "training resumed at and on (a trainer's global step)")
        return self._count if step is None else int(step)

    def _resumed_at(self, step: int) -> None:
        """The first step of a continued recording: its rows from ``step`` on are this run's
        (:mod:`.store`), said once where that replaces records or leaves steps without any."""
        self._row_files.start = step
        last = self._continued[1]
        if self.rank != 0:
            return
        if step <= last:
            warnings.warn(f"{self.out}: resumed at step {step}: the records of steps {step} to {last} made before the "
                          f"interruption are replaced by this run's", GradscoreWarning, stacklevel=4)
        elif step > last + 1:
            warnings.warn(f"{self.out}: resumed at step {step}, and the last recorded step is {last}: steps {last + 1} "
                          f"to {step - 1} have no records (trained after the last flush before the interruption), "
                          f"so the scores miss those presentations", GradscoreWarning, stacklevel=4)

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
        """The optimizer step and learning rate of the forwards that follow (attached mode)."""
        self._next = (int(step), lr)

    @contextlib.contextmanager
    def _own_forwards(self) -> Iterator[None]:
        """The recorder's forwards of the model (a layout): its hooks stand aside, and the
        model runs in eval mode with the random state forked (:func:`_aside`)."""
        self._busy = True
        try:
            with _aside(self.model):
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
                              f"attached recorder reads (keep that column: remove_unused_columns=False)")
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
        opened = _Step(self, ids, kwargs[labels_key], lr, step, auto=True)
        opened.__enter__()
        self._open = opened
        opened._pre(module, args, kwargs)
        return args, kwargs

    def _target_refs(self, step: int, lr: float | None = None,
                     rows: int | None = None) -> tuple[list[torch.Tensor], float] | None:
        """[(1, *shape)] target blocks in the engine's parameter order and their norm, computed
        at every ``every``-th step (micro-batches of one step share it); None elsewhere. A wide
        Linear weight's block is the target batch's factors (:class:`FactoredRef`), whose
        dense gradient the backward then never forms. Each block is ∇J of its parameter,
        preconditioned by Adam's Γ_t (if asked) and weighed by η_g/η (:meth:`_lr_weights`,
        ``lr``: the step's η). The target examples go through the model ``rows`` at a time
        (the step's batch: the target pass then holds no more than the training step)."""
        if self.targets is None or step % self.config.every:
            return None
        if self._refs is not None and self._refs[0] == step:
            return self._refs[1], self._refs[2]
        like = next(iter(self.params.values()))
        names, N = self.engine.param_names, self.config.targets
        captured: dict[str, _TargetFactors] = {}
        blocks: dict[str, torch.Tensor] = {}
        with _aside(self.model), torch.enable_grad(), self._capture_linear(captured) as z, \
                torch_workarounds():
            size = rows or max(len(y) for _, y in self.targets)
            chunks = ((take(x, a, a + size), y[a:a + size]) for x, y in self.targets for a in range(0, len(y), size))
            for i, (x, y) in enumerate(chunks):   # J = Σ over the chunks of their summed losses / N
                x, y = move(x, like), y.to(like.device)   # the model's device and dtype
                self._busy = True
                try:
                    J = self.loss.fn(call_model(self.network, x), y).sum() / N
                except (GradscoreError, torch.OutOfMemoryError):
                    raise
                except Exception as e:  # noqa: BLE001 - the user's targets do not fit the model or loss
                    raise ConfigError(f"invalid value for 'targets': the model or the '{self.loss.name}' loss failed "
                                      f"on them ({cause(e)}); give (x, y) as the training batches are given") from e
                finally:
                    self._busy = False
                if i == 0:   # each layer's form, from the first chunk's rows as a share of all N examples
                    factored = {w for w, c in captured.items() if c.cheaper(N / len(y))}
                    for w in set(captured) - factored:
                        captured.pop(w).off = True
                    dense = [n for n in names if n not in factored]
                    wanted = [self.params[n] for n in dense] + ([z] if factored else [])
                grads = _target_grads(J, wanted)
                for n, g in zip(dense, grads):
                    if g is not None:
                        blocks[n] = g.detach() if n not in blocks else blocks[n] + g.detach()
        blocks = {n: blocks[n] if n in blocks else torch.zeros_like(self.params[n]) for n in dense}
        groups = {} if self.optimizer is None else {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        if self.config.preconditioner == "adam":
            blocks = {n: self._precondition(b, self.params[n], groups) for n, b in blocks.items()}
        weights = self._lr_weights(lr, groups)
        blocks = {n: b * weights[n] if n in weights else b for n, b in blocks.items()}
        refs: list = [(captured[n].ref().scaled(weights.get(n, 1.0)) if n in factored else blocks[n].unsqueeze(0))
                      for n in names]
        sq = sum(float(torch.linalg.vector_norm(b).double() ** 2) for b in blocks.values())
        norm = (sq + sum(r.sq_norm() for r in refs if isinstance(r, FactoredRef))) ** 0.5
        if not math.isfinite(norm):
            self._check_target_losses(step)
        self._refs = (step, refs, norm)
        return refs, norm

    def _check_target_losses(self, step: int) -> None:
        """Where ∇J is NaN/Inf at finite parameters: a DataError naming the target examples
        whose loss is (one makes every dot, so every inrun_value, NaN). A model that diverged
        is not its targets' fault: its records are non-finite, and named as such."""
        if not all(bool(torch.isfinite(p).all()) for p in self.params.values()):
            return
        like, rows, start = next(iter(self.params.values())), [], 0
        with _aside(self.model), torch.no_grad(), torch_workarounds():
            for x, y in self.targets:
                self._busy = True
                try:
                    losses = self.loss.fn(call_model(self.network, move(x, like)), y.to(like.device))
                finally:
                    self._busy = False
                rows += (start + torch.nonzero(~torch.isfinite(losses.reshape(len(y), -1)).all(1))[:, 0]).tolist()
                start += len(y)
        if rows:
            where = f"position{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows[:5]))}{', …' * (len(rows) > 5)}"
            raise DataError(f"invalid value for 'targets': target example(s) at {where} (of {start}) give a "
                            f"non-finite loss at step {step} (NaN/Inf in their inputs?); fix or drop them: one makes "
                            f"the target gradient, and so every inrun_value, NaN")

    @contextlib.contextmanager
    def _capture_linear(self, captured: dict[str, _TargetFactors]) -> Iterator[torch.Tensor]:
        """During the target's forward and backward, each untied, batch-first nn.Linear's (or
        checked subclass's) inputs and output gradients (the factors of ∇J for its weight), keyed by the weight's
        name; nothing with Adam's preconditioning (Γ ∇J has no such factors). Yields the zero
        leaf whose gradient, asked for, sends δ through every probed output."""
        device = next(iter(self.params.values())).device
        handles, z = [], torch.zeros((), device=device, requires_grad=True)
        if self.config.preconditioner == "none":
            for layer in self.engine.layers:
                if (layer.rule.name not in ("linear", "linear_subclass") or layer.tied or "weight" not in layer.params
                        or layer.layout is None or layer.layout.batch_dim != 0):
                    continue
                factors = captured[layer.params["weight"]] = _TargetFactors(layer.module)

                def hook(module, args, output, factors=factors):
                    if factors.off or not output.requires_grad:   # dense form, or no gradient reaches it
                        return None
                    call = len(factors.acts)
                    factors.acts.append(args[0].detach())
                    return probe(output, z, lambda d, call=call: factors.deltas.__setitem__(call, d.detach()))
                handles.append(layer.module.register_forward_hook(hook, prepend=True))   # before a user's hook
        try:
            yield z
        finally:
            for h in handles:
                h.remove()

    def _precondition(self, g: torch.Tensor, p: torch.Tensor, groups: dict[int, dict]) -> torch.Tensor:
        """Γ_t g with Γ_t = diag(1/(√v̂ + ε)) from Adam's state of ``p`` before this step; g
        unchanged where the state is still empty (the first step) or Adam does not hold p."""
        if self.optimizer is None:
            raise ConfigError("invalid value for 'optimizer': 'adam' asks for the trainer's Adam, which no callback "
                              "has given; in a plain loop pass the optimizer itself (gs.InRun(..., optimizer=opt))")
        state = self.optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            return g
        beta2, eps = groups[id(p)]["betas"][1], groups[id(p)]["eps"]
        v_hat = state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))
        return g / (v_hat.sqrt() + eps)

    def _lr_weights(self, lr: float | None, groups: dict[int, dict]) -> dict[str, float]:
        """{parameter name: η_g/η} for the parameters the optimizer moves by another learning
        rate η_g than the step's η (its group's; 0 where it holds no such parameter), so that
        η·dot is the first-order change of J; {} without an optimizer or η, or where the
        optimizer holds none of the parameters (a warning: it steps copies of them)."""
        if self.optimizer is None or not lr:
            return {}
        names = self.engine.param_names
        if not any(id(self.params[n]) in groups for n in names):
            if not self._warned_groups:
                self._warned_groups = True
                warnings.warn(f"the optimizer ({type(self.optimizer).__name__}) holds none of the model's "
                              f"parameters, so their learning rates are unknown; inrun_value weighs every parameter "
                              f"by the step's lr", GradscoreWarning, stacklevel=2)
            return {}
        held = [id(self.params[n]) in groups for n in names]
        stray = [n for n, h in zip(names, held) if not h]
        if stray and set(stray) != self._warned_stray:   # once per set: a new head the loop's new optimizer steps
            self._warned_stray = set(stray)
            listed = ", ".join(stray[:6]) + (f" and {len(stray) - 6} more" if len(stray) > 6 else "")
            warnings.warn(f"{listed} require grad, but the optimizer ({type(self.optimizer).__name__}) does "
                          f"not hold them, so inrun_value weighs them 0 (they do not move); if the loop steps another "
                          f"optimizer now, set rec.optimizer to it", GradscoreWarning, stacklevel=2)
        rates = {n: float(groups[id(self.params[n])]["lr"]) if h else 0.0 for n, h in zip(names, held)}
        return {n: r / lr for n, r in rates.items() if r != lr}

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
                warnings.warn(f"{self.out}: writing {stage} during training failed ({e}); the training goes on, "
                              f"{kept}, and close() raises if it still cannot write", GradscoreWarning, stacklevel=5)
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
        self._spilled = time.monotonic()

    def _write(self, complete: bool) -> None:
        t0 = time.monotonic()
        found = write(self.out, self.journal, config=self.config.to_dict(), fingerprint=self.fingerprint,
                      loss=self.loss.name, wanted=set(self.config.scores), complete=complete,
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
        raise_everywhere(failed)   # every rank's rows are in the journal, or every rank stops here
        if self.rank == 0:
            try:
                if not row_files(self.journal):
                    self.journal.finish()
                    self._lock.close()
                    raise ConfigError(f"{self.out}: no step was recorded (call rec.step(...) around the training "
                                      f"steps); nothing written")
                self._write(complete=True)
                for text in self._warnings:
                    warnings.warn(f"{self.out}: {text}", GradscoreWarning, stacklevel=2)
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


#: elements of the (rows, B) same-target block :func:`_median_fill` forms at a time
_FILL_ELEMENTS = 2**22


def step_lr(optimizer: Any) -> float:
    """The step's η that a trainer's callback records: the largest learning rate among the
    optimizer's parameter groups (the recorder weighs each group by its own over it, so a
    first group frozen at lr 0 does not zero the step); 0.0 without an optimizer."""
    if optimizer is None:
        return 0.0
    return max(float(g["lr"]) for g in optimizer.param_groups)


def _median_fill(s: torch.Tensor, readable: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """(B,) for each example: the median (the lower one, as ``torch.median``) of ``s`` over the
    ``readable`` examples with its target ``y``, else over all readable ones, else NaN; in
    batched ops, without a pass per example (late in training most of a batch may be fit)."""
    nan = s.new_tensor(float("nan"))
    pool = torch.where(readable, s, nan)
    fill = torch.nanmedian(pool).expand_as(s)
    if y is None:
        return fill
    rows = max(1, _FILL_ELEMENTS // len(s))
    parts = [torch.nanmedian(torch.where(y[i:i + rows, None] == y[None, :], pool[None, :], nan), dim=1).values
             for i in range(0, len(s), rows)]
    by_target = torch.cat(parts)
    return torch.where(torch.isnan(by_target), fill, by_target)


#: elements of the model output whose loss gradient :class:`_LossTerms` forms at a time
_TERM_ELEMENTS = 2**20


def _cast_from(t: torch.Tensor) -> tuple[Any, int] | None:
    """(autograd node, output index) of the tensor that ``t`` is a dtype or device copy of
    (``s.float()``, as Accelerate converts a model's outputs under mixed precision, after the
    model computed its loss from s), or None: the δ a loss sends to s does not pass
    through t."""
    fn = t.grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0" or len(fn.next_functions) != 1:
        return None
    node, index = fn.next_functions[0]
    return None if node is None else (node, index)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,) Σ_j a_ij b_ij as a batched matrix product (BLAS dots; ``vecdot`` is several
    times slower on CPU for long rows)."""
    return torch.bmm(a[:, None, :], b[:, :, None]).reshape(len(a))


@dataclass
class _LossTerms:
    """What a step's record reads from its output z and output gradient δ, per example:
    ℓ_b (B,), the classification metrics, and, in float64, ‖d_b‖², ⟨δ_b, d_b⟩ and ‖δ_b‖²
    (B,) with d_b = ∂ℓ_b/∂z_b; ``dtype``: δ's; ``width``: output elements per example."""

    losses: torch.Tensor
    metrics: dict[str, torch.Tensor]
    d_sq: torch.Tensor
    dot: torch.Tensor
    delta_sq: torch.Tensor
    dtype: torch.dtype
    width: int

    @classmethod
    def of(cls, loss: Loss, z: torch.Tensor, delta: torch.Tensor, y: torch.Tensor) -> "_LossTerms":
        """From z and δ (B, ...) and the targets y (B, ...), a block of examples at a time:
        the float64 copies stay at :data:`_TERM_ELEMENTS` elements, whatever the vocabulary."""
        width = math.prod(z.shape[1:])
        fused = None
        if numba_on_cpu():   # the one-pass numba paths (a small classifier's on a GPU's outputs too)
            fused = cls._softmax_rows(loss, z, delta, y) if z.device.type == "cpu" else None
            if fused is None:
                fused = cls._classifier_rows(loss, z, delta, y)
        if fused is not None:
            return cls(*fused, delta.dtype, width)
        blocks = -(-len(z) * width // _TERM_ELEMENTS)   # as few as fit, of equal size
        rows = -(-len(z) // max(1, blocks))
        if rows >= len(z):   # one block (a classifier's batch): no copies into a whole
            return cls(*cls._block(loss, z, delta, y), delta.dtype, width)
        parts = [cls._block(loss, z[i:i + rows], delta[i:i + rows], y[i:i + rows]) for i in range(0, len(z), rows)]
        losses, metrics, d_sq, dot, delta_sq = zip(*parts)
        return cls(torch.cat(losses), {k: torch.cat([m[k] for m in metrics]) for k in metrics[0]},
                   torch.cat(d_sq), torch.cat(dot), torch.cat(delta_sq), delta.dtype, width)

    @staticmethod
    def _softmax_rows(loss: Loss, z: torch.Tensor, delta: torch.Tensor, y: torch.Tensor):
        """A language model's terms in one pass over z and δ (``kernels.softmax_ce_numba``; CPU
        tensors, numba on), where ℓ_b is a weighted sum of its rows' cross-entropies; None elsewhere."""
        if loss.softmax_rows is None or z.dim() != 3 or y.shape != z.shape[:2]:
            return None
        rows = loss.softmax_rows(y, z.shape[2])
        if rows is None:   # targets the loss refuses: the generic path says why
            return None
        from ..kernels.softmax_ce_numba import softmax_ce_rows_numba
        labels, w = rows
        B, T, V = z.shape
        losses, d_sq, dot, delta_sq = softmax_ce_rows_numba(z.reshape(B * T, V), delta.reshape(B * T, V),
                                                            labels.reshape(-1)).reshape(B, T, 4).sum(1).unbind(1)
        # float32 at least: a bfloat16 output's losses keep their digits (autocast's loss is float32 too)
        return ((losses * w).to(acc_dtype(z.dtype)), classification_metrics(loss, z, y), d_sq * w ** 2, dot * w,
                delta_sq)

    @staticmethod
    def _classifier_rows(loss: Loss, z: torch.Tensor, delta: torch.Tensor, y: torch.Tensor):
        """A small classifier's terms and metrics in one numba call
        (``kernels.softmax_ce_numba.classifier_rows_numba``; numba on), where a step's fixed costs
        dominate; None elsewhere, and for one logit per example, labels outside [0, C) or of a
        dtype the loss refuses (the generic path says why). On a GPU, z, δ and y come to the
        host and the terms go back in one copy each: the generic path's ~30 small ops are each
        a kernel launch there, and it waits for δ too (its label check)."""
        from ..kernels.softmax_ce_numba import CLASSIFIER_ELEMENTS, classifier_rows_numba
        if (not loss.is_cross_entropy or z.dim() != 2 or z.shape[1] < 2 or y.shape != z.shape[:1]
                or y.dtype not in CLASS_INDEX_DTYPES or z.numel() > CLASSIFIER_ELEMENTS):
            return None
        device = z.device
        rows = classifier_rows_numba(z.cpu(), delta.cpu(), y.cpu())
        if rows is None:
            return None
        losses, d_sq, dot, delta_sq, margin, p_gold, correct = rows.to(device).unbind(1)
        # the keys and meaning of classification_metrics (a test holds the two paths equal)
        metrics = {"el2n": d_sq.sqrt(), "p_gold": p_gold, "correct": correct.to(torch.int8), "margin": margin}
        return losses, metrics, d_sq, dot, delta_sq

    @staticmethod
    def _block(loss: Loss, z: torch.Tensor, delta: torch.Tensor, y: torch.Tensor):
        probs = None
        z = z.to(acc_dtype(z.dtype))   # float32 at least: a bfloat16 output's losses keep their digits
        if loss.indexes_classes and z.dim() == 2 and not y.dtype.is_floating_point:
            unlabeled = int((y == IGNORE_INDEX).sum())
            if unlabeled:   # the loss leaves them out, but they have no loss or margin of their own to record
                raise ConfigError(f"invalid value for 'y': {unlabeled} of {len(y)} labels are {IGNORE_INDEX}, the "
                                  f"loss's ignore_index (unlabeled examples), which have no loss, margin or gradient "
                                  f"of their own; in-run scoring records labeled examples: record the steps over "
                                  f"them, or give every example of a recorded step its label")
        if loss.is_cross_entropy and z.dim() == 2 and not y.dtype.is_floating_point:
            losses = loss.fn(z, y)    # ∂ℓ_b/∂z_b = softmax(z_b) − onehot(y_b), without a backward
            probs = torch.softmax(z.double(), 1)
            column = y[:, None].long()   # an index: uint8 labels, which the loss takes, too
            d = probs.scatter(1, column, (probs.gather(1, column) - 1))
        else:
            with torch.enable_grad():
                leaf = z.detach().requires_grad_(True)
                losses = loss.fn(leaf, y)
                if losses.shape != (len(z),):   # a per-pixel loss (segmentation), say
                    raise ConfigError(f"the '{loss.name}' loss gives shape {tuple(losses.shape)} for an output of "
                                      f"{tuple(z.shape)}; in-run scoring needs one loss per example, ({len(z)},): "
                                      f"pass loss= a function of (output, y) that reduces each example's terms")
                (d,) = torch.autograd.grad(losses.sum(), leaf)
            losses = losses.detach()
        width = math.prod(z.shape[1:])
        d, delta = d.reshape(len(z), width).double(), delta.reshape(len(z), width).double()
        return (losses, classification_metrics(loss, z, y, probs), _row_dot(d, d), _row_dot(delta, d),
                _row_dot(delta, delta))


def example_ids(ids: Any) -> np.ndarray:
    """A step's example ids (B,) as they are stored: int64, or str. Ids that would be stored
    as another id are refused: a fraction (0.5 would be 0), an unsigned id above 2⁶³ − 1
    (it would wrap), bools, and objects that are neither integers nor strings."""
    arr = np.asarray(ids.detach().cpu() if isinstance(ids, torch.Tensor) else ids).reshape(-1)
    if arr.dtype.kind == "O":   # Python objects: all strings, or all integers
        if all(isinstance(i, str) for i in arr):
            arr = arr.astype(str)
        elif all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in arr):
            arr = np.asarray(arr.tolist())
    kind, fix = arr.dtype.kind, "give each example's index in the dataset (integers) or its id string"
    if kind == "U" or kind == "S":
        return arr.astype(str)
    if kind == "f" and len(arr):
        whole = np.isfinite(arr) & (arr == np.round(arr)) & (np.abs(arr) < 2.0**63)
        if not whole.all():
            bad = arr[~whole][0].item()
            what = "outside ±2**63, the ids stored" if np.isfinite(bad) and bad == round(bad) else "not a whole number"
            raise ConfigError(f"invalid value for 'ids': {bad!r} is {what}; {fix}")
    elif kind == "u" and len(arr) and arr.max() > np.iinfo(np.int64).max:
        raise ConfigError(f"invalid value for 'ids': {arr.max().item()} is above 2**63 - 1, the largest id "
                          f"stored; {fix}")
    elif kind not in "iuf":
        raise ConfigError(f"invalid value for 'ids': {arr.dtype.name if kind != 'O' else 'object'} ids; {fix}")
    return arr.astype(np.int64, copy=False)


class _Step:
    """One training step's hooks (see :meth:`InRun.step`)."""

    def __init__(self, rec: InRun, ids, y: torch.Tensor, lr: float | None, step: int, auto: bool = False) -> None:
        y = y if isinstance(y, torch.Tensor) else torch.as_tensor(y)
        self.rec, self.y, self.lr, self.step, self.auto = rec, y, lr, step, auto
        self.ids = example_ids(ids)
        if len(self.ids) != len(y):
            raise ConfigError(f"invalid value for 'ids': {len(self.ids)} ids for {len(y)} targets y; give one id "
                              f"per example of the batch")
        ordered = np.sort(self.ids)   # neighbors: a tenth of np.unique's cost on a batch
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        if len(repeated):
            times = int((self.ids == repeated[0]).sum())
            raise ConfigError(f"invalid value for 'ids': {repeated[0].item()!r} appears {times} times in "
                              f"one step; each example of a batch needs its own id (its index in the dataset)")
        kind = "strings" if self.ids.dtype.kind == "U" else "integers"
        if len(self.ids) and rec._id_kind not in (None, kind):   # 1 and "1" would be one example
            raise ConfigError(f"invalid value for 'ids': {kind} in step {step}, {rec._id_kind} before; give "
                              f"every step's ids as one kind (integers or strings)")
        rec._id_kind = rec._id_kind or (kind if len(self.ids) else None)
        if rec.targets is not None and lr is None and "inrun_value" in rec.config.scores:
            raise ConfigError("invalid value for 'lr': inrun_value needs the step's learning rate; pass "
                              "rec.step(ids, y, lr=...)")
        if lr is not None:
            self.lr = lr = float(lr)
            if not (math.isfinite(lr) and lr >= 0):
                raise ConfigError(f"invalid value for 'lr': {lr}; give the step's learning rate, a finite "
                                  f"learning rate >= 0")
        if rec._last_step is not None and step < rec._last_step:   # a target is shared by one step's micro-batches
            raise ConfigError(f"invalid value for 'step': {step} after {rec._last_step}; steps number the optimizer "
                              f"steps of the whole run and never go back (pass e.g. epoch * steps_per_epoch + i, "
                              f"or leave step out to count rec.step calls)")
        if rec._last_step is None and rec._continued is not None:
            rec._resumed_at(step)
        rec._last_step = step
        self.stack = contextlib.ExitStack()
        self.state, self.target = None, None
        self.calls = 0
        self.output: torch.Tensor | None = None
        self.live: torch.Tensor | None = None   # the output itself, on a step that checks the loss's paths
        self.terms: _LossTerms | None = None
        self.scale = 1.0                      # the loss scale of this step's backward
        self.error: Exception | None = None
        self.wrong: list[tuple[str, str]] = []   # (module, norm) whose backward torch may get wrong here

    def __enter__(self) -> "_Step":
        rec = self.rec
        for name, m in rec.batchnorms:
            if m.training:
                raise EngineError(f"layer '{name}' ({type(m).__name__}) is in training mode: it normalizes "
                                  f"each example with its batch's statistics, so no example has a gradient "
                                  f"of its own. Use GroupNorm or LayerNorm, or freeze its statistics "
                                  f"(call .eval() on the BatchNorm layers after model.train()), or score "
                                  f"saved checkpoints in eval mode (gradscore run)")
        self.handles = [rec.model.register_forward_hook(self._post)]
        if len(self.ids) == 1:   # where torch's backward of a batch of one is wrong
            self.stack.enter_context(wrong_in_torch(rec.model, self.wrong))
        if not self.auto:   # attached: the recorder's own pre-hook calls _pre
            self.handles.append(rec.model.register_forward_pre_hook(self._pre, with_kwargs=True))
        return self

    def _pre(self, module, args, kwargs):
        rec = self.rec
        if rec._busy or not torch.is_grad_enabled():   # a call under no_grad (pseudo-labels) adds no gradient
            return None
        self.calls += 1
        if self.calls > 1:
            raise EngineError("the model was called twice inside one rec.step; wrap each forward+backward "
                              "(each micro-batch) in its own rec.step")
        x = _inputs(args, kwargs)
        if isinstance(x, dict):   # the batch's tensors, and the keywords that are not tensors (task="b"): the
            # recorder's runs of the model take them; other tensors (a Trainer's num_items_in_batch) stay out
            x = {k: v for k, v in x.items() if (isinstance(v, torch.Tensor) and v.dim() and len(v) == len(self.ids))
                 or isinstance(v, (str, bool, int, float, type(None)))}
        self.B = batch_len(x)
        if self.B != len(self.ids):
            raise ConfigError(f"invalid value for 'ids': {len(self.ids)} ids for a batch of {self.B}; give one id "
                              f"per example of the batch")
        if self.B == 0:
            return None
        rec._follow_training(self.step)
        for layer in rec.engine.layers:   # in the forward's mode a rule may not apply (dropout inside attention)
            reason = layer.rule.supports(layer.module)
            if reason:
                raise EngineError(f"layer '{layer.name}': {reason}")
        # the scale this step's backward will use: a trainer may update its scaler before __exit__,
        # and reading it here, not in the backward, keeps a device sync out of the backward
        self.scale = rec._loss_scale()
        check = not rec._laid_out and rec.config.hidden_terms == "refuse"   # the loss's paths (OutputPaths)
        if not rec._laid_out:
            self._lay_out(x)
        self.target = rec._target_refs(self.step, self.lr, self.B)   # after the layout: it picks each layer's form
        self.state = self.stack.enter_context(rec.engine.recording(
            self.B, None if self.target is None else self.target[0], check_paths=check, x=x,
            aside=rec._own_forwards))   # a layer the first step did not call is laid out on the step that does
        return None

    def _lay_out(self, x: Inputs) -> None:
        """First step: each layer's batch dimension, and whether an example's output depends
        on its batch, checked in eval mode on this batch."""
        rec = self.rec
        with rec._own_forwards():
            rec.engine.lay_out(x)
        if rec.engine.coupled:
            raise EngineError("the model's output for an example depends on the rest of its batch; in-run "
                              "scoring cannot give it a gradient of its own")
        try:
            rec._refuse_fallback()
        except EngineError as e:
            square = [f"'{k}' {tuple(v.shape)}" for k, v in (x.items() if isinstance(x, dict) else ())
                      if isinstance(v, torch.Tensor) and v.shape == (self.B, self.B)]
            if not square:
                raise
            raise EngineError(f"{e}. If the keyword {' or '.join(square)} is one tensor the whole batch shares (a "
                              f"(T, T) attention mask, with T == B here), the recorder took its rows for the "
                              f"examples': make it inside the model's forward, or keep it on the model, rather than "
                              f"pass it as a keyword") from None
        rec._laid_out = True

    def _post(self, module, args, output):
        if self.rec._busy or not torch.is_grad_enabled() or self.B == 0:
            return None
        self.rec.engine.note_output(output)   # the layers this call skipped (LayerDrop) whose weights nothing reaches
        try:
            output = output_tensor(output)
        except TypeError as e:
            raise EngineError(f"in-run scoring reads the model's logits: {e}") from None
        self.output = output.detach()
        if self.state is not None and self.state.paths is not None:   # a backward of z alone starts from it
            self.live = output
        if output.requires_grad:   # the first δ to come is read: the output's own, else (below) its source's
            output.register_hook(self._grab)
        source = _cast_from(output)
        if source is not None:   # a cast copy the loss may not read (Accelerate's float32 outputs, made after
            node, index = source  # the model's own loss): δ of the values the model computed
            node.register_prehook(lambda grads: self._grab(grads[index], (node, index))
                                  if grads[index] is not None else None)
        return None

    def _check_paths(self, grad: torch.Tensor, edge: tuple | None) -> None:
        """On a plan's first step, before the backward goes on from z: a backward of z alone
        with the same ∂L/∂z, whose δ's the engine compares with the step's (OutputPaths). A
        model that refuses a second backward (a reentrant checkpoint) is not checked."""
        paths, live, self.live = self.state.paths, self.live, None
        if paths is None or paths.ran or live is None:
            return
        if edge is not None:   # δ came to the cast's source: start from that edge of the graph
            live = torch.autograd.graph.GradientEdge(*edge)
        try:
            paths.run(live, grad)
        except RuntimeError as e:
            paths.alone.clear()
            why = ("a reentrant torch.utils.checkpoint refuses it: pass use_reentrant=False (the same gradients) "
                   "to have it checked" if "use_reentrant=True" in str(e) else cause(e))
            warnings.warn(f"could not check that the step's loss reaches the model only through its output ({why}); "
                          f"a loss term on an activation inside the model would go unseen", GradscoreWarning,
                          stacklevel=2)

    def _grab(self, grad: torch.Tensor, edge: tuple | None = None) -> None:
        """δ = ∂L/∂z has come: read what the record needs from z and δ now, in row blocks, and
        let both go (a language model's (B, T, V) logits and their gradient are the step's
        largest tensors). An error is raised after the backward, not inside it. ``edge``: (node,
        input) where δ came to the source of a cast copy of z."""
        if self.output is None:   # read by an earlier backward of this step, which the engine refuses
            return
        if self.state is not None and self.state.paths is not None and self.state.paths.running:
            return                 # the backward of z alone (_check_paths) passes z too
        self._check_paths(grad, edge)
        z, grad = self.output, grad.detach().to(self.output.device)
        if z.dtype != grad.dtype:   # the model returned a cast copy of its output
            if torch.promote_types(z.dtype, grad.dtype) != z.dtype:   # not an exact upcast (bf16 ↔ fp16 neither)
                self.error = EngineError(f"the model returns its output in {z.dtype}, a rounded copy of the "
                                         f"{grad.dtype} values its loss used; in-run scoring reads the loss from "
                                         f"the output, so return it in {grad.dtype}")
                self.output = None
                return
            z = z.to(grad.dtype)    # an upcast copy: the values the loss read, exactly
        try:
            self._check_loss(z)
            self.terms = _LossTerms.of(self.rec.loss, z, grad, self.y.to(z.device))
        except GradscoreError as e:   # raised by __exit__, outside autograd's engine
            self.error = e
        except Exception as e:  # noqa: BLE001 - the targets do not fit the loss: the user's y
            self.error = ConfigError(f"invalid value for 'y': the recorder's '{self.rec.loss.name}' loss failed on "
                                     f"the model's output and these targets ({cause(e)}); give y as the step's "
                                     f"own loss takes it (shape {tuple(self.y.shape)}, {self.y.dtype} here)")
        self.output = None

    def _check_loss(self, z: torch.Tensor) -> None:
        """On the first step of two or more examples: ConfigError where the recorder's loss
        for an example reads the other rows of its batch (:func:`reads_the_batch`)."""
        rec = self.rec
        if rec._loss_checked or rec.loss.per_example or len(z) < 2:
            return
        rec._loss_checked = True
        why = reads_the_batch(rec.loss, z, self.y.to(z.device))
        if why is not None:
            raise ConfigError(f"{why}; in-run scoring records each example's share of a sum of per-example "
                              f"losses: pass loss= a loss of each example's own output row")

    def __exit__(self, exc_type, exc, tb) -> None:
        for h in self.handles:
            h.remove()
        self.stack.close()                      # the hooks go; the rules of the δ's that came run
        if exc_type is not None or getattr(self, "B", 1) == 0:
            return None
        if self.calls == 0:
            raise EngineError("rec.step saw no call of the model; run the forward and backward inside it")
        if self.rec.engine.moved_to_fallback():   # a layer not called, or called another way
            self.rec._refuse_fallback()
        if self.error is not None:
            raise self.error
        if self.wrong:
            name, norm = self.wrong[0]
            module = self.rec.model.get_submodule(name)
            where = f"layer '{name}'" if name else "the model"
            kind = {"instance_norm": nn.modules.instancenorm._InstanceNorm,
                    "batch_norm": nn.modules.batchnorm._BatchNorm}[norm]
            if not isinstance(module, kind):   # F.instance_norm / F.batch_norm in its forward
                where = f"F.{norm} in the forward of {where}"
            label = {"instance_norm": "InstanceNorm", "batch_norm": "BatchNorm"}[norm]
            raise EngineError(f"{where} ({type(module).__name__}): torch's CPU {label} backward can be wrong for "
                              f"a batch of one example whose output gradient comes channels_last (a model in "
                              f"channels_last, or tokens made by flatten(2).transpose(1, 2) after the norm), so "
                              f"this step's gradient (the training's own) and the records of the layers before "
                              f"the norm would be wrong; nothing is recorded for it. Train on batches of two or "
                              f"more (drop_last=True keeps a last batch of one out)")
        if self.terms is None or self.state is None or self.state.sq is None:
            raise EngineError("no backward reached the model inside rec.step; call loss.backward() inside the "
                              "`with rec.step(...)` block")
        if self.state.paths is not None and self.state.paths.other is not None:
            raise EngineError(f"the step's loss reaches layer '{self.state.paths.other}' other than through the "
                              f"model's output: a term on an activation inside the model (a penalty, a batch term "
                              f"such as MoE load balancing, an auxiliary head) adds gradient there that is no "
                              f"example's share of the output's loss. "
                              f"If each such term is one example's (deep supervision, an activation penalty), pass "
                              f"gs.InRun(..., hidden_terms='per_example') to record it in that example's gradient; "
                              f"else score saved checkpoints (gradscore run), which differentiate the per-example "
                              f"loss alone")
        self._record()
        return None

    def _record(self) -> None:
        rec, t = self.rec, self.terms
        local = self._share(t)                      # s_b in the loss this backward ran on
        sq_local = self.state.sq.double()           # ‖∇(s_b ℓ_b)‖²
        # the update's gradient is the backward's over the loss scale and the W ranks DDP averages
        divisor = self.scale * rec.data_parallel
        share, share_sq = local / divisor, sq_local / divisor ** 2
        dot = None if self.state.dots is None else self.state.dots / divisor
        # device tensors until the flush: no host copy (nor CUDA sync) per step for these
        record = {"ids": self.ids, "step": np.full(self.B, self.step, dtype=np.int64),
                  "lr": np.full(self.B, np.nan if self.lr is None else self.lr),
                  "loss": t.losses, "share": share, "share_sq_norm": share_sq,
                  "sq_norm": sq_local / local ** 2, **t.metrics}
        if self.target is not None:
            record["dot"] = dot[:, 0]
            record["target_norm"] = np.full(self.B, self.target[1])
        else:
            record["dot"] = record["target_norm"] = np.full(self.B, np.nan)
        rec._add(record, self.step, self.scale)

    def _share(self, t: "_LossTerms") -> torch.Tensor:
        """(B,) s_b with δ_b = s_b d_b (δ: the output gradient of the step's loss, d: of ℓ_b),
        refused where δ_b is not such a multiple. δ carries its dtype's rounding (a float32
        softmax near 1 keeps ~7 digits of 1 − p), so s_b is read only where ‖d_b‖ makes that
        rounding below the tolerance: a few eps per output row in units of the row's weight
        (``Loss.weights_sq``; one eps per output element for a loss that does not say); an example
        the loss no longer moves takes the median share of its batch's readable examples of the
        same target (of all, else NaN); a language model's, whose share follows its token
        count, NaN."""
        tol = _SHARE_TOL.get(t.dtype, 3e-2)
        eps = torch.finfo(t.dtype).eps
        d_sq, dot, delta_sq = t.d_sq, t.dot, t.delta_sq
        weights_sq = self.rec.loss.weights_sq      # the rounding grows with the rows ℓ_b sums, not their width
        weights = None if weights_sq is None else weights_sq(self.y)
        units = (t.width if weights is None else _ROW_ROUNDING ** 2 *
                 (weights.to(d_sq) if isinstance(weights, torch.Tensor) else weights))
        readable = d_sq > (eps / tol) ** 2 * units
        s = dot / d_sq.clamp(min=torch.finfo(torch.float64).tiny)
        resid_sq = delta_sq - s * dot               # ‖δ − s d‖² (float64: no cancellation at tol² ≥ 1e-6)
        bad = readable & (resid_sq > tol ** 2 * delta_sq)
        if bad.any():
            b = int(bad.nonzero()[0])
            raise ConfigError(f"the step's loss is not a weighted sum of the per-example '{self.rec.loss.name}' "
                              f"losses of the model's output (example {self.ids[b].item()!r}: its output gradient is "
                              f"not a multiple of ∂ℓ/∂z at its y: label smoothing, another loss, or a y that is not "
                              f"the loss's targets); pass loss= the per-example loss the step uses, and y= its targets")
        if not readable.all():   # a language model's share follows its token count: no other example's
            fill = (torch.full_like(s, float("nan")) if self.rec.loss.output == "tokens" else
                    _median_fill(s, readable, self.y if self.y.dim() == 1 else None))
            s = torch.where(readable, s, fill)
        return s
