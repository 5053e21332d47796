"""Speculative decoding (models/speculative.py): greedy equals `generate`'s greedy tokens and
logprobs (stops, sliding windows, other vocab paddings, a mesh); a draft equal to the target is
always accepted; sampled tokens follow the target's distribution, not the draft's (exact
marginals by enumeration over a 16-token vocabulary); per-prompt keys; prompt lookup (n-gram
drafts from the row's own tokens); bad input."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.models.config import get_variant
from flaxlm.models.decode import generate
from flaxlm.models.sampling import filter_logits, prompt_keys
from flaxlm.models.sharding import make_mesh
from flaxlm.models.speculative import lookup_drafts, prompt_lookup_generate, speculative_generate
from flaxlm.models.transformer import forward, stack_layers
from tests.models.test_decode import PROMPTS, random_params

N = 10
KEY = jax.random.PRNGKey(0)


@pytest.fixture(scope="module")
def target():
    cfg = get_variant("tiny", init_std=0.15)
    return cfg, random_params(cfg)


def _near_draft(cfg, params, mix: float, seed: int = 1, **kw):
    """A draft of the target's shape whose weights are the target's moved `mix` of the way to
    other random ones: it agrees with the target often, not always."""
    dcfg = cfg.replace(**kw)
    other = random_params(dcfg, seed=seed)
    if kw:
        return dcfg, other
    return dcfg, jax.tree.map(lambda a, b: a + mix * (b - a), params, other)


def _greedy(cfg, params, **kw):
    out = generate(cfg, params, PROMPTS, max_new_tokens=N, rng=KEY, temperature=0, **kw)
    return jax.device_get(out)


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_equals_generate(target, k):
    """Tokens, target logprobs, mask and lengths as greedy `generate` (a draft that agrees
    sometimes: both the accept and the reject paths run, with rows at different lengths)."""
    cfg, params = target
    dcfg, dparams = _near_draft(cfg, params, 0.1)
    ref = _greedy(cfg, params)
    out = jax.device_get(speculative_generate(cfg, params, dcfg, dparams, PROMPTS,
                                              max_new_tokens=N, rng=KEY, temperature=0,
                                              draft_tokens=k))  # fmt: skip
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
    np.testing.assert_array_equal(out.mask, ref.mask)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    assert 0 < out.accepted.sum() < out.iterations.sum() * k  # some kept, some rejected
    assert 0 < out.rejected.sum() <= out.iterations.sum()
    assert len(set(out.iterations.tolist())) > 1 or len(set(out.accepted.tolist())) > 1


def test_self_draft_accepts_everything(target):
    """Draft = target: every draft kept, (N − 1) / (k + 1) target forwards per row."""
    cfg, params = target
    out = speculative_generate(cfg, params, cfg, params, PROMPTS, max_new_tokens=N, rng=KEY,
                               temperature=0, draft_tokens=3)  # fmt: skip
    # 1 (prefill) + 4 + 4 + 4 ≥ 10: the third iteration's tokens are cut to the 1 left of N
    np.testing.assert_array_equal(out.iterations, [3, 3, 3])
    np.testing.assert_array_equal(out.accepted, [9, 9, 9])
    np.testing.assert_array_equal(out.tokens, _greedy(cfg, params).tokens)
    assert out.acceptance_rate(3) == 1.0 and out.tokens_per_iteration() == 3.0
    assert out.alpha() == 1.0 and int(out.rejected.sum()) == 0


def test_stop_tokens_inside_a_chunk(target):
    """A stop token among accepted drafts ends the row there (kept, counted), padded after,
    exactly as `generate` does. (The target's layers scanned, the draft's unrolled; the stop
    ids a numpy array.)"""
    cfg, params = target
    free = _greedy(cfg, params).tokens
    stop = int(free[1, 4])  # row 1 stops at its 5th token (or earlier if it repeats)
    ref = _greedy(cfg, params, stop_tokens=(stop,), pad_id=-1)
    scanned = cfg.replace(scan_layers=True), stack_layers(params, cfg.n_layers)
    out = jax.device_get(speculative_generate(*scanned, cfg, params, PROMPTS,
                                              max_new_tokens=N, rng=KEY, temperature=0,
                                              draft_tokens=3, stop_tokens=np.asarray([stop]),
                                              pad_id=-1))  # fmt: skip
    assert ref.lengths[1] <= 5
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_array_equal(out.mask, ref.mask)
    # a row's counts stop with it: no more than k kept drafts per iteration it took part in
    assert out.iterations[1] < out.iterations.max()
    assert np.all(out.accepted <= 3 * out.iterations), (out.accepted, out.iterations)


def test_sliding_window_target_larger_draft_vocab(target):
    """A sliding-window target (its masks by position over a per-row cache index), and a draft
    whose vocabulary is padded larger than the target's 256 (its logits cut)."""
    cfg = get_variant("tiny", init_std=0.15, sliding_window=5)
    params = random_params(cfg)
    ref = _greedy(cfg, params, window_cache=False)
    dcfg, dparams = _near_draft(cfg, params, 0.0, n_layers=1, vocab_size=320)
    out = speculative_generate(cfg, params, dcfg, dparams, PROMPTS, max_new_tokens=N, rng=KEY,
                               temperature=0, draft_tokens=2)  # fmt: skip
    np.testing.assert_array_equal(out.tokens, ref.tokens)


def test_smaller_draft_vocab_under_a_mesh(target):
    """A draft whose vocabulary is padded smaller than the target's 256 (its logits padded with
    -inf; the prompts' largest id is 200), the rows split over 8 devices (3 prompts padded to 8
    rows): still greedy `generate`'s tokens."""
    cfg, params = target
    dcfg, dparams = _near_draft(cfg, params, 0.0, vocab_size=224, n_layers=1)
    out = speculative_generate(
        cfg,
        params,
        dcfg,
        dparams,
        PROMPTS,
        max_new_tokens=N,
        rng=KEY,
        temperature=0,
        draft_tokens=3,
        mesh=make_mesh({"data": 8}),
    )
    np.testing.assert_array_equal(out.tokens, _greedy(cfg, params).tokens)


# ----------------------------------------------------------------------------------------------
# Sampling: the target's distribution

V = 16
PROMPT = [1, 5, 9]


_forward = jax.jit(forward, static_argnums=0)  # one compile per prefix length, not per op


def _exact_marginals(cfg, params, positions, temperature, top_k):
    """P(token at generated position j = t) for j < positions, by enumerating every prefix."""
    prefixes, margs = {(): 1.0}, []
    for _ in range(positions):
        seqs = list(prefixes)
        logits = _forward(cfg, params, jnp.asarray([PROMPT + list(s) for s in seqs]))[:, -1]
        probs = np.asarray(jax.nn.softmax(filter_logits(logits, temperature, top_k=top_k), -1),
                           np.float64)  # fmt: skip
        m, nxt = np.zeros(V), {}
        for s, row in zip(seqs, probs):
            for t in np.flatnonzero(row > 1e-7):
                nxt[(*s, int(t))] = prefixes[s] * row[t]
                m[t] += prefixes[s] * row[t]
        prefixes = nxt
        margs.append(m)
    return margs


@pytest.mark.parametrize("temperature,top_k,k,lookup", [(1.0, 0, 2, False), (0.8, 6, 3, False),
                                                        (1.0, 0, 3, True)])  # fmt: skip
def test_samples_follow_the_target(temperature, top_k, k, lookup):
    """4096 samples of one prompt: each of the first three tokens' frequencies are within
    sampling noise of the target's exact marginals (total variation < 0.04; measured
    0.006–0.02) and, with a draft model, far from the draft's (> 0.1) — a decision that kept
    drafts too often would land near the draft. Prompt lookup's drafts are deterministic
    (q one-hot: kept with probability p(d), else a draw from p without d)."""
    cfg = get_variant("tiny", init_std=0.3, vocab_size=V)
    params = random_params(cfg)
    dcfg, dparams = (None, None) if lookup else _near_draft(cfg, params, 0.25)
    R = 4096
    out = speculative_generate(cfg, params, dcfg, dparams, [PROMPT] * R, max_new_tokens=4,
                               rng=jax.random.PRNGKey(3), temperature=temperature,
                               top_k=top_k, draft_tokens=k, ngram=1)  # fmt: skip
    # the accept and residual paths both matter (lookup's 1-gram guesses are poor here: its
    # one-hot decision is also checked exactly, test_accept_drafts_keeps_the_target_distribution)
    assert (0.02 if lookup else 0.1) < out.alpha() < 0.9, out.alpha()
    toks = np.asarray(out.tokens)
    # logprobs are the unmodified model's at temperature 1, whatever the sampler (token 0's
    # from the prefill too)
    lp = np.asarray(jax.nn.log_softmax(_forward(cfg, params, jnp.asarray([PROMPT]))[0, -1]))
    np.testing.assert_allclose(np.asarray(out.logprobs)[:, 0], lp[toks[:, 0]], atol=1e-5)
    want = _exact_marginals(cfg, params, 3, temperature, top_k)
    draft = None if lookup else _exact_marginals(dcfg, dparams, 3, temperature, top_k)
    for j in range(1, 3):  # token 0 comes from the target's prefill; 1 and 2 speculatively
        emp = np.bincount(toks[:, j], minlength=V) / R
        tv = 0.5 * np.abs(emp - want[j]).sum()
        assert tv < 0.04, (j, tv)
        if draft is not None:
            assert 0.5 * np.abs(emp - draft[j]).sum() > 0.1
        if top_k:  # a token outside the target's top-k after every prefix never appears
            assert emp[want[j] == 0].sum() == 0


@pytest.mark.parametrize("one_hot", [False, True])
def test_accept_drafts_keeps_the_target_distribution(one_hot):
    """One draft per row (k = 1): the first committed token — the draft if kept, else the
    residual's draw — is distributed as p, whether the draft was drawn from q or is a fixed
    guess (q one-hot; a likely and an unlikely guess). 40000 rows: TV < 0.01."""
    from flaxlm.models.speculative import accept_drafts

    R, p = 40000, np.asarray([0.5, 0.2, 0.15, 0.1, 0.05], np.float32)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    P = jnp.broadcast_to(p, (R, 1, 5))
    if one_hot:
        drafts, q = jnp.where(jnp.arange(R) % 2 == 0, 0, 4)[:, None], None
    else:
        qv = jnp.asarray([0.1, 0.1, 0.2, 0.3, 0.3])
        drafts = jax.random.categorical(k1, jnp.log(qv), shape=(R,))[:, None]
        q = jnp.broadcast_to(qv, (R, 1, 5))
    u = jax.random.uniform(k2, (R, 1))
    a, nxt = accept_drafts(P, q, drafts.astype(jnp.int32), P[:, 0], u, k3, greedy=False)
    first = np.asarray(jnp.where(a == 1, drafts[:, 0], nxt))
    emp = np.bincount(first, minlength=5) / R
    assert 0.5 * np.abs(emp - p).sum() < 0.01, emp


def test_no_residual_mass_falls_back_on_p_and_a_smaller_draft_vocab_proposes_none_past_it():
    """p == q leaves max(0, p - q) no mass: a rejection there (forced here by u = 1) draws
    from p itself, never from an empty residual (token 0, which p does not allow). A draft's
    logits over a smaller vocabulary are padded with -inf to the target's V: it proposes no id
    past its own; over a larger one they are cut."""
    from flaxlm.models.speculative import _to_vocab, accept_drafts

    p = jnp.asarray([[[0.0, 0.25, 0.75]]])
    for seed in range(3):
        a, nxt = accept_drafts(p, p, jnp.ones((1, 1), jnp.int32), p[:, 0], jnp.ones((1, 1)),
                               jax.random.PRNGKey(seed), greedy=False)  # fmt: skip
        assert int(a[0]) == 0 and int(nxt[0]) in (1, 2)
    logits = jnp.asarray([[0.5, -1.0, 2.0]])
    padded = _to_vocab(logits, 5)
    np.testing.assert_array_equal(padded[:, :3], logits)
    np.testing.assert_allclose(jax.nn.softmax(padded)[:, 3:], 0.0)
    np.testing.assert_array_equal(_to_vocab(logits, 2), logits[:, :2])


@pytest.mark.parametrize("one_hot", [False, True])
def test_a_draft_the_target_never_draws_is_rejected_at_u_zero(one_hot):
    """A draft is kept iff u < p/q: with p(d) = 0 never, also when the uniform is exactly 0
    (u is drawn from [0, 1)). `u·q <= p` used to keep it there; the token is then the
    residual's draw, here the only token p allows."""
    from flaxlm.models.speculative import accept_drafts

    p = jnp.asarray([[[0.0, 1.0, 0.0]]])  # (B, k, V) = (1, 1, 3): the target never draws 0
    q = None if one_hot else jnp.asarray([[[0.9, 0.05, 0.05]]])
    drafts = jnp.zeros((1, 1), jnp.int32)
    a, nxt = accept_drafts(p, q, drafts, p[:, 0], jnp.zeros((1, 1)), KEY, greedy=False)
    assert int(a[0]) == 0 and int(nxt[0]) == 1
    # ...and a draft p allows is still kept at u = 0
    a, _ = accept_drafts(p, q, drafts + 1, p[:, 0], jnp.zeros((1, 1)), KEY, greedy=False)
    assert int(a[0]) == 1


def test_past_max_seq_len_warns_as_generate_does(target, monkeypatch):
    """A prompt plus max_new_tokens past cfg.max_seq_len warns, as `generate` does (the shared
    `decode.warn_past_max_seq_len`; speculative decoding used to run silently); within it,
    nothing."""
    from flaxlm.models import speculative

    cfg, params = target

    class Built(Exception):  # the warning comes before the program; no need to compile it
        pass

    def spy(*a):
        raise Built

    monkeypatch.setattr(speculative, "_speculative_fn", spy)
    short = cfg.replace(max_seq_len=16)
    with pytest.warns(UserWarning, match=r"speculative_generate: prompt 2 \(12 tokens\).*"
                                         r"past the model's max_seq_len=16"):  # fmt: skip
        with pytest.raises(Built):
            speculative_generate(short, params, short, params, PROMPTS, max_new_tokens=5,
                                 rng=KEY)  # fmt: skip
    with pytest.warns(UserWarning, match="past the model's max_seq_len"), pytest.raises(Built):
        prompt_lookup_generate(short, params, PROMPTS, max_new_tokens=5, rng=KEY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Built):  # 12 + 4 tokens: positions up to 15
            speculative_generate(short, params, short, params, PROMPTS, max_new_tokens=4,
                                 rng=KEY)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Prompt lookup


def test_lookup_drafts_take_the_longest_latest_match():
    seq = jnp.asarray([[1, 2, 3, 9, 3, 7, 2, 3, 0, 0]])  # the last token at slot 7
    last = jnp.asarray([7])
    # 1-gram "3": latest earlier at slot 4 → 7, 2, 3; 2-gram "2 3": slots 1-2 → 9, 3, 7
    np.testing.assert_array_equal(lookup_drafts(seq, last, 3, 1), [[7, 2, 3]])
    np.testing.assert_array_equal(lookup_drafts(seq, last, 3, 2), [[9, 3, 7]])
    np.testing.assert_array_equal(lookup_drafts(seq, last, 3, 3), [[9, 3, 7]])  # no 3-gram
    # a match near the end proposes up to the last token, clipped; no match: the last again
    np.testing.assert_array_equal(lookup_drafts(seq, jnp.asarray([4]), 3, 1), [[9, 3, 3]])
    np.testing.assert_array_equal(lookup_drafts(seq, jnp.asarray([2]), 2, 2), [[3, 3]])


def test_prompt_lookup_greedy_equals_generate(target):
    """Greedy prompt lookup gives greedy `generate`'s tokens and logprobs; a row that falls
    into a loop (row 0 of this random model) has its drafts accepted."""
    cfg, params = target
    kw = dict(max_new_tokens=24, rng=KEY, temperature=0)
    ref = jax.device_get(generate(cfg, params, PROMPTS, **kw))
    out = jax.device_get(prompt_lookup_generate(cfg, params, PROMPTS, draft_tokens=4, **kw))
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
    assert out.accepted[0] >= 4 and out.iterations[0] < 23


def test_longrope_chunks_rotate_as_plain_decoding():
    """LongRoPE past an original context of 12: a verified chunk of drafts used to take the
    short or long factors by the largest position in the whole batch's chunks (and the
    prefill by its padded bucket), so rows near the original context were rotated unlike
    `generate`'s one-token steps; each token now takes the factors of its own position."""
    from tests.models.test_decode import _longrope_model

    cfg, params = _longrope_model()
    prompts = PROMPTS[:2]  # 3 and 7 tokens (an 8-slot bucket): they cross 12 while decoding
    kw = dict(max_new_tokens=N, rng=KEY, temperature=0)
    ref = jax.device_get(generate(cfg, params, prompts, **kw))
    out = jax.device_get(prompt_lookup_generate(cfg, params, prompts, draft_tokens=4, **kw))
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)


def test_prompt_keys_make_samples_independent_of_batch_mates(target):
    """Per-prompt keys: a prompt's sample follows its key, whatever its row; one key per call
    reproduces."""
    cfg, params = target
    dcfg, dparams = _near_draft(cfg, params, 0.1)
    kw = dict(max_new_tokens=N, temperature=1.0, draft_tokens=2)
    keys = prompt_keys(KEY, [0, 1, 2])
    fwd = speculative_generate(cfg, params, dcfg, dparams, PROMPTS, rng=keys, **kw)
    rev = speculative_generate(cfg, params, dcfg, dparams, PROMPTS[::-1], rng=keys[::-1], **kw)
    np.testing.assert_array_equal(fwd.tokens, rev.tokens[::-1])
    assert fwd.accepted.sum() > 0
    again = speculative_generate(cfg, params, dcfg, dparams, PROMPTS, rng=keys, **kw)
    np.testing.assert_array_equal(fwd.tokens, again.tokens)


def test_bad_input(target):
    cfg, params = target
    small = cfg.replace(vocab_size=128)
    with pytest.raises(ValueError, match="draft_tokens"):
        speculative_generate(cfg, params, cfg, params, PROMPTS, max_new_tokens=4, rng=KEY,
                             draft_tokens=0)  # fmt: skip
    with pytest.raises(ValueError, match="or neither"):
        speculative_generate(cfg, params, cfg, None, PROMPTS, max_new_tokens=4, rng=KEY)
    with pytest.raises(ValueError, match="ngram must be"):
        prompt_lookup_generate(cfg, params, PROMPTS, max_new_tokens=4, rng=KEY, ngram=0)
    for temperature in (float("nan"), float("inf")):  # (NaN used to decode token 0s)
        with pytest.raises(ValueError, match="need a finite temperature >= 0"):
            prompt_lookup_generate(cfg, params, PROMPTS, max_new_tokens=4, rng=KEY,
                                   temperature=temperature)  # fmt: skip
    with pytest.raises(ValueError, match="draft's vocab"):
        speculative_generate(cfg, params, small, random_params(small), PROMPTS,
                             max_new_tokens=4, rng=KEY)  # fmt: skip


@pytest.mark.parametrize("lookup", [False, True])
def test_one_new_token_is_the_prefills_and_equals_generate(target, lookup):
    """max_new_tokens=1: the prefill's token alone, no draft iteration (the loop starts at
    token 1), greedy and sampled, as `generate` gives it."""
    cfg, params = target
    dcfg, dparams = _near_draft(cfg, params, 0.1)
    for temperature in (0.0, 0.8):
        want = jax.device_get(generate(cfg, params, PROMPTS, max_new_tokens=1, rng=KEY,
                                       temperature=temperature))  # fmt: skip
        if lookup:
            out = prompt_lookup_generate(cfg, params, PROMPTS, max_new_tokens=1, rng=KEY,
                                         temperature=temperature, draft_tokens=3)  # fmt: skip
        else:
            out = speculative_generate(cfg, params, dcfg, dparams, PROMPTS, rng=KEY,
                                       max_new_tokens=1, temperature=temperature,
                                       draft_tokens=3)  # fmt: skip
        out = jax.device_get(out)
        np.testing.assert_array_equal(out.tokens, want.tokens)
        np.testing.assert_allclose(out.logprobs, want.logprobs, atol=1e-5)
        np.testing.assert_array_equal(out.lengths, [1, 1, 1])
        np.testing.assert_array_equal(out.iterations, [0, 0, 0])
