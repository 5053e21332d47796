"""Pre-norms folded into the decode step (`generate(..., decode_norm="fold")`): the scales
multiplied into the next weights (`transformer.fold_norms`), the division by rms(x) inside the
Pallas attention and gate|up kernels (run here in Pallas' interpreter). Checked against the
model as it runs unfolded: the same forward, the same greedy and sampled tokens and logprobs
(float32, where the folds' rounding is invisible), the kernels really given the raw rows; and
the models it cannot apply to refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.models import decode_attention, decode_mlp
from flaxlm.models.decode import generate
from flaxlm.models.layers import rms_normalize
from flaxlm.models.transformer import Transformer, fold_norms, fuse_projections, unstack_layers
from tests.models.test_decode import PROMPTS, _model

EPS = 1e-5


def _rows(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_gate_up_kernel_reads_the_stacked_weight_and_folds_the_norm():
    x, wg, wu = _rows(0, 5, 256), _rows(1, 256, 64), _rows(2, 256, 64)
    apart = decode_mlp.gate_up_silu(x, wg, wu, block_n=32, block_k=64)
    stacked = decode_mlp.gate_up_silu(x, jnp.stack([wg, wu], axis=1), block_n=32, block_k=64)
    np.testing.assert_array_equal(stacked, apart)  # the same blocks, read from one array
    x_hat = rms_normalize(x, EPS, jnp.float32)
    want = jax.nn.silu(x_hat @ wg) * (x_hat @ wu)
    got = decode_mlp.gate_up_silu(x * 3.0, wg, wu, norm_eps=EPS, block_n=32, block_k=64)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)  # (x scaled: rms divides it out)
    with pytest.raises(ValueError, match=r"weights \(256, 3, 64\)"):
        decode_mlp.gate_up_silu(x, jnp.zeros((256, 3, 64)))


def test_attention_kernel_divides_qkv_by_the_rows_rms():
    """The kernel given raw q|k|v and the rows' x equals the kernel given q|k|v / rms(x)
    already: outputs and the keys and values it writes."""
    B, K, G, H, S, D = 3, 2, 2, 32, 64, 128
    R = K * G + 2 * K
    qkv = _rows(3, B, 1, R, H)
    x = _rows(4, B, 1, D) * jnp.array([1.0, 4.0, 0.25])[:, None, None]
    cos, sin = (f(_rows(5, B, 1, H // 2)) for f in (jnp.cos, jnp.sin))
    caches = (_rows(6, B, K, S, H), _rows(7, B, K, S, H))
    mask = jnp.broadcast_to(jnp.arange(S) <= 9, (B, 1, 1, S))  # nine earlier slots, the new one
    inv_rms = jax.lax.rsqrt(jnp.mean(x * x, axis=-1) + EPS)  # (B, 1)
    want = decode_attention.decode_attention(qkv * inv_rms[:, :, None, None], cos, sin, *caches,
                                             mask, 9, block_k=16)  # fmt: skip
    got = decode_attention.decode_attention(qkv, cos, sin, *caches, mask, 9, block_k=16,
                                            norm_x_BTD=x, norm_eps=EPS)  # fmt: skip
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="power of two"):
        decode_attention.decode_attention(qkv, cos, sin, *caches, mask, 9, block_k=16,
                                          norm_x_BTD=x[..., :96])  # fmt: skip


@pytest.mark.parametrize("offset", [False, True])
def test_folded_params_give_the_same_forward(offset):
    """fold_norms + `decode_norm="fold"` outside the kernels (a full forward: each layer
    normalises its input unscaled) equals the model, with Llama's norm scale and with Gemma's
    1 + scale."""
    cfg, params = _model(norm_unit_offset=offset, scan_layers=False)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 12)))
    want = Transformer(cfg).apply({"params": params}, tokens)
    for fused in (False, True):
        p = fuse_projections(params, cfg.n_layers) if fused else params
        model = Transformer(cfg, fused_projections=fused, decode_norm="fold")
        got = model.apply({"params": fold_norms(cfg, p, cfg.n_layers)}, tokens)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _counting(monkeypatch):
    """{kernel: [norm_eps of each traced call]} while patched."""
    calls = {"attention": [], "mlp": []}
    real_attention, real_mlp = decode_attention.decode_attention, decode_mlp.gate_up_silu

    def attention(*a, **k):
        calls["attention"].append(k.get("norm_x_BTD") is not None)
        return real_attention(*a, **k)

    def mlp(*a, **k):
        calls["mlp"].append(k.get("norm_eps") is not None)
        return real_mlp(*a, **k)

    monkeypatch.setattr(decode_attention, "decode_attention", attention)
    monkeypatch.setattr(decode_mlp, "gate_up_silu", mlp)
    return calls


def test_generate_folded_equals_the_model(monkeypatch):
    """Greedy and sampled decoding with the folded norms (the Pallas attention and gate|up
    kernels, fused and separate projections): the unfolded XLA path's tokens and logprobs,
    and every decode step's kernel given the raw rows."""
    cfg, params = _model(d_model=128, d_ff=192, n_heads=4, n_kv_heads=2, head_dim=32)
    calls = _counting(monkeypatch)
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=20)):
        kw.update(max_new_tokens=5, rng=jax.random.PRNGKey(3), decode_attention="xla")
        want = generate(cfg, params, PROMPTS, **kw)
        for fused in (False, True):
            kw.update(decode_attention="pallas", decode_mlp="pallas", fuse_projections=fused)
            got = generate(cfg, params, PROMPTS, decode_norm="fold", **kw)
            np.testing.assert_array_equal(got.tokens, want.tokens)
            np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-5)
    # traced once per layer and program (4 programs): every call folds the norm
    assert calls["attention"] == [True] * 4 * cfg.n_layers
    assert calls["mlp"] == [True] * 4 * cfg.n_layers


def test_scanned_params_and_the_xla_paths_fold_too():
    """Scanned params (unstacked before folding) and no kernels at all (XLA attention and
    MLP normalising unscaled): still the model's tokens."""
    cfg, params = _model(scan_layers=True)
    kw = dict(max_new_tokens=5, rng=jax.random.PRNGKey(1), temperature=0, decode_attention="xla")
    want = generate(cfg, params, PROMPTS, **kw)
    got = generate(cfg, params, PROMPTS, decode_norm="fold", **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-5)
    folded = fold_norms(cfg, unstack_layers(params, cfg.n_layers), cfg.n_layers)
    g = params["layers"]["attn_norm"]["scale"][0]
    np.testing.assert_allclose(folded["layers_0"]["attn"]["q"]["kernel"],
                               params["layers"]["attn"]["q"]["kernel"][0] * g[:, None, None],
                               rtol=1e-6)  # fmt: skip


@pytest.mark.parametrize("kw,why", [
    (dict(qkv_bias=True), "qkv_bias"),
    (dict(norm_placement="post"), "norm_placement='post'"),
    (dict(qk_norm="head"), "qk_norm='head'"),
    (dict(n_experts=4), "mixture of experts"),
])  # fmt: skip
def test_models_it_cannot_fold_are_refused(kw, why):
    cfg, params = _model(**kw)
    with pytest.raises(ValueError, match=f"decode_norm='fold' does not apply.*{why}"):
        generate(cfg, params, PROMPTS, max_new_tokens=2, rng=jax.random.PRNGKey(0),
                 decode_norm="fold")  # fmt: skip


def test_unknown_decode_norm_is_refused():
    cfg, params = _model()
    with pytest.raises(ValueError, match="decode_norm must be one of"):
        generate(cfg, params, PROMPTS, max_new_tokens=2, rng=jax.random.PRNGKey(0),
                 decode_norm="folded")  # fmt: skip


def test_folded_decode_under_a_mesh_is_the_one_device_decode(monkeypatch):
    """data 4 × fsdp 2: the attention kernel runs per device on its rows (the rows' x sharded
    with them), the MLP on XLA's path (normalising unscaled) — the one-device tokens."""
    from flaxlm.models.sharding import logical_axis_rules, make_mesh

    calls = _counting(monkeypatch)
    cfg, params = _model(d_model=128, d_ff=192, n_heads=4, n_kv_heads=2, head_dim=32)
    kw = dict(max_new_tokens=5, rng=jax.random.PRNGKey(5), temperature=0,
              decode_attention="pallas", decode_norm="fold")  # fmt: skip
    prompts = PROMPTS + [[7, 8], [9], [1, 2, 3, 4, 5]] * 2 + [[6]]  # 10, run as 16 rows
    want = generate(cfg, params, prompts, **kw)
    mesh = make_mesh({"data": 4, "fsdp": 2})
    got = generate(cfg, params, prompts, mesh=mesh, rules=logical_axis_rules("fsdp"), **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-5)
    assert calls["attention"] == [True] * 2 * cfg.n_layers  # both programs fold in the kernel
