"""One-item-per-row batch iterators (preference pairs, KTO's examples) draw the same global
batches whatever the number of processes: process p's rows of global batch k are the p-th part
of what one process would put in batch k — across epoch boundaries and resumes."""

import json

import numpy as np
import pytest

from flaxlm.data import formats as F


def _pairs(n):
    row = (np.arange(1, 6, dtype=np.int32), np.ones(5, np.float32))
    return [{"chosen": row, "rejected": row, "margin": float(i)} for i in range(n)]


def _margins(it, batches):
    return [next(it)["margin"].tolist() for _ in range(batches)]


def test_one_process_order_is_unchanged():
    """With one process the layout is the per-epoch permutation of every item (as before)."""
    order = F._GlobalOrder(7, seed=3, shuffle=True, num_epochs=0, process_index=0,
                           process_count=1, chunk=4)  # fmt: skip
    old = F._EpochOrder(7, seed=3, shuffle=True, num_epochs=0)
    for _ in range(30):
        assert order.peek() == old.peek() and order.get_state() == old.get_state()
        order.advance()
        old.advance()


def test_processes_split_each_global_batch():
    pairs, kw = _pairs(11), dict(seq_len=8, pad_id=0, seed=5)
    one = _margins(F.PreferenceBatches(pairs, batch=8, **kw), 6)  # 6 × 8 rows: 4+ epochs
    parts = [_margins(F.PreferenceBatches(pairs, batch=4, process_index=p, process_count=2,
                                          **kw), 6) for p in (0, 1)]  # fmt: skip
    for k in range(6):
        assert parts[0][k] + parts[1][k] == one[k]
    # Resume inside epoch 2 on each process: the same rows follow.
    for p in (0, 1):
        it = F.PreferenceBatches(pairs, batch=4, process_index=p, process_count=2, **kw)
        _margins(it, 3)
        state = it.get_state()
        again = F.PreferenceBatches(pairs, batch=4, process_index=p, process_count=2, **kw)
        again.set_state(state)
        assert _margins(again, 3) == parts[p][3:]


def test_a_finite_pass_splits_the_tail_and_pads_nothing_twice():
    pairs, kw = _pairs(10), dict(seq_len=8, pad_id=0, shuffle=False, num_epochs=1)
    parts = [list(F.PreferenceBatches(pairs, batch=4, process_index=p, process_count=2,
                                      with_index=True, **kw)) for p in (0, 1)]  # fmt: skip
    got = sorted(int(i) for part in parts for b in part for i in b["index"] if i >= 0)
    assert got == list(range(10))  # every pair once
    assert [len(p) for p in parts] == [2, 1]  # batch 1: 8, 9 on process 0, nothing on 1
    blank = F.PreferenceBatches(pairs, batch=4, with_index=True, **kw).blank()
    assert blank["valid"].sum() == 0 and (blank["index"] == -1).all()


def test_packed_sft_batches_are_one_process_batches_split():
    """Packed rows need the whole batch: every process packs the global batch from the same
    order and keeps its rows, so the concatenated parts are one process's batch."""
    rng = np.random.default_rng(0)
    exs = []
    for n in rng.integers(3, 12, 40):
        exs.append({"ids": rng.integers(1, 50, n).astype(np.int32), "mask": np.ones(n, np.float32)})
    kw = dict(seq_len=24, pad_id=0, seed=2)
    one = F.SFTBatches(exs, batch=4, **kw)
    parts = [F.SFTBatches(exs, batch=2, process_index=p, process_count=2, **kw) for p in (0, 1)]
    for _ in range(12):  # several epochs
        whole = next(one)
        halves = [next(it) for it in parts]
        for k, v in whole.items():
            np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), v, err_msg=k)
    # (each process's data state: the same global position)
    assert parts[0]._local_state() == parts[1]._local_state() == one._local_state()


def _global_state(its):
    """The state a checkpoint of simulated processes holds: every process's entry."""
    if len(its) == 1:
        return its[0].get_state()
    entries = {str(p): it.get_state()["processes"][str(p)] for p, it in enumerate(its)}
    return {"process_count": len(its), "processes": entries}


def _sft_examples(n):
    rng = np.random.default_rng(0)
    return [{"ids": ids, "mask": np.ones(len(ids), np.float32)}
            for ids in (rng.integers(5, 99, int(k)).astype(np.int32)
                        for k in rng.integers(2, 15, n))]  # fmt: skip


@pytest.mark.parametrize("saved,resumed", [(2, 4), (2, 1), (1, 2), (4, 2)])
def test_preference_batches_resume_exactly_on_another_process_count(saved, resumed, caplog):
    """The lowest saved process's position is mapped onto the new layout: each process of a
    run with more processes than were saved used to take its own saved entry (process 1 of 4
    resumed at process 1 of 2's place: a pair repeated and one skipped per global batch), and
    the exact 2 -> 1 and 1 -> 2 resumes warned that the order differs."""
    pairs = [{"chosen": (e["ids"], e["mask"]), "rejected": (e["ids"][::-1].copy(), e["mask"]),
              "margin": 1.0} for e in _sft_examples(37)]  # fmt: skip
    kw = dict(seq_len=16, pad_id=0, seed=3, with_index=True)
    one = F.PreferenceBatches(pairs, batch=4, **kw)
    ref = [next(one)["index"].tolist() for _ in range(12)]
    old = [F.PreferenceBatches(pairs, batch=4 // saved, process_index=p, process_count=saved,
                               **kw) for p in range(saved)]  # fmt: skip
    for _ in range(7):
        for it in old:
            next(it)
    state = json.loads(json.dumps(_global_state(old)))
    new = [F.PreferenceBatches(pairs, batch=4 // resumed, process_index=q,
                               process_count=resumed, **kw) for q in range(resumed)]  # fmt: skip
    with caplog.at_level("INFO"):
        for it in new:
            it.set_state(state)
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
    assert "resumed exactly" in caplog.text
    got = [sum((next(it)["index"].tolist() for it in new), []) for _ in range(5)]
    assert got == ref[7:]


@pytest.mark.parametrize("saved,resumed", [(2, 1), (1, 2)])
def test_sft_batches_resume_on_another_process_count_without_a_warning(saved, resumed, caplog):
    exs, kw = _sft_examples(37), dict(seq_len=16, pad_id=0, seed=3)
    one = F.SFTBatches(exs, batch=4, **kw)
    ref = [next(one) for _ in range(12)]
    old = [F.SFTBatches(exs, batch=4 // saved, process_index=p, process_count=saved, **kw)
           for p in range(saved)]  # fmt: skip
    for _ in range(7):
        for it in old:
            next(it)
    state = json.loads(json.dumps(_global_state(old)))
    new = [F.SFTBatches(exs, batch=4 // resumed, process_index=q, process_count=resumed, **kw)
           for q in range(resumed)]  # fmt: skip
    with caplog.at_level("INFO"):
        for it in new:
            it.set_state(state)
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
    for k in range(7, 12):
        parts = [next(it) for it in new]
        for key, v in ref[k].items():
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), v)


def test_another_global_batch_size_still_warns(caplog):
    pairs = _pairs(11)
    old = F.PreferenceBatches(pairs, batch=4, seq_len=8, pad_id=0, seed=1)
    next(old)
    state = old.get_state()
    new = F.PreferenceBatches(pairs, batch=3, seq_len=8, pad_id=0, seed=1, process_index=0,
                              process_count=2)  # fmt: skip
    with caplog.at_level("WARNING"):
        new.set_state(state)
    assert "not the start of one of this run's global batches of 6 rows" in caplog.text


def test_negative_seeds_shuffle_and_non_negative_orders_are_unchanged():
    """numpy takes only non-negative entropy: SFT with seed=-1 used to stop there, where
    pretraining accepts any seed."""
    for seed in (0, 7, 2**40):  # the orders runs have always had
        order = F._EpochOrder(9, seed=seed, shuffle=True, num_epochs=0)
        assert order._make(2).tolist() == np.random.default_rng([seed, 2]).permutation(9).tolist()
    orders = {}
    for seed in (-1, -2, 1, 2):
        e = F._EpochOrder(9, seed=seed, shuffle=True, num_epochs=0)
        g = F._GlobalOrder(9, seed=seed, shuffle=True, num_epochs=0, process_index=0,
                           process_count=1, chunk=3)  # fmt: skip
        seq = []
        for _ in range(18):  # two epochs
            assert g.peek() == e.peek()
            seq.append(e.peek())
            e.advance()
            g.advance()
        assert sorted(seq[:9]) == list(range(9)) and sorted(seq[9:]) == list(range(9))
        orders[seed] = tuple(seq)
    assert len(set(orders.values())) == 4  # -1 is not 1's order, nor -2's
    exs = _sft_examples(10)
    batch = next(F.SFTBatches(exs, batch=2, seq_len=16, pad_id=0, seed=-5))
    assert batch["loss_mask"].sum() > 0


def test_negative_seeds_reach_every_numpy_order():
    """The other orders a run seed reaches numpy through (markov pretraining data, RL prompt
    order) took the same fix: seed=-1 stopped there with "expected non-negative integer"."""
    from flaxlm.alignment.rl_common import PromptCursor
    from flaxlm.data.markov import MarkovStream

    rows = {s: next(iter(MarkovStream(32, 16, 4, seed=s)))["tokens"].tolist() for s in (-1, 1)}
    assert rows[-1] != rows[1]
    kept = next(iter(MarkovStream(32, 16, 4, seed=3)))["tokens"]  # non-negative: as always
    assert kept.tolist() == next(iter(MarkovStream(32, 16, 4, seed=3)))["tokens"].tolist()
    taken = PromptCursor(7, seed=-1).take(14)  # two epochs, each every prompt once
    assert sorted(taken[:7]) == list(range(7)) == sorted(taken[7:])
    assert PromptCursor(7, seed=4)._order().tolist() == (
        np.random.default_rng([4, 0]).permutation(7).tolist()
    )
