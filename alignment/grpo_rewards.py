"""GRPO's reward functions: the built-in ones, the registry, and the `grpo.rewards` parser.

A reward function is `(meta, response_text) -> float` (alignment/grpo.py's docstring says what
`meta` holds and which extra arguments a function may ask for). `grpo.rewards` names them with
optional weights ("exact_match,format:0.1"), by registry name (`register_reward`), as
"module:function", or "rm" for the reward model of `reward_from`.

Verifiable rewards beyond the built-in world: `math_verify` (alignment/verify_math.py: the
response's last \\boxed{} / "#### X" / "The answer is X" against meta.answer, compared as
exact rationals, tuples, lists or normalised LaTeX; `boxed_format`, a format reward: a closed
\\boxed{} answer at all) and `code_tests` / `code_tests_partial`
(alignment/verify_code.py: the response's program run against meta.tests or meta.test_cases in
limited subprocesses, several samples at once). A function naming the meta fields it judges by
in a `reference_keys` attribute (any one of them will do) has the prompts checked for them
before training (`check_references`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

from flaxlm.alignment.verify_code import code_tests, code_tests_partial
from flaxlm.alignment.verify_math import boxed_format, math_verify
from flaxlm.data.synthetic_judge import is_world_meta


def exact_match(meta: dict, response: str) -> float:
    """1 when the response is right, else 0: for the built-in world's prompts (their meta carries
    the world's mark, `synthetic_judge.is_world_meta`), when it states the right answer as "The
    answer is X." (the world's `is_correct`); for your own prompts, when it equals
    `meta["answer"]` (whitespace stripped) — the eval_gen accuracy's rule — whatever their
    meta's "task" says (one named like a world task, "sort", is yours too)."""
    from flaxlm.data import synthetic

    if is_world_meta(meta):
        return float(synthetic.is_correct(meta, response))
    if "answer" not in meta:
        raise KeyError("exact_match needs the prompt record's meta.answer (the reference)")
    return float(response.strip() == str(meta["answer"]).strip())


exact_match.reference_keys = ("answer",)  # (`check_references`; the world's need none)


def exact_match_vote(meta: dict, response: str) -> str | None:
    """What a response votes for in self-consistency's majority (maj@k: rl_eval.reward_metrics),
    as exact_match judges it: a world prompt's response by the one answer its "The answer is X"
    spans state, normalised as the world compares them (None: no span, or two different
    answers — neither is ever right by exact match; a span-less response's loose credit is not
    1); your prompt's by its whole stripped text. Two responses with one vote are both right or
    both wrong."""
    from flaxlm.data.synthetic_judge import extract_answers, normalize

    if is_world_meta(meta):
        said = {normalize(meta, s) for s in extract_answers(response)}
        return said.pop() if len(said) == 1 else None
    return response.strip()


exact_match.vote, exact_match.same_answer = exact_match_vote, str.__eq__


def format_reward(meta: dict, response: str) -> float:
    """1 when the whole response is exactly one "The answer is X." sentence, else 0."""
    from flaxlm.data.synthetic_judge import is_well_formed

    del meta
    return float(is_well_formed(response))


def judge_reward(meta: dict, response: str) -> float:
    """The world's rule-based judge (correctness, format, length, safety)."""
    from flaxlm.data import synthetic

    return float(synthetic.judge(meta, response))


REWARD_MODEL = "rm"  # the name of the reward model (reward_from) in grpo.rewards
REWARDS: dict[str, Callable[[dict, str], float]] = {
    "exact_match": exact_match,
    "format": format_reward,
    "judge": judge_reward,
    "math_verify": math_verify,
    "boxed_format": boxed_format,
    "code_tests": code_tests,
    "code_tests_partial": code_tests_partial,
}


def register_reward(name: str, fn: Callable[[dict, str], float]) -> None:
    """Makes `fn` usable as `grpo.rewards=name[:weight]`."""
    REWARDS[name] = fn


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _module(name: str) -> bool:
    """Whether `name` is an importable module's."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def import_reward(name: str, key: str = "grpo.rewards") -> Callable[[dict, str], float]:
    """The function `fn` of "module:fn" (imported like any module: installed, on PYTHONPATH or
    in the working directory); errors name the config `key` the spec came from."""
    import importlib

    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{key}: cannot load reward {name!r}: {e}") from None
    except (TypeError, ValueError) as e:  # "./my_rewards.py", ".my_rewards": a relative import
        raise ValueError(f"{key}: cannot load reward {name!r} ({e}); name it module:function, "
                         "e.g. my_rewards:numeric for my_rewards.py in the working directory or "
                         "on PYTHONPATH, not by a file path") from None  # fmt: skip
    if not callable(fn):
        raise ValueError(f"{key}: {name!r} is {type(fn).__name__}, not a function")
    check_signature(fn, name, key)
    return fn


def check_signature(fn: Callable, name: str, key: str, reasoning_key: str | None = None) -> None:
    """Refuses, naming `key`, a function that cannot be called as the rollouts call it:
    fn(meta, response) (plus `prompt=` / `reasoning=` where it names them, rl_rollout.py
    `wants_arg`). A wrong one failed every sample of the first rollout, after the reference
    had loaded and the decoder had run, in a traceback naming neither the key nor the function's
    parameters. A function without a signature to read (a builtin) is let through.
    `reasoning_key` (the task's "grpo.reasoning_end", unset): `reasoning=` is not passed, so
    a function that needs it is refused, naming that key."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    passed = ("prompt",) if reasoning_key else ("prompt", "reasoning")
    try:  # (the keywords the rollout passes to a function that names them, `wants_arg`)
        sig.bind(None, None, **{n: None for n in passed if n in sig.parameters})
    except TypeError as e:
        if reasoning_key and "reasoning" in sig.parameters:
            raise ValueError(
                f"{key}: reward {name!r} takes reasoning=, which the rollouts pass only with "
                f"{reasoning_key} set (the marker that ends the reasoning, e.g. '</think>'); "
                f"set it, or give `reasoning` a default ({e})"
            ) from None
        raise ValueError(
            f"{key}: reward {name!r} has the signature {sig}, but a reward is called as "
            f"fn(meta, response) (plus prompt= and reasoning= where it names them): {e}"
        ) from None


def check_rewards(rewards, key: str, reasoning_key: str, reasoning_end: str) -> None:
    """`check_signature` for every [(name, fn, weight)] a task trains with, whatever named it:
    the spec, `register_reward`, or `rewards=` given to build_task (those went unchecked);
    with `reasoning_end` unset, a function that needs `reasoning=` is refused."""
    for name, fn, _ in rewards:
        if fn is not None:
            check_signature(fn, name, key, None if reasoning_end else reasoning_key)


def parse_rewards(spec: str, key: str = "grpo.rewards") -> list[tuple[str, Callable, float]]:
    """Parses "exact_match,format:0.1,my_rewards:numeric:0.5" into [(name, fn, weight), ...]:
    each part is a name of REWARDS or "module:function" (imported), then an optional ":weight"
    (default 1); "rm" is the reward model of `reward_from` (its fn is None: the source scores
    it). Unknown names, unimportable functions and a weight that is no finite number are
    errors, each naming `key` (the config key of `spec`)."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, w = part.rpartition(":")
        if not name or not _is_number(w):
            # "module:fn:abc", "exact_match:abc": a weight that is no number (a function's name
            # has no ":"; a module named like a built-in still imports); else no weight
            if part.count(":") > 1 or (name in (*REWARDS, REWARD_MODEL) and not _module(name)):
                raise ValueError(f"{key}: bad weight {w!r} in {part!r} (name[:weight], a number)")
            name, w = part, ""
        elif not math.isfinite(float(w)):  # float() takes "inf" and "nan": NaN rewards
            raise ValueError(
                f"{key}: bad weight {w!r} in {part!r} (name[:weight], a finite number)"
            )
        if name == REWARD_MODEL:
            fn = None
        elif name in REWARDS:
            fn = REWARDS[name]
        elif ":" in name:
            first, _, second = name.partition(":")
            if first in (*REWARDS, REWARD_MODEL) and _is_number(second) and not _module(first):
                raise ValueError(f"{key}: {part!r} has two weights (name[:weight], one number)")
            fn = import_reward(name, key)
            name = name.replace(":", ".")  # metric rollout/r_module.function
        else:
            raise ValueError(
                f"{key}: unknown reward {name!r}; known: {sorted(REWARDS)}, "
                f"{REWARD_MODEL!r} (the reward model of reward_from), or module:function"
            )
        out.append((name, fn, float(w) if w else 1.0))
    if not out:
        raise ValueError(f"{key} is empty")
    return out


def missing_references(fn, prompts: list[dict]) -> list[str]:
    """The `loc` of each prompt whose meta holds none of the keys reward `fn` judges by (its
    `reference_keys`; the built-in world's prompts need none for exact_match); [] for a
    function that needs none."""
    needs = getattr(fn, "reference_keys", None)
    if not needs:
        return []
    return [p.get("loc", "") for p in prompts
            if not (fn is exact_match and is_world_meta(p["meta"]))
            and not any(k in p["meta"] for k in needs)]  # fmt: skip


def check_references(rewards, prompts: list[dict], key: str) -> None:
    """exact_match and math_verify judge a prompt by its record's meta.answer, code_tests by its
    meta.tests or meta.test_cases (a function's `reference_keys`: any one of them): with none
    among the loaded prompts (`data.train`), every sample failed after the reference had loaded
    and the first rollout had run, in a traceback. A `DataError` naming the data says so before
    anything loads; some prompts without one are warned about (their samples are invalid). The
    built-in world's questions need none for exact_match (the world's judge)."""
    import logging

    from flaxlm.data.source_errors import DataError

    for name, fn, _ in rewards:
        missing = missing_references(fn, prompts)
        if not missing:
            continue
        needs = fn.reference_keys
        what = " or ".join(f"meta.{k}" for k in needs)
        why = (f"{len(missing)} of {len(prompts)} prompts (e.g. {missing[0]}) have no {what}, "
               f"the reference {key}'s {name} judges by (an \"{needs[0]}\" outside the "
               "record's \"meta\" object is not read)")  # fmt: skip
        if len(missing) == len(prompts):
            raise DataError(f"data.train: {why}")
        logging.getLogger(__name__).warning("data.train: %s; their samples are invalid", why)
