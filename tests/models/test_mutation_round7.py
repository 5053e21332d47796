"""Mutation testing, round 7: models/attention_cache.py and models/sampling.py behaviours the
other tests left open, each against a reference written here (attention in float64 numpy, a
per-row loop, HF's sampling order transcribed), not against the code's own text."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.models import attention_cache as ac
from flaxlm.models import sampling


def _attention_reference(q, k, v, mask, scale, cap):
    """Grouped-query attention in float64: query head n reads kv head n // (N / K)."""
    B, T, N, H = q.shape
    K = k.shape[1]
    G = N // K
    out = np.zeros((B, T, N, H))
    for b in range(B):
        for n in range(N):
            s = q[b, :, n] @ k[b, n // G].T * scale  # (T, S)
            if cap:
                s = cap * np.tanh(s / cap)
            s = np.where(mask[b, 0], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, n] = (p / p.sum(-1, keepdims=True)) @ v[b, n // G]
    return out


def _inputs(B=2, T=3, N=4, K=2, S=7, H=8, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k = rng.normal(size=(B, K, S, H)).astype(np.float32)
    v = rng.normal(size=(B, K, S, H)).astype(np.float32)
    mask = rng.random((B, 1, T, S)) < 0.7
    mask[..., 0] = True  # every query sees a slot
    return q, k, v, mask


@pytest.mark.parametrize("scale,cap", [(None, 0.0), (0.3, 0.0), (None, 2.0)])
def test_cached_attention_is_grouped_query_attention(scale, cap):
    """Several queries (T = 3) and two query heads per kv head: each head attends over its own
    kv head, with its own row of the mask, the default scale 1/sqrt(H) and the soft cap."""
    q, k, v, mask = _inputs()
    got = ac.cached_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask),
                              scale=scale, cap=cap)  # fmt: skip
    want = _attention_reference(q, k, v, mask, 1 / np.sqrt(8) if scale is None else scale, cap)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def test_cached_attention_over_an_int8_cache_is_attention_over_its_dequantized_values():
    """`quantize_kv`'s (k, v, k scale, v scale), in that order: attention through the scales
    equals attention over int8 × scale, and that is within the rounding of the float cache."""
    q, k, v, mask = _inputs(seed=1)
    k_BTKH, v_BTKH = (jnp.asarray(x).transpose(0, 2, 1, 3) for x in (k, v))
    kq, vq, ks, vs = ac.quantize_kv(k_BTKH, v_BTKH)
    assert kq.dtype == vq.dtype == jnp.int8 and ks.shape == vs.shape == (2, 7, 2, 1)
    # one scale per token and head: max |x| / 127 over the head dim, error <= scale / 2
    np.testing.assert_allclose(np.asarray(ks), np.abs(np.asarray(k_BTKH)).max(-1, keepdims=True)
                               / 127, rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(np.asarray(vs), np.abs(np.asarray(v_BTKH)).max(-1, keepdims=True)
                               / 127, rtol=1e-6)  # fmt: skip
    heads = [np.asarray(x).transpose(0, 2, 1, 3) for x in (kq, vq, ks, vs)]  # (B, K, S, ·)
    kd, vd = heads[0] * heads[2], heads[1] * heads[3]
    assert np.abs(kd - k).max() <= heads[2].max() / 2 + 1e-6
    got = ac.cached_attention(jnp.asarray(q), jnp.asarray(heads[0], jnp.float32),
                              jnp.asarray(heads[1], jnp.float32), jnp.asarray(mask),
                              kv_scales=(jnp.asarray(heads[2]), jnp.asarray(heads[3])))  # fmt: skip
    want = _attention_reference(q, kd, vd, mask, 1 / np.sqrt(8), 0.0)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("shape", [(3, 6), (3, 2, 6, 4)])
def test_write_cache_rows_writes_each_row_at_its_own_slot(shape):
    """(B, S) and (B, K, S, H) buffers: row b's new entries land at slots[b] .. + len of the
    slot axis (axis 0 of a (S,) row, axis 1 of a (K, S, H) one); nothing else changes."""
    rng = np.random.default_rng(0)
    buf = rng.normal(size=shape).astype(np.float32)
    new_shape = list(shape)
    new_shape[1 if len(shape) == 2 else 2] = 2
    new = rng.normal(size=new_shape).astype(np.float32)
    slots = np.asarray([0, 3, 4], np.int32)
    got = np.asarray(ac.write_cache_rows(jnp.asarray(buf), jnp.asarray(new), jnp.asarray(slots)))
    want = buf.copy()
    for b, s in enumerate(slots):
        if len(shape) == 2:
            want[b, s : s + 2] = new[b]
        else:
            want[b, :, s : s + 2] = new[b]
    np.testing.assert_array_equal(got, want)


# --- sampling ------------------------------------------------------------------------------------


def test_filtered_logits_are_the_logits_over_the_temperature():
    """What survives the filters is logits / T (the distribution sampled), the rest -inf."""
    x = jnp.asarray([[2.0, 1.0, 0.5, -1.0, -3.0]])
    got = np.asarray(sampling.filter_logits(x, 0.5, top_k=3))
    np.testing.assert_array_equal(got, [[4.0, 2.0, 1.0, -np.inf, -np.inf]])
    got = np.asarray(sampling.filter_logits(x, 2.0, min_p=0.3, use_min_p=True))
    # p_i / p_max = exp((x_i - 2) / 2) >= 0.3: 1.0 (0.61), 0.5 (0.47) kept; -1.0 (0.22) not
    np.testing.assert_allclose(got, [[1.0, 0.5, 0.25, -np.inf, -np.inf]])


def test_min_p_is_applied_to_what_top_k_left():
    """HF's order: top-k first, then min-p relative to the best kept token; min_p does not
    bring back what top-k removed."""
    x = jnp.asarray([[3.0, 2.9, 2.8, 2.7]])
    got = np.isfinite(np.asarray(sampling.filter_logits(x, 1.0, top_k=2, min_p=0.01,
                                                        use_min_p=True)))  # fmt: skip
    np.testing.assert_array_equal(got, [[True, True, False, False]])


def test_samples_follow_the_filtered_distribution_and_logprobs_the_models():
    """4000 rows with one key each: the token frequencies are softmax(top-p filtered logits / T)
    (HF's order), and the returned logprob is the unfiltered T = 1 log-softmax."""
    logits = np.asarray([1.0, 0.5, 0.0, -0.5, -2.0], np.float32)
    T, p = 0.8, 0.8
    x = logits / T
    q = np.exp(x - x.max())
    q /= q.sum()
    order = np.argsort(-q)
    before = np.cumsum(q[order]) - q[order]
    kept = order[before < p]
    want = np.zeros_like(q)
    want[kept] = q[kept] / q[kept].sum()
    n = 4000
    keys = sampling.prompt_keys(jax.random.PRNGKey(3), np.arange(n))
    tok, logp = sampling.sample_logits(jnp.tile(jnp.asarray(logits), (n, 1)), keys, T, top_p=p)
    freq = np.bincount(np.asarray(tok), minlength=5) / n
    np.testing.assert_allclose(freq, want, atol=4 * np.sqrt(0.25 / n))
    ref = logits - np.log(np.exp(logits).sum())
    np.testing.assert_allclose(np.asarray(logp), ref[np.asarray(tok)], rtol=1e-5)


def test_greedy_takes_the_argmax_and_its_model_logprob():
    logits = jnp.asarray([[0.1, 2.0, -1.0], [3.0, 0.0, 2.5]])
    tok, logp = sampling.sample_logits(logits, jax.random.PRNGKey(0), 0.3, greedy=True)
    np.testing.assert_array_equal(np.asarray(tok), [1, 0])
    x = np.asarray(logits, np.float64)
    ref = x - np.log(np.exp(x).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(logp), ref[[0, 1], [1, 0]], rtol=1e-6)


def test_keys_per_row_and_per_step():
    """prompt_keys(rng, ids)[i] is fold_in(rng, ids[i]); step_key folds the step into each
    row's key (one key: into that key); is_key_batch tells raw (B, 2) and typed (B,) batches
    from one key."""
    rng = jax.random.PRNGKey(5)
    keys = sampling.prompt_keys(rng, [7, 0, 3])
    for i, id_ in enumerate([7, 0, 3]):
        np.testing.assert_array_equal(keys[i], jax.random.fold_in(rng, id_))
    steps = sampling.step_key(keys, 4)
    for i in range(3):
        np.testing.assert_array_equal(steps[i], jax.random.fold_in(keys[i], 4))
    np.testing.assert_array_equal(sampling.step_key(rng, 4), jax.random.fold_in(rng, 4))
    typed = jax.random.split(jax.random.key(1), 3)
    assert sampling.is_key_batch(keys) and sampling.is_key_batch(typed)
    assert not sampling.is_key_batch(rng) and not sampling.is_key_batch(jax.random.key(1))


@pytest.mark.parametrize("top_k", [0, 3])
def test_a_nucleus_of_no_mass_keeps_the_most_likely_token(top_k):
    """top_p = 0: no token's mass before it is below p, yet the nucleus is never empty; it is
    the most likely token alone (what greedy decoding picks), with or without top-k first."""
    x = jnp.asarray([[0.5, 2.0, 1.0, -1.0]])
    got = sampling.filter_logits(x, 1.0, top_k=top_k, top_p=0.0, use_top_p=True)
    np.testing.assert_array_equal(np.isfinite(np.asarray(got)), [[False, True, False, False]])


def test_top_p_over_logits_spanning_a_huge_range_measures_the_right_nucleus():
    """Padded vocabulary rows carry logits like -1e9: the nucleus of (5, 4) is both tokens
    (masses before them 0 and .731 < .9), the padding none; no overflow of exp on the way."""
    x = jnp.asarray([[5.0, 4.0, -1e9, -1e9, 3.0]])
    for k in (0, 4):
        got = sampling.filter_logits(x, 1.0, top_k=k, top_p=0.8, use_top_p=True)
        np.testing.assert_array_equal(np.isfinite(np.asarray(got)),
                                      [[True, True, False, False, False]])  # fmt: skip
