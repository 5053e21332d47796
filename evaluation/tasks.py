"""Evaluation task specs and their example files.

A task is data, not code: a `TaskSpec` names a jsonl file and says how to read and score it, so a
real benchmark (MMLU-style multiple choice, GSM8K-style generation, held-out text) plugs in with a
JSON spec file and no code. Three task types:

    perplexity       rows hold a text; token-level NLL / perplexity / bits per byte
    multiple_choice  rows hold a context, choices and the answer; log-likelihood acc and acc_norm
    generation       rows hold a prompt and an answer; greedy generation (or `num_samples`
                     samples at `temperature`) scored by exact match, a regex-extracted answer,
                     the built-in world's judge, or math answer verification (`"scoring":
                     "math"`: the last \\boxed{} / "#### X" / "The answer is X" of the response
                     against the answer field — a bare answer, a GSM8K solution or a MATH
                     solution — as GRPO's math_verify reward judges it, alignment/verify_math.py;
                     set `stop`: the default "\\n\\n" ends a worked solution before its answer)

A task file is jsonl or parquet (.parquet: the HF hub's split files; a row's source is then
"file:N", its 1-based row number). A spec file is JSON (one spec or a list), file paths
relative to the spec file:

    {"name": "gsm8k", "type": "generation", "file": "gsm8k/test.jsonl",
     "fields": {"prompt": "question", "answer": "answer"},
     "template": "Question: {prompt}\\nAnswer:", "target_template": " {answer_raw}",
     "num_fewshot": 5, "fewshot_file": "gsm8k/train.jsonl",
     "scoring": "regex", "answer_regex": "#### (-?[0-9.,]+)", "gold_regex": "#### (-?[0-9.,]+)",
     "normalize": "number", "stop": ["\\n\\nQuestion:"], "max_new_tokens": 256}

`fields` maps a task's canonical fields (perplexity: text; multiple_choice: context, choices,
answer; generation: prompt, answer; both optionally meta) to key paths in a row; a path may go
through lists ("messages.-1.content"). Templates use the canonical fields by name; generation
rows also offer {answer_raw}, the answer field before `gold_regex` (so GSM8K shots show their
worked solutions while scoring compares the final number). A multiple-choice answer may be an
index, the text of a choice (checked first: with choices ["2", "4"] the answer "2" is "2"), a
digit string or a letter (A, B, ...). Text fields (context, prompt, answer) are strings or
numbers; null, a list or an object is an error (pick a list element with a key path). The
built-in world's tasks come from its manifest.json (`world_tasks`). Bad rows raise
`TaskFileError` naming file:line; a bad spec value names the spec file and entry
("spec.json[1]: task 'x': ..."), and two tasks of one name are an error.

Benchmark conventions a key path cannot express are named row preprocessors (`preprocess`, e.g.
"hellaswag": its cleaned query and endings; PREPROCESSORS, built-ins in evaluation/benchmarks.py,
which writes such specs for MMLU, ARC, GSM8K, HumanEval, ...): a function of the raw row that
returns it with extra keys for `fields` to name, or None to leave the row out. Other keys:
`fewshot_sampler` "first_n" takes the first usable rows of the few-shot file in file order
(lm-eval-harness's sampler of that name: MMLU's dev questions in order) instead of a seeded
draw; `group` names groups the task's metrics are averaged into (harness.group_results: MMLU's
subjects into "mmlu"); `continuation_template` makes a multiple-choice task score one fixed
continuation after each choice, the choice completing the context instead (lm-eval-harness's
multiple-input tasks: WinoGrande's partial scoring); `"scoring": "code"` runs the response's
program against meta's tests (alignment/verify_code.py; generate_tasks.py), `code_prefix`
being a template put before it (HumanEval: the prompt the model completes), under the limits
`code_limits` sets (verify_code's Limits fields, e.g. {"timeout": 20}; the command line's
--code_limits goes over them).

Multiple choice in plain mode scores each choice (`choice_template`) as a continuation of the
prompt text, joined by `target_delimiter` (default " ", as lm-eval-harness): choices stored
without their leading space (MMLU, ARC, HellaSwag) are scored as "Answer: Paris", not
"Answer:Paris". Nothing is added when the prompt ends with whitespace, the choice starts with
it (the built-in world's " Paris"; a choice_template " {letter}") or either is empty; a shot's
answer is joined the same way. Chat mode strips choices (the reply is a turn of its own).
Perplexity scores every token of a text after the BOS prefix but not EOS (lm-eval-harness's
convention); `add_eos` also scores an EOS after each text, as pretraining's eval loss does.

Chat mode (`chat`; the CLI's default for a post-trained checkpoint) renders the question as the
user turn `chat_template`, by default the bare question field (as SFT data asks it), not
`template`: a multiple-choice `template` that shows `{choices_block}` (lettered answers) must
come with a `chat_template` that shows it too, or chat mode is an error rather than scoring
letters of options the model never saw.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import string
from collections.abc import Callable, Iterator
from typing import Any

TYPES = ("perplexity", "multiple_choice", "generation")
SCORINGS = ("exact_match", "regex", "judge", "math", "code")
VOTED = ("math", "regex", "exact_match")  # scorings whose samples state an answer: maj@k
SAMPLERS = ("random", "first_n")
NORMALIZERS = ("none", "basic", "number")
REQUIRED = {
    "perplexity": ("text",),
    "multiple_choice": ("context", "choices", "answer"),
    "generation": ("prompt", "answer"),
}
OPTIONAL = ("meta",)
LETTERS = string.ascii_uppercase


class TaskFileError(ValueError):
    """A task file (or spec) is malformed; the message starts with file:line."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How to read, prompt and score one evaluation task (see the module docstring)."""

    name: str
    type: str  # perplexity | multiple_choice | generation
    file: str  # jsonl of examples
    fields: dict = dataclasses.field(default_factory=dict)  # canonical field -> key path in a row
    template: str = ""  # prompt text from the canonical fields; "" = "{context}" / "{prompt}"
    choice_template: str = "{choice}"  # a choice's continuation; also {letter}, {index}
    target_delimiter: str = " "  # multiple choice, plain mode: put between the prompt and a
    # choice (scored, and a shot's answer) unless the prompt ends or the choice starts with
    # whitespace, or either is empty (lm-eval-harness's target_delimiter; "" = glue them)
    target_template: str = " {answer}"  # generation: a shot's answer text (or {answer_raw})
    chat_template: str = ""  # chat mode: the user turn ("" = "{context}" / "{prompt}", the bare
    # question as SFT data asks it; a multiple-choice `template` showing {choices_block} needs one)
    description: str = ""  # text before the shots (e.g. "The following are questions about X.")
    num_fewshot: int = 0  # shots in the prompt (k-shot in-context learning)
    fewshot_file: str = ""  # where shots come from; "" = the task's own file minus the example
    fewshot_fields: dict = dataclasses.field(
        default_factory=dict
    )  # paths in fewshot_file ({}=fields)
    fewshot_seed: int = 1234  # shots are drawn per example from (seed, task name, example index)
    fewshot_separator: str = "\n\n"  # between shots and before the evaluated prompt
    fewshot_sampler: str = "random"  # random (seeded per example) | first_n (file order)
    preprocess: str = ""  # a named row preprocessor (PREPROCESSORS) run on every raw row
    group: tuple = ()  # groups whose averages include this task (harness.group_results)
    continuation_template: str = ""  # multiple choice: score this text after each choice, the
    # choice appended to the prompt as is (lm-eval-harness's multiple_inputs; WinoGrande)
    scoring: str = "exact_match"  # generation: exact_match | regex | judge | math | code
    code_prefix: str = ""  # code scoring: template put before the response's program
    # (HumanEval "{prompt}": plain mode runs prompt + completion as lm-eval-harness does)
    code_limits: dict = dataclasses.field(default_factory=dict)  # code scoring: fields of
    # alignment/verify_code.py's Limits over its defaults, e.g. {"timeout": 20, "memory_mb":
    # 4096} (a row's meta "timeout" still wins for that row); `limits` gives the Limits
    math_rel_tol: float = 0.0  # math scoring: numbers within this relative tolerance are equal
    math_last_number: bool = False  # math scoring: no boxed / #### / "answer is": last number
    answer_regex: str = ""  # regex scoring: the first group that took part in the match (or
    # the whole match, without groups) is the answer (tasks.match_answer)
    regex_select: str = "first"  # which match of answer_regex counts: first | last
    gold_regex: str = ""  # extract the gold answer from the answer field ("#### 42"); as
    # answer_regex, the first group that matched (or the whole match) is the answer
    normalize: str = "basic"  # none | basic (case, spaces, outer punctuation) | number
    stop: tuple = ("\n\n",)  # generation ends at the first of these strings
    # generation, a reasoning model (Qwen3, DeepSeek-R1): its end-of-thinking marker, e.g.
    # "</think>". The response is the text after its last occurrence (stop strings apply there,
    # not inside the reasoning); without it the reasoning never ended: no answer, counted in
    # `reasoning_unfinished`. "" = the whole response is the answer.
    reasoning_end: str = ""
    max_new_tokens: int = 64  # generation budget per example
    temperature: float = 0.0  # generation: 0 = greedy; > 0 samples at this temperature
    # generation with temperature > 0: nucleus mass (1 = off), top-k (0 = off), min-p (0 = off),
    # in HF's order after the temperature (models/sampling.py) — e.g. DeepSeek-R1's evals'
    # temperature 0.6, top_p 0.95; Codex's pass@k at top_p 0.95
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    num_samples: int = 1  # generation: samples per prompt (temperature > 0); scores are their
    # mean, and a 0/1 score (correct, exact_match) also gets pass@k: any of the k samples
    pass_at_k: tuple = ()  # generation: also pass@k for these k <= num_samples, Chen et al.'s
    # unbiased estimate from the n = num_samples drawn (HumanEval's pass@1, @10 of n = 20)
    maj_at_k: tuple = ()  # generation scored math | regex | exact_match: also maj@k for these
    # k <= num_samples, the majority vote's expected hit over the k-subsets of the n samples
    chat: bool = False  # render prompts with the chat template (an instruction-tuned model)
    max_len: int = 0  # perplexity window in tokens (0 = the model's max_seq_len)
    stride: int = 0  # perplexity: tokens between window starts (0 = max_len, no overlap)
    add_eos: bool = False  # perplexity: also score EOS after each text, as pretraining frames
    # documents (BOS + text + EOS; its eval loss includes EOS); False = lm-eval-harness's
    # convention, EOS not scored

    def _check_sampler(self, where: str) -> None:
        """top_p in (0, 1], top_k an int >= 0, min_p in [0, 1), and only with sampling: under
        greedy decoding they would change nothing, silently."""
        if not (0 < self.top_p <= 1 and 0 <= self.min_p < 1):  # (NaN fails both)
            raise ValueError(f"{where}: need 0 < top_p <= 1 and 0 <= min_p < 1, got "
                             f"top_p={self.top_p!r}, min_p={self.min_p!r}")  # fmt: skip
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"{where}: top_k={self.top_k!r} must be an int >= 0 (0 = off)")
        if self.sampler and self.temperature == 0:
            raise ValueError(f"{where}: {', '.join(self.sampler)} filter samples: they need "
                             "temperature > 0 (greedy decoding takes the argmax)")  # fmt: skip

    @property
    def sampler(self) -> dict:
        """The sampling filters this task sets ({} when none): `generate`'s keywords."""
        given = {"top_p": (self.top_p, 1.0), "top_k": (self.top_k, 0), "min_p": (self.min_p, 0.0)}
        return {k: v for k, (v, off) in given.items() if v != off}

    def __post_init__(self):
        where = f"task {self.name!r}"
        if self.type not in TYPES:
            raise ValueError(f"{where}: type={self.type!r}; expected one of {TYPES}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"{where}: scoring={self.scoring!r}; expected one of {SCORINGS}")
        if self.normalize not in NORMALIZERS:
            raise ValueError(f"{where}: normalize={self.normalize!r}; expected {NORMALIZERS}")
        if self.scoring == "regex" and not self.answer_regex:
            raise ValueError(f"{where}: scoring='regex' needs answer_regex")
        if not self.math_rel_tol >= 0:  # (NaN fails >= 0 too)
            raise ValueError(f"{where}: math_rel_tol={self.math_rel_tol!r} must be >= 0")
        if self.scoring != "math" and (self.math_rel_tol or self.math_last_number):
            raise ValueError(f"{where}: math_rel_tol and math_last_number are for "
                             f"scoring='math', not {self.scoring!r}")  # fmt: skip
        if self.fewshot_sampler not in SAMPLERS:
            raise ValueError(f"{where}: fewshot_sampler={self.fewshot_sampler!r}; expected "
                             f"one of {SAMPLERS}")  # fmt: skip
        if self.preprocess:
            preprocessor(self.preprocess, where)  # (an unknown name fails now, naming the known)
        if self.code_prefix and self.scoring != "code":
            raise ValueError(f"{where}: code_prefix is for scoring='code', not {self.scoring!r}")
        if self.code_limits:
            if self.scoring != "code":
                raise ValueError(f"{where}: code_limits is for scoring='code', not "
                                 f"{self.scoring!r}")  # fmt: skip
            _ = self.limits  # (an unknown field or a bad value fails now, named code_limits.FIELD)
        if self.continuation_template and (self.type != "multiple_choice" or self.chat):
            # Chat mode's reply is one choice: a continuation after it has no turn to live in.
            raise ValueError(f"{where}: continuation_template is for plain-mode multiple choice "
                             f"(type {self.type!r}, chat={self.chat}); use chat=False")  # fmt: skip
        if self.regex_select not in ("first", "last"):
            raise ValueError(f"{where}: regex_select must be first|last")
        for pat in (self.answer_regex, self.gold_regex):
            if pat:
                try:
                    re.compile(pat)
                except re.error as e:
                    raise ValueError(f"{where}: bad regex {pat!r}: {e}") from None
        if not self.temperature >= 0 or self.num_samples < 1:  # (NaN fails >= 0 too)
            raise ValueError(f"{where}: temperature must be >= 0 and num_samples >= 1")
        if self.max_new_tokens < 1:  # the decoder would fail only when this task is reached
            raise ValueError(f"{where}: max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.num_samples > 1 and self.temperature == 0:
            raise ValueError(f"{where}: num_samples > 1 needs temperature > 0 (greedy repeats)")
        self._check_sampler(where)
        for key in ("pass_at_k", "maj_at_k"):
            object.__setattr__(self, key, self._ks(key, where))
        if self.maj_at_k and self.scoring not in VOTED:  # (its samples state no answer)
            raise ValueError(f"{where}: maj_at_k is for scorings whose samples state an answer "
                             f"{VOTED}, not {self.scoring!r}")  # fmt: skip
        if self.num_fewshot < 0 or self.stride < 0 or self.max_len < 0:
            raise ValueError(f"{where}: num_fewshot, max_len and stride must be >= 0")
        if self.add_eos and self.type != "perplexity":
            raise ValueError(f"{where}: add_eos is for perplexity tasks, not {self.type}")
        if self.fewshot_fields and not self.fewshot_file:  # it would be silently unused
            raise ValueError(f"{where}: fewshot_fields needs fewshot_file (shots from the "
                             "task's own file are read with `fields`)")  # fmt: skip
        if (self.chat and self.type == "multiple_choice" and not self.chat_template
                and "choices_block" in _placeholders(self.template)):  # fmt: skip
            # The default user turn is the bare context: the lettered options the plain template
            # shows (and a reply " B" refers to) would silently vanish from the prompt.
            raise ValueError(
                f"{where}: template shows {{choices_block}} but chat mode's user turn "
                "(chat_template, default '{context}') does not: set chat_template, e.g. "
                "'{context}\\n{choices_block}', or chat=False"
            )
        known = set(REQUIRED[self.type]) | set(OPTIONAL)
        for name, fmap in (("fields", self.fields), ("fewshot_fields", self.fewshot_fields)):
            unknown = sorted(set(fmap) - known)
            if unknown:
                raise ValueError(f"{where}: {name} has unknown field(s) {unknown}; known {known}")
            bad = {k: v for k, v in fmap.items() if not isinstance(v, str)}
            if bad:
                raise ValueError(f"{where}: {name} key paths must be strings, got {bad}")
        # One string is one stop (tuple("ab") would be two); an empty one was refused only by
        # the decoder, after the earlier tasks had run (or skipped with a reasoning_end).
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(x, str) or not x for x in stops):
            raise ValueError(f"{where}: stop strings must be non-empty strings, got {stops!r}")
        object.__setattr__(self, "stop", stops)
        groups = (self.group,) if isinstance(self.group, str) else tuple(self.group)
        if any(not isinstance(g, str) or not g or g == self.name for g in groups):
            raise ValueError(f"{where}: group must hold non-empty names other than the task's "
                             f"own, got {groups!r}")  # fmt: skip
        object.__setattr__(self, "group", groups)

    def _ks(self, key: str, where: str) -> tuple[int, ...]:
        """pass_at_k or maj_at_k checked (k values <= num_samples of a generation task),
        sorted, each once."""
        value = getattr(self, key)
        ks = (value,) if isinstance(value, int) else tuple(value)
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(f"{where}: {key} must hold positive integers, got {ks!r}")
        if ks and (self.type != "generation" or max(ks) > self.num_samples):
            raise ValueError(f"{where}: {key}={list(ks)} needs a generation task with "
                             f"num_samples >= {max(ks)} (it has {self.num_samples})")  # fmt: skip
        return tuple(sorted(set(ks)))

    @property
    def limits(self):
        """The verify_code.Limits code scoring runs each program under (`code_limits`)."""
        from flaxlm.alignment.verify_code import limits_from_config

        return limits_from_config(self.code_limits, f"task {self.name!r}: code_limits")

    @property
    def prompt_template(self) -> str:
        return self.template or ("{context}" if self.type == "multiple_choice" else "{prompt}")

    @property
    def user_template(self) -> str:
        return self.chat_template or ("{context}" if self.type == "multiple_choice" else "{prompt}")

    def replace(self, **kw) -> TaskSpec:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stop"], d["group"] = list(self.stop), list(self.group)
        d["pass_at_k"], d["maj_at_k"] = list(self.pass_at_k), list(self.maj_at_k)
        return d

    @classmethod
    def from_dict(cls, d: dict, base_dir: str = "", where: str = "spec") -> TaskSpec:
        """A spec from JSON: unknown keys are errors; relative file paths join `base_dir`."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: a spec must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown spec key(s) {unknown}; known: {sorted(known)}")
        missing = [k for k in ("name", "type", "file") if k not in d]
        if missing:
            raise ValueError(f"{where}: spec is missing {missing}")
        for f in dataclasses.fields(cls):  # JSON values of the wrong type fail here, by key
            if f.name in d and not _type_ok(d[f.name], _default(f), _ITEMS.get(f.name, str)):
                kind = type(_default(f)).__name__
                raise ValueError(f"{where}: {f.name}={d[f.name]!r} must be of type {kind}")
        d = dict(d)
        for key in ("file", "fewshot_file"):
            if d.get(key) and base_dir and not os.path.isabs(d[key]):
                d[key] = os.path.join(base_dir, d[key])
        try:  # a bad value (type, scoring, regex, ...) names the spec file and entry too
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def _placeholders(template: str) -> set[str]:
    """Field names a format template uses ("{choices[0]}" -> "choices"); none if malformed
    (prompts.render reports that)."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError:
        return set()
    return {re.split(r"[.\[]", name)[0] for _, name, _, _ in parts if name}


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else ""


_ITEMS = {"pass_at_k": int, "maj_at_k": int}  # list fields whose items are not strings


def _type_ok(value, like, items: type = str) -> bool:
    """Whether a JSON value can stand for a spec field whose default is `like` (a list field:
    of `items`)."""
    if isinstance(like, bool):
        return isinstance(value, bool)
    if isinstance(like, (int, float)) and not isinstance(value, bool):
        return isinstance(value, int) or (isinstance(like, float) and isinstance(value, float))
    if isinstance(like, tuple):
        return isinstance(value, (list, tuple)) and all(
            isinstance(v, items) and not isinstance(v, bool) for v in value
        )
    return isinstance(value, type(like))


@dataclasses.dataclass
class Example:
    """One row in canonical form: `fields` has the task type's canonical names."""

    fields: dict
    source: str  # "file:line", for messages
    index: int  # row number within the file (0-based, blank lines skipped)


# --- reading rows ---------------------------------------------------------------------------


def get_path(row: Any, path: str):
    """Value at a dotted key path ("messages.-1.content"); raises KeyError naming the step."""
    cur = row
    for part in path.split("."):
        if isinstance(cur, list):
            try:
                cur = cur[int(part)]
            except (ValueError, IndexError):
                raise KeyError(f"{path!r} (no list index {part!r})") from None
        elif isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            raise KeyError(f"{path!r} (no key {part!r})")
    return cur


def _mc_answer(value, choices: list[str]) -> int:
    """Answer index from an index, a choice's text, a digit string or a letter. A string that
    is the text of a choice is that choice, so numeric choices ("2", "4", "6") are not read as
    indices."""
    if isinstance(value, bool):
        raise ValueError(f"answer {value!r} is not an index, letter or choice")
    texts = [c.strip() for c in choices]
    if isinstance(value, int):
        idx = value
    elif isinstance(value, str) and value.strip() in texts:
        idx = texts.index(value.strip())
    elif isinstance(value, str) and value.strip().isdecimal():  # (isdigit() takes "²")
        idx = int(value.strip())
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip() in LETTERS:
        idx = LETTERS.index(value.strip())
    else:
        raise ValueError(f"answer {value!r} is not an index, letter or choice")
    if not 0 <= idx < len(choices):
        raise ValueError(f"answer index {idx} out of range for {len(choices)} choices")
    return idx


def match_answer(m: re.Match) -> str:
    """The answer a regex match holds: its first group that took part in the match, or the whole
    match when the pattern has no group. A pattern with one group per alternative (GSM8K's
    "flexible extract" `(-?[$0-9.,]{2,})|(-?[0-9]+)`) thus yields whichever alternative matched,
    as lm-eval-harness's regex filter does (group 1 alone is None when the second matched)."""
    return next((g for g in m.groups() if g is not None), m.group(0))


def _text(out: dict, name: str, fmap: dict) -> str:
    """A text field as a string: a string or a number (7 → "7"); null, a list or an object is an
    error (str() would silently make it "None" or "['a', 'b']", which then never matches)."""
    value = out[name]
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    kind = "null" if value is None else type(value).__name__
    path = fmap.get(name, name)
    hint = f" (a key path can pick one element: '{path}.0')" if isinstance(value, list) else ""
    raise ValueError(f"field {name!r} must be a string or a number, got {kind}{hint}")


def _canonical(spec: TaskSpec, row: dict, fmap: dict, need_gold: bool) -> dict:
    """Canonical fields of one row; raises KeyError/ValueError (the caller adds file:line)."""
    out = {}
    for name in REQUIRED[spec.type] + OPTIONAL:
        path = fmap.get(name, name)
        try:
            out[name] = get_path(row, path)
        except KeyError as e:
            if name in OPTIONAL:
                continue
            raise KeyError(f"missing field {name!r} at key path {e.args[0]}") from None
    if spec.type == "perplexity":
        if not isinstance(out["text"], str):
            raise ValueError("field 'text' must be a string")
    elif spec.type == "multiple_choice":
        ch = out["choices"]
        if not (isinstance(ch, list) and len(ch) >= 2 and all(isinstance(c, str) for c in ch)):
            raise ValueError("field 'choices' must be a list of at least 2 strings")
        out["context"] = _text(out, "context", fmap)
        out["answer"] = _mc_answer(out["answer"], ch)
    else:
        out["prompt"] = _text(out, "prompt", fmap)
        answer = _text(out, "answer", fmap)
        out["answer_raw"] = answer  # before gold_regex: a shot's full worked solution
        if spec.gold_regex:
            m = re.search(spec.gold_regex, answer)
            if m is None:
                raise ValueError(f"gold_regex {spec.gold_regex!r} does not match the answer")
            answer = match_answer(m)
        out["answer"] = answer
        if need_gold and spec.scoring == "judge" and not isinstance(out.get("meta"), dict):
            raise ValueError("judge scoring needs a 'meta' object with the judge's fields")
        meta = out.get("meta")
        tests = isinstance(meta, dict) and bool({"tests", "test_cases"} & meta.keys())
        if need_gold and spec.scoring == "code" and not tests:
            raise ValueError("code scoring needs a 'meta' object with 'tests' (Python "
                             "asserts) or 'test_cases' ([{input, output}])")  # fmt: skip
    return out


def read_examples(
    spec: TaskSpec, *, fewshot: bool = False, limit: int | None = None
) -> list[Example]:
    """Rows of the task file (or of its few-shot file) in canonical form, after the spec's
    row preprocessor (a row it returns None for is left out).

    Malformed JSON, a missing field or a bad value raises TaskFileError naming file:line.
    """
    path = (spec.fewshot_file or spec.file) if fewshot else spec.file
    fmap = (spec.fewshot_fields or spec.fields) if fewshot and spec.fewshot_file else spec.fields
    if not os.path.exists(path):
        raise TaskFileError(f"{path}: no such file (task {spec.name!r})")
    if not os.path.isfile(path):  # a directory (e.g. "file": ".") would be an IsADirectoryError
        raise TaskFileError(f"{path}: not a file (task {spec.name!r})")
    prep = preprocessor(spec.preprocess) if spec.preprocess else None
    out: list[Example] = []
    rows = _parquet_rows(path, spec.name) if path.endswith(".parquet") else _jsonl_rows(path, spec)
    for where, row in rows:
        if limit is not None and len(out) >= limit:
            break
        if prep is not None:
            row = _preprocessed(prep, spec, row, where)
            if row is None:
                continue
        try:
            fields = _canonical(spec, row, fmap, need_gold=not fewshot)
        except (KeyError, ValueError) as e:
            msg = e.args[0] if e.args else str(e)
            raise TaskFileError(f"{where}: task {spec.name!r}: {msg}") from None
        out.append(Example(fields, where, len(out)))
    if not out:
        raise TaskFileError(f"{path}: no examples (task {spec.name!r})")
    return out


def _jsonl_rows(path: str, spec: TaskSpec) -> Iterator[tuple[str, dict]]:
    """("file:line", row) of a jsonl file, blank lines skipped."""
    try:
        f = open(path, "rb")
    except OSError as e:  # unreadable (permissions, a dangling mount): name the task too
        raise TaskFileError(f"{path}: cannot read (task {spec.name!r}): {e.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise TaskFileError(f"{where}: invalid UTF-8 (task {spec.name!r}): {e}") from None
            except json.JSONDecodeError as e:
                raise TaskFileError(f"{where}: invalid JSON (task {spec.name!r}): {e}") from None
            if not isinstance(row, dict):
                raise TaskFileError(f"{where}: expected a JSON object (task {spec.name!r})")
            yield where, row


def _parquet_rows(path: str, name: str) -> Iterator[tuple[str, dict]]:
    """("file:N", row) of a parquet file (N: the 1-based row number), as Python values: lists,
    dicts for structs (ARC's choices), ints for class labels. A file that is not readable
    parquet is a TaskFileError naming it (data/source_readers.py checks each batch)."""
    from flaxlm.data.source_errors import DataError
    from flaxlm.data.source_readers import open_parquet, parquet_batches

    n = 0
    try:
        pf = open_parquet(path)
        for batch in parquet_batches(path, pf):
            for row in batch.to_pylist():
                n += 1
                yield f"{path}:{n}", row
    except DataError as e:
        raise TaskFileError(f"{e} (task {name!r})") from None


def _preprocessed(prep: Callable, spec: TaskSpec, row: dict, where: str) -> dict | None:
    """`prep(row)`; what it raises on a malformed row is a TaskFileError naming file:line."""
    try:
        out = prep(dict(row))  # (a copy: the preprocessor may add keys)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        why = f"{type(e).__name__}: {e.args[0] if e.args else e}"
        raise TaskFileError(f"{where}: task {spec.name!r}: preprocess {spec.preprocess!r} "
                            f"failed on this row ({why})") from None  # fmt: skip
    if out is not None and not isinstance(out, dict):
        raise TaskFileError(f"{where}: task {spec.name!r}: preprocess {spec.preprocess!r} "
                            f"returned {type(out).__name__}, not a row (dict) or None")  # fmt: skip
    return out


# --- row preprocessors ----------------------------------------------------------------------

# name -> fn(row) -> the row with extra keys, or None to leave it out. The built-in ones
# (evaluation/benchmarks.py) register when that module is imported, on first use of a name;
# a --tasks_module plug-in registers its own with `register_preprocessor`.
PREPROCESSORS: dict[str, Callable[[dict], dict | None]] = {}


def register_preprocessor(name: str):
    """Decorator registering `fn(row) -> row | None` as the row preprocessor `name`."""

    def deco(fn):
        PREPROCESSORS[name] = fn
        return fn

    return deco


def preprocessor(name: str, where: str = "spec") -> Callable[[dict], dict | None]:
    """The row preprocessor `name`; a ValueError naming the known ones when there is none."""
    if name not in PREPROCESSORS:
        import flaxlm.evaluation.benchmarks  # noqa: F401 (registers the built-in preprocessors)
    if name not in PREPROCESSORS:
        raise ValueError(f"{where}: preprocess={name!r} is not a row preprocessor; known: "
                         f"{sorted(PREPROCESSORS)}")  # fmt: skip
    return PREPROCESSORS[name]


# --- registry and the built-in world --------------------------------------------------------

_REGISTRY: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    """Makes `spec` resolvable by name (a notebook or a plug-in module registers its tasks)."""
    _REGISTRY[spec.name] = spec
    return spec


def load_spec_file(path: str) -> list[TaskSpec]:
    """Task specs of a JSON file (one object or a list of objects)."""
    if not os.path.isfile(path):  # (a traceback's FileNotFoundError named no task)
        raise TaskFileError(f"{path}: no such task spec file")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise TaskFileError(f"{path}:{e.lineno}: invalid JSON spec: {e.msg}") from None
    items = data if isinstance(data, list) else [data]
    if not items:  # `--tasks empty.json` would run nothing and print an empty table
        raise TaskFileError(f"{path}: no task specs (an empty list)")
    base = os.path.dirname(os.path.abspath(path))
    return [TaskSpec.from_dict(d, base, where=f"{path}[{i}]") for i, d in enumerate(items)]


# World prompts: the judge expects "The answer is X."; shots come from the SFT training chats
# (last user turn and its answer), which never mention held-out people.
_WORLD_GEN = dict(
    template="Question: {prompt}\nAnswer:",
    target_template=" The answer is {answer}.",
    scoring="judge",
    stop=("\n",),
    max_new_tokens=24,
    num_fewshot=3,
    fewshot_file="sft_train.jsonl",
    fewshot_fields={"prompt": "messages.-2.content", "answer": "meta.answer", "meta": "meta"},
)


def world_tasks(world_dir: str) -> dict[str, TaskSpec]:
    """The built-in world's tasks, from its manifest.json eval task index, plus perplexity on its
    held-out text (`ppl_heldout_text`)."""
    path = os.path.join(world_dir, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise TaskFileError(f"{path}: no world manifest (is --world a world directory?)") from None
    except json.JSONDecodeError as e:
        raise TaskFileError(f"{path}:{e.lineno}: invalid JSON manifest: {e.msg}") from None
    specs = {}
    for name, info in manifest.get("eval_tasks", {}).items():
        kw: dict = {}
        if info["type"] == "generation":
            kw = dict(_WORLD_GEN, fewshot_file=os.path.join(world_dir, "sft_train.jsonl"))
        elif name == "mc_facts_heldout":  # shots about train people only: no leaked facts
            kw = {"fewshot_file": os.path.join(world_dir, "eval", "mc_facts_train.jsonl")}
        specs[name] = TaskSpec(name, info["type"], os.path.join(world_dir, info["file"]), **kw)
    held = os.path.join(world_dir, "heldout_text.jsonl")
    if os.path.exists(held):
        specs["ppl_heldout_text"] = TaskSpec("ppl_heldout_text", "perplexity", held)
    return specs


def _preset(name: str) -> list[TaskSpec] | None:
    """The tasks of a benchmark preset named with its data directory ("mmlu:~/datasets/mmlu",
    evaluation/benchmarks.py), or None when `name` is no such thing."""
    head, sep, path = name.partition(":")
    if not sep:
        return None
    from flaxlm.evaluation import benchmarks

    if head not in benchmarks.PRESETS:
        return None
    return benchmarks.preset_specs(head, os.path.expanduser(path))


def resolve_tasks(names: list[str], world_dir: str | None = None) -> list[TaskSpec]:
    """Specs for task names: a path to a JSON spec file (all its tasks), a registered name, a
    task of the world at `world_dir`, or a benchmark preset and its data directory
    ("gsm8k:~/datasets/gsm8k": all its tasks). An unknown name lists the known ones; two tasks of
    one name are an error naming where each came from (results are keyed by task name: the
    second would silently replace the first)."""
    world = world_tasks(world_dir) if world_dir else {}
    out, origin = [], {}
    for name in names:
        if name.endswith(".json"):
            specs = load_spec_file(name)
            where = [f"{name}[{i}]" for i in range(len(specs))]
        elif name in _REGISTRY:
            specs, where = [_REGISTRY[name]], ["registered"]
        elif name in world:
            specs, where = [world[name]], [f"world {world_dir}"]
        elif (preset := _preset(name)) is not None:
            specs, where = preset, [f"preset {name}"] * len(preset)
        else:
            known = sorted(set(_REGISTRY) | set(world))
            hint = "" if world_dir else " (pass --world DIR for the built-in world's tasks)"
            raise KeyError(f"unknown task {name!r}; known: {known}{hint}")
        for spec, loc in zip(specs, where):
            if spec.name in origin:
                raise ValueError(f"task name {spec.name!r} appears twice ({origin[spec.name]} "
                                 f"and {loc}); task names must be unique")  # fmt: skip
            origin[spec.name] = loc
        out.extend(specs)
    return out
