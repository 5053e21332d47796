"""A decode step's gated-MLP first half, silu(x·W_gate) ⊙ x·W_up, as one Pallas (Triton) kernel.

Why: the 2026-11-30 H200 profile of a batch-64 decode step (bench/RESULTS.md) found the GPU busy
98% of the time and the matmul fusions taking 61% of it. XLA compiles this half of each layer's
MLP to two kernels — a merged gate|up gemm that writes split-K float32 partials, and a fusion
that sums them and applies silu(g)·u — with the fixed cost of a kernel paid twice and the
partials written and read back. This kernel streams both weights once and writes the bf16
product: each program owns `block_n` output columns, loads their (K, block_n) slices of
W_gate and W_up in `block_k`-row steps (`num_stages` steps in flight), accumulates both
products in float32 registers and stores silu(g)·u. The rows (the decode batch, read as a
block of a power of two ≥ 16 rows, the tensor-core dot's minimum, the rows past the batch
masked) are read whole by every program, from L2.

Whether it beats XLA's pair on the H200 is measured, not assumed: bench/decode_kernels.py
times it alone over tilings against XLA's pair (`gate_up:*` pieces), and bench/decode.py's
`:mlp` option decodes with it (`generate(..., decode_mlp="pallas")`); until then `generate`
keeps XLA's ("xla", the default). Numerics: float32 accumulation and activation, one rounding
to the compute dtype at the end — XLA rounds g and u to bf16 first, so bf16 results differ in
the last bit (float32 models agree to ~1e-6: tests/models/test_decode_mlp.py).

It reads gate and up either as two (D, F) weights or as the one stacked (D, 2, F) weight of
`transformer.fuse_projections` (the layout the cuBLAS decode path concatenates once per call):
the same array passed twice, its gate and up column blocks picked by the two index maps, so
the kernel combines with the cuBLAS matmuls of the other projections.

Or transposed (`decode_mlp="pallas_t"`): the (2F, D) weight of `transformer.transpose_gate_up`
(gate's F rows, then up's), each program's rows contiguous along D. Row-major (D, F) weights
give each program BN·2 bytes per row of D (64 B at BN = 32), scattered 2F·2 bytes apart; the
transposed weight gives it BK·2 bytes per row (256 B at BK = 128), the longer runs a
weight-streaming kernel reads at bandwidth with. Which pays is the GPU's to say
(bench/decode_kernels.py times both).

`norm_eps` folds the MLP's pre-norm into the kernel (`generate(..., decode_norm="fold")`):
x is then the raw residual stream and the weights the norm's scale times W
(`transformer.fold_norms`), and since x/rms(x)·W = (x·W)/rms(x) the per-row 1/rms is applied
to the float32 products at the end — its sum of squares accumulated from the same x blocks
the dots load — so the RMSNorm kernel before the MLP disappears.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Default tiling: 176 programs for the 1.1B shape's 5632 columns (more than the H200's 132
# SMs), 96 KiB of shared memory each (two fit an SM). bench/decode_kernels.py times others.
BLOCK_N = 32
BLOCK_K = 128
NUM_WARPS = 4
NUM_STAGES = 3
MIN_DOT_ROWS = 16


KERNELS = ("pallas", "pallas_t")  # (K, N) weights as stored, or transposed to (N, K)


def variant_options(name: str) -> dict:
    """The kernel options a `decode_mlp` name asks for: "pallas" the module's defaults ({}),
    "pallas:BN:BK:W:S" column block BN and row step BK (powers of two >= 16), W warps (a power
    of two) and S pipeline stages (bench/decode_kernels.py times tilings on the GPU; its best
    can be run whole with this name); "pallas_t" and "pallas_t:BN:BK:W:S" the same over the
    transposed weight ({"transposed": True, ...}). Anything else: a ValueError naming it."""
    parts = name.split(":")
    flag = {"transposed": True} if parts[0] == "pallas_t" else {}
    if name in KERNELS:
        return flag
    try:
        bn, bk, warps, stages = (int(p) for p in parts[1:]) if len(parts) == 5 else (0,) * 4
    except ValueError:
        bn = bk = warps = stages = 0
    pow2 = lambda n, least: n >= least and not n & (n - 1)  # noqa: E731
    if parts[0] not in KERNELS or not (pow2(bn, 16) and pow2(bk, 16) and pow2(warps, 1)
                                       and stages >= 1):  # fmt: skip
        raise ValueError(f"decode_mlp={name!r}: expected 'xla', 'pallas[_t]' or "
                         "'pallas[_t]:BN:BK:W:S' (column block BN and row step BK powers of two "
                         ">= 16, W warps a power of two, S >= 1 stages), e.g. "
                         "'pallas:32:128:4:3'")  # fmt: skip
    return {**flag, "block_n": bn, "block_k": bk, "num_warps": warps, "num_stages": stages}


def supports(d_model: int, d_ff: int, block_n: int = BLOCK_N, block_k: int = BLOCK_K) -> bool:
    """Whether the kernel tiles these dims: whole column and row blocks."""
    return d_ff % block_n == 0 and d_model % block_k == 0


def _kernel(x_ref, wg_ref, wu_ref, o_ref, *, block_k: int, rows: int, norm_eps: float | None,
            transposed: bool):  # fmt: skip
    """One block of output columns: x (M, K) against the block's (K, BN) slices of W_gate and
    W_up (with `transposed`, (BN, K) slices of W^T), float32 accumulators, silu(g)·u stored in
    the output dtype. Only the first `rows`
    rows are real: on GPUs the block runs past the array's rows, so loads and stores are
    masked there (Triton reads no memory for a masked element; the rows beyond are zeros).
    With `norm_eps`, both products are divided by each row's rms(x) (+ eps) first."""
    M, BN = o_ref.shape
    K = x_ref.shape[1]
    real = (jnp.arange(M) < rows)[:, None]

    def step(i, acc):
        ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        x = plgpu.load(x_ref.at[:, ks], mask=real, other=0.0)
        if transposed:
            g = acc[0] + plgpu.dot(x, wg_ref[:, ks], trans_b=True).astype(jnp.float32)
            u = acc[1] + plgpu.dot(x, wu_ref[:, ks], trans_b=True).astype(jnp.float32)
        else:
            g = acc[0] + plgpu.dot(x, wg_ref[ks, :]).astype(jnp.float32)
            u = acc[1] + plgpu.dot(x, wu_ref[ks, :]).astype(jnp.float32)
        if norm_eps is None:
            return g, u, acc[2]
        x32 = x.astype(jnp.float32)
        return g, u, acc[2] + (x32 * x32).sum(axis=1)

    zeros = jnp.zeros((M, BN), jnp.float32)
    init = (zeros, zeros, jnp.zeros((M,), jnp.float32))  # g, u, and each row's sum of x²
    g, u, ss = jax.lax.fori_loop(0, K // block_k, step, init)
    if norm_eps is not None:  # RMSNorm's 1/rms (float32, as `layers.RMSNorm`), per row
        inv_rms = jax.lax.rsqrt(ss / K + norm_eps)[:, None]
        g, u = g * inv_rms, u * inv_rms
    out = (jax.nn.silu(g) * u).astype(o_ref.dtype)
    plgpu.store(o_ref.at[:, :], out, mask=real)


def _call(x, wg, wu, *, interpret: bool, block_n: int, block_k: int, num_warps: int,
          num_stages: int, up_offset: int, norm_eps: float | None,
          transposed: bool = False):  # fmt: skip
    """`up_offset`: column blocks between a gate block and its up block — 0 for two arrays,
    F // block_n for the stacked weight passed twice as a (K, 2F) array (or, `transposed`,
    a (2F, K) one)."""
    B, K = x.shape
    N = wg.shape[0 if transposed else 1] // (1 if up_offset == 0 else 2)
    M = max(MIN_DOT_ROWS, pl.next_power_of_2(B))
    if interpret:  # the interpreter clamps a block that runs past the array where Triton
        # reads through the masks: rows of zeros make both see the same
        x = jnp.pad(x, ((0, M - B), (0, 0)))
    if transposed:  # (BN, K) row blocks of W^T
        weight_specs = [pl.BlockSpec((block_n, K), lambda j: (j, 0)),
                        pl.BlockSpec((block_n, K), lambda j: (j + up_offset, 0))]  # fmt: skip
    else:  # (K, BN) column blocks of W
        weight_specs = [pl.BlockSpec((K, block_n), lambda j: (0, j)),
                        pl.BlockSpec((K, block_n), lambda j: (0, j + up_offset))]  # fmt: skip
    kernel = functools.partial(_kernel, block_k=block_k, rows=B, norm_eps=norm_eps,
                               transposed=transposed)  # fmt: skip
    out = pl.pallas_call(
        kernel,
        grid=(N // block_n,),
        in_specs=[pl.BlockSpec((M, K), lambda j: (0, 0)), *weight_specs],
        out_specs=pl.BlockSpec((M, block_n), lambda j: (0, j)),
        out_shape=jax.ShapeDtypeStruct((x.shape[0], N), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="gate_up_silu",
    )(x, wg, wu)
    return out[:B]


def gate_up_silu(x_BD, wg_DF, wu_DF=None, *, norm_eps: float | None = None,
                 block_n: int = BLOCK_N, block_k: int = BLOCK_K, num_warps: int = NUM_WARPS,
                 num_stages: int = NUM_STAGES, transposed: bool = False):  # fmt: skip
    """silu(x·W_gate) ⊙ x·W_up for x (B, D), weights (D, F) — or, with `wu_DF` None, `wg_DF`
    the stacked (D, 2, F) gate|up weight, or with `transposed` the (2F, D) one of
    `transformer.transpose_gate_up` — in x's dtype. With `norm_eps`, x is first
    RMS-normalised without a scale (the scale folded into the weights): silu(x̂·W_gate) ⊙
    x̂·W_up, x̂ = x / sqrt(mean(x²) + eps). Triton on CUDA GPUs, Pallas' interpreter
    elsewhere (right, but slow: for tests)."""
    B, D = x_BD.shape
    stacked = wu_DF is None
    if transposed:
        ok_shapes = stacked and wg_DF.ndim == 2 and wg_DF.shape[1] == D and wg_DF.shape[0] % 2 == 0
        F = wg_DF.shape[0] // 2
    elif stacked:
        ok_shapes = wg_DF.ndim == 3 and wg_DF.shape[:2] == (D, 2)
        F = wg_DF.shape[-1]
    else:
        ok_shapes = wu_DF.shape == wg_DF.shape and wg_DF.shape[0] == D
        F = wg_DF.shape[1]
    if not supports(D, F, block_n, block_k) or not ok_shapes:
        got = wg_DF.shape if stacked else f"{wg_DF.shape} and {wu_DF.shape}"
        raise ValueError(f"gate_up_silu: x {x_BD.shape}, weights {got}; D a multiple of "
                         f"{block_k}, F of {block_n}")  # fmt: skip
    x = x_BD
    if transposed:
        wg = wu = wg_DF.astype(x.dtype)
    elif stacked:  # (D, 2, F) -> (D, 2F), free: gate columns first, then up's
        wg = wu = wg_DF.reshape(D, 2 * F).astype(x.dtype)
    else:
        wg, wu = (w.astype(x.dtype) for w in (wg_DF, wu_DF))
    options = dict(block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                   up_offset=F // block_n if stacked else 0, transposed=transposed,
                   norm_eps=None if norm_eps is None else float(norm_eps))  # fmt: skip
    out = jax.lax.platform_dependent(
        x, wg, wu,
        cuda=functools.partial(_call, interpret=False, **options),
        default=functools.partial(_call, interpret=True, **options),
    )  # fmt: skip
    return out
