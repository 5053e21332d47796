"""Token samplers for decoding: repetition, frequency and presence penalties, temperature, top-k,
top-p (nucleus) and min-p filtering in HF's order, and the keys that make a sample
reproducible.

`sample_logits` draws one token per row and returns it with the *unmodified* model's logprob
(temperature 1, no filtering) — what PPO/GRPO compare with their own scores (models/decode.py
explains why); `top_tokens`, the k most likely tokens of that same distribution.
Keys: one key for the batch (step i of row b draws from `fold_in(key, i)` at
row b), or one key per row (`prompt_keys`: each prompt's samples follow its own key, whatever
its row or batch mates). `generate` (models/decode.py) calls these inside its compiled loop;
they work on any (B, V) logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def penalized_logits(logits_BV, seen_BV, counts_BV, penalties):
    """float32 logits with the repetition, frequency and presence penalties applied, in vLLM's
    order (and with HF's and OpenAI's definitions):

    * repetition (HF's `repetition_penalty`, CTRL's): the logit of every token in `seen_BV`
      (the row's prompt or generated so far) is divided by r where positive, multiplied by r
      where negative — less likely either way for r > 1;
    * frequency and presence (OpenAI's, over the *generated* tokens only): minus f times the
      number of times the row generated the token (`counts_BV`), minus p once it has.

    `penalties`: (r, f, p) float32 scalars, traced (1, 0, 0 change nothing). Applied to the
    model's logits before temperature and the filters, as HF's logits processors run before
    its warpers."""
    r, f, p = penalties[0], penalties[1], penalties[2]
    x = logits_BV.astype(jnp.float32)
    x = jnp.where(seen_BV, jnp.where(x > 0, x / r, x * r), x)
    return x - f * counts_BV.astype(jnp.float32) - p * (counts_BV > 0).astype(jnp.float32)


def token_presence(tokens_BP, lengths_B, vocab_size: int):
    """(B, V) bool: whether each token id occurs among each row's first `lengths_B` tokens (its
    prompt, right-padded to P)."""
    valid = jnp.arange(tokens_BP.shape[1])[None, :] < lengths_B[:, None]
    empty = jnp.zeros((vocab_size,), jnp.bool_)
    return jax.vmap(lambda t, m: empty.at[t].max(m))(tokens_BP, valid)


def count_tokens(counts_BV, tokens_B, active_B):
    """`counts_BV` plus one at each row's token where `active_B` (a one-hot sum: elementwise
    over (B, V), so rows split over devices stay where they are)."""
    hit = (jnp.arange(counts_BV.shape[1])[None, :] == tokens_B[:, None]) & active_B[:, None]
    return counts_BV + hit.astype(counts_BV.dtype)


def filter_logits(logits_BV, temperature, *, top_k: int = 0, top_p=1.0, use_top_p: bool = False,
                  min_p=0.0, use_min_p: bool = False):  # fmt: skip
    """Temperature-scaled float32 logits with everything outside top-k / the top-p nucleus /
    the min-p set at -inf.

    Order as in HF: temperature, then top-k, then top-p (the nucleus of the top-k renormalised
    distribution: the smallest set of most likely tokens whose mass reaches `top_p`), then min-p
    (tokens whose probability in what is left is below `min_p` times the most likely one's).
    Tokens tied with the last kept one are kept too. `top_k`, `use_top_p` and `use_min_p` are
    static (they pick the code path); `temperature`, `top_p` and `min_p` may be traced.
    """
    x = logits_BV.astype(jnp.float32) / temperature
    if use_min_p:  # p_i >= min_p·p_max  <=>  x_i >= max x + log(min_p); the argmax always stays
        x = _top_filtered(x, top_k, use_top_p, top_p)
        return jnp.where(x < jnp.max(x, axis=-1, keepdims=True) + jnp.log(min_p), -jnp.inf, x)
    return _top_filtered(x, top_k, use_top_p, top_p)


def _top_filtered(x, top_k: int, use_top_p: bool, top_p):
    V = x.shape[-1]
    if not (0 < top_k < V) and not use_top_p:
        return x
    if 0 < top_k < V:
        vals = jax.lax.top_k(x, top_k)[0]  # (B, k) descending
    else:
        vals = -jnp.sort(-x, axis=-1)  # (B, V) descending
    thresh = vals[:, -1]
    if use_top_p:
        probs = _kept_probs(x, vals)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        n_keep = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1), 1)  # (B,)
        thresh = jnp.maximum(thresh, jnp.take_along_axis(vals, n_keep[:, None] - 1, -1)[:, 0])
    return jnp.where(x < thresh[:, None], -jnp.inf, x)


def _kept_probs(x, vals):
    """Probabilities of `vals` (the top values of `x`, descending) in the distribution renormalised
    over every token of `x` at or above the last of them.

    Top-k keeps the tokens tied with the k-th too, so more than k may survive: their mass is in
    the normaliser, or top-p would measure a different distribution than the one sampled. They
    come after the k values in descending order, so the k values' cumulative mass is all top-p
    needs — if the nucleus reaches the k-th, its ties are kept with it. Counting them is one pass
    over the vocab, not the full sort top_k avoids.
    """
    e = jnp.exp(vals - vals[:, :1])  # (B, k)
    z = jnp.sum(e, axis=-1)
    if vals.shape[-1] < x.shape[-1]:  # (a full sort has no tokens beyond its values)
        n_ties = jnp.sum(x >= vals[:, -1:], axis=-1) - vals.shape[-1]  # (B,) beyond the k values
        z = z + n_ties.astype(e.dtype) * e[:, -1]
    return e / z[:, None]


def is_key_batch(rng) -> bool:
    """Whether `rng` is one key per row (a (B, 2) raw uint32 array or (B,) typed keys) rather
    than one key."""
    rng = rng if hasattr(rng, "dtype") else np.asarray(rng)  # arrays and abstract ones alike
    typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    return len(rng.shape) == (1 if typed else 2)


def prompt_keys(rng, ids) -> jax.Array:
    """One key per prompt, `fold_in(rng, id)` for each id in `ids` (e.g. each prompt's index in
    its dataset): pass as `generate(..., rng=...)` so a prompt's sample depends only on its id,
    not on its row or its batch mates."""
    ids = jnp.asarray(np.asarray(ids, np.uint32))
    return jax.vmap(jax.random.fold_in, (None, 0))(rng, ids)


def step_key(rng, i):
    """The key (or per-row keys) for decode step i."""
    if is_key_batch(rng):
        return jax.vmap(jax.random.fold_in, (0, None))(rng, i)
    return jax.random.fold_in(rng, i)


def sample_logits(
    logits_BV,
    key,
    temperature=1.0,
    *,
    top_k: int = 0,
    top_p=1.0,
    greedy: bool = False,
    use_top_p: bool | None = None,
    min_p=0.0,
    use_min_p: bool | None = None,
    choose_from=None,
):
    """Samples one token per row; returns (tokens (B,) int32, model logprobs (B,) float32).

    `key` is one key, or one key per row (see `is_key_batch`).

    `greedy` (static) takes the argmax. The logprob is the unmodified model's (temperature 1, no
    filtering) at the chosen token — see the module docstring. `choose_from`: other (B, V)
    logits to pick the token from (the penalized ones, `penalized_logits`); the logprob is
    still `logits_BV`'s.
    """
    logits = logits_BV.astype(jnp.float32)
    choice = logits if choose_from is None else choose_from.astype(jnp.float32)
    if greedy:
        tok = jnp.argmax(choice, axis=-1)
    else:
        if use_top_p is None:
            use_top_p = float(top_p) < 1.0
        if use_min_p is None:
            use_min_p = float(min_p) > 0.0
        x = filter_logits(choice, temperature, top_k=top_k, top_p=top_p, use_top_p=use_top_p,
                          min_p=min_p, use_min_p=use_min_p)  # fmt: skip
        if is_key_batch(key):  # one key per row: each row's noise from its own key
            tok = jax.vmap(lambda k, row: jax.random.categorical(k, row))(key, x)
        else:
            tok = jax.random.categorical(key, x, axis=-1)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok = tok.astype(jnp.int32)
    return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


def top_tokens(logits_BV, k: int):
    """(ids (B, k) int32, logprobs (B, k) float32): the k most likely tokens of each row and
    their logprobs, descending (ties: the lower id first), in the distribution `sample_logits`
    reports a logprob from — the unmodified model's at temperature 1, whatever the sampler or
    the penalties chose from: what the model considered, not what the sampler allowed
    (OpenAI's and vLLM's `top_logprobs`). `k` static, 1 <= k <= V."""
    logp, ids = jax.lax.top_k(jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1), k)
    return ids.astype(jnp.int32), logp
