"""Cross-entropy chunked over tokens: the same loss, metrics and gradients as the full-logits
loss (packed rows, masks, z-loss, tied head, LoRA), less residual memory, clear config errors."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flaxlm.bench import memory_plan
from flaxlm.models import lora as lora_lib
from flaxlm.models.config import get_variant
from flaxlm.train.losses import chunked_cross_entropy, cross_entropy
from flaxlm.train.pretrain import lm_loss, model_fns
from flaxlm.train.state import unbox

B, T = 2, 32


def _batch(vocab, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (B, T + 1)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[0, 12:] = 2  # two packed documents in row 0
    seg[1, 27:] = 0  # padding at the end of row 1
    pos = np.concatenate([np.arange(12), np.arange(T - 12)])[None].repeat(B, 0).astype(np.int32)
    pos[1] = np.arange(T)
    mask = (seg > 0).astype(np.float32)
    mask[0, :5] = 0  # a prompt with no loss
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
            "positions": pos, "segment_ids": seg}  # fmt: skip


def _loss_cfg(chunk, z_loss=1e-3):
    c = ml_collections.ConfigDict()
    c.z_loss, c.chunk_tokens = z_loss, chunk
    return c


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_equals_full(tie):
    cfg = get_variant("tiny", init_std=0.2, tie_embeddings=tie)
    init, apply = model_fns(cfg)
    params = jax.jit(lambda r: unbox(init(r)))(jax.random.PRNGKey(0))  # (eager: ~70 programs)
    batch = _batch(cfg.vocab_size)
    full = jax.value_and_grad(lm_loss(apply, _loss_cfg(0)), has_aux=True)
    chunked = jax.value_and_grad(lm_loss(apply, _loss_cfg(8)), has_aux=True)
    (l0, m0), g0 = jax.jit(full)(params, batch, None)
    (l1, m1), g1 = jax.jit(chunked)(params, batch, None)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for k in ("nll", "z_loss", "accuracy", "weight"):
        np.testing.assert_allclose(m1[k], m0[k], rtol=1e-6, err_msg=k)
    assert float(m0["weight"]) == batch["loss_mask"].sum()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g1, g0)


def test_chunked_cross_entropy_against_the_formula():
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.standard_normal((B, T, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 50)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (B, T)), jnp.int32)
    mask = jnp.asarray(rng.random((B, T)) < 0.7, jnp.float32)
    # Jitted (a program each rather than an eager op each), as the losses run in training.
    got, gm = jax.jit(lambda h, w: chunked_cross_entropy(h, lambda x: x @ w, targets, mask, 4,
                                                         z_loss=0.01))(h, w)  # fmt: skip
    want, wm = jax.jit(lambda h, w: cross_entropy(h @ w, targets, mask, z_loss=0.01))(h, w)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # and by hand: mean over masked tokens of logsumexp - picked (+ 0.01 · mean lse²)
    logits = np.asarray(h @ w, np.float64)
    lse = np.log(np.exp(logits).sum(-1))
    nll = lse - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
    m = np.asarray(mask)
    np.testing.assert_allclose(got, (nll * m).sum() / m.sum() + 0.01 * (lse**2 * m).sum() / m.sum(),
                               rtol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="chunk_tokens=5 must be > 0 and divide seq_len=32"):
        chunked_cross_entropy(h, lambda x: x @ w, targets, mask, 5)


def test_chunked_with_lora_equals_full():
    cfg = get_variant("tiny", init_std=0.2)
    init, apply = model_fns(cfg)
    spec = lora_lib.LoraSpec(rank=2, alpha=4.0)

    @jax.jit  # (eager: hundreds of small programs)
    def lora_init(rng):
        params = unbox(lora_lib.with_lora(init, spec)(rng))
        params["lora"] = jax.tree.map(lambda x: x + 0.05, params["lora"])  # b starts at 0: nudge
        return params

    params = lora_init(jax.random.PRNGKey(0))
    prepare = functools.partial(lora_lib.merge, spec=spec, freeze_base=True)
    batch = _batch(cfg.vocab_size, seed=3)
    outs = [  # jitted, as in training (eager, each is hundreds of small programs)
        jax.jit(jax.value_and_grad(lm_loss(apply, _loss_cfg(c), prepare), has_aux=True))(
            params, batch, None
        )
        for c in (0, 16)
    ]
    (l0, _), g0 = outs[0]
    (l1, _), g1 = outs[1]
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g1, g0)
    assert all(np.abs(x).max() == 0 for x in jax.tree.leaves(g1["base"]))  # frozen


def test_chunking_removes_the_logits_from_the_residuals():
    cfg = get_variant("tiny", vocab_size=4096)  # a vocab large enough to dominate
    init, apply = model_fns(cfg)
    params = jax.eval_shape(lambda r: unbox(init(r)), jax.random.PRNGKey(0))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in _batch(4096).items()}
    res = {}
    for chunk in (0, 8):
        loss = lm_loss(apply, _loss_cfg(chunk))
        scalar = lambda p, b, loss=loss: loss(p, b, None)[0]  # noqa: E731
        res[chunk] = memory_plan.residual_bytes(scalar, params, batch)[0]
    logits_f32 = B * T * cfg.vocab_size * 4
    # a full float32 logits array fewer, up to one float per token
    assert res[0] - res[8] >= logits_f32 - B * T * 4
    assert res[8] < logits_f32
