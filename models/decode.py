"""Generation: one jitted prefill plus a decode loop over a preallocated KV cache (samplers:
models/sampling.py).

    out = generate(cfg, params, [[1, 5, 9], [1, 7]], max_new_tokens=32, rng=key, temperature=0.7)
    out.tokens (B, N) int32 · out.logprobs (B, N) float32 · out.mask (B, N) float32
    out.lengths (B,) int32

How a batch of prompts of different lengths is laid out (B rows, prompt bucket P, N new tokens):
  * prompts are right-padded to P (the longest prompt rounded up to a power of two, so a handful
    of compiled programs serve every prompt length); the cache has P + N slots.
  * prefill writes slots 0..P-1 with segment id 1 for real tokens and 0 for padding, which the
    model's cache mask never attends to (models/attention.py: masks by segment ids and slots).
    Its attention runs over the prompts themselves as plain causal rows (right padding never
    reaches a real token), with the training kernels — cuDNN's flash attention when the config
    asks for it — or XLA in blocks of 512 query rows: never a (B, N, P, P) float32 score
    matrix at once (`Transformer.backbone(..., prefill=True)`).
  * sliding-window layers (Mistral, Gemma 2/3's local ones) keep rings of W slots instead of
    P + N when W is less (`window_cache`, on by default; `transformer.init_cache`): the prefill
    leaves each row's last W prompt tokens there, and a step writes its token at slot
    position mod W of its row. Less memory, and those layers' steps read W slots, not P + N.
  * decode step i writes slot P + i for every row, at position `len_b + i`: each row's positions
    continue from its own length while all rows share one cache write index, and the padding
    slots between `len_b` and P stay invisible.
  * `num_samples=G`: each prompt is prefilled once and its cache rows copied to G rows (b·G + g)
    before the loop — GRPO's groups, or several samples of a prompt, without G prefills.
Token 0 comes from the prefill logits at each row's last real token; tokens 1..N-1 from the
loop. The whole thing (prefill, loop, samplers, stop handling) is one XLA program, so there is
no host round trip per token. With stop tokens the loop is a `while_loop` that exits once every
row has stopped (tested every `check_every` tokens); without, a fixed-length `scan` (a known
trip count: no loop condition is read back to the host). Each step attends over all P + N cache
slots (masked; a ring's W), a fixed shape — or, with `decode_attention="pallas"` (the default
on CUDA GPUs), one kernel per layer does RoPE, the cache write and attention over the slots
written so far
(models/decode_attention.py; the cache is then rounded up to whole key blocks, and a ring runs
it when W is a whole number of them, each row writing its own slot). The cache holds each
layer's keys and values in two heads-major (B, K, S, H) buffers in the compute dtype
(`cache_dtype`), updated in place (why two, not one: `transformer.init_cache`). The weights are
cast to the compute dtype, unstacked if scanned, once per call before the loop
(`_decode_params`). `fuse_projections=True` also concatenates the q|k|v and gate|up kernels
there. Matmuls (`decode_gemm`): on CUDA GPUs the program is compiled with every matmul a
cuBLAS call, and then with the projections concatenated — XLA's dot merger joins matmuls that
share an input, which Triton gemm fusions do by reading both weights in place but cuBLAS only
by concatenating the weights, inside the loop, unless they already are. With Triton's gemms
(`decode_gemm="xla"`, the choice elsewhere) nothing is concatenated by default: the fused
layout has no fewer kernels there and holds the concatenated copy (1.3 GiB at the 1.1B shape).
On the H200 the batch-64 1.1B step took 1.32 ms with cuBLAS and 1.48 ms with Triton
(bench/RESULTS.md). `decode_norm="fold"` multiplies the pre-norm scales into the q|k|v and
gate|up weights there too (`transformer.fold_norms`), and the Pallas attention and gate|up
kernels divide by the rows' rms themselves: no RMSNorm kernels in the step.

Logprobs: `logprobs[b, i]` is log softmax(model logits)[token] of the *unmodified* model at
temperature 1 — no temperature, top-k or top-p applied — i.e. exactly what a plain forward
computes for that token, whatever sampler picked the token (PPO/GRPO score their tokens at the
rollout temperature themselves, and compare these with their own temperature-1 scores as a check
of the decoder: alignment/rl_rollout.py).

Sampling noise: with one key, step i of row b draws from `fold_in(rng, i)` at row index b, so a
prompt's sample is fixed by (rng, its row index, its prompt) and does not depend on the other
prompts in the batch or on the batch size (jax's default `jax_threefry_partitionable` random
bits). The same prompt at another row gets another sample (so `[p] * k` gives k samples);
reorder the prompts and each one's sample changes. With one key per prompt (`rng` of shape
(B, ...) — `prompt_keys(key, ids)` makes them), step i of row b draws from
`fold_in(rng[b], i)`: the sample is fixed by the prompt's own key, wherever and with whatever
batch mates it runs — what evaluation uses, so a task's samples do not change with the batch
size, the length-sorted order or the mesh. Either way up to float rounding: the batch size and
the prompt bucket P (the longest prompt) pick the compiled program, whose logits can differ in
the last bits and so, rarely, flip a sample.

Mixtures of experts decode dropless: the program runs the model with `moe_capacity_factor=0`
(`decode_config`), so no token assignment is dropped in the prefill, the steps or speculative
verification, whatever factor the model was trained with — as MoE serving stacks (and HF)
compute it. With a capacity, which is per forward and per row (models/moe.py), a prompt's
tokens would depend on its batch mates (the prefill's capacity follows the padded prompt
bucket) and speculative greedy would differ from greedy `generate` (verification's chunk of
k + 1 tokens drops what one-token steps keep). A model trained with a factor > 0 therefore
decodes a little differently from its training forward on the same tokens where that
forward dropped assignments.

Length: positions run up to len_b + N - 1. Past `cfg.max_seq_len` (the length the model is meant
for) nothing is truncated — RoPE extrapolates to positions the model never saw — and `generate`
warns (warnings.warn); callers that must stay within it cut prompts first (the evaluation
harness and SFT/RL's generation evals keep the last tokens).

Compilation: one program per (cfg, batch, prompt bucket, max_new_tokens, greedy?, top_k, top_p<1?,
min_p>0?, any stop tokens? (their count rounded up to a power of two >= 4), mesh, rules, fused?,
check_every, decode_attention, decode_mlp, window_cache, num_samples, stop strings? (their count
rounded up to a power of two and their states to 8)). Temperature, top_p, min_p, the stop-token
ids, the stop strings' tables, pad id and the RNG are traced: changing them does not recompile.
Under a mesh the batch is split over data×fsdp (a batch that does not divide is padded with
copies of row 0 and cut back), params stay in their training shardings.

Several processes (a multi-host job; jax.distributed): every process calls `generate` at the
same point with the same arguments — the WHOLE batch of prompts, the same rng and options — and
its params as global arrays under the mesh. Each device decodes its rows, and the output is
gathered so that every process gets all of it, the same on all (a replicated host view: what
the RL rollouts build on, alignment/rl_rollout.py). Prompts, keys or traced options that differ
between processes are an error on every process (a checksum per call, compared). The samples are
those of one process decoding the same batch on a mesh of the same shape (tested with two
processes of 4 devices against one of 8).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.models import decode_attention as decode_kernel
from flaxlm.models import decode_mlp as decode_mlp_kernel
from flaxlm.models import quant
from flaxlm.models import stop_strings as stop_text
from flaxlm.models.config import ModelConfig
from flaxlm.models.decode_attention import BLOCK_K
from flaxlm.models.sampling import (  # noqa: F401  (prompt_keys, sample_logits: public here too)
    is_key_batch,
    prompt_keys,
    sample_logits,
    step_key,
)
from flaxlm.models.sharding import (
    batch_divisor,
    batch_sharding,
    check_same_on_processes,
    replicated,
    use_mesh,
)
from flaxlm.models.transformer import (
    Transformer,
    fold_norms,
    fold_norms_unsupported,
    fuse_projections,
    init_cache,
    transpose_gate_up,
    unstack_layers,
)

MIN_BUCKET = 8  # smallest prompt bucket; prompt lengths round up to powers of two from here


class GenerateOutput(NamedTuple):
    """What `generate` returns (a pytree of device arrays; rows are the prompts' order)."""

    tokens: jax.Array  # (B, N) int32 generated ids; pad_id after the stop token / end
    logprobs: jax.Array  # (B, N) float32 log p_model(token) at temperature 1; 0 where mask == 0
    mask: jax.Array  # (B, N) float32 1 for generated tokens, including the stop token
    lengths: jax.Array  # (B,) int32 number of generated tokens (= mask.sum(-1))


# One prompt decodes as two rows (the second a copy, dropped): XLA:GPU rewrites one-row
# matmuls of under ~10M multiply-adds (q|k|v, the o projection at the 1.1B shape) as a multiply
# and a reduction, and for the o projection writes the whole (2048, 2048) product. Compiled for
# the H200 (bench/gpu_aot.py), two rows run 327 kernels and move 1.97 GB per token; one row,
# 396 kernels and 2.28 GB.
MIN_ROWS = 2

# `decode_gemm="cublas"`: XLA:GPU's compiler options for the whole program — every matmul a
# cuBLAS call instead of a Triton gemm fusion. On the H200 (bench/RESULTS.md, 2026-11-30 second
# lease) the 1.1B batch-64 step took 1.32 ms this way (with concatenated projections) against
# 1.48 with Triton's: Triton's split-K gemms at 64 rows ran at 34-58% of bandwidth
# and left partial sums for extra kernels (196 kernels per step against 241).
CUBLAS_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
DECODE_GEMMS = ("auto", "xla", "cublas")
NO_DOT_MERGER = {"xla_disable_hlo_passes": "dot-merger"}
# ... from this many rows per device ("auto"). Measured at 64. At batch 1 (two rows) the H200
# compile of the cuBLAS program moves 2.29 GiB per token against Triton's 1.94: small batches
# keep Triton's gemms until the GPU times the rows in between. (The deviceless compile also
# leaves cuBLAS calls outside CUDA graphs, 309 host launches per token at batch 1, but that
# compile's target has no driver version, and XLA graphs cuBLAS calls only for drivers it
# knows to be >= 12.3: on the GPU they may be graphed. The suite's profile will say.)
CUBLAS_MIN_ROWS = 64


# ----------------------------------------------------------------------------------------------
# The compiled program


def _decode_params(cfg: ModelConfig, params, fused: bool, quantize: str = "none",
                   norm: str = "xla", mlp: str = "xla"):  # fmt: skip
    """Unrolled layout in the compute dtype (fused projections if asked; pre-norm scales folded
    into the projections with `norm="fold"`, `transformer.fold_norms`, before the cast; int8
    projection weights with `quantize="int8"`, models/quant.py, quantized from the stored
    weights):
    decoding reads each weight once per step, so it should not also convert fp32 master
    weights every step, dynamic-slice stacked layers, or launch three small matmuls where one
    would do. Done once per call, before the loop."""
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


def _constrain_cache(cache, sharded: bool):
    if not sharded:
        return cache
    names = ("act_batch", "act_kv_heads", "act_len", "head_dim")  # (B, K, S, H)
    kv = [tuple(nn.with_logical_constraint(x, names) for x in pair) for pair in cache["kv"]]
    return {**cache, "kv": kv}


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
):
    """The jitted prefill + decode loop for one model config and sampler kind.

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
            strings=None):  # fmt: skip
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
        if samples > 1:  # the prompts' prefill is shared by their samples: repeat its results
            lengths_B, logits = (repeat_rows(x, samples, rows) for x in (lengths_B, logits))
            B = rows
            cache = {k: v if k == "index" else jax.tree.map(
                lambda x: repeat_rows(x, samples, rows), v) for k, v in cache.items()}  # fmt: skip
        cache = _constrain_cache(cache, sharded)

        tok, lp = sample(logits, step_key(rng, 0), temperature)
        out_tok = jnp.full((B, max_new), pad_id, jnp.int32).at[:, 0].set(tok)
        out_lp = jnp.zeros((B, max_new), jnp.float32).at[:, 0].set(lp)
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
            i, cache, tok, done, n_gen, out_tok, out_lp, text_state = carry
            pos = (lengths_B + i - 1)[:, None]  # token i-1 sits at position len + i - 1
            logits, cache = model.apply(variables, tok[:, None], pos, cache=cache)
            new, lp = sample(logits[:, 0], step_key(rng, i), temperature)
            new = jnp.where(done, pad_id, new)
            lp = jnp.where(done, 0.0, lp)
            out_tok = jax.lax.dynamic_update_slice(out_tok, new[:, None], (0, i))
            out_lp = jax.lax.dynamic_update_slice(out_lp, lp[:, None], (0, i))
            n_gen = n_gen + (~done).astype(jnp.int32)
            done = done | jnp.isin(new, stop_ids)
            if strings is not None:
                text_state = stop_text.advance(table, text_state, new)
                done = done | stop_text.found_any(text_state, found)
            return i + 1, cache, new, done, n_gen, out_tok, out_lp, text_state

        def guarded(carry):  # a step of a block that may run past max_new: then a no-op
            # (its cache write lands in a clamped slot, but nothing reads the cache after).
            i, cache, tok, done, *rest = carry
            stepped = body((i, cache, tok, done | (i >= max_new), *rest))
            past = i >= max_new  # keep done, n_gen, the outputs and text states as they were
            kept = (jnp.where(past, a, b) for a, b in zip(carry[3:], stepped[3:]))
            return (i + 1, stepped[1], stepped[2], *kept)

        def block(carry):  # a counted inner loop: compiled once, no condition read back
            carry, _ = jax.lax.scan(lambda c, _: (guarded(c), None), carry, length=check_every)
            return carry

        carry = (jnp.ones((), jnp.int32), cache, tok, done, n_gen, out_tok, out_lp, text_state)
        if early_exit:
            loop_body = body if check_every == 1 else block
            carry = jax.lax.while_loop(cond, loop_body, carry)
        else:  # a counted loop (scan): the compiler knows its trip count
            step = lambda c, _: (body(c), None)
            carry, _ = jax.lax.scan(step, carry, length=max_new - 1)
        n_gen, out_tok, out_lp = carry[4:7]
        mask = (jnp.arange(max_new)[None, :] < n_gen[:, None]).astype(jnp.float32)
        return GenerateOutput(out_tok, out_lp, mask, n_gen)

    return jax.jit(run, compiler_options=compiler_options(gemm, fused))


def compiler_options(gemm: str, fused: bool) -> dict | None:
    """XLA options of a decode program: none for XLA's gemms; for cuBLAS's, Triton gemms off
    and, over separate projections, XLA's dot merger off too — it would join q|k|v (gate|up)
    into one cuBLAS call by concatenating their weights inside the loop, every token."""
    if gemm != "cublas":
        return None
    return CUBLAS_COMPILER_OPTIONS if fused else {**CUBLAS_COMPILER_OPTIONS, **NO_DOT_MERGER}


DECODE_NORMS = ("xla", "fold")


def resolve_decode_gemm(name: str, mesh=None, quantize: str = "none", cuda: bool | None = None,
                        rows: int = CUBLAS_MIN_ROWS, params=None) -> str:  # fmt: skip
    """ "xla" or "cublas" for a `decode_gemm` option. "auto" is "cublas" on CUDA GPUs (the
    mesh's devices, else jax's) when the weights are floats, no mesh axis splits the heads
    (`tensor` of size 1) and each device decodes at least `CUBLAS_MIN_ROWS` `rows`, else "xla"
    (XLA's own choice: Triton gemm fusions on GPUs).
    int8 weights keep XLA's: the Triton gemm converts them as it loads them, where a cuBLAS
    call would need a dequantized bf16 copy written every step. They are int8 with
    `quantize="int8"`, or when `params` (arrays or their shapes) hold int8 kernels already
    (`quant.quantize_params` run beforehand, `quant.is_quantized`). `cuda`: whether the
    program targets a CUDA GPU, when not the devices' (bench/gpu_aot.py compiles for one from
    a CPU)."""
    if name not in DECODE_GEMMS:
        raise ValueError(f"generate: decode_gemm must be one of {DECODE_GEMMS}, got {name!r}")
    if name != "auto":
        return name
    if cuda is None:
        cuda = decode_kernel.runs_natively(None if mesh is None else list(mesh.devices.flat))
    split_heads = mesh is not None and dict(mesh.shape).get("tensor", 1) > 1
    int8 = quantize != "none" or quant.is_quantized(params)
    if int8 or split_heads or rows < CUBLAS_MIN_ROWS or not cuda:
        return "xla"
    return "cublas"


def resolve_decode_attention(name: str, mesh=None) -> str:
    """ "xla" or "pallas" for a `decode_attention` option: "auto" is the kernel on CUDA GPUs
    (the mesh's devices, else jax's) and XLA's attention elsewhere; others are checked."""
    if name == "auto":
        devices = None if mesh is None else list(mesh.devices.flat)
        return "pallas" if decode_kernel.runs_natively(devices) else "xla"
    if name == "xla":
        return name
    if not name.startswith("pallas"):
        raise ValueError(f"generate: decode_attention must be 'auto', 'xla' or 'pallas', got "
                         f"{name!r}")  # fmt: skip
    decode_kernel.variant_options(name)  # a tuned variant, "pallas:BK:W:S": checked here
    return name


def checked_cache_dtype(cache_dtype, cfg: ModelConfig) -> str:
    """The KV cache dtype's name: `cache_dtype`, default the model's compute dtype; a float
    dtype or "int8" (`transformer.init_cache`), else a ValueError naming it."""
    try:
        dtype = jnp.dtype(cache_dtype or cfg.dtype)
    except TypeError:
        dtype = None
    if dtype is None or not (jnp.issubdtype(dtype, jnp.floating) or dtype == jnp.int8):
        raise ValueError(f"generate: cache_dtype={cache_dtype!r}; expected a float dtype "
                         "(bfloat16, float32, ...) or 'int8'")  # fmt: skip
    return dtype.name


def repeat_rows(x, samples: int, rows: int):
    """Row b of `x` repeated `samples` times in place (b·samples + g), the first `rows` kept."""
    return jnp.repeat(x, samples, axis=0, total_repeat_length=x.shape[0] * samples)[:rows]


# ----------------------------------------------------------------------------------------------
# Public API


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


def generate(
    cfg: ModelConfig,
    params,
    prompts,
    *,
    max_new_tokens: int,
    rng,
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
    fuse_projections: bool | None = None,
    check_every: int = 1,
    decode_attention: str = "auto",
    window_cache: bool = True,
    num_samples: int = 1,
    stop_strings: stop_text.StopStrings | None = None,
    decode_mlp: str = "xla",
    quantize: str = "none",
    decode_gemm: str = "auto",
    decode_norm: str = "xla",
) -> GenerateOutput:
    """Samples up to `max_new_tokens` tokens after each prompt with a KV cache.

    Args:
      cfg, params: the model (params in either layer layout, any dtype; sharded or not).
      prompts: a list of token-id lists, or a (B, P) int array right-padded, with
        `prompt_lengths` (B,) giving each row's real length.
      max_new_tokens: N >= 1, the output width (and the decode-loop bound). A prompt plus N
        beyond cfg.max_seq_len runs (positions extrapolate) with a warning; see above.
      rng: a PRNG key; the same key gives the same samples for the same prompt at the same row
        index, whatever the other rows hold. Or one key per prompt (`prompt_keys`): then each
        prompt's samples follow its own key, whatever its row (see "Sampling noise" above).
      temperature: 0 = greedy (argmax); else logits are divided by it before sampling.
      top_k: keep only the k most likely tokens (0 = off). top_p: nucleus mass (1 = off).
        min_p: drop tokens less likely than min_p times the most likely one (0 = off); applied
        in HF's order, temperature → top-k → top-p → min-p.
      stop_tokens: ids that end a row (the stop token is kept and counted in mask/lengths):
        a sequence, a set, a numpy or jax array, or one id (`stop_token_ids`).
      stop_strings: `models.stop_strings.StopStrings.build(tokenizer, ["\\n\\n", ...])`: a row
        also ends at the first token after which its generated text contains one of these
        strings (that token kept and counted; callers cut the text at the string).
      pad_id: what fills `tokens` after a row ended (any int; prompts are padded with 0).
      mesh, rules: generate under this mesh with these logical-axis rules (use the training
        ones so training-sharded params are used in place); the batch is split over data×fsdp
        (padded up to a multiple of it internally). Several processes: each passes the whole
        batch and gets the whole output (module docstring, "Several processes").
      cache_dtype: KV cache dtype; default the model's compute dtype. "int8" stores int8 keys
        and values with a float32 scale per token and head (`transformer.init_cache`; 53% of
        a bf16 cache's bytes at head dim 64); attention reads them through the scales, no
        dequantized copy (`attention.cached_attention`; the Pallas kernel likewise). The
        prefill attends over its own float keys; every decode step over the quantized cache.
      fuse_projections: decode with one q|k|v and one gate|up matmul per layer, the weights
        concatenated once per call (see above). The concatenated copy lives for the call
        (1.1B bf16 weights: 1.1 GB more peak). None (the default): True when `decode_gemm`
        resolves to "cublas" — cuBLAS cannot read two weights as one, so XLA's dot merger
        would concatenate them inside the loop, every token (2.4 GiB more traffic per 1.1B
        batch-64 step compiled for the H200; `decode_mlp="pallas"` reads the concatenated
        gate|up too) — else False. False
        with cuBLAS turns the dot merger off instead (`compiler_options`): separate calls
        over the stored weights, no copy (H200 compile: 285 kernels per step against 197).
      decode_gemm: how XLA:GPU runs the program's matmuls. "cublas": every matmul a cuBLAS
        call (`CUBLAS_COMPILER_OPTIONS`); "xla": XLA's choice (Triton gemm fusions); "auto"
        (the default): "cublas" on CUDA GPUs for float weights without a tensor-split mesh,
        from 64 rows per device (`resolve_decode_gemm`), measured 11% faster per 1.1B
        batch-64 step on the H200 (bench/RESULTS.md); "xla" elsewhere and for fewer rows.
        Other backends ignore the choice.
      check_every: with stop tokens, test "every row stopped" once per this many tokens (a
        device-to-host read per test on a GPU); the output is the same for any value.
      decode_attention: "pallas": each decode step's attention as one fused kernel per layer
        that reads only the cache slots written so far (models/decode_attention.py; Triton on
        CUDA GPUs, Pallas' interpreter elsewhere — slow, for tests); "xla": XLA's attention
        over the whole buffer; "auto" (the default): "pallas" on CUDA GPUs (the mesh's, else
        jax's devices), where it measured faster (bench/RESULTS.md, 2026-11-30 lease: 8% at
        batch 64, 1% at batch 1), "xla" elsewhere. Under a mesh the kernel runs per device
        on the local rows; with heads split over a tensor axis the XLA path runs instead.
        "pallas:BK:W:S": the kernel with key block BK, W warps and S pipeline stages
        (`decode_attention.variant_options`; the defaults are 64, 4, 2), for tuning by
        bench/decode_kernels.py's timings.
      decode_mlp: "pallas": each decode step's MLP silu(gate)·up as one Pallas kernel
        (models/decode_mlp.py; a candidate measured by bench/decode_kernels.py, not yet a
        default; without a mesh, or one whose axes are all of size 1); "xla" (the default).
        "pallas:BN:BK:W:S": the kernel with column block BN, row step BK, W warps and S
        stages (`decode_mlp.variant_options`; the defaults are 32, 128, 4, 3). "pallas_t"
        (and "pallas_t:BN:BK:W:S"): the kernel over gate|up transposed to (2F, D) once per
        call (`transformer.transpose_gate_up`), whose rows it reads in longer contiguous runs;
        dense float models.
      decode_norm: "fold": each layer's pre-norm scales are multiplied into the q|k|v and
        gate|up weights once per call (`transformer.fold_norms`), and the decode steps'
        kernels divide by the rows' rms themselves — the Pallas attention kernel before RoPE
        (d_model a power of two), the `decode_mlp="pallas"` kernel after its dots — so those
        RMSNorm kernels do not run (x/rms(x)·g·W = x·(g⊙W)/rms(x); rounding differs from
        the unfolded model's in the last bits). Paths without those kernels (prefill, XLA's)
        normalise without the scale first. Pre-norm models without q|k|v biases, q/k norms
        or experts (`transformer.fold_norms_unsupported`); a candidate, not yet a default.
        "xla" (the default): RMSNorm as the model runs it.
      window_cache: sliding-window layers keep a ring of `cfg.sliding_window` slots instead of
        the whole prompt + N (`transformer.init_cache(..., rings=True)`) when that is fewer:
        the same tokens, less memory, and those layers' steps read W slots (with
        decode_attention="pallas", through the kernel when W is a multiple of its key
        block, 64; else the XLA path). False keeps full caches everywhere.
      num_samples: G >= 1 samples of each prompt, rows b·G + g of the output (prompt b, sample
        g): the rows `[p for p in prompts for _ in range(G)]` would give, but each prompt's
        prefill runs once and its cache is copied to its G rows (GRPO's groups: a long
        prompt's prefill costs G times less compute and activation memory). With one key the
        samples are those of the repeated prompts (up to float rounding); with per-prompt
        keys, sample g of prompt b draws from `fold_in(rng[b], g)` (a prompt's G samples
        depend only on its own key).
      quantize: "int8" decodes with int8 projection weights and a scale per output channel
        (models/quant.py; half the weight bytes of bf16, dequantized inside the matmuls):
        the model decoded is the quantized one, its logprobs included. "none" (the default).
        Params quantized beforehand (`quant.quantize_params`) decode as that int8 model with
        either value: fused projections concatenate their scales too, "auto" keeps XLA's
        gemms for them as for "int8", and decode_norm="fold" is refused (a norm scale per
        input row cannot be folded into a kernel quantized per output channel as it is).

    Returns: GenerateOutput (see its fields; logprobs are the unmodified model's, at T=1).
    """
    options = {k: v for k, v in locals().items() if k not in ("cfg", "params", "prompts", "rng")}
    fn, tokens, lengths, rest, B, rows = _program(cfg, prompts, params=params, **options)
    rng = _row_keys(rng, B // num_samples, rows, num_samples)
    out = call_program("generate", fn, (params,), tokens, lengths, rng, rest, mesh, rules)
    return out if rows == B else jax.tree.map(lambda x: x[:B], out)


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


def generate_program(cfg: ModelConfig, prompts, *, rng, **kw) -> tuple:
    """(jitted program, its arguments after the params) of the call `generate(cfg, params,
    prompts, rng=rng, **kw)` (no mesh), to lower and compile it without running it: for
    counting what one decode step launches (bench/decode.py) and compiling for a GPU this
    machine does not have (bench/gpu_aot.py, which passes abstract arrays)."""
    if kw.get("mesh") is not None:
        raise ValueError("generate_program: no mesh")
    call = inspect.signature(generate).bind(cfg, None, prompts, rng=rng, **kw)
    call.apply_defaults()  # generate's defaults, the one place they are written
    options = {k: v for k, v in call.arguments.items() if k not in ("cfg", "params", "prompts")}
    del options["rng"]
    fn, tokens, lengths, rest, B, rows = _program(cfg, prompts, **options)
    G = options["num_samples"]
    return fn, (tokens, lengths, _row_keys(rng, B // G, rows, G), *rest)


def _row_keys(rng, n_prompts: int, rows: int, samples: int = 1):
    """`rng` as the program takes it: one key as is; per-prompt keys checked against the
    prompts, made one per sample (`fold_in(key, g)`) when `samples` > 1, and padded (with
    row 0's key) to the rows the program's loop runs."""
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


def compiled_generate_text(cfg: ModelConfig, params, prompts, *, rng, **kw) -> str:
    """The optimised HLO of the program `generate(cfg, params, prompts, rng=rng, **kw)` runs
    (no mesh). After such a `generate` call the program is traced and lowered again but the
    executable comes from jax's cache."""
    fn, args = generate_program(cfg, prompts, rng=rng, **kw)
    return fn.lower(params, *args).compile().as_text()


def _program(
    cfg: ModelConfig,
    prompts,
    *,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    min_p,
    stop_tokens,
    pad_id,
    prompt_lengths,
    stop_strings,
    mesh,
    rules,
    cache_dtype,
    fuse_projections,
    check_every,
    decode_attention,
    window_cache,
    num_samples,
    decode_mlp,
    quantize,
    decode_gemm,
    decode_norm,
    params=None,
):
    """(jitted program, tokens, lengths, the traced scalars after rng, output rows asked for
    (prompts × num_samples), rows the decode loop runs) of a generate call (every option as
    `generate` documents and defaults it), its arguments checked; the rows padded up to
    MIN_ROWS and the mesh's data×fsdp multiple (beyond the prompts). `params` (or their
    shapes; None: float weights assumed) only say whether the weights are int8 already."""
    stop_tokens = stop_token_ids(stop_tokens)
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if check_every < 1:
        raise ValueError(f"generate: check_every must be >= 1, got {check_every}")
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: need top_k >= 0 and 0 < top_p <= 1, got {top_k}, {top_p}")
    if not 0.0 <= min_p < 1.0:
        raise ValueError(f"generate: need 0 <= min_p < 1, got {min_p}")
    if not (isinstance(num_samples, (int, np.integer)) and num_samples >= 1):
        raise ValueError(f"generate: num_samples must be an int >= 1, got {num_samples!r}")
    cache_dtype = checked_cache_dtype(cache_dtype, cfg)
    decode_attention = resolve_decode_attention(decode_attention, mesh)
    prequantized = quant.is_quantized(params)  # int8 kernels from quant.quantize_params
    if decode_mlp != "xla":
        transposed = decode_mlp_kernel.variant_options(decode_mlp).get("transposed", False)
        if transposed and (quantize != "none" or prequantized or cfg.n_experts):
            raise ValueError(f"generate: decode_mlp={decode_mlp!r} streams a dense model's float "
                             "gate|up (not with quantize or experts): use 'pallas'")  # fmt: skip
    if quantize not in quant.MODES:
        raise ValueError(f"generate: quantize must be one of {quant.MODES}, got {quantize!r}")
    if decode_norm not in DECODE_NORMS:
        raise ValueError(f"generate: decode_norm must be one of {DECODE_NORMS}, got "
                         f"{decode_norm!r}")  # fmt: skip
    if decode_norm == "fold" and (why := fold_norms_unsupported(cfg)):
        raise ValueError(f"generate: decode_norm='fold' does not apply to this model: {why}")
    if decode_norm == "fold" and prequantized:
        # A norm's scale is per input row of a kernel quantized per output channel: folding it
        # in would mean quantizing g⊙W again — another model than the int8 one given.
        raise ValueError("generate: decode_norm='fold' needs float weights, and these params "
                         "hold int8 kernels quantized beforehand (quant.quantize_params): the "
                         "norm scales cannot be folded into them without quantizing again. "
                         "Pass the float params with quantize='int8' (folded, then quantized) "
                         "or use decode_norm='xla'")  # fmt: skip
    tokens, lengths = _prepare_prompts(prompts, prompt_lengths, cfg.vocab_size)
    B = tokens.shape[0]
    warn_past_max_seq_len("generate", cfg, lengths, max_new_tokens, stacklevel=3)
    # Rows the program runs, beyond the prompts copies of row 0 (cut off again in `generate`):
    # at least MIN_ROWS, and under a mesh a multiple of data×fsdp, so the rows run sharded.
    # With num_samples G > 1 the prefill's rows (the prompts) and the loop's (G per prompt)
    # are each padded so: two prompts × 4 samples on 8 devices prefill 8 rows, decode 8.
    G, m = int(num_samples), 1
    if mesh is not None:
        rules, m = tuple(rules or ()), batch_divisor(mesh)
    rows = max(B, MIN_ROWS) if G == 1 else B
    rows += -rows % m
    loop_rows = rows if G == 1 else B * G + (-B * G) % m
    if rows > B:
        tokens = np.concatenate([tokens, np.repeat(tokens[:1], rows - B, 0)])
        lengths = np.concatenate([lengths, np.repeat(lengths[:1], rows - B, 0)])
    decode_gemm = resolve_decode_gemm(decode_gemm, mesh, quantize, rows=loop_rows // m,
                                      params=params)  # fmt: skip
    if fuse_projections is None:
        fuse_projections = decode_gemm == "cublas"
    greedy = temperature == 0
    fn = _decode_fn(
        cfg,
        int(max_new_tokens),
        bool(greedy),
        int(top_k),
        bool(top_p < 1.0 and not greedy),
        cache_dtype,
        mesh,
        rules,
        bool(stop_tokens) or stop_strings is not None,
        bool(fuse_projections),
        int(check_every) if stop_tokens or stop_strings is not None else 1,
        decode_attention,
        bool(min_p > 0.0 and not greedy),
        bool(window_cache),
        G,
        loop_rows if G > 1 else 0,
        decode_mlp,
        quantize,
        decode_gemm,
        decode_norm,
    )
    rest = traced_options(temperature, top_p, min_p, stop_tokens, pad_id)
    if stop_strings is not None:
        if not isinstance(stop_strings, stop_text.StopStrings):
            raise ValueError(
                "generate: stop_strings must be a models.stop_strings.StopStrings "
                f"(StopStrings.build(tokenizer, strings)), got {stop_strings!r}"
            )
        if stop_strings.table.shape[2] != cfg.vocab_size:
            raise ValueError(
                f"generate: stop_strings were built for {stop_strings.table.shape[2]} token ids, "
                f"the model has vocab_size={cfg.vocab_size} (StopStrings.build(tok, strings, "
                "vocab_size=cfg.vocab_size))"
            )
        rest = (*rest, stop_strings.arrays())
    return fn, tokens, lengths, rest, B * G, loop_rows


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


def stop_token_ids(stop_tokens, name: str = "generate") -> tuple[int, ...]:
    """`stop_tokens` as a tuple of Python ints: a sequence or set of ids, a numpy or jax array
    of them (1-D), one id, or None (none). The program's options are decided on the host
    (`bool(stop_tokens)`, their count), which an array of several ids cannot answer."""
    if stop_tokens is None:
        return ()
    if isinstance(stop_tokens, (set, frozenset)):
        stop_tokens = sorted(stop_tokens)
    ids = np.asarray(stop_tokens)
    if ids.size == 0:
        return ()
    if ids.ndim > 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name}: stop_tokens must be token ids (ints, one id or a 1-D "
                         f"sequence), got {stop_tokens!r}")  # fmt: skip
    return tuple(int(t) for t in ids.reshape(-1))


def traced_options(temperature, top_p, min_p, stop_tokens, pad_id) -> tuple:
    """The program's traced arguments after the rng: (temperature (1 when greedy), top_p, min_p
    (1 when off: log 1 = 0), stop ids, pad id). Stop ids are padded with -1 (never a token) to
    a power of two >= 4: fewer distinct programs."""
    stop = np.full(max(4, 1 << max(0, len(stop_tokens) - 1).bit_length()), -1, np.int32)
    stop[: len(stop_tokens)] = list(stop_tokens)
    return (
        jnp.asarray(1.0 if temperature == 0 else temperature, jnp.float32),
        jnp.asarray(top_p, jnp.float32),
        jnp.asarray(min_p if min_p > 0 else 1.0, jnp.float32),
        stop,
        jnp.asarray(pad_id, jnp.int32),
    )


def generate_text(
    cfg: ModelConfig,
    params,
    tokenizer,
    texts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    rng=None,
    add_bos: bool = True,
    **kw,
) -> list[str]:
    """Encodes `texts`, generates, and decodes each completion (without its stop token).

    `tokenizer` has encode(text, bos=) / decode(ids) / eos_id / pad_id / bos_id (our
    SentencePiece Tokenizer and hf.HFTokenizer both do). Stops at eos (an HF tokenizer's
    `stop_ids`) unless `stop_tokens` is given; `stop_strings` may be plain strings here (the
    tables are built for `tokenizer`), each completion cut before the first; `rng` defaults to
    PRNGKey(0); other keywords go to `generate`.
    """
    strings = kw.get("stop_strings")
    if strings is not None and not isinstance(strings, stop_text.StopStrings):
        strings = [strings] if isinstance(strings, str) else list(strings)
        kw["stop_strings"] = stop_text.StopStrings.build(tokenizer, strings, cfg.vocab_size)
    cut_at = kw["stop_strings"].strings if kw.get("stop_strings") is not None else ()
    prompts = [tokenizer.encode(t, bos=add_bos and tokenizer.bos_id >= 0) for t in texts]
    eos = (tokenizer.eos_id,) if tokenizer.eos_id >= 0 else ()
    kw.setdefault("stop_tokens", tuple(getattr(tokenizer, "stop_ids", ()) or eos))
    kw["stop_tokens"] = stop_token_ids(kw["stop_tokens"])  # (an array of ids too)
    kw.setdefault("pad_id", max(tokenizer.pad_id, 0))
    rng = jax.random.PRNGKey(0) if rng is None else rng
    out = generate(cfg, params, prompts, max_new_tokens=max_new_tokens, rng=rng, **kw)
    toks, lengths = jax.device_get((out.tokens, out.lengths))
    stops = set(kw["stop_tokens"])
    texts_out = []
    for row, n in zip(toks, lengths):
        ids = [int(t) for t in row[:n]]
        if ids and ids[-1] in stops:
            ids = ids[:-1]
        text = tokenizer.decode(ids)
        cut = min((i for i in (text.find(s) for s in cut_at) if i >= 0), default=len(text))
        texts_out.append(text[:cut])
    return texts_out
