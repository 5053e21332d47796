"""attention_impl="splash" (models/splash_attention.py): jax's TPU splash-attention kernel, run
here in Pallas' interpreter, gives `xla_attention`'s outputs and gradients — causal rows,
windows, packed documents, soft-capped logits, grouped and multi-query heads — and a model
with it trains as the XLA model does, one device or a sharded mesh (the kernel per device)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flaxlm.models import splash_attention as splash
from flaxlm.models.attention import attention_mask, causal_mask, xla_attention
from flaxlm.models.config import get_variant
from flaxlm.models.sharding import logical_axis_rules, make_mesh, use_mesh
from flaxlm.train.pretrain import lm_loss, model_fns


def _documents(lengths_per_row, T):
    seg, pos = np.zeros((len(lengths_per_row), T), np.int32), np.zeros((len(lengths_per_row), T),
                                                                        np.int32)  # fmt: skip
    for r, docs in enumerate(lengths_per_row):
        t = 0
        for d, n in enumerate(docs):
            seg[r, t : t + n], pos[r, t : t + n] = d + 1, np.arange(n)
            t += n
    return jnp.asarray(seg), jnp.asarray(pos)


@pytest.mark.parametrize(
    "K, window, cap, packed",
    [(2, 0, 0.0, False),  # grouped heads, causal rows
     (2, 100, 5.0, True),  # a window, soft-capped logits, packed documents with padding
     (1, 0, 0.0, True)],  # multi-query (the kernel's MQA form)
)  # fmt: skip
def test_kernel_matches_xla(K, window, cap, packed):
    B, T, N, H = 2, 256, 4, 16
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in [(B, T, N, H), (B, T, K, H), (B, T, K, H)])  # fmt: skip
    seg, pos = _documents([[40, 160, 30], [130, 126]], T)
    if packed:
        slot = jnp.broadcast_to(jnp.arange(T), (B, T))
        mask, live = attention_mask(seg, seg, slot, slot, pos, pos, window), seg != 0
    else:
        mask, live = causal_mask(T, T, window), jnp.ones((B, T), bool)

    def kernel(q, k, v):
        return splash.splash_attention(q, k, v, seg if packed else None, window=window,
                                       scale=0.3, cap=cap, block=128)  # fmt: skip

    def xla(q, k, v):
        return xla_attention(q, k, v, mask, 0.3, cap)

    rows = live[:, :, None, None]  # padding rows differ by design (and get no cotangent)
    cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * rows
    outs = [jax.jit(f)(q, k, v) * rows for f in (kernel, xla)]
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(outs[1]), rtol=2e-5, atol=2e-6)
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cot), argnums=(0, 1, 2)))(q, k, v)
             for f in (kernel, xla)]  # fmt: skip
    for name, g, w in zip("qkv", *grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-6,
                                   err_msg=f"d{name}")  # fmt: skip


def test_which_rows_it_takes():
    assert splash.supports(1024) and splash.supports(256, 128) and splash.supports(128)
    assert not splash.supports(200) and not splash.supports(256, 64) and not splash.supports(96)
    q = jnp.zeros((1, 200, 2, 16))
    with pytest.raises(ValueError, match="200 tokens"):
        splash.splash_attention(q, q, q)


def _unbox(tree):
    return jax.tree.map(lambda x: getattr(x, "value", x), tree,
                        is_leaf=lambda x: hasattr(x, "value"))  # fmt: skip


@pytest.mark.parametrize(
    "T, mesh",
    [(128, ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp")),  # the kernel per device
     (32, None)],  # rows it does not take (not 128-row blocks): the blockwise kernel
)  # fmt: skip
def test_model_trains_as_with_xla(T, mesh, monkeypatch):
    made, make = [], splash._kernel
    monkeypatch.setattr(splash, "_kernel", lambda *a: made.append(a) or make(*a))
    xla_cfg = get_variant("tiny", max_seq_len=T, sliding_window=48)
    cfg = xla_cfg.replace(attention_impl="splash", flash_block=128)
    params = _unbox(model_fns(xla_cfg)[0](jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (4, T)), jnp.int32)
    seg, pos = _documents([[T // 4, T // 2, T // 8]] + [[T // 2, T // 2]] * 3, T)
    batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1), "segment_ids": seg,
             "positions": pos, "loss_mask": (seg != 0).astype(jnp.float32)}  # fmt: skip
    results = []
    for c, m in ((xla_cfg, None), (cfg, mesh)):
        loss_fn = lm_loss(model_fns(c)[1], ml_collections.ConfigDict({"z_loss": 1e-4}))
        fn = jax.jit(jax.value_and_grad(lambda p, f=loss_fn: f(p, batch, None)[0]))
        if m is None:
            results.append(fn(params))
        else:
            with use_mesh(make_mesh(m[0]), logical_axis_rules(m[1])):
                results.append(fn(params))
    (want, want_g), (got, got_g) = results
    # 128-row blocks: the kernel, per device on 2 query and 1 kv head (tensor 2); else none
    assert {a[:3] for a in made} == ({(2, 1, T)} if T % 128 == 0 else set())
    np.testing.assert_allclose(float(got), float(want), rtol=2e-5)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
