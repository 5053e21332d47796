"""Resuming a checkpoint saved by an older flaxlm, whose config lacks keys added since: one
warning names them all with the values that now apply (each used to be a warning of its own,
"changed config key: loss.moe_aux: checkpoint '<absent>'", 13 of them after a week of changes,
and the one that mattered, guard.max_rollbacks, looked like the rest)."""

import logging

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.train import loop_resume


def test_keys_new_since_the_checkpoint_are_one_warning(caplog):
    now = pretrain_config.get_config("variant=tiny")
    saved = now.to_dict()
    del saved["guard"]["max_rollbacks"], saved["mesh"]["context"]
    saved["opt"]["lr"] = now.opt.lr * 2  # and a key the user changed
    with caplog.at_level(logging.INFO, logger="flaxlm"):
        changes = loop_resume._report_config_changes(now, saved, 100)
    assert set(changes) == {"guard.max_rollbacks", "mesh.context", "opt.lr"}  # all recorded
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 2, warned
    new = next(m for m in warned if "new since the checkpoint" in m)
    assert new.startswith("resume from step 100: 2 config key(s) are new since the checkpoint")
    assert f"guard.max_rollbacks={now.guard.max_rollbacks!r}" in new
    assert f"mesh.context={now.mesh.context!r}" in new
    assert any("changed config key: opt.lr" in m for m in warned)
    assert "DIFFERENT DATA ORDER" not in caplog.text


def test_a_checkpoint_of_another_commit_is_said_on_resume(caplog, monkeypatch):
    """Checkpoints record the flaxlm commit that saved them (`flaxlm_version` stays 0.1.0 while
    the code changes daily); a resume under another commit says so, once, naming both."""
    from flaxlm.train import checkpointer

    here = checkpointer.code_commit()
    assert set(here) <= {"flaxlm_commit"}  # {} outside a git checkout
    monkeypatch.setattr(checkpointer, "code_commit", lambda: {"flaxlm_commit": "bbbbbbbbbbbb"})
    for saved, said in [({"flaxlm_commit": "aaaaaaaaaaaa"}, "commit aaaaaaaaaaaa"),
                        ({}, "from before commits were recorded")]:  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="flaxlm"):
            loop_resume._report_code_change(saved, 7)
        assert caplog.messages == [f"resume from step 7: the checkpoint was saved by flaxlm "
                                   f"{said}, this is bbbbbbbbbbbb: the steps from here on "
                                   "train under this code"]  # fmt: skip
    caplog.clear()
    loop_resume._report_code_change({"flaxlm_commit": "bbbbbbbbbbbb"}, 7)
    assert not caplog.messages


def test_keys_removed_since_the_checkpoint_are_one_warning_and_no_data_order_change(caplog):
    """The RL configs dropped data.shuffle (prompts are reshuffled by seed whatever it says):
    a run saved before must resume without 'RESUME WITH A DIFFERENT DATA ORDER: data.shuffle'
    (its 'data.' prefix made a removed key read as a changed data key)."""
    now = pretrain_config.get_config("variant=tiny")
    saved = now.to_dict()
    saved["data"]["shuffle_removed"] = True
    saved["rollout"] = {"empty_reward": 0.0}
    with caplog.at_level(logging.INFO, logger="flaxlm"):
        changes = loop_resume._report_config_changes(now, saved, 100)
    assert set(changes) == {"data.shuffle_removed", "rollout.empty_reward"}  # for events.jsonl
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == [
        "resume from step 100: 2 config key(s) of the checkpoint no longer exist (removed from "
        "flaxlm since, or not keys of this config): nothing here reads them: "
        "data.shuffle_removed=True, rollout.empty_reward=0.0"
    ]
    assert "DIFFERENT DATA ORDER" not in caplog.text
