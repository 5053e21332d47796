"""Generation: one jitted prefill plus a decode loop over a preallocated KV cache (samplers:
models/sampling.py).

    out = generate(cfg, params, [[1, 5, 9], [1, 7]], max_new_tokens=32, rng=key, temperature=0.7)
    out.tokens (B, N) int32 · out.logprobs (B, N) float32 · out.mask (B, N) float32
    out.lengths (B,) int32 · with top_logprobs=K (a TopGenerateOutput): out.top_ids (B, N, K)
    int32, out.top_logprobs (B, N, K) float32

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
of the decoder: alignment/rl_rollout.py). `top_logprobs=K` also returns, at each generated
position, the K most likely tokens of that same distribution and their logprobs, most likely
first (OpenAI's and vLLM's `top_logprobs`): what the model considered, for calibration and
token-level analysis — so a token the sampler or a penalty ruled out can be listed, and a
sampled token may be missing from its position's list (its own logprob is in `logprobs`).

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
min_p>0?, any penalty?, any stop tokens? (their count rounded up to a power of two >= 4), mesh,
rules, fused?, check_every, decode_attention, decode_mlp, window_cache, num_samples, stop
strings? (their count rounded up to a power of two and their states to 8), top_logprobs K (0:
the program without them)). Temperature, top_p, min_p, the penalties, the stop-token ids, the
stop strings' tables, pad id and the RNG are traced: changing them does not recompile.
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

Where the code is: this module holds the API (`generate`; `generate_program` and
`compiled_generate_text` for benches) and turns a call's options into a program (`_program`).
The jitted program itself is models/decode_program.py, resolving and checking the options
models/decode_options.py, prompt padding, per-row keys and the call under a mesh and across
processes models/decode_batch.py, `generate_text` models/decode_text.py. Their names are
importable from here too.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import jax
import numpy as np

# decode_kernel: tests patch `decode.decode_kernel.runs_natively`.
from flaxlm.models import decode_attention as decode_kernel  # noqa: F401
from flaxlm.models import quant
from flaxlm.models import stop_strings as stop_text
from flaxlm.models.config import ModelConfig

# The decoder's parts live in models/decode_*.py; every name callers (models/speculative.py,
# alignment/, bench/, tests/) import from `flaxlm.models.decode` stays importable from here.
from flaxlm.models.decode_batch import (  # noqa: F401  (re-exported)
    MIN_BUCKET,
    MIN_ROWS,
    _prepare_prompts,
    _replicate,
    _row_keys,
    _typed_key,
    call_program,
    prompt_bucket,
    warn_past_max_seq_len,
)
from flaxlm.models.decode_options import (  # noqa: F401  (re-exported)
    CUBLAS_COMPILER_OPTIONS,
    CUBLAS_MIN_ROWS,
    DECODE_GEMMS,
    DECODE_NORMS,
    NO_DOT_MERGER,
    check_penalties,
    check_sampler_options,
    check_weight_options,
    checked_cache_dtype,
    checked_stop_strings,
    checked_top_logprobs,
    compiler_options,
    penalty_values,
    resolve_decode_attention,
    resolve_decode_gemm,
    resolve_decode_norm,
    stop_token_ids,
    traced_options,
)
from flaxlm.models.decode_program import (  # noqa: F401  (re-exported)
    GenerateOutput,
    TopGenerateOutput,
    _constrain_cache,
    _decode_fn,
    _decode_params,
    decode_config,
    repeat_rows,
)
from flaxlm.models.decode_text import generate_text  # noqa: F401  (re-exported)
from flaxlm.models.sampling import (  # noqa: F401  (prompt_keys, sample_logits: public here too)
    is_key_batch,
    prompt_keys,
    sample_logits,
    step_key,
)
from flaxlm.models.sharding import batch_divisor


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
    decode_norm: str = "auto",
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    top_logprobs: int = 0,
) -> GenerateOutput | TopGenerateOutput:
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
      repetition_penalty: r > 0 (1 = off): each token already in the row's prompt or output
        has its logit divided by r where positive, multiplied by r where negative (HF's
        `repetition_penalty`). frequency_penalty f, presence_penalty p (0 = off): each token's
        logit minus f times the number of times the row generated it, minus p if it did
        (OpenAI's; the prompt does not count). Applied to the logits before temperature and
        the filters, greedy decoding included, in vLLM's order (`sampling.penalized_logits`),
        except that the stop tokens are never penalized (unlike HF and vLLM: a chat prompt
        holds the end-of-turn token, and a repetition penalty on it kept the tiny demo model's
        answers from ending). The values are traced (one program for any values), but a call
        with any penalty runs another program, which keeps two (B, V) arrays per call. The
        logprobs stay the unmodified model's.
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
        (`decode_attention.variant_options`; the defaults are 128, 4, 2), for tuning by
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
        or experts (`transformer.fold_norms_unsupported`). "xla": RMSNorm as the model runs
        it. "auto" (the default): "fold" where it measured faster — the Pallas attention
        kernel on a CUDA GPU with cuBLAS gemms and decode_mlp "xla", float weights, d_model a
        power of two (the H200's 1.1B batch-64 step: 1.27 ms against 1.32,
        `decode_options.resolve_decode_norm`) — else "xla".
      window_cache: sliding-window layers keep a ring of `cfg.sliding_window` slots instead of
        the whole prompt + N (`transformer.init_cache(..., rings=True)`) when that is fewer:
        the same tokens, less memory, and those layers' steps read W slots (with
        decode_attention="pallas", through the kernel when W is a multiple of 16: key blocks
        of 128, or the largest power of two that divides W; else the XLA path). False keeps
        full caches everywhere.
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
      top_logprobs: K >= 0 (0, the default: off, the program and output as without it). K > 0:
        a `TopGenerateOutput`, whose `top_ids` and `top_logprobs` (B, N, K) hold each
        generated position's K
        most likely tokens and their logprobs under the unmodified model at temperature 1 —
        the distribution `logprobs` is read from, not the filtered or penalized one the token
        was drawn from — most likely first (ties: the lower id first); pad_id and 0 where
        `mask` is 0. Greedy without penalties: `tokens == top_ids[..., 0]`. K is a static key
        (one program per K); the loop keeps the two (B, N, K) arrays and a top-K of the
        vocabulary per token. An int <= cfg.vocab_size. (`speculative_generate` has no such
        option.)

    Returns: GenerateOutput (see its fields; logprobs are the unmodified model's, at T=1), or
    with `top_logprobs` > 0 a TopGenerateOutput (the same four fields, `top_ids` and
    `top_logprobs`).
    """
    options = {k: v for k, v in locals().items() if k not in ("cfg", "params", "prompts", "rng")}
    fn, tokens, lengths, rest, B, rows = _program(cfg, prompts, params=params, **options)
    rng = _row_keys(rng, B // num_samples, rows, num_samples)
    out = call_program("generate", fn, (params,), tokens, lengths, rng, rest, mesh, rules)
    return out if rows == B else jax.tree.map(lambda x: x[:B], out)


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


def compiled_generate_text(cfg: ModelConfig, params, prompts, *, rng, **kw) -> str:
    """The optimised HLO of the program `generate(cfg, params, prompts, rng=rng, **kw)` runs
    (no mesh). After such a `generate` call the program is traced and lowered again but the
    executable comes from jax's cache."""
    fn, args = generate_program(cfg, prompts, rng=rng, **kw)
    return fn.lower(params, *args).compile().as_text()


# `_program` stays here, and calls `_decode_fn` through this module's globals: tests
# replace `decode._decode_fn` (monkeypatch) to see or count the programs built.
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
    repetition_penalty=1.0,
    frequency_penalty=0.0,
    presence_penalty=0.0,
    top_logprobs=0,
    params=None,
):
    """(jitted program, tokens, lengths, the traced scalars after rng, output rows asked for
    (prompts × num_samples), rows the decode loop runs) of a generate call (every option as
    `generate` documents and defaults it), its arguments checked; the rows padded up to
    MIN_ROWS and the mesh's data×fsdp multiple (beyond the prompts). `params` (or their
    shapes; None: float weights assumed) only say whether the weights are int8 already."""
    stop_tokens = stop_token_ids(stop_tokens)
    check_sampler_options(max_new_tokens, temperature, check_every, top_k, top_p, min_p,
                          num_samples)  # fmt: skip
    penalize = check_penalties(repetition_penalty, frequency_penalty, presence_penalty)
    top_logprobs = checked_top_logprobs(top_logprobs, cfg.vocab_size)
    cache_dtype = checked_cache_dtype(cache_dtype, cfg)
    decode_attention = resolve_decode_attention(decode_attention, mesh)
    prequantized = quant.is_quantized(params)  # int8 kernels from quant.quantize_params
    # ("auto" resolves below, once the matmuls are chosen; it never asks for what cannot fold)
    check_weight_options(cfg, decode_mlp, quantize, "xla" if decode_norm == "auto" else decode_norm,
                         prequantized)  # fmt: skip
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
    decode_norm = resolve_decode_norm(decode_norm, cfg, decode_attention, decode_gemm,
                                      decode_mlp, quantize != "none" or prequantized,
                                      mesh=mesh)  # fmt: skip
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
        penalize,
        top_logprobs,
    )
    rest = traced_options(temperature, top_p, min_p, stop_tokens, pad_id)
    if stop_strings is not None or penalize:
        strings = None if stop_strings is None else checked_stop_strings(stop_strings, cfg)
        rest = (*rest, None if strings is None else strings.arrays())
    if penalize:
        rest = (*rest, penalty_values(repetition_penalty, frequency_penalty, presence_penalty))
    return fn, tokens, lengths, rest, B * G, loop_rows
