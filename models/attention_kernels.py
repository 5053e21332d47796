"""Attention over a chunk's own keys, as functions of q, k, v and a mask: plain XLA einsums
(`xla_attention`, its softmax weights `attention_probs`), XLA in rematerialised blocks of
query rows (`chunked_attention`) and cuDNN's flash kernel (`cudnn_attention`, where
`cudnn_supports_head_dim`). Shapes: B batch, T queries, S keys, N query heads, K kv heads,
G = N // K, H head dim; query heads are grouped by kv head.

Separate from models/attention.py because these are the kernels it dispatches to, with no
parameters or module state: tests and bench/ compare against `xla_attention` directly, and
the cache and context-parallel variants (attention_cache.py, attention_context_parallel.py)
are built from them. The blockwise kernel is models/flash_attention.py, splash (TPU)
models/splash_attention.py. `Attention` calls `cudnn_attention` and passes `ATTENTION_CHUNK`
as looked up through `flaxlm.models.attention` (tests and bench/memory_plan.py patch them
there, not here).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def softcap(scores: jax.Array, cap: float) -> jax.Array:
    """cap · tanh(scores / cap): logits squashed into (-cap, cap) (Gemma 2); cap 0 = identity."""
    return cap * jnp.tanh(scores / cap) if cap else scores


def attention_probs(q_BTNH, k_BSKH, mask_B1TS, scale=None, cap: float = 0.0) -> jax.Array:
    """Softmax attention weights (B, K, G, T, S) in float32, query heads grouped by kv head;
    logits q·k times `scale` (default head_dim^-1/2), soft-capped at `cap` (0 = not)."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q = q_BTNH.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k_BSKH).astype(jnp.float32)
    scores = softcap(scores / math.sqrt(H) if scale is None else scores * scale, cap)
    # Masked logits get a large finite negative, not -inf: a fully masked row (a padding query)
    # then yields a finite average instead of NaN; its output is never used.
    big_neg = jnp.finfo(jnp.float32).min
    scores = jnp.where(mask_B1TS[:, :, None], scores, big_neg)
    return jax.nn.softmax(scores, axis=-1)


def xla_attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, scale=None, cap: float = 0.0) -> jax.Array:
    """Plain einsum attention with grouped query heads; softmax in float32."""
    B, T, N, H = q_BTNH.shape
    probs = attention_probs(q_BTNH, k_BSKH, mask_B1TS, scale, cap).astype(v_BSKH.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH)
    return out.reshape(B, T, N, H)


# Query rows per block of `chunked_attention` (and `context_attention`). The `Attention` module
# passes the value of `flaxlm.models.attention.ATTENTION_CHUNK` (re-exported there; tests
# patch it there to get several blocks out of short rows).
ATTENTION_CHUNK = 512


def chunked_attention(q_BTNH, k_BSKH, v_BSKH, mask_fn, scale=None, cap: float = 0.0,
                      chunk: int | None = None) -> jax.Array:  # fmt: skip
    """`xla_attention` over blocks of `chunk` query rows, one after another (`lax.map`), each
    rematerialised in the backward pass: the float32 scores live one block at a time,
    (B, N, chunk, S) instead of (B, N, T, S). For training where cuDNN is configured but
    cannot run (soft-capped logits, Gemma 2, or a head dim it does not take). `mask_fn(start,
    rows)` is the (B|1, 1, rows, S) mask of query rows start … start + rows - 1."""
    B, T, N, H = q_BTNH.shape
    chunk = chunk or ATTENTION_CHUNK
    if T % chunk or T <= chunk:
        return xla_attention(q_BTNH, k_BSKH, v_BSKH, mask_fn(0, T), scale, cap)

    @jax.checkpoint
    def block(args):
        q, i = args
        return xla_attention(q, k_BSKH, v_BSKH, mask_fn(i * chunk, chunk), scale, cap)

    blocks = q_BTNH.reshape(B, T // chunk, chunk, N, H).swapaxes(0, 1)
    out = jax.lax.map(block, (blocks, jnp.arange(T // chunk)))
    return out.swapaxes(0, 1).reshape(B, T, N, H)


def cudnn_supports_head_dim(head_dim: int) -> bool:
    """Whether cuDNN's flash attention takes this head dim here: a multiple of 8 up to 128, or
    up to 256 on Hopper and later GPUs (H100/H200; not an A100) — jax's own rule. Gemma 2/3's
    256 on an A100, or where no GPU is attached (compiling for one, bench/gpu_aot.py), takes
    the XLA path in blocks of query rows instead of failing."""
    if head_dim % 8 or head_dim > 256:
        return False
    if head_dim <= 128:
        return True
    try:
        return any(float(getattr(d, "compute_capability", 0) or 0) >= 9.0
                   for d in jax.devices() if d.platform == "gpu")  # fmt: skip
    except RuntimeError:  # no backend at all
        return False


def open_empty_rows(mask_B1TS: jax.Array) -> jax.Array:
    """The mask with every query row that sees no key opened to all keys.

    `attention_mask` gives a padding query (segment 0) no key at all. jax hands cuDNN a boolean
    mask as a bias of -2^41 on the masked logits, so such a row's log-sum-exp is about -2^41.
    cuDNN's flash backward on Hopper then puts NaN in dQ when the key length is 64 past a
    multiple of 128 (the zero-filled half of its last 128-key tile scored 0 instead of -inf:
    exp(0 - lse) overflows, and inf times the tile's zeros is NaN; pytorch/pytorch#196678
    reports the same kernel bug). Through the q projection that NaN reaches every gradient of
    the step. Measured on the H200 (bench/decode_kernels.py `cudnn_grad`, 2026-12-04): rows of
    192 tokens gave NaN gradients with the raw mask and XLA's gradients (to bf16 rounding)
    opened; 96 and 128 were clean either way. PPO's rollout rows in bench/
    alignment_throughput.py are 64 + 256 = 320 tokens: every update was rejected as NaN until
    the mask was opened, and then PPO trained (bench/RESULTS.md).

    An opened row's output is still never used: no real query attends to a padding key, and
    the loss weights padding positions 0. Its cotangent is therefore zero, and the real rows'
    outputs and every gradient are unchanged. Only the cuDNN path needs this: XLA's softmax
    over a fully masked row is finite."""
    return mask_B1TS | ~jnp.any(mask_B1TS, axis=-1, keepdims=True)


def cudnn_attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, window: int = 0, scale=None
                    ) -> jax.Array:  # fmt: skip
    """cuDNN flash attention (NVIDIA GPUs). Pure causal rows take the fast CAUSAL mask type; a
    mask has its fully masked rows opened first (`open_empty_rows`: cuDNN's backward turns
    them into NaN)."""
    local = (window - 1, 0) if window else None
    if mask_B1TS is None:
        return jax.nn.dot_product_attention(
            q_BTNH,
            k_BSKH,
            v_BSKH,
            scale=scale,
            is_causal=True,
            local_window_size=local,
            implementation="cudnn",
        )
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, mask=open_empty_rows(mask_B1TS), scale=scale,
        implementation="cudnn",
    )  # fmt: skip
