"""Mutation testing, round 6: alignment/grpo_rewards.py and alignment/rl_rows.py behaviours
the other tests left open, each against hand-computed values."""

import numpy as np
import pytest

from flaxlm.alignment import grpo_rewards as R


def test_a_reward_without_a_weight_weighs_one():
    got = R.parse_rewards("exact_match, format:0.1 ,judge")
    assert got == [("exact_match", R.exact_match, 1.0), ("format", R.format_reward, 0.1),
                   ("judge", R.judge_reward, 1.0)]  # fmt: skip


@pytest.mark.parametrize("w", ["inf", "-inf", "nan", "Infinity"])
def test_an_infinite_or_nan_weight_is_refused(w):
    with pytest.raises(ValueError, match="finite"):
        R.parse_rewards(f"format:{w}", key="grpo.rewards")


def test_an_imported_reward_is_named_module_dot_function():
    """("module:function" names the metric rollout/r_module.function: no ":" in it.)"""
    ((name, fn, w),) = R.parse_rewards("flaxlm.alignment.grpo_rewards:format_reward:0.5")
    assert (name, fn, w) == ("flaxlm.alignment.grpo_rewards.format_reward", R.format_reward, 0.5)


@pytest.mark.parametrize("spec", ["exact_match:1:2", "rm:0.5:0.2"])
def test_two_weights_are_refused_as_such(spec):
    """The reward model "rm" as much as a built-in: two numbers after it are two weights, not
    a module to import."""
    with pytest.raises(ValueError, match="two weights"):
        R.parse_rewards(spec)


def test_trimmed_width_counts_every_segment_ids_key():
    """A preference row's "chosen_segment_ids" / "rejected_segment_ids" hold real tokens too:
    the narrowest bucket holds the longest of them."""
    from flaxlm.alignment.rl_rows import trimmed_width

    seg = np.zeros((2, 32), np.int32)
    seg[0, :5] = 1
    rej = np.zeros((2, 32), np.int32)
    rej[1, :10] = 1
    buckets = [8, 16, 24, 32]
    assert trimmed_width({"segment_ids": seg}, buckets) == 8
    assert trimmed_width({"segment_ids": seg, "rejected_segment_ids": rej}, buckets) == 16
    assert trimmed_width({"chosen_segment_ids": rej, "loss_mask": np.ones((2, 32))}, buckets) == 16


def test_trim_rows_cuts_only_the_per_token_arrays():
    """Arrays whose second axis is not seq_len ((B, N) per-response values, (B, K) anything)
    are kept whole; every (B, seq_len, ...) one is cut."""
    from flaxlm.alignment.rl_rows import row_buckets, trim_rows

    seg = np.zeros((2, 32), np.int32)
    seg[:, :6] = 1
    rows = {"segment_ids": seg, "logits": np.ones((2, 32, 3)), "per_response": np.ones((2, 20)),
            "prompt_lens": np.array([3, 4])}  # fmt: skip
    out = trim_rows(rows, 32, row_buckets(32, 4))
    assert out["segment_ids"].shape == (2, 8) and out["logits"].shape == (2, 8, 3)
    assert out["per_response"].shape == (2, 20)
    np.testing.assert_array_equal(out["prompt_lens"], [3, 4])


def test_exact_match_strips_both_sides():
    assert R.exact_match({"answer": " 42\n"}, "42 ") == 1.0
    assert R.exact_match({"answer": 42}, " 42") == 1.0
    assert R.exact_match({"answer": "42"}, "4 2") == 0.0


def test_world_prompts_need_no_meta_answer_for_exact_match():
    """The built-in world's questions are judged by the world's rules (their meta carries its
    mark), so only the other prompts' missing meta.answer is an error or a warning."""
    from flaxlm.data import synthetic_judge as J
    from flaxlm.data.source_errors import DataError

    world = {J.WORLD_KEY: J.WORLD_MARK, "task": sorted(J.TASKS)[0]}
    assert J.is_world_meta(world)
    rewards = R.parse_rewards("exact_match")
    R.check_references(rewards, [{"loc": "w:1", "meta": world}] * 2, "grpo.rewards")
    with pytest.raises(DataError, match="1 of 1 prompts"):
        R.check_references(rewards, [{"loc": "u:1", "meta": {}}], "grpo.rewards")


def test_row_buckets_never_exceed_seq_len():
    """seq_len·k/n rounded up to multiples of 8, capped at seq_len (30 is no multiple of 8:
    7/8 of it, 26.25, would round to 32, wider than the rows)."""
    from flaxlm.alignment.rl_rows import row_buckets

    assert row_buckets(30, 8) == [8, 16, 24, 30]
    assert row_buckets(64, 4) == [16, 32, 48, 64]
    assert row_buckets(30, 1) == row_buckets(30, 0) == [30]
