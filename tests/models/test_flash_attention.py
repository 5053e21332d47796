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
from flaxlm.models.flash_attention import flash_attention, visited_tiles
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
     (10, 0.0, 40, 8),  # window - 1 = 1 mod block: a block's first row needs a key 9 back
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


def _check_tiles(T, b, packed=None, window=0, q_rows=None):
    """The visited tiles: the forward's and the backward's enumerations agree, every tile left
    out is hidden by the dense mask; returns (visited, needed)."""
    seg, pos = packed if packed is not None else (None, None)
    Tq = T if q_rows is None else q_rows.shape[1]
    fwd, bwd = visited_tiles(Tq, T, seg, pos, q_rows_BT=q_rows, window=window, block=b)
    np.testing.assert_array_equal(np.asarray(fwd), np.asarray(bwd))
    B = 1 if seg is None else seg.shape[0]
    slot = jnp.broadcast_to(jnp.arange(T), (B, T))
    if seg is None:
        dense = np.asarray(causal_mask(T, T, window))[:, 0]
    else:
        dense = np.asarray(attention_mask(seg, seg, slot, slot, pos, pos, window))[:, 0]
    if q_rows is not None:
        dense = dense[:, np.asarray(q_rows)[0]]
    needed = dense.reshape(B, Tq // b, b, T // b, b).any(axis=(0, 2, 4))
    missed = np.argwhere(needed & ~np.asarray(fwd)).tolist()
    assert not missed, f"window={window}: needed (query, key) blocks not visited: {missed}"
    return np.asarray(fwd), needed


def test_visited_tiles_skip_only_hidden_blocks():
    """Blocks of 8 over 64 tokens: what is visited covers what the mask needs, forward and
    backward alike, and skips what ids, windows and causality hide."""
    T, b, n = 64, 8, 8
    packed = _documents([[20, 20, 24], [12, 30, 22]], T)
    visited, needed = _check_tiles(T, b, packed)
    # documents start at 0, 20, 40 (row 0) and 0, 12, 42 (row 1): query block i starts at the
    # earliest start of its first row's document, over both rows
    lo = np.minimum([0, 0, 0, 20, 20, 40, 40, 40], [0, 0, 12, 12, 12, 12, 42, 42]) // b
    np.testing.assert_array_equal(visited.argmax(axis=1), lo)
    assert needed[np.arange(n), lo].all() and visited.sum() < n * (n + 1) // 2
    # ids that repeat in a row (not rising): every causal block
    seg, pos = packed
    visited, _ = _check_tiles(T, b, (seg.at[1, 50:].set(1), pos))
    np.testing.assert_array_equal(visited, np.tri(n, dtype=bool))
    # a window over plain rows: the band; the stretch of rows 24 … 47 of a longer row
    visited, needed = _check_tiles(T, b, window=12)
    np.testing.assert_array_equal(visited, needed)
    q_rows = jnp.arange(24, 48)[None]
    visited, needed = _check_tiles(T, b, q_rows=q_rows)
    np.testing.assert_array_equal(visited, needed)


def test_visited_tiles_are_the_band_of_every_window():
    """Plain rows, every window from 1 to past two blocks: the visited key blocks are exactly
    the needed ones. Query block i's first row, b·i, sees keys down to b·i − window + 1, so its
    first key block is floor((b·i − window + 1) / b); the windows where that key is a block's
    last (window = 2 mod b: 2, 10, ...) are the ones a range one key short loses, and a model
    with them drops keys it must see (outputs ~0.5 off XLA's at window 10, block 8)."""
    T, b = 64, 8
    for window in range(1, 2 * b + 2):
        visited, needed = _check_tiles(T, b, window=window)
        np.testing.assert_array_equal(visited, needed, err_msg=f"window={window}")
        i = np.arange(T // b)
        np.testing.assert_array_equal(visited.argmax(axis=1),
                                      np.maximum(0, (b * i - window + 1) // b))  # fmt: skip


def test_queries_from_a_stretch_of_the_row():
    """`q_rows_BT`: 24 queries (rows 13 … 36) against the 40 keys of their row, as a device
    under context parallelism computes them, equal those rows of the full attention."""
    T, rows = 40, jnp.arange(13, 37)
    q, k, v = _qkv(2, T, 4, 2, 8, seed=4)
    seg, pos = _documents([[10, 20, 7], [3, 3, 3, 30]], T)
    for packed, window in ((None, 0), ((seg, pos), 5)):
        full = xla_attention(
            q,
            k,
            v,
            (
                causal_mask(T, T, window)
                if packed is None
                else attention_mask(
                    seg, seg, *[jnp.broadcast_to(jnp.arange(T), (2, T))] * 2, pos, pos, window
                )
            ),
        )
        got = flash_attention(q[:, rows], k, v, *(packed or ()), q_rows_BT=rows[None],
                              window=window, block=8)  # fmt: skip
        live = np.ones((2, len(rows)), bool) if packed is None else np.asarray(seg)[:, rows] != 0
        np.testing.assert_allclose(np.asarray(got)[live], np.asarray(full[:, rows])[live],
                                   rtol=2e-5, atol=2e-6)  # fmt: skip


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


@pytest.mark.parametrize("impl", ["flash", "cudnn"])
def test_sown_attention_weights_are_the_xla_models(impl):
    """Whichever kernel ran: the cuDNN path sowed nothing (the inspect notebook's KeyError
    'intermediates' on a run trained with attention_impl='cudnn')."""
    cfg = get_variant("tiny", sliding_window=5)
    params = _unbox(model_fns(cfg)[0](jax.random.PRNGKey(0)))
    batch = _batch(cfg, B=2, T=32, packed=True)
    probs = []
    for c in (cfg, cfg.replace(attention_impl=impl, flash_block=8)):
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
        ModelConfig(attention_impl="ring")


def test_context_parallel_flash_gathers_only_keys_and_values():
    """Under context parallelism the blockwise kernel keeps each device's queries where they
    are: the step's only all-gathers are each layer's keys and values, and its temporaries
    per device are below `context_attention`'s (which holds (rows, T) scores per block)."""
    cfg = get_variant("tiny", vocab_size=512, max_seq_len=1024, n_layers=2, flash_block=128)
    params = jax.eval_shape(model_fns(cfg)[0], jax.random.PRNGKey(0))
    batch = _batch(cfg, B=1, T=1024, packed=False)
    temps = {}
    for impl in ("xla", "flash"):
        fn = model_fns(cfg.replace(attention_impl=impl))[1]
        loss_fn = lm_loss(fn, ml_collections.ConfigDict({"z_loss": 0.0}))
        step = jax.jit(jax.grad(lambda p, f=loss_fn: f(p, batch, None)[0]))
        with use_mesh(make_mesh({"context": 4}, devices=jax.devices()[:4]),
                      logical_axis_rules("fsdp")):  # fmt: skip
            compiled = step.lower(params).compile()
        temps[impl] = compiled.memory_analysis().temp_size_in_bytes
    gathers = {line.split("=")[1].split("all-gather")[0].strip()
               for line in compiled.as_text().splitlines() if " all-gather(" in line}  # fmt: skip
    # keys / values f32[1,1024,2,16] (K = 2 heads of 16), nothing of the queries' (256 rows)
    assert gathers and all("[1,1024,2,16]" in s for s in gathers), gathers
    assert temps["flash"] < 0.8 * temps["xla"], temps
