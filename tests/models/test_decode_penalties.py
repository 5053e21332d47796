"""Repetition, frequency and presence penalties in KV-cache decoding (`generate`'s
repetition_penalty / frequency_penalty / presence_penalty): greedy and seeded sampling equal a
full-recompute loop that applies the penalties written out here in numpy; the logprobs stay the
unmodified model's; shared prefills (num_samples) and a sharded mesh give the same tokens; bad
values are refused by name."""

import functools

import jax
import numpy as np
import pytest

from flaxlm.models import sampling
from flaxlm.models.config import get_variant
from flaxlm.models.decode import generate
from flaxlm.models.sharding import logical_axis_rules, make_mesh
from flaxlm.models.transformer import forward
from tests.models.test_decode import PROMPTS, random_params

N = 12
T_MAX = 64  # the reference forward's width: prompts (12 at most) + 48 tokens


@pytest.fixture(scope="module")
def model():
    cfg = get_variant("tiny", init_std=0.15)
    return cfg, random_params(cfg)


@functools.lru_cache
def _logits_fn(cfg):
    return jax.jit(lambda p, t: forward(cfg, p, t))


def _penalized(x, seen, counts, r, f, p):
    """The three penalties as HF (repetition) and OpenAI (frequency, presence) define them."""
    x = np.where(seen, np.where(x > 0, x / r, x * r), x)
    return x - f * counts - p * (counts > 0)


def _reference(cfg, params, prompts, n, r, f, p, temperature=0.0, rng=None, exempt=()):
    """(tokens (B, n), model logprobs (B, n)): full forwards over prompt + generated tokens,
    the next token picked from the penalized last logits — by argmax, or with `rng` by
    `sample_logits` with generate's per-step keys; the ids in `exempt` (the stop tokens) keep
    their logits. Rows run on past a stop token (the caller compares up to it)."""
    B, V = len(prompts), cfg.vocab_size
    seqs = [list(q) for q in prompts]
    seen = np.zeros((B, V), bool)
    for b, q in enumerate(prompts):
        seen[b, q] = True
    counts = np.zeros((B, V), np.float32)
    toks, lps = np.zeros((B, n), np.int32), np.zeros((B, n), np.float32)
    for i in range(n):
        grid = np.zeros((B, T_MAX), np.int32)
        for b, s in enumerate(seqs):
            grid[b, : len(s)] = s
        logits = np.asarray(_logits_fn(cfg)(params, grid), np.float32)
        last = np.stack([logits[b, len(s) - 1] for b, s in enumerate(seqs)])
        x = _penalized(last, seen | (counts > 0), counts, r, f, p).astype(np.float32)
        x[:, list(exempt)] = last[:, list(exempt)]
        if temperature == 0:
            tok = x.argmax(-1)
        else:
            tok = np.asarray(sampling.sample_logits(last, sampling.step_key(rng, i), temperature,
                                                    choose_from=x)[0])  # fmt: skip
        shifted = last - last.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))  # log softmax
        for b in range(B):
            toks[b, i], lps[b, i] = tok[b], logp[b, tok[b]]
            counts[b, tok[b]] += 1
            seqs[b].append(int(tok[b]))
    return toks, lps


@pytest.mark.parametrize(
    "r,f,p",
    [(1.6, 0.0, 0.0), (1.0, 0.7, 0.0), (1.0, 0.0, 2.0), (1.3, 0.4, 0.5), (0.7, 0.0, 0.0)],
    ids=["repetition", "frequency", "presence", "all", "repetition_below_1"],
)
def test_greedy_equals_full_recompute_with_the_penalties_written_out(model, r, f, p):
    cfg, params = model
    # 40 tokens: greedy rows repeat by then (the next test), so the counts matter
    out = generate(cfg, params, PROMPTS, max_new_tokens=40, rng=jax.random.PRNGKey(0),
                   temperature=0.0, repetition_penalty=r, frequency_penalty=f,
                   presence_penalty=p)  # fmt: skip
    ref_toks, ref_lps = _reference(cfg, params, PROMPTS, 40, r, f, p)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref_toks)
    # The logprobs are the unmodified model's at the chosen tokens.
    np.testing.assert_allclose(np.asarray(out.logprobs), ref_lps, atol=2e-4)


def test_the_penalties_change_what_greedy_decoding_repeats(model):
    """Without penalties this model's greedy rows repeat tokens; a large presence or
    frequency penalty leaves each row's generated tokens all distinct (the same tokens: once a
    token is generated, either penalty takes it out of reach)."""
    cfg, params = model
    kw = dict(max_new_tokens=48, rng=jax.random.PRNGKey(0), temperature=0.0)
    plain = np.asarray(generate(cfg, params, PROMPTS, **kw).tokens)
    assert all(len(set(row)) < 48 for row in plain.tolist())
    distinct = np.asarray(generate(cfg, params, PROMPTS, presence_penalty=1e4, **kw).tokens)
    assert all(len(set(row)) == 48 for row in distinct.tolist())
    freq = np.asarray(generate(cfg, params, PROMPTS, frequency_penalty=1e4, **kw).tokens)
    np.testing.assert_array_equal(freq, distinct)


def test_seeded_sampling_equals_the_reference_and_is_reproducible(model):
    cfg, params = model
    key = jax.random.PRNGKey(3)
    kw = dict(max_new_tokens=20, rng=key, temperature=0.9, repetition_penalty=2.0,
              frequency_penalty=1.0, presence_penalty=1.0)  # fmt: skip
    a = generate(cfg, params, PROMPTS, **kw)
    b = generate(cfg, params, PROMPTS, **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    # generate pads the batch up to MIN_ROWS with copies of row 0; a row's noise is its row's
    rows = PROMPTS + [PROMPTS[0]] * (max(8, len(PROMPTS)) - len(PROMPTS))
    ref, _ = _reference(cfg, params, rows, 20, 2.0, 1.0, 1.0, temperature=0.9, rng=key)
    np.testing.assert_array_equal(np.asarray(a.tokens), ref[: len(PROMPTS)])
    plain = generate(cfg, params, PROMPTS, max_new_tokens=20, rng=key, temperature=0.9)
    assert not np.array_equal(np.asarray(plain.tokens), np.asarray(a.tokens))


def test_shared_prefill_samples_count_their_own_tokens(model):
    """num_samples=G copies each prompt's presence to its G rows; each row then counts only
    what it generated: the same samples as the prompts repeated."""
    cfg, params = model
    G, key = 3, jax.random.PRNGKey(5)
    kw = dict(max_new_tokens=N, rng=key, temperature=1.0, repetition_penalty=1.5,
              presence_penalty=0.8)  # fmt: skip
    shared = generate(cfg, params, PROMPTS, num_samples=G, **kw)
    repeated = generate(cfg, params, [q for q in PROMPTS for _ in range(G)], **kw)
    np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(repeated.tokens))
    assert len({tuple(r) for r in np.asarray(shared.tokens)[:G].tolist()}) > 1


def test_a_sharded_mesh_decodes_alike(model):
    cfg, params = model
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})  # logits split over the vocab too
    kw = dict(max_new_tokens=N, rng=jax.random.PRNGKey(1), temperature=0.0,
              repetition_penalty=1.5, frequency_penalty=0.5)  # fmt: skip
    one = generate(cfg, params, PROMPTS, **kw)
    eight = generate(cfg, params, PROMPTS, mesh=mesh, rules=logical_axis_rules("fsdp_tp"), **kw)
    np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(eight.tokens))


def test_stop_tokens_are_never_penalized(model):
    """A stop token in the prompt (a chat template's end-of-turn) keeps its logit: rows end
    where a reference that exempts it from the penalties ends them — under a repetition
    penalty of 1e4, which puts a penalized prompt token out of reach (the reference that
    penalizes it too goes on otherwise)."""
    cfg, params = model
    r, f, n = 1e4, 0.5, 12
    for stop in sorted({t for q in PROMPTS for t in q}):  # a prompt token the exemption ends at
        ref, _ = _reference(cfg, params, PROMPTS, n, r, f, 0.0, exempt=[stop])
        if (ref == stop).any():
            break
    else:
        pytest.fail("no prompt token ends a row: pick other prompts")
    penalized, _ = _reference(cfg, params, PROMPTS, n, r, f, 0.0)
    assert not (penalized == stop).any()
    out = generate(cfg, params, PROMPTS, max_new_tokens=n, rng=jax.random.PRNGKey(1),
                   temperature=0.0, stop_tokens=[stop], repetition_penalty=r,
                   frequency_penalty=f)  # fmt: skip
    for b in range(len(PROMPTS)):
        row, got = ref[b].tolist(), int(out.lengths[b])
        assert got == (row.index(stop) + 1 if stop in row else n)
        np.testing.assert_array_equal(np.asarray(out.tokens)[b, :got], ref[b, :got])


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"frequency_penalty": float("inf")}, "frequency_penalty"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
    ],
)
def test_bad_penalties_are_refused_by_name(model, kw, name):
    cfg, params = model
    with pytest.raises(ValueError, match=name):
        generate(cfg, params, PROMPTS, max_new_tokens=2, rng=jax.random.PRNGKey(0), **kw)
