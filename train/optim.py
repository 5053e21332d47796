"""The one optimizer factory every task shares: optimizer, learning-rate schedule, clipping.

    tx, schedule = make_optimizer(config.opt, total_steps)

Optimizers: adamw | lion | adafactor | sgd | muon (Muon for the layers' matrices, AdamW for the
rest: train/muon.py). Adafactor is optax's with its defaults (updates relative to each weight's
RMS, its own update clipping at 1.0, decay rate 0.8; b1, b2 and eps unused), so its `opt.lr`
is a relative step: a weight of RMS 0.02 moves ~50x less than under AdamW at the same lr.
Schedules (after a linear warmup from 0 that peaks at lr on update
warmup_steps):
    cosine    cosine decay to lr·final_lr_frac
    linear    linear decay to lr·final_lr_frac
    wsd       warmup-stable-decay: constant, then a linear decay over the last wsd_decay_frac of
              the updates (at least one), every one of them below lr
    constant  no decay
Every decay reaches lr·final_lr_frac on the run's last update, schedule(total_steps − 1) (update
t uses schedule(t), t = 0 .. total_steps − 1), and holds it after; it used to end at
schedule(total_steps), which no update uses (a one-update wsd window never decayed). When the
warmup leaves a single update (or the run has one), that update is at the peak.
Warmup is cut to total_steps − 1 steps when it is longer than the run (short test runs of a config
whose warmup was derived from a longer one), with a warning naming `opt.warmup_steps`; a value no
schedule or optimizer can mean (a negative warmup, a final fraction outside [0, 1], b2 = 1,
eps = 0, a negative clip_norm or weight_decay, a wrong type) is an error naming its key.
Weight decay applies to every weight but norm scales and biases (leaves named "scale" / "bias":
`decay_mask`), whatever their shape, and is decoupled: each step subtracts lr(t)·weight_decay·w
(adafactor too; sgd adds it to the gradient, so its momentum carries it).
Clipping takes the global norm over every trainable leaf in float32 (`clip_by_global_norm32`):
optax's sums in the leaves' dtype, and with bfloat16 weights (so bfloat16 gradients) one large
leaf swallowed the small ones after it, a norm of 1.127 read as 1.0 and went unclipped.
A moment decay the optimizer state's dtype cannot carry is refused, naming its key, when the
state is made (`_refuse_frozen_moments`): kept in bfloat16 (bfloat16 weights: Adam's first
and second moments unless `opt.mu_dtype` / `opt.nu_dtype` say otherwise), β·m rounds back to
m once 1 − β is near bfloat16's rounding step, so a moment at b2 = 0.999 froze at 2.3× its
value. `opt.nu_dtype='float32'` keeps AdamW's second moment in float32 beside bfloat16
weights (optax's adamw has no such option: `_nu_in`); its update is then computed in float32
from the gradient cast up, and cast to the weights' dtype when applied.
Gradient accumulation is not an optax wrapper: train/step.py scans over micro-batches, so one
call is one optimizer update and memory holds one micro-batch of activations (exact but for a
mixture of experts' load-balancing loss: `loss_and_grads`).
"""

from __future__ import annotations

import logging
import numbers

import jax
import jax.numpy as jnp
import ml_collections
import optax

from flaxlm.config_values import is_int, is_real

log = logging.getLogger("flaxlm")


def opt_config() -> ml_collections.ConfigDict:
    """Defaults of the `opt` config section; every key is what experiments vary."""
    c = ml_collections.ConfigDict()
    c.name = "adamw"  # adamw | lion | adafactor | sgd | muon
    c.lr = 3e-4  # peak learning rate
    c.schedule = "cosine"  # cosine | linear | wsd | constant (after warmup)
    c.warmup_steps = 100  # linear warmup from 0 to lr
    c.final_lr_frac = 0.1  # cosine/linear/wsd end at lr·final_lr_frac
    c.wsd_decay_frac = 0.2  # wsd: fraction of steps spent in the final decay
    # wsd: the decay's shape from lr to lr·final_lr_frac: linear | sqrt (1 − √x, Hägele et al.
    # 2024's better cooldown) | cosine (half a cosine)
    c.wsd_decay_shape = "linear"
    c.b1 = 0.9  # first-moment decay (adamw, lion, muon's AdamW), in [0, 1); sgd: its momentum
    c.b2 = 0.95  # second-moment decay (adamw, lion, muon's AdamW), in [0, 1)
    c.eps = 1e-8  # adamw / muon's AdamW epsilon, > 0
    c.weight_decay = 0.1  # decoupled weight decay on weights (not norm scales or biases), >= 0
    c.clip_norm = 1.0  # global-norm gradient clipping, >= 0; 0 disables
    # micro-batches per optimizer step (the batch is split, not repeated); the same update as
    # one big batch, except a mixture of experts' load-balancing loss (`loss.moe_aux`), taken
    # per micro-batch (train/step.py `loss_and_grads`)
    c.grad_accum = 1
    # first-moment dtype of adamw / muon / lion, sgd's momentum ("" = param dtype; "bfloat16"
    # saves memory); adafactor keeps no first moment and refuses one
    c.mu_dtype = ""
    # second-moment dtype of adamw / muon's AdamW ("" = param dtype). "float32" with bfloat16
    # weights costs 2 bytes a weight and lets b2 be any decay below 1 - 2.4e-7 (a bfloat16
    # second moment carries b2 <= 0.984 only: `_refuse_frozen_moments`)
    c.nu_dtype = ""
    # muon (train/muon.py): momentum, Newton–Schulz steps, and the update RMS that lets lr and
    # weight_decay carry over from AdamW (Moonshot's 0.2)
    c.muon_momentum = 0.95
    c.muon_ns_steps = 5
    c.muon_rms = 0.2
    c.muon_dtype = "float32"  # Newton–Schulz iterations in float32 | bfloat16 (faster)
    return c


def _check(cfg, total_steps) -> None:
    """Refuses, naming the key, what would otherwise fail deep inside optax or silently give
    another schedule than the one asked for (a negative warmup starts mid-ramp)."""

    def need(key, ok, what):
        value = total_steps if key == "total_steps" else cfg[key]
        if not ok(value):
            name = key if key == "total_steps" else f"opt.{key}"
            raise ValueError(f"{name}={value!r} must be {what}")

    need("total_steps", lambda x: is_int(x) and x >= 0, "an integer >= 0")
    need("warmup_steps", lambda x: is_int(x) and x >= 0, "an integer >= 0")
    need("lr", lambda x: is_real(x) and x >= 0, "a number >= 0")
    need("final_lr_frac", lambda x: is_real(x) and 0 <= x <= 1, "a number in [0, 1]")
    if cfg.schedule == "wsd":
        need("wsd_decay_frac", lambda x: is_real(x) and 0 < x <= 1, "a number in (0, 1]")
        if "wsd_decay_shape" in cfg:  # (a config saved before the key: linear)
            need("wsd_decay_shape", lambda x: x in WSD_SHAPES, "one of " + " | ".join(WSD_SHAPES))
    need("grad_accum", lambda x: is_int(x) and x >= 1, "an integer >= 1")
    # The optimizer's own keys, where its update reads them: b2 = 1 made AdamW's bias correction
    # 0/0 (NaN params after the first update), eps = 0 NaN wherever a gradient is exactly 0 (an
    # embedding row no token used); a negative clip_norm silently turned clipping off, a negative
    # weight_decay grew the weights, b1 >= 1 never forgets (and > 1 diverges).
    if cfg.name in ("adamw", "muon", "lion", "sgd"):
        what = "a number in [0, 1)" + (" (sgd: its momentum)" if cfg.name == "sgd" else "")
        need("b1", lambda x: is_real(x) and 0 <= x < 1, what)
    if cfg.name in ("adamw", "muon", "lion"):
        need("b2", lambda x: is_real(x) and 0 <= x < 1, "a number in [0, 1)")
    if cfg.name in ("adamw", "muon"):
        need("eps", lambda x: is_real(x) and x > 0, "a number > 0")
    need("weight_decay", lambda x: is_real(x) and x >= 0, "a number >= 0 (0 = none)")
    need("clip_norm", lambda x: is_real(x) and x >= 0, "a number >= 0 (0 disables clipping)")
    if total_steps > 0 and cfg.warmup_steps >= total_steps:
        log.warning(
            "opt.warmup_steps=%d >= total_steps=%d: warmup cut to %d steps, so the run peaks "
            "at its last steps; set opt.warmup_steps below total_steps",
            cfg.warmup_steps, total_steps, total_steps - 1,
        )  # fmt: skip


WSD_SHAPES = ("linear", "sqrt", "cosine")  # opt.wsd_decay_shape


def _wsd_decay(shape: str, lr: float, final: float, decay: int) -> optax.Schedule:
    """The WSD decay from `lr` (count 0) to `final` (count `decay`, held after), shaped by
    `shape`: x = count/decay falls linearly, as 1 − √x (the cooldown Hägele et al. 2024 found to
    match cosine), or as half a cosine."""
    if shape == "linear":
        return optax.linear_schedule(lr, final, decay)

    def schedule(count):
        x = jnp.clip(count / decay, 0.0, 1.0)
        left = 1.0 - jnp.sqrt(x) if shape == "sqrt" else 0.5 * (1.0 + jnp.cos(jnp.pi * x))
        return final + (lr - final) * left

    return schedule


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
    _check(cfg, total_steps)
    lr, warmup = cfg.lr, min(cfg.warmup_steps, max(total_steps - 1, 0))
    final = lr * cfg.final_lr_frac
    # Updates warmup .. total_steps − 1 follow the decay, which starts at lr (the peak, on update
    # `warmup`) and reaches `final` `span` updates later: on the last one, total_steps − 1.
    # At least 1, so a run whose warmup leaves one update (or a one-update run) takes it at lr.
    span = max(total_steps - warmup - 1, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, span, alpha=cfg.final_lr_frac)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(lr, final, span)
    elif cfg.schedule == "wsd":
        # the last `decay` updates are below lr, the last of them at `final`; the update before
        # them (the warmup's peak at the latest) at lr
        decay = min(max(int(total_steps * cfg.wsd_decay_frac), 1), span)
        after = optax.join_schedules(
            [optax.constant_schedule(lr), _wsd_decay(cfg.get("wsd_decay_shape", "linear"), lr,
                                                     final, decay)],
            [span - decay],
        )  # fmt: skip
    elif cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    else:
        raise ValueError(
            f"opt.schedule={cfg.schedule!r}; expected cosine | linear | wsd | constant"
        )
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


NO_DECAY = ("scale", "bias")  # param names weight decay never touches


def decay_mask(params):
    """True for the leaves weight decay applies to: every weight (kernels, the embedding, LoRA
    adapters, a scalar head's vector) but norm scales and biases, told apart by name, not
    shape — scanned layers stack norm scales into (L, D) and q/k/v biases are (N, H)."""

    def decays(path, _):
        last = path[-1] if path else None
        name = getattr(last, "key", getattr(last, "name", None))
        return name not in NO_DECAY

    return jax.tree_util.tree_map_with_path(decays, params)


def _muon(cfg, schedule, mu_dtype, adam):
    """Muon for the layers' matrices, `adam` (the AdamW above) for every other leaf."""
    from flaxlm.train import muon

    beta, steps = cfg.get("muon_momentum", 0.95), cfg.get("muon_ns_steps", 5)
    rms, ns_dtype = cfg.get("muon_rms", 0.2), cfg.get("muon_dtype", "float32")
    if not 0 <= beta < 1:
        raise ValueError(f"opt.muon_momentum={beta!r} must be in [0, 1)")
    if not (isinstance(steps, numbers.Integral) and steps >= 1):
        raise ValueError(f"opt.muon_ns_steps={steps!r} must be an integer >= 1")
    if not rms > 0:
        raise ValueError(f"opt.muon_rms={rms!r} must be > 0")
    if ns_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"opt.muon_dtype={ns_dtype!r}; expected float32 | bfloat16")
    matrices = optax.chain(
        muon.scale_by_muon(beta, int(steps), float(rms), mu_dtype, jnp.dtype(ns_dtype)),
        optax.add_decayed_weights(cfg.weight_decay),
        optax.scale_by_learning_rate(schedule),
    )
    return optax.multi_transform({"muon": matrices, "adam": adam}, muon.muon_labels)


def _state_dtype(cfg, key):
    """`opt.<key>` (`mu_dtype`, `nu_dtype`: a moment's dtype) as a float dtype, None for ""
    (the parameters' dtype); anything else is refused naming the key, whichever optimizer is
    named (lion and sgd used to ignore mu_dtype)."""
    value = cfg.get(key, "")
    if not value:
        return None
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None  # not a dtype name
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"opt.{key}={value!r}; expected a float dtype name such as "
            "'bfloat16' or 'float32', or '' for the parameters' dtype"
        )
    return dtype


def _nu_in(tx, nu_dtype):
    """`tx` (an AdamW) with every second moment (`optax.ScaleByAdamState.nu`) kept in
    `nu_dtype`, the gradients it reads cast up to `nu_dtype` first (a bfloat16 g² alone is
    0.4% off) and each first moment kept in the dtype it was made in (optax casts μ only when
    given a mu_dtype: a float32 gradient would otherwise turn a bfloat16 μ float32 after the
    first step, another state dtype than the checkpoint's and the jitted step's)."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731

    def adam_states(state, fn):
        return jax.tree.map(lambda s: fn(s) if is_adam(s) else s, state, is_leaf=is_adam)

    def init(params):
        recast = lambda s: s._replace(nu=jax.tree.map(lambda v: v.astype(nu_dtype), s.nu))  # noqa: E731
        return adam_states(tx.init(params), recast)

    def update(updates, state, params=None, **extra):
        up = lambda g: g.astype(jnp.promote_types(g.dtype, nu_dtype))  # noqa: E731
        updates, new = tx.update(jax.tree.map(up, updates), state, params, **extra)
        old_mu = [s.mu for s in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(s)]
        mus = iter(old_mu)

        def keep_mu(s):
            return s._replace(mu=jax.tree.map(lambda m, o: m.astype(o.dtype), s.mu, next(mus)))

        return updates, adam_states(new, keep_mu)

    return optax.GradientTransformationExtraArgs(init, update)


def clip_by_global_norm32(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm with the norm summed in float32 and each leaf scaled in float32
    (then cast back): optax sums the squares in the leaves' dtype, so with bfloat16 gradients
    1 + 0.0009 stayed 1 — one leaf of norm 1 and 300 of norm 0.03 (norm 1.127) were not clipped
    at 1.0 — and the norm kept 3 digits (the tiny model's gradients clipped to 1.0 came out
    0.3% over). Float32 leaves get optax's arithmetic exactly, and the same empty state."""

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), updates))

        def clip(t):
            scaled = ((t.astype(jnp.float32) / norm) * max_norm).astype(t.dtype)
            return jnp.where(norm < max_norm, t, scaled)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def _refuse_frozen_moments(tx, cfg, mu_dtype, nu_dtype=None):
    """`tx`, its init refusing a moment decay β that the moment's dtype cannot carry: each step
    must move m by more than two of its rounding steps (1 − β > 2·eps of the dtype), or
    β·m rounds back to m. The moments live in the weights' dtype (the momenta unless
    `opt.mu_dtype` names one, Adam's second moment unless `opt.nu_dtype` does), so bfloat16
    weights are what trips it: a bfloat16 moment replayed over 300 squared gradients of 1 then
    700 of 0.01 froze at 2.3× the float64 value at β = 0.999 (the RL configs' b2) and ran 27%
    low at 0.99; at 0.95 it is within 2%. bfloat16 allows β <= 0.984; float32 any
    β < 1 - 2.4e-7."""
    # (key, β, the opt key that sets the moment's dtype) of each decaying state kept
    moments = {
        "adamw": [("b1", cfg.b1, "mu_dtype"), ("b2", cfg.b2, "nu_dtype")],
        "muon": [("b1", cfg.b1, "mu_dtype"), ("b2", cfg.b2, "nu_dtype"),
                 ("muon_momentum", cfg.get("muon_momentum", 0.95), "mu_dtype")],
        "lion": [("b2", cfg.b2, "mu_dtype")],  # (b1 only mixes this step's sign)
        "sgd": [("b1", cfg.b1, "mu_dtype")],
    }.get(cfg.name, [])  # fmt: skip
    asked = {"mu_dtype": mu_dtype, "nu_dtype": nu_dtype}

    def init(params):
        dtypes = {jnp.dtype(x.dtype) for x in jax.tree.leaves(params)}
        for key, beta, dtype_key in moments:
            kept = {asked[dtype_key] or d for d in dtypes}
            for dtype in sorted(kept, key=str):
                if not jnp.issubdtype(dtype, jnp.floating):
                    continue
                limit = 1 - 2 * float(jnp.finfo(dtype).eps)
                if beta > limit:
                    if asked[dtype_key]:
                        where, fix = f"opt.{dtype_key}", f"set opt.{dtype_key}='float32'"
                    else:
                        where = "the weights' dtype (model.param_dtype)"
                        fix = (
                            "keep the weights in float32 (model.param_dtype='float32') or set "
                            f"opt.{dtype_key}='float32'"
                        )
                    raise ValueError(
                        f"opt.{key}={beta!r} is a decay a {dtype} moment cannot carry (β·m rounds "
                        f"back to m; it must be <= {limit:.4g} in {dtype}): that moment is kept "
                        f"in {where}; lower opt.{key}, or {fix}"
                    )
        return tx.init(params)

    return optax.GradientTransformationExtraArgs(init, tx.update)


def make_optimizer(cfg, total_steps: int, trainable_mask=None):
    """Builds (tx, schedule) from the `opt` config section.

    Args:
      cfg: the `opt` section (see `opt_config`).
      total_steps: length of the run, which the schedule decays over.
      trainable_mask: optional pytree of bools (or a function params -> pytree); False leaves
        get no update and no optimizer state (LoRA, frozen backbones).
    """
    schedule = make_schedule(cfg, total_steps)
    name = cfg.name
    mu_dtype = _state_dtype(cfg, "mu_dtype")
    nu_dtype = _state_dtype(cfg, "nu_dtype")
    if nu_dtype is not None and name not in ("adamw", "muon"):
        raise ValueError(
            f"opt.nu_dtype={cfg.nu_dtype!r}: {name} keeps no Adam second moment (adamw and "
            f"muon's AdamW do); set opt.nu_dtype='' with opt.name={name!r}"
        )
    if name in ("adamw", "muon"):
        base = optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            mu_dtype=mu_dtype,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
        if nu_dtype is not None:
            base = _nu_in(base, nu_dtype)
        if name == "muon":
            base = _muon(cfg, schedule, mu_dtype, adam=base)
    elif name == "lion":
        base = optax.lion(
            schedule, b1=cfg.b1, b2=cfg.b2, mu_dtype=mu_dtype, weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )  # fmt: skip
    elif name == "adafactor":
        if mu_dtype is not None:
            raise ValueError(
                f"opt.mu_dtype={cfg.mu_dtype!r}: adafactor keeps no first moment (its factored "
                "second moment stays float32); set opt.mu_dtype='' with opt.name='adafactor'"
            )
        # optax.adafactor's own `weight_decay_rate` adds decay·param after its lr scaling, so
        # the decay ignored the schedule (weights shrank by weight_decay a step at lr 0). Its
        # update without the lr, sign flipped back, then the AdamW tail: decay on the masked
        # leaves, and both scaled by the schedule — lr(t)·weight_decay, as adamw/lion/muon.
        base = optax.chain(
            optax.adafactor(learning_rate=None),
            optax.scale(-1.0),
            optax.add_decayed_weights(cfg.weight_decay, decay_mask),
            optax.scale_by_learning_rate(schedule),
        )
    elif name == "sgd":
        base = optax.chain(
            optax.add_decayed_weights(cfg.weight_decay, decay_mask),
            optax.sgd(schedule, momentum=cfg.b1, accumulator_dtype=mu_dtype),
        )
    else:
        raise ValueError(f"opt.name={name!r}; expected adamw | lion | adafactor | sgd | muon")
    base = _refuse_frozen_moments(base, cfg, mu_dtype, nu_dtype)
    parts = [clip_by_global_norm32(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    tx = optax.chain(*parts, base)
    if trainable_mask is not None:

        def labels(params):
            mask = trainable_mask(params) if callable(trainable_mask) else trainable_mask
            return jax.tree.map(lambda t: "train" if t else "freeze", mask)

        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    return tx, schedule
