"""diagnose: decomposition, inflation, flagging metrics equal scikit-learn's, skips without a mask."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

import gradscore as gs
from gradscore.cli import main
from gradscore import diagnose
from gradscore.scores.pds import variants
from gradscore.io.store import HDF5ScoresWriter
from helpers import strict_json


def _synthetic(path, *, with_mask=True, seed=0):
    """Planted mask: noisy examples have 10x gradient norms and a weak negative cosine."""
    rng = np.random.default_rng(seed)
    n, T = 200, 4
    noisy = np.zeros(n, bool)
    noisy[rng.choice(n, 30, replace=False)] = True
    g = rng.uniform(0.5, 1.5, (T, n)) * np.where(noisy, 10.0, 1.0)
    cos = np.where(noisy, rng.uniform(-0.2, 0.0, (T, n)), rng.uniform(-0.3, 0.6, (T, n)))
    ref = np.array([1.0, 2.0, 1.5, 0.0])
    pc = {"sq_grad_norm": g ** 2, "dot_costate": g * ref[:, None] * cos, "el2n": rng.uniform(size=(T, n)) + noisy,
          "p_gold": rng.uniform(size=(T, n)), "correct": (rng.uniform(size=(T, n)) > 0.5).astype(np.int8)}
    store = HDF5ScoresWriter(path, {"synthetic": seed}, n=n, T=T, chunk_size=n)
    for t in range(T):
        store.write_chunk(t, 0, {k: v[t] for k, v in pc.items()})
    eta = np.array([0.1, 0.2, 0.1])
    extras = {"checkpoints": {"eta": eta, "ref_norm_costate": ref}}
    if with_mask:
        extras["noisy"] = noisy
    weight = np.append(eta, 0.0)
    store.finalize(ids=np.arange(n), extras=extras, attrs={"config": {}},
                   aggregate=lambda p: {"el2n": p["el2n"].mean(0), "grand": np.sqrt(p["sq_grad_norm"]).mean(0),
                                        "pds": (weight[:, None] * p["dot_costate"]).sum(0)})
    return path, noisy, pc, ref, weight


def test_diagnosis_on_planted_mask(tmp_path):
    path, noisy, pc, ref, weight = _synthetic(tmp_path / "s.h5")
    rep = diagnose(path, out=tmp_path / "diag", echo=lambda *_: None)
    assert rep["decomposition"]["max_abs_error"] < 1e-9
    res = gs.load_scores(path)
    for name, s in (("el2n", res["scores"]["el2n"]), ("grand", res["scores"]["grand"]),
                    ("|pds|", np.abs(res["scores"]["pds"]))):
        assert rep["flagging"][name]["auroc"] == pytest.approx(roc_auc_score(noisy, s), abs=1e-12)
        assert rep["flagging"][name]["ap"] == pytest.approx(average_precision_score(noisy, s), abs=1e-12)
    v = variants(pc["dot_costate"], pc["sq_grad_norm"], ref, weight)
    assert rep["flagging"]["-pds_rank"]["auroc"] == pytest.approx(roc_auc_score(noisy, -v["rank"]), abs=1e-12)
    # the planted inflation: |raw| follows the norm, the cosine variant much less
    from scipy.stats import spearmanr
    raw = (weight[:, None] * pc["dot_costate"]).sum(0)
    expected = spearmanr(np.abs(raw), np.sqrt(pc["sq_grad_norm"]).mean(0))[0]
    assert rep["inflation"]["raw"]["spearman_abs_score_vs_norm"] == pytest.approx(expected, abs=1e-12)
    assert rep["inflation"]["cos"]["spearman_abs_score_vs_norm"] < rep["inflation"]["raw"]["spearman_abs_score_vs_norm"]
    k = 20
    top = np.argsort(-v["cos"], kind="stable")[:k]
    assert rep["contamination"]["cos"]["top"] == pytest.approx(noisy[top].mean())
    saved = json.loads((tmp_path / "diag" / "diagnosis.json").read_text())
    assert saved["flagging"]["grand"] == rep["flagging"]["grand"]
    assert (tmp_path / "diag" / "norm_vs_cos.png").stat().st_size > 5000


def test_diagnosis_reads_only_the_rows_it_decomposes(tmp_path, monkeypatch):
    """The score's dots and the gradient norms (and the last checkpoint's predictions, for the
    flag count's fit), not every (T, N) row of the file, and those a checkpoint's row (N,) at
    a time: at 10⁷ examples and 50 checkpoints a (T, N) float64 array is 4 GB, and the
    variants took several (read whole: 2.6 GB at 10⁶ × 50)."""
    from helpers import per_checkpoint_reads
    path, noisy, pc, ref, weight = _synthetic(tmp_path / "s.h5")
    read = per_checkpoint_reads(monkeypatch)
    rep = diagnose(path, echo=lambda *_: None)
    assert rep["decomposition"]["max_abs_error"] < 1e-9
    assert {name for name, _ in read} == {"dot_costate", "sq_grad_norm", "correct"}
    assert [name for name, _ in read].count("correct") == 1   # the flag count's fit: the last checkpoint's row
    assert {shape for _, shape in read} == {(len(noisy),)}
    # the per-example decomposition as (N,) float64 arrays: a Python float each took 32 bytes, 0.6 GB at 10⁷
    d = rep["decomposition"]
    np.testing.assert_array_equal(d["mean_grad_norm"], np.sqrt(pc["sq_grad_norm"]).mean(0))
    for k in ("mean_grad_norm", "mean_cos"):
        assert isinstance(d[k], np.ndarray) and d[k].shape == noisy.shape and d[k].dtype == np.float64


def test_without_mask_the_mask_free_parts_run(tmp_path, capsys):
    path, *_ = _synthetic(tmp_path / "s.h5", with_mask=False)
    assert main(["diagnose", str(path)]) == 0
    text = capsys.readouterr().out
    assert "decomposition error" in text and "spearman" in text
    assert "skipped: mask-based figures (no noisy mask in the scores file; pass --noisy-mask FILE" in text
    np.save(tmp_path / "mask.npy", np.zeros(200, bool) | (np.arange(200) < 30))
    assert main(["diagnose", str(path), "--noisy-mask", str(tmp_path / "mask.npy")]) == 0
    assert "flagging the 30 noisy examples" in capsys.readouterr().out
    for bad in ("0", "1.5", "-1"):   # read as one example, as every example, as one
        assert main(["diagnose", str(path), "--top-fraction", bad]) == 2
        assert f"invalid value for 'top_fraction': {float(bad)} is not a fraction in (0, 1]" in capsys.readouterr().err
    for bad in (1.5, float("nan"), "0.9", 0):   # were "a quantile is in [0, 1]" (ValueError) and a TypeError
        with pytest.raises(gs.ConfigError, match=f"invalid value for 'clip_quantile': {bad!r} is not a fraction"):
            gs.diagnose(path, clip_quantile=bad, echo=lambda line: None)
    assert main(["diagnose", str(path), "--overwrite"]) == 2   # writes nothing to replace: was dropped
    assert "--overwrite applies to --out only" in capsys.readouterr().err
    np.save(tmp_path / "short.npy", np.zeros(5, bool))
    assert main(["diagnose", str(path), "--noisy-mask", str(tmp_path / "short.npy")]) == 2
    assert "noisy mask has 5 entries, the scores file 200" in capsys.readouterr().err
    np.savez(tmp_path / "mask.npz", noisy=np.arange(200) < 30)   # an .npz, then one damaged
    assert main(["diagnose", str(path), "--noisy-mask", str(tmp_path / "mask.npz")]) == 0
    assert "flagging the 30 noisy examples" in capsys.readouterr().out
    raw = bytearray((tmp_path / "mask.npz").read_bytes())
    raw[len(raw) // 4] ^= 0x01
    (tmp_path / "bad.npz").write_bytes(bytes(raw))
    assert main(["diagnose", str(path), "--noisy-mask", str(tmp_path / "bad.npz")]) == 2
    assert "bad.npz: cannot read a noisy mask (.npy, or .npz with 'noisy'): damaged: " in capsys.readouterr().err


def test_a_noisy_mask_of_labels_or_indices_is_refused_not_read_as_bools(tmp_path, capsys):
    """A noisy mask holding labels (0..9) or indices was read as bools, every nonzero one
    noisy, and every AUROC and precision was of that; a column (N, 1) was "200 entries, the
    scores file 200". Each is one line and exit 2; 0/1 numbers are a mask as bools are."""
    path, *_ = _synthetic(tmp_path / "s.h5", with_mask=False)
    bad = {"labels": np.arange(200) % 10, "column": (np.arange(200) < 30)[:, None], "nan": np.where(
           np.arange(200) < 30, 1.0, np.nan), "text": np.array(["yes", "no"] * 100)}
    says = {"labels": "holds 2 at position 2, not only 0 and 1", "column": "has shape (200, 1)",
            "nan": "holds nan at position 30, not only 0 and 1", "text": "holds <U3 values, not True/False"}
    for name, values in bad.items():
        np.save(tmp_path / f"{name}.npy", values)
        assert main(["diagnose", str(path), "--noisy-mask", str(tmp_path / f"{name}.npy")]) == 2, name
        err = capsys.readouterr().err
        assert f"{name}.npy: noisy mask {says[name]}; give True for each known-noisy example" in err, err
        assert "mask[indices] = True" in err and len(err.strip().splitlines()) == 1
    np.save(tmp_path / "numbers.npy", (np.arange(200) < 30).astype(np.float32))
    assert main(["diagnose", str(path), "--noisy-mask", str(tmp_path / "numbers.npy")]) == 0
    assert "flagging the 30 noisy examples" in capsys.readouterr().out
    refused = r"field .noisy. holds 2 at position 2, not only 0 and 1; give .*; nothing written"
    with pytest.raises(gs.DataError, match=refused):
        gs.save_dataset(tmp_path / "d.h5", np.zeros((200, 3), np.float32), np.zeros(200, np.int64),
                        noisy=np.arange(200) % 10)
    np.savez(tmp_path / "d.npz", inputs=np.zeros((200, 3), np.float32), targets=np.zeros(200, np.int64),
             noisy=np.arange(200) % 10)
    with pytest.raises(gs.DataError, match="d.npz: field 'noisy' holds 2 at position 2"):
        gs.load_dataset(tmp_path / "d.npz")


def test_run_variants_equal_direct_computation(tmp_path):
    from test_pds import _gd_run
    ckpts, proxy, target, *_ = _gd_run(tmp_path)
    out = gs.score(ckpts, proxy, out=tmp_path / "s.h5", target=target, dtype="float64", progress=False,
                   scores=["pds", "grand"], variants=["cos", "clip", "rank", "resid"])
    res = gs.load_scores(out)
    ck, pc = res["checkpoints"], res["per_checkpoint"]
    from test_variants import _whole_arrays   # the variants from whole (T, N) arrays
    v = _whole_arrays(pc["dot_costate"], pc["sq_grad_norm"], ck["ref_norm_costate"], np.append(ck["eta"], 0.0))
    for name in ("cos", "clip", "rank", "resid"):
        np.testing.assert_array_equal(res["scores"][f"pds_{name}"], v[name])
    g = np.sqrt(pc["sq_grad_norm"])
    np.testing.assert_allclose(g * ck["ref_norm_costate"][:, None] * (pc["dot_costate"] / np.where(
        g * ck["ref_norm_costate"][:, None] > 0, g * ck["ref_norm_costate"][:, None], 1)), pc["dot_costate"], rtol=1e-10)
    with pytest.raises(gs.ConfigError, match="'variants'"):
        gs.score(ckpts, proxy, out=tmp_path / "t.h5", scores=["grand"], variants=["cos"], progress=False)


@pytest.mark.parametrize("n", [1, 2])
def test_a_score_constant_over_the_examples_is_diagnosed_without_a_python_warning(tmp_path, capsys, n):
    """Two examples (the residual variant is then constant) or one: scipy's
    ConstantInputWarning was printed with its source line under the table."""
    from helpers import make_run
    ckpts, data = make_run(tmp_path, n=n, n_ckpts=2)
    out = tmp_path / "s.h5"
    assert main(["run", "--checkpoints", str(ckpts), "--data", str(data), "--target", str(data), "--out", str(out),
                 "--scores", "target_dot,grand,el2n", "--quiet"]) == 0
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["diagnose", str(out), "--score", "target_dot", "--out", str(tmp_path / "d")]) == 0
    assert capsys.readouterr().err == ""
    report = strict_json((tmp_path / "d" / "diagnosis.json").read_text())   # NaN was written as NaN, not JSON
    rho = {v: r["spearman_abs_score_vs_norm"] for v, r in report["inflation"].items()}
    assert rho["resid"] is None and (n == 1) == (rho["raw"] is None), rho   # undefined: null
