"""PPO: GAE, whitening, the clipped losses, the KL estimators and controller equal independent
implementations of their published formulas (float32, tolerances stated); a run trains through
the shared loop with one jitted decoder call per rollout."""

import importlib.util
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.alignment import common, ppo, rl_common, rl_rollout
from flaxlm.configs import ppo as ppo_config
from flaxlm.models import decode
from flaxlm.train.metrics import read_metrics

_spec = importlib.util.spec_from_file_location(
    "rl_helpers", os.path.join(os.path.dirname(__file__), "rl_helpers.py")
)
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32 against float64 references


def _batch(seed=0, B=4, T=14):
    """Rewards, values and response masks with the response at different offsets per row (one
    row empty, one running to the end of the row)."""
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)
    mask = np.zeros((B, T), np.float32)
    for b, (s, e) in enumerate([(2, 9), (5, 14), (0, 0), (7, 8)][:B]):
        mask[b, s:e] = 1
    return rewards, values, mask


def _gae_slow(rewards, values, mask, gamma, lam):
    """GAE written as the textbook backward loop over each row's response tokens (float64)."""
    B, T = rewards.shape
    adv, ret = np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t] > 0]
        last = 0.0
        for j in reversed(range(len(idx))):
            t = idx[j]
            v_next = float(values[b, idx[j + 1]]) if j + 1 < len(idx) else 0.0  # terminal
            delta = float(rewards[b, t]) + gamma * v_next - float(values[b, t])
            last = delta + gamma * lam * last
            adv[b, t] = last
            ret[b, t] = last + float(values[b, t])
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)])
def test_gae_equals_the_slow_loop(gamma, lam):
    rewards, values, mask = _batch()
    adv, ret = jax.device_get(ppo.gae(rewards, values, mask, gamma, lam))
    ref_adv, ref_ret = _gae_slow(rewards, values, mask, gamma, lam)
    assert adv.dtype == np.float32
    np.testing.assert_allclose(adv, ref_adv, **TOL)
    np.testing.assert_allclose(ret, ref_ret, **TOL)
    # λ = 0: one-step TD errors; the formula is not trivially satisfied by zeros.
    assert np.abs(adv).max() > 0.1


def test_whiten_equals_the_formula():
    x, _, mask = _batch(1)
    m = mask > 0
    mean, var = x[m].astype(np.float64).mean(), x[m].astype(np.float64).var()  # population
    ref = (x - mean) / np.sqrt(var + 1e-8)
    np.testing.assert_allclose(np.asarray(ppo.whiten(x, mask)), ref, **TOL)
    np.testing.assert_allclose(np.asarray(ppo.whiten(x, mask, shift_mean=False)), ref + mean, **TOL)
    w = np.asarray(ppo.whiten(x, mask))[m]
    assert abs(w.mean()) < 1e-5 and abs(w.std() - 1) < 1e-4


def test_policy_and_value_losses_equal_the_formulas():
    rng = np.random.default_rng(2)
    B, T, eps, eps_v = 3, 10, 0.2, 0.3
    logp = rng.normal(-2, 0.5, (B, T)).astype(np.float32)
    old = (logp + rng.normal(0, 0.4, (B, T))).astype(np.float32)
    adv = rng.normal(size=(B, T)).astype(np.float32)
    mask = (rng.random((B, T)) > 0.3).astype(np.float32)
    loss, clipfrac = ppo.policy_loss(logp, old, adv, mask, eps)
    ref_terms, ref_clip, n = 0.0, 0.0, mask.sum()
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                r = np.exp(float(logp[b, t]) - float(old[b, t]))
                a = float(adv[b, t])
                ref_terms += max(-a * r, -a * min(max(r, 1 - eps), 1 + eps))
                ref_clip += abs(r - 1) > eps
    np.testing.assert_allclose(float(loss), ref_terms / n, **TOL)
    np.testing.assert_allclose(float(clipfrac), ref_clip / n, **TOL)
    assert 0 < float(clipfrac) < 1  # both branches are exercised

    v = rng.normal(size=(B, T)).astype(np.float32)
    v_old = (v + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    ret = rng.normal(size=(B, T)).astype(np.float32)
    vloss, vclip = ppo.value_loss(v, v_old, ret, mask, eps_v)
    ref = 0.0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                vc = float(v_old[b, t]) + min(max(float(v[b, t] - v_old[b, t]), -eps_v), eps_v)
                ref += 0.5 * max((float(v[b, t]) - ret[b, t]) ** 2, (vc - ret[b, t]) ** 2)
    np.testing.assert_allclose(float(vloss), ref / n, **TOL)
    assert 0 < float(vclip) < 1


def test_kl_estimators_and_adaptive_controller():
    rng = np.random.default_rng(3)
    lp, ref = rng.normal(-2, 1, 50).astype(np.float32), rng.normal(-2, 1, 50).astype(np.float32)
    k1 = np.asarray(rl_rollout.kl_penalty(lp, ref, "k1"))
    k3 = np.asarray(rl_rollout.kl_penalty(lp, ref, "k3"))
    ratio = np.exp(ref.astype(np.float64) - lp)  # π_ref / π
    np.testing.assert_allclose(k1, lp.astype(np.float64) - ref, **TOL)
    np.testing.assert_allclose(k3, (ratio - 1) - np.log(ratio), rtol=1e-5, atol=1e-4)
    assert (k3 >= 0).all() and (k1 < 0).any()
    # Both are unbiased for KL(π‖π_ref): check on a categorical by exact expectation.
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.5, 0.3])
    kl = float(np.sum(p * np.log(p / q)))
    lp3, lq3 = np.log(p).astype(np.float32), np.log(q).astype(np.float32)
    for kind in ("k1", "k3"):
        est = np.asarray(rl_rollout.kl_penalty(lp3, lq3, kind))
        np.testing.assert_allclose(float(np.sum(p * est)), kl, rtol=1e-5)

    fixed = ppo.KLController(0.1)
    fixed.update(5.0, 64)
    assert fixed.value == 0.1
    c = ppo.KLController(0.1, target=2.0, horizon=1000)
    c.update(3.0, 64)  # KL above target: β grows by clip(3/2 − 1, ±0.2)·64/1000
    np.testing.assert_allclose(c.value, 0.1 * (1 + 0.2 * 64 / 1000))
    c.update(1.9, 100)
    np.testing.assert_allclose(c.value, 0.1 * (1 + 0.2 * 0.064) * (1 - 0.05 * 0.1), rtol=1e-6)


def test_explained_variance():
    rng = np.random.default_rng(4)
    ret = rng.normal(size=(2, 20))
    mask = np.ones_like(ret)
    assert ppo.explained_variance(ret, ret, mask) == 1.0
    v = ret + rng.normal(0, 0.5, ret.shape)
    ref = 1 - np.var(ret - v) / np.var(ret)
    np.testing.assert_allclose(ppo.explained_variance(v, ret, mask), ref, rtol=1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    return H.fake_runs(str(tmp_path_factory.mktemp("ppo_runs")), cache_dir)


def test_ppo_trains_in_the_loop_with_one_decoder_call_per_rollout(runs, cache_dir, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    sft, rm = runs
    c = H.tiny(ppo_config, cache_dir, init_from=sft, reward_from=rm, **{
        "batch_size": 8, "rollout.batch": 16, "rollout.epochs": 1, "seq_len": 64,
        "rollout.max_prompt_len": 48, "rollout.max_new_tokens": 8, "ppo.kl_target": 1.0,
        "opt.lr": 1e-3, "eval_every": 4, "eval_gen.examples": 8, "eval_gen.batch": 8,
        "eval_gen.max_new_tokens": 4, "eval_gen.max_prompt_len": 48, "ckpt_every": 4,
    })  # fmt: skip
    # Count executions of the compiled decode program (prefill + while_loop): a Python loop
    # per token would execute it (or call generate) once per token.
    calls = {"program": 0, "generate": 0}
    real_fn, real_generate = decode._decode_fn, rl_rollout.generate

    def counting_fn(*a, **kw):
        fn = real_fn(*a, **kw)

        def run(*args):
            calls["program"] += 1
            return fn(*args)

        return run

    def counting_generate(*a, **kw):
        calls["generate"] += 1
        return real_generate(*a, **kw)

    monkeypatch.setattr(decode, "_decode_fn", counting_fn)
    monkeypatch.setattr(rl_rollout, "generate", counting_generate)
    state, summary = ppo.run(c, str(tmp_path))
    recs = [r for r in read_metrics(str(tmp_path)) if "loss" in r]
    rollouts = 4 // 2  # total_steps / (epochs · rollout.batch / batch_size)
    assert calls["generate"] == rollouts
    # + the eval's decoding: one program run per 8 held-out prompts, greedy and sampled
    evals = sum(1 for r in read_metrics(str(tmp_path)) if "eval/sft_heldout/accuracy" in r)
    assert c.eval_gen.sample_temperature > 0
    assert calls["program"] == rollouts + 2 * evals
    last = recs[-1]
    assert last["rollout/response_len"] > 1  # several tokens per row from one program run
    for key in ("pg_loss", "vf_loss", "entropy", "clipfrac", "rollout/kl", "rollout/score_mean",
                "rollout/explained_var", "rollout/gen_s", "rollout/score_s", "rollout/train_s",
                "rollout/kl_coef"):  # fmt: skip
        assert np.isfinite(last[key]), key
    assert summary["train"]["n_skipped"] == 0
    assert last["rollout/iteration"] == 1 and last["rollout/train_s"] > 0
    assert set(state.params) == {"policy", "value"}
    data = json.load(open(os.path.join(tmp_path, "data_report.json")))
    assert data["prompts"]["used"] > 0
    # The policy of a PPO checkpoint loads as a plain language model (eval, DPO, export).
    _, policy, meta = common.load_policy(str(tmp_path))
    assert meta["head"] == "policy_value"
    for a, b in zip(jax.tree.leaves(policy), jax.tree.leaves(state.params["policy"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_reward_from_with_another_tokenizer_is_refused_before_any_load(
    runs, cache_dir, tmp_path, chat_tokenizer, monkeypatch
):  # fmt: skip
    """A reward model trained with another tokenizer scored (and the critic read) the policy's
    ids as other pieces without a word; refused, naming reward_from and both tokenizers."""
    from flaxlm.models.sharding import make_mesh

    sft, _ = runs
    other = H.other_tokenizer_run(str(tmp_path / "other"), chat_tokenizer[0], "scalar")
    H.forbid_loads(monkeypatch)
    c = H.tiny(ppo_config, cache_dir, init_from=sft, reward_from=other)
    with pytest.raises(
        ValueError,
        match=rf"reward_from={other}: its tokenizer "
        rf"{chat_tokenizer[0]} \(\d+ pieces\) is not this run's",
    ):
        ppo.build_task(c, make_mesh(dict(c.mesh)), None)


def test_kl_estimator_typo_is_refused_when_the_task_is_built(cache_dir):
    """ppo.kl_estimator was first read at the first rollout, after the models' loads, the
    decoder call and the scoring, and its error ("kl estimator 'K3'") named no key. Refused
    when the task is built, naming the key and the choices (the runs named do not exist: a
    check after their resolution would fail on that instead)."""
    c = H.tiny(ppo_config, cache_dir, init_from="/no/such/run", reward_from="/no/such/rm",
               **{"ppo.kl_estimator": "K3"})  # fmt: skip
    with pytest.raises(ValueError, match=r"ppo.kl_estimator='K3'; expected k1 \| k3"):
        ppo.build_task(c, None, None)


@pytest.mark.parametrize("key,bad,what", [
    ("gamma", 1.5, r"in \[0, 1\]"), ("lam", 2.0, r"in \[0, 1\]"), ("lam", -0.1, r"in \[0, 1\]"),
    ("clip", -0.2, "> 0"), ("clip", 0.0, "> 0"), ("value_clip", 0.0, "> 0"),
    ("kl_target", -1.0, ">= 0"), ("kl_coef", -0.1, ">= 0"), ("kl_horizon", 0, "> 0"),
    ("gamma", float("nan"), r"in \[0, 1\]"),
])  # fmt: skip
def test_nonsense_numbers_are_refused_when_the_task_is_built(cache_dir, key, bad, what):
    """ppo.lam=2, gamma=1.5 (GAE's sums then grow with the response length) and clip=-0.2 (the
    surrogate at ratio 1 became 0.1 instead of 0) trained without a word; value_clip=0 is no
    "off" (V never trained closer to the return than V_old). Refused before any load, naming
    the key (the runs named do not exist)."""
    c = H.tiny(ppo_config, cache_dir, init_from="/no/such/run", reward_from="/no/such/rm",
               **{f"ppo.{key}": bad})  # fmt: skip
    with pytest.raises(ValueError, match=rf"ppo\.{key}={re.escape(repr(bad))} must be {what}"):
        ppo.build_task(c, None, None)
    good = H.tiny(
        ppo_config,
        cache_dir,
        **{"ppo.gamma": 0.0, "ppo.lam": 1.0, "ppo.value_clip": 1e9, "ppo.kl_target": 0.0},
    )
    ppo.check_settings(good)  # the ends of the ranges, and value clipping turned off


def test_frozen_models_in_bfloat16_and_int8_score_like_float32(runs):
    """The reference and reward model may be kept in bf16 (half the bytes) or with int8
    projection weights (a quarter for the matrices): scores close."""
    from flaxlm.alignment import rl_common
    from flaxlm.models.sharding import logical_axis_rules, make_mesh

    sft, rm = runs
    mesh, rules = make_mesh({"data": -1, "fsdp": 1, "tensor": 1}), logical_axis_rules("fsdp")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, 500, n).astype(np.int32) for n in (5, 9, 3, 7, 4, 6, 8, 2)]
    tokens = rng.integers(5, 500, (8, 6)).astype(np.int32)
    rows = rl_common.rollout_rows(prompts, tokens, np.full(8, 6), 24, 0)
    out = {}
    for dtype in ("float32", "bfloat16", "int8"):
        _, apply, params = rl_common.frozen_lm(sft, mesh, rules, dtype)
        _, rm_apply, rm_params = rl_common.frozen_scalar(rm, mesh, rules, dtype)
        if dtype == "int8":  # the projections' kernels int8 (the reward model's too)
            for p in (params["layers_0"], rm_params["transformer"]["layers_0"]):
                assert p["attn"]["q"]["kernel"].dtype == jnp.int8
                assert p["mlp"]["down"]["kernel"].dtype == jnp.int8
            assert params["embed"]["embedding"].dtype == jnp.bfloat16
        else:
            assert {x.dtype.name for x in jax.tree.leaves(params)} == {dtype}
        lp = jax.jit(lambda p, r, a=apply: rl_rollout.lm_logprobs(a, p, r))(params, rows)
        score = rl_common.reward_scorer(rm_apply)(rm_params, rows)
        out[dtype] = (np.asarray(lp) * rows["loss_mask"], np.asarray(score))
    for dtype in ("bfloat16", "int8"):
        np.testing.assert_allclose(out[dtype][0], out["float32"][0], atol=0.1)
        np.testing.assert_allclose(out[dtype][1], out["float32"][1], atol=0.05)
    assert np.abs(out["float32"][0]).max() > 1  # real log-probabilities, not zeros
    assert np.abs(out["int8"][0] - out["float32"][0]).max() > 1e-4  # quantized, not the same
    with pytest.raises(ValueError, match="rollout.frozen_dtype='fp8'"):
        rl_common.frozen_lm(sft, mesh, rules, "fp8", key="rollout.frozen_dtype")


def test_lora_ppo_trains_adapters_on_the_policy_and_the_critic(runs, cache_dir, tmp_path,
                                                               monkeypatch):  # fmt: skip
    """lora.rank > 0: the policy's base stays frozen and is the reference (no second copy), so
    the first rollout's KL is exactly 0; the critic's backbone stays the reward model's, bit for
    bit, while its head and adapters train; the checkpoint's policy reads back merged."""
    sft, rm = runs
    c = H.tiny(ppo_config, cache_dir, init_from=sft, reward_from=rm, **{
        "batch_size": 8, "rollout.batch": 16, "rollout.epochs": 1, "seq_len": 64,
        "rollout.max_prompt_len": 48, "rollout.max_new_tokens": 8, "opt.lr": 1e-2,
        "ckpt_every": 4, "lora.rank": 4, "lora.targets": "attn/(q|v)|mlp/up",
    })  # fmt: skip
    H.forbid_reference_copy(monkeypatch)
    from flaxlm.models.sharding import make_mesh

    with c.unlocked():  # base leaves that train would move the reference (params["base"])
        c.lora.train_extra = "norm"
    with pytest.raises(ValueError, match="ppo: lora.train_extra='norm' trains base parameters"):
        ppo.build_task(c, make_mesh({"data": -1}), None)
    with c.unlocked():
        c.lora.train_extra = ""
    run = str(tmp_path / "run")  # (the adapter is exported outside it: export refuses inside)
    state, summary = ppo.run(c, run)
    assert summary["train"]["n_skipped"] == 0
    meta = H.check_lora_rl_run(run, sft, state.params["policy"])
    assert meta["head"] == "policy_value" and meta["lora"]["rank"] == 4
    value = state.params["value"]
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    critic0 = rl_common.load_scalar_params(
        rm,
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), value["base"]),
    )
    for a, b in zip(
        jax.tree.leaves(critic0["transformer"]),
        jax.tree.leaves(value["base"]["transformer"]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # frozen backbone
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(critic0["head"]), jax.tree.leaves(value["base"]["head"]))
    )
    assert any(np.abs(np.asarray(b)).max() > 0 for b in jax.tree.leaves(value["lora"]))
    # The policy's adapters export as a PEFT adapter; read back onto the SFT base they give the
    # run's merged policy.
    from flaxlm.models import lora as lora_lib
    from flaxlm.models import peft

    # Their base is the SFT run, which no HF checkpoint holds: no base named, a warning
    # saying to export the SFT run whole first.
    with pytest.warns(UserWarning, match=f"left unset.*export {sft} BASE_DIR"):
        adapter = peft.export_run_adapter(run, str(tmp_path / "adapter"))
    assert json.load(open(os.path.join(adapter, peft.CONFIG)))["base_model_name_or_path"] is None
    cfg, base, _ = common.load_policy(sft)
    read_spec, read = peft.load_adapter(adapter, cfg)
    _, merged, _ = common.load_policy(run)
    again = lora_lib.merge({"base": base, "lora": read}, read_spec)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(again), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_init_from_ema_and_reward_from_ema_start_every_model_at_the_ema(cache_dir, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    """init_from_ema: the policy starts at the SFT run's EMA and the reference is that EMA (the
    first rollout's KL is exactly 0); reward_from_ema: the scorer and the critic's start are the
    reward-model run's EMA. Each is compared with the weights the fake runs hold."""
    from flaxlm.models.heads import scalar_model_fns
    from flaxlm.models.sharding import make_mesh
    from flaxlm.train import loop
    from flaxlm.train.pretrain import model_fns

    sft, rm = H.fake_runs(str(tmp_path / "runs"), cache_dir, ema=True)
    c = H.tiny(ppo_config, cache_dir, init_from=sft, reward_from=rm, init_from_ema=True,
               reward_from_ema=True, **{
        "batch_size": 8, "rollout.batch": 8, "rollout.epochs": 1, "seq_len": 48,
        "rollout.max_prompt_len": 32, "rollout.max_new_tokens": 6, "total_steps": 1,
        "log_every": 1, "async_ckpt": False,
    })  # fmt: skip
    started, real = [], loop._init_or_resume

    def init_or_resume(*a):  # the state before the first step (its buffers are then donated)
        out = real(*a)
        started.append(jax.device_get(out[0].params))
        return out

    monkeypatch.setattr(loop, "_init_or_resume", init_or_resume)
    mesh = make_mesh(dict(c.mesh))
    workdir = str(tmp_path / "ppo")
    task = ppo.build_task(c, mesh, workdir)
    loop.run(c, workdir, task, mesh=mesh)
    cfg = task.train_batches.cfg
    want = {"policy": H.random_params(model_fns(cfg)[0], H.EMA_SEED["lm"]),
            "value": H.random_params(scalar_model_fns(cfg)[0], H.EMA_SEED["rm"])}  # fmt: skip
    (start,) = started
    for got, ref in ((start, want), (task.train_batches.ref_params, want["policy"]),
                     (task.train_batches.rm_params, want["value"])):  # fmt: skip
        got = jax.device_get(got)
        assert jax.tree.structure(got) == jax.tree.structure(ref)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    (rec,) = [r for r in read_metrics(workdir) if "rollout/kl" in r]
    assert rec["rollout/kl"] == 0.0  # the policy is its reference
