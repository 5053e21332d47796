"""Which records the built-in world's rules score (exact_match, eval_gen's `score`): only the
world's own, which carry its marker — not a user's records whose meta happens to name one of the
world's task names — a world written before that marker is written again where it is reused,
and how `grpo.rewards`/`online.rewards` report a bad spec."""

import json
import logging
import os

import pytest

from flaxlm.alignment import grpo_rewards as R
from flaxlm.alignment import sft
from flaxlm.data import synthetic as S
from flaxlm.data import synthetic_judge as J
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


def _unmark(world_dir):
    """Makes `world_dir` what the generator wrote before the mark: every question's meta without
    it, the manifest without its format."""
    import json
    import pathlib

    for path in pathlib.Path(world_dir).rglob("*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            if isinstance(row.get("meta"), dict):
                row["meta"].pop(J.WORLD_KEY, None)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    manifest = pathlib.Path(world_dir, "manifest.json")
    manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items()
                                    if k != "format"}))  # fmt: skip


def _right_answers_score(world_dir):
    from flaxlm.data import formats as F

    rows = F.read_records(os.path.join(world_dir, "rl_prompts.jsonl"), F.DataReport())
    metas = [F.record_meta(r, F.fields_config()) for r, _ in rows]
    return [R.exact_match(m, S.format_answer(m["answer"])) for m in metas] + [
        sft.score(m, S.format_answer(m["answer"]), m["answer"])[0] for m in metas
    ]


@pytest.mark.parametrize("reuse", ["ensure_world", "demo"])
def test_a_world_written_before_the_mark_is_written_again(tmp_path, reuse, caplog):
    """A world on disk from before the mark was reused as it was: its right answers, used as
    data.train / eval_gen.sets, scored 0. The places that reuse a world write it again."""
    from flaxlm import demo
    from flaxlm.evaluation import scaling_emergence

    run = demo.Demo(str(tmp_path), runlocal=True)  # (its world: tmp_path/world, preset small)
    world = run.dir["world"]
    S.write_world(world, "small", seed=0)
    corpus = open(os.path.join(world, "pretrain.jsonl")).read()
    _unmark(world)
    assert set(_right_answers_score(world)) == {0.0}  # what the old files got
    with caplog.at_level(logging.WARNING, logger="flaxlm.data.synthetic"):
        run.world() if reuse == "demo" else scaling_emergence.ensure_world(world)
    assert set(_right_answers_score(world)) == {1.0}
    assert S.world_format(json.load(open(os.path.join(world, "manifest.json")))) == S.WORLD_FORMAT
    assert any("format 1" in r.getMessage() for r in caplog.records)
    assert open(os.path.join(world, "pretrain.jsonl")).read() == corpus  # the same world
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flaxlm.data.synthetic"):
        assert not S.refresh_world(world)  # a current world stays as it is
    assert not caplog.records


def test_an_unmarked_world_meta_is_logged_once(monkeypatch, caplog):
    """Files of an old world outside a directory the code manages: a meta with the fields of a
    world question but no mark is plain exact match, and says so once."""
    monkeypatch.setattr(J, "_warned_unmarked", False)
    old = {"task": "arithmetic", "op": "plus", "a": 3, "b": 4, "answer": "7", "split": "train"}
    with caplog.at_level(logging.WARNING, logger="flaxlm.data.synthetic_judge"):
        assert R.exact_match({"task": "sort", "answer": "a l m p"}, "a l m p") == 1.0
        assert not caplog.records  # a user's own record names a task only: nothing to say
        assert R.exact_match(old, S.format_answer("7")) == 0.0
        assert sft.score(old, "7", "7") == (1.0, 1.0)
    assert len(caplog.records) == 1
    assert f"{J.WORLD_KEY}={J.WORLD_MARK!r}" in caplog.text
