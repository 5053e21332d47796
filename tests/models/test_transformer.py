"""Model behaviour: causality, packing isolation, cache decoding, layouts, parameter metadata."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.models.config import VARIANTS, get_variant
from flaxlm.models.rope import rope_inv_freq
from flaxlm.models.transformer import (
    Transformer,
    init_cache,
    stack_layers,
    unstack_layers,
)

# Gemma 2/3-style blocks on the tiny shape: sandwich norms with (1 + w) scales, scaled
# embeddings, per-head q/k norms, a query scale and soft-caps, and layer 0 local (window 4,
# its own RoPE base) while layer 1 is global.
GEMMA = dict(norm_placement="sandwich", norm_unit_offset=True, scale_embeddings=True,
             qk_norm="head", query_pre_attn_scalar=24.0, attn_logit_softcap=5.0,
             final_logit_softcap=10.0, sliding_window=4, sliding_window_pattern=2,
             rope_local_theta=500.0)  # fmt: skip


def _init(cfg, B=2, T=16, seed=0):
    model = Transformer(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(seed + 1), (B, T), 0, cfg.vocab_size)
    params = model.init(jax.random.PRNGKey(seed), tokens)["params"]
    return model, nn.meta.unbox(params), tokens


@pytest.mark.parametrize(
    "kw", [{}, {"scan_layers": True, "remat_policy": "full"}, {"sliding_window": 4},
           {**GEMMA, "scan_layers": True, "remat_policy": "full"}]
)  # fmt: skip
def test_gradient_wrt_future_positions_is_zero(kw):
    cfg = get_variant("tiny", **kw)
    model, params, tokens = _init(cfg)
    embeds = model.apply({"params": params}, tokens, method=lambda m, t: m.embed(t))
    t = 7

    def logit_sum_at_t(e):
        out = model.apply({"params": params}, tokens, input_embeds=e)
        return out[:, t].sum()

    g = jax.grad(logit_sum_at_t)(embeds)
    assert jnp.all(g[:, t + 1 :] == 0), "position t depends on a later position"
    assert jnp.any(g[:, : t + 1] != 0)


def test_packed_documents_do_not_see_each_other():
    cfg = get_variant("tiny")
    model, params, tokens = _init(cfg, B=1, T=16)
    seg = jnp.asarray([[1] * 6 + [2] * 7 + [0] * 3])
    pos = jnp.asarray([list(range(6)) + list(range(7)) + [0] * 3])
    base = model.apply({"params": params}, tokens, pos, seg)
    # Change only document 1: document 2's logits must not move, and vice versa.
    changed1 = tokens.at[0, 2].set((tokens[0, 2] + 1) % cfg.vocab_size)
    out1 = model.apply({"params": params}, changed1, pos, seg)
    np.testing.assert_array_equal(out1[0, 6:13], base[0, 6:13])
    assert not np.allclose(out1[0, 2:6], base[0, 2:6])
    changed2 = tokens.at[0, 8].set((tokens[0, 8] + 1) % cfg.vocab_size)
    out2 = model.apply({"params": params}, changed2, pos, seg)
    np.testing.assert_array_equal(out2[0, :6], base[0, :6])
    # A packed document gives the same logits as the same document alone in its row.
    alone = model.apply({"params": params}, tokens[:, 6:13])
    np.testing.assert_allclose(base[0, 6:13], alone[0], atol=1e-5)


def test_sliding_window_limits_context():
    cfg = get_variant("tiny", sliding_window=4)
    model, params, tokens = _init(cfg, B=1, T=12)
    base = model.apply({"params": params}, tokens)
    changed = tokens.at[0, 0].set((tokens[0, 0] + 1) % cfg.vocab_size)
    out = model.apply({"params": params}, changed)
    # With 2 layers a token reaches back 2·(window−1) = 6 positions; position 7+ is unaffected.
    np.testing.assert_array_equal(out[0, 7:], base[0, 7:])
    assert not np.allclose(out[0, 1:4], base[0, 1:4])


@pytest.mark.parametrize("scan", [False, True])
def test_mixed_local_and_global_layers(scan):
    """With sliding_window_pattern=2, layer 0 attends within the window and layer 1 to the
    whole prefix: a change at position 0 reaches every later position (through layer 1),
    where with both layers local it stops at 2·(window−1); layer 0 alone is local (the
    logits' gradient through only layer 0 is zero outside its window)."""
    kw = dict(sliding_window=4, scan_layers=scan)
    mixed = get_variant("tiny", sliding_window_pattern=2, **kw)
    model, params, tokens = _init(mixed, B=1, T=12)  # (scanned params when scan)
    changed = tokens.at[0, 0].set((tokens[0, 0] + 1) % mixed.vocab_size)
    for cfg, reaches_end in ((mixed, True), (mixed.replace(sliding_window_pattern=0), False)):
        base = Transformer(cfg).apply({"params": params}, tokens)
        out = Transformer(cfg).apply({"params": params}, changed)
        assert (not np.allclose(out[0, 8:], base[0, 8:])) == reaches_end, cfg
    one = get_variant("tiny", sliding_window_pattern=2, n_layers=1, sliding_window=4)
    assert one.layer_is_local(0) and not mixed.layer_is_local(1)
    model1, params1, _ = _init(one, B=1, T=12)
    base = model1.apply({"params": params1}, tokens)
    np.testing.assert_array_equal(model1.apply({"params": params1}, changed)[0, 4:], base[0, 4:])


@pytest.mark.parametrize("packed", [False, True])
def test_soft_capped_attention_in_query_blocks_on_accelerators(packed, monkeypatch):
    """With attention_impl="cudnn", soft-capped attention (which cuDNN cannot run) takes the
    XLA path in blocks of query rows, each rematerialised: the same logits and gradients as
    the plain XLA path, for plain causal rows and packed ones (sliced masks), with a mixed
    local/global pattern and scanned layers."""
    from flaxlm.models import attention

    monkeypatch.setattr(attention, "ATTENTION_CHUNK", 4)  # (512 on accelerators)
    cfg = get_variant("tiny", **{**GEMMA, "scan_layers": True})
    model, params, tokens = _init(cfg, B=2, T=16)
    seg = jnp.asarray([[1] * 9 + [2] * 7, [1] * 16]) if packed else None
    pos = jnp.asarray([list(range(9)) + list(range(7)), list(range(16))]) if packed else None

    def loss(p, impl):
        out = Transformer(cfg.replace(attention_impl=impl)).apply({"params": p}, tokens, pos, seg)
        return (out * out).mean(), out

    (_, want), g_want = jax.value_and_grad(loss, has_aux=True)(params, "xla")
    (_, got), g_got = jax.value_and_grad(loss, has_aux=True)(params, "cudnn")
    np.testing.assert_allclose(got, want, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_got, g_want)
    blocks = jax.make_jaxpr(lambda p: loss(p, "cudnn"))(params)
    assert "checkpoint" in str(blocks) or "remat" in str(blocks)  # the blocks are recomputed


def test_cudnn_config_runs_where_cudnn_cannot(monkeypatch):
    """attention_impl="cudnn" is an execution key a GPU-trained checkpoint keeps; rebuilt on a
    CPU (evaluation, a notebook) it failed with "RuntimeError: cuDNN is not detected.". Now
    attention there is XLA's in blocks of query rows: the XLA config's logits and gradients.
    With a cuDNN in place (a stand-in: jax's needs its CUDA plugin), the choice is made by the
    target the program is lowered for, not by this process's devices (bench/gpu_aot.py
    compiles for an H200 from a CPU): lowered for CUDA it runs the stand-in, for the CPU the
    row blocks."""
    from flaxlm.models import attention

    monkeypatch.setattr(attention, "ATTENTION_CHUNK", 4)  # several row blocks of 16 tokens
    # (local and global layers, scanned: by_window's lax.cond inside the choice)
    cfg = get_variant("tiny", sliding_window=4, sliding_window_pattern=2, scan_layers=True)
    model, params, tokens = _init(cfg, B=2, T=16)

    def loss(p, impl):
        out = Transformer(cfg.replace(attention_impl=impl)).apply({"params": p}, tokens)
        return (out * out).mean(), out

    def grad(impl):  # (a fresh jit each time: traced with what is patched in now)
        return jax.jit(jax.value_and_grad(lambda p: loss(p, impl), has_aux=True))(params)

    (_, want), g_want = grad("xla")
    got = jax.jit(lambda p: loss(p, "cudnn")[1])(params)
    np.testing.assert_allclose(got, want, atol=1e-5)

    calls = []

    def stand_in(q, k, v, mask, window=0, scale=None):  # wrong on purpose, and recognisable
        calls.append(window)
        return jnp.cbrt(q)

    # as if jax had its CUDA plugin, and this were its kernel
    monkeypatch.setattr(attention, "cudnn_attention", stand_in)
    monkeypatch.setattr(attention, "_real_cudnn_attention", stand_in)
    monkeypatch.setattr(attention, "cudnn_present", lambda: True)
    # float32 is not cuDNN's (it failed to trace where jax has its CUDA plugin): row blocks
    (_, got), g_got = grad("cudnn")
    assert not calls
    np.testing.assert_allclose(got, want, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_got, g_want)
    cfg = cfg.replace(dtype="bfloat16")  # (loss and grad read it)
    (_, want), g_want = grad("xla")
    (_, got), g_got = grad("cudnn")
    assert calls
    np.testing.assert_allclose(got, want, atol=2e-2)  # the CPU ran the row blocks
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-3), g_got, g_want)
    for platform, standin_lowered in (("cuda", True), ("cpu", False)):
        lowered = jax.export.export(jax.jit(lambda p: loss(p, "cudnn")), platforms=(platform,))
        assert ("cbrt" in lowered(params).mlir_module()) == standin_lowered, platform


def test_unit_offset_norms_start_as_plain_norms():
    """Gemma's norm scales are offsets from 1 and start at 0: such a model computes what the
    Llama-style norm does with scales of 1."""
    cfg = get_variant("tiny", norm_unit_offset=True)
    model, params, tokens = _init(cfg)
    scales = [x for p, x in jax.tree_util.tree_leaves_with_path(params) if "scale" in str(p)]
    assert scales and all(not np.any(np.asarray(x)) for x in scales)
    ones = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.ones_like(x) if "scale" in str(p) else x, params)  # fmt: skip
    np.testing.assert_array_equal(
        model.apply({"params": params}, tokens),
        Transformer(cfg.replace(norm_unit_offset=False)).apply({"params": ones}, tokens),
    )


@pytest.mark.parametrize(
    "kw", [{}, {"scan_layers": True}, {"n_kv_heads": 1}, {"tie_embeddings": True, "qkv_bias": True},
           GEMMA, {**GEMMA, "scan_layers": True, "nope_layer_interval": 2}]
)  # fmt: skip  # (the last: a global layer without RoPE, as Cohere 2's)
def test_cached_decoding_matches_full_forward(kw):
    cfg = get_variant("tiny", **kw)
    model, params, tokens = _init(cfg, B=2, T=12)
    full = model.apply({"params": params}, tokens)
    cache = init_cache(cfg, 2, 16)
    logits, cache = model.apply({"params": params}, tokens[:, :5], cache=cache)
    steps = [logits]
    for t in range(5, 12):
        lg, cache = model.apply(
            {"params": params}, tokens[:, t : t + 1], jnp.full((2, 1), t, jnp.int32), cache=cache
        )
        steps.append(lg)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)
    assert int(cache["index"]) == 12


def test_cached_attention_layout_equals_xla_attention():
    """The cache layout's kernel (query heads × positions as matmul rows, heads-major cache) is
    the same attention as the training one, for grouped heads, several queries and a mask
    with holes (padded prompt slots between the prompt and the new tokens)."""
    from flaxlm.models.attention import cached_attention, xla_attention

    B, T, S, N, K, H = 2, 3, 7, 8, 2, 4
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), shape) for i, shape in
               enumerate([(B, T, N, H), (B, S, K, H), (B, S, K, H)]))  # fmt: skip
    mask = jax.random.bernoulli(jax.random.PRNGKey(9), 0.6, (B, 1, T, S)).at[..., 0].set(True)
    want = xla_attention(q, k, v, mask)
    got = cached_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("arch", [{}, {"qk_norm": "all", "norm_placement": "post",
                                     "rotary_dim": 8}, GEMMA,
                                  {**GEMMA, "nope_layer_interval": 2}])  # fmt: skip
def test_scan_and_unrolled_layouts_agree(arch):
    cfg = get_variant("tiny", **arch)  # (also OLMo 2's norms and Phi's partial rotary)
    model, params, tokens = _init(cfg)
    scan_cfg = cfg.replace(scan_layers=True, remat_policy="dots")
    stacked = stack_layers(params, cfg.n_layers)
    out_unrolled = model.apply({"params": params}, tokens)
    out_scan = Transformer(scan_cfg).apply({"params": stacked}, tokens)
    np.testing.assert_allclose(out_scan, out_unrolled, atol=1e-5)
    back = unstack_layers(stacked, cfg.n_layers)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), back, params))


def test_every_parameter_has_logical_axes():
    for kw in ({}, {"scan_layers": True}, {"qkv_bias": True},
               {"scan_layers": True, "qk_norm": "all", "norm_placement": "post"},
               {**GEMMA, "scan_layers": True}):  # fmt: skip
        cfg = get_variant("tiny", **kw)
        boxed = jax.eval_shape(
            lambda r, cfg=cfg: Transformer(cfg).init(r, jnp.zeros((1, 4), jnp.int32)),
            jax.random.PRNGKey(0),
        )["params"]
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
        for box in leaves:
            assert len(box.names) == len(box.value.shape)


@pytest.mark.parametrize("name", [*sorted(VARIANTS), "tiny+head+bias", "tiny+all+post",
                                  "tiny+gemma"])  # fmt: skip
def test_param_count_matches_initialised_model(name):
    cfg = VARIANTS[name.split("+")[0]]
    if name == "tiny+gemma":  # sandwich norms: four per layer
        cfg = cfg.replace(**GEMMA)
    elif "+" in name:  # q/k norm scales (per head: 2·H; over all heads: (N + K)·H per layer),
        _, qk, extra = name.split("+")  # q/k/v biases, post-norm blocks
        cfg = cfg.replace(qk_norm=qk, qkv_bias=extra == "bias", norm_placement=(
            "post" if extra == "post" else "pre"))  # fmt: skip
    shapes = jax.eval_shape(
        lambda r: Transformer(cfg).init(r, jnp.zeros((1, 4), jnp.int32)), jax.random.PRNGKey(0)
    )
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes)))
    assert n == cfg.param_counts()["total"]


def test_flops_convention():
    cfg = VARIANTS["1b"]
    c = cfg.param_counts()
    assert 1.0e9 < c["total"] < 1.2e9  # TinyLlama-1.1B
    T = 2048
    expected = 6 * c["matmul"] + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim_ * T
    assert cfg.flops_per_token(T) == expected
    assert cfg.flops_per_token(T, causal=True) == expected - 6 * 22 * 2048 * T
    # Sliding windows: a local layer's query sees min(t, W) keys (counted against brute force;
    # the causal convention is T/2 where the exact mean is (T + 1)/2, hence the tolerance);
    # with Gemma's pattern 2 half the layers are global.
    matmul = 6 * c["matmul"]
    for window, pattern, n_local in ((512, 0, 22), (512, 2, 11), (4096, 0, 22)):
        w = cfg.replace(sliding_window=window, sliding_window_pattern=pattern)
        spans = np.minimum(np.arange(1, T + 1), window)
        d = 12 * cfg.n_heads * cfg.head_dim_
        full, local = d * T, d * min(T, window)
        assert w.flops_per_token(T) == matmul + n_local * local + (22 - n_local) * full
        want = matmul + d * (n_local * spans.mean() + (22 - n_local) * (T + 1) / 2)
        np.testing.assert_allclose(w.flops_per_token(T, causal=True), want, rtol=1e-4)
    assert cfg.replace(sliding_window=512).flops_per_token(T) < expected


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="n_kv_heads"):
        get_variant("tiny", n_kv_heads=3)
    with pytest.raises(ValueError, match="attention_impl"):
        get_variant("tiny", attention_impl="ring")
    with pytest.raises(KeyError, match="unknown model variant"):
        get_variant("13b")
    with pytest.raises(ValueError, match="sliding_window_pattern=1"):
        get_variant("tiny", sliding_window=4, sliding_window_pattern=1)
    with pytest.raises(ValueError, match="set sliding_window too"):
        get_variant("tiny", sliding_window_pattern=2)
    with pytest.raises(ValueError, match="norm_placement"):
        get_variant("tiny", norm_placement="middle")
    # a negative window masked every key (attention then saw the future); zero heads divided
    # by zero
    with pytest.raises(ValueError, match=r"sliding_window=-1; must be >= 0"):
        get_variant("tiny", sliding_window=-1)
    for field in ("n_kv_heads", "n_heads", "n_layers", "vocab_size"):
        with pytest.raises(ValueError, match=rf"{field}=0; must be >= 1"):
            get_variant("tiny", **{field: 0})


def test_bad_numeric_fields_name_the_field():
    """These fields were never checked: rope_scaling_factor=0 (linear, yarn), rope_theta <= 0
    and norm_eps < 0 built a model whose every logit was NaN; d_expert / d_shared_expert < 0
    failed in XLA with an MLIRError naming nothing; rope_original_max_len=0 with yarn was a
    "math domain error"; d_ff=0 trained with no MLP and max_seq_len=0 was accepted. Now the
    config names the field and the value."""
    bad = [
        ({"rope_scaling": "linear", "rope_scaling_factor": 0.0},
         r"ModelConfig.rope_scaling_factor=0.0; must be > 0 with rope_scaling='linear'"),
        ({"rope_scaling": "yarn", "rope_scaling_factor": -2.0},
         r"ModelConfig.rope_scaling_factor=-2.0; must be > 0 with rope_scaling='yarn'"),
        ({"rope_scaling": "yarn", "rope_scaling_factor": 4.0, "rope_original_max_len": 0},
         r"ModelConfig.rope_original_max_len=0; must be >= 1"),
        ({"rope_scaling": "yarn", "rope_scaling_factor": 4.0, "rope_yarn_beta_slow": 0.0},
         r"ModelConfig.rope_yarn_beta_slow=0.0; must be > 0"),
        ({"rope_theta": 0.0}, r"ModelConfig.rope_theta=0.0; must be > 0"),
        ({"rope_theta": -1.0}, r"ModelConfig.rope_theta=-1.0; must be > 0"),
        ({"sliding_window": 4, "sliding_window_pattern": 2, "rope_local_theta": -1.0},
         r"ModelConfig.rope_local_theta=-1.0; must be >= 0"),
        ({"norm_eps": -1.0}, r"ModelConfig.norm_eps=-1.0; must be > 0"),
        ({"norm_eps": 0.0}, r"ModelConfig.norm_eps=0.0; must be > 0"),
        ({"d_ff": 0}, r"ModelConfig.d_ff=0; must be >= 1"),
        ({"max_seq_len": 0}, r"ModelConfig.max_seq_len=0; must be >= 1"),
        ({"n_experts": 4, "d_expert": -4}, r"ModelConfig.d_expert=-4; must be >= 0 \(0 = d_ff\)"),
        ({"n_experts": 4, "d_shared_expert": -3}, r"ModelConfig.d_shared_expert=-3; must be >= 0"),
    ]  # fmt: skip
    for kw, message in bad:
        with pytest.raises(ValueError, match=message):
            get_variant("tiny", **kw)
    # the sentinels and the fields rope_scaling="none" ignores still pass
    get_variant("tiny", rope_scaling_factor=0.0, rope_original_max_len=0, rope_yarn_beta_slow=0)
    get_variant("tiny", rope_scaling="linear", rope_scaling_factor=2.0, rope_original_max_len=0)
    get_variant("tiny", n_experts=4, d_expert=0, d_shared_expert=0)


def test_rope_band_factors_and_nan_floats_name_the_key():
    """llama3's low/high frequency factors were not checked: 0 passed the config and was a
    ZeroDivisionError in init, low == high a numpy divide-by-zero; a LongRoPE factor 0 divided
    a frequency by zero. NaN passed every `< 0` check (moe_capacity_factor=nan failed later in
    math.ceil naming no key, soft-caps of nan gave NaN logits) and inf every `> 0` one. Now the
    config names the key."""
    llama3 = dict(rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_max_len=64)
    longrope = dict(rope_scaling="longrope", rope_scaling_factor=4.0, rope_original_max_len=8,
                    rope_long_factors=[1.0] * 8)  # fmt: skip
    nan, inf = float("nan"), float("inf")
    bad = [
        ({**llama3, "rope_low_freq_factor": 0.0},
         r"ModelConfig.rope_low_freq_factor=0.0; must be > 0 with rope_scaling='llama3'"),
        ({**llama3, "rope_high_freq_factor": 0.0}, r"ModelConfig.rope_high_freq_factor=0.0; "),
        ({**llama3, "rope_high_freq_factor": nan}, r"ModelConfig.rope_high_freq_factor=nan; "),
        ({**llama3, "rope_low_freq_factor": 4.0, "rope_high_freq_factor": 4.0},
         r"ModelConfig.rope_low_freq_factor=4.0 must be < rope_high_freq_factor=4.0"),
        ({**llama3, "rope_low_freq_factor": 4.0, "rope_high_freq_factor": 1.0},
         r"rope_low_freq_factor=4.0 must be < rope_high_freq_factor=1.0"),
        ({**longrope, "rope_short_factors": [1.0] * 7 + [0.0]},
         r"ModelConfig.rope_short_factors\[7\]=0.0; must be > 0 with rope_scaling='longrope'"),
        ({**longrope, "rope_short_factors": [-1.0] * 8}, r"rope_short_factors\[0\]=-1.0; "),
        ({**longrope, "rope_short_factors": [1.0] * 8, "rope_long_factors": [inf] * 8},
         r"rope_long_factors\[0\]=inf; must be > 0 .*and finite"),
        ({**longrope, "rope_short_factors": [1.0] * 8, "rope_attention_factor": -1.0},
         r"ModelConfig.rope_attention_factor=-1.0; must be >= 0 \(0 = derived\)"),
        ({"rope_scaling": "yarn", "rope_scaling_factor": 4.0, "rope_yarn_beta_fast": inf},
         r"ModelConfig.rope_yarn_beta_fast=inf; must be > 0 with rope_scaling='yarn', and finite"),
        ({"rope_scaling": "linear", "rope_scaling_factor": inf}, r"rope_scaling_factor=inf; "),
        ({"n_experts": 4, "moe_capacity_factor": nan},
         r"ModelConfig.moe_capacity_factor=nan; must be >= 0 \(0 = no drops\), and finite"),
        ({"n_experts": 4, "moe_capacity_factor": inf}, r"ModelConfig.moe_capacity_factor=inf; "),
        ({"attn_logit_softcap": nan}, r"ModelConfig.attn_logit_softcap=nan; must be >= 0"),
        ({"final_logit_softcap": nan}, r"ModelConfig.final_logit_softcap=nan; must be >= 0"),
        ({"query_pre_attn_scalar": nan}, r"ModelConfig.query_pre_attn_scalar=nan; "),
        ({"norm_eps": inf}, r"ModelConfig.norm_eps=inf; must be > 0, and finite"),
        ({"rope_theta": nan}, r"ModelConfig.rope_theta=nan; "),
        ({"sliding_window": 4, "sliding_window_pattern": 2, "rope_local_theta": nan},
         r"ModelConfig.rope_local_theta=nan; "),
        ({"init_std": nan}, r"ModelConfig.init_std=nan; "),
    ]  # fmt: skip
    for kw, message in bad:
        with pytest.raises(ValueError, match=message):
            get_variant("tiny", **kw)
    # Llama 3.1/3.2's band (1, 4) still builds, with finite frequencies slowed at the long end
    cfg = get_variant("tiny", **llama3, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0)
    inv = rope_inv_freq(cfg)
    plain = rope_inv_freq(cfg.replace(rope_scaling="none"))
    assert np.isfinite(inv).all() and inv[-1] == pytest.approx(plain[-1] / 8.0)
    # rope_scaling="none" still ignores the llama3 / longrope fields
    get_variant("tiny", rope_low_freq_factor=0.0, rope_high_freq_factor=0.0)


def test_bad_dtypes_name_the_key():
    """model.dtype / model.param_dtype were not checked: "bfloat" or "int8" failed deep inside
    init ("data type 'bfloat' not understood", "dtype argument to `normal` must be a float",
    "logistic does not accept dtype int8"), naming no key. Now the config names the key, and
    int8 points to where int8 weights belong."""
    for key in ("dtype", "param_dtype"):
        for bad in ("bfloat", "float64", "int32"):
            with pytest.raises(ValueError, match=rf"ModelConfig.{key}='{bad}'; expected one of "
                               r"\('float32', 'bfloat16', 'float16'\)$"):  # fmt: skip
                get_variant("tiny", **{key: bad})
        with pytest.raises(ValueError, match=rf"ModelConfig.{key}='int8'; .*decoding \(generate "
                           r"--quantize int8, rollout.frozen_dtype=int8\)"):  # fmt: skip
            get_variant("tiny", **{key: "int8"})
    # names and dtype objects both still work
    for ok in ("float16", jnp.bfloat16, jnp.dtype("float32")):
        assert get_variant("tiny", dtype=ok, param_dtype=ok).weight_dtype == jnp.dtype(ok)


def test_bf16_compute_with_fp32_params():
    cfg = get_variant("tiny", dtype="bfloat16")
    model, params, tokens = _init(cfg)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    out = model.apply({"params": params}, tokens)
    assert out.dtype == jnp.bfloat16
    ref = Transformer(cfg.replace(dtype="float32")).apply({"params": params}, tokens)
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 0.1


@pytest.mark.parametrize(
    "kw", [{}, {"scan_layers": True, "remat_policy": "save_proj"}, {"qkv_bias": True}]
)
def test_cast_weights_run_joined_projections(kw):
    """fp32 master weights, bf16 compute: the per-step cast writes gate|up stacked and q|k|v
    concatenated, each one matmul ((D, 2F), (D, N + 2K, H)). Same parameters (names, shapes,
    initial values) as the separate layout, and the same logits and gradients as separate
    kernels computing in bf16."""
    cfg = get_variant("tiny", dtype="bfloat16", **kw)
    model, params, tokens = _init(cfg)
    _, params32, _ = _init(cfg.replace(dtype="float32"))
    assert jax.tree.structure(params) == jax.tree.structure(params32)
    assert all(
        jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params32))
    )

    D, F, N, K, H = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim_
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, tokens))(params)
    rhs = [e.invars[1].aval.shape for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    per_model = 1 if cfg.scan_layers else cfg.n_layers
    assert rhs.count((D, 2, F)) == rhs.count((D, N + 2 * K, H)) == per_model
    assert not {(D, F), (D, N, H), (D, K, H)} & set(rhs)  # no separate projection left
    apart = Transformer(cfg.replace(join_projections=False))  # the switch keeps them separate
    jaxpr = jax.make_jaxpr(lambda p: apart.apply({"params": p}, tokens))(params)
    rhs = {e.invars[1].aval.shape for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"}
    assert {(D, F), (D, N, H), (D, K, H)} <= rhs and (D, 2, F) not in rhs

    # The separate-kernel path: bf16 params, no cast, so no stacking.
    ref_model = Transformer(cfg.replace(param_dtype="bfloat16"))
    ref_params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    probe = jax.random.normal(jax.random.PRNGKey(3), (*tokens.shape, cfg.vocab_size))

    def loss(m, p):
        return jnp.sum(m.apply({"params": p}, tokens).astype(jnp.float32) * probe)

    np.testing.assert_array_equal(model.apply({"params": params}, tokens),
                                  ref_model.apply({"params": ref_params}, tokens))  # fmt: skip
    g = jax.grad(lambda p: loss(model, p))(params)
    g_ref = jax.grad(lambda p: loss(ref_model, p))(ref_params)
    for path, a in jax.tree_util.tree_leaves_with_path(g):
        b = _at(g_ref, path).astype(jnp.float32)
        scale = float(jnp.max(jnp.abs(b))) + 1e-6
        assert float(jnp.max(jnp.abs(a - b))) / scale < 0.03, jax.tree_util.keystr(path)


def _eqns(jaxpr):
    """Every equation of a jaxpr, inside called / scanned / remat'd sub-jaxprs too."""
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_longrope_takes_its_long_factors_from_one_past_the_original_context():
    """transformers switches to the long factors when a row's length exceeds the original
    context: a row of exactly `rope_original_max_len` tokens keeps the short ones, one more
    token takes the long (no fixture had a row of exactly orig + 1 tokens)."""
    from flaxlm.models import rope

    base = get_variant("tiny")
    half = (base.d_model // base.n_heads) // 2
    cfg = get_variant("tiny", rope_scaling="longrope", rope_scaling_factor=4.0,
                      rope_original_max_len=12, rope_long_factors=[2.0] * half,
                      rope_short_factors=[1.0] * half)  # fmt: skip
    assert not bool(np.asarray(rope.longrope_long(cfg, jnp.arange(12)[None])).any())
    assert bool(np.asarray(rope.longrope_long(cfg, jnp.arange(13)[None])).all())


def test_rms_norm_in_bf16_rounds_as_llama_does():
    """The Llama-style norm (HF's order): normalise in float32, cast to the compute dtype,
    then multiply by the weight in that dtype; Gemma's offset norm multiplies in float32
    first. The two round differently in bfloat16."""
    from flaxlm.models.layers import RMSNorm

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 64), jnp.float32) * 3
    scale = 1.0 + 0.37 * jax.random.normal(jax.random.PRNGKey(1), (64,), jnp.float32)
    for offset in (False, True):
        cfg = get_variant("tiny", dtype="bfloat16", param_dtype="float32", norm_unit_offset=offset)
        out = RMSNorm(cfg).apply({"params": {"scale": scale - 1.0 if offset else scale}}, x)
        x32 = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps)
        if offset:
            want = (x32 * (1.0 + (scale - 1.0))).astype(jnp.bfloat16)
        else:
            want = x32.astype(jnp.bfloat16) * scale.astype(jnp.bfloat16)
        assert out.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))


def test_forward_takes_nested_lists_and_names_bad_tokens():
    """A notebook's `forward(cfg, params, ids)` with one flat list, float ids, or an id past
    the embedding (NaN logits) or below 0 (wrapped: another token's logits), silently."""
    from flaxlm.models import hf
    from flaxlm.models.transformer import forward

    cfg = get_variant("tiny")
    _, params, tokens = _init(cfg, B=1, T=5)
    ids = np.asarray(tokens).tolist()
    want = forward(cfg, params, tokens)
    np.testing.assert_array_equal(forward(cfg, params, ids), want)
    for fwd in (forward, hf.forward):
        with pytest.raises(ValueError, match=r"got shape \(5,\): one sequence is \[ids\]"):
            fwd(cfg, params, ids[0])
        with pytest.raises(TypeError, match="tokens must be integer ids, got float32"):
            fwd(cfg, params, np.asarray(ids, np.float32))
        for bad in (cfg.vocab_size, -1):
            with pytest.raises(ValueError, match=f"token id {bad} is outside the model's "
                               rf"vocabulary \(0\.\.{cfg.vocab_size - 1}\)"):  # fmt: skip
                fwd(cfg, params, [[3, bad, 4]])
    # under jit the ids are not looked at (no host sync in a compiled program)
    jitted = jax.jit(lambda p, t: forward(cfg, p, t))
    np.testing.assert_allclose(jitted(params, tokens), want, rtol=1e-6, atol=1e-6)
