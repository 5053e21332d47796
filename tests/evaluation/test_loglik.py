"""Log-likelihood scoring against direct computations with the model's forward."""

import math

import numpy as np
import pytest

from flaxlm.evaluation import loglik
from flaxlm.evaluation.loglik import ContinuationScore, LoglikScorer

BATCH_TOKENS = 128  # as in conftest.py: shared batch shapes compile once

# A small hand-made multiple-choice task: (context, choices, answer).
HAND_TASK = [
    ("Kavo lives in", [" Paris", " Lima", " Oslo"], 0),
    ("The sky is", [" blue", " green and wide", " red"], 0),
    ("7 plus 5 is", [" 12", " 13", " 57"], 1),
    ("Reverse the letters c a t:", [" t a c", " c a t"], 0),
    ("Melir has a pet", [" cat", " parrot", " dog", " fish"], 3),
]


def test_multiple_choice_matches_direct_forward(model, tok, ref_logprobs):
    cfg, params = model
    # A small token budget: several batches, two length buckets, a padded last batch.
    scorer = LoglikScorer(cfg, params, batch_tokens=BATCH_TOKENS, pad_id=tok.pad_id)
    requests = [[loglik.split_continuation(tok, c, ch) for ch in chs] for c, chs, _ in HAND_TASK]
    metrics, samples = loglik.multiple_choice(
        scorer, requests, [t[1] for t in HAND_TASK], [t[2] for t in HAND_TASK]
    )
    hits = {"acc": [], "acc_norm": []}
    for (ctx, choices, gold), sample in zip(HAND_TASK, samples):
        direct = []
        for ch in choices:
            ctx_ids = [tok.bos_id] + tok.encode(ctx)
            full = [tok.bos_id] + tok.encode(ctx + ch)
            assert full[: len(ctx_ids)] == ctx_ids  # the hand-made contexts split cleanly
            # log p of every continuation token: targets len(ctx_ids) .. len(full)-1
            direct.append(float(ref_logprobs(full)[len(ctx_ids) - 1 :].sum()))
        np.testing.assert_allclose(sample["logprobs"], direct, rtol=1e-5, atol=1e-4)
        acc = int(np.argmax(direct))
        # lm-eval-harness divides by len(choice), its " " target delimiter left out
        acc_norm = int(np.argmax([d / len(ch.lstrip()) for d, ch in zip(direct, choices)]))
        assert sample["pred"]["acc"] == acc and sample["pred"]["acc_norm"] == acc_norm
        hits["acc"].append(acc == gold)
        hits["acc_norm"].append(acc_norm == gold)
    assert metrics["n"] == len(HAND_TASK)
    assert metrics["acc"] == pytest.approx(np.mean(hits["acc"]))
    assert metrics["acc_norm"] == pytest.approx(np.mean(hits["acc_norm"]))
    # Two length buckets; the 32 one's tail batch is padded to 2 rows, not to its full 4.
    assert scorer.shapes == {(8, 16), (4, 32), (2, 32)}


class _FixedScorer:
    """Returns given log-probs in request order (the metric logic on its own)."""

    def __init__(self, logprobs, n_tokens):
        self.out = [ContinuationScore(lp, n, False) for lp, n in zip(logprobs, n_tokens)]

    def score(self, requests):
        assert len(requests) == len(self.out)
        return self.out


def test_acc_and_acc_norm_differ_on_constructed_case():
    # Q1: the short wrong choice has the higher total (-4 > -6) but the long right one has the
    # higher per-character score (-6/6 = -1 > -4/2 = -2): acc misses, acc_norm hits.
    # Q2: per character " 北京" (3 chars) -2.0 < " Rome" (5 chars) -1.8, but per UTF-8 byte
    # (7 vs 5 bytes) -0.86 > -1.8: acc_norm and acc_byte disagree; per token -3 > -9.
    choices = [[" a", " abcde"], [" 北京", " Rome"]]
    scorer = _FixedScorer([-4.0, -6.0, -6.0, -9.0], [1, 3, 2, 1])
    requests = [[([1], [2])] * 2, [([1], [2])] * 2]
    metrics, samples = loglik.multiple_choice(scorer, requests, choices, [1, 1])
    assert samples[0]["pred"] == {"acc": 0, "acc_norm": 1, "acc_byte": 1, "acc_token": 1}
    assert samples[1]["pred"] == {"acc": 0, "acc_norm": 1, "acc_byte": 0, "acc_token": 0}
    assert metrics == {"acc": 0.0, "acc_norm": 1.0, "acc_byte": 0.5, "acc_token": 0.5,
                       "truncated": 0, "n": 2}  # fmt: skip


def _direct_windows_nll(ids, L, stride, ref):
    """Token NLLs of ids[1:], each target t scored with context ids[b:t] where b is the start
    of the first window (starts 0, s, 2s, ...; window j ends at j*s + L) that reaches t."""
    s = stride or L
    nll, cache = [], {}
    for t in range(1, len(ids)):
        b = 0 if t <= L else math.ceil((t - L) / s) * s
        end = min(b + L + 1, len(ids))
        if b not in cache:
            cache[b] = ref(ids[b:end])
        nll.append(-cache[b][t - b - 1])
    return nll


@pytest.mark.parametrize("L,stride", [(64, 0), (16, 0), (16, 5)])
def test_perplexity_is_exp_mean_token_nll(model, tok, world_dir, ref_logprobs, L, stride):
    from flaxlm.data.synthetic import read_jsonl

    cfg, params = model
    texts = [r["text"][:150] for r in read_jsonl(f"{world_dir}/heldout_text.jsonl")[:3]]
    scorer = LoglikScorer(cfg, params, batch_tokens=BATCH_TOKENS, pad_id=tok.pad_id)
    got = loglik.perplexity(scorer, tok, texts, max_len=L, stride=stride)
    nll = []
    for t in texts:
        ids = [tok.bos_id] + tok.encode(t)
        assert len(ids) > 20  # several windows when L = 16
        nll += _direct_windows_nll(ids, L, stride, ref_logprobs)
    assert got["tokens"] == len(nll) == sum(len(tok.encode(t)) for t in texts)
    assert got["nll"] == pytest.approx(np.mean(nll), rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(
        np.sum(nll) / math.log(2) / sum(len(t.encode()) for t in texts), rel=1e-5
    )
    # The window actually used is reported (a max_len past the model's is cut to it).
    assert (got["max_len"], got["stride"]) == (L, stride or L)
    n_windows = sum(len(loglik.window_requests([tok.bos_id] + tok.encode(t), L, stride))
                    for t in texts)  # fmt: skip
    assert got["windows"] == n_windows and (L == 64 or n_windows > len(texts))
    if L == 64:
        again = loglik.perplexity(scorer, tok, texts, max_len=10_000)
        assert again["max_len"] == cfg.max_seq_len and again["nll"] == got["nll"]


def test_perplexity_scores_eos_only_with_add_eos(model, tok, tmp_path, ref_logprobs):
    """Perplexity never scored EOS, while pretraining frames documents as BOS + text + EOS and
    its eval loss includes that target (the docstring said every token was predicted). The
    default is unchanged (lm-eval-harness's convention, now documented); add_eos scores EOS."""
    import json

    from flaxlm.evaluation.harness import Evaluator
    from flaxlm.evaluation.tasks import TaskSpec

    cfg, params = model
    texts = ["Kavo lives in Paris.", "The sky is blue.", "Radupin has a pet parrot."]
    scorer = LoglikScorer(cfg, params, batch_tokens=BATCH_TOKENS, pad_id=tok.pad_id)
    plain = loglik.perplexity(scorer, tok, texts)
    with_eos = loglik.perplexity(scorer, tok, texts, eos=True)
    docs = [[tok.bos_id] + tok.encode(t) for t in texts]
    want = lambda seqs: -np.mean(np.concatenate([ref_logprobs(ids) for ids in seqs]))  # noqa: E731
    assert plain["tokens"] == sum(len(d) - 1 for d in docs)
    assert plain["nll"] == pytest.approx(want(docs), rel=1e-5)  # EOS not scored
    assert with_eos["tokens"] == plain["tokens"] + len(texts)
    assert with_eos["nll"] == pytest.approx(want([d + [tok.eos_id] for d in docs]), rel=1e-5)
    assert with_eos["bytes"] == plain["bytes"]
    # Through a task spec; add_eos is a perplexity option only.
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ev = Evaluator(cfg, params, tok, batch_tokens=BATCH_TOKENS)
    spec = TaskSpec("p", "perplexity", str(tmp_path / "p.jsonl"))
    assert ev.run(spec)["metrics"] == plain
    assert ev.run(spec.replace(add_eos=True))["metrics"] == with_eos
    with pytest.raises(ValueError, match="add_eos is for perplexity tasks"):
        TaskSpec("m", "multiple_choice", "f", add_eos=True)


def test_window_requests_score_each_token_once():
    ids = list(range(40))
    for L, s in [(16, 16), (16, 5), (16, 1), (64, 0)]:
        reqs = loglik.window_requests(ids, L, s)
        scored = [t for ctx, cont in reqs for t in cont]
        assert scored == ids[1:]
        assert all(len(ctx) + len(cont) <= L + 1 for ctx, cont in reqs)
        # after the first window every token has at least L - s tokens of context
        assert all(len(ctx) >= L - (s or L) + 1 for ctx, _ in reqs[1:])
    with pytest.raises(ValueError, match="stride"):
        loglik.window_requests(ids, 16, 17)


def test_bucketed_batches_match_direct_and_truncate_left(model, ref_logprobs):
    cfg, params = model
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(30):
        n_ctx, n_cont = int(rng.integers(1, 58)), int(rng.integers(1, 6))
        ids = rng.integers(4, cfg.vocab_size, n_ctx + n_cont).tolist()
        requests.append((ids[:n_ctx], ids[n_ctx:]))
    long_ids = rng.integers(4, cfg.vocab_size, 90).tolist()  # longer than max_len = 64
    requests.append((long_ids[:87], long_ids[87:]))
    scorer = LoglikScorer(cfg, params, batch_tokens=BATCH_TOKENS)
    got = scorer.score(requests)
    for (ctx, cont), g in zip(requests, got):
        seq = (ctx + cont)[-(cfg.max_seq_len + 1) :]
        assert g.logprob == pytest.approx(float(ref_logprobs(seq)[-len(cont) :].sum()), abs=1e-4)
        assert g.n_tokens == len(cont)
        assert g.truncated == (len(ctx) + len(cont) > cfg.max_seq_len + 1)
    assert got[-1].truncated  # the 90-token row: reported, not silently cut
    # Three length buckets; each shape compiles once however many requests there are.
    assert scorer.shapes == {(8, 16), (4, 32), (2, 64)}  # one batch shape per length bucket
    with pytest.raises(ValueError, match="at least one token"):
        scorer.score([([], [5])])


def test_multiple_choice_counts_truncated_questions(model, caplog):
    cfg, params = model  # max_seq_len 64
    scorer = LoglikScorer(cfg, params, batch_tokens=BATCH_TOKENS)
    short, long = list(range(4, 14)), list(range(4, 84))
    requests = [[(short, [20]), (short, [21, 22])], [(long, [20]), (short, [21])]]
    with caplog.at_level("WARNING", logger="flaxlm"):
        metrics, samples = loglik.multiple_choice(scorer, requests, [["a", "b"]] * 2, [0, 1])
    assert metrics["truncated"] == 1 and metrics["n"] == 2
    assert [s["truncated"] for s in samples] == [False, True]
    assert "1 of 4 requests are longer than max_len + 1 = 65 tokens" in caplog.text


def test_chat_mode_multiple_choice_matches_direct_forward(model, tok, world_dir, ref_logprobs):
    import json

    from flaxlm.data.formats import render_chat
    from flaxlm.evaluation.harness import Evaluator
    from flaxlm.evaluation.tasks import world_tasks

    cfg, params = model
    spec = world_tasks(world_dir)["mc_facts_train"].replace(chat=True)
    res = Evaluator(cfg, params, tok, batch_tokens=BATCH_TOKENS).run(spec, limit=3)
    assistant = tok.token_id("<|assistant|>")
    with open(spec.file) as f:
        rows = [json.loads(line) for line in f][:3]
    for row, s in zip(rows, res["samples"]):
        # The user turn is the context; each choice is the assistant's reply, encoded on its own.
        msgs = [{"role": "user", "content": row["context"]}]
        ctx = [int(i) for i in render_chat(msgs, tok, add_generation_prompt=True)[0]]
        assert ctx[0] == tok.bos_id and ctx[-1] == assistant
        direct = [
            float(ref_logprobs(ctx + tok.encode(c.strip()))[len(ctx) - 1 :].sum())
            for c in row["choices"]
        ]
        np.testing.assert_allclose(s["logprobs"], direct, rtol=1e-5, atol=1e-4)
