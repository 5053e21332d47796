"""Task specs and files: the world's manifest, plug-in benchmark specs, bad rows, few-shot."""

import json

import pytest

from flaxlm.evaluation import prompts as P
from flaxlm.evaluation.tasks import (
    TaskFileError,
    TaskSpec,
    read_examples,
    resolve_tasks,
    world_tasks,
)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_world_tasks_come_from_the_manifest(world_dir):
    with open(f"{world_dir}/manifest.json") as f:
        manifest = json.load(f)
    specs = world_tasks(world_dir)
    assert set(specs) == set(manifest["eval_tasks"]) | {"ppl_heldout_text"}
    for name, info in manifest["eval_tasks"].items():
        assert specs[name].type == info["type"]
        assert len(read_examples(specs[name])) == info["count"]
    mc = read_examples(specs["mc_facts_heldout"])[0].fields
    assert mc["choices"][mc["answer"]].startswith(" ") and isinstance(mc["answer"], int)
    gen = specs["gen_facts_heldout"]
    assert gen.scoring == "judge" and gen.num_fewshot > 0
    # Shots come from the SFT chats (last user turn + its answer), which hold no held-out people.
    shots = read_examples(gen, fewshot=True)
    with open(f"{world_dir}/sft_train.jsonl") as f:
        first = json.loads(f.readline())
    assert shots[0].fields["prompt"] == first["messages"][-2]["content"]
    assert shots[0].fields["answer"] == first["meta"]["answer"]
    held = {r.fields["meta"]["entity"] for r in read_examples(gen)}
    assert not any(e in s.fields["prompt"] for s in shots for e in held)
    ppl = read_examples(specs["ppl_heldout_text"])
    assert len(ppl) == manifest["counts"]["heldout_text"]


def test_spec_file_plugs_in_mmlu_and_gsm8k_style_tasks(tmp_path):
    (tmp_path / "data").mkdir()
    _write_jsonl(
        tmp_path / "data/mmlu.jsonl",
        [{"question": "2 + 2 =", "options": ["3", "4", "5", "6"], "label": "B"},
         {"question": "Capital of France?", "options": ["Rome", "Paris"], "label": 1}],
    )  # fmt: skip
    _write_jsonl(
        tmp_path / "data/gsm.jsonl",
        [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
         {"question": "Ann has 2 pens and loses 1. How many?", "answer": "2 - 1 = 1\n#### 1"}],
    )  # fmt: skip
    spec_path = tmp_path / "bench.json"
    spec_path.write_text(json.dumps([
        {"name": "mmlu_mini", "type": "multiple_choice", "file": "data/mmlu.jsonl",
         "fields": {"context": "question", "choices": "options", "answer": "label"},
         "template": "{context}\n{choices_block}\nAnswer:", "choice_template": " {letter}"},
        {"name": "gsm_mini", "type": "generation", "file": "data/gsm.jsonl",
         "fields": {"prompt": "question"}, "template": "Question: {prompt}\nAnswer:",
         "target_template": " {answer_raw}", "num_fewshot": 1,
         "scoring": "regex", "answer_regex": "#### (-?[0-9.,]+)", "gold_regex": "#### (\\S+)",
         "normalize": "number", "stop": ["\n\nQuestion:"], "max_new_tokens": 128},
    ]))  # fmt: skip
    mmlu, gsm = resolve_tasks([str(spec_path)])
    rows = read_examples(mmlu)
    assert [r.fields["answer"] for r in rows] == [1, 1]
    assert P.plain_prompt(mmlu, rows[0], []) == "2 + 2 =\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    assert [P.choice_text(mmlu, rows[0].fields, i) for i in range(4)] == [" A", " B", " C", " D"]
    g, g2 = read_examples(gsm)
    assert g.fields["answer"] == "7" and g.source.endswith("gsm.jsonl:1")
    # The shot shows its worked solution; the evaluated answer is compared as the final number.
    assert P.plain_prompt(gsm, g, [g2]) == (
        "Question: Ann has 2 pens and loses 1. How many?\nAnswer: 2 - 1 = 1\n#### 1\n\n"
        "Question: Tom has 3 apples and buys 4. How many?\nAnswer:"
    )
    assert gsm.stop == ("\n\nQuestion:",)


def test_bad_task_files_name_file_and_line(tmp_path):
    spec = TaskSpec("t", "multiple_choice", str(tmp_path / "t.jsonl"))
    good = {"context": "c", "choices": [" a", " b"], "answer": 0}
    cases = [
        ([good, good, '{"context": "c", "choices": [" a"'], 3, "invalid JSON"),
        ([good, {"context": "c", "answer": 0}], 2, "missing field 'choices'"),
        ([good, {**good, "answer": "maybe"}], 2, "answer 'maybe'"),
        ([good, {**good, "answer": "E"}], 2, "index 4 out of range"),
        ([{**good, "answer": 5}], 1, "out of range"),
        ([good, "", {**good, "choices": " a b"}], 3, "list of at least 2 strings"),
    ]
    for rows, line, what in cases:
        lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
        (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
        with pytest.raises(TaskFileError, match=f"t.jsonl:{line}: .*{what}"):
            read_examples(spec)
    gen = TaskSpec("g", "generation", _write_jsonl(tmp_path / "g.jsonl",
                   [{"prompt": "p", "answer": "a"}]), scoring="judge")  # fmt: skip
    with pytest.raises(TaskFileError, match="g.jsonl:1: .*meta"):
        read_examples(gen)
    with pytest.raises(ValueError, match="unknown spec key.*'promt'"):
        TaskSpec.from_dict({"name": "x", "type": "generation", "file": "f", "promt": "?"})
    with pytest.raises(ValueError, match="type='mc'"):
        TaskSpec("x", "mc", "f")
    (tmp_path / "bad.json").write_text('{"name": "x",\n "type": }')
    with pytest.raises(TaskFileError, match="bad.json:2"):
        resolve_tasks([str(tmp_path / "bad.json")])
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        resolve_tasks(["nope"])


def test_stop_strings_are_checked_with_the_spec(tmp_path):
    """An empty stop string used to pass the spec checks and fail only in the decoder, after
    every earlier task had run; one string given alone is one stop, not its characters."""
    spec = {"name": "g", "type": "generation", "file": "f"}
    for stop in ([""], ["\n", ""]):
        with pytest.raises(ValueError, match=r"task 'g'.*stop strings must be non-empty"):
            TaskSpec.from_dict({**spec, "stop": stop})
    assert TaskSpec("g", "generation", "f", stop="Q:").stop == ("Q:",)  # (Python API)
    assert TaskSpec.from_dict({**spec, "stop": ["Q:", "\n\n"]}).stop == ("Q:", "\n\n")


def _gen_rows(n):
    return [{"prompt": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(n)]


def test_fewshot_is_deterministic_and_excludes_the_example(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", _gen_rows(20))
    spec = TaskSpec("add", "generation", path, num_fewshot=3)
    rows = read_examples(spec)
    pool = read_examples(spec, fewshot=True)
    shots = [[s.index for s in P.select_shots(spec, ex, pool)] for ex in rows]
    assert all(len(set(s)) == 3 and ex.index not in s for ex, s in zip(rows, shots))
    # Same spec and example → same shots, whatever else was read (limit) or asked before.
    again = [
        [s.index for s in P.select_shots(spec, ex, pool)] for ex in read_examples(spec, limit=5)
    ]
    assert again == shots[:5]
    assert len({tuple(s) for s in shots}) > 10  # examples get different shots
    other_seed = spec.replace(fewshot_seed=7)
    assert [[s.index for s in P.select_shots(other_seed, ex, pool)] for ex in rows] != shots
    # A pool barely larger than k: the shots are exactly the other rows.
    small = TaskSpec("add", "generation", _write_jsonl(tmp_path / "s.jsonl", _gen_rows(6)),
                     num_fewshot=5)  # fmt: skip
    srows = read_examples(small)
    for ex in srows:
        got = {s.index for s in P.select_shots(small, ex, read_examples(small, fewshot=True))}
        assert got == set(range(6)) - {ex.index}
    with pytest.raises(ValueError, match="only 5 usable"):
        P.select_shots(small.replace(num_fewshot=6), srows[0], srows)
    # A separate train file: a row with the evaluated question is never a shot.
    train = _write_jsonl(tmp_path / "train.jsonl", _gen_rows(4))
    sep = spec.replace(fewshot_file=train, num_fewshot=3)
    tpool = read_examples(sep, fewshot=True)
    for ex in rows[:4]:
        picked = P.select_shots(sep, ex, tpool)
        assert ex.fields["prompt"] not in [s.fields["prompt"] for s in picked]
        assert len(picked) == 3


def test_prompt_text_plain_and_chat(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", _gen_rows(3))
    spec = TaskSpec("add", "generation", path, num_fewshot=2, description="Arithmetic.\n\n",
                    template="Q: {prompt}\nA:", target_template=" {answer}")  # fmt: skip
    rows = read_examples(spec)
    shots = P.select_shots(spec, rows[0], rows)
    assert [s.index for s in shots] in ([1, 2], [2, 1])
    a, b = shots
    expect = (
        f"Arithmetic.\n\nQ: {a.fields['prompt']}\nA: {a.fields['answer']}\n\n"
        f"Q: {b.fields['prompt']}\nA: {b.fields['answer']}\n\nQ: What is 0 plus 1?\nA:"
    )
    assert P.plain_prompt(spec, rows[0], shots) == expect
    msgs = P.chat_messages(spec.replace(chat=True), rows[0], shots)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[2]["content"] == a.fields["answer"] and msgs[-1]["content"] == "What is 0 plus 1?"
    with pytest.raises(KeyError, match="uses 'question'"):
        P.render("{question}", rows[0].fields, spec)


def test_mc_answer_that_is_a_choice_text_is_that_choice(tmp_path):
    # numeric choices: the answer "2" is the choice "2", not index 2 ("6")
    rows = [{"context": "1+1=", "choices": ["2", "4", "6"], "answer": "2"},
            {"context": "2+2=", "choices": ["2", "4", "6"], "answer": 1},
            {"context": "x", "choices": ["yes", "no"], "answer": "B"}]  # fmt: skip
    spec = TaskSpec("num", "multiple_choice", _write_jsonl(tmp_path / "n.jsonl", rows))
    assert [e.fields["answer"] for e in read_examples(spec)] == [0, 1, 1]


class _RecordingScorer:
    """A LoglikScorer stand-in: records the requests, scores every continuation 0."""

    max_len = 1 << 20  # (cuts no context)

    def __init__(self):
        self.requests = []

    def score(self, requests):
        from flaxlm.evaluation.loglik import ContinuationScore

        self.requests += requests
        return [ContinuationScore(0.0, len(cont), False) for _, cont in requests]


def test_mc_choices_stored_without_a_leading_space_follow_a_delimiter(tok, world_dir, tmp_path):
    """Choices stored without their leading space (MMLU, ARC, HellaSwag) were glued to the
    prompt: "Answer:" + "Paris" scored "Paris" as the continuation of "Answer:", and shots read
    "Answer:Paris". target_delimiter (" ", as lm-eval-harness) now joins them, unless the prompt
    ends or the choice starts with whitespace, so the built-in world's " Paris" is unchanged."""
    from flaxlm.evaluation.harness import Evaluator
    from flaxlm.models.config import get_variant

    rows = [
        {"question": "Where does Kavo live?", "choices": ["Paris", "Oslo"], "answer": 0},
        {"question": "What color is the sky?", "choices": ["red", "blue"], "answer": 1},
    ]
    spec = TaskSpec("mmlu", "multiple_choice", _write_jsonl(tmp_path / "m.jsonl", rows),
                    fields={"context": "question"}, template="Question: {context}\nAnswer:",
                    num_fewshot=1)  # fmt: skip
    ex, shot = read_examples(spec)[1], read_examples(spec)[0]
    text = P.plain_prompt(spec, ex, [shot])
    assert text == ("Question: Where does Kavo live?\nAnswer: Paris\n\n"
                    "Question: What color is the sky?\nAnswer:")  # fmt: skip
    assert [P.choice_text(spec, ex.fields, i, text) for i in (0, 1)] == [" red", " blue"]
    # no delimiter after whitespace, before a spaced choice, or with target_delimiter ""
    assert P.delimit(spec, "Answer: ", "red") == P.delimit(spec, "Answer:", " red")[1:] == "red"
    assert P.delimit(spec.replace(target_delimiter=""), "Answer:", "red") == "red"
    assert P.delimit(spec, "Answer:", "") == ""  # an empty choice stays an error

    ev = Evaluator(get_variant("tiny", vocab_size=512), None, tok)  # (the model is never run)
    ev.scorer = rec = _RecordingScorer()
    ev.run(spec)
    from flaxlm.evaluation.loglik import split_continuation

    spaced = [split_continuation(tok, text, c) for c in (" red", " blue")]
    assert rec.requests[2:] == spaced  # the second question's choices
    assert spaced[0][1] != split_continuation(tok, text, "red")[1]  # (what was scored)

    # The world's choices carry their space: the same requests with or without a delimiter.
    world = world_tasks(world_dir)["mc_facts_heldout"].replace(num_fewshot=2)
    ev.scorer = rec = _RecordingScorer()
    ev.run(world, limit=4)
    ev.scorer = bare = _RecordingScorer()
    ev.run(world.replace(target_delimiter=""), limit=4)
    assert rec.requests == bare.requests and len(rec.requests) == 16
