"""Margins and AUM (Pleiss et al. 2020): the margin per checkpoint is the given label's logit
minus the largest other logit; AUM is its mean over the checkpoints used; low = suspicious."""
from __future__ import annotations

import numpy as np
import torch

import gradscore as gs
from gradscore.losses import resolve_loss
from gradscore.scores.datadiet import classification_metrics


def test_margin_is_the_given_logit_minus_the_largest_other():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.5, 3.0, 2.5], [1.0, 1.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    m = classification_metrics(resolve_loss("cross_entropy"), logits, y)["margin"]
    assert m.tolist() == [1.0, -2.5, 0.0]
    # nll on log-probabilities: the same margins (log_softmax shifts every logit alike)
    m2 = classification_metrics(resolve_loss("nll"), torch.log_softmax(logits, 1), y)["margin"]
    torch.testing.assert_close(m2, m)
    assert "margin" not in classification_metrics(resolve_loss("mse"), logits, torch.zeros(3, 3))


def test_aum_is_the_mean_margin_over_the_checkpoints_used(tiny_run, tmp_path):
    ckpts, data = tiny_run
    res = gs.load_scores(gs.score(ckpts, data, out=tmp_path / "s.h5", scores=["aum", "el2n"], progress=False))
    store, ds = gs.CheckpointStore(ckpts), gs.load_dataset(data)
    x, y = ds.read(0, len(ds))
    margins = []
    for t in range(len(store)):
        with torch.no_grad():
            z = store.build_model(t)(x)
        other = z.clone()
        other[torch.arange(len(y)), y] = -torch.inf
        margins.append((z[torch.arange(len(y)), y] - other.max(1).values).numpy())
    np.testing.assert_allclose(res["per_checkpoint"]["margin"], np.stack(margins), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res["scores"]["aum"], np.stack(margins).astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    early = gs.load_scores(gs.score(ckpts, data, out=tmp_path / "e.h5", scores=["aum"], epochs_upto=1, progress=False))
    np.testing.assert_allclose(early["scores"]["aum"], np.stack(margins[:2]).astype(np.float64).mean(0),
                               rtol=1e-5, atol=1e-6)



def _memorizing_run(T=10, N=400, seed=0):
    """Clean examples fit by checkpoint 2; the 80 wrong labels are pushed away until
    checkpoint 5 and are memorized from checkpoint 6 on (their margins turn positive)."""
    rng = np.random.default_rng(seed)
    noisy = np.zeros(N, dtype=bool)
    noisy[:80] = True
    correct = np.zeros((T, N), dtype=np.int8)
    correct[2:, ~noisy] = 1
    correct[6:, noisy] = 1
    margin = np.where(correct == 1, 3.0, -2.0) + rng.normal(0, 0.5, (T, N))
    margin[:2] = rng.normal(0, 0.5, (2, N))                             # nothing learned yet
    return {"correct": correct, "margin": margin.astype(np.float32)}, noisy


def test_mislabel_is_minus_the_mean_of_the_running_aum():
    from gradscore.scores.mislabel import aggregate, window_weights
    pc, noisy = _memorizing_run()
    T = len(pc["margin"])
    running = np.cumsum(pc["margin"].astype(np.float64), 0) / np.arange(1, T + 1)[:, None]
    score = aggregate(pc, np.ones(T, dtype=bool))["mislabel"]
    np.testing.assert_allclose(score, -running.mean(0), rtol=1e-12)
    w = window_weights(T)                     # the same as one weighted mean of the margins
    assert np.isclose(w.sum(), 1.0) and (np.diff(w) < 0).all()
    np.testing.assert_allclose(score, -(w[:, None] * pc["margin"]).sum(0), rtol=1e-12)
    assert score[noisy].min() > score[~noisy].max()       # early checkpoints dominate: fully separated
    assert (-pc["margin"].astype(np.float64).mean(0)[noisy]).min() < 0   # plain AUM is not


def test_mislabel_uses_only_the_selected_checkpoints():
    from gradscore.scores.mislabel import aggregate
    pc, _ = _memorizing_run()
    select = np.arange(10) < 6
    want = aggregate({k: v[:6] for k, v in pc.items()}, np.ones(6, dtype=bool))
    got = aggregate(pc, select)
    for name in ("aum", "mislabel"):
        np.testing.assert_array_equal(got[name], want[name])
    assert aggregate({"loss": pc["margin"]}, select) == {}


def test_mislabel_through_run_and_flag(tiny_run, tmp_path):
    ckpts, data = tiny_run
    res = gs.load_scores(gs.score(ckpts, data, out=tmp_path / "s.h5", scores=["mislabel", "aum"], progress=False))
    assert res["scores"]["mislabel"].shape == (90,) and np.isfinite(res["scores"]["mislabel"]).all()
    assert gs.flag(tmp_path / "s.h5")["score"] == "mislabel"


def test_store_logits_keeps_every_checkpoints_logits_in_float16(tiny_run, tmp_path):
    import h5py
    ckpts, data = tiny_run
    out = gs.score(ckpts, data, out=tmp_path / "s.h5", scores=["aum"], store_logits=True, chunk_size=40,
                   progress=False)
    store, ds = gs.CheckpointStore(ckpts), gs.load_dataset(data)
    x, _ = ds.read(0, len(ds))
    with h5py.File(out) as f:
        logits = f["logits"][()]
        assert logits.dtype == np.float16 and logits.shape == (3, 90, 4) and "logits" not in f["per_checkpoint"]
    for t in range(3):
        with torch.no_grad():
            want = store.build_model(t)(x).numpy()
        np.testing.assert_allclose(logits[t], want.astype(np.float16), rtol=1e-3, atol=1e-3)
    assert set(gs.load_scores(out)["per_checkpoint"]) >= {"margin", "loss"}
    # the logits follow the rows: an incremental rerun and aggregate keep them, bit for bit
    gs.score(ckpts, data, out=out, scores=["aum", "el2n"], store_logits=True, chunk_size=40, progress=False)
    gs.reaggregate(out, tmp_path / "early.h5", epochs_upto=1)
    fresh = gs.score(ckpts, data, out=tmp_path / "fresh.h5", scores=["aum", "el2n"], store_logits=True,
                     chunk_size=40, epochs_upto=1, progress=False)
    with h5py.File(tmp_path / "early.h5") as a, h5py.File(fresh) as b:
        assert np.array_equal(a["logits"][()], b["logits"][()]) and a["logits"].shape == (2, 90, 4)
