"""PPO and GRPO treat the tempered distribution softmax(logits / T), T = `rollout.temperature`,
as the policy throughout (TRL's convention; alignment/rl_rollout.py): a rollout sampled at
T = 0.7 is scored at T = 0.7 (old policy and reference, checked against numpy's log-softmax of
the model's own logits), the losses' logprobs and entropy are the tempered ones, greedy (T = 0)
is scored at T = 1, and `logprob_gap` (decoder vs scoring forward, both at T = 1) stays ~0."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flaxlm.alignment import grpo, ppo, rl_rollout
from flaxlm.configs import grpo as grpo_config
from flaxlm.configs import ppo as ppo_config
from flaxlm.models.sharding import make_mesh
from flaxlm.train.pretrain import model_fns

_spec = importlib.util.spec_from_file_location(
    "rl_helpers", os.path.join(os.path.dirname(__file__), "rl_helpers.py")
)
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

T = 0.7
SHAPE = {"batch_size": 8, "rollout.batch": 8, "seq_len": 40, "rollout.max_prompt_len": 32,
         "rollout.max_new_tokens": 8, "rollout.temperature": T, "rollout.epochs": 1}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    return H.fake_runs(str(tmp_path_factory.mktemp("temperature_runs")), cache_dir)


class _State:
    def __init__(self, params):
        self.params = params


def _peaked(lm_params, scale=8.0):
    """The LM with its head scaled: logits far from uniform, so T = 0.7 and T = 1 differ by
    O(1) nats per token (the random init's near-uniform logits hardly feel T)."""
    return {**lm_params, "lm_head": jax.tree.map(lambda x: x * scale, lm_params["lm_head"])}


def _rollout(source, params) -> dict:
    """One rollout's training rows (all its minibatches) and stats."""
    source.before_step(_State(params))
    batches = []
    while not source.at_boundary():
        batches.append(next(source))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _numpy_logprobs(cfg, params, mb, temperature):
    """log softmax(logits / T)[target] in float64 numpy from the model's own float32 logits."""
    apply = jax.jit(model_fns(cfg)[1])
    z = np.asarray(apply(params, mb["tokens"], mb["positions"], mb["segment_ids"]), np.float64)
    z = z / temperature
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return np.take_along_axis(logp, mb["targets"][..., None].astype(np.int64), -1)[..., 0]


def _check_scored(got, cfg, params, mb):
    """`got` (B, T) equals the numpy tempered logprobs on the response tokens — and not the
    untempered ones (the check can tell T = 0.7 from T = 1)."""
    m = mb["loss_mask"] > 0
    assert m.sum() > 8
    want = _numpy_logprobs(cfg, params, mb, T)
    np.testing.assert_allclose(got[m], want[m], rtol=1e-4, atol=1e-4)
    raw = _numpy_logprobs(cfg, params, mb, 1.0)
    assert np.abs(raw[m] - want[m]).mean() > 0.3


def test_ppo_scores_and_compares_at_the_rollout_temperature(runs, cache_dir):
    sft, rm = runs
    c = H.tiny(ppo_config, cache_dir, init_from=sft, reward_from=rm, **SHAPE)
    source = ppo.build_task(c, make_mesh(dict(c.mesh)), None).train_batches
    policy = _peaked(source.ref_params)
    mb = _rollout(source, {"policy": policy, "value": source.rm_params})
    _check_scored(mb["old_logprobs"], source.cfg, policy, mb)
    # The reference at T too: the rollout's KL (k1: Σ_t log π_T − log π_ref,T per sequence).
    assert c.ppo.kl_estimator == "k1"
    m = mb["loss_mask"]
    ref = _numpy_logprobs(source.cfg, source.ref_params, mb, T)
    kl = ((mb["old_logprobs"] - ref) * m).sum(1)
    np.testing.assert_allclose(mb["rollout/kl"][0], kl.mean(), rtol=1e-3, atol=1e-3)
    # Decoder and scoring forward agree on the sampled tokens (both at T = 1).
    assert mb["rollout/logprob_gap"][0] < 1e-4, mb["rollout/logprob_gap"][0]


def test_grpo_scores_and_compares_at_the_rollout_temperature(runs, cache_dir):
    sft, _ = runs
    c = H.tiny(grpo_config, cache_dir, init_from=sft, **SHAPE, **{"grpo.group_size": 4})
    source = grpo.build_task(c, make_mesh(dict(c.mesh)), None).train_batches
    policy = _peaked(source.ref_params)
    mb = _rollout(source, policy)
    _check_scored(mb["old_logprobs"], source.cfg, policy, mb)
    m = mb["loss_mask"] > 0
    ref = _numpy_logprobs(source.cfg, source.ref_params, mb, T)
    np.testing.assert_allclose(mb["ref_logprobs"][m], ref[m], rtol=1e-4, atol=1e-4)
    assert mb["rollout/logprob_gap"][0] < 1e-4, mb["rollout/logprob_gap"][0]


def _table_apply(params, tokens, positions, segment_ids):
    del segment_ids
    return params["table"][tokens] + params["pos"][positions]


def _loss_batch(rng, B=3, L=7, V=11):
    batch = {"tokens": rng.integers(0, V, (B, L)).astype(np.int32),
             "targets": rng.integers(0, V, (B, L)).astype(np.int32),
             "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)),
             "segment_ids": np.ones((B, L), np.int32),
             "loss_mask": (rng.random((B, L)) < 0.7).astype(np.float32),
             "old_logprobs": rng.normal(-2, 0.5, (B, L)).astype(np.float32),
             "ref_logprobs": rng.normal(-2, 0.5, (B, L)).astype(np.float32),
             "old_values": rng.normal(0, 1, (B, L)).astype(np.float32),
             "returns": rng.normal(0, 1, (B, L)).astype(np.float32)}  # fmt: skip
    params = {"table": jnp.asarray(rng.normal(0, 2, (V, V)), jnp.float32),
              "pos": jnp.asarray(rng.normal(0, 1, (L, V)), jnp.float32)}  # fmt: skip
    return batch, params


def test_losses_use_the_tempered_policy():
    """The loss at temperature T equals the loss at T = 1 of a model whose logits are divided
    by T (logprobs, ratio, KL and entropy alike), and differs from the untempered loss."""
    rng = np.random.default_rng(0)
    batch, params = _loss_batch(rng)
    batch["advantages"] = rng.normal(0, 1, len(batch["tokens"])).astype(np.float32)  # (B,)
    scaled = lambda p, *a: _table_apply(p, *a) / T  # noqa: E731
    g = ml_collections.ConfigDict({"clip": 0.2, "beta": 0.1, "loss_agg": "seq"})
    got = grpo.grpo_loss_fn(_table_apply, g, T)(params, batch, None)
    want = grpo.grpo_loss_fn(scaled, g)(params, batch, None)
    raw = grpo.grpo_loss_fn(_table_apply, g)(params, batch, None)
    for k in ("pg_loss", "kl", "entropy"):
        np.testing.assert_allclose(float(got[1][k]), float(want[1][k]), rtol=1e-5, atol=1e-6)
        assert abs(float(got[1][k]) - float(raw[1][k])) > 1e-3, k

    batch["advantages"] = rng.normal(0, 1, batch["tokens"].shape).astype(np.float32)  # (B, L)
    p = ml_collections.ConfigDict({"clip": 0.2, "value_clip": 0.2, "vf_coef": 0.5,
                                   "ent_coef": 0.01})  # fmt: skip
    value_apply = lambda vp, tokens, positions, segment_ids: vp[tokens]  # noqa: E731
    both = {"policy": params, "value": jnp.asarray(rng.normal(0, 1, 11), jnp.float32)}
    got = ppo.ppo_loss_fn(_table_apply, value_apply, p, T)(both, batch, None)
    want = ppo.ppo_loss_fn(scaled, value_apply, p)(both, batch, None)
    raw = ppo.ppo_loss_fn(_table_apply, value_apply, p)(both, batch, None)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5, atol=1e-6)
    for k in ("pg_loss", "entropy", "approx_kl"):
        np.testing.assert_allclose(float(got[1][k]), float(want[1][k]), rtol=1e-5, atol=1e-6)
        assert abs(float(got[1][k]) - float(raw[1][k])) > 1e-3, k
    assert float(got[1]["vf_loss"]) == float(raw[1]["vf_loss"])  # the critic ignores T


def test_scoring_temperature_and_t1_unchanged():
    """Greedy (T = 0) is scored at T = 1 (no division by 0); T = 1 is bit for bit the
    untempered computation; a negative temperature is refused."""
    assert rl_rollout.scoring_temperature(0) == 1.0
    assert rl_rollout.scoring_temperature(0.7) == 0.7
    with pytest.raises(ValueError, match="temperature"):
        rl_rollout.scoring_temperature(-1.0)
    rng = np.random.default_rng(1)
    batch, params = _loss_batch(rng)
    logits = _table_apply(params, batch["tokens"], batch["positions"], None)
    lp_t, lp_1 = rl_rollout.policy_logprobs(_table_apply, params, batch, 1.0)
    np.testing.assert_array_equal(np.asarray(lp_t), np.asarray(lp_1))
    from flaxlm.train.losses import token_logprobs

    np.testing.assert_array_equal(
        np.asarray(rl_rollout.lm_logprobs(_table_apply, params, batch)),
        np.asarray(token_logprobs(logits, batch["targets"])),
    )
    lp_g = rl_rollout.lm_logprobs(_table_apply, params, batch, rl_rollout.scoring_temperature(0))
    assert np.isfinite(np.asarray(lp_g)).all()
