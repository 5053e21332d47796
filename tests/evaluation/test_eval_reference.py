"""Evaluation results against references computed here by hand (the model's plain forward on each
sequence alone, a float64 log-softmax), for the cases the other tests do not reach: multiple
choice whose context must be cut, a tokenizer without BOS (an imported HF checkpoint, through
the CLI), exact number matching, and bad task rows / templates that must fail early and say
where."""

import json
import shutil

import jax
import numpy as np
import pytest

from flaxlm.evaluation import generate_tasks as G
from flaxlm.evaluation import loglik
from flaxlm.evaluation.tasks import TaskFileError, TaskSpec, read_examples
from tests.hf_tokenizers import imported_qwen2_run


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _logsoftmax_at(logits, ids):
    """float64 log p(ids[t] | ids[:t]) for t = 1..len-1 from (len, V) logits of ids."""
    lg = np.asarray(logits, np.float64)[: len(ids) - 1]
    m = lg.max(-1, keepdims=True)
    ls = lg - m - np.log(np.exp(lg - m).sum(-1, keepdims=True))
    return ls[np.arange(len(ids) - 1), ids[1:]]


# --- multiple choice: one context cut per question ---------------------------------------------


def test_overlong_question_is_cut_once_for_all_its_choices(model, ref_logprobs):
    """A question whose longest choice overflows max_len + 1 is cut from the left by what that
    choice needs, and its short choice is scored after the same (cut) context: before, each
    choice was cut on its own, so the long one lost the BOS and the short one kept it."""
    cfg, params = model  # max_seq_len 64: rows of at most 65 tokens
    scorer = loglik.LoglikScorer(cfg, params, batch_tokens=128)
    rng = np.random.default_rng(3)
    ctx = [2] + rng.integers(4, 400, 61).tolist()  # BOS + 61 tokens = 62
    short, long = [17], [21, 22, 23, 24]  # 62 + 1 = 63 fits; 62 + 4 = 66 needs a cut of 1
    ok_ctx = [2] + rng.integers(4, 400, 20).tolist()
    requests = [[(ctx, short), (ctx, long)], [(ok_ctx, short), (ok_ctx, long)]]
    metrics, samples = loglik.multiple_choice(scorer, requests, [[" a", " b"]] * 2, [0, 1])
    cut = ctx[1:]  # the same 61 context tokens before each choice
    want = [float(ref_logprobs(cut + c)[-len(c) :].sum()) for c in (short, long)]
    np.testing.assert_allclose(samples[0]["logprobs"], want, rtol=1e-5, atol=1e-4)
    want_ok = [float(ref_logprobs(ok_ctx + c)[-len(c) :].sum()) for c in (short, long)]
    np.testing.assert_allclose(samples[1]["logprobs"], want_ok, rtol=1e-5, atol=1e-4)
    assert [s["truncated"] for s in samples] == [True, False] and metrics["truncated"] == 1
    assert samples[0]["n_tokens"] == [1, 4]
    assert samples[0]["pred"]["acc"] == int(np.argmax(want))
    # A continuation alone longer than max_len: the scorer scores its last max_len tokens
    # after the one before them; the other choice keeps the last context token. Counted.
    huge = rng.integers(4, 400, 70).tolist()
    _, (s2,) = loglik.multiple_choice(scorer, [[(ctx, huge), (ctx, short)]], [["x", "y"]], [0])
    want2 = float(ref_logprobs(huge[-65:]).sum())
    assert s2["logprobs"][1] == pytest.approx(float(ref_logprobs(ctx[-1:] + short)[0]), abs=1e-4)
    assert s2["n_tokens"] == [64, 1] and s2["truncated"]
    assert s2["logprobs"][0] == pytest.approx(want2, abs=1e-3)


# --- a tokenizer without BOS: an imported HF checkpoint evaluated by the CLI --------------------


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """(run dir, tokenizer.json path): the Qwen2 test checkpoint imported as a flaxlm run, with a
    word-level HF tokenizer that, like Qwen2's, has an EOS (<|endoftext|>) and no BOS."""
    return imported_qwen2_run(str(tmp_path_factory.mktemp("hf_eval")))


def test_checkpoint_with_an_hf_tokenizer_without_bos(hf_run, tmp_path):
    """The CLI reads the run's tokenizer.json (it used to accept only SentencePiece), treats an
    imported checkpoint as a base model (--chat auto used to switch it to flaxlm's chat
    template), and a tokenizer without BOS starts documents after EOS: it used to prepend its
    bos_id, -1, which the embedding lookup wraps to the last row, an arbitrary token."""
    from flaxlm.evaluation.__main__ import main
    from flaxlm.evaluation.harness import Evaluator
    from flaxlm.models.hf_tokenizer import load_tokenizer
    from flaxlm.models.transformer import forward
    from flaxlm.train.checkpoint import load_model

    run, tok_file = hf_run
    cfg, params, meta = load_model(run)
    tok = load_tokenizer(tok_file)
    assert (tok.bos_id, tok.eos_id) == (-1, 1) and meta["task"] == "hf_import"
    fwd = jax.jit(lambda p, x: forward(cfg, p, x))

    def ref(ids):  # ids alone, right-padded to max_seq_len (causal: padding is never seen)
        x = np.zeros((1, cfg.max_seq_len), np.int32)
        x[0, : len(ids)] = ids
        return _logsoftmax_at(fwd(params, x)[0], ids)

    # Prompts start with EOS, the prefix (a stand-in decoder records the generation prompts).
    seen = []
    ev = Evaluator(cfg, params, tok, generate_fn=lambda ids, n: seen.extend(ids) or [[]] * len(ids))
    (tmp_path / "gen.jsonl").write_text(json.dumps({"prompt": "w1 w2", "answer": "w3"}) + "\n")
    ev.run(TaskSpec("gen", "generation", str(tmp_path / "gen.jsonl")))
    assert seen == [[1] + tok.encode("w1 w2")]
    assert loglik.split_continuation(tok, "", "w3") == ([1], tok.encode("w3"))

    docs = ["w1 w2 w3 w4 w5 w6", "w7", "", "w9 w9 w9"]
    mc = [{"context": "w1 w2", "choices": [" w3", " w4 w5", " w9"], "answer": 1},
          {"context": "w5 w6 w7", "choices": [" w8 w8", " w2"], "answer": " w2"}]  # fmt: skip
    _write_jsonl(tmp_path / "ppl.jsonl", [{"text": d} for d in docs])
    _write_jsonl(tmp_path / "mc.jsonl", mc)
    (tmp_path / "spec.json").write_text(json.dumps([
        {"name": "ppl", "type": "perplexity", "file": "ppl.jsonl"},
        {"name": "mc", "type": "multiple_choice", "file": "mc.jsonl"},
    ]))  # fmt: skip
    out = main(["--checkpoint", run, "--tasks", str(tmp_path / "spec.json"), "--samples"])
    res = out["tasks"]
    assert out["tokenizer"] == meta["tokenizer"]

    # Perplexity: every token of every document, predicted after EOS (the prefix) + the doc.
    nll = np.concatenate([-ref([1] + tok.encode(d)) for d in docs if d])
    ppl = res["ppl"]["metrics"]
    assert ppl["tokens"] == len(nll) == 10
    assert ppl["nll"] == pytest.approx(nll.mean(), rel=1e-5)
    assert ppl["bits_per_byte"] == pytest.approx(
        nll.sum() / np.log(2) / sum(len(d) for d in docs), rel=1e-5
    )
    # Multiple choice, plain text (not the chat template): continuation tokens after EOS + ctx.
    assert res["mc"]["spec"]["chat"] is False
    hits = []
    for row, s in zip(mc, res["mc"]["samples"]):
        ctx = [1] + tok.encode(row["context"])
        lps = []
        for ch in row["choices"]:
            full = [1] + tok.encode(row["context"] + ch)
            assert full[: len(ctx)] == ctx
            lps.append(float(ref(full)[len(ctx) - 1 :].sum()))
        np.testing.assert_allclose(s["logprobs"], lps, rtol=1e-5, atol=1e-4)
        hits.append(int(np.argmax(lps)) == s["answer"])
    assert res["mc"]["metrics"]["acc"] == pytest.approx(np.mean(hits))


def test_chat_mode_uses_an_hf_tokenizers_own_template_and_stop_ids(hf_run, tmp_path):
    """--chat on for an imported instruct model: prompts through its tokenizer_config.json
    chat template (what it was tuned on, not flaxlm's), generation stops at its stop ids."""
    from flaxlm.evaluation.harness import Evaluator
    from flaxlm.models.hf_tokenizer import load_tokenizer
    from flaxlm.train.checkpoint import load_model

    run, tok_file = hf_run
    cfg, params, _ = load_model(run)
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copy(tok_file, d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": None,
        "chat_template": "{% for m in messages %}w0 {{ m.content }} w39 {% endfor %}"
                         "{% if add_generation_prompt %}w38{% endif %}",
    }))  # fmt: skip
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 39]}))
    tok = load_tokenizer(str(d / "tokenizer.json"))
    seen = []
    ev = Evaluator(cfg, params, tok, generate_fn=lambda ids, n: seen.extend(ids) or [[]] * len(ids))
    assert set(ev.stop_tokens) == {1, 39}
    (tmp_path / "gen.jsonl").write_text(json.dumps({"prompt": "w1 w2", "answer": "w3"}) + "\n")
    ev.run(TaskSpec("gen", "generation", str(tmp_path / "gen.jsonl"), chat=True))
    assert seen == [tok.encode("w0 w1 w2 w39 w38")]


def test_a_generation_budget_that_leaves_no_room_for_the_prompt_is_an_error(hf_run, tmp_path):
    """max_new_tokens >= max_seq_len - 1 used to cut every prompt down to its first token and
    score answers to nothing (a warning only)."""
    from flaxlm.evaluation.harness import Evaluator
    from flaxlm.models.hf_tokenizer import load_tokenizer
    from flaxlm.train.checkpoint import load_model

    run, tok_file = hf_run
    cfg, params, _ = load_model(run)
    seen = []
    ev = Evaluator(cfg, params, load_tokenizer(tok_file),
                   generate_fn=lambda ids, n: seen.extend(ids) or [[]] * len(ids))  # fmt: skip
    (tmp_path / "gen.jsonl").write_text(json.dumps({"prompt": "w1 w2", "answer": "w3"}) + "\n")
    spec = lambda n: TaskSpec("gen", "generation", str(tmp_path / "gen.jsonl"), max_new_tokens=n)  # noqa: E731
    with pytest.raises(ValueError, match=r"task 'gen': max_new_tokens=\d+ leaves no room"):
        ev.run(spec(cfg.max_seq_len - 1))
    assert not seen
    ev.run(spec(cfg.max_seq_len - 4))  # room for the 3-token prompt: runs, prompt whole
    assert len(seen) == 1 and len(seen[0]) == 3


# --- generation scoring: numbers compared exactly -----------------------------------------------


def test_number_normalisation_compares_exact_values():
    norm = lambda s: G.normalize_answer(s, "number")
    # float() made these equal: integers past 2**53 and decimals past float precision
    assert norm("9007199254740993") != norm("9007199254740992")
    assert norm("1.0000000000000001") != norm("1")
    assert norm("123456789012345678901") == "123456789012345678901"
    for a, b in [("1,000.00", "1000"), ("2.50", "2.5"), ("$5", "5"), ("1e3", "1000"),
                 ("-0.0", "0"), (".5", "0.5"), ("7.", "7")]:  # fmt: skip
        assert norm(a) == norm(b) == b, a
    assert norm("1e999999999") == "1E+999999999"  # not a billion-digit integer
    assert norm("inf") == "inf" and norm("seven") == "seven"  # not finite / not a number: basic
    rx = TaskSpec("rx", "generation", "f", scoring="regex", answer_regex=r"#### (\S+)",
                  normalize="number")  # fmt: skip
    big = {"answer": "9007199254740993"}
    assert G.score_response(rx, big, "#### 9,007,199,254,740,992")["exact_match"] == 0.0
    assert G.score_response(rx, big, "#### 9,007,199,254,740,993")["exact_match"] == 1.0


# --- bad input: named by file:line, found before any task runs ----------------------------------


@pytest.mark.parametrize(
    "kind, row, match",
    [
        ("multiple_choice", {"context": None, "choices": ["a", "b"], "answer": 0},
         "field 'context' must be a string or a number, got null"),
        ("generation", {"prompt": "p", "answers": ["Paris", "paris"]},
         r"field 'answer' must be a string or a number, got list \(a key path can pick one "
         r"element: 'answers.0'\)"),
        ("generation", {"prompt": {"text": "p"}, "answers": "a"},
         "field 'prompt' must be a string or a number, got dict"),
    ],
)  # fmt: skip
def test_rows_with_null_or_list_text_name_file_and_line(tmp_path, kind, row, match):
    # str() used to make these "None" / "['Paris', 'paris']": a gold answer nothing matches.
    good = {"context": "c", "choices": ["a", "b"], "answer": 0, "prompt": "p", "answers": "a"}
    path = _write_jsonl(tmp_path / "t.jsonl", [good, row])
    spec = TaskSpec("t", kind, path, fields={"answer": "answers"} if kind == "generation" else {})
    with pytest.raises(TaskFileError, match=rf"t\.jsonl:2: task 't': {match}"):
        read_examples(spec)
    # numbers are still text (an answer 7 is "7")
    _write_jsonl(tmp_path / "n.jsonl", [{"prompt": 12, "answer": 7}])
    ex = read_examples(TaskSpec("n", "generation", str(tmp_path / "n.jsonl")))[0]
    assert (ex.fields["prompt"], ex.fields["answer"]) == ("12", "7")


def test_empty_choice_and_empty_perplexity_task_name_the_row(model, tok, tmp_path):
    from flaxlm.evaluation.harness import Evaluator

    cfg, params = model
    ev = Evaluator(cfg, params, tok, batch_tokens=128)
    rows = [{"context": "Kavo lives in", "choices": [" Paris", " Lima"], "answer": 0},
            {"context": "Kavo lives in", "choices": [" Paris", ""], "answer": 0}]  # fmt: skip
    spec = TaskSpec("mc", "multiple_choice", _write_jsonl(tmp_path / "mc.jsonl", rows))
    with pytest.raises(ValueError, match=r"mc\.jsonl:2: task 'mc': .*adds no tokens"):
        ev.run(spec)
    with pytest.raises(ValueError, match=r"mc\.jsonl:2: task 'mc': choice 1 \(''\) gives no "):
        ev.run(spec.replace(chat=True))  # used to fail inside the scorer as "request 3"
    # Texts with no token to score: an error, not nll 0 / perplexity 1.0 over 0 tokens.
    empty = TaskSpec("ppl", "perplexity", _write_jsonl(tmp_path / "p.jsonl", [{"text": ""}] * 2))
    with pytest.raises(ValueError, match=r"task 'ppl' .*none of the 2 texts has a token"):
        ev.run(empty)


def test_cli_checks_templates_before_running_any_task(run_dir, tok_path, tmp_path, capsys):
    from flaxlm.evaluation.__main__ import main

    _write_jsonl(tmp_path / "mc.jsonl", [{"context": "a", "choices": [" x", " y"], "answer": 0}])
    _write_jsonl(tmp_path / "g.jsonl", [{"prompt": f"2+{i}", "answer": "4"} for i in range(3)])
    ok = {"name": "ok", "type": "multiple_choice", "file": "mc.jsonl"}
    bad = [
        ({"name": "b1", "type": "multiple_choice", "file": "mc.jsonl",
          "template": "Q: {question}"}, r"task 'b1': template 'Q: \{question\}' uses 'question'"),
        ({"name": "b2", "type": "multiple_choice", "file": "mc.jsonl",
          "choice_template": " {letter"}, r"task 'b2': bad template ' \{letter'"),
        ({"name": "b3", "type": "generation", "file": "g.jsonl", "num_fewshot": 1,
          "target_template": " {solution}"}, r"task 'b3': template ' \{solution\}'"),
    ]  # fmt: skip
    for spec, match in bad:
        (tmp_path / "s.json").write_text(json.dumps([ok, spec]))
        with pytest.raises(SystemExit, match=match):
            main(["--checkpoint", run_dir, "--tokenizer", tok_path,
                  "--tasks", str(tmp_path / "s.json")])  # fmt: skip
        assert "[eval] ok" not in capsys.readouterr().err  # nothing ran before the error


def test_fewshot_fields_without_fewshot_file_is_an_error(tmp_path):
    # They were silently unused: shots from the task's own file are read with `fields`.
    spec = {"name": "t", "type": "generation", "file": "g.jsonl", "num_fewshot": 1,
            "fewshot_fields": {"prompt": "question"}}  # fmt: skip
    with pytest.raises(ValueError, match="task 't': fewshot_fields needs fewshot_file"):
        TaskSpec.from_dict(spec, str(tmp_path))
    TaskSpec.from_dict({**spec, "fewshot_file": "train.jsonl"}, str(tmp_path))


def test_a_whitespace_choice_is_refused_in_plain_mode_too(tmp_path):
    """Plain mode tested only `if not choice`: " " was scored as the bare space piece (length 0
    for acc_norm) and won every metric; chat mode already refused it. An answer of "²" (which
    str.isdigit() takes) is read as no index, not as int()'s raw error."""
    from flaxlm.evaluation.harness import check_task

    rows = [{"context": "a b", "choices": ["x", " "], "answer": 0}]
    spec = TaskSpec("ws", "multiple_choice", _write_jsonl(tmp_path / "ws.jsonl", rows))
    with pytest.raises(ValueError, match=r"ws\.jsonl:1: task 'ws': choice 1 \(.*\) is empty"):
        check_task(spec, read_examples(spec), [], 64)
    rows = [{"context": "a b", "choices": ["x", "y"], "answer": "²"}]
    spec = TaskSpec("sup", "multiple_choice", _write_jsonl(tmp_path / "sup.jsonl", rows))
    with pytest.raises(ValueError, match=r"answer '²' is not an index, letter or choice"):
        read_examples(spec)
