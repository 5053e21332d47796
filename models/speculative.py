"""Speculative decoding: a small draft model proposes k tokens, the target model checks them in
one forward, and every accepted token saves a target step (Leviathan et al. 2023, Chen et al.
2023). Or, without a draft model, prompt lookup: the drafts are the tokens that followed the
row's last n-gram where it occurred before in its prompt or output (`prompt_lookup_generate`).

    out = speculative_generate(cfg, params, draft_cfg, draft_params, prompts,
                               max_new_tokens=128, rng=key, draft_tokens=4, temperature=0.7)
    out.tokens, out.logprobs, out.mask, out.lengths   # as models/decode.generate returns
    out.iterations (B,)  target forwards per row · out.accepted (B,)  draft tokens kept
    out.alpha()  the draft's per-token acceptance probability (estimated)

Why: a decode step of a big model at small batch reads every weight once per token (memory
bound, models/decode.py); a verification forward over k + 1 tokens reads them once too, so it
costs about one step and yields between 1 and k + 1 tokens. A distilled student of the target
(alignment/distill.py) is a natural draft.

The output follows the target's distribution exactly — the same sampler options as `generate`
(temperature, top-k, top-p, min-p, applied to both models) — by speculative sampling: draft
token d_i (drawn from the draft's filtered distribution q_i) is kept with probability
min(1, p_i(d_i) / q_i(d_i)) under the target's filtered p_i; at the first rejection the token is
drawn from norm(max(0, p_i − q_i)), and when all k are kept one more comes from the target's
next distribution. Greedy (temperature 0) keeps drafts while they equal the target's argmax and
then takes the target's argmax: the tokens greedy `generate` gives, up to float rounding (the
verification forward's logits are a k + 1-token chunk's, not a one-token step's; a mixture of
experts runs dropless in both, models/decode.py "Mixtures of experts"). The
samples are not `generate`'s for the same key (other random draws), only their distribution.
`logprobs` are the target's own at temperature 1, as `generate` returns them.

Layout. Both models keep full KV caches (no ring caches) with one write index PER ROW: rows
accept different numbers of drafts, so after a few iterations they stand at different lengths.
Row b's generated token j sits at cache slot len_b + j (its prompt at 0 … len_b − 1, right
padding after it in the prompt bucket is overwritten by the first tokens and otherwise keeps
segment id 0), so a slot is a position. The target's cache is valid below the slot of the last
token committed, f; an iteration feeds [that token, d_1 … d_k] at slots f … f + k. Rejected
drafts' slots lie at or after the new f and are rewritten by the next iteration before anything
reads them (the mask is causal by slot). The draft's cache may lack the key of the last
accepted draft (it proposed d_k but never fed it), so each iteration's first draft step feeds
the two last committed tokens, slots f − 1 and f. Rows that are done (a stop token, or
`max_new_tokens`) keep running as no-ops until every row is: one compiled `while_loop`, no host
round trip per token.

Vocabularies: the draft needs the target's tokenizer; its vocabulary may be padded to another
size (its logits are cut or padded with -inf to the target's). Every (target config, draft
config, batch, prompt bucket, max_new_tokens, k, sampler kind, mesh) compiles one program.
Under a mesh the rows are split over data×fsdp as in `generate`; several processes pass the
whole batch each and get the whole output. The caches' slot axis is whole on every device,
not split over `context` as `generate`'s (models/attention_cache.py `write_cache_rows`: XLA
wrote per-row slots of a split one wrong).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.models import decode, quant
from flaxlm.models.attention import write_rows
from flaxlm.models.config import ModelConfig
from flaxlm.models.sampling import filter_logits, is_key_batch, step_key
from flaxlm.models.sharding import (
    batch_divisor,
)
from flaxlm.models.transformer import Transformer, init_cache


class SpeculativeOutput(NamedTuple):
    """`generate`'s four fields (models/decode.GenerateOutput) and what the speculation did."""

    tokens: jax.Array  # (B, N) int32; pad_id after the stop token / end
    logprobs: jax.Array  # (B, N) float32 target log p(token) at temperature 1; 0 where masked
    mask: jax.Array  # (B, N) float32
    lengths: jax.Array  # (B,) int32
    iterations: jax.Array  # (B,) int32 target verification forwards the row took
    # (B,) int32 drafts the verification kept (those past a stop token or N included: a
    # measure of the draft, not of the output)
    accepted: jax.Array
    rejected: jax.Array  # (B,) int32 iterations that ended at a rejected draft (not all kept)

    def acceptance_rate(self, draft_tokens: int) -> float:
        """Kept drafts / proposed drafts over the batch (host float). Depends on k: the
        drafts after a rejected one are proposed but never judged."""
        it, acc = jax.device_get((self.iterations, self.accepted))
        return float(acc.sum() / max(1, it.sum() * draft_tokens))

    def alpha(self) -> float:
        """The probability that a judged draft is kept, kept / (kept + rejected) — the α of
        E(α, k) = (1 − α^(k+1)) / (1 − α) tokens per iteration if drafts are kept
        independently (Leviathan et al. 2023): comparable across k."""
        acc, rej = jax.device_get((self.accepted, self.rejected))
        return float(acc.sum() / max(1, acc.sum() + rej.sum()))

    def tokens_per_iteration(self) -> float:
        """Generated tokens per target forward (the prefill's first token excluded)."""
        it, n = jax.device_get((self.iterations, self.lengths))
        return float((n - 1).sum() / max(1, it.sum()))


def _to_vocab(logits, V: int):
    """Draft logits (..., V_d) over the target's V ids: cut, or padded with -inf."""
    Vd = logits.shape[-1]
    if Vd >= V:
        return logits[..., :V]
    pad = jnp.full((*logits.shape[:-1], V - Vd), -jnp.inf, logits.dtype)
    return jnp.concatenate([logits, pad], axis=-1)


def _categorical(key, logits_BV):
    """One draw per row from (B, V) logits; `key` one key or one per row."""
    if is_key_batch(key):
        return jax.vmap(jax.random.categorical)(key, logits_BV).astype(jnp.int32)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def _uniform(key, shape):
    """(B, *shape[1:]) uniforms in [0, 1); `key` one key or one per row."""
    if is_key_batch(key):
        return jax.vmap(lambda k: jax.random.uniform(k, shape[1:]))(key)
    return jax.random.uniform(key, shape)


def accept_drafts(p_BKV, q_BKV, drafts_BK, p_next_BV, u_BK, key, greedy: bool):
    """The speculative-sampling decision for one iteration.

    p_BKV / q_BKV: the target's / draft's filtered probabilities for draft positions 1 … k
    (q_BKV None: deterministic drafts, q one-hot at each draft — prompt lookup);
    p_next_BV: the target's after all k drafts (the bonus token's); u_BK: uniforms.
    Returns (a (B,) number of leading drafts kept, the token after them (B,)): drawn from
    norm(max(0, p_{a+1} − q_{a+1})) at a rejection, from p_next when all k are kept. Greedy:
    drafts kept while equal to the target's argmax, then the target's argmax."""
    B, K, _ = p_BKV.shape
    if greedy:
        ok = drafts_BK == jnp.argmax(p_BKV, axis=-1)
    else:
        p_d = jnp.take_along_axis(p_BKV, drafts_BK[..., None], axis=-1)[..., 0]
        q_d = 1.0 if q_BKV is None else jnp.take_along_axis(q_BKV, drafts_BK[..., None], -1)[..., 0]
        # u < p/q without dividing (q_d > 0: the draft drew d). Strict: u is drawn from
        # [0, 1), so u = 0 happens, and `<=` would then keep a draft the target gives p = 0.
        ok = u_BK * q_d < p_d
    a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # leading accepts
    all_kept = a == K
    at = jnp.minimum(a, K - 1)[:, None, None]
    p_at = jnp.take_along_axis(p_BKV, at, axis=1)[:, 0]  # (B, V)
    if greedy:
        nxt = jnp.argmax(jnp.where(all_kept[:, None], p_next_BV, p_at), axis=-1)
        return a, nxt.astype(jnp.int32)
    if q_BKV is None:  # q one-hot at the rejected draft: p without it
        d_at = jnp.take_along_axis(drafts_BK, at[:, :, 0], axis=1)  # (B, 1)
        resid = jnp.where(jnp.arange(p_at.shape[-1])[None, :] == d_at, 0.0, p_at)
    else:
        q_at = jnp.take_along_axis(q_BKV, at, axis=1)[:, 0]
        resid = jnp.maximum(p_at - q_at, 0.0)
    # p == q (to float rounding) leaves no residual mass; a rejection then has probability ~0,
    # and p itself is the right fallback.
    resid = jnp.where(jnp.sum(resid, -1, keepdims=True) > 0, resid, p_at)
    dist = jnp.where(all_kept[:, None], p_next_BV, resid)
    nxt = _categorical(key, jnp.log(dist))
    return a, nxt


def lookup_drafts(seq_BL, last_B, k: int, ngram: int):
    """Prompt lookup: per row, the k tokens that followed the latest earlier occurrence of the
    row's last n tokens in its own sequence (prompt and generated so far), for the largest
    n <= `ngram` that occurs; `seq_BL` holds the row's token at each slot, `last_B` the slot
    of its last token. Draft i is the token at slot j + i after the match ending at slot j,
    clipped to the last token (a match near the end proposes what it can; the rest are
    guesses verification throws away); no match at all proposes the last token again."""
    B, L = seq_BL.shape
    slots = jnp.arange(L, dtype=jnp.int32)[None, :]
    tail = [jnp.take_along_axis(seq_BL, jnp.maximum(last_B - i, 0)[:, None], 1) for i in
            range(ngram)]  # fmt: skip
    # shifted[i][b, j] = seq[b, j − i] (−1 before the row's start)
    shifted = [jnp.pad(seq_BL, ((0, 0), (i, 0)), constant_values=-1)[:, :L] for i in range(ngram)]
    best = jnp.full((B,), -1, jnp.int32)
    match = slots < last_B[:, None]  # a match must end before the last token
    for n in range(1, ngram + 1):  # longer n-grams override shorter ones where they occur
        match = match & (shifted[n - 1] == tail[n - 1]) & (last_B[:, None] - n + 1 >= 0)
        j = jnp.max(jnp.where(match & (slots >= n - 1), slots, -1), axis=1)
        best = jnp.where(j >= 0, j, best)
    start = jnp.where(best >= 0, best, last_B - 1)  # none: propose the last token (j + 1)
    where = jnp.minimum(start[:, None] + 1 + jnp.arange(k, dtype=jnp.int32)[None, :],
                        last_B[:, None])  # fmt: skip
    return jnp.take_along_axis(seq_BL, where, axis=1)


@functools.lru_cache(maxsize=32)
def _speculative_fn(cfg: ModelConfig, draft_cfg: ModelConfig | None, max_new: int, k: int,
                    greedy: bool, top_k: int, use_top_p: bool, use_min_p: bool,
                    cache_dtype: str, mesh, rules, ngram: int = 0,
                    quantize: str = "none"):  # fmt: skip
    """The jitted program: prefills, then a while loop of (draft k tokens, verify, commit).
    `draft_cfg` None: prompt lookup (`lookup_drafts`) with n-grams up to `ngram`. `quantize`
    "int8": both models' projection weights in int8 (`decode._decode_params`)."""
    sharded = mesh is not None
    # (mixtures of experts dropless, as `generate` runs them: verifying k + 1 tokens in one
    # forward must not drop what one-token steps keep; `decode.decode_config`)
    tcfg = decode.decode_config(cfg)
    target = Transformer(tcfg)
    if draft_cfg is not None:
        dcfg = decode.decode_config(draft_cfg)
        draft = Transformer(dcfg)
    V = cfg.vocab_size

    def filtered(logits, temperature, top_p, min_p):  # (..., V) → probabilities
        shape = logits.shape
        x = filter_logits(logits.reshape(-1, shape[-1]).astype(jnp.float32), temperature,
                          top_k=top_k, top_p=top_p, use_top_p=use_top_p, min_p=min_p,
                          use_min_p=use_min_p)  # fmt: skip
        return jax.nn.softmax(x, axis=-1).reshape(shape)

    def prefill(model, variables, mcfg, tokens_BP, lengths_B, S):
        B, P = tokens_BP.shape
        slots = jnp.arange(P, dtype=jnp.int32)
        seg = (slots[None, :] < lengths_B[:, None]).astype(jnp.int32)
        pos = jnp.broadcast_to(slots, (B, P))
        cache = decode._constrain_cache(init_cache(mcfg, B, S, cache_dtype), sharded, per_row=True)
        h, cache = model.apply(variables, tokens_BP, pos, seg, cache, method="backbone",
                               prefill=True)  # fmt: skip
        h_last = jnp.take_along_axis(h, (lengths_B - 1)[:, None, None], axis=1)
        cache = {**cache, "index": lengths_B}  # per row from here on (`step` sets it)
        return model.apply(variables, h_last, method="logits")[:, 0], cache

    def step(model, variables, cache, tokens_BT, start_B):
        """Feed tokens at slots (= positions) start … start + T − 1 of each row."""
        T = tokens_BT.shape[1]
        pos = start_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        # A target token past a smaller draft vocabulary (its padding, sampled with tiny
        # probability) must not read outside the draft's embedding table (NaN rows): the
        # draft then guesses badly for one step, and verification keeps the output right.
        tokens_BT = jnp.minimum(tokens_BT, model.cfg.vocab_size - 1)
        logits, cache = model.apply(variables, tokens_BT, pos, cache={**cache, "index": start_B})
        return logits.astype(jnp.float32), decode._constrain_cache(cache, sharded, per_row=True)

    def run(params, draft_params, tokens_BP, lengths_B, rng, temperature, top_p, min_p,
            stop_ids, pad_id):  # fmt: skip
        tv = {"params": decode._decode_params(cfg, params, False, quantize)}
        B, P = tokens_BP.shape
        # Slots: the prompt bucket, N tokens, and a chunk of k + 1 past the last one a row may
        # still feed (a done row's frontier stops at N).
        S = P + max_new + k + 1
        t_logits, t_cache = prefill(target, tv, tcfg, tokens_BP, lengths_B, S)
        if draft_cfg is not None:
            dv = {"params": decode._decode_params(draft_cfg, draft_params, False, quantize)}
            _, d_cache = prefill(draft, dv, dcfg, tokens_BP, lengths_B, S)
        else:
            d_cache = jnp.zeros((), jnp.int32)  # (prompt lookup keeps no draft state)
        probs0 = filtered(t_logits, temperature, top_p, min_p)
        k0 = step_key(rng, 0)
        tok0 = (jnp.argmax(probs0, -1).astype(jnp.int32) if greedy
                else _categorical(k0, jnp.log(probs0)))  # fmt: skip
        lp0 = jnp.take_along_axis(jax.nn.log_softmax(t_logits.astype(jnp.float32), -1),
                                  tok0[:, None], -1)[:, 0]  # fmt: skip
        W = max_new + k + 1  # output buffers: a chunk may run past N (cut at the end)
        out_tok = jnp.zeros((B, W), jnp.int32).at[:, 0].set(tok0)
        out_lp = jnp.zeros((B, W), jnp.float32).at[:, 0].set(lp0)
        n = jnp.ones((B,), jnp.int32)  # tokens committed per row
        done = jnp.isin(tok0, stop_ids) | (max_new <= 1)
        zeros = jnp.zeros((B,), jnp.int32)

        def cond(c):
            it, done = c[0], c[6]
            return (it < max_new) & ~jnp.all(done)  # each iteration commits >= 1 token

        def body(c):
            it, t_cache, d_cache, out_tok, out_lp, n, done, iters, accepted, rejected = c
            key = step_key(rng, it)
            keys = [step_key(key, j) for j in range(k + 2)]  # k drafts, the uniforms, the last
            f = lengths_B + n - 1  # slot of the last committed token
            # The two last committed tokens (slots f − 1, f); with one generated so far, the
            # first is the prompt's last (rewritten in the draft's cache with the same value).
            prev = jnp.take_along_axis(out_tok, jnp.maximum(n - 2, 0)[:, None], 1)[:, 0]
            prompt_last = jnp.take_along_axis(tokens_BP, (lengths_B - 1)[:, None], 1)[:, 0]
            prev = jnp.where(n == 1, prompt_last, prev)
            last2 = jnp.stack([prev, jnp.take_along_axis(out_tok, (n - 1)[:, None], 1)[:, 0]], 1)

            if draft_cfg is None:  # prompt lookup over the row's tokens, slot = position
                cols = jnp.arange(P + W, dtype=jnp.int32)[None, :]
                gen = jnp.take_along_axis(out_tok, jnp.clip(cols - lengths_B[:, None], 0, W - 1),
                                          axis=1)  # fmt: skip
                prompt = jnp.pad(tokens_BP, ((0, 0), (0, W)))
                seq = jnp.where(cols < lengths_B[:, None], prompt, gen)
                drafts_BK, q_BKV = lookup_drafts(seq, f, k, ngram), None
            else:  # the first step feeds slots f − 1 and f, then one token a step
                d_logits, d_cache = step(draft, dv, d_cache, last2, f - 1)
                q = filtered(_to_vocab(d_logits[:, -1], V), temperature, top_p, min_p)
                drafts, qs = [], []
                for j in range(k):
                    d = (jnp.argmax(q, -1).astype(jnp.int32) if greedy
                         else _categorical(keys[j], jnp.log(q)))  # fmt: skip
                    drafts.append(d)
                    qs.append(q)
                    if j + 1 < k:
                        d_logits, d_cache = step(draft, dv, d_cache, d[:, None], f + 1 + j)
                        q = filtered(_to_vocab(d_logits[:, -1], V), temperature, top_p, min_p)
                drafts_BK, q_BKV = jnp.stack(drafts, 1), jnp.stack(qs, 1)

            # Verify: the target reads [last token, d_1 … d_k] at slots f … f + k.
            chunk = jnp.concatenate([last2[:, 1:], drafts_BK], axis=1)
            t_logits, t_cache = step(target, tv, t_cache, chunk, f)
            p = filtered(t_logits, temperature, top_p, min_p)  # (B, k + 1, V)
            u = _uniform(keys[k], (B, k))
            a, nxt = accept_drafts(p[:, :k], q_BKV, drafts_BK, p[:, k], u, keys[k + 1], greedy)

            # Commit d_1 … d_a and the next token at out[n … n + a].
            idx = jnp.arange(k + 1, dtype=jnp.int32)[None, :]
            new = jnp.where(idx < a[:, None], jnp.pad(drafts_BK, ((0, 0), (0, 1))), nxt[:, None])
            logp = jax.nn.log_softmax(t_logits, -1)
            new_lp = jnp.take_along_axis(logp, new[..., None], -1)[..., 0]
            count = a + 1
            stop_at = jnp.where(jnp.isin(new, stop_ids) & (idx < count[:, None]), idx, k + 1)
            first_stop = jnp.min(stop_at, axis=1)
            count = jnp.minimum(count, first_stop + 1)  # keep the stop token, not after it
            count = jnp.minimum(count, max_new - n)  # not past N
            count = jnp.where(done, 0, count)
            # Only out[n … n + count − 1] change (a done row's count is 0).
            cols = jnp.arange(W)[None, :]
            span = (cols >= n[:, None]) & (cols < (n + count)[:, None])
            out_tok = jnp.where(span, write_rows(out_tok, new, n, axis=0), out_tok)
            out_lp = jnp.where(span, write_rows(out_lp, new_lp, n, axis=0), out_lp)
            active = ~done
            iters = iters + active.astype(jnp.int32)
            accepted = accepted + jnp.where(active, a, 0)  # what verification kept
            rejected = rejected + (active & (a < k)).astype(jnp.int32)
            n = n + count
            done = done | (first_stop < count) | (n >= max_new)
            return it + 1, t_cache, d_cache, out_tok, out_lp, n, done, iters, accepted, rejected

        carry = (jnp.ones((), jnp.int32), t_cache, d_cache, out_tok, out_lp, n, done, zeros,
                 zeros, zeros)  # fmt: skip
        carry = jax.lax.while_loop(cond, body, carry)
        out_tok, out_lp, n, _, iters, accepted, rejected = carry[3:]
        mask = jnp.arange(max_new)[None, :] < n[:, None]
        tokens = jnp.where(mask, out_tok[:, :max_new], pad_id)
        logprobs = jnp.where(mask, out_lp[:, :max_new], 0.0)
        return SpeculativeOutput(tokens, logprobs, mask.astype(jnp.float32), n, iters,
                                 accepted, rejected)  # fmt: skip

    return jax.jit(run)


def speculative_generate(
    cfg: ModelConfig,
    params,
    draft_cfg: ModelConfig,
    draft_params,
    prompts,
    *,
    max_new_tokens: int,
    rng,
    draft_tokens: int = 4,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    prompt_lengths=None,
    mesh=None,
    rules=None,
    cache_dtype=None,
    ngram: int = 3,
    quantize: str = "none",
) -> SpeculativeOutput:
    """`generate` (models/decode.py) with a draft model proposing `draft_tokens` (k) tokens per
    target forward. Arguments as `generate`'s; `draft_cfg, draft_params` the draft model (same
    tokenizer; any size, any vocabulary padding), or both None for prompt lookup with n-grams
    up to `ngram` (`prompt_lookup_generate`). The output's distribution is the target's
    (module docstring); `iterations`, `accepted` and `alpha()` say how well the draft
    guessed. `quantize` "int8": the target and the draft decode with int8 projection weights
    (`generate`'s option; the output is the quantized target's distribution)."""
    if quantize not in quant.MODES:
        raise ValueError(f"speculative_generate: quantize must be one of {quant.MODES}, got "
                         f"{quantize!r}")  # fmt: skip
    if (draft_cfg is None) != (draft_params is None):
        raise ValueError("speculative_generate: pass draft_cfg and draft_params, or neither "
                         "(prompt lookup)")  # fmt: skip
    if draft_cfg is None and not (isinstance(ngram, (int, np.integer)) and ngram >= 1):
        raise ValueError(f"speculative_generate: ngram must be an int >= 1, got {ngram!r}")
    if not (isinstance(draft_tokens, (int, np.integer)) and draft_tokens >= 1):
        raise ValueError(f"speculative_generate: draft_tokens must be an int >= 1, got "
                         f"{draft_tokens!r}")  # fmt: skip
    stop_tokens = decode.stop_token_ids(stop_tokens, "speculative_generate")
    if max_new_tokens < 1:
        raise ValueError(f"speculative_generate: max_new_tokens must be >= 1, got "
                         f"{max_new_tokens}")  # fmt: skip
    # (written so that NaN fails each test: NaN passed `temperature < 0`, decoding token 0s)
    if (not 0 <= temperature < float("inf") or top_k < 0 or not 0.0 < top_p <= 1.0
            or not 0.0 <= min_p < 1.0):  # fmt: skip
        raise ValueError(f"speculative_generate: need a finite temperature >= 0, top_k >= 0, "
                         f"0 < top_p <= 1 and 0 <= min_p < 1, got {temperature}, {top_k}, "
                         f"{top_p}, {min_p}")  # fmt: skip
    tokens, lengths = decode._prepare_prompts(prompts, prompt_lengths, cfg.vocab_size)
    if draft_cfg is not None and int(tokens.max()) >= draft_cfg.vocab_size:
        raise ValueError(f"speculative_generate: a prompt has token id {int(tokens.max())} "
                         f"outside the draft's vocab [0, {draft_cfg.vocab_size}): the draft "
                         "needs the target's tokenizer")  # fmt: skip
    decode.warn_past_max_seq_len("speculative_generate", cfg, lengths, max_new_tokens)
    B = tokens.shape[0]
    m = 1
    if mesh is not None:
        rules, m = tuple(rules or ()), batch_divisor(mesh)
    rows = max(B, decode.MIN_ROWS)
    rows += -rows % m
    if rows > B:
        tokens = np.concatenate([tokens, np.repeat(tokens[:1], rows - B, 0)])
        lengths = np.concatenate([lengths, np.repeat(lengths[:1], rows - B, 0)])
    rng = decode._row_keys(rng, B, rows)
    greedy = temperature == 0
    dtype = decode.checked_cache_dtype(cache_dtype, cfg)
    fn = _speculative_fn(cfg, draft_cfg, int(max_new_tokens), int(draft_tokens), bool(greedy),
                         int(top_k), bool(top_p < 1.0 and not greedy),
                         bool(min_p > 0.0 and not greedy), dtype, mesh, rules,
                         int(ngram) if draft_cfg is None else 0, quantize)  # fmt: skip
    rest = decode.traced_options(temperature, top_p, min_p, stop_tokens, pad_id)
    out = decode.call_program("speculative_generate", fn, (params, draft_params), tokens,
                              lengths, rng, rest, mesh, rules)  # fmt: skip
    return out if rows == B else jax.tree.map(lambda x: x[:B], out)


def prompt_lookup_generate(cfg: ModelConfig, params, prompts, *, ngram: int = 3,
                           **kw) -> SpeculativeOutput:  # fmt: skip
    """Speculative decoding without a draft model (prompt lookup decoding, Saxena 2023): the
    drafts are the tokens that followed the latest earlier occurrence of the row's last
    `ngram` (or fewer) tokens in its prompt and output (`lookup_drafts`), checked by the
    model like a draft model's, with the same guarantee (the model's distribution; greedy:
    `generate`'s tokens). Pays where outputs copy their context: extraction, summaries,
    code edits, repetition. Keywords as `speculative_generate`'s."""
    return speculative_generate(cfg, params, None, None, prompts, ngram=ngram, **kw)
