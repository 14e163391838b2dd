"""Ghost rule for ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (any stride, padding
including ``'same'``, every padding mode, dilation, groups).

Per group, a convolution is a Linear layer over its L output positions: with the input
unfolded (im2col) to a_bl (C_in·k) and the output gradient δ_bl (C_out),
g_b(W) = Σ_l δ_bl a_blᵀ and g_b(bias) = Σ_l δ_bl. The weight's share takes one of four
forms per layer, whichever costs fewer multiply-adds (:func:`plan`):

- ``outer`` / ``gram``: im2col patches through ``kernels.ghost_linear`` (the per-example
  gradient of a sub-batch, or the (L, L) Grams of patches and δ);
- ``grouped`` (CPU): the per-example gradients of a sub-batch as the weight gradient of
  one convolution whose b·groups groups are the examples' (``torch.nn.grad``), with no
  im2col copy; then ``norm_dot``. Same multiply-adds as ``outer`` in one call, and no
  loop over groups: it wins for narrow and depthwise convs, but not for a first conv
  (1-3 input channels per group), where oneDNN runs it slowly;
- ``pixel``: no im2col and no per-example gradient. The Gram of patches is a sum over
  the k kernel offsets of shifted blocks of the Gram of input pixels,
  ⟨a_bl, a_bm⟩ = Σ_offsets ⟨x_b[l + o], x_b[m + o]⟩, so ‖g_b‖² = ⟨Σ_o shift_o(X_bᵀX_b), δ_bᵀδ_b⟩
  costs (H·W)²·C_in + L²·C_out + shifts, and ⟨g_b, V_k⟩ = ⟨conv(x_b, V_k), δ_b⟩ one
  convolution per reference. It wins for wide channels on small images;
- ``sparse`` (CPU, numba): each example's gradient, one example at a time per thread,
  with no batch-wide im2col (``kernels.conv_sparse_numba``), the bias's share included.
  Where an output channel has many weights it is summed over the non-zero entries of δ
  only: behind a ReLU half of δ is zero, behind ReLU + max-pool three quarters or more,
  and the plan takes δ's measured density. Where it has few (a first conv, a depthwise
  conv) it is summed densely, as dot products over the output positions.

``nn.ConvTranspose1d/2d/3d`` take the same rule through the convolution they are the
adjoint of (:func:`conv_transpose`): y = conv_transpose(x, W) gives ⟨δ, y⟩ = ⟨conv(δ, W), x⟩,
so the transposed layer's weight gradient is the weight gradient of conv(·, W) with input
δ and output gradient x, and its bias's is Σ_l δ_bl.

Calls of one layer are concatenated along l (the pixel and sparse forms take single calls
only). ``padding='same'`` and the padding modes other than zeros (reflect, replicate,
circular) pad the captured input as the layer's forward does (the odd unit on the right)
and the rule then sees an unpadded conv. Conv3d takes the ``grouped`` form. Examples go
through in slices whose patches and blocks fit the workspace (the bytes of the layer's
input and δ).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.dispatch import numba_on_cpu
from ...kernels.ghost_linear import cancellation_checked, ghost_linear, gram_cost, workspace_bytes
from ...kernels import acc_dtype, norm_dot
from ..workarounds import row_major
from .conv_costs import (DENSITY_SAMPLE, ELEMENTWISE_COST, FEW_INPUTS, GROUPED_COST, GROUPED_FEW_INPUTS_COST,
                         SHORT_COPY_COST, SHORT_MAC_COST, SHORT_WEIGHT_COST, SPARSE_DELTA_COST,
                         SPARSE_LISTED_COST, SPARSE_MAC_COST, SPARSE_PATCH_COST, SPARSE_PIXEL_COST,
                         SPARSE_WEIGHT_COST)
from .linear import cat_calls
from .registry import bias_term, register_rule

def _padded_first(layer: nn.Module) -> bool:
    """Whether the rule pads the input itself and then sees a convolution without padding:
    ``padding='same'``, or a padding mode other than zeros (the layer's forward pads so)."""
    return layer.padding == "same" or layer.padding_mode != "zeros"


def _numeric_padding(layer: nn.Module) -> tuple[int, ...]:
    """The padding the rule's convolution applies: 0 for 'valid' and where the input is
    padded first (:func:`_padded_first`)."""
    return (0,) * len(layer.kernel_size) if isinstance(layer.padding, str) or _padded_first(layer) \
        else tuple(layer.padding)


def _pre_padded(layer: nn.Module, acts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inputs padded as the layer's forward pads them (:func:`_padded_first`): by its padding
    mode (reflect, replicate, circular) or with zeros, its padding per side, or for 'same'
    dilation·(k − 1) per dimension, the odd unit on the right; other inputs as they are."""
    if not _padded_first(layer):
        return acts
    pad: list[int] = []
    for k, r, p in zip(reversed(layer.kernel_size), reversed(layer.dilation),   # F.pad: last dimension first
                       reversed((0,) * len(layer.kernel_size) if layer.padding == "valid" else layer.padding)):
        total = r * (k - 1) if layer.padding == "same" else 2 * p
        pad += [total // 2, total - total // 2]
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return [F.pad(x, pad, mode=mode) for x in acts]


class _Geometry(NamedTuple):
    """A call as a Conv2d (Conv1d has height 1): zero-padded input size and output size."""

    k: tuple[int, int]
    dil: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]
    Hp: int
    Wp: int
    Ho: int
    Wo: int


def _geometry(layer: nn.Module, shape: torch.Size) -> _Geometry:
    one_d = isinstance(layer, nn.Conv1d)
    k, dil, stride = ((1, *v) if one_d else tuple(v) for v in (layer.kernel_size, layer.dilation, layer.stride))
    pad = (0, *_numeric_padding(layer)) if one_d else _numeric_padding(layer)
    H, W = (1, shape[-1]) if one_d else shape[-2:]
    Hp, Wp = H + 2 * pad[0], W + 2 * pad[1]
    Ho = (Hp - dil[0] * (k[0] - 1) - 1) // stride[0] + 1
    Wo = (Wp - dil[1] * (k[1] - 1) - 1) // stride[1] + 1
    return _Geometry(k, dil, stride, pad, Hp, Wp, Ho, Wo)


def _padded(layer: nn.Module, x: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """The zero-padded input as (B, C, Hp, Wp), contiguous."""
    x = x.unsqueeze(2) if isinstance(layer, nn.Conv1d) else x
    return (F.pad(x, (geo.pad[1], geo.pad[1], geo.pad[0], geo.pad[0])) if any(geo.pad) else x).contiguous()


def _patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """im2col of one call's input as a (B, L, C_in·k) view of a (B, C_in·k, L) tensor, whose
    rows are (channel, kernel offset) in the order of the weight. Made from a strided
    view of the zero-padded input with one copy that reads along the output width."""
    geo = _geometry(layer, x.shape)
    x = _padded(layer, x, geo)
    (kh, kw), (rh, rw), (sh, sw) = geo.k, geo.dil, geo.stride
    B, C = x.shape[:2]
    sB, sC, sH, sW = x.stride()
    view = x.as_strided((B, C, kh, kw, geo.Ho, geo.Wo), (sB, sC, rh * sH, rw * sW, sh * sH, sw * sW))
    return view.reshape(B, C * kh * kw, geo.Ho * geo.Wo).transpose(1, 2)


def plan(layer: nn.Module, geo: _Geometry, calls: int, K: int, cuda: bool = False,
         density: float | None = None) -> str:
    """``"outer"``, ``"gram"``, ``"pixel"``, (not on CUDA, where the outer form's Triton
    kernel keeps per-example gradients in tiles) ``"grouped"``, or, given δ's fraction of
    non-zeros ``density`` (None: the sparse kernel is not available), ``"sparse"``: the
    fewest multiply-adds per example and group."""
    G = layer.groups
    c_in, c_out = layer.in_channels // G, layer.out_channels // G
    k = geo.k[0] * geo.k[1]
    L, N = calls * geo.Ho * geo.Wo, geo.Hp * geo.Wp
    d_in = c_in * k
    # a 1x1, stride-1, unpadded conv's patches are a view of its input
    im2col = 0 if k == 1 and geo.stride == (1, 1) and not any(geo.pad) else ELEMENTWISE_COST * L * d_in
    project = K * L * d_in * c_out                          # one convolution per reference
    cost = {"outer": L * d_in * c_out + K * d_in * c_out + im2col,
            "gram": gram_cost(L, d_in + c_out, cuda) + project + im2col}
    if not cuda:
        rate = GROUPED_FEW_INPUTS_COST if c_in < FEW_INPUTS else GROUPED_COST
        cost["grouped"] = rate * L * d_in * c_out + K * d_in * c_out
    if calls == 1:
        shifts = N * N + geo.Hp ** 2 * geo.Wo ** 2 * geo.k[1] + L * L * (geo.k[0] + 3)
        cost["pixel"] = N * N * c_in + L * L * c_out + ELEMENTWISE_COST * shifts + project
    if calls == 1 and density is not None and not cuda:
        from ...kernels.conv_sparse_numba import LONG_ROW     # numba is loaded: density was measured
        if d_in >= LONG_ROW:
            listed = density * L * c_out
            work = (SPARSE_MAC_COST * listed * d_in + SPARSE_DELTA_COST * L * c_out + SPARSE_LISTED_COST * listed
                    + SPARSE_PATCH_COST * L * k + (SPARSE_WEIGHT_COST + K) * d_in * c_out)
        else:
            work = (SHORT_MAC_COST * L * d_in * c_out + SHORT_COPY_COST * L * d_in
                    + (SHORT_WEIGHT_COST + K) * d_in * c_out)
        cost["sparse"] = work + SPARSE_PIXEL_COST * N * c_in
    return min(cost, key=cost.get)


def _density(layer: nn.Module, acts, grads) -> float | None:
    """δ's fraction of non-zeros (on the first ``DENSITY_SAMPLE`` examples) where the
    sparse form can run: one CPU call, under the numba kernels; else None. Not counted
    for short rows, which the kernel sums densely (their cost does not depend on it)."""
    if len(acts) != 1 or acts[0].is_cuda or not numba_on_cpu():
        return None
    from ...kernels.conv_sparse_numba import LONG_ROW
    if layer.in_channels // layer.groups * math.prod(layer.kernel_size) < LONG_ROW:
        return 1.0
    d = grads[0][:DENSITY_SAMPLE].detach()
    # numpy counts faster than torch's count_nonzero on these small blocks
    nonzero = np.count_nonzero(d.numpy()) if d.dtype in (torch.float32, torch.float64) else int(d.ne(0).sum())
    return nonzero / max(1, d.numel())


def _pixel_sq(layer: nn.Module, x: torch.Tensor, d: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """‖g_b(W)‖² (B,) from the Gram of input pixels, summed over kernel offsets; rows whose
    terms cancel are made again (``kernels.ghost_linear.cancellation_checked``)."""
    acc = acc_dtype(x.dtype)
    (kh, kw), (rh, rw), (sh, sw) = geo.k, geo.dil, geo.stride
    G, Hp, Wp, Ho, Wo = layer.groups, geo.Hp, geo.Wp, geo.Ho, geo.Wo
    B = x.shape[0]
    xg = _padded(layer, x, geo).to(acc).reshape(B * G, layer.in_channels // G, Hp * Wp)
    dg = d.to(acc).reshape(B * G, layer.out_channels // G, Ho * Wo)
    # pixel Gram, as (n, h, h', w, w'): both pixels' rows, then both columns
    P = torch.bmm(xg.transpose(1, 2), xg).view(-1, Hp, Wp, Hp, Wp).permute(0, 1, 3, 2, 4).contiguous()
    n, s1, s2, s3, s4 = P.stride()
    # Σ over column offsets j: P[h, h', w·sw + j·rw, w'·sw + j·rw] -> (n, h, h', w, w')
    P = P.as_strided((B * G, Hp, Hp, kw, Wo, Wo), (n, s1, s2, rw * (s3 + s4), sw * s3, sw * s4)).sum(3)
    n, s1, s2, s3, s4 = P.stride()
    # Σ over row offsets i -> the Gram of patches, (n, t, t', w, w')
    P = P.as_strided((B * G, kh, Ho, Ho, Wo, Wo), (n, rh * (s1 + s2), sh * s1, sh * s2, s3, s4)).sum(1)
    D = torch.bmm(dg.transpose(1, 2), dg).view(-1, Ho, Wo, Ho, Wo).permute(0, 1, 3, 2, 4)
    sq = (P * D).sum((1, 2, 3, 4)).view(B, G).sum(1)
    # each position's own term ‖patch_t‖²‖δ_t‖², (n, t, w) on the Grams' diagonals
    terms = (P.diagonal(0, 1, 2).diagonal(0, 1, 2) * D.diagonal(0, 1, 2).diagonal(0, 1, 2)).sum((1, 2))

    def again(rows: torch.Tensor) -> torch.Tensor:
        if acc == torch.float64:
            return _grouped(layer, [x[rows]], [d[rows]], None)[0]
        return _pixel_sq(layer, x[rows].double(), d[rows].double(), geo)
    return cancellation_checked(sq, terms.view(B, G).sum(1), again)


def _conv_dots(layer: nn.Module, x: torch.Tensor, d: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """⟨g_b(W), V_k⟩ (B, K) = ⟨conv(x_b, V_k), δ_b⟩: one convolution with the K references
    stacked as output channels (group-major, as ``groups`` needs)."""
    acc = acc_dtype(x.dtype)
    B, K, G = x.shape[0], V.shape[0], layer.groups
    d_out = layer.out_channels // G
    w = V.to(acc).reshape(K, G, d_out, *V.shape[2:]).transpose(0, 1).reshape(G * K * d_out, *V.shape[2:])
    conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
    y = conv(x.to(acc), w, None, layer.stride, _numeric_padding(layer), layer.dilation, G)
    return torch.einsum("bgkol,bgol->bk", y.reshape(B, G, K, d_out, -1), d.to(acc).reshape(B, G, d_out, -1))


def _grouped(layer: nn.Module, acts, grads, V: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """‖g_b(W)‖² (b,), ⟨g_b(W), V_k⟩ (b, K) from the per-example gradients (b, P_W), each
    call's made as the weight gradient of one convolution with b·groups groups."""
    acc = acc_dtype(acts[0].dtype)
    b, G = acts[0].shape[0], layer.groups
    weight_grad = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                   3: torch.nn.grad.conv3d_weight}[len(layer.kernel_size)]
    pad = _numeric_padding(layer)
    shape = (b * layer.out_channels, *layer.weight.shape[1:])
    g = None
    for x, d in zip(acts, grads):
        # row-major: with odd strides torch picks a channels_last kernel that refuses its own output
        gi = weight_grad(row_major(x.to(acc)).reshape(1, -1, *x.shape[2:]), shape,
                         row_major(d.to(acc)).reshape(1, -1, *d.shape[2:]), layer.stride, pad, layer.dilation, b * G)
        g = gi if g is None else g.add_(gi)
    return norm_dot(g.reshape(b, -1), None if V is None else V.reshape(V.shape[0], -1))


def _sparse(layer: nn.Module, x: torch.Tensor, d: torch.Tensor, refs, K: int, geo: _Geometry
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's sq (B,), dots (B, K), its bias's share (when scored) included, by the
    numba kernel (over δ's non-zeros for long rows)."""
    from ...kernels.conv_sparse_numba import conv_norm_dot_sparse
    V = refs["weight"] if K else None
    if isinstance(layer, nn.Conv1d):       # as a Conv2d of height 1
        x, d, V = x.unsqueeze(2), d.unsqueeze(2), None if V is None else V.unsqueeze(3)
    return conv_norm_dot_sparse(x, d, V, kernel=geo.k, stride=geo.stride, dilation=geo.dil, padding=geo.pad,
                                groups=layer.groups, bias="bias" in refs, V_bias=refs.get("bias") if K else None)


def _weight_slice(layer: nn.Module, acts, grads, refs, K, form: str, geo: _Geometry, budget: int):
    """The weight's sq (b,), dots (b, K) for a slice of examples."""
    if form == "grouped":
        return _grouped(layer, acts, grads, refs["weight"] if K else None)
    if form == "pixel":
        x, d = acts[0], grads[0]
        sq = _pixel_sq(layer, x, d, geo)
        return sq, (_conv_dots(layer, x, d, refs["weight"]) if K else sq.new_zeros((sq.shape[0], 0)))
    a_all = cat_calls([_patches(layer, x) for x in acts], 1)                         # (b, L, C_in·k)
    d_all = cat_calls([d.reshape(d.shape[0], layer.out_channels, -1) for d in grads], 2)  # (b, C_out, L)
    (b, L, _), G = a_all.shape, layer.groups
    d_in, d_out = a_all.shape[2] // G, layer.out_channels // G
    if G == 1:
        V = refs["weight"].reshape(K, d_out, d_in) if K else None
        return ghost_linear(a_all, d_all.transpose(1, 2), V, form=form, workspace=budget)
    # the groups at once, as b·G linear maps (views of the patches and of δ): no op per group
    a = a_all.reshape(b, L, G, d_in).transpose(1, 2)                                 # (b, G, L, d_in)
    d = d_all.reshape(b, G, d_out, L).transpose(2, 3)                                # (b, G, L, d_out)
    if form == "outer":   # each example's gradient (G, d_out, d_in) is the weight's layout
        acc = acc_dtype(a.dtype)
        g = torch.matmul(d.transpose(2, 3).to(acc), a.to(acc))
        return norm_dot(g.reshape(b, -1), refs["weight"].reshape(K, -1) if K else None)
    sq = ghost_linear(a.reshape(b * G, L, d_in), d.reshape(b * G, L, d_out), None, form=form, workspace=budget)[0]
    sq = sq.view(b, G).sum(1)
    if not K:
        return sq, sq.new_zeros((b, 0))
    return sq, sum(_conv_dots(layer, x, dx, refs["weight"]) for x, dx in zip(acts, grads)).to(sq.dtype)


def _slice_bytes(layer: nn.Module, acts, grads, geo: _Geometry, form: str, K: int) -> int:
    """Bytes of one example's transient blocks: its im2col patches and whole per-example
    gradient (outer and grouped forms), or its patches, the (L, L) Grams of one group and,
    with several groups, the references' convolutions (Gram form), or, in the pixel form,
    its pixel Grams and reference convolutions (the sparse form's buffers are per thread,
    and it takes the batch at once)."""
    G, L = layer.groups, geo.Ho * geo.Wo * len(acts)
    d_in, d_out = layer.in_channels // G * math.prod(layer.kernel_size), layer.out_channels // G
    patches = sum(x[0].numel() for x in acts) * math.prod(layer.kernel_size)
    N = geo.Hp * geo.Wp
    dots = K * layer.out_channels * L if G > 1 else 0
    elements = {"outer": patches + G * d_in * d_out, "gram": patches + 2 * L * L + dots,
                # oneDNN im2cols the input inside the call; plus the running sum over calls
                "grouped": patches + min(2, len(acts)) * G * d_in * d_out,
                "pixel": G * (2 * N * N + geo.Hp ** 2 * geo.Wo ** 2 + 3 * L * L) + K * layer.out_channels * L}[form]
    return elements * torch.finfo(acc_dtype(acts[0].dtype)).bits // 8


def _conv3d(layer: nn.Conv3d, acts, grads, refs, K):
    """Conv3d: the bias's share and the grouped form, in slices of the workspace."""
    B = acts[0].shape[0]
    sq, dots = bias_term(cat_calls([d.reshape(B, layer.out_channels, -1) for d in grads], 2).sum(2), refs, K)
    if "weight" not in refs:
        return sq, dots
    patches = sum(x[0].numel() for x in acts) * math.prod(layer.kernel_size)
    per_example = (patches + 2 * layer.weight.numel()) * torch.finfo(acc_dtype(acts[0].dtype)).bits // 8
    step = max(1, workspace_bytes(*acts, *grads) // per_example)
    parts = [_grouped(layer, [x[i:i + step] for x in acts], [d[i:i + step] for d in grads],
                      refs["weight"] if K else None) for i in range(0, B, step)]
    return sq + torch.cat([p[0] for p in parts]), dots + torch.cat([p[1] for p in parts])


def conv_sketch(layer: nn.Module, acts, grads, p_out: torch.Tensor, p_in: torch.Tensor) -> torch.Tensor:
    """P_out g_b P_inᵀ (B, k_out, k_in) of the weight viewed as (C_out, C_in/groups·k):
    Σ_l (P_out δ_bl)(P_in a_bl)ᵀ per group, P_in applied to the patches as one grouped
    convolution of the input by P_in reshaped to filters (no im2col)."""
    conv_nd = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(layer.kernel_size)]
    g, k_out, k_in = layer.groups, p_out.shape[0], p_in.shape[0]
    filters = p_in.reshape(k_in, layer.in_channels // g, *layer.kernel_size)
    filters = filters.repeat(g, *(1,) * (filters.dim() - 1))
    left = p_out.reshape(k_out, g, layer.out_channels // g)
    total = None
    for x, d in zip(_pre_padded(layer, acts), grads):   # the calls add up
        B = x.shape[0]
        r = conv_nd(x.to(p_in.dtype), filters, stride=layer.stride, padding=_numeric_padding(layer),
                    dilation=layer.dilation, groups=g).reshape(B, g, k_in, -1)
        l = torch.einsum("kgc,bgcl->bgkl", left, d.to(p_out.dtype).reshape(B, g, layer.out_channels // g, -1))
        s = torch.einsum("bgkl,bgjl->bkj", l, r)
        total = s if total is None else total + s
    return total


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, sketch=conv_sketch)
def conv(layer: nn.Module, acts, grads, refs, K):
    acts = _pre_padded(layer, acts)
    if isinstance(layer, nn.Conv3d):
        return _conv3d(layer, acts, grads, refs, K)
    B = acts[0].shape[0]
    geo = _geometry(layer, acts[0].shape)
    form = "weight" in refs and plan(layer, geo, len(acts), K, acts[0].is_cuda, _density(layer, acts, grads))
    if form == "sparse":        # the kernel adds the bias's share, and its buffers are per thread
        return _sparse(layer, acts[0], grads[0], refs, K, geo)
    sq, dots = bias_term(cat_calls([d.reshape(B, layer.out_channels, -1) for d in grads], 2).sum(2), refs, K)
    if not form:
        return sq, dots
    budget = workspace_bytes(*acts, *grads)
    step = max(1, budget // _slice_bytes(layer, acts, grads, geo, form, K))
    parts = [_weight_slice(layer, [x[i:i + step] for x in acts], [d[i:i + step] for d in grads], refs, K, form, geo,
                           budget) for i in range(0, B, step)]
    return sq + torch.cat([p[0] for p in parts]), dots + torch.cat([p[1] for p in parts])


def _transpose_supports(layer: nn.Module) -> str | None:
    """Why the adjoint convolution of a transposed layer would not give its gradient: an
    output padding of a stride or more (allowed with a larger dilation) makes that
    convolution's output longer than the layer's input."""
    if any(op >= st for op, st in zip(layer.output_padding, layer.stride)):
        return (f"output_padding {tuple(layer.output_padding)} reaches the stride {tuple(layer.stride)}: the adjoint "
                f"convolution's output is longer than the input")
    return None


def _adjoint_conv(layer: nn.Module) -> nn.Module:
    """The convolution ``layer`` (a ConvTransposeNd) is the adjoint of, with no weights
    (meta device): C_out → C_in channels, whose weight (C_in, C_out/groups, *k) is shaped
    as the transposed layer's."""
    conv_nd = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(layer.kernel_size)]
    return conv_nd(layer.out_channels, layer.in_channels, layer.kernel_size, stride=layer.stride,
                   padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=False,
                   device="meta", dtype=layer.weight.dtype)


def conv_transpose_sketch(layer: nn.Module, acts, grads, p_out: torch.Tensor, p_in: torch.Tensor) -> torch.Tensor:
    """P_out g_b P_inᵀ of the weight viewed as (C_in, C_out/groups·k): :func:`conv_sketch`
    of the adjoint convolution, input and output gradient swapped."""
    return conv_sketch(_adjoint_conv(layer), grads, acts, p_out, p_in)


@register_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, supports=_transpose_supports,
               sketch=conv_transpose_sketch)
def conv_transpose(layer: nn.Module, acts, grads, refs, K):
    """The bias's share from δ; the weight's from :func:`conv` on the adjoint convolution,
    its input and output gradient swapped (δ in, x out)."""
    B = grads[0].shape[0]
    sq, dots = bias_term(cat_calls([d.reshape(B, layer.out_channels, -1) for d in grads], 2).sum(2), refs, K)
    if "weight" not in refs:
        return sq, dots
    w_sq, w_dots = conv(_adjoint_conv(layer), grads, acts, {"weight": refs["weight"]}, K)
    return sq + w_sq, dots + w_dots
