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
