"""``Scorer``: the Python entry point for scoring batches with any engine."""
from __future__ import annotations

import fnmatch
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .batch import Inputs, batch_len, call_model, check_batch, describe, move, refuse_positional, take
from .config import as_names, checked_model, whole
from .engines import ScoreBatch, check_eval_mode, engine_class
from .engines.base import param_grads
from .exceptions import ConfigError, EngineError, GradscoreError, cause, model_fix, warn
from .io.checkpoints import unwrapped
from .losses import Loss, PerExampleLoss, check_head, misread_output, resolve_loss

#: examples of the first scored batch that :meth:`Scorer._check_first_batch` checks
REACH_EXAMPLES = 8
#: relative tolerance of that check's sum, by the parameters' dtype
_SUM_TOL = {torch.float64: 1e-6, torch.float32: 1e-3}

Refs = torch.Tensor | Sequence[Mapping[str, torch.Tensor]] | None


class Scorer:
    """Per-example loss, squared gradient norm and dot products for a model.

    Args:
        model: an ``nn.Module`` in eval mode; it is never wrapped or modified. Given through
            torch.compile's or (Distributed)DataParallel's wrapper, the module inside is
            scored (eagerly, on one device, under its own parameter names).
        loss: ``"cross_entropy"``, ``"nll"``, ``"mse"``, ``"causal_lm"`` (per-example
            mean over predicted tokens; ``"causal_lm_sum"``: their sum), ``"masked_lm"``
            (the same over masked tokens, without the shift; ``"masked_lm_sum"``), ``"module:fn"``
            or a callable ``(output (B, ...), target (B, ...)) -> (B,)``. The output is
            the model's tensor output, or the ``.logits`` of a Hugging Face output.
        engine: ``"auto"`` or ``"ghost"`` (the same chain, per parameter: a ghost rule
            where one applies and the layer's batch dimension is established, else vmap
            over exactly the other parameters, else the per-example loop over them where
            vmap cannot trace the model; :meth:`explain` says which and why), ``"vmap"``
            (every parameter; a :class:`VmapTraceError` where it cannot trace) or
            ``"loop"`` (the slow reference).
        chunk_bytes: memory budget of one materialized (b, P) gradient block.
        params: names or shell-style patterns (``"fc.*"``; in one string, separated by commas)
            of the parameters to score (default: all with requires_grad; frozen ones are
            skipped either way). A tensor several layers hold (a head tied to the embedding)
            matches by any of their names and is scored, as a whole, under its first. The
            set is fixed when the Scorer is made: make a new one after freezing layers.

    Gradients are of the per-example loss ℓ(x_b, y_b; θ), not of a batch mean. The
    warnings its checks of the first batch give are also kept, in order, in ``warnings``.
    """

    def __init__(self, model: nn.Module, loss: str | Loss | PerExampleLoss = "cross_entropy",
                 engine: str = "auto", *, chunk_bytes: int = 256 * 2**20,
                 params: Sequence[str] | None = None) -> None:
        given, model = model, checked_model(unwrapped(model))   # the engines' hooks and forwards: eager, one device
        self.model = model
        canonical = {id(p): n for n, p in model.named_parameters()}
        inner = {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
        #: every name the user may give a parameter (a tied one's other owners', a wrapper's) -> its name here
        self._aliases = inner | {n: canonical[id(p)] for n, p in given.named_parameters(remove_duplicate=False)}
        prefix = next((f"{n}." for n, m in given.named_modules() if m is model and n), "")   # _orig_mod., module.
        own = {n: n if n in inner else n.removeprefix(prefix) for n in self._aliases}   # each name's inner name
        self._tied = {n for n, m in own.items() if inner.get(m, m) != m}   # tied tensors' other owners' names
        self.loss = resolve_loss(loss)
        check_head(model, self.loss)
        named = dict(model.named_parameters())
        trainable = [n for n, p in named.items() if p.requires_grad]
        self.warnings: list[str] = []   # the texts of the warnings given (_warn): a scores file keeps them
        self.param_names = trainable if params is None else self._picked(as_names(params), trainable)
        if not self.param_names:
            raise EngineError("no trainable parameters to score (all frozen or none selected)")
        if whole(chunk_bytes) is None or chunk_bytes < 1:
            raise ConfigError(f"invalid value for 'chunk_bytes': {chunk_bytes!r}; give the memory budget of one "
                              f"block of per-example gradients in bytes, a whole number >= 1")
        if engine == "auto":
            engine = "ghost"
        self.engine_name = engine
        self.engine = engine_class(engine)(model, self.loss, self.param_names, chunk_bytes)
        self._sketcher = None   # a SketchEngine, made by the first sketch_batch
        self._shapes = [named[n].shape for n in self.param_names]
        self._reach_checked = False   # whether the first gradient batch was checked (_check_first_batch)
        self._random_checked = False   # whether the forward was checked for random draws (_check_random)

    def _picked(self, patterns: tuple[str, ...], trainable: list[str]) -> list[str]:
        """The trainable parameters that ``patterns`` match by any of their names: a tied
        tensor (a head that is the embedding) by its other owners' names too, with a warning;
        a wrapped model's by the wrapper's names (``_orig_mod.fc.weight``)."""
        names = self._aliases
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise EngineError(f"params: '{pattern}' matches no parameter of the model "
                                  f"(names look like '{next(iter(names), '')}')")
        matched = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        for alias in [n for n in matched if n in self._tied and names[n] not in matched]:
            self._warn(f"params: '{alias}' is the tensor '{names[alias]}' (tied weights): its gradient, the sum "
                       f"over all its uses, is scored under the name '{names[alias]}'")
        picked = {names[n] for n in matched}
        return [n for n in trainable if n in picked]

    def explain(self) -> dict[str, str]:
        """{parameter name: how its per-example gradient is computed} (engine, rule, reason)."""
        if hasattr(self.engine, "explain"):
            return self.engine.explain()
        return {n: self.engine_name for n in self.param_names}

    @property
    def num_params(self) -> int:
        """P, the number of scored parameter elements."""
        return sum(s.numel() for s in self._shapes)

    def _param_like(self) -> torch.Tensor:
        return next(p for n, p in self.model.named_parameters() if n == self.param_names[0])

    def ref_blocks(self, refs: Refs) -> list[torch.Tensor] | None:
        """Normalize refs to per-parameter blocks ``[(K, *shape_i)]`` (views where possible).

        refs: None; a (K, P) tensor in ``param_names`` flattening order; or a list of K
        dicts ``{param_name: tensor shaped like the parameter}`` (keyed by any of its names:
        a tied tensor's other owners', a wrapped model's ``_orig_mod.``/``module.`` ones).
        """
        if refs is None:
            return None
        like = self._param_like()
        if isinstance(refs, (list, tuple)) and refs and isinstance(refs[0], torch.Tensor):
            return list(refs)  # already per-parameter blocks
        if isinstance(refs, torch.Tensor):
            if refs.dim() != 2 or refs.shape[1] != self.num_params:
                raise EngineError(f"refs tensor must be (K, {self.num_params}), got {tuple(refs.shape)}")
            refs = refs.to(device=like.device, dtype=like.dtype)
            sizes = [s.numel() for s in self._shapes]
            return [b.reshape(refs.shape[0], *s) for b, s in zip(refs.split(sizes, dim=1), self._shapes)]
        blocks = []
        for name, shape in zip(self.param_names, self._shapes):
            keys = [name] + [n for n, c in self._aliases.items() if c == name and n != name]
            try:   # keyed by its name, or by another (a tied owner's, the wrapper's)
                vs = [torch.as_tensor(r[next((k for k in keys if k in r), name)]) for r in refs]
            except KeyError as e:
                raise EngineError(f"a reference dict has no entry for parameter {e}") from e
            for v in vs:
                if tuple(v.shape) != tuple(shape):
                    raise EngineError(f"reference for '{name}' has shape {tuple(v.shape)}, "
                                      f"expected {tuple(shape)}")
            blocks.append(torch.stack(vs).to(device=like.device, dtype=like.dtype))
        return blocks

    def _inputs(self, x: Inputs) -> Inputs:
        refuse_positional(x, self.model)
        return move(x, self._param_like())

    def _batch(self, x: Inputs, y: Any) -> tuple[Inputs, torch.Tensor]:
        """(x, y) on the model's device (x in its dtype; class labels as int64,
        :meth:`Loss.class_indices`), one example per row of each: else one error."""
        x, y = self._inputs(x), self.loss.class_indices(torch.as_tensor(y).to(self._param_like().device))
        check_batch(x, y)
        return x, y

    def output(self, x: Inputs) -> torch.Tensor:
        """The model output (its ``.logits`` for Hugging Face models) for inputs x, without gradients."""
        with torch.no_grad():
            return call_model(self.model, self._inputs(x))

    def score_batch(self, x: Inputs, y: torch.Tensor, refs: Refs = None, *,
                    gradients: bool = True) -> ScoreBatch:
        """Score B examples at the model's current parameters.

        x: (B, ...) inputs, or a dict of keyword inputs for the model, e.g.
        ``{"input_ids": (B, T), "attention_mask": (B, T)}``; y: (B, ...) targets (for
        ``causal_lm``: labels (B, T), −100 = ignored); refs: see :meth:`ref_blocks`.
        Returns :class:`ScoreBatch` with loss (B,), sq_norm (B,), dots (B, K) or None,
        logits. With ``gradients=False`` only a forward pass runs (sq_norm is None).
        """
        check_eval_mode(self.model)
        x, y = self._batch(x, y)
        blocks = self.ref_blocks(refs)
        if not gradients:
            return self._checked(lambda: self.engine.forward(x, y), x, y)
        out = self._checked(lambda: self.engine.score_batch(x, y, blocks), x, y)
        if not self._reach_checked and batch_len(x):   # an empty batch shows nothing of where gradients reach
            self._reach_checked = True
            self._check_first_batch(x, y)
        return out

    def _checked(self, call: Callable[[], ScoreBatch], x: Inputs, y: torch.Tensor) -> ScoreBatch:
        """``call()`` (:meth:`_guarded`), then :meth:`_check_random`; that also where the engine
        failed (vmap's randomness error), whose cause to name is then the forward's. After the
        engine, so that its first forwards see the model as it was given (a cache it fills).
        On the first batch, a warning where the loss reads the output as another kind
        (:func:`.losses.misread_output`: probabilities given to 'cross_entropy')."""
        try:
            out = self._guarded(call, x, y)
        except GradscoreError:
            self._check_random(x)
            raise
        first = not self._random_checked and batch_len(x)
        self._check_random(x)
        why = misread_output(self.loss, out.logits) if first else None
        if why is not None:
            self._warn(why)
        return out

    def _warn(self, text: str) -> None:
        """A :class:`GradscoreWarning` at the user's line (:func:`.exceptions.warn`), kept in :attr:`warnings`."""
        self.warnings.append(text)
        warn(text)

    def _check_random(self, x: Inputs) -> None:
        """On the first batch with examples: an :class:`EngineError` where the model's forward is
        random in eval mode (:func:`.engines.layout.refuse_random_in_eval`), whose every score,
        by any engine, would be a random draw (a batch so scored is not returned)."""
        from .engines.layout import refuse_random_in_eval
        if self._random_checked or not batch_len(x):
            return
        refuse_random_in_eval(self.model, x, ", so every per-example score would be a random draw")
        self._random_checked = True

    def _check_first_batch(self, x: Inputs, y: torch.Tensor) -> None:
        """Warn (:class:`GradscoreWarning`) where the engine's per-example gradients of the first
        :data:`REACH_EXAMPLES` examples disagree with plain autograd on their summed loss:
        parameters no gradient reaches (every engine counts them as zero there: right for a
        head the forward does not use on them, wrong for one read through a tensor the model
        cached in an earlier call), or Σ_b ⟨g_b, G⟩ ≠ ‖G‖² for G = ∇ Σ_b ℓ_b (a model whose examples
        interact, or whose cache a functional call does not see)."""
        from .engines.workarounds import torch_workarounds
        named = dict(self.model.named_parameters())
        params = [named[n] for n in self.param_names]
        n = min(batch_len(x), REACH_EXAMPLES)
        first, y_first = take(x, 0, n), y[:n]
        cached = ("the model reads a tensor it cached in an earlier call (timm's LeViT and EfficientViT-M cache "
                  "attention biases in eval mode, also under torch.no_grad()): clear the cache before scoring (for "
                  "those, model.train(); model.eval())")
        try:
            with torch.enable_grad(), torch_workarounds():
                loss = self.engine.losses(call_model(self.model, first), y_first).sum()
                grads = param_grads(loss, params)
        except RuntimeError as e:
            if "backward through the graph a second time" in str(e):
                self._warn(f"the scores may be wrong: {cached}")
            return
        except Exception:  # noqa: BLE001 - the check only informs; the batch itself was scored
            return
        unreached = [name for name, g in zip(self.param_names, grads) if g is None]
        if unreached:
            names = ", ".join(f"'{name}'" for name in unreached[:5]) + (f" and {len(unreached) - 5} more"
                                                                      if len(unreached) > 5 else "")
            self._warn(f"no gradient reaches {names} from the loss of the first batch's examples, so every "
                       f"engine counts their per-example gradients there as zero. Right for a parameter the "
                       f"forward does not use on them (an auxiliary head in eval mode, the head of another "
                       f"task); leave one that no example uses out with params=. Wrong if {cached}")
        if getattr(self.engine, "coupled", False):   # known, and explained: each example is scored alone
            return
        grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
        # v = G = ∇ Σ_b ℓ_b itself: a parameter block the engine misses lowers Σ_b ⟨g_b, G⟩ by its
        # share of ‖G‖², where a random direction would see it shrunk by √P
        want = float(sum((g.double() ** 2).sum() for g in grads))
        try:
            dots = self.engine.score_batch(first, y_first, [g[None] for g in grads]).dots[:, 0].double()
        except Exception:  # noqa: BLE001 - as above
            return
        got, scale = float(dots.sum()), float(dots.abs().sum()) + want
        if abs(got - want) > _SUM_TOL.get(params[0].dtype, 1e-2) * scale:
            self._warn(f"the engine's per-example gradients of the first {n} examples do not add up to the "
                       f"gradient G of their summed loss (Σ_b ⟨g_b, G⟩ = {got:.6g} against ‖G‖² = {want:.6g}). "
                       f"Either the model's output for an example depends on the other examples of its batch "
                       f"(then each example is scored alone, as the per-example loop scores it), or the scores "
                       f"are wrong: {cached}")

    def sketch_batch(self, x: Inputs, y: torch.Tensor, projection, dtype: torch.dtype | None = None) -> ScoreBatch:
        """Sketches of B examples' gradients: a :class:`ScoreBatch` whose ``dots`` are
        Φ g_b (B, projection.dim) for a :class:`gradscore.sketches.Projection` of this
        model's ``param_names`` (``sq_norm`` is not computed); ``dtype``: theirs (default:
        float32, float64 for a float64 model)."""
        from .sketches.engine import SketchEngine
        check_eval_mode(self.model)
        x, y = self._batch(x, y)
        if self._sketcher is None or self._sketcher.projection is not projection:
            self._sketcher = SketchEngine(self.model, self.loss, self.param_names, projection,
                                          self.engine.chunk_bytes)
        return self._checked(lambda: self._sketcher.sketch_batch(x, y, dtype), x, y)

    def _guarded(self, call, x: Inputs, y: torch.Tensor) -> ScoreBatch:
        """``call()``; an error of torch's becomes one :class:`EngineError` with its cause and fix."""
        try:
            return call()
        except GradscoreError:
            raise
        except Exception as e:   # no raw torch error reaches the user: cause, engine and fix
            what = cause(e)
            if isinstance(e, torch.OutOfMemoryError):
                fix = "use a smaller batch or chunk_bytes"
            else:
                fix = model_fix(e) or (f"check that the inputs ({describe(x)}) and targets (shape "
                                       f"{tuple(y.shape[1:])}, {y.dtype}) fit the model and loss")
            raise EngineError(f"engine '{self.engine_name}' failed on this batch ({what}); {fix}") from e
