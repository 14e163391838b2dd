"""Ghost rule for ``nn.RNN``, ``nn.GRU`` and ``nn.LSTM`` (any number of layers, either
direction, with or without biases, batch-first or not, padded or packed input, a given
initial state or none).

Per layer and direction, the gates are gi_t + gh_t with gi_t = W_ih x_t + b_ih and
gh_t = W_hh h_{t−1} + b_hh, so each weight's per-example gradient is a sequence-Linear
form (:mod:`.linear`): g_b(W_ih) = Σ_t δgi_bt x_btᵀ, g_b(W_hh) = Σ_t δgh_bt h_b,t−1ᵀ, and
the biases' are Σ_t δgi_bt and Σ_t δgh_bt. The rule has the layer's call and the output
gradients of its output and final states (any of which the loss may use). Every h_t
comes from the call's own output (the last layer, where the model did not change it in
place after the call) or from torch's own kernel run again without gradient (the layers
below); the gates of all steps then come in a few batched ops, and a hand-written
backpropagation through time, one short loop of a matmul and a few small ops per step,
gives every δgi (:func:`_direction`, with the cells' equations as torch documents them,
in the accumulation dtype): one extra forward and backward of this layer, nothing of
the rest of the model. δgh is δgi, but for the GRU's new gate, which reads r ⊙ gh_n:
there δgh_n = r ⊙ δgi_n. An LSTM with ``proj_size`` P has h_t = W_hr m_t, m_t = o_t ⊙
tanh(c_t) (hidden size H, state P): W_hr's per-example gradient is the sequence-Linear
form Σ_t δh_bt m_btᵀ, δh_t the full gradient of h_t that the loop carries. A packed input
runs packed, each sequence's state held past its end (forward) or before its start
(reverse), as the packed kernels do. Dropout between layers in training mode falls back
(its masks are drawn inside the kernel).

``nn.RNNCell``, ``nn.GRUCell`` and ``nn.LSTMCell``, called once per step in the model's
own loop, take the same rule one call at a time: autograd has already carried the
recurrent gradient to each call's output (and cell state), so each call is one step with
nothing to carry, its δgi and δgh from :func:`_direction` on T = 1, and the calls are
the steps of the sequence-Linear forms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import _VF, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ...kernels import acc_dtype
from .linear import weight_and_bias
from .registry import kernel_dropout, register_rule


def _supports(m: nn.RNNBase) -> str | None:
    return kernel_dropout(m)


def _final_state(output):
    """h_n, whose batch is in dimension 1 whatever the input's layout."""
    state = output[1]
    return state[0] if isinstance(state, tuple) else state


def _padded(layer: nn.RNNBase, x, acc) -> tuple[torch.Tensor, torch.Tensor]:
    """The input as (T, B, d) sequence-first, padded, and the lengths (B,)."""
    if isinstance(x, PackedSequence):
        x, lengths = pad_packed_sequence(x)
        return x.to(acc), lengths.to(x.device)
    x = x.transpose(0, 1) if layer.batch_first else x
    return x.to(acc), torch.full((x.shape[1],), x.shape[0], device=x.device)


def _as_padded(layer: nn.RNNBase, x, d: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """The output gradient in the replay's layout (T, B, H·D)."""
    if d is None:
        return None
    if isinstance(x, PackedSequence):
        return pad_packed_sequence(PackedSequence(d, x.batch_sizes, x.sorted_indices, x.unsorted_indices),
                                   total_length=T)[0]
    return d.transpose(0, 1) if layer.batch_first else d


def _layer_output(layer: nn.RNNBase, k: int, x: torch.Tensor, hx, lengths: torch.Tensor | None,
                  acc) -> torch.Tensor:
    """Layer k's output (T, B, H·D) on its input x (T, B, d), by the kernel the layer's
    forward calls (``torch._VF.lstm``, …, looked up now: :mod:`..workarounds` may have
    replaced it) in ``acc``; with ``lengths``, packed, so each sequence's state holds past
    its end and its output there is zero. hx: the layer's (h0, c0) or h0, each (D, B, H)."""
    names = [n for n in layer._flat_weights_names if n.rsplit("_l", 1)[1].split("_")[0] == str(k)]
    weights = [getattr(layer, n).detach().to(acc) for n in names]
    kernel, D = getattr(_VF, layer.mode.lower()), 2 if layer.bidirectional else 1
    if lengths is None:
        return kernel(x, hx, weights, layer.bias, 1, 0.0, False, D == 2, False)[0]
    packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
    order = packed.sorted_indices
    hx = tuple(h[:, order] for h in hx) if isinstance(hx, tuple) else hx[:, order]
    out = kernel(packed.data, packed.batch_sizes, hx, weights, layer.bias, 1, 0.0, False, D == 2)[0]
    return pad_packed_sequence(packed._replace(data=out), total_length=x.shape[0])[0]


def _ends(d_final: torch.Tensor | None, lengths: torch.Tensor, reverse: bool, T: int) -> torch.Tensor | None:
    """A final state's gradient (B, H) put at the step that made the state: each sequence's
    last step, or step 0 in reverse; (T, B, H), or None."""
    if d_final is None:
        return None
    out = d_final.new_zeros(T, *d_final.shape)
    steps = torch.zeros_like(lengths) if reverse else lengths - 1
    out[steps, torch.arange(len(lengths), device=out.device)] = d_final
    return out


def _direction(mode: str, x, out, h0, c0, w_ih, w_hh, b_ih, b_hh, d_out, d_h, d_c, lengths, valid, reverse,
               w_hr=None):
    """One layer and direction's (δgi, h_prev, δgh, projection), each (T, B, ·), by
    hand-written backpropagation through time: every quantity of the forward comes in one
    batched op from torch's own outputs ``out`` (T, B, H, or P with a projection), then one
    short loop carries the recurrent gradient. x: its input (T, B, d); h0: (B, H or P), c0:
    (B, H); d_out: the gradient of ``out``; d_h, d_c: of the final states or None; lengths:
    (B,) the sequences' lengths; valid: (T, B) the steps inside each sequence, or None
    (all); w_hr: an LSTM's projection (P, H), whose (m, δh) (T, B, H) and (T, B, P) are the
    fourth item (else None)."""
    T = x.shape[0]
    if reverse:   # the step before t is t + 1; at each sequence's end it is the initial state
        prev = torch.cat([out[1:], h0[None]])
        if valid is not None:
            prev = torch.where(torch.cat([valid[1:], torch.zeros_like(valid[:1])])[..., None], prev, h0)
    else:
        prev = torch.cat([h0[None], out[:-1]])
    d_out = d_out if d_h is None else d_out + _ends(d_h, lengths, reverse, T)
    order = range(T) if reverse else range(T - 1, -1, -1)   # the backward's order: the forward's reversed
    # no δ at steps past a sequence's end: there its δ's coefficients are zeroed. In reverse,
    # what the loop carries on from the sequence's first step (δh0) reaches only such steps
    mask = None if valid is None else valid[..., None].to(x.dtype)
    if mode == "LSTM":
        d_gi, projection = _lstm(x, out, prev, c0, w_ih, w_hh, b_ih, b_hh, d_out, _ends(d_c, lengths, reverse, T),
                                 valid, mask, order, reverse, w_hr)
        return d_gi, prev, d_gi, projection
    if mode == "GRU":
        return (*_gru(x, prev, w_ih, w_hh, b_ih, b_hh, d_out, mask, order), None)
    P = 1 - out * out if mode == "RNN_TANH" else (out > 0).to(x.dtype)   # h = relu(a) > 0 where a > 0
    if mask is not None:
        P.mul_(mask)
    DA, carry = torch.empty_like(P), torch.zeros_like(h0)
    for t in order:
        carry = torch.mul(d_out[t] + carry, P[t], out=DA[t]) @ w_hh
    return DA, prev, DA, None


def _lstm(x, out, prev, c0, w_ih, w_hh, b_ih, b_hh, d_out, d_c_end, valid, mask, order, reverse, w_hr=None
          ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The LSTM's δgi (T, B, 4H): the gates i, f, g, o of every step, then per step
    δh = d_out + δgates_{next} W_hh, δm = δh (W_hr with a projection, h = W_hr m; else m = h),
    δc = δm ⊙ o ⊙ (1 − tanh²c) + δc_{next} ⊙ f_{next} and δgates = (δc, δc, δc, δm) ⊙ P, P
    the gates' local derivatives (computed in place where they can be, for peak memory; the
    loop turns P into δgates in place). out: the layer's h_t (T, B, H or P); d_c_end: the
    final cell state's gradient at its step, or None. With ``w_hr`` (P, H), also (m, δh)."""
    T, B, H = d_out.shape[0], d_out.shape[1], c0.shape[-1]
    s = _gates(x, prev, w_ih, w_hh, b_ih, b_hh)
    g = s[..., 2 * H:3 * H].tanh()
    s.sigmoid_()                                                # i, f, o (its g part unused)
    i, f, o = s[..., :H], s[..., H:2 * H], s[..., 3 * H:]
    c = _cell_states(f, i * g, c0, valid if reverse else None, reverse)
    c_prev = torch.cat([c[1:], c0[None]]) if reverse else torch.cat([c0[None], c[:-1]])
    P = s.new_empty(T, B, 4, H)
    torch.mul(g, i * (1 - i), out=P[:, :, 0])
    torch.mul(c_prev, f * (1 - f), out=P[:, :, 1])
    torch.mul(i, 1 - g * g, out=P[:, :, 2])
    del c_prev
    # tanh(c_t) = h_t / o_t from the layer's output, in place of a tanh (this CPU's slowest op
    # here). Where o_t underflows to 0, h_t is 0 too and both terms below are 0, as they should be.
    # With a projection h_t is W_hr m_t: tanh(c_t) itself (in c's place), and m_t = o_t ⊙ tanh(c_t)
    if w_hr is None:
        del c
        tc, m = out / o.clamp_min(torch.finfo(o.dtype).tiny), None
    else:
        tc = c.tanh_()
        m = o * tc
    torch.mul(tc, o * (1 - o), out=P[:, :, 3])
    A = o * (1 - tc * tc)                                       # ∂m/∂c
    f = f.contiguous()
    del s, g, i, o, tc
    if mask is not None:
        P.mul_(mask[..., None])
    DH = None if w_hr is None else torch.empty_like(d_out)
    carry_h, carry_c = torch.zeros_like(d_out[0]), torch.zeros_like(c0)
    for t in order:
        dh = torch.add(d_out[t], carry_h, out=None if DH is None else DH[t])
        dm = dh if w_hr is None else dh @ w_hr
        dc = torch.addcmul(carry_c if d_c_end is None else carry_c + d_c_end[t], dm, A[t])
        gates = P[t]                                 # (B, 4, H), made δgates_t in place
        gates[:, :3].mul_(dc[:, None])
        gates[:, 3].mul_(dm)
        carry_h = gates.view(B, 4 * H) @ w_hh
        carry_c = dc * f[t]
    if DH is not None and mask is not None:   # no step past a sequence's end was computed
        DH.mul_(mask)
    return P.flatten(2), None if w_hr is None else (m, DH)


def _gru(x, prev, w_ih, w_hh, b_ih, b_hh, d_out, mask, order) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GRU's (δgi, h_prev, δgh), each (T, B, ·): r, z, n of every step, then per step
    δh = d_out + δh_{next} ⊙ z_{next} + δgh_{next} W_hh, with δgi = δh ⊙ P and
    δgh = δh ⊙ Q (P and Q the gates' local derivatives; they differ in the new gate,
    which reads r ⊙ gh_n)."""
    T, B, H = d_out.shape
    gi, gh = F.linear(x, w_ih, b_ih), F.linear(prev, w_hh, b_hh)
    r = (gi[..., :H] + gh[..., :H]).sigmoid_()
    z = (gi[..., H:2 * H] + gh[..., H:2 * H]).sigmoid_()
    n = torch.addcmul(gi[..., 2 * H:], r, gh[..., 2 * H:]).tanh_()
    P, Q = gi.new_empty(T, B, 3, H), gi.new_empty(T, B, 3, H)
    torch.mul(1 - z, 1 - n * n, out=P[:, :, 2])
    torch.mul(P[:, :, 2], gh[..., 2 * H:] * r * (1 - r), out=P[:, :, 0])
    torch.mul(prev - n, z * (1 - z), out=P[:, :, 1])
    Q[:, :, :2] = P[:, :, :2]
    torch.mul(P[:, :, 2], r, out=Q[:, :, 2])
    del gi, gh, r, n
    if mask is not None:
        P.mul_(mask[..., None])
        Q.mul_(mask[..., None])
    DH, carry = torch.empty_like(z), torch.zeros_like(z[0])
    for t in order:
        dh = torch.add(d_out[t], carry, out=DH[t])
        carry = torch.addmm(dh * z[t], Q[t].mul_(dh[:, None]).view(B, 3 * H), w_hh)   # Q[t] made δgh_t
    return P.mul_(DH[:, :, None]).flatten(2), prev, Q.flatten(2)


def _gates(x: torch.Tensor, prev: torch.Tensor, w_ih, w_hh, b_ih, b_hh) -> torch.Tensor:
    """gi + gh = W_ih x_t + b_ih + W_hh h_{t−1} + b_hh for every step: (T, B, G)."""
    rows = x.reshape(-1, x.shape[-1])
    gates = rows @ w_ih.t() if b_ih is None else torch.addmm(b_ih + b_hh, rows, w_ih.t())   # (T·B, G), its own
    return gates.addmm_(prev.reshape(-1, prev.shape[-1]), w_hh.t()).view(*x.shape[:-1], -1)


def _cell_states(f: torch.Tensor, ig: torch.Tensor, c0: torch.Tensor, valid: torch.Tensor | None,
                 reverse: bool) -> torch.Tensor:
    """The LSTM's cell states c_t = f_t c_{t−1} + i_t g_t (T, B, H), from c0 (B, H); in
    reverse, c_{t+1} comes before c_t, and with ``valid`` a sequence's steps past its end
    hold c0, so that its last step starts from it."""
    C, c = torch.empty_like(f), c0
    for t in (range(f.shape[0] - 1, -1, -1) if reverse else range(f.shape[0])):
        c = torch.addcmul(ig[t], f[t], c, out=C[t])
        if valid is not None:
            c = C[t] = torch.where(valid[t, :, None], c, c0)
    return C


def _replay(layer: nn.RNNBase, call, output, delta, acc):
    """{(layer k, direction): (x, δgi, h_prev, δgh, projection)}, each (B, T, ·), for one
    call (projection: an LSTM's (m, δh) with ``proj_size``, else None): each
    layer's outputs (the last one's is the call's ``output``, if still what the call
    returned and in ``acc``; else from torch's kernel, as those below it), then its
    gradients from the last layer back."""
    args, kwargs = call
    bound = dict(zip(("input", "hx"), args)) | kwargs
    x_in, hx = bound["input"], bound.get("hx")
    X, lengths = _padded(layer, x_in, acc)
    T, B = X.shape[:2]
    D, H, lstm = 2 if layer.bidirectional else 1, layer.hidden_size, layer.mode == "LSTM"
    S = layer.proj_size or H   # the state h_t's size (a projected LSTM's P)
    if hx is None:
        h0, c0 = X.new_zeros(layer.num_layers * D, B, S), X.new_zeros(layer.num_layers * D, B, H)
    else:
        h0, c0 = (hx if lstm else (hx, None))
        h0, c0 = h0.to(acc), None if c0 is None else c0.to(acc)
    ragged = bool((lengths < T).any())
    valid = (torch.arange(T, device=X.device).unsqueeze(1) < lengths.unsqueeze(0)) if ragged else None   # (T, B)
    with torch.no_grad():
        inputs = [X]
        given = output[0][0] if isinstance(output[0], tuple) else output[0]   # packed: its data
        given = _as_padded(layer, x_in, given, T) if given is not None and given.dtype == acc else None
        for k in range(layer.num_layers):
            part = slice(k * D, (k + 1) * D)
            inputs.append(given if k == layer.num_layers - 1 and given is not None else _layer_output(
                layer, k, inputs[-1], (h0[part], c0[part]) if lstm else h0[part], lengths if ragged else None, acc))
        d_out, d_state = delta
        d_h, d_c = (d_state if lstm else (d_state, None)) if d_state is not None else (None, None)
        d_out = _as_padded(layer, x_in, d_out[0] if isinstance(d_out, tuple) else d_out, T)   # packed: its data
        d_out = inputs[-1].new_zeros(inputs[-1].shape) if d_out is None else d_out.to(acc)
        batch = lambda t: t.transpose(0, 1)                                # noqa: E731  (T, B, .) -> (B, T, .)
        result = {}
        for k in range(layer.num_layers - 1, -1, -1):
            x, d_x = inputs[k], None
            for d in range(D):
                sfx = f"_l{k}" + ("_reverse" if d else "")
                w_ih, w_hh = (getattr(layer, f"weight_{n}{sfx}").detach().to(acc) for n in ("ih", "hh"))
                b_ih, b_hh = ((getattr(layer, f"bias_{n}{sfx}").detach().to(acc) if layer.bias else None)
                              for n in ("ih", "hh"))
                w_hr = getattr(layer, f"weight_hr{sfx}").detach().to(acc) if layer.proj_size else None
                j, cols = k * D + d, slice(d * S, (d + 1) * S)
                d_gi, prev, d_gh, projection = _direction(
                    layer.mode, x, inputs[k + 1][..., cols], h0[j], c0[j] if lstm else None, w_ih, w_hh, b_ih, b_hh,
                    d_out[..., cols], None if d_h is None else d_h[j].to(acc),
                    None if d_c is None else d_c[j].to(acc), lengths, valid, reverse=d == 1, w_hr=w_hr)
                result[(k, d)] = (batch(x), batch(d_gi), batch(prev), batch(d_gh),
                                  None if projection is None else tuple(map(batch, projection)))
                if k:   # the gradient of the layer below's output
                    d_x = d_gi @ w_ih if d_x is None else d_x + d_gi @ w_ih
            d_out = d_x
    return dict(sorted(result.items()))


def _cell_mode(cell: nn.RNNCellBase) -> str:
    """The cell's equations, by the name :func:`_direction` knows them."""
    if isinstance(cell, nn.LSTMCell):
        return "LSTM"
    if isinstance(cell, nn.GRUCell):
        return "GRU"
    return "RNN_TANH" if cell.nonlinearity == "tanh" else "RNN_RELU"


def _cell_step(cell: nn.RNNCellBase, call, output, delta, acc):
    """One call's (x, δgi, h_prev, δgh), each (B, ·): the call as one step of
    :func:`_direction`. Its new state comes from the call's output where the model did not
    change it in place since (and it is in ``acc``), else from torch's cell kernel again."""
    (args, kwargs), mode = call, _cell_mode(cell)
    bound = dict(zip(("input", "hx"), args)) | kwargs
    x, hx, lstm = bound["input"].to(acc), bound.get("hx"), mode == "LSTM"
    zeros = x.new_zeros(x.shape[0], cell.hidden_size)
    h, c = (zeros, zeros) if hx is None else hx if lstm else (hx, None)
    h, c = h.to(acc), None if c is None else c.to(acc)
    w_ih, w_hh = cell.weight_ih.detach().to(acc), cell.weight_hh.detach().to(acc)
    b_ih, b_hh = ((cell.bias_ih.detach().to(acc), cell.bias_hh.detach().to(acc)) if cell.bias else (None, None))
    with torch.no_grad():
        new = output[0] if lstm else output
        if new is None or new.dtype != acc:
            kernel = getattr(_VF, {"LSTM": "lstm_cell", "GRU": "gru_cell", "RNN_TANH": "rnn_tanh_cell",
                                   "RNN_RELU": "rnn_relu_cell"}[mode])
            new = kernel(x, (h, c) if lstm else h, w_ih, w_hh, b_ih, b_hh)
            new = new[0] if lstm else new
        d_h, d_c = delta if lstm else (delta, None)
        d_h = zeros if d_h is None else d_h.to(acc)
        d_gi, _, d_gh, _ = _direction(mode, x[None], new[None], h, c, w_ih, w_hh, b_ih, b_hh, d_h[None], None,
                                      None if d_c is None else d_c.to(acc),
                                      torch.ones(x.shape[0], dtype=torch.long, device=x.device), None, reverse=False)
    return x, d_gi[0], h, d_gh[0], None


@register_rule(nn.RNN, nn.GRU, nn.LSTM, supports=_supports, call=True, probe_all=True,
               output_item=_final_state, batch_dims=(1,), params=lambda m: m._flat_weights_names)
def recurrent(layer: nn.RNNBase, calls, grads, refs, K):
    acc = acc_dtype(next(d for g in grads for d in _leaves(g)).dtype)
    per_param: dict[tuple, tuple[list, list]] = {}
    for (call, output), delta in zip(calls, grads):
        for (k, d), step in _replay(layer, call, output, delta, acc).items():
            _collect(per_param, f"_l{k}" + ("_reverse" if d else ""), *step)
    return _sums(per_param, refs, K)


@register_rule(nn.RNNCell, nn.GRUCell, nn.LSTMCell, call=True, probe_all=True, output_item=0,
               params=("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
def cell(layer: nn.RNNCellBase, calls, grads, refs, K):
    acc = acc_dtype(next(d for g in grads for d in _leaves(g)).dtype)
    per_param: dict[tuple, tuple[list, list]] = {}
    for (call, output), delta in zip(calls, grads):
        _collect(per_param, "", *_cell_step(layer, call, output, delta, acc))
    return _sums(per_param, refs, K)


def _collect(per_param: dict, sfx: str, x, d_gi, h_prev, d_gh, projection) -> None:
    """Add one call's inputs and gate gradients, each (B, [T,] ·), to the weights ``*_ih{sfx}``
    and ``*_hh{sfx}``, and a projected LSTM's (m, δh) to ``weight_hr{sfx}``."""
    for part, a, g in (("ih", x, d_gi), ("hh", h_prev, d_gh), ("hr", *(projection or (None, None)))):
        if a is None:
            continue
        acts, ds = per_param.setdefault((part, sfx), ([], []))
        acts.append(a)
        ds.append(g)


def _sums(per_param: dict, refs, K):
    """sq (B,), dots (B, K): each weight's calls as the sequence-Linear form (:func:`.linear.weight_and_bias`)."""
    sq = dots = None
    for (part, sfx), (acts, ds) in per_param.items():
        sub = {local: refs[f"{kind}_{part}{sfx}"] for local, kind in (("weight", "weight"), ("bias", "bias"))
               if f"{kind}_{part}{sfx}" in refs}
        if not sub:
            continue
        s, d = weight_and_bias(acts, ds, sub, K)
        sq, dots = (s, d) if sq is None else (sq + s, dots + d)
    if sq is None:
        B = acts[0].shape[0]
        return acts[0].new_zeros(B), acts[0].new_zeros((B, K))
    return sq, dots


def _leaves(structure):
    """The tensors in a nested tuple, in order."""
    if isinstance(structure, torch.Tensor):
        return [structure]
    if isinstance(structure, tuple):
        return [t for s in structure for t in _leaves(s)]
    return []
