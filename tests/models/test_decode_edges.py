"""KV-cache generation at its edges, each against an independent reference: the plain full
forward (`transformer.forward`, no cache) recomputed from scratch for every token, argmax taken
by hand, and its log-softmax for logprobs.

What test_decode.py does not already cover: a sliding window that generation runs far past
(XLA path and the Pallas kernel, whose cache then spans several key blocks), prompts exactly
at a bucket boundary next to a one-token prompt, max_new_tokens=1, every row stopping at its
very first token (the decode loop never runs) with a pad id that is also a real token,
GQA/MQA and a head dim that is not d_model / n_heads through `generate`, bf16 compute, and a
pad id outside the vocabulary.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.models import attention
from flaxlm.models import decode_attention as kernel
from flaxlm.models.config import get_variant
from flaxlm.models.decode import generate, generate_program
from flaxlm.models.transformer import Transformer, forward, init_cache

T_REF = 64  # the reference forward always runs on (B, T_REF): one compile per config


def _params(cfg, seed=0):
    """Random params drawn with numpy (no init compile); init_std 0.15 (see _cfg) gives
    peaked, input-dependent logits, so a wrong position or mask changes the argmax."""
    shapes = jax.eval_shape(
        lambda r: Transformer(cfg).init(r, jnp.zeros((1, 4), jnp.int32)), jax.random.PRNGKey(0)
    )["params"]
    rng = np.random.default_rng(seed)

    def draw(path, s):
        x = rng.standard_normal(s.shape).astype(np.float32)
        name = path[-1].key
        return jnp.asarray({"scale": 1 + 0.2 * x, "bias": 0.2 * x}.get(name, cfg.init_std * x))

    return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes))


def _cfg(**kw):
    return get_variant("tiny", init_std=0.15, **kw)


@functools.lru_cache
def _logp_fn(cfg):
    return jax.jit(lambda p, t: jax.nn.log_softmax(forward(cfg, p, t).astype(jnp.float32), axis=-1))


def _right_padded(rows):
    toks = np.zeros((len(rows), T_REF), np.int32)
    for b, r in enumerate(rows):
        toks[b, : len(r)] = r
    return toks


def _ref_greedy(cfg, params, prompts, n):
    """Argmax decoding by the full forward over the whole sequence, once per new token (right
    padding never changes a causal model's logits at earlier positions)."""
    seqs = [list(p) for p in prompts]
    for _ in range(n):
        logp = np.asarray(_logp_fn(cfg)(params, _right_padded(seqs)))
        for b, s in enumerate(seqs):
            s.append(int(np.argmax(logp[b, len(s) - 1])))
    return np.asarray([s[len(p) :] for s, p in zip(seqs, prompts)])


def _ref_logprobs(cfg, params, prompts, gen):
    """Full-forward log p(token) at each generated token (B, n), and the row max (B, n)."""
    logp = np.asarray(
        _logp_fn(cfg)(params, _right_padded([list(p) + list(g) for p, g in zip(prompts, gen)]))
    )
    at = np.stack([logp[b, len(p) - 1 + np.arange(len(g))] for b, (p, g) in
                   enumerate(zip(prompts, gen))])  # fmt: skip
    return np.take_along_axis(at, np.asarray(gen)[..., None], -1)[..., 0], at.max(-1)


# ----------------------------------------------------------------------------------------------
# Sliding window, far past the window


WINDOW_PROMPTS = [[3], list(range(20, 37)), [9, 8, 7, 6, 5, 4, 3, 2, 1, 9, 8]]  # 1, 17, 11 tokens
WINDOW_N = 45  # 17 + 45 = 62 positions; bucket 32 + 45 slots: the Pallas cache is 2 key blocks


@pytest.fixture(scope="module")
def window_model():
    cfg = _cfg(sliding_window=8, head_dim=32)  # head dim 32: the Pallas kernel applies
    return cfg, _params(cfg)


@pytest.mark.parametrize("attn,ring", [("xla", True), ("xla", False), ("pallas", False)])
def test_sliding_window_generation_far_past_the_window(window_model, attn, ring, monkeypatch):
    """Mistral-style window 8: greedy decoding 45 tokens past prompts of 1, 11 and 17 tokens
    (one longer than the window) equals recompute-argmax with the same window, and a sampled
    run's logprobs are the full forward's at its tokens: over rings of 8 slots (the default,
    `window_cache`; the ring wraps 5+ times, the 1-token prompt's starts almost empty) and over
    full caches, with either kernel."""
    cfg, params = window_model
    traced = []
    call = kernel._call
    monkeypatch.setattr(kernel, "_call", lambda *a, **k: traced.append(1) or call(*a, **k))
    kw = dict(max_new_tokens=WINDOW_N, decode_attention=attn, window_cache=ring)
    out = generate(cfg, params, WINDOW_PROMPTS, rng=jax.random.PRNGKey(0), temperature=0, **kw)
    assert bool(traced) == (attn == "pallas")  # the kernel really ran (or really did not)
    want = _ref_greedy(cfg, params, WINDOW_PROMPTS, WINDOW_N)
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    # The window matters here: without it the same model decodes something else.
    assert not np.array_equal(want, _ref_greedy(cfg.replace(sliding_window=0), params,
                                                WINDOW_PROMPTS, WINDOW_N))  # fmt: skip
    lp, _ = _ref_logprobs(cfg, params, WINDOW_PROMPTS, want)
    np.testing.assert_allclose(out.logprobs, lp, atol=2e-5, rtol=1e-5)

    sampled = generate(cfg, params, WINDOW_PROMPTS, rng=jax.random.PRNGKey(5), temperature=0.7,
                       top_k=40, top_p=0.9, **kw)  # fmt: skip
    toks = np.asarray(sampled.tokens)
    assert not np.array_equal(toks, want)  # really sampled
    lp, _ = _ref_logprobs(cfg, params, WINDOW_PROMPTS, toks)
    np.testing.assert_allclose(sampled.logprobs, lp, atol=2e-5, rtol=1e-5)


def test_ring_caches_hold_each_rows_last_w_positions(window_model):
    """A prefill into ring caches (`init_cache(..., rings=True)`): ring slot r of row b holds
    the key and value of the position p ≡ r (mod 8) among the row's last 8 (empty where the
    row is shorter), as a full cache holds them; so a decode step over the rings gives the
    logits of one over the full cache; and a step of more than one token over rings is
    refused (it would overwrite keys its own queries need)."""
    cfg, params = window_model
    model, v = Transformer(cfg), {"params": params}
    lengths = np.asarray([1, 17, 11], np.int32)
    toks = _right_padded(WINDOW_PROMPTS)[:, :32]
    pos = np.broadcast_to(np.arange(32, dtype=np.int32), (3, 32))
    seg = (pos < lengths[:, None]).astype(np.int32)

    # Jitted (one program per cache layout instead of hundreds of eager ops), both prefills
    # by the same function: the bitwise checks compare two compiled programs.
    apply = jax.jit(model.apply, static_argnames=("method", "prefill"))

    def prefill(rings):
        cache = init_cache(cfg, 3, 40, rings=rings)
        return apply(v, toks, pos, seg, cache, method="backbone", prefill=True)

    (h_full, full), (h_ring, rings) = prefill(False), prefill(True)
    np.testing.assert_array_equal(h_ring, h_full)
    for layer in range(cfg.n_layers):
        for kv in range(2):
            ring, whole = np.asarray(rings["kv"][layer][kv]), np.asarray(full["kv"][layer][kv])
            assert ring.shape == (3, cfg.n_kv_heads, 8, cfg.head_dim_)
            for b, n in enumerate(lengths):
                for r in range(8):
                    p = n - 1 - (n - 1 - r) % 8
                    if p >= 0:
                        np.testing.assert_array_equal(ring[b, :, r], whole[b, :, p])
                    else:
                        assert not ring[b, :, r].any()
    meta = jax.device_get(rings["ring"])
    for b, n in enumerate(lengths):
        held = [n - 1 - (n - 1 - r) % 8 for r in range(8)]
        assert list(meta["segment_ids"][b]) == [int(p >= 0) for p in held]
        assert list(meta["positions"][b]) == [max(p, 0) for p in held]

    # One step: each row's next token at position len_b (slot 32 of the full cache, slot
    # len_b mod 8 of each ring).
    nxt, step_pos = jnp.asarray([[5], [6], [7]], jnp.int32), jnp.asarray(lengths)[:, None]
    want, _ = apply(v, nxt, step_pos, cache=full)
    got, after = apply(v, nxt, step_pos, cache=rings)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(after["ring"]["positions"][np.arange(3), lengths % 8], lengths)
    with pytest.raises(ValueError, match="one token per decode step"):
        apply(v, jnp.zeros((3, 2), jnp.int32), jnp.zeros((3, 2), jnp.int32), cache=rings)


def test_ring_caches_shrink_the_decode_programs_memory():
    """Gemma-2-like (1 in 2 layers local, window 16), 4 prompts of 512 tokens + 512 new: the
    rings hold 16 slots where full caches hold 1024, so the decode program's temporaries
    shrink by (nearly all of) the local layers' full caches."""
    cfg = _cfg(sliding_window=16, sliding_window_pattern=2, n_layers=4, max_seq_len=1024)
    params = _params(cfg)
    prompts = [[3 + i % 250 for i in range(512)]] * 4

    def temp_bytes(ring):
        fn, args = generate_program(cfg, prompts, rng=jax.random.PRNGKey(0), temperature=0,
                                    max_new_tokens=512, window_cache=ring)  # fmt: skip
        return fn.lower(params, *args).compile().memory_analysis().temp_size_in_bytes

    full, ring = temp_bytes(False), temp_bytes(True)
    # K and V of the 2 local layers at 1024 slots, float32
    local_full = 2 * 2 * 4 * cfg.n_kv_heads * 1024 * cfg.head_dim_ * 4
    assert full - ring >= 0.9 * local_full, (full, ring, local_full)  # measured: 0.99


def test_prefill_runs_the_training_attention_kernels(window_model, monkeypatch):
    """`generate`'s prefill attends as training does — with attention_impl="cudnn", cuDNN's
    flash kernel in its plain causal mode (no mask: right-padded prompts), each layer with its
    window — instead of a (B, N, P, P) float32 score matrix over the cache. cuDNN cannot run
    here: a stand-in records the calls and computes the same attention with XLA; the tokens
    and logprobs are the XLA config's."""
    cfg, params = window_model
    cfg = cfg.replace(sliding_window_pattern=2)  # local and global layers
    calls = []

    def stand_in(q, k, v, mask, window=0, scale=None):
        calls.append((q.shape[1], mask is None, window))
        return attention.xla_attention(q, k, v, attention.causal_mask(q.shape[1], k.shape[1],
                                                                       window), scale)  # fmt: skip

    monkeypatch.setattr(attention, "cudnn_attention", stand_in)
    kw = dict(max_new_tokens=12, rng=jax.random.PRNGKey(0), temperature=0)
    got = generate(cfg.replace(attention_impl="cudnn"), params, WINDOW_PROMPTS, **kw)
    want = generate(cfg, params, WINDOW_PROMPTS, **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-5)
    windows = [cfg.layer_window(i) for i in range(cfg.n_layers)]
    assert calls == [(32, True, w) for w in windows]  # the 32-slot prompt bucket, once each
    assert 0 in windows and 8 in windows


def test_head_dims_cudnn_does_not_take_run_the_xla_path(monkeypatch):
    """attention_impl="cudnn" with Gemma's head dim 256 where cuDNN takes at most 128 (an
    A100; here, no GPU at all): training-style forwards and `generate`'s prefill run XLA's
    attention instead of failing in jax, with the XLA config's logits; head dim 64 still asks
    cuDNN (the stand-in records it)."""
    assert attention.cudnn_supports_head_dim(64) and attention.cudnn_supports_head_dim(128)
    assert not attention.cudnn_supports_head_dim(256)  # no Hopper GPU here
    assert not attention.cudnn_supports_head_dim(12) and not attention.cudnn_supports_head_dim(512)
    calls = []

    def stand_in(q, k, v, mask, window=0, scale=None):
        calls.append(q.shape[-1])
        return attention.xla_attention(q, k, v, attention.causal_mask(q.shape[1], k.shape[1],
                                                                       window), scale)  # fmt: skip

    monkeypatch.setattr(attention, "cudnn_attention", stand_in)
    toks = jnp.asarray(_right_padded(WINDOW_PROMPTS)[:, :16])
    fwd = jax.jit(forward, static_argnums=0)  # (traced here: the stand-in in place)
    for head_dim, asked in ((256, False), (64, True)):
        cfg = _cfg(head_dim=head_dim, sliding_window=8)
        params = _params(cfg)
        want = fwd(cfg, params, toks)
        got = fwd(cfg.replace(attention_impl="cudnn"), params, toks)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        kw = dict(max_new_tokens=4, rng=jax.random.PRNGKey(0), temperature=0)
        np.testing.assert_array_equal(
            generate(cfg.replace(attention_impl="cudnn"), params, WINDOW_PROMPTS, **kw).tokens,
            generate(cfg, params, WINDOW_PROMPTS, **kw).tokens)  # fmt: skip
        assert bool(calls) == asked and all(h == head_dim for h in calls)
        calls.clear()


# ----------------------------------------------------------------------------------------------
# Lengths, stops and pad ids


@pytest.fixture(scope="module")
def model():
    cfg = _cfg()
    return cfg, _params(cfg)


def test_the_prompt_bucket_is_the_least_power_of_two_that_holds_the_prompt():
    """A prompt that fills a power of two exactly stays in that bucket (no wasted doubling:
    the bucket picks the compiled program and the prefill's cost)."""
    from flaxlm.models.decode import MIN_BUCKET, prompt_bucket

    for n in range(1, 300):
        want = max(MIN_BUCKET, next(2**k for k in range(20) if 2**k >= n))
        assert prompt_bucket(n) == want, n


def test_bucket_boundaries_one_token_prompts_and_one_new_token(model):
    """Prompts that fill their bucket exactly (8; 16, no padding slot at all), a 1-token prompt
    beside a 16-token one, and max_new_tokens=1 (prefill only, no decode step)."""
    cfg, params = model
    r = np.random.default_rng(1)
    cases = [
        ([r.integers(3, 256, 8).tolist(), r.integers(3, 256, 8).tolist()], 6),  # bucket 8
        ([r.integers(3, 256, 16).tolist(), [7], r.integers(3, 256, 9).tolist()], 6),  # 16
        ([r.integers(3, 256, 16).tolist(), [7], r.integers(3, 256, 9).tolist()], 1),
    ]
    for prompts, n in cases:
        out = generate(cfg, params, prompts, max_new_tokens=n, rng=jax.random.PRNGKey(0),
                       temperature=0)  # fmt: skip
        want = _ref_greedy(cfg, params, prompts, n)
        np.testing.assert_array_equal(np.asarray(out.tokens), want)
        np.testing.assert_array_equal(np.asarray(out.lengths), [n] * len(prompts))
        lp, _ = _ref_logprobs(cfg, params, prompts, want)
        np.testing.assert_allclose(out.logprobs, lp, atol=2e-5, rtol=1e-5)


def test_generation_under_jax_enable_x64_matches_the_default(model):
    """A notebook that turned on jax_enable_x64 could not generate: a literal 0 beside an int32
    cache index reached dynamic_update_slice as int64 ("must be integers of the same type")."""
    cfg, params = model
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9]]
    kw = dict(max_new_tokens=5, rng=jax.random.PRNGKey(0), temperature=0)
    want = generate(cfg, params, prompts, **kw)
    jax.config.update("jax_enable_x64", True)
    try:
        got = generate(cfg, params, prompts, **kw)
        sampled = generate(cfg, params, prompts, **{**kw, "temperature": 0.8, "top_k": 5})
    finally:
        jax.config.update("jax_enable_x64", False)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    assert np.asarray(sampled.tokens).shape == (2, 5)


@pytest.mark.parametrize("check_every", [1, 4])
def test_rows_stopping_at_their_first_token_and_a_pad_id_that_is_a_real_token(model, check_every):
    """Every row's first token a stop token: the decode loop never runs, each row is that one
    token. Then stops that end rows at different steps (the first token included), with the
    pad id a token the model also generates: tokens up to the stop are the reference's, the
    rest the pad id, and lengths / mask / logprobs count only the real ones."""
    cfg, params = model
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4, 200, 17, 3, 3, 9, 100, 42, 7, 7, 1, 2]]
    n = 8
    free = _ref_greedy(cfg, params, prompts, n)
    lp_free, _ = _ref_logprobs(cfg, params, prompts, free)
    kw = dict(max_new_tokens=n, rng=jax.random.PRNGKey(0), temperature=0, check_every=check_every)

    def expect(stops, pad):
        lens = []
        for row in free:
            hits = np.flatnonzero(np.isin(row, stops))
            lens.append(int(hits[0]) + 1 if hits.size else n)
        out = generate(cfg, params, prompts, stop_tokens=stops, pad_id=pad, **kw)
        toks, lps = np.asarray(out.tokens), np.asarray(out.logprobs)
        np.testing.assert_array_equal(np.asarray(out.lengths), lens)
        for b, k in enumerate(lens):
            np.testing.assert_array_equal(toks[b, :k], free[b, :k])
            assert np.all(toks[b, k:] == pad)
            np.testing.assert_array_equal(np.asarray(out.mask)[b], np.arange(n) < k)
            np.testing.assert_allclose(lps[b, :k], lp_free[b, :k], atol=2e-5, rtol=1e-5)
            assert np.all(lps[b, k:] == 0)
        return lens

    firsts = tuple(sorted({int(t) for t in free[:, 0]}))
    assert expect(firsts, pad=int(free[1, 3])) == [1, 1, 1]
    # Row 0 at its first token, the others later (if these tokens do not come up earlier).
    stops = (int(free[0, 0]), int(free[1, 4]), int(free[2, 6]))
    lens = expect(stops, pad=int(free[2, 1]))
    assert lens[0] == 1 and len(set(lens)) > 1


@pytest.mark.parametrize("pad", [256, -257])  # vocab 256
def test_a_pad_id_outside_the_vocab_only_fills_the_output(model, pad):
    """pad_id fills the output after a row's stop (pad_id=-1 is a common 'no token' sentinel;
    so is V); the prompt padding is never attended, so any pad id must decode the same."""
    cfg, params = model
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11]]
    want = _ref_greedy(cfg, params, prompts, 6)
    out = generate(cfg, params, prompts, max_new_tokens=6, rng=jax.random.PRNGKey(0),
                   temperature=0, pad_id=pad, stop_tokens=(int(want[0, 2]),))  # fmt: skip
    toks = np.asarray(out.tokens)
    for b in range(len(prompts)):
        hits = np.flatnonzero(want[b] == want[0, 2])
        k = int(hits[0]) + 1 if hits.size else 6
        np.testing.assert_array_equal(toks[b, :k], want[b, :k])
        assert np.all(toks[b, k:] == pad)


# ----------------------------------------------------------------------------------------------
# Head layouts and dtypes


HEAD_PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4, 200, 17, 3, 3, 9, 100, 42, 7, 7, 1, 2]]


@pytest.mark.parametrize(
    "heads,attn",
    [
        (dict(n_heads=4, n_kv_heads=1, head_dim=32), "xla"),  # MQA, head dim 32 != 64 / 4
        (dict(n_heads=4, n_kv_heads=1, head_dim=32), "pallas"),  # MQA through the kernel
        (dict(n_heads=6, n_kv_heads=3, head_dim=8), "xla"),  # G=2, 6 heads x 8 != d_model 64
    ],
)
def test_gqa_mqa_and_a_free_head_dim_decode_like_the_full_forward(heads, attn):
    cfg = _cfg(**heads)
    params = _params(cfg)
    n = 8
    out = generate(cfg, params, HEAD_PROMPTS, max_new_tokens=n, rng=jax.random.PRNGKey(0),
                   temperature=0, decode_attention=attn)  # fmt: skip
    want = _ref_greedy(cfg, params, HEAD_PROMPTS, n)
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    lp, _ = _ref_logprobs(cfg, params, HEAD_PROMPTS, want)
    np.testing.assert_allclose(out.logprobs, lp, atol=2e-5, rtol=1e-5)


def test_bf16_decode_agrees_with_the_bf16_full_forward():
    """bf16 compute (fp32 params, bf16 KV cache): the cached decode and the full forward round
    differently (the forward's attention scores leave their matmul in bf16, the decode's in
    fp32; bf16 logits of size ~10 are spaced 1/16), so exact argmax equality is not promised
    at near-ties. What is: each decoded token is the forward's argmax up to 0.1 nats, and its
    logprob is the forward's to 0.1 nats (measured: <= 0.04). A wrong position, mask or cache
    dtype moves these by whole nats (init_std 0.15: peaked logits)."""
    cfg = _cfg(dtype="bfloat16")
    params = _params(cfg)
    n = 10
    out = generate(cfg, params, HEAD_PROMPTS, max_new_tokens=n, rng=jax.random.PRNGKey(0),
                   temperature=0)  # fmt: skip
    toks = np.asarray(out.tokens)
    lp, best = _ref_logprobs(cfg, params, HEAD_PROMPTS, toks)
    np.testing.assert_allclose(out.logprobs, lp, atol=0.1)
    assert np.all(lp >= best - 0.1), (lp - best).min()
    # And the teacher-forced check is not vacuous: the tokens are mostly the fp32 model's.
    f32 = _ref_greedy(cfg.replace(dtype="float32"), params, HEAD_PROMPTS, n)
    assert (toks == f32).mean() > 0.8
