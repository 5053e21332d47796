"""Mutation testing, round 6: models/rope.py, models/hf_rope.py and models/layers.py
behaviours the other tests left open, each against a reference written here (transformers'
formulas transcribed, hand-computed values), not against the code's own text."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.models import hf_rope
from flaxlm.models.config import ModelConfig
from flaxlm.models.hf_tokenizer import HFError
from flaxlm.models.rope import rope_inv_freq


def _yarn_reference(dim, base, factor, original, beta_fast, beta_slow, truncate):
    """transformers' `_compute_yarn_parameters` inverse frequencies, transcribed."""

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' linear_ramp_factor
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    extrapolation_factor = 1 - ramp
    return (1 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (
        1 / pos_freqs
    ) * extrapolation_factor


@pytest.mark.parametrize(
    "fast,slow,truncate",
    [(4.0, 4.0, False), (2.0, 2.0, False), (32.0, 16.0, True)],
)
def test_yarn_with_an_empty_ramp_is_a_step_not_a_division_by_zero(fast, slow, truncate):
    """Both ramp ends on one pair: beta_fast == beta_slow, or (32, 16) over a 64-token original
    context, where both pair indices fall below 0 and are clamped to pair 0. transformers then
    widens the ramp to a thousandth: pairs up to it keep their frequency, the later ones are
    divided by the factor; every frequency finite (0 / 0 made pair 0 NaN)."""
    cfg = ModelConfig(d_model=64, n_heads=4, head_dim=16, rope_theta=1e4, rope_scaling="yarn",
                      rope_scaling_factor=4.0, rope_original_max_len=64, rope_yarn_beta_fast=fast,
                      rope_yarn_beta_slow=slow, rope_yarn_truncate=truncate)  # fmt: skip
    got = rope_inv_freq(cfg)
    assert np.isfinite(got).all()
    want = _yarn_reference(16, 1e4, 4.0, 64, fast, slow, truncate)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    plain = 1 / 1e4 ** (np.arange(0, 16, 2) / 16)
    assert got[0] == pytest.approx(plain[0]) and got[-1] == pytest.approx(plain[-1] / 4)


@pytest.mark.parametrize("factor", [0.375, 0.625])
def test_an_odd_number_of_rotary_dims_is_refused(factor):
    """Rotate-half pairs dims i and i + R/2: R must be even (head_dim 8 x 0.375 = 3 dims)."""
    with pytest.raises(HFError, match="partial_rotary_factor"):
        hf_rope._rotary_dim({"partial_rotary_factor": factor}, 8, "config.json")
    assert hf_rope._rotary_dim({"partial_rotary_factor": 0.5}, 8, "config.json") == 4
    assert hf_rope._rotary_dim({}, 8, "config.json") == 0  # the whole head


def test_phi3_original_context_defaults_to_4096_as_phi3config_does():
    """Phi3Config's original_max_position_embeddings defaults to 4096: a Phi-3 config.json
    without one (anywhere) is read with 4096, not max_position_embeddings; other families
    fall back on max_position_embeddings."""
    rope = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}
    phi3 = {"model_type": "phi3", "max_position_embeddings": 131072, "rope_scaling": rope}
    got = hf_rope._rope_from_hf(phi3, "config.json")
    assert got["rope_original_max_len"] == 4096
    assert got["rope_scaling_factor"] == 32.0  # 131072 / 4096
    assert got["rope_attention_factor"] == pytest.approx(
        math.sqrt(1 + math.log(32) / math.log(4096))
    )
    other = {"model_type": "llama", "max_position_embeddings": 8192}
    assert hf_rope._original_len({}, other, "config.json") == 8192


def test_yarn_without_betas_or_truncate_takes_transformers_defaults():
    """transformers' YaRN defaults: beta_fast 32, beta_slow 1, truncate True."""
    got = hf_rope._rope_from_hf(
        {"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
        "config.json",
    )
    assert (got["rope_yarn_beta_fast"], got["rope_yarn_beta_slow"]) == (32.0, 1.0)
    assert got["rope_yarn_truncate"] is True
    assert got["rope_original_max_len"] == 4096
    assert got["rope_attention_factor"] == pytest.approx(0.1 * math.log(4.0) + 1)


def _silu(v):
    return v / (1 + np.exp(-v))


def test_transposed_gate_up_reads_gate_rows_first():
    """decode_mlp="pallas_t" params ("gate_up_t" (2F, D): gate's F rows, then up's, as
    transformer.transpose_gate_up writes them) give the plain SwiGLU on a prefill (T > 1, the
    XLA path): silu(x·G) ⊙ (x·U) · W_down."""
    from flaxlm.models.layers import MLP

    cfg = ModelConfig(d_model=16, n_heads=2, n_kv_heads=2, d_ff=24)
    rng = np.random.default_rng(0)
    g, u, d = (rng.normal(size=s).astype(np.float32) for s in ((16, 24), (16, 24), (24, 16)))
    x = rng.normal(size=(1, 3, 16)).astype(np.float32)
    params = {"gate_up_t": {"kernel": np.concatenate([g.T, u.T])}, "down": {"kernel": d}}
    got = MLP(cfg, decode_kernel="pallas_t").apply({"params": params}, jnp.asarray(x))
    want = (_silu(x @ g) * (x @ u)) @ d
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_tied_lm_head_computes_in_the_compute_dtype():
    """bf16 compute, fp32 master weights: the tied head's logits are the bf16 product of x and
    the table cast to bf16 (as the untied head's Proj computes), not a float32 copy of
    (B, T, V) logits."""
    from flaxlm.models.layers import Embed

    cfg = ModelConfig(vocab_size=64, d_model=16, n_heads=2, n_kv_heads=2, dtype="bfloat16")
    rng = np.random.default_rng(1)
    table = rng.normal(size=(64, 16)).astype(np.float32)
    x = jnp.asarray(rng.normal(size=(1, 2, 16)), jnp.bfloat16)
    got = Embed(cfg).apply({"params": {"embedding": table}}, x, method=Embed.attend)
    assert got.dtype == jnp.bfloat16
    t16 = np.asarray(jnp.asarray(table, jnp.bfloat16).astype(jnp.float32))
    want = np.asarray(x.astype(jnp.float32)) @ t16.T
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=2e-2, atol=2e-2)


def test_stacked_projection_adds_each_projections_bias():
    """Joined projections (fp32 master weights, bf16 math: q|k|v with Qwen2's biases, gate|up)
    equal the separate x·W + b of each, stacked (equal (D, F) kernels) or concatenated on the
    heads axis ((D, N, H) kernels of different N)."""
    from flaxlm.models.layers import stacked_projection

    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 8)).astype(np.float32)
    w = [(rng.normal(size=(8, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32))
         for _ in range(2)]  # fmt: skip
    y = np.asarray(stacked_projection(jnp.asarray(x), w, 1, (None, "mlp"), "mlp_in"))
    for i, (k, b) in enumerate(w):
        np.testing.assert_allclose(y[..., i, :], x @ k + b, rtol=1e-5, atol=1e-5)
    heads = [(rng.normal(size=(8, n, 4)).astype(np.float32), rng.normal(size=(n, 4)).astype(
        np.float32)) for n in (2, 1, 1)]  # fmt: skip
    y = np.asarray(stacked_projection(jnp.asarray(x), heads, 1, ("heads", "head_dim"), "qkv"))
    want = np.concatenate([np.einsum("btd,dnh->btnh", x, k) + b for k, b in heads], axis=2)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_a_scaled_local_rope_that_differs_from_the_global_one_is_refused():
    """Gemma 3 / OLMo 3 local layers take an unscaled RoPE of their own base only: a linear
    (or llama3) scaled sliding_attention RoPE unlike the full_attention one cannot be expressed
    and is an error, not silently dropped to unscaled."""
    full = {"rope_type": "default", "rope_theta": 1e6}
    for local in ({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                  {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}):  # fmt: skip
        hf = {"max_position_embeddings": 1024,
              "rope_parameters": {"full_attention": full, "sliding_attention": local}}  # fmt: skip
        with pytest.raises(HFError, match="sliding_attention"):
            hf_rope._rope_by_layer_type(hf, "gemma3_text", 512, 6, "config.json")
    local = {"rope_type": "default", "rope_theta": 1e4}
    hf = {"rope_parameters": {"full_attention": full, "sliding_attention": local}}
    got = hf_rope._rope_by_layer_type(hf, "gemma3_text", 512, 6, "config.json")
    assert got == {"rope_theta": 1e6, "rope_local_theta": 1e4}


def test_rope_parameters_win_over_rope_scaling_key_by_key():
    """A config.json with both layouts (older and newer transformers): the newer
    rope_parameters' values are read, rope_scaling fills only what it lacks."""
    hf = {
        "rope_theta": 1e4,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5},
    }
    got = hf_rope._rope_from_hf(hf, "config.json")
    assert got == {"rope_theta": 5e5, "rope_scaling": "linear", "rope_scaling_factor": 4.0}
    hf["rope_parameters"] = {"rope_theta": 5e5}  # (no type: the older layout's)
    assert hf_rope._rope_from_hf(hf, "config.json")["rope_scaling_factor"] == 2.0


def test_rms_norm_of_a_bf16_input_normalises_in_float32():
    """A bf16 residual stream (bf16 compute) is upcast before the mean of squares and the
    division, as HF Llama does (hidden_states.to(float32)); in bf16 throughout, ~1 in 7 of
    these outputs rounds differently. The same for the scale-less `rms_normalize`."""
    from flaxlm.models.layers import RMSNorm, rms_normalize

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 64)) * 3, jnp.bfloat16)
    cfg = ModelConfig(d_model=64, n_heads=2, n_kv_heads=2, dtype="bfloat16")
    x32 = np.asarray(x, np.float32)
    normed = x32 / np.sqrt((x32 * x32).mean(-1, keepdims=True) + cfg.norm_eps)
    want = np.asarray(jnp.asarray(normed, jnp.bfloat16), np.float32)
    got = RMSNorm(cfg).apply({"params": {"scale": np.ones(64, np.float32)}}, x)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=0)
    assert np.mean(np.asarray(got, np.float32) == want) > 0.97  # (rsqrt vs 1/sqrt: rare ulps)
    got = rms_normalize(x, cfg.norm_eps, jnp.bfloat16)
    assert np.mean(np.asarray(got, np.float32) == want) > 0.97
