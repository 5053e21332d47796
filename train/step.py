"""The pure train and eval steps every task shares, and their jitted, sharded wrappers.

`train_step(state, batch, *, loss_fn, tx, schedule, guard, grad_accum)` is a module-level pure
function (tests call it directly). It

  1. computes loss and gradients, scanning over `grad_accum` micro-batches and weighting each by
     its target count (`metrics["weight"]`), so accumulation equals one big batch exactly for a
     loss that is a mean over target tokens — except a mixture of experts' router terms
     (`loss_and_grads`). Metrics that are not means over those targets say how to combine
     (`finish_metrics`: counts, and means over a group of the batch's rows of their own);
  2. applies the optimizer;
  3. runs the trouble guard: if the loss, the gradient norm or the update is NaN/Inf, or the
     loss is a spike (far above the running mean of recent accepted losses), the update is
     discarded — params and optimizer state stay as they were — and counted in `state.guard`
     (a finite gradient can still give a non-finite update: optimizer state overflowing, a
     float16 moment);
  4. with an EmaTrainState (config `ema.decay` > 0), moves the EMA of the weights towards the new
     params (train/ema.py); a discarded update leaves the EMA and its count as they were.

Every held-out eval runs through `eval_step` (loss metrics; `jit_eval_step`) or `eval_rows`
(per-row outputs that an eval combines over its whole held-out set: DPO's, KTO's, the reward
model's; `jit_eval_rows`), in the run's `grad_accum` micro-batches as the train step splits
them: over the whole batch at once, a run that needs grad_accum to fit could run out of memory
in the eval at step 0. `eval_step` combines the micro-batches with the train step's own code
(`_micro_mean`), so its metrics are the whole batch's as the train step's are.

A task whose loss reads a frozen model (distillation's teacher: `loop.Task.frozen`) gets its
weights as an argument of the jitted step (`jit_train_step(..., frozen=True)`, then
`step(state, batch, frozen)`) and its loss as `loss_fn(params, batch, rng, frozen)`: a closure
over them would embed the whole model in the program as constants.

The loop reads `guard["bad_in_row"]` when it logs and rolls back to the last checkpoint after too
many bad steps in a row.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from flaxlm.config_values import is_int, is_real
from flaxlm.train import ema as ema_lib
from flaxlm.train.state import EmaTrainState, TrainState


def guard_config() -> ml_collections.ConfigDict:
    """Defaults of the `guard` section: what counts as a bad step and what happens then."""
    c = ml_collections.ConfigDict()
    c.skip_nonfinite = True  # discard updates whose loss, gradient norm or update is NaN/Inf
    c.spike_zscore = 0.0  # discard updates with loss > mean + z·std of recent losses (0 = off)
    c.spike_min_rel = 0.1  # ...and loss > (1 + this)·mean, so tiny variance cannot trigger it
    c.ema_decay = 0.98  # decay of the running loss mean/variance (≈ a 50-step window)
    # accepted steps before spike detection starts (at least 2); the mean/variance restart a
    # fifth of it (at least 5 steps) before, so the early descent is not in them
    c.warmup_steps = 50
    # Roll back to the last checkpoint when this many bad steps in a row are seen at a log step
    # (the loop checks every log_every steps): a streak a good step ends before then is only
    # skipped, not rolled back. 0 = never roll back (bad steps are only skipped).
    c.max_bad_in_row = 5
    # Stop with an error (checkpoints left as they are) instead of rolling back again when this
    # many rollbacks in a row got no further than the step that triggered the one before:
    # bad batches that never end (a broken data shard) would otherwise roll back for ever.
    # 0 = no limit.
    c.max_rollbacks = 3
    return c


def check_guard(cfg) -> None:
    """Refuses, naming the key, a `guard` setting the guard cannot mean. ema_decay=1 made the
    loss statistics' weight (1 − d)/(1 − d^k) 0/0: a NaN mean, and no loss ever counted as a
    spike, silently; a negative threshold, warmup or count was read as 0 or as "off",
    silently. loop.run checks before anything is built, train_step when it is traced."""
    checks = {
        "skip_nonfinite": (lambda x: isinstance(x, bool), "True or False"),
        "spike_zscore": (lambda x: is_real(x) and x >= 0, "a number >= 0 (0 = off)"),
        "spike_min_rel": (lambda x: is_real(x) and x >= 0, "a number >= 0"),
        "ema_decay": (lambda x: is_real(x) and 0 <= x < 1, "a number in [0, 1)"),
        "warmup_steps": (lambda x: is_int(x) and x >= 0, "an integer >= 0"),
        "max_bad_in_row": (lambda x: is_int(x) and x >= 0, "an integer >= 0 (0 = never roll back)"),
        "max_rollbacks": (lambda x: is_int(x) and x >= 0, "an integer >= 0 (0 = no limit)"),
    }
    for key, (ok, what) in checks.items():
        if key in cfg and not ok(cfg[key]):
            raise ValueError(f"guard.{key}={cfg[key]!r} must be {what}")


def _split_micro(batch, n: int):
    """(B, ...) leaves -> (n, B/n, ...): micro-batch k holds rows k, k + n, k + 2n, ...

    Strided, not contiguous: the batch arrives sharded over data×fsdp in contiguous blocks of
    rows, so a strided split gives every device an equal share of each micro-batch from the
    rows it already holds (when B/n is a multiple of data×fsdp), and the accumulation loop
    needs no collective but the gradients' all-reduce. Contiguous micro-batches (rows
    [kB/n, (k+1)B/n)) each sit on 1/n of the devices, so XLA moves batch rows and activations
    between devices on every micro-step (the tiny model data-parallel on 8 devices,
    grad_accum=2: 16 collective-permutes and 9 all-gathers, against none strided;
    tests/train/test_equivalence.py checks it). Which rows share a micro-batch does not change
    the result: the micro-batches are weighted into one average over the whole batch.
    """

    def split(x):
        if x.shape[0] % n:
            raise ValueError(
                f"opt.grad_accum={n} does not divide the batch of {x.shape[0]} rows "
                "(batch_size): each micro-batch must hold batch_size / opt.grad_accum rows"
            )
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


SUMS = "sums"  # metrics key: {name: value} summed over the micro-batches (counts)
RATIOS = "ratios"  # metrics key: {name: (numerators (G,), denominators (G,))}, see finish_metrics


def finish_metrics(metrics: dict) -> dict:
    """A loss's metrics as logged: its reserved entries resolved into plain metrics.

    Every plain metric is combined over micro-batches weighted by `metrics["weight"]`, right for
    a mean over the loss's own items. Two entries say otherwise (each optional):

      * SUMS {name: value}: a count, summed over the micro-batches;
      * RATIOS {name: (numerators (G,), denominators (G,))}: Σ_g numerator_g / denominator_g
        over the whole batch (a term with denominator 0 adds 0), the micro-batches adding their
        numerators and denominators — a mean over a group of rows of its own (G = 1: KTO's
        rewards of its desirable examples), or a difference of two (G = 2, one numerator
        negated: their margin). Weighted by `weight`, a micro-batch without such rows would
        pull the mean towards 0.

    `loss_and_grads` and `eval_step` call it on what they return; a caller of a loss function
    itself calls it on the metrics (one batch: the ratios of its own sums)."""
    out = {k: v for k, v in metrics.items() if k not in (SUMS, RATIOS)}
    out.update(metrics.get(SUMS, {}))
    for name, (num, den) in metrics.get(RATIOS, {}).items():
        num, den = jnp.asarray(num, jnp.float32), jnp.asarray(den, jnp.float32)
        out[name] = jnp.sum(jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0))
    return out


def _accumulate(acc, metrics, scale):
    return jax.tree.map(lambda a, m: a + scale * m, acc, metrics)


def _micro_mean(fn: Callable, xs):
    """(loss, metrics, extra) of `fn` over the micro-batches `xs` (leaves (n, ...)), one
    `lax.scan`: `fn(x) -> (loss, metrics, extra)` for micro-batch x, each weighted by its
    `metrics["weight"]` (1 without one) into a mean over the whole batch — the loss, the plain
    metrics and `extra` (a pytree: the gradients, or nothing) — while SUMS and RATIOS add up
    (`finish_metrics`, applied here; "weight" is then the total). The one way micro-batches
    are combined, for training (`loss_and_grads`) and evaluation (`eval_step`) alike."""

    def body(carry, x):
        loss, metrics, extra = fn(x)
        w = metrics.get("weight", jnp.ones((), jnp.float32))
        acc_l, acc_m, acc_plain, acc_e, acc_w = carry
        acc_e = jax.tree.map(lambda a, e: a + w * e, acc_e, extra)
        # sums and ratios' numerators and denominators add up; the rest is weighted by w
        acc_m = {k: _accumulate(acc_m[k], v, 1.0 if k in (SUMS, RATIOS) else w)
                 for k, v in metrics.items()}  # fmt: skip
        acc_plain = _accumulate(acc_plain, _plain(metrics), 1.0)
        return (acc_l + w * loss, acc_m, acc_plain, acc_e, acc_w + w), None

    shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], xs))
    _, zeros_m, zeros_e = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    zero = jnp.zeros((), jnp.float32)
    carry = (zero, zeros_m, _plain(zeros_m), zeros_e, zero)
    (loss, metrics, plain, extra, w), _ = jax.lax.scan(body, carry, xs)
    # A batch whose every micro-batch weighs 0 (all pairs tied, every response truncated under
    # mask_truncated) has no weighted mean: its metrics are the micro-batches' plain mean, as
    # one micro-batch logs them (the rollout/* statistics read 0 where grad_accum > 1).
    n = jax.tree.leaves(xs)[0].shape[0]
    nothing = w <= 0
    w = jnp.maximum(w, 1e-8)
    metrics = {k: v if k in (SUMS, RATIOS)
               else jax.tree.map(lambda m, p: jnp.where(nothing, p / n, m / w), v, plain[k])
               for k, v in metrics.items()}  # fmt: skip
    if "weight" in metrics:
        metrics["weight"] = w
    return loss / w, finish_metrics(metrics), jax.tree.map(lambda e: e / w, extra)


def _plain(metrics: dict) -> dict:
    """The metrics a micro-batch's weight averages (not SUMS or RATIOS)."""
    return {k: v for k, v in metrics.items() if k not in (SUMS, RATIOS)}


def _micro_rngs(rng, n: int):
    """One key per micro-batch (None: the loss takes none)."""
    return None if rng is None else jax.random.split(rng, n)


def loss_and_grads(params, batch, rng, loss_fn: Callable, grad_accum: int = 1, trainable_mask=None):
    """(loss, metrics, grads), averaged over micro-batches weighted by metrics['weight'].

    For a mean over target tokens (the cross-entropy, its z-loss) that is the whole batch's
    value exactly; so are the counts and group means a loss declares (`finish_metrics`). Not
    for a mixture of experts' load-balancing term `loss.moe_aux`·E·Σ_e f_e·P_e: a product of
    two batch means (f_e: share of assignments routed to expert e, P_e: its mean router
    probability), which each micro-batch computes from its own f and P (transformers'
    MoE models likewise take it per forward pass); the step averages those. Exact accumulation
    would need the whole batch's f_e before any micro-batch's backward (a second routing pass,
    or a gradient tree per expert and layer). The difference grows as micro-batches get smaller:
    a one-layer tiny model with 2 micro-batches of 32 tokens logged `moe/load_balance` 1.021
    against the full batch's 1.003 and, at `moe_aux=0.01`, its router kernel's gradient was
    76% off (relative norm), the weights under the router's input 0.2-6%, the experts and
    the LM head exact; the tiny model, 256 tokens in 2 micro-batches, ended one AdamW step
    with weights up to 6e-3 apart. The router z-loss (`loss.moe_z`) and the `moe/...` statistics
    are per-micro-batch means over valid tokens, weighted by target counts: exact when those
    are proportional (pretraining), not when a loss mask leaves prompts out (SFT).
    tests/train/test_train_reference.py `test_grad_accum_with_experts_averages_micro_batches`
    pins this.

    `trainable_mask` (a pytree of bools like `params`, or a function params -> one; None = all
    train): frozen leaves (LoRA's base weights, which the model reads through stop_gradient) get
    no float32 accumulator over the micro-batches — for a 7B LoRA run that buffer was ~28 GB of
    zeros — and come back as zeros.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        (loss, metrics), grads = grad_fn(params, batch, rng)
        return loss, finish_metrics(metrics), grads

    micro = _split_micro(batch, grad_accum)
    leaves, treedef = jax.tree.flatten(params)
    if trainable_mask is None:
        train = [True] * len(leaves)
    else:
        mask = trainable_mask(params) if callable(trainable_mask) else trainable_mask
        train = [bool(t) for t in treedef.flatten_up_to(mask)]
    trained = lambda tree: [x for x, t in zip(treedef.flatten_up_to(tree), train) if t]  # noqa: E731

    def micro_step(xs):  # (the trained leaves' gradients in float32: the accumulators' type)
        (loss, metrics), grads = grad_fn(params, *xs)
        return loss, metrics, [g.astype(jnp.float32) for g in trained(grads)]

    loss, metrics, g = _micro_mean(micro_step, (micro, _micro_rngs(rng, grad_accum)))
    acc = iter(g)
    grads = treedef.unflatten(
        [next(acc).astype(p.dtype) if t else jnp.zeros_like(p) for p, t in zip(leaves, train)]
    )
    return loss, metrics, grads


def _restart_at(warmup_steps: int) -> int:
    """The count of accepted steps at which the spike statistics restart: a fifth of the warmup
    (at least 5 steps) before detection starts, so that detection starts from the level and
    spread of the losses just before it. Kept from step 1, they carried the steep early descent
    (a mean far above the loss, a std of its whole fall) long past the warmup: a 5x spike at
    step 71 of a 50-step warmup passed."""
    return max(warmup_steps - max(warmup_steps // 5, 5), 0)


def _all_finite(tree) -> jax.Array:
    """True when no element of `tree` is NaN/Inf: one fused reduction per leaf, inside the step
    (no host sync). Not the update's norm, whose squares overflow float32 for finite updates."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.ones((), bool)


def _guard_verdict(guard: dict, loss, grad_norm, cfg, updates=None) -> jax.Array:
    """True when the update should be applied. `updates` (the optimizer's output): a finite
    gradient can give a non-finite update (optimizer state overflowing, a float16 moment),
    which would poison the params for good."""
    ok = jnp.ones((), bool)
    if cfg.skip_nonfinite:
        ok &= jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if updates is not None:
            ok &= _all_finite(updates)
    if cfg.spike_zscore > 0:
        mean, std = guard["loss_mean"], jnp.sqrt(guard["loss_var"])
        spike = (
            # (at least 2 losses: with warmup_steps=0 the empty statistics, mean 0, used to
            # call the first step a spike, and every later one, for ever)
            (guard["n_accepted"] >= max(cfg.warmup_steps, 2))
            & (loss > mean + cfg.spike_zscore * std)
            & (loss > (1.0 + cfg.spike_min_rel) * mean)
        )
        ok &= ~spike
    return ok


def _update_guard(guard: dict, loss, ok, cfg) -> dict:
    """The guard's counters after a step, and its loss statistics after an accepted one: a
    mean and variance over the accepted losses since the last restart (`_restart_at`: at the
    start, and again shortly before the warmup ends), exponentially weighted (`ema_decay`) and
    bias-corrected as Adam's moments are — the k-th loss since the restart gets the weight
    (1 − d)/(1 − d^k), the variance being the weighted variance about the weighted mean — so
    that right after a restart they average the few losses seen so far equally, not mostly the
    first, and then forget at the EMA's rate (≈ a 50-step window).
    The state's layout is unchanged: a checkpoint saved before the restart existed resumes
    with its statistics as they were, which then forget its early losses at that rate."""
    n = guard["n_accepted"]
    start = _restart_at(cfg.warmup_steps)
    k = jnp.where(n >= start, n - start, n) + 1  # losses in the statistics, this one included
    decay = jnp.float32(cfg.ema_decay)
    first = k == 1
    w = jnp.where(first, 1.0, (1 - decay) / (1 - jnp.power(decay, k.astype(jnp.float32))))
    dev = loss - guard["loss_mean"]
    mean = jnp.where(first, loss, guard["loss_mean"] + w * dev)
    # West's weighted update: the new loss also moves the mean the older deviations are taken
    # from, hence the (1 − w) on its term too ((1 − w)·var + w·dev² ran 1/(1 − w) high: twice
    # the variance of the first two losses, 2% high for good at decay 0.98).
    var = jnp.where(first, 0.0, (1 - w) * (guard["loss_var"] + w * jnp.square(dev)))
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    return {
        "loss_mean": keep(mean, guard["loss_mean"]),
        "loss_var": keep(var, guard["loss_var"]),
        "n_accepted": guard["n_accepted"] + ok.astype(jnp.int32),
        "n_skipped": guard["n_skipped"] + (~ok).astype(jnp.int32),
        "bad_in_row": jnp.where(ok, 0, guard["bad_in_row"] + 1),
    }


def _norm32(tree) -> jax.Array:
    """The global L2 norm in float32: optax.tree.norm sums in the leaves' dtype, so bfloat16
    weights and gradients logged ~3 digits (param_norm 19.125 for six steps while the float32
    run's grew 19.046 -> 19.103). XLA fuses the casts into the reductions."""
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def train_step(
    state: TrainState,
    batch: dict,
    *,
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    schedule: Callable,
    guard,
    grad_accum: int = 1,
    trainable_mask=None,
    ema_decay: float = 0.0,
    ema_warmup: bool = True,
) -> tuple[TrainState, dict]:
    """One optimizer step (see the module docstring). Returns (new_state, metrics).

    `ema_decay` and `ema_warmup` apply to an EmaTrainState (which must have a decay > 0)."""
    check_guard(guard)  # (at trace time: Python values)
    rng = jax.random.fold_in(state.rng, state.step)
    loss, metrics, grads = loss_and_grads(
        state.params, batch, rng, loss_fn, grad_accum, trainable_mask
    )
    grad_norm = _norm32(grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)

    ok = _guard_verdict(state.guard, loss, grad_norm, guard, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt_state, state.opt_state),
        guard=_update_guard(state.guard, loss, ok, guard),
    )
    extra = {}
    if isinstance(state, EmaTrainState):
        if not ema_decay > 0:
            raise ValueError(f"an EmaTrainState needs ema_decay > 0, got {ema_decay!r}")
        decay = ema_lib.decay_at(state.ema_count, ema_decay, ema_warmup)
        new_state = new_state.replace(
            ema=keep(ema_lib.update(state.ema, new_state.params, decay), state.ema),
            ema_count=state.ema_count + ok.astype(jnp.int32),
        )
        extra["ema_decay"] = decay  # the decay this step used (warmup), applied or not
    metrics = {
        **metrics,
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": _norm32(new_state.params),
        # The lr this update used: the optimizer's schedule counts applied updates, and a
        # skipped step leaves its count (in opt_state) behind state.step.
        "lr": schedule(state.step - state.guard["n_skipped"]),
        "skipped": (~ok).astype(jnp.float32),
        "bad_in_row": new_state.guard["bad_in_row"],
        **extra,
    }
    return new_state, metrics


def eval_step(params, batch, rng, *, loss_fn: Callable, grad_accum: int = 1) -> dict:
    """Loss metrics of one batch, without an update: in `grad_accum` micro-batches (the train
    step's split, `_split_micro`), combined as `loss_and_grads` combines them (`_micro_mean`),
    so they are the whole batch's (to float rounding) — except, as in training, what a loss
    computes per micro-batch (a mixture of experts' router terms). The memory is a
    micro-batch's forward (its float32 logits), not the whole batch's, which a run that needs
    grad_accum to fit its train step may not have: every held-out eval runs through here."""
    if grad_accum == 1:
        loss, metrics = loss_fn(params, batch, rng)
        return {**finish_metrics(metrics), "loss": loss}

    def micro_step(xs):
        loss, metrics = loss_fn(params, *xs)
        return loss, metrics, ()

    micro = _split_micro(batch, grad_accum)
    loss, metrics, _ = _micro_mean(micro_step, (micro, _micro_rngs(rng, grad_accum)))
    return {**metrics, "loss": loss}


def _join_micro(x):
    """(n, B/n, ...) -> (B, ...) in the batch's row order: `_split_micro` undone (row j of
    micro-batch k is row j·n + k)."""
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def eval_rows(params, batch, *, rows_fn: Callable, grad_accum: int = 1):
    """`rows_fn(params, batch)`'s per-row outputs (a pytree of (B, ...) arrays: a pair's
    sequence log-probabilities, a reward) in `grad_accum` micro-batches, back in the batch's
    row order: for the evals that combine rows on the host (over the whole held-out set:
    DPO's, KTO's, the reward model's), the memory of `eval_step`'s micro-batch. Each row's
    outputs are its own, so they do not depend on the split."""
    if grad_accum == 1:
        return rows_fn(params, batch)
    out = jax.lax.map(lambda mb: rows_fn(params, mb), _split_micro(batch, grad_accum))
    return jax.tree.map(_join_micro, out)


def with_frozen(loss_fn: Callable, frozen) -> Callable:
    """`loss_fn(params, batch, rng, frozen)` as the steps' (params, batch, rng) loss."""
    return lambda params, batch, rng: loss_fn(params, batch, rng, frozen)


def jit_train_step(
    loss_fn, tx, schedule, guard, grad_accum, state_shardings, mesh, trainable_mask=None,
    ema_decay: float = 0.0, ema_warmup: bool = True, frozen: bool = False,
):  # fmt: skip
    """The jitted step: state sharded as given and donated, batch as it arrives, metrics
    replicated. The loss function, optimizer and config are closed over (never hashed).
    `frozen=True`: the step is `(state, batch, frozen)` and the loss
    `loss_fn(params, batch, rng, frozen)`; the frozen arrays keep their own shardings."""
    kw = dict(
        tx=tx,
        schedule=schedule,
        guard=guard,
        grad_accum=grad_accum,
        trainable_mask=trainable_mask,
        ema_decay=ema_decay,
        ema_warmup=ema_warmup,
    )
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = functools.partial(train_step, loss_fn=loss_fn, **kw)
    if frozen:

        def step(state, batch, frozen):
            return train_step(state, batch, loss_fn=with_frozen(loss_fn, frozen), **kw)

    return jax.jit(
        step,
        in_shardings=(state_shardings, None, None) if frozen else (state_shardings, None),
        out_shardings=(state_shardings, rep),
        donate_argnums=(0,),
    )


def jit_eval_step(loss_fn, grad_accum: int = 1, frozen: bool = False):
    """The jitted held-out step (`eval_step`, in `grad_accum` micro-batches): (params, batch)
    -> its metrics; `frozen=True` (`loop.Task.frozen`, as `jit_train_step`): (params, batch,
    frozen) with the loss `loss_fn(params, batch, rng, frozen)`, the frozen weights an argument
    of the program, not its constants. Held-out losses take no rng."""
    if frozen:
        return jax.jit(lambda p, b, f: eval_step(p, b, None, loss_fn=with_frozen(loss_fn, f),
                                                 grad_accum=grad_accum))  # fmt: skip
    return jax.jit(lambda p, b: eval_step(p, b, None, loss_fn=loss_fn, grad_accum=grad_accum))


def jit_eval_rows(rows_fn, grad_accum: int = 1):
    """The jitted per-row held-out pass (`eval_rows`): (params, batch) -> `rows_fn`'s outputs."""
    return jax.jit(lambda p, b: eval_rows(p, b, rows_fn=rows_fn, grad_accum=grad_accum))
