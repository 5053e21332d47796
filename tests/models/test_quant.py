"""Int8 weight-only decoding (models/quant.py, `generate(..., quantize="int8")`): the kernels'
rounding bound, that the program decodes exactly the dequantized model (fused projections and
experts included), and how far that model is from the float one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.models import quant
from flaxlm.models.config import get_variant
from flaxlm.models.decode import generate
from flaxlm.train.pretrain import model_fns


def _params(cfg, seed=0):
    boxed = model_fns(cfg)[0](jax.random.PRNGKey(seed))
    return jax.tree.map(lambda x: getattr(x, "value", x), boxed,
                        is_leaf=lambda x: hasattr(x, "value"))  # fmt: skip


def _dequantized(params):
    """The float model int8 decoding computes: every quantized kernel times its scale."""

    def walk(node):
        if not isinstance(node, dict):
            return node
        if "kernel_scale" in node:
            rest = {k: v for k, v in node.items() if k not in ("kernel", "kernel_scale")}
            kernel = quant.dequantize(node["kernel"], node["kernel_scale"], jnp.float32)
            return {**rest, "kernel": kernel}
        return {k: walk(v) for k, v in node.items()}

    return walk(params)


@pytest.mark.parametrize("shape, axes", [((64, 48), (0,)), ((4, 16, 64), (0, 1)),
                                         ((3, 32, 24), (1,))])  # fmt: skip
def test_kernel_rounding_bound(shape, axes):
    w = jax.random.normal(jax.random.PRNGKey(0), shape) * jnp.linspace(0.01, 3.0, shape[-1])
    w = w.at[..., 0].set(0.0)  # an all-zero output channel: scale 1, zeros
    q, scale = quant.quantize_kernel(w, axes)
    assert q.dtype == jnp.int8 and int(jnp.abs(q.astype(jnp.int32)).max()) <= 127
    assert scale.shape == tuple(1 if i in axes else n for i, n in enumerate(shape))
    err = jnp.abs(quant.dequantize(q, scale, jnp.float32) - w)
    assert bool(jnp.all(err <= scale / 2 + 1e-6))
    assert int(jnp.abs(q.astype(jnp.int32)).max()) == 127  # the largest weight uses the range
    np.testing.assert_array_equal(np.asarray(q[..., 0]), 0)
    np.testing.assert_array_equal(np.asarray(scale[..., 0]), 1.0)  # not 0: no 0/0 = NaN


def test_int8_decoding_is_the_dequantized_model_and_close_to_float():
    cfg = get_variant("tiny", n_experts=4, d_expert=32, d_shared_expert=16, init_std=0.05)
    params = _params(cfg)
    q = quant.quantize_params(params)
    assert q["layers_0"]["mlp"]["experts"]["up"]["kernel"].dtype == jnp.int8
    assert q["layers_0"]["mlp"]["experts"]["up"]["kernel_scale"].shape == (4, 1, 32)  # per expert
    assert q["layers_0"]["mlp"]["router"]["kernel"].dtype == jnp.float32  # kept
    assert q["embed"]["embedding"].dtype == jnp.float32
    assert q["lm_head"]["kernel"].dtype == jnp.int8
    prompts = [[5, 9, 33, 2, 7], [11, 4]]
    out = generate(cfg, params, prompts, max_new_tokens=6, rng=jax.random.PRNGKey(0),
                   temperature=0.0, quantize="int8", fuse_projections=True)  # fmt: skip
    apply = jax.jit(model_fns(cfg)[1])
    deq = _dequantized(q)
    width = 11
    for row, prompt in enumerate(prompts):  # greedy over the dequantized model, recomputed
        seq = list(prompt)
        for _ in range(6):
            logits = apply(deq, jnp.asarray([seq + [0] * (width - len(seq))]))
            seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
        assert np.asarray(out.tokens[row]).tolist() == seq[len(prompt) :]
        # its logprobs are the dequantized model's, and near the float model's
        full = jnp.asarray([seq + [0] * (width + 1 - len(seq))])
        n = len(prompt)
        lp_deq = jax.nn.log_softmax(apply(deq, full)[0], -1)
        lp_float = jax.nn.log_softmax(apply(params, full)[0], -1)
        picked = [(n - 1 + i, t) for i, t in enumerate(seq[n:])]
        want = np.asarray([lp_deq[p, t] for p, t in picked])
        np.testing.assert_allclose(np.asarray(out.logprobs[row]), want, atol=1e-4)
        err = max(abs(float(lp_deq[p, t] - lp_float[p, t])) for p, t in picked)
        assert 0 < err < 0.05, err  # rounding moves the model, a little
    # weights quantized once beforehand (a server's, or a rollout loop's) decode the same
    pre = generate(cfg, q, prompts, max_new_tokens=6, rng=jax.random.PRNGKey(0),
                   temperature=0.0, fuse_projections=False)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(pre.tokens), np.asarray(out.tokens))
    np.testing.assert_allclose(np.asarray(pre.logprobs), np.asarray(out.logprobs), atol=1e-5)
    with pytest.raises(ValueError, match="quantize must be one of"):
        generate(cfg, params, prompts, max_new_tokens=2, rng=jax.random.PRNGKey(0),
                 quantize="int4")  # fmt: skip


def test_speculative_decoding_with_int8_weights_keeps_the_quantized_greedy_tokens():
    """`speculative_generate(quantize="int8")`: the target and a smaller draft in int8; the
    greedy tokens are the int8 target's own (`generate(quantize="int8")`), and the draft's
    proposals were checked (not every one accepted)."""
    from flaxlm.models.speculative import speculative_generate

    cfg = get_variant("tiny", init_std=0.1)
    draft_cfg = get_variant("tiny", n_layers=1, init_std=0.1)
    params, draft = _params(cfg), _params(draft_cfg, seed=1)
    prompts = [[5, 9, 33, 2], [11, 4, 6]]
    kw = dict(max_new_tokens=10, rng=jax.random.PRNGKey(0), temperature=0.0, quantize="int8")
    want = generate(cfg, params, prompts, **kw)
    out = speculative_generate(cfg, params, draft_cfg, draft, prompts, draft_tokens=3, **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(want.tokens))
    assert 0.0 <= out.alpha() < 1.0  # the draft guessed, and was corrected
    # ...and the logprobs are the quantized target's, not the float one's
    float_lp = generate(cfg, params, prompts, **{**kw, "quantize": "none"}).logprobs
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(want.logprobs), atol=1e-5)
    assert np.abs(np.asarray(float_lp) - np.asarray(want.logprobs)).max() > 1e-4
    with pytest.raises(ValueError, match="quantize must be one of"):
        speculative_generate(cfg, params, None, None, prompts, **{**kw, "quantize": "int4"})


def test_weights_quantized_beforehand_decode_as_the_int8_model_every_way(monkeypatch):
    """Params from `quant.quantize_params` decode as the int8 model with the projections
    fused: their scales are joined with the kernels, as quantizing the fused float kernel
    gives them (`fuse_projections` used to drop them: the raw integers were decoded). "auto"
    keeps XLA's gemms for them as for `quantize="int8"` (it used to pick cuBLAS, and with it
    the fused layout); `decode_norm="fold"` and the transposed MLP kernel are refused (the
    fold used to multiply the int8 kernels by the norm scales cast to int8)."""
    from flaxlm.models import decode
    from flaxlm.models.transformer import fold_norms, fuse_projections

    cfg = get_variant("tiny", init_std=0.1)  # the speculative test's model and call
    params = _params(cfg)
    q = quant.quantize_params(params)
    prompts = [[5, 9, 33, 2], [11, 4, 6]]
    kw = dict(max_new_tokens=10, rng=jax.random.PRNGKey(0), temperature=0.0)
    want = generate(cfg, params, prompts, quantize="int8", **kw)
    got = generate(cfg, q, prompts, fuse_projections=True, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5)
    fused_q, fused = (fuse_projections(p, cfg.n_layers)["layers_1"] for p in (q, params))
    for module, name in (("attn", "qkv"), ("mlp", "gate_up")):
        kernel, scale = quant.quantize_kernel(fused[module][name]["kernel"], (0,))
        np.testing.assert_array_equal(np.asarray(fused_q[module][name]["kernel"]), kernel)
        np.testing.assert_array_equal(np.asarray(fused_q[module][name]["kernel_scale"]), scale)

    assert quant.is_quantized(q) and not quant.is_quantized(params)
    assert decode.resolve_decode_gemm("auto", cuda=True, params=q) == "xla"
    assert decode.resolve_decode_gemm("auto", cuda=True, params=params) == "cublas"
    seen = []

    class Built(Exception):  # the program's options are seen; compiling it would add nothing
        pass

    def spy(*a):
        seen.append((a[9], a[18]))  # fused?, decode_gemm
        raise Built

    monkeypatch.setattr(decode.decode_kernel, "runs_natively", lambda devices=None: True)
    monkeypatch.setattr(decode, "_decode_fn", spy)
    for p in (q, params):  # 64 rows on a "CUDA GPU"
        with pytest.raises(Built):
            generate(cfg, p, [[1]] * 64, **kw)
    assert seen == [(False, "xla"), (True, "cublas")]
    monkeypatch.undo()

    with pytest.raises(ValueError, match="decode_norm='fold' needs float weights"):
        generate(cfg, q, prompts, decode_norm="fold", **kw)
    with pytest.raises(ValueError, match="float weights only"):
        fold_norms(cfg, q, cfg.n_layers)
    with pytest.raises(ValueError, match="streams a dense model's float"):
        generate(cfg, q, prompts, decode_mlp="pallas_t", **kw)


@pytest.mark.parametrize(
    "option",
    [
        {"fuse_projections": True},
        {"decode_norm": "fold"},
        {"quantize": "int8"},
        {"quantize": "int8", "draft": True},
    ],
)
def test_boxed_params_decode_as_the_unboxed_ones_with_every_weight_option(option):
    """Params as `Transformer.init` returns them (boxed) decode with the options that
    restructure the weights (fused projections, folded norms, int8): they crashed with a raw
    AttributeError/TypeError, and on a CUDA GPU fuse_projections and decode_norm="auto"
    choose those paths by default. `quant.quantize_params` and `is_quantized` take them too."""
    from flaxlm.models.speculative import prompt_lookup_generate

    cfg = get_variant("tiny", init_std=0.1)
    boxed = model_fns(cfg)[0](jax.random.PRNGKey(0))
    assert any(hasattr(x, "unbox") for x in jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(
        x, "unbox")))  # fmt: skip
    option = dict(option)
    run = prompt_lookup_generate if option.pop("draft", False) else generate
    kw = dict(max_new_tokens=6, rng=jax.random.PRNGKey(0), temperature=0.0, **option)
    prompts = [[5, 9, 33, 2], [11, 4, 6]]
    want, got = (run(cfg, p, prompts, **kw) for p in (_params(cfg), boxed))
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-6)
    assert quant.is_quantized(quant.quantize_params(boxed)) and not quant.is_quantized(boxed)
