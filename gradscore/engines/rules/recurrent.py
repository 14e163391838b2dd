"""Ghost rule for ``nn.RNN``, ``nn.GRU`` and ``nn.LSTM`` (any number of layers, either
direction, with or without biases, batch-first or not, padded or packed input, a given
initial state or none).

Per layer and direction, the gates are gi_t + gh_t with gi_t = W_ih x_t + b_ih and
gh_t = W_hh h_{t−1} + b_hh, so each weight's per-example gradient is a sequence-Linear
form (:mod:`.linear`): g_b(W_ih) = Σ_t δgi_bt x_btᵀ, g_b(W_hh) = Σ_t δgh_bt h_b,t−1ᵀ, and
the biases' are Σ_t δgi_bt and Σ_t δgh_bt. The rule has the layer's call and the output
gradients of its output and final states (any of which the loss may use); it replays
the recurrence alone, in the accumulation dtype, with the cells' equations as torch
documents them, and one backward of that replay gives every δgi and h: one extra
forward and backward of this layer, nothing of the rest of the model. δgh is δgi, but
for the GRU's new gate (:func:`_gh_grad`). A packed input
is replayed padded, each sequence's state held past its end (forward) or before its
start (reverse), as the packed kernels do. ``proj_size`` falls back, and so does dropout
between layers in training mode (its masks are drawn inside the kernel).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from ...kernels import acc_dtype
from .linear import weight_and_bias
from .registry import kernel_dropout, register_rule


def _supports(m: nn.RNNBase) -> str | None:
    if getattr(m, "proj_size", 0):
        return "LSTM with proj_size"
    return kernel_dropout(m)


def _final_state(output):
    """h_n, whose batch is in dimension 1 whatever the input's layout."""
    state = output[1]
    return state[0] if isinstance(state, tuple) else state


def _cell(mode: str, gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None):
    """One step of the cell from its two gate pre-activations: (h', c')."""
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        (ir, iz, in_), (hr, hz, hn) = gi.chunk(3, -1), gh.chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * h, None
    return (torch.tanh if mode == "RNN_TANH" else torch.relu)(gi + gh), None


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


def _replay(layer: nn.RNNBase, call, delta, acc):
    """{(layer k, direction): (x, δgi, h_prev, δgh)}, each (B, T, ·), for one call."""
    args, kwargs = call
    bound = dict(zip(("input", "hx"), args)) | kwargs
    x_in, hx = bound["input"], bound.get("hx")
    X, lengths = _padded(layer, x_in, acc)
    T, B = X.shape[:2]
    D, H, lstm = 2 if layer.bidirectional else 1, layer.hidden_size, layer.mode == "LSTM"
    if hx is None:
        h0 = c0 = X.new_zeros(layer.num_layers * D, B, H)
    else:
        h0, c0 = (hx if lstm else (hx, None))
        h0, c0 = h0.to(acc), None if c0 is None else c0.to(acc)
    ragged = bool((lengths < T).any())
    steps = torch.arange(T, device=X.device).unsqueeze(1) < lengths.unsqueeze(0)   # (T, B)
    saved, outs, finals, grads_in = {}, [], [], []
    with torch.enable_grad():
        inp = X
        for k in range(layer.num_layers):
            per_dir = []
            for d in range(D):
                sfx = f"_l{k}" + ("_reverse" if d else "")
                w_ih, w_hh = (getattr(layer, f"weight_{n}{sfx}").detach().to(acc) for n in ("ih", "hh"))
                b_ih, b_hh = ((getattr(layer, f"bias_{n}{sfx}").detach().to(acc) if layer.bias else None)
                              for n in ("ih", "hh"))
                gi = torch.nn.functional.linear(inp, w_ih, b_ih)
                if not gi.requires_grad:
                    gi = gi.detach().requires_grad_()
                h = h0[k * D + d]
                c = c0[k * D + d] if lstm else None
                hs, ghs, prev = [None] * T, [None] * T, [None] * T
                for t in (range(T - 1, -1, -1) if d else range(T)):
                    prev[t] = h
                    gh = torch.nn.functional.linear(h, w_hh, b_hh)
                    ghs[t] = gh
                    h_new, c_new = _cell(layer.mode, gi[t], gh, h, c)
                    if ragged:   # past a sequence's end the state holds and the output is zero
                        m = steps[t].unsqueeze(1).to(acc)
                        h_new, c_new = m * h_new + (1 - m) * h, None if c is None else m * c_new + (1 - m) * c
                    hs[t] = h_new if not ragged else h_new * steps[t].unsqueeze(1).to(acc)
                    h, c = h_new, c_new
                per_dir.append(torch.stack(hs))
                finals.append((h, c))
                saved[(k, d)] = (inp, gi, prev, ghs)
            inp = torch.cat(per_dir, -1) if D == 2 else per_dir[0]
        outs = inp
        d_out, d_state = delta
        d_h, d_c = (d_state if lstm else (d_state, None)) if d_state is not None else (None, None)
        targets, grads_in = [], []
        d_out = _as_padded(layer, x_in, d_out[0] if isinstance(d_out, tuple) else d_out, T)   # packed: its data
        if d_out is not None:
            targets.append(outs)
            grads_in.append(d_out.to(acc))
        for i, (h, c) in enumerate(finals):
            if d_h is not None:
                targets.append(h)
                grads_in.append(d_h[i].to(acc))
            if d_c is not None:
                targets.append(c)
                grads_in.append(d_c[i].to(acc))
        found = torch.autograd.grad(targets, [gi for _, gi, _, _ in saved.values()], grads_in, allow_unused=True)
    batch = lambda t: t.transpose(0, 1)                                    # noqa: E731  (T, B, .) -> (B, T, .)
    result = {}
    for (key, (inp, gi, prev, ghs)), d_gi in zip(saved.items(), found):
        d_gi = torch.zeros_like(gi) if d_gi is None else d_gi
        result[key] = (batch(inp.detach()), batch(d_gi), batch(torch.stack(prev).detach()),
                       batch(_gh_grad(layer.mode, gi.detach(), ghs, d_gi)))
    return result


def _gh_grad(mode: str, gi: torch.Tensor, ghs: list[torch.Tensor], d_gi: torch.Tensor) -> torch.Tensor:
    """δgh (T, B, G·H) from δgi: the gates are gi + gh, so the same, but for the GRU's new
    gate, which reads r ⊙ gh_n: there δgh_n = r ⊙ δgi_n, r = σ(gi_r + gh_r) (ghs: gh per step)."""
    if mode != "GRU":
        return d_gi
    H = gi.shape[-1] // 3
    r = torch.sigmoid(gi[..., :H] + torch.stack([gh[..., :H] for gh in ghs]).detach())
    return torch.cat([d_gi[..., :2 * H], r * d_gi[..., 2 * H:]], -1)


@register_rule(nn.RNN, nn.GRU, nn.LSTM, supports=_supports, call=True, probe_all=True,
               output_item=_final_state, batch_dims=(1,), params=lambda m: m._flat_weights_names)
def recurrent(layer: nn.RNNBase, calls, grads, refs, K):
    acc = acc_dtype(next(d for g in grads for d in _leaves(g)).dtype)
    per_param: dict[tuple, tuple[list, list]] = {}
    for call, delta in zip(calls, grads):
        for (k, d), (x, d_gi, h_prev, d_gh) in _replay(layer, call, delta, acc).items():
            sfx = f"_l{k}" + ("_reverse" if d else "")
            for part, a, g in (("ih", x, d_gi), ("hh", h_prev, d_gh)):
                acts, ds = per_param.setdefault((part, sfx), ([], []))
                acts.append(a)
                ds.append(g)
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
