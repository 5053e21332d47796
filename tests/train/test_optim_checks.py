"""The optimizer's own keys are checked, mu_dtype reaches every optimizer with a first moment,
the trouble guard refuses a non-finite update, and every decay ends on the run's last update."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flaxlm.train.optim import make_optimizer, make_schedule, opt_config
from flaxlm.train.state import TrainState, new_guard
from flaxlm.train.step import guard_config, train_step


def _opt(**kw):
    """An opt section without ml_collections' type locks (b1=1 is an int, clip_norm=-1...)."""
    return ml_collections.ConfigDict({**opt_config().to_dict(), "warmup_steps": 0, **kw})


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"b2": 1.0}, r"opt\.b2=1\.0 must be a number in \[0, 1\)"),  # NaN params after 1 step
        ({"b2": -0.1}, r"opt\.b2=-0\.1"),
        ({"name": "lion", "b2": 1.0}, r"opt\.b2=1\.0"),
        ({"name": "muon", "b2": 1.0}, r"opt\.b2=1\.0"),
        ({"b1": 1.5}, r"opt\.b1=1\.5 must be a number in \[0, 1\)"),
        ({"name": "lion", "b1": 1.0}, r"opt\.b1=1\.0"),
        ({"name": "sgd", "b1": -0.5}, r"opt\.b1=-0\.5 .*sgd: its momentum"),
        ({"eps": 0.0}, r"opt\.eps=0\.0 must be a number > 0"),  # NaN where a gradient is 0
        ({"name": "muon", "eps": -1e-8}, r"opt\.eps=-1e-08"),
        ({"weight_decay": -0.1}, r"opt\.weight_decay=-0\.1 must be a number >= 0"),
        ({"name": "sgd", "clip_norm": -1.0}, r"opt\.clip_norm=-1\.0 .*0 disables clipping"),
        ({"b1": "0.9"}, r"opt\.b1='0\.9' must be a number"),
    ],
)
def test_optimizer_values_no_update_can_mean_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer(_opt(**kw), 100)


def test_keys_an_optimizer_does_not_read_are_not_checked_for_it():
    """sgd has no second moment or epsilon; adafactor reads none of b1, b2, eps."""
    make_optimizer(_opt(name="sgd", b2=1.0, eps=0.0), 10)
    make_optimizer(_opt(name="adafactor", b1=1.0, b2=1.0, eps=0.0), 10)
    make_optimizer(_opt(b1=0.0, weight_decay=0.0, clip_norm=0.0), 10)  # the edges are fine


def _first_moment_dtypes(name, mu_dtype):
    params = {"embed": {"embedding": jnp.ones((4, 3))}, "l": {"kernel": jnp.ones((3, 3))}}
    tx, _ = make_optimizer(_opt(name=name, mu_dtype=mu_dtype), 10)
    return {str(x.dtype) for x in jax.tree.leaves(tx.init(params)) if x.ndim}


def test_mu_dtype_reaches_lion_and_sgd_and_adafactor_refuses_it():
    # lion's only state is its momentum, sgd's its accumulator: both used to stay float32
    assert _first_moment_dtypes("lion", "bfloat16") == {"bfloat16"}
    assert _first_moment_dtypes("sgd", "bfloat16") == {"bfloat16"}
    assert _first_moment_dtypes("adamw", "bfloat16") == {"bfloat16", "float32"}  # mu, nu
    assert _first_moment_dtypes("lion", "") == {"float32"}
    with pytest.raises(ValueError, match=r"opt\.mu_dtype='bfloat16': adafactor"):
        make_optimizer(_opt(name="adafactor", mu_dtype="bfloat16"), 10)
    for name in ("lion", "sgd", "adafactor"):
        with pytest.raises(ValueError, match=r"opt\.mu_dtype='int8'; expected a float dtype"):
            make_optimizer(_opt(name=name, mu_dtype="int8"), 10)


def test_a_non_finite_update_from_a_finite_gradient_is_skipped():
    """sgd's momentum kept in float16 overflows on a gradient of 1e5 (finite, and so is that
    step's update, computed in float32); the next update reads the inf momentum. It used to be
    applied: every weight -inf for good."""
    tx, sched = make_optimizer(
        _opt(name="sgd", mu_dtype="float16", clip_norm=0.0, lr=1e-6, schedule="constant"), 10
    )
    params = {"w": {"kernel": jnp.ones((3,))}}
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                       jax.random.key_data(jax.random.key(0)), new_guard())  # fmt: skip
    loss_fn = lambda p, b, r: (jnp.sum(p["w"]["kernel"] * b["x"]), {})  # noqa: E731
    step = jax.jit(lambda s, b: train_step(s, b, loss_fn=loss_fn, tx=tx, schedule=sched,
                                           guard=guard_config()))  # fmt: skip
    state, m = step(state, {"x": jnp.full((3,), 1e5)})
    assert float(m["skipped"]) == 0 and np.isfinite(float(m["grad_norm"]))
    assert not all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.opt_state)))
    before = jax.device_get(state.params)
    state, m = step(state, {"x": jnp.ones((3,))})
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert float(m["skipped"]) == 1 and int(state.guard["n_skipped"]) == 1
    np.testing.assert_array_equal(jax.device_get(state.params)["w"]["kernel"],
                                  before["w"]["kernel"])  # fmt: skip


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd", "wsd:sqrt", "wsd:cosine"])
@pytest.mark.parametrize("total, warmup", [(9, 0), (20, 0), (7, 3), (100, 10), (2, 0)])
def test_every_decay_reaches_the_final_lr_on_the_last_update(kind, total, warmup):
    """Update t uses schedule(t), t < total: the decay used to reach lr·final_lr_frac only at
    schedule(total), and a one-update wsd window (total=9) never decayed."""
    lr, frac = 2.0, 0.1
    kind, _, shape = kind.partition(":")
    s = make_schedule(_opt(lr=lr, schedule=kind, warmup_steps=warmup, final_lr_frac=frac,
                           wsd_decay_shape=shape or "linear"), total)  # fmt: skip
    lrs = [float(s(t)) for t in range(total + 2)]
    w = min(warmup, total - 1)
    assert lrs[w] == pytest.approx(lr, rel=1e-6)  # warmup unchanged: it peaks on update w
    assert lrs[total - 1] == pytest.approx(lr * frac, rel=1e-6)
    assert lrs[total] == lrs[total + 1] == lrs[total - 1]  # and holds there
    assert all(a >= b for a, b in zip(lrs[w:], lrs[w + 1 :]))  # never rises after the peak
    if kind == "wsd":  # the last int(total·wsd_decay_frac) updates (at least 1) are below lr
        below = sum(x < lr for x in lrs[w:total])
        assert below == max(int(total * 0.2), 1)


@pytest.mark.parametrize("shape", ["linear", "sqrt", "cosine"])
def test_wsd_decay_shapes_follow_their_formulas(shape):
    """Updates 80..99 of a 100-update WSD run (warmup 10, decay 20%): lr·(f + (1 − f)·g(x)),
    x = (t − 79)/20, g = 1 − x, 1 − √x or (1 + cos πx)/2 (Hägele et al. 2024's cooldowns)."""
    lr, f = 3.0, 0.1
    s = make_schedule(_opt(lr=lr, schedule="wsd", warmup_steps=10, final_lr_frac=f,
                           wsd_decay_shape=shape), 100)  # fmt: skip
    x = (np.arange(79, 100) - 79) / 20
    g = {"linear": 1 - x, "sqrt": 1 - np.sqrt(x), "cosine": (1 + np.cos(np.pi * x)) / 2}[shape]
    np.testing.assert_allclose([float(s(t)) for t in range(79, 100)], lr * (f + (1 - f) * g),
                               rtol=1e-6)  # fmt: skip
    assert [float(s(t)) for t in range(10, 80)] == pytest.approx([lr] * 70)
    with pytest.raises(ValueError, match=r"opt.wsd_decay_shape='sqr' must be one of linear \| "):
        make_schedule(_opt(schedule="wsd", wsd_decay_shape="sqr"), 100)


def test_the_one_update_left_after_warmup_is_at_the_peak():
    s = make_schedule(_opt(lr=1.0, warmup_steps=4, schedule="linear"), 5)
    assert [float(s(t)) for t in range(6)] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0, 0.1])


def test_a_warmup_as_long_as_the_run_is_cut_with_a_warning(caplog):
    import logging

    cfg = opt_config()
    cfg.warmup_steps = 10
    with caplog.at_level(logging.WARNING, logger="flaxlm"):
        schedule = make_schedule(cfg, 10)
    assert "opt.warmup_steps=10 >= total_steps=10: warmup cut to 9 steps" in caplog.text
    assert float(schedule(9)) == pytest.approx(cfg.lr)  # the last update at the peak
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flaxlm"):
        make_schedule(cfg, 11)
    assert "warmup_steps" not in caplog.text
