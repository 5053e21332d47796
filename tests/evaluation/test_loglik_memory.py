"""Host memory of multiple-choice evaluation (`Evaluator.run` -> `loglik.multiple_choice` ->
`LoglikScorer.score`), and that holding the ids compactly changed no score.

Every request was held as Python int lists, each question's context once per choice (and once
more as `list(ctx)[cut:]`, and once more as the scorer's joined row), all requests of the task
built before scoring: ~36 bytes a token (an 8-byte list slot + a 28-byte int; only ids < 256 are
shared), so a 5-shot question of ~800 tokens with 4 choices held ~185 KB: 50k questions, gigabytes.
Now a question's choices share one int32 context array (a cut context is a view of it) and the
scorer keeps only each row's length until it fills the row's batch.

The model's forward is replaced by an exact integer function of every token before each target
(`_fake_run`), so no model is trained or run and the scores are compared with `==`; the real
forward is checked against these paths in test_loglik.py and test_eval_audit.py.
"""

import json
import tracemalloc

import numpy as np
import pytest

from flaxlm.evaluation import harness, loglik, prompts, tasks
from flaxlm.models.config import get_variant

N_QUESTIONS, N_CHOICES, N_SHOTS = 200, 4, 5
WORDS = "the river forest answer is a of and to that have with city people name".split()


class _CharTok:
    """One id per character, all >= 300: none is a cached small int, as with a real tokenizer's
    32k+ vocabulary (the built-in test tokenizer's 400 ids would hide part of the old cost)."""

    bos_id, eos_id, pad_id, unk_id = 1, 2, 0, 3

    def encode(self, text, **kw):
        return [300 + ord(c) % 700 for c in text]

    def special_ids(self):
        return {"pad": 0, "bos": 1, "eos": 2, "unk": 3}

    def check_fits(self, vocab_size):
        assert vocab_size >= 1000


def _fake_run(tokens, targets, mask):
    """(sums, greedy) of a batch as `LoglikScorer._run` returns them: each target's "log-prob"
    is an integer function of the target and of the sum of every input token up to it, so a
    score depends on the whole (cut) context; integers, so exact whatever the batch or bucket."""
    c = np.cumsum(tokens.astype(np.int64), axis=1)
    v = (targets.astype(np.int64) * 31 + c * 7) % 97
    sums = -(v * (mask > 0)).sum(-1).astype(np.float32) / 8.0
    return sums, (targets % 3 == 0).all(-1)


def _reference_score(ctx, cont, max_len):
    """Straightforward: the joined ids, the left cut to max_len + 1 tokens, the same function."""
    seq = np.asarray(ctx + cont, np.int64)[-(max_len + 1) :]
    c = np.cumsum(seq[:-1])
    v = (seq[1:] * 31 + c * 7) % 97
    return -float(np.float32(v[-len(cont) :].sum())) / 8.0


def _task(path, n):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(rng.choice(WORDS, 20)) + f" {i}?"
            chs = [" ".join(rng.choice(WORDS, 1 + k)) + f" {k}" for k in range(N_CHOICES)]
            f.write(json.dumps({"question": q, "choices": chs, "answer": i % N_CHOICES}) + "\n")
    return tasks.TaskSpec("mc", "multiple_choice", str(path), fields={"context": "question"},
                          template="Question: {context}\nAnswer:", num_fewshot=N_SHOTS)  # fmt: skip


def _evaluator(max_seq_len):
    cfg = get_variant("tiny", vocab_size=1024, max_seq_len=max_seq_len)
    ev = harness.Evaluator(cfg, None, _CharTok(), batch_tokens=8192)  # (no model is run)
    ev.scorer._run = _fake_run
    return ev


def _reference(spec, max_len):
    """Samples' log-probs, token counts, truncation and acc_norm, computed directly from the
    task rows."""
    examples = tasks.read_examples(spec)
    tok, logprobs, n_tokens, truncated, hits = _CharTok(), [], [], [], []
    for ex in examples:
        text = prompts.plain_prompt(spec, ex, prompts.select_shots(spec, ex, examples))
        chs = [prompts.choice_text(spec, ex.fields, i, text) for i in range(N_CHOICES)]
        ctx = [tok.bos_id] + tok.encode(text)  # (one id per character: the split is exact)
        cut = max(0, *(len(ctx) + len(tok.encode(c)) - (max_len + 1) for c in chs))
        lp = [_reference_score(ctx[cut:], tok.encode(c), max_len) for c in chs]
        lens = [len(c.lstrip()) for c in chs]
        pred = int(np.argmax(np.asarray(lp) / np.asarray(lens, np.float64)))
        logprobs.append(lp)
        n_tokens.append([len(tok.encode(c)) for c in chs])
        truncated.append(cut > 0)
        hits.append(float(pred == ex.fields["answer"]))
    return logprobs, n_tokens, truncated, float(np.mean(hits))


@pytest.mark.parametrize("max_seq_len", [2048, 600])  # every context fits / every one is cut
def test_multiple_choice_holds_ids_compactly_and_scores_alike(tmp_path, max_seq_len):
    """Peak traced host memory per question of this 200-question, 5-shot, 4-choice task of ~790
    characters (= tokens) a prompt, measured on the old code: 182 KB (168 KB with max_seq_len 600,
    every context cut); now 10.5 KB (9.6 KB). At 2k questions: 185.6 KB before, 8.2 KB now; what
    is left is mostly the int32 contexts, the prompt texts and the samples the result holds."""
    spec = _task(tmp_path / "mc.jsonl", N_QUESTIONS)
    ev = _evaluator(max_seq_len)
    tracemalloc.start()
    try:
        res = ev.run(spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_question = peak / N_QUESTIONS
    assert per_question < 40_000, f"{per_question:.0f} bytes held per question"

    logprobs, n_tokens, truncated, acc_norm = _reference(spec, max_seq_len)
    samples = res["samples"]
    assert [s["logprobs"] for s in samples] == logprobs  # exactly: integer arithmetic
    assert [s["truncated"] for s in samples] == truncated == [max_seq_len < 2048] * N_QUESTIONS
    assert [s["n_tokens"] for s in samples] == n_tokens
    assert res["metrics"]["acc_norm"] == acc_norm
    assert res["metrics"]["truncated"] == sum(truncated) and res["metrics"]["n"] == N_QUESTIONS
    # The samples are what `multiple_choice` makes of the same requests as plain lists (the
    # layout before), scored by the same scorer: every field equal, types included.
    requests, choices, answers = [], [], []
    for ex, s in zip(tasks.read_examples(spec), samples):
        chs = [prompts.choice_text(spec, ex.fields, i, s["prompt"]) for i in range(N_CHOICES)]
        requests.append([loglik.split_continuation(_CharTok(), s["prompt"], c) for c in chs])
        choices.append(chs)
        answers.append(ex.fields["answer"])
    as_lists = _evaluator(max_seq_len).scorer
    metrics, plain = loglik.multiple_choice(as_lists, requests, choices, answers)
    assert metrics == res["metrics"]
    for got, want in zip(samples, plain):
        assert {k: got[k] for k in want} == want
        assert [type(x) for x in got["logprobs"] + got["n_tokens"]] == [float] * 4 + [int] * 4
    assert as_lists.shapes == ev.scorer.shapes  # the same batches


def test_token_requests_read_as_lists_and_score_as_lists(tmp_path):
    """`TokenRequests` (what `multiple_choice` now passes a scorer) reads back as the (list,
    list) pairs it used to pass, so a stand-in scorer sees the old requests; the scorer reading
    the arrays directly gives the scores it gives the lists."""
    rng = np.random.default_rng(1)
    ids = lambda n: rng.integers(4, 1000, int(rng.integers(1, n))).tolist()  # noqa: E731
    pairs = [(ids(40), ids(6)) for _ in range(37)]
    reqs = loglik.TokenRequests()
    for ctx, cont in pairs:
        reqs.append(np.asarray(ctx, np.int32), np.asarray(cont, np.int32))
    assert list(reqs) == pairs and reqs[3:5] == pairs[3:5] and len(reqs) == len(pairs)
    assert all(type(x) is int for ctx, cont in reqs for x in ctx + cont)
    a, b = _evaluator(32).scorer, _evaluator(32).scorer  # some rows cut to 33 tokens
    assert a.score(reqs) == b.score(pairs) and a.shapes == b.shapes
    assert any(s.truncated for s in a.score(reqs))
