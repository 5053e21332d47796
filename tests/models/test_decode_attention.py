"""The Pallas decode-step kernel (models/decode_attention.py: RoPE, cache write, attention):
equal to the XLA path (`apply_rope`, `dynamic_update_slice`, `cached_attention`; the kernel
runs here in Pallas' interpreter), blind to key blocks past the write index, lowered to one
Triton kernel per layer for GPUs, and giving `generate` the full forward's tokens and
logprobs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.models import decode_attention as kernel
from flaxlm.models.attention import apply_rope, attention_mask, cached_attention, rope_tables
from flaxlm.models.config import ModelConfig
from flaxlm.models.decode import generate, generate_program
from flaxlm.models.sharding import logical_axis_rules, make_mesh, use_mesh

from .test_decode import PROMPTS, _full_logprobs, _greedy_by_recompute, _model


def _step(B, N, K, H, S, index, seed=0, dtype=jnp.float32, holes=True, window=0):
    """A decode step's inputs: q|k|v (B, 1, N + 2K, H) before RoPE, the rope tables of each
    row's position, a random cache (2, B, K, S, H), and the step's mask (B, 1, 1, S) as the
    model builds it (`attention_mask`: segments, slots, window), with random padding holes
    before the write index."""
    r = np.random.default_rng(seed)
    qkv = jnp.asarray(r.normal(size=(B, 1, N + 2 * K, H)) * 1.5, dtype)
    kv = jnp.asarray(r.normal(size=(2, B, K, S, H)), dtype)
    slots = np.broadcast_to(np.arange(S), (B, S))
    kv_seg = (slots <= index).astype(np.int32)
    if holes:  # prompt padding: segment-0 slots (never the query's own)
        kv_seg[:, :index] *= r.random((B, index)) < 0.7
    q_slot = np.full((B, 1), index)
    mask = attention_mask(jnp.ones((B, 1), jnp.int32), jnp.asarray(kv_seg), q_slot, slots,
                          q_slot, slots, window)  # fmt: skip
    positions = jnp.asarray(r.integers(index, index + 50, (B, 1)))
    cfg = ModelConfig(n_heads=N, n_kv_heads=K, head_dim=H, d_model=64)
    cos, sin = rope_tables(cfg, positions)
    return qkv, cos, sin, kv, mask


def _xla_step(qkv, cos, sin, kv, mask, index):
    """What `Attention` computes without the kernel."""
    K = kv.shape[2]
    q, k, v = jnp.split(qkv, [qkv.shape[2] - 2 * K, qkv.shape[2] - K], axis=2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    new = jnp.stack([k, v]).transpose(0, 1, 3, 2, 4).astype(kv.dtype)
    kv = jax.lax.dynamic_update_slice(kv, new, (0, 0, 0, index, 0))
    return cached_attention(q, kv[0].astype(q.dtype), kv[1].astype(q.dtype), mask), kv


@pytest.mark.parametrize(
    "B,N,K,H,S,index",
    [
        (3, 8, 2, 64, 128, 70),  # GQA, G=4; the write in the second key block
        (2, 4, 4, 32, 64, 63),  # MHA; the last slot of the buffer
        (2, 8, 1, 32, 192, 128),  # MQA, G=8; the first slot of the third block
        (1, 6, 2, 32, 64, 0),  # G=3 (not a power of two); the first slot: only itself
    ],
)
def test_kernel_equals_the_xla_step(B, N, K, H, S, index):
    args = _step(B, N, K, H, S, index)
    out, cache = kernel.decode_attention(*args, index)
    want_out, want_cache = _xla_step(*args, index)
    assert out.shape == want_out.shape == (B, 1, N, H)
    np.testing.assert_allclose(out, want_out, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(cache, want_cache, atol=1e-6, rtol=1e-6)
    untouched = np.ones(S, bool)
    untouched[index] = False  # the kernel writes this step's slot and nothing else
    np.testing.assert_array_equal(np.asarray(cache)[:, :, :, untouched],
                                  np.asarray(args[3])[:, :, :, untouched])  # fmt: skip


def test_sliding_window_masks_whole_leading_blocks():
    """A window of 20 at slot 150: the first two key blocks are entirely masked, which the
    online softmax must skip without letting them into the normaliser."""
    args = _step(2, 8, 2, 32, 192, 150, holes=False, window=20)
    assert not np.asarray(args[4])[..., :128].any()
    out, _ = kernel.decode_attention(*args, 150)
    np.testing.assert_allclose(out, _xla_step(*args, 150)[0], atol=2e-6)


def test_bfloat16():
    args = _step(2, 8, 2, 64, 128, 100, dtype=jnp.bfloat16)
    out, cache = kernel.decode_attention(*args, 100)
    want_out, want_cache = _xla_step(*args, 100)
    np.testing.assert_allclose(out.astype(jnp.float32), want_out.astype(jnp.float32), atol=2e-2)
    np.testing.assert_allclose(cache.astype(jnp.float32), want_cache.astype(jnp.float32),
                               atol=1e-2)  # fmt: skip


def test_blocks_past_the_write_index_are_not_read():
    """Write index 40: the kernel reads key block 0 (slots 0-63; those past 40 masked) and
    stops. NaN in every later slot, with the mask even letting them through: a kernel that
    read them would return NaN."""
    qkv, cos, sin, kv, mask = _step(2, 8, 2, 32, 128, 40)
    poisoned = kv.at[:, :, :, kernel.BLOCK_K :].set(jnp.nan)
    open_mask = mask | (jnp.arange(128) >= kernel.BLOCK_K)
    out, _ = kernel.decode_attention(qkv, cos, sin, poisoned, open_mask, 40)
    np.testing.assert_allclose(out, _xla_step(qkv, cos, sin, kv, mask, 40)[0], atol=2e-6)


def test_write_index_is_clamped_to_the_buffer():
    """Past the end (a guarded decode step beyond max_new_tokens) the write lands in the last
    slot, as `dynamic_update_slice` clamps it: no write outside the buffer."""
    args = _step(1, 4, 2, 32, 64, 63)
    out, cache = kernel.decode_attention(*args, 70)
    want_out, want_cache = _xla_step(*args, 63)
    np.testing.assert_allclose(cache, want_cache, atol=1e-6)
    np.testing.assert_allclose(out, want_out, atol=2e-6)


def test_gpu_lowering_is_one_triton_kernel():
    """Lowered for CUDA (no GPU needed to lower): one Triton custom call, not the
    interpreter's loop, with the cache updated in place (aliased to an output)."""
    shapes = [((2, 1, 16, 64), jnp.bfloat16), ((2, 1, 32), jnp.float32),
              ((2, 1, 32), jnp.float32), ((2, 2, 2, 128, 64), jnp.bfloat16),
              ((2, 1, 1, 128), jnp.bool_), ((), jnp.int32)]  # fmt: skip
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    lowered = jax.jit(kernel.decode_attention).trace(*args).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "output_operand_aliases" in text


def test_unsupported_shapes():
    assert kernel.supports(128, 1, 64) and kernel.supports(64, 1, 32)
    assert not kernel.supports(100, 1, 64)  # not whole key blocks
    assert not kernel.supports(128, 2, 64)  # prefill
    assert not kernel.supports(128, 1, 16) and not kernel.supports(128, 1, 96)
    args = _step(1, 4, 2, 32, 64, 10)
    with pytest.raises(ValueError, match="slots"):
        kernel.decode_attention(*args[:3], args[3][:, :, :, :60], args[4][..., :60], 10)


# A model the kernel applies to (head dim 32; the tiny variant's is 16).
def _kernel_model(**kw):
    return _model(head_dim=32, **kw)


@pytest.mark.parametrize("window", [0, 5])
def test_generate_with_the_kernel_equals_full_recompute(window):
    """Greedy tokens and logprobs through `generate(decode_attention="pallas")` equal the full
    forward's, with ragged prompts (padding holes in the cache) and a sliding window; the
    cache (16 + 10 slots) is rounded up to whole key blocks."""
    cfg, params = _kernel_model(sliding_window=window)
    kw = dict(max_new_tokens=10, rng=jax.random.PRNGKey(1), temperature=0)
    out = generate(cfg, params, PROMPTS, decode_attention="pallas", **kw)
    want = _greedy_by_recompute(cfg, params, PROMPTS, 10)
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    np.testing.assert_allclose(
        out.logprobs, _full_logprobs(cfg, params, PROMPTS, want), atol=2e-5, rtol=1e-5
    )


def test_generate_with_the_kernel_samples_and_stops_as_the_xla_path():
    """Sampling, stop tokens, one prompt (run as two rows) and stop checks every 3 tokens
    (10 is not a multiple: the last block's extra steps write a clamped slot): the same
    tokens, lengths and logprobs as the XLA path."""
    cfg, params = _kernel_model()
    kw = dict(max_new_tokens=10, rng=jax.random.PRNGKey(3), temperature=0.9, pad_id=-1)
    free = np.asarray(generate(cfg, params, PROMPTS, **kw).tokens)
    stops = (int(free[0, 3]), int(free[2, 6]))
    outs = []
    for prompts, extra in ((PROMPTS, dict(stop_tokens=stops, check_every=3)), (PROMPTS[1:2], {})):
        want = generate(cfg, params, prompts, **kw, **extra)
        got = generate(cfg, params, prompts, decode_attention="pallas", **kw, **extra)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.lengths, want.lengths)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-5)
        outs.append(got)
    assert np.asarray(outs[0].lengths).min() < 10  # some row stopped early


def test_generate_program_runs_the_kernel_in_every_layer():
    cfg, params = _kernel_model()
    fn, args = generate_program(cfg, PROMPTS, rng=jax.random.PRNGKey(0), max_new_tokens=4,
                                decode_attention="pallas")  # fmt: skip
    text = fn.trace(params, *args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == cfg.n_layers


def test_generate_option_is_checked():
    cfg, params = _kernel_model()
    with pytest.raises(ValueError, match="decode_attention"):
        generate(cfg, params, PROMPTS, decode_attention="triton", max_new_tokens=2,
                 rng=jax.random.PRNGKey(0))  # fmt: skip


@pytest.mark.parametrize("shape,runs_kernel", [
    ({"data": 2, "fsdp": 2, "tensor": 1}, True),   # rows split over 4 devices
    ({"data": 2, "fsdp": 1, "tensor": 2}, False),  # heads split: the XLA path instead
])  # fmt: skip
def test_generate_under_a_mesh(shape, runs_kernel, monkeypatch):
    """Sharded generate with the kernel: each device runs it on its own rows (shard_map over
    the batch axes) and the tokens are the unsharded ones."""
    cfg, params = _kernel_model()
    mesh, rules = make_mesh(shape, jax.devices()[:4]), logical_axis_rules("fsdp_tp")
    kw = dict(max_new_tokens=6, rng=jax.random.PRNGKey(0), temperature=0,
              decode_attention="pallas")  # fmt: skip
    want = np.asarray(generate(cfg, params, PROMPTS, **kw).tokens)
    traced, call = [], kernel._call  # the q|k|v block each traced kernel call gets
    monkeypatch.setattr(kernel, "_call", lambda *a, **k: traced.append(a[1].shape) or call(*a, **k))
    got = generate(cfg, params, PROMPTS + [[9, 9, 9]], mesh=mesh, rules=rules, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens)[:3], want)
    # 4 rows over data×fsdp: one row per device in the kernel; or no kernel (XLA path).
    assert bool(traced) == runs_kernel
    assert all(s[0] == 4 // shape["data"] // shape["fsdp"] for s in traced)
    with use_mesh(mesh, rules):
        assert kernel.mesh_supports() == runs_kernel
