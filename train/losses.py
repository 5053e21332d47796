"""Token-level losses shared by pretraining and every alignment task.

A loss function has the signature `loss_fn(params, batch, rng) -> (loss, metrics)`, where
`metrics["weight"]` (when present) is the loss's denominator — the number of target tokens —
so gradient accumulation and evaluation can weight micro-batches exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def masked_mean(x, mask, axis=None):
    """Mean of x over entries where mask is set (0 where the mask is empty)."""
    mask = mask.astype(jnp.float32)
    total = jnp.sum(x * mask, axis=axis)
    return total / jnp.maximum(jnp.sum(mask, axis=axis), 1e-8)


def token_logprobs(logits_BTV, targets_BT):
    """log p(target) per token, (B, T), computed in float32."""
    logits = logits_BTV.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    return picked - lse


def cross_entropy(logits_BTV, targets_BT, mask_BT, z_loss: float = 0.0):
    """Masked next-token cross-entropy (mean over target tokens) with optional z-loss.

    z-loss (PaLM) adds z_loss·log²Z per token and keeps the softmax normaliser near 1, which
    stabilises bf16 training; it is reported separately.

    Returns: (loss, metrics) with metrics `nll`, `z_loss`, `accuracy`, `weight`.
    """
    logits = logits_BTV.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    nll = lse - picked
    mask = mask_BT.astype(jnp.float32)
    weight = jnp.sum(mask)
    denom = jnp.maximum(weight, 1.0)
    nll_mean = jnp.sum(nll * mask) / denom
    z = jnp.sum(jnp.square(lse) * mask) / denom
    loss = nll_mean + z_loss * z
    correct = (jnp.argmax(logits, axis=-1) == targets_BT).astype(jnp.float32)
    metrics = {
        "nll": nll_mean,
        "z_loss": z,
        "accuracy": jnp.sum(correct * mask) / denom,
        "weight": weight,
    }
    return loss, metrics


def lm_loss_fn(apply_fn: Callable, z_loss: float = 0.0):
    """Next-token loss over a packed batch: the pretraining and SFT loss.

    `apply_fn(params, tokens, positions, segment_ids) -> logits`. SFT differs from pretraining
    only in `loss_mask` (answers only), which the data path sets.
    """

    def loss_fn(params, batch, rng):
        del rng  # deterministic model (no dropout)
        # Rows without segment ids hold one unpadded document each: the attention kernels then
        # run in their plain causal mode (cuDNN's fastest path).
        logits = apply_fn(params, batch["tokens"], batch.get("positions"), batch.get("segment_ids"))
        return cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss)

    return loss_fn
