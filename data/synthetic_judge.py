"""Rule-based judge of the built-in world: the verifiable reward for PPO/GRPO, the ranking behind
the preference pairs, and the scorer of the evaluation harness's generation tasks.

The expected answer format is one sentence, "The answer is X." Scores (`judge`):

    0.8 * correctness      1 when every "the answer is X" span gives the right X; 0.5 when there
                           is no such span but the response names the right value and no rival
    + 0.2 * format         the whole response is exactly "The answer is X."
    - length penalty       0.02 per word beyond 15, at most 0.3
    - 1.2 * unsafe         any word of UNSAFE_WORDS (whole-word, case-insensitive)

so a correct well-formed answer scores 1.0, a wrong well-formed one 0.2, and any unsafe answer
at most 0.0: correct > wrong > unsafe.
"""

from __future__ import annotations

import logging
import re

from flaxlm.data.synthetic_vocab import UNSAFE_WORDS, VALUES

W_CORRECT = 0.8
W_FORMAT = 0.2
LOOSE_CREDIT = 0.5
LEN_FREE_WORDS = 15
LEN_RATE = 0.02
LEN_MAX = 0.3
UNSAFE_PENALTY = 1.2

TASKS = ("attribute", "arithmetic", "reverse", "sort")
# Every question the world generates carries this in its meta (and so in the files write_world
# writes): what picks the world's rules in exact_match and eval_gen's `score`. A task name alone
# does not: a user's own {"task": "sort", "answer": ...} is compared with its answer as is.
WORLD_KEY, WORLD_MARK = "world", "flaxlm-builtin"

_SPAN = re.compile(r"the answer is\s+([^\n.!?,;]*)", re.IGNORECASE)
_FORMAT = re.compile(r"The answer is [^\n.!?]+\.")
_INT = re.compile(r"-?\d+")
_UNSAFE = re.compile(r"\b(" + "|".join(re.escape(w) for w in UNSAFE_WORDS) + r")\b", re.I)


# The fields the world's questions had before the mark (what its judge reads, and "split"):
# a meta with all of them but no mark is most likely from a world written before it.
_UNMARKED_FIELDS = {"attribute": {"entity", "attribute", "answer", "split"},
                    "arithmetic": {"op", "a", "b", "answer", "split"},
                    "reverse": {"word", "answer", "split"},
                    "sort": {"word", "answer", "split"}}  # fmt: skip
_warned_unmarked = False


def is_world_meta(meta: dict) -> bool:
    """Whether `meta` is a built-in world question's (marked by its generator, with a task of
    the world's): only those are scored by the world's rules. A meta with every field of one
    but no mark (a file of a world written before the mark) is not, and is logged once per
    process: its right answers, "The answer is X.", score 0 against the bare answer."""
    global _warned_unmarked
    task = meta.get("task")
    if WORLD_KEY in meta:
        return meta[WORLD_KEY] == WORLD_MARK and task in TASKS
    if not _warned_unmarked and task in _UNMARKED_FIELDS and _UNMARKED_FIELDS[task] <= meta.keys():
        _warned_unmarked = True
        logging.getLogger(__name__).warning(
            "a record's meta has the fields of a built-in world question (%s) but not its mark "
            "%s=%r: scored by exact match with its answer, not the world's judge. A world written "
            "before the mark? Write it again (synthetic.refresh_world, or rerun the demo's world "
            "stage) and use its files.", sorted(meta), WORLD_KEY, WORLD_MARK)  # fmt: skip
    return False


def format_answer(answer: str) -> str:
    """The canonical well-formed response for an answer."""
    return f"The answer is {answer}."


def normalize(meta: dict, text: str) -> str:
    """Canonical form of an answer string for comparison with meta["answer"]."""
    task = meta["task"]
    text = text.strip().lower()
    if task == "arithmetic" or meta.get("attribute") == "age":
        # Just the number ("42", "34 years old"); "42 or 41" stays as it is and never matches.
        m = re.fullmatch(r"(-?\d+)(\s+years old)?[.!]?", text)
        return m.group(1) if m else text
    if task in ("reverse", "sort"):
        return re.sub(r"[^a-z]", "", text)
    text = re.sub(r"^(a|an|the)\s+", "", text)
    return re.sub(r"[^\w ]", "", text).strip()


def extract_answers(response: str) -> list[str]:
    """The X of every "the answer is X" span, in order."""
    return [m.group(1).strip() for m in _SPAN.finditer(response)]


def is_unsafe(text: str) -> bool:
    return _UNSAFE.search(text) is not None


def _rivals(meta: dict, response: str) -> set[str]:
    """Answer-like values named in a free-form response (for loose credit)."""
    low = response.lower()
    if meta["task"] == "arithmetic" or meta.get("attribute") == "age":
        operands = (
            {str(meta.get("a")), str(meta.get("b"))} if meta["task"] == "arithmetic" else set()
        )
        return {x for x in _INT.findall(low) if x not in operands}
    if meta["task"] == "attribute":
        vals = VALUES[meta["attribute"]]
        return {v.lower() for v in vals if re.search(rf"\b{re.escape(v.lower())}\b", low)}
    target = meta["answer"]  # reverse/sort: look for the spaced or the joined letters
    joined = target.replace(" ", "")
    found = target in low or re.search(rf"\b{re.escape(joined)}\b", low) is not None
    return {normalize(meta, target)} if found else set()


def correctness(meta: dict, response: str) -> float:
    """1.0 strict, LOOSE_CREDIT loose, 0.0 otherwise (see module docstring)."""
    target = normalize(meta, str(meta["answer"]))
    spans = extract_answers(response)
    if spans:
        return 1.0 if all(normalize(meta, s) == target for s in spans) else 0.0
    return LOOSE_CREDIT if _rivals(meta, response) == {target} else 0.0


def is_correct(meta: dict, response: str) -> bool:
    """Exact-match correctness: the response states the right answer in "The answer is X" form
    (extra words around it are allowed; a second, different answer is not)."""
    return correctness(meta, response) == 1.0


def is_well_formed(response: str) -> bool:
    return _FORMAT.fullmatch(response.strip()) is not None


def judge_parts(meta: dict, response: str) -> dict[str, float]:
    """The judge's components, for reports and debugging."""
    n_words = len(response.split())
    return {
        "correct": correctness(meta, response),
        "format": float(is_well_formed(response)),
        "length_penalty": min(LEN_MAX, LEN_RATE * max(0, n_words - LEN_FREE_WORDS)),
        "unsafe": float(is_unsafe(response)),
    }


def judge(meta: dict, response: str) -> float:
    """Score of `response` to the question described by `meta` (needs "task" and "answer";
    attribute questions also "attribute", arithmetic "a" and "b"). Higher is better."""
    if meta.get("task") not in TASKS:
        raise ValueError(f"judge: unknown task {meta.get('task')!r} in meta {meta}")
    p = judge_parts(meta, response)
    return (
        W_CORRECT * p["correct"]
        + W_FORMAT * p["format"]
        - p["length_penalty"]
        - UNSAFE_PENALTY * p["unsafe"]
    )
