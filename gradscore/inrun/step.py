"""One training step of in-run scoring (:class:`Step`, made by :meth:`InRun.step`): the
hooks that read the model's output and its gradient in the user's backward, the checks of
the step's ids, batch and loss, and the step's records."""
from __future__ import annotations

import contextlib
import reprlib
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..batch import Inputs, batch_len, forward_names, output_tensor
from ..engines.layout import refuse_random_in_eval
from ..engines.workarounds import wrong_in_torch
from ..exceptions import ConfigError, EngineError, GradscoreError, cause
from ..io.checkpoints import checked_lr
from ..losses import misread_output, reads_the_batch
from .shares import LossTerms, read_shares

if TYPE_CHECKING:
    from .recorder import InRun


def _inputs(model: nn.Module, args: tuple, kwargs: dict) -> Inputs:
    """The batch of a forward call: its one positional argument x, or its keywords."""
    if len(args) == 1 and not kwargs:
        return args[0]
    if not args and kwargs:
        return kwargs
    names = [*forward_names(model, len(args)), *kwargs]
    raise EngineError(f"in-run scoring needs the model called as model(x) or model(**inputs); it was called with "
                      f"{len(args)} positional and {len(kwargs)} keyword arguments: pass them all by name, "
                      f"model({', '.join(f'{n}=...' for n in names)})")


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


class Step:
    """One training step's hooks (see :meth:`InRun.step`)."""

    def __init__(self, rec: "InRun", ids, y: torch.Tensor, lr: float | None, step: int, auto: bool = False) -> None:
        try:
            y = y if isinstance(y, torch.Tensor) else torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"invalid value for 'y': {reprlib.repr(y)}; give the step's targets, one per example (a "
                              f"tensor, an array or a list)") from e
        y = rec.loss.class_indices(y)
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
        if rec.target_gradient is not None and lr is None and "inrun_value" in rec.config.scores:
            raise ConfigError("invalid value for 'lr': inrun_value needs the step's learning rate; pass "
                              "rec.step(ids, y, lr=...)")
        if lr is not None:
            self.lr = lr = checked_lr(lr)
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
        self.terms: LossTerms | None = None
        self.scale = 1.0                      # the loss scale of this step's backward
        self.error: Exception | None = None
        self.wrong: list[tuple[str, str]] = []   # (module, norm) whose backward torch may get wrong here

    def __enter__(self) -> "Step":
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
        x = _inputs(module, args, kwargs)
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
        target = rec.target_gradient   # after the layout: it picks each layer's form
        self.target = None if target is None else target.refs(rec, self.step, self.lr, self.B)
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
            # a forward random in eval mode looks coupled there: two runs of one example differ
            if rec.engine.coupled:
                refuse_random_in_eval(rec.network, x, "; the recorder checks each layer's batch dimension there, "
                                      "which needs the same output twice (the training's own random draws, such "
                                      "as nn.Dropout's, are recorded as drawn)")
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
            self.rec._warn(f"could not check that the step's loss reaches the model only through its output "
                           f"({why}); a loss term on an activation inside the model would go unseen")

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
            self.terms = LossTerms.of(self.rec.loss, z, grad, self.y.to(z.device))
        except GradscoreError as e:   # raised by __exit__, outside autograd's engine
            self.error = e
        except Exception as e:  # noqa: BLE001 - the targets do not fit the loss: the user's y
            self.error = ConfigError(f"invalid value for 'y': the recorder's '{self.rec.loss.name}' loss failed on "
                                     f"the model's output and these targets ({cause(e)}); give y as the step's "
                                     f"own loss takes it (shape {tuple(self.y.shape)}, {self.y.dtype} here)")
        self.output = None

    def _check_loss(self, z: torch.Tensor) -> None:
        """On the first step: a warning where the loss reads the output as another kind
        (:func:`misread_output`: probabilities given to 'cross_entropy'); on the first of two or
        more examples, a ConfigError where the recorder's loss for an example reads the other
        rows of its batch (:func:`reads_the_batch`)."""
        rec = self.rec
        if not rec._output_checked and len(z):
            rec._output_checked = True
            why = misread_output(rec.loss, z)
            if why is not None:
                rec._warn(why)
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
        local = read_shares(t, rec.loss, self.y, self.ids)   # s_b in the loss this backward ran on
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
        if "margin" in t.metrics:   # a class label per example: the store checks that an id keeps its label
            record["label"] = self.y
        if self.target is not None:
            record["dot"] = dot[:, 0]
            record["target_norm"] = np.full(self.B, self.target[1])
        else:
            record["dot"] = record["target_norm"] = np.full(self.B, np.nan)
        rec._add(record, self.step, self.scale)
