"""Which path ``engine="auto"`` takes for each layer family, and its time against one
plain forward+backward of the same model, side by side in one run (CPU or CUDA).

    python -m bench.families [--batch 64] [--json bench/results/families_cpu.json]

One small model per family (the layer, then a linear head). For each: the paths
``explain()`` reports for the family's parameters, and the best of paired calls of
plain, ``auto`` (K = 0 and 2) and the per-example ``loop``, as ratios to plain.
"""
from __future__ import annotations

import argparse
import importlib.util
from collections import Counter

import torch
from torch import nn

import gradscore as gs
from gradscore.engines.ghost import GhostEngine
from bench.engines import TinyViT, device_name, paired_times, parsed, run_script, write_results
from gradscore.demos.models import recurrent_classifier, small_resnet

T, D = 32, 64


class Head(nn.Module):
    """``body`` then mean over every dimension but the batch's last, then a linear head."""

    def __init__(self, body: nn.Module, width: int, seq_first: bool = False) -> None:
        super().__init__()
        self.body, self.head, self.seq_first = body, nn.Linear(width, 10), seq_first

    def forward(self, x):
        h = self.body(x.transpose(0, 1) if self.seq_first else x)
        h = h[0] if isinstance(h, tuple) else h
        h = h.transpose(0, 1) if self.seq_first else h
        return self.head(h.reshape(h.shape[0], -1, h.shape[-1]).mean(1) if h.dim() > 2 else h)


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(1000, D, mode="mean")

    def forward(self, ids):
        return self.bag(ids)


#: families scored twice: with the free-parameter rule, and with it off (their parameters in vmap)
WITHOUT_FREE = " (free-parameter rule off)"


class BiasedAttention(nn.Module):
    """Self-attention on (B, T, d) whose scores get a bias per head and relative offset,
    picked from a table by index (LeViT's and EfficientFormer's attention biases): the
    table is a parameter the forward uses directly, through an index."""

    def __init__(self, d: int, T: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.attention_biases = nn.Parameter(0.02 * torch.randn(heads, 2 * T - 1))
        offsets = torch.arange(T)[:, None] - torch.arange(T)[None] + T - 1
        self.register_buffer("offsets", offsets, persistent=False)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5 + self.attention_biases[:, self.offsets]
        return self.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d))


class QKVBiasAttention(BiasedAttention):
    """BEiT's and EVA's self-attention: ``qkv`` is never called; the forward multiplies x by
    its weight itself, with a bias concatenated from ``q_bias``, zeros and ``v_bias``
    (parameters the forward uses directly: the free-parameter rule's products and ops of
    several parameters)."""

    def __init__(self, d: int, T: int, heads: int = 4) -> None:
        super().__init__(d, T, heads)
        self.qkv.bias = None
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(d)), nn.Parameter(torch.zeros(d))
        self.register_buffer("k_bias", torch.zeros(d), persistent=False)

    def forward(self, x):
        B, T, d = x.shape
        qkv = nn.functional.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5 + self.attention_biases[:, self.offsets]
        return self.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d))


class RelativePositionAttention(nn.Module):
    """DeBERTa-v2's (and -v3's) disentangled self-attention on (B, T, d): the relative
    position embeddings (2T, d), layer-normalized, go once for the batch through the
    attention's own query and key Linears, are repeated over the batch (``.repeat(B, 1,
    1)``) and meet each example's heads by ``torch.bmm`` (content to position, position to
    content): the free-parameter rule's repeats over the batch."""

    def __init__(self, d: int, T: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.rel, self.norm = nn.Parameter(0.02 * torch.randn(2 * T, d)), nn.LayerNorm(d)
        offsets = (torch.arange(T)[:, None] - torch.arange(T)[None] + T).clamp(0, 2 * T - 1)
        self.register_buffer("offsets", offsets, persistent=False)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        """(n, T, d) -> (n · heads, T, d / heads)."""
        n, T, d = t.shape
        return t.reshape(n, T, self.heads, d // self.heads).permute(0, 2, 1, 3).reshape(-1, T, d // self.heads)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        rel = self.norm(self.rel)[None]
        pos_k, pos_q = self._split(self.k(rel)).repeat(B, 1, 1), self._split(self.q(rel)).repeat(B, 1, 1)
        at = self.offsets.expand(B * self.heads, T, T)
        c2p = torch.gather(torch.bmm(q, pos_k.transpose(-1, -2)), -1, at)
        p2c = torch.gather(torch.bmm(k, pos_q.transpose(-1, -2)), -1, at).transpose(-1, -2)
        scores = (torch.bmm(q, k.transpose(-1, -2)) + c2p + p2c) * (3 * d // self.heads) ** -0.5
        out = torch.bmm(scores.softmax(-1), v).reshape(B, self.heads, T, d // self.heads)
        return self.proj(out.transpose(1, 2).reshape(B, T, d))


class MixtureOfExperts(nn.Module):
    """Hugging Face Mixtral's sparse MLP on (B, T, d): a router Linear picks the top 2 of 8
    experts per token, and ``MixtralExperts`` runs them on the B·T rows (the experts rule)."""

    def __init__(self, d: int, experts: int = 8) -> None:
        super().__init__()
        from transformers.models.mixtral import modeling_mixtral as mixtral
        config = mixtral.MixtralConfig(hidden_size=d, intermediate_size=2 * d, num_local_experts=experts)
        config._experts_implementation = "eager"
        self.router, self.experts = nn.Linear(d, experts, bias=False), mixtral.MixtralExperts(config)
        with torch.no_grad():
            for p in self.experts.parameters():
                p.normal_(0, d ** -0.5)

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        w, index = self.router(rows).softmax(-1).topk(2, -1)
        return self.experts(rows, index, w / w.sum(-1, keepdim=True)).reshape(x.shape)


class Channels(nn.Module):
    """A channels-first layer followed by moving channels last."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x).flatten(2).transpose(1, 2)


class CellSteps(nn.Module):
    """A recurrent cell over the steps of (B, T, d), its state fed back: (B, T, hidden)."""

    def __init__(self, cell: nn.RNNCellBase) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x):
        state, hs = None, []
        for x_t in x.unbind(1):
            state = self.cell(x_t, state)
            hs.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(hs, 1)


def families(B: int) -> dict[str, tuple[nn.Module, torch.Tensor, str]]:
    """family -> (model, inputs of batch B, the parameter-name prefix of the family's layer)."""
    ids = torch.randint(0, 1000, (B, T))
    seq = torch.randn(B, T, D)
    return {
        "Linear (B, T, d)": (Head(nn.Linear(D, D), D), seq, "body."),
        "Linear, sequence-first (T, B, d)": (Head(nn.Linear(D, D), D, seq_first=True), seq, "body."),
        "Embedding": (Head(nn.Embedding(1000, D), D), ids, "body."),
        "EmbeddingBag (mean)": (Head(Bag(), D), ids, "body."),
        "LayerNorm": (Head(nn.LayerNorm(D), D), seq, "body."),
        "RMSNorm": (Head(nn.RMSNorm(D), D), seq, "body."),
        "Conv1d": (Head(Channels(nn.Conv1d(D, D, 3, padding=1)), D), seq.transpose(1, 2), "body."),
        "Conv2d padding='same'": (Head(Channels(nn.Conv2d(16, 32, 3, padding="same")), 32),
                                  torch.randn(B, 16, 16, 16), "body."),
        "Conv2d padding_mode='reflect'": (Head(Channels(nn.Conv2d(16, 32, 3, padding=1, padding_mode="reflect")), 32),
                                          torch.randn(B, 16, 16, 16), "body."),
        "Conv3d": (Head(Channels(nn.Conv3d(4, 8, 3, padding=1)), 8), torch.randn(B, 4, 8, 8, 8), "body."),
        "ConvTranspose2d, stride 2": (Head(Channels(nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1,
                                                                       output_padding=1)), 16),
                                      torch.randn(B, 32, 8, 8), "body."),
        "GroupNorm": (Head(Channels(nn.GroupNorm(4, 16)), 16), torch.randn(B, 16, 16, 16), "body."),
        "InstanceNorm2d (affine)": (Head(Channels(nn.InstanceNorm2d(16, affine=True)), 16),
                                    torch.randn(B, 16, 16, 16), "body."),
        "BatchNorm2d (eval)": (Head(Channels(nn.BatchNorm2d(16)), 16), torch.randn(B, 16, 16, 16), "body."),
        "MultiheadAttention": (Head(nn.MultiheadAttention(D, 4, batch_first=True), D), seq, "body."),
        "MultiheadAttention, sequence-first": (Head(nn.MultiheadAttention(D, 4), D, seq_first=True), seq, "body."),
        "TransformerEncoderLayer": (Head(nn.TransformerEncoderLayer(D, 4, 2 * D, dropout=0.0, batch_first=True), D),
                                    seq, "body."),
        "RNN": (Head(nn.RNN(D, D, batch_first=True), D), seq, "body."),
        "GRU, 2 layers": (Head(nn.GRU(D, D, 2, batch_first=True), D), seq, "body."),
        "LSTM, bidirectional": (Head(nn.LSTM(D, D, batch_first=True, bidirectional=True), 2 * D), seq, "body."),
        "LSTM with proj_size": (Head(nn.LSTM(D, D, batch_first=True, proj_size=D // 2), D // 2), seq, "body."),
        "LSTMCell in a loop": (Head(CellSteps(nn.LSTMCell(D, D)), D), seq, "body."),
        "ViT tokens (class token, position embedding)": (TinyViT(D, T, layers=1), torch.randn(B, T, 48), ""),
        "ViT tokens" + WITHOUT_FREE: (TinyViT(D, T, layers=1), torch.randn(B, T, 48), ""),
        "attention biases picked from a table": (Head(BiasedAttention(D, T), D), seq, "body."),
        "attention biases" + WITHOUT_FREE: (Head(BiasedAttention(D, T), D), seq, "body."),
        "BEiT attention (F.linear by qkv's weight)": (Head(QKVBiasAttention(D, T), D), seq, "body."),
        "BEiT attention" + WITHOUT_FREE: (Head(QKVBiasAttention(D, T), D), seq, "body."),
        "DeBERTa-v2 attention (position keys repeated)": (Head(RelativePositionAttention(D, T), D), seq, "body."),
        "DeBERTa-v2 attention" + WITHOUT_FREE: (Head(RelativePositionAttention(D, T), D), seq, "body."),
        **({"Mixture of experts (Mixtral's, 8 experts, top 2)": (Head(MixtureOfExperts(D), D), seq, "body.experts.")}
           if importlib.util.find_spec("transformers") else {}),
        "ResNet, BatchNorm (20k)": (small_resnet(), torch.randn(B, 3, 32, 32), ""),
        "Conv encoder, ConvTranspose decoder": (Head(Channels(nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 3, 2, 1, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(32, 16, 3, 2, 1, output_padding=1), nn.ReLU())), 16), torch.randn(B, 3, 32, 32), ""),
        "GRU + attention classifier": (recurrent_classifier(kind="GRU", attention=True), ids, ""),
    }


def _with_mha(model: nn.Module) -> nn.Module:
    """Call MultiheadAttention as self-attention: (x, x, x)."""
    for m in model.modules():
        if isinstance(m, Head) and isinstance(m.body, nn.MultiheadAttention):
            mha = m.body
            m.body = _SelfAttention(mha)
    return model


class _SelfAttention(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


def run(B: int, repeats: int, only: str = "") -> list[dict]:
    rows = []
    for name, (model, x, prefix) in families(B).items():
        if only not in name:
            continue
        torch.manual_seed(0)
        model = _with_mha(model).eval()
        with torch.no_grad():
            n_out = model(x[:1]).shape[-1]
        y = torch.randint(0, n_out, (B,))
        GhostEngine.takes_free = not name.endswith(WITHOUT_FREE)
        try:
            auto, loop = gs.Scorer(model, engine="auto"), gs.Scorer(model, engine="loop")
        finally:
            GhostEngine.takes_free = True
        V = torch.randn(2, auto.num_params)
        auto.score_batch(x, y)
        paths = Counter(v.split(" (")[0] for k, v in auto.explain().items() if k.startswith(prefix + ("mha." if
                        isinstance(getattr(model, "body", None), _SelfAttention) else "")) and not k.startswith("head"))

        def plain():
            nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
            model.zero_grad(set_to_none=True)
        row = {"family": name, "batch": B, "paths": dict(paths)}
        for label, fn in (("auto_k0", lambda: auto.score_batch(x, y)), ("auto_k2", lambda: auto.score_batch(x, y, V)),
                          ("loop", lambda: loop.score_batch(x, y))):
            fn()
            best, paired = paired_times(fn, plain, repeats if label != "loop" else 2)
            row[label] = best / paired
        rows.append(row)
        print(f"{name:<36} {', '.join(f'{k}: {v}' for k, v in paths.items()):<22} auto K=0 {row['auto_k0']:5.2f}x"
              f"  K=2 {row['auto_k2']:5.2f}x  loop {row['loop']:6.1f}x", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64, help="examples per batch (default 64)")
    ap.add_argument("--repeats", type=int, default=7, help="paired calls per method; the best counts (default 7)")
    ap.add_argument("--only", default="", help="run the families whose name contains this text (default: all)")
    args = parsed(ap, argv)
    if args.only and args.json:
        ap.error("--only runs some families: a results file holds all of them (leave out --only)")
    rows = run(args.batch, args.repeats, args.only)
    if args.json:
        write_results(args.json, {"device": device_name(),
                                  "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    run_script(main)
