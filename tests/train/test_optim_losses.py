"""Optimizer factory, schedules, masks, gradient accumulation and the token losses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxlm.train.losses import cross_entropy, masked_mean
from flaxlm.train.optim import make_optimizer, make_schedule, opt_config
from flaxlm.train.step import loss_and_grads


def _cfg(**kw):
    c = opt_config()
    for k, v in kw.items():
        c[k] = v
    return c


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_schedules_warm_up_then_decay_to_the_final_fraction(schedule):
    c = _cfg(lr=1.0, warmup_steps=10, schedule=schedule, final_lr_frac=0.1, wsd_decay_frac=0.2)
    s = make_schedule(c, 100)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    end = 1.0 if schedule == "constant" else 0.1
    assert float(s(99)) == pytest.approx(end, abs=1e-6)  # the last update's
    assert float(s(100)) == pytest.approx(end, abs=1e-6)
    if schedule == "wsd":
        assert float(s(79)) == pytest.approx(1.0)  # stable until the last 20% of the updates
        assert float(s(80)) < 1.0
        assert float(s(90)) == pytest.approx(0.505, abs=0.02)


def test_unknown_optimizer_and_schedule_are_named():
    with pytest.raises(ValueError, match="opt.name='adam'"):
        make_optimizer(_cfg(name="adam"), 10)
    with pytest.raises(ValueError, match="opt.schedule='cos'"):
        make_schedule(_cfg(schedule="cos"), 10)


def test_weight_decay_skips_norm_scales_and_biases_by_name():
    """Not by shape: scanned layers stack norm scales into matrices, q/k/v biases are (N, H)."""
    params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,)), "attn": {"bias": jnp.ones((2, 2))},
              "norm": {"scale": jnp.ones((3, 2))}, "head": {"kernel": jnp.ones((2,))}}  # fmt: skip
    tx, _ = make_optimizer(
        _cfg(
            name="sgd",
            lr=0.1,
            b1=0.0,
            weight_decay=0.5,
            warmup_steps=0,
            schedule="constant",
            clip_norm=0.0,
        ),
        10,
    )
    zero = jax.tree.map(jnp.zeros_like, params)
    upd, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(upd["w"], -0.05 * np.ones((2, 2)))
    np.testing.assert_allclose(upd["head"]["kernel"], -0.05 * np.ones((2,)))
    for no_decay in (upd["scale"], upd["attn"]["bias"], upd["norm"]["scale"]):
        np.testing.assert_allclose(no_decay, 0.0)


def test_decay_mask_on_a_scanned_model_with_qkv_bias():
    from flaxlm.models import config as mc
    from flaxlm.models.transformer import Transformer
    from flaxlm.train.optim import decay_mask

    cfg = mc.get_variant("tiny", scan_layers=True, qkv_bias=True)
    params = jax.eval_shape(
        lambda r: Transformer(cfg).init(r, jnp.zeros((1, 4), jnp.int32)), jax.random.PRNGKey(0)
    )["params"]
    params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                          is_leaf=lambda x: hasattr(x, "value"))  # fmt: skip
    flat = {jax.tree_util.keystr(p): m for p, m in
            jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]}  # fmt: skip
    decayed = sorted(k for k, m in flat.items() if m)
    assert decayed and all(k.endswith(("['kernel']", "['embedding']")) for k in decayed)
    assert all(not m for k, m in flat.items() if k.endswith(("['scale']", "['bias']")))
    assert any(k.endswith("['bias']") for k in flat)  # the case the shape rule got wrong


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor", "sgd"])
def test_every_optimizer_reduces_a_quadratic(name):
    params = {"w": jnp.full((4, 4), 3.0), "b": jnp.full((4,), -2.0)}
    tx, _ = make_optimizer(
        _cfg(name=name, lr=0.05, warmup_steps=0, schedule="constant", weight_decay=0.0), 200
    )
    state = tx.init(params)
    loss = lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p))  # noqa: E731

    @jax.jit  # one program (eager, each step dispatched dozens of ops)
    def step(params, state):
        upd, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, upd), state

    first = float(loss(params))
    for _ in range(100):
        params, state = step(params, state)
    assert float(loss(params)) < 0.2 * first


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_decoupled_weight_decay_follows_the_lr_schedule(name):
    """With zero gradients only the decay moves the weights: w·Π(1 − lr(t)·wd) on decayed leaves,
    norm scales untouched. Adafactor's decay used to skip the lr (w·0.9 a step at lr 0)."""
    params = {"w": jnp.ones((8, 8)), "norm": {"scale": jnp.ones((8,))}}
    c = _cfg(name=name, lr=1e-2, warmup_steps=4, weight_decay=0.1)
    tx, sched = make_optimizer(c, 10)
    state, p = tx.init(params), params
    zero = jax.tree.map(jnp.zeros_like, params)
    for _ in range(6):
        upd, state = tx.update(zero, state, p)
        p = optax.apply_updates(p, upd)
    want = np.prod([1 - float(sched(t)) * 0.1 for t in range(6)])  # lr(0) = 0: no decay
    np.testing.assert_allclose(p["w"], want, rtol=1e-6)
    np.testing.assert_array_equal(p["norm"]["scale"], 1.0)


def test_adafactor_without_decay_is_optax_adafactor():
    """Moving the lr after the decay left the algorithm as it was."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32), "b": jnp.zeros((4,))}
    c = _cfg(name="adafactor", lr=1e-2, warmup_steps=2, weight_decay=0.0, clip_norm=0.0)
    tx, sched = make_optimizer(c, 10)
    ref = optax.adafactor(sched)
    s1, s2, p1, p2 = tx.init(params), ref.init(params), params, params
    for _ in range(4):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        u1, s1 = tx.update(g, s1, p1)
        u2, s2 = ref.update(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p1, p2)


def test_trainable_mask_freezes_and_drops_state():
    params = {"base": jnp.ones((64, 64)), "adapter": jnp.ones((64, 2))}
    mask = {"base": False, "adapter": True}
    tx, _ = make_optimizer(_cfg(warmup_steps=0), 10, trainable_mask=mask)
    state = tx.init(params)
    g = jax.tree.map(jnp.ones_like, params)
    upd, _ = jax.jit(tx.update)(g, state, params)
    assert np.abs(upd["base"]).max() == 0.0
    assert np.abs(upd["adapter"]).max() > 0.0
    n_state = sum(x.size for x in jax.tree.leaves(state))
    full_tx, _ = make_optimizer(_cfg(warmup_steps=0), 10)
    n_full = sum(x.size for x in jax.tree.leaves(jax.eval_shape(full_tx.init, params)))
    assert n_state < 0.05 * n_full  # only the adapter's moments are kept


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5))
    mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
    loss, m = jax.jit(lambda *a: cross_entropy(*a, z_loss=1e-2))(logits, targets, mask)
    lse = np.log(np.exp(logits).sum(-1))
    nll = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    ref_nll = (nll * mask).sum() / mask.sum()
    ref_z = (lse**2 * mask).sum() / mask.sum()
    assert float(m["nll"]) == pytest.approx(ref_nll, rel=1e-5)
    assert float(loss) == pytest.approx(ref_nll + 1e-2 * ref_z, rel=1e-5)
    assert float(m["weight"]) == mask.sum()
    assert float(jax.jit(masked_mean)(nll, mask)) == pytest.approx(ref_nll, rel=1e-5)


def test_cross_entropy_gradient_matches_the_hand_formula():
    """The written-out gradient (train/losses.py `_token_sums_bwd`) against numpy's
    d/dlogits of (Σ m·nll + z·Σ m·lse²) / Σ m, with a mask, z-loss and a repeated target; and,
    in bfloat16, against autodiff of the plain formula on the same rounded logits."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, size=(2, 5))
    targets[0, :2] = 3
    mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
    z = 1e-2

    def loss(x):
        return cross_entropy(x, jnp.asarray(targets), jnp.asarray(mask), z_loss=z)[0]

    grad = jax.jit(jax.grad(loss))  # (a program per dtype; eager, dozens of ops each)
    got = np.asarray(grad(jnp.asarray(logits)))
    lse = np.log(np.exp(logits).sum(-1, keepdims=True))
    probs = np.exp(logits - lse)
    onehot = np.eye(7)[targets]
    want = (probs - onehot + 2 * z * lse * probs) * mask[..., None] / mask.sum()
    np.testing.assert_allclose(got, want, atol=1e-6)

    def plain(x):  # autodiff of the formula, as the loss was before its gradient was written
        x = x.astype(jnp.float32)
        lse = jax.nn.logsumexp(x, axis=-1)
        nll = lse - jnp.take_along_axis(x, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
        return jnp.sum((nll + z * lse**2) * mask) / mask.sum()

    bf16 = jnp.asarray(logits, jnp.bfloat16)
    g_bf16 = grad(bf16)
    assert g_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(g_bf16, np.float32),
        np.asarray(jax.jit(jax.grad(plain))(bf16), np.float32),
        atol=2e-3,
    )


def test_gradient_accumulation_equals_one_big_batch():
    rng = np.random.default_rng(1)
    W = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    batch = {
        "x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
        "mask": jnp.asarray(rng.random((8,)) > 0.4, jnp.float32),
    }

    def loss_fn(w, b, rng):
        per = jnp.sum((b["x"] @ w) ** 2, axis=-1)
        return masked_mean(per, b["mask"]), {"weight": jnp.sum(b["mask"])}

    fn = jax.jit(loss_and_grads, static_argnums=(3, 4))  # (as the train step runs it)
    l1, _, g1 = fn(W, batch, jax.random.PRNGKey(0), loss_fn, 1)
    l4, m4, g4 = fn(W, batch, jax.random.PRNGKey(0), loss_fn, 4)
    assert float(l4) == pytest.approx(float(l1), rel=1e-5)
    np.testing.assert_allclose(g4, g1, rtol=1e-5)
    assert float(m4["weight"]) == float(batch["mask"].sum())
