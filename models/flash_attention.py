"""Blockwise ("flash") causal self-attention in plain JAX: memory linear in the sequence length,
on every backend (`ModelConfig.attention_impl = "flash"`).

`xla_attention` materialises (B, N, T, T) float32 scores, and their softmax, for the backward
pass: 16 GiB per layer for 32 heads of one 8192-token row. cuDNN's fused kernel avoids that on
NVIDIA GPUs but refuses soft-capped logits (Gemma 2), split sequences and some head dims, and
does not exist on TPUs or CPUs. This module is the portable answer, the algorithm of
FlashAttention-2 written with `lax` loops:

  forward   for each block of `block` query rows, a loop over the key blocks it can see keeps
            the running row max m, the running sum `total` of exp(s - m) and the unnormalised output
            (the "online softmax"), so only one (block × block) score tile per head lives at a
            time. It saves the output and the rows' log-sum-exp lse = m + log(total).
  backward  (a `jax.custom_vjp`, so autodiff never stores the loops' intermediates) for each key
            block, a loop over the query blocks that see it recomputes P = exp(s - lse) from
            the saved lse, and accumulates dV += Pᵀ·dO, dS = P ⊙ (dP - rowsum(dO ⊙ O)),
            dK += dSᵀ·Q and dQ[i] += dS·K. Five block matmuls per visited tile, as the paper's.

Blocks that the mask hides entirely are not visited:
  * causal rows: key blocks after the query block (half of the square);
  * a sliding window over plain rows: key blocks wholly more than `window` back;
  * packed documents (segment ids) that each occupy one stretch of the row, ids rising along
    it (what data/pipeline.py's packing writes): key blocks before the first document of the
    query block. With many short documents per row this skips most of the square, as
    block-sparse kernels (splash attention) do. Rows whose ids do not rise are still exact;
    they visit every causal block.
The bounds are the same for every row of the batch (the loops run on the whole batch at once),
so a block is skipped when no row needs it.

Masking matches `attention.attention_mask`: a query sees keys at or before its own index, of
its own non-zero segment, and with a window, `query pos - key pos < window` (positions, or the
index without segment ids). A query that sees nothing (padding, segment 0) outputs zeros —
`xla_attention` gives such rows an average of the values instead; neither is ever used.

Shapes: q (B, T, N, H), k and v (B, T, K, H) with N a multiple of K (grouped-query heads);
sequences of any length (padded up to a multiple of the block inside). Scores and the softmax
are float32; the matmuls take the inputs' dtype (bfloat16 on accelerators) with float32
accumulation.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# Query and key rows per block (`ModelConfig.flash_block` overrides): a (B, N, 512, 512) float32
# tile per step, small next to the activations and big enough for full-width matmuls.
BLOCK = 512
_NEG = float(jnp.finfo(jnp.float32).min)  # a masked score: finite, so no inf - inf


def flash_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT=None, positions_BT=None, *,
                    window: int = 0, scale: float | None = None, cap: float = 0.0,
                    block: int | None = None) -> jax.Array:  # fmt: skip
    """Causal self-attention of q over k, v (see the module docstring); (B, T, N, H).

    `segment_ids_BT` None means one document per row and no padding; with segment ids,
    `positions_BT` (default the index) are what the window measures. `scale` defaults to
    head_dim^-1/2; `cap` soft-caps the logits (cap · tanh(s / cap), 0 = not)."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    b = min(block or BLOCK, T)
    n = -(-T // b)
    pad = n * b - T
    if segment_ids_BT is not None and positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    def blocks(x, fill=0):  # (B, T, ...) -> (B, n, b, ...), padded at the end of the row
        if pad:
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return x.reshape(B, n, b, *x.shape[2:])

    # Padded keys sit after every real query (plain rows) or in segment 0 (packed rows): hidden.
    q = blocks(q_BTNH).reshape(B, n, b, K, N // K, H)
    k, v = blocks(k_BTKH), blocks(v_BTKH)
    meta = None
    if segment_ids_BT is not None:
        meta = (blocks(segment_ids_BT.astype(jnp.int32)), blocks(positions_BT.astype(jnp.int32)))
    scale = 1.0 / math.sqrt(H) if scale is None else float(scale)
    out = _flash(q, k, v, meta, window, scale, float(cap))
    return out.reshape(B, n * b, N, H)[:, :T]


# ----------------------------------------------------------------------------------------------
# Which blocks each loop visits


def block_ranges(n: int, b: int, window: int, meta):
    """(lo, hi) int32 (n,) each: query block i visits key blocks lo[i] … i, and key block j is
    visited by query blocks j … hi[j] - 1. Both are unions over the batch rows."""
    idx = jnp.arange(n, dtype=jnp.int32)
    if meta is None:
        if not window:
            return jnp.zeros(n, jnp.int32), jnp.full(n, n, jnp.int32)
        # row r sees keys down to r - window + 1
        lo = jnp.maximum(0, (idx * b - window + 1) // b)
        hi = jnp.minimum(n, (idx * b + b - 1 + window - 1) // b + 1)
        return lo, hi
    seg = meta[0].reshape(meta[0].shape[0], n * b)
    start = document_starts(seg)
    # Rising ids: a query sees no key before its document's first token. Otherwise no skipping.
    rising = jnp.all((seg == 0) | (seg == jax.lax.cummax(seg, axis=1)))
    lo = jnp.where(rising, jnp.min(start[:, ::b], axis=0) // b, 0)
    # key block j is seen by the queries whose document starts at or before its last key: a
    # prefix of the row, since the starts never fall (`document_starts`)
    seen = jnp.sum(start[:, None, :] <= (idx[None, :, None] * b + b - 1), axis=-1)  # (B, n)
    hi = jnp.where(rising, -(-jnp.max(seen, axis=0) // b), n)
    return lo.astype(jnp.int32), jnp.maximum(hi, idx + 1).astype(jnp.int32)


def document_starts(seg_BT):
    """Each token's document start, for segment ids that rise along the row: the index of the
    last token at or before it that carried an id above every earlier one. Never falls along
    the row (padding, id 0, keeps the last document's start)."""
    T = seg_BT.shape[1]
    before = jax.lax.cummax(seg_BT, axis=1)
    prev = jnp.pad(before[:, :-1], [(0, 0), (1, 0)], constant_values=0)
    new = (seg_BT > prev) & (seg_BT != 0)
    return jax.lax.cummax(jnp.where(new, jnp.arange(T, dtype=jnp.int32), 0), axis=1)


def _tile_mask(i, j, b: int, window: int, meta):
    """(B|1, 1, 1, b, b): which keys of block j the queries of block i see."""
    rows = i * b + jnp.arange(b)[:, None]
    cols = j * b + jnp.arange(b)[None, :]
    mask = cols <= rows
    if meta is None:
        if window:
            mask &= rows - cols < window
        return mask[None, None, None]
    seg, pos = meta
    sq, sk = seg[:, i], seg[:, j]  # (B, b)
    mask = mask[None] & (sq[:, :, None] == sk[:, None, :]) & (sq != 0)[:, :, None]
    if window:
        mask &= (pos[:, i][:, :, None] - pos[:, j][:, None, :]) < window
    return mask[:, None, None]


# ----------------------------------------------------------------------------------------------
# The kernel: q (B, n, b, K, G, H), k and v (B, n, b, K, H)


def _scores(q_i, k_j, scale: float, cap: float):
    """Scaled (and soft-capped) logits (B, K, G, b, b) in float32, and tanh(s / cap) if capped
    (what the backward needs)."""
    s = jnp.einsum("bqkgh,bskh->bkgqs", q_i, k_j, preferred_element_type=jnp.float32) * scale
    if not cap:
        return s, None
    t = jnp.tanh(s / cap)
    return cap * t, t


def _forward(q, k, v, meta, window: int, scale: float, cap: float):
    B, n, b, K, G, H = q.shape
    lo, _ = block_ranges(n, b, window, meta)

    def row_block(i):
        q_i = q[:, i]

        def visit(j, carry):
            m, total, acc = carry
            s, _ = _scores(q_i, k[:, j], scale, cap)
            mask = _tile_mask(i, j, b, window, meta)
            s = jnp.where(mask, s, _NEG)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            fade = jnp.exp(m - m_new)  # rescales what earlier blocks summed
            total = total * fade + p.sum(axis=-1)
            pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v.dtype), v[:, j],
                            preferred_element_type=jnp.float32)  # fmt: skip
            return m_new, total, acc * fade[..., None] + pv

        init = (jnp.full((B, K, G, b), _NEG, jnp.float32), jnp.zeros((B, K, G, b), jnp.float32),
                jnp.zeros((B, K, G, b, H), jnp.float32))  # fmt: skip
        m, total, acc = jax.lax.fori_loop(lo[i], i + 1, visit, init)
        seen = total > 0  # rows that see no key (padding): output 0, lse 0
        total = jnp.where(seen, total, 1.0)
        out = acc / total[..., None]
        lse = jnp.where(seen, m + jnp.log(total), 0.0)
        return out.transpose(0, 3, 1, 2, 4).astype(q.dtype), lse  # (B, b, K, G, H)

    out, lse = jax.lax.map(row_block, jnp.arange(n))  # (n, B, b, K, G, H), (n, B, K, G, b)
    return out.transpose(1, 0, 2, 3, 4, 5), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, meta, window: int, scale: float, cap: float):
    return _forward(q, k, v, meta, window, scale, cap)[0]


def _flash_fwd(q, k, v, meta, window, scale, cap):
    out, lse = _forward(q, k, v, meta, window, scale, cap)
    return out, (q, k, v, meta, out, lse)


def _flash_bwd(window, scale, cap, residuals, d_out):
    q, k, v, meta, out, lse = residuals
    B, n, b, K, G, H = q.shape
    _, hi = block_ranges(n, b, window, meta)
    # rowsum(dO ⊙ O): the softmax's backward term, (n, B, K, G, b) like lse
    delta = jnp.einsum("bnqkgh,bnqkgh->nbkgq", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def key_block(dq, j):
        k_j, v_j = k[:, j], v[:, j]

        def visit(i, carry):
            dq, dk, dv = carry
            q_i, do_i = q[:, i], d_out[:, i]
            s, t = _scores(q_i, k_j, scale, cap)
            mask = _tile_mask(i, j, b, window, meta)
            p = jnp.where(mask, jnp.exp(s - lse[i][..., None]), 0.0)
            dv += jnp.einsum("bkgqs,bqkgh->bskh", p.astype(do_i.dtype), do_i,
                             preferred_element_type=jnp.float32)  # fmt: skip
            dp = jnp.einsum("bqkgh,bskh->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
            ds = p * (dp - delta[i][..., None])
            if cap:  # d(cap · tanh(x / cap))/dx
                ds = ds * (1.0 - t * t)
            ds = (ds * scale).astype(q.dtype)
            dq_i = jnp.einsum("bkgqs,bskh->bqkgh", ds, k_j, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_index_in_dim(dq, dq[:, i] + dq_i, i, axis=1)
            dk += jnp.einsum("bkgqs,bqkgh->bskh", ds, q_i, preferred_element_type=jnp.float32)
            return dq, dk, dv

        zeros = jnp.zeros((B, b, K, H), jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(j, hi[j], visit, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(n))
    dk, dv = (x.transpose(1, 0, 2, 3, 4).astype(y.dtype) for x, y in ((dk, k), (dv, v)))
    return dq.astype(q.dtype), dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
