"""Batches drawn ahead (`prefetch`, data/lookahead.py) change nothing a run sees: the same batches
in the same order, `get_state` still names the next batch training takes (a checkpoint taken
with batches in hand resumes at the first of them), and the count ends with the data."""

import json

import numpy as np
import pytest

from flaxlm.data import formats as F
from flaxlm.data import pipeline
from flaxlm.data import tokenizer as T

WORDS = "the river runs past old mill into green valley where farmers grow wheat".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("lookahead")
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, rng.integers(3, 80))) + f" {i}." for i in range(120)]
    path = root / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = str(root / "tok.model")
    T.train(docs, 300, model_path=tok)
    return str(path), tok


def _make(corpus, num_epochs=1):
    c = pipeline.data_config()
    c.sources, c.tokenizer, c.read_threads, c.num_epochs = corpus[0], corpus[1], 1, num_epochs
    return pipeline.make_pretrain_iterator(c, seq_len=32, global_batch=4, seed=3)


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_prefetched_packed_batches_keep_order_and_state(corpus):
    plain = list(_make(corpus))  # every batch of one epoch, drawn one at a time
    n = len(plain)
    it = _make(corpus)
    assert it.finite and not _make(corpus, num_epochs=0).finite
    got = [next(it), next(it)]
    assert it.prefetch(5) == 5
    state = it.get_state()  # 5 batches in hand: the state is the first of them
    assert it.prefetch(3) == 3  # fewer asked than in hand: nothing more drawn
    got += [next(it) for _ in range(5)]
    resumed = _make(corpus)
    resumed.set_state(state)
    _same([next(resumed) for _ in range(5)], got[2:7])
    # Near the end prefetch counts what is left, and the stream still ends where it did.
    assert it.prefetch(n) == n - 7
    got += list(it)
    _same(got, plain)
    assert it.prefetch(4) == 0
    # set_state drops the batches in hand.
    again = _make(corpus)
    again.prefetch(3)
    again.set_state(state)
    _same([next(again)], got[2:3])


def test_prefetched_sft_batches_keep_order_and_state():
    rng = np.random.default_rng(1)
    examples = [{"ids": rng.integers(1, 50, rng.integers(4, 20)).tolist()} for _ in range(60)]
    for ex in examples:
        ex["mask"] = [1] * len(ex["ids"])
    kw = dict(seq_len=32, batch=2, pad_id=0, seed=0, shuffle=True, num_epochs=1)
    plain = list(F.SFTBatches(examples, **kw))
    it = F.SFTBatches(examples, **kw)
    assert it.finite
    next(it)
    assert it.prefetch(4) == 4
    state = it.get_state()
    resumed = F.SFTBatches(examples, **kw)
    resumed.set_state(state)
    _same([next(resumed) for _ in range(4)], plain[1:5])
    assert it.prefetch(len(plain)) == len(plain) - 1
    _same([plain[0]] + list(it), plain)
