"""Evaluation harness against independent references written here (float64 numpy, the model's
plain forward run once per scored token, lm-eval-harness's published formulas), for what the
other evaluation tests leave implicit:

* which tokens a continuation score sums: log p(cont[j] | ctx + cont[:j]) for every j, the first
  read at the last context position; nothing from the context; BOS only conditions;
* scores, greedy flags and perplexities do not depend on the batch a request lands in, on how
  much padding its bucket adds, or on batch_tokens / min_len;
* perplexity is token-weighted over the corpus (sum of NLL / tokens scored), not a mean of
  per-document perplexities;
* acc / acc_norm / acc_byte as lm-eval-harness computes them (its continuation is
  target_delimiter + choice, its lengths are those of the choice alone);
* regex answers take the group that matched (GSM8K's two-alternative "flexible extract");
* win rate = (wins + ties / 2) / n against a pairwise count; non-finite rewards are errors;
* reward-model scores do not depend on the batch's padding;
* malformed spec files, completion files and duplicate task names fail naming file and entry.
"""

import json
import math

import numpy as np
import pytest

from flaxlm.evaluation import generate_tasks as G
from flaxlm.evaluation import loglik
from flaxlm.evaluation.loglik import ContinuationScore, LoglikScorer
from flaxlm.evaluation.tasks import TaskFileError, TaskSpec, read_examples, resolve_tasks
from flaxlm.evaluation.winrate import (
    bootstrap_interval,
    read_completions,
    win_rate,
    win_rate_from_scores,
)

BATCH_TOKENS = 128  # the shapes test_loglik.py compiles: shared, compiled once


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _brute_force(ref_logits, ctx, cont):
    """(sum of log p(cont[j] | ctx + cont[:j]), every cont[j] the argmax), one forward of the
    prefix alone per continuation token, its last position read in float64."""
    total, greedy = 0.0, True
    for j, t in enumerate(cont):
        last = np.asarray(ref_logits(list(ctx) + list(cont[:j]))[-1], np.float64)
        total += float(_log_softmax64(last)[t])
        greedy &= int(np.argmax(last)) == t
    return total, greedy


def _requests(seed, n, max_ctx=40, max_cont=6, vocab=400):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k, m = int(rng.integers(1, max_ctx)), int(rng.integers(1, max_cont))
        ids = rng.integers(4, vocab, k + m).tolist()
        out.append((ids[:k], ids[k:]))
    return out


# --- which tokens are scored -------------------------------------------------------------------


def test_continuation_score_is_the_token_by_token_forward(model, ref_logits):
    cfg, params = model
    reqs = _requests(1, 6) + [([2], [17, 40, 9]), ([2, 30], [5])]  # BOS-only context too
    # The model's own argmax continuation, so the greedy flag is tested when True as well.
    ctx = [2, 50, 60, 70]
    cont = []
    for _ in range(3):
        cont.append(int(np.argmax(ref_logits(ctx + cont)[-1])))
    reqs.append((ctx, cont))
    got = LoglikScorer(cfg, params, batch_tokens=BATCH_TOKENS).score(reqs)
    for (c, k), g in zip(reqs, got):
        want, greedy = _brute_force(ref_logits, c, k)
        assert g.logprob == pytest.approx(want, abs=2e-4), (c, k)
        assert (g.greedy, g.n_tokens, g.truncated) == (greedy, len(k), False)
        # Off by one either way is far off: the context's last token is never scored, and the
        # first continuation token is not predicted from the position before the last.
        shifted, _ = _brute_force(ref_logits, c[:-1] or [2], [c[-1], *k[:-1]])
        assert abs(g.logprob - shifted) > 1e-3 or len(c) == 1
    assert got[-1].greedy and not all(g.greedy for g in got)


def test_scores_do_not_depend_on_batch_composition_or_padding(model):
    """A request scored alone in the smallest bucket, or among rows four times its length
    (its bucket padded from 16 to 64 positions), or with other batch sizes: the same score."""
    cfg, params = model
    reqs = _requests(2, 14, max_ctx=58)
    alone = [LoglikScorer(cfg, params, batch_tokens=64, min_len=1).score([r])[0] for r in reqs]
    for bt, min_len in [(BATCH_TOKENS, 16), (4096, 64), (64, 64)]:
        got = LoglikScorer(cfg, params, batch_tokens=bt, min_len=min_len).score(reqs[::-1])[::-1]
        np.testing.assert_allclose([g.logprob for g in got], [a.logprob for a in alone],
                                   rtol=0, atol=5e-5)  # fmt: skip
        assert [g.greedy for g in got] == [a.greedy for a in alone]


def test_a_mixture_of_experts_scores_alike_in_every_bucket():
    """With a capacity factor, padding took expert slots and the capacity grew with the bucket
    length: the same request scored -37.90 in a 16-token bucket and -38.03 in a 64-token one.
    The scorer runs the model dropless, as `generate` decodes it."""
    import jax
    import jax.numpy as jnp

    from flaxlm.models.config import get_variant
    from flaxlm.models.transformer import Transformer, forward

    cfg = get_variant("tiny", n_experts=4, moe_capacity_factor=1.0)
    params = Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, params)  # sharper routing
    reqs = _requests(5, 4, max_ctx=12, max_cont=5, vocab=cfg.vocab_size)
    scores = [[g.logprob for g in LoglikScorer(cfg, params, min_len=m).score(reqs)]
              for m in (16, 64)]  # fmt: skip
    np.testing.assert_allclose(scores[0], scores[1], rtol=0, atol=5e-5)
    dropless = cfg.replace(moe_capacity_factor=0.0)
    ctx, cont = reqs[0]
    logits = forward(dropless, params, jnp.asarray([ctx + cont[:-1]]))[0]
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    want = sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
    assert scores[0][0] == pytest.approx(want, abs=1e-4)


def test_split_continuation_scores_the_joint_tokenisation(tok):
    """The scored ids are exactly BOS + encode(context + continuation): a space (or any text)
    that merges with the continuation's first token is scored as continuation, never dropped
    or double counted; the context part is a prefix of the context's own encoding."""
    cases = [("Answer: ", "Paris"), ("Answer:", " Paris"), ("x = 12", "34"), ("ab", "c"),
             ("Kavo lives in", " Oslo."), ("名字是", "北京"), ("Q:\n", "\nA"),
             ("", " first")]  # fmt: skip
    for context, continuation in cases:
        ctx, cont = loglik.split_continuation(tok, context, continuation)
        assert ctx + cont == [tok.bos_id] + tok.encode(context + continuation)
        assert ctx[0] == tok.bos_id and len(cont) >= 1
        assert ctx[1:] == tok.encode(context)[: len(ctx) - 1]
        assert tok.decode(cont).strip() in continuation or continuation.strip() in tok.decode(cont)
        no_bos = loglik.split_continuation(tok, context, continuation, bos=False)
        assert no_bos == (ctx[1:], cont)


# --- perplexity aggregation ----------------------------------------------------------------------


def test_perplexity_is_token_weighted_over_the_corpus(model, tok, ref_logprobs):
    """nll = sum of every token's NLL / tokens scored (lm-eval-harness's corpus-level
    word/byte perplexity does the same), so a long document weighs by its length; the mean of
    per-document NLLs is a different number here. Batch size and document order change
    nothing."""
    cfg, params = model
    texts = ["Kavo lives in Paris.", "Melir has a pet dog and a small red parrot at home.", "7"]
    per_doc = [-ref_logprobs([tok.bos_id] + tok.encode(t)) for t in texts]
    nll_all = np.concatenate(per_doc)
    scorer = LoglikScorer(cfg, params, batch_tokens=BATCH_TOKENS, pad_id=tok.pad_id)
    got = loglik.perplexity(scorer, tok, texts)
    assert got["tokens"] == nll_all.size == sum(len(tok.encode(t)) for t in texts)
    assert got["nll"] == pytest.approx(nll_all.mean(), rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(nll_all.mean()), rel=1e-5)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert got["bits_per_byte"] == pytest.approx(nll_all.sum() / math.log(2) / n_bytes, rel=1e-5)
    other = LoglikScorer(cfg, params, batch_tokens=4096, pad_id=tok.pad_id)
    again = loglik.perplexity(other, tok, texts[::-1])
    assert again["nll"] == pytest.approx(got["nll"], rel=1e-6)


class _CharTok:
    """A tokenizer of one id per character, BOS 2 (perplexity's aggregation on its own)."""

    bos_id, eos_id = 2, 3

    def encode(self, text):
        return [ord(c) for c in text]


class _CostScorer:
    """log p of a token = -cost of its character, whatever the context."""

    max_len = 8
    COST = {"a": 1.0, "b": 5.0}

    def score(self, requests):
        return [ContinuationScore(-sum(self.COST[chr(t)] for t in cont), len(cont), False)
                for _, cont in requests]  # fmt: skip


def test_perplexity_aggregation_is_tokens_not_documents():
    """Two tokens of NLL 1 and twenty of NLL 5 (in 3 windows of 8): the corpus NLL is
    (2 + 100) / 22, not the mean of the documents' NLLs (1 + 5) / 2 = 3."""
    got = loglik.perplexity(_CostScorer(), _CharTok(), ["aa", "b" * 20])
    assert (got["tokens"], got["windows"], got["docs"]) == (22, 4, 2)
    assert got["nll"] == pytest.approx(102 / 22)
    assert got["ppl"] == pytest.approx(math.exp(102 / 22))
    assert got["bits_per_byte"] == pytest.approx(102 / math.log(2) / 22)


# --- multiple choice as lm-eval-harness scores it -----------------------------------------------


def _lm_eval_preds(lls, choices):
    """lm-eval-harness ConfigurableTask.process_results: `choices` are doc_to_choice's texts
    (the request's continuation is target_delimiter + choice)."""
    lls = np.asarray(lls, np.float64)
    completion_len = np.array([float(len(c)) for c in choices])
    byte_length = np.array([float(len(c.encode("utf-8"))) for c in choices])
    return {"acc": int(np.argmax(lls)), "acc_norm": int(np.argmax(lls / completion_len)),
            "acc_byte": int(np.argmax(lls / byte_length))}  # fmt: skip


class _FixedScorer:
    def __init__(self, logprobs):
        self.out = [ContinuationScore(lp, 1, False) for lp in logprobs]

    def score(self, requests):
        assert len(requests) == len(self.out)
        return self.out


@pytest.mark.parametrize(
    "lls, choices",
    [
        ([-1.0, -1.8], ["a", "bc"]),  # per char -1 < -0.9; with the space -0.5 > -0.6
        ([-2.0, -5.5], ["ab", "cdefg"]),
        ([-3.0, -3.2, -9.0], ["北京", "Rome", "Lima and Oslo"]),  # bytes vs characters
        ([-4.0, -4.0], ["xy", "zw"]),  # a tie: the first choice, as np.argmax
    ],
)  # fmt: skip
def test_acc_norm_and_acc_byte_follow_lm_eval_harness(lls, choices):
    """The world's choices carry their delimiter (" Paris", the continuation lm-eval-harness
    scores); its acc_norm divides by len("Paris"). Dividing by len(" Paris") picked choice 0 in
    the first case. Chat mode (choices stripped) now normalises the same way."""
    want = _lm_eval_preds(lls, choices)
    req = [[([1], [2])] * len(choices)]
    for shown in ([" " + c for c in choices], choices, ["\n" + c for c in choices]):
        metrics, (s,) = loglik.multiple_choice(_FixedScorer(lls), req, [shown], [want["acc_norm"]])
        assert {k: s["pred"][k] for k in want} == want, shown
        assert metrics["acc_norm"] == 1.0


# --- generation: answer extraction ---------------------------------------------------------------


def test_regex_answer_is_the_group_that_matched(tmp_path):
    """lm-eval-harness's GSM8K "flexible extract" has one group per alternative; group 1 alone
    was None whenever the second alternative matched (a one-digit answer), so a right answer
    scored 0 as "not extracted" and a gold_regex like it made the gold answer None."""
    flexible = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
    assert G.extract_answer("so the total is 7", flexible, "last") == "7"
    assert G.extract_answer("costs $12, then 7", flexible, "first") == "$12,"
    assert G.extract_answer("no digits", flexible) is None
    spec = TaskSpec("g", "generation", "f", scoring="regex", answer_regex=flexible,
                    regex_select="last", normalize="number")  # fmt: skip
    assert G.score_response(spec, {"answer": "7"}, "3 + 4 = 7") == {
        "exact_match": 1.0, "extracted": 1.0}  # fmt: skip
    path = tmp_path / "g.jsonl"
    rows = [{"question": "3 + 4?", "answer": "3 + 4 = 7. The answer is 7"},
            {"question": "10 + 2?", "answer": "#### 12"}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gold = TaskSpec("g", "generation", str(path), fields={"prompt": "question"},
                    gold_regex=r"#### (\d+)|answer is (\d+)")  # fmt: skip
    assert [ex.fields["answer"] for ex in read_examples(gold)] == ["7", "12"]


def test_generation_response_stops_at_the_first_stop_token_or_string(tok):
    """Greedy stopping as the scored text sees it: the response ends at the first stop token
    (text after it is dropped even if it holds the answer), then at the earliest stop string."""
    end = tok.token_id("<|end|>")
    a, b = tok.encode(" Paris"), tok.encode(" Lima")
    rows = [{"prompt": "Where?", "answer": "Paris"}] * 3
    outs = [a + [end] + b, b + [tok.eos_id] + a, a + tok.encode("\nQ: x\n\n") + b]
    ex = [type("E", (), {"fields": r, "source": f"f:{i}"})() for i, r in enumerate(rows)]
    spec = TaskSpec("g", "generation", "f", stop=("\n\n", "\nQ:"))
    metrics, samples = G.generation(spec, ex, [("Where?", [tok.bos_id, 5])] * 3,
                                    lambda ids, n: outs, tok, max_prompt_len=64,
                                    stop_tokens=(tok.eos_id, end))  # fmt: skip
    assert [s["response"] for s in samples] == ["Paris", "Lima", "Paris"]
    assert metrics["exact_match"] == pytest.approx(2 / 3)


# --- win rate ------------------------------------------------------------------------------------


def test_win_rate_matches_a_pairwise_count_and_rejects_nan():
    rng = np.random.default_rng(0)
    sa = np.round(rng.normal(size=200), 1)  # rounded: many exact ties
    sb = np.round(rng.normal(size=200), 1)
    for margin in (0.0, 0.15):
        d = sa - sb
        wins = int(np.sum(d > margin))
        ties = int(np.sum(np.abs(d) <= margin))
        r = win_rate_from_scores(sa.tolist(), sb.tolist(), tie_margin=margin)
        assert (r["wins"], r["ties"], r["losses"]) == (wins, ties, 200 - wins - ties)
        assert r["win_rate"] == pytest.approx((wins + 0.5 * ties) / 200)
        # identical models: 0.5 exactly, every prompt a tie
        assert win_rate_from_scores(sa.tolist(), sa.tolist(), tie_margin=margin)["win_rate"] == 0.5
        # the bootstrap resamples prompts: a numpy reference with the same generator
        idx = np.random.default_rng(3).integers(0, 200, size=(500, 200))
        per = np.where(d > margin, 1.0, np.where(d < -margin, 0.0, 0.5))[idx].mean(1)
        lo, hi = bootstrap_interval(d, margin, n_boot=500, seed=3)
        assert (lo, hi) == pytest.approx(tuple(np.percentile(per, [2.5, 97.5])))
    # A NaN reward counted as a tie (NaN > x and NaN < x are both false); now an error.
    with pytest.raises(ValueError, match=r"B's score of prompt 1 is nan"):
        win_rate(lambda p, r: [1.0, float("nan")] if r[0] == "b" else [0.0, 0.0], ["p", "q"],
                 ["a", "a2"], ["b", "b2"])  # fmt: skip
    with pytest.raises(ValueError, match="tie_margin must be >= 0"):  # was wins + losses > n
        win_rate_from_scores([1.0, 0.0], [1.0, 0.0], tie_margin=-1.0)


def test_win_rate_means_and_a_cluster_bootstrap_over_prompts_of_unequal_samples():
    """The means are over every line; the cluster bootstrap's win rate pools each resample's
    lines (the win rate counts every line), so its interval holds the point estimate when the
    prompts have different numbers of samples: 50 prompts with 3 won samples and 50 with 1 lost
    one win 150 of 200 lines (0.75), while a mean of per-prompt rates would sit near 0.5."""
    sa, sb = [1.0, 2.0, 4.5, -1.0], [0.5, 3.0, 1.0, -1.0]
    r = win_rate_from_scores(sa, sb)
    assert (r["mean_a"], r["mean_b"]) == pytest.approx((np.mean(sa), np.mean(sb)))
    assert r["mean_margin"] == pytest.approx(np.mean(np.subtract(sa, sb)))
    margins = [1.0] * 150 + [-1.0] * 50
    groups = [i // 3 for i in range(150)] + [100 + i for i in range(50)]
    rate = win_rate_from_scores(margins, [0.0] * 200)["win_rate"]
    assert rate == 0.75
    lo, hi = bootstrap_interval(margins, groups=groups, n_boot=400)
    assert lo < rate < hi and hi - lo < 0.2


def test_reward_scores_do_not_depend_on_the_batch_padding(model, tok):
    from flaxlm.evaluation.winrate import reward_model_scorer

    cfg, lm_params = model
    head = {"kernel": np.random.default_rng(1).normal(size=cfg.d_model).astype(np.float32),
            "bias": np.float32(0.0)}  # fmt: skip
    params = {"transformer": lm_params, "head": head}
    prompts = ["Where does Kavo live?", "What is 2 plus 3? " * 4, "Hi"]
    responses = ["The answer is Paris.", "The answer is 5.", ""]
    alone = [reward_model_scorer(cfg, params, tok, batch_size=1)([p], [r])[0]
             for p, r in zip(prompts, responses)]  # fmt: skip
    together = reward_model_scorer(cfg, params, tok, batch_size=4)(prompts, responses)
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-4)


# --- bad input ------------------------------------------------------------------------------------


def test_bad_spec_values_name_the_spec_file_and_entry(tmp_path):
    (tmp_path / "g.jsonl").write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    ok = {"name": "ok", "type": "generation", "file": "g.jsonl"}
    bad = [
        ({"type": "mc"}, r"type='mc'"),
        ({"scoring": "regex"}, "scoring='regex' needs answer_regex"),
        ({"answer_regex": "(", "scoring": "regex"}, "bad regex"),
        ({"max_new_tokens": 0}, "max_new_tokens=0 must be >= 1"),  # failed only in the decoder
        ({"fields": {"question": "q"}}, r"fields has unknown field\(s\) \['question'\]"),
    ]
    for extra, match in bad:
        (tmp_path / "s.json").write_text(json.dumps([ok, {**ok, "name": "b", **extra}]))
        with pytest.raises(ValueError, match=rf"s\.json\[1\]: task 'b': {match}"):
            resolve_tasks([str(tmp_path / "s.json")])
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(TaskFileError, match=r"empty\.json: no task specs"):
        resolve_tasks([str(tmp_path / "empty.json")])
    # Results are keyed by name: a second task of the same name silently replaced the first.
    (tmp_path / "a.json").write_text(json.dumps(ok))
    (tmp_path / "b.json").write_text(json.dumps([{**ok, "name": "x"}, {**ok, "max_new_tokens": 9}]))
    with pytest.raises(ValueError, match=r"'ok' appears twice \(.*a\.json\[0\] and .*b\.json\[1\]"):
        resolve_tasks([str(tmp_path / "a.json"), str(tmp_path / "b.json")])


def test_completion_files_with_non_text_values_name_the_line(tmp_path):
    good = json.dumps({"prompt": "p", "completion": "c"})
    for line, match in [
        (json.dumps({"prompt": "p", "completion": None}), "completion must be a string, got"),
        (json.dumps({"prompt": 3, "completion": "c"}), "prompt must be a string or a list"),
        (json.dumps({"prompt": [{"role": "user"}], "completion": "c"}), "prompt must be"),
    ]:
        (tmp_path / "c.jsonl").write_text(f"{good}\n\n{line}\n")
        with pytest.raises(ValueError, match=rf"c\.jsonl:3: {match}"):
            read_completions(str(tmp_path / "c.jsonl"))
    msgs = [{"role": "user", "content": "p"}]
    (tmp_path / "m.jsonl").write_text(json.dumps({"prompt": msgs, "completion": "c"}) + "\n")
    assert read_completions(str(tmp_path / "m.jsonl")) == [(msgs, "c")]


def test_chat_mode_cannot_hide_the_options_a_lettered_task_shows(run_dir, tok_path, tmp_path):
    """An MMLU-style spec shows the options in `template` ({choices_block}) and scores the
    letters; chat mode's default user turn is the bare context, so `--chat on` (or auto, for
    any SFT/DPO checkpoint: README's `--checkpoint runs/sft --tasks my_mmlu.json`) scored
    " A".." D" for a question whose options the model never saw. Now an error saying what to
    set; with chat_template the user turn shows them."""
    from flaxlm.evaluation import prompts as P
    from flaxlm.evaluation.__main__ import main

    row = {"question": "2 + 2 =", "choices": ["3", "4"], "answer": 1}
    (tmp_path / "mmlu.jsonl").write_text(json.dumps(row) + "\n")
    spec = {"name": "mmlu", "type": "multiple_choice", "file": "mmlu.jsonl",
            "fields": {"context": "question"}, "choice_template": " {letter}",
            "template": "Question: {context}\n{choices_block}\nAnswer:"}  # fmt: skip
    (tmp_path / "mmlu.json").write_text(json.dumps(spec))
    with pytest.raises(SystemExit, match=r"task 'mmlu': template shows \{choices_block\} but "):
        main(["--checkpoint", run_dir, "--tokenizer", tok_path, "--chat", "on",
              "--tasks", str(tmp_path / "mmlu.json")])  # fmt: skip
    ok = TaskSpec.from_dict({**spec, "chat": True, "chat_template": "{context}\n{choices_block}"},
                            str(tmp_path))  # fmt: skip
    (ex,) = read_examples(ok)
    assert P.chat_messages(ok, ex, [])[-1]["content"] == "2 + 2 =\nA. 3\nB. 4"
    # A task without {choices_block} keeps the bare-question default (the world's, SFT's).
    TaskSpec("plain", "multiple_choice", "f", chat=True, template="Q: {context}\nA:")
