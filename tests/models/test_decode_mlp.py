"""The decode-step gate|up kernel (models/decode_mlp.py): equal to the MLP's XLA formula (run
here in Pallas' interpreter), one Triton kernel when lowered for GPUs, and `generate(...,
decode_mlp="pallas")` giving the XLA path's tokens and logprobs — with the kernel really in the
program, and not under a mesh that splits rows or weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.models import decode_mlp
from flaxlm.models.decode import generate
from flaxlm.models.decode_attention import lowering_target
from flaxlm.models.sharding import logical_axis_rules, make_mesh
from tests.models.test_decode import PROMPTS, _model


@pytest.mark.parametrize("B,D,F,block_n,block_k", [
    (4, 128, 96, 32, 128),   # three column blocks, one row step
    (3, 256, 64, 64, 64),    # rows padded to 16; four row steps
    (1, 128, 64, 16, 32),    # one row (a single prompt)
])  # fmt: skip
def test_kernel_equals_the_formula(B, D, F, block_n, block_k):
    r = np.random.default_rng(B)
    x, wg, wu = (jnp.asarray(r.normal(size=s), jnp.float32) for s in ((B, D), (D, F), (D, F)))
    got = decode_mlp.gate_up_silu(x, wg, wu, block_n=block_n, block_k=block_k)
    want = jax.nn.silu(x @ wg) * (x @ wu)
    assert got.shape == (B, F)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_bad_shapes_are_refused():
    x = jnp.ones((2, 128))
    with pytest.raises(ValueError, match="multiple of 128"):
        decode_mlp.gate_up_silu(jnp.ones((2, 100)), jnp.ones((100, 64)), jnp.ones((100, 64)))
    with pytest.raises(ValueError, match="weights"):
        decode_mlp.gate_up_silu(x, jnp.ones((128, 64)), jnp.ones((128, 32)))
    assert not decode_mlp.supports(64, 128)  # the tiny variant's d_model: XLA's path


def test_gpu_lowering_is_one_triton_kernel():
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((64, 2048), (2048, 5632), (2048, 5632))]
    with lowering_target():  # for an H200, on this CPU-only machine
        lowered = jax.jit(decode_mlp.gate_up_silu).trace(*args).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 1


def _counting(monkeypatch):
    calls = []
    real = decode_mlp.gate_up_silu

    def counted(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(decode_mlp, "gate_up_silu", counted)
    return calls


def test_generate_with_the_kernel_equals_the_xla_path(monkeypatch):
    """Greedy and sampled decoding (float32, so the kernel's one rounding is invisible): the
    same tokens and logprobs as XLA's MLP, with the kernel traced once per layer's decode step
    (not in the prefill)."""
    cfg, params = _model(d_model=128, d_ff=192, n_heads=4, n_kv_heads=2, head_dim=32)
    calls = _counting(monkeypatch)
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=20)):
        kw.update(max_new_tokens=6, rng=jax.random.PRNGKey(3))
        want = generate(cfg, params, PROMPTS, **kw)
        got = generate(cfg, params, PROMPTS, decode_mlp="pallas", **kw)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    assert calls and all(shape[0] == len(PROMPTS) for shape in calls)  # one-token steps only
    assert len(calls) == 2 * cfg.n_layers  # traced once per layer, per program
    with pytest.raises(ValueError, match="decode_mlp"):
        generate(cfg, params, PROMPTS, decode_mlp="triton", max_new_tokens=2,
                 rng=jax.random.PRNGKey(0))  # fmt: skip


def test_a_mesh_that_splits_keeps_xla(monkeypatch):
    cfg, params = _model(d_model=128, d_ff=192, n_heads=4, n_kv_heads=2, head_dim=32)
    calls = _counting(monkeypatch)
    mesh = make_mesh({"data": 4, "fsdp": 2})
    kw = dict(max_new_tokens=4, rng=jax.random.PRNGKey(0), temperature=0, mesh=mesh,
              rules=logical_axis_rules("fsdp"))  # fmt: skip
    got = generate(cfg, params, PROMPTS, decode_mlp="pallas", **kw)
    assert not calls
    np.testing.assert_array_equal(got.tokens, generate(cfg, params, PROMPTS, **kw).tokens)


def test_kernel_variants_are_parsed_and_bad_ones_refused():
    assert decode_mlp.variant_options("pallas") == {}
    assert decode_mlp.variant_options("pallas:16:64:8:4") == dict(
        block_n=16, block_k=64, num_warps=8, num_stages=4)  # fmt: skip
    for bad in ("pallas:24:64:4:3", "pallas:16:64:4", "pallas:16:8:4:3", "triton:16:64:4:3",
                "pallas:a:64:4:3", "pallas:16:64:3:3"):  # fmt: skip
        with pytest.raises(ValueError, match="decode_mlp="):
            decode_mlp.variant_options(bad)


def test_generate_with_a_kernel_variant(monkeypatch):
    """A tiling other than the default (16 columns, 64-row steps), over the concatenated
    gate|up of the fused layout: the XLA path's greedy tokens; a bad name refused by name."""
    cfg, params = _model(d_model=128, d_ff=192, n_heads=4, n_kv_heads=2, head_dim=32)
    calls = _counting(monkeypatch)
    kw = dict(max_new_tokens=5, rng=jax.random.PRNGKey(2), temperature=0)
    want = generate(cfg, params, PROMPTS, **kw)
    got = generate(cfg, params, PROMPTS, decode_mlp="pallas:16:64:4:2", fuse_projections=True,
                   **kw)  # fmt: skip
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    assert len(calls) == cfg.n_layers
    with pytest.raises(ValueError, match="decode_mlp='pallas:16:64'"):
        generate(cfg, params, PROMPTS, decode_mlp="pallas:16:64", **kw)


def test_the_transposed_weight_gives_the_same_product():
    """`transposed`: the (2F, D) weight of `transpose_gate_up` (gate rows, then up's) read in
    row blocks — the formula's result, with and without the folded norm."""
    r = np.random.default_rng(7)
    x, wg, wu = (
        jnp.asarray(r.normal(size=s), jnp.float32) for s in ((5, 256), (256, 64), (256, 64))
    )
    wg, wu = wg / 16, wu / 16  # products of order 1: float32's rounding under the tolerance
    w_t = jnp.concatenate([wg.T, wu.T])
    got = decode_mlp.gate_up_silu(x, w_t, transposed=True, block_n=16, block_k=64)
    np.testing.assert_allclose(got, jax.nn.silu(x @ wg) * (x @ wu), rtol=2e-5, atol=2e-5)
    x_hat = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    got = decode_mlp.gate_up_silu(x, w_t, transposed=True, norm_eps=1e-6, block_n=32, block_k=128)
    np.testing.assert_allclose(got, jax.nn.silu(x_hat @ wg) * (x_hat @ wu), rtol=2e-5, atol=2e-5)
    assert decode_mlp.variant_options("pallas_t") == {"transposed": True}
    assert decode_mlp.variant_options("pallas_t:16:64:4:3")["transposed"]
    with pytest.raises(ValueError, match=r"weights \(256, 128\)"):  # (D, 2F) is not (2F, D)
        decode_mlp.gate_up_silu(x, w_t.T, transposed=True)


def test_generate_over_the_transposed_gate_up(monkeypatch):
    """decode_mlp="pallas_t" (the weight transposed once per call, the prefill's XLA path
    reading it too), alone and with the folded norms: the XLA path's tokens and logprobs;
    int8 weights refused (the transposed weight would stay float)."""
    cfg, params = _model(d_model=128, d_ff=192, n_heads=4, n_kv_heads=2, head_dim=32)
    calls = _counting(monkeypatch)
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=20)):
        kw.update(max_new_tokens=5, rng=jax.random.PRNGKey(4))
        want = generate(cfg, params, PROMPTS, **kw)
        for extra in (dict(), dict(decode_norm="fold", decode_attention="pallas")):
            got = generate(cfg, params, PROMPTS, decode_mlp="pallas_t:16:64:4:2", **extra, **kw)
            np.testing.assert_array_equal(got.tokens, want.tokens)
            np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-5)
    assert len(calls) == 4 * cfg.n_layers
    with pytest.raises(ValueError, match="decode_mlp='pallas_t'.*quantize"):
        generate(cfg, params, PROMPTS, decode_mlp="pallas_t", quantize="int8", **kw)
