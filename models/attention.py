"""Rotary embeddings, attention masks and grouped-query attention (xla or cuDNN kernels).

Shape legend: B batch, T query length, S key length, N query heads, K kv heads, G = N // K
query heads per kv head, H head dim, D model dim.

Masking works on three per-token arrays that every call carries:
  * segment ids — packed documents have ids 1, 2, ...; 0 marks padding. A query only sees keys
    of its own (non-zero) segment, so packed documents never attend to each other.
  * slots — where a token sits in the key/value buffer (its index in the row, or its cache slot
    while decoding); causality is `key slot <= query slot`.
  * positions — the token's position inside its document, used by RoPE and by the sliding
    window (`query pos - key pos < window`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.models import decode_attention as decode_kernel
from flaxlm.models import quant
from flaxlm.models import splash_attention as splash
from flaxlm.models.config import ModelConfig
from flaxlm.models.flash_attention import flash_attention
from flaxlm.models.layers import (
    Proj,
    ProjWeights,
    RMSNorm,
    joins_projections,
    rms_normalize,
    stacked_projection,
)
from flaxlm.models.sharding import logical_axes_unsplit, logical_axis_size

# ----------------------------------------------------------------------------------------------
# RoPE


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies θ^(-2i/R) of the R = rotary_dim rotated dims (all of head_dim
    unless partial), with optional linear, Llama-3, YaRN or (short) LongRoPE scaling."""
    H = cfg.rotary_dim_
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.float64) / H))
    if cfg.rope_scaling == "linear":
        inv_freq = inv_freq / cfg.rope_scaling_factor
    elif cfg.rope_scaling == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band in
        # between interpolated smoothly in 1/wavelength.
        factor, lo, hi = (
            cfg.rope_scaling_factor,
            cfg.rope_low_freq_factor,
            cfg.rope_high_freq_factor,
        )
        old_len = cfg.rope_original_max_len
        wavelen = 2 * math.pi / inv_freq
        low_freq_wavelen, high_freq_wavelen = old_len / lo, old_len / hi
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = np.where(medium, blended, scaled)
    elif cfg.rope_scaling == "yarn":
        inv_freq = _yarn_inv_freq(cfg, inv_freq)
    elif cfg.rope_scaling == "longrope":  # the short factors (rope_tables picks per forward)
        return longrope_inv_freqs(cfg)[0]
    return inv_freq.astype(np.float32)


def longrope_inv_freqs(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """LongRoPE's two sets of inverse frequencies, (short, long): θ^(-2i/R) / factor_i, as
    transformers computes them (float32 factors times the float32 powers)."""
    R = cfg.rotary_dim_
    powers = np.float32(cfg.rope_theta) ** (np.arange(0, R, 2).astype(np.float32) / np.float32(R))
    return tuple(
        (1.0 / (np.asarray(f, np.float32) * powers)).astype(np.float32)
        for f in (cfg.rope_short_factors, cfg.rope_long_factors)
    )


def _yarn_inv_freq(cfg: ModelConfig, inv_freq: np.ndarray) -> np.ndarray:
    """YaRN (Peng et al. 2023, "NTK-by-parts"): a frequency pair that turns more than
    beta_fast times over the original context keeps its frequency, one that turns fewer than
    beta_slow times is slowed by `factor` (interpolated), and the pairs in between blend
    linearly in the pair index."""
    H, factor, base = cfg.rotary_dim_, cfg.rope_scaling_factor, cfg.rope_theta

    def pair_index(turns: float) -> float:
        # the (fractional) pair whose wavelength fits `turns` times into the original context
        wavelengths = cfg.rope_original_max_len / (turns * 2 * math.pi)
        return H * math.log(wavelengths) / (2 * math.log(base))

    lo, hi = pair_index(cfg.rope_yarn_beta_fast), pair_index(cfg.rope_yarn_beta_slow)
    if cfg.rope_yarn_truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, H - 1)
    hi = hi + 0.001 if hi == lo else hi  # a one-point ramp would divide by zero
    ramp = np.clip((np.arange(H // 2, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
    return inv_freq / factor * ramp + inv_freq * (1.0 - ramp)


def rope_attention_factor(cfg: ModelConfig) -> float:
    """The factor YaRN multiplies cos and sin by (so attention logits by its square): the
    config's, or the paper's 0.1·ln(factor) + 1; 1 for other rope types."""
    if cfg.rope_scaling not in ("yarn", "longrope"):
        return 1.0
    if cfg.rope_attention_factor:
        return cfg.rope_attention_factor
    f = cfg.rope_scaling_factor
    if cfg.rope_scaling == "longrope":
        return 1.0 if f <= 1 else math.sqrt(1 + math.log(f) / math.log(cfg.rope_original_max_len))
    return 1.0 if f <= 1 else 0.1 * math.log(f) + 1.0


def local_rope_config(cfg: ModelConfig) -> ModelConfig:
    """The config whose RoPE the local layers of a mixed pattern use: Gemma 3's unscaled
    tables of base `rope_local_theta` (`cfg` itself without one)."""
    if not cfg.rope_local_theta:
        return cfg
    return cfg.replace(rope_theta=cfg.rope_local_theta, rope_scaling="none",
                       rope_scaling_factor=1.0)  # fmt: skip


def rope_tables(cfg: ModelConfig, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of position × frequency, (B, T, H/2), float32 (times YaRN's or LongRoPE's
    attention factor, as HF applies it). LongRoPE takes its long frequencies when the batch's
    largest position + 1 exceeds the original context, its short ones otherwise: transformers'
    choice, per forward (a decode step decides by its own positions)."""
    pos = positions_BT.astype(jnp.float32)[..., None]
    if cfg.rope_scaling == "longrope":
        short, long = longrope_inv_freqs(cfg)
        use_long = jnp.max(positions_BT) + 1 > cfg.rope_original_max_len
        angles = pos * jnp.where(use_long, jnp.asarray(long), jnp.asarray(short))
    else:
        angles = pos * jnp.asarray(rope_inv_freq(cfg))
    scale = rope_attention_factor(cfg)
    if scale == 1.0:
        return jnp.cos(angles), jnp.sin(angles)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x_BTNH: jax.Array, cos_BTh: jax.Array, sin_BTh: jax.Array) -> jax.Array:
    """Rotates pairs (x[i], x[i + R/2]) of the first R = 2·cos.shape[-1] dims — the "rotate
    half" layout HF checkpoints use; the dims after R pass unchanged (partial rotary)."""
    dtype, R = x_BTNH.dtype, 2 * cos_BTh.shape[-1]
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x[..., :R], 2, axis=-1)
    cos, sin = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., R:]], axis=-1)
    return out.astype(dtype)


# ----------------------------------------------------------------------------------------------
# Masks


def attention_mask(
    q_segment_BT, kv_segment_BS, q_slot_BT, kv_slot_BS, q_pos_BT, kv_pos_BS, window: int = 0
) -> jax.Array:
    """Boolean (B, 1, T, S): True where query t may attend to key s."""
    q_seg, kv_seg = q_segment_BT[:, :, None], kv_segment_BS[:, None, :]
    mask = (q_seg == kv_seg) & (q_seg != 0)
    mask &= kv_slot_BS[:, None, :] <= q_slot_BT[:, :, None]
    if window:
        mask &= (q_pos_BT[:, :, None] - kv_pos_BS[:, None, :]) < window
    return mask[:, None, :, :]


def write_rows(buf, new, slots_B, axis: int):
    """`buf` with row b's `new[b]` written at slot `slots_B[b]` of `axis` (an axis of a row,
    the batch axis left out): each row its own place, as a ring cache's decode step writes."""

    def one(row, value, slot):
        start = [0] * row.ndim
        start[axis] = slot
        return jax.lax.dynamic_update_slice(row, value, start)

    return jax.vmap(one)(buf, new, slots_B)


def quantize_kv(k_BTKH, v_BTKH):
    """An int8 cache's entries for new keys and values: (k int8, v int8, k scale, v scale),
    one float32 scale per token and head, max |x| / 127 over the head dim (models/quant.py's
    rounding: error ≤ scale / 2 per value)."""
    (kq, ks), (vq, vs) = (quant.quantize_kernel(x, (3,)) for x in (k_BTKH, v_BTKH))
    return kq, vq, ks, vs


# ----------------------------------------------------------------------------------------------
# Kernels


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


# Query rows per block of `chunked_attention`.
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
    chunk = chunk or ATTENTION_CHUNK
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
    its (chunk × S) scores. `packed` is (segment ids, positions) (B, S) or None."""
    B, T, N, H = q_BTNH.shape
    L = T // C
    split = ("act_batch", "act_len", None)

    def rows_of(x, tail):  # (B, C, L|S, ...) -> (B·C, ...), each device its own stretch c
        x = nn.with_logical_constraint(x, split + tail)
        return x.reshape(B * C, *x.shape[2:])

    def spread(x, tail=()):  # a row's keys (B, S, ...) to each of its C stretches
        return rows_of(jnp.broadcast_to(x[:, None], (B, C, *x.shape[1:])), tail)

    heads = ("act_heads", "head_dim")
    q = rows_of(q_BTNH.reshape(B, C, L, N, H), heads)
    k, v = (spread(x, ("act_kv_heads", "head_dim")) for x in (k_BSKH, v_BSKH))
    q_rows = rows_of(jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32).reshape(C, L), (B, C, L)), ())
    seg_pos = () if packed is None else tuple(spread(x) for x in packed)
    out = flash_attention(q, k, v, *seg_pos, q_rows_BT=q_rows, window=window, scale=scale,
                          cap=cap, block=block)  # fmt: skip
    out = nn.with_logical_constraint(out.reshape(B, C, L, N, H), split + heads)
    return out.reshape(B, T, N, H)


def cached_attention(q_BTNH, k_BKSH, v_BKSH, mask_B1TS, scale=None, cap: float = 0.0,
                     kv_scales=()) -> jax.Array:  # fmt: skip
    """Attention over a heads-major (B, K, S, H) KV cache, laid out for few queries: each kv
    head's G query heads × T positions are the rows of one (G·T, H) × (H, S) matmul with (B, K)
    as batch dims, so a decode step reads the cache in place (no transpose of the buffer), and
    the scores leave the matmul in float32 with S minor, so the masked softmax is one row-wise
    fusion instead of separate max / sum / normalise passes. Compiled for the H200
    (bench/gpu_aot.py) that is 2 kernels fewer per layer and decode step than `xla_attention`'s
    layout (44 fewer per step at the 1.1B shape).

    `kv_scales` (k_scale, v_scale), (B, K, S, 1) each: the cache holds int8 keys and values
    (`quantize_kv`; passed here converted to q's dtype), each slot's and head's to be
    multiplied by its scale. The scales multiply the score columns and the probabilities
    instead, (q · k_s) s_k and Σ_s (p_s s_v) v_s: the same sums, with no dequantized copy
    of the cache."""
    B, T, N, H = q_BTNH.shape
    K, S = k_BKSH.shape[1], k_BKSH.shape[2]
    G = N // K
    q = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    scores = jnp.einsum("bkmh,bksh->bkms", q, k_BKSH, preferred_element_type=jnp.float32)
    if kv_scales:
        k_scale, v_scale = (x[..., 0][:, :, None, :].astype(jnp.float32) for x in kv_scales)
        scores = scores * k_scale
    mask = jnp.broadcast_to(mask_B1TS[:, :, None], (B, 1, G, T, S)).reshape(B, 1, G * T, S)
    scores = scores / math.sqrt(H) if scale is None else scores * scale
    scores = jnp.where(mask, softcap(scores, cap), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if kv_scales:
        probs = probs * v_scale
    probs = probs.astype(v_BKSH.dtype)
    out = jnp.einsum("bkms,bksh->bkmh", probs, v_BKSH)  # (B, K, G·T, H), row m = g·T + t
    return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


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


def cudnn_attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, window: int = 0, scale=None
                    ) -> jax.Array:  # fmt: skip
    """cuDNN flash attention (NVIDIA GPUs). Pure causal rows take the fast CAUSAL mask type."""
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
        q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS, scale=scale, implementation="cudnn"
    )


def layer_context(cfg: ModelConfig, ctx: dict, kind: dict) -> dict:
    """One layer's view of the shared per-forward values: its rope tables, mask and window.

    `kind` is `cfg.layer_kind(i)`: Python bools when layers are unrolled, traced ones when
    they are scanned (then the layer selects elementwise). With local and global layers mixed
    (`cfg.sliding_window_pattern`), `ctx` holds both kinds' masks ("mask" global,
    "mask_local") and, with `rope_local_theta`, both kinds' tables ("cos_local", "sin_local");
    a scanned layer without masks (plain causal rows) gets "window" None and `by_window`
    branches on its "local". Over ring caches (`transformer.init_cache(..., rings=True)`) a
    windowed layer also gets "ring_slot" (a decode step) or "ring_src" (a prefill): where
    each row writes into its ring. A NoPE layer (`cfg.nope_layer_interval`) gets the identity
    rotation, cos 1 and sin 0 (exact: x·1 − y·0 = x). Otherwise every layer sees `ctx` as is."""
    ring = ("ring_slot", "ring_src")
    out = {k: v for k, v in ctx.items()
           if k not in ("mask_local", "cos_local", "sin_local", *ring)}  # fmt: skip
    out["window"] = cfg.sliding_window
    local, nope = kind.get("local"), kind.get("nope")

    def pick(flag, when_set, otherwise):
        if isinstance(flag, bool):
            return when_set if flag else otherwise
        return jnp.where(flag, when_set, otherwise)

    if local is not None:
        pairs = [("mask", "mask_local")] + (
            [("cos", "cos_local"), ("sin", "sin_local")] if "cos_local" in ctx else [])  # fmt: skip
        for glob, loc in pairs:
            if ctx[glob] is not None:
                out[glob] = pick(local, ctx[loc], ctx[glob])
        if isinstance(local, bool):
            out["window"] = cfg.sliding_window if local else 0
        else:
            out["window"], out["local"] = None, local
    if out["window"]:  # a windowed layer's ring cache, if any
        out.update({k: ctx[k] for k in ring if k in ctx})
    if nope is not None:
        out["cos"] = pick(nope, jnp.ones_like(out["cos"]), out["cos"])
        out["sin"] = pick(nope, jnp.zeros_like(out["sin"]), out["sin"])
    return out


def by_window(cfg: ModelConfig, ctx: dict, attend):
    """`attend(window)` for this layer: with its static window, or (a scanned layer of a mixed
    pattern, kind traced) with the local or the global one by `lax.cond` — both kernels
    compiled, one run, and the fast causal(+window) modes kept, no (B, T, T) masks built. An
    explicit mask already carries the layer's window: window 0 then (packed rows under
    attention_impl="flash" carry per-token ids instead, `ctx["segments"]`, and need theirs)."""
    if ctx["window"] is not None:
        return attend(ctx["window"])
    if ctx["mask"] is not None:
        return attend(0)
    return jax.lax.cond(ctx["local"], lambda: attend(cfg.sliding_window), lambda: attend(0))


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


def causal_mask(T: int, S: int, window: int, start=0) -> jax.Array:
    """(1, 1, T, S): key s visible to query t (both from 0; the queries' from `start`) when
    s <= t (and t - s < window)."""
    rows = start + jnp.arange(T)[:, None]
    mask = jnp.arange(S)[None, :] <= rows
    if window:
        mask &= (rows - jnp.arange(S)[None, :]) < window
    return mask[None, None]


# ----------------------------------------------------------------------------------------------
# Module


class Attention(nn.Module):
    """Multi-head / grouped-query / multi-query self-attention with RoPE and an optional cache.

    `ctx` is the layer's view (`layer_context`) of what every layer shares (computed once per
    forward in transformer.py): rope `cos`/`sin`, the boolean `mask` (None = plain causal
    rows, no packing), the layer's sliding `window` (0 = none) and while decoding the cache
    write `index`. `layer_cache` is the layer's (keys, values) buffers,
    heads-major, (B, K, S, H) each, or None.

    `fused` reads q, k and v from one (D, N + 2K, H) kernel "qkv" (one matmul instead of three;
    the layout `fuse_projections` in transformer.py makes for decoding). `decode_attention`
    "pallas" runs one-token steps over the cache — RoPE, cache write, attention over the
    written slots — as one kernel (models/decode_attention.py; the cache length must be a
    multiple of its BLOCK_K, which `generate` arranges); other shapes keep the XLA path.
    "pallas:BK:W:S" runs it with key block BK, W warps and S stages (`variant_options`).

    `norm_eps` (not None): x is the raw residual stream and the pre-norm's scale is folded into
    the q|k|v weights (`transformer.fold_norms`, `generate(..., decode_norm="fold")`): the
    decode kernel divides q|k|v by rms(x) itself (`decode_attention.norm_supports`: d_model a
    power of two); every other path normalises x (unscaled) first.
    """

    cfg: ModelConfig
    fused: bool = False
    decode_attention: str = "xla"  # xla | pallas | pallas:BK:W:S

    @nn.compact
    def __call__(self, x_BTD, ctx, layer_cache=None, norm_eps: float | None = None):
        cfg = self.cfg
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim_
        bias = cfg.qkv_bias
        kernel_options = (decode_kernel.variant_options(self.decode_attention)
                          if self.decode_attention.startswith("pallas") else None)  # fmt: skip
        T = x_BTD.shape[1]
        runs_kernel = (layer_cache is not None and kernel_options is not None
                       and cfg.rotary_dim_ == H  # the kernel rotates whole heads
                       and decode_kernel.supports(layer_cache[0].shape[2], T, H,
                                                  kernel_options.get("block_k",
                                                                     decode_kernel.BLOCK_K))
                       and decode_kernel.mesh_supports())  # fmt: skip
        norm_x = None  # the raw input whose rms the kernel divides by
        if norm_eps is not None:
            if runs_kernel and decode_kernel.norm_supports(D):
                norm_x = x_BTD
            else:
                x_BTD = rms_normalize(x_BTD, norm_eps, cfg.compute_dtype)
        if self.fused:
            qkv = Proj(
                (D, N + 2 * K, H),
                ("embed", "qkv_heads", "head_dim"),
                cfg,
                use_bias=bias,
                name="qkv",
                remat_name="qkv",
            )(x_BTD)
            q, k, v = jnp.split(qkv, [N, N + K], axis=2)
        elif joins_projections(cfg) and logical_axes_unsplit("q_heads", "kv_heads"):
            # The per-step cast writes q|k|v joined: one matmul each way (layers.MLP says why);
            # not with heads split over devices, where joining them would move data.
            weights = [
                ProjWeights((D, n, H), ("embed", axis, "head_dim"), cfg, use_bias=bias, name=name)()
                for name, (n, axis) in self._heads().items()
            ]
            qkv = stacked_projection(x_BTD, weights, 1, ("qkv_heads", "head_dim"), "qkv")
            q, k, v = jnp.split(qkv, [N, N + K], axis=2)
        else:
            q, k, v = (
                Proj(
                    (D, n, H),
                    ("embed", axis, "head_dim"),
                    cfg,
                    use_bias=bias,
                    name=name,
                    remat_name="qkv",
                )(x_BTD)
                for name, (n, axis) in self._heads().items()
            )
        if cfg.qk_norm == "head":  # Qwen3: each head's q and k normalised over head_dim
            q = RMSNorm(cfg, name="q_norm")(q)
            k = RMSNorm(cfg, name="k_norm")(k)
        elif cfg.qk_norm == "all":  # OLMo 2: q and k each normalised over all their heads
            q = RMSNorm(cfg, name="q_norm")(q.reshape(*q.shape[:2], -1)).reshape(q.shape)
            k = RMSNorm(cfg, name="k_norm")(k.reshape(*k.shape[:2], -1)).reshape(k.shape)
        q = nn.with_logical_constraint(q, ("act_batch", "act_len", "act_heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("act_batch", "act_len", "act_kv_heads", "head_dim"))
        # (v too: under context parallelism the partitioner would otherwise gather the layer's
        # input x and project the whole sequence's values on every device)
        v = nn.with_logical_constraint(v, ("act_batch", "act_len", "act_kv_heads", "head_dim"))
        # logits' scale: None = head_dim^-1/2 as it always was (divided, bit for bit)
        scale, cap = (cfg.attn_scale if cfg.query_pre_attn_scalar else None), cfg.attn_logit_softcap
        if runs_kernel:
            # One kernel: RoPE, the cache write and attention over the written slots.
            qkv = jnp.concatenate([q, k, v], axis=2)  # the merged projection's own output
            ring = "ring_slot" in ctx  # a windowed layer's ring: each row's own slot
            out, layer_cache = decode_kernel.decode_attention(
                qkv,
                ctx["cos"],
                ctx["sin"],
                *layer_cache[:2],
                ctx["mask"],
                ctx["ring_slot"] if ring else ctx["index"],
                kv_scales=layer_cache[2:],  # an int8 cache's
                scale=cfg.attn_scale,
                cap=cap,
                ring=ring,
                norm_x_BTD=norm_x,
                norm_eps=norm_eps or 0.0,
                **kernel_options,
            )
            return self._out_proj(out), layer_cache
        q = apply_rope(q, ctx["cos"], ctx["sin"])
        k = apply_rope(k, ctx["cos"], ctx["sin"])

        if layer_cache is not None:
            # Write this chunk's keys and values at the cache index (in place), then attend
            # over the whole buffer (the mask hides unwritten slots). A windowed layer's ring
            # (`transformer.init_cache`) takes a prefill's last W tokens of each row, and a
            # decode step's one token at that row's own slot. An int8 cache (4 buffers) takes
            # each token's and head's int8 values and their scale alike.
            new = (k, v) if len(layer_cache) == 2 else quantize_kv(k, v)
            new = [x.transpose(0, 2, 1, 3).astype(buf.dtype) for buf, x in zip(layer_cache, new)]
            if "ring_src" in ctx:
                src, held = (x[:, None, :, None] for x in ctx["ring_src"])  # (B, 1, W, 1)
                layer_cache = tuple(
                    jnp.where(held, jnp.take_along_axis(x, src, axis=2), 0).astype(x.dtype)
                    for x in new
                )
            elif "ring_slot" in ctx or jnp.ndim(ctx["index"]) == 1:
                # each row writes at its own slot (a ring's, or speculative decoding's)
                slots = ctx["ring_slot"] if "ring_slot" in ctx else ctx["index"]
                layer_cache = tuple(write_rows(buf, x, slots, axis=1)
                                    for buf, x in zip(layer_cache, new))  # fmt: skip
            else:
                idx = ctx["index"]
                layer_cache = tuple(jax.lax.dynamic_update_slice(buf, x, (0, 0, idx, 0))
                                    for buf, x in zip(layer_cache, new))  # fmt: skip
            if ctx.get("prefill"):  # an empty cache, right-padded prompts: plain causal rows
                out = self._self_attention(q, k, v, ctx, scale, cap)
            else:
                ck, cv, *kv_scales = layer_cache
                out = cached_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), ctx["mask"],
                                       scale, cap, kv_scales)  # fmt: skip
        else:
            out = self._self_attention(q, k, v, ctx, scale, cap)
        return self._out_proj(out), layer_cache

    def _self_attention(self, q, k, v, ctx, scale, cap):
        """Attention of the chunk's queries over its own keys (training, scoring, and a
        prefill into an empty cache): the blockwise kernel where the config asks for "flash"
        (models/flash_attention.py); cuDNN's flash kernel where the config asks for it and it
        applies; the blockwise kernel for every other prefill (inference: a long prompt's
        float32 scores one (block × block) tile at a time, the causal half skipped); XLA in
        blocks of query rows where cuDNN is asked for but cannot run (soft-capped logits, a
        head dim it does not take); else plain XLA. Under context parallelism, blocks of each
        device's own rows (`context_attention`, `context_flash_attention`)."""
        cfg = self.cfg
        split = not logical_axes_unsplit("act_len")  # context parallelism
        k, v = gather_sequence(k), gather_sequence(v)
        T, S = q.shape[1], k.shape[1]
        packed = ctx.get("segments")  # (segment ids, positions) of packed rows (flash, splash)

        def mask_of(window):  # the (B|1, 1, T, S) mask the kernels imply
            if packed is not None:
                seg, pos = packed
                slot = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), seg.shape)
                return attention_mask(seg, seg, slot, slot, pos, pos, window)
            return causal_mask(T, S, window) if ctx["mask"] is None else ctx["mask"]

        if cfg.attention_impl == "splash" and not split and splash.supports(T, cfg.flash_block):
            seg = None if packed is None else packed[0]
            out = by_window(cfg, ctx, lambda w: splash.splash_attention(
                q, k, v, seg, window=w, scale=scale, cap=cap, block=cfg.flash_block))  # fmt: skip
            self._sow_probs(q, k, ctx, mask_of, scale, cap)
            return out
        if cfg.attention_impl in ("flash", "splash") and not split:
            # (splash: rows it does not take; the same function)
            out = by_window(cfg, ctx, lambda w: flash_attention(
                q, k, v, *(packed or ()), window=w, scale=scale, cap=cap,
                block=cfg.flash_block))  # fmt: skip
            self._sow_probs(q, k, ctx, mask_of, scale, cap)
            return out
        if (cfg.attention_impl == "cudnn" and not cap and not split
                and cudnn_supports_head_dim(q.shape[-1])):  # fmt: skip
            return by_window(cfg, ctx, lambda w: cudnn_attention(q, k, v, ctx["mask"], w, scale))
        C = logical_axis_size("act_len")
        if split and T % C == 0:
            # cuDNN's partitioner refuses queries split along the sequence, and the row blocks
            # below would gather them: each device's own rows, in blocks (`context_attention`)
            if cfg.attention_impl in ("flash", "splash"):
                return by_window(cfg, ctx, lambda w: context_flash_attention(
                    q, k, v, packed, w, C, scale, cap, cfg.flash_block))  # fmt: skip
            return by_window(cfg, ctx, lambda w: context_attention(
                q, k, v, ctx["mask"], w, C, scale, cap))  # fmt: skip
        if ctx.get("prefill"):
            # inference over plain causal rows: the blockwise kernel's forward, (block × block)
            # score tiles, the causal half and what windows hide skipped (a 4096-token prompt:
            # bench/RESULTS.md "prefill")
            return by_window(cfg, ctx, lambda w: flash_attention(
                q, k, v, window=w, scale=scale, cap=cap, block=cfg.flash_block))  # fmt: skip
        if cfg.attention_impl == "cudnn":

            def rows_of(window):
                def mask_fn(start, rows):
                    if ctx["mask"] is None:
                        return causal_mask(rows, S, window, start)
                    return jax.lax.dynamic_slice_in_dim(ctx["mask"], start, rows, axis=2)

                return mask_fn

            return by_window(cfg, ctx, lambda w: chunked_attention(
                q, k, v, rows_of(w), scale, cap))  # fmt: skip

        out = by_window(cfg, ctx, lambda w: xla_attention(q, k, v, mask_of(w), scale, cap))
        self._sow_probs(q, k, ctx, mask_of, scale, cap)
        return out

    def _sow_probs(self, q, k, ctx, mask_of, scale, cap):
        """Inspection only (apply(..., mutable="intermediates")): the attention weights as
        (B, N, T, S), sown as "attn_probs" (head n = k·G + g)."""
        if self.is_mutable_collection("intermediates"):
            (B, T, N, _), S = q.shape, k.shape[1]
            probs = by_window(self.cfg, ctx,
                              lambda w: attention_probs(q, k, mask_of(w), scale, cap))  # fmt: skip
            self.sow("intermediates", "attn_probs", probs.reshape(B, N, T, S))

    def _heads(self) -> dict:
        cfg = self.cfg
        return {"q": (cfg.n_heads, "q_heads"), "k": (cfg.n_kv_heads, "kv_heads"),
                "v": (cfg.n_kv_heads, "kv_heads")}  # fmt: skip

    def _out_proj(self, out_BTNH):
        cfg = self.cfg
        names = ("act_batch", "act_len", "act_heads", "head_dim")
        out = nn.with_logical_constraint(out_BTNH, names)
        shape = (cfg.n_heads, cfg.head_dim_, cfg.d_model)
        names = ("q_heads", "head_dim", "embed")
        return Proj(shape, names, cfg, n_in=2, name="o", remat_name="attn_out")(out)
