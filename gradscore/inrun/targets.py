"""The target gradient of in-run scoring: the target examples checked and fingerprinted, and
∇J(θ_t) as each step's reference blocks (:class:`TargetGradient`), a wide Linear's as the
target batch's factors (:class:`FactoredRef`); the recorder's own forwards run aside
(:func:`aside`)."""
from __future__ import annotations

import contextlib
import hashlib
import math
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from ..batch import Inputs, call_model, check_batch, hash_batch, move, refuse_positional, take
from ..engines.base import param_grads
from ..engines.ghost import probe
from ..engines.rules.registry import FactoredRef
from ..engines.workarounds import torch_workarounds
from ..exceptions import ConfigError, DataError, EngineError, GradscoreError, cause, model_fix
from ..losses import Loss

if TYPE_CHECKING:
    from .recorder import InRun


@contextlib.contextmanager
def aside(model: nn.Module) -> Iterator[None]:
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


def checked_targets(targets: Any, model: nn.Module | None = None) -> list[tuple[Inputs, torch.Tensor]]:
    """The target batches [(x, y)], each y a tensor: ``targets`` is one pair (x, y) (a tuple or
    list), or any other iterable of batches (a DataLoader, a generator), read once now; a
    batch is a pair, or a dict holding 'labels' (the other keys are x). One ConfigError
    unless there is at least one example, every batch with its examples in dimension 0 of
    every input and of y, and no DistributedSampler (every rank needs the same ∇J); a fix
    names ``model``'s forward arguments."""
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
            refuse_positional(x, model)
            check_batch(x, y)
        except GradscoreError as e:
            raise ConfigError(f"invalid value for 'targets': {at.rstrip() + ': ' if at else ''}{e}") from None
        if len(y):
            out.append((x, y))
    if not out:
        raise ConfigError("invalid value for 'targets': no examples; give at least one target example, or leave "
                          "targets out")
    return out


def targets_sha256(targets: list[tuple[Inputs, torch.Tensor]] | None) -> str | None:
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


def _target_grads(J: torch.Tensor, wanted: list[torch.Tensor]) -> tuple:
    """∂J/∂wanted (None where unused): torch.autograd.grad, which leaves ``.grad`` alone. A
    reentrant torch.utils.checkpoint refuses it, and a model's backward can fail in eval
    mode (a state updated in place): one EngineError with the cause and the fix."""
    if not wanted:
        return ()
    try:
        return tuple(param_grads(J, wanted))
    except RuntimeError as e:
        if "use_reentrant=True" in str(e):
            raise EngineError("the target gradient: the model calls torch.utils.checkpoint with use_reentrant=True, "
                              "which refuses torch.autograd.grad (the recorder's way to leave .grad alone); pass "
                              "use_reentrant=False to it (the same gradients), or record without targets") from None
        if isinstance(e, torch.OutOfMemoryError):
            raise
        fix = model_fix(e) or "the model's backward fails on the target batch: record without targets"
        raise EngineError(f"the target gradient, taken in eval mode, failed ({cause(e)}); {fix}") from e


class TargetGradient:
    """∇J(θ_t), J the mean loss of the target examples in eval mode, as the reference blocks of
    a step's dots (one extra forward+backward of the targets, with ``torch.autograd.grad``,
    which leaves ``.grad`` alone); computed every ``every`` steps and shared by the
    micro-batches of one step. Each method takes the recorder ``rec`` (its model, engine, loss
    and optimizer of the moment), which does not hold it back: a recorder dropped unclosed is
    freed at once, and with it its claim on ``out``."""

    def __init__(self, batches: list[tuple[Inputs, torch.Tensor]], every: int, preconditioner: str,
                 loss: Loss) -> None:
        self.batches = [(x, loss.class_indices(y)) for x, y in batches]   # int32 labels as the loss takes them
        self.every, self.preconditioner = every, preconditioner
        self.N = sum(len(y) for _, y in batches)
        self.cached: tuple[int, list[Any], float] | None = None   # (step, refs, ‖∇J‖)
        self._warned_groups = False
        self._warned_stray: set[str] = set()   # trainable parameters the optimizer does not hold, named once

    def _outputs(self, rec: InRun, x: Inputs) -> Any:
        """The model's output on target inputs ``x``, the recorder's step hooks standing aside."""
        rec._busy = True
        try:
            return call_model(rec.network, x)
        finally:
            rec._busy = False

    def refs(self, rec: InRun, step: int, lr: float | None = None,
             rows: int | None = None) -> tuple[list[torch.Tensor], float] | None:
        """[(1, *shape)] target blocks in the engine's parameter order and their norm, computed
        at every ``every``-th step (micro-batches of one step share it); None elsewhere. A wide
        Linear weight's block is the target batch's factors (:class:`FactoredRef`), whose
        dense gradient the backward then never forms. Each block is ∇J of its parameter,
        preconditioned by Adam's Γ_t (if asked) and weighed by η_g/η (:meth:`_lr_weights`,
        ``lr``: the step's η). The target examples go through the model ``rows`` at a time
        (the step's batch: the target pass then holds no more than the training step)."""
        if step % self.every:
            return None
        if self.cached is not None and self.cached[0] == step:
            return self.cached[1], self.cached[2]
        like = next(iter(rec.params.values()))
        names, N = rec.engine.param_names, self.N
        captured: dict[str, _TargetFactors] = {}
        blocks: dict[str, torch.Tensor] = {}
        with aside(rec.model), torch.enable_grad(), self._capture_linear(rec, captured) as z, \
                torch_workarounds():
            size = rows or max(len(y) for _, y in self.batches)
            chunks = ((take(x, a, a + size), y[a:a + size]) for x, y in self.batches for a in range(0, len(y), size))
            for i, (x, y) in enumerate(chunks):   # J = Σ over the chunks of their summed losses / N
                x, y = move(x, like), y.to(like.device)   # the model's device and dtype
                try:
                    J = rec.loss.fn(self._outputs(rec, x), y).sum() / N
                except (GradscoreError, torch.OutOfMemoryError):
                    raise
                except Exception as e:  # noqa: BLE001 - the user's targets do not fit the model or loss
                    raise ConfigError(f"invalid value for 'targets': the model or the '{rec.loss.name}' loss failed "
                                      f"on them ({cause(e)}); give (x, y) as the training batches are given") from e
                if i == 0:   # each layer's form, from the first chunk's rows as a share of all N examples
                    factored = {w for w, c in captured.items() if c.cheaper(N / len(y))}
                    for w in set(captured) - factored:
                        captured.pop(w).off = True
                    dense = [n for n in names if n not in factored]
                    wanted = [rec.params[n] for n in dense] + ([z] if factored else [])
                grads = _target_grads(J, wanted)
                for n, g in zip(dense, grads):
                    if g is not None:
                        blocks[n] = g.detach() if n not in blocks else blocks[n] + g.detach()
        blocks = {n: blocks[n] if n in blocks else torch.zeros_like(rec.params[n]) for n in dense}
        groups = {} if rec.optimizer is None else {id(p): g for g in rec.optimizer.param_groups for p in g["params"]}
        if self.preconditioner == "adam":
            blocks = {n: self._precondition(rec, b, rec.params[n], groups) for n, b in blocks.items()}
        weights = self._lr_weights(rec, lr, groups)
        blocks = {n: b * weights[n] if n in weights else b for n, b in blocks.items()}
        refs: list = [(captured[n].ref().scaled(weights.get(n, 1.0)) if n in factored else blocks[n].unsqueeze(0))
                      for n in names]
        sq = sum(float(torch.linalg.vector_norm(b).double() ** 2) for b in blocks.values())
        norm = (sq + sum(r.sq_norm() for r in refs if isinstance(r, FactoredRef))) ** 0.5
        if not math.isfinite(norm):
            self.check_losses(rec, step)
        self.cached = (step, refs, norm)
        return refs, norm

    def check_losses(self, rec: InRun, step: int) -> None:
        """Where ∇J is NaN/Inf at finite parameters: a DataError naming the target examples
        whose loss is (one makes every dot, so every inrun_value, NaN). A model that diverged
        is not its targets' fault: its records are non-finite, and named as such."""
        if not all(bool(torch.isfinite(p).all()) for p in rec.params.values()):
            return
        like, rows, start = next(iter(rec.params.values())), [], 0
        with aside(rec.model), torch.no_grad(), torch_workarounds():
            for x, y in self.batches:
                losses = rec.loss.fn(self._outputs(rec, move(x, like)), y.to(like.device))
                rows += (start + torch.nonzero(~torch.isfinite(losses.reshape(len(y), -1)).all(1))[:, 0]).tolist()
                start += len(y)
        if rows:
            where = f"position{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows[:5]))}{', …' * (len(rows) > 5)}"
            raise DataError(f"invalid value for 'targets': target example(s) at {where} (of {start}) give a "
                            f"non-finite loss at step {step} (NaN/Inf in their inputs?); fix or drop them: one makes "
                            f"the target gradient, and so every inrun_value, NaN")

    @contextlib.contextmanager
    def _capture_linear(self, rec: InRun, captured: dict[str, _TargetFactors]) -> Iterator[torch.Tensor]:
        """During the target's forward and backward, each untied, batch-first nn.Linear's (or
        checked subclass's) inputs and output gradients (the factors of ∇J for its weight), keyed by the weight's
        name; nothing with Adam's preconditioning (Γ ∇J has no such factors). Yields the zero
        leaf whose gradient, asked for, sends δ through every probed output."""
        device = next(iter(rec.params.values())).device
        handles, z = [], torch.zeros((), device=device, requires_grad=True)
        if self.preconditioner == "none":
            for layer in rec.engine.layers:
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

    def _precondition(self, rec: InRun, g: torch.Tensor, p: torch.Tensor, groups: dict[int, dict]) -> torch.Tensor:
        """Γ_t g with Γ_t = diag(1/(√v̂ + ε)) from Adam's state of ``p`` before this step; g
        unchanged where the state is still empty (the first step) or Adam does not hold p."""
        if rec.optimizer is None:
            raise ConfigError("invalid value for 'optimizer': 'adam' asks for the trainer's Adam, which no callback "
                              "has given; in a plain loop pass the optimizer itself (gs.InRun(..., optimizer=opt))")
        state = rec.optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            return g
        beta2, eps = groups[id(p)]["betas"][1], groups[id(p)]["eps"]
        v_hat = state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))
        return g / (v_hat.sqrt() + eps)

    def _lr_weights(self, rec: InRun, lr: float | None, groups: dict[int, dict]) -> dict[str, float]:
        """{parameter name: η_g/η} for the parameters the optimizer moves by another learning
        rate η_g than the step's η (its group's; 0 where it holds no such parameter), so that
        η·dot is the first-order change of J; {} without an optimizer or η, or where the
        optimizer holds none of the parameters (a warning: it steps copies of them)."""
        if rec.optimizer is None or not lr:
            return {}
        names = rec.engine.param_names
        if not any(id(rec.params[n]) in groups for n in names):
            if not self._warned_groups:
                self._warned_groups = True
                rec._warn(f"the optimizer ({type(rec.optimizer).__name__}) holds none of the model's "
                          f"parameters, so their learning rates are unknown; inrun_value weighs every parameter "
                          f"by the step's lr")
            return {}
        held = [id(rec.params[n]) in groups for n in names]
        stray = [n for n, h in zip(names, held) if not h]
        if stray and set(stray) != self._warned_stray:   # once per set: a new head the loop's new optimizer steps
            self._warned_stray = set(stray)
            listed = ", ".join(stray[:6]) + (f" and {len(stray) - 6} more" if len(stray) > 6 else "")
            rec._warn(f"{listed} require grad, but the optimizer ({type(rec.optimizer).__name__}) does "
                      f"not hold them, so inrun_value weighs them 0 (they do not move); if the loop steps another "
                      f"optimizer now, set rec.optimizer to it")
        rates = {n: float(groups[id(rec.params[n])]["lr"]) if h else 0.0 for n, h in zip(names, held)}
        return {n: r / lr for n, r in rates.items() if r != lr}
