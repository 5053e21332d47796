"""GRPO's advantages and loss (pure functions; tests check them against the formulas).

`group_advantages` (GRPO, Dr. GRPO, RLOO baselines), `overlong_penalty` (DAPO), `aggregate`
(`grpo.loss_agg`: "seq", "token" or "constant"), `grpo_loss` (the clipped objective with a
k3 KL to the reference; token or GSPO sequence importance ratios) and `grpo_loss_fn`, the loss
the shared step trains. The objective is written out in alignment/grpo.py's docstring.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from flaxlm.alignment.rl_rollout import entropy, kl_penalty, passthrough_stats, tempered
from flaxlm.train.losses import add_router_losses, masked_mean, router_forward, token_logprobs

STD_SCOPES = ("group", "batch")  # grpo.std_scope: `group_advantages`'


def group_advantages(rewards, valid=None, *, scale_by_std: bool = True, eps: float = 1e-4,
                     baseline: str = "mean", std_scope: str = "group"):  # fmt: skip
    """Group-normalised advantages of (P, G) rewards (G samples of each of P prompts).

    A_i = (r_i − mean_g) / (std_g + ε) over the group's valid samples (population std); with
    `scale_by_std=False`, A_i = r_i − mean_g. Invalid samples get 0 and no say in the stats.
    `baseline="loo"` subtracts the mean of the group's *other* valid rewards instead (RLOO,
    Ahmadian et al. 2024): r_i − (Σ_{j≠i} r_j)/(n − 1) = n/(n − 1)·(r_i − mean_g) for n valid
    samples (0 when n < 2), unbiased because the baseline does not depend on sample i.
    `std_scope="batch"` divides by the std of every valid sample's baselined reward in the
    whole batch instead of its group's (REINFORCE++-baseline, Hu et al. 2025: a group whose
    rewards barely differ is not blown up to unit scale, and every group's advantages share
    one scale).
    """
    if baseline not in ("mean", "loo"):
        raise ValueError(f"grpo.baseline={baseline!r}; expected mean | loo")
    if std_scope not in STD_SCOPES:
        raise ValueError(f"grpo.std_scope={std_scope!r}; expected one of {STD_SCOPES}")
    r = np.asarray(rewards, np.float64)
    v = np.ones_like(r, bool) if valid is None else np.asarray(valid, bool)
    n = np.maximum(v.sum(1, keepdims=True), 1)
    mean = np.where(v, r, 0.0).sum(1, keepdims=True) / n
    std = np.sqrt(np.where(v, np.square(r - mean), 0.0).sum(1, keepdims=True) / n)
    adv = r - mean
    if baseline == "loo":
        adv = np.where(n > 1, adv * n / np.maximum(n - 1, 1), 0.0)
    if scale_by_std and std_scope == "batch":
        spread = adv[v]  # (the baselined rewards of every valid sample: their mean is ~0)
        adv = adv / ((spread.std() if spread.size else 0.0) + eps)
    elif scale_by_std:
        adv = adv / (std + eps)
    return np.where(v, adv, 0.0).astype(np.float32)


def overlong_penalty(lengths, max_new_tokens: int, buffer: int) -> np.ndarray:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) per response of `lengths`
    tokens: 0 up to max_new_tokens − buffer, then falling linearly to −1 at max_new_tokens
    ((max − buffer − length) / buffer); `buffer` 0 = off."""
    n = np.asarray(lengths, np.float64)
    if buffer <= 0:
        return np.zeros(n.shape, np.float32)
    start = max_new_tokens - buffer
    return np.clip((start - n) / buffer, -1.0, 0.0).astype(np.float32)


LOSS_AGGS = ("seq", "token", "constant")  # grpo.loss_agg: `aggregate`'s


def aggregate(x, mask, agg: str, row_length: int | None = None):
    """(mean, weight) of per-token values `x` (B, T) over `mask` by `grpo.loss_agg`: "seq" the
    mean over responses of each response's token mean (weight: responses with a token),
    "token" the mean over all tokens (weight: tokens), "constant" the sum over all tokens
    divided by rows × `row_length` (weight: rows) — Dr. GRPO's constant normaliser in place of
    1/|o_i|, so a long response's tokens weigh what a short one's do. `row_length` is the run's
    `seq_len`, not T: the rollout cuts each minibatch to the width its longest row needs
    (`rollout.trim_buckets`), and dividing by that width scaled a minibatch of short answers'
    loss and gradient up to 3× (the length bias the constant is there to remove); None: T.
    The loss and every per-token metric use it, so a metric means the same with any
    `grad_accum` (the step weighs micro-batches by `weight`)."""
    if agg == "seq":
        n = jnp.sum(mask, axis=1)
        has = (n > 0).astype(jnp.float32)
        per_seq = jnp.sum(x * mask, axis=1) / jnp.maximum(n, 1.0)
        return jnp.sum(per_seq * has) / jnp.maximum(jnp.sum(has), 1.0), jnp.sum(has)
    if agg == "token":
        return masked_mean(x, mask), jnp.sum(mask)
    if agg == "constant":
        rows, width = mask.shape
        length = width if row_length is None else row_length
        return jnp.sum(x * mask) / (rows * length), jnp.asarray(rows, jnp.float32)
    raise ValueError(f"grpo.loss_agg={agg!r}; expected one of {LOSS_AGGS}")


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, clip, beta, agg="seq",
              clip_high=0.0, importance="token", row_length=None):  # fmt: skip
    """(loss, metrics) of the clipped group-relative objective (module docstring); the metrics
    (pg_loss + beta·kl = loss, clipfrac) are aggregated like the loss (`aggregate`).

    logp, old_logp, ref_logp, mask: (B, T); advantages: (B,) per sequence. The ratio is
    clipped to [1 − clip, 1 + clip_high] (clip_high 0: 1 + clip). `importance` "sequence"
    (GSPO) uses each response's length-normalised sequence ratio exp(mean_t log π/π_old) for
    all its tokens instead of the per-token ratio. `row_length`: "constant"'s (`aggregate`).
    """
    a = advantages[:, None]
    high = clip_high or clip
    # Masked positions (prompt, padding, invalid rows) must add nothing to the loss or its
    # gradient. Multiplying by the mask afterwards does not do that: a masked log-ratio of
    # ~90 nats overflows exp to inf, and inf·0 is NaN. So the inputs are zeroed first.
    on = mask > 0
    logp, old_logp, ref_logp = (jnp.where(on, x, 0.0) for x in (logp, old_logp, ref_logp))
    log_ratio = logp - old_logp
    if importance == "sequence":
        n = jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)
        log_ratio = jnp.broadcast_to(jnp.sum(log_ratio * mask, axis=1, keepdims=True) / n,
                                     logp.shape)  # fmt: skip
    elif importance != "token":
        raise ValueError(f"grpo.importance={importance!r}; expected token | sequence")
    ratio = jnp.exp(log_ratio)
    pg = -jnp.minimum(ratio * a, jnp.clip(ratio, 1 - clip, 1 + high) * a)
    kl = kl_penalty(logp, ref_logp, "k3")
    loss, weight = aggregate(pg + beta * kl, mask, agg, row_length)
    clipped = ((ratio < 1 - clip) | (ratio > 1 + high)).astype(jnp.float32)
    metrics = {
        "pg_loss": aggregate(pg, mask, agg, row_length)[0],
        "kl": aggregate(kl, mask, agg, row_length)[0],
        "clipfrac": aggregate(clipped, mask, agg, row_length)[0],
        "weight": weight,
    }
    return loss, metrics


def grpo_loss_fn(apply, g, temperature: float = 1.0, router: tuple | None = None,
                 row_length: int | None = None):  # fmt: skip
    """`grpo_loss` over a rollout minibatch, with the policy's logprobs and entropy at
    `temperature` (the rollout's, `scoring_temperature`); `row_length` (the run's seq_len) is
    `loss_agg="constant"`'s divisor, whatever width the minibatch was cut to. `router`
    (train/losses.py `router_coefs`: a mixture-of-experts policy) adds the router losses of
    this forward pass (the one with gradient; the rollout's scoring passes have none) and
    logs `moe/*`."""

    def loss_fn(params, batch, rng):
        del rng
        args = (params, batch["tokens"], batch["positions"], batch["segment_ids"])
        logits, stats = router_forward(apply, router, *args)
        logits = tempered(logits, temperature)
        logp = token_logprobs(logits, batch["targets"])
        loss, metrics = grpo_loss(
            logp, batch["old_logprobs"], batch["ref_logprobs"], batch["advantages"],
            batch["loss_mask"], clip=g.clip, beta=g.beta, agg=g.loss_agg,
            clip_high=g.get("clip_high", 0.0), importance=g.get("importance", "token"),
            row_length=row_length,
        )  # fmt: skip
        metrics["entropy"] = aggregate(entropy(logits), batch["loss_mask"], g.loss_agg,
                                       row_length)[0]  # fmt: skip
        return add_router_losses(loss, {**metrics, **passthrough_stats(batch)}, stats, router)

    return loss_fn
