"""What the cuDNN attention path is given for padded rows (`attention_kernels.open_empty_rows`).

cuDNN itself needs a GPU; here the claims that hold without one: the opened mask gives every
query a key, leaves rows that had one as they were, changes neither the real rows' outputs nor
any gradient of a loss that weighs padding 0 (checked through the XLA attention), and is what
`cudnn_attention` hands jax. bench/decode_kernels.py's `cudnn_grad` pieces run cuDNN's own
backward over the same rows on the GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.models import attention_kernels
from flaxlm.models.attention_kernels import open_empty_rows, xla_attention
from flaxlm.models.attention_masks import attention_mask


def _padded_rows(B=3, T=24, seed=0):
    """Rows as a PPO rollout lays them out: left padding (a short prompt), then the tokens,
    then right padding (an early stop); the mask `attention_mask` builds for them."""
    r = np.random.default_rng(seed)
    slots = np.broadcast_to(np.arange(T), (B, T))
    start, stop = r.integers(1, T // 3, B), r.integers(T // 2, T - 1, B)
    seg = jnp.asarray(((slots >= start[:, None]) & (slots < stop[:, None])).astype(np.int32))
    slots = jnp.asarray(slots)
    return seg, attention_mask(seg, seg, slots, slots, slots, slots)


def test_every_row_sees_a_key_and_rows_that_did_are_unchanged():
    seg, mask = _padded_rows()
    empty = ~np.asarray(mask).any(-1)
    assert empty.any() and (empty == (np.asarray(seg) == 0)[:, None]).all()  # padding rows
    opened = np.asarray(open_empty_rows(mask))
    assert opened.any(-1).all()
    assert opened[np.broadcast_to(empty[..., None], opened.shape)].all()  # opened to every key
    np.testing.assert_array_equal(opened[~empty], np.asarray(mask)[~empty])


def test_real_outputs_and_gradients_do_not_change():
    """A loss that weighs padding queries 0 (as every trainer's does): the same value and the
    same gradients for q, k and v with the opened mask as with the raw one."""
    seg, mask = _padded_rows(T=32, seed=1)
    B, T, N, K, H = 3, 32, 4, 2, 16
    r = np.random.default_rng(2)
    q, k, v = (jnp.asarray(r.normal(size=(B, T, n, H)), jnp.float32) for n in (N, K, K))
    weight = jnp.asarray(r.normal(size=(B, T, N, H)), jnp.float32) * (seg > 0)[..., None, None]

    def loss(m):
        return lambda q, k, v: (xla_attention(q, k, v, m) * weight).sum()

    raw, raw_grads = jax.value_and_grad(loss(mask), argnums=(0, 1, 2))(q, k, v)
    got, got_grads = jax.value_and_grad(loss(open_empty_rows(mask)), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(got, raw, rtol=1e-6)
    for g, w in zip(got_grads, raw_grads):
        np.testing.assert_allclose(g, w, atol=1e-6)
    # (the padding rows' own outputs do change: the opened rows average every value)
    real = (seg > 0)[..., None, None]
    outs = [xla_attention(q, k, v, m) for m in (mask, open_empty_rows(mask))]
    np.testing.assert_allclose(jnp.where(real, outs[0], 0), jnp.where(real, outs[1], 0),
                               atol=1e-6)  # fmt: skip
    assert not np.allclose(jnp.where(real, 0, outs[0]), jnp.where(real, 0, outs[1]))


def test_cudnn_attention_hands_jax_the_opened_mask(monkeypatch):
    """The mask jax's cuDNN call receives has no fully masked row; a causal call (no mask)
    is passed on as it was."""
    seen = []

    def fake(q, k, v, mask=None, **kw):
        seen.append((mask, kw))
        return q

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    _, mask = _padded_rows()
    x = jnp.zeros((3, 24, 2, 8))
    attention_kernels.cudnn_attention(x, x, x, mask)
    attention_kernels.cudnn_attention(x, x, x, None)
    (given, kw), (none, causal) = seen
    assert kw["implementation"] == "cudnn" and np.asarray(given).any(-1).all()
    np.testing.assert_array_equal(given, open_empty_rows(mask))
    assert none is None and causal["is_causal"]
