"""`opt.nu_dtype`: AdamW's second moment in its own dtype, so bfloat16 weights can train with
the decays RL uses (b2 = 0.999), which a bfloat16 second moment cannot carry.

The reference is a float64 exponential moving average of the squared gradients; the run at
the end checks the state's dtypes survive a jitted step, a checkpoint and a resume."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxlm.train import pretrain
from flaxlm.train.checkpoint import Checkpointer
from flaxlm.train.optim import make_optimizer, opt_config
from tests.train.test_checkpoint_audit import STEPS
from tests.train.test_checkpoint_audit import _config as _audit_config


def _opt(**kw):
    c = opt_config()
    c.warmup_steps = 2
    for k, v in kw.items():
        c[k] = v
    return c


def _adam_states(state):
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    return [s for s in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(s)]


def test_a_float32_second_moment_beside_bfloat16_weights_tracks_the_float64_average():
    """The documented failure replayed: 300 squared gradients of 1, then 700 of 0.01, at
    b2 = 0.999. A bfloat16 ν froze at 2.3× the true average; a float32 one follows it."""
    params = {"w": jnp.zeros((8,), jnp.bfloat16)}
    tx, _ = make_optimizer(_opt(b2=0.999, nu_dtype="float32", clip_norm=0.0), 1000)
    state = tx.init(params)
    (adam,) = _adam_states(state)
    assert adam.nu["w"].dtype == jnp.float32 and adam.mu["w"].dtype == jnp.bfloat16

    @jax.jit
    def step(state, g):
        _, state = tx.update({"w": jnp.full((8,), g, jnp.bfloat16)}, state, params)
        return state

    want = 0.0
    for t in range(1000):
        g = 1.0 if t < 300 else 0.1
        state = step(state, g)
        want = 0.999 * want + 0.001 * g * g
    (adam,) = _adam_states(state)
    assert adam.nu["w"].dtype == jnp.float32  # kept through the update, not promoted or cast
    assert adam.mu["w"].dtype == jnp.bfloat16  # μ stays in the weights' dtype (opt.mu_dtype='')
    got = np.asarray(adam.nu["w"], np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-3)


def test_updates_with_a_float32_second_moment_match_a_float64_adam():
    """The parameter updates themselves: bfloat16 weights, float32 ν and μ, b2 = 0.999,
    against float64 Adam (no decay, no clipping, constant lr) fed the same gradients."""
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=(16,)) * s for s in (1.0, 0.3, 3.0, 0.01, 0.5, 2.0)]
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    c = _opt(lr=lr, schedule="constant", warmup_steps=0, b2=b2, weight_decay=0.0,
             clip_norm=0.0, mu_dtype="float32", nu_dtype="float32")  # fmt: skip
    tx, _ = make_optimizer(c, len(grads))
    params = {"w": jnp.zeros((16,), jnp.bfloat16)}
    state = tx.init(params)
    m = v = np.zeros(16)
    for t, g in enumerate(grads, 1):
        gb = jnp.asarray(g, jnp.bfloat16)
        upd, state = tx.update({"w": gb}, state, params)
        g64 = np.asarray(gb, np.float64)
        m, v = b1 * m + (1 - b1) * g64, b2 * v + (1 - b2) * g64**2
        want = -lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        # the update is float32 (cast to bfloat16 only when applied to the weights), from g
        # cast up: a bfloat16 g² was 0.4% off. (1e-5 of float32's 1 − 0.999^t is left.)
        assert upd["w"].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(upd["w"], np.float64), want, rtol=5e-5, atol=1e-9)


def test_the_refusal_for_bfloat16_weights_offers_nu_dtype_and_nu_dtype_lifts_it():
    bf = {"w": jnp.zeros((4, 4), jnp.bfloat16), "norm": {"scale": jnp.ones((4,), jnp.bfloat16)}}
    for name in ("adamw", "muon"):
        tx, _ = make_optimizer(_opt(name=name, b2=0.999), 10)
        with pytest.raises(ValueError, match=r"opt\.b2=0\.999 .*model\.param_dtype.*"
                                             r"opt\.nu_dtype='float32'"):  # fmt: skip
            tx.init(bf)
        tx, _ = make_optimizer(_opt(name=name, b2=0.999, nu_dtype="float32"), 10)
        state = jax.eval_shape(tx.init, bf)
        nus = [x.dtype for s in _adam_states(state) for x in jax.tree.leaves(s.nu)]
        assert nus and set(nus) == {jnp.dtype(jnp.float32)}, (name, nus)
    # a bfloat16 second moment asked for by name is named as the cause
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), bf)
    tx, _ = make_optimizer(_opt(b2=0.999, nu_dtype="bfloat16"), 10)
    with pytest.raises(ValueError, match=r"kept in opt\.nu_dtype.*set opt\.nu_dtype='float32'"):
        tx.init(f32)


@pytest.mark.parametrize("name", ["lion", "sgd", "adafactor"])
def test_nu_dtype_is_refused_where_there_is_no_adam_second_moment(name):
    with pytest.raises(ValueError, match=rf"opt\.nu_dtype='float32': {name} keeps no Adam"):
        make_optimizer(_opt(name=name, nu_dtype="float32"), 10)


@pytest.mark.parametrize("value", ["int8", "f32x", "bf16"])
def test_a_bad_nu_dtype_is_refused_naming_the_key(value):
    with pytest.raises(ValueError, match=rf"opt\.nu_dtype='{value}'; expected a float dtype"):
        make_optimizer(_opt(nu_dtype=value), 10)


def test_the_default_keeps_the_state_of_earlier_versions():
    """nu_dtype='' is optax's adamw untouched: the same state tree and dtypes, so checkpoints
    written before the key existed restore as they did."""
    params = {"w": jnp.zeros((4, 4), jnp.bfloat16)}
    tx, _ = make_optimizer(_opt(), 10)
    ref = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(
            lambda t: 1e-3,
            b1=0.9,
            b2=0.95,
            weight_decay=0.1,
            mask=lambda p: jax.tree.map(lambda _: True, p),
        ),  # fmt: skip
    )
    got, want = jax.eval_shape(tx.init, params), jax.eval_shape(ref.init, params)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert [x.dtype for x in jax.tree.leaves(got)] == [x.dtype for x in jax.tree.leaves(want)]


def _config(**kw):
    """The checkpoint audit's 4-step run (saves at 2 and 4), with bfloat16 weights at b2 =
    0.999 and a float32 second moment."""
    return _audit_config(**{"model.param_dtype": "bfloat16", "opt.b2": 0.999,
                            "opt.nu_dtype": "float32", **kw})  # fmt: skip


def test_a_bfloat16_run_at_b2_0999_trains_checkpoints_and_resumes_bitwise(tmp_path):
    whole = str(tmp_path / "whole")
    final, _ = pretrain.run(_config(), whole)
    final = jax.device_get(final)
    (adam,) = _adam_states(final.opt_state)
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {np.dtype(np.float32)}
    assert {x.dtype for x in jax.tree.leaves(final.params)} == {jnp.dtype(jnp.bfloat16)}
    # resume from step 2: the same final state, bit for bit, float32 ν included
    resumed = str(tmp_path / "resumed")
    shutil.copytree(whole, resumed)
    ckpt = Checkpointer(resumed)
    assert ckpt.all_steps() == [2, STEPS]
    ckpt.close()
    shutil.rmtree(f"{resumed}/checkpoints/{STEPS}")
    again, _ = pretrain.run(_config(), resumed)
    again = jax.device_get(again)
    assert jax.tree.structure(again) == jax.tree.structure(final)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(final)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rl_configs_train_bfloat16_weights_at_their_b2_and_change_nothing_for_float32():
    """The RL configs' b2 = 0.999 with a float32 second moment: bfloat16 weights are accepted
    (refused before), and float32 weights get optax's state and updates bit for bit."""
    from flaxlm.configs import grpo, online_dpo, ppo

    rng = np.random.default_rng(0)
    grads = [{"w": rng.normal(size=(4, 4)).astype(np.float32)} for _ in range(3)]
    for module in (grpo, ppo, online_dpo):
        opt = module.get_config("").opt
        assert opt.b2 == 0.999 and opt.nu_dtype == "float32", module.__name__
        tx, _ = make_optimizer(opt, 10)
        state = jax.eval_shape(tx.init, {"w": jnp.zeros((4, 4), jnp.bfloat16)})
        (adam,) = _adam_states(state)
        assert adam.nu["w"].dtype == jnp.float32
        plain = opt.copy_and_resolve_references()
        plain.nu_dtype = ""
        ref, _ = make_optimizer(plain, 10)
        p = {"w": jnp.ones((4, 4), jnp.float32)}
        s_new, s_ref = tx.init(p), ref.init(p)
        for g in grads:
            u_new, s_new = tx.update(g, s_new, p)
            u_ref, s_ref = ref.update(g, s_ref, p)
            np.testing.assert_array_equal(np.asarray(u_new["w"]), np.asarray(u_ref["w"]))
        for a, b in zip(jax.tree.leaves(s_new), jax.tree.leaves(s_ref), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
