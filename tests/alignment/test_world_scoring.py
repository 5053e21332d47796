"""Which records the built-in world's rules score (exact_match, eval_gen's `score`): only the
world's own, which carry its marker — not a user's records whose meta happens to name one of the
world's task names — and how `grpo.rewards`/`online.rewards` report a bad spec."""

import pytest

from flaxlm.alignment import grpo_rewards as R
from flaxlm.alignment import sft
from flaxlm.data import synthetic as S
from flaxlm.data.synthetic_judge import TASKS

ANSWERS = {"attribute": "Paris", "arithmetic": "7", "reverse": "p m a l", "sort": "a l m p"}


@pytest.mark.parametrize("task", TASKS)
def test_own_records_with_a_world_task_name_are_plain_exact_match(task):
    """A user's {"task": "sort", "answer": "a l m p"} was judged by the world's rules (needs
    "The answer is X." and the world's meta fields): a correct answer scored 0 (and 0.4)."""
    meta = {"task": task, "answer": ANSWERS[task]}
    assert R.exact_match(meta, f" {ANSWERS[task]} ") == 1.0
    assert R.exact_match(meta, S.format_answer(ANSWERS[task])) == 0.0
    assert sft.score(meta, ANSWERS[task], ANSWERS[task]) == (1.0, 1.0)
    assert sft.score(meta, S.format_answer(ANSWERS[task]), ANSWERS[task]) == (0.0, 0.0)


def test_builtin_records_keep_the_world_judge(tmp_path):
    """The world's records (in memory, and written to files and read back) carry the marker
    and are scored by its judge: "The answer is X." is right, the bare answer is not."""
    from flaxlm.data import formats as F

    S.write_world(str(tmp_path), "small", seed=0)
    world = S.load_world(str(tmp_path))
    rows = F.read_records(str(tmp_path / "rl_prompts.jsonl"), F.DataReport())
    from_file = [F.record_meta(r, F.fields_config()) for r, _ in rows]  # as load_prompts reads
    metas = [r["meta"] for r in world.sft_heldout + world.rl_prompts] + from_file
    assert {m["task"] for m in metas} == set(TASKS)
    for meta in metas:
        good, bare = S.format_answer(meta["answer"]), str(meta["answer"])
        assert R.exact_match(meta, good) == 1.0
        assert R.exact_match(meta, bare) == 0.0  # (plain comparison would say 1)
        assert sft.score(meta, good, "") == (1.0, pytest.approx(1.0))
        assert sft.score(meta, bare, bare)[0] == 0.0


def test_reward_spec_errors_name_their_key(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def numeric(meta, response):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"^online\.rewards: cannot load reward 'my_rewardz:"):
        R.parse_rewards("my_rewardz:numeric", "online.rewards")
    for spec, weight in (("my_rewards:numeric:abc", "abc"), ("exact_match:x", "x")):
        with pytest.raises(ValueError, match=rf"^online\.rewards: bad weight '{weight}'"):
            R.parse_rewards(spec, "online.rewards")
    assert [w for _, _, w in R.parse_rewards("my_rewards:numeric:2", "online.rewards")] == [2.0]
