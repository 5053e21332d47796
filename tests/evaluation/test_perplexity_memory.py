"""Host memory of perplexity evaluation (`loglik.perplexity` -> `window_requests` ->
`LoglikScorer.score`), and that holding the windows compactly changed no score.

The rolling-window requests of the whole corpus were built before scoring as Python int lists:
~40 bytes a token (an 8-byte list slot + a 32-byte int; only ids < 256 are shared), so a corpus
of 100M tokens held ~4 GB of requests. Now each document is one int32 array and its windows are
views of it (4 bytes a token, plus a few hundred bytes a window).

The model's forward is replaced by an exact integer function of every token before each target
(`_fake_run`), so no model runs and the totals are compared with `==`; the real forward is
checked against `perplexity` in test_loglik.py.
"""

import tracemalloc

import numpy as np
import pytest

from flaxlm.evaluation import loglik
from flaxlm.models.config import get_variant

DOC_CHARS = 2000  # tokens a document (one id per character)
WORDS = "the river forest answer is a of and to that have with city people name".split()


class _CharTok:
    """One id per character, all >= 300: none is a cached small int, as with a real tokenizer's
    32k+ vocabulary."""

    bos_id, eos_id, pad_id, unk_id = 1, 2, 0, 3

    def encode(self, text, **kw):
        return [300 + ord(c) % 700 for c in text]


def _fake_run(tokens, targets, mask):
    """(sums, greedy) as `LoglikScorer._run` returns them: each target's "log-prob" is an integer
    function of the target and of the sum of every input token of its row up to it, over 8 (all
    exact in float32 and float64, so any grouping of the sums gives the same total)."""
    c = np.cumsum(tokens.astype(np.int64), axis=1)
    v = (targets.astype(np.int64) * 31 + c * 7) % 97
    return -(v * (mask > 0)).sum(-1).astype(np.float32) / 8.0, (targets % 3 == 0).all(-1)


def _scorer(max_len):
    cfg = get_variant("tiny", vocab_size=1024, max_seq_len=max_len)
    scorer = loglik.LoglikScorer(cfg, None, batch_tokens=4096)  # (no model is run)
    scorer._run = _fake_run
    return scorer


def _texts(n, chars=DOC_CHARS, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, chars)).ljust(chars)[:chars] for _ in range(n)]


def _peak(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("stride", [0, 64])
def test_perplexity_holds_windows_compactly(stride):
    """Peak traced host memory per document of 2,000 tokens (windows of 256, stride 256 / 64),
    measured at 20 and 80 documents, the growth per added document: on the old code 83.5 KB
    (stride 256) and 135.5 KB (stride 64: a token sits in up to 4 windows' lists); now 12.2 KB
    and 23.5 KB: the int32 array (8 KB) and, per window, two views and its score."""
    scorer, n = _scorer(256), 20
    small, large = _texts(n), _texts(4 * n)
    run = lambda texts: loglik.perplexity(scorer, _CharTok(), texts, stride=stride)  # noqa: E731
    run(small[:2])  # (first-call allocations out of the measurement)
    per_doc = (_peak(lambda: run(large)) - _peak(lambda: run(small))) / (3 * n)
    bound = 16_000 if stride == 0 else 40_000  # the old code: 83.5 KB / 135.5 KB
    assert per_doc < bound, f"{per_doc:.0f} bytes per document"


def _old_window_requests(ids, max_len, stride=0):
    """The windows as they were built (Python lists): the reference for the windows scored."""
    stride = stride or max_len
    reqs, begin, scored = [], 0, 1
    while scored < len(ids):
        end = min(begin + max_len + 1, len(ids))
        reqs.append((list(ids[begin:scored]), list(ids[scored:end])))
        scored, begin = end, begin + stride
    return reqs


def _reference_nll_sum(ids, max_len, stride):
    """Straightforward: token t is scored in the first window [j*stride, j*stride + max_len + 1)
    that reaches it, with the tokens from that window's start as context."""
    stride, total = stride or max_len, 0
    for t in range(1, len(ids)):
        j = 0
        while j * stride + max_len + 1 <= t:
            j += 1
        c = sum(ids[j * stride : t])
        total += (ids[t] * 31 + c * 7) % 97
    return total / 8.0


class _Recorder:
    """A stand-in scorer that keeps the requests it is given, read as (list, list) pairs."""

    max_len = 32

    def __init__(self):
        self.seen = []

    def score(self, requests):
        self.seen = [(list(c), list(d)) for c, d in requests]
        return [loglik.ContinuationScore(0.0, len(d), False) for _, d in self.seen]


@pytest.mark.parametrize("max_len,stride,eos", [(32, 0, False), (32, 7, True), (8, 1, False)])
def test_perplexity_scores_and_windows_unchanged(max_len, stride, eos):
    """The same windows (as the old list-building code made them), the same total NLL (exact,
    against a per-token reference), tokens, bytes and window count, on documents from one to
    a few windows long, an empty one included."""
    tok = _CharTok()
    texts = [*_texts(3, chars=100, seed=1), "a", "", "b c", *_texts(2, chars=33, seed=2)]
    got = loglik.perplexity(_scorer(max_len), tok, texts, stride=stride, eos=eos)
    docs = [[tok.bos_id] + tok.encode(t) + ([tok.eos_id] if eos else []) for t in texts]
    want = sum(_reference_nll_sum(d, max_len, stride) for d in docs)
    assert got["nll"] * got["tokens"] == pytest.approx(want, rel=1e-12)
    assert got["tokens"] == sum(len(d) - 1 for d in docs)
    old = [r for d in docs for r in _old_window_requests(d, max_len, stride)]
    assert got["windows"] == len(old)
    assert got["bytes"] == sum(len(t.encode()) for t in texts)
    rec = _Recorder()
    rec.max_len = max_len
    loglik.perplexity(rec, tok, texts, stride=stride, eos=eos)
    assert rec.seen == old
    for d in docs:  # window_requests alone: views of one int32 array, read back as the lists
        reqs = loglik.window_requests(d, max_len, stride)
        assert [(list(c), list(x)) for c, x in reqs] == _old_window_requests(d, max_len, stride)
