"""Attention with the sequence split over devices (context parallelism, models/sharding.py's
`context` axis): the keys and values all-gathered (`gather_sequence`), and each device's own
query rows attended in blocks, with XLA (`context_attention`) or the blockwise kernel
(`context_flash_attention`), so no query moves between devices.

Separate from models/attention.py because these only run under a split sequence and carry
their own layout reasoning (logical-axis constraints on reshaped rows); `Attention` picks them
when `act_len` is split. Built from attention_kernels.py's `xla_attention` and
models/flash_attention.py.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlm.models import attention_kernels
from flaxlm.models.attention_kernels import xla_attention
from flaxlm.models.flash_attention import flash_attention
from flaxlm.models.sharding import logical_axes_unsplit


def context_attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, window: int, C: int, scale=None,
                      cap: float = 0.0, chunk: int | None = None) -> jax.Array:  # fmt: skip
    """`chunked_attention` for queries split C ways along the sequence (context parallelism):
    each device's T/C rows in blocks of `chunk`, every device working on its own rows at once.
    The rows are viewed as (C, T/C): block j is rows c·T/C + j·chunk … of every c, so the
    block index runs over the unsplit axis and no device's rows move (slicing the split T
    axis itself, as `chunked_attention` does, would gather the queries). Each block is
    rematerialised in the backward pass: a device holds (chunk, S) float32 scores per head at
    a time, not (T/C, S). `mask_B1TS` None means plain causal rows (with `window`)."""
    B, T, N, H = q_BTNH.shape
    S, L = k_BSKH.shape[1], T // C
    chunk = chunk or attention_kernels.ATTENTION_CHUNK
    chunk = chunk if L % chunk == 0 else L
    n = L // chunk
    split = ("act_batch", "act_len", None, None, "act_heads", "head_dim")
    q6 = nn.with_logical_constraint(q_BTNH.reshape(B, C, n, chunk, N, H), split)
    if mask_B1TS is not None:
        mask6 = mask_B1TS.reshape(mask_B1TS.shape[0], 1, C, n, chunk, S)

    @jax.checkpoint
    def block(j):
        qb = jax.lax.dynamic_index_in_dim(q6, j, axis=2, keepdims=False)  # (B, C, chunk, N, H)
        if mask_B1TS is None:
            rows = jnp.arange(C)[:, None] * L + j * chunk + jnp.arange(chunk)[None, :]
            cols = jnp.arange(S)
            mask = cols[None, None, :] <= rows[..., None]  # (C, chunk, S)
            if window:
                mask &= (rows[..., None] - cols[None, None, :]) < window
            mask = mask.reshape(1, 1, C * chunk, S)
        else:
            mask = jax.lax.dynamic_index_in_dim(mask6, j, axis=3, keepdims=False)
            mask = mask.reshape(mask.shape[0], 1, C * chunk, S)
        out = xla_attention(qb.reshape(B, C * chunk, N, H), k_BSKH, v_BSKH, mask, scale, cap)
        return nn.with_logical_constraint(
            out.reshape(B, C, chunk, N, H), ("act_batch", "act_len", None, "act_heads", "head_dim")
        )

    out = jax.lax.map(block, jnp.arange(n))  # (n, B, C, chunk, N, H)
    return out.transpose(1, 2, 0, 3, 4, 5).reshape(B, T, N, H)


def context_flash_attention(q_BTNH, k_BSKH, v_BSKH, packed, window: int, C: int, scale=None,
                            cap: float = 0.0, block: int | None = None) -> jax.Array:  # fmt: skip
    """`flash_attention` for queries split C ways along the sequence (context parallelism,
    attention_impl="flash"): the rows viewed as (B, C, T/C) become B·C rows of the kernel, each
    device's stretch of a row against the row's whole (gathered) keys, its queries' indices in
    the row given (`q_rows_BT`), so no query moves. The loops' bounds are shared by the rows,
    so every device walks the key blocks the last stretch needs, those its own rows cannot
    see masked: `context_attention`'s FLOPs, with (block × block) tiles per head in place of
    its (chunk × S) scores. `packed` is (segment ids, positions) (B, S) or None.

    T need not divide by C: the queries are padded to the next multiple, each padding query
    a copy of the row's last (its index clamped to T - 1, so it sees what that one sees), and
    cut off again. (Without this such rows fell back to XLA's whole (T × S) scores: 2046
    tokens over 4 devices took 10× the flash run's temporaries.)"""
    B, T0, N, H = q_BTNH.shape
    L = -(-T0 // C)
    T = C * L
    q_BTNH = jnp.pad(q_BTNH, ((0, 0), (0, T - T0), (0, 0), (0, 0)))
    split = ("act_batch", "act_len", None)

    def rows_of(x, tail):  # (B, C, L|S, ...) -> (B·C, ...), each device its own stretch c
        x = nn.with_logical_constraint(x, split + tail)
        return x.reshape(B * C, *x.shape[2:])

    def spread(x, tail=()):  # a row's keys (B, S, ...) to each of its C stretches
        return rows_of(jnp.broadcast_to(x[:, None], (B, C, *x.shape[1:])), tail)

    heads = ("act_heads", "head_dim")
    q = rows_of(q_BTNH.reshape(B, C, L, N, H), heads)
    k, v = (spread(x, ("act_kv_heads", "head_dim")) for x in (k_BSKH, v_BSKH))
    index = jnp.minimum(jnp.arange(T, dtype=jnp.int32), T0 - 1).reshape(C, L)
    q_rows = rows_of(jnp.broadcast_to(index, (B, C, L)), ())
    seg_pos = () if packed is None else tuple(spread(x) for x in packed)
    out = flash_attention(q, k, v, *seg_pos, q_rows_BT=q_rows, window=window, scale=scale,
                          cap=cap, block=block)  # fmt: skip
    out = nn.with_logical_constraint(out.reshape(B, C, L, N, H), split + heads)
    return out.reshape(B, T, N, H)[:, :T0]


def gather_sequence(x_BSKH):
    """Keys or values (B, S, K, H) whole along the sequence on every device: under context
    parallelism (models/sharding.py) each device's queries cover T/C positions but attend to
    keys anywhere before them, so the keys and values of a layer are all-gathered over the
    context axis (the scores, softmax and output stay split by query). Without a split
    sequence: unchanged. (All-gather, not ring, attention: the gather costs 2·S·K·H values
    per layer and device, which GQA keeps small next to the activations it lets us split.)"""
    if logical_axes_unsplit("act_len"):
        return x_BSKH
    return nn.with_logical_constraint(x_BSKH, ("act_batch", None, "act_kv_heads", "head_dim"))
