"""RolloutSource resume: it says when it is at a rollout boundary (where the loop saves); a
checkpoint inside a rollout (its unused minibatches are not saved) is warned about on resume."""

import logging
import re

import numpy as np
import pytest

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


def test_row_buckets():
    assert rl_rollout.row_buckets(48, 4) == [16, 24, 40, 48]
    assert rl_rollout.row_buckets(1536, 4) == [384, 768, 1152, 1536]
    assert rl_rollout.row_buckets(48, 1) == rl_rollout.row_buckets(48, 0) == [48]


def _rows(seq_len=48, B=4, longest=19, seed=0):
    """Rollout rows of random prompts + responses, the longest `longest` tokens."""
    from flaxlm.alignment.rl_common import rollout_rows

    rng = np.random.default_rng(seed)
    lens = [longest] + list(rng.integers(3, longest, B - 1))
    prompts = [rng.integers(1, 200, n - n // 2).astype(np.int32) for n in lens]
    N = max(lens) // 2
    tokens = np.stack([np.pad(rng.integers(1, 200, n // 2), (0, N - n // 2)) for n in lens])
    return rollout_rows(prompts, tokens, np.asarray([n // 2 for n in lens]), seq_len, 0)


def test_trim_rows_cuts_padding_columns_only():
    rows = _rows(longest=19)
    rows["advantages"] = np.arange(4, dtype=np.float32)  # per row: untouched
    cut = rl_rollout.trim_rows(rows, 48, [16, 24, 40, 48])
    assert cut["tokens"].shape == (4, 24) and cut["advantages"].shape == (4,)
    for k in ("tokens", "targets", "positions", "segment_ids", "loss_mask"):
        np.testing.assert_array_equal(cut[k], rows[k][:, :24])
        assert not rows[k][:, 24:].any()  # only padding was cut
    assert rl_rollout.trim_rows(_rows(longest=44), 48, [16, 24, 40, 48])["tokens"].shape[1] == 48
    pairs = {f"{s}_{k}": v for s in ("chosen", "rejected") for k, v in _rows(longest=15).items()}
    assert rl_rollout.trim_rows(pairs, 48, [16, 24, 40, 48])["rejected_tokens"].shape == (4, 16)
    padded = rl_rollout.pad_columns(np.ones((4, 24), np.float32), 24, 48)
    assert padded.shape == (4, 48) and padded[:, 24:].sum() == 0 and padded[:, :24].all()


def test_trimmed_rows_give_the_same_logprobs_loss_and_gradients():
    """What trimming changes is the number of padding columns computed: the policy's
    logprobs (scoring), GRPO's loss and its gradients are those of the full-width rows."""
    import jax

    from flaxlm.alignment import grpo
    from flaxlm.models.config import get_variant
    from flaxlm.train.pretrain import model_fns

    cfg = get_variant("tiny", vocab_size=256)
    init, apply = model_fns(cfg)
    params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x,
                          init(jax.random.PRNGKey(0)))  # fmt: skip
    rows = _rows(longest=19)
    B, T = rows["tokens"].shape
    rng = np.random.default_rng(1)
    rows["old_logprobs"] = (rows["loss_mask"] * rng.normal(-3, 0.3, (B, T))).astype(np.float32)
    rows["ref_logprobs"] = (rows["loss_mask"] * rng.normal(-3, 0.3, (B, T))).astype(np.float32)
    rows["advantages"] = rng.normal(size=B).astype(np.float32)
    cut = rl_rollout.trim_rows(rows, T, [16, 24, 40, 48])
    assert cut["tokens"].shape[1] == 24
    # jitted: op by op, the forward and its gradient took minutes on 2 CPU cores
    lp = jax.jit(lambda p, b: rl_rollout.policy_logprobs(apply, p, b, 0.7))
    full, short = jax.device_get(lp(params, rows)), jax.device_get(lp(params, cut))
    for f, s in zip(full, short):
        np.testing.assert_allclose(rl_rollout.pad_columns(s, 24, T) * rows["loss_mask"],
                                   f * rows["loss_mask"], rtol=1e-5, atol=1e-6)  # fmt: skip
    # every loss_agg: Dr. GRPO's "constant" divided by the cut width (2x here) until it took
    # the run's seq_len (grpo.py passes it)
    for agg in ("seq", "token", "constant"):
        c = override(grpo_config.get_config("runlocal=True"), {"grpo.loss_agg": agg})
        loss = grpo.grpo_loss_fn(apply, c.grpo, 0.7, row_length=T)
        loss_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (l_full, m_full), g_full = loss_and_grad(params, rows, None)
        (l_cut, m_cut), g_cut = loss_and_grad(params, cut, None)
        np.testing.assert_allclose(l_cut, l_full, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g_cut), jax.tree.leaves(g_full), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
        assert m_cut.keys() == m_full.keys()
        for k in ("pg_loss", "kl", "clipfrac", "entropy"):
            np.testing.assert_allclose(m_cut[k], m_full[k], rtol=1e-5, atol=1e-7)


def test_processes_cut_their_parts_of_a_minibatch_to_one_width(monkeypatch):
    """With several processes each trains on part of a minibatch: the width is the whole
    minibatch's, so the parts fit together (a part's own width could be narrower)."""
    import jax

    rows = _rows(B=16, longest=12)
    long = _rows(B=1, longest=44)
    for k in rows:
        rows[k][5] = long[k][0]  # one long row among short ones
    c = override(grpo_config.get_config("runlocal=True"), {
        "batch_size": 8, "rollout.batch": 16, "rollout.epochs": 1, "seq_len": 48,
        "rollout.trim_buckets": 4, "rollout.max_prompt_len": 32, "rollout.max_new_tokens": 16,
    })  # fmt: skip
    src = _Source(c, None, None, [{"ids": np.arange(3), "meta": {}}], cfg=None, template=None)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    parts = []
    for p in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        parts.append(src._minibatches(rows, {}))
    widths = [[mb["tokens"].shape[1] for mb in part] for part in parts]
    assert widths[0] == widths[1] and sorted(widths[0]) == [16, 48]  # the long row's: 48
    for a, b in zip(*parts):
        assert a["tokens"].shape[0] == b["tokens"].shape[0] == 4


@pytest.mark.parametrize("key,bad,what", [
    ("epochs", 0, "an integer >= 1"),
    ("top_p", 1.5, r"in \(0, 1\]"), ("top_p", 0.0, r"in \(0, 1\]"),
    ("top_k", -1, "an integer >= 0"), ("min_p", 2.0, r"in \[0, 1\)"),
    ("max_new_tokens", 0, "an integer >= 1"), ("temperature", float("nan"), "finite and >= 0"),
])  # fmt: skip
def test_bad_sampling_values_are_refused_when_the_task_is_built(cache_dir, key, bad, what):
    """rollout.epochs=0 failed after a whole rollout ("RolloutSource: no rollout"), top_p=1.5,
    top_k=-1, min_p=2 and max_new_tokens=0 at the first rollout in `generate`'s words, without
    the `rollout.` key. Refused when PPO's and GRPO's tasks are built, before any load (the
    runs named do not exist: a later check would fail on them instead)."""
    from flaxlm.alignment import grpo, ppo
    from flaxlm.configs import ppo as ppo_config

    for module, task in ((ppo_config, ppo), (grpo_config, grpo)):
        c = override(module.get_config("runlocal=True"), {
            "init_from": "/no/such/run", "reward_from": "/no/such/rm",
            "data.cache_dir": str(cache_dir), f"rollout.{key}": bad,
        })  # fmt: skip
        if task is grpo:
            c = override(c, {"grpo.rewards": "rm"})
        with pytest.raises(ValueError, match=rf"rollout\.{key}={re.escape(repr(bad))} must be "
                                             rf"{what}"):  # fmt: skip
            task.build_task(c, None, None)
    good = override(grpo_config.get_config("runlocal=True"), {
        "rollout.top_p": 1.0, "rollout.min_p": 0.0, "rollout.top_k": 0, "rollout.epochs": 1,
        "rollout.temperature": 0.0,
    })  # fmt: skip
    rl_rollout.check_sampling(good.rollout)  # the ends of the ranges


def test_row_buckets_round_up_to_multiples_of_8():
    """seq_len·k/n rounded up, then up to a multiple of 8: 100·1/6 = 16.7 is 24, not 16."""
    assert rl_rollout.row_buckets(100, 6) == [24, 40, 56, 72, 88, 100]
    assert rl_rollout.row_buckets(100, 3) == [40, 72, 100]


def test_trimmed_width_keeps_the_last_real_token():
    seg = np.zeros((2, 24), np.int32)
    seg[1, :9] = 1  # 9 real tokens: columns 0..8
    assert rl_rollout.trimmed_width({"segment_ids": seg}, [8, 16, 24]) == 16
    seg[1, 8] = 0
    assert rl_rollout.trimmed_width({"segment_ids": seg}, [8, 16, 24]) == 8


def test_response_values_past_the_row_end_are_cut():
    """A response that would run past seq_len (prompt of 7, 4 values, rows of 8): the values
    that fit go to columns 6 and 7, the rest are dropped."""
    out = rl_rollout.response_to_rows(np.asarray([[1.0, 2.0, 3.0, 4.0]]), [7], 8)
    np.testing.assert_array_equal(out, [[0, 0, 0, 0, 0, 0, 1, 2]])
