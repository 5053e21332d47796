"""attention_impl="flash" (models/flash_attention.py): the blockwise kernel's outputs and
gradients equal `xla_attention`'s — causal rows, windows, packed documents (ids rising or not),
soft-capped logits, grouped heads, lengths that are not a multiple of the block — it skips only
blocks the mask hides, it never builds a (T, T) array, and a model with it trains as the XLA
model does, across mesh shapes and under context parallelism."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flaxlm.models import attention
from flaxlm.models.attention import attention_mask, causal_mask, xla_attention
from flaxlm.models.config import ModelConfig, get_variant
from flaxlm.models.flash_attention import block_ranges, flash_attention
from flaxlm.models.sharding import logical_axis_rules, make_mesh, use_mesh
from flaxlm.train.pretrain import lm_loss, model_fns


def _documents(lengths_per_row, T):
    """Segment ids and in-document positions (B, T) from each row's document lengths; the
    rest of a row is padding (id 0). A length list may repeat an id by giving (id, length)."""
    seg = np.zeros((len(lengths_per_row), T), np.int32)
    pos = np.zeros_like(seg)
    for r, docs in enumerate(lengths_per_row):
        t = 0
        for d, doc in enumerate(docs):
            sid, n = doc if isinstance(doc, tuple) else (d + 1, doc)
            seg[r, t : t + n], pos[r, t : t + n] = sid, np.arange(n)
            t += n
    return jnp.asarray(seg), jnp.asarray(pos)


def _qkv(B, T, N, K, H, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(B, T, N, H), (B, T, K, H), (B, T, K, H)]
    return [jnp.asarray(rng.normal(size=s), dtype) for s in shapes]


def _check_against_xla(q, k, v, packed=None, window=0, cap=0.0, scale=None, block=8,
                       rtol=2e-5, atol=2e-6):  # fmt: skip
    """flash and xla attention: outputs and q/k/v gradients of a random cotangent, on the rows
    that see at least one key (padding rows differ by design and get no cotangent)."""
    B, T, N, H = q.shape
    if packed is None:
        mask, live = causal_mask(T, T, window), jnp.ones((B, T), bool)
    else:
        seg, pos = packed
        slot = jnp.broadcast_to(jnp.arange(T), (B, T))
        mask, live = attention_mask(seg, seg, slot, slot, pos, pos, window), seg != 0

    def flash(q, k, v):
        return flash_attention(q, k, v, *(packed or ()), window=window, scale=scale, cap=cap,
                               block=block)  # fmt: skip

    def xla(q, k, v):
        return xla_attention(q, k, v, mask, scale, cap)

    rows = live[:, :, None, None]
    cot = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), q.dtype) * rows
    flash, xla = jax.jit(flash), jax.jit(xla)
    got, want = flash(q, k, v), xla(q, k, v)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    np.testing.assert_allclose(f32(got * rows), f32(want * rows), rtol=rtol, atol=atol)
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum((f(*a) * cot).astype(jnp.float32)),
                              argnums=(0, 1, 2)))(q, k, v) for f in (flash, xla)]  # fmt: skip
    for name, g, w in zip("qkv", *grads, strict=True):
        np.testing.assert_allclose(f32(g), f32(w), rtol=rtol, atol=atol, err_msg=f"d{name}")


@pytest.mark.parametrize(
    "window, cap, T, block",
    [(0, 0.0, 40, 8), (11, 5.0, 40, 8),
     (11, 0.0, 37, 8),  # padded up to 40 inside
     (0, 5.0, 40, 64)],  # one block, larger than the row
)  # fmt: skip
def test_plain_rows_match_xla(window, cap, T, block):
    q, k, v = _qkv(2, T, 4, 2, 8)
    _check_against_xla(q, k, v, window=window, cap=cap, block=block)


@pytest.mark.parametrize(
    "docs, window",
    [
        ([[10, 20, 7], [3, 3, 3, 30]], 0),  # rising ids, padded ends, other documents per row
        ([[10, 20, 7], [3, 3, 3, 30]], 5),
        ([[(1, 8), (2, 8), (1, 8), (3, 10)], [(2, 20), (0, 4), (2, 10)]], 5),  # ids repeat
        ([[1] * 40, [40]], 0),  # 40 one-token documents (each attends to itself only)
    ],
)  # fmt: skip
def test_packed_rows_match_xla(docs, window):
    T = 40
    q, k, v = _qkv(2, T, 4, 1, 8, seed=2)  # multi-query: one kv head for 4 query heads
    _check_against_xla(q, k, v, packed=_documents(docs, T), window=window, cap=3.0)


def test_custom_scale_and_bfloat16():
    q, k, v = _qkv(2, 48, 4, 2, 16, seed=3)
    _check_against_xla(q, k, v, scale=0.3, window=9)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    # bfloat16 inputs: both kernels round their probabilities and matmul inputs to bfloat16,
    # in different orders (the online softmax rescales), so they agree to bfloat16 precision
    _check_against_xla(*bf, packed=_documents([[20, 28], [48]], 48), rtol=0.05, atol=0.05)


def test_block_ranges_skip_exactly_the_hidden_blocks():
    """Bounds from the ids: blocks of 8, two rows. Every tile outside the bounds is fully
    masked (checked against the dense mask), and the bounds are tight where ids rise."""
    T, b, n = 64, 8, 8
    seg, pos = _documents([[20, 20, 24], [12, 30, 22]], T)
    meta = (seg.reshape(2, n, b), pos.reshape(2, n, b))
    lo, hi = (np.asarray(x) for x in block_ranges(n, b, 0, meta))
    # row 0 documents start at 0, 20, 40; row 1 at 0, 12, 42: query block i (rows 8i …) sees
    # from the earliest start of its first row's document over both rows
    starts = np.minimum([0, 0, 0, 20, 20, 40, 40, 40], [0, 0, 12, 12, 12, 12, 42, 42])
    np.testing.assert_array_equal(lo, starts // b)
    slot = jnp.broadcast_to(jnp.arange(T), (2, T))
    dense = np.asarray(attention_mask(seg, seg, slot, slot, pos, pos))[:, 0]  # (2, T, T)
    tiles = dense.reshape(2, n, b, n, b).any(axis=(0, 2, 4))  # (query block, key block)
    for i in range(n):
        for j in range(n):
            visited = lo[i] <= j <= i
            assert visited == (j <= i and i < hi[j]), (i, j)
            if not visited:
                assert not tiles[i, j], (i, j)
    assert tiles[np.arange(n), lo].all()  # the first visited tile of each row block is needed
    # ids that repeat in a row (not rising): every causal block
    seg2 = seg.at[1, 50:].set(1)
    lo2, hi2 = block_ranges(n, b, 0, (seg2.reshape(2, n, b), meta[1]))
    assert not np.asarray(lo2).any() and (np.asarray(hi2) == n).all()
    # a window over plain rows: 12 back from the block's first row
    lo3, hi3 = (np.asarray(x) for x in block_ranges(n, b, 12, None))
    np.testing.assert_array_equal(lo3, np.maximum(0, (np.arange(n) * b - 11) // b))
    np.testing.assert_array_equal(hi3, np.minimum(n, (np.arange(n) * b + 18) // b + 1))


def _loss_grad_hlo(cfg, T):
    loss_fn = lm_loss(model_fns(cfg)[1], ml_collections.ConfigDict({"z_loss": 0.0}))
    params = jax.eval_shape(model_fns(cfg)[0], jax.random.PRNGKey(0))
    batch = {"tokens": jnp.zeros((1, T), jnp.int32), "targets": jnp.zeros((1, T), jnp.int32),
             "loss_mask": jnp.ones((1, T), jnp.float32)}  # fmt: skip
    fn = jax.jit(jax.grad(lambda p: loss_fn(p, batch, None)[0]))
    return fn.lower(params).compile().as_text()


def test_no_sequence_squared_buffer():
    """The training step of a 512-token row holds no (512, 512) array with flash (its tiles
    are (64, 64)); the XLA kernel's scores are (…, 512, 512)."""
    cfg = get_variant("tiny", max_seq_len=512, n_layers=1, vocab_size=128, flash_block=64)
    assert "512,512]" in _loss_grad_hlo(cfg, 512)
    assert "512,512]" not in _loss_grad_hlo(cfg.replace(attention_impl="flash"), 512)


# ----------------------------------------------------------------------------------------------
# In the model


def _unbox(tree):
    return jax.tree.map(lambda x: getattr(x, "value", x), tree,
                        is_leaf=lambda x: hasattr(x, "value"))  # fmt: skip


def _batch(cfg, B, T, packed):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1),
             "loss_mask": jnp.ones((B, T), jnp.float32)}  # fmt: skip
    if packed:
        seg, pos = _documents([[9, 14, 6, 2]] + [[T // 2, T // 2 - 3]] * (B - 1), T)
        batch.update(segment_ids=seg, positions=pos, loss_mask=(seg != 0).astype(jnp.float32))
    return batch


def _loss_and_grads(cfg, params, batch, mesh=None, preset="fsdp"):
    loss_fn = lm_loss(model_fns(cfg)[1], ml_collections.ConfigDict({"z_loss": 1e-4}))
    fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, None)[0]))
    if mesh is None:
        return fn(params)
    with use_mesh(mesh, logical_axis_rules(preset)):
        return fn(params)


def _assert_same(got, want):
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=2e-5)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


GEMMA2_LIKE = dict(sliding_window=6, sliding_window_pattern=2, attn_logit_softcap=20.0,
                   scan_layers=True, remat_policy="full")  # fmt: skip


@pytest.mark.parametrize(
    "overrides, packed, mesh",
    [
        ({}, False, None),
        ({}, True, None),
        # mixed local / global layers, scanned (the window picked by lax.cond), soft-capped
        (GEMMA2_LIKE, True, None),
        ({"n_heads": 4, "n_kv_heads": 2}, True, ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp")),
        # context parallelism: packed rows take context_attention with a mask from the ids
        ({"sliding_window": 6}, True, ({"data": 2, "context": 4}, "fsdp")),
    ],
)  # fmt: skip
def test_model_trains_as_with_xla(overrides, packed, mesh, monkeypatch):
    monkeypatch.setattr(attention, "ATTENTION_CHUNK", 4)  # context_attention's row blocks
    xla_cfg = get_variant("tiny", **overrides)
    cfg = xla_cfg.replace(attention_impl="flash", flash_block=8)
    params = _unbox(model_fns(xla_cfg)[0](jax.random.PRNGKey(0)))
    batch = _batch(cfg, B=4, T=32, packed=packed)
    want = _loss_and_grads(xla_cfg, params, batch)
    if mesh is not None:
        mesh = (make_mesh(mesh[0]), mesh[1])
    _assert_same(_loss_and_grads(cfg, params, batch, *(mesh or ())), want)


def test_sown_attention_weights_are_the_xla_models():
    cfg = get_variant("tiny", sliding_window=5)
    params = _unbox(model_fns(cfg)[0](jax.random.PRNGKey(0)))
    batch = _batch(cfg, B=2, T=32, packed=True)
    probs = []
    for c in (cfg, cfg.replace(attention_impl="flash", flash_block=8)):
        from flaxlm.models.transformer import Transformer

        _, sown = Transformer(c).apply({"params": params}, batch["tokens"], batch["positions"],
                                       batch["segment_ids"], mutable="intermediates")  # fmt: skip
        probs.append(jax.tree.leaves(sown))
    assert probs[0] and len(probs[0]) == len(probs[1])
    for a, b in zip(*probs, strict=True):  # (the layers' inputs differ by rounding)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_config_checks():
    with pytest.raises(ValueError, match="flash_block=0"):
        ModelConfig(flash_block=0)
    with pytest.raises(ValueError, match="'flash'"):
        ModelConfig(attention_impl="splash")
