"""Standard benchmarks' evaluated examples as decontamination items.

``load_benchmarks("mmlu:~/datasets/mmlu,gsm8k:~/datasets/gsm8k", key)`` gives {"mmlu": [text,
...], "gsm8k": [...]}: for each preset of evaluation/benchmarks.py (mmlu, arc_easy, hellaswag,
gsm8k, math, humaneval, mbpp, ...) the split(s) its specs evaluate (the test split; HellaSwag's,
PIQA's, WinoGrande's and BoolQ's validation split), read through the preset's own specs and row
preprocessors (``tasks.read_examples``: HellaSwag's cleaned context and endings, ARC's gold
index, ...), one text per example. The few-shot splits (MMLU's dev, GSM8K's train, MBPP's
prompt) are not read, nor required: no score comes from them. Each text is one eval item, so an
n-gram never runs from one example into the next (data/dedup.py).

An example's text is what a document or a training record that leaked it would hold, in the
order a copy gives it (parts joined by a newline, which n-grams run across like any space):

  multiple choice  the question (the spec's context field) and the correct choice's text. BoolQ
                   puts its passage (the spec's text meta, which its prompt shows) first, as
                   lm-eval-harness's decontamination query for BoolQ is that passage: a
                   Wikipedia page quoting it matches, as the few-word question alone never
                   could. WinoGrande's is its sentence with the correct option in the blank
                   (the context, the option, the continuation). The wrong choices are left out:
                   a distractor is no evidence of a leak ("carbon dioxide" is common text), and
                   a copy that lists them holds the question, which matches on its own.
  generation       the prompt (question, problem) and the reference answer as the benchmark
                   stores it (GSM8K's worked solution and its "#### N", MATH's solution): a
                   solved copy matches across both, an unsolved one on its question.
  code             (scoring "code": HumanEval, MBPP) the prompt (HumanEval's signature and
                   docstring, MBPP's task text), the canonical solution and the tests
                   (HumanEval's check function, MBPP's asserts): a copy of the problem, of its
                   solution or of its test harness each gives the task away, and each is code
                   of that task (its function's name, its tests' literal values), so a
                   13-word window of it is seldom an idiom unrelated code shares.
  perplexity       the text.

A question shorter than the n-gram (many MMLU, ARC, BoolQ questions are under 13 words) can
still match through its answer; an example that is short altogether never matches, and the
report counts such items (``too_short``) per benchmark.

Errors: an item that is not PRESET:DIR, a preset named twice, an unknown preset, a directory
without the files its preset expects (the benchmarks module's error: the directory, the files
expected and what is there), a malformed row (file:line): each a ValueError starting with the
setting's name (``key``), raised before the caller reads or writes anything else. The
evaluation modules are imported inside the functions: they need no JAX, but nothing in data/
imports evaluation/ when it is loaded (the cleaning pool's and Beam's workers load data/ alone).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("flaxlm")


def preset_names() -> list[str]:
    """The benchmarks ``load_benchmarks`` knows (evaluation/benchmarks.py's presets)."""
    from flaxlm.evaluation.benchmarks import PRESETS

    return sorted(PRESETS)


def parse_benchmarks(value: str, key: str) -> list[tuple[str, str]]:
    """[(preset, directory)] of comma-separated "PRESET:DIR" items (spaces around a comma
    ignored; DIR may start with ~); ValueError naming ``key`` for an item without its directory
    or a preset named twice (the report counts per benchmark)."""
    out: list[tuple[str, str]] = []
    for item in (i.strip() for i in value.split(",")):
        if not item:
            continue
        name, sep, root = item.partition(":")
        if not sep or not root.strip() or not name.strip():
            raise ValueError(f"{key}: {item!r} is not PRESET:DIR (e.g. mmlu:~/datasets/mmlu; "
                             f"presets: {', '.join(preset_names())})")  # fmt: skip
        if name.strip() in (n for n, _ in out):
            raise ValueError(f"{key}: {name.strip()!r} is named twice")
        out.append((name.strip(), os.path.expanduser(root.strip())))
    return out


def load_benchmarks(value: str, key: str) -> dict[str, list[str]]:
    """{preset: its examples' texts} for ``value`` ("mmlu:DIR,gsm8k:DIR"; "" gives {}), every
    preset read before this returns (the module docstring); a ValueError starting with ``key``
    for any of its errors."""
    return {name: benchmark_texts(name, root, key) for name, root in parse_benchmarks(value, key)}


def benchmark_texts(name: str, root: str, key: str = "benchmark") -> list[str]:
    """One text per evaluated example of preset ``name`` over the dataset directory ``root``
    (``example_text``); errors as ``load_benchmarks``'s."""
    from flaxlm.evaluation.benchmarks import preset_specs
    from flaxlm.evaluation.tasks import read_examples

    try:
        # No shots: the few-shot split is neither read nor required (only the scored split is
        # decontaminated against).
        specs = preset_specs(name, root, num_fewshot=0)
        texts = [example_text(spec, ex.fields) for spec in specs for ex in read_examples(spec)]
    except KeyError as e:  # an unknown preset (its message lists the known ones)
        raise ValueError(f"{key}: {e.args[0]}") from None
    except ValueError as e:  # BenchmarkDataError, TaskFileError: the directory, or file:line
        raise type(e)(f"{key}: {e.args[0] if e.args else e}") from None
    logger.info("%s: %s: %d example(s) of %d task(s) under %s", key, name, len(texts),
                len(specs), root)  # fmt: skip
    return texts


def example_text(spec, fields: dict) -> str:
    """The text a copy of one example holds (the module docstring, per task type): ``fields``
    are the example's canonical fields (``tasks.Example.fields``) of task ``spec``."""
    if spec.type == "multiple_choice":
        return _choice_text(spec, fields)
    if spec.type == "perplexity":
        return fields["text"]
    parts = [fields["prompt"], fields["answer_raw"]]  # (answer: after gold_regex, "5" alone)
    meta = fields.get("meta")
    if spec.scoring == "code" and isinstance(meta, dict):
        tests = meta.get("tests", "")
        parts.append(tests if isinstance(tests, str) else "\n".join(map(str, tests)))
    return _join(parts)


def _choice_text(spec, fields: dict) -> str:
    """A multiple-choice example: [its text meta (BoolQ's passage),] the question and the
    correct choice; with a continuation (WinoGrande) the sentence the correct choice
    completes, built as the harness scores it."""
    gold = fields["choices"][fields["answer"]]
    if spec.continuation_template:
        from flaxlm.evaluation.prompts import continuation_text

        sentence = fields["context"] + gold  # (the choice completes the context as is)
        return sentence + continuation_text(spec, fields, sentence)
    meta = fields.get("meta")
    return _join([meta if isinstance(meta, str) else "", fields["context"], gold])


def _join(parts: list[str]) -> str:
    return "\n".join(p for p in parts if p and p.strip())
