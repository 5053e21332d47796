"""The batch as the decode program takes it, and the program's call across devices and
processes: prompts right-padded into a power-of-two bucket (`_prepare_prompts`,
`prompt_bucket`; a warning past the model's length, `warn_past_max_seq_len`), the fewest rows
a program decodes (`MIN_ROWS`), the RNG as one key or one key per row (`_row_keys`), and
`call_program`, which splits the rows over the mesh's data×fsdp axes, checks that several
processes passed the same arguments and gives each process the whole output (models/decode.py's
docstring: "How a batch ... is laid out", "Sampling noise", "Several processes").

Separate from the traced program (models/decode_program.py) and from the option checks
(models/decode_options.py): host arrays and mesh plumbing, shared by `generate`
(models/decode.py) and models/speculative.py.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.models.config import ModelConfig
from flaxlm.models.sampling import is_key_batch
from flaxlm.models.sharding import (
    batch_sharding,
    check_same_on_processes,
    replicated,
    use_mesh,
)

MIN_BUCKET = 8  # smallest prompt bucket; prompt lengths round up to powers of two from here


# One prompt decodes as two rows (the second a copy, dropped): XLA:GPU rewrites one-row
# matmuls of under ~10M multiply-adds (q|k|v, the o projection at the 1.1B shape) as a multiply
# and a reduction, and for the o projection writes the whole (2048, 2048) product. Compiled for
# the H200 (bench/gpu_aot.py), two rows run 327 kernels and move 1.97 GB per token; one row,
# 396 kernels and 2.28 GB.
MIN_ROWS = 2


def prompt_bucket(n: int) -> int:
    """The padded prompt length for a longest prompt of n tokens (power of two, >= MIN_BUCKET)."""
    return max(MIN_BUCKET, 1 << max(0, int(n) - 1).bit_length())


def _prepare_prompts(prompts, prompt_lengths, vocab_size: int):
    """(tokens (B, bucket) int32 numpy, lengths (B,) int32 numpy) from either prompt form."""
    if isinstance(prompts, (list, tuple)) and (
        not prompts or not hasattr(prompts[0], "shape") or np.ndim(prompts[0]) == 1
    ):
        if prompt_lengths is not None:
            raise ValueError("generate: prompt_lengths is only for (B, P) array prompts")
        # A flat list of ids ([5, 9, 2], one tokenized prompt) would otherwise run as that
        # many one-token prompts: each prompt must be a sequence of its own.
        flat = [i for i, p in enumerate(prompts) if np.ndim(p) == 0]
        if flat:
            raise ValueError(
                f"generate: prompts must be a list of token-id sequences, one per prompt; "
                f"prompts[{flat[0]}] is the single value {prompts[flat[0]]!r} (for one "
                "tokenized prompt `ids`, pass [ids])"
            )
        rows = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
        lengths = np.asarray([len(r) for r in rows], np.int32)
    else:
        arr = np.asarray(prompts)
        if arr.ndim != 2:
            raise ValueError(f"generate: prompts array must be (B, P), got shape {arr.shape}")
        if prompt_lengths is None:
            raise ValueError("generate: a (B, P) prompts array needs prompt_lengths (B,)")
        lengths = np.asarray(prompt_lengths, np.int32).reshape(-1)
        if lengths.shape[0] != arr.shape[0]:
            raise ValueError(
                f"generate: prompt_lengths has {lengths.shape[0]} entries for {arr.shape[0]} rows"
            )
        if lengths.size and lengths.max() > arr.shape[1]:
            raise ValueError(f"generate: a prompt length {lengths.max()} > P={arr.shape[1]}")
        rows = [arr[b, : lengths[b]] for b in range(arr.shape[0])]
    if not rows:
        raise ValueError("generate: no prompts")
    if lengths.min() < 1:
        raise ValueError(f"generate: prompt {int(np.argmin(lengths))} is empty")
    P = prompt_bucket(int(lengths.max()))
    # Prompt padding is never attended, but its embedding still enters the masked products
    # (0 × NaN = NaN): fill with id 0, always in the table, not pad_id (which may lie outside
    # it, e.g. -1 or V as a "no token" sentinel; jnp.take gives NaN rows there).
    tokens = np.zeros((len(rows), P), np.int32)
    for b, r in enumerate(rows):
        if r.size and (r.min() < 0 or r.max() >= vocab_size):
            bad = int(r.max() if r.max() >= vocab_size else r.min())
            raise ValueError(
                f"generate: prompt {b} has token id {bad} outside the vocab [0, {vocab_size})"
            )
        tokens[b, : r.size] = r
    return tokens, lengths


def warn_past_max_seq_len(name: str, cfg: ModelConfig, lengths, max_new_tokens: int,
                          stacklevel: int = 2) -> None:  # fmt: skip
    """Warns (warnings.warn) when a prompt of `lengths` plus `max_new_tokens` reaches past
    `cfg.max_seq_len` (module docstring, "Length"); `name` the caller (`generate`, models/
    speculative.py), `stacklevel` counted from that caller as warnings.warn counts it."""
    longest = int(np.max(lengths)) + int(max_new_tokens)
    if longest > cfg.max_seq_len:
        warnings.warn(
            f"{name}: prompt {int(np.argmax(lengths))} ({int(np.max(lengths))} tokens) + "
            f"max_new_tokens={max_new_tokens} reaches position {longest - 1}, past the model's "
            f"max_seq_len={cfg.max_seq_len}: RoPE extrapolates there (nothing is truncated)",
            stacklevel=stacklevel + 1,
        )


def _row_keys(rng, n_prompts: int, rows: int, samples: int = 1):
    """`rng` as the program takes it: one key as is; per-prompt keys checked against the
    prompts, made one per sample (`fold_in(key, g)`) when `samples` > 1, and padded (with
    row 0's key) to the rows the program's loop runs."""
    if isinstance(rng, (int, np.integer)):  # (jax's own error spoke of "invalid PRNG key data")
        raise TypeError(f"generate: rng={rng!r} is a number, not a PRNG key: pass "
                        f"jax.random.PRNGKey({rng!r}) (generate_text takes a seed)")  # fmt: skip
    if not is_key_batch(rng):
        return rng
    if rng.shape[0] != n_prompts:
        raise ValueError(f"generate: {rng.shape[0]} per-prompt keys for {n_prompts} prompts")
    if samples > 1:
        fold = jax.vmap(jax.vmap(jax.random.fold_in, (None, 0)), (0, None))
        rng = fold(rng, jnp.arange(samples, dtype=jnp.uint32))
        rng = rng.reshape(n_prompts * samples, *rng.shape[2:])
        n_prompts *= samples
    if rows > n_prompts:
        rng = jnp.concatenate([rng, jnp.repeat(rng[:1], rows - n_prompts, axis=0)])
    return rng


def call_program(name: str, fn, weights: tuple, tokens, lengths, rng, rest, mesh, rules):
    """`fn(*weights, tokens, lengths, rng, *rest)`, under `mesh` with the rows split over
    data×fsdp and the traced options replicated; several processes check that they passed the
    same arguments (an error naming `name` on every process) and each reads back the whole
    output (module docstring, "Several processes"). Shared by `generate` and
    models/speculative.py."""
    if mesh is None:
        return fn(*weights, tokens, lengths, rng, *rest)
    if jax.process_count() > 1:  # every process passes the whole batch (module docstring)
        key_bits = jax.random.key_data(rng) if _typed_key(rng) else rng
        check_same_on_processes(name, tokens, lengths, jax.device_get(key_bits),
                                *jax.device_get(jax.tree.leaves(rest)))  # fmt: skip
    with use_mesh(mesh, tuple(rules or ())):
        tok_d = jax.device_put(tokens, batch_sharding(mesh, 2))
        len_d = jax.device_put(lengths, batch_sharding(mesh, 1))
        if is_key_batch(rng):
            rng = jax.device_put(rng, batch_sharding(mesh, jnp.ndim(rng)))
        else:
            rng = jax.device_put(rng, replicated(mesh))
        rest = jax.device_put(rest, replicated(mesh))
        out = fn(*weights, tok_d, len_d, rng, *rest)
        if jax.process_count() > 1:
            out = _replicate(mesh)(out)  # each process reads the whole output
    return out


def _typed_key(rng) -> bool:
    return jax.dtypes.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key)


@functools.lru_cache(maxsize=8)
def _replicate(mesh):
    """A jitted identity whose outputs are replicated on every device of `mesh`: the output
    rows, split over data×fsdp, gathered so that every process holds (and can read) them all."""
    return jax.jit(lambda tree: tree, out_shardings=replicated(mesh))
