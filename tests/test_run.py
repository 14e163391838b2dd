"""The scoring pipeline through the Python API: engines agree, store semantics hold."""
from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch

import gradscore as gs

from helpers import FORWARD_EDITS, USERHELP, USERNET, user_code_run


def test_run_vmap_and_ghost_equal_loop_and_direct_scorer(tiny_run, tmp_path):
    ckpts, data = tiny_run
    opts = dict(dtype="float64", batch_size=16, chunk_size=40, progress=False)
    a = gs.load_scores(gs.score(ckpts, data, out=tmp_path / "a.h5", engine="vmap", **opts))
    b = gs.load_scores(gs.score(ckpts, data, out=tmp_path / "b.h5", engine="loop", **opts))
    c = gs.load_scores(gs.score(ckpts, data, out=tmp_path / "c.h5", engine="ghost", **opts))
    for k in ("loss", "sq_grad_norm", "el2n", "p_gold", "correct"):
        assert a["per_checkpoint"][k].shape == (3, 90)
        np.testing.assert_allclose(a["per_checkpoint"][k], b["per_checkpoint"][k], rtol=1e-10)
        np.testing.assert_allclose(c["per_checkpoint"][k], b["per_checkpoint"][k], rtol=1e-10)
    # the stored per-checkpoint sq norms equal a direct per-example autograd computation
    store = gs.CheckpointStore(ckpts)
    ds = gs.load_dataset(data)
    x, y = ds.read(0, len(ds))
    for t in range(len(store)):
        model = store.build_model(t, dtype=torch.float64)
        for i in (0, 45, 89):
            loss = torch.nn.functional.cross_entropy(model(x[i:i + 1].double()), y[i:i + 1])
            g = torch.autograd.grad(loss, list(model.parameters()))
            sq = sum(float(gi.pow(2).sum()) for gi in g)
            assert a["per_checkpoint"]["sq_grad_norm"][t, i] == pytest.approx(sq, rel=1e-10)
    grand = np.sqrt(a["per_checkpoint"]["sq_grad_norm"]).mean(0)
    np.testing.assert_allclose(a["scores"]["grand"], grand, rtol=1e-12)
    assert a["ids"].tolist() == list(range(100, 190))
    assert a["noisy"].sum() == 13


def test_forward_only_scores_skip_gradients(tiny_run, tmp_path):
    ckpts, data = tiny_run
    res = gs.load_scores(gs.score(ckpts, data, out=tmp_path / "s.h5", scores=["el2n"], progress=False))
    assert set(res["scores"]) == {"el2n"} and "sq_grad_norm" not in res["per_checkpoint"]


def test_epochs_upto_selects_early_checkpoints(tiny_run, tmp_path):
    ckpts, data = tiny_run
    full = gs.load_scores(gs.score(ckpts, data, out=tmp_path / "full.h5", progress=False))
    res = gs.load_scores(gs.score(ckpts, data, out=tmp_path / "s.h5", epochs_upto=1, progress=False))
    np.testing.assert_allclose(res["scores"]["el2n"], full["per_checkpoint"]["el2n"][:2].mean(0), rtol=1e-6)
    assert not np.allclose(res["scores"]["el2n"], full["per_checkpoint"]["el2n"].mean(0), rtol=1e-6)
    with h5py.File(tmp_path / "s.h5") as f:   # only the checkpoints used are scored
        assert f["checkpoints/selected"][()].tolist() == [True, True]
        assert f["done"][()].all()
    with pytest.raises(gs.ConfigError, match="epochs_upto"):
        gs.score(ckpts, data, out=tmp_path / "t.h5", epochs_upto=-1, progress=False)
    for path in ckpts.glob("step_*.h5"):
        with h5py.File(path, "a") as f:
            f.attrs["epoch"] = f.attrs["epoch"] + 5
    with pytest.raises(gs.ConfigError, match=r"epochs_upto.*selects no checkpoint \(epochs present: \[5.0, 6.0, 7.0\]"):
        gs.score(ckpts, data, out=tmp_path / "t.h5", epochs_upto=1, progress=False)
    assert not (tmp_path / "t.h5").exists()


def test_existing_output_with_other_config_is_refused_unless_overwrite(tiny_run, tmp_path):
    ckpts, data = tiny_run
    out = tmp_path / "s.h5"
    gs.score(ckpts, data, out=out, progress=False)
    mtime = out.stat().st_mtime_ns
    assert gs.score(ckpts, data, out=out, progress=False) == out  # same config: nothing to do
    assert out.stat().st_mtime_ns == mtime
    with pytest.raises(gs.ConfigMismatchError, match="--overwrite"):
        gs.score(ckpts, data, out=out, batch_size=7, progress=False)
    gs.score(ckpts, data, out=out, batch_size=7, overwrite=True, progress=False)
    assert out.stat().st_mtime_ns != mtime


@pytest.mark.parametrize("loss", ["bce", "huber"])
def test_a_users_loss_on_one_output_takes_its_targets_as_it_reads_them(tmp_path, loss):
    """A user's loss function on one output: a binary classifier's 0/1 labels (one logit)
    or a regressor's float targets. Both were refused as class targets (label 1 outside
    [0, 1), float values); the losses and norms now equal the loop, and no metric whose
    meaning depends on the loss (el2n: of the logit? of its sigmoid?) is made up."""
    import tests_factory
    g = np.random.RandomState(0)
    x = g.randn(12, 5).astype(np.float32)
    y = (g.rand(12) > 0.5).astype(np.int64) if loss == "bce" else g.randn(12).astype(np.float32)
    data = gs.save_dataset(tmp_path / "d.h5", x, y)
    model = tests_factory.one_logit()
    with gs.CheckpointWriter(tmp_path / "ckpts", model_factory="tests_factory:one_logit", model_kwargs={},
                             loss=f"tests_factory:{loss}") as w:
        w.save(model, step=0, lr=0.1, epoch=0)
    scores = gs.load_scores(gs.score(checkpoints=tmp_path / "ckpts", data=data, out=tmp_path / "s.h5", progress=False))
    fn = getattr(tests_factory, loss)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    want_loss = fn(model(xt), yt).detach().numpy()
    want_norm = [float(sum((g_ ** 2).sum() for g_ in torch.autograd.grad(fn(model(xt[b:b + 1]), yt[b:b + 1]).sum(),
                                                                        list(model.parameters())))) ** 0.5
                 for b in range(12)]
    np.testing.assert_allclose(scores["scores"]["loss"], want_loss, rtol=1e-5)
    np.testing.assert_allclose(scores["scores"]["grand"], want_norm, rtol=1e-4)
    assert not {"aum", "confidence", "margin", "el2n"} & set(scores["scores"])   # meanings the loss does not give


def test_a_one_logit_classifier_scored_by_cross_entropy_is_one_line_naming_the_fix(tmp_path, capsys):
    """Its 0/1 labels were said to be out of range for the model's one output; with labels
    of 0 only, every loss and norm was 0. One line names the binary loss to use."""
    import tests_factory

    from gradscore.cli import main
    g = np.random.RandomState(0)
    with gs.CheckpointWriter(tmp_path / "ckpts", model_factory="tests_factory:one_logit", model_kwargs={},
                             loss="cross_entropy") as w:
        w.save(tests_factory.one_logit(), step=0, lr=0.1, epoch=0)
    for y in ((g.rand(12) > 0.5).astype(np.int64), np.zeros(12, np.int64)):
        data = gs.save_dataset(tmp_path / "d.h5", g.randn(12, 5).astype(np.float32), y)
        assert main(["run", "--checkpoints", str(tmp_path / "ckpts"), "--data", str(data), "--out",
                     str(tmp_path / "s.h5"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "one logit per example" in err and "binary_cross_entropy_with_logits" in err, err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "s.h5").exists()


def test_labels_out_of_range_fail_before_writing(tmp_path):
    from helpers import make_run
    ckpts, _ = make_run(tmp_path)
    bad = gs.save_dataset(tmp_path / "bad.h5", np.zeros((5, 12), np.float32), np.array([0, 1, 2, 3, 4]))
    with pytest.raises(gs.DataError, match="label 4 at index 4"):
        gs.score(ckpts, bad, out=tmp_path / "s.h5", progress=False)
    assert not (tmp_path / "s.h5").exists()


def test_run_scores_only_the_parameters_named(tiny_run, tmp_path, capsys):
    from gradscore.cli import main
    ckpts, data = tiny_run
    out = tmp_path / "head.h5"
    assert main(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(out), "--quiet",
                 "--scores", "grand", "--params", "3.*"]) == 0
    store = gs.CheckpointStore(ckpts)
    ds = gs.load_dataset(data)
    x, y = ds.read(0, len(ds))
    want = np.stack([gs.Scorer(store.build_model(t, dtype=torch.float32), engine="loop", params=["3.*"])
                     .score_batch(x, y).sq_norm.numpy() for t in range(len(store))])
    np.testing.assert_allclose(gs.load_scores(out)["per_checkpoint"]["sq_grad_norm"], want, rtol=1e-4)
    assert main(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(tmp_path / "x.h5"),
                 "--quiet", "--params", "head.*"]) == 2
    assert "'head.*' matches no parameter" in capsys.readouterr().err


@pytest.mark.parametrize("old,new,says", [
    ({"proxy": 1}, {"proxy": 2}, "the proxy set differs"),
    ({"checkpoints_sha256": 1}, {"checkpoints_sha256": 2}, "the checkpoints differ"),
    ({"config": {"every": 1}}, {"config": {"every": 2}}, "every (1 before, 2 now) differs"),
    ({"config": {"scores": ["a"]}}, {"config": {"scores": ["b"]}}, "scores (['a'] before, ['b'] now) differ"),
    ({"data": 1, "proxy": 1}, {"data": 2, "proxy": 2}, "the data, the proxy set differ"),
    (None, {"data": 1}, "the settings differ"),
    ({"data": 1}, {"data": 1}, "the settings differ"),
])
def test_a_mismatch_names_what_differs_in_a_clause(old, new, says):
    """The clause of a mismatch message agrees in number ("the proxy set differ" before)."""
    from gradscore.io.journal import difference
    assert difference(old, new) == says


def test_a_factory_dataset_whose_examples_changed_is_not_taken_for_the_same(tiny_run, tmp_path, monkeypatch):
    """A `module:fn` dataset was known by its name and length alone: after the user fixed some
    labels, a rerun found its finished scores file "the same" and kept the old numbers."""
    import tests_factory
    ckpts, _ = tiny_run
    out = tmp_path / "s.h5"
    gs.score(ckpts, "tests_factory:relabeled", out=out, progress=False)
    before = gs.load_scores(out)["scores"]["loss"]
    assert gs.score(ckpts, "tests_factory:relabeled", out=out, progress=False) == out   # the same: kept
    monkeypatch.setattr(tests_factory, "LABELS", [0, 1, 2, 2])   # a quarter of the labels fixed
    with pytest.raises(gs.ConfigMismatchError, match=r"the data differs\); pass --overwrite"):
        gs.score(ckpts, "tests_factory:relabeled", out=out, progress=False)
    np.testing.assert_array_equal(gs.load_scores(out)["scores"]["loss"], before)
    gs.score(ckpts, "tests_factory:relabeled", out=out, overwrite=True, progress=False)
    after = gs.load_scores(out)["scores"]["loss"]
    assert np.array_equal(after[0::4], before[0::4]) and not np.array_equal(after[3::4], before[3::4])


def test_a_rerun_after_the_code_changed_is_not_taken_for_the_same(tmp_path, monkeypatch):
    """A finished scores file was known by its options, checkpoints and data: after the user
    edited their loss (or their model's forward, or upgraded gradscore), a rerun kept the
    numbers the old code made."""
    import sys
    import gradscore.imports
    from gradscore.demos.models import mlp
    from helpers import MLP_KWARGS
    module = tmp_path / "userloss.py"
    v1 = ("import torch.nn.functional as F\n\ndef ce(out, y):\n"
          "    return F.cross_entropy(out, y, reduction='none')\n")
    module.write_text(v1)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    with gs.CheckpointWriter(tmp_path / "ckpts", model_factory="gradscore.demos.models:mlp", model_kwargs=MLP_KWARGS,
                             loss="userloss:ce") as w:
        w.save(mlp(**MLP_KWARGS), step=0, lr=0.1)
    g = torch.Generator().manual_seed(0)
    data = gs.save_dataset(tmp_path / "d.h5", torch.randn(10, 12, generator=g).numpy(), np.arange(10) % 4)
    out = tmp_path / "s.h5"
    gs.score(tmp_path / "ckpts", data, out=out, progress=False)
    before = gs.load_scores(out)["scores"]["loss"]
    assert gs.score(tmp_path / "ckpts", data, out=out, progress=False) == out   # the same code: kept
    module.write_text(v1.replace("return F", "return 2 * F"))   # the user's fix, in a new process
    monkeypatch.delitem(sys.modules, "userloss")
    with pytest.raises(gs.ConfigMismatchError, match=r"the code .* differs.*--overwrite"):
        gs.score(tmp_path / "ckpts", data, out=out, progress=False)
    gs.score(tmp_path / "ckpts", data, out=out, overwrite=True, progress=False)
    np.testing.assert_allclose(gs.load_scores(out)["scores"]["loss"], 2 * before)
    monkeypatch.setattr(gradscore.imports, "__version__", "99.0")   # an upgrade of gradscore
    with pytest.raises(gs.ConfigMismatchError, match=r"the code .* differs\)"):
        gs.score(tmp_path / "ckpts", data, out=out, progress=False)


def test_a_rerun_after_the_models_structure_changed_is_not_taken_for_the_same(tmp_path, monkeypatch):
    """A factory of an nn.Sequential has no class of its own: Tanh swapped for ReLU (the
    same parameters) must count as other code too."""
    import sys
    module = tmp_path / "usernet.py"
    v1 = ("import torch\n\ndef make():\n    torch.manual_seed(0)\n"
          "    return torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))\n")
    module.write_text(v1)
    monkeypatch.syspath_prepend(str(tmp_path))
    import usernet
    with gs.CheckpointWriter(tmp_path / "ckpts", model_factory="usernet:make") as w:
        w.save(usernet.make(), step=0, lr=0.1)
    g = torch.Generator().manual_seed(0)
    data = gs.save_dataset(tmp_path / "d.h5", torch.randn(10, 12, generator=g).numpy(), np.arange(10) % 4)
    gs.score(tmp_path / "ckpts", data, out=tmp_path / "s.h5", progress=False)
    module.write_text(v1.replace("Tanh", "ReLU"))
    monkeypatch.delitem(sys.modules, "usernet")
    with pytest.raises(gs.ConfigMismatchError, match=r"the code .* differs\)"):
        gs.score(tmp_path / "ckpts", data, out=tmp_path / "s.h5", progress=False)


@pytest.mark.parametrize("edit", [*FORWARD_EDITS, "unused code"])
def test_a_rerun_after_code_the_forward_calls_changed_is_not_taken_for_the_same(tmp_path, monkeypatch, edit):
    """The code fingerprint read the source of the model's own classes alone: after the user
    edited a helper function their forward calls (beside it or in another file), a method it
    inherits, or a constant it reads, a rerun took the old numbers for the new code's. An edit
    of code the model never runs changes nothing."""
    import sys
    files = {"usernet.py": USERNET, "userhelp.py": USERHELP}
    ckpts, data = user_code_run(tmp_path, monkeypatch, files)
    out = gs.score(ckpts, data, out=tmp_path / "s.h5", progress=False)
    name, old, new, named = FORWARD_EDITS.get(edit, ("usernet.py", "return 1", "return 2", None))
    assert old in files[name]
    (tmp_path / name).write_text(files[name].replace(old, new))
    for module in ("usernet", "userhelp"):   # the user's next process
        monkeypatch.delitem(sys.modules, module)
    if edit == "unused code":
        assert gs.score(ckpts, data, out=out, progress=False) == out   # kept
        return
    with pytest.raises(gs.ConfigMismatchError, match=rf"the code \(code they call: {named}\) differs\)"):
        gs.score(ckpts, data, out=out, progress=False)



@pytest.mark.parametrize("edit", [*FORWARD_EDITS, "unused code"])
def test_scoring_says_where_the_models_code_changed_since_the_training(tmp_path, monkeypatch, edit):
    """Checkpoints hold weights, the factory rebuilds the code: after the user edited what
    the forward runs (a helper, a method, a constant) between training and scoring, every
    score was of a model that was never trained, silently. The writer records the code's
    fingerprint; scoring warns, naming what changed. An edit of code the model never runs
    says nothing."""
    import sys
    import warnings
    files = {"usernet.py": USERNET, "userhelp.py": USERHELP}
    ckpts, data = user_code_run(tmp_path, monkeypatch, files)
    name, old, new, named = FORWARD_EDITS.get(edit, ("usernet.py", "return 1", "return 2", None))
    (tmp_path / name).write_text(files[name].replace(old, new))
    for module in ("usernet", "userhelp"):   # the user's scoring process
        monkeypatch.delitem(sys.modules, module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gs.score(ckpts, data, out=tmp_path / "s.h5", scores=["loss"], progress=False)
    said = [str(w.message) for w in caught if "since the checkpoints were written" in str(w.message)]
    if named is None:
        assert said == []
    else:
        assert len(said) == 1 and f"code they call: {named}" in said[0], said

def test_the_code_fingerprint_is_the_same_in_every_process(tmp_path):
    """A resume runs in a new process: what the fingerprint reads of the user's code (a
    frozenset among its constants, whose order follows the process's string hashing) must
    not differ."""
    import json
    import subprocess
    import sys
    (tmp_path / "usernet.py").write_text(USERNET)
    (tmp_path / "userhelp.py").write_text(USERHELP)
    code = ("import json, usernet; from gradscore.imports import code_fingerprint; "
            "from gradscore.losses import resolve_loss; "
            "print(json.dumps(code_fingerprint(usernet.make(), usernet.make, resolve_loss('cross_entropy').fn)))")
    prints = [json.loads(subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True,
                                        text=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout)
              for seed in ("1", "2")]
    assert prints[0] == prints[1] and "helpers" in prints[0]


def test_state_the_users_code_keeps_in_its_module_is_not_code(tmp_path, monkeypatch):
    """A module global the forward rebinds (a call counter) or a list it fills (a cache) is
    state, not code: a second run in the same process must find the file it wrote finished."""
    counting = USERNET.replace("def _local(h):\n    return h", (
        "CALLS = 0\nSEEN = []\n\n\ndef _local(h):\n    global CALLS\n    CALLS += 1\n"
        "    SEEN.append(h.shape[0])\n    return h"))
    ckpts, data = user_code_run(tmp_path, monkeypatch, {"usernet.py": counting, "userhelp.py": USERHELP})
    import usernet
    out = gs.score(ckpts, data, out=tmp_path / "s.h5", progress=False)
    assert usernet.CALLS > 0 and usernet.SEEN
    assert gs.score(ckpts, data, out=out, progress=False) == out


def test_what_the_fingerprint_reads_of_a_modules_globals(tmp_path, monkeypatch):
    """Immutable constants by value, library functions by name; state (a list, a set, a
    rebound global), callable objects and a proxy whose attributes raise are left out."""
    import sys
    from gradscore.imports import user_code
    (tmp_path / "userglobals.py").write_text(
        "import torch\n\nRATE = 0.5\nSIZES = (1, 2)\nKINDS = frozenset({'a', 'b'})\nCACHE = []\nSEEN = {1}\n"
        "act = torch.tanh\nCOUNT = 0\n\n\nclass Proxy:\n    def __getattr__(self, name):\n"
        "        raise RuntimeError(name)\n\n    def __call__(self, x):\n        return x\n\n\nP = Proxy()\n\n\n"
        "def forward(x):\n    global COUNT\n    COUNT += 1\n    CACHE.append(1)\n"
        "    return P(act(x)) * RATE + SIZES[0] + len(KINDS) + len(SEEN) + COUNT\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "userglobals", raising=False)
    import userglobals
    found = user_code([userglobals.forward])
    act = found.pop("userglobals.act")
    assert act.startswith("torch.") and act.endswith(".tanh")
    assert found == {"userglobals.RATE": "0.5", "userglobals.SIZES": "tuple(1, 2)",
                     "userglobals.KINDS": "frozenset('a', 'b')"}


def test_run_says_how_the_mean_loss_went_and_when_it_rose(tmp_path, capsys):
    """Examples saved otherwise than the model was trained on (labels shifted, inputs scaled,
    images transposed) score without an error, every number wrong. Their mean loss rises
    from the first checkpoint to the last where training data's falls: `run` and `info`
    say how it went, and `run` says so where it rose."""
    from helpers import make_run

    from gradscore.cli import main
    ckpts, data = make_run(tmp_path)

    def summary(path):
        res = gs.load_scores(path)
        loss, correct, step = res["per_checkpoint"]["loss"].mean(1), res["per_checkpoint"]["correct"].mean(1), \
            res["checkpoints"]["step"]
        return loss, (f"mean loss {loss[0]:.3g} at step {step[0]} -> {loss[-1]:.3g} at step {step[-1]}; accuracy "
                      f"on the given labels {correct[0]:.0%} -> {correct[-1]:.0%}")

    assert main(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(tmp_path / "s.h5"),
                 "--quiet"]) == 0
    out = capsys.readouterr()
    loss, line = summary(tmp_path / "s.h5")
    assert loss[-1] < loss[0] and line in out.out and "rose" not in out.err
    assert main(["info", str(tmp_path / "s.h5")]) == 0 and line in capsys.readouterr().out
    with h5py.File(data) as f:
        shifted = gs.save_dataset(tmp_path / "shifted.h5", f["inputs"][()], (f["targets"][()] + 1) % 4)
    assert main(["run", "--checkpoints", str(ckpts), "--data", str(shifted), "--out", str(tmp_path / "t.h5"),
                 "--quiet"]) == 0
    out = capsys.readouterr()
    loss, line = summary(tmp_path / "t.h5")
    assert loss[-1] > loss[0] and line in out.out
    assert (f"warning: the examples' mean loss rose from {loss[0]:.3g} at the first checkpoint to {loss[-1]:.3g} at "
            f"the last") in out.err and "label ids" in out.err and out.err.count("\n") == 1
    assert "rose" not in json.dumps(gs.load_scores(tmp_path / "t.h5")["warnings"])   # a hint, not the file's
    with pytest.warns(gs.GradscoreWarning, match="the examples' mean loss rose"):   # in Python too
        gs.score(ckpts, shifted, out=tmp_path / "u.h5", progress=False)
