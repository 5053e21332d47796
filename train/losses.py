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
    sums = _token_sums(logits_BTV, targets_BT, mask_BT)
    return _loss_and_metrics(sums, jnp.sum(mask_BT.astype(jnp.float32)), z_loss)


@jax.custom_vjp
def _token_sums(logits_BTV, targets_BT, mask_BT):
    """Masked sums over tokens: (Σ nll, Σ log²Z, Σ correct), float32 — what both the full and
    the chunked cross-entropy add up.

    Its gradient is written out (`_token_sums_bwd`) rather than derived by autodiff, which
    builds it from float32 pieces — the softmax, a scattered one-hot, their sum, then a cast —
    each a full (B, T, V) array in memory. Written out it is one elementwise pass from the
    logits in their own dtype to the gradient in that dtype: compiled for the H200
    (bench/gpu_aot.py) the 1.1B step moves ~9 GB less per step and keeps no float32 logits.
    """
    return _token_sums_fwd(logits_BTV, targets_BT, mask_BT)[0]


def _token_sums_fwd(logits_BTV, targets_BT, mask_BT):
    logits = logits_BTV.astype(jnp.float32)
    top = jnp.max(logits, axis=-1)
    lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
    picked = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    mask = mask_BT.astype(jnp.float32)
    # Correct = the target's logit is the largest (argmax up to exact ties), from the max the
    # normaliser needs anyway: no third pass over the (B, T, V) logits.
    correct = (picked >= top).astype(jnp.float32)
    # Masked-out tokens count for nothing even when their value is not finite — a target
    # outside the vocabulary (a pad id >= vocab_size) picks NaN, and NaN·0 is NaN — while a
    # NaN in the mask itself still poisons the loss.
    masked = lambda x: jnp.where(mask != 0, x * mask, 0.0)  # noqa: E731
    sums = jnp.stack([jnp.sum(masked(lse - picked)), jnp.sum(masked(jnp.square(lse))),
                      jnp.sum(masked(correct))])  # fmt: skip
    return sums, (logits_BTV, targets_BT, mask_BT, lse)


def _token_sums_bwd(residuals, g):
    """d/dlogits of g·sums: Σ(lse − picked)·m gives m·(softmax − onehot), Σ lse²·m gives
    2·m·lse·softmax, and the accuracy count has none."""
    logits_BTV, targets_BT, mask_BT, lse = residuals
    mask = mask_BT.astype(jnp.float32)
    coef = ((g[0] + 2.0 * g[1] * lse) * mask)[..., None]
    probs = jnp.exp(logits_BTV.astype(jnp.float32) - lse[..., None])
    target = jnp.arange(logits_BTV.shape[-1]) == targets_BT[..., None]
    grad = coef * probs - jnp.where(target, (g[0] * mask)[..., None], 0.0)
    grad = jnp.where((mask != 0)[..., None], grad, 0.0)  # as in the forward: masked is nothing
    return grad.astype(logits_BTV.dtype), None, None


_token_sums.defvjp(_token_sums_fwd, _token_sums_bwd)


def chunked_cross_entropy(hidden_BTD, head_fn: Callable, targets_BT, mask_BT, chunk: int,
                          z_loss: float = 0.0):  # fmt: skip
    """`cross_entropy(head_fn(hidden), ...)` without ever holding the (B, T, V) logits.

    The sequence is cut into T/chunk pieces; a scan applies the LM head to one (B, chunk, D)
    piece at a time and adds up its token sums, and the piece is rematerialised in the backward
    pass (`jax.checkpoint`), so only (B, chunk, V) logits live at once, forward or backward.
    Same value, metrics and gradients as the full loss (up to float summation order); it trades
    one extra head matmul for the memory of the float32 logits, their softmax and their
    gradient — 3 × B·T·V·4 bytes, which grows with the vocabulary (Llama 3: 128k).
    """

    def piece_sums(h, t, m):
        return _token_sums(head_fn(h), t, m)

    sums = chunked_sums(piece_sums, (hidden_BTD, targets_BT, mask_BT), chunk, 3)
    return _loss_and_metrics(sums, jnp.sum(mask_BT.astype(jnp.float32)), z_loss)


def chunked_sums(piece_sums: Callable, arrays, chunk: int, size: int):
    """The sum over the sequence's pieces of `piece_sums(*pieces)` ((size,) float32 each), the
    arrays (B, T, ...) cut into T/chunk pieces of (B, chunk, ...) and scanned one at a time, each
    piece's work rematerialised in the backward pass: what lets a loss over (B, T, V) logits
    hold only (B, chunk, V) of them at once."""
    B, T = arrays[0].shape[:2]
    if chunk <= 0 or T % chunk:
        raise ValueError(f"loss.chunk_tokens={chunk} must be > 0 and divide seq_len={T}")
    n = T // chunk

    def pieces(x):  # (B, T, ...) -> (n, B, chunk, ...)
        return jnp.swapaxes(x.reshape(B, n, chunk, *x.shape[2:]), 0, 1)

    fn = jax.checkpoint(piece_sums)

    def body(total, xs):
        return total + fn(*xs), None

    sums, _ = jax.lax.scan(body, jnp.zeros((size,), jnp.float32), tuple(map(pieces, arrays)))
    return sums


def _loss_and_metrics(sums, weight, z_loss: float):
    denom = jnp.maximum(weight, 1.0)
    nll, z, acc = sums[0] / denom, sums[1] / denom, sums[2] / denom
    return nll + z_loss * z, {"nll": nll, "z_loss": z, "accuracy": acc, "weight": weight}


def chunked_lm_loss_fn(model_apply: Callable, chunk: int, z_loss: float = 0.0,
                       prepare: Callable | None = None, router: tuple | None = None):  # fmt: skip
    """`lm_loss_fn` with the cross-entropy chunked over tokens (`chunked_cross_entropy`).

    `model_apply(params, tokens, positions, segment_ids, method=...)` runs the Transformer's
    `backbone` (final hidden states) and `logits` (the LM head) methods; `prepare(params)`
    (e.g. folding LoRA adapters in) runs once per step, not once per chunk. `router`: as in
    `lm_loss_fn`.
    """

    def loss_fn(params, batch, rng):
        del rng
        p = prepare(params) if prepare else params
        args = (p, batch["tokens"], batch.get("positions"), batch.get("segment_ids"))
        if router is None:
            h, _ = model_apply(*args, method="backbone")
        else:
            (h, _), stats = model_apply(*args, method="backbone", moe_stats=True)
        head = lambda x: model_apply(p, x, method="logits")
        out = chunked_cross_entropy(h, head, batch["targets"], batch["loss_mask"], chunk, z_loss)
        return out if router is None else add_router_losses(*out, stats, router)

    return loss_fn


def lm_loss_fn(apply_fn: Callable, z_loss: float = 0.0, router: tuple | None = None):
    """Next-token loss over a packed batch: the pretraining and SFT loss.

    `apply_fn(params, tokens, positions, segment_ids) -> logits`. SFT differs from pretraining
    only in `loss_mask` (answers only), which the data path sets. `router` = (load-balance
    coefficient, router z coefficient) for a mixture-of-experts model: `apply_fn` then takes
    `moe_stats=True` and returns (logits, router statistics) (`add_router_losses`).
    """

    def loss_fn(params, batch, rng):
        del rng  # deterministic model (no dropout)
        # Rows without segment ids hold one unpadded document each: the attention kernels then
        # run in their plain causal mode (cuDNN's fastest path).
        args = (params, batch["tokens"], batch.get("positions"), batch.get("segment_ids"))
        if router is None:
            return cross_entropy(apply_fn(*args), batch["targets"], batch["loss_mask"], z_loss)
        logits, stats = apply_fn(*args, moe_stats=True)
        out = cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss)
        return add_router_losses(*out, stats, router)

    return loss_fn


# Router-loss coefficients of a mixture-of-experts model: `loss.moe_aux` (Switch load balance)
# and `loss.moe_z` (ST-MoE router z-loss); the configs' defaults (configs/common.py
# `router_loss_keys`) and those of a config without the keys.
MOE_AUX, MOE_Z = 0.01, 0.001


def router_coefs(loss_cfg, moe: bool) -> tuple | None:
    """`router` for the losses here and in every alignment trainer: (`loss.moe_aux`,
    `loss.moe_z`) for a mixture-of-experts model (`moe`: n_experts > 0), `MOE_AUX` and
    `MOE_Z` where the config has no such key (or no `loss` section); None for a dense model,
    whose loss then asks for no router statistics at all — its compiled program stays what it
    was before mixtures existed."""
    if not moe:
        return None
    get = loss_cfg.get if loss_cfg is not None else {}.get
    return (get("moe_aux", MOE_AUX), get("moe_z", MOE_Z))


def router_forward(apply: Callable, router: tuple | None, *args, **kwargs):
    """(apply(*args, **kwargs), router statistics) of a forward pass that carries gradient:
    with `router` set (a mixture-of-experts model, `router_coefs`) the model's statistics
    (`apply(..., moe_stats=True)`), else the plain call and {} — a dense model's program gets
    no extra outputs. `add_router_losses` then takes the statistics."""
    if router is None:
        return apply(*args, **kwargs), {}
    return apply(*args, moe_stats=True, **kwargs)


def add_router_losses(loss, metrics, stats: dict, router: tuple | None, prefix: str = "moe/"):
    """loss + aux·load_balance + z·router_z (models/moe.py's statistics, means over layers),
    and every statistic logged as `<prefix><name>` (`moe/load_balance`, ...). Empty `stats`
    (a dense model, `router` None) leave both as they are, so a trainer can call this
    unconditionally on its gradient-carrying forward pass's statistics."""
    if not stats:
        return loss, metrics
    aux, z = router
    loss = loss + aux * stats["load_balance"] + z * stats["router_z"]
    return loss, {**metrics, **{f"{prefix}{k}": v for k, v in stats.items()}}
