"""Blockwise ("flash") causal self-attention in plain JAX: memory linear in the sequence length,
on every backend (`ModelConfig.attention_impl = "flash"`).

`xla_attention` materialises (B, N, T, T) float32 scores, and their softmax, for the backward
pass: 16 GiB per layer for 32 heads of one 8192-token row. cuDNN's fused kernel avoids that on
NVIDIA GPUs but refuses soft-capped logits (Gemma 2), split sequences and some head dims, and
does not exist on TPUs or CPUs. This module is the portable answer, the algorithm of
FlashAttention-2 written with `lax` loops:

  forward   for each block of `block` query rows, a loop over the key blocks it can see keeps
            the running row max m, the running sum `total` of exp(s - m) and the unnormalised
            output (the "online softmax"), so only one (block × block) score tile per head
            lives at a time. It saves the output and the rows' log-sum-exp m + log(total).
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

Shapes: q (B, T, N, H), k and v (B, S, K, H) with N a multiple of K (grouped-query heads);
T = S (self-attention) unless each query's index in the key row is given (`q_rows_BT`: a
device's stretch of a row under context parallelism); any lengths (padded up to whole blocks
inside). Scores and the softmax are float32; the matmuls take the inputs' dtype (bfloat16 on
accelerators) with float32 accumulation.
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


def flash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BS=None, positions_BS=None, *,
                    q_rows_BT=None, window: int = 0, scale: float | None = None,
                    cap: float = 0.0, block: int | None = None) -> jax.Array:  # fmt: skip
    """Causal attention of q over k, v (see the module docstring); (B, T, N, H).

    The queries are the key row's own tokens (self-attention, T = S) unless `q_rows_BT` gives
    each query's index in its key row (rising along the row): context parallelism runs a
    device's stretch of a sequence against the whole row's keys so. `segment_ids_BS` None means
    one document per row and no padding; with segment ids (of the keys' row), `positions_BS`
    (default the index) are what the window measures. `scale` defaults to head_dim^-1/2;
    `cap` soft-caps the logits (cap · tanh(s / cap), 0 = not)."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    rows, meta, (nq, bq), (nk, bk) = _layout(B, T, k_BSKH.shape[1], segment_ids_BS,
                                             positions_BS, q_rows_BT, block)  # fmt: skip
    q = _blocks(q_BTNH, nq, bq).reshape(B, nq, bq, K, N // K, H)
    k, v = _blocks(k_BSKH, nk, bk), _blocks(v_BSKH, nk, bk)
    scale = 1.0 / math.sqrt(H) if scale is None else float(scale)
    out = _flash(q, k, v, rows, meta, window, scale, float(cap))
    return out.reshape(B, nq * bq, N, H)[:, :T]


def _blocks(x, n: int, b: int, mode: str = "constant"):
    """(B, L, ...) -> (B, n, b, ...): the row cut into n blocks of b, padded at its end (zeros,
    or with mode "edge" the last entry repeated)."""
    if n * b > x.shape[1]:
        x = jnp.pad(x, [(0, 0), (0, n * b - x.shape[1])] + [(0, 0)] * (x.ndim - 2), mode=mode)
    return x.reshape(x.shape[0], n, b, *x.shape[2:])


def _layout(B, T, S, segment_ids_BS, positions_BS, q_rows_BT, block):
    """The blocks' bookkeeping: each query's index in the key row (B, nq, bq), the per-token
    ids ("meta", None for plain rows), and (count, size) of the query and key blocks. Padded
    keys sit after every query (plain rows) or in segment 0 (packed rows): hidden. Padded
    queries repeat the last one's row (their outputs are cut, their cotangents 0)."""
    if q_rows_BT is None:
        if T != S:
            raise ValueError(f"flash_attention: {T} queries and {S} keys need q_rows_BT")
        q_rows_BT = jnp.arange(T, dtype=jnp.int32)[None]
    q_rows_BT = jnp.broadcast_to(q_rows_BT.astype(jnp.int32), (B, T))
    bq, bk = min(block or BLOCK, T), min(block or BLOCK, S)
    nq, nk = -(-T // bq), -(-S // bk)

    rows = _blocks(q_rows_BT, nq, bq, mode="edge")
    meta = None
    if segment_ids_BS is not None:
        seg = jnp.broadcast_to(segment_ids_BS.astype(jnp.int32), (B, S))
        pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32) if positions_BS is None
                               else positions_BS.astype(jnp.int32), (B, S))  # fmt: skip
        q_seg, q_pos = (jnp.take_along_axis(x, q_rows_BT, axis=1) for x in (seg, pos))
        # the rows' ids rise (each document one stretch): the blocks before a query block's
        # first document are skipped; otherwise none
        rising = jnp.all((seg == 0) | (seg == jax.lax.cummax(seg, axis=1)))
        q_start = jnp.take_along_axis(document_starts(seg), q_rows_BT, axis=1)
        meta = {"q_seg": _blocks(q_seg, nq, bq), "q_pos": _blocks(q_pos, nq, bq),
                "q_start": _blocks(jnp.where(rising, q_start, 0), nq, bq, mode="edge"),
                "kv_seg": _blocks(seg, nk, bk), "kv_pos": _blocks(pos, nk, bk)}  # fmt: skip
    return rows, meta, (nq, bq), (nk, bk)


def visited_tiles(T, S=None, segment_ids_BS=None, positions_BS=None, *, q_rows_BT=None,
                  window: int = 0, block: int | None = None):  # fmt: skip
    """(nq, nk) bool: the (query block, key block) tiles the forward visits, and the same
    tiles as the backward enumerates them (key block by key block), for checks and benches."""
    S = S or T
    B = 1 if segment_ids_BS is None else segment_ids_BS.shape[0]
    if q_rows_BT is not None:
        B = max(B, q_rows_BT.shape[0])
    rows, meta, (nq, _), (nk, bk) = _layout(B, T, S, segment_ids_BS, positions_BS, q_rows_BT,
                                            block)  # fmt: skip
    lo, hi, qlo, qhi = block_ranges(rows, nk, bk, window, meta)
    i, j = jnp.arange(nq)[:, None], jnp.arange(nk)[None, :]
    return (lo[:, None] <= j) & (j < hi[:, None]), (qlo[None, :] <= i) & (i < qhi[None, :])


# ----------------------------------------------------------------------------------------------
# Which blocks each loop visits


def block_ranges(rows, nk: int, bk: int, window: int, meta):
    """Query block i visits key blocks lo[i] … hi[i] - 1, and key block j is visited by query
    blocks qlo[j] … qhi[j] - 1; (lo, hi, qlo, qhi), int32, unions over the batch rows.
    `rows` (B, nq, bq) are the queries' indices in the key row."""
    first, last = rows.min(axis=(0, 2)), rows.max(axis=(0, 2))  # (nq,)
    hi = jnp.minimum(nk, last // bk + 1)
    if meta is not None:  # no key before the document's first token (0 where ids do not rise)
        lo = meta["q_start"].min(axis=(0, 2)) // bk
    elif window:  # row r sees keys down to r - window + 1
        lo = jnp.maximum(0, (first - window + 1) // bk)
    else:
        lo = jnp.zeros_like(first)
    # Both rise with i for rising rows; made monotone (widening, never narrowing) for the
    # inverse below: key block j is seen by the query blocks with lo <= j < hi, a stretch.
    lo = jnp.flip(jax.lax.cummin(jnp.flip(lo)))
    hi = jax.lax.cummax(hi)
    j = jnp.arange(nk, dtype=hi.dtype)
    qlo, qhi = jnp.searchsorted(hi, j, side="right"), jnp.searchsorted(lo, j, side="right")
    return lo, hi, qlo.astype(lo.dtype), qhi.astype(lo.dtype)


def document_starts(seg_BT):
    """Each token's document start, for segment ids that rise along the row: the index of the
    last token at or before it that carried an id above every earlier one. Never falls along
    the row (padding, id 0, keeps the last document's start)."""
    T = seg_BT.shape[1]
    before = jax.lax.cummax(seg_BT, axis=1)
    prev = jnp.pad(before[:, :-1], [(0, 0), (1, 0)], constant_values=0)
    new = (seg_BT > prev) & (seg_BT != 0)
    return jax.lax.cummax(jnp.where(new, jnp.arange(T, dtype=jnp.int32), 0), axis=1)


def _tile_mask(rows, i, j, bk: int, window: int, meta):
    """(B, 1, 1, bq, bk): which keys of block j the queries of block i see."""
    r = rows[:, i][:, :, None]  # (B, bq, 1)
    cols = j * bk + jnp.arange(bk)[None, None, :]
    mask = cols <= r
    if meta is None:
        if window:
            mask &= r - cols < window
        return mask[:, None, None]
    sq, sk = meta["q_seg"][:, i], meta["kv_seg"][:, j]  # (B, bq), (B, bk)
    mask &= (sq[:, :, None] == sk[:, None, :]) & (sq != 0)[:, :, None]
    if window:
        mask &= (meta["q_pos"][:, i][:, :, None] - meta["kv_pos"][:, j][:, None, :]) < window
    return mask[:, None, None]


# ----------------------------------------------------------------------------------------------
# The kernel: q (B, nq, bq, K, G, H), k and v (B, nk, bk, K, H), rows (B, nq, bq)


def _scores(q_i, k_j, scale: float, cap: float):
    """Scaled (and soft-capped) logits (B, K, G, bq, bk) in float32, and tanh(s / cap) if
    capped (what the backward needs)."""
    s = jnp.einsum("bqkgh,bskh->bkgqs", q_i, k_j, preferred_element_type=jnp.float32) * scale
    if not cap:
        return s, None
    t = jnp.tanh(s / cap)
    return cap * t, t


def _forward(q, k, v, rows, meta, window: int, scale: float, cap: float):
    B, nq, bq, K, G, H = q.shape
    nk, bk = k.shape[1], k.shape[2]
    lo, hi, _, _ = block_ranges(rows, nk, bk, window, meta)

    def row_block(i):
        q_i = q[:, i]

        def visit(j, carry):
            m, total, acc = carry
            s, _ = _scores(q_i, k[:, j], scale, cap)
            mask = _tile_mask(rows, i, j, bk, window, meta)
            s = jnp.where(mask, s, _NEG)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            fade = jnp.exp(m - m_new)  # rescales what earlier blocks summed
            total = total * fade + p.sum(axis=-1)
            pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v.dtype), v[:, j],
                            preferred_element_type=jnp.float32)  # fmt: skip
            return m_new, total, acc * fade[..., None] + pv

        init = (jnp.full((B, K, G, bq), _NEG, jnp.float32), jnp.zeros((B, K, G, bq), jnp.float32),
                jnp.zeros((B, K, G, bq, H), jnp.float32))  # fmt: skip
        m, total, acc = jax.lax.fori_loop(lo[i], hi[i], visit, init)
        seen = total > 0  # rows that see no key (padding): output 0, lse 0
        total = jnp.where(seen, total, 1.0)
        out = acc / total[..., None]
        lse = jnp.where(seen, m + jnp.log(total), 0.0)
        return out.transpose(0, 3, 1, 2, 4).astype(q.dtype), lse  # (B, bq, K, G, H)

    out, lse = jax.lax.map(row_block, jnp.arange(nq))  # (nq, B, bq, K, G, H), (nq, B, K, G, bq)
    return out.transpose(1, 0, 2, 3, 4, 5), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, rows, meta, window: int, scale: float, cap: float):
    return _forward(q, k, v, rows, meta, window, scale, cap)[0]


def _flash_fwd(q, k, v, rows, meta, window, scale, cap):
    out, lse = _forward(q, k, v, rows, meta, window, scale, cap)
    return out, (q, k, v, rows, meta, out, lse)


def _flash_bwd(window, scale, cap, residuals, d_out):
    q, k, v, rows, meta, out, lse = residuals
    B, nq, bq, K, G, H = q.shape
    nk, bk = k.shape[1], k.shape[2]
    _, _, qlo, qhi = block_ranges(rows, nk, bk, window, meta)
    # rowsum(dO ⊙ O): the softmax's backward term, (nq, B, K, G, bq) like lse
    delta = jnp.einsum("bnqkgh,bnqkgh->nbkgq", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def key_block(dq, j):
        k_j, v_j = k[:, j], v[:, j]

        def visit(i, carry):
            dq, dk, dv = carry
            q_i, do_i = q[:, i], d_out[:, i]
            s, t = _scores(q_i, k_j, scale, cap)
            mask = _tile_mask(rows, i, j, bk, window, meta)
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

        zeros = jnp.zeros((B, bk, K, H), jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(qlo[j], qhi[j], visit, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nk))
    dk, dv = (x.transpose(1, 0, 2, 3, 4).astype(y.dtype) for x, y in ((dk, k), (dv, v)))
    return dq.astype(q.dtype), dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
