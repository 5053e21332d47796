"""Int8 KV cache (`generate(..., cache_dtype="int8")`, `transformer.init_cache`): the rounding
bound, that attention through the scales equals attention over the dequantized cache, that a
decode computes exactly the model whose decode-step attention reads quantized keys and values
(rings, mixed local/global layers, shared prefills, speculative decoding and a mesh included),
that the Pallas decode kernel reads the cache as the XLA path does, and the cache's size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.models import attention
from flaxlm.models.config import get_variant
from flaxlm.models.decode import generate
from flaxlm.models.sharding import logical_axis_rules, make_mesh
from flaxlm.models.transformer import init_cache
from flaxlm.train.pretrain import model_fns


def _params(cfg, seed=0):
    boxed = model_fns(cfg)[0](jax.random.PRNGKey(seed))
    return jax.tree.map(lambda x: getattr(x, "value", x), boxed,
                        is_leaf=lambda x: hasattr(x, "value"))  # fmt: skip


def _dequantize(x_q, scale):
    return x_q.astype(jnp.float32) * scale


def test_rounding_bound_and_attention_through_the_scales():
    rng = np.random.default_rng(0)
    B, T, S, N, K, H = 2, 3, 10, 4, 2, 8
    k, v = (jnp.asarray(rng.normal(size=(B, S, K, H)) * rng.uniform(0.1, 5, (B, S, K, 1)),
                        jnp.float32) for _ in range(2))  # fmt: skip
    kq, vq, ks, vs = attention.quantize_kv(k, v)
    assert kq.dtype == jnp.int8 and ks.shape == (B, S, K, 1)
    for x, xq, s in ((k, kq, ks), (v, vq, vs)):
        assert bool(jnp.all(jnp.abs(_dequantize(xq, s) - x) <= s / 2 + 1e-6))
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    mask = jnp.asarray(rng.random((B, 1, T, S)) < 0.7).at[..., 0].set(True)
    heads = [x.transpose(0, 2, 1, 3) for x in (kq, vq, ks, vs)]  # the cache's (B, K, S, ·)
    got = attention.cached_attention(q, heads[0].astype(q.dtype), heads[1].astype(q.dtype),
                                     mask, 0.3, 20.0, heads[2:])  # fmt: skip
    want = attention.cached_attention(
        q, _dequantize(heads[0], heads[2]), _dequantize(heads[1], heads[3]), mask, 0.3, 20.0
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def _reference_logprobs(cfg, params, prompt, generated, monkeypatch):
    """Logprobs of `generated` after `prompt` under the model an int8-cache decode computes:
    the prompt's rows attend over its own float keys and values (the prefill), every later row
    over quantized ones (decode steps read the cache), by a full forward."""
    n = len(prompt)
    real = attention.Attention._self_attention

    def mixed(self, q, k, v, ctx, scale, cap):
        kq, vq, ks, vs = attention.quantize_kv(k, v)
        quantized = real(self, q, _dequantize(kq, ks), _dequantize(vq, vs), ctx, scale, cap)
        rows = jnp.arange(q.shape[1])[None, :, None, None]
        return jnp.where(rows < n, real(self, q, k, v, ctx, scale, cap), quantized)

    seq = jnp.asarray([list(prompt) + list(generated)])
    with monkeypatch.context() as m:
        m.setattr(attention.Attention, "_self_attention", mixed)
        logits = jax.jit(lambda p, t: model_fns(cfg)[1](p, t))(params, seq)
    logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), -1)
    float_logp = jax.nn.log_softmax(model_fns(cfg)[1](params, seq)[0], -1)
    at = [(n - 1 + i, t) for i, t in enumerate(generated)]
    return (np.asarray([logp[p, t] for p, t in at]),
            np.asarray([float_logp[p, t] for p, t in at]))  # fmt: skip


GEMMA2_LIKE = dict(sliding_window=4, sliding_window_pattern=2, attn_logit_softcap=30.0,
                   n_layers=4)  # fmt: skip


@pytest.mark.parametrize(
    "overrides, samples",
    [({}, 1),
     # rings of 4 slots for the local layers, soft-capped logits; one prefill for 2 samples
     (GEMMA2_LIKE, 2)],
)  # fmt: skip
def test_decode_is_the_quantized_cache_model(overrides, samples, monkeypatch):
    cfg = get_variant("tiny", init_std=0.2, **overrides)
    params = _params(cfg)
    prompts = [[5, 9, 33, 2, 7, 1, 8], [11, 4]]
    out = generate(cfg, params, prompts, max_new_tokens=8, rng=jax.random.PRNGKey(1),
                   temperature=1.0, cache_dtype="int8", num_samples=samples)  # fmt: skip
    far = 0.0
    for row in range(len(prompts) * samples):
        prompt = prompts[row // samples]
        n_out = int(out.lengths[row])
        generated = np.asarray(out.tokens[row][:n_out]).tolist()
        want, float_want = _reference_logprobs(cfg, params, prompt, generated, monkeypatch)
        np.testing.assert_allclose(np.asarray(out.logprobs[row][:n_out]), want, atol=2e-3)
        far = max(far, float(np.max(np.abs(want - float_want))))
    assert far > 2e-2  # the quantized keys and values are not the float model's


def _greedy(cfg, params, **kw):
    return generate(cfg, params, [[5, 9, 33, 2], [11, 4, 6]], max_new_tokens=10,
                    rng=jax.random.PRNGKey(0), temperature=0.0, **kw)  # fmt: skip


def test_speculative_and_mesh_decode_the_same_tokens():
    from flaxlm.models.speculative import speculative_generate

    cfg = get_variant("tiny", init_std=0.1)
    params = _params(cfg)
    want = _greedy(cfg, params, cache_dtype="int8")
    spec = speculative_generate(cfg, params, cfg, params, [[5, 9, 33, 2], [11, 4, 6]],
                                max_new_tokens=10, draft_tokens=3,
                                rng=jax.random.PRNGKey(0), temperature=0.0,
                                cache_dtype="int8")  # fmt: skip
    np.testing.assert_array_equal(np.asarray(spec.tokens), np.asarray(want.tokens))
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = _greedy(cfg, params, cache_dtype="int8", mesh=mesh,
                      rules=logical_axis_rules("fsdp_tp"))  # fmt: skip
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(want.logprobs), atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 64, "sliding_window_pattern": 2,
                                               "attn_logit_softcap": 30.0}])  # fmt: skip
def test_pallas_kernel_reads_an_int8_cache_as_the_xla_path(overrides):
    """`decode_attention="pallas"` over an int8 cache (the kernel quantizes the new token and
    reads the blocks through their scales; Pallas' interpreter on this CPU): the tokens and
    logprobs of the XLA path. Head dim 32 (the kernel's smallest); a window of 64 runs the
    kernel over the local layers' rings too."""
    cfg = get_variant("tiny", head_dim=32, init_std=0.1, **overrides)
    params = _params(cfg)
    kw = dict(cache_dtype="int8", max_new_tokens=70 if overrides else 10)
    want = generate(cfg, params, [[5, 9, 33, 2], [11, 4, 6]], rng=jax.random.PRNGKey(0),
                    temperature=0.0, decode_attention="xla", **kw)  # fmt: skip
    got = generate(cfg, params, [[5, 9, 33, 2], [11, 4, 6]], rng=jax.random.PRNGKey(0),
                   temperature=0.0, decode_attention="pallas", **kw)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-4)


def test_pallas_kernel_lowers_with_int8_caches_in_place():
    """Lowered for CUDA (no GPU needed): one Triton call, the int8 caches and their scales all
    updated in place."""
    from flaxlm.models import decode_attention as kernel

    shapes = [((2, 1, 16, 64), jnp.bfloat16), ((2, 1, 32), jnp.float32),
              ((2, 1, 32), jnp.float32), ((2, 2, 128, 64), jnp.int8),
              ((2, 2, 128, 64), jnp.int8), ((2, 1, 1, 128), jnp.bool_), ((), jnp.int32),
              ((2, 2, 128, 1), jnp.float32), ((2, 2, 128, 1), jnp.float32)]  # fmt: skip
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]

    def step(*a):
        return kernel.decode_attention(*a[:7], kv_scales=a[7:])

    with kernel.lowering_target():
        text = jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert text.count("output_operand_alias<") == 4


def test_cache_size_and_bad_options():
    cfg = get_variant("tiny", head_dim=64, dtype="bfloat16")
    nbytes = [sum(x.nbytes for x in jax.tree.leaves(init_cache(cfg, 4, 128, dt)["kv"]))
              for dt in ("bfloat16", "int8")]  # fmt: skip
    assert nbytes[1] / nbytes[0] == pytest.approx((64 + 4) / (2 * 64))
    params = _params(get_variant("tiny"))
    with pytest.raises(ValueError, match="cache_dtype='int32'"):
        _greedy(get_variant("tiny"), params, cache_dtype="int32")
