"""KV-cache generation: equals full recomputation, reproducible sampling, logprobs, stops, one
compiled loop (no Python loop per token), the same result under a sharded mesh; and the Pallas
decode-step kernel against the XLA path (last section)."""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flaxlm.models import attention, decode, sampling
from flaxlm.models import decode_attention as kernel
from flaxlm.models.attention import (
    apply_rope,
    attention_mask,
    cached_attention,
    quantize_kv,
    rope_tables,
)
from flaxlm.models.config import ModelConfig, get_variant
from flaxlm.models.decode import generate, generate_program, generate_text
from flaxlm.models.sampling import sample_logits
from flaxlm.models.sharding import logical_axis_rules, make_mesh, use_mesh
from flaxlm.models.transformer import Transformer, forward, stack_layers

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4, 200, 17, 3, 3, 9, 100, 42, 7, 7, 1, 2]]
N = 10


def _model(**kw):
    # A larger init than training's 0.02 gives peaked, input-dependent distributions, so a
    # wrong position or mask changes the argmax instead of hiding in near-uniform logits.
    cfg = get_variant("tiny", init_std=0.15, **kw)
    return cfg, random_params(cfg)


def random_params(cfg, seed=0):
    """Random parameters drawn with numpy from the model's shapes (no init compile): matrices
    ~ N(0, init_std²), and biases / norm scales noisy around 0 / 1 so they matter too."""
    shapes = jax.eval_shape(
        lambda r: Transformer(cfg).init(r, jnp.zeros((1, 4), jnp.int32)), jax.random.PRNGKey(0)
    )["params"]
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = path[-1].key
        x = rng.standard_normal(s.shape).astype(np.float32)
        return jnp.asarray({"scale": 1 + 0.2 * x, "bias": 0.2 * x}.get(name, cfg.init_std * x))

    return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes))


@pytest.fixture(scope="module")
def model():
    return _model()


T_MAX = 32  # the reference forward always runs on (B, T_MAX): one compile per config


@functools.lru_cache
def _log_softmax_fn(cfg):
    return jax.jit(lambda p, t: jax.nn.log_softmax(forward(cfg, p, t), axis=-1))


def _full_logprobs(cfg, params, prompts, gen, t_max=T_MAX):
    """log-softmax of one full forward over prompt + generated tokens at the generated ones."""
    toks = np.zeros((len(prompts), t_max), np.int32)
    for b, (p, g) in enumerate(zip(prompts, gen)):
        toks[b, : len(p) + len(g)] = list(p) + list(g)
    logp = np.asarray(_log_softmax_fn(cfg)(params, toks))  # right padding never affects the past
    idx = np.asarray([[len(p) - 1 + i for i in range(gen.shape[1])] for p in prompts])
    return np.take_along_axis(np.take_along_axis(logp, idx[..., None], 1), gen[..., None], 2)[
        ..., 0
    ]


def _greedy_by_recompute(cfg, params, prompts, n, t_max=T_MAX):
    """Argmax decoding by re-running the full forward on the whole sequence for every token."""
    toks = np.zeros((len(prompts), t_max), np.int32)
    lens = np.asarray([len(p) for p in prompts])
    for b, p in enumerate(prompts):
        toks[b, : len(p)] = p
    rows = np.arange(len(prompts))
    for _ in range(n):
        toks[rows, lens] = np.argmax(np.asarray(_log_softmax_fn(cfg)(params, toks)), -1)[
            rows, lens - 1
        ]
        lens = lens + 1
    return np.stack([toks[b, len(p) : len(p) + n] for b, p in enumerate(prompts)])


def test_cached_greedy_equals_full_recompute(model):
    """Ragged prompts in one batch. (Sliding window, biases, tied embeddings and scaled RoPE are
    covered against transformers' own cached generate in test_hf.py.)"""
    cfg, params = model
    out = generate(cfg, params, PROMPTS, max_new_tokens=N, rng=jax.random.PRNGKey(1), temperature=0)
    want = _greedy_by_recompute(cfg, params, PROMPTS, N)
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    assert np.all(np.asarray(out.mask) == 1) and np.all(np.asarray(out.lengths) == N)
    # Greedy logprobs are the model's too.
    np.testing.assert_allclose(
        out.logprobs, _full_logprobs(cfg, params, PROMPTS, want), atol=2e-5, rtol=1e-5
    )


def test_scanned_layer_params_decode_the_same(model):
    cfg, params = model
    kw = dict(max_new_tokens=N, rng=jax.random.PRNGKey(1), temperature=0)
    want = generate(cfg, params, PROMPTS, **kw)
    scan_cfg = cfg.replace(scan_layers=True)
    got = generate(scan_cfg, stack_layers(params, cfg.n_layers), PROMPTS, **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


def test_sampling_is_seeded_and_logprobs_are_the_models(model):
    cfg, params = model
    kw = dict(max_new_tokens=N, temperature=0.8, top_k=50, top_p=0.9)
    a = generate(cfg, params, PROMPTS, rng=jax.random.PRNGKey(7), **kw)
    b = generate(cfg, params, PROMPTS, rng=jax.random.PRNGKey(7), **kw)
    c = generate(cfg, params, PROMPTS, rng=jax.random.PRNGKey(8), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(a.tokens, c.tokens)
    # Sampled, not argmax (with T=0.8 over a 256-token vocab some pick differs).
    assert not np.array_equal(a.tokens, _greedy_by_recompute(cfg, params, PROMPTS, N))
    # logprobs: unmodified model log-softmax (T=1, no filtering) at the sampled tokens.
    want = _full_logprobs(cfg, params, PROMPTS, np.asarray(a.tokens))
    np.testing.assert_allclose(a.logprobs, want, atol=2e-5, rtol=1e-5)


def test_fused_projections_decode_the_same():
    """The decode layout (one q|k|v and one gate|up matmul, made from the checkpoint's separate
    kernels) gives the unfused model's tokens and logprobs, with q/k/v biases too."""
    cfg, params = _model(qkv_bias=True)
    for kw in (dict(temperature=0), dict(temperature=0.9, top_p=0.95)):
        kw.update(max_new_tokens=N, rng=jax.random.PRNGKey(4))
        a = generate(cfg, params, PROMPTS, fuse_projections=False, **kw)
        b = generate(cfg, params, PROMPTS, fuse_projections=True, **kw)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    want = _full_logprobs(cfg, params, PROMPTS, np.asarray(b.tokens))
    np.testing.assert_allclose(b.logprobs, want, atol=2e-5, rtol=1e-5)


def test_fusion_by_default_only_with_cublas(model, monkeypatch):
    """The projections are concatenated when asked, and by default when the program's matmuls
    are cuBLAS calls (which cannot read two weights as one) — the Pallas MLP kernel too reads
    the concatenated gate|up. Triton's gemms (the CPU's "auto") leave them."""
    cfg, params = model
    seen = []

    class Built(Exception):  # the program's arguments are seen; compiling it would add nothing
        pass

    def spy(*a):
        seen.append((a[9], a[18]))
        raise Built

    monkeypatch.setattr(decode, "_decode_fn", spy)
    kw = dict(max_new_tokens=2, rng=jax.random.PRNGKey(0), temperature=0)
    mesh = make_mesh({"data": 4, "fsdp": 2})
    for prompts, extra in [
        (PROMPTS, {}),
        (PROMPTS, dict(fuse_projections=True)),
        (PROMPTS + [[3]], dict(mesh=mesh, rules=logical_axis_rules("fsdp"))),
        (PROMPTS, dict(decode_gemm="cublas")),
        (PROMPTS, dict(decode_gemm="cublas", fuse_projections=False)),
        (PROMPTS, dict(decode_gemm="cublas", decode_mlp="pallas")),
    ]:
        with pytest.raises(Built):
            generate(cfg, params, prompts, **kw, **extra)
    assert seen == [(False, "xla"), (True, "xla"), (False, "xla"), (True, "cublas"),
                    (False, "cublas"), (True, "cublas")]  # fmt: skip


def test_top_p_one_and_min_p_zero_build_no_filter(model, monkeypatch):
    """top_p=1 and min_p=0 are off (the programs' key: "top_p<1?", "min_p>0?"): no sort of the
    vocabulary per token for them, and none at all when greedy."""
    cfg, params = model
    seen = []

    class Built(Exception):
        pass

    def spy(*a):
        seen.append((a[2], a[4], a[12]))  # greedy, use_top_p, use_min_p
        raise Built

    monkeypatch.setattr(decode, "_decode_fn", spy)
    kw = dict(max_new_tokens=2, rng=jax.random.PRNGKey(0))
    for extra in [dict(temperature=1.0, top_p=1.0, min_p=0.0),
                  dict(temperature=1.0, top_p=0.9, min_p=0.1),
                  dict(temperature=0.0, top_p=0.9, min_p=0.1)]:  # fmt: skip
        with pytest.raises(Built):
            generate(cfg, params, PROMPTS, **kw, **extra)
    assert seen == [(False, False, False), (False, True, True), (True, False, False)]


def test_decode_gemm_resolution_and_compiler_options(model, monkeypatch):
    """`decode_gemm="auto"`: cuBLAS on CUDA GPUs for float weights and heads kept whole, else
    XLA's gemms; "cublas" compiles the program with Triton gemms off, and decodes the same
    tokens as XLA's (the CPU takes the option and ignores it)."""
    from flaxlm.models.decode import (
        CUBLAS_COMPILER_OPTIONS,
        NO_DOT_MERGER,
        compiler_options,
        resolve_decode_gemm,
    )

    assert resolve_decode_gemm("auto") == "xla"  # this machine's CPU
    assert resolve_decode_gemm("auto", cuda=True) == "cublas"
    assert resolve_decode_gemm("auto", quantize="int8", cuda=True) == "xla"
    assert resolve_decode_gemm("auto", cuda=True, rows=8) == "xla"  # small batches: Triton
    tp = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    dp = make_mesh({"data": 4, "fsdp": 2})
    assert resolve_decode_gemm("auto", tp, cuda=True) == "xla"
    assert resolve_decode_gemm("auto", dp, cuda=True) == "cublas"
    assert resolve_decode_gemm("cublas", tp) == "cublas"  # asked for: as asked
    with pytest.raises(ValueError, match="decode_gemm must be one of"):
        resolve_decode_gemm("triton")
    # cuBLAS over separate weights: no dot merger (it would concatenate them every token)
    assert compiler_options("xla", True) is None and compiler_options("xla", False) is None
    assert compiler_options("cublas", True) == CUBLAS_COMPILER_OPTIONS
    assert compiler_options("cublas", False) == {**CUBLAS_COMPILER_OPTIONS, **NO_DOT_MERGER}

    cfg, params = model
    options = []
    real_jit = jax.jit
    monkeypatch.setattr(decode.jax, "jit", lambda f, **k: options.append(k) or real_jit(f, **k))
    kw = dict(max_new_tokens=N, rng=jax.random.PRNGKey(4), temperature=0)
    decode._decode_fn.cache_clear()  # so both programs are built (and jitted) here
    a = generate(cfg, params, PROMPTS, decode_gemm="xla", **kw)
    b = generate(cfg, params, PROMPTS, decode_gemm="cublas", **kw)
    monkeypatch.undo()
    compiled = [k["compiler_options"] for k in options if "compiler_options" in k]
    assert compiled == [None, CUBLAS_COMPILER_OPTIONS]
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_top_k_one_is_greedy(model):
    cfg, params = model
    g = generate(cfg, params, PROMPTS, max_new_tokens=N, rng=jax.random.PRNGKey(0), temperature=0)
    k1 = generate(cfg, params, PROMPTS, max_new_tokens=N, rng=jax.random.PRNGKey(3), top_k=1)
    np.testing.assert_array_equal(g.tokens, k1.tokens)


def test_filters_keep_the_right_tokens():
    probs = np.asarray([[0.5, 0.25, 0.15, 0.1], [0.05, 0.05, 0.1, 0.8]])
    logits = np.log(np.tile(probs, (300, 1)))  # 300 draws of each row
    key = jax.random.PRNGKey(0)
    sample = jax.jit(sample_logits, static_argnames=("top_k", "use_top_p"))
    draw = np.asarray(sample(logits, key, 1.0, top_p=0.7, use_top_p=True)[0]).reshape(300, 2)
    # nucleus 0.7: row 0 keeps {0, 1} (0.5 < 0.7 <= 0.75), row 1 keeps {3} only
    assert set(draw[:, 0]) == {0, 1} and set(draw[:, 1]) == {3}
    draw = np.asarray(sample(logits, key, 1.0, top_k=3, use_top_p=False)[0]).reshape(300, 2)
    assert set(draw[:, 0]) == {0, 1, 2} and set(draw[:, 1]) == {0, 1, 2, 3}
    tok, lp = sample(logits, key, 5.0, top_k=2, top_p=0.01, use_top_p=True)
    np.testing.assert_array_equal(tok[:2], [0, 3])  # top_p within top_k keeps the best
    np.testing.assert_allclose(lp[:2], np.log(probs.max(-1)), rtol=1e-5)  # model's, not T=5


def test_min_p_keeps_what_hf_keeps_and_reaches_generate(model):
    """min-p after temperature, top-k and top-p (HF's MinPLogitsWarper: drop p < min_p·p_max of
    the distribution left), against a numpy reference on random logits; generate draws only
    from the kept set and min_p ~1 is greedy."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (6, 40)).astype(np.float32)

    def reference(x, T, k, p, m):
        x = x / T
        keep = np.ones_like(x, bool)
        if k:
            keep &= x >= np.sort(x, -1)[:, -k][:, None]
        if p < 1:
            for b in range(len(x)):
                order = np.argsort(-x[b])
                q = np.exp(x[b][order] - x[b][order][keep[b][order]].max()) * keep[b][order]
                q /= q.sum()
                before = np.cumsum(q) - q
                keep[b][order[before >= p]] = False
        q = np.where(keep, np.exp(x - np.where(keep, x, -np.inf).max(-1, keepdims=True)), 0)
        q /= q.sum(-1, keepdims=True)
        return keep & (q >= m * q.max(-1, keepdims=True))

    for T, k, p, m in [(1.0, 0, 1.0, 0.1), (0.7, 10, 1.0, 0.05), (1.3, 0, 0.9, 0.2),
                       (1.0, 5, 0.8, 0.5)]:  # fmt: skip
        got = sampling.filter_logits(logits, T, top_k=k, top_p=p, use_top_p=p < 1, min_p=m,
                                   use_min_p=True)  # fmt: skip
        want = reference(logits.astype(np.float64), T, k, p, m)
        np.testing.assert_array_equal(np.isfinite(np.asarray(got)), want, err_msg=str((T, k, p, m)))
        assert 1 <= want.sum(1).min() and want.sum() < want.size  # it does filter
    cfg, params = model
    kw = dict(max_new_tokens=N, rng=jax.random.PRNGKey(4))
    g = generate(cfg, params, PROMPTS, temperature=0, **kw)
    np.testing.assert_array_equal(generate(cfg, params, PROMPTS, min_p=0.999, **kw).tokens,
                                  g.tokens)  # fmt: skip
    with pytest.raises(ValueError, match="0 <= min_p < 1"):
        generate(cfg, params, PROMPTS, min_p=1.0, **kw)


def test_one_prompt_runs_as_two_rows_and_returns_one(model):
    """A single prompt decodes in the two-row program (decode.MIN_ROWS: a copy of the row,
    dropped) and gives the same greedy tokens and logprobs as that prompt in a larger batch."""
    cfg, params = model
    kw = dict(max_new_tokens=N, rng=jax.random.PRNGKey(0), temperature=0)
    one = generate(cfg, params, PROMPTS[1:2], **kw)
    many = generate(cfg, params, PROMPTS, **kw)
    assert one.tokens.shape == (1, N) and one.lengths.shape == (1,)
    np.testing.assert_array_equal(one.tokens[0], many.tokens[1])
    np.testing.assert_allclose(one.logprobs[0], many.logprobs[1], atol=1e-5)
    _, args = decode.generate_program(cfg, PROMPTS[1:2], **kw)
    assert args[0].shape[0] == decode.MIN_ROWS
    sampled = [generate(cfg, params, PROMPTS[:1], max_new_tokens=N, rng=jax.random.PRNGKey(5))
               for _ in range(2)]  # fmt: skip
    np.testing.assert_array_equal(sampled[0].tokens, sampled[1].tokens)


def test_stop_tokens_end_rows(model):
    cfg, params = model
    free = np.asarray(
        generate(
            cfg, params, PROMPTS, max_new_tokens=N, rng=jax.random.PRNGKey(0), temperature=0
        ).tokens
    )
    stop = int(free[0, 2])  # row 0 emits it at step 2 (maybe earlier)
    out = generate(
        cfg,
        params,
        PROMPTS,
        max_new_tokens=N,
        rng=jax.random.PRNGKey(0),
        temperature=0,
        stop_tokens=(stop, 255),
        pad_id=-1,
    )
    toks, mask, lens = (np.asarray(x) for x in (out.tokens, out.mask, out.lengths))
    for b in range(len(PROMPTS)):
        hits = np.flatnonzero(np.isin(free[b], [stop, 255]))
        n = hits[0] + 1 if hits.size else N
        assert lens[b] == n
        np.testing.assert_array_equal(toks[b, :n], free[b, :n])  # same tokens up to the stop
        assert np.all(toks[b, n:] == -1) and np.all(mask[b, n:] == 0) and np.all(mask[b, :n] == 1)
        assert np.all(np.asarray(out.logprobs)[b, n:] == 0)
    assert lens[0] <= 3


def test_stop_tokens_as_arrays_or_one_id(model):
    """Stop ids as a numpy or jax array or a single id stop rows as the tuple does
    (`decode.stop_token_ids`); an array of several used to fail on its truth value."""
    cfg, params = model
    kw = dict(max_new_tokens=N, rng=jax.random.PRNGKey(0), temperature=0, pad_id=-1)
    free = np.asarray(generate(cfg, params, PROMPTS, max_new_tokens=N,
                               rng=jax.random.PRNGKey(0), temperature=0).tokens)  # fmt: skip
    stop = int(free[0, 2])  # (test_stop_tokens_end_rows's calls: their programs)
    want = generate(cfg, params, PROMPTS, stop_tokens=(stop, 255), **kw)
    for stops in (np.asarray([stop, 255]), jnp.asarray([stop, 255]), [np.int64(stop), 255]):
        got = generate(cfg, params, PROMPTS, stop_tokens=stops, **kw)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    assert decode.stop_token_ids(np.int32(stop)) == decode.stop_token_ids([stop]) == (stop,)
    assert decode.stop_token_ids({9, 2}) == (2, 9)
    assert decode.stop_token_ids(None) == decode.stop_token_ids(np.zeros(0)) == ()
    for bad in ([1.5], np.ones((2, 2), np.int32), ["eos"]):
        with pytest.raises(ValueError, match="stop_tokens must be token ids"):
            generate(cfg, params, PROMPTS, stop_tokens=bad, **kw)


@pytest.mark.parametrize("check_every", [3, 4])
def test_blocked_stop_checks_give_the_same_output(model, check_every):
    """Testing "all rows stopped" once per block of steps changes nothing in the output, also
    when N is not a multiple of the block (the steps past N are masked no-ops) and when every
    row stops early (the loop ends inside a block)."""
    cfg, params = model
    kw = dict(max_new_tokens=N, rng=jax.random.PRNGKey(5), temperature=0.9, pad_id=-1)
    free = np.asarray(generate(cfg, params, PROMPTS, **kw).tokens)
    for stops in ((-5,), (int(free[0, 1]), int(free[1, 4]), int(free[2, 2]))):
        want = generate(cfg, params, PROMPTS, stop_tokens=stops, **kw)
        got = generate(cfg, params, PROMPTS, stop_tokens=stops, check_every=check_every, **kw)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    assert np.asarray(want.lengths).max() < N  # the second set stopped every row early


def test_decoding_is_one_compiled_loop(model, monkeypatch):
    """Model code is traced a fixed number of times (prefill + one loop body), whatever the
    number of new tokens; a Python loop per token would trace it once per token."""
    cfg, params = model
    calls = []
    real = attention.apply_rope
    monkeypatch.setattr(attention, "apply_rope", lambda *a: calls.append(1) or real(*a))

    def traces(n):  # trace (not compile) the whole generate program for n new tokens
        before = len(calls)
        fn = decode._decode_fn(cfg, n, False, 0, False, "float32", None, None)
        args = (np.zeros((2, 8), np.int32), np.asarray([3, 4], np.int32), jax.random.PRNGKey(0))
        traced = fn.trace(params, *args, 1.0, 1.0, 1.0, np.full((4,), -1, np.int32), 0)
        assert "while[" in str(traced.jaxpr)
        return len(calls) - before

    per_trace = 2 * cfg.n_layers  # q and k rotated once per layer per traced forward
    assert traces(3) == 2 * per_trace
    assert traces(40) == 2 * per_trace

    # A second call with other lengths in the same bucket, other RNG or stop ids: no retrace.
    # (The first call has stop ids too: a call without any runs another program, a scan.)
    kw = dict(max_new_tokens=N, temperature=0)
    generate(cfg, params, PROMPTS, rng=jax.random.PRNGKey(0), stop_tokens=(7, 8), **kw)
    before = len(calls)
    generate(
        cfg, params, [[5] * 9, [1], [2] * 16], rng=jax.random.PRNGKey(1), stop_tokens=(3,), **kw
    )
    assert len(calls) == before


def test_array_prompts_and_bad_inputs(model):
    cfg, params = model
    arr = np.zeros((3, 12), np.int32)
    for b, p in enumerate(PROMPTS):
        arr[b, : len(p)] = p
    kw = dict(max_new_tokens=N, rng=jax.random.PRNGKey(0), temperature=0)
    a = generate(cfg, params, arr, prompt_lengths=[len(p) for p in PROMPTS], **kw)
    b = generate(cfg, params, PROMPTS, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="prompt_lengths"):
        generate(cfg, params, arr, **kw)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(cfg, params, [[1], []], **kw)
    with pytest.raises(ValueError, match="token id 256 outside the vocab"):
        generate(cfg, params, [[1], [256]], **kw)
    # One tokenized prompt passed flat ran as that many one-token prompts.
    with pytest.raises(ValueError, match=r"prompts\[0\] is the single value 5 .*pass \[ids\]"):
        generate(cfg, params, [5, 9, 2], **kw)
    with pytest.raises(ValueError, match=r"prompts\[1\] is the single value 3"):
        generate(cfg, params, ([1, 2], 3), **kw)
    with pytest.raises(ValueError, match="check_every must be >= 1"):
        generate(cfg, params, PROMPTS, check_every=0, **kw)


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_a_temperature_that_is_no_number_is_refused(model, temperature):
    """temperature=NaN passed the `temperature < 0` check and decoded token 0s (NaN logits);
    NaN and infinity are refused as negatives are, naming the argument (nothing compiled)."""
    cfg, params = model
    with pytest.raises(ValueError, match=r"generate: temperature must be finite and >= 0"):
        generate(cfg, params, PROMPTS, max_new_tokens=2, rng=jax.random.PRNGKey(0),
                 temperature=temperature)  # fmt: skip


def test_a_prompts_sample_depends_on_its_row_not_its_batch_mates(model):
    """As the module docstring promises: fixed by (rng, row index, prompt) — other prompts in
    the batch (same bucket here: bit-identical logits) and the batch size do not matter."""
    cfg, params = model
    kw = dict(max_new_tokens=N, rng=jax.random.PRNGKey(11), temperature=1.0)
    p = PROMPTS[1]
    alone = np.asarray(generate(cfg, params, [p], **kw).tokens)
    mates = np.asarray(generate(cfg, params, [p, [9, 9], [3, 1, 4, 1, 5], [2]], **kw).tokens)
    np.testing.assert_array_equal(alone[0], mates[0])
    second = np.asarray(generate(cfg, params, [[9, 9], p], **kw).tokens)
    assert not np.array_equal(alone[0], second[1])  # another row index: another sample


def _longrope_model():
    """The tiny model with LongRoPE past an original context of 12 tokens: far-apart short and
    long factors, so rotating by the wrong set changes the argmax."""
    base = get_variant("tiny", init_std=0.15)
    half = base.rotary_dim_ // 2
    cfg = base.replace(rope_scaling="longrope", rope_scaling_factor=4.0, rope_original_max_len=12,
                       rope_short_factors=tuple(1.0 + 0.3 * i for i in range(half)),
                       rope_long_factors=tuple(2.0 + 1.5 * i for i in range(half)))  # fmt: skip
    return cfg, random_params(cfg)


def test_longrope_factors_follow_the_row_not_its_bucket_or_batch_mates():
    """LongRoPE used to choose its short or long factors by the largest position of the whole
    batch, padding included: a 9-token prompt (original context 12) in the prefill's 16-slot
    bucket, or next to a 14-token prompt, was rotated by the long factors that a forward over
    its own tokens does not use, so its tokens depended on the bucket and its batch mates."""
    cfg, params = _longrope_model()
    a = [7, 31, 200, 4, 99, 12, 180, 3, 55]
    b = [9, 140, 2, 77, 61, 8, 230, 19, 5, 44, 101, 6, 88, 17]
    kw = dict(max_new_tokens=6, rng=jax.random.PRNGKey(0), temperature=0)
    both = jax.device_get(generate(cfg, params, [a, b], **kw))
    alone = jax.device_get(generate(cfg, params, [a], **kw))  # (two rows, a and its copy)
    for row, p in enumerate((a, b)):  # the first token: a one-sequence forward's argmax
        own = np.asarray(forward(cfg, params, jnp.asarray([p])))[0]
        assert both.tokens[row, 0] == np.argmax(own[-1]), row
    np.testing.assert_array_equal(alone.tokens[0], both.tokens[0])
    # A padded forward (training's: segment id 0 marks padding) gives a row its own logits.
    toks = np.zeros((2, len(b)), np.int32)
    toks[0, : len(a)], toks[1] = a, b
    seg = (np.arange(len(b))[None, :] < np.asarray([[len(a)], [len(b)]])).astype(np.int32)
    padded = np.asarray(forward(cfg, params, jnp.asarray(toks), segment_ids=jnp.asarray(seg)))
    own = np.asarray(forward(cfg, params, jnp.asarray([a])))[0]
    np.testing.assert_allclose(padded[0, : len(a)], own, atol=1e-4)


def test_per_prompt_keys_make_a_sample_independent_of_its_row(model):
    """With one key per prompt a prompt's sample follows its key: the same at any row, with any
    batch mates and batch size (same bucket: bit-identical logits); other keys, other samples."""
    from flaxlm.models.decode import prompt_keys

    cfg, params = model
    kw = dict(max_new_tokens=N, temperature=1.0)
    base = jax.random.PRNGKey(11)
    p, q = PROMPTS[1], [9, 9]
    alone = np.asarray(generate(cfg, params, [p], rng=prompt_keys(base, [5]), **kw).tokens)
    moved = generate(cfg, params, [q, [3, 1, 4, 1, 5], p], rng=prompt_keys(base, [0, 1, 5]), **kw)
    np.testing.assert_array_equal(alone[0], np.asarray(moved.tokens)[2])
    assert np.asarray(moved.lengths).shape == (3,)
    # Typed keys work the same way.
    typed = prompt_keys(jax.random.key(11), [5])
    np.testing.assert_array_equal(
        np.asarray(generate(cfg, params, [p], rng=typed, **kw).tokens)[0],
        np.asarray(generate(cfg, params, [q, p], rng=prompt_keys(jax.random.key(11), [0, 5]),
                            **kw).tokens)[1],
    )  # fmt: skip
    other = np.asarray(generate(cfg, params, [p], rng=prompt_keys(base, [6]), **kw).tokens)
    assert not np.array_equal(alone[0], other[0])
    with pytest.raises(ValueError, match="2 per-prompt keys for 3 prompts"):
        generate(cfg, params, [p, q, q], rng=prompt_keys(base, [0, 1]), **kw)


def test_past_max_seq_len_warns_and_runs(model):
    cfg, params = model  # max_seq_len 256
    kw = dict(rng=jax.random.PRNGKey(0), temperature=0)
    with pytest.warns(UserWarning, match=r"prompt 1 \(250 tokens\).*past the model's max_seq"):
        out = generate(cfg, params, [[1, 2], list(range(1, 251))], max_new_tokens=8, **kw)
    assert out.tokens.shape == (2, 8)  # nothing truncated: positions extrapolate
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(cfg, params, [list(range(1, 249))], max_new_tokens=8, **kw)  # ends at 255


def test_same_tokens_under_a_sharded_mesh(model):
    cfg, params = model
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = logical_axis_rules("fsdp_tp")
    boxed = jax.eval_shape(
        lambda r: Transformer(cfg).init(r, jnp.zeros((1, 4), jnp.int32)), jax.random.PRNGKey(0)
    )["params"]
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    sharded = jax.device_put(params, shardings)
    assert sharded["layers_0"]["mlp"]["gate"]["kernel"].sharding.spec == P("fsdp", "tensor")
    kw = dict(max_new_tokens=N, rng=jax.random.PRNGKey(0), temperature=0)
    want = np.asarray(generate(cfg, params, PROMPTS, **kw).tokens)
    # 4 rows split over data×fsdp (greedy rows are independent of their batch-mates) ...
    got = generate(cfg, sharded, PROMPTS + [[9, 9, 9]], mesh=mesh, rules=rules, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens)[:3], want)
    assert got.tokens.sharding.spec[0] == ("data", "fsdp")
    # ... and 3 rows, which do not split: padded to 4 inside (the same program), cut to 3.
    odd = generate(cfg, sharded, PROMPTS, mesh=mesh, rules=rules, **kw)
    np.testing.assert_array_equal(odd.tokens, want)
    # Heads split over `tensor`, fused on request: still correct.
    fused = generate(cfg, sharded, PROMPTS, mesh=mesh, rules=rules, fuse_projections=True, **kw)
    np.testing.assert_array_equal(fused.tokens, want)
    # Sampling with per-prompt keys (split over data×fsdp with the rows): the same samples.
    from flaxlm.models.decode import prompt_keys

    kw = dict(max_new_tokens=N, rng=prompt_keys(jax.random.PRNGKey(3), [0, 1, 2]), temperature=1)
    want = np.asarray(generate(cfg, params, PROMPTS, **kw).tokens)
    np.testing.assert_array_equal(generate(cfg, sharded, PROMPTS, mesh=mesh, rules=rules, **kw)
                                  .tokens, want)  # fmt: skip


def test_ring_caches_under_a_sharded_mesh():
    """Gemma 2's mixed layers with window 5 (rings for the local ones: each row writes its
    own slot, a scatter over the batch-sharded rows), heads split over `tensor`: the
    unsharded tokens, and the full-cache ones."""
    cfg, params = _model(**GEMMA2)
    mesh, rules = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), logical_axis_rules("fsdp_tp")
    kw = dict(max_new_tokens=N, rng=jax.random.PRNGKey(2), temperature=0.8)
    want = np.asarray(generate(cfg, params, PROMPTS, window_cache=False, **kw).tokens)
    np.testing.assert_array_equal(generate(cfg, params, PROMPTS, **kw).tokens, want)
    got = generate(cfg, params, PROMPTS, mesh=mesh, rules=rules, **kw)
    np.testing.assert_array_equal(got.tokens, want)


class _CharTokenizer:
    """bytes 3..255 are characters; 1 = bos, 2 = eos, 0 = pad."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text, bos=False):
        return ([1] if bos else []) + [min(255, max(3, ord(c))) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_generate_text_decodes_until_eos(model):
    cfg, params = model
    tok = _CharTokenizer()
    texts = ["hello", "a longer prompt", "!"]  # 3 rows, bucket 16: the greedy tests' program
    out = generate_text(cfg, params, tok, texts, max_new_tokens=N, temperature=0)
    ref = generate(
        cfg,
        params,
        [tok.encode(t, bos=True) for t in texts],
        max_new_tokens=N,
        rng=jax.random.PRNGKey(0),
        temperature=0,
        stop_tokens=(2,),
    )
    for s, row, n in zip(out, np.asarray(ref.tokens), np.asarray(ref.lengths)):
        ids = [int(i) for i in row[:n] if i != 2]
        assert s == tok.decode(ids)


def test_generate_text_leaves_out_any_stop_id_and_cuts_at_a_leading_stop_string(monkeypatch):
    """With `decode.generate` replaced (no model): a tokenizer's `stop_ids` beyond its eos (Llama
    3's <|eot_id|>) are the default stop tokens, the completion leaves out whichever ended it,
    and it is cut before the first stop string, one it opens with included."""
    from flaxlm.models import decode
    from flaxlm.models.stop_strings import StopStrings

    class Tok(_CharTokenizer):
        stop_ids = (2, ord(";"))

    tok, seen = Tok(), {}
    rows = ["ab;", "--x", "plain"]

    def fake_generate(cfg, params, prompts, *, max_new_tokens, rng, **kw):
        seen.update(kw)
        ids = [tok.encode(r) + [0] * (max_new_tokens - len(r)) for r in rows]
        n = np.asarray([len(r) for r in rows], np.int32)
        mask = (np.arange(max_new_tokens) < n[:, None]).astype(np.float32)
        return decode.GenerateOutput(np.asarray(ids, np.int32), mask * 0, mask, n)

    monkeypatch.setattr(decode, "generate", fake_generate)
    strings = StopStrings(("--",), np.zeros((1, 8, 256), np.int32), np.zeros(1, np.int32),
                          np.full(1, 2, np.int32))  # fmt: skip
    out = generate_text(None, None, tok, ["p"] * 3, max_new_tokens=8, stop_strings=strings)
    assert tuple(seen["stop_tokens"]) == (2, ord(";"))
    assert out == ["ab", "", "plain"]


def test_generate_text_refuses_one_string_and_takes_an_int_seed(monkeypatch):
    """A bare string was generated from one character per prompt; generate_text takes an int
    seed as its rng (its docstring's promise), generate says to make a key of it."""
    from flaxlm.models import decode

    tok, keys = _CharTokenizer(), []

    def fake_generate(cfg, params, prompts, *, max_new_tokens, rng, **kw):
        keys.append(np.asarray(jax.random.key_data(rng)))
        z = np.zeros((len(prompts), max_new_tokens), np.int32)
        return decode.GenerateOutput(z, z * 0.0, z * 0.0, np.zeros(len(prompts), np.int32))

    with pytest.raises(TypeError, match=r"texts is one string; pass a list of prompts, \[text\]"):
        generate_text(None, None, tok, "hello", max_new_tokens=4)
    monkeypatch.setattr(decode, "generate", fake_generate)
    generate_text(None, None, tok, ["a"], max_new_tokens=4, rng=7)
    generate_text(None, None, tok, ["a"], max_new_tokens=4, rng=np.int64(7))
    want = np.asarray(jax.random.key_data(jax.random.PRNGKey(7)))
    assert all(np.array_equal(k, want) for k in keys) and len(keys) == 2
    monkeypatch.undo()
    cfg, params = _model()
    with pytest.raises(TypeError, match=r"rng=0 is a number, not a PRNG key: pass jax\.random"):
        generate(cfg, params, [[1, 2]], max_new_tokens=2, rng=0)


# ----------------------------------------------------------------------------------------------
# The Pallas decode-step kernel (models/decode_attention.py: RoPE, cache write, attention):
# equal to the XLA path (`apply_rope`, `dynamic_update_slice`, `cached_attention`; the kernel
# runs here in Pallas' interpreter), blind to key blocks past the write index, lowered to one
# Triton kernel per layer for GPUs, and giving `generate` the full forward's tokens and
# logprobs.


def _step(B, N, K, H, S, index, seed=0, dtype=jnp.float32, holes=True, window=0):
    """A decode step's inputs: q|k|v (B, 1, N + 2K, H) before RoPE, the rope tables of each
    row's position, random key and value caches (B, K, S, H), and the step's mask (B, 1, 1, S) as
    the model builds it (`attention_mask`: segments, slots, window), with random padding holes
    before the write index."""
    r = np.random.default_rng(seed)
    qkv = jnp.asarray(r.normal(size=(B, 1, N + 2 * K, H)) * 1.5, dtype)
    k_cache, v_cache = jnp.asarray(r.normal(size=(2, B, K, S, H)), dtype)
    slots = np.broadcast_to(np.arange(S), (B, S))
    kv_seg = (slots <= index).astype(np.int32)
    if holes:  # prompt padding: segment-0 slots (never the query's own)
        kv_seg[:, :index] *= r.random((B, index)) < 0.7
    q_slot = np.full((B, 1), index)
    mask = attention_mask(jnp.ones((B, 1), jnp.int32), jnp.asarray(kv_seg), q_slot, slots,
                          q_slot, slots, window)  # fmt: skip
    positions = jnp.asarray(r.integers(index, index + 50, (B, 1)))
    cfg = ModelConfig(n_heads=N, n_kv_heads=K, head_dim=H, d_model=64)
    cos, sin = rope_tables(cfg, positions)
    return qkv, cos, sin, k_cache, v_cache, mask


def _xla_step(qkv, cos, sin, k_cache, v_cache, mask, index):
    """What `Attention` computes without the kernel: (out, (key cache, value cache))."""
    K = k_cache.shape[1]
    q, k, v = jnp.split(qkv, [qkv.shape[2] - 2 * K, qkv.shape[2] - K], axis=2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_cache, v_cache = (jax.lax.dynamic_update_slice(c, new.transpose(0, 2, 1, 3).astype(c.dtype),
                                                     (0, 0, index, 0))
                        for c, new in ((k_cache, k), (v_cache, v)))  # fmt: skip
    out = cached_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask)
    return out, (k_cache, v_cache)


@pytest.mark.parametrize(
    "B,N,K,H,S,index",
    [
        (3, 8, 2, 64, 128, 70),  # GQA, G=4; the write in the second key block
        (2, 4, 4, 32, 64, 63),  # MHA; the last slot of the buffer
        (2, 8, 1, 32, 192, 128),  # MQA, G=8; the first slot of the third block
        (1, 6, 2, 32, 64, 0),  # G=3 (not a power of two); the first slot: only itself
    ],
)
def test_kernel_equals_the_xla_step(B, N, K, H, S, index):
    args = _step(B, N, K, H, S, index)
    out, cache = kernel.decode_attention(*args, index)
    want_out, want_cache = _xla_step(*args, index)
    assert out.shape == want_out.shape == (B, 1, N, H)
    np.testing.assert_allclose(out, want_out, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(cache, want_cache, atol=1e-6, rtol=1e-6)
    untouched = np.ones(S, bool)
    untouched[index] = False  # the kernel writes this step's slot and nothing else
    for got, before in zip(cache, args[3:5]):
        np.testing.assert_array_equal(np.asarray(got)[:, :, untouched],
                                      np.asarray(before)[:, :, untouched])  # fmt: skip


@pytest.mark.parametrize("block_k,index", [(16, 37), (128, 200), (256, 255)])
def test_key_block_size_does_not_change_the_step(block_k, index):
    """Other key blocks (bench/decode_kernels.py times 64, 128, 256 on the GPU): the same
    step — more blocks than the default (16: the write mid-block, earlier blocks whole), one
    block holding every earlier slot and the write (256), the write in a later block (128)."""
    args = _step(2, 8, 2, 32, 256, index, seed=block_k)
    out, cache = kernel.decode_attention(*args, index, block_k=block_k, num_warps=8,
                                         num_stages=3)  # fmt: skip
    want_out, want_cache = _xla_step(*args, index)
    np.testing.assert_allclose(out, want_out, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(cache, want_cache, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="block_k"):  # not a power of two
        kernel.decode_attention(*args, index, block_k=48)


@pytest.mark.parametrize(
    "splits,index,block_k",
    [
        (2, 70, 16),  # 5 blocks in 2 parts (2 and 3)
        (4, 10, 16),  # 1 block, 4 parts: three see no key and must weigh 0
        (3, 0, 16),  # the first slot: no earlier block, only the new token (part 0's)
        (8, 200, 16),  # 13 blocks, 8 parts
        (4, 255, 64),  # the last slot, whole blocks of 64
    ],
)
def test_split_k_equals_the_xla_step(splits, index, block_k):
    """Split-K (`splits` programs per row and kv head, each over a run of the key blocks, then
    a combine by log-sum-exp): the XLA step's output and caches, including parts that see no
    key (more parts than blocks) and the write slot in any part."""
    args = _step(2, 8, 2, 32, 256, index, seed=splits)
    out, cache = kernel.decode_attention(*args, index, block_k=block_k, splits=splits)
    want_out, want_cache = _xla_step(*args, index)
    np.testing.assert_allclose(out, want_out, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(cache, want_cache, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("splits", [1, 2])
def test_a_block_of_very_negative_scores_stays_finite(splits):
    """A row's first visible key block whose best score is below -88 (exp of its negation
    overflows float32): the XLA step's output, unsplit and split (a split part starts afresh,
    so each part's first block meets this); splits < 1 is refused by name."""
    qkv, cos, sin, k_cache, v_cache, mask = _step(1, 2, 1, 32, 64, 40, seed=4, holes=False)
    cos, sin = jnp.ones_like(cos), jnp.zeros_like(sin)  # RoPE the identity
    qkv = qkv.at[0, 0, :3].set(3.0)  # both query heads and the new key: all 3s
    k_cache = k_cache.at[0, 0, :16].set(-6.0)  # block 0: scores 3·(-6)·32/√32 ≈ -102
    args = (qkv, cos, sin, k_cache, v_cache, mask)
    out, _ = kernel.decode_attention(*args, 40, block_k=16, splits=splits)
    np.testing.assert_allclose(out, _xla_step(*args, 40)[0], atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="splits must be >= 1"):
        kernel.decode_attention(*args, 40, block_k=16, splits=0)


def test_split_k_over_a_ring_and_an_int8_cache():
    """Split-K over a windowed layer's ring (each row its own slot; the parts cover the whole
    ring) and over an int8 cache: the unsplit kernel's results."""
    B, N, K, H, S = 3, 8, 2, 32, 128
    qkv, cos, sin, k_cache, v_cache, _ = _step(B, N, K, H, S, 0)
    slots = jnp.asarray([0, 77, S - 1])
    mask = np.random.default_rng(5).random((B, 1, 1, S)) < 0.5
    mask[np.arange(B), 0, 0, np.asarray(slots)] = True
    ring = (qkv, cos, sin, k_cache, v_cache, jnp.asarray(mask), slots)
    want = kernel.decode_attention(*ring, ring=True, block_k=16)
    got = kernel.decode_attention(*ring, ring=True, block_k=16, splits=3)
    np.testing.assert_allclose(got[0], want[0], atol=2e-6, rtol=1e-5)
    np.testing.assert_array_equal(got[1][0], want[1][0])

    args = _step(2, 8, 2, 32, 128, 90, seed=3)
    k8, v8, ks, vs = quantize_kv(args[3], args[4])  # ((B, K, S, H): per slot and head)
    int8 = (*args[:3], k8, v8, args[5], 90)
    want = kernel.decode_attention(*int8, kv_scales=(ks, vs), block_k=16)
    got = kernel.decode_attention(*int8, kv_scales=(ks, vs), block_k=16, splits=4)
    np.testing.assert_allclose(got[0], want[0], atol=2e-6, rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_array_equal(g, w)


def test_sliding_window_masks_whole_leading_blocks():
    """A window of 20 at slot 150: the first two key blocks are entirely masked, which the
    online softmax must skip without letting them into the normaliser."""
    args = _step(2, 8, 2, 32, 192, 150, holes=False, window=20)
    assert not np.asarray(args[5])[..., :128].any()
    out, _ = kernel.decode_attention(*args, 150)
    np.testing.assert_allclose(out, _xla_step(*args, 150)[0], atol=2e-6)


def test_bfloat16():
    args = _step(2, 8, 2, 64, 128, 100, dtype=jnp.bfloat16)
    out, cache = kernel.decode_attention(*args, 100)
    want_out, want_cache = _xla_step(*args, 100)
    np.testing.assert_allclose(out.astype(jnp.float32), want_out.astype(jnp.float32), atol=2e-2)
    for got, want in zip(cache, want_cache):
        np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=1e-2)


def test_blocks_past_the_write_index_are_not_read():
    """Write index 40: the kernel reads key block 0 (slots 0-63; those past 40 masked) and
    stops. NaN in every later slot, with the mask even letting them through: a kernel that
    read them would return NaN."""
    qkv, cos, sin, k_cache, v_cache, mask = _step(2, 8, 2, 32, 128, 40)
    poisoned = [c.at[:, :, 64:].set(jnp.nan) for c in (k_cache, v_cache)]
    open_mask = mask | (jnp.arange(128) >= 64)
    out, _ = kernel.decode_attention(qkv, cos, sin, *poisoned, open_mask, 40, block_k=64)
    want = _xla_step(qkv, cos, sin, k_cache, v_cache, mask, 40)[0]
    np.testing.assert_allclose(out, want, atol=2e-6)


def test_write_index_is_clamped_to_the_buffer():
    """Past the end (a guarded decode step beyond max_new_tokens) the write lands in the last
    slot, as `dynamic_update_slice` clamps it: no write outside the buffer."""
    args = _step(1, 4, 2, 32, 64, 63)
    out, cache = kernel.decode_attention(*args, 70)
    want_out, want_cache = _xla_step(*args, 63)
    np.testing.assert_allclose(cache, want_cache, atol=1e-6)
    np.testing.assert_allclose(out, want_out, atol=2e-6)


def test_kernel_over_a_ring_equals_the_xla_step():
    """A windowed layer's ring (`ring=True`): each row writes its own slot — the first, a
    middle one, the last — and attends over every other slot the mask lets through (a random
    half, as a ring's positions and window leave them), then its new token; the other slots
    are left alone."""
    B, N, K, H, S = 3, 8, 2, 32, 128
    qkv, cos, sin, k_cache, v_cache, _ = _step(B, N, K, H, S, 0)
    slots = jnp.asarray([0, 77, S - 1])
    r = np.random.default_rng(4)
    mask = r.random((B, 1, 1, S)) < 0.5
    mask[np.arange(B), 0, 0, np.asarray(slots)] = True  # the new token sees itself
    mask = jnp.asarray(mask)
    out, cache = kernel.decode_attention(qkv, cos, sin, k_cache, v_cache, mask, slots, ring=True)

    q, k, v = jnp.split(qkv, [N, N + K], axis=2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    put = jax.vmap(lambda c, new, s: jax.lax.dynamic_update_slice(c, new, (0, s, 0)))
    want_cache = [put(c, new.transpose(0, 2, 1, 3), slots) for c, new in ((k_cache, k),
                                                                        (v_cache, v))]  # fmt: skip
    want = cached_attention(q, *want_cache, mask)
    np.testing.assert_allclose(out, want, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(cache, want_cache, atol=1e-6, rtol=1e-6)
    for b, slot in enumerate(np.asarray(slots)):
        others = np.arange(S) != slot
        np.testing.assert_array_equal(np.asarray(cache[0])[b][:, others],
                                      np.asarray(k_cache)[b][:, others])  # fmt: skip


def test_gpu_lowering_is_one_triton_kernel():
    """Lowered for CUDA (no GPU needed to lower): one Triton custom call, not the
    interpreter's loop, with the cache updated in place (aliased to an output)."""
    shapes = [((2, 1, 16, 64), jnp.bfloat16), ((2, 1, 32), jnp.float32),
              ((2, 1, 32), jnp.float32), ((2, 2, 128, 64), jnp.bfloat16),
              ((2, 2, 128, 64), jnp.bfloat16), ((2, 1, 1, 128), jnp.bool_),
              ((), jnp.int32)]  # fmt: skip
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    with kernel.lowering_target():  # for an H200, on this CPU-only machine
        lowered = jax.jit(kernel.decode_attention).trace(*args).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert text.count("output_operand_alias<") == 2  # both caches updated in place
    with kernel.lowering_target():  # split-K: still one kernel, the caches still in place
        split = jax.jit(functools.partial(kernel.decode_attention, splits=4))
        text = split.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert text.count("output_operand_alias<") == 2


def test_default_key_block_fits_a_ring():
    """The default key block is BLOCK_K (128, the H200's fastest) where it divides the slots
    (`generate` rounds a full cache up to it); a ring of W slots takes the largest power of
    two that divides W, down to 16, and none below."""
    assert kernel.BLOCK_K == 128
    assert [kernel.block_for(s) for s in (384, 128, 64, 96, 48, 40)] == [128, 128, 64, 32, 16,
                                                                         None]  # fmt: skip


def test_unsupported_shapes():
    assert kernel.supports(128, 1, 64) and kernel.supports(64, 1, 32, block_k=64)
    assert not kernel.supports(100, 1, 64)  # not whole key blocks
    assert not kernel.supports(128, 2, 64)  # prefill
    assert not kernel.supports(128, 1, 16) and not kernel.supports(128, 1, 96)
    args = _step(1, 4, 2, 32, 64, 10)
    with pytest.raises(ValueError, match="slots"):
        kernel.decode_attention(
            *args[:3], args[3][:, :, :60], args[4][:, :, :60], args[5][..., :60], 10
        )


# A model the kernel applies to (head dim 32; the tiny variant's is 16).
def _kernel_model(**kw):
    return _model(head_dim=32, **kw)


# Gemma 2's attention: local (window 5) and global layers alternating, logits scaled by
# query_pre_attn_scalar^-1/2 and soft-capped (low enough to bite), Gemma's norms and embeddings.
GEMMA2 = dict(sliding_window=5, sliding_window_pattern=2, query_pre_attn_scalar=20.0,
              attn_logit_softcap=2.0, final_logit_softcap=8.0, norm_placement="sandwich",
              norm_unit_offset=True, scale_embeddings=True)  # fmt: skip


@pytest.mark.parametrize(
    "kw", [{"sliding_window": 0}, {"sliding_window": 5}, GEMMA2, {"nope_layer_interval": 2}]
)  # fmt: skip  (NoPE: identity tables)
def test_generate_with_the_kernel_equals_full_recompute(kw):
    """Greedy tokens and logprobs through `generate(decode_attention="pallas")` equal the full
    forward's, with ragged prompts (padding holes in the cache), a sliding window, and Gemma
    2's mixed layers and soft-capped, rescaled logits; the cache (16 + 10 slots) is rounded up
    to whole key blocks."""
    _assert_greedy_decode_is_recompute(*_kernel_model(**kw), decode_attention="pallas")


def _assert_greedy_decode_is_recompute(cfg, params, **options):
    kw = dict(max_new_tokens=10, rng=jax.random.PRNGKey(1), temperature=0)
    out = generate(cfg, params, PROMPTS, **options, **kw)
    want = _greedy_by_recompute(cfg, params, PROMPTS, 10)
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    np.testing.assert_allclose(
        out.logprobs, _full_logprobs(cfg, params, PROMPTS, want), atol=2e-5, rtol=1e-5
    )


def test_a_tuned_kernel_variant_decodes_the_same():
    """`decode_attention="pallas:BK:W:S"` (a tiling bench/decode_kernels.py can pick): key
    blocks of 16 (the 16 + 10 slots rounded to 32, two blocks per loop) give the full
    forward's greedy tokens and logprobs; malformed names are refused, naming the option."""
    cfg, params = _kernel_model()
    _assert_greedy_decode_is_recompute(cfg, params, decode_attention="pallas:16:2:1")
    assert kernel.variant_options("pallas:128:8:3") == dict(block_k=128, num_warps=8,
                                                              num_stages=3)  # fmt: skip
    assert kernel.variant_options("pallas:64:4:2:4") == dict(block_k=64, num_warps=4,
                                                               num_stages=2, splits=4)  # fmt: skip
    _assert_greedy_decode_is_recompute(cfg, params, decode_attention="pallas:16:2:1:3")
    for bad in ("pallas:100:4:2", "pallas:64:3:2", "pallas:64:4", "pallas:64:4:0", "pallasx",
                "pallas:64:4:2:0", "pallas:64:4:2:2:2"):  # fmt: skip
        with pytest.raises(ValueError, match="pallas:BK:W:S"):
            generate(cfg, params, PROMPTS, decode_attention=bad, max_new_tokens=2,
                     rng=jax.random.PRNGKey(0))  # fmt: skip


def test_generate_with_the_kernel_samples_and_stops_as_the_xla_path():
    """Sampling, stop tokens, one prompt (run as two rows) and stop checks every 3 tokens
    (10 is not a multiple: the last block's extra steps write a clamped slot): the same
    tokens, lengths and logprobs as the XLA path."""
    cfg, params = _kernel_model()
    kw = dict(max_new_tokens=10, rng=jax.random.PRNGKey(3), temperature=0.9, pad_id=-1)
    free = np.asarray(generate(cfg, params, PROMPTS, **kw).tokens)
    stops = (int(free[0, 3]), int(free[2, 6]))
    outs = []
    for prompts, extra in ((PROMPTS, dict(stop_tokens=stops, check_every=3)), (PROMPTS[1:2], {})):
        want = generate(cfg, params, prompts, **kw, **extra)
        got = generate(cfg, params, prompts, decode_attention="pallas", **kw, **extra)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.lengths, want.lengths)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-5)
        outs.append(got)
    assert np.asarray(outs[0].lengths).min() < 10  # some row stopped early


@pytest.mark.parametrize("kw,window_cache", [({}, True), (GEMMA2, False), (GEMMA2, True)])
def test_generate_program_runs_the_kernel_in_every_layer(kw, window_cache):
    """In every layer over a full cache (soft-capping and rescaled logits inside, Gemma 2);
    with the windowed layers' rings (`window_cache`) of 5 slots, not a whole key block, in
    the global layers only (test_generate_with_the_kernel_over_rings_...: rings of 64)."""
    cfg, params = _kernel_model(**kw)
    fn, args = generate_program(cfg, PROMPTS, rng=jax.random.PRNGKey(0), max_new_tokens=4,
                                decode_attention="pallas", window_cache=window_cache)  # fmt: skip
    with kernel.lowering_target():
        text = fn.trace(params, *args).lower(lowering_platforms=("cuda",)).as_text()
    n_ring = sum(bool(cfg.layer_window(i)) for i in range(cfg.n_layers)) if window_cache else 0
    assert 0 < text.count("__gpu$xla.gpu.triton") == cfg.n_layers - n_ring


def test_generate_with_the_kernel_over_rings_equals_full_recompute():
    """Gemma 2's attention with a window of 64 (a whole key block, so the local layers' rings
    run the kernel too): 70 new tokens after prompts of up to 12 wrap every ring; greedy
    tokens and logprobs are the full forward's, the kernel runs in every layer."""
    cfg, params = _kernel_model(**{**GEMMA2, "sliding_window": 64})
    calls, call = [], kernel._call
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernel, "_call", lambda *a, **k: calls.append(k["ring"]) or call(*a, **k))
        out = generate(cfg, params, PROMPTS, max_new_tokens=70, rng=jax.random.PRNGKey(1),
                       temperature=0, decode_attention="pallas")  # fmt: skip
    # traced alike per layer (once per platform branch): the global layer's and the ring's
    assert calls.count(True) == calls.count(False) > 0
    want = _greedy_by_recompute(cfg, params, PROMPTS, 70, t_max=96)
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    np.testing.assert_allclose(
        out.logprobs, _full_logprobs(cfg, params, PROMPTS, want, t_max=96), atol=2e-5, rtol=1e-5
    )
    # The window matters: without it the same model decodes something else.
    no_window = cfg.replace(sliding_window=0, sliding_window_pattern=0)
    assert not np.array_equal(want, _greedy_by_recompute(no_window, params, PROMPTS, 70, t_max=96))


def test_generate_option_is_checked():
    cfg, params = _kernel_model()
    with pytest.raises(ValueError, match="decode_attention"):
        generate(cfg, params, PROMPTS, decode_attention="triton", max_new_tokens=2,
                 rng=jax.random.PRNGKey(0))  # fmt: skip


def test_auto_picks_the_kernel_on_cuda_gpus_only():
    """`decode_attention="auto"` (the default): the kernel where it compiles to Triton (CUDA
    GPUs), XLA's attention elsewhere — here on the CPU, and on ROCm or TPU, where the kernel
    would run in the interpreter."""
    from types import SimpleNamespace

    from flaxlm.models.decode import resolve_decode_attention

    def device(platform, version):
        return SimpleNamespace(platform=platform, client=SimpleNamespace(platform_version=version))

    assert kernel.runs_natively([device("gpu", "cuda 12080")])
    assert kernel.runs_natively([SimpleNamespace(platform="gpu")])  # a runtime that does not say
    assert not kernel.runs_natively([device("gpu", "rocm 60342")])
    assert not kernel.runs_natively([device("tpu", "PJRT C API")])
    assert not kernel.runs_natively()  # this machine's CPU
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",))
    assert resolve_decode_attention("auto") == resolve_decode_attention("auto", mesh) == "xla"
    assert resolve_decode_attention("pallas") == "pallas"
    with pytest.raises(ValueError, match="'auto', 'xla' or 'pallas'"):
        resolve_decode_attention("triton")


def test_auto_folds_the_norms_only_where_it_measured_faster(monkeypatch):
    """`decode_norm="auto"` (the default) is "fold" with the Pallas attention kernel on a CUDA
    GPU, cuBLAS gemms, XLA's MLP, float weights and a model the fold and the kernel take (the
    H200's 1.1B step: 1.27 ms against 1.32), and "xla" as soon as one of those is missing;
    `generate` hands the program the resolved value."""
    from flaxlm.models.decode import resolve_decode_norm

    cfg = get_variant("1b")
    ok = dict(attention="pallas", gemm="cublas", mlp="xla", int8=False, cuda=True)
    assert resolve_decode_norm("auto", cfg, **ok) == "fold"
    assert resolve_decode_norm("auto", cfg, **{**ok, "attention": "pallas:64:4:2:2"}) == "fold"
    for change in (dict(cuda=False), dict(attention="xla"), dict(gemm="xla"),
                   dict(mlp="pallas"), dict(int8=True)):  # fmt: skip
        assert resolve_decode_norm("auto", cfg, **{**ok, **change}) == "xla", change
    for other in (get_variant("125m"),  # d_model 768: the kernel loads rows of 2^n only
                  cfg.replace(qkv_bias=True), cfg.replace(norm_placement="sandwich"),
                  cfg.replace(head_dim=24)):  # fmt: skip
        assert resolve_decode_norm("auto", other, **ok) == "xla"
    assert resolve_decode_norm("xla", cfg, **ok) == "xla"
    assert resolve_decode_norm("fold", cfg, **{**ok, "cuda": False}) == "fold"
    assert resolve_decode_norm("auto", cfg, **{**ok, "cuda": None}) == "xla"  # this CPU

    seen = []

    class Built(Exception):  # the program's options are seen; compiling it adds nothing
        pass

    def spy(*a):
        seen.append((a[11], a[18], a[19]))  # attention, decode_gemm, decode_norm
        raise Built

    kcfg, params = _kernel_model()
    monkeypatch.setattr(decode, "_decode_fn", spy)
    for cuda in (False, True):  # 64 rows here, then on a "CUDA GPU"
        monkeypatch.setattr(decode.decode_kernel, "runs_natively", lambda devices=None, c=cuda: c)
        with pytest.raises(Built):
            generate(kcfg, params, [[1]] * 64, max_new_tokens=2, rng=jax.random.PRNGKey(0))
    assert seen == [("xla", "xla", "xla"), ("pallas", "cublas", "fold")]


@pytest.mark.parametrize("shape,runs_kernel", [
    ({"data": 2, "fsdp": 2, "tensor": 1}, True),   # rows split over 4 devices
    ({"data": 2, "fsdp": 1, "tensor": 2}, False),  # heads split: the XLA path instead
])  # fmt: skip
def test_generate_under_a_mesh(shape, runs_kernel, monkeypatch):
    """Sharded generate with the kernel: each device runs it on its own rows (shard_map over
    the batch axes) and the tokens are the unsharded ones."""
    cfg, params = _kernel_model()
    mesh, rules = make_mesh(shape, jax.devices()[:4]), logical_axis_rules("fsdp_tp")
    kw = dict(max_new_tokens=6, rng=jax.random.PRNGKey(0), temperature=0,
              decode_attention="pallas")  # fmt: skip
    want = np.asarray(generate(cfg, params, PROMPTS, **kw).tokens)
    traced, call = [], kernel._call  # the q|k|v block each traced kernel call gets
    monkeypatch.setattr(kernel, "_call", lambda *a, **k: traced.append(a[1].shape) or call(*a, **k))
    got = generate(cfg, params, PROMPTS + [[9, 9, 9]], mesh=mesh, rules=rules, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens)[:3], want)
    # 4 rows over data×fsdp: one row per device in the kernel; or no kernel (XLA path).
    assert bool(traced) == runs_kernel
    assert all(s[0] == 4 // shape["data"] // shape["fsdp"] for s in traced)
    with use_mesh(mesh, rules):
        assert kernel.mesh_supports() == runs_kernel
