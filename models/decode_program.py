"""The compiled decode program: `_decode_fn` builds, per model config and option set, the one
jitted function that runs the prefill, the samplers and the decode loop over a preallocated KV
cache — no host round trip per token — and returns a `GenerateOutput`. With it the per-call
weight layout that program decodes with (`_decode_params`: cast, unstacked, fused, folded,
quantized) and the model config it runs (`decode_config`).

Everything here is traced into that program; the cache layout, masking, loop and sampling noise
it implements are described in models/decode.py's docstring, and the host-side choices that
pick a program (resolving, checking, compiler options) are models/decode_options.py. Separate
so that the program reads as one piece; models/speculative.py builds its own program from the
same parts (`decode_config`, `_decode_params`, `_constrain_cache`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlm.models import decode_attention as decode_kernel
from flaxlm.models import quant
from flaxlm.models import stop_strings as stop_text
from flaxlm.models.attention_cache import WHOLE_SLOTS
from flaxlm.models.config import ModelConfig
from flaxlm.models.decode_attention import BLOCK_K
from flaxlm.models.decode_options import compiler_options
from flaxlm.models.sampling import (
    count_tokens,
    penalized_logits,
    sample_logits,
    step_key,
    token_presence,
    top_tokens,
)
from flaxlm.models.sharding import unboxed
from flaxlm.models.transformer import (
    Transformer,
    fold_norms,
    fuse_projections,
    init_cache,
    transpose_gate_up,
    unstack_layers,
)


class GenerateOutput(NamedTuple):
    """What `generate` returns (a pytree of device arrays; rows are the prompts' order).
    With `top_logprobs=K` > 0 it returns a `TopGenerateOutput` instead: these four fields and
    two more. Two types, not two optional fields: code unpacks these four (`toks, logp, mask,
    n = out`) or saves every field, and a K = 0 call must give it what it always did.
    models/speculative.py returns its own `SpeculativeOutput`."""

    tokens: jax.Array  # (B, N) int32 generated ids; pad_id after the stop token / end
    logprobs: jax.Array  # (B, N) float32 log p_model(token) at temperature 1; 0 where mask == 0
    mask: jax.Array  # (B, N) float32 1 for generated tokens, including the stop token
    lengths: jax.Array  # (B,) int32 number of generated tokens (= mask.sum(-1))


class TopGenerateOutput(NamedTuple):
    """`GenerateOutput`'s fields and each generated position's K most likely tokens
    (`generate(..., top_logprobs=K)`, K > 0)."""

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    lengths: jax.Array
    # (B, N, K) int32: the K most likely ids of the distribution `logprobs` is read from, most
    # likely first; pad_id where mask == 0
    top_ids: jax.Array
    top_logprobs: jax.Array  # (B, N, K) float32 their logprobs; 0 where mask == 0


def _decode_params(cfg: ModelConfig, params, fused: bool, quantize: str = "none",
                   norm: str = "xla", mlp: str = "xla"):  # fmt: skip
    """Unrolled layout in the compute dtype (fused projections if asked; pre-norm scales folded
    into the projections with `norm="fold"`, `transformer.fold_norms`, before the cast; int8
    projection weights with `quantize="int8"`, models/quant.py, quantized from the stored
    weights):
    decoding reads each weight once per step, so it should not also convert fp32 master
    weights every step, dynamic-slice stacked layers, or launch three small matmuls where one
    would do. Done once per call, before the loop. Boxed params (as `Transformer.init`
    returns them) are unboxed first: the restructuring walks arrays."""
    params = unboxed(params)
    if cfg.scan_layers:
        params = unstack_layers(params, cfg.n_layers)
    if fused:
        params = fuse_projections(params, cfg.n_layers)
    if norm == "fold":
        params = fold_norms(cfg, params, cfg.n_layers)
    if mlp.split(":")[0] == "pallas_t":  # the gate|up kernel over W^T (models/decode_mlp.py)
        params = transpose_gate_up(params, cfg.n_layers)
    params = quant.quantize_params(params, quantize)
    dt = cfg.compute_dtype
    return jax.tree.map(
        lambda p: p.astype(dt) if jnp.issubdtype(p.dtype, jnp.floating) else p, params
    )


def decode_config(cfg: ModelConfig) -> ModelConfig:
    """The config a decode program's model runs with: layers unrolled, no remat, params in the
    compute dtype, and a mixture of experts dropless (`moe_capacity_factor=0`). A capacity is
    per forward and per row of T tokens (models/moe.py), and decoding's forwards are not
    training's: the prefill's T is the padded prompt bucket (the longest prompt of the batch),
    speculative verification's k + 1, a step's 1 — so with a capacity factor a prompt's
    tokens would depend on its batch mates' lengths and on the chunk sizes, and speculative
    greedy would differ from greedy `generate`. Without drops every forward computes the same
    function of the tokens, the model's own (what MoE serving stacks and HF compute, whatever
    factor the model was trained with). Shared with models/speculative.py."""
    return cfg.replace(scan_layers=False, remat_policy="none", param_dtype=cfg.dtype,
                       moe_capacity_factor=0.0)  # fmt: skip


def _constrain_cache(cache, sharded: bool, per_row: bool = False):
    """The cache's buffers (B, K, S, H) as a sharded program keeps them: rows over the batch
    axes, slots over `context` (`act_len`). `per_row`: a program that writes the cache at a
    slot per row (models/speculative.py) keeps the slot axis whole instead, segment ids and
    positions too (`attention_cache.write_cache_rows`: written split, slots went wrong) —
    each device of a context group then holds its rows' whole cache."""
    if not sharded:
        return cache
    names = WHOLE_SLOTS[4] if per_row else ("act_batch", "act_kv_heads", "act_len", "head_dim")
    kv = [tuple(nn.with_logical_constraint(x, names) for x in pair) for pair in cache["kv"]]
    if not per_row:
        return {**cache, "kv": kv}
    meta = {k: nn.with_logical_constraint(cache[k], WHOLE_SLOTS[2])
            for k in ("segment_ids", "positions")}  # fmt: skip
    return {**cache, "kv": kv, **meta}


@functools.lru_cache(maxsize=64)
def _decode_fn(
    cfg: ModelConfig,
    max_new: int,
    greedy: bool,
    top_k: int,
    use_top_p: bool,
    cache_dtype: str,
    mesh,
    rules,
    early_exit: bool = True,
    fused: bool = False,
    check_every: int = 1,
    attention: str = "xla",
    use_min_p: bool = False,
    window: bool = True,
    samples: int = 1,
    rows: int = 0,
    mlp: str = "xla",
    quantize: str = "none",
    gemm: str = "xla",
    norm: str = "xla",
    penalize: bool = False,
    top_logprobs: int = 0,
):
    """The jitted prefill + decode loop for one model config and sampler kind.

    `top_logprobs` K > 0: the output also holds each generated position's K most likely
    tokens and their logprobs (`GenerateOutput.top_ids`, `.top_logprobs`; `write_top`),
    kept in two (B, N, K) arrays of the loop's carry. With 0 the carry holds an empty tuple in
    their place: the program is the one without the option.

    `penalize`: the program applies repetition, frequency and presence penalties (their values
    traced, `sampling.penalized_logits`), keeping per row which token ids its prompt holds
    and how often it generated each, two (B, V) arrays in the loop's carry.

    `samples` > 1: the prefill runs once per prompt row and its cache, lengths and last
    logits are repeated `samples` times (row b·samples + g is sample g of prompt b), cut to
    `rows` rows for the loop (`generate(..., num_samples=)`).

    `early_exit` (there are stop tokens) ends the loop once every row stopped; without stop
    tokens the loop is a scan of max_new - 1 steps, a known trip count, so an accelerator runs
    it without reading a loop condition back to the host every step. With stop tokens, each
    while-loop iteration runs `check_every` steps, so the "every row stopped?" condition (a
    device-to-host read on a GPU) is read once per that many tokens; steps past the end of
    the output are masked no-ops.

    (The config is a frozen dataclass; it keys this Python-level cache, not a jit static arg.
    Mesh and rules are keys too: the logical rules are read at trace time, which jit's own
    cache does not see.)
    """
    sharded = mesh is not None
    dcfg = decode_config(cfg)
    model = Transformer(dcfg, fused_projections=fused, decode_attention=attention,
                        decode_mlp=mlp, decode_norm=norm)  # fmt: skip

    def run(params, tokens_BP, lengths_B, rng, temperature, top_p, min_p, stop_ids, pad_id,
            strings=None, penalties=None):  # fmt: skip
        variables = {"params": _decode_params(cfg, params, fused, quantize, norm, mlp)}
        B, P = tokens_BP.shape
        sample = functools.partial(
            sample_logits,
            top_k=top_k,
            greedy=greedy,
            use_top_p=use_top_p,
            top_p=top_p,
            min_p=min_p,
            use_min_p=use_min_p,
        )

        # The cache holds the prompt bucket and the new tokens — rounded up to whole key
        # blocks for the Pallas kernel (the extra slots stay empty: masked, never read) — and
        # windowed layers keep rings of W slots instead when that is less (`init_cache`).
        # The prefill attends over the prompts themselves (`backbone(..., prefill=True)`),
        # whatever the cache's length.
        S = P + max_new
        if attention != "xla":  # whole key blocks of the kernel
            S += -S % decode_kernel.variant_options(attention).get("block_k", BLOCK_K)
        slots = jnp.arange(P, dtype=jnp.int32)
        seg = (slots[None, :] < lengths_B[:, None]).astype(jnp.int32)
        pos = jnp.broadcast_to(slots, (B, P))
        cache = _constrain_cache(init_cache(dcfg, B, S, cache_dtype, rings=window), sharded)
        h_BPD, cache = model.apply(variables, tokens_BP, pos, seg, cache, method="backbone",
                                   prefill=True)  # fmt: skip
        h_last = jnp.take_along_axis(h_BPD, (lengths_B - 1)[:, None, None], axis=1)  # (B,1,D)
        logits = model.apply(variables, h_last, method="logits")[:, 0]
        # Penalties: (the prompt's token ids, how often each row generated each id), or ().
        seen = token_presence(tokens_BP, lengths_B, logits.shape[-1]) if penalize else None
        if samples > 1:  # the prompts' prefill is shared by their samples: repeat its results
            lengths_B, logits = (repeat_rows(x, samples, rows) for x in (lengths_B, logits))
            seen = None if seen is None else repeat_rows(seen, samples, rows)
            B = rows
            cache = {k: v if k == "index" else jax.tree.map(
                lambda x: repeat_rows(x, samples, rows), v) for k, v in cache.items()}  # fmt: skip
        cache = _constrain_cache(cache, sharded)
        pen_state = (seen, jnp.zeros(seen.shape, jnp.int32)) if penalize else ()
        # The stop tokens are never penalized: a chat prompt holds the end-of-turn token, and
        # penalizing it kept rows from ending (generate's docstring).
        exempt = jnp.isin(jnp.arange(logits.shape[-1]), stop_ids) if penalize else None

        def choose(logits, key, pen_state, active):
            """(token, logprob, the penalty state with the token counted) of one step."""
            if not penalize:
                return *sample(logits, key, temperature), ()
            seen, counts = pen_state
            x = penalized_logits(logits, seen | (counts > 0), counts, penalties)
            x = jnp.where(exempt[None, :], logits.astype(x.dtype), x)
            tok, lp = sample(logits, key, temperature, choose_from=x)
            return tok, lp, (seen, count_tokens(counts, tok, active))

        tok, lp, pen_state = choose(logits, step_key(rng, 0), pen_state, jnp.ones((B,), bool))
        out_tok = jnp.full((B, max_new), pad_id, jnp.int32).at[:, 0].set(tok)
        out_lp = jnp.zeros((B, max_new), jnp.float32).at[:, 0].set(lp)
        top = write_top(empty_top(B, max_new, top_logprobs, pad_id), logits, 0, pad_id)
        done = jnp.isin(tok, stop_ids)
        if strings is None:  # (B, 0): no stop strings, nothing to track
            text_state = jnp.zeros((B, 0), jnp.int32)
        else:  # how much of each stop string each row's text ends with (models/stop_strings)
            table, start, found = strings
            text_state = stop_text.advance(table, jnp.broadcast_to(start, (B, len(start))), tok)
            done = done | stop_text.found_any(text_state, found)
        n_gen = jnp.ones((B,), jnp.int32)

        def cond(carry):
            i, _, _, done, *_ = carry
            return (i < max_new) & ~jnp.all(done)

        def body(carry):
            i, cache, tok, done, n_gen, out_tok, out_lp, text_state, pen_state, top = carry
            pos = (lengths_B + i - 1)[:, None]  # token i-1 sits at position len + i - 1
            logits, cache = model.apply(variables, tok[:, None], pos, cache=cache)
            new, lp, pen_state = choose(logits[:, 0], step_key(rng, i), pen_state, ~done)
            new = jnp.where(done, pad_id, new)
            lp = jnp.where(done, 0.0, lp)
            at = (jnp.zeros_like(i), i)  # (one integer type under jax_enable_x64 too)
            out_tok = jax.lax.dynamic_update_slice(out_tok, new[:, None], at)
            out_lp = jax.lax.dynamic_update_slice(out_lp, lp[:, None], at)
            if top:  # (off: nothing traced, not even the slice)
                top = write_top(top, logits[:, 0], i, pad_id, done)
            n_gen = n_gen + (~done).astype(jnp.int32)
            done = done | jnp.isin(new, stop_ids)
            if strings is not None:
                text_state = stop_text.advance(table, text_state, new)
                done = done | stop_text.found_any(text_state, found)
            return i + 1, cache, new, done, n_gen, out_tok, out_lp, text_state, pen_state, top

        def guarded(carry):  # a step of a block that may run past max_new: then a no-op
            # (its cache write lands in a clamped slot, but nothing reads the cache after).
            i, cache, tok, done, *rest = carry
            stepped = body((i, cache, tok, done | (i >= max_new), *rest))
            past = i >= max_new  # keep done, n_gen, the outputs, text and penalty states
            keep = lambda a, b: jnp.where(past, a, b)  # noqa: E731
            kept = (jax.tree.map(keep, a, b) for a, b in zip(carry[3:], stepped[3:]))
            return (i + 1, stepped[1], stepped[2], *kept)

        def block(carry):  # a counted inner loop: compiled once, no condition read back
            carry, _ = jax.lax.scan(lambda c, _: (guarded(c), None), carry, length=check_every)
            return carry

        carry = (jnp.ones((), jnp.int32), cache, tok, done, n_gen, out_tok, out_lp, text_state,
                 pen_state, top)  # fmt: skip
        if early_exit:
            loop_body = body if check_every == 1 else block
            carry = jax.lax.while_loop(cond, loop_body, carry)
        else:  # a counted loop (scan): the compiler knows its trip count
            step = lambda c, _: (body(c), None)
            carry, _ = jax.lax.scan(step, carry, length=max_new - 1)
        n_gen, out_tok, out_lp = carry[4:7]
        mask = (jnp.arange(max_new)[None, :] < n_gen[:, None]).astype(jnp.float32)
        if top_logprobs:
            return TopGenerateOutput(out_tok, out_lp, mask, n_gen, *carry[9])
        return GenerateOutput(out_tok, out_lp, mask, n_gen)

    return jax.jit(run, compiler_options=compiler_options(gemm, fused))


def empty_top(B: int, N: int, k: int, pad_id):
    """The (top ids (B, N, k) int32, top logprobs (B, N, k) float32) outputs before any step:
    pad_id and 0, what rows past their end keep. k == 0 (off): (), so that the loop's carry
    and the output hold nothing more."""
    if not k:
        return ()
    return jnp.full((B, N, k), pad_id, jnp.int32), jnp.zeros((B, N, k), jnp.float32)


def write_top(top, logits_BV, i, pad_id, done_B=None):
    """`top` (`empty_top`'s outputs) with step i's `sampling.top_tokens` of the step's
    unmodified logits written in column i; pad_id and 0 for rows already `done_B`, as
    `tokens` and `logprobs` are filled. () (off) stays ()."""
    if not top:
        return ()
    ids, lp = top_tokens(logits_BV, top[0].shape[-1])
    if done_B is not None:
        ids = jnp.where(done_B[:, None], pad_id, ids)
        lp = jnp.where(done_B[:, None], 0.0, lp)
    at = (jnp.zeros_like(i), i, jnp.zeros_like(i))  # (one integer type under jax_enable_x64)
    return (jax.lax.dynamic_update_slice(top[0], ids[:, None], at),
            jax.lax.dynamic_update_slice(top[1], lp[:, None], at))  # fmt: skip


def repeat_rows(x, samples: int, rows: int):
    """Row b of `x` repeated `samples` times in place (b·samples + g), the first `rows` kept."""
    return jnp.repeat(x, samples, axis=0, total_repeat_length=x.shape[0] * samples)[:rows]
