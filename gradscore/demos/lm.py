"""``gradscore demo --lm``: a tiny GPT-2 on the docstrings of Python's standard library.

The corpus is real text available offline on every machine with Python: the module,
class and function docstrings of the standard library's source files (read with
``ast``, never imported), in sorted file order, as UTF-8 bytes (token = byte, 256 =
padding), cut to ``seq_len`` tokens. A fixed fraction of the training documents is
corrupted with a fixed seed (kept as the ``noisy`` mask): half have their tokens
shuffled, half are replaced by random printable bytes. The clean held-out documents
are the PDS target set. The model (GPT-2, 2 layers, d = 64, built from a config) is
warmed up with AdamW (not recorded), then trained by full-batch gradient descent with
a checkpoint at every step, so that PDS is exact for that trajectory; ``gradscore
run``'s code path scores loss, GraNd, target_dot, target_cos and PDS per document.
"""
from __future__ import annotations

import ast
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..pipeline import score
from ..io.checkpoints import CheckpointWriter
from ..io.datasets import save_dataset
from .digits import demo_folder, diagnose_and_finish, norm_trap
from ..exceptions import DataError
from ..losses import causal_lm
from ..io.store import load_scores

FACTORY = "gradscore.integrations.hf:from_config"
PAD = 256
VOCAB = 257
#: eager attention: torch has no forward-mode derivative of CPU flash attention, which
#: the co-states' Hessian-vector products need
MODEL_KWARGS = {"task": "causal_lm", "attn_implementation": "eager"}


def gpt2_config(seq_len: int = 128, d: int = 64, layers: int = 2, heads: int = 4) -> dict[str, Any]:
    """A byte-level GPT-2 config dict (no dropout: the trajectory is deterministic)."""
    return {"model_type": "gpt2", "vocab_size": VOCAB, "n_positions": seq_len, "n_embd": d,
            "n_layer": layers, "n_head": heads, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "bos_token_id": PAD, "eos_token_id": PAD, "pad_token_id": PAD}


def stdlib_docstrings(n: int, min_chars: int = 80, root: str | Path | None = None) -> list[str]:
    """The first ``n`` distinct docstrings (≥ ``min_chars``) of the standard library's
    ``.py`` files in sorted path order, test suites and site-packages excluded."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    seen: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts[:-1])
        if parts & {"site-packages", "dist-packages", "test", "tests", "idle_test"}:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
                    if len(docs) == n:
                        return docs
    raise DataError(f"{root}: found only {len(docs)} docstrings of >= {min_chars} characters, "
                    f"{n} needed; ask for fewer documents")


def encode(docs: list[str], seq_len: int) -> dict[str, np.ndarray]:
    """UTF-8 bytes, cut to ``seq_len``, right-padded: input_ids, attention_mask (N, seq_len)."""
    ids = np.full((len(docs), seq_len), PAD, dtype=np.int64)
    mask = np.zeros((len(docs), seq_len), dtype=np.int64)
    for i, doc in enumerate(docs):
        b = np.frombuffer(doc.encode("utf-8")[:seq_len], dtype=np.uint8)
        ids[i, :len(b)], mask[i, :len(b)] = b, 1
    return {"input_ids": ids, "attention_mask": mask}


def corrupt(x: dict[str, np.ndarray], fraction: float, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Corrupt ``fraction`` of the documents: first half token-shuffled, second half random
    printable bytes (the same lengths). Returns (inputs, noisy (N,) bool, kind (N,) 0/1/2)."""
    rng = np.random.default_rng(seed)
    ids = x["input_ids"].copy()
    n = len(ids)
    picked = rng.choice(n, size=int(round(fraction * n)), replace=False)
    kind = np.zeros(n, dtype=np.int64)
    half = len(picked) // 2
    for j, i in enumerate(picked):
        length = int(x["attention_mask"][i].sum())
        if j < half:
            ids[i, :length] = rng.permutation(ids[i, :length])
            kind[i] = 1
        else:
            ids[i, :length] = rng.integers(32, 127, size=length)
            kind[i] = 2
    return {"input_ids": ids, "attention_mask": x["attention_mask"]}, kind > 0, kind


def _labels(x: dict[str, torch.Tensor]) -> torch.Tensor:
    return x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)


def train(x: dict[str, np.ndarray], ckpt_dir: Path, *, config: dict[str, Any], warmup_epochs: int,
          steps: int, lr: float, seed: int = 0, echo: Any = print) -> None:
    """AdamW warm-up in minibatches (not recorded), then ``steps`` full-batch GD steps on
    the mean per-document loss, a checkpoint at every step (θ_0 … θ_steps)."""
    from ..integrations.hf import from_config
    torch.manual_seed(seed)
    model = from_config(config, attn_implementation=MODEL_KWARGS["attn_implementation"]).train()
    xt = {k: torch.from_numpy(v) for k, v in x.items()}
    y = _labels(xt)
    loss_fn = causal_lm("mean").fn
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(warmup_epochs):
        for batch in torch.randperm(len(y), generator=gen).split(32):
            opt.zero_grad()
            loss_fn(model(**{k: v[batch] for k, v in xt.items()}).logits, y[batch]).mean().backward()
            opt.step()
    with CheckpointWriter(ckpt_dir, model_factory=FACTORY, model_kwargs=MODEL_KWARGS | {"config": config},
                          loss="causal_lm", optimizer="GD(full batch)", overwrite=True) as writer:
        for step in range(steps + 1):
            writer.save(model, step=step, lr=lr, epoch=step)
            if step == steps:
                break
            model.zero_grad()
            mean = 0.0
            for batch in torch.arange(len(y)).split(256):  # the full-batch gradient, in pieces
                part = loss_fn(model(**{k: v[batch] for k, v in xt.items()}).logits, y[batch]).sum() / len(y)
                part.backward()
                mean += part.item()
            with torch.no_grad():
                for p in model.parameters():
                    p -= lr * p.grad
            echo(f"  GD step {step + 1}/{steps}: mean training loss {mean:.3f}")


def run_lm_demo(out: str | Path = "gradscore_demo_lm", *, n_docs: int = 800, n_target: int = 200,
                seq_len: int = 64, noise: float = 0.2, warmup_epochs: int = 5, steps: int = 6,
                lr: float = 0.05, engine: str = "auto", progress: bool = True,
                echo: Any = print) -> dict[str, Any]:
    """Run the LM demo into ``out``; return a summary (AUROCs, norm inflation, timings)."""
    from sklearn.metrics import roc_auc_score

    from ..integrations.hf import require_transformers
    require_transformers()  # before anything is written
    t0 = time.perf_counter()
    out = demo_folder(out)
    docs = stdlib_docstrings(n_docs + n_target)
    train_x, noisy, kind = corrupt(encode(docs[:n_docs], seq_len), noise)
    proxy = save_dataset(out / "data" / "train.h5", train_x, None, noisy=noisy)
    target = save_dataset(out / "data" / "target.h5", encode(docs[n_docs:], seq_len), None)
    echo(f"corpus: {len(docs)} docstrings of Python's standard library, byte tokens, {seq_len} per "
         f"document; {int(noisy.sum())} of {n_docs} training documents corrupted "
         f"({int((kind == 1).sum())} shuffled, {int((kind == 2).sum())} random bytes); "
         f"{n_target} clean held-out documents as the target")
    config = gpt2_config(seq_len)
    echo(f"training GPT-2 (2 layers, d=64) from config: AdamW warm-up {warmup_epochs} epochs, then "
         f"{steps} full-batch GD steps (lr {lr}), a checkpoint at each -> {out / 'ckpts'}")
    train(train_x, out / "ckpts", config=config, warmup_epochs=warmup_epochs, steps=steps, lr=lr, echo=echo)
    t_train = time.perf_counter() - t0
    echo(f"trained in {t_train:.1f}s")
    t1 = time.perf_counter()
    path = score(out / "ckpts", proxy, out=out / "scores.h5", target=target, engine=engine,
                 scores=("loss", "grand", "target_dot", "target_cos", "pds"), overwrite=True,
                 progress=progress, batch_size=64)
    t_score = time.perf_counter() - t1
    s = load_scores(path)["scores"]
    signed = {"loss": s["loss"], "grand": s["grand"], "-target_dot": -s["target_dot"],
              "-target_cos": -s["target_cos"], "-pds": -s["pds"]}
    kinds = {"all": noisy, "shuffled": kind == 1, "random": kind == 2}
    summary: dict[str, Any] = {"n_docs": n_docs, "n_noisy": int(noisy.sum()), "train_seconds": t_train,
                               "score_seconds": t_score, "auroc": {}}
    for name, sel in kinds.items():  # each corruption kind against the clean documents
        keep = sel | ~noisy
        summary["auroc"][name] = {k: float(roc_auc_score(sel[keep], v[keep])) for k, v in signed.items()}
    echo(f"\nscored {n_docs} documents x {steps + 1} checkpoints in {t_score:.1f}s -> {path}")
    echo("AUROC for finding the corrupted documents (1 = the score ranks them all first):")
    echo(f"  {'score':<12}" + "".join(f"{k:>10}" for k in kinds))
    for k in signed:
        echo(f"  {k:<12}" + "".join(f"{summary['auroc'][c][k]:>10.3f}" for c in kinds))
    clean_norm = s["grand"][~noisy].mean()
    summary.update(norm_trap(s, noisy, "target_dot"))
    summary["grad_norm_ratio_by_kind"] = {k: float(s["grand"][kinds[k]].mean() / clean_norm)
                                          for k in ("shuffled", "random")}
    by_kind = summary["grad_norm_ratio_by_kind"]
    echo(f"\nnorm inflation: corrupted documents have {summary['grad_norm_ratio_noisy_over_clean']:.2f}x the "
         f"gradient norm of clean ones (shuffled {by_kind['shuffled']:.2f}x, random bytes "
         f"{by_kind['random']:.2f}x); {summary['noisy_in_top50_abs_target_dot']}/50 of the largest "
         f"|target_dot| are corrupted ({noise:.0%} of the data), while their mean |cos| with ∇J is "
         f"{summary['cos_abs_noisy']:.3f} vs {summary['cos_abs_clean']:.3f} for clean ones.")
    return diagnose_and_finish(summary, path, proxy, out, t0, echo)
