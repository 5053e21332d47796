"""A decode step's attention — RoPE, cache write and attention — as one Pallas (Triton) kernel
per layer.

XLA compiles a decode step's attention (`Attention` with a cache, `cached_attention`) to
five kernels per layer: RoPE on q, RoPE on k fused with the cache write, a scores matmul, a
softmax and a values matmul, with float32 scores written to HBM and read back between them,
and every slot of the preallocated cache read whether it holds a token yet or not. Compiled
for the H200 (bench/gpu_aot.py), the 1.1B decode step is ~305 kernels; the lease measured a
step ~3× the HBM bound, and most of those kernels move well under a megabyte, so per-kernel
cost rather than bandwidth is the suspect. This kernel removes kernels and wasted bytes:

  * one program per (batch row, kv head): it rotates the group's G query heads and the new
    key (rotate-half RoPE, in float32 as `apply_rope`, rounded as the XLA path rounds),
    writes the new key and value into their cache slots in place (the key and value buffers
    are aliased from input to output), and runs a flash-attention style loop (online softmax,
    float32 accumulators in registers) over the earlier slots, then folds in the new token;
  * the loop covers the written slots only (`index`, the shared write index), in blocks of
    BLOCK_K, not the whole buffer: a 128-token prompt with 256 new tokens reads on average
    2/3 of what the full buffer costs. A windowed layer's ring (W slots, `ring=True`) is read
    whole, each row writing at its own slot (position mod W);
  * the rotate-half split is done by loading each half of q and k from memory and summing
    two half-width dots, so no value is sliced or concatenated inside the kernel.

The mask (segment ids, causality, sliding window — each layer's own where local and global
layers mix: `attention.attention_mask`) is applied per key slot, and the logits scaled
(`ModelConfig.attn_scale`) and soft-capped (Gemma 2) exactly as on the XLA path, so results
match it (tests/models/test_decode.py,
run in Pallas' interpreter). On GPUs the Triton kernel runs; on other platforms the same
kernel runs in the interpreter (tests, not speed).

An int8 cache (`generate(..., cache_dtype="int8")`) is read as `attention.cached_attention`
reads it: each key block's scores times its slots' key scales, the probabilities times the
value scales; the kernel quantizes the new token's key and value itself and writes their
scales beside them.

Used for the one-token steps of `generate` when asked (`generate(..., decode_attention=
"pallas")`, PPO/GRPO `rollout.decode_attention`, bench/decode.py option `:pallas`). Under a
mesh each device runs it on its own rows (`shard_map` over the batch axes); with heads split
over a tensor axis, and for prefill, the XLA path runs instead.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from flaxlm.models.sharding import logical_axes_unsplit

# Key slots per loop iteration. The cache length must be a multiple (`generate` rounds the
# buffer it allocates up to one; a ring of W slots takes the largest power of two <= this that
# divides W, `block_for`). 128: the fastest on the H200 at batch 64 (10.2-10.4 µs per 1.1B
# layer against 11.1 for 64) and at batch 1 (5.5 against 8.0) in both 2026-12-04 leases
# (bench/decode_kernels.py).
BLOCK_K = 128
MIN_BLOCK_K = 16  # Triton's tensor-core dot: at least 16 keys
# Triton launch parameters: warps per program, and how many loop iterations' loads are in
# flight (software pipelining). bench/decode_kernels.py times the kernel alone over block
# sizes, warps and stages on the GPU, the measurements these defaults should follow.
NUM_WARPS = 4
NUM_STAGES = 2
# Triton's tensor-core dot needs at least 16 rows: a group of G < 16 query heads is padded
# (masked loads and stores, so the arrays themselves are not copied).
MIN_DOT_ROWS = 16


def variant_options(name: str) -> dict:
    """The kernel options a `decode_attention` name asks for: "pallas" the module's defaults
    ({}), "pallas:BK:W:S" key block BK (a power of two >= 16), W warps and S pipeline stages,
    "pallas:BK:W:S:P" the same split into P >= 1 parts over the key blocks (split-K: P times
    the programs, then a combine; `_kernel`). bench/decode_kernels.py times them on the GPU;
    its best can be run whole with this name. Anything else: a ValueError naming it."""
    if name == "pallas":
        return {}
    parts = name.split(":")
    try:
        numbers = [int(p) for p in parts[1:]] if len(parts) in (4, 5) else [0, 0, 0]
    except ValueError:
        numbers = [0, 0, 0]
    bk, warps, stages, *split = numbers
    splits = split[0] if split else 1
    if parts[0] != "pallas" or bk < 16 or bk & (bk - 1) or warps < 1 or warps & (warps - 1) \
            or stages < 1 or splits < 1:  # fmt: skip
        raise ValueError(f"decode_attention={name!r}: expected 'pallas', 'pallas:BK:W:S' or "
                         "'pallas:BK:W:S:P' (key block BK a power of two >= 16, W warps a "
                         "power of two, S >= 1 stages, P >= 1 parts), e.g. 'pallas:128:8:3' "
                         "or 'pallas:64:4:2:4'")  # fmt: skip
    options = {"block_k": bk, "num_warps": warps, "num_stages": stages}
    return {**options, "splits": splits} if split else options


def block_for(kv_slots: int) -> int | None:
    """The default key block for a buffer of `kv_slots`: BLOCK_K, or the largest power of two
    below it (at least MIN_BLOCK_K) that divides the slots — a windowed layer's ring of W slots,
    which `generate` does not round — or None when none does."""
    block = BLOCK_K
    while block >= MIN_BLOCK_K:
        if kv_slots % block == 0:
            return block
        block //= 2
    return None


def supports(kv_slots: int, n_queries: int, head_dim: int, block_k: int | None = None) -> bool:
    """Whether the kernel applies: one query per row (a decode step), whole key blocks (of
    `block_k`; None: `block_for`'s), and a head dim whose halves are a power of two of at least
    16 (Triton's tensor shapes and its tensor-core dot: 32, 64, 128, 256)."""
    half = head_dim // 2
    block = block_for(kv_slots) if block_k is None else block_k
    return (n_queries == 1 and block is not None and kv_slots % block == 0 and half >= 16
            and half & (half - 1) == 0)  # fmt: skip


def _rotate(x1, x2, cos, sin):
    """RoPE of the two halves (float32 in, float32 out), as `attention.apply_rope`."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


def _fold(carry, s, ok, weighted_values):
    """Online softmax: folds a block of scores s (rows, keys), visible where `ok`, into the
    running (output accumulator, row max, row sum); `weighted_values(p)` is p @ values."""
    acc, row_max, row_sum = carry
    s = jnp.where(ok, s, -jnp.inf)
    new_max = jnp.maximum(row_max, s.max(axis=1))
    # Until a row has seen a visible key its max is -inf: keep the exponents finite.
    safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)
    p = jnp.where(ok, jnp.exp(s - safe_max[:, None]), 0.0)
    # exp(-inf) = 0 until a row has seen a key (its accumulator and sum are 0 then). Replacing
    # that -inf by 0 instead gave exp(-new_max): inf for a first visible block whose best score
    # is below -88, and 0·inf = NaN in the row (found by review; the XLA path stayed finite).
    rescale = jnp.exp(row_max - safe_max)
    acc = acc * rescale[:, None] + weighted_values(p).astype(jnp.float32)
    return acc, new_max, row_sum * rescale + p.sum(axis=1)


def _quantize(x, dtype):
    """`attention.quantize_kv` of one token's head inside the kernel: x rounded to the compute
    `dtype` first (as the XLA path computes k and v), then int8 values and their float32
    scale, max |x| / 127 (1 for an all-zero head). `x` is a list of float32 parts (the RoPE
    halves): one scale over all of them."""
    x = [p.astype(dtype).astype(jnp.float32) for p in x]
    amax = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(p)) for p in x])
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return [jnp.clip(_round_half_even(p / scale), -127, 127).astype(jnp.int8) for p in x], scale


def _round_half_even(x):
    """`jnp.round` (ties to even) from floor, which Pallas' Triton lowering has (not round)."""
    r = jnp.floor(x + 0.5)
    odd = r - 2.0 * jnp.floor(r * 0.5) != 0
    return jnp.where((r - x == 0.5) & odd, r - 1.0, r)


def _kernel(idx_ref, qkv_ref, cos_ref, sin_ref, *refs, groups: int, kv_heads: int,
            block_k: int, scale: float, cap: float, ring: bool, quantized: bool,
            norm_eps: float | None, splits: int = 1):  # fmt: skip
    """One (batch row b, kv head h): this step's q|k|v heads of row b (N + 2K, H), the rope
    angles of b's position (H/2,), the key and value caches (S, H) of (b, h) (with
    `quantized`, int8 and their scales (S,) after them), b's mask (S,); then the outputs: the
    attention (M, H) and the caches again. The group's G query heads are rows h·G … h·G + G - 1
    of q|k|v, loaded as M ≥ 16 rows (the rest masked: zeros, never stored). The output caches
    are the input ones' buffers (aliased): the new slot is written through them. Scores are
    q·k · `scale`, then soft-capped to cap·tanh(s / cap) when `cap` (Gemma 2; 0 = not). Row b
    writes at its slot `idx_ref[0]`; the earlier slots are those before it, or with `ring`
    every other slot of the ring (a windowed layer's, `transformer.init_cache`; the mask says
    which hold what). An int8 cache is read as `attention.cached_attention` reads it: a key
    block's scores times its slots' key scales, the probabilities times the value scales.
    With `norm_eps`, row b's residual stream x (D,) follows the mask, and q|k|v are the raw
    x·W' of the folded weights (`transformer.fold_norms`): each is divided by rms(x) first.
    With `splits` > 1 (split-K, "flash decoding"), program (b, h, p) covers the p-th of
    `splits` runs of the key blocks and writes its part normalised, float32, and the part's
    log-sum-exp (M,) after it (`_combine_splits` joins them); part 0 also folds in the new
    token. Every part writes the new slot (the same bytes) and none reads it."""
    n_cache = 4 if quantized else 2
    n_in = n_cache + (2 if norm_eps is not None else 1)
    n_out = 2 if splits > 1 else 1
    mask_ref, o_ref = refs[n_cache], refs[n_in]
    k_out_ref, v_out_ref, *scale_refs = refs[n_in + n_out :]  # (the inputs: aliased, unused)
    rows = o_ref.shape[0]
    H = qkv_ref.shape[1]
    half = H // 2
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    head = pl.program_id(1)
    n_q = groups * kv_heads
    real = (jnp.arange(rows) < groups)[:, None]
    # the dots' dtype: the cache's when it is a float one (a cache dtype narrower than the
    # compute dtype: the XLA path widens the cache instead), else the compute dtype
    dtype = qkv_ref.dtype if quantized else k_out_ref.dtype
    idx = idx_ref[0]
    cos, sin = cos_ref[...][None, :], sin_ref[...][None, :]
    if norm_eps is None:
        normed = lambda t: t.astype(jnp.float32)  # noqa: E731
    else:  # the pre-norm folded in: x·W' / rms(x), in float32 (as `layers.RMSNorm`)
        x = refs[n_cache + 1][...].astype(jnp.float32)
        inv_rms = jax.lax.rsqrt((x * x).sum() / x.shape[0] + norm_eps)
        normed = lambda t: t.astype(jnp.float32) * inv_rms  # noqa: E731

    def load_q(part):
        return plgpu.load(qkv_ref.at[pl.ds(head * groups, rows), part], mask=real, other=0.0)

    q1, q2 = _rotate(normed(load_q(lo)), normed(load_q(hi)), cos, sin)
    # Rounded as `apply_rope` rounds q; then in the dots' dtype.
    q1, q2 = q1.astype(dtype), q2.astype(dtype)
    k_row = n_q + head
    k1, k2 = _rotate(normed(qkv_ref[k_row, lo])[None, :],
                     normed(qkv_ref[k_row, hi])[None, :], cos, sin)  # fmt: skip
    v_new = qkv_ref[n_q + kv_heads + head, :]
    if norm_eps is not None:
        v_new = normed(v_new).astype(qkv_ref.dtype)  # rounded as the projection's output
    if quantized:  # the new token's int8 key and value, and what the step reads back
        (k1, k2), k_scale = _quantize([k1[0], k2[0]], qkv_ref.dtype)
        (v_new,), v_scale = _quantize([v_new.astype(jnp.float32)], qkv_ref.dtype)
        ks_out_ref, vs_out_ref = scale_refs
        ks_out_ref[pl.ds(idx, 1)] = k_scale[None]
        vs_out_ref[pl.ds(idx, 1)] = v_scale[None]
    else:
        k1, k2, v_new = k1[0].astype(dtype), k2[0].astype(dtype), v_new.astype(dtype)
    k_out_ref[idx, lo] = k1
    k_out_ref[idx, hi] = k2
    v_out_ref[idx, :] = v_new

    def logits(s):
        return cap * jnp.tanh(s * scale / cap) if cap else s * scale

    def step(j, carry):  # key block j of the slots before this step's
        keys = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        slots = j * block_k + jnp.arange(block_k)
        earlier = (slots != idx) if ring else (slots < idx)
        ok = ((mask_ref[keys] != 0) & earlier)[None, :]
        k_lo, k_hi = k_out_ref[keys, lo].astype(dtype), k_out_ref[keys, hi].astype(dtype)
        s = plgpu.dot(q1, k_lo, trans_b=True).astype(jnp.float32)
        s += plgpu.dot(q2, k_hi, trans_b=True).astype(jnp.float32)
        v = v_out_ref[keys, :].astype(dtype)
        if not quantized:
            return _fold(carry, logits(s), ok, lambda p: plgpu.dot(p.astype(dtype), v))
        k_scales, v_scales = (r[keys][None, :] for r in scale_refs)
        return _fold(carry, logits(s * k_scales), ok,
                     lambda p: plgpu.dot((p * v_scales).astype(dtype), v))  # fmt: skip

    init = (
        jnp.zeros((rows, H), jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    n_blocks = k_out_ref.shape[0] // block_k if ring else pl.cdiv(idx, block_k)
    part = pl.program_id(2) if splits > 1 else 0
    # part p's run of blocks: [p·n / P, (p + 1)·n / P), as even as whole blocks allow
    first, stop = (part * n_blocks) // splits, ((part + 1) * n_blocks) // splits
    carry = jax.lax.fori_loop(first, stop, step, init)
    # The new token, a one-key block: always visible to itself (same segment and slot).
    k1, k2, v_new = (x.astype(jnp.float32) for x in (k1, k2, v_new))
    s_new = (q1.astype(jnp.float32) * k1[None, :]).sum(axis=1)
    s_new += (q2.astype(jnp.float32) * k2[None, :]).sum(axis=1)
    if quantized:
        s_new = s_new * k_scale

    def new_value(p):
        if quantized:
            p = p * v_scale
        return p.astype(dtype).astype(jnp.float32) * v_new[None, :]

    ok = jnp.full((1, 1), part == 0)  # (the new token: part 0's)
    acc, row_max, row_sum = _fold(carry, logits(s_new[:, None]), ok, new_value)
    if splits == 1:
        out = (acc / row_sum[:, None]).astype(o_ref.dtype)
        plgpu.store(o_ref.at[pl.ds(0, rows), :], out, mask=real)
        return
    # A part that saw no key (more parts than blocks) has sum 0: output 0, log-sum-exp -inf,
    # which the combine weighs 0.
    seen = row_sum > 0
    out = jnp.where(seen[:, None], acc / jnp.where(seen, row_sum, 1.0)[:, None], 0.0)
    lse = jnp.where(seen, row_max + jnp.log(jnp.where(seen, row_sum, 1.0)), -jnp.inf)
    plgpu.store(o_ref.at[pl.ds(0, rows), :], out, mask=real)
    plgpu.store(refs[n_in + 1].at[pl.ds(0, rows)], lse, mask=jnp.arange(rows) < groups)


def _call(idx_B1, qkv_BRH, cos_Bh, sin_Bh, k_BKSH, v_BKSH, mask_BS, *rest,
          interpret: bool, scale: float, cap: float = 0.0, ring: bool = False,
          block_k: int = BLOCK_K, num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES,
          norm_eps: float | None = None, splits: int = 1):  # fmt: skip
    """`rest`: the int8 cache's key and value scales, then with `norm_eps` the rows' residual
    stream x (B, D). Returns (out (B, K, G, H), the caches)."""
    scales_BKS = rest[:-1] if norm_eps is not None else rest
    normed_x = rest[-1:] if norm_eps is not None else ()
    B, K, S, H = k_BKSH.shape
    R = qkv_BRH.shape[1]  # N + 2K rows
    G = (R - 2 * K) // K
    M = max(MIN_DOT_ROWS, pl.next_power_of_2(G))
    if interpret:  # the interpreter clamps a block read that runs past the array; Triton
        # masks it. Rows of zeros past the last group's M rows make both read the same.
        qkv_BRH = jnp.pad(qkv_BRH, ((0, 0), (0, M), (0, 0)))
        R += M
    kernel = functools.partial(_kernel, groups=G, kv_heads=K, block_k=block_k, scale=scale,
                               cap=cap, ring=ring, quantized=bool(scales_BKS),
                               norm_eps=norm_eps, splits=splits)  # fmt: skip
    cache = pl.BlockSpec((None, None, S, H), lambda b, k, p=0: (b, k, 0, 0))
    scales = [pl.BlockSpec((None, None, S), lambda b, k, p=0: (b, k, 0))] * len(scales_BKS)
    per_row = lambda n: pl.BlockSpec((None, n), lambda b, k, p=0: (b, 0))  # noqa: E731
    caches = (k_BKSH, v_BKSH, *scales_BKS)
    if splits == 1:
        outs = [pl.BlockSpec((None, None, M, H), lambda b, k: (b, k, 0, 0))]
        out_shapes = [jax.ShapeDtypeStruct((B, K, G, H), qkv_BRH.dtype)]
    else:  # each part's output (float32) and log-sum-exp
        outs = [
            pl.BlockSpec((None, None, None, M, H), lambda b, k, p: (b, k, p, 0, 0)),
            pl.BlockSpec((None, None, None, M), lambda b, k, p: (b, k, p, 0)),
        ]
        out_shapes = [
            jax.ShapeDtypeStruct((B, K, splits, G, H), jnp.float32),
            jax.ShapeDtypeStruct((B, K, splits, G), jnp.float32),
        ]
    n_out = len(outs)
    out, *rest_out = pl.pallas_call(
        kernel,
        grid=(B, K) if splits == 1 else (B, K, splits),
        in_specs=[per_row(1), pl.BlockSpec((None, R, H), lambda b, k, p=0: (b, 0, 0)),
                  per_row(H // 2), per_row(H // 2), cache, cache, *scales, per_row(S),
                  *(per_row(x.shape[1]) for x in normed_x)],
        out_specs=[*outs, cache, cache, *scales],
        out_shape=[*out_shapes, *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in caches)],
        # every cache buffer (inputs 4 …) is updated in place: the outputs after the result
        input_output_aliases={4 + i: n_out + i for i in range(len(caches))},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="decode_attention",
    )(idx_B1, qkv_BRH, cos_Bh, sin_Bh, *caches, mask_BS, *normed_x)  # fmt: skip
    if splits == 1:
        return out, *rest_out
    lse, *cache_out = rest_out
    return _combine_splits(out, lse).astype(qkv_BRH.dtype), *cache_out


def _combine_splits(out_BKPGH, lse_BKPG):
    """The parts of a split-K step joined: each part's normalised output weighed by its share
    of the softmax mass, exp(lse_p - lse). Part 0 holds the new token, so lse is finite."""
    # Over the few parts one by one, as elementwise ops: XLA fuses the whole combine into one
    # kernel (a max and a sum reduced over the part axis compiled to two for the H200).
    P = lse_BKPG.shape[2]
    lse = [lse_BKPG[:, :, p] for p in range(P)]
    top = functools.reduce(jnp.maximum, lse)
    w = [jnp.exp(x - top) for x in lse]  # (B, K, G) each; a part that saw nothing: 0
    total = functools.reduce(jnp.add, [out_BKPGH[:, :, p] * w[p][..., None] for p in range(P)])
    return total / functools.reduce(jnp.add, w)[..., None]


def decode_attention(qkv_BTRH, cos_BTh, sin_BTh, k_BKSH, v_BKSH, mask_B1TS, index, *,
                     kv_scales=(), scale: float | None = None, cap: float = 0.0,
                     ring: bool = False, block_k: int | None = None, num_warps: int = NUM_WARPS,
                     num_stages: int = NUM_STAGES, norm_x_BTD=None,
                     norm_eps: float = 1e-6, splits: int = 1):  # fmt: skip
    """One decode step of attention over a layer's (B, K, S, H) key and value caches.

    `qkv_BTRH`: this step's q, k and v heads before RoPE, concatenated on the head axis
    (N + 2K rows: the projections' one output, as XLA computes them with one merged matmul,
    so the kernel reads that buffer directly). RoPE (tables as `attention.rope_tables`) on q
    and k; k and v written at slot `index` (clamped to the buffer, as `dynamic_update_slice`
    would); attention over slots [0, index] under the step's boolean mask (B, 1, 1, S), logits
    q·k times `scale` (default head_dim^-1/2), soft-capped at `cap` (0 = not).
    With `ring`, the caches are a windowed layer's rings (`transformer.init_cache`): `index`
    is each row's own slot (B,), and attention covers every slot the mask lets through.
    `kv_scales` (key scales, value scales), (B, K, S, 1) float32 each: the caches are int8
    (`transformer.init_cache(..., "int8")`); the new key and value are quantized as
    `attention.quantize_kv` does and their scales written too.
    `block_k` (a power of two dividing the slots; default `block_for`'s: BLOCK_K, or less for
    a ring it does not divide), `num_warps`, `num_stages`: the kernel's tiling and Triton
    launch parameters (defaults: the module's constants). `splits` > 1:
    each (row, kv head) runs as that many programs over parts of its key blocks, joined after
    (split-K: more programs in flight when the batch × kv heads alone leave the GPU short).
    `norm_x_BTD` (B, 1, D), D a power of two (`norm_supports`): the layer's pre-norm is folded
    in — q|k|v are x·W' for the raw residual stream x and W' the norm's scale times W
    (`transformer.fold_norms`), and the kernel divides them by rms(x) (RMSNorm's, with
    `norm_eps`) before RoPE, so no norm kernel runs before the projection.
    Returns (out (B, 1, N, H), the caches: (keys, values) or (keys, values, key scales,
    value scales)).
    """
    B, T, R, H = qkv_BTRH.shape
    K, S = k_BKSH.shape[1], k_BKSH.shape[2]
    block_k = block_for(S) if block_k is None else block_k
    if int(splits) < 1:
        raise ValueError(f"decode_attention: splits must be >= 1 (parts per row and kv head), "
                         f"got {splits}")  # fmt: skip
    if block_k is None or not supports(S, T, H, block_k) or block_k & (block_k - 1) \
            or block_k < MIN_BLOCK_K:  # fmt: skip
        raise ValueError(f"decode_attention: needs 1 query, slots % block_k == 0 (block_k a "
                         f"power of two >= 16, {block_k}) and head dim 2^n >= 32, got {T}, "
                         f"{S}, {H}")  # fmt: skip
    index = jnp.clip(jnp.asarray(index, jnp.int32), 0, S - 1)
    args = (
        jnp.broadcast_to(index.reshape(-1, 1) if ring else index, (B, 1)),  # a slot per row
        qkv_BTRH.reshape(B, R, H),
        cos_BTh.reshape(B, H // 2),
        sin_BTh.reshape(B, H // 2),
        k_BKSH,
        v_BKSH,
        mask_B1TS.reshape(B, S).astype(jnp.int8),
        *(x.reshape(B, K, S) for x in kv_scales),  # (the kernel's (S,) blocks)
        *(() if norm_x_BTD is None else (norm_x_BTD.reshape(B, -1),)),
    )
    if norm_x_BTD is not None and not norm_supports(norm_x_BTD.shape[-1]):
        raise ValueError(f"decode_attention: a folded norm needs d_model a power of two >= 16, "
                         f"got {norm_x_BTD.shape[-1]}")  # fmt: skip

    scale = 1.0 / math.sqrt(H) if scale is None else float(scale)

    options = dict(
        scale=scale,
        cap=float(cap),
        ring=ring,
        block_k=int(block_k),
        num_warps=int(num_warps),
        num_stages=int(num_stages),
        norm_eps=None if norm_x_BTD is None else float(norm_eps),
        splits=int(splits),
    )

    def run(*a):
        return jax.lax.platform_dependent(
            *a,
            cuda=functools.partial(_call, interpret=False, **options),
            default=functools.partial(_call, interpret=True, **options),
        )

    batch_axes = _batch_axes()
    if batch_axes:  # under a mesh: each device runs the kernel on its rows (heads unsplit)
        rows = P(batch_axes)
        run = jax.shard_map(
            run,
            in_specs=(rows,) * len(args),
            out_specs=(rows,) * (3 + len(kv_scales)),  # the output, then the caches
            check_vma=False,
        )
    out, *caches = run(*args)
    caches[2:] = (x.reshape(B, K, S, 1) for x in caches[2:])
    return out.reshape(B, 1, R - 2 * K, H), tuple(caches)


def lowering_target(device_kind: str = "NVIDIA H200"):
    """Context to lower the kernel for a GPU this process does not have (an AOT compile, a
    test): since jax 0.11 Pallas-Triton lowering asks the default device for its GPU kind, and
    on a CPU-only machine an abstract mesh's device names it instead (jax 0.10 accepts it too).
    """
    target = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("target",), abstract_device=target)
    return jax.sharding.use_abstract_mesh(mesh)


def _batch_axes() -> tuple[str, ...]:
    """The mesh axes the batch is split over in the ambient mesh (`sharding.use_mesh`), those
    of size > 1; () without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = nn.logical_to_mesh_axes(("act_batch",))[0] or ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return tuple(a for a in axes if mesh.shape[a] > 1)


def norm_supports(d_model: int) -> bool:
    """Whether the kernel can fold a pre-norm over rows of `d_model` in (`decode_attention`'s
    `norm_x_BTD`): it loads a row whole, and Triton's tensors are powers of two."""
    return d_model >= 16 and d_model & (d_model - 1) == 0


def runs_natively(devices=None) -> bool:
    """Whether the kernel compiles to Triton for these devices (default: jax's): CUDA GPUs.
    Elsewhere (CPU, TPU, ROCm) it would run in Pallas' interpreter — right, but slow."""
    device = (devices if devices is not None else jax.devices())[0]
    if device.platform != "gpu":
        return False
    # jax names both CUDA and ROCm GPUs "gpu"; the client's platform version tells them apart
    # ("cuda 12080", "rocm 60342"). Read defensively: a runtime that does not say is taken
    # for CUDA, the one jax's GPU wheels target.
    version = str(getattr(getattr(device, "client", None), "platform_version", "")).lower()
    return "rocm" not in version


def mesh_supports() -> bool:
    """Whether the ambient mesh (if any) leaves the heads whole on each device: the kernel
    reads a row's q|k|v heads as one block, which tensor-parallel heads would split, and its
    cache's slots as one buffer, which context parallelism would split."""
    return logical_axes_unsplit("act_kv_heads", "act_heads", "act_len")
