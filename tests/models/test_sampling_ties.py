"""`filter_logits` with tied logits (frequent with bf16 logits): top-k keeps every token tied with
the k-th, and top-p then measures the nucleus of that same renormalised set — checked against a
numpy reference of the documented semantics on random cases with forced ties; and the cut-offs
themselves, on dyadic probabilities exact in float32 (where the random cases skip rows)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.models.sampling import filter_logits

# Rows where a mass or probability lies this close to its cut-off are skipped: float32 (jax)
# and float64 (reference) may fairly fall on different sides there.
_MARGIN = 1e-5


def _reference(logits, T, k, p, m):
    """(kept mask, ambiguous rows): temperature, top-k (ties with the k-th kept), top-p over the
    renormalised top-k distribution (smallest most-likely prefix whose mass reaches p, ties with
    its last token kept), min-p (p_i >= m·p_max of what is left)."""
    x = (logits.astype(np.float32) / np.float32(T)).astype(np.float64)  # the same ties as jax
    keep = np.ones_like(x, bool)
    ambiguous = np.zeros(len(x), bool)
    if k:
        keep &= x >= np.sort(x, -1)[:, -k][:, None]
    for b in range(len(x)):
        if p < 1:
            vals = np.sort(x[b][keep[b]])[::-1]
            q = np.exp(vals - vals[0])
            q /= q.sum()
            before = np.cumsum(q) - q
            ambiguous[b] |= np.abs(before - p).min() < _MARGIN
            n = max(int(np.sum(before < p)), 1)
            keep[b] &= x[b] >= vals[n - 1]
        if m > 0:
            q = np.where(keep[b], np.exp(x[b] - x[b][keep[b]].max()), 0.0)
            q /= q.sum()
            ambiguous[b] |= np.abs(q - m * q.max())[keep[b]].min() < _MARGIN
            keep[b] &= q >= m * q.max()
    return keep, ambiguous


def test_top_p_after_top_k_counts_tokens_tied_with_the_kth():
    """The reviewer's case: top-k=2 keeps (2, 1, 1) (probs .576/.212/.212); the mass before the
    second token is .576 < .6, so the nucleus reaches it and, tied, the third too."""
    x = filter_logits(jnp.asarray([[2.0, 1.0, 1.0, 0.0]]), 1.0, top_k=2, top_p=0.6, use_top_p=True)
    np.testing.assert_array_equal(np.isfinite(np.asarray(x)), [[True, True, True, False]])
    # and a nucleus of the k-th tied tokens' mass alone: k=1 keeps both 1.0s (0.5 each)
    x = filter_logits(jnp.asarray([[0.0, 1.0, 1.0, 0.5]]), 1.0, top_k=1, top_p=0.4, use_top_p=True)
    np.testing.assert_array_equal(np.isfinite(np.asarray(x)), [[False, True, True, False]])


def test_filter_logits_matches_reference_with_ties():
    """Random logits on a coarse grid (many ties, at the k-th place too) and bf16-rounded ones,
    over temperatures, top-k, top-p and min-p, against `_reference`."""
    rng = np.random.default_rng(0)
    B, V = 64, 24
    coarse = np.round(rng.normal(0, 1.5, (B, V)) * 2) / 2  # ties everywhere
    bf16 = np.asarray(jnp.asarray(rng.normal(0, 3, (B, V)), jnp.bfloat16).astype(jnp.float32))
    logits = np.concatenate([coarse, bf16]).astype(np.float32)
    fns = {}  # one compile per static (top_k, use_top_p, use_min_p)
    checked = total = 0
    for T, k, p, m in itertools.product([0.7, 1.0], [0, 1, 3, 6], [1.0, 0.3, 0.6, 0.9], [0.0, 0.2]):
        if not k and p == 1 and not m:
            continue
        static = (k, p < 1, m > 0)
        if static not in fns:
            fns[static] = jax.jit(
                lambda x, T, p, m, s=static: filter_logits(
                    x, T, top_k=s[0], top_p=p, use_top_p=s[1], min_p=m, use_min_p=s[2]
                )
            )
        got = np.isfinite(np.asarray(fns[static](logits, T, p, m)))
        want, ambiguous = _reference(logits, T, k, p, m)
        np.testing.assert_array_equal(got[~ambiguous], want[~ambiguous], err_msg=str((T, k, p, m)))
        checked, total = checked + int((~ambiguous).sum()), total + len(logits)
    assert checked > 0.95 * total  # few rows skipped as too close to call


# probabilities .5 / .25 / .125 / .125, exact in float32 (and so are their partial sums)
_DYADIC = [[0.0, -np.log(2), -2 * np.log(2), -2 * np.log(2)]]


def test_top_p_stops_at_the_first_token_whose_mass_reaches_p_exactly():
    """Top-p keeps the smallest most-likely prefix whose mass reaches p (HF's TopPLogitsWarper):
    a token is kept iff the mass before it is *below* p. With masses before of 0, .5, .75, .875,
    p = .5 is reached by token 0 alone and p = .75 by {0, 1}; a prefix one token longer (mass
    before == p counted as not yet reached) samples tokens outside the nucleus. The random
    reference test skips rows this close to p, so only exact masses pin the comparison."""
    x = jnp.asarray(_DYADIC, jnp.float32)
    jitted = jax.jit(lambda x, p: filter_logits(x, 1.0, top_p=p, use_top_p=True))
    for p, want in [
        (0.5, [True, False, False, False]),
        (0.75, [True, True, False, False]),
        (0.5001, [True, True, False, False]),  # just past .5: token 1 needed
        (0.875, [True, True, True, True]),  # token 2 reaches it; token 3 is its tie
    ]:
        for got in (filter_logits(x, 1.0, top_p=p, use_top_p=True), jitted(x, p)):
            np.testing.assert_array_equal(np.isfinite(np.asarray(got)), [want], err_msg=str(p))


def test_min_p_keeps_a_token_at_exactly_min_p_times_the_top_probability():
    """Min-p removes only tokens with p_i < min_p·p_max (HF's MinPLogitsWarper), so a token at
    exactly half the top probability survives min_p = .5 — here as logit log(.5) in float32,
    which is also the float32 log(min_p) the cut-off adds: x_i == max + log(min_p) is kept.
    Just above .5 it goes."""
    x = jnp.asarray([[0.0, np.log(0.5)]], jnp.float32)
    jitted = jax.jit(lambda x, m: filter_logits(x, 1.0, min_p=m, use_min_p=True))
    for m, want in [(0.5, [True, True]), (0.5000001, [True, False])]:
        for got in (filter_logits(x, 1.0, min_p=m, use_min_p=True), jitted(x, m)):
            np.testing.assert_array_equal(np.isfinite(np.asarray(got)), [want], err_msg=str(m))
