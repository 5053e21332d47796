"""Standard benchmarks as task presets, in lm-eval-harness's formats, from files you downloaded.

    python -m flaxlm.evaluation.benchmarks list
    python -m flaxlm.evaluation.benchmarks write mmlu,gsm8k,humaneval --data ~/datasets --out specs
    python -m flaxlm.evaluation --checkpoint runs/pt --tasks specs/mmlu.json,specs/gsm8k.json
    python -m flaxlm.evaluation --checkpoint runs/pt --tasks mmlu:~/datasets/mmlu   # no write
    python -m flaxlm.evaluation.benchmarks prompts gsm8k --split train --data ~/datasets \\
        --out gsm8k_train.jsonl      # RL prompt records for GRPO's data.train (math_verify)

Each preset turns a downloaded dataset directory (`huggingface-cli download --repo-type dataset
cais/mmlu --local-dir ~/datasets/mmlu`: the hub's parquet split files, `test-00000-of-00001.
parquet` under `data/` or a subset directory, or `<split>/0000.parquet` of a parquet
conversion; or the jsonl files an original repository ships, `test.jsonl`) into TaskSpecs
(evaluation/tasks.py) that read those files where they lie. Nothing is downloaded. A split not
found is an error naming the directory, the files expected and what is there. `write` puts one
spec file per preset in --out (paths relative to it); the harness also takes PRESET:DIR itself.

Formats (lm-eval-harness's task definitions; target delimiter " ", shots joined by "\\n\\n"):
  mmlu         per subject, mmlu_<subject>: "The following are multiple choice questions (with
               answers) about <subject, spaces for _>.\\n\\n" then shots, each "<question
               stripped>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: <letter>"; " A".." D" scored
               (acc). Shots: the subject's dev split in order (first_n), 5 by default (the
               paper's and the leaderboards' setting; lm-eval's task default is 0: pass
               --num_fewshot 0 for that). Groups: mmlu and mmlu_{stem, humanities,
               social_sciences, other} (lm-eval's categories), averaged per example (micro, as
               lm-eval >= 0.4 weights by size) and per subject (`acc_macro`)
  arc_easy, arc_challenge  "Question: <question>\\nAnswer:", the choice texts scored; the
               gold index is choices.label.index(answerKey) (labels A-E or 1-5); acc, acc_norm
  hellaswag    validation split; "<activity_label>: <ctx_a> <ctx_b capitalised>" and the
               endings, each cleaned ("hellaswag" preprocessor: " [title]" -> ". ", other
               [bracketed] tags removed, double spaces made single); acc, acc_norm
  piqa         validation split; "Question: <goal>\\nAnswer:", sol1 / sol2; acc, acc_norm
  winogrande   winogrande_xl validation split; partial scoring: the sentence up to the blank
               with each option filled in is the context, and the rest of the sentence (after
               the blank, stripped) is what is scored (`continuation_template`); acc
  boolq        validation split; "<passage>\\nQuestion: <question>?\\nAnswer:", " no" / " yes"
  gsm8k        5 shots from train, "Question: <question>\\nAnswer: <worked solution>"; the
               response ends at "Question:" (or "</s>", "<|im_end|>"), 256 new tokens; its
               first "#### N" against the gold's (lm-eval's strict-match), numbers compared
               without commas or "$". Set "scoring": "math" in the spec for alignment/
               verify_math.py's judging (last \\boxed / #### / "The answer is")
  math         EleutherAI/hendrycks_math subjects (math_<subject>, group "math") or one file;
  math500      HuggingFaceH4/MATH-500. "Problem: <problem>\\nAnswer:" (lm-eval's
               hendrycks_math wording), response up to "Problem:", scored by math
               verification (`"scoring": "math"`) against the solution's last \\boxed{}
  humaneval    the prompt (signature + docstring) continued, up to "\\nclass", "\\ndef", "\\n#",
               "\\nif", "\\nprint"; prompt + completion run against the row's `test` and
               check(entry_point) (`"scoring": "code"`); `pass` (pass@1; pass@k with
               --temperature and --num_samples)
  mbpp         full config, test split; "You are an expert Python programmer, and here is your
               task: <text> Your code should pass these tests:\\n\\n<3 asserts>\\n[BEGIN]\\n";
               3 shots, tasks 2, 3, 4 of the prompt split (the MBPP paper's), each followed
               by its code and "\\n[DONE]"; the response up to "[DONE]" (a ```python block
               or plain code) run against test_list

Deviations: every task is scored greedily (lm-eval samples HumanEval at temperature 0.8; set
--temperature and --num_samples for pass@k); MATH shows 4 worked solutions from the train split
(MATH-500: from its own file, the example left out) so a base model ends on a \\boxed{} answer
verify_math reads, where lm-eval's hendrycks_math is 0-shot and compares the bare output;
GSM8K's number comparison is normalize="number" (thousands separators, currency, a trailing
"."), lm-eval's regexes_to_ignore; code runs in verify_code's limited subprocesses, which are
no sandbox (its docstring). Chat mode (an instruction-tuned model) asks the same questions as
user turns; MATH's adds "put your final answer within \\boxed{}", WinoGrande has none.

RL prompts (`prompts`, `prompt_records`): a generation preset's split (train by default) as
the records GRPO, online DPO and best-of-N read, {"prompt", "meta"}: gsm8k, math and math500 ask
the question and end with "Please reason step by step, and put your final answer within
\\boxed{}." (MATH's chat-mode wording), meta.answer the gold for `math_verify`; humaneval and mbpp
ask their chat-mode question, meta their tests for `code_tests`. meta.source is the row's
file:line. Train on a train split and evaluate on the test split the presets read; with other
data, `python -m flaxlm.data.decontaminate --against gsm8k:DIR,...` cleans it first.

The benchmark-specific row transforms are named row preprocessors registered here
(`tasks.register_preprocessor`), which a spec names with "preprocess".
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import re
import sys
from collections.abc import Callable

from flaxlm.evaluation.prompts import render
from flaxlm.evaluation.tasks import TaskFileError, TaskSpec, read_examples, register_preprocessor

log = logging.getLogger("flaxlm")


class BenchmarkDataError(TaskFileError):
    """A benchmark's files are not where (or what) its preset expects; the message names the
    directory, the files expected and the files found."""


# --- row preprocessors (the transforms a key path cannot express) -----------------------------


@register_preprocessor("mmlu")
def _mmlu_row(row: dict) -> dict:
    """The question stripped (lm-eval shows question.strip())."""
    row["question"] = row["question"].strip()
    return row


@register_preprocessor("arc")
def _arc_row(row: dict) -> dict:
    """`choice_texts` and `gold`: the answerKey's index among the choices' labels (A-E, or 1-5
    in some rows: a "1" is the first choice, not index 1)."""
    choices = row["choices"]
    row["choice_texts"] = list(choices["text"])
    row["gold"] = list(choices["label"]).index(row["answerKey"])
    return row


def hellaswag_clean(text: str) -> str:
    """HellaSwag's WikiHow artifacts removed, as lm-eval-harness cleans them: " [title]" ends
    a sentence, other bracketed tags ("[header]", "[step]") go, a double space becomes one."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


@register_preprocessor("hellaswag")
def _hellaswag_row(row: dict) -> dict:
    """`query` ("<activity>: <ctx_a> <Ctx_b>"), `clean_endings` and `gold` (int of label, which
    the HF files hold as a string)."""
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()  # (str.capitalize: the rest lower)
    row["query"] = hellaswag_clean(row["activity_label"] + ": " + ctx)
    row["clean_endings"] = [hellaswag_clean(e) for e in row["endings"]]
    row["gold"] = int(row["label"])
    return row


@register_preprocessor("piqa")
def _piqa_row(row: dict) -> dict:
    """`solutions`: [sol1, sol2]."""
    row["solutions"] = [row["sol1"], row["sol2"]]
    return row


@register_preprocessor("boolq")
def _boolq_row(row: dict) -> dict:
    """`yes_no` (["no", "yes"]) and `gold`: super_glue's label (0 = no) or google/boolq's and the
    original jsonl's boolean answer."""
    row["yes_no"] = ["no", "yes"]
    gold = row["label"] if "label" in row else row["answer"]
    if not isinstance(gold, (bool, int)) or gold not in (0, 1):
        raise ValueError(f"label/answer {gold!r} is not 0/1 or a boolean")
    row["gold"] = int(gold)
    return row


@register_preprocessor("winogrande")
def _winogrande_row(row: dict) -> dict:
    """`partial` {prefix: the sentence before "_", target: after it, stripped}, `options` and
    `gold` (answer "1" / "2" -> 0 / 1)."""
    sentence = row["sentence"]
    i = sentence.index("_")
    row["partial"] = {"prefix": sentence[:i], "target": sentence[i + 1 :].strip()}
    row["options"] = [row["option1"], row["option2"]]
    row["gold"] = {"1": 0, "2": 1}[str(row["answer"])]
    return row


@register_preprocessor("humaneval")
def _humaneval_row(row: dict) -> dict:
    """`code_meta` for code scoring: the `test` code (it defines check) and the entry point."""
    row["code_meta"] = {"tests": row["test"], "entry_point": row["entry_point"]}
    return row


# The MBPP paper's (and lm-eval's) shots are tasks 2, 3 and 4 of the prompt split (task ids
# 1-10); the other prompt rows are left out. No test, train or validation row has these ids.
_MBPP_PROMPT_ONLY = {1, 5, 6, 7, 8, 9, 10}


@register_preprocessor("mbpp")
def _mbpp_row(row: dict) -> dict | None:
    """`code_meta` {tests: test_list} for code scoring (lm-eval runs test_list alone); the
    prompt split's rows other than the shots 2-4 are left out (None)."""
    if row["task_id"] in _MBPP_PROMPT_ONLY:
        return None
    row["code_meta"] = {"tests": list(row["test_list"])}
    return row


# --- finding a split's file -------------------------------------------------------------------

# How one split's file is named: the hub's data files ("test-00000-of-00001.parquet"), a single
# parquet file, a parquet conversion's "<split>/0000.parquet", an original repo's jsonl.
_PATTERNS = ("{}-*.parquet", "{}.parquet", "{}/*.parquet", "{}.jsonl")


def _listing(root: str, limit: int = 12) -> str:
    """What is under `root` (files, relative, a few levels deep), for an error message."""
    if not os.path.isdir(root):
        return "no such directory"
    found = []
    for d, subdirs, files in os.walk(root):
        subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
        if d[len(root) :].count(os.sep) > 2:
            subdirs[:] = []
        found += [os.path.relpath(os.path.join(d, f), root) for f in sorted(files)
                  if not f.startswith(".")]  # fmt: skip
    if not found:
        return "nothing"
    more = f", ... ({len(found)} files)" if len(found) > limit else ""
    return ", ".join(found[:limit]) + more


def find_split(root: str, subdirs: tuple[str, ...], stems: tuple[str, ...]) -> str | None:
    """The file of one split under `root`/`subdir` (the first subdir, stem and pattern that
    matches), or None. A split in several shards is an error: a task reads one file."""
    for sub in subdirs:
        d = os.path.join(root, sub) if sub else root
        if not os.path.isdir(d):
            continue
        for stem in stems:
            for pattern in _PATTERNS:
                hits = sorted(glob.glob(os.path.join(glob.escape(d), pattern.format(stem))))
                if len(hits) > 1:
                    names = ", ".join(os.path.relpath(h, root) for h in hits[:4])
                    raise BenchmarkDataError(
                        f"{d}: split {stem!r} is {len(hits)} files ({names}); a task reads one "
                        "file: merge them into one parquet or jsonl file"
                    )
                if hits:
                    return hits[0]
    return None


@dataclasses.dataclass(frozen=True)
class Preset:
    """A benchmark: how its specs are built and where its files are expected."""

    name: str
    build: Callable[..., list[TaskSpec]]  # (root, num_fewshot=None) -> specs
    source: str  # the dataset to download (HF hub id)
    layout: str  # the files expected under the directory, for `list` and errors
    dirs: tuple[str, ...]  # directory names looked for under --data

    def split(self, root: str, split: str, subdirs=("", "data"), stems=None,
              required: bool = True) -> str | None:  # fmt: skip
        """The file of `split` under `root`, else (required) a BenchmarkDataError naming the
        directory, the files expected and what is there."""
        path = find_split(root, tuple(subdirs), tuple(stems or (split,)))
        if path is None and required:
            raise BenchmarkDataError(
                f"{self.name}: no {split!r} split under {root} (found: {_listing(root)}); "
                f"expected {self.layout}, e.g. huggingface-cli download --repo-type dataset "
                f"{self.source} --local-dir {root}"
            )
        return path


PRESETS: dict[str, Preset] = {}


def _preset(name: str, source: str, layout: str, dirs: tuple[str, ...] = ()):
    def deco(fn):
        PRESETS[name] = Preset(name, fn, source, layout, (name, *dirs))
        return fn

    return deco


# --- multiple choice ------------------------------------------------------------------------

# Subject -> lm-eval-harness's category (its MMLU groups mmlu_stem, ...).
_MMLU_CATEGORY_SUBJECTS = {
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry "
    "college_computer_science college_mathematics college_physics computer_security "
    "conceptual_physics electrical_engineering elementary_mathematics high_school_biology "
    "high_school_chemistry high_school_computer_science high_school_mathematics "
    "high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history "
    "high_school_world_history international_law jurisprudence logical_fallacies "
    "moral_disputes moral_scenarios philosophy prehistory professional_law world_religions",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
    "high_school_macroeconomics high_school_microeconomics high_school_psychology "
    "human_sexuality professional_psychology public_relations security_studies sociology "
    "us_foreign_policy",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging "
    "management marketing medical_genetics miscellaneous nutrition professional_accounting "
    "professional_medicine virology",
}
MMLU_SUBJECTS = {s: cat for cat, subs in _MMLU_CATEGORY_SUBJECTS.items() for s in subs.split()}
_MMLU_QUESTION = "{context}\nA. {choices[0]}\nB. {choices[1]}\nC. {choices[2]}\nD. {choices[3]}"


_MMLU_LAYOUT = ("<subject>/test-00000-of-00001.parquet and <subject>/dev-*.parquet per subject "
                "(columns question, subject, choices, answer)")  # fmt: skip


@_preset("mmlu", "cais/mmlu", _MMLU_LAYOUT, ("cais_mmlu", "MMLU"))
def mmlu(root: str, num_fewshot: int | None = None) -> list[TaskSpec]:
    """mmlu_<subject> for each subject found (the module docstring's format)."""
    p, k = PRESETS["mmlu"], 5 if num_fewshot is None else num_fewshot
    specs, missing = [], []
    for subject, category in MMLU_SUBJECTS.items():
        where = (subject, f"data/{subject}")
        test = p.split(root, "test", where, required=False)
        if test is None:
            missing.append(subject)
            continue
        dev = p.split(root, "dev", where, required=k > 0)
        about = subject.replace("_", " ")
        specs.append(TaskSpec(
            f"mmlu_{subject}", "multiple_choice", test,
            fields={"context": "question", "choices": "choices", "answer": "answer"},
            template=_MMLU_QUESTION + "\nAnswer:", chat_template=_MMLU_QUESTION,
            choice_template="{letter}", preprocess="mmlu",
            description=f"The following are multiple choice questions (with answers) about "
                        f"{about}.\n\n",
            num_fewshot=k, fewshot_file=dev or "", fewshot_sampler="first_n",
            group=("mmlu", f"mmlu_{category}"),
        ))  # fmt: skip
    if not specs:
        only_all = os.path.isdir(os.path.join(root, "all"))
        hint = " (only all/: the per-subject directories are needed)" if only_all else ""
        raise BenchmarkDataError(f"mmlu: no subject directory under {root}{hint} (found: "
                                 f"{_listing(root)}); expected {p.layout}, e.g. "
                                 f"huggingface-cli download --repo-type dataset {p.source} "
                                 f"--local-dir {root}")  # fmt: skip
    if missing:
        log.warning("mmlu: %d of %d subjects under %s (missing: %s); the group averages are "
                    "over those found", len(specs), len(MMLU_SUBJECTS), root,
                    ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else ""))  # fmt: skip
    return specs


def _arc(name: str, subset: str, root: str, num_fewshot: int | None) -> list[TaskSpec]:
    p = PRESETS[name]
    where = (subset, f"data/{subset}", "", "data")
    k = num_fewshot or 0
    return [TaskSpec(
        name, "multiple_choice", p.split(root, "test", where),
        fields={"context": "question", "choices": "choice_texts", "answer": "gold"},
        template="Question: {context}\nAnswer:", preprocess="arc", num_fewshot=k,
        fewshot_file=p.split(root, "train", where, required=k > 0) or "",
    )]  # fmt: skip


_ARC_LAYOUT = ("{}/test-00000-of-00001.parquet (+ train for shots; columns question, "
               "choices {{text, label}}, answerKey)")  # fmt: skip


@_preset("arc_easy", "allenai/ai2_arc", _ARC_LAYOUT.format("ARC-Easy"), ("ai2_arc", "arc"))
def arc_easy(root: str, num_fewshot: int | None = None) -> list[TaskSpec]:
    return _arc("arc_easy", "ARC-Easy", root, num_fewshot)


@_preset("arc_challenge", "allenai/ai2_arc", _ARC_LAYOUT.format("ARC-Challenge"),
         ("ai2_arc", "arc"))  # fmt: skip
def arc_challenge(root: str, num_fewshot: int | None = None) -> list[TaskSpec]:
    return _arc("arc_challenge", "ARC-Challenge", root, num_fewshot)


def _mc(name: str, root: str, num_fewshot: int | None, *, subdirs=("", "data"),
        test="validation", test_stems=None, train_stems=None, **kw) -> list[TaskSpec]:  # fmt: skip
    """A multiple-choice preset's one task: its validation (or test) split, shots from train."""
    p, k = PRESETS[name], num_fewshot or 0
    file = p.split(root, test, subdirs, test_stems)
    shots = p.split(root, "train", subdirs, train_stems, required=k > 0) or ""
    return [TaskSpec(name, "multiple_choice", file, num_fewshot=k, fewshot_file=shots, **kw)]


_HELLASWAG_LAYOUT = ("data/validation-00000-of-00001.parquet, default/validation/0000.parquet "
                     "or hellaswag_val.jsonl (+ train; columns ctx_a, ctx_b, activity_label, "
                     "endings, label)")  # fmt: skip


@_preset("hellaswag", "Rowan/hellaswag", _HELLASWAG_LAYOUT)
def hellaswag(root: str, num_fewshot: int | None = None) -> list[TaskSpec]:
    return _mc("hellaswag", root, num_fewshot, subdirs=("", "data", "default"),
               test_stems=("validation", "hellaswag_val"), train_stems=("train", "hellaswag_train"),
               fields={"context": "query", "choices": "clean_endings", "answer": "gold"},
               preprocess="hellaswag")  # fmt: skip


@_preset("piqa", "ybisk/piqa", "data/validation-00000-of-00001.parquet or plain_text/validation/"
         "0000.parquet (+ train; columns goal, sol1, sol2, label)")  # fmt: skip
def piqa(root: str, num_fewshot: int | None = None) -> list[TaskSpec]:
    return _mc("piqa", root, num_fewshot, subdirs=("", "data", "plain_text"),
               test_stems=("validation", "valid"),
               fields={"context": "goal", "choices": "solutions", "answer": "label"},
               template="Question: {context}\nAnswer:", preprocess="piqa")  # fmt: skip


@_preset("winogrande", "allenai/winogrande", "winogrande_xl/validation-00000-of-00001.parquet "
         "or dev.jsonl (+ train; columns sentence, option1, option2, answer)")  # fmt: skip
def winogrande(root: str, num_fewshot: int | None = None) -> list[TaskSpec]:
    return _mc("winogrande", root, num_fewshot, subdirs=("winogrande_xl", "", "data"),
               test_stems=("validation", "dev"), train_stems=("train", "train_xl"),
               fields={"context": "partial.prefix", "choices": "options", "answer": "gold",
                       "meta": "partial"},
               continuation_template="{meta[target]}", preprocess="winogrande")  # fmt: skip


@_preset("boolq", "super_glue (boolq) or google/boolq", "boolq/validation-00000-of-00001.parquet "
         "or data/validation-*.parquet or dev.jsonl (+ train; columns passage, question, label "
         "or answer)", ("super_glue",))  # fmt: skip
def boolq(root: str, num_fewshot: int | None = None) -> list[TaskSpec]:
    return _mc("boolq", root, num_fewshot, subdirs=("boolq", "", "data"),
               test_stems=("validation", "dev"),
               fields={"context": "question", "choices": "yes_no", "answer": "gold",
                       "meta": "passage"},
               template="{meta}\nQuestion: {context}?\nAnswer:", preprocess="boolq")  # fmt: skip


# --- generation ------------------------------------------------------------------------------

_GSM8K_NUMBER = r"#### (\-?[0-9\.\,]+)"


_GSM8K_LAYOUT = ("main/test-00000-of-00001.parquet and main/train-*.parquet, or grade_school_"
                 "math/data/test.jsonl and train.jsonl (columns question, answer)")  # fmt: skip


@_preset("gsm8k", "openai/gsm8k", _GSM8K_LAYOUT)
def gsm8k(root: str, num_fewshot: int | None = None) -> list[TaskSpec]:
    p = PRESETS["gsm8k"]
    where = ("main", "", "data", "grade_school_math/data")
    k = 5 if num_fewshot is None else num_fewshot
    return [TaskSpec(
        "gsm8k", "generation", p.split(root, "test", where),
        fields={"prompt": "question", "answer": "answer"},
        template="Question: {prompt}\nAnswer:", target_template=" {answer_raw}",
        num_fewshot=k, fewshot_file=p.split(root, "train", where, required=k > 0) or "",
        scoring="regex", answer_regex=_GSM8K_NUMBER, gold_regex=_GSM8K_NUMBER,
        normalize="number", stop=("Question:", "</s>", "<|im_end|>"), max_new_tokens=256,
    )]  # fmt: skip


# What MATH's chat-mode question ends with, and every math RL prompt (`prompt_records`): a policy
# trained on those prompts is asked what evaluation asks it, and answers in a \boxed{} that
# math_verify reads.
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
_MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                  "number_theory", "prealgebra", "precalculus")  # fmt: skip
_MATH = dict(
    fields={"prompt": "problem", "answer": "solution"},
    template="Problem: {prompt}\nAnswer:",
    target_template=" {answer_raw}",
    chat_template="{prompt}\n" + BOXED_INSTRUCTION.replace("{}", "{{}}"),  # (format braces)
    scoring="math",
    stop=("Problem:",),
    max_new_tokens=512,
)


_MATH_LAYOUT = ("<subject>/test-00000-of-00001.parquet and <subject>/train-*.parquet per "
                "subject (algebra, ..., precalculus), or one test and one train file (columns "
                "problem, level, type, solution)")  # fmt: skip


@_preset("math", "EleutherAI/hendrycks_math", _MATH_LAYOUT, ("hendrycks_math", "competition_math"))
def hendrycks_math(root: str, num_fewshot: int | None = None) -> list[TaskSpec]:
    """math_<subject> per subject directory found (group "math": the MATH accuracy), else one
    task "math" of a single test file; 4 worked solutions from train as shots."""
    p, k = PRESETS["math"], 4 if num_fewshot is None else num_fewshot
    subjects = [s for s in _MATH_SUBJECTS if p.split(root, "test", (s,), required=False)]
    if not subjects:
        shots = p.split(root, "train", required=k > 0) or ""
        return [TaskSpec("math", "generation", p.split(root, "test"), num_fewshot=k,
                         fewshot_file=shots, **_MATH)]  # fmt: skip
    return [TaskSpec(f"math_{s}", "generation", p.split(root, "test", (s,)), num_fewshot=k,
                     fewshot_file=p.split(root, "train", (s,), required=k > 0) or "",
                     group=("math",), **_MATH) for s in subjects]  # fmt: skip


@_preset("math500", "HuggingFaceH4/MATH-500", "test.jsonl (columns problem, solution, answer)",
         ("MATH-500", "math-500"))  # fmt: skip
def math500(root: str, num_fewshot: int | None = None) -> list[TaskSpec]:
    """MATH-500; shots (4) from its own file, the evaluated problem left out (no train split)."""
    k = 4 if num_fewshot is None else num_fewshot
    file = PRESETS["math500"].split(root, "test")
    return [TaskSpec("math500", "generation", file, num_fewshot=k, **_MATH)]


@_preset("humaneval", "openai/openai_humaneval", "openai_humaneval/test-00000-of-00001.parquet "
         "or HumanEval.jsonl (columns task_id, prompt, canonical_solution, test, entry_point)",
         ("openai_humaneval", "HumanEval"))  # fmt: skip
def humaneval(root: str, num_fewshot: int | None = None) -> list[TaskSpec]:
    file = PRESETS["humaneval"].split(root, "test", ("openai_humaneval", "", "data"),
                                      ("test", "HumanEval"))  # fmt: skip
    return [TaskSpec(
        "humaneval", "generation", file,
        fields={"prompt": "prompt", "answer": "canonical_solution", "meta": "code_meta"},
        chat_template="Complete the following Python function.\n\n```python\n{prompt}```",
        target_template="{answer}", num_fewshot=num_fewshot or 0, preprocess="humaneval",
        scoring="code", code_prefix="{prompt}", stop=("\nclass", "\ndef", "\n#", "\nif", "\nprint"),
        max_new_tokens=512,
    )]  # fmt: skip


_MBPP_TASK = ("You are an expert Python programmer, and here is your task: {prompt} Your code "
              "should pass these tests:\n\n"
              "{meta[tests][0]}\n{meta[tests][1]}\n{meta[tests][2]}\n")  # fmt: skip


@_preset("mbpp", "google-research-datasets/mbpp", "full/test-00000-of-00001.parquet and "
         "full/prompt-*.parquet (columns task_id, text, code, test_list)")  # fmt: skip
def mbpp(root: str, num_fewshot: int | None = None) -> list[TaskSpec]:
    p, k = PRESETS["mbpp"], 3 if num_fewshot is None else num_fewshot
    where = ("full", "", "data")
    return [TaskSpec(
        "mbpp", "generation", p.split(root, "test", where),
        fields={"prompt": "text", "answer": "code", "meta": "code_meta"},
        template=_MBPP_TASK + "[BEGIN]\n", chat_template=_MBPP_TASK.rstrip("\n"),
        target_template="{answer}\n[DONE]", num_fewshot=k,
        fewshot_file=p.split(root, "prompt", where, required=k > 0) or "",
        fewshot_sampler="first_n", preprocess="mbpp", scoring="code", stop=("[DONE]",),
        max_new_tokens=512,
    )]  # fmt: skip


# --- resolving, writing ----------------------------------------------------------------------


def preset_specs(name: str, root: str, num_fewshot: int | None = None) -> list[TaskSpec]:
    """The specs of preset `name` over the dataset directory `root`."""
    if name not in PRESETS:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(PRESETS)}")
    if not os.path.isdir(root):
        raise BenchmarkDataError(f"{name}: {root}: no such directory (expected "
                                 f"{PRESETS[name].layout})")  # fmt: skip
    return PRESETS[name].build(os.path.abspath(root), num_fewshot)


def dataset_dir(name: str, data: str) -> str:
    """Where preset `name`'s files are under the --data root: the first of its directory names
    that exists there (mmlu: mmlu, cais_mmlu, ...), else `data` itself."""
    for d in PRESETS[name].dirs:
        if os.path.isdir(os.path.join(data, d)):
            return os.path.join(data, d)
    return data


def spec_dict(spec: TaskSpec, base: str) -> dict:
    """`spec` as a spec-file entry: its non-default keys, files relative to `base` (the spec
    file's directory, as tasks.load_spec_file reads them)."""
    d, default = spec.to_dict(), TaskSpec(spec.name, spec.type, spec.file).to_dict()
    out = {k: v for k, v in d.items() if k in ("name", "type", "file") or v != default[k]}
    for key in ("file", "fewshot_file"):
        if out.get(key):
            out[key] = os.path.relpath(out[key], base)
    return out


def resolve_item(item: str, data: str) -> tuple[str, str]:
    """(preset, its dataset directory) of "preset" (found under `data`: `dataset_dir`) or
    "preset:DIR"; an unknown preset is a KeyError listing the known ones."""
    name, _, root = item.partition(":")
    if name not in PRESETS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(sorted(PRESETS))}")
    if not root and not data:
        raise ValueError(f"{name}: give --data DIR or {name}:DIR")
    return name, (os.path.expanduser(root) if root else
                  dataset_dir(name, os.path.expanduser(data)))  # fmt: skip


def write_specs(names: list[str], data: str, out: str,
                num_fewshot: int | None = None) -> dict[str, str]:  # fmt: skip
    """One spec file per preset, OUT/<name>.json, for names "preset" (its files under `data`)
    or "preset:DIR"; returns {name: path}. Every preset resolves before any file is written."""
    built = {}
    for item in names:
        name, root = resolve_item(item, data)
        built[name] = preset_specs(name, root, num_fewshot)
    os.makedirs(out, exist_ok=True)
    base, paths = os.path.abspath(out), {}
    for name, specs in built.items():
        paths[name] = os.path.join(out, f"{name}.json")
        with open(paths[name], "w", encoding="utf-8") as f:
            json.dump([spec_dict(s, base) for s in specs], f, indent=1, ensure_ascii=False)
            f.write("\n")
    return paths


# --- RL prompts ------------------------------------------------------------------------------

RL_PRESETS = ("gsm8k", "math", "math500", "humaneval", "mbpp")  # the generation presets


def _split_file(name: str, root: str, test_file: str, split: str) -> str:
    """The file of `split` in the directory holding the preset's test file (a subject's, a
    config's), else a BenchmarkDataError naming the directory and the files there."""
    if split == "test":
        return test_file
    where = os.path.relpath(os.path.dirname(test_file), root)
    return PRESETS[name].split(root, split, (where,))


def prompt_records(name: str, root: str, split: str, limit: int | None = None) -> list[dict]:
    """RL prompt records {"prompt", "meta"} (what GRPO / online DPO / best-of-N read) of a
    generation preset's `split`: math presets (gsm8k, math, math500) ask the question and end
    with BOXED_INSTRUCTION, meta.answer the gold (GSM8K's number, MATH's solution: its last
    \\boxed{} is the reference) for the `math_verify` reward; code presets (humaneval, mbpp)
    ask their chat-mode question, meta the tests (and entry_point) `code_tests` runs. Each
    meta.source is the row's file:line. `limit`: the first rows of each task file."""
    specs = preset_specs(name, root, num_fewshot=0)
    if specs[0].type != "generation":
        raise ValueError(f"{name} is multiple choice: it has no answer a reward verifies "
                         f"(prompts come from {', '.join(RL_PRESETS)})")  # fmt: skip
    records = []
    for spec in specs:
        spec = spec.replace(file=_split_file(name, root, spec.file, split), fewshot_file="")
        for ex in read_examples(spec, limit=limit):
            f = ex.fields
            if spec.scoring == "code":
                prompt, meta = render(spec.user_template, f, spec), dict(f["meta"])
            else:
                prompt, meta = f"{f['prompt']}\n{BOXED_INSTRUCTION}", {"answer": f["answer"]}
            meta["source"] = ex.source
            records.append({"prompt": prompt, "meta": meta})
    return records


def write_prompts(item: str, split: str, out: str, data: str = "",
                  limit: int | None = None) -> int:  # fmt: skip
    """`prompt_records` of "preset" (under `data`) or "preset:DIR" written to the jsonl `out`
    (whole or not at all: a temporary file renamed); returns how many."""
    name, root = resolve_item(item, data)
    records = prompt_records(name, os.path.abspath(root), split, limit)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return len(records)


def _list() -> str:
    lines = []
    for p in PRESETS.values():
        lines += [f"{p.name:<14} {p.source}  (under --data: {' | '.join(p.dirs)})",
                  f"{'':<14} {p.layout}"]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, str]:
    p = argparse.ArgumentParser(prog="python -m flaxlm.evaluation.benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the presets and the files each expects")
    w = sub.add_parser("write", help="write spec files the harness reads (--tasks OUT/NAME.json)")
    w.add_argument("names", help="comma-separated presets, each NAME or NAME:DATASET_DIR")
    w.add_argument("--data", default="", help="directory holding the datasets (DATA/mmlu, ...)")
    w.add_argument("--out", required=True, help="directory for the spec files")
    w.add_argument("--num_fewshot", type=int, default=None, help="shots (default: each preset's)")
    r = sub.add_parser("prompts", help="write RL prompt records (GRPO's data.train) of a split")
    r.add_argument("name", help=f"one of {', '.join(RL_PRESETS)}, as NAME or NAME:DATASET_DIR")
    r.add_argument("--split", default="train", help="the split (default train)")
    r.add_argument("--data", default="", help="directory holding the datasets (DATA/gsm8k, ...)")
    r.add_argument("--out", required=True, help="the jsonl file to write")
    r.add_argument("--limit", type=int, default=None, help="the first rows of each task file")
    args = p.parse_args(argv)
    if args.cmd == "list":
        print(_list())
        return {}
    if args.cmd == "prompts":
        try:
            n = write_prompts(args.name, args.split, args.out, args.data, args.limit)
        except (KeyError, ValueError) as e:
            raise SystemExit(str(e.args[0]) if e.args else str(e)) from None
        reward = (
            "code_tests"
            if args.name.partition(":")[0] in ("humaneval", "mbpp")
            else ("math_verify")
        )
        print(f"[benchmarks] {n} prompts -> {args.out}", file=sys.stderr)
        print(
            f"python -m flaxlm.train.main --config configs/grpo.py --config.init_from=RUN "
            f"--config.data.train={args.out} --config.grpo.rewards={reward}"
        )
        return {args.name: args.out}
    names = [n.strip() for n in args.names.split(",") if n.strip()]
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise SystemExit("--num_fewshot must be >= 0")
    try:
        paths = write_specs(names, args.data, args.out, args.num_fewshot)
    except (KeyError, ValueError) as e:  # BenchmarkDataError, TaskFileError are ValueErrors
        raise SystemExit(str(e.args[0]) if e.args else str(e)) from None
    for name, path in paths.items():
        with open(path, encoding="utf-8") as f:
            n = len(json.load(f))
        print(f"[benchmarks] {name}: {n} task(s) -> {path}", file=sys.stderr)
    print("python -m flaxlm.evaluation --checkpoint RUN --tasks " + ",".join(paths.values()))
    return paths


if __name__ == "__main__":
    main()
