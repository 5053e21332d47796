"""KV-cache generation: equals full recomputation, reproducible sampling, logprobs, stops, one
compiled loop (no Python loop per token), and the same result under a sharded mesh."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flaxlm.models import attention, decode
from flaxlm.models.config import get_variant
from flaxlm.models.decode import generate, generate_text, sample_logits
from flaxlm.models.sharding import logical_axis_rules, make_mesh
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


def _full_logprobs(cfg, params, prompts, gen):
    """log-softmax of one full forward over prompt + generated tokens at the generated ones."""
    toks = np.zeros((len(prompts), T_MAX), np.int32)
    for b, (p, g) in enumerate(zip(prompts, gen)):
        toks[b, : len(p) + len(g)] = list(p) + list(g)
    logp = np.asarray(_log_softmax_fn(cfg)(params, toks))  # right padding never affects the past
    idx = np.asarray([[len(p) - 1 + i for i in range(gen.shape[1])] for p in prompts])
    return np.take_along_axis(np.take_along_axis(logp, idx[..., None], 1), gen[..., None], 2)[
        ..., 0
    ]


def _greedy_by_recompute(cfg, params, prompts, n):
    """Argmax decoding by re-running the full forward on the whole sequence for every token."""
    toks = np.zeros((len(prompts), T_MAX), np.int32)
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


def test_fusion_only_on_request(model, monkeypatch):
    cfg, params = model
    seen = []
    real = decode._decode_fn
    monkeypatch.setattr(decode, "_decode_fn", lambda *a: seen.append(a[9]) or real(*a))
    kw = dict(max_new_tokens=2, rng=jax.random.PRNGKey(0), temperature=0)
    generate(cfg, params, PROMPTS, **kw)
    generate(cfg, params, PROMPTS, fuse_projections=True, **kw)
    mesh = make_mesh({"data": 4, "fsdp": 2})
    generate(cfg, params, PROMPTS + [[3]], mesh=mesh, rules=logical_axis_rules("fsdp"), **kw)
    assert seen == [False, True, False]


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
        traced = fn.trace(params, *args, 1.0, 1.0, np.full((4,), -1, np.int32), 0)
        assert "while[" in str(traced.jaxpr)
        return len(calls) - before

    per_trace = 2 * cfg.n_layers  # q and k rotated once per layer per traced forward
    assert traces(3) == 2 * per_trace
    assert traces(40) == 2 * per_trace

    # A second call with other lengths in the same bucket, other RNG or stop ids: no retrace.
    kw = dict(max_new_tokens=N, temperature=0)
    generate(cfg, params, PROMPTS, rng=jax.random.PRNGKey(0), **kw)
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
    with pytest.raises(ValueError, match="check_every must be >= 1"):
        generate(cfg, params, PROMPTS, check_every=0, **kw)


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
