"""Rotary position embeddings (RoPE): the inverse frequencies of every scaling a checkpoint can
name (none, linear, Llama 3, YaRN, LongRoPE), the attention factor YaRN and LongRoPE scale
cos and sin by, the local layers' config (Gemma 3), the per-forward cos/sin tables and the
rotation itself.

Separate from models/attention.py because it is position maths with no attention in it:
transformer.py builds the tables once per forward, hf_rope.py reads `rope_attention_factor`,
and the decode kernel (models/decode_attention.py) takes the same tables. `Attention` imports
`apply_rope` from here (it looks it up through `flaxlm.models.attention`, where tests patch it).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.models.config import ModelConfig


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
    elif cfg.rope_scaling == "longrope":  # the short factors (`longrope_long` picks per row)
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
    config's, or the paper's 0.1·ln(factor) + 1; LongRoPE's sqrt(1 + ln(factor) / ln(original
    context)), its factor max_seq_len / rope_original_max_len where none is set (as
    transformers defaults it); 1 for other rope types."""
    if cfg.rope_scaling not in ("yarn", "longrope"):
        return 1.0
    if cfg.rope_attention_factor:
        return cfg.rope_attention_factor
    f = cfg.rope_scaling_factor
    if cfg.rope_scaling == "longrope":
        if f <= 1:  # not given (a hand-built config): transformers' default, context / original
            f = cfg.max_seq_len / cfg.rope_original_max_len
        return 1.0 if f <= 1 else math.sqrt(1 + math.log(f) / math.log(cfg.rope_original_max_len))
    return 1.0 if f <= 1 else 0.1 * math.log(f) + 1.0


def local_rope_config(cfg: ModelConfig) -> ModelConfig:
    """The config whose RoPE the local layers of a mixed pattern use: Gemma 3's unscaled
    tables of base `rope_local_theta` (`cfg` itself without one)."""
    if not cfg.rope_local_theta:
        return cfg
    return cfg.replace(rope_theta=cfg.rope_local_theta, rope_scaling="none",
                       rope_scaling_factor=1.0)  # fmt: skip


def rope_tables(cfg: ModelConfig, positions_BT: jax.Array, segment_ids_BT=None, *,
                per_token: bool = False) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """cos and sin of position × frequency, (B, T, H/2), float32 (times YaRN's or LongRoPE's
    attention factor, as HF applies it). LongRoPE's short or long frequencies: `longrope_long`."""
    pos = positions_BT.astype(jnp.float32)[..., None]
    if cfg.rope_scaling == "longrope":
        short, long = longrope_inv_freqs(cfg)
        use_long = longrope_long(cfg, positions_BT, segment_ids_BT, per_token)[..., None]
        angles = pos * jnp.where(use_long, jnp.asarray(long), jnp.asarray(short))
    else:
        angles = pos * jnp.asarray(rope_inv_freq(cfg))
    scale = rope_attention_factor(cfg)
    if scale == 1.0:
        return jnp.cos(angles), jnp.sin(angles)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def longrope_long(cfg: ModelConfig, positions_BT: jax.Array, segment_ids_BT=None,
                  per_token: bool = False) -> jax.Array:  # fmt: skip
    """Whether LongRoPE rotates by its long factors, (B, 1) per row or (B, T) per token.

    transformers decides once per forward, by the batch's largest position + 1 against the
    original context. Taken over a batch, that lets padding and batch mates choose: a prompt
    in a prefill bucket wider than the original context, or next to a longer prompt, got the
    long factors a forward over its own tokens would not use, so its output depended on the
    bucket and the batch. Here each row decides by its own largest real position (segment id
    > 0; padding has 0): on one unpadded sequence, transformers' choice. A packed row's
    documents share their row's choice.

    `per_token` (cached decode steps and speculative chunks): each token decides by its own
    position, as the forward that ends at it would — a one-token step is its row's decision,
    and a chunk of drafts then rotates each token as plain decoding would have. Keys already
    in the cache keep the rotation of the step that wrote them (transformers' Phi-3 `generate`
    instead recomputes its whole cache once a sequence outgrows the original context).
    """
    if per_token:
        reach = positions_BT
    else:
        real = positions_BT  # (no segment ids: every token is real)
        if segment_ids_BT is not None:
            real = jnp.where(segment_ids_BT > 0, positions_BT, -1)
        reach = jnp.max(real, axis=-1, keepdims=True)
    return reach + 1 > cfg.rope_original_max_len


def apply_rope(x_BTNH: jax.Array, cos_BTh: jax.Array, sin_BTh: jax.Array) -> jax.Array:
    """Rotates pairs (x[i], x[i + R/2]) of the first R = 2·cos.shape[-1] dims — the "rotate
    half" layout HF checkpoints use; the dims after R pass unchanged (partial rotary)."""
    dtype, R = x_BTNH.dtype, 2 * cos_BTh.shape[-1]
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x[..., :R], 2, axis=-1)
    cos, sin = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., R:]], axis=-1)
    return out.astype(dtype)
