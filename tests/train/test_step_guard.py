"""The trouble guard: NaN/Inf and spike updates are skipped and leave the state intact."""

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.train.optim import make_optimizer, opt_config
from flaxlm.train.state import TrainState, new_guard
from flaxlm.train.step import guard_config, train_step


def _state(tx):
    params = {"w": jnp.ones((3, 3))}
    return TrainState(
        jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0), new_guard()
    )


def _loss(params, batch, rng):
    return jnp.mean((batch["x"] @ params["w"]) ** 2) * batch["scale"], {}


def _step(state, tx, sched, guard, x, scale):
    batch = {"x": x, "scale": jnp.asarray(scale, jnp.float32)}
    return jax.jit(
        lambda s, b: train_step(s, b, loss_fn=_loss, tx=tx, schedule=sched, guard=guard)
    )(state, batch)


def test_nan_batch_is_skipped_and_counted():
    c = opt_config()
    c.warmup_steps = 0
    tx, sched = make_optimizer(c, 100)
    guard = guard_config()
    state = _state(tx)
    x = jnp.ones((2, 3))
    state, m = _step(state, tx, sched, guard, x, 1.0)
    assert float(m["skipped"]) == 0
    before = jax.device_get(state)
    state, m = _step(state, tx, sched, guard, x, float("nan"))
    assert float(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
    np.testing.assert_array_equal(state.params["w"], before.params["w"])
    for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(before.opt_state)):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 2  # the batch was consumed
    assert int(state.guard["n_skipped"]) == 1 and int(state.guard["bad_in_row"]) == 1
    state, m = _step(state, tx, sched, guard, x, 1.0)
    assert int(state.guard["bad_in_row"]) == 0 and float(m["skipped"]) == 0
    assert np.all(np.isfinite(state.params["w"]))


def test_loss_spike_is_skipped_after_warmup():
    c = opt_config()
    c.warmup_steps, c.lr = 0, 1e-4
    tx, sched = make_optimizer(c, 100)
    guard = guard_config()
    guard.spike_zscore, guard.warmup_steps = 4.0, 10
    state = _state(tx)
    rng = np.random.default_rng(0)
    for _ in range(15):
        x = jnp.asarray(1 + 0.05 * rng.normal(size=(2, 3)), jnp.float32)
        state, m = _step(state, tx, sched, guard, x, 1.0)
        assert float(m["skipped"]) == 0
    w = np.asarray(state.params["w"])
    state, m = _step(state, tx, sched, guard, jnp.ones((2, 3)), 50.0)  # 50× the usual loss
    assert float(m["skipped"]) == 1
    np.testing.assert_array_equal(state.params["w"], w)
