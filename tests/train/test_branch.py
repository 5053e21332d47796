"""Branching a run (`branch_from`, train/branch.py): a cooldown branched from a constant-lr run
starts from its whole state (the same loss on its first step, the source's data position, its
optimizer's step count) and follows its own schedule; `branch_data=restart` starts the data
afresh at the branch point only; bad settings are named."""

import json
import os

import numpy as np
import pytest

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.configs.common import override
from flaxlm.train import branch, pretrain
from flaxlm.train.checkpoint import read_meta
from flaxlm.train.metrics import read_metrics
from flaxlm.train.optim import make_optimizer


def _config(**overrides):
    c = pretrain_config.get_config("variant=tiny,runlocal=True,data=markov")
    return override(c, {"progress_bar": False, "eval_at_start": False, "eval_every": 0,
                        "log_every": 1, "ckpt_every": 4, "keep_ckpts": 0, "total_steps": 8,
                        "opt.schedule": "constant", "opt.warmup_steps": 1, "opt.lr": 3e-3,
                        **overrides})  # fmt: skip


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def _data_state(workdir, step) -> dict:
    """The data state a checkpoint saved (orbax's JSON item)."""
    with open(os.path.join(workdir, "checkpoints", str(step), "data", "metadata")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def stable(tmp_path_factory):
    """An 8-step constant-lr run, checkpointed at steps 4 and 8."""
    workdir = str(tmp_path_factory.mktemp("stable"))
    pretrain.run(_config(), workdir)
    return workdir


def test_a_cooldown_branch_continues_the_sources_state_under_its_own_schedule(tmp_path, stable):
    out = str(tmp_path / "cool")
    c = _config(branch_from=f"{stable}@4", **{"opt.schedule": "wsd", "opt.wsd_decay_frac": 0.5})
    state, _ = pretrain.run(c, out)
    src, got = _losses(stable), _losses(out)
    # steps 1-4 are the source's lines; step 5's loss is taken before its update, from the
    # source's params at 4 on the batch the source drew next
    assert [got[s] for s in range(1, 6)] == [src[s] for s in range(1, 6)]
    assert got[8] != src[8]  # (the schedules part after step 5)
    assert int(state.step) == 8 and _data_state(out, 8) == _data_state(stable, 8)
    # the branch's own schedule over its steps 5-8: WSD decaying over the last 4
    schedule = make_optimizer(c.opt, 8)[1]
    lrs = {r["step"]: r["lr"] for r in read_metrics(out) if "lr" in r}
    want = [float(schedule(s - 1)) for s in range(5, 9)]
    np.testing.assert_allclose([lrs[s] for s in range(5, 9)], want, rtol=1e-6)
    assert lrs[8] < lrs[5]
    rec = {"from": os.path.abspath(stable), "from_rel": os.path.relpath(stable, out), "step": 4,
           "data": "continue"}  # fmt: skip
    assert branch.record(out) == rec and read_meta(out)[1]["branch"] == rec
    events = [json.loads(x) for x in open(os.path.join(out, "events.jsonl"))]
    assert [e for e in events if e["event"] == "branched"][0]["source"] == rec["from"]
    changed = next(e for e in events if e["event"] == "config_changed")["changes"]
    assert {"opt.schedule", "opt.wsd_decay_frac", "branch_from"} <= set(changed)
    # the source is untouched (its files were linked, not moved)
    assert sorted(os.listdir(os.path.join(stable, "checkpoints"))) == ["4", "8"]


def test_restarted_data_starts_afresh_at_the_branch_point_only(tmp_path, stable):
    """branch_data=restart: the branch's 4 batches are the data's first 4 (its data state at 8
    is the source's at 4); resumed from its own checkpoint it continues its own data."""
    one = str(tmp_path / "one")
    pretrain.run(_config(branch_from=f"{stable}@4", branch_data="restart"), one)
    assert _data_state(one, 8) == _data_state(stable, 4) != _data_state(stable, 8)
    assert _losses(one)[5] != _losses(stable)[5]
    two = str(tmp_path / "two")  # the same branch stopped at 6, then resumed to 8
    kw = dict(branch_from=f"{stable}@4", branch_data="restart", ckpt_every=2)
    pretrain.run(_config(total_steps=6, **kw), two)
    pretrain.run(_config(**kw), two)
    assert _losses(two) == _losses(one)


def test_bad_branches_are_named(tmp_path, stable):
    with pytest.raises(ValueError, match="branch_from=.* and init_from=.*Set one of them"):
        pretrain.run(_config(branch_from=stable, init_from=stable), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="branch_data='later'; expected one of"):
        pretrain.run(_config(branch_from=stable, branch_data="later"), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="branch_data='restart' needs branch_from"):
        pretrain.run(_config(branch_data="restart"), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="HF checkpoint holds no training state"):
        pretrain.run(_config(branch_from="hf:/x"), str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"branch_from='.*@5': .*5"):
        pretrain.run(_config(branch_from=f"{stable}@5"), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="no checkpoint under"):
        pretrain.run(_config(branch_from=str(tmp_path / "nothing")), str(tmp_path / "a"))
    assert not os.path.exists(tmp_path / "a" / "checkpoints")  # nothing seeded
    # a workdir of a run of its own is not overwritten by a branch
    with pytest.raises(ValueError, match="already holds checkpoints of a run of its own"):
        pretrain.run(_config(branch_from=f"{stable}@4"), stable)
    # another model: the resume's check refuses the source's checkpoint, naming the key
    with pytest.raises(Exception, match="d_model"):
        pretrain.run(_config(branch_from=f"{stable}@4", **{"model.d_model": 32}),
                     str(tmp_path / "b"))  # fmt: skip
