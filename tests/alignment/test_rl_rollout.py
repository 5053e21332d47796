"""RolloutSource resume: it says when it is at a rollout boundary (where the loop saves); a
checkpoint inside a rollout (its unused minibatches are not saved) is warned about on resume."""

import logging

import numpy as np

from flaxlm.alignment import rl_rollout
from flaxlm.configs import grpo as grpo_config
from flaxlm.configs.common import override


class _Source(rl_rollout.RolloutSource):
    def make_rollout(self, params, rng):
        B = self.config.rollout.batch
        return {"tokens": np.full((B, 4), self.iteration, np.int32)}, {"reward_mean": 0.0}


def _source(ckpt_every):
    c = override(grpo_config.get_config("runlocal=True"), {
        "batch_size": 8, "rollout.batch": 16, "rollout.epochs": 1, "ckpt_every": ckpt_every,
    })  # fmt: skip
    prompts = [{"ids": np.arange(3), "meta": {}} for _ in range(4)]
    return _Source(c, None, None, prompts, cfg=None, template=None)


def test_resume_inside_a_rollout_is_warned(caplog):
    caplog.set_level(logging.WARNING, logger="flaxlm")
    src = _source(ckpt_every=2)  # 2 steps per rollout: aligned
    assert "ckpt_every" not in caplog.text
    assert src.at_boundary()
    src.before_step(type("S", (), {"params": {}})())
    assert not src.at_boundary()
    next(src)
    inside = src.get_state()  # one of the rollout's 2 minibatches unused
    assert not src.at_boundary()
    next(src)
    boundary = src.get_state()
    assert src.at_boundary()
    assert (inside["unused_minibatches"], boundary["unused_minibatches"]) == (1, 0)

    fresh = _source(ckpt_every=2)
    fresh.set_state(boundary)
    assert "resuming inside rollout" not in caplog.text
    fresh.set_state(inside)
    assert "resuming inside rollout 0: its 1 unused minibatches" in caplog.text
    fresh.set_state({"cursor": {"epoch": 0, "pos": 2}, "iteration": 1})  # older checkpoints
