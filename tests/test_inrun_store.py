"""The in-run store reads its journal a few row files at a time: the same rows in the same
order, and the same scores to the bit, as reading every record at once, in memory that
does not grow with the records."""
from __future__ import annotations

import json
import tracemalloc

import h5py
import numpy as np
import pytest

from gradscore.exceptions import OutputError
from gradscore.inrun import store
from gradscore.io.journal import Journal
from gradscore.io.store import read_numpy
from gradscore.scores import inrun as inrun_scores

N = 37   # examples


def _records(rng: np.random.Generator, steps: list[int], batch: int) -> dict[str, np.ndarray]:
    """A classifier's records of ``batch`` examples at each of ``steps``, with what the
    scores must skip: non-finite losses, NaN dots (steps without a target), lr 0."""
    m = len(steps) * batch
    step = np.repeat(np.asarray(steps, np.int64), batch)
    target = step % 3 != 1
    loss = rng.exponential(1, m)
    loss[rng.random(m) < 0.02] = np.nan
    ids = rng.integers(0, N, m)
    return {"ids": ids, "label": ids % 3, "step": step, "lr": np.where(step % 7 == 5, 0.0, 0.1),
            "loss": loss, "share": np.full(m, 1 / max(batch, 1)), "share_sq_norm": rng.exponential(1, m),
            "sq_norm": rng.exponential(1, m), "el2n": rng.random(m), "p_gold": rng.random(m),
            "correct": (rng.random(m) > 0.4).astype(np.int8), "margin": rng.standard_normal(m),
            "dot": np.where(target, rng.standard_normal(m), np.nan), "target_norm": np.where(target, 2.0, np.nan)}


#: (segment, rank, steps of each row file): three ranks in segment 0 (rank 1's micro-batches
#: of step 6 straddle its files; rank 2 stops early and has a file of no rows), a resume at
#: step 9 on two ranks, another at step 14 on one
LAYOUT = [(0, 0, [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9, 10, 11]]),
          (0, 1, [[0, 1, 2, 3, 4, 5, 6], [6, 6, 7], [8], [9, 10, 11, 12]]),
          (0, 2, [[0, 1], [], [2, 3]]),
          (1, 0, [[9, 10], [11, 12, 13, 14, 15]]),
          (1, 1, [[9, 10, 11], [12, 13, 14]]),
          (2, 0, [[14, 15, 16], [17, 18]])]


def _journal(tmp_path, layout=LAYOUT, batch: int = 4) -> Journal:
    """A journal of row files as recorders write them (``layout``)."""
    journal = Journal(tmp_path / "r.h5", {"inrun": 1})
    journal.open()
    (journal.partial / "meta.json").write_text(json.dumps({"inrun": 1}))
    rng = np.random.default_rng(0)
    for segment, rank, files in layout:
        rows = store.RowJournal(journal, rank, segment)
        rows.start = next(f[0] for f in files if f)
        for steps in files:
            rows.append([_records(rng, steps, batch)])
    return journal


def _random_layout(rng: np.random.Generator) -> list:
    """1–3 segments, each resumed at a step up to two past the last one so far (or before
    it: a training resumed from an older state), of 1–3 ranks whose steps (some run as two
    micro-batches) are cut into row files anywhere, empty ones included."""
    layout, start, last = [], 0, 0
    for segment in range(rng.integers(1, 4)):
        if segment:
            start = int(rng.integers(0, last + 3))
        for rank in range(rng.integers(1, 4)):
            end = start + int(rng.integers(2, 12))
            steps = [t for t in range(start + int(rng.integers(0, 2)), end) for _ in range(rng.integers(1, 3))]
            cuts = np.sort(rng.integers(0, len(steps) + 1, rng.integers(0, 5)))
            layout.append((segment, rank, [steps[a:b] for a, b in zip([0, *cuts], [*cuts, len(steps)])]))
            last = max(last, end - 1)
    return layout


def _all_at_once(journal: Journal) -> dict[str, np.ndarray]:
    """Every row file read whole, in (segment, rank, order) order, each segment's rows from
    the first step of any later segment on dropped, then sorted by step (stable)."""
    files = store._row_files(journal.partial)
    loaded = [(segment, read_numpy(path)) for segment, _, path in files]
    starts = {}
    for segment, rows in loaded:
        if "segment_start" in rows:
            starts[segment] = min(int(rows.pop("segment_start")), starts.get(segment, 10**9))
    kept = []
    for segment, rows in loaded:
        cut = min([s for g, s in starts.items() if g > segment], default=None)
        kept.append({k: v if cut is None else v[rows["step"] < cut] for k, v in rows.items()})
    rows = {k: np.concatenate([p[k] for p in kept]) for k in kept[0]}
    order = np.argsort(rows["step"], kind="stable")
    return {k: v[order] for k, v in rows.items()}


def test_the_journal_reads_in_chunks_that_join_into_the_sorted_whole(tmp_path):
    journal = _journal(tmp_path)
    whole = _all_at_once(journal)
    chunks = list(store.iter_rows(journal))
    assert len(chunks) > 5 and max(len(c["step"]) for c in chunks) <= 6 * 4 * 3   # a file or two per rank
    for k in whole:
        np.testing.assert_array_equal(np.concatenate([c[k] for c in chunks]), whole[k], err_msg=k)
    assert sorted(set(whole["step"])) == list(range(19))
    assert (whole["step"][:-1] <= whole["step"][1:]).all()
    assert store.last_step(journal) == (18, "integers")
    for k in ("ids", "step"):
        np.testing.assert_array_equal(np.concatenate([c[k] for c in store.iter_rows(journal, (k,))]), whole[k])


@pytest.mark.parametrize("seed", range(25))
def test_random_journals_read_in_chunks_as_the_sorted_whole(tmp_path, seed):
    journal = _journal(tmp_path, _random_layout(np.random.default_rng(seed)), batch=int(seed % 3))
    whole = _all_at_once(journal)
    chunks = list(store.iter_rows(journal))
    for k in whole:
        np.testing.assert_array_equal(np.concatenate([c[k] for c in chunks] or [whole[k][:0]]), whole[k], err_msg=k)


def test_a_step_split_across_files_keeps_its_rows_in_rank_order(tmp_path):
    """Rank 0's step 1 straddles two of its files; rank 1 has one file: step 1's rows are rank
    0's (both files, in order), then rank 1's."""
    journal = _journal(tmp_path, [(0, 0, [[0, 1], [1, 2]]), (0, 1, [[0, 1, 2]])], batch=2)
    whole = _all_at_once(journal)
    chunks = list(store.iter_rows(journal))
    np.testing.assert_array_equal(np.concatenate([c["ids"] for c in chunks]), whole["ids"])
    np.testing.assert_array_equal(np.concatenate([c["loss"] for c in chunks]), whole["loss"])


def _by_loop(rows: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Each score from each example's records in step order, one example at a time."""
    out = {k: np.full(n, np.nan) for k in inrun_scores.NEEDS}
    for i in range(n):
        r = {k: v[rows["row"] == i] for k, v in rows.items()}
        if not len(r["step"]):
            continue
        finite_mean = lambda v: v[np.isfinite(v)].mean() if np.isfinite(v).any() else np.nan   # noqa: E731
        out["loss"][i], out["el2n"][i], out["aum"][i] = (finite_mean(r[k]) for k in ("loss", "el2n", "margin"))
        out["grand"][i] = finite_mean(np.sqrt(r["sq_norm"]))
        out["correctness"][i] = r["correct"].mean()
        p = r["p_gold"]
        out["confidence"][i], out["variability"][i] = p.mean(), p.std()
        out["threshold_closeness"][i] = p.mean() * (1 - p.mean())
        c = r["correct"].astype(bool)
        out["forgetting"][i] = sum(c[j] and not c[j + 1] for j in range(len(c) - 1)) if c.any() else len(c)
        terms = [0.0 if lr == 0 else lr * d for lr, d, t in zip(r["lr"], r["dot"], r["target_norm"])
                 if np.isfinite(t) and (lr == 0 or np.isfinite(lr * d))]
        out["inrun_value"][i] = sum(terms) * len(c) / len(terms) if terms else np.nan
        out["inrun_value_cos"][i] = finite_mean(r["dot"] / (np.sqrt(r["share_sq_norm"]) * r["target_norm"]))
    return out


def test_scores_over_chunks_are_one_pass_to_the_bit_and_the_loop(tmp_path):
    whole = _all_at_once(_journal(tmp_path))
    ids, row = np.unique(whole.pop("ids"), return_inverse=True)
    whole["row"] = row
    wanted = set(inrun_scores.NEEDS)
    once = inrun_scores.aggregate(whole, len(ids), wanted)
    assert set(once) == wanted
    cuts = np.sort(np.random.default_rng(1).choice(len(row), 9, replace=False))
    chunked = inrun_scores.Aggregator(len(ids), wanted, set(whole))
    for a, b in zip([0, *cuts], [*cuts, len(row)]):
        chunked.add({k: v[a:b] for k, v in whole.items()})
    loop = _by_loop(whole, len(ids))
    for k, v in chunked.result().items():
        assert np.array_equal(v, once[k], equal_nan=True), k
        np.testing.assert_allclose(v, loop[k], rtol=1e-12, atol=1e-15, err_msg=k)
    assert (once["forgetting"] > 0).any() and np.isfinite(once["inrun_value"]).all()   # the case has something to count


def test_the_scores_file_holds_the_rows_in_step_order_and_their_scores(tmp_path):
    journal = _journal(tmp_path)
    whole = _all_at_once(journal)
    out = tmp_path / "r.h5"
    found = store.write(out, journal, config={"every": 1}, fingerprint={"inrun": 1}, loss="cross_entropy",
                        wanted=set(inrun_scores.NEEDS), complete=True)
    ids, row = np.unique(whole["ids"], return_inverse=True)
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["ids"][()], ids)
        np.testing.assert_array_equal(f["inrun/row"][()], row)
        for k in store.FIELDS:
            np.testing.assert_array_equal(f[f"inrun/{k}"][()], whole[k], err_msg=k)
        assert all(f[f"inrun/{k}"].fletcher32 for k in f["inrun"])
        scores = {k: f[f"scores/{k}"][()] for k in f["scores"]}
    fields = {**{k: v for k, v in whole.items() if k != "ids"}, "row": row}
    for k, v in inrun_scores.aggregate(fields, len(ids), set(inrun_scores.NEEDS)).items():
        assert np.array_equal(scores[k], v, equal_nan=True), k
    assert found == store.warnings_of(whole) and found[0].startswith(f"{int(np.isnan(whole['loss']).sum())} of "
                                                                      f"{len(row)} records have a non-finite loss")


def test_writing_a_recording_holds_a_few_row_files_not_every_record(tmp_path):
    """40 row files of one rank: the rewrite's peak (numpy's allocations) stays under a
    quarter of the records' bytes (reading them all at once takes more than all of them)."""
    journal = _journal(tmp_path, [(0, 0, [list(range(10 * k, 10 * k + 10)) for k in range(40)])], batch=512)
    size = sum(v.nbytes for v in _all_at_once(journal).values())
    tracemalloc.start()
    try:
        store.write(tmp_path / "r.h5", journal, config={}, fingerprint={"inrun": 1}, loss="cross_entropy",
                    wanted=set(inrun_scores.NEEDS), complete=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < size / 4, (peak, size)


def test_ctrl_c_stops_a_rewrite_at_its_next_chunk_and_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    """Ctrl-C is held while the scores file is written (a KeyboardInterrupt inside HDF5's
    write callback crashes the process). A rewrite of 10⁸ records takes minutes: it stops at
    its next chunk of records, the file on disk is the last rewrite's, and no temp file stays."""
    import signal
    journal = _journal(tmp_path)
    out = tmp_path / "r.h5"
    options = dict(config={}, fingerprint={"inrun": 1}, loss="cross_entropy", wanted={"loss"}, complete=False)
    store.write(out, journal, **options)
    before, chunks = out.read_bytes(), len(list(store.iter_rows(journal)))
    added, plain = [], inrun_scores.Aggregator.add

    def add(self, rows):
        added.append(len(rows["row"]))
        if len(added) == 2:
            signal.raise_signal(signal.SIGINT)
        plain(self, rows)
    monkeypatch.setattr(inrun_scores.Aggregator, "add", add)
    with pytest.raises(KeyboardInterrupt):
        store.write(out, journal, **options)
    assert len(added) == 2 < chunks
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["r.h5", "r.h5.partial"]


def test_a_row_file_removed_between_the_two_passes_is_named(tmp_path, monkeypatch):
    journal = _journal(tmp_path)
    gone, ids = store.row_files(journal)[3], store._ids

    def first_pass(files):
        found = ids(files)
        gone.unlink()
        return found
    monkeypatch.setattr(store, "_ids", first_pass)
    with pytest.raises(OutputError, match=rf"{gone.name}: a row file of this in-run recording was removed while"):
        store.write(tmp_path / "r.h5", journal, config={}, fingerprint={"inrun": 1}, loss="cross_entropy",
                    wanted={"loss"}, complete=True)
    assert not (tmp_path / "r.h5").exists()


def test_row_files_whose_steps_go_back_are_refused_by_name(tmp_path):
    journal = _journal(tmp_path, [(0, 0, [[0, 1, 2], [1, 2]])])
    with pytest.raises(OutputError, match=r"rank000_000001\.npz: its steps go back"):
        list(store.iter_rows(journal))


def test_close_shows_a_progress_bar_and_the_rewrites_in_training_do_not(tmp_path, monkeypatch):
    """Closing a recording of 10⁸ records writes for minutes: a bar on the terminal (tqdm's
    own choice, disable=None), over every record. The rewrites during training stay silent:
    the training's own output is the user's."""
    import torch
    import torch.nn.functional as F
    import gradscore as gs
    from helpers import progress_bars
    bars = progress_bars(monkeypatch, store)
    torch.manual_seed(0)
    model, x, y = torch.nn.Linear(5, 3), torch.randn(8, 5), torch.randint(0, 3, (8,))
    rec = gs.InRun(model, out=tmp_path / "r.h5", flush_every=0)
    for t in range(3):
        with rec.step(range(8), y):
            F.cross_entropy(model(x), y).backward()
    assert bars and all(b.disable is True for b in bars)   # the first rewrite at least (the next are spaced)
    rec.close()
    assert bars[-1].disable is None and bars[-1].total == bars[-1].done == 24


def test_diagnose_terms_hold_the_examples_not_a_float_per_record(monkeypatch):
    """`diagnose --score inrun_value` reads 10⁸ records in blocks: the clip's quantile of the
    records' norms is selected in passes over them (at most ``quantile.HOLD`` held), so the
    peak is O(N) and a block, not a float per record; the terms equal one block's to the bit."""
    from gradscore.scores import quantile
    n, steps, batch = 500, 8000, 250
    rng = np.random.default_rng(0)
    fields = {"row": rng.integers(0, n, steps * batch), "lr": np.full(steps * batch, 0.1, np.float32),
              "dot": rng.standard_normal(steps * batch).astype(np.float32),
              "share_sq_norm": rng.exponential(1, steps * batch).astype(np.float32),
              "sq_norm": rng.exponential(1, steps * batch).astype(np.float32),
              "target_norm": rng.uniform(1, 2, steps * batch).astype(np.float32)}
    fields["target_norm"][: 10 * batch] = np.nan   # steps without a target
    whole = inrun_scores.dot_terms(lambda keys: [{k: fields[k] for k in keys}], n)
    asked = []

    def blocks(keys):   # each pass reads only the fields it asks for
        asked.append(sorted(keys))
        for a in range(0, steps * batch, 4 * batch):
            yield {k: fields[k][a:a + 4 * batch].copy() for k in keys}
    monkeypatch.setattr(quantile, "HOLD", 2_000)
    tracemalloc.start()
    try:
        terms = inrun_scores.dot_terms(blocks, n)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    for k, v in whole.items():
        assert np.array_equal(terms[k], v, equal_nan=True), k
    assert peak < 0.25 * steps * batch * 8, peak / (steps * batch * 8)
    quantile_fields = ["dot", "lr", "share_sq_norm", "target_norm"]   # not the rows, nor the full norms
    assert len(asked) > 2 and asked[:-1] == [quantile_fields] * (len(asked) - 1), asked
    assert asked[-1] == sorted(inrun_scores.DOT_TERM_FIELDS)


def test_a_recording_resumed_by_a_newer_gradscore_writes_its_older_rows(tmp_path, monkeypatch):
    """A recording continued after an upgrade: its first rows, written before records kept
    the label, lack the field its later rows have. The rewrite took the fields of the first
    row file and stopped at the first later row's label (a KeyError). It writes them all,
    without the label check the older rows cannot have."""
    import sys
    real = _records
    monkeypatch.setattr(sys.modules[__name__], "_records", lambda rng, steps, batch: {   # segment 1 on: upgraded
        k: v for k, v in real(rng, steps, batch).items() if k != "label" or min(steps, default=0) >= 9})
    journal = _journal(tmp_path)
    out = tmp_path / "r.h5"
    store.write(out, journal, config={"every": 1}, fingerprint={"inrun": 1}, loss="cross_entropy",
                wanted=set(inrun_scores.NEEDS), complete=True)
    with h5py.File(out) as f:
        assert "label" not in f["inrun"] and len(f["inrun/step"]) == len(f["inrun/loss"]) > 0
