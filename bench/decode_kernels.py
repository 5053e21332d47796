"""Each kernel of a decode step alone: its GPU time and the share of HBM bandwidth it reaches.

    python -m flaxlm.bench.decode_kernels --out OUT           # on the H200: the 1.1B shapes
    python -m flaxlm.bench.decode_kernels --out OUT --tiny    # CPU smoke test (wall clock)
    python -m flaxlm.bench.decode_kernels --out OUT --pieces attention   # a subset (prefixes)

Why: the 2026-11-30 lease's profile of a batch-64 decode step (1.46 ms against a 0.57 ms HBM
bound) found the GPU busy 98% of the time, Triton gemm fusions taking 61% of it and the Pallas
attention kernel 15%; the per-layer matmuls ran at 1.5–2.4 TB/s where the LM head's one large
matmul reached 3.9. Which piece is below bandwidth, and whether cuBLAS or another kernel tiling
does better, is cheaper to learn piece by piece in one short case than by one whole-decode
case per variant.

Pieces (TinyLlama-1.1B shape, bf16; batch 64, and 2 — a single prompt, which `generate` runs
as two rows):
  matmul:NAME:BACKEND   x (B, K) @ w (K, N) for each matmul of a decode step — qkv (the q|k|v
                        projections as XLA's dot merger joins them, 2048 × 2560), o, gate_up
                        (2048 × 11264, joined likewise), down, lm_head — compiled by XLA with
                        its Triton gemms (autotuned on the device, as in `generate`) or with
                        cuBLAS (the same jit with the compiler option
                        xla_gpu_enable_triton_gemm=False, per program: no process-wide flag).
  attention:pallas:BK:W:S   models/decode_attention.py at 64 rows × 4 kv heads (8 query heads
                        each), a 384-slot cache holding 256 tokens (the 128 + 256 decode's mean
                        context), key block BK, W warps, S pipeline stages; caches donated and
                        written in place, as in `generate`.
  attention:xla         the XLA path of the same step (RoPE, cache write, `cached_attention`
                        over the whole buffer), as `Attention` runs it without the kernel.
  gate_up:xla           the MLP's first half as `layers.MLP` decodes: silu(x·W_gate) ⊙ x·W_up,
                        which XLA compiles to a merged (split-K) gemm and a multiply fusion
                        that also sums the split-K partials — two kernels per layer
  gate_up:pallas:BN:BK:W:S   the same as one Pallas (Triton) kernel (models/decode_mlp.py:
                        each program streams a BN-column block of both weights over K in
                        BK-row steps, S stages in flight, and writes silu(g) ⊙ u): no float32
                        partials, one kernel. `generate(..., decode_mlp="pallas")` uses it
                        (not the default): measured here first, against gate_up:xla.
  gate_up:pallas_t:BN:BK:W:S   the same kernel over the (2F, K) transposed weight
                        (`decode_mlp="pallas_t"`): each program reads BK-long runs of its
                        BN rows instead of BN-long runs of K rows.

Timing: each program is called over rotating copies of its weights or caches (together at
least 4× the H200's 50 MB L2, so every call reads HBM, as a decode step does), the calls traced
by `jax.profiler`; `us` is a call's summed kernel time on the device (not the launch gaps: in
a decode step the kernels run back to back in one CUDA graph), `kernels` the kernel kinds
that make it up. `bytes` is what the piece must move at least (weights, activations in and
out; the cache slots read and the new slot written), `tb_s` bytes / time, `hbm` its share of
4.3 TB/s. Attention records also carry `max_abs_err_vs_xla`: the largest difference between
the piece's output and the XLA step's on the same inputs (bf16 outputs: ~1e-2 is rounding).
The default attention tiling's record and the first gate|up tiling of each weight layout also
carry `fold_max_abs_err_vs_xla`: the same check with the pre-norm folded in (`decode_norm=
"fold"`: raw rows in, the kernel dividing by their rms), so the lease shows the folded
kernels compute the step on the device before their decode is timed.
On a CPU (`--tiny`) `us` is the wall time per call and no bandwidth is reported.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time

from flaxlm.bench import driver

# The HBM bound's bandwidth, as issue 4 ("GPU performance") defines the decode goal's bound.
# The H200 SXM datasheet gives 4.8 TB/s: against that the bound is 1.12x as high and the same
# step ~11% further from it (every share of the bound × 0.90: 42.9% → 38.4%).
HBM_BYTES_PER_S = 4.3e12
L2_BYTES = 50 * 2**20  # every call reads what the previous calls left out of L2
CUBLAS = {"xla_gpu_enable_triton_gemm": False}
FOLD_EPS = 1e-5  # the RMSNorm eps of the folded-norm checks

# (model variant, batches, cache slots, tokens in the cache, the Pallas attention variants
# (block_k, warps, stages), the Pallas gate|up variants (block_n, block_k, warps, stages),
# calls per program); the tiny shape runs on the CPU through Pallas' interpreter, so it keeps
# one small variant of each.
SHAPES = {
    "1b": (
        "1b",
        (64, 2),  # 2: one prompt, which `generate` decodes as two rows (decode.MIN_ROWS)
        384,
        256,
        # Measured over every (64, 128, 256) × (4, 8) warps × (1, 2, 3) stages in the
        # 2026-12-04 lease (128/4/2 fastest, 10.4 µs; 64/4/2 11.1): the four best of them,
        # then split-K (a fourth number: parts per row and kv head; `decode_attention`'s
        # `splits`), whose programs each read a part of the key blocks.
        [(64, 4, 2), (64, 4, 3), (128, 4, 2), (256, 4, 2)]
        + [
            (64, 4, 2, 2),
            (64, 4, 2, 4),
            (64, 4, 3, 4),
            (128, 4, 2, 2),
            (32, 4, 2, 4),
            (32, 4, 2, 8),
            (32, 4, 1, 8),
            (16, 4, 2, 8),
        ],
        # (K, N) weights as stored, then transposed to (N, K) (`decode_mlp="pallas_t"`)
        [(bn, bk, 4, s) for bn in (16, 32, 64) for bk in (64, 128) for s in (3, 4)]
        + [
            ("t", bn, bk, 4, s)
            for bn in (16, 32)
            for bk in (128, 256)
            for s in (3, 4)
            # (32, 256) in 4 stages asks for 256 KiB of shared memory, over the H200's 227
            # (RESOURCE_EXHAUSTED in the 2026-12-04 lease)
            if (bn, bk, s) != (32, 256, 4)
        ],
        20,
    ),  # fmt: skip
    "tiny": (
        "tiny",
        (4,),
        128,
        64,
        [(128, 4, 2), (16, 4, 2, 2)],
        [(32, 32, 4, 3), ("t", 32, 32, 4, 3)],
        2,
    ),
}


def matmul_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(K, N) of each matmul of a decode step, q|k|v and gate|up joined as XLA joins them."""
    D, H = cfg.d_model, cfg.head_dim_
    return {
        "qkv": (D, (cfg.n_heads + 2 * cfg.n_kv_heads) * H),
        "o": (cfg.n_heads * H, D),
        "gate_up": (D, 2 * cfg.d_ff),
        "down": (cfg.d_ff, D),
        "lm_head": (D, cfg.vocab_size),
    }


def copies_for(nbytes: int, tiny: bool) -> int:
    """Rotating copies so that the calls between two uses of one copy move ≥ 4× the L2."""
    return 2 if tiny else max(2, min(32, math.ceil(4 * L2_BYTES / nbytes)))


def device_time(fn, calls: int) -> tuple[float, list]:
    """(µs per call, [[kernel kind, kernels per call, µs per call], ...]) of `calls` calls of
    `fn` (compiled and warm): on a GPU the summed kernel durations from a profiler trace; on
    other backends the wall time (and no kernel list)."""
    import jax

    if jax.default_backend() != "gpu":
        t0 = time.perf_counter()
        for i in range(calls):
            jax.block_until_ready(fn(i))
        return (time.perf_counter() - t0) / calls * 1e6, []
    import tempfile

    from jax.profiler import ProfileData

    from flaxlm.bench.trace_summary import find_xplane, kernel_kind

    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, profiler_options=opts):
            for i in range(calls):
                jax.block_until_ready(fn(i))
        data = ProfileData.from_file(find_xplane(d))
        kinds: dict[str, list] = {}
        for plane in data.planes:
            if not plane.name.startswith("/device:"):
                continue
            for line in plane.lines:
                if not line.name.startswith("Stream"):
                    continue
                for e in line.events:
                    if e.name.startswith(("Memcpy", "Memset")):
                        continue
                    agg = kinds.setdefault(kernel_kind(e.name)[:80], [0, 0.0])
                    agg[0] += 1
                    agg[1] += e.duration_ns / 1e3
    ranked = sorted(kinds.items(), key=lambda kv: -kv[1][1])
    table = [[k, round(n / calls, 2), round(t / calls, 2)] for k, (n, t) in ranked]
    return sum(t for _, (_, t) in ranked) / calls, table


def _record(piece: str, batch: int, us: float, kernels: list, nbytes: int, **extra) -> dict:
    import jax

    rec = {"case": f"{piece}:b{batch}", "piece": piece, "batch": batch, "us": round(us, 2),
           "bytes": nbytes, "kernels": kernels, "device": jax.devices()[0].device_kind,
           "jax": jax.__version__, **extra}  # fmt: skip
    if jax.default_backend() == "gpu" and us > 0:
        rec["tb_s"] = round(nbytes / us / 1e6, 3)
        rec["hbm"] = round(nbytes / us / 1e6 / (HBM_BYTES_PER_S / 1e12), 3)
    return rec


def run_matmul(cfg, name: str, backend: str, batch: int, calls: int, tiny: bool) -> dict:
    import jax
    import jax.numpy as jnp

    K, N = matmul_shapes(cfg)[name]
    dt = jnp.dtype(cfg.dtype)
    nbytes = (K * N + batch * (K + N)) * dt.itemsize
    keys = jax.random.split(jax.random.PRNGKey(0), copies_for(K * N * dt.itemsize, tiny) + 1)
    ws = [jax.random.normal(k, (K, N), dt) * 0.02 for k in keys[1:]]
    x = jax.random.normal(keys[0], (batch, K), dt)
    fn = jax.jit(jnp.dot, compiler_options=CUBLAS if backend == "cublas" else None)
    jax.block_until_ready([fn(x, w) for w in ws[:2]])  # compile (and autotune) + warm
    us, kernels = device_time(lambda i: fn(x, ws[i % len(ws)]), calls)
    return _record(f"matmul:{name}:{backend}", batch, us, kernels, nbytes, shape=[K, N])


def _attention_inputs(cfg, batch: int, slots: int, filled: int, copies: int):
    """(qkv, cos, sin, [(k, v) cache copies], mask, index) of one decode step at `filled`."""
    import jax
    import jax.numpy as jnp

    from flaxlm.models.attention import rope_tables

    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim_
    dt = jnp.dtype(cfg.dtype)
    key = jax.random.PRNGKey(1)
    qkv = jax.random.normal(key, (batch, 1, N + 2 * K, H), dt)
    cos, sin = rope_tables(cfg, jnp.full((batch, 1), filled, jnp.int32))
    caches = [
        tuple(
            jax.random.normal(jax.random.fold_in(key, 2 * c + j), (batch, K, slots, H), dt)
            for j in range(2)
        )  # fmt: skip
        for c in range(copies)
    ]
    mask = jnp.broadcast_to(jnp.arange(slots) <= filled, (batch, 1, 1, slots))
    return qkv, cos, sin, caches, mask, jnp.asarray(filled, jnp.int32)


def xla_attention_step(cfg, qkv, cos, sin, k, v, mask, idx):
    """The XLA path of one decode step's attention, as `Attention` runs it without the kernel:
    RoPE on q and k, k and v written at slot `idx`, attention over the whole buffer."""
    import jax

    from flaxlm.models.attention import apply_rope, cached_attention

    N, K = cfg.n_heads, cfg.n_kv_heads
    q, kn, vn = qkv[:, :, :N], qkv[:, :, N : N + K], qkv[:, :, N + K :]
    q, kn = apply_rope(q, cos, sin), apply_rope(kn, cos, sin)
    k, v = (jax.lax.dynamic_update_slice(buf, new.transpose(0, 2, 1, 3).astype(buf.dtype),
                                         (0, 0, idx, 0))
            for buf, new in ((k, kn), (v, vn)))  # fmt: skip
    return cached_attention(q, k, v, mask), (k, v)


def run_attention(cfg, variant, batch: int, slots: int, filled: int, calls: int,
                  tiny: bool) -> dict:  # fmt: skip
    import jax
    import jax.numpy as jnp

    from flaxlm.models import decode_attention as kernel

    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim_
    dt = jnp.dtype(cfg.dtype)
    if variant != "xla":  # the kernel's buffer is whole key blocks (as `generate` rounds it)
        slots += -slots % variant[0]
    per_cache = 2 * batch * K * slots * H * dt.itemsize
    qkv, cos, sin, caches, mask, idx = _attention_inputs(
        cfg, batch, slots, filled, copies_for(per_cache, tiny)
    )
    if variant == "xla":
        step = functools.partial(xla_attention_step, cfg)
        piece, read = "attention:xla", slots  # it reads the whole buffer
    else:
        bk, warps, stages, *splits = variant
        step = functools.partial(kernel.decode_attention, block_k=bk, num_warps=warps,
                                 num_stages=stages, splits=splits[0] if splits else 1)  # fmt: skip
        piece = "attention:pallas:" + ":".join(map(str, variant))
        read = filled  # the written slots
    fn = jax.jit(lambda q, c, s, k, v, m, i: step(q, c, s, k, v, m, i), donate_argnums=(3, 4))

    def call(i):
        j = i % len(caches)
        out, caches[j] = fn(qkv, cos, sin, *caches[j], mask, idx)
        return out

    # The XLA step's output on the first call's inputs (not donated: they stay valid), so the
    # record says the timed program computes the step (on the GPU: Triton's build of it).
    want = jax.jit(functools.partial(xla_attention_step, cfg))(qkv, cos, sin, *caches[0], mask,
                                                                idx)[0]  # fmt: skip
    extra = {}
    if variant == (kernel.BLOCK_K, kernel.NUM_WARPS, kernel.NUM_STAGES):
        # The pre-norm folded in (`decode_norm="fold"`), checked on the device once: q|k|v
        # scaled by rms(x) of random rows x, which the kernel divides out again.
        x = jax.random.normal(jax.random.PRNGKey(9), (batch, 1, cfg.d_model), dt) * 3
        rms = jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1) + FOLD_EPS)
        raw = (qkv.astype(jnp.float32) * rms[:, :, None, None]).astype(dt)
        folded = jax.jit(functools.partial(step, norm_x_BTD=x, norm_eps=FOLD_EPS))
        got = folded(raw, cos, sin, *caches[0], mask, idx)[0]  # (not donated)
        extra["fold_max_abs_err_vs_xla"] = float(jnp.max(jnp.abs(
            got.astype(jnp.float32) - want.astype(jnp.float32))))  # fmt: skip
    got = call(0)
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
    jax.block_until_ready(call(1))
    us, kernels = device_time(call, calls)
    # the cache slots attended (K and V), the new slot written, q|k|v in and the output out
    nbytes = (2 * batch * K * read * H + 2 * batch * K * H
              + batch * (2 * N + 2 * K) * H) * dt.itemsize  # fmt: skip
    return _record(piece, batch, us, kernels, nbytes, slots=slots, filled=filled,
                   max_abs_err_vs_xla=err, **extra)  # fmt: skip


def gate_up_xla(x_BK, wg_KN, wu_KN):
    """The MLP's first half as `layers.MLP` computes it when decoding (separate bf16 kernels;
    XLA's dot merger joins the two matmuls)."""
    import jax

    return jax.nn.silu(x_BK @ wg_KN) * (x_BK @ wu_KN)


def run_gate_up(cfg, variant, batch: int, calls: int, tiny: bool, check_fold: bool = False) -> dict:
    import jax
    import jax.numpy as jnp

    from flaxlm.models import decode_mlp

    K, F = cfg.d_model, cfg.d_ff
    dt = jnp.dtype(cfg.dtype)
    keys = jax.random.split(
        jax.random.PRNGKey(2), 2 * copies_for(2 * K * F * dt.itemsize, tiny) + 1
    )
    ws = [(jax.random.normal(a, (K, F), dt) * 0.02, jax.random.normal(b, (K, F), dt) * 0.02)
          for a, b in zip(keys[1::2], keys[2::2])]  # fmt: skip
    x = jax.random.normal(keys[0], (batch, K), dt)
    weights = ws  # each call's weight arguments
    if variant == "xla":
        fn = jax.jit(gate_up_xla)
    else:
        transposed = variant[0] == "t"
        bn, bk, warps, stages = variant[1:] if transposed else variant
        kernel = functools.partial(decode_mlp.gate_up_silu, block_n=bn, block_k=bk,
                                   num_warps=warps, num_stages=stages)  # fmt: skip
        if transposed:  # the (2F, K) weight `transformer.transpose_gate_up` makes per call
            weights = [(jnp.concatenate([wg.T, wu.T]),) for wg, wu in ws]
            kernel = functools.partial(kernel, transposed=True)
        fn = jax.jit(kernel)
    piece = gate_up_piece(variant)
    want = jax.jit(gate_up_xla)(x, *ws[0]).astype(jnp.float32)
    err = float(jnp.max(jnp.abs(fn(x, *weights[0]).astype(jnp.float32) - want)))
    extra = {}
    if check_fold:  # the pre-norm folded in (`decode_norm="fold"`), checked on the device
        from flaxlm.models.layers import rms_normalize

        xs = x * 3  # rows whose rms the kernel divides out
        want_f = jax.jit(gate_up_xla)(rms_normalize(xs, FOLD_EPS, dt), *ws[0])
        got_f = jax.jit(functools.partial(kernel, norm_eps=FOLD_EPS))(xs, *weights[0])
        extra["fold_max_abs_err_vs_xla"] = float(jnp.max(jnp.abs(
            got_f.astype(jnp.float32) - want_f.astype(jnp.float32))))  # fmt: skip
    jax.block_until_ready(fn(x, *weights[1]))
    us, kernels = device_time(lambda i: fn(x, *weights[i % len(weights)]), calls)
    nbytes = (2 * K * F + batch * (K + F)) * dt.itemsize
    return _record(piece, batch, us, kernels, nbytes, shape=[K, F], max_abs_err_vs_xla=err,
                   **extra)  # fmt: skip


def run_masked_grad(T: int, opened: bool, tiny: bool, calls: int) -> dict:
    """cuDNN's training attention (forward and backward) over PPO-like rows: B rows of T tokens,
    each left-padded (a prompt shorter than the longest) and right-padded (a response that
    stopped early), under the mask the model builds (`attention_mask`: padding queries see no
    key). `opened`: the mask passed as `cudnn_attention` passes it (`open_empty_rows`), else
    raw. The loss weighs padding queries 0, as every trainer does, so the gradients must equal
    the XLA path's; `max_abs_err_vs_xla` is the largest difference of the real rows' outputs and
    of dq, dk, dv (NaN if any is not finite). The 2026-12-04 evening lease measured NaN at T =
    192 with the raw mask and XLA's gradients opened, T = 96 and 128 clean either way: cuDNN's
    backward over fully masked rows when T is 64 past a multiple of 128, what made PPO's 320-
    token rows fail (`attention_kernels.open_empty_rows`). On a CPU (`tiny`) jax's XLA
    attention stands in for cuDNN: a smoke test of the piece only."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flaxlm.models.attention_kernels import open_empty_rows, xla_attention
    from flaxlm.models.attention_masks import attention_mask

    B, N, K, H = (2, 4, 2, 32) if tiny else (16, 12, 12, 64)  # the 125m shape's heads
    dt = jnp.float32 if tiny else jnp.bfloat16
    r = np.random.default_rng(T)
    slots = np.broadcast_to(np.arange(T), (B, T))
    start = r.integers(0, T // 3, B)  # left padding
    stop = r.integers(T // 2, T + 1, B)  # right padding from here
    seg = ((slots >= start[:, None]) & (slots < stop[:, None])).astype(np.int32)
    seg, slots = jnp.asarray(seg), jnp.asarray(slots)
    mask = attention_mask(seg, seg, slots, slots, slots, slots)
    q, k, v = (jnp.asarray(r.normal(size=(B, T, n, H)), dt) for n in (N, K, K))
    weight = jnp.asarray(r.normal(size=(B, T, N, H)), jnp.float32) * (seg > 0)[:, :, None, None]

    def loss(attend, q, k, v):
        out = attend(q, k, v)
        return (out.astype(jnp.float32) * weight).sum(), out

    shown = open_empty_rows(mask) if opened else mask
    impl = "xla" if tiny else "cudnn"
    cudnn = functools.partial(jax.nn.dot_product_attention, mask=shown, implementation=impl)
    grad = jax.jit(jax.value_and_grad(functools.partial(loss, cudnn), argnums=(0, 1, 2),
                                      has_aux=True))  # fmt: skip
    ref = jax.jit(jax.value_and_grad(
        functools.partial(loss, lambda q, k, v: xla_attention(q, k, v, mask)),
        argnums=(0, 1, 2), has_aux=True))  # fmt: skip
    (_, out), grads = grad(q, k, v)
    (_, want), want_grads = ref(q, k, v)
    real = (seg > 0)[:, :, None, None]
    diffs = [jnp.where(real, out.astype(jnp.float32) - want.astype(jnp.float32), 0.0)]
    diffs += [g.astype(jnp.float32) - w.astype(jnp.float32) for g, w in zip(grads, want_grads)]
    finite = all(bool(jnp.isfinite(g).all()) for g in grads)
    err = max(float(jnp.max(jnp.abs(d))) for d in diffs) if finite else float("nan")
    us, kernels = device_time(lambda i: grad(q, k, v), calls)
    nbytes = 2 * (q.size + out.size + 2 * (k.size + v.size)) * jnp.dtype(dt).itemsize
    piece = f"cudnn_grad:T{T}:{'opened' if opened else 'raw'}"
    return _record(piece, B, us, kernels, nbytes, max_abs_err_vs_xla=err, finite=finite,
                   fully_masked_rows=int((~mask.any(-1)).sum()))  # fmt: skip


def gate_up_piece(variant) -> str:
    """The piece name of a gate|up variant: gate_up:xla, gate_up:pallas:BN:BK:W:S, or for a
    ("t", BN, BK, W, S) variant (the transposed weight) gate_up:pallas_t:BN:BK:W:S."""
    if variant == "xla":
        return "gate_up:xla"
    if variant[0] == "t":
        return "gate_up:pallas_t:" + ":".join(map(str, variant[1:]))
    return "gate_up:pallas:" + ":".join(map(str, variant))


def pieces(shape: str) -> list[tuple]:
    """Every (piece name, batch, thunk → record) of a shape, in the order they run."""
    from flaxlm.models.config import get_variant

    variant, batches, slots, filled, kernels, gate_ups, calls = SHAPES[shape]
    tiny = shape == "tiny"
    # (the tiny variant's 16-wide heads are below the kernel's minimum: 32 here)
    dims = dict(head_dim=32, dtype="float32", param_dtype="float32") if tiny else dict(
        dtype="bfloat16", param_dtype="bfloat16")  # fmt: skip
    cfg = get_variant(variant, **dims)
    out = []
    # cuDNN's training attention over padded rows first (a correctness check, seconds): the
    # PPO failure of the first 2026-12-04 lease. 192 fails raw (T % 128 == 64, as PPO's 320),
    # 96 and 128 do not.
    for T in (96,) if tiny else (96, 192, 128):
        for opened in (False, True):
            out.append((f"cudnn_grad:T{T}:{'opened' if opened else 'raw'}", 2 if tiny else 16,
                        functools.partial(
                run_masked_grad, T, opened, tiny, calls)))  # fmt: skip
    for b in batches:
        # Attention first: the GPU suite's next case decodes with its fastest tiling, so a
        # case cut short by the lease's clock should have timed those at least.
        main = b == batches[0]  # the goal's batch: every variant; the single prompt: fewer
        variants = ["xla", *kernels] if main else ["xla", *[v for v in kernels if v[1:3] == (4, 2)]]
        for v in variants:
            name = "attention:xla" if v == "xla" else "attention:pallas:" + ":".join(map(str, v))
            out.append((name, b, functools.partial(
                run_attention, cfg, v, b, slots, filled, calls, tiny)))  # fmt: skip
        for name in matmul_shapes(cfg):
            for backend in ("triton", "cublas"):
                out.append((f"matmul:{name}:{backend}", b, functools.partial(
                    run_matmul, cfg, name, backend, b, calls, tiny)))  # fmt: skip
        # the single prompt (a latency case, not the goal's): XLA and the last tiling only
        layouts = set()  # the first tiling of each weight layout also checks the folded norm
        for v in ["xla", *(gate_ups if main else gate_ups[-1:])]:
            first = v != "xla" and (v[0] == "t") not in layouts
            if first:
                layouts.add(v[0] == "t")
            out.append((gate_up_piece(v), b, functools.partial(
                run_gate_up, cfg, v, b, calls, tiny, check_fold=first)))  # fmt: skip
    return out


def table(records: list[dict]) -> str:
    lines = [
        "| piece | batch | µs per call | bytes (MB) | TB/s | of HBM | max err vs XLA "
        "| kernels (per call: n, µs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['case']} | | error: {r['error'][:150]} ||||||")
            continue
        top = "; ".join(f"{k} {n:g}× {t:g}" for k, n, t in r["kernels"][:3])
        tb = f"{r['tb_s']:.2f}" if "tb_s" in r else "–"
        frac = f"{r['hbm']:.0%}" if "hbm" in r else "–"
        err = f"{r['max_abs_err_vs_xla']:.2g}" if "max_abs_err_vs_xla" in r else "–"
        lines.append(f"| {r['piece']} | {r['batch']} | {r['us']:.1f} | {r['bytes'] / 1e6:.1f} "
                     f"| {tb} | {frac} | {err} | {top} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on the tiny shape")
    p.add_argument("--pieces", default="", help="comma list of piece-name prefixes to run")
    p.add_argument("--fresh", action="store_true", help="forget earlier records in OUT")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "decode_kernels.jsonl")
    if a.fresh and os.path.exists(path):
        os.remove(path)
    wanted = [w for w in a.pieces.split(",") if w]
    ran = []
    for name, batch, run in pieces("tiny" if a.tiny else "1b"):
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        # in-process (compiler options are per program); a failing piece is recorded, and
        # the others still run
        driver.run_one(path, f"{name}:b{batch}", run)
        ran.append(f"{name}:b{batch}")
        # the table so far after every piece: a run cut short still leaves it
        driver.write_table(a.out, "decode_kernels.md", markdown(path))
    md = markdown(path)
    driver.write_table(a.out, "decode_kernels.md", md)
    print(md)
    driver.exit_if_failed(path, ran)


def markdown(path: str) -> str:
    """The table of the latest record of every piece in OUT/decode_kernels.jsonl (`path`)."""
    return table(driver.latest_records(path))


if __name__ == "__main__":
    main()
