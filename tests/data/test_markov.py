"""data/markov.py: the synthetic Markov stream is the chain it claims, split across processes
by rows, a pure function of (seed, batch index) for resume, and unchanged from release to
release (a run resumed on a newer flaxlm must see the batches it would have seen)."""

import hashlib

import numpy as np
import pytest

from flaxlm.data.markov import MarkovStream


def _digest(batch: dict) -> str:
    return hashlib.sha256(b"".join(np.ascontiguousarray(batch[k]).tobytes()
                                   for k in sorted(batch))).hexdigest()  # fmt: skip


def test_the_stream_is_pinned():
    """Batch 7 of this stream, as the first implementation (numpy `searchsorted` per token)
    drew it: the faster Python sampler draws the same tokens."""
    batch = MarkovStream(64, 32, 4, seed=5, branching=3, doc_len=(4, 20)).batch(7)
    assert batch["tokens"][0][:8].tolist() == [32, 44, 27, 23, 47, 21, 61, 33]
    assert _digest(batch) == "0e0f045786c5c9764713ef9c4c3401e13314b7eb349b065cc28ed665e82cabdc"


def test_batches_follow_the_chain_within_documents():
    s = MarkovStream(50, 64, 8, seed=1, branching=3, doc_len=(5, 30))
    for _ in range(3):
        b = next(s)
        assert {k: v.shape for k, v in b.items()} == dict.fromkeys(b, (8, 64))
        same = b["loss_mask"].astype(bool)
        seg = b["segment_ids"]  # a token's target is in its document (the last one's unseen)
        np.testing.assert_array_equal(same[:, :-1], seg[:, 1:] == seg[:, :-1])
        for row in range(8):
            for t in np.flatnonzero(same[row]):  # a transition inside a document
                assert b["targets"][row, t] in s.successors[b["tokens"][row, t]]
            starts = np.flatnonzero(b["positions"][row] == 0)
            assert starts[0] == 0 and all(b["segment_ids"][row, i] != b["segment_ids"][row, i - 1]
                                          for i in starts[1:])  # fmt: skip
        assert not b["targets"][~same].any()  # no target across a document boundary
    # the entropy rate is below the unigram entropy: context is informative
    assert 0 < s.entropy_rate() < s.unigram_entropy() <= np.log(50)


def test_processes_draw_their_rows_of_the_global_batch_and_resume_exactly():
    whole = MarkovStream(32, 16, 4, seed=2)
    parts = [MarkovStream(32, 16, 4, seed=2, process_index=i, process_count=2) for i in (0, 1)]
    want = whole.batch(3)
    for k in want:
        np.testing.assert_array_equal(np.concatenate([p.batch(3)[k] for p in parts]), want[k])
    for _ in range(2):
        next(whole)
    resumed = MarkovStream(32, 16, 4, seed=2)
    resumed.set_state(whole.get_state())
    assert _digest(next(resumed)) == _digest(next(whole))
    with pytest.raises(ValueError, match="data state is for seed 2, this stream has 9"):
        MarkovStream(32, 16, 4, seed=9).set_state(whole.get_state())
    with pytest.raises(ValueError, match="global_batch=3 not divisible by 2 procs"):
        MarkovStream(32, 16, 3, process_count=2)


@pytest.mark.parametrize("vocab,branching", [(50, 3), (4096, 4)])
def test_the_stationary_distribution_is_the_chains_fixed_point(vocab, branching):
    """π P = π against the dense transition matrix, π a distribution; the sparse iteration
    makes a 4096-token chain cheap (the dense one took ~40 s there)."""
    s = MarkovStream(vocab, 16, 2, seed=3, branching=branching)
    pi = s.stationary()
    P = np.zeros((vocab, vocab))
    np.put_along_axis(P, s.successors, s.probs, axis=1)
    assert pi.min() >= 0 and abs(pi.sum() - 1) < 1e-12
    np.testing.assert_allclose(pi @ P, pi, atol=1e-12)
    assert s.stationary() is pi  # cached
    want_rate = -(pi[:, None] * s.probs * np.log(s.probs)).sum()
    assert s.entropy_rate() == pytest.approx(want_rate, rel=1e-12)
