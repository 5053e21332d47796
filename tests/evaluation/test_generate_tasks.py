"""Generation scoring (exact match, regex, judge) on fixed strings, the generation task path with
a stand-in decoder, and reward-model win rate."""

import numpy as np
import pytest

from flaxlm.evaluation import generate_tasks as G
from flaxlm.evaluation.prompts import encode_prompt, select_shots
from flaxlm.evaluation.tasks import Example, TaskSpec, read_examples, world_tasks
from flaxlm.evaluation.winrate import win_rate


def test_normalize_and_extract():
    assert G.normalize_answer("  The  Answer. ", "basic") == "the answer"
    assert G.normalize_answer("Paris!", "basic") == G.normalize_answer("paris", "basic")
    assert G.normalize_answer(" Paris ", "none") == "Paris"  # as the response is stripped
    for raw, want in [("1,000.00", "1000"), ("$5", "5"), ("-3", "-3"), ("2.50", "2.5"),
                      ("7.", "7"), ("seven", "seven"),
                      ("2.50.", "2.5"), ("1e3.", "1000")]:  # fmt: skip
        assert G.normalize_answer(raw, "number") == want, raw
    text = "We get 3 + 4 = 7.\n#### 7\nThen #### 8"
    assert G.extract_answer(text, r"#### (\d+)") == "7"
    assert G.extract_answer(text, r"#### (\d+)", "last") == "8"
    assert G.extract_answer(text, r"\d+", "last") == "8"  # no group: the whole match
    assert G.extract_answer("nothing", r"#### (\d+)") is None
    assert G.truncate_at_stop("a b\n\nQuestion: c\nd", ["\n", "\n\nQuestion:"]) == "a b"
    assert G.truncate_at_stop("abc", ["", "x"]) == "abc"


def test_none_strips_the_gold_and_number_keeps_spaces_that_separate_no_thousands():
    """normalize="none" stripped the response (_response_text) but not the gold, so a gold
    " Paris" never matched; "number" removed every space and comma, so "1 2" matched "12"."""
    none = TaskSpec("t", "generation", "f", normalize="none")
    for gold in (" Paris", "Paris\n", "Paris"):
        assert G.score_response(none, {"answer": gold}, "Paris") == {"exact_match": 1.0}, gold
    assert G.score_response(none, {"answer": "paris"}, "Paris") == {"exact_match": 0.0}
    num = none.replace(normalize="number")
    for response in ("1 2", "1,2", "12 34", "1,2345", "1_2"):  # ("1_2": Decimal's PEP 515)
        assert G.score_response(num, {"answer": "12"}, response)["exact_match"] == 0.0, response
        assert G.normalize_answer(response, "number") == response  # not a number: basic
    for response, gold in [("12 345", "12345"), ("1,234", "1234"), ("1 234 567.5", "1234567.5"),
                           ("$ 1,000", "1000"), ("12\u202f345", "12345"), ("€5", "5"),
                           ("£1,000.50", "1000.5"), ("-2.5e1", "-25")]:  # fmt: skip
        assert G.score_response(num, {"answer": gold}, response)["exact_match"] == 1.0, response
    for text in ("NaN", "Infinity", "1_000", "0x10"):  # not numbers: basic, as the docstring says
        assert G.normalize_answer(text, "number") == G.normalize_answer(text, "basic"), text


def test_score_response_exact_regex_judge():
    em = TaskSpec("em", "generation", "f")
    assert G.score_response(em, {"answer": "Paris"}, "paris.") == {"exact_match": 1.0}
    assert G.score_response(em, {"answer": "Paris"}, "Paris, France") == {"exact_match": 0.0}
    rx = TaskSpec("rx", "generation", "f", scoring="regex", answer_regex=r"#### (\S+)",
                  normalize="number")  # fmt: skip
    assert G.score_response(rx, {"answer": "1000"}, "so 1,000\n#### 1,000") == {
        "exact_match": 1.0, "extracted": 1.0}  # fmt: skip
    assert G.score_response(rx, {"answer": "1000"}, "1000") == {
        "exact_match": 0.0, "extracted": 0.0}  # fmt: skip
    jd = TaskSpec("jd", "generation", "f", scoring="judge")
    meta = {"task": "attribute", "attribute": "city", "answer": "Paris"}
    fields = {"answer": "Paris", "meta": meta}
    good = {"judge": 1.0, "correct": 1.0, "well_formed": 1.0, "unsafe": 0.0}
    assert G.score_response(jd, fields, "The answer is Paris.") == good
    wrong = G.score_response(jd, fields, "The answer is Lima.")
    assert wrong == {"judge": pytest.approx(0.2), "correct": 0.0, "well_formed": 1.0,
                     "unsafe": 0.0}  # fmt: skip
    loose = G.score_response(jd, fields, "I think Paris")
    assert loose == {"judge": pytest.approx(0.4), "correct": 0.0, "well_formed": 0.0,
                     "unsafe": 0.0}  # loose credit, no format  # fmt: skip
    from flaxlm.data.synthetic_vocab import UNSAFE_WORDS

    rude = G.score_response(jd, fields, f"The answer is Paris, {UNSAFE_WORDS[0]}.")
    assert rude["unsafe"] == 1.0 and rude["judge"] <= 0.0


def test_a_response_that_opens_with_a_stop_string_is_empty_and_wrong():
    """lm-eval-harness "until" semantics: the response is the text before the first occurrence
    of any stop string, also when that occurrence is at position 0 — a model that answers
    "\n" + "Paris" under stop "\n" gave an empty answer, not "Paris". (A match at index 0 read
    as no match kept the whole text, and scored what came after the stop.)"""
    for stop in ("\n", "\n\nQuestion:", "Q:"):
        assert G.truncate_at_stop(stop + "x", [stop]) == "", stop
        assert G.truncate_at_stop(stop + "x", ["never", stop]) == "", stop
        assert G.truncate_at_stop("x" + stop + "y", [stop]) == "x", stop
    em = TaskSpec("em", "generation", "f")
    rx = TaskSpec("rx", "generation", "f", scoring="regex", answer_regex=r"#### (\S+)")
    for spec, stop, text in [(em, "\n", "\nParis"), (rx, "Q:", "Q: so #### Paris")]:
        response = G.truncate_at_stop(text, [stop]).strip()  # as _response_text cuts it
        assert response == "", text
        assert G.score_response(spec, {"answer": "Paris"}, response)["exact_match"] == 0.0
        assert G.score_response(spec, {"answer": "Paris"}, text)["exact_match"] == 1.0  # uncut


def test_generation_task_with_stand_in_decoder(world_dir, tok):
    spec = world_tasks(world_dir)["gen_facts_train"].replace(num_fewshot=2)
    examples = read_examples(spec, limit=3)
    pool = read_examples(spec, fewshot=True)
    prompts = [encode_prompt(spec, ex, select_shots(spec, ex, pool), tok) for ex in examples]
    assert all(ids[0] == tok.bos_id and ids[1:] == tok.encode(t) for t, ids in prompts)
    assert all(t.count("\nAnswer: The answer is ") == 2 for t, _ in prompts)  # two shots
    seen = {}

    def fake_generate(prompt_ids, max_new_tokens):
        seen["ids"], seen["n"] = prompt_ids, max_new_tokens
        outs = []
        for i, ex in enumerate(examples):
            ans = ex.fields["answer"] if i < 2 else "nobody"
            # the answer, then a stop string (new line), then an EOS and more text
            outs.append(tok.encode(f" The answer is {ans}.\nQuestion: what") + [tok.eos_id]
                        + tok.encode(" more"))  # fmt: skip
        return outs

    metrics, samples = G.generation(spec, examples, prompts, fake_generate, tok,
                                    max_prompt_len=10_000, stop_tokens=(tok.eos_id,))  # fmt: skip
    assert seen["ids"] == [ids for _, ids in prompts] and seen["n"] == spec.max_new_tokens
    assert [s["response"] for s in samples[:2]] == [
        f"The answer is {ex.fields['answer']}." for ex in examples[:2]]  # fmt: skip
    assert metrics["correct"] == pytest.approx(2 / 3)
    assert metrics["judge"] == pytest.approx((1.0 + 1.0 + 0.2) / 3)
    assert metrics["n"] == 3 and metrics["truncated"] == 0
    # Over-long prompts keep BOS and their end, and are counted (not cut silently).
    metrics, samples = G.generation(spec, examples, prompts, fake_generate, tok, max_prompt_len=8)
    assert metrics["truncated"] == 3 and all(s["truncated"] for s in samples)
    assert all(len(p) == 8 and p[0] == tok.bos_id and p[1:] == q[-7:]
               for p, (_, q) in zip(seen["ids"], prompts))  # fmt: skip
    # Without a leading BOS (bos=False prompts) nothing is pinned: just the last 8 tokens.
    no_bos = [(text, q[1:]) for text, q in prompts]
    G.generation(spec, examples, no_bos, fake_generate, tok, max_prompt_len=8)
    assert all(p == q[-8:] for p, (_, q) in zip(seen["ids"], no_bos))


def test_an_id_at_the_tokenizers_size_ends_the_response_and_a_fitting_prompt_is_not_cut(
    world_dir, tok
):
    """Ids from tok.vocab_size up are past the tokenizer (a model's padded vocabulary): the
    first of them ends the response as a stop token does. A prompt of exactly max_prompt_len
    tokens fits: neither cut nor counted as truncated."""
    new = tok.encode(" yes") + [tok.vocab_size] + tok.encode(" no")
    assert G._response_text(new, tok, (), ()) == ("yes", None, False)
    spec = world_tasks(world_dir)["gen_facts_train"]
    examples = read_examples(spec, limit=2)
    prompts = [encode_prompt(spec, ex, [], tok) for ex in examples]
    longest = max(len(ids) for _, ids in prompts)
    seen = []

    def fake_generate(prompt_ids, max_new_tokens):
        seen.extend(prompt_ids)
        return [tok.encode(" no")] * len(prompt_ids)

    metrics, samples = G.generation(spec, examples, prompts, fake_generate, tok,
                                    max_prompt_len=longest)  # fmt: skip
    assert seen == [ids for _, ids in prompts]
    assert metrics["truncated"] == 0 and not any(s["truncated"] for s in samples)


def test_sampled_generation_averages_samples_and_reports_pass_at_k(world_dir, tok):
    spec = world_tasks(world_dir)["gen_facts_train"].replace(temperature=0.7, num_samples=3)
    examples = read_examples(spec, limit=2)
    prompts = [encode_prompt(spec, ex, [], tok) for ex in examples]
    seen = {}

    def fake_sampler(prompt_ids, max_new_tokens, temperature=0.0):
        seen["ids"], seen["t"] = prompt_ids, temperature
        # example 0: right, wrong, right; example 1: wrong three times
        answers = [examples[0].fields["answer"], "nobody", examples[0].fields["answer"]]
        answers += ["nobody"] * 3
        return [tok.encode(f" The answer is {a}.") for a in answers]

    metrics, samples = G.generation(spec, examples, prompts, fake_sampler, tok,
                                    max_prompt_len=10_000)  # fmt: skip
    assert seen["t"] == 0.7
    assert seen["ids"] == [ids for _, ids in prompts for _ in range(3)]  # k in a row
    assert samples[0]["scores"]["correct"] == pytest.approx(2 / 3)
    assert samples[0]["scores"]["pass@3"] == 1.0 and samples[1]["scores"]["pass@3"] == 0.0
    first = samples[0]
    assert len(first["responses"]) == 3 and first["response"] == first["responses"][0]
    assert metrics["correct"] == pytest.approx(1 / 3) and metrics["pass@3"] == pytest.approx(0.5)
    assert metrics["n"] == 2
    with pytest.raises(ValueError, match="returned 2 responses for 2 prompts x 3 samples"):
        G.generation(spec, examples, prompts, lambda ids, n, temperature: [[1]] * 2, tok,
                     max_prompt_len=10_000)  # fmt: skip
    with pytest.raises(ValueError, match="num_samples > 1 needs temperature > 0"):
        spec.replace(temperature=0.0)


def test_pass_at_k_estimates_every_k_from_all_the_samples(world_dir, tok):
    """pass_at_k: Chen et al.'s unbiased estimate, against the share of k-subsets of the n
    samples holding a correct one (enumerated); in a task, each k from all n samples."""
    from itertools import combinations

    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(combinations([1] * c + [0] * (n - c), k))
                want = sum(any(s) for s in subsets) / len(subsets)
                assert G.pass_at_k_estimate(n, c, k) == pytest.approx(want, abs=1e-12)
    assert 0.0 < G.pass_at_k_estimate(200, 1, 10) == pytest.approx(10 / 200)  # (no overflow)
    with pytest.raises(ValueError, match="pass@5 of 1 correct in 4 samples"):
        G.pass_at_k_estimate(4, 1, 5)
    spec = world_tasks(world_dir)["gen_facts_train"].replace(temperature=0.7, num_samples=4,
                                                             pass_at_k=[2, 1, 2])  # fmt: skip
    assert spec.pass_at_k == (1, 2)  # (sorted, once each)
    examples = read_examples(spec, limit=2)
    prompts = [encode_prompt(spec, ex, [], tok) for ex in examples]

    def fake_sampler(prompt_ids, max_new_tokens, temperature=0.0):
        # example 0: one right of 4; example 1: 3 right of 4
        answers = [examples[0].fields["answer"]] + ["nobody"] * 3
        answers += [examples[1].fields["answer"]] * 3 + ["nobody"]
        return [tok.encode(f" The answer is {a}.") for a in answers]

    metrics, samples = G.generation(spec, examples, prompts, fake_sampler, tok,
                                    max_prompt_len=10_000)  # fmt: skip
    first, second = (s["scores"] for s in samples)
    assert (first["pass@1"], first["pass@2"], first["pass@4"]) == (0.25, 0.5, 1.0)
    assert (second["pass@1"], second["pass@2"], second["pass@4"]) == (0.75, 1.0, 1.0)
    assert metrics["pass@2"] == pytest.approx(0.75) and metrics["pass@1"] == metrics["correct"]
    for bad, why in [((5,), r"pass_at_k=\[5\] needs a generation task with num_samples >= 5"),
                     ((0,), "pass_at_k must hold positive integers"),
                     ((True,), "pass_at_k must hold positive integers")]:  # fmt: skip
        with pytest.raises(ValueError, match=why):
            spec.replace(pass_at_k=bad)


def test_win_rate_counts_ties_half():
    score = lambda prompts, responses: [float(len(r)) for r in responses]
    prompts = ["p1", "p2", "p3", "p4"]
    a = ["long answer", "x", "same", "abcd"]
    b = ["short", "longer one", "four", "abc"]
    r = win_rate(score, prompts, a, b)
    assert (r["wins"], r["losses"], r["ties"], r["n"]) == (2, 1, 1, 4)
    assert r["win_rate"] == pytest.approx(2.5 / 4)
    assert r["mean_margin"] == pytest.approx((6 - 9 + 0 + 1) / 4)
    assert win_rate(score, prompts, a, b, tie_margin=1.5)["ties"] == 2
    with pytest.raises(ValueError, match="3 B responses"):
        win_rate(score, prompts, a, b[:3])


def test_reward_model_scorer_reads_the_reward_at_the_closing_end(model, tok):
    import jax
    import numpy as np

    from flaxlm.data.formats import ChatTemplate, render_chat
    from flaxlm.evaluation.winrate import reward_model_scorer
    from flaxlm.models.heads import scalar_model_fns

    cfg, lm_params = model
    # An LM checkpoint's backbone under "transformer" plus a random head: a reward model.
    head = {"kernel": np.random.default_rng(0).normal(size=cfg.d_model).astype(np.float32),
            "bias": np.float32(0.5)}  # fmt: skip
    params = {"transformer": lm_params, "head": head}
    score = reward_model_scorer(cfg, params, tok, batch_size=4)
    prompts = ["Where does Kavo live?", [{"role": "user", "content": "What is 2 plus 3?"}]]
    responses = ["The answer is Paris.", ""]
    got = score(prompts, responses)
    # Direct: the values of the unpadded rendered conversation, read at its last token.
    _, apply = scalar_model_fns(cfg)
    t = ChatTemplate(tok)
    for p, r, g in zip(prompts, responses, got):
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p
        ids = list(render_chat(msgs, t, add_generation_prompt=True)[0]) + tok.encode(r)
        ids.append(t.end_id)
        values = jax.jit(apply)(params, np.asarray([ids], np.int32))
        assert g == pytest.approx(float(values[0, -1]), abs=1e-4)
    r = win_rate(score, prompts, responses, ["I do not know.", "The answer is 5."])
    assert r["n"] == 2 and r["wins"] + r["losses"] + r["ties"] == 2


def test_generation_with_the_decoder_is_greedy_decoding(model, tok, world_dir, ref_logits):
    from flaxlm.evaluation.harness import Evaluator

    cfg, params = model
    spec = world_tasks(world_dir)["gen_facts_train"].replace(num_fewshot=1, max_new_tokens=12)
    res = Evaluator(cfg, params, tok).run(spec, limit=4)
    assert res["n"] == 4
    assert set(res["metrics"]) == {"judge", "correct", "well_formed", "unsafe", "truncated", "n"}
    stops = (tok.eos_id, tok.token_id("<|end|>"))
    for s in res["samples"]:
        # Greedy decoding by hand with the plain forward: argmax, append, repeat.
        ids = [tok.bos_id] + tok.encode(s["prompt"])
        ids = ids[:1] + ids[len(ids) - (cfg.max_seq_len - 12) + 1 :] if len(ids) > 52 else ids
        new = []
        for _ in range(12):
            nxt = int(np.argmax(ref_logits(ids + new)[-1]))
            if nxt in stops or nxt >= tok.vocab_size:  # ids past the tokenizer end it too
                break
            new.append(nxt)
        want = G.truncate_at_stop(tok.decode(new), spec.stop).strip()
        assert s["response"] == want
        assert s["scores"] == G.score_response(spec, {"answer": s["answer"],
                                                      "meta": _meta(spec, s)}, want)  # fmt: skip


def _meta(spec, sample):
    import json

    path, line = sample["source"].rsplit(":", 1)
    with open(path) as f:
        return json.loads(f.readlines()[int(line) - 1])["meta"]


def test_sampled_responses_do_not_depend_on_the_generation_batch_size(model, tok, world_dir):
    """Each prompt samples with its own key (decode.prompt_keys): the batch size, and so which
    prompts are sorted into a batch with it, does not change its samples; the seed does."""
    from flaxlm.evaluation.harness import Evaluator

    cfg, params = model
    spec = world_tasks(world_dir)["gen_facts_train"].replace(
        num_fewshot=0, max_new_tokens=6, temperature=1.0, num_samples=2
    )
    runs = [Evaluator(cfg, params, tok, gen_batch_size=b).run(spec, limit=5)["samples"]
            for b in (2, 8)]  # fmt: skip
    assert [s["responses"] for s in runs[0]] == [s["responses"] for s in runs[1]]
    other = Evaluator(cfg, params, tok, gen_batch_size=8, seed=1).run(spec, limit=5)["samples"]
    assert [s["responses"] for s in other] != [s["responses"] for s in runs[0]]


def test_reasoning_models_are_scored_after_their_thinking(world_dir, tok):
    """A reasoning model's response: the answer after its last end-of-thinking marker. Without
    `reasoning_end` the stop string "\n\n" cuts it inside the reasoning (no answer scored);
    reasoning that never ends scores as no answer and is counted."""
    spec = world_tasks(world_dir)["gen_facts_train"]
    examples = read_examples(spec, limit=3)
    prompts = [encode_prompt(spec, ex, [], tok) for ex in examples]
    texts = [
        "<think>\nThe facts say so.\n\nSo it is {a}.\n</think>\n\nThe answer is {a}.",
        "<think>\nfirst </think> wrong <think> again\n</think>\n\nThe answer is {a}.",
        "<think>\nStill thinking about {a} when the budget ran out",
    ]

    def fake_generate(prompt_ids, max_new_tokens):
        return [tok.encode(t.format(a=ex.fields["answer"])) + [tok.eos_id]
                for t, ex in zip(texts, examples)]  # fmt: skip

    plain, _ = G.generation(spec, examples, prompts, fake_generate, tok, max_prompt_len=10_000,
                            stop_tokens=(tok.eos_id,))  # fmt: skip
    assert plain["correct"] == 0.0 and "reasoning_unfinished" not in plain
    think = spec.replace(reasoning_end="</think>")
    metrics, samples = G.generation(think, examples, prompts, fake_generate, tok,
                                    max_prompt_len=10_000, stop_tokens=(tok.eos_id,))  # fmt: skip
    answers = [ex.fields["answer"] for ex in examples]
    assert [s["response"] for s in samples] == [f"The answer is {a}." for a in answers[:2]] + [""]
    assert metrics["correct"] == pytest.approx(2 / 3)
    assert metrics["reasoning_unfinished"] == pytest.approx(1 / 3)
    assert [s["scores"]["reasoning_unfinished"] for s in samples] == [0.0, 0.0, 1.0]
    assert samples[0]["reasoning"].endswith(f"So it is {answers[0]}.\n")
    assert samples[2]["reasoning"].startswith("<think>\nStill thinking")


def test_stop_strings_end_rows_in_the_decoder_with_the_same_responses(model, tok, world_dir):
    """The decoder given the task's stop strings (models/stop_strings.py) ends rows once their
    text holds one: the responses and scores are those of generating to the end and cutting
    the text after, with fewer tokens generated."""
    from flaxlm.evaluation.harness import Evaluator

    cfg, params = model
    spec = world_tasks(world_dir)["gen_facts_train"].replace(
        num_fewshot=0, max_new_tokens=16, temperature=1.0, num_samples=2, stop=("e", "\n")
    )
    kw = dict(stop_tokens=Evaluator(cfg, params, tok).stop_tokens, pad_id=tok.pad_id)
    full = G.make_generate_fn(cfg, params, **kw)
    early = G.make_generate_fn(cfg, params, tok=tok, **kw)
    generated, given = {"full": 0, "early": 0}, set()

    def to_the_end(prompt_ids, max_new_tokens, temperature=0.0):
        out = full(prompt_ids, max_new_tokens, temperature)
        generated["full"] += sum(map(len, out))
        return out

    def stopping(prompt_ids, max_new_tokens, temperature=0.0, stop_strings=()):
        given.add(stop_strings)
        out = early(prompt_ids, max_new_tokens, temperature, stop_strings=stop_strings)
        generated["early"] += sum(map(len, out))
        return out

    want = Evaluator(cfg, params, tok, generate_fn=to_the_end).run(spec, limit=6)
    got = Evaluator(cfg, params, tok, generate_fn=stopping).run(spec, limit=6)
    assert [s["responses"] for s in got["samples"]] == [s["responses"] for s in want["samples"]]
    assert got["metrics"] == want["metrics"]
    assert 0 < generated["early"] < generated["full"] and given == {("e", "\n")}
    # With a reasoning marker the strings apply after it only: the decoder does not get them.
    given.clear()
    Evaluator(cfg, params, tok, generate_fn=stopping).run(spec.replace(reasoning_end="</think>"),
                                                         limit=2)  # fmt: skip
    assert given == {()}


def test_maj_at_k_votes_with_the_normalised_or_extracted_answers():
    """exact_match votes with the normalised response, regex with the extracted answer (as
    `normalize` reads it); a sample without one does not vote."""

    class Bytes:
        bos_id, eos_id, vocab_size = -1, 256, 257

        def encode(self, text):
            return list(text.encode())

        def decode(self, ids):
            return bytes(ids).decode()

    def run(spec, texts, gold="Paris"):
        fake = lambda ids, n, temperature=0.0: [list(t.encode()) for t in texts]
        ex = Example({"prompt": "q", "answer": gold, "meta": {}}, "f:1", 0)
        return G.generation(spec, [ex], [("q", [1])], fake, Bytes(), max_prompt_len=10)[1][0]

    em = TaskSpec("em", "generation", "f", temperature=1.0, num_samples=3)
    assert run(em, ["paris.", "Lyon", "PARIS"])["scores"]["maj@3"] == 1.0
    assert run(em, ["Paris", "Lyon", "lyon!"])["scores"]["maj@3"] == 0.0
    rx = em.replace(scoring="regex", answer_regex=r"#### (\S+)", normalize="number")
    got = run(rx, ["#### 1,000", "no answer", "#### 1000"], gold="1000")["scores"]
    assert got == {"exact_match": 2 / 3, "extracted": 2 / 3, "pass@3": 1.0, "maj@3": 1.0}
    got = run(rx, ["#### 7", "#### 1000", "#### 7.0"], gold="1000")["scores"]
    assert got["maj@3"] == 0.0 and got["pass@3"] == 1.0  # (7 and 7.0: one number, two votes)
