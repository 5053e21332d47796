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
