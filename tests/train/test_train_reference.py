"""The pretraining machinery against references written here, independently of flaxlm's helpers.

* learning-rate schedules: every step (0, end of warmup, the last step, past the end) against
  closed-form formulas; impossible settings are refused naming their key;
* AdamW (masked weight decay, global-norm clipping, warmup) against a float64 numpy AdamW,
  also with bfloat16 first moments and with an eps as large as the gradients; Lion (b1 ≠ b2)
  against a float64 numpy Lion;
* one train step with gradient accumulation and clipping against a float64 numpy gradient of
  a linear softmax model (uneven masks, an empty micro-batch);
* the cross-entropy and its hand-written backward (`_token_sums_bwd`) against central finite
  differences of a per-token float64 loop;
* the trouble guard against a numpy replay of its rule: skips exactly at NaN/Inf and at
  spikes just above the threshold, none on a noisy run;
* the loop: the logged lr is the applied one, exact (bitwise) resume with grad_accum, wsd,
  z-loss and the spike guard on, keep-last-N, an async save finished when the loop raises,
  `guard.max_bad_in_row=0`, and tokens/s and MFU of a multi-process job.
"""

import math
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from flaxlm.train.losses import _token_sums, cross_entropy
from flaxlm.train.optim import make_optimizer, make_schedule, opt_config
from flaxlm.train.state import TrainState, new_guard
from flaxlm.train.step import guard_config, train_step

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _opt(**kw):
    c = opt_config()
    for k, v in kw.items():
        c[k] = v
    return c


# ---------------------------------------------------------------------------------------------
# Schedules


def _ref_lr(step, kind, lr, warmup, total, frac, wsd_frac):
    """The schedule as documented in train/optim.py, written from its description."""
    w = min(warmup, max(total - 1, 0))  # a warmup longer than the run is cut to total − 1
    if step < w:
        return lr * step / w
    # the decay runs from the peak (step w) to the final value on the last update, step
    # total − 1 (at least one step: a lone update after the warmup is at the peak)
    span = max(total - w - 1, 1)
    t = min(step - w, span)  # past the end the schedule holds its final value
    final = lr * frac
    if kind == "constant":
        return lr
    if kind == "linear":
        return lr + (final - lr) * t / span
    if kind == "cosine":
        return final + (lr - final) * 0.5 * (1 + math.cos(math.pi * t / span))
    assert kind == "wsd"
    # the last wsd_frac of the run's updates (at least 1) decay; the one before is at lr
    decay = min(max(int(total * wsd_frac), 1), span)
    start = span - decay
    return lr if t <= start else lr + (final - lr) * (t - start) / decay


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd", "constant"])
@pytest.mark.parametrize("warmup, total", [(10, 100), (0, 50), (1, 2), (3, 37), (0, 1), (30, 20)])
def test_schedule_matches_the_formula_at_every_step(kind, warmup, total):
    lr, frac, wsd_frac = 3e-4, 0.1, 0.25
    c = _opt(lr=lr, schedule=kind, warmup_steps=warmup, final_lr_frac=frac, wsd_decay_frac=wsd_frac)
    s = make_schedule(c, total)
    steps = list(range(total + 4)) + [10 * total + 7]
    got = np.asarray([float(s(i)) for i in steps])
    want = np.asarray([_ref_lr(i, kind, lr, warmup, total, frac, wsd_frac) for i in steps])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=lr * 1e-6)
    w = min(warmup, max(total - 1, 0))
    if w:
        assert float(s(0)) == 0.0  # the first step of a warmup is at lr 0
    assert float(s(w)) == pytest.approx(lr, rel=1e-6)  # the end of warmup is the peak
    end = lr if kind == "constant" else lr * frac
    # the last update is at the end value, unless it is the only one after the warmup (the peak)
    last = [total - 1] if total - w > 1 else []
    for i in last + [total, total + 1, 100 * total]:
        assert float(s(i)) == pytest.approx(end, rel=1e-5)


def _plain(**kw):
    """An opt section without ml_collections' type locks, as a hand-built dict would be."""
    return ml_collections.ConfigDict({**opt_config().to_dict(), **kw})


@pytest.mark.parametrize(
    "kw, total, match",
    [
        ({"warmup_steps": -5}, 100, r"opt\.warmup_steps=-5 must be an integer >= 0"),
        ({"warmup_steps": 2.5}, 100, r"opt\.warmup_steps=2\.5 must be an integer"),
        ({"lr": "3e-4"}, 100, r"opt\.lr='3e-4' must be a number"),
        ({"lr": -1e-3}, 100, r"opt\.lr=-0\.001"),
        ({"final_lr_frac": 1.5}, 100, r"opt\.final_lr_frac=1\.5 must be a number in \[0, 1\]"),
        ({"final_lr_frac": -0.1}, 100, r"opt\.final_lr_frac=-0\.1"),
        ({"schedule": "wsd", "wsd_decay_frac": 0.0}, 100, r"opt\.wsd_decay_frac=0\.0"),
        ({"schedule": "wsd", "wsd_decay_frac": 2.0}, 100, r"opt\.wsd_decay_frac=2\.0"),
        ({"grad_accum": 0}, 100, r"opt\.grad_accum=0 must be an integer >= 1"),
        ({"mu_dtype": "bf16"}, 100, r"opt\.mu_dtype='bf16'"),
        ({"mu_dtype": "int8"}, 100, r"opt\.mu_dtype='int8'"),
        ({}, -3, r"total_steps=-3 must be an integer >= 0"),
    ],
)
def test_impossible_optimizer_settings_name_the_key(kw, total, match):
    """These used to give another schedule than asked for (a negative warmup started mid-ramp,
    a final fraction > 1 made the decay a rise) or fail inside optax/numpy without a key."""
    with pytest.raises(ValueError, match=match):
        make_optimizer(_plain(**kw), total)


def test_warmup_longer_than_the_run_is_cut_and_said(caplog):
    caplog.set_level("WARNING", logger="flaxlm")
    s = make_schedule(_opt(lr=1.0, warmup_steps=30, schedule="constant"), 20)
    assert float(s(19)) == 1.0 and float(s(18)) == pytest.approx(18 / 19)
    assert "opt.warmup_steps=30 >= total_steps=20" in caplog.text
    caplog.clear()
    make_schedule(_opt(warmup_steps=10), 20)
    assert "warmup_steps" not in caplog.text  # no warning for a sensible config


# ---------------------------------------------------------------------------------------------
# AdamW


def _tree():
    rng = np.random.default_rng(0)
    shapes = {"embed": {"embedding": (5, 3)},
              "layers": {"attn": {"q": {"kernel": (2, 3, 4), "bias": (2, 4)}},
                         "norm": {"scale": (2, 3)}},
              "head": {"kernel": (3,)}}  # fmt: skip
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    return jax.tree.map(lambda s: rng.normal(size=s), shapes, is_leaf=is_shape)


def _ref_adamw(params, grads, lr_at, b1, b2, eps, wd, clip):
    """float64 AdamW: clip the global norm, Adam moments with bias correction, decoupled decay
    (times the lr) on every leaf not named 'scale' or 'bias'."""
    flat, tdef = jax.tree_util.tree_flatten_with_path(params)
    names = [str(getattr(path[-1], "key", "")) for path, _ in flat]
    p = [np.asarray(x, np.float64) for _, x in flat]
    mu = [np.zeros_like(x) for x in p]
    nu = [np.zeros_like(x) for x in p]
    for t, g_tree in enumerate(grads):
        g = _clipped_f64(g_tree, clip)
        for i in range(len(p)):
            mu[i] = b1 * mu[i] + (1 - b1) * g[i]
            nu[i] = b2 * nu[i] + (1 - b2) * g[i] ** 2
            m_hat, v_hat = mu[i] / (1 - b1 ** (t + 1)), nu[i] / (1 - b2 ** (t + 1))
            u = m_hat / (np.sqrt(v_hat) + eps)
            if names[i] not in ("scale", "bias"):
                u = u + wd * p[i]
            p[i] = p[i] - lr_at(t) * u
    return jax.tree.unflatten(tdef, p)


def _max_gap(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize(
    "mu_dtype, eps, grad_scale",
    [("", 1e-8, 1.0), ("bfloat16", 1e-8, 1.0),
     ("", 1e-3, 1e-2)],  # gradients ~1e-4 … 1e-1 per entry: eps=1e-3 changes every update
)  # fmt: skip
def test_adamw_matches_a_float64_reference(mu_dtype, eps, grad_scale):
    """Also pins `opt.eps` reaching the optimizer: at eps=1e-8 the default (optax's 1e-8) would
    pass too, so one case has small gradients and eps=1e-3, where eps moves each update by
    several percent."""
    params = _tree()
    rng = np.random.default_rng(1)
    # Gradient scales around the clip norm: some steps are clipped, some not.
    scales = [s * grad_scale for s in (0.02, 3.0, 0.1, 10.0, 0.05, 1.0, 0.3)]
    grads = [jax.tree.map(lambda x, s=s: rng.normal(size=x.shape) * s, params) for s in scales]
    c = _opt(lr=1e-2, warmup_steps=2, schedule="cosine", final_lr_frac=0.1, b1=0.9, b2=0.95,
             eps=eps, weight_decay=0.1, clip_norm=1.0, mu_dtype=mu_dtype)  # fmt: skip
    total = len(grads)
    tx, _ = make_optimizer(c, total)
    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = tx.init(p)
    for g in grads:
        upd, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, p)
        p = optax.apply_updates(p, upd)
    lr_at = lambda t: _ref_lr(t, "cosine", 1e-2, 2, total, 0.1, 0.0)  # noqa: E731
    want = _ref_adamw(params, grads, lr_at, 0.9, 0.95, eps, 0.1, 1.0)
    # bf16 first moments: ~3 significant digits per step of a ~lr-sized update.
    atol = 1e-6 if not mu_dtype else 2e-4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol), p, want)
    if eps != 1e-8:  # the case can tell eps from optax's default
        other = _ref_adamw(params, grads, lr_at, 0.9, 0.95, 1e-8, 0.1, 1.0)
        assert _max_gap(want, other) > 100 * atol, _max_gap(want, other)
    adam = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu"))
            if hasattr(s, "mu")]  # fmt: skip
    assert len(adam) == 1 and int(adam[0].count) == total
    want_mu = jnp.bfloat16 if mu_dtype else jnp.float32
    assert {x.dtype for x in jax.tree.leaves(adam[0].mu)} == {jnp.dtype(want_mu)}
    assert {x.dtype for x in jax.tree.leaves(adam[0].nu)} == {jnp.dtype(jnp.float32)}


def _clipped_f64(g_tree, clip):
    """A gradient tree's leaves in float64, their global norm clipped to `clip` (0: not)."""
    g = [np.asarray(x, np.float64) for x in jax.tree.leaves(g_tree)]
    norm = math.sqrt(sum(float((x**2).sum()) for x in g))
    return [x * clip / norm for x in g] if clip > 0 and norm > clip else g


def _ref_lion(params, grads, lr_at, b1, b2, wd, clip):
    """float64 Lion (Chen et al. 2023, as optax.lion): clip the global norm; the update is
    sign(b1·m + (1 − b1)·g), then the momentum m ← b2·m + (1 − b2)·g; decoupled decay
    (times the lr) on every leaf not named 'scale' or 'bias'."""
    flat, tdef = jax.tree_util.tree_flatten_with_path(params)
    names = [str(getattr(path[-1], "key", "")) for path, _ in flat]
    p = [np.asarray(x, np.float64) for _, x in flat]
    m = [np.zeros_like(x) for x in p]
    for t, g_tree in enumerate(grads):
        g = _clipped_f64(g_tree, clip)
        for i in range(len(p)):
            u = np.sign(b1 * m[i] + (1 - b1) * g[i])
            m[i] = b2 * m[i] + (1 - b2) * g[i]
            if names[i] not in ("scale", "bias"):
                u = u + wd * p[i]
            p[i] = p[i] - lr_at(t) * u
    return jax.tree.unflatten(tdef, p)


def test_lion_matches_a_float64_reference():
    """Lion's two rates do different things: b1 mixes the momentum into this step's sign, b2
    is the momentum's own decay. With b1 = 0.5 and b2 = 0.9 and gradients that change sign,
    steps 2 and 3 have entries whose sign differs with the rates swapped (checked below), so
    `opt.b1`/`opt.b2` must reach optax.lion in that order."""
    params = _tree()
    rng = np.random.default_rng(2)
    scales = (0.1, 3.0, 0.2)  # around the clip norm: the second step is clipped
    grads = [jax.tree.map(lambda x, s=s: rng.normal(size=x.shape) * s, params) for s in scales]
    c = _opt(name="lion", lr=1e-2, warmup_steps=0, schedule="cosine", final_lr_frac=0.1, b1=0.5,
             b2=0.9, weight_decay=0.3, clip_norm=1.0)  # fmt: skip
    tx, _ = make_optimizer(c, len(grads))
    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = tx.init(p)
    for g in grads:
        upd, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, p)
        p = optax.apply_updates(p, upd)
    lr_at = lambda t: _ref_lr(t, "cosine", 1e-2, 0, len(grads), 0.1, 0.0)  # noqa: E731
    want = _ref_lion(params, grads, lr_at, 0.5, 0.9, 0.3, 1.0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), p, want)
    swapped = _ref_lion(params, grads, lr_at, 0.9, 0.5, 0.3, 1.0)
    assert _max_gap(want, swapped) > 1e-3  # a sign flip moves an entry by 2·lr(t)


# ---------------------------------------------------------------------------------------------
# One train step: accumulation, clipping, weight decay, z-loss


def _softmax_lm(rng, B=8, T=3, D=4, V=6):
    x = rng.normal(size=(B, T, D))
    targets = rng.integers(0, V, size=(B, T))
    mask = (rng.random((B, T)) > 0.3).astype(np.float64)
    mask[[1, 5]] = 0.0  # rows 1 and 5: with grad_accum=4 micro-batch 1 (rows 1, 5) is empty
    mask[0, 0] = 1.0
    w = rng.normal(size=(D, V))
    return x, targets, mask, w


def _ref_lm_loss_and_grad(x, targets, mask, w, z):
    """Mean over target tokens of (nll + z·lse²) for logits = x @ w, and its gradient in w."""
    logits = x @ w
    top = logits.max(-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
    probs = np.exp(logits - lse[..., None])
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    n = mask.sum()
    loss = (((lse - picked) + z * lse**2) * mask).sum() / n
    onehot = np.eye(w.shape[1])[targets]
    dlogits = (probs - onehot + 2 * z * lse[..., None] * probs) * mask[..., None] / n
    return loss, np.einsum("btd,btv->dv", x, dlogits)


@pytest.mark.parametrize("grad_accum", [1, 2, 4])
def test_train_step_matches_a_float64_step(grad_accum):
    """The step's loss, gradient norm (before clipping) and update: clip(g) and decoupled
    decay through SGD, so the update shows the gradient itself, not Adam's normalisation."""
    x, targets, mask, w = _softmax_lm(np.random.default_rng(3))
    z, lr, wd, clip = 1e-2, 0.5, 0.1, 0.05
    loss, g = _ref_lm_loss_and_grad(x, targets, mask, w, z)
    norm = float(np.sqrt((g**2).sum()))
    assert norm > clip  # the clipping is exercised
    want_w = w - lr * (g * clip / norm + wd * w)

    def loss_fn(params, batch, rng):
        return cross_entropy(batch["x"] @ params["w"], batch["targets"], batch["loss_mask"], z)

    c = _opt(name="sgd", lr=lr, b1=0.0, warmup_steps=0, schedule="constant", weight_decay=wd,
             clip_norm=clip, grad_accum=grad_accum)  # fmt: skip
    tx, sched = make_optimizer(c, 10)
    params = {"w": jnp.asarray(w, jnp.float32)}
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0),
                       new_guard())  # fmt: skip
    batch = {"x": jnp.asarray(x, jnp.float32), "targets": jnp.asarray(targets, jnp.int32),
             "loss_mask": jnp.asarray(mask, jnp.float32)}  # fmt: skip
    step = jax.jit(lambda s, b: train_step(s, b, loss_fn=loss_fn, tx=tx, schedule=sched,
                                           guard=guard_config(),
                                           grad_accum=grad_accum))  # fmt: skip
    new, m = step(state, batch)
    assert float(m["loss"]) == pytest.approx(loss, rel=1e-5)
    assert float(m["weight"]) == mask.sum()
    assert float(m["grad_norm"]) == pytest.approx(norm, rel=1e-5)
    assert float(m["lr"]) == lr and float(m["skipped"]) == 0
    np.testing.assert_allclose(new.params["w"], want_w, rtol=1e-5, atol=1e-6)


def test_grad_accum_with_experts_averages_micro_batches():
    """The step's docstring said accumulation equals one big batch exactly; for a mixture of
    experts it does not: the load-balancing term E·Σ f_e·P_e is a product of batch means, and
    each micro-batch takes it from its own routing. Pinned as documented (train/step.py
    `loss_and_grads`): without that term (`moe_aux`=0; the z-loss is exact here, every token a
    target) 2 micro-batches give the full batch's loss and gradients; with it, the weighted
    mean of the micro-batches' losses and gradients, which differs from the full batch's."""
    from flaxlm.models.config import get_variant
    from flaxlm.train.losses import lm_loss_fn
    from flaxlm.train.pretrain import model_fns
    from flaxlm.train.state import unbox
    from flaxlm.train.step import loss_and_grads

    cfg = get_variant("tiny", n_layers=1, n_experts=4, d_expert=32, moe_capacity_factor=1.0)
    init, apply = model_fns(cfg)
    params = unbox(init(jax.random.PRNGKey(0)))
    tok = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 17))
    batch = {"tokens": jnp.asarray(tok[:, :-1], jnp.int32),
             "targets": jnp.asarray(tok[:, 1:], jnp.int32),
             "loss_mask": jnp.ones((4, 16))}  # fmt: skip

    @jax.jit
    def run(aux):  # (full batch, 2 micro-batches, micro-batch 0 alone, micro-batch 1 alone)
        loss_fn = lm_loss_fn(apply, router=(aux, 1e-3))
        go = lambda b, n: loss_and_grads(params, b, jax.random.PRNGKey(0), loss_fn, n)  # noqa: E731
        halves = [jax.tree.map(lambda x: x[k::2], batch) for k in range(2)]  # noqa: B023
        return go(batch, 1), go(batch, 2), *(go(h, 1) for h in halves)  # (the strided split)

    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)  # noqa: E731
    (l1, _, g1), (l2, m2, g2), *micro = run(0.0)
    close(l2, l1)
    jax.tree.map(close, g2, g1)

    (l1, m1, g1), (l2, m2, g2), (la, ma, ga), (lb, mb, gb) = run(0.1)
    close(l2, (la + lb) / 2)  # equal weights: 32 targets each
    close(m2["moe/load_balance"], (ma["moe/load_balance"] + mb["moe/load_balance"]) / 2)
    jax.tree.map(lambda g, a, b: close(g, (a + b) / 2), g2, ga, gb)
    # ...and not the full batch's: the micro-batches' routing is less even than the batch's
    assert float(m2["moe/load_balance"]) > float(m1["moe/load_balance"]) + 1e-3
    assert float(l2) > float(l1) + 1e-4
    router = lambda g: jnp.asarray(g["layers_0"]["mlp"]["router"]["kernel"])  # noqa: E731
    off = jnp.linalg.norm(router(g2) - router(g1)) / jnp.linalg.norm(router(g1))
    assert float(off) > 0.1


def test_grad_accum_that_does_not_divide_the_batch_names_the_key():
    c = _opt(warmup_steps=0, grad_accum=3)
    tx, sched = make_optimizer(c, 10)
    params = {"w": jnp.ones((2,))}
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0),
                       new_guard())  # fmt: skip
    loss_fn = lambda p, b, r: (jnp.sum(b["x"] @ p["w"]), {})  # noqa: E731
    with pytest.raises(ValueError, match=r"opt\.grad_accum=3 does not divide the batch of 8 rows"):
        train_step(state, {"x": jnp.ones((8, 2))}, loss_fn=loss_fn, tx=tx, schedule=sched,
                   guard=guard_config(), grad_accum=3)  # fmt: skip


def test_counts_and_group_means_are_the_whole_batchs_at_any_grad_accum():
    """A loss's SUMS (counts) and RATIOS (means over a group of rows of its own, and a margin of
    two) are the whole batch's at grad_accum 1, 2 and 4, against numpy; an empty group is 0.
    Weighted by `weight` with the other metrics, counts came out divided by the number of
    micro-batches and a micro-batch without a group's rows pulled its mean toward 0."""
    from flaxlm.train.step import RATIOS, SUMS, finish_metrics, loss_and_grads

    x = np.arange(8, dtype=np.float32) - 2.0
    # grad_accum=4 takes rows (0, 4), (1, 5), (2, 6), (3, 7): one has only group a, one only b
    a = np.array([1, 0, 1, 1, 1, 0, 0, 1], np.float32)
    b, valid = 1.0 - a, np.r_[np.ones(7), 0.0].astype(np.float32)
    a, b = a * valid, b * valid

    def loss_fn(params, batch, rng):
        ga, gb, w = batch["a"], batch["b"], batch["valid"]
        sa, sb = jnp.sum(batch["x"] * ga), jnp.sum(batch["x"] * gb)
        na, nb = jnp.sum(ga), jnp.sum(gb)
        loss = params["w"] * jnp.sum(batch["x"] * w) / jnp.maximum(jnp.sum(w), 1.0)
        return loss, {
            "weight": jnp.sum(w), "mean": jnp.sum(batch["x"] * w) / jnp.maximum(jnp.sum(w), 1.0),
            SUMS: {"count/a": na, "count/b": nb},
            RATIOS: {"x/a": (sa[None], na[None]), "x/margin": (jnp.stack([sa, -sb]),
                     jnp.stack([na, nb])), "x/none": (sa[None] * 0, na[None] * 0)},
        }  # fmt: skip

    batch = {"x": x, "a": a, "b": b, "valid": valid}
    params, key = {"w": jnp.ones(())}, jax.random.PRNGKey(0)
    want = {"count/a": a.sum(), "count/b": b.sum(), "x/a": (x * a).sum() / a.sum(),
            "x/margin": (x * a).sum() / a.sum() - (x * b).sum() / b.sum(), "x/none": 0.0,
            "mean": (x * valid).sum() / valid.sum(), "weight": valid.sum()}  # fmt: skip
    assert float(finish_metrics(loss_fn(params, batch, key)[1])["x/a"]) == pytest.approx(
        want["x/a"]
    )
    for n in (1, 2, 4):
        _, m, _ = jax.jit(lambda p, bt, n=n: loss_and_grads(p, bt, key, loss_fn, n))(params, batch)
        assert set(m) == set(want)
        for k, v in want.items():
            assert float(m[k]) == pytest.approx(float(v), rel=1e-6), (k, n)


# ---------------------------------------------------------------------------------------------
# Cross-entropy and its written-out gradient


def _naive_sums(logits, targets, mask):
    """(Σ nll, Σ lse², Σ correct) over unmasked tokens, one token at a time, float64."""
    out = np.zeros(3)
    B, T, _ = logits.shape
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue  # a masked token is not looked at, whatever its logits or target
            row = logits[b, t].astype(np.float64)
            lse = row.max() + math.log(np.exp(row - row.max()).sum())
            out += [lse - row[targets[b, t]], lse**2, float(row[targets[b, t]] >= row.max())]
    return out


def _fd_grad(f, x, h=1e-6):
    """Central finite differences of scalar f at x (float64)."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        if not np.isfinite(x[i]):
            continue
        up, dn = x.copy(), x.copy()
        up[i] += h
        dn[i] -= h
        g[i] = (f(up) - f(dn)) / (2 * h)
    return g


def _loss_inputs():
    rng = np.random.default_rng(7)
    B, T, V = 2, 4, 6
    logits = rng.normal(size=(B, T, V)) * 2
    targets = rng.integers(0, V, size=(B, T))
    mask = np.ones((B, T))
    mask[0, 1] = mask[1, 3] = mask[1, 0] = 0
    targets[0, 1] = V  # a masked target outside the vocabulary (a pad id >= vocab_size)
    targets[1, 3] = -V - 5  # and one below it
    logits[1, 0] = np.nan  # masked garbage logits (a padded position)
    return logits, targets, mask


def test_token_sums_backward_matches_finite_differences_of_a_float64_loop():
    """`_token_sums_bwd` for an arbitrary cotangent on all three sums (the accuracy count's
    gradient is zero), with masked positions holding an out-of-range target and NaN logits:
    masked tokens contribute nothing, forward or backward."""
    logits, targets, mask = _loss_inputs()
    cot = np.asarray([0.7, -0.3, 5.0])
    sums, vjp = jax.vjp(lambda x: _token_sums(x, jnp.asarray(targets), jnp.asarray(mask)),
                        jnp.asarray(logits, jnp.float32))  # fmt: skip
    np.testing.assert_allclose(sums, _naive_sums(logits, targets, mask), rtol=1e-5)
    (got,) = vjp(jnp.asarray(cot, jnp.float32))
    want = _fd_grad(lambda x: float(cot @ _naive_sums(x, targets, mask)), logits)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_cross_entropy_value_metrics_and_gradient_match_a_float64_loop():
    logits, targets, mask = _loss_inputs()
    z = 1e-2

    def ref(x):
        s = _naive_sums(x, targets, mask)
        return (s[0] + z * s[1]) / mask.sum()

    def loss(x):
        return cross_entropy(x, jnp.asarray(targets), jnp.asarray(mask), z_loss=z)

    (val, m), g = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(logits, jnp.float32))
    s = _naive_sums(logits, targets, mask)
    assert float(val) == pytest.approx(ref(logits), rel=1e-5)
    assert float(m["nll"]) == pytest.approx(s[0] / mask.sum(), rel=1e-5)
    assert float(m["z_loss"]) == pytest.approx(s[1] / mask.sum(), rel=1e-5)
    assert float(m["accuracy"]) == pytest.approx(s[2] / mask.sum())
    assert float(m["weight"]) == mask.sum()
    np.testing.assert_allclose(g, _fd_grad(ref, logits), atol=2e-6)
    # bfloat16 logits: the gradient (in bf16) of the rounded logits' float64 loss.
    clean = np.nan_to_num(logits)
    bf = jnp.asarray(clean, jnp.bfloat16)
    g_bf = jax.grad(lambda x: loss(x)[0])(bf)
    assert g_bf.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g_bf, np.float32),
                               _fd_grad(ref, np.asarray(bf, np.float64)), atol=2e-3)  # fmt: skip


def test_all_masked_batch_is_a_zero_loss_with_zero_gradient():
    logits, targets, _ = _loss_inputs()
    mask = np.zeros(targets.shape)
    (val, m), g = jax.value_and_grad(
        lambda x: cross_entropy(x, jnp.asarray(targets), jnp.asarray(mask), z_loss=1e-2),
        has_aux=True,
    )(jnp.asarray(logits, jnp.float32))
    assert float(val) == 0.0 and float(m["weight"]) == 0.0
    assert np.all(np.asarray(g) == 0.0)


def test_a_nan_in_the_mask_still_poisons_the_loss():
    """The guard tests (and a real bad batch) rely on a NaN reaching the loss."""
    logits, targets, mask = _loss_inputs()
    mask = mask.copy()
    mask[0, 0] = np.nan
    val, _ = cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                           jnp.asarray(mask))  # fmt: skip
    assert np.isnan(float(val))


# ---------------------------------------------------------------------------------------------
# The trouble guard


@jax.custom_vjp
def _grad_is(w, g):
    """0 in value; its gradient in w is g everywhere (an Inf gradient with a finite loss)."""
    return 0.0 * jnp.sum(w)


_grad_is.defvjp(lambda w, g: (0.0 * jnp.sum(w), (g, w)),
                lambda res, ct: (jnp.full_like(res[1], ct * res[0]), None))  # fmt: skip


def _guard_loss(params, batch, rng):
    return batch["loss"] + _grad_is(params["w"], batch["grad"]), {}


class _RefGuard:
    """The documented rule: skip when the loss or gradient norm is not finite, or (after
    `warmup` accepted steps, and at least 2) when the loss exceeds both mean + z·std and
    (1 + rel)·mean of the accepted losses' statistics; they move on accepted steps only, start
    again a fifth of the warmup (at least 5 steps) before detection starts, and weigh the k-th
    loss since a start as a bias-corrected EMA does: the mean is Σ_j d^(k−j)(1−d)·x_j / (1−d^k)
    and the variance the same weighted mean of (x_j − mean)², written out here over the losses
    themselves (train/step.py keeps a running update)."""

    def __init__(self, z, rel, decay, warmup):
        self.z, self.rel, self.decay, self.warmup = z, rel, decay, warmup
        self.restart = max(warmup - max(warmup // 5, 5), 0)
        self.mean = self.var = 0.0
        self.seen = []  # the accepted losses since the statistics last started
        self.n = self.skipped = self.bad = 0

    def threshold(self):
        return max(self.mean + self.z * math.sqrt(self.var), (1 + self.rel) * self.mean)

    def step(self, loss, grad_finite=True):
        ok = math.isfinite(loss) and grad_finite
        if ok and self.z > 0 and self.n >= max(self.warmup, 2) and loss > self.threshold():
            ok = False
        if ok:
            if self.n in (0, self.restart):
                self.seen, self.mean, self.var = [loss], loss, 0.0
            else:
                # The weighted mean and variance of the losses since the restart, from scratch:
                # loss j of k weighs d^(k-1-j)·(1 - d)/(1 - d^k) (the weights sum to 1).
                self.seen.append(loss)
                d, k = self.decay, len(self.seen)
                w = [d ** (k - 1 - j) * (1 - d) / (1 - d**k) for j in range(k)]
                self.mean = sum(wj * x for wj, x in zip(w, self.seen))
                self.var = sum(wj * (x - self.mean) ** 2 for wj, x in zip(w, self.seen))
            self.n += 1
            self.bad = 0
        else:
            self.skipped += 1
            self.bad += 1
        return ok


def _guard_run(losses, events, z=4.0, rel=0.1, decay=0.95, warmup=20):
    """Replays `losses` through the jitted train step and the reference; `events` maps a step to
    "nan" / "inf_grad" / ("above", f) / ("below", f) (f: relative distance to the threshold)."""
    guard = guard_config()
    guard.spike_zscore, guard.spike_min_rel, guard.ema_decay, guard.warmup_steps = (
        z, rel, decay, warmup)  # fmt: skip
    tx, sched = make_optimizer(_opt(lr=1e-2, warmup_steps=0, schedule="constant"), len(losses))
    params = {"w": jnp.ones((3,))}
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0),
                       new_guard())  # fmt: skip
    step = jax.jit(lambda s, b: train_step(s, b, loss_fn=_guard_loss, tx=tx, schedule=sched,
                                           guard=guard))  # fmt: skip
    ref = _RefGuard(z, rel, decay, warmup)
    verdicts = []
    for i, loss in enumerate(losses):
        ev, grad = events.get(i), 0.01
        if ev == "nan":
            loss = float("nan")
        elif ev == "inf_grad":
            grad = float("inf")
        elif isinstance(ev, tuple):
            loss = ref.threshold() * (1 + ev[1] if ev[0] == "above" else 1 - ev[1])
        want = ref.step(loss, math.isfinite(grad))
        before = state.params["w"]
        state, m = step(state, {"loss": jnp.float32(loss), "grad": jnp.float32(grad)})
        got = float(m["skipped"]) == 0
        assert got == want, (i, loss, ev)
        assert int(m["bad_in_row"]) == ref.bad
        if not got:  # a skipped update leaves the parameters exactly as they were
            np.testing.assert_array_equal(state.params["w"], before)
        else:
            assert not np.array_equal(state.params["w"], before)
        verdicts.append(got)
    g = jax.device_get(state.guard)
    assert int(g["n_skipped"]) == ref.skipped and int(g["n_accepted"]) == ref.n
    assert float(g["loss_mean"]) == pytest.approx(ref.mean, rel=1e-5)
    assert float(g["loss_var"]) == pytest.approx(ref.var, rel=1e-3, abs=1e-9)
    return verdicts


def test_guard_skips_exactly_what_the_rule_says():
    rng = np.random.default_rng(0)
    t = np.arange(120)
    losses = list(2.0 + 3.0 * np.exp(-t / 40) + 0.05 * rng.normal(size=t.size))
    # A spike, and another right after (bad_in_row = 2). 3×: while the loss still falls fast
    # the EMA mean lags behind it and the deviations widen the threshold (here to ~2.3×).
    losses[60] *= 3.0
    losses[61] *= 3.0
    losses[80] *= 1.05  # a bump inside the thresholds: kept
    events = {5: "nan", 10: ("above", 0.5),  # before the guard's warmup: a 1.5× loss is kept
              30: "inf_grad", 90: ("above", 1e-3), 91: ("below", 1e-3), 95: "nan"}  # fmt: skip
    ok = _guard_run(losses, events)
    skipped = [i for i, v in enumerate(ok) if not v]
    assert skipped == [5, 30, 60, 61, 90, 95]


def test_guard_has_no_false_positives_on_a_noisy_run():
    """A decaying loss with 5% noise and occasional 15% bumps over 400 steps: nothing is
    skipped (the reference agrees step by step)."""
    rng = np.random.default_rng(1)
    t = np.arange(400)
    base = 2.0 + 4.0 * np.exp(-t / 80)
    losses = base * (1 + 0.05 * rng.normal(size=t.size))
    losses[rng.choice(t[30:], 10, replace=False)] *= 1.15
    assert all(_guard_run(list(losses), {}, z=6.0, decay=0.98, warmup=20))


def test_logged_lr_is_the_lr_the_update_used():
    """A skipped step leaves the optimizer's count (which its schedule reads) behind
    state.step: the logged lr was schedule(state.step), one step ahead after every skip."""
    c = _opt(name="sgd", lr=1.0, b1=0.0, weight_decay=0.0, clip_norm=0.0, warmup_steps=4,
             schedule="linear", final_lr_frac=0.0)  # fmt: skip
    tx, sched = make_optimizer(c, 8)
    params = {"w": jnp.zeros(())}
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0),
                       new_guard())  # fmt: skip
    loss_fn = lambda p, b, r: (p["w"] * b["g"], {})  # noqa: E731  gradient = g
    step = jax.jit(lambda s, b: train_step(s, b, loss_fn=loss_fn, tx=tx, schedule=sched,
                                           guard=guard_config()))  # fmt: skip
    applied, logged = [], []
    for g in [1.0, 1.0, float("nan"), 1.0, float("nan"), 1.0, 1.0]:
        w0 = float(state.params["w"])
        state, m = step(state, {"g": jnp.float32(g)})
        if float(m["skipped"]) == 0:
            applied.append(w0 - float(state.params["w"]))
            logged.append(float(m["lr"]))
    assert applied == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])  # warmup over accepted steps
    assert logged == pytest.approx(applied)


# ---------------------------------------------------------------------------------------------
# Throughput of a multi-process job


def test_tokens_per_s_and_mfu_count_every_process(monkeypatch):
    """Each process feeds its own slice; process 0 logs. With 2 processes × 8 chips, the job's
    rate is twice this process's, and MFU is over all 16 chips (it was this process's rate
    over all 16: half the true MFU)."""
    from flaxlm.train import metrics as metrics_lib

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "device_count", lambda: 16)
    clock = iter([0.0, 2.0, 2.0])
    monkeypatch.setattr(metrics_lib.time, "perf_counter", lambda: next(clock))
    meter = metrics_lib.Throughput(flops_per_token=6e6, flops_per_token_causal=5e6,
                                   peak_tflops=100.0)  # fmt: skip
    meter.add(1000)  # this process's 1000 tokens; the other process fed as many
    out = meter.measure()
    assert out["tokens_per_s"] == pytest.approx(2 * 1000 / 2.0)
    assert out["mfu"] == pytest.approx(2 * 1000 / 2.0 * 6e6 / (100e12 * 16))
    assert out["mfu_causal"] == pytest.approx(2 * 1000 / 2.0 * 5e6 / (100e12 * 16))


def test_skip_leaves_an_interval_out_of_the_rate(monkeypatch):
    """What the loop skips (the compiling first step, an eval, a save) counts neither tokens
    nor seconds; a labelled skip's seconds come once with the next measure."""
    from flaxlm.train import metrics as metrics_lib

    # reset, skip's note + reset, measure + reset, skip, measure + reset, measure + reset
    clock = iter([0.0, 30.0, 30.0, 32.0, 32.0, 40.0, 41.0, 41.0, 42.0, 42.0])
    monkeypatch.setattr(metrics_lib.time, "perf_counter", lambda: next(clock))
    meter = metrics_lib.Throughput()
    meter.add(100)  # the first step: 30 s with compilation
    meter.skip("first_step_s")
    meter.add(100)
    meter.add(100)
    out = meter.measure()
    assert out["tokens_per_s"] == pytest.approx(100.0) and out["step_time_s"] == 1.0
    assert out["first_step_s"] == 30.0
    meter.add(100)
    meter.skip()  # an eval until t=40
    meter.add(100)
    out = meter.measure()
    assert out["tokens_per_s"] == pytest.approx(100.0) and "first_step_s" not in out
    out = meter.measure()  # no step since: no rate
    assert out["tokens_per_s"] is None and out["step_time_s"] is None


# ---------------------------------------------------------------------------------------------
# The loop: exact resume, retention, saves on exit, rollback off


def _config(**overrides):
    from flaxlm.configs import pretrain as pretrain_config
    from flaxlm.configs.common import override

    c = pretrain_config.get_config("variant=tiny,runlocal=True,data=markov")
    return override(c, {"progress_bar": False, "eval_at_start": False, "eval_every": 0,
                        "log_every": 1, **overrides})  # fmt: skip


def _stream_class():
    from flaxlm.data.markov import MarkovStream

    class Stream(MarkovStream):
        """SIGTERM (preemption) while drawing batch `sigterm_at`; NaN loss masks on `bad`."""

        sigterm_at, bad = -1, range(0)

        def __next__(self):
            i = self.index
            if i == self.sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            out = super().__next__()
            if i in self.bad:
                out["loss_mask"] = out["loss_mask"] * np.nan
            return out

    return Stream


def _run(c, workdir, **stream_attrs):
    from flaxlm.models.sharding import make_mesh
    from flaxlm.train import loop, pretrain

    mesh = make_mesh({"data": -1})
    task = pretrain.build_task(c, mesh)
    stream = _stream_class()(256, c.seq_len, c.batch_size, chain_seed=c.seed)
    for k, v in stream_attrs.items():
        setattr(stream, k, v)
    task.train_batches = stream
    state, summary = loop.run(c, str(workdir), task, mesh=mesh)
    return jax.device_get(state), summary, stream


def test_resume_after_preemption_is_bitwise_the_uninterrupted_run(tmp_path):
    """Everything a resume must restore at once: params, Adam moments and count, the guard's
    statistics (spike detection on), the step's RNG, the data position; with accumulation,
    a wsd schedule and z-loss. keep_ckpts=2 keeps the two newest steps of each run."""
    from flaxlm.train.checkpoint import Checkpointer
    from flaxlm.train.metrics import read_metrics

    c = _config(total_steps=8, ckpt_every=2, keep_ckpts=2, async_ckpt=True,
                **{"opt.grad_accum": 2, "opt.schedule": "wsd", "opt.warmup_steps": 2,
                   "opt.wsd_decay_frac": 0.5, "loss.z_loss": 1e-3, "guard.spike_zscore": 3.0,
                   "guard.warmup_steps": 2})  # fmt: skip
    straight, s1, st1 = _run(c, tmp_path / "straight")
    first, s2, _ = _run(c, tmp_path / "resumed", sigterm_at=4)  # drawing batch 4 = step 5
    assert s2["preempted"] and int(first.step) == 5
    assert Checkpointer(tmp_path / "resumed").all_steps() == [4, 5]  # keep_ckpts=2
    resumed, s3, st3 = _run(c, tmp_path / "resumed")
    assert int(resumed.step) == 8 and st3.index == st1.index == 8  # the data position
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise, every leaf
    assert jax.tree.structure(straight) == jax.tree.structure(resumed)
    for sub in ("straight", "resumed"):
        assert Checkpointer(tmp_path / sub).all_steps() == [6, 8]
        assert not [d for d in os.listdir(tmp_path / sub / "checkpoints") if "tmp" in d]
    keys = ("loss", "lr", "grad_norm", "nll", "z_loss", "skipped")
    a = [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "straight") if "loss" in r]
    b = [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "resumed") if "loss" in r]
    assert len(a) == 8 and a == b


def test_max_bad_in_row_zero_never_rolls_back(tmp_path):
    """0 turns rollback off like the guard's other zeros; it used to roll back at every log
    step (bad_in_row >= 0) and, with no checkpoint, stop the run on its first step."""
    c = _config(total_steps=4, ckpt_every=0, async_ckpt=False, **{"guard.max_bad_in_row": 0})
    state, summary, _ = _run(c, tmp_path, bad=range(1, 3))
    assert summary["rollbacks"] == 0 and int(state.step) == 4
    assert int(state.guard["n_skipped"]) == 2


_RAISING_RUN = """
import sys
import numpy as np
from flaxlm.configs import pretrain as pretrain_config
from flaxlm.configs.common import override
from flaxlm.data.markov import MarkovStream
from flaxlm.models.sharding import make_mesh
from flaxlm.train import loop, pretrain

c = override(pretrain_config.get_config("variant=tiny,runlocal=True,data=markov"),
             {"progress_bar": False, "eval_at_start": False, "eval_every": 0, "log_every": 1,
              "total_steps": 10, "ckpt_every": 3, "async_ckpt": True})

class Failing(MarkovStream):
    def __next__(self):
        if self.index == 3:  # right after the async save of step 3 was started
            raise RuntimeError("the data source failed")
        return super().__next__()

mesh = make_mesh({"data": -1})
task = pretrain.build_task(c, mesh)
task.train_batches = Failing(256, c.seq_len, c.batch_size, chain_seed=c.seed)
loop.run(c, sys.argv[1], task, mesh=mesh)
"""


def test_an_async_save_in_flight_is_finished_when_the_loop_raises(tmp_path):
    """The exiting interpreter used to abandon it: only `3.orbax-checkpoint-tmp` was left, and
    a rerun started from scratch."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _RAISING_RUN, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert proc.returncode != 0 and "the data source failed" in proc.stderr, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"], proc.stderr[-3000:]
