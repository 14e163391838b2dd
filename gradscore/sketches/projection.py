"""The random projection Φ of a model's per-example gradient: its seed, its dimension
and how the dimension is split over the parameters.

Φ is block-diagonal over the scored parameters, in ``param_names`` order; parameter p
gets the coordinates ``offset : offset + k`` of the sketch, with k ∝ its size
(``k_p ≈ dim · numel_p / Σ numel``, at least 1, at most numel_p):

- a weight W (rows, cols) whose layer's rule has factors (nn.Linear, nn.Embedding,
  Hugging Face's Conv1D), so that its per-example gradient is g = Σ_t l_t r_tᵀ, or its own
  ``sketch`` (nn.Conv*, W viewed as (C_out, C_in/groups·kernel), P_in applied to the
  patches as a convolution): the
  Kronecker-factored block Φ_p vec(g) = vec(P_out g P_inᵀ) = vec(Σ_t (P_out l_t)(P_in r_t)ᵀ),
  P_out (k_out, rows), P_in (k_in, cols), k_out / k_in ≈ rows / cols, k_out·k_in ≈ k_p:
  two thin products per layer, the gradient never formed;
- every other parameter: a dense block P (k_p, numel_p), applied to the gradient the
  layer's rule (or the fallback) forms.

Entries are N(0, 1/k) (k: the block's rows, k_out or k_in for a factor), so
E[Φᵀ Φ] = I and a sketch dot ⟨Φg, Φh⟩ is an unbiased estimate of ⟨g, h⟩. Each block is
drawn on the CPU in float64 from its own generator, seeded by the sketch's seed and the
parameter's name: the same seed gives the same Φ on every machine and device.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..engines.ghost import plan_layers
from ..engines.rules import Factor
from ..exceptions import ConfigError
from ..io.checkpoints import unwrapped
from ..kernels import acc_dtype

#: the most entries one dense block may have (a larger one needs a Kronecker rule)
MAX_DENSE_ENTRIES = 2**28
#: bytes of one sub-batch's (b, k_out, k_in) block when a projection adds into a buffer
SUB_BATCH_BYTES = 2**20


@dataclass(frozen=True)
class Block:
    """Parameter ``name``'s coordinates ``offset : offset + k`` of the sketch; ``kind``
    "kron" (k = k_out·k_in) or "dense"."""

    name: str
    kind: str
    shape: tuple[int, ...]
    offset: int
    k: int
    k_out: int = 0
    k_in: int = 0


def plan_blocks(model: nn.Module, param_names: list[str], dim: int, factored: bool = True) -> list[Block]:
    """The split of ``dim`` over the parameters (see the module's docstring). Depends only
    on the model's structure, so a training set and its queries get the same split.
    ``factored=False``: dense blocks only (the projection of a materialized gradient)."""
    if not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"invalid value for 'dim': {dim!r}; give a whole number >= 1")
    named = dict(model.named_parameters())
    layers, _ = plan_layers(model, param_names)
    kron = {full for layer in layers if factored and (layer.rule.factors is not None or layer.rule.sketch is not None)
            for local, full in layer.params.items()
            if local == "weight" and named[full].dim() >= 2 and (layer.rule.sketch or named[full].dim() == 2)}
    total = sum(named[n].numel() for n in param_names)
    sizes: dict[str, list[int]] = {}     # name -> [k_out, k_in] (kron) or [k] (dense)
    for name in param_names:
        shape, want = tuple(named[name].shape), dim * named[name].numel() / total
        if name in kron:   # viewed as (shape[0], the rest): a conv's (C_out, C_in/groups·k)
            rows, cols = shape[0], math.prod(shape[1:])
            k_out = min(rows, max(1, round(math.sqrt(want * rows / cols))))
            sizes[name] = [k_out, min(cols, max(1, round(want / k_out)))]
        else:
            sizes[name] = [min(named[name].numel(), max(1, round(want)))]
    _fill(sizes, {n: tuple(named[n].shape) for n in param_names}, dim)
    blocks, offset = [], 0
    for name in param_names:
        shape, size = tuple(named[name].shape), sizes[name]
        if len(size) == 2:
            block = Block(name, "kron", shape, offset, size[0] * size[1], size[0], size[1])
        else:
            if size[0] * math.prod(shape) > MAX_DENSE_ENTRIES:
                raise ConfigError(f"invalid value for 'dim': {dim} gives parameter '{name}' ({math.prod(shape)} "
                                  f"values, no Kronecker-factored rule) a dense {size[0]} x {math.prod(shape)} "
                                  f"projection; use a smaller dim")
            block = Block(name, "dense", shape, offset, size[0])
        blocks.append(block)
        offset += block.k
    return blocks


def _fill(sizes: dict[str, list[int]], shapes: dict[str, tuple[int, ...]], dim: int) -> None:
    """Give the rows that rounding and the blocks' own sizes left over to the largest
    blocks with room (a Kronecker block grows by a row of its narrower factor)."""
    left = dim - sum(math.prod(s) for s in sizes.values())
    for name in sorted(sizes, key=lambda n: -math.prod(shapes[n])):
        size, shape = sizes[name], shapes[name]
        if len(size) == 1:
            add = max(0, min(math.prod(shape) - size[0], left))
            size[0], left = size[0] + add, left - add
            continue
        shape = (shape[0], math.prod(shape[1:]))
        while left > 0:
            grow = [i for i in (0, 1) if size[i] < shape[i] and size[1 - i] <= left]
            if not grow:
                break
            i = min(grow, key=lambda i: size[i] / shape[i])
            size[i] += 1
            left -= size[1 - i]


@dataclass(frozen=True)
class SketchSpec:
    """What defines Φ: saved with every sketch file and compared before two are combined."""

    seed: int
    dim: int                 # the sketch's length: Σ k over the blocks (close to the dim asked for)
    blocks: tuple[Block, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "dim": self.dim, "blocks": [asdict(b) for b in self.blocks]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SketchSpec":
        return cls(int(d["seed"]), int(d["dim"]), tuple(Block(**{**b, "shape": tuple(b["shape"])})
                                                        for b in d["blocks"]))


class Projection:
    """Φ for one model: its blocks' matrices, made on first use and cached per device
    and dtype."""

    def __init__(self, spec: SketchSpec) -> None:
        self.spec = spec
        self.by_name = {b.name: b for b in spec.blocks}
        self._cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def for_model(cls, model: nn.Module, param_names: list[str], dim: int, seed: int = 0,
                  factored: bool = True) -> "Projection":
        """Φ of about ``dim`` rows for ``param_names`` (see :func:`plan_blocks`) of ``model`` (a
        wrapped one's: of the module inside, as :class:`gradscore.Scorer` names them)."""
        blocks = plan_blocks(unwrapped(model), list(param_names), dim, factored)
        return cls(SketchSpec(int(seed), sum(b.k for b in blocks), tuple(blocks)))

    @property
    def dim(self) -> int:
        return self.spec.dim

    def _draw(self, name: str, part: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        """N(0, 1/rows) (rows, cols) in ``like``'s accumulation dtype, on its device."""
        dtype = acc_dtype(like.dtype)
        key = (name, part, like.device, dtype)
        if key not in self._cache:
            g = torch.Generator().manual_seed((self.spec.seed * 1_000_003 + zlib.crc32(f"{name}/{part}".encode()))
                                              % 2**63)
            m = torch.randn(rows, cols, generator=g, dtype=torch.float64) / math.sqrt(rows)
            self._cache[key] = m.to(device=like.device, dtype=dtype)
        return self._cache[key]

    def factors(self, name: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """P_out (k_out, rows), P_in (k_in, cols) of a Kronecker block."""
        b = self.by_name[name]
        return (self._draw(name, "out", b.k_out, b.shape[0], like),
                self._draw(name, "in", b.k_in, math.prod(b.shape[1:]), like))

    def dense(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The block as a dense (k, *shape) matrix (a Kronecker block's is P_out ⊗ P_in)."""
        b = self.by_name[name]
        if b.kind == "dense":
            return self._draw(name, "dense", b.k, math.prod(b.shape), like).reshape(b.k, *b.shape)
        if b.k * math.prod(b.shape) > MAX_DENSE_ENTRIES:
            raise ConfigError(f"parameter '{name}' went to the per-example fallback, whose dense {b.k} x "
                              f"{math.prod(b.shape)} projection is too large; use a smaller dim")
        p_out, p_in = self.factors(name, like)
        return torch.einsum("ar,bc->abrc", p_out, p_in).reshape(b.k, *b.shape)

    def project_factor(self, name: str, f: Factor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Φ_p g_b (B, k) of a weight with g_b = Σ_t f.left_bt f.right_btᵀ: Σ_t (P_out l_bt)(P_in r_bt)ᵀ,
        through (B, T, k_out) and (B, T, k_in), never the (rows, cols) gradient. With ``out``
        (B, k), added to it a sub-batch at a time (no (B, k) block of its own); returns out."""
        p_out, p_in = self.factors(name, f.right)
        acc = p_in.dtype
        left = p_out.T[f.left] if f.left_ids else f.left.to(acc) @ p_out.T   # one-hot rows: gather
        right = f.right.to(acc) @ p_in.T
        if out is None:
            return torch.bmm(left.transpose(1, 2), right).reshape(left.shape[0], -1)
        step = max(1, SUB_BATCH_BYTES // (left.shape[2] * right.shape[2] * left.element_size()))
        for i in range(0, len(out), step):
            out[i:i + step] += torch.bmm(left[i:i + step].transpose(1, 2), right[i:i + step]).reshape(
                -1, out.shape[1]).to(out.dtype)
        return out

    def unapply(self, m: torch.Tensor) -> dict[str, torch.Tensor]:
        """Φᵀ m {name: tensor shaped like the parameter} of one sketch-space vector m (dim,):
        P_outᵀ M P_in per Kronecker block, Pᵀ m_p per dense one. ⟨Φᵀ m, g⟩ = ⟨m, Φ g⟩, so
        for m = Φ v it is an unbiased estimate of v (E[ΦᵀΦ] = I)."""
        out = {}
        for b in self.spec.blocks:
            part = m[b.offset:b.offset + b.k]
            if b.kind == "kron":
                p_out, p_in = self.factors(b.name, m)
                out[b.name] = (p_out.T @ part.reshape(b.k_out, b.k_in) @ p_in).reshape(b.shape)
            else:
                out[b.name] = (part @ self.dense(b.name, m).reshape(b.k, -1)).reshape(b.shape)
        return out

    def apply(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Φ g (B, dim) of materialized per-example gradients {name: (B, *shape)}: the
        obviously-correct form (P_out g P_inᵀ per Kronecker block, P vec(g) per dense one)."""
        out = []
        for b in self.spec.blocks:
            g = grads[b.name]
            acc = acc_dtype(g.dtype)
            if b.kind == "kron":
                p_out, p_in = self.factors(b.name, g)
                out.append((p_out @ g.to(acc).reshape(*g.shape[:2], -1) @ p_in.T).reshape(g.shape[0], -1))
            else:
                out.append(g.to(acc).reshape(g.shape[0], -1) @ self.dense(b.name, g).reshape(b.k, -1).T)
        return torch.cat(out, 1)
