"""Decode speed: flaxlm's KV-cache `generate` against HF `generate`, same model, same run.

    python -m flaxlm.bench.decode --out OUT                 # 1.1B shape, batch 1 and 64 (GPU)
    python -m flaxlm.bench.decode --tiny --out OUT          # CPU smoke test (HF side if torch)
    python -m flaxlm.bench.decode --tiny --out OUT --hf_python .venv-hf/bin/python

Workload (as DESIGN.md's peer figure): TinyLlama-1.1B shape (variant "1b", bf16 params and
compute, random weights), B prompts of 128 random tokens, 256 new tokens *sampled* at
temperature 1 with no stop token, so every row generates all 256. Each case runs in its own
subprocess (JAX preallocates accelerator memory; torch then gets a clean device) and appends a
JSON record to OUT/decode.jsonl; the driver writes OUT/decode.md from the
latest record of every case in OUT, so cases run by separate invocations (bench/gpu_suite.py)
share one table (--fresh starts over).

Timing: one warm-up call (compilation / CUDA init) excluded, then the median of `--runs` calls,
each ended by a device sync. Reported per case:
  tokens_per_s         B·256 / wall time of the whole call (prefill included), the figure HF's
                       `generate` gives and the one DESIGN.md quotes (856 tok/s at batch 64)
  decode_tokens_per_s  B·255 / (call time − prefill time): the decode loop alone; prefill time
                       is a separate call with max_new_tokens=1
  hbm_fraction         decode_tokens_per_s / the HBM bound, where the bound's step time is
                       (weight bytes + KV bytes per step) / 4.3e12 B/s (HBM_BYTES_PER_S: the
                       bound issue 4 defines, below the H200 datasheet's 4.8), weight bytes
                       = every parameter read once per step except the embedding table (a B-row
                       gather), and KV bytes = K and V of every layer over the *mean* context
                       (prompt + 128 of the 256 new tokens). `hbm_fraction_e2e` uses tokens_per_s.
  loop_body_kernels    (flax) instructions of the compiled decode loop's body that run as
                       kernels (fusions, cuBLAS/cuDNN custom calls, copies; `loop_body_ops` by
                       opcode): launched once per token, so × a launch's few µs, set against
                       `step_ms`, it says whether a step pays for launches or for bandwidth.
  profile              (flax, case option ":profile" only) after the timed calls, one more full
                       call traced by `jax.profiler` (Python tracer off), summarised by
                       bench/trace_summary.py: per line of each "/device:" plane ("/host:CPU" on
                       the CPU) its events, summed and busy (interval-union) time, span and top
                       event names, and per plane `stream_busy_us`, the time any kernel ran.
                       `profile_wall_us` is that call's wall time (tracing included): busy / wall
                       tells idle gaps between kernels from slow kernels. A failed trace leaves
                       {"error": ...} there and the timings stand.
The HF side runs in a python with torch + transformers (`--hf_python`; default this one) and
is skipped with a note when torch is absent (a "skipped" record: no failure, exit status 0).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

# The HBM bound's bandwidth, as issue 4 ("GPU performance") defines the decode goal's bound.
# The H200 SXM datasheet gives 4.8 TB/s: against that the bound is 1.12x as high and the same
# step ~11% further from it (every share of the bound × 0.90: 42.9% → 38.4%).
HBM_BYTES_PER_S = 4.3e12
# Named `generate` options a flax case may add (case suffix ":NAME", combinable with a flag
# set): "fused" decodes with q|k|v and gate|up concatenated into one matmul each (which XLA's
# GPU compiler does by itself: bench/gpu_aot.py finds no fewer kernels when we do it, and 1.3
# GiB more memory; the GPU's timing decides). "while" gives a stop token that
# never comes (-1), which runs the loop RL rollouts run (a while loop that tests "all rows
# stopped" every step, a device-to-host read); "while8" tests it every 8 tokens instead.
GENERATE_OPTIONS = {
    "fused": {"fuse_projections": True},
    "while": {"stop_tokens": (-1,)},
    "while8": {"stop_tokens": (-1,), "check_every": 8},
    "pallas": {"decode_attention": "pallas"},
    # XLA's attention over the whole cache (the default, "auto", is the kernel on CUDA GPUs)
    "xla": {"decode_attention": "xla"},
    # each step's MLP silu(gate)·up as one Pallas kernel (models/decode_mlp.py), a candidate
    "mlp": {"decode_mlp": "pallas"},
    # a stop string no token ever completes (models/stop_strings.py): the loop of "while" plus
    # the automaton's per-step gather, for its cost
    "strings": {"stop_tokens": (-1,), "stop_strings": "never"},
    # int8 projection weights (models/quant.py): half the weight bytes; the HBM bound of the
    # record counts its weights at one byte each
    "int8": {"quantize": "int8"},
    # int8 KV cache with a float32 scale per token and head (transformer.init_cache): the
    # bound counts its KV bytes at (1 + 4 / head_dim) per value
    "kv8": {"cache_dtype": "int8"},
    # the matmuls (`generate(..., decode_gemm=)`): Triton gemm fusions, unfused (the default
    # until the 2026-11-30 second lease), or cuBLAS calls; "unfused" keeps q|k|v and gate|up
    # apart whatever the gemms
    "triton": {"decode_gemm": "xla"},
    "cublas": {"decode_gemm": "cublas"},
    "unfused": {"fuse_projections": False},
    # the pre-norms folded into the projections (`generate(..., decode_norm="fold")`): the
    # attention kernel divides q|k|v by rms(x) itself, no norm kernel before q|k|v; with
    # "mlp" the gate|up kernel does the same for the MLP's norm (":fold:mlp")
    "fold": {"decode_norm": "fold"},
    # the pre-norms as the model runs them (`decode_norm="xla"`), where "auto" (the default)
    # folds the attention's on CUDA: the in-lease ratio of that default
    "nofold": {"decode_norm": "xla"},
    # the gate|up kernel over the weight transposed once per call (models/decode_mlp.py)
    "mlpt": {"decode_mlp": "pallas_t"},
}
# Case options that change what is recorded, not what `generate` runs (":profile": a traced
# extra call summarised into the record; see the docstring). Combinable with the above.
RUN_OPTIONS = ("profile",)
# ":attnBK-W-S[-P]": the Pallas attention kernel with key block BK, W warps, S stages and P
# split-K parts (`generate(..., decode_attention="pallas:BK:W:S[:P]")`), e.g. the best of
# bench/decode_kernels.py run whole (the GPU suite's "decode 1b flaxlm b64 tuned attention").
_ATTENTION_VARIANT = re.compile(r"attn(\d+)-(\d+)-(\d+)(?:-(\d+))?$")
# ":mlpBN-BK-W-S": the Pallas gate|up kernel with column block BN, row step BK, W warps and S
# stages (`generate(..., decode_mlp="pallas:BN:BK:W:S")`), bench/decode_kernels.py's best;
# ":mlptBN-BK-W-S" the same over the transposed weight ("pallas_t:BN:BK:W:S").
_MLP_VARIANT = re.compile(r"mlp(t?)(\d+)-(\d+)-(\d+)-(\d+)$")


def option_settings(name: str) -> dict:
    """The `generate` keywords of a case option ({} for run options and XLA flag sets)."""
    if m := _ATTENTION_VARIANT.match(name):
        return {"decode_attention": "pallas:" + ":".join(g for g in m.groups() if g)}
    if m := _MLP_VARIANT.match(name):
        kernel = "pallas_t" if m.group(1) else "pallas"
        return {"decode_mlp": kernel + ":" + ":".join(m.groups()[1:])}
    return GENERATE_OPTIONS.get(name, {})


class _CaseOptions:
    """The option names a flax case may carry (for `driver.case_env`'s check and message)."""

    def __contains__(self, name) -> bool:
        known = name in GENERATE_OPTIONS or name in RUN_OPTIONS
        return known or bool(_ATTENTION_VARIANT.match(name) or _MLP_VARIANT.match(name))

    def __iter__(self):
        return iter((*GENERATE_OPTIONS, *RUN_OPTIONS, "attnBK-W-S[-P]", "mlp[t]BN-BK-W-S"))


CASE_OPTIONS = _CaseOptions()
# (variant, prompt length, new tokens, batches, dtype); the runs per case are `--runs`
SHAPES = {
    "1b": ("1b", 128, 256, (1, 64), "bfloat16"),
    "tiny": ("tiny", 16, 32, (1, 4), "float32"),
    "moe": ("moe", 128, 256, (1, 64), "bfloat16"),
    # long prompts (RL with long contexts, documents): the KV cache's share of a step's bytes
    # grows with the context, what an int8 cache (":kv8") halves
    "1b-long": ("1b", 4096, 256, (1, 64), "bfloat16"),
}
# Variants of the benches only (models/config.py has no mixture-of-experts one). "moe": a
# Qwen3-30B-A3B layer (128 experts of width 768, top 8, GQA 32/4 of head_dim 128, q/k norms)
# in 8 layers of its 48, with a 32k vocab: what a decode step reads per expert layer
# (models/moe.py `few_token_dispatch`). flaxlm only: the HF peer builds a dense Llama. Its
# `hbm_bound` counts every expert's weights, more than a small batch needs to read.
BENCH_VARIANTS = {
    "moe": dict(vocab_size=32000, d_model=2048, n_layers=8, n_heads=32, n_kv_heads=4,
                head_dim=128, d_ff=768, qk_norm="head", n_experts=128, n_experts_per_token=8,
                d_expert=768),
}  # fmt: skip


def variant_config(variant: str, **overrides):
    """`get_variant`, with the benches' own `BENCH_VARIANTS` (on the 1b's other fields)."""
    from flaxlm.models.config import get_variant

    if variant in BENCH_VARIANTS:
        return get_variant("1b", **{**BENCH_VARIANTS[variant], **overrides})
    return get_variant(variant, **overrides)


def model_dims(variant: str) -> dict:
    """The model's shape as plain numbers (the HF subprocess imports no flaxlm/jax)."""
    c = variant_config(variant)
    counts = c.param_counts()
    return dict(vocab=c.vocab_size, d=c.d_model, layers=c.n_layers, heads=c.n_heads,
                kv_heads=c.n_kv_heads, head_dim=c.head_dim_, ff=c.d_ff, theta=c.rope_theta,
                eps=c.norm_eps, params=counts["total"], embedding=counts["embedding"])  # fmt: skip


def hbm_bound(dims: dict, batch: int, prompt: int, new: int, itemsize: int,
              weight_itemsize: int | None = None, kv_itemsize: float | None = None
              ) -> dict:  # fmt: skip
    weight = (dims["params"] - dims["embedding"]) * (weight_itemsize or itemsize)
    mean_ctx = prompt + new / 2
    kv = (2 * dims["layers"] * batch * dims["kv_heads"] * dims["head_dim"]
          * (kv_itemsize or itemsize) * mean_ctx)  # fmt: skip
    step = (weight + kv) / HBM_BYTES_PER_S
    return {"weight_bytes": weight, "kv_bytes_per_step": kv, "hbm_bound_tokens_per_s": batch / step}


def _finish(rec: dict, dims: dict, times: list, prefill: list, batch, prompt, new, itemsize,
            weight_itemsize: int | None = None, kv_itemsize: float | None = None):  # fmt: skip
    t, tp = statistics.median(times), statistics.median(prefill)
    rec.update(hbm_bound(dims, batch, prompt, new, itemsize, weight_itemsize, kv_itemsize))
    rec.update(
        batch=batch, prompt_len=prompt, new_tokens=new, call_s=t, prefill_s=tp,
        tokens_per_s=batch * new / t,
        decode_tokens_per_s=batch * (new - 1) / max(t - tp, 1e-9),
        step_ms=1e3 * max(t - tp, 1e-9) / (new - 1),
    )  # fmt: skip
    rec["hbm_fraction"] = rec["decode_tokens_per_s"] / rec["hbm_bound_tokens_per_s"]
    rec["hbm_fraction_e2e"] = rec["tokens_per_s"] / rec["hbm_bound_tokens_per_s"]
    return rec


# ----------------------------------------------------------------------------------------------
# flaxlm


def flax_case(shape: str, batch: int, options: dict | None = None) -> tuple:
    """(ModelConfig, rng -> params, prompts, `generate` keywords) of a flaxlm case: B random
    prompts of the shape's length, sampled at temperature 1 for the shape's new tokens (no
    rng: each call passes its own). Shared with bench/gpu_aot.py, which compiles the same
    program with abstract params for an H200."""
    import jax.numpy as jnp
    import numpy as np

    from flaxlm.models.transformer import Transformer
    from flaxlm.train.state import unbox

    variant, prompt, new, _, dtype = SHAPES[shape]
    cfg = variant_config(variant, dtype=dtype, param_dtype=dtype)
    init = lambda r: unbox(Transformer(cfg).init(r, jnp.zeros((1, 4), jnp.int32)))["params"]  # noqa: E731
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt), np.int32)
    kw = dict(prompt_lengths=np.full((batch,), prompt, np.int32), max_new_tokens=new,
              temperature=1.0, **(options or {}))  # fmt: skip
    if kw.get("stop_strings") == "never":  # one 6-character string, never advanced past 0
        from flaxlm.models.stop_strings import StopStrings

        table = np.zeros((1, 8, cfg.vocab_size), np.int32)
        kw["stop_strings"] = StopStrings(("never",), table, np.zeros(1, np.int32),
                                         np.full(1, 6, np.int32))  # fmt: skip
    return cfg, init, tokens, kw


def run_flax(shape: str, batch: int, runs: int, options: dict | None = None,
             profile: bool = False) -> dict:  # fmt: skip
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flaxlm.bench.hlo_text import loop_body_ops
    from flaxlm.bench.trace_summary import profile_call
    from flaxlm.models.decode import (
        compiled_generate_text,
        generate,
        resolve_decode_attention,
        resolve_decode_gemm,
        resolve_decode_norm,
    )

    cfg, init, tokens, kw = flax_case(shape, batch, options)
    params = jax.jit(init)(jax.random.PRNGKey(0))
    variant, prompt, new, _, dtype = SHAPES[shape]

    def call(n, i):
        out = generate(
            cfg, params, tokens, rng=jax.random.PRNGKey(i), **{**kw, "max_new_tokens": n}
        )
        return out.tokens.block_until_ready(), out

    t0 = time.perf_counter()
    _, out = call(new, 0)
    warm = time.perf_counter() - t0
    call(1, 0)
    times, prefill = [], []
    for i in range(runs):
        t0 = time.perf_counter()
        call(new, i + 1)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        call(1, i + 1)
        prefill.append(time.perf_counter() - t0)
    assert int(np.asarray(out.lengths).min()) == new  # every row generated all tokens
    stats = jax.local_devices()[0].memory_stats() or {}
    # The program just timed, from jax's cache (nothing compiles again).
    hlo = compiled_generate_text(cfg, params, tokens, rng=jax.random.PRNGKey(0), **kw)
    ops = loop_body_ops(hlo)
    rec = {"impl": "flaxlm", "warmup_s": warm, "jax": jax.__version__,
           "device": jax.devices()[0].device_kind,
           "peak_mem_gb": stats.get("peak_bytes_in_use", 0) / 2**30 or None,
           "loop_body_kernels": sum(ops.values()), "loop_body_ops": ops,
           "decode_attention": resolve_decode_attention(kw.get("decode_attention", "auto")),
           "decode_gemm": resolve_decode_gemm(kw.get("decode_gemm", "auto"),
                                              quantize=kw.get("quantize", "none"),
                                              rows=len(tokens)),
           }  # fmt: skip
    rec["decode_norm"] = resolve_decode_norm(
        kw.get("decode_norm", "auto"), cfg, rec["decode_attention"], rec["decode_gemm"],
        kw.get("decode_mlp", "xla"), kw.get("quantize", "none") != "none")  # fmt: skip
    if profile:  # after every timing and the memory reading, so neither sees the profiler
        rec.update(profile_call(lambda: call(new, runs + 1)))
    int8 = kw.get("quantize") == "int8"  # its bound counts the weights at a byte each
    dims = model_dims(variant)
    kv8 = 1 + 4 / dims["head_dim"] if kw.get("cache_dtype") == "int8" else None
    return _finish(rec, dims, times, prefill, batch, prompt, new,
                   jnp.dtype(dtype).itemsize, 1 if int8 else None, kv8)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# HF transformers peer (imports neither flaxlm nor jax: it may run in another venv)


def run_hf(shape: str, batch: int, runs: int, dims: dict) -> dict:
    import torch
    import transformers

    _, prompt, new, _, dtype = SHAPES[shape]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = getattr(torch, dtype)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=dims["vocab"], hidden_size=dims["d"], intermediate_size=dims["ff"],
        num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"], head_dim=dims["head_dim"],
        max_position_embeddings=2048, rms_norm_eps=dims["eps"], tie_word_embeddings=False,
        attn_implementation="sdpa",
    )  # fmt: skip
    hf_cfg.rope_theta = dims["theta"]
    torch.manual_seed(0)
    with torch.device(dev):
        model = transformers.LlamaForCausalLM(hf_cfg).to(tdtype).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, dims["vocab"], (batch, prompt), generator=g).to(dev)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def call(n):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                 min_new_tokens=n, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, pad_token_id=0)  # fmt: skip
        sync()
        return out

    t0 = time.perf_counter()
    out = call(new)
    warm = time.perf_counter() - t0
    assert out.shape[1] == prompt + new
    times, prefill = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        call(new)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        call(1)
        prefill.append(time.perf_counter() - t0)
    cuda = dev == "cuda"
    rec = {"impl": "hf-generate", "warmup_s": warm, "torch": torch.__version__,
           "transformers": transformers.__version__,
           "device": torch.cuda.get_device_name() if cuda else "cpu",
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}  # fmt: skip
    return _finish(rec, dims, times, prefill, batch, prompt, new, tdtype.itemsize)


# ----------------------------------------------------------------------------------------------
# Driver


def _busy(rec: dict) -> str:
    """ ":profile" cases: the share of the traced call during which a kernel or copy ran on
    some GPU stream (the rest is idle time between them), and the kernel kind that took most."""
    planes = (rec.get("profile") or {}).get("planes") or {}
    for plane in planes.values():
        if plane.get("stream_busy_us") and rec.get("profile_wall_us"):
            kinds: dict[str, float] = {}
            for ln in plane["lines"]:
                if ln["name"].startswith("Stream"):
                    for kind, _, t in ln.get("top_kinds", []):
                        kinds[kind] = kinds.get(kind, 0.0) + t
            top = max(kinds, key=kinds.get, default="")
            share = f"; most: {top} {kinds[top] / plane['stream_busy_us']:.0%}" if top else ""
            return f"{plane['stream_busy_us'] / rec['profile_wall_us']:.0%}{share}"
    return ""


def table(records: list[dict]) -> str:
    lines = [
        "| case | tokens/s (e2e) | decode tokens/s | step ms | prefill s | HBM bound tok/s |"
        " % of bound (decode / e2e) | vs HF (e2e) | peak GB | kernels / step | GPU busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {r["case"]: r for r in records}
    for r in records:
        if "tokens_per_s" not in r:
            why = f"skipped: {r['skipped']}" if "skipped" in r else r.get("error", "?")
            lines.append(f"| {r['case']} | {why[:120]} | | | | | | | | | |")
            continue
        peer = by.get(":".join(r["case"].replace(":flax:", ":hf:").split(":")[:3]))
        vs = (f"{r['tokens_per_s'] / peer['tokens_per_s']:.1f}x"
              if r["impl"] == "flaxlm" and peer and "tokens_per_s" in peer else "")  # fmt: skip
        mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") else "n/a"
        lines.append(
            f"| {r['case']} | {r['tokens_per_s']:,.0f} | {r['decode_tokens_per_s']:,.0f} | "
            f"{r['step_ms']:.2f} | {r['prefill_s']:.3f} | {r['hbm_bound_tokens_per_s']:,.0f} | "
            f"{r['hbm_fraction']:.1%} / {r['hbm_fraction_e2e']:.1%} | {vs} | {mem} | "
            f"{r.get('loop_body_kernels', '')} | {_busy(r)} |"
        )
    return "\n".join(lines)


def _one(case: str, runs: int, dims_json: str) -> dict:
    shape, impl, b, *extra = case.split(":")  # XLA flag sets in `extra` are set by the driver
    batch = int(b[1:])
    options = {}
    for name in extra:
        options.update(option_settings(name))
    try:
        if impl == "flax":
            rec = run_flax(shape, batch, runs, options, profile="profile" in extra)
        else:
            rec = run_hf(shape, batch, runs, json.loads(dims_json))
    except Exception as e:  # recorded, so one failing case does not hide the others
        rec = {"error": f"{type(e).__name__}: {e}"}
        # No torch/transformers in this python: the HF case is skipped, which is no failure
        # (bench/driver.py `skip_record`, not imported here: an HF child may lack flaxlm).
        peer = (getattr(e, "name", None) or "").split(".")[0] in ("torch", "transformers")
        if impl != "flax" and isinstance(e, ModuleNotFoundError) and peer:
            rec = {"skipped": f"{e} (the HF side needs torch and transformers: --hf_python)"}
    return {"case": case, **rec}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on the tiny shape")
    p.add_argument("--cases", default="",
                   help="comma list of SHAPE:IMPL:bBATCH[:NAME...] (IMPL flax|hf; NAME a key of "
                   "driver.XLA_FLAG_SETS, GENERATE_OPTIONS or RUN_OPTIONS; flax only)")  # fmt: skip
    p.add_argument("--runs", type=int, default=3, help="timed calls per case (median)")
    p.add_argument("--hf_python", default=sys.executable, help="python with torch+transformers")
    p.add_argument("--timeout", type=int, default=900, help="seconds per case")
    p.add_argument("--fresh", action="store_true", help="forget earlier records in OUT")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)
    p.add_argument("--dims", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "decode.jsonl")
    if a.one:
        rec = _one(a.one, a.runs, a.dims)
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)
        return
    from flaxlm.bench import driver  # the driver side only: an HF child may lack flaxlm

    shape = "tiny" if a.tiny else "1b"
    batches = SHAPES[shape][3]
    cases = a.cases.split(",") if a.cases else [
        f"{shape}:{impl}:b{b}" for b in batches for impl in ("flax", "hf")]  # fmt: skip
    if a.fresh and os.path.exists(path):
        os.remove(path)
    for case in cases:
        s, impl = case.split(":")[:2]
        py = sys.executable if impl == "flax" else a.hf_python
        dims = json.dumps(model_dims(SHAPES[s][0]))
        cmd = [py, os.path.abspath(__file__), "--out", a.out, "--one", case,
               "--runs", str(a.runs), "--dims", dims]  # fmt: skip
        extra = case.split(":")[3:]  # e.g. 1b:flax:b64:cmdbuf — other XLA flags or options
        if extra and impl != "flax":
            raise SystemExit(f"case {case!r}: flag sets and options are for flax cases only")
        if impl != "flax" and SHAPES[s][0] in BENCH_VARIANTS:
            raise SystemExit(f"case {case!r}: shape {s} is for flax cases only")
        env = driver.case_env(case, extra, allowed=CASE_OPTIONS)  # + driver.XLA_FLAG_SETS
        if impl == "hf":  # the HF side needs no flaxlm; keep JAX's memory settings out of it
            env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
        driver.run_case(cmd, case, path, a.timeout, env)
    md = markdown(path)
    driver.write_table(a.out, "decode.md", md)
    print(md)
    driver.exit_if_failed(path, cases)


def markdown(path: str) -> str:
    """The table of every case run into OUT/decode.jsonl (`path`) so far, the latest record of
    each."""
    from flaxlm.bench import driver

    records = sorted(driver.latest_records(path),
                     key=lambda r: (r["case"].split(":")[::-1], r["case"]))  # fmt: skip
    return table(records)


if __name__ == "__main__":
    main()
