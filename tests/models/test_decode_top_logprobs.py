"""`generate(..., top_logprobs=K)`: each generated position's K most likely tokens and their
logprobs equal the top K of a full forward's log-softmax there (the unmodified model at
temperature 1, whatever the sampler, its filters or a penalty drew from), most likely first;
greedy tokens are the lists' heads and a listed token's logprob is its `logprobs`; rows past
their end hold pad_id and 0; shared prefills (num_samples) and an 8-device mesh, the vocabulary
split over `tensor`, give one device's lists; K=0 is the program without the option; a bad K
is refused by name.

Cheap on purpose: the tiny model, four decode programs (greedy with a stop token, sampled with
top-k and a penalty, num_samples on one device and on the mesh) and the reference forward."""

import jax
import numpy as np
import pytest

from flaxlm.models import decode
from flaxlm.models.decode import generate, prompt_keys
from flaxlm.models.sharding import logical_axis_rules, make_mesh
from tests.models.test_decode import PROMPTS, T_MAX, _log_softmax_fn, _model

N, K = 8, 5
STOP = 5  # greedy row 0 emits it at step 2 (asserted below): a row that ends early


@pytest.fixture(scope="module")
def model():
    return _model()


def _full_top(cfg, params, prompts, gen, k):
    """(ids, logprobs) (B, n, k): the top k of one full forward's log-softmax over prompt +
    generated tokens at each generated position, descending, ties by the lower id (as
    `jax.lax.top_k`); the reference forward of tests/models/test_decode.py (width T_MAX)."""
    toks = np.zeros((len(prompts), T_MAX), np.int32)
    for b, (p, g) in enumerate(zip(prompts, gen)):
        toks[b, : len(p) + len(g)] = list(p) + list(g)
    logp = np.asarray(_log_softmax_fn(cfg)(params, toks))
    idx = np.asarray([[len(p) - 1 + i for i in range(gen.shape[1])] for p in prompts])
    at = np.take_along_axis(logp, idx[..., None], 1)  # (B, n, V)
    ids = np.argsort(-at, axis=-1, kind="stable")[..., :k]
    return ids, np.take_along_axis(at, ids, -1)


def _assert_lists_are_the_models(cfg, params, prompts, out, k):
    """Each row's lists up to its length equal the full forward's top k (ids exactly,
    logprobs to float rounding), and a listed generated token's logprob is its `logprobs`."""
    toks, lps, n_gen = (np.asarray(x) for x in (out.tokens, out.logprobs, out.lengths))
    top_ids, top_lps = np.asarray(out.top_ids), np.asarray(out.top_logprobs)
    assert top_ids.shape == top_lps.shape == (*toks.shape, k)
    assert top_ids.dtype == np.int32 and top_lps.dtype == np.float32
    want_ids, want_lps = _full_top(cfg, params, prompts, toks, k)
    listed = 0
    for b, n in enumerate(n_gen):
        np.testing.assert_array_equal(top_ids[b, :n], want_ids[b, :n])
        np.testing.assert_allclose(top_lps[b, :n], want_lps[b, :n], atol=2e-5, rtol=1e-5)
        assert np.all(np.diff(top_lps[b, :n], axis=-1) <= 0)  # most likely first
        for i in range(n):
            hit = np.flatnonzero(top_ids[b, i] == toks[b, i])
            if hit.size:
                listed += 1
                np.testing.assert_allclose(top_lps[b, i, hit[0]], lps[b, i], atol=1e-6)
    assert listed > 0


@pytest.fixture(scope="module")
def greedy(model):
    cfg, params = model
    return generate(cfg, params, PROMPTS, max_new_tokens=N, rng=jax.random.PRNGKey(0),
                    temperature=0, stop_tokens=(STOP,), pad_id=-1, top_logprobs=K)  # fmt: skip


def test_greedy_lists_are_the_full_forwards_top_k_and_end_with_their_rows(model, greedy):
    cfg, params = model
    out = greedy
    toks, n_gen = np.asarray(out.tokens), np.asarray(out.lengths)
    assert n_gen.min() < N  # a row stopped early: its padding is checked below
    _assert_lists_are_the_models(cfg, params, PROMPTS, out, K)
    top_ids, top_lps = np.asarray(out.top_ids), np.asarray(out.top_logprobs)
    for b, n in enumerate(n_gen):
        np.testing.assert_array_equal(toks[b, :n], top_ids[b, :n, 0])  # greedy = the head
        np.testing.assert_array_equal(out.logprobs[b, :n], top_lps[b, :n, 0])
        assert np.all(top_ids[b, n:] == -1) and np.all(top_lps[b, n:] == 0)  # as tokens, logprobs


def test_sampled_lists_are_the_unmodified_models(model):
    """Drawn at temperature 0.8 under top_k=2 and a repetition penalty, the lists are still the
    plain model's at temperature 1:
    they hold tokens the sampler could not pick (the third to fifth), and a sampled token's
    logprob is its listed one wherever it is listed."""
    cfg, params = model
    out = generate(cfg, params, PROMPTS, max_new_tokens=N, rng=jax.random.PRNGKey(3),
                   temperature=0.8, top_k=2, repetition_penalty=1.5, top_logprobs=K)  # fmt: skip
    assert np.asarray(out.lengths).tolist() == [N] * len(PROMPTS)
    _assert_lists_are_the_models(cfg, params, PROMPTS, out, K)
    toks, top_ids = np.asarray(out.tokens), np.asarray(out.top_ids)
    assert np.any(toks != top_ids[..., 0])  # sampled, not greedy


@pytest.fixture(scope="module")
def shared(model):
    """num_samples=2 with per-prompt keys (the samples do not depend on the rows or mesh)."""
    cfg, params = model
    kw = dict(max_new_tokens=N, rng=prompt_keys(jax.random.PRNGKey(4), [0, 1, 2]),
              temperature=1.0, num_samples=2, top_logprobs=3)  # fmt: skip
    return kw, generate(cfg, params, PROMPTS, **kw)


def test_shared_prefill_samples_list_their_own_positions(model, shared):
    cfg, params = model
    _, out = shared
    rows = [p for p in PROMPTS for _ in range(2)]
    _assert_lists_are_the_models(cfg, params, rows, out, 3)
    toks = np.asarray(out.tokens)
    assert any(not np.array_equal(toks[2 * b], toks[2 * b + 1]) for b in range(len(PROMPTS)))


def test_a_sharded_mesh_lists_what_one_device_lists(model, shared):
    """8 devices, rows over data×fsdp (3 prompts × 2 samples padded to 8 rows) and the
    vocabulary's logits over `tensor`: the top-k over split logits gives one device's lists."""
    cfg, params = model
    kw, one = shared
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    got = generate(cfg, params, PROMPTS, mesh=mesh, rules=logical_axis_rules("fsdp_tp"), **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(one.tokens))
    np.testing.assert_array_equal(np.asarray(got.top_ids), np.asarray(one.top_ids))
    np.testing.assert_allclose(np.asarray(got.top_logprobs), np.asarray(one.top_logprobs),
                               atol=1e-5)  # fmt: skip


def test_zero_is_the_program_without_the_option(model, greedy):
    """K=0 (the default) builds the very program a call without the option builds, with no
    top-k in it, and returns the four fields alone; K > 0 adds one top-k of the vocabulary."""
    cfg, params = model
    kw = dict(rng=jax.random.PRNGKey(0), max_new_tokens=N, temperature=0, stop_tokens=(STOP,),
              pad_id=-1)  # fmt: skip
    plain, args = decode.generate_program(cfg, PROMPTS, **kw)
    off, _ = decode.generate_program(cfg, PROMPTS, top_logprobs=0, **kw)
    on, _ = decode.generate_program(cfg, PROMPTS, top_logprobs=K, **kw)
    assert off is plain and on is not plain
    assert "top_k" not in str(plain.trace(params, *args).jaxpr)
    assert "top_k" in str(on.trace(params, *args).jaxpr)
    out = generate(cfg, params, PROMPTS, **kw)
    # the four-field output as before (code unpacks it: `toks, logp, mask, n = out`), and the
    # same four fields in the output with K > 0
    assert type(out) is decode.GenerateOutput and len(out) == 4
    assert type(greedy) is decode.TopGenerateOutput and greedy._fields[:4] == out._fields
    for name in out._fields:
        np.testing.assert_array_equal(getattr(out, name), getattr(greedy, name))


@pytest.mark.parametrize("k", [-1, 257, 2.0, True, "3", None])
def test_a_bad_k_is_refused_by_name(model, k):
    cfg, params = model  # vocab_size 256: K = 256 is the whole distribution, 257 too many
    with pytest.raises(ValueError, match=r"generate: top_logprobs must be an int in \[0, "
                       r"vocab_size=256\]"):  # fmt: skip
        generate(cfg, params, PROMPTS, max_new_tokens=2, rng=jax.random.PRNGKey(0),
                 top_logprobs=k)  # fmt: skip
    assert decode.checked_top_logprobs(np.int64(256), 256) == 256
