"""GRPO / online DPO reward specs (`grpo.rewards`): a function that cannot be called as the
rollouts call it, fn(meta, response), is refused when the spec is parsed, naming the key and
its signature (it failed every sample of the first rollout, after the reference loaded and the
decoder ran, in a traceback); an unknown name or a non-function is a ValueError (the trainer
CLI's one line; they were a KeyError and a TypeError, tracebacks); a spec with two weights says
so. A function that returns None or a string invalidates its sample as "not a number" (None
was logged as having raised; "0.5" was taken for 0.5)."""

import sys

import numpy as np
import pytest

from flaxlm.alignment.grpo_rewards import parse_rewards
from flaxlm.alignment.rl_rollout import call_reward_fns

MODULE = """
import numpy as np
def wrongsig(x): return 1.0
def too_many(a, b, c, d): return 1.0
def good(meta, response): return 1.0
def with_prompt(meta, response, prompt=None): return 1.0
def with_kwargs(meta, response, **kw): return 1.0
def optional_third(meta, response, extra=0): return 1.0
def needs_prompt(meta, response, prompt): return 1.0
def needs_reasoning(meta, response, reasoning): return 1.0
notfn = 3
"""


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    (tmp_path / "spec_rewards.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "spec_rewards"
    sys.modules.pop("spec_rewards", None)


@pytest.mark.parametrize("fn", ["wrongsig", "too_many"])
def test_a_reward_with_the_wrong_signature_is_refused_when_parsed(rewards_module, fn):
    with pytest.raises(
        ValueError,
        match=rf"^grpo\.rewards: reward '{rewards_module}:{fn}' has "
        r"the signature \(.*\), but a reward is called as fn\(meta, response\)",
    ):
        parse_rewards(f"{rewards_module}:{fn}")


def test_rewards_callable_as_the_rollouts_call_them_pass(rewards_module):
    # (prompt= and reasoning= are passed to a function that names them: configs/grpo.py's own
    # example takes `prompt` without a default)
    names = ("good", "with_prompt", "with_kwargs", "optional_third", "needs_prompt",
             "needs_reasoning")  # fmt: skip
    spec = ",".join(f"{rewards_module}:{f}:0.5" for f in names)
    assert [w for _, _, w in parse_rewards(spec)] == [0.5] * len(names)


def test_unknown_names_non_functions_and_two_weights_are_value_errors(rewards_module):
    with pytest.raises(ValueError, match=r"^online\.rewards: unknown reward 'exact_mach'"):
        parse_rewards("exact_mach", "online.rewards")
    with pytest.raises(ValueError, match=r"'spec_rewards:notfn' is int, not a function"):
        parse_rewards(f"{rewards_module}:notfn")
    with pytest.raises(ValueError, match=r"'exact_match:0.1:0.2' has two weights"):
        parse_rewards("exact_match:0.1:0.2")


def test_what_a_reward_returns_must_be_a_number():
    import decimal

    import jax.numpy as jnp

    returns = [None, "0.5", [1.0], True, np.float32(0.25), np.asarray([2.0]), 3,
               jnp.asarray(0.5, jnp.bfloat16), decimal.Decimal("0.75")]  # fmt: skip

    def reward(meta, response):
        return returns[meta["i"]]

    metas = [{"i": i} for i in range(len(returns))]
    rewards, valid, errors = call_reward_fns([reward], [1.0], metas, [""] * len(returns))
    assert valid.tolist() == [False, False, False, True, True, True, True, True, True]
    assert rewards[valid].tolist() == [1.0, 0.25, 2.0, 3.0, 0.5, 0.75]
    assert errors == ["reward reward returned None (NoneType), not a number",
                      "reward reward returned '0.5' (str), not a number",
                      "reward reward returned [1.0] (list), not a number"]  # fmt: skip


def test_a_reward_named_by_a_file_path_says_how_to_name_it():
    """ "./my_rewards.py:numeric" was a raw TypeError from importlib (a relative import)."""
    for spec in ("./my_rewards.py:numeric", ".my_rewards:numeric"):
        with pytest.raises(ValueError, match=r"grpo.rewards: cannot load reward .*name it "
                                             r"module:function"):  # fmt: skip
            parse_rewards(spec)


def test_every_reward_a_task_trains_with_is_checked_against_how_it_is_called():
    """Rewards given by `register_reward` or `rewards=` were never checked; one that needs
    `reasoning=` passed the check although the rollouts pass it only with grpo.reasoning_end
    set, and every sample failed after the first rollout."""
    from flaxlm.alignment.grpo_rewards import check_rewards

    def needs_reasoning(meta, response, reasoning):
        return 1.0

    def may_take_reasoning(meta, response, reasoning=None):
        return 1.0

    with pytest.raises(ValueError, match=r"grpo.rewards: reward 'mine' has the signature"):
        check_rewards([("mine", lambda response: 1.0, 1.0)], "grpo.rewards",
                      "grpo.reasoning_end", "")  # fmt: skip
    with pytest.raises(ValueError, match=r"reward 'think' takes reasoning=, which the rollouts "
                                         r"pass only with grpo.reasoning_end set"):  # fmt: skip
        check_rewards([("think", needs_reasoning, 1.0)], "grpo.rewards", "grpo.reasoning_end",
                      "")  # fmt: skip
    check_rewards([("think", needs_reasoning, 1.0), ("rm", None, 1.0)], "grpo.rewards",
                  "grpo.reasoning_end", "</think>")  # fmt: skip
    check_rewards([("maybe", may_take_reasoning, 1.0)], "grpo.rewards", "grpo.reasoning_end", "")


def test_exact_match_without_any_reference_is_refused_before_anything_loads(caplog):
    """Prompts with their answer outside "meta" (or none) and grpo.rewards=exact_match: every
    sample failed after the reference loaded and a rollout ran, in a traceback."""
    import logging

    from flaxlm.alignment.grpo_rewards import REWARDS, check_references
    from flaxlm.data.source_errors import DataError

    rewards = [("exact_match", REWARDS["exact_match"], 1.0)]
    none = [{"meta": {}, "loc": f"p.jsonl:{i}"} for i in (1, 2)]
    with pytest.raises(DataError, match=r"data.train: 2 of 2 prompts \(e.g. p.jsonl:1\) have no "
                                        r"meta.answer"):  # fmt: skip
        check_references(rewards, none, "grpo.rewards")
    some = none + [{"meta": {"answer": "4"}, "loc": "p.jsonl:3"}]
    with caplog.at_level(logging.WARNING):
        check_references(rewards, some, "grpo.rewards")
    assert "2 of 3 prompts (e.g. p.jsonl:1) have no meta.answer" in caplog.text
    check_references([("format", REWARDS["format"], 1.0)], none, "grpo.rewards")  # not judged
