"""One-item-per-row batch iterators (preference pairs, KTO's examples) draw the same global
batches whatever the number of processes: process p's rows of global batch k are the p-th part
of what one process would put in batch k — across epoch boundaries and resumes."""

import numpy as np

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
