"""Benchmark presets (evaluation/benchmarks.py): tiny files in each dataset's official layout
(the HF hub's parquet split files with the real column names and types, or the jsonl an original
repo ships), spec files written by the CLI and read back by tasks.py, the exact prompts against
lm-eval-harness's formats (written out literally below), multiple choice and code scoring
through the harness with stand-ins for the model (no model is built or compiled), and errors
naming the directory and the files expected."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flaxlm.evaluation import benchmarks as B
from flaxlm.evaluation import generate_tasks as G
from flaxlm.evaluation import harness
from flaxlm.evaluation.loglik import ContinuationScore
from flaxlm.evaluation.prompts import choice_text, continuation_text, plain_prompt, select_shots
from flaxlm.evaluation.tasks import load_spec_file, read_examples, resolve_tasks
from flaxlm.models.config import get_variant

HUB = "{}-00000-of-00001.parquet"  # the hub's name of a one-file split

MMLU_ALGEBRA_TEST = [
    {"question": "Find the degree of Q(sqrt(2)) over Q.\n", "subject": "abstract_algebra",
     "choices": ["0", "4", "2", "6"], "answer": 2},
    {"question": "Find the order of Z_6/<3>.", "subject": "abstract_algebra",
     "choices": ["2", "3", "6", "12"], "answer": 1},
]  # fmt: skip
MMLU_ALGEBRA_DEV = [
    {"question": "Which group is cyclic?", "subject": "abstract_algebra",
     "choices": ["Z_4", "Z_2 x Z_2", "S_3", "D_4"], "answer": 0},
    {"question": "Is every field a ring?", "subject": "abstract_algebra",
     "choices": ["No", "Yes", "Only finite ones", "Only Q"], "answer": 1},
]  # fmt: skip
MMLU_ANATOMY_TEST = [
    {"question": "Which bone is in the arm?", "subject": "anatomy",
     "choices": ["Femur", "Humerus", "Tibia", "Fibula"], "answer": 1},
    {"question": "How many chambers has the heart?", "subject": "anatomy",
     "choices": ["Two", "Three", "Four", "Five"], "answer": 2},
    {"question": "Where is the cornea?", "subject": "anatomy",
     "choices": ["Eye", "Ear", "Nose", "Skin"], "answer": 0},
]  # fmt: skip
ARC_TEST = [
    {"id": "Mercury_1", "question": "Which gas do plants take in?",
     "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"],
                 "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
    {"id": "Mercury_2", "question": "What melts ice fastest?",
     "choices": {"text": ["salt", "sand", "paper"], "label": ["1", "2", "3"]}, "answerKey": "1"},
]  # fmt: skip
ARC_TRAIN = [
    {"id": "Mercury_3", "question": "What do magnets attract?",
     "choices": {"text": ["wood", "iron", "glass", "cloth"], "label": ["A", "B", "C", "D"]},
     "answerKey": "B"},
]  # fmt: skip
HELLASWAG_VAL = [
    {"ind": 24, "activity_label": "Roof shingle removal",
     "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain",
     "label": "3"},
    {"ind": 92, "activity_label": "Personal Care and Style",
     "ctx_a": "[header] How to dye your hair. [title] Buy dye.",
     "ctx_b": "pick A shade",
     "ctx": "[header] How to dye your hair. [title] Buy dye. pick A shade",
     "endings": ["[step] Wash  first.", "Use a towel.", "[title] Rinse.", "Cut it."],
     "source_id": "wikihow~150", "split": "val", "split_type": "zeroshot", "label": "0"},
]  # fmt: skip
HELLASWAG_TRAIN = [
    {"ind": 4, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell.",
     "ctx_b": "she", "ctx": "A lady walks to a barbell. she",
     "endings": ["lifts it.", "sits down.", "sings.", "leaves."],
     "source_id": "activitynet~v_x", "split": "train", "split_type": "indomain",
     "label": "0"},
]  # fmt: skip
PIQA_VAL = [
    {"goal": "How do I ready a guinea pig cage for its new occupants?",
     "sol1": "Provide the guinea pig with a cage full of a few inches of bedding.",
     "sol2": "Provide the guinea pig with a cage full of a few inches of jam.", "label": 0},
    {"goal": "To open a jar,", "sol1": "hit it with a hammer.",
     "sol2": "twist the lid counterclockwise.", "label": 1},
]  # fmt: skip
WINOGRANDE_VAL = [
    {"sentence": "The trophy doesn't fit into the suitcase because the _ is too large.",
     "option1": "trophy", "option2": "suitcase", "answer": "1"},
    {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
     "option1": "Sarah", "option2": "Maria", "answer": "1"},
]  # fmt: skip
WINOGRANDE_TRAIN = [
    {"sentence": "Ian volunteered to eat Dennis's menudo after _ had already had a bowl.",
     "option1": "Ian", "option2": "Dennis", "answer": "2"},
]  # fmt: skip
BOOLQ_VAL = [
    {"question": "do iran and afghanistan speak the same language",
     "passage": "Persian language -- Persian is spoken in Iran and Afghanistan.",
     "idx": 0, "label": 1},
    {"question": "is the sun a planet", "passage": "Sun -- The Sun is a star.",
     "idx": 1, "label": 0},
]  # fmt: skip
GSM8K_TEST = [
    {"question": "Janet has 3 ducks and buys 2 more. How many ducks does she have?",
     "answer": "She has 3 + 2 = <<3+2=5>>5 ducks.\n#### 5"},
    {"question": "A shirt costs $1,200 and is cut by $200. What does it cost?",
     "answer": "It costs 1200 - 200 = <<1200-200=1000>>1000.\n#### 1,000"},
]  # fmt: skip
GSM8K_TRAIN = [
    {"question": "Tom reads 4 pages a day. How many pages in 2 days?",
     "answer": "He reads 4 * 2 = <<4*2=8>>8 pages.\n#### 8"},
]  # fmt: skip
MATH_TEST = [
    {"problem": "What is $1+1$?", "level": "Level 1", "type": "Algebra",
     "solution": "We have $1+1=\\boxed{2}$."},
    {"problem": "Simplify $\\frac{2}{4}$.", "level": "Level 2", "type": "Algebra",
     "solution": "Divide by 2: $\\boxed{\\frac{1}{2}}$."},
]  # fmt: skip
MATH_TRAIN = [
    {"problem": "What is $2 \\cdot 3$?", "level": "Level 1", "type": "Algebra",
     "solution": "$2 \\cdot 3 = \\boxed{6}$."},
]  # fmt: skip
MATH500 = [
    {"problem": "Compute $3^2$.", "solution": "$3^2 = \\boxed{9}$.", "answer": "9",
     "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"},
    {"problem": "Compute $2^3$.", "solution": "$2^3 = \\boxed{8}$.", "answer": "8",
     "subject": "Algebra", "level": 1, "unique_id": "test/algebra/2.json"},
]  # fmt: skip
HUMANEVAL_TEST = [
    {"task_id": "HumanEval/0",
     "prompt": "from typing import List\n\n\ndef add(xs: List[int]) -> int:\n"
               "    \"\"\" Sum of xs.\n    >>> add([1, 2])\n    3\n    \"\"\"\n",
     "canonical_solution": "    total = 0\n    for x in xs:\n        total += x\n"
                           "    return total\n",
     "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate([1, 2]) == 3\n"
             "    assert candidate([]) == 0\n",
     "entry_point": "add"},
    {"task_id": "HumanEval/1",
     "prompt": "def neg(x):\n    \"\"\" -x \"\"\"\n",
     "canonical_solution": "    return -x\n",
     "test": "def check(candidate):\n    assert candidate(2) == -2\n",
     "entry_point": "neg"},
]  # fmt: skip
MBPP_TEST = [
    {"task_id": 11, "text": "Write a python function to remove the first and last occurrence "
     "of a given character from the string.",
     "code": "def remove_Occ(s,ch): \r\n    return s.replace(ch, '', 1)[::-1].replace(ch, '', 1)"
             "[::-1] ",
     "test_list": ['assert remove_Occ("hello","l") == "heo"',
                   'assert remove_Occ("abcda","a") == "bcd"',
                   'assert remove_Occ("PHP","P") == "H"'],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 12, "text": "Write a function to double a number.",
     "code": "def double(n):\r\n  return 2 * n",
     "test_list": ["assert double(1) == 2", "assert double(0) == 0", "assert double(-2) == -4"],
     "test_setup_code": "", "challenge_test_list": []},
]  # fmt: skip
MBPP_PROMPT = [
    {"task_id": t, "text": f"Write function {t}.", "code": f"def f{t}():\r\n  return {t}",
     "test_list": [f"assert f{t}() == {t}"] * 3, "test_setup_code": "",
     "challenge_test_list": []}
    for t in (1, 2, 3, 4, 5)
]  # fmt: skip


def _parquet(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A --data root holding every preset's dataset, as the hub (or the original repo) lays it
    out."""
    root = str(tmp_path_factory.mktemp("datasets"))
    j = lambda *parts: os.path.join(root, *parts)
    for subject, test, dev in [("abstract_algebra", MMLU_ALGEBRA_TEST, MMLU_ALGEBRA_DEV),
                               ("anatomy", MMLU_ANATOMY_TEST, MMLU_ALGEBRA_DEV)]:  # fmt: skip
        _parquet(j("mmlu", subject, HUB.format("test")), test)
        _parquet(j("mmlu", subject, HUB.format("dev")), dev)
    _parquet(j("mmlu", "all", HUB.format("test")), MMLU_ALGEBRA_TEST)  # (ignored)
    for subset in ("ARC-Easy", "ARC-Challenge"):
        _parquet(j("ai2_arc", subset, HUB.format("test")), ARC_TEST)
        _parquet(j("ai2_arc", subset, HUB.format("train")), ARC_TRAIN)
    _parquet(j("hellaswag", "data", HUB.format("validation")), HELLASWAG_VAL)
    _parquet(j("hellaswag", "data", HUB.format("train")), HELLASWAG_TRAIN)
    _parquet(j("piqa", "plain_text", "validation", "0000.parquet"), PIQA_VAL)  # (a conversion)
    _jsonl(j("winogrande", "dev.jsonl"), WINOGRANDE_VAL)  # (the original repo's files)
    _jsonl(j("winogrande", "train_xl.jsonl"), WINOGRANDE_TRAIN)
    _parquet(j("super_glue", "boolq", HUB.format("validation")), BOOLQ_VAL)
    _parquet(j("gsm8k", "main", HUB.format("test")), GSM8K_TEST)
    _parquet(j("gsm8k", "main", HUB.format("train")), GSM8K_TRAIN)
    _parquet(j("hendrycks_math", "algebra", HUB.format("test")), MATH_TEST)
    _parquet(j("hendrycks_math", "algebra", HUB.format("train")), MATH_TRAIN)
    _jsonl(j("MATH-500", "test.jsonl"), MATH500)
    _parquet(j("openai_humaneval", "openai_humaneval", HUB.format("test")), HUMANEVAL_TEST)
    _parquet(j("mbpp", "full", HUB.format("test")), MBPP_TEST)
    _parquet(j("mbpp", "full", HUB.format("prompt")), MBPP_PROMPT)
    return root


@pytest.fixture(scope="module")
def specs(data, tmp_path_factory):
    """{preset: [TaskSpec]} as the harness reads them: spec files written by the CLI."""
    out = str(tmp_path_factory.mktemp("specs"))
    paths = B.main(["write", ",".join(B.PRESETS), "--data", data, "--out", out])
    assert set(paths) == set(B.PRESETS)
    return {name: load_spec_file(path) for name, path in paths.items()}


def _prompt(spec, i=0, k=0):
    """Plain-mode prompt text of example i with k shots."""
    spec = spec.replace(num_fewshot=k)
    ex = read_examples(spec)
    pool = read_examples(spec, fewshot=True) if k else []
    return plain_prompt(spec, ex[i], select_shots(spec, ex[i], pool))


def _choices(spec, i=0):
    ex = read_examples(spec)[i]
    text = plain_prompt(spec, ex, [])
    return [choice_text(spec, ex.fields, c, text) for c in range(len(ex.fields["choices"]))]


class _CharTok:
    """One id per character (10 + its code point): encoding and decoding are exact, so the
    scorer and decoder stand-ins below can read the texts they are given."""

    bos_id, eos_id, pad_id, unk_id, vocab_size = 1, 2, 0, 3, 4096

    def encode(self, text, **kw):
        return [10 + ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(int(i) - 10) for i in ids if int(i) >= 10)

    def special_ids(self):
        return {"pad": 0, "bos": 1, "eos": 2, "unk": 3}

    def check_fits(self, vocab_size):
        assert vocab_size >= self.vocab_size


class _Oracle:
    """A stand-in LoglikScorer: log-prob 0 for a request whose whole text (context +
    continuation) is in `right`, else -1 per continuation token; records what it scored."""

    max_len = 1 << 20

    def __init__(self, right):
        self.right, self.seen = set(right), []

    def score(self, requests):
        out = []
        for ctx, cont in requests:
            ctx_text, cont_text = _CharTok().decode(ctx), _CharTok().decode(cont)
            self.seen.append((ctx_text, cont_text))
            lp = 0.0 if ctx_text + cont_text in self.right else -float(len(cont))
            out.append(ContinuationScore(lp, len(cont), False))
        return out


def _evaluator(**kw):
    cfg = get_variant("tiny", vocab_size=4096, max_seq_len=8192)
    return harness.Evaluator(cfg, None, _CharTok(), **kw)  # (no model is run)


MMLU_HEAD = "The following are multiple choice questions (with answers) about abstract algebra.\n\n"


def test_mmlu_prompts_specs_and_files(specs, data):
    algebra, anatomy = specs["mmlu"]
    assert [algebra.name, anatomy.name] == ["mmlu_abstract_algebra", "mmlu_anatomy"]
    assert algebra.group == ("mmlu", "mmlu_stem") and anatomy.group == ("mmlu", "mmlu_stem")
    assert (algebra.num_fewshot, algebra.fewshot_sampler) == (5, "first_n")  # dev, in order
    assert os.path.normpath(algebra.file) == os.path.join(
        data, "mmlu", "abstract_algebra", "test-00000-of-00001.parquet")  # fmt: skip
    assert _prompt(algebra) == MMLU_HEAD + (
        "Find the degree of Q(sqrt(2)) over Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")  # fmt: skip
    assert _prompt(algebra, k=1) == MMLU_HEAD + (
        "Which group is cyclic?\nA. Z_4\nB. Z_2 x Z_2\nC. S_3\nD. D_4\nAnswer: A\n\n"
        "Find the degree of Q(sqrt(2)) over Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")  # fmt: skip
    # first_n: every question's shots are the dev questions in file order
    assert _prompt(algebra, 1, k=2).startswith(MMLU_HEAD + "Which group is cyclic?\n")
    assert _choices(algebra) == [" A", " B", " C", " D"]
    assert [e.fields["answer"] for e in read_examples(algebra)] == [2, 1]  # int class labels


def test_multiple_choice_prompts(specs):
    arc = specs["arc_challenge"][0]
    assert _prompt(arc) == "Question: Which gas do plants take in?\nAnswer:"
    assert _prompt(arc, k=1) == ("Question: What do magnets attract?\nAnswer: iron\n\n"
                                 "Question: Which gas do plants take in?\nAnswer:")  # fmt: skip
    assert _choices(arc) == [" oxygen", " carbon dioxide", " helium", " neon"]
    # answerKey "1" among labels 1-3 is the first choice (not index 1)
    assert [e.fields["answer"] for e in read_examples(arc)] == [1, 0]

    hs = specs["hellaswag"][0]
    assert _prompt(hs) == "Roof shingle removal: A man is sitting on a roof. He"
    assert _prompt(hs, k=1) == ("Clean and jerk: A lady walks to a barbell. She lifts it.\n\n"
                                "Roof shingle removal: A man is sitting on a roof. He")  # fmt: skip
    assert _choices(hs)[3] == " starts pulling up roofing on a roof."
    # WikiHow artifacts: " [title]" ends a sentence, [tags] go, double spaces become one
    assert _prompt(hs, 1) == "Personal Care and Style: How to dye your hair.. Buy dye. Pick a shade"
    assert _choices(hs, 1) == [" Wash first.", " Use a towel.", " Rinse.", " Cut it."]
    assert [e.fields["answer"] for e in read_examples(hs)] == [3, 0]  # label "3" is a string

    piqa = specs["piqa"][0]
    assert _prompt(piqa, 1, k=1) == (
        "Question: How do I ready a guinea pig cage for its new occupants?\nAnswer: Provide the "
        "guinea pig with a cage full of a few inches of bedding.\n\n"
        "Question: To open a jar,\nAnswer:")  # fmt: skip
    assert _choices(piqa, 1) == [" hit it with a hammer.", " twist the lid counterclockwise."]

    boolq = specs["boolq"][0]
    assert _prompt(boolq) == (
        "Persian language -- Persian is spoken in Iran and Afghanistan.\n"
        "Question: do iran and afghanistan speak the same language?\nAnswer:")  # fmt: skip
    assert _prompt(boolq, k=1) == (
        "Sun -- The Sun is a star.\nQuestion: is the sun a planet?\nAnswer: no\n\n"
        "Persian language -- Persian is spoken in Iran and Afghanistan.\n"
        "Question: do iran and afghanistan speak the same language?\nAnswer:")  # fmt: skip
    assert _choices(boolq) == [" no", " yes"]


def test_winogrande_partial_scoring_through_the_harness(specs):
    """lm-eval's partial scoring: the context is the sentence up to the blank with each option
    filled in; the same rest of the sentence is scored after each."""
    wg = specs["winogrande"][0]
    assert _prompt(wg) == "The trophy doesn't fit into the suitcase because the "
    assert _prompt(wg, k=1) == (
        "Ian volunteered to eat Dennis's menudo after Dennis had already had a bowl.\n\n"
        "The trophy doesn't fit into the suitcase because the ")  # fmt: skip
    ex = read_examples(wg)[0]
    assert continuation_text(wg, ex.fields, _prompt(wg) + "trophy") == " is too large."
    right = [
        "The trophy doesn't fit into the suitcase because the trophy is too large.",
        # (the wrong option: this question is scored wrong)
        "Sarah was a much better surgeon than Maria so Maria always got the harder cases.",
    ]
    ev = _evaluator()
    ev.scorer = _Oracle(right)
    res = ev.run(wg)
    assert ev.scorer.seen[:2] == [
        ("The trophy doesn't fit into the suitcase because the trophy", " is too large."),
        ("The trophy doesn't fit into the suitcase because the suitcase", " is too large."),
    ]
    assert res["metrics"]["acc"] == 0.5 and res["metrics"]["acc"] == res["metrics"]["acc_norm"]


def test_mmlu_scored_through_the_harness_and_grouped(specs):
    """Multiple choice over the parquet files with 2 first_n shots, then the "mmlu" group's
    micro (per question, lm-eval's weight_by_size) and macro (per subject) averages."""
    algebra, anatomy = (s.replace(num_fewshot=2) for s in specs["mmlu"])
    right = []
    for spec in (algebra, anatomy):
        for i, ex in enumerate(read_examples(spec)):
            if spec is anatomy and i == 0:
                continue  # (no right answer: every choice ties, the first — wrong — wins)
            right.append(_prompt(spec, i, k=2) + " " + "ABCD"[ex.fields["answer"]])
    ev = _evaluator()
    ev.scorer = _Oracle(right)
    results = {s.name: ev.run(s) for s in (algebra, anatomy)}
    assert results["mmlu_abstract_algebra"]["metrics"]["acc"] == 1.0
    assert results["mmlu_anatomy"]["metrics"]["acc"] == pytest.approx(2 / 3)
    groups = harness.group_results(results)
    assert set(groups) == {"mmlu", "mmlu_stem"}
    mmlu = groups["mmlu"]
    assert mmlu["tasks"] == ["mmlu_abstract_algebra", "mmlu_anatomy"] and mmlu["n"] == 5
    assert mmlu["metrics"]["acc"] == pytest.approx(4 / 5)
    assert mmlu["metrics"]["acc_macro"] == pytest.approx((1 + 2 / 3) / 2)


def test_generation_prompts(specs):
    gsm = specs["gsm8k"][0]
    assert (gsm.num_fewshot, gsm.scoring, gsm.max_new_tokens) == (5, "regex", 256)
    assert gsm.stop == ("Question:", "</s>", "<|im_end|>")
    assert _prompt(gsm, k=1) == (
        "Question: Tom reads 4 pages a day. How many pages in 2 days?\nAnswer: He reads 4 * 2 = "
        "<<4*2=8>>8 pages.\n#### 8\n\nQuestion: Janet has 3 ducks and buys 2 more. How many "
        "ducks does she have?\nAnswer:")  # fmt: skip
    assert [e.fields["answer"] for e in read_examples(gsm)] == ["5", "1,000"]

    math = specs["math"][0]
    assert (math.name, math.scoring, math.group) == ("math_algebra", "math", ("math",))
    assert _prompt(math) == "Problem: What is $1+1$?\nAnswer:"
    assert _prompt(math, k=1) == ("Problem: What is $2 \\cdot 3$?\nAnswer: $2 \\cdot 3 = "
                                  "\\boxed{6}$.\n\nProblem: What is $1+1$?\nAnswer:")  # fmt: skip
    m500 = specs["math500"][0]
    assert _prompt(m500, k=1) == ("Problem: Compute $2^3$.\nAnswer: $2^3 = \\boxed{8}$.\n\n"
                                  "Problem: Compute $3^2$.\nAnswer:")  # fmt: skip

    he = specs["humaneval"][0]
    assert _prompt(he) == HUMANEVAL_TEST[0]["prompt"] and he.code_prefix == "{prompt}"

    mbpp = specs["mbpp"][0]
    task = ("You are an expert Python programmer, and here is your task: Write a python function "
            "to remove the first and last occurrence of a given character from the string. Your "
            "code should pass these tests:\n\nassert remove_Occ(\"hello\",\"l\") == \"heo\"\n"
            "assert remove_Occ(\"abcda\",\"a\") == \"bcd\"\nassert remove_Occ(\"PHP\",\"P\") == "
            "\"H\"\n[BEGIN]\n")  # fmt: skip
    assert _prompt(mbpp) == task
    # shots: tasks 2, 3, 4 of the prompt split, in order, each code + "\n[DONE]"
    shot = ("You are an expert Python programmer, and here is your task: Write function {0}. "
            "Your code should pass these tests:\n\nassert f{0}() == {0}\nassert f{0}() == {0}\n"
            "assert f{0}() == {0}\n[BEGIN]\ndef f{0}():\r\n  return {0}\n[DONE]\n\n")  # fmt: skip
    assert _prompt(mbpp, k=1) == shot.format(2) + task
    assert _prompt(mbpp, k=3) == shot.format(2) + shot.format(3) + shot.format(4) + task


def test_code_scoring_runs_the_programs(specs):
    """HumanEval: prompt + completion (its indentation kept, cut at "\\ndef") run with
    check(entry_point); MBPP: the response's python block, or the plain code, against
    test_list. The canonical solutions pass, wrong ones fail; `pass` is 0/1."""
    he, mbpp = specs["humaneval"][0], specs["mbpp"][0]
    fence = "```python\n" + MBPP_TEST[0]["code"] + "\n```\n[DONE]\nmore"
    responses = {
        HUMANEVAL_TEST[0]["prompt"]: HUMANEVAL_TEST[0]["canonical_solution"]
        + "\n\ndef unused():\n    return 1\n",
        HUMANEVAL_TEST[1]["prompt"]: "    return x\n",  # wrong
        '== "H"\n[BEGIN]\n': fence,
        "double(-2) == -4\n[BEGIN]\n": "def double(n):\n  return n + n + 1\n[DONE]",  # wrong
    }
    tok = _CharTok()

    def fake_generate(prompt_ids, max_new_tokens):
        texts = [tok.decode(ids) for ids in prompt_ids]
        return [tok.encode(next(r for end, r in responses.items() if t.endswith(end)))
                for t in texts]  # fmt: skip

    ev = _evaluator(generate_fn=fake_generate)
    res = ev.run(he)
    assert [s["scores"]["pass"] for s in res["samples"]] == [1.0, 0.0]
    assert res["samples"][0]["response"] == HUMANEVAL_TEST[0]["canonical_solution"].rstrip()
    assert res["metrics"]["pass"] == 0.5 and res["metrics"]["extracted"] == 1.0
    res = ev.run(mbpp.replace(num_fewshot=0))
    assert [s["scores"]["pass"] for s in res["samples"]] == [1.0, 0.0]
    assert res["samples"][0]["response"].startswith("```python\ndef remove_Occ")

    # Samples: pass@k of the 0/1 `pass`; chat mode runs the reply's block after the prefix.
    def sampled(prompt_ids, max_new_tokens, temperature):
        wrong = [tok.encode("    return 0\n")]
        return [r for pair in zip(fake_generate(prompt_ids[::2], 1), wrong * len(prompt_ids))
                for r in pair]  # fmt: skip

    ev = _evaluator(generate_fn=sampled)
    res = ev.run(he.replace(temperature=1.0, num_samples=2), limit=1)
    assert res["samples"][0]["scores"] == {"pass": 0.5, "extracted": 1.0, "pass@2": 1.0}
    fields = read_examples(he)[1].fields
    reply = "Sure:\n```python\ndef neg(x):\n    return -x\n```"
    assert G.code_program(he.replace(chat=True), fields, reply) == (
        fields["prompt"] + "\ndef neg(x):\n    return -x\n")  # fmt: skip
    assert G.score_response(he.replace(chat=True), fields, reply)["pass"] == 1.0


def test_a_tasks_code_limits_are_what_its_programs_run_under(specs, tmp_path):
    """code_limits (the spec's, or --code_limits laid over them) bind verify_code's Limits: a
    solution that writes a file outside its run directory is refused by the default guard
    (pass 0) and passes once writes_outside is allowed."""
    he = specs["humaneval"][0]
    fields = read_examples(he)[0].fields
    out = tmp_path / "written.txt"
    body = f"    open({str(out)!r}, 'w').write('x')\n" + HUMANEVAL_TEST[0]["canonical_solution"]
    assert G.score_response(he, fields, body)["pass"] == 0.0 and not out.exists()
    allowed = he.replace(code_limits={"writes_outside": True})
    assert G.score_response(allowed, fields, body)["pass"] == 1.0 and out.read_text() == "x"


def test_harness_takes_preset_and_dir(data):
    """--tasks mmlu:DIR resolves to the preset's tasks, as the written spec file does."""
    specs = resolve_tasks([f"gsm8k:{data}/gsm8k", f"mmlu:{data}/mmlu"])
    assert [s.name for s in specs] == ["gsm8k", "mmlu_abstract_algebra", "mmlu_anatomy"]


def test_spec_files_are_minimal_and_relative(specs, tmp_path, data):
    out = tmp_path / "specs"
    B.main(["write", f"arc_easy,hellaswag:{data}/hellaswag", "--data", data, "--out", str(out),
            "--num_fewshot", "2"])  # fmt: skip
    (entry,) = json.loads((out / "hellaswag.json").read_text())
    assert entry == {
        "name": "hellaswag", "type": "multiple_choice",
        "file": os.path.relpath(os.path.join(data, "hellaswag", "data", HUB.format("validation")),
                                out),
        "fields": {"context": "query", "choices": "clean_endings", "answer": "gold"},
        "num_fewshot": 2,
        "fewshot_file": os.path.relpath(os.path.join(data, "hellaswag", "data",
                                                     HUB.format("train")), out),
        "preprocess": "hellaswag",
    }  # fmt: skip
    assert load_spec_file(str(out / "arc_easy.json"))[0].num_fewshot == 2


def test_bad_layouts_name_the_directory_and_the_files_expected(data, tmp_path):
    empty = tmp_path / "gsm8k"
    empty.mkdir()
    (empty / "README.md").write_text("hi")
    with pytest.raises(B.BenchmarkDataError, match=(
            rf"gsm8k: no 'test' split under {empty} \(found: README.md\); expected "
            r"main/test-00000-of-00001.parquet and main/train-\*.parquet, or .*test.jsonl.*"
            r"huggingface-cli download --repo-type dataset openai/gsm8k")):  # fmt: skip
        B.preset_specs("gsm8k", str(empty))
    with pytest.raises(SystemExit, match=rf"gsm8k: no 'test' split under {empty}"):
        B.main(["write", "gsm8k", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # nothing written
    with pytest.raises(SystemExit, match=r"unknown benchmark 'mmlx'; known: .*mmlu"):
        B.main(["write", "mmlx", "--data", data, "--out", str(tmp_path / "o")])
    only_all = tmp_path / "mmlu_all"
    _parquet(str(only_all / "all" / HUB.format("test")), MMLU_ALGEBRA_TEST)
    with pytest.raises(B.BenchmarkDataError, match=r"mmlu: no subject directory under .*"
                       r"only all/: the per-subject directories are needed"):  # fmt: skip
        B.preset_specs("mmlu", str(only_all))
    shards = tmp_path / "shards" / "main"
    for i in range(2):
        _parquet(str(shards / f"test-0000{i}-of-00002.parquet"), GSM8K_TEST)
    with pytest.raises(B.BenchmarkDataError, match=r"split 'test' is 2 files"):
        B.preset_specs("gsm8k", str(shards.parent))
    with pytest.raises(B.BenchmarkDataError, match="no such directory"):
        B.preset_specs("piqa", str(tmp_path / "nowhere"))


def test_a_bad_row_names_file_and_row(specs, tmp_path):
    """A preprocessor failing on a row (HellaSwag's unlabelled test split) names file:row."""
    path = str(tmp_path / HUB.format("test"))
    _parquet(path, [HELLASWAG_VAL[0], {**HELLASWAG_VAL[1], "label": ""}])
    spec = specs["hellaswag"][0].replace(file=path)
    why = rf"{path}:2: task 'hellaswag': preprocess 'hellaswag' failed on this row \(ValueError"
    with pytest.raises(ValueError, match=why):
        read_examples(spec)
    with pytest.raises(ValueError, match=r"preprocess='nope' is not a row preprocessor; known: "):
        spec.replace(preprocess="nope")


# --- RL prompt records ----------------------------------------------------------------------


def _records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_rl_prompts_of_math_presets_reward_the_gold_answer(data, tmp_path):
    """A split's rows as GRPO prompt records: the question and the \\boxed{} instruction, the
    gold in meta.answer; a response boxing the gold earns math_verify's 1, another 0; the
    records read as GRPO reads prompts and pass its reference check."""
    from flaxlm.alignment.grpo_rewards import REWARDS, check_references
    from flaxlm.alignment.verify_math import last_boxed
    from flaxlm.data.chat_records import fields_config, prompt_record

    out = str(tmp_path / "gsm8k_train.jsonl")
    assert B.main(["prompts", "gsm8k", "--data", data, "--out", out]) == {"gsm8k": out}
    recs = _records(out)
    assert len(recs) == len(GSM8K_TRAIN)
    first = recs[0]
    assert first["prompt"] == GSM8K_TRAIN[0]["question"] + "\n" + B.BOXED_INSTRUCTION
    gold = GSM8K_TRAIN[0]["answer"].rsplit("####", 1)[1].strip()
    assert first["meta"]["answer"] == gold and first["meta"]["source"].endswith(":1")
    verify = REWARDS["math_verify"]
    assert verify(first["meta"], f"So the total is \\boxed{{{gold}}}.") == 1.0
    assert verify(first["meta"], "So the total is \\boxed{-1}.") == 0.0
    fields = fields_config()
    read = [prompt_record(r, fields) for r in recs]
    assert read[0][1] == [{"role": "user", "content": first["prompt"]}]
    check_references([("math_verify", verify, 1.0)],
                     [{"meta": m, "loc": f"p:{i}"} for i, (_, _, _, m) in enumerate(read)],
                     "grpo.rewards")  # fmt: skip

    for split, rows in (("train", MATH_TRAIN), ("test", MATH_TEST)):  # MATH: the solution's box
        out = str(tmp_path / f"math_{split}.jsonl")
        recs = _records(out) if B.write_prompts(f"math:{data}/hendrycks_math", split, out) else []
        assert [r["meta"]["answer"] for r in recs] == [r["solution"] for r in rows]
        for r in recs:
            boxed = last_boxed(r["meta"]["answer"])[1]
            assert verify(r["meta"], f"\\boxed{{{boxed}}}") == 1.0
    assert len(_records(out)) == len(MATH_TEST)
    B.write_prompts("math500", "test", out, data=data, limit=1)
    assert [r["meta"]["answer"] for r in _records(out)] == [MATH500[0]["solution"]]


def test_rl_prompts_of_code_presets_pass_with_the_canonical_solutions(data, tmp_path):
    """humaneval / mbpp records carry their tests: each canonical solution, answered in a
    python block, earns code_tests' 1 (the tests run through verify_code), a wrong one 0."""
    from flaxlm.alignment.verify_code import code_tests

    out = str(tmp_path / "he.jsonl")
    B.write_prompts("humaneval", "test", out, data=data)
    for rec, row in zip(_records(out), HUMANEVAL_TEST, strict=True):
        assert rec["prompt"].startswith("Complete the following Python function.")
        assert rec["meta"]["entry_point"] == row["entry_point"]
        solution = row["prompt"] + row["canonical_solution"]
        assert code_tests(rec["meta"], f"```python\n{solution}```") == 1.0
        assert code_tests(rec["meta"], f"```python\n{row['prompt']}    return None\n```") == 0.0
    mbpp = tmp_path / "mbpp"  # (MBPP's train split: tasks 601-974; here the test rows)
    for split in ("test", "train"):
        _parquet(str(mbpp / "full" / HUB.format(split)), MBPP_TEST)
    B.write_prompts(f"mbpp:{mbpp}", "train", out)
    recs = _records(out)
    assert len(recs) == len(MBPP_TEST) and recs[0]["meta"]["tests"] == MBPP_TEST[0]["test_list"]
    assert "Your code should pass these tests" in recs[0]["prompt"]
    for rec, row in zip(recs, MBPP_TEST, strict=True):
        assert code_tests(rec["meta"], f"```python\n{row['code']}\n```") == 1.0
        assert code_tests(rec["meta"], "```python\nx = 1\n```") == 0.0


def test_rl_prompts_refuse_what_has_no_verifiable_answer_and_missing_splits(data, tmp_path):
    out = str(tmp_path / "p.jsonl")
    with pytest.raises(SystemExit, match="mmlu is multiple choice: it has no answer a reward"):
        B.main(["prompts", "mmlu", "--data", data, "--out", out])
    with pytest.raises(SystemExit, match=r"humaneval: no 'train' split under .*openai_humaneval"):
        B.main(["prompts", "humaneval", "--data", data, "--out", out])
    with pytest.raises(SystemExit, match="unknown benchmark 'gsm9k'"):
        B.main(["prompts", "gsm9k", "--data", data, "--out", out])
    assert not os.path.exists(out)  # (nothing half-written)
