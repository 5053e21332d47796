"""The decode program's options as the host settles them, before any program is built
(`generate` in models/decode.py documents each): the "auto" choices resolved for the devices
(`resolve_decode_gemm`, `resolve_decode_attention`, `resolve_decode_norm`), the other values
checked with errors that name `generate`'s argument, the XLA compiler options a matmul choice
compiles with (`compiler_options`), and the program's traced arguments after the rng
(`traced_options`).

Separate from the program itself (models/decode_program.py) because none of this is traced:
it decides which program to build and with what, and models/speculative.py and the RL
rollouts (alignment/rl_rollout.py) settle their options with the same functions.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from flaxlm.models import decode_attention as decode_kernel
from flaxlm.models import decode_mlp as decode_mlp_kernel
from flaxlm.models import quant
from flaxlm.models import stop_strings as stop_text
from flaxlm.models.config import ModelConfig
from flaxlm.models.transformer import fold_norms_unsupported

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


def compiler_options(gemm: str, fused: bool) -> dict | None:
    """XLA options of a decode program: none for XLA's gemms; for cuBLAS's, Triton gemms off
    and, over separate projections, XLA's dot merger off too — it would join q|k|v (gate|up)
    into one cuBLAS call by concatenating their weights inside the loop, every token."""
    if gemm != "cublas":
        return None
    return CUBLAS_COMPILER_OPTIONS if fused else {**CUBLAS_COMPILER_OPTIONS, **NO_DOT_MERGER}


DECODE_NORMS = ("auto", "xla", "fold")


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


def resolve_decode_norm(name: str, cfg: ModelConfig, attention: str, gemm: str, mlp: str,
                        int8: bool, cuda: bool | None = None, mesh=None) -> str:  # fmt: skip
    """ "xla" or "fold" for a `decode_norm` option, after the other options are resolved
    (`attention`, `gemm`; `int8`: quantize="int8" or int8 params). "auto" is "fold" where it
    was measured faster: the H200's 1.1B batch-64 step took 1.27 ms with the attention's norm
    folded against 1.32 without, both with the Pallas attention kernel (key blocks 128), cuBLAS
    gemms and XLA's MLP (bench/RESULTS.md, 2026-12-04 evening lease) — one RMSNorm kernel per
    layer fewer. So: the Pallas attention kernel on a CUDA GPU (`cuda`: whether the program
    targets one, when not the devices'), cuBLAS gemms, decode_mlp "xla" (folded with the
    Pallas gate|up kernel the step was slower, 1.35-1.39 ms), float weights, a model the fold
    applies to (`fold_norms_unsupported`) whose rows the kernel can load whole (d_model a
    power of two) and whose heads it rotates whole. Else "xla"; "xla" and "fold" as given."""
    if name != "auto":
        return name
    if cuda is None:
        cuda = decode_kernel.runs_natively(None if mesh is None else list(mesh.devices.flat))
    half = cfg.head_dim_ // 2
    kernel_runs = (attention.startswith("pallas") and cfg.rotary_dim_ == cfg.head_dim_
                   and half >= 16 and half & (half - 1) == 0)  # fmt: skip
    applies = not fold_norms_unsupported(cfg) and decode_kernel.norm_supports(cfg.d_model)
    if cuda and kernel_runs and gemm == "cublas" and mlp == "xla" and not int8 and applies:
        return "fold"
    return "xla"


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


def check_sampler_options(max_new_tokens, temperature, check_every, top_k, top_p, min_p,
                          num_samples) -> None:  # fmt: skip
    """A ValueError naming `generate`'s argument for an out-of-range length, sampler or
    `check_every` / `num_samples` value."""
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= temperature < float("inf"):  # (NaN passed `temperature < 0`: all token 0s)
        raise ValueError(f"generate: temperature must be finite and >= 0, got {temperature}")
    if check_every < 1:
        raise ValueError(f"generate: check_every must be >= 1, got {check_every}")
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: need top_k >= 0 and 0 < top_p <= 1, got {top_k}, {top_p}")
    if not 0.0 <= min_p < 1.0:
        raise ValueError(f"generate: need 0 <= min_p < 1, got {min_p}")
    if not (isinstance(num_samples, (int, np.integer)) and num_samples >= 1):
        raise ValueError(f"generate: num_samples must be an int >= 1, got {num_samples!r}")


def checked_top_logprobs(top_logprobs, vocab_size: int) -> int:
    """`top_logprobs` K as the program's static int; a ValueError naming it unless an int with
    0 <= K <= vocab_size (a bool is no count)."""
    k = top_logprobs
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= vocab_size:
        raise ValueError(f"generate: top_logprobs must be an int in [0, vocab_size="
                         f"{vocab_size}] (0 = off), got {top_logprobs!r}")  # fmt: skip
    return int(k)


def check_penalties(repetition_penalty, frequency_penalty, presence_penalty) -> bool:
    """Whether a call applies penalties (the program's static choice); a ValueError naming
    `generate`'s argument for a repetition penalty that is not finite and > 0, or a frequency
    or presence penalty that is not finite. (Negative frequency and presence penalties are
    allowed: they favour repeating, as OpenAI's API lets them.)"""
    if not 0 < repetition_penalty < float("inf"):
        raise ValueError(f"generate: repetition_penalty must be finite and > 0 (1 = off), got "
                         f"{repetition_penalty}")  # fmt: skip
    for name, value in (("frequency_penalty", frequency_penalty),
                        ("presence_penalty", presence_penalty)):  # fmt: skip
        if not -float("inf") < value < float("inf"):
            raise ValueError(f"generate: {name} must be finite (0 = off), got {value}")
    return repetition_penalty != 1 or frequency_penalty != 0 or presence_penalty != 0


def penalty_values(repetition_penalty, frequency_penalty, presence_penalty):
    """The penalties as the program takes them: one float32 array (r, f, p), traced."""
    return jnp.asarray([repetition_penalty, frequency_penalty, presence_penalty], jnp.float32)


def check_weight_options(cfg: ModelConfig, decode_mlp: str, quantize: str, decode_norm: str,
                         prequantized: bool) -> None:  # fmt: skip
    """A ValueError naming `generate`'s argument for a `decode_mlp`, `quantize` or `decode_norm`
    the weights cannot decode with; `prequantized`: the params hold int8 kernels already
    (`quant.is_quantized`)."""
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


def checked_stop_strings(stop_strings, cfg: ModelConfig) -> stop_text.StopStrings:
    """`stop_strings` (not None) checked: a `StopStrings` built for the model's vocab size."""
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
    return stop_strings


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
