"""An exponential moving average (EMA) of the weights, kept in the train state.

    --config.ema.decay=0.999        # 0 (the default) = no EMA
    --config.ema.warmup=True        # the decay ramps up (below)

After every applied optimizer update (a step the trouble guard skips leaves it alone), inside the
jitted step:

    ema ← d·ema + (1 − d)·params,   d = min(ema.decay, (1 + n) / (10 + n))   (warmup)

with n the EMA updates made so far (`EmaTrainState.ema_count`), or d = ema.decay without warmup.
The warmup (TensorFlow's `ExponentialMovingAverage(num_updates=...)`) is on by default because
the EMA starts at the initial weights: without it a decay of 0.999 still holds 37% of a random
init after 1,000 steps, so the EMA scores poorly for most of a short run and `eval_ema/*` says
nothing until late. With it the EMA averages about the last 10% of the updates until
n ≈ 9/(1 − decay), then the last 1/(1 − decay). Turn it off to reproduce a recipe that uses the
plain recurrence (its EMA should then start from weights worth keeping, e.g. `init_from`).

The EMA is float32 whatever the params' dtype, sharded exactly like the params, and covers only
the trainable leaves (`Task.trainable_mask`): a LoRA run averages its adapters (and any
`train_extra` leaves); frozen leaves hold `optax.MaskedNode()`, which stores nothing, as in the
optimizer state. Memory: one float32 copy of the trainable params (4 bytes a parameter: 28 GB
for a 7B model trained whole, split over the mesh like the params).

The loop evaluates the EMA weights next to the params (`eval_ema/*` beside `eval/*`); readers of
a run take them with `ema=True` (`load_params`, `load_lm_params`, `load_model`) or `--ema`
(generate, evaluation, HF export), and a later run starts from them with `init_from_ema=True`
(train/loop.py `init_from_ema`; RL/DPO references too) or `reward_from_ema=True`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from flaxlm.config_values import is_real

WARMUP_OFFSET = 10.0  # d = (1 + n) / (10 + n) during warmup: TF's and timm's constant


def ema_config() -> ml_collections.ConfigDict:
    """Defaults of the `ema` config section."""
    c = ml_collections.ConfigDict()
    # decay of the EMA of the weights (0 = none; e.g. 0.999): one more float32 copy of the
    # trainable params, evaluated as eval_ema/*, read back with ema=True / --ema
    c.decay = 0.0
    c.warmup = True  # decay min(decay, (1 + n) / (10 + n)) at EMA update n (module docstring)
    return c


def settings(config) -> tuple[float, bool]:
    """(decay, warmup) of a run's config (no `ema` section: no EMA); a decay outside [0, 1)
    is an error naming the key."""
    section = config.get("ema") or {}
    decay, warmup = section.get("decay", 0.0), section.get("warmup", True)
    if not is_real(decay) or not 0 <= decay < 1:
        raise ValueError(f"ema.decay={decay!r} must be a number in [0, 1) (0 = no EMA)")
    return float(decay), bool(warmup)


def frozen(x) -> bool:
    """Whether an EMA tree entry is a frozen leaf's placeholder (no EMA kept)."""
    return isinstance(x, optax.MaskedNode)


def trainable(params, trainable_mask=None):
    """A bool per leaf of `params`: all True without a mask (a function params -> bools, or
    bools, as `Task.trainable_mask`)."""
    if trainable_mask is None:
        return jax.tree.map(lambda _: True, params)
    return trainable_mask(params) if callable(trainable_mask) else trainable_mask


def init(params, trainable_mask=None):
    """The EMA's starting point: float32 copies of the trainable leaves, MaskedNode elsewhere.
    A copy even for float32 params: the train step donates the state, and the EMA must not share
    a buffer with the params."""
    return jax.tree.map(
        lambda t, p: jnp.copy(p.astype(jnp.float32)) if t else optax.MaskedNode(),
        trainable(params, trainable_mask),
        params,
    )


def like_params(tree, params, trainable_mask=None):
    """`tree` (one entry per param leaf: shardings, shapes) kept where the EMA has a leaf."""
    return jax.tree.map(
        lambda t, x: x if t else optax.MaskedNode(), trainable(params, trainable_mask), tree
    )


def decay_at(count, decay: float, warmup: bool):
    """The decay of update number `count` (0-based), a float32 scalar."""
    decay = jnp.float32(decay)
    if not warmup:
        return decay
    n = count.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (WARMUP_OFFSET + n))


def update(ema, params, decay):
    """ema + (1 − d)·(params − ema) over the EMA's leaves (= d·ema + (1 − d)·params; this form
    leaves the EMA exactly unchanged when the params have not moved)."""
    return jax.tree.map(
        lambda e, p: e if frozen(e) else e + (1.0 - decay) * (p.astype(jnp.float32) - e),
        ema,
        params,
        is_leaf=frozen,
    )


def swap_in(params, ema):
    """`params` with every leaf the EMA averages replaced by its EMA, in the params' dtype
    (frozen leaves are the params' own)."""
    return jax.tree.map(
        lambda e, p: p if frozen(e) else e.astype(p.dtype), ema, params, is_leaf=frozen
    )


def start(params, like):
    """The EMA started from `params` (jitted: fresh buffers), with the leaves and shardings of
    `like`, an EMA tree of shardings or of ShapeDtypeStructs with shardings."""
    like = jax.tree.map(lambda s: getattr(s, "sharding", s), like, is_leaf=frozen)
    mask = jax.tree.map(lambda s: not frozen(s), like, is_leaf=frozen)
    return jax.jit(lambda p: init(p, mask), out_shardings=like)(params)
