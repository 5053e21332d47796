"""Passkey retrieval (evaluation/passkey.py): prompt lengths in tokens of two tokenizers (the
built-in world's SentencePiece model and a byte-level HF tokenizer.json), the needle's depth,
determinism, the spec and rows read back through the harness, scoring, bad input, and the
tasks run end to end by the Evaluator on a tiny random model, then tabulated."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from flaxlm.evaluation import passkey as P
from flaxlm.evaluation.generate_tasks import score_response
from flaxlm.evaluation.prompts import encode_prompt, prefix_ids
from flaxlm.evaluation.tasks import Example, TaskSpec, load_spec_file, read_examples


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    """A byte-level BPE tokenizer.json (tests/hf_tokenizers.py) with merges for a few filler
    words, no BOS: its document prefix is EOS."""
    from flaxlm.models.hf_tokenizer import load_tokenizer

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, "hf_tokenizers.py")
    spec = importlib.util.spec_from_file_location("hf_tokenizers", path)
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    d = str(tmp_path_factory.mktemp("hf_tok"))
    helpers.write_hf_tokenizer(d, "", {"eos_token": "<|im_end|>"},
                               merge_words=("ĠThe", "Ġis", "Ġsky", "Ġblue", "Ġpass"))  # fmt: skip
    return load_tokenizer(os.path.join(d, "tokenizer.json"))


@pytest.fixture(params=["sentencepiece", "hf"])
def any_tok(request, tok, hf_tok):
    return tok if request.param == "sentencepiece" else hf_tok


def _sentence_tokens(t) -> int:
    """Most tokens one filler sentence adds in context (after a space): the length tolerance."""
    return max(len(t.encode(" " + s)) for s in P.FILLER)


def _needle_index(row) -> tuple[int, str]:
    needle = P.NEEDLE.format(key=row["answer"])
    assert row["prompt"].count(needle) == 1
    return row["prompt"].index(needle), needle


def test_lengths_fit_the_target_and_never_exceed_it(any_tok):
    spec = TaskSpec(**{k: v for k, v in P.make_spec("t", "f").items()})
    slack = _sentence_tokens(any_tok)
    for length in (160, 333, 1000):
        for depth in (0.0, 0.5, 1.0):
            rows = P.make_examples(any_tok, length, depth, 3, seed=0)
            for r in rows:
                ex = Example(fields={"prompt": r["prompt"], "answer": r["answer"]}, source="",
                             index=0)  # fmt: skip
                _, ids = encode_prompt(spec, ex, [], any_tok)  # what the harness feeds
                assert ids[: len(prefix_ids(any_tok))] == prefix_ids(any_tok)
                assert len(ids) == r["meta"]["tokens"] <= length
                assert length - len(ids) < slack, (length, depth, len(ids))
                assert r["prompt"].endswith(" " + P.QUESTION) and r["meta"]["length"] == length
    # without the prefix (Evaluator(bos=False)) the whole budget is text
    r = P.make_examples(any_tok, 200, 0.5, 1, bos=False)[0]
    assert len(any_tok.encode(r["prompt"])) == r["meta"]["tokens"] <= 200


def test_needle_sits_at_the_requested_depth(any_tok):
    length = 1200
    for depth in (0, 0.25, 0.5, 0.75, 1):
        for r in P.make_examples(any_tok, length, depth, 4, seed=3):
            text = r["prompt"]
            idx, needle = _needle_index(r)
            before = text[:idx].rstrip()
            filler = (before + " " + text[idx + len(needle) :].strip())[: -len(P.QUESTION)]
            n_before = len(any_tok.encode(before)) if before else 0
            n_filler = len(any_tok.encode(filler.strip()))
            frac = n_before / n_filler
            # on a sentence boundary, the nearest one to depth: within one sentence's tokens
            assert abs(frac - depth) <= _sentence_tokens(any_tok) / n_filler + 0.01, (depth, frac)
            assert before == "" or before.endswith(".")
            head = len(prefix_ids(any_tok))
            assert r["meta"]["needle_at"] == head + n_before  # the needle's token offset
            assert r["meta"]["depth"] == depth
        if depth == 0:
            assert text.startswith("The pass key is ")
        if depth == 1:
            assert text.endswith(f"{needle} {P.QUESTION}")


def test_deterministic_per_seed_with_distinct_keys(tok):
    a = P.make_examples(tok, 300, 0.5, 20, seed=0)
    assert a == P.make_examples(tok, 300, 0.5, 20, seed=0)
    keys = [r["answer"] for r in a]
    assert len(set(keys)) == 20
    assert all(len(k) == 5 and k.isdigit() and k[0] != "0" for k in keys)
    assert len({r["prompt"].split(" The pass key")[0] for r in a}) > 1  # rotated filler starts
    b = P.make_examples(tok, 300, 0.5, 20, seed=1)
    assert [r["answer"] for r in b] != keys
    assert [r["answer"] for r in P.make_examples(tok, 300, 0.25, 20, seed=0)] != keys
    three = P.make_examples(tok, 300, 0.5, 3, seed=0, key_digits=3)
    assert all(len(r["answer"]) == 3 for r in three)


def test_spec_file_loads_through_the_harness_and_rows_read_back(tok, tok_path, tmp_path):
    out = tmp_path / "pk"
    path = P.main(["--out", str(out), "--tokenizer", tok_path, "--lengths", "128,256",
                   "--depths", "0,0.5,1", "--n", "3", "--seed", "7",
                   "--max_new_tokens", "9"])  # fmt: skip
    assert path == str(out / "spec.json")
    specs = load_spec_file(path)
    want = [P.task_name(n, d) for n in (128, 256) for d in (0, 0.5, 1)]
    assert [s.name for s in specs] == want == [
        "passkey_L128_d0", "passkey_L128_d0.5", "passkey_L128_d1",
        "passkey_L256_d0", "passkey_L256_d0.5", "passkey_L256_d1"]  # fmt: skip
    assert P.task_name(128, 0.1234567) != P.task_name(128, 0.1234568)  # names never collide
    assert P.NAME_RE.match(P.task_name(64, 1e-7)).group(2) == "1e-07"
    for s in specs:
        assert s.type == "generation" and s.max_new_tokens == 9 and s.scoring == "regex"
        assert s.normalize == "number" and os.path.isabs(s.file) and os.path.exists(s.file)
        length, depth = int(s.name.split("_")[1][1:]), float(s.name.split("_d")[1])
        rows = P.make_examples(tok, length, depth, 3, seed=7)
        got = read_examples(s)
        assert [ex.fields["prompt"] for ex in got] == [r["prompt"] for r in rows]
        assert [ex.fields["answer"] for ex in got] == [r["answer"] for r in rows]
        assert [ex.fields["meta"] for ex in got] == [r["meta"] for r in rows]
    # the default max_new_tokens is 8
    P.main(["--out", str(tmp_path / "d"), "--tokenizer", tok_path, "--lengths", "128",
            "--depths", "0.5", "--n", "1"])  # fmt: skip
    assert load_spec_file(str(tmp_path / "d" / "spec.json"))[0].max_new_tokens == 8


def test_scoring_through_the_harness():
    spec = TaskSpec.from_dict(P.make_spec("passkey_L128_d0.5", "f.jsonl"))
    fields = {"answer": "48213"}
    for response, want in [("48213", 1.0), ("48213. Remember it.", 1.0),
                           ("is 48213, I think", 1.0), ("48231", 0.0), ("4821", 0.0),
                           ("482130", 0.0), ("12345 48213", 0.0),
                           ("the sky is blue", 0.0), ("", 0.0)]:  # fmt: skip
        assert score_response(spec, fields, response)["exact_match"] == want, response


@pytest.fixture(scope="module")
def tiny_model():
    """A random 1-layer model (vocab 512 >= the test tokenizers', max_seq_len 160)."""
    from flaxlm.models.config import ModelConfig
    from flaxlm.models.transformer import Transformer

    cfg = ModelConfig(vocab_size=512, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                      d_ff=64, max_seq_len=160)  # fmt: skip
    boxed = Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    return cfg, nn.meta.unbox(boxed["params"])


def test_stand_in_decoder_that_copies_the_key_scores_one(tiny_model, tok, tmp_path):
    from flaxlm.evaluation.harness import Evaluator

    path = P.write_tasks(str(tmp_path), tok, [128], [0.5], 4, seed=0, max_new_tokens=8)
    spec = load_spec_file(path)[0]
    key_of = {r["prompt"]: r["answer"] for r in P.make_examples(tok, 128, 0.5, 4, seed=0)}

    def decoder(shift):
        def fn(prompt_ids, max_new_tokens):
            out = []
            for ids in prompt_ids:  # the key of the prompt's needle (or a wrong one)
                key = key_of[tok.decode(ids[len(prefix_ids(tok)) :])]
                out.append(tok.encode(f" {int(key) + shift}. Remember it.")[:max_new_tokens])
            return out

        return fn

    cfg, params = tiny_model
    right = Evaluator(cfg, params, tok, generate_fn=decoder(0)).run(spec)
    wrong = Evaluator(cfg, params, tok, generate_fn=decoder(1)).run(spec)
    assert right["metrics"]["exact_match"] == 1.0 and right["metrics"]["truncated"] == 0
    assert wrong["metrics"]["exact_match"] == 0.0 and wrong["metrics"]["extracted"] == 1.0
    assert all(s["response"].startswith(s["answer"]) for s in right["samples"])


def test_end_to_end_with_a_tiny_random_model_and_the_table(tiny_model, tok, tok_path, tmp_path,
                                                           capsys):  # fmt: skip
    from flaxlm.evaluation.harness import Evaluator
    from flaxlm.evaluation.tasks import resolve_tasks

    spec_path = P.main(["--out", str(tmp_path / "pk"), "--tokenizer", tok_path, "--lengths",
                        "128", "--depths", "0,1", "--n", "2", "--max_new_tokens", "7"])  # fmt: skip
    cfg, params = tiny_model
    ev = Evaluator(cfg, params, tok, gen_batch_size=2)
    results = {s.name: ev.run(s) for s in resolve_tasks([spec_path])}
    assert set(results) == {"passkey_L128_d0", "passkey_L128_d1"}
    for r in results.values():
        m = r["metrics"]
        assert r["n"] == 2 and m["truncated"] == 0 and 0.0 <= m["exact_match"] <= 1.0
        for s in r["samples"]:
            assert len(tok.encode(s["response"])) <= 4 + 1
    for r in results.values():
        r.pop("samples")
    out = tmp_path / "eval.json"
    out.write_text(json.dumps({"checkpoint": "x", "tasks": results}))
    capsys.readouterr()
    table = P.main(["--table", str(out)])
    assert capsys.readouterr().out.strip() == table
    lines = table.splitlines()
    assert "exact_match" in lines[0] and "n=2" in lines[0]
    assert lines[1].split() == ["length", "0", "1", "mean"]
    cells = [float(x) for x in lines[2].split()[1:]]
    want = [results["passkey_L128_d0"]["metrics"]["exact_match"],
            results["passkey_L128_d1"]["metrics"]["exact_match"]]  # fmt: skip
    assert lines[2].split()[0] == "128"
    assert cells == pytest.approx([*want, sum(want) / 2], abs=1e-3)
    # a prompt the harness had to cut is flagged under the grid
    results["passkey_L128_d1"]["metrics"]["truncated"] = 2
    assert "passkey_L128_d1 (2)" in P.accuracy_table(results)


def test_bad_input_names_the_flag(tok, tok_path, tmp_path):
    base = ["--out", str(tmp_path / "o"), "--tokenizer", tok_path]
    with pytest.raises(SystemExit, match="--tokenizer .*nope.model: no such file"):
        P.main(["--out", str(tmp_path), "--tokenizer", str(tmp_path / "nope.model")])
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(SystemExit, match="--tokenizer .*junk.model.*not a SentencePiece"):
        P.main(["--out", str(tmp_path), "--tokenizer", str(tmp_path / "junk.model")])
    with pytest.raises(SystemExit, match=r"--lengths: length 20 is too short: the needle and "
                       r"question alone take \d+ tokens"):  # fmt: skip
        P.main(base + ["--lengths", "128,20"])
    assert not (tmp_path / "o").exists()  # nothing written when a length fails
    with pytest.raises(SystemExit, match="--lengths: 'x' is not an integer"):
        P.main(base + ["--lengths", "128,x"])
    with pytest.raises(SystemExit, match="--lengths: 0 must be a positive"):
        P.main(base + ["--lengths", "0"])
    for bad in ("1.5", "-0.1", "nan"):
        with pytest.raises(SystemExit, match=rf"--depths: {bad} is outside \[0, 1\]"):
            P.main(base + ["--depths", f"0,{bad}"])
    with pytest.raises(SystemExit, match="--depths: 'half' is not a number"):
        P.main(base + ["--depths", "half"])
    for flag in ("--n", "--max_new_tokens", "--key_digits"):
        with pytest.raises(SystemExit, match=f"{flag}: 0 must be >= 1"):
            P.main(base + [flag, "0"])
    with pytest.raises(SystemExit, match="--n: 20 distinct keys do not exist"):
        P.main(base + ["--key_digits", "1"])
    with pytest.raises(SystemExit, match="--out is required"):
        P.main(["--tokenizer", tok_path])
    with pytest.raises(SystemExit, match="--table .*: no passkey tasks"):
        (tmp_path / "r.json").write_text(json.dumps({"tasks": {}}))
        P.main(["--table", str(tmp_path / "r.json")])
    # the file the first step printed, and a task that is no dict: one line, not a traceback
    spec = P.main(base + ["--lengths", "128", "--depths", "0", "--n", "1"])
    with pytest.raises(SystemExit, match="--table .*spec.json: not an evaluation --out JSON: "
                       "its top level is a list"):  # fmt: skip
        P.main(["--table", spec])
    (tmp_path / "t.json").write_text(json.dumps({"tasks": {"passkey_L64_d0": 5}}))
    with pytest.raises(SystemExit, match="task 'passkey_L64_d0' is 5, not a dict"):
        P.main(["--table", str(tmp_path / "t.json")])
    # a budget that cannot spell the keys (each digit a piece of the built-in tokenizer): the
    # ideal answer would score 0 with 'extracted' 1
    need = P.answer_tokens(tok, "1234567")
    assert need > 7
    with pytest.raises(SystemExit, match=f"--max_new_tokens: max_new_tokens=7 cannot hold a "
                       f"pass key: ' [0-9]{{7}}' is {need} tokens .* give max_new_tokens >= "
                       f"{need}"):  # fmt: skip
        P.main([*base[:1], str(tmp_path / "o7"), *base[2:], "--key_digits", "7",
                "--max_new_tokens", "7", "--lengths", "128", "--n", "2"])  # fmt: skip
    assert not (tmp_path / "o7").exists()
    with pytest.raises(ValueError, match=r"depth 1.5 is outside \[0, 1\]"):
        P.make_examples(tok, 128, 1.5, 1)
    with pytest.raises(ValueError, match="length 10 is too short"):
        P.make_examples(tok, 10, 0.5, 1)


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "flaxlm.evaluation.passkey", "--help"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "--lengths" in out and "--depths" in out and "--table" in out


def test_the_table_of_an_incomplete_run_names_the_tasks_it_never_reached():
    """An evaluation stopped part way leaves OUT.partial (`complete: false`): its grid showed
    the lengths that ran as if they were all, with no note."""
    done = {"passkey_L128_d0": {"n": 2, "metrics": {"exact_match": 1.0}}}
    asked = ["passkey_L128_d0", "passkey_L128_d1", "passkey_L256_d0"]
    table = P.accuracy_table({"tasks": done, "tasks_requested": asked, "complete": False})
    assert table.splitlines()[-1] == (
        "incomplete run: 2 requested task(s) have no results (passkey_L128_d1, passkey_L256_d0)"
    )
    complete = P.accuracy_table({"tasks": done, "tasks_requested": asked[:1], "complete": True})
    assert "incomplete" not in complete


def test_every_key_of_the_digits_asked_and_no_more_keys_than_exist(tok):
    """Keys have exactly `key_digits` digits, no leading zero: n = 90 two-digit keys are
    10..99, each once; 9 one-digit keys exist (1..9), 10 do not."""
    rows = P.make_examples(tok, 80, 0.5, 90, seed=0, key_digits=2)
    assert sorted(int(r["answer"]) for r in rows) == list(range(10, 100))
    assert sorted(r["answer"] for r in P.make_examples(tok, 80, 0.5, 9, key_digits=1)) == [
        str(i) for i in range(1, 10)]  # fmt: skip
    with pytest.raises(ValueError, match="n=10 distinct keys do not exist with key_digits=1"):
        P.make_examples(tok, 80, 0.5, 10, key_digits=1)


def test_a_needle_halfway_between_two_boundaries_takes_the_earlier():
    """Three sentences of 4 tokens, depth 0.5: boundaries 1 and 2 are equally near (4 and 8
    tokens against 6); the earlier one is taken."""
    text, k = P._build(3, "NEEDLE", 0.5, 0, [4] * len(P.FILLER))
    assert k == 1
    assert text.split(" NEEDLE ")[0] == P.FILLER[0]


def test_the_mean_column_averages_the_cells_a_length_has():
    """A length without a result at some depth (a '-' cell) is averaged over the cells it has."""
    tasks = {"passkey_L128_d0": {"n": 2, "metrics": {"exact_match": 1.0}},
             "passkey_L128_d1": {"n": 2, "metrics": {"exact_match": 0.5}},
             "passkey_L256_d0": {"n": 2, "metrics": {"exact_match": 0.5}}}  # fmt: skip
    rows = P.accuracy_table({"tasks": tasks}).splitlines()
    assert rows[2].split() == ["128", "1.000", "0.500", "0.750"]
    assert rows[3].split() == ["256", "0.500", "-", "0.500"]
