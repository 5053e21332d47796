"""Mutation testing, round 7: evaluation/harness.py and evaluation/scaling_bootstrap.py
behaviours the other tests left open, each against a reference written here (hand-counted
budgets, numpy percentiles and standard deviations), not against the code's own text."""

import dataclasses

import numpy as np
import pytest

from flaxlm.evaluation import harness
from flaxlm.evaluation.tasks import Example, TaskSpec
from tests.evaluation.test_eval_reference import _write_jsonl


def test_a_generation_budget_must_leave_the_prompt_two_tokens():
    spec = TaskSpec("g", "generation", "g.jsonl", max_new_tokens=30)
    assert harness.prompt_room(spec, 32) == 2  # BOS and one token of prompt: enough
    with pytest.raises(ValueError, match=r"max_new_tokens=30 leaves no room .*max_seq_len=31"):
        harness.prompt_room(spec, 31)


def _ppl(tmp_path, texts, **kw):
    rows = [{"text": t} for t in texts]
    spec = TaskSpec("p", "perplexity", _write_jsonl(tmp_path / "p.jsonl", rows), **kw)
    ex = [Example({"text": t}, f"p.jsonl:{i + 1}", i) for i, t in enumerate(texts)]
    return spec, ex


def test_a_perplexity_stride_may_equal_its_window_but_not_exceed_it(tmp_path):
    """The window is max_len cut to the model's max_seq_len (as loglik.perplexity cuts it): a
    stride equal to it leaves no gap; wider, tokens go unscored."""
    spec, ex = _ppl(tmp_path, ["a b"], max_len=16, stride=16)
    harness.check_task(spec, ex, [], 64)
    spec, ex = _ppl(tmp_path, ["a b"], max_len=128, stride=64)  # window 64 = max_seq_len
    harness.check_task(spec, ex, [], 64)
    with pytest.raises(ValueError, match=r"stride=65 is wider than the window max_len=64"):
        harness.check_task(dataclasses.replace(spec, stride=65), ex, [], 64)


def test_empty_texts_are_scorable_when_an_eos_is_scored_after_them(tmp_path):
    spec, ex = _ppl(tmp_path, ["", ""], add_eos=True)
    harness.check_task(spec, ex, [], 64)
    with pytest.raises(ValueError, match="every text is empty"):
        harness.check_task(dataclasses.replace(spec, add_eos=False), ex, [], 64)


def test_compact_ids_share_a_context_only_where_it_is_a_prefix():
    """Choices whose contexts are the longest one or a prefix of it share its array (a view);
    one that differs gets its own; values always equal the input's, as int32."""
    reqs = [([1, 2, 3, 4], [9]), ([1, 2, 3], [8, 7]), ([1, 5, 3], [6]), ([1, 2, 3, 4], [5])]
    out = harness._compact_ids(reqs)
    for (ctx, cont), (want_ctx, want_cont) in zip(out, reqs):
        assert ctx.dtype == cont.dtype == np.int32
        assert ctx.tolist() == want_ctx and cont.tolist() == want_cont
    assert out[0][0] is out[3][0] and np.shares_memory(out[1][0], out[0][0])
    assert not np.shares_memory(out[2][0], out[0][0])
    # the longest context is the base whichever choice has it
    out = harness._compact_ids([([1, 2], [3]), ([1, 2, 4], [5])])
    assert out[0][0].tolist() == [1, 2] and np.shares_memory(out[0][0], out[1][0])
    # ids an int32 cannot hold, negative ones included, are left for the scorer to refuse
    for bad in ([-1, 2], [2**31, 1]):
        assert harness._compact_ids([(bad, [1])]) == [(bad, [1])]


def test_context_once_caches_plain_encodes_and_hands_out_copies():
    calls = []

    class Tok:
        pad_id = 0

        def encode(self, text, **kw):
            calls.append((text, kw))
            return [len(text), len(kw)]

    t = harness._ContextOnce(Tok())
    a = t.encode("abc")
    a.append(99)  # the caller owns its list
    assert t.encode("abc") == [3, 0] and calls == [("abc", {})]
    assert t.encode("abc", add_bos=True) == [3, 1]  # other arguments: not from the cache
    assert t.encode("abc", add_bos=True) == [3, 1] and len(calls) == 3
    assert t.pad_id == 0


def test_few_shot_rows_come_from_the_whole_file_when_the_task_is_limited(tmp_path):
    rows = [{"context": f"q{i}", "choices": ["a", "b"], "answer": 0} for i in range(5)]
    spec = TaskSpec("mc", "multiple_choice", _write_jsonl(tmp_path / "mc.jsonl", rows),
                    num_fewshot=2)  # fmt: skip
    from flaxlm.evaluation.tasks import read_examples

    whole = read_examples(spec)
    assert harness._fewshot_pool(spec, whole, None) is whole  # read once
    limited = read_examples(spec, limit=2)
    assert len(harness._fewshot_pool(spec, limited, 2)) == 5  # not the 2 rows evaluated
    assert harness._fewshot_pool(dataclasses.replace(spec, num_fewshot=0), whole, None) == []


# --- scaling_bootstrap -----------------------------------------------------------------------


def test_bootstrap_interval_fields_against_numpy():
    """Each interval: the full-data estimate, the level's central percentiles and the sample
    standard deviation (ddof = 1) of the finite refits, and their count; default keys are the
    fit's float values only; the resampling follows `seed`."""
    from flaxlm.evaluation.scaling_bootstrap import bootstrap

    x = np.asarray([1.0, 4.0, 2.0, 8.0, 5.0, 7.0])

    def fit(x):
        return {"mean": float(x.mean()), "n": len(x), "name": "m"}

    out = bootstrap(fit, {"x": x}, n_boot=50, level=0.8, seed=3)
    assert list(out["intervals"]) == ["mean"] and out["n_failed"] == 0
    s = out["samples"]["mean"]
    iv = out["intervals"]["mean"]
    assert iv["estimate"] == pytest.approx(4.5) and iv["n"] == 50
    assert (iv["lo"], iv["hi"]) == pytest.approx(tuple(np.percentile(s, [10, 90])))
    assert iv["std"] == pytest.approx(np.std(s, ddof=1))
    again = bootstrap(fit, {"x": x}, n_boot=50, level=0.8, seed=3)["samples"]["mean"]
    other = bootstrap(fit, {"x": x}, n_boot=50, level=0.8, seed=4)["samples"]["mean"]
    np.testing.assert_array_equal(s, again)
    assert not np.array_equal(s, other)


def test_bootstrap_draws_every_run():
    """Resamples draw from all n runs (the last one too), with replacement."""
    from flaxlm.evaluation.scaling_bootstrap import bootstrap

    calls = []

    def fit(i):
        calls.append(i.tolist())
        return {"m": float(i.mean())}

    bootstrap(fit, {"i": np.arange(4)}, n_boot=40, seed=0)
    assert calls[0] == [0, 1, 2, 3] and len(calls) == 41  # the full fit, then the resamples
    assert set(sum(calls[1:], [])) == {0, 1, 2, 3}
    assert any(len(set(c)) < 4 for c in calls[1:])  # with replacement


def test_bootstrap_counts_failed_refits_and_refuses_when_all_fail():
    from flaxlm.evaluation.scaling_bootstrap import bootstrap

    calls = []

    def fit(x):
        calls.append(len(calls))
        if len(calls) > 1 and len(calls) % 2:  # the full fit, then every other refit fails
            raise ValueError("degenerate")
        return {"m": float(x.mean())}

    out = bootstrap(fit, {"x": np.arange(5.0)}, n_boot=10, seed=0)
    assert out["n_failed"] == 5 and out["intervals"]["m"]["n"] == 5

    first = []

    def fails(x):
        if first:
            raise ValueError("degenerate")
        first.append(1)
        return {"m": 0.0}

    with pytest.raises(ValueError, match="all 7 refits failed"):
        bootstrap(fails, {"x": np.arange(5.0)}, n_boot=7, seed=0)


def test_one_finite_sample_has_no_standard_deviation():
    from flaxlm.evaluation.scaling_bootstrap import _interval

    iv = _interval(np.asarray([2.0, np.nan, np.nan]), 1.0, 0.95)
    assert (iv["lo"], iv["hi"], iv["n"]) == (2.0, 2.0, 1) and np.isnan(iv["std"])


# --- Evaluator.run with a character tokenizer and a scorer that records its requests ----------


class _CharTok:
    """One id per character (3 + its code), BOS 1, EOS 2, pad 0."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, specials=None, stop_ids=()):
        self._specials = specials or {"pad": 0, "bos": 1, "eos": 2}
        self.stop_ids = stop_ids

    def check_fits(self, vocab_size):
        pass

    def special_ids(self):
        return dict(self._specials)

    def encode(self, text, **kw):
        return [3 + ord(c) for c in text]


class _Scorer:
    max_len = 255

    def __init__(self):
        self.seen = []

    def score(self, reqs):
        from flaxlm.evaluation.loglik import ContinuationScore

        reqs = [(list(map(int, c)), list(map(int, t))) for c, t in reqs]
        self.seen.extend(reqs)
        return [ContinuationScore(-float(len(t)), len(t), False) for _, t in reqs]


def _evaluator(tok=None, **kw):
    from flaxlm.models.config import ModelConfig

    ev = harness.Evaluator(ModelConfig(vocab_size=512, max_seq_len=64), None, tok or _CharTok(),
                           **kw)  # fmt: skip
    ev.scorer = _Scorer()
    return ev


def test_generation_stops_at_eos_end_of_turn_and_the_tokenizers_own_stop_ids():
    tok = _CharTok({"pad": 0, "bos": 1, "eos": 2, "<|end|>": 5, "<|user|>": 6}, (7, 2, -1))
    assert _evaluator(tok).stop_tokens == (2, 5, 7)  # each once, none negative


def test_multiple_choice_without_bos_scores_the_bare_context(tmp_path):
    rows = [{"context": "ab", "choices": ["c", "d"], "answer": 1}]
    spec = TaskSpec("mc", "multiple_choice", _write_jsonl(tmp_path / "mc.jsonl", rows))
    ev = _evaluator(bos=False)
    out = ev.run(spec)
    a, b, sp = 3 + ord("a"), 3 + ord("b"), 3 + ord(" ")
    assert ev.scorer.seen == [([a, b], [sp, 3 + ord("c")]), ([a, b], [sp, 3 + ord("d")])]
    assert out["n"] == 1
    ev = _evaluator()  # with the document prefix: BOS first
    ev.run(spec)
    assert [c for c, _ in ev.scorer.seen] == [[1, a, b]] * 2


def test_a_choice_left_with_an_empty_context_is_refused(tmp_path):
    """No BOS and an empty question: the first choice token would be scored from nothing."""
    rows = [{"context": "", "choices": ["x", "y"], "answer": 0}]
    spec = TaskSpec("mc", "multiple_choice", _write_jsonl(tmp_path / "mc.jsonl", rows))
    with pytest.raises(ValueError, match=r"mc\.jsonl:1: task 'mc': choice 0 \('x'\) gives an "
                       r"empty context"):  # fmt: skip
        _evaluator(bos=False).run(spec)
    _evaluator().run(spec)  # BOS is a context


def test_perplexity_counts_its_rows_and_frames_them_as_asked(tmp_path):
    spec, _ = _ppl(tmp_path, ["ab", "cde"])
    ev = _evaluator(bos=False)
    out = ev.run(spec)
    assert out["n"] == 2 and out["samples"] == [] and out["metrics"]["tokens"] == 1 + 2
    assert ev.scorer.seen[0] == ([3 + ord("a")], [3 + ord("b")])
    ev = _evaluator()
    assert ev.run(spec)["metrics"]["tokens"] == 2 + 3
    assert ev.scorer.seen[0] == ([1], [3 + ord("a"), 3 + ord("b")])


def test_a_long_generation_prompt_is_cut_to_exactly_the_room_the_budget_leaves(tmp_path):
    """max_seq_len 64 − max_new_tokens 54 = 10 prompt tokens: BOS and the prompt's last 9."""
    rows = [{"prompt": "abcdefghijklmnopqrstuvwxyz", "answer": "z"}]
    spec = TaskSpec("g", "generation", _write_jsonl(tmp_path / "g.jsonl", rows),
                    max_new_tokens=54)  # fmt: skip
    seen = []

    class Tok(_CharTok):
        def decode(self, ids):
            return ""

    ev = _evaluator(Tok(), generate_fn=lambda ids, n: seen.extend(ids) or [[]] * len(ids))
    out = ev.run(spec)
    assert [list(p) for p in seen] == [[1] + [3 + ord(c) for c in "rstuvwxyz"]]
    assert out["metrics"]["truncated"] == 1


def test_a_refit_with_a_zero_exponent_keeps_its_parameters_and_leaves_out_its_exponents(
    monkeypatch,
):
    """alpha = 0: the compute-optimal exponents are undefined (NaN, left out of a and b's
    intervals), but the refit itself counts: E, A, B, alpha, beta keep every sample."""
    from flaxlm.evaluation import scaling_bootstrap

    full = {"E": 1.5, "A": 400.0, "B": 900.0, "alpha": 0.3, "beta": 0.3}

    def fit(N, D, loss, *, delta, n_starts=0, init=None):  # every resample repeats a run
        return dict(full) if len(np.unique(N)) == 12 else {**full, "alpha": 0.0}

    monkeypatch.setattr(scaling_bootstrap, "fit_parametric", fit)
    x = np.geomspace(1e6, 1e8, 12)
    out = scaling_bootstrap.bootstrap_parametric(x, 20 * x, np.full(12, 3.0), n_boot=6)
    assert out["n_failed"] == 0
    assert out["intervals"]["E"]["n"] == out["intervals"]["alpha"]["n"] == 6
    assert out["intervals"]["a"]["n"] == out["intervals"]["b"]["n"] == 0
    assert out["intervals"]["a"]["estimate"] == pytest.approx(0.5)  # the full fit's
