"""Every GPU measurement in one prepared run, in priority order, inside a time budget.

    python -m flaxlm.bench.gpu_suite --out OUT --budget 420      # on the H200
    python -m flaxlm.bench.gpu_suite --out OUT --budget 300 --state DIR --resume   # a later call
    python -m flaxlm.bench.gpu_suite --out OUT --only "decode kernels" --only 5     # some cases
    python -m flaxlm.bench.gpu_suite --out OUT --tiny            # CPU smoke test of the driver

GPU time is scarce (one short lease), so the suite runs cases from most to least important and
skips a case when the time left is below its estimate; every case is its own subprocess (a
failure or OOM costs only that case), results are appended as they come, and OUT/suite.md is
rewritten after every case with each bench's table built from its .jsonl, so a run cut short
still returns what it measured. A case's status is "ok" only when its bench exited 0 and wrote
no error record ("failed (...)" names them). No bench writes its .md into OUT
(FLAXLM_BENCH_MD=0): OUT holds log.txt (gpu_run.sh's), suite.md and one .jsonl per bench run,
at most 8 files, the most a device call returns.

A lease is several calls on one warm machine, each with an empty OUT. `--state DIR` (a folder
that outlives a call: bench/gpu_run.sh uses /tmp/flaxlm_gpu_state) keeps the names of the
finished cases and a copy of decode_kernels' records; `--resume` skips the finished cases and
lets the tuned cases read those records. Without `--resume`, `--state` starts a new series.
A case counts as finished when it ran to its end, or was killed at 3x its estimate; one cut by
the end of the budget, or skipped, runs again. `--t0` (epoch seconds) starts the budget's clock
earlier than this process: gpu_run.sh passes its own start, so installing the wheels counts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import time

PY = sys.executable


def _folders(where) -> list[str]:
    """The folders a tuned case reads earlier records from: OUT, or [OUT, state folder]."""
    return [where] if isinstance(where, str) else [d for d in where if d]


def _jsonl(path: str) -> list[dict]:
    """The records of a JSONL file; a line cut short by a killed writer is skipped."""
    recs = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                recs.append(json.loads(line))
            except ValueError:
                continue
    return [r for r in recs if isinstance(r, dict)]


def _fastest_correct(where, kind: str, batch: int) -> tuple[dict | None, str]:
    """(the fastest `kind` ("attention" or "gate_up") Pallas tiling record that
    bench/decode_kernels.py timed at `batch` earlier in this run or lease (`where`: OUT, or a
    list of folders holding decode_kernels.jsonl; gate_up: over either weight layout, "pallas"
    or "pallas_t"), its outputs within bf16 rounding of XLA's — or None and why not)."""
    paths = [os.path.join(d, "decode_kernels.jsonl") for d in _folders(where)]
    paths = [p for p in paths if os.path.exists(p)]
    if not paths:
        return None, "no decode_kernels.jsonl: run the decode kernels case first"
    recs = [r for p in paths for r in _jsonl(p)]
    timed = [r for r in recs if r.get("piece", "").startswith((f"{kind}:pallas:",
                                                                f"{kind}:pallas_t:"))
             and r.get("batch") == batch and r.get("us", 0) > 0
             and r.get("max_abs_err_vs_xla", 1.0) < 0.05]  # fmt: skip
    if not timed:
        return None, f"no {kind}:pallas timing at batch {batch}"
    return min(timed, key=lambda r: r["us"]), ""


def _tiling(record: dict) -> tuple[int, ...]:
    return tuple(int(n) for n in record["piece"].split(":")[2:])


def tuned_attention(shape: str, batch: int, options: str = ""):
    """A case's args chosen when it runs: the whole decode with the fastest Pallas attention
    tiling that bench/decode_kernels.py timed earlier in the same lease (decode_kernels.jsonl
    in OUT or the state folder, at `batch`; outputs within bf16 rounding of XLA's), or why it
    is skipped — so one lease both finds a better tiling and times it end to end. `options`:
    decode case options to add (e.g. "fold"); with them the case runs even when the default
    tiling was the fastest."""

    def args(where):
        best, why = _fastest_correct(where, "attention", batch)
        if best is None:
            return f"skipped ({why})"
        case = f"{shape}:flax:b{batch}" + (f":{options}" if options else "")
        if _tiling(best) == DEFAULT_ATTENTION:
            if options:
                return ["decode", "--cases", case]
            return f"skipped (the default tiling {best['piece']} was the fastest)"
        tiles = "-".join(map(str, _tiling(best)))
        return ["decode", "--cases", f"{case}:attn{tiles}"]

    return args


def if_failed(case: str, args: list[str]):
    """A control case's args, run only when `case`'s latest alignment record (earlier in this
    run or lease) is an error: else why it is skipped. The PPO case's failure then costs the
    lease the one case that tells the suspects apart, and its success costs nothing."""

    def chosen(where):
        # the state's (earlier calls') first, then this call's: the last record is the latest
        folders = reversed(_folders(where))
        paths = [os.path.join(d, "alignment_throughput.jsonl") for d in folders]
        recs = [r for p in paths if os.path.exists(p) for r in _jsonl(p)
                if r.get("case") == case]  # fmt: skip
        if not recs:
            return f"skipped (no record of {case} yet)"
        if "error" not in recs[-1]:
            return f"skipped ({case} ran: no control needed)"
        return args

    return chosen


def tuned_fold_mlp(shape: str, batch: int):
    """Like `tuned_attention`, for the decode with folded norms and the Pallas gate|up kernel
    (`:fold:mlp`): the fastest correct attention and gate|up tilings decode_kernels timed
    (each the default where it won or was not timed); skipped when both are the defaults
    (the plain `:fold:mlp` case ran that)."""

    def args(where):
        options = []
        attention, _ = _fastest_correct(where, "attention", batch)
        if attention is not None and _tiling(attention) != DEFAULT_ATTENTION:
            options.append("attn" + "-".join(map(str, _tiling(attention))))
        mlp, _ = _fastest_correct(where, "gate_up", batch)
        transposed = mlp is not None and mlp["piece"].startswith("gate_up:pallas_t:")
        if mlp is not None and (transposed or _tiling(mlp) != DEFAULT_GATE_UP):
            options.append(("mlpt" if transposed else "mlp") + "-".join(map(str, _tiling(mlp))))
        if not options:
            return "skipped (no faster attention or gate|up tiling timed than the defaults)"
        mlp_option = [o for o in options if o.startswith("mlp")] or ["mlp"]
        attn_option = [o for o in options if o.startswith("attn")]
        case = ":".join([f"{shape}:flax:b{batch}:fold", *mlp_option, *attn_option])
        return ["decode", "--cases", case]

    return args


# models/decode_attention.py's BLOCK_K, NUM_WARPS, NUM_STAGES (not imported: the suite's
# process loads no jax)
DEFAULT_ATTENTION = (128, 4, 2)
# models/decode_mlp.py's BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES
DEFAULT_GATE_UP = (32, 128, 4, 3)

# (name, estimated seconds, command args — or a function of the folders holding earlier
# records (OUT, and the state of earlier calls) giving them, or why the case is skipped:
# `tuned_attention`). Train cases: bench/train_throughput.py; decode cases: bench/decode.py;
# alignment: bench/alignment_throughput.py. Names are unique (--resume keys on them).
#
# Estimates are the H200's measured wall times where there are some (bench/results/gpu-*-log.txt,
# "=== NAME: ok in Ns"; a case is killed at 3x its estimate), with a margin: a single flaxlm
# decode case took 21-38 s once a call had run its first one. That first one is slow: 4 of the
# 5 calls so far took 119 (killed)-180 s for it (156 s for the cuBLAS path alone, no profile),
# whichever case it was, so the first flaxlm decode case of a call counts FIRST_DECODE_S
# whatever its own estimate. Cases never run on a GPU (decode kernels, alignment) are guesses.
#
# Order: the open goals first. What is open is the decode goal (>= 50% of the HBM bound at
# batch 64; best 44.7% on 2026-12-04 evening: 1.27 ms against 1.134). PPO's generation share
# (goal <= 70%) measured 26-28% that evening, once cuDNN's NaN over padding rows was fixed; the
# training goals are met (2026-11-30 second lease). The other cases decide defaults. A lease is
# two calls, `gpu_run.sh 480` then one of ~300-335 s that resumes (gpu_run.sh). The first call
# runs PPO (the fix holds; 81-84 s measured), then `generate`'s default decode, profiled (the
# call's first decode: FIRST_DECODE_S), then the same without the norm fold, for the in-lease
# ratio of that default.
GPU_CASES = [
    # The PPO goal (generation <= 70% of an iteration), stop checks every 8 tokens
    # (rollouts decode with the Pallas kernel by default on the GPU). Measured 81-84 s (2026-12-04,
    # both leases).
    ("alignment ppo c8", 120, ["alignment_throughput", "--cases", "125m:ppo:c8"]),
    # Only if that failed: the same with XLA's attention in every forward and backward (":xla";
    # the rollouts' decode kernel kept), which says whether cuDNN is the cause again.
    (
        "alignment ppo c8 xla (if ppo failed)",
        120,
        if_failed("125m:ppo:c8", ["alignment_throughput", "--cases", "125m:ppo:c8:xla"]),
    ),  # fmt: skip
    # `generate`'s default on CUDA GPUs, the baseline of the goal within the lease: each layer's
    # attention as one Pallas kernel over the written slots (key blocks of 128) with the
    # attention's pre-norm folded in (`decode_norm="auto"`), every matmul a cuBLAS call over
    # q|k|v and gate|up concatenated once per call (`decode_gemm="auto"`): 1.27 ms per step on
    # 2026-12-04 evening (as ":fold:attn128-4-2"). ":profile" adds, after the timed calls, a
    # kernel-time summary of one traced call: where the rest of the step goes.
    ("decode 1b flaxlm b64", 45, ["decode", "--cases", "1b:flax:b64:profile"]),
    # The same with both pre-norms as RMSNorm kernels (`decode_norm="xla"`; 1.32 ms that
    # evening, as ":attn128-4-2").
    ("decode 1b flaxlm b64 nofold", 40, ["decode", "--cases", "1b:flax:b64:nofold"]),
    # cuDNN's training attention over PPO-like padded rows, raw mask against `open_empty_rows`
    # (gradients against XLA's: NaN at 192 tokens raw on 2026-12-04 evening), and each decode
    # attention tiling alone, split-K (models/decode_attention.py `splits`) against the unsplit
    # kernel. Measured 75 s.
    ("decode kernels attention", 90, ["decode_kernels", "--pieces", "cudnn_grad,attention"]),
    # The fastest attention tiling that "decode kernels attention" timed, if not the default,
    # in the default decode.
    ("decode 1b flaxlm b64 tuned attention", 40, tuned_attention("1b", 64)),
    # DPO/PPO policy tokens/s and PPO's split with the configs' default (stop checks every
    # token). Two cases, each compiles.
    ("alignment dpo+ppo", 150, ["alignment_throughput"]),
    # PPO's generation share with XLA's attention in the rollouts, and under CUDA graphs.
    (
        "alignment ppo c8 decode xla, cmdbuf",
        160,
        ["alignment_throughput", "--cases", "125m:ppo:c8:decode_xla,125m:ppo:cmdbuf"],
    ),  # fmt: skip
    ("decode 1b hf b64", 50, ["decode", "--cases", "1b:hf:b64"]),  # measured 38-41 s
    # The other pieces of the step alone: the five matmuls with Triton and with cuBLAS, XLA's
    # gate|up and the gate|up + SiLU kernel's tilings over the weight as stored and
    # transposed (measured 2026-12-04: 75 s with the attention pieces).
    ("decode kernels", 120, ["decode_kernels", "--pieces", "matmul,gate_up"]),
    # The candidate of the 2026-11-30 leases: the pre-norms folded into the projections and
    # divided out inside the Pallas attention and gate|up kernels (`decode_norm="fold"`,
    # `decode_mlp="pallas"` reading the concatenated gate|up), cuBLAS for q|k|v, o, down and
    # the LM head: 5 kernels per layer instead of 8 — slower on 2026-12-04 (1.39 ms against
    # 1.32). Profiled: each kernel's share of bandwidth.
    ("decode 1b flaxlm b64 fold mlp", 45, ["decode", "--cases", "1b:flax:b64:fold:mlp:profile"]),
    # The fold case again with the fastest attention and gate|up tilings (either weight
    # layout) that "decode kernels" timed, in this call or an earlier one of the lease.
    ("decode 1b flaxlm b64 tuned fold mlp", 40, tuned_fold_mlp("1b", 64)),
    # The fold case with the gate|up kernel over the transposed weight (`decode_mlp=
    # "pallas_t"`), default tiling: if decode kernels was cut short, the other layout whole.
    ("decode 1b flaxlm b64 fold mlpt", 40, ["decode", "--cases", "1b:flax:b64:fold:mlpt"]),
    # Triton's gemms, unfused (the default before): the in-lease ratio of the change.
    ("decode 1b flaxlm b64 triton", 40, ["decode", "--cases", "1b:flax:b64:triton"]),
    # cuBLAS over the separate weights, XLA's dot merger off (no concatenated copy: peak 2.9
    # GiB against 4.0 in the H200 compile, 285 kernels per step against 197): if near the
    # default's time, "auto" can drop the copy.
    ("decode 1b flaxlm b64 cublas unfused", 40, ["decode", "--cases", "1b:flax:b64:unfused"]),
    # Batch 1 (Triton's gemms: "auto" takes cuBLAS from 64 rows) against cuBLAS (H200 compile:
    # 2.29 GiB per token against 1.94).
    ("decode 1b flaxlm b1", 65, ["decode", "--cases", "1b:flax:b1,1b:flax:b1:cublas"]),
    # The 1.1B training goals (met in the 2026-11-30 second lease: 56.0% MFU, 1.24x the
    # torch.compile peer, 1.40x eager), rerun so every ratio is within one lease.
    # ":profile": one more step traced after the timed ones — where the step's time goes.
    # Measured 101-134 s, 98 s and 22 s.
    ("train 1b flaxlm", 140, ["train_throughput", "--cases", "1b:flax:fast:profile"]),
    ("train 1b hf compile", 110, ["train_throughput", "--cases", "1b:hf-compile"]),
    ("train 1b hf eager", 30, ["train_throughput", "--cases", "1b:hf-eager"]),
    # The fold case's two halves apart: the gate|up + SiLU kernel alone (now reading the
    # concatenated gate|up, with cuBLAS for the rest; with Triton's gemms it took 1.41 ms
    # against 1.48 in the second lease), and the attention-side fold alone (7 kernels per
    # layer; the MLP's norm then runs unscaled in XLA).
    (
        "decode 1b flaxlm b64 mlp, fold",
        65,
        ["decode", "--cases", "1b:flax:b64:mlp,1b:flax:b64:fold"],
    ),  # fmt: skip
    # XLA's attention instead of the kernel (cuBLAS gemms): the kernel's gain within the lease.
    ("decode 1b flaxlm b64 xla", 40, ["decode", "--cases", "1b:flax:b64:xla"]),
    # int8 projection weights (models/quant.py): H200 compile 2.06 GiB per batch-64 token
    # against 3.10 (1.00 against 1.97 at batch 1); the record's HBM bound counts int8 bytes.
    # Measured 62 s.
    ("decode 1b flaxlm int8", 70, ["decode", "--cases", "1b:flax:b64:int8,1b:flax:b1:int8"]),
    # 7B: bf16 params, no remat. XLA's buffer assignment for the H200 (bench/gpu_aot.py):
    # peak 71.2 GiB of 139. Measured 127 s.
    ("train 7b flaxlm", 140, ["train_throughput", "--cases", "7b:flax:bf16_params"]),
    # The HF peer on flaxlm's 7B plan (bf16 params, nothing recomputed), for the goal's
    # same-plan ratio; if it runs out of memory, the record says so and the full-remat pair
    # below is the same-plan comparison. Measured 20-23 s each.
    ("train 7b hf eager", 30, ["train_throughput", "--cases", "7b:hf-eager"]),
    ("train 7b hf eager ckpt", 30, ["train_throughput", "--cases", "7b:hf-eager:ckpt"]),
    # The 7B goal's same-plan ratio: the HF peer's memory plan (each layer recomputed).
    ("train 7b flaxlm full remat", 150, ["train_throughput", "--cases", "7b:flax:bf16_full_remat"]),
    ("decode 1b hf b1", 50, ["decode", "--cases", "1b:hf:b1"]),  # measured 33-42 s
    ("decode 1b flaxlm b1 xla", 40, ["decode", "--cases", "1b:flax:b1:xla"]),
    # Everything above is what the goals are judged on; below, what decides the defaults.
    # q|k|v and gate|up joined in the weight cast (the default since the last lease; H200
    # compile: 1643 kernels instead of 1930, 30 GiB less traffic per step) against separate.
    (
        "train 1b flaxlm separate projections",
        90,
        ["train_throughput", "--cases", "1b:flax:fast_separate"],
    ),  # fmt: skip
    # Triton's gemms over projections concatenated by us (XLA's dot merger already merges
    # them for Triton: no fewer kernels in the compiled step, 1.3 GiB more memory).
    ("decode 1b flaxlm b64 triton fused", 40, ["decode", "--cases", "1b:flax:b64:triton:fused"]),
    # The rollout loop (stop tokens): a condition read per token, or per 8 tokens.
    ("decode 1b flaxlm b64 while", 40, ["decode", "--cases", "1b:flax:b64:while"]),
    ("decode 1b flaxlm b64 while8", 90, ["decode", "--cases", "1b:flax:b64:while8"]),
    # ... and with a stop string tracked in the loop (one more kernel per step in the H200
    # compile, no more traffic): its cost per token.
    ("decode 1b flaxlm b64 strings", 40, ["decode", "--cases", "1b:flax:b64:strings"]),
    # PPO with LoRA adapters (rank 16, every projection) on the policy and the critic against
    # the full c8 case above: the reference is the policy's frozen base (one model copy fewer),
    # no base weight gradients or Adam state; memory and the iteration's split.
    ("alignment ppo lora", 120, ["alignment_throughput", "--cases", "125m:ppo:c8:lora16"]),
    # GRPO's split (groups of 4; no critic, no reward model) on the same rollouts.
    ("alignment grpo", 120, ["alignment_throughput", "--cases", "125m:grpo:c8"]),
    ("train 1b flaxlm chunked ce", 80, ["train_throughput", "--cases", "1b:flax:fast_chunked_ce"]),
    ("train 1b flaxlm cublas", 80, ["train_throughput", "--cases", "1b:flax:fast:no_triton_gemm"]),
    ("train 125m flax+hf eager", 90, ["train_throughput", "--cases", "125m:flax,125m:hf-eager"]),
    # Scanned layers: 55.7 GiB against 37.3 unrolled in the H200 compile (stacked residuals).
    ("train 1b flaxlm scan", 80, ["train_throughput", "--cases", "1b:flax:fast_scan"]),
    # Ring caches for windowed layers (bench/window_cache.py): Gemma 3 1B's shape at a 4096
    # prompt, full caches against rings, timed; measured only on the CPU so far.
    ("decode window rings", 150, ["window_cache", "--shapes", "gemma3-1b-long"]),
    # Muon (train/muon.py) for the 1.1B step, Newton-Schulz in bfloat16 and float32: its cost
    # against `fast` (H200 compile: 1968 / 2025 kernels against 1643).
    (
        "train 1b flaxlm muon",
        150,
        ["train_throughput", "--cases", "1b:flax:fast_muon_bf16,1b:flax:fast_muon"],
    ),  # fmt: skip
    # Speculative decoding (models/speculative.py) at batch 1: a 1.1B target's verification
    # of k = 2 and 4 tokens from a 125m draft, one iteration's time against a plain step —
    # with the acceptance measured on trained pairs (bench/RESULTS.md), the speedup.
    ("speculative 1b", 150, ["speculative", "--shapes", "1b-125m"]),
    # Mixture of experts (models/moe.py): 8 experts top 2 on the 125m shape, capacity 1.25,
    # against HF's Mixtral (eager: a Python loop over experts) and flaxlm without drops.
    (
        "train 125m moe flax+hf eager",
        150,
        [
            "train_throughput",
            "--cases",
            "125m-moe:flax,125m-moe:hf-eager,125m-moe:flax:fast_dropless",
        ],
    ),  # fmt: skip
    # An int8 KV cache after a 4096-token prompt, through the Pallas kernel (H200 compile:
    # 5.69 GiB per batch-64 step against 8.43 with a bf16 cache).
    ("decode 1b long kv8", 150, ["decode", "--cases", "1b-long:flax:b64,1b-long:flax:b64:kv8"]),
    # A Qwen3-30B-A3B-like decode (128 experts, top 8): batch 1 reads only the chosen experts
    # (H200 compile: 1.55 GiB per step against 9.47 reading all); batch 64 dispatches by
    # capacity.
    ("decode moe b1 b64", 150, ["decode", "--cases", "moe:flax:b1,moe:flax:b64"]),
    # The blockwise attention in plain JAX (models/flash_attention.py) against cuDNN's: H200
    # compile 39.5 GiB against 35.6, 497 host launches per step (its loops are not graphs).
    ("train 1b flaxlm flash attention", 90, ["train_throughput", "--cases", "1b:flax:flash_attn"]),
    # Command buffers for everything, loops included (`cmdbuf`): if the default step's profile
    # shows the GPU idle between kernels (cuBLAS calls launched from the host), this is the
    # lever; the deviceless compile cannot tell (its target states no driver version). Last:
    # on 2026-12-04 it was killed at its 120 s cap (then 40 s estimated) without a record —
    # a compile that long or a hang — while the profiled default step was 96% busy.
    ("decode 1b flaxlm b64 cmdbuf", 130, ["decode", "--cases", "1b:flax:b64:cmdbuf"]),
]

TINY_CASES = [
    ("train tiny flaxlm", 60, ["train_throughput", "--cases", "tiny:flax"]),
    ("decode tiny flaxlm b4", 60, ["decode", "--tiny", "--cases", "tiny:flax:b4:profile"]),
    ("alignment tiny", 120, ["alignment_throughput", "--tiny"]),
    ("decode kernels tiny", 60, ["decode_kernels", "--tiny", "--pieces", "attention"]),
    ("decode tiny tuned attention", 60, tuned_attention("tiny", 4)),
]

# The first flaxlm decode case of a call counts at least this long (GPU_CASES' comment).
FIRST_DECODE_S = 180

# Extra flags per bench module (fewer repeats than their defaults: the lease is short).
FLAGS = {
    "train_throughput": ["--steps", "6", "--warmup", "2"],
    "decode": ["--runs", "1"],
    "alignment_throughput": [],
    "window_cache": ["--time"],
    "decode_kernels": [],
    "speculative": [],
}
# The records each bench module appends in OUT; suite.md shows their tables in this order.
JSONL = {m: f"{m}.jsonl" for m in FLAGS}
# copied into --state: the tuned and control cases read them
STATE_RECORDS = ("decode_kernels.jsonl", "alignment_throughput.jsonl")


def environment() -> dict:
    """Date, versions (from the installed packages' metadata: importing jax and torch here
    would cost seconds of the budget) and the GPU."""
    from importlib import metadata

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
    }
    for mod in ("jax", "jaxlib", "flax", "optax", "torch", "transformers"):
        try:
            info[mod] = metadata.version(mod)
        except Exception:  # not installed here
            info[mod] = None
    try:
        info["gpu"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except Exception:
        info["gpu"] = None
    return info


def bench_table(module: str, path: str) -> str:
    """A bench's markdown table, built from its JSONL file by the bench's own `markdown`."""
    try:
        return importlib.import_module(f"flaxlm.bench.{module}").markdown(path)
    except Exception as e:  # a summary must never stop the suite
        return f"(no table: {type(e).__name__}: {e})"


def write_summary(out: str, env: dict, log: list[dict]):
    lines = [
        "# GPU suite",
        "",
        "```",
        json.dumps(env, indent=1),
        "```",
        "",
        "| case | status | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {r['name']} | {r['status']} | {r.get('seconds', 0):.0f} |" for r in log]
    for module, name in JSONL.items():
        path = os.path.join(out, name)
        if os.path.exists(path):
            lines += ["", f"## {module}", "", bench_table(module, path).rstrip("\n")]
    with open(os.path.join(out, "suite.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _status(code: int, errors: list[dict], n: int) -> str:
    if not errors:
        return "ok" if code == 0 else f"exit {code}"
    first = errors[0]
    what = f"{len(errors)} of {n} records errors, first {first.get('case', '?')}: "
    what += str(first.get("error"))[:120]
    return f"failed ({f'exit {code}; ' if code else ''}{what})"


def run_case(cmd: list[str], timeout: float, jsonl: str | None = None, env=None) -> str:
    """Runs one case in its own process group; on timeout the whole group is killed, so the
    bench's per-case child (which holds the GPU) does not outlive it and starve the next case.
    "ok" only when it exits 0 and appended no error record to `jsonl` (the bench's file)."""
    offset = os.path.getsize(jsonl) if jsonl and os.path.exists(jsonl) else 0
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timeout"
    recs = []
    if jsonl and os.path.exists(jsonl):
        from flaxlm.bench.driver import _records_since

        recs = _records_since(jsonl, offset)
    return _status(code, [r for r in recs if "error" in r], len(recs))


class State:
    """What outlives a call on the warm device machine (module docstring): DIR/finished.jsonl,
    one line per finished case, and DIR/<records>.jsonl, the records of STATE_RECORDS."""

    def __init__(self, folder: str, resume: bool):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        if not resume:  # a new series: forget the files this class writes (only those)
            for name in ("finished.jsonl", *STATE_RECORDS):
                if os.path.exists(os.path.join(folder, name)):
                    os.remove(os.path.join(folder, name))
        self.synced: dict[str, int] = {}  # OUT file -> bytes copied so far this call

    def finished(self) -> dict[str, dict]:
        path = os.path.join(self.folder, "finished.jsonl")
        return {r["name"]: r for r in _jsonl(path)} if os.path.exists(path) else {}

    def finish(self, entry: dict):
        with open(os.path.join(self.folder, "finished.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")

    def sync(self, out: str):
        """Appends the complete lines OUT's STATE_RECORDS gained since the last sync."""
        for name in STATE_RECORDS:
            src = os.path.join(out, name)
            if not os.path.exists(src):
                continue
            with open(src, "rb") as f:
                f.seek(self.synced.get(name, 0))
                new = f.read()
            new = new[: new.rfind(b"\n") + 1]  # a line still being written waits
            if new:
                with open(os.path.join(self.folder, name), "ab") as f:
                    f.write(new)
                self.synced[name] = self.synced.get(name, 0) + len(new)


def select(cases: list, only: list[str], parser) -> list:
    """The cases `--only` names (a name, or an index into the list); an unknown one stops the
    suite with the valid names and indices."""
    names = [c[0] for c in cases]
    picked = []
    for want in only:
        if want.isdigit() and int(want) < len(cases):
            picked.append(int(want))
        elif want in names:
            picked.append(names.index(want))
        else:
            listing = "\n".join(f"  {i}: {n}" for i, n in enumerate(names))
            parser.error(f"--only {want!r}: no such case; the cases are:\n{listing}")
    return [cases[i] for i in sorted(set(picked))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all cases")
    p.add_argument("--t0", type=float, default=0.0,
                   help="epoch seconds the budget counts from (default: now)")  # fmt: skip
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--only", action="append", default=[],
                   help="run only this case (its name or index; repeatable)")  # fmt: skip
    p.add_argument("--start", type=int, default=0, help="skip the first START cases")
    p.add_argument("--state", default="", help="folder that outlives a call (docstring)")
    p.add_argument("--resume", action="store_true",
                   help="skip the cases --state lists as finished; read its records")  # fmt: skip
    a = p.parse_args(argv)
    if a.resume and not a.state:
        p.error("--resume needs --state")
    all_cases = TINY_CASES if a.tiny else GPU_CASES
    cases = select(all_cases, a.only, p) if a.only else all_cases[a.start :]
    deadline = (a.t0 or time.time()) + a.budget
    os.makedirs(a.out, exist_ok=True)
    state = State(a.state, a.resume) if a.state else None
    done = state.finished() if state else {}
    env = environment()
    print(json.dumps(env), flush=True)
    case_env = {**os.environ, "FLAXLM_BENCH_MD": "0"}  # tables: suite.md, from the .jsonl
    first_decode_s = 0 if a.tiny else FIRST_DECODE_S
    log = []
    write_summary(a.out, env, log)  # a call killed in its first case still returns suite.md
    for name, estimate, args in cases:
        if name in done:
            d = done[name]
            log.append({"name": name, "status": f"done in an earlier call ({d['status']})",
                        "seconds": 0})  # fmt: skip
            continue
        if callable(args):  # chosen from what earlier cases measured (`tuned_attention`)
            args = args([a.out, a.state])
            if isinstance(args, str):
                log.append({"name": name, "status": args})
                print(f"=== {name}: {args}", flush=True)
                continue
        module, rest = args[0], args[1:]
        first_decode = module == "decode" and ":flax:" in " ".join(rest) and first_decode_s
        if first_decode:
            estimate = max(estimate, first_decode_s)
        left = deadline - time.time()
        if left < estimate:
            log.append({"name": name, "status": f"skipped ({left:.0f}s left < {estimate}s)"})
            continue
        if first_decode:
            first_decode_s = 0  # this call's first flaxlm decode runs now
        cmd = [PY, "-m", f"flaxlm.bench.{module}", "--out", a.out, *rest, *FLAGS[module]]
        t0 = time.time()
        print(f"=== {name}: {' '.join(cmd)}", flush=True)
        # A case that hangs costs at most 3x its estimate, not the rest of the lease.
        timeout = max(min(left - 5, 3 * estimate), 10)
        status = run_case(cmd, timeout, os.path.join(a.out, JSONL[module]), case_env)
        seconds = time.time() - t0
        log.append({"name": name, "status": status, "seconds": seconds})
        print(f"=== {name}: {status} in {seconds:.0f}s", flush=True)
        if state:
            state.sync(a.out)
            if status != "timeout" or timeout >= 3 * estimate:  # not cut by the budget
                state.finish({"name": name, "status": status, "seconds": round(seconds)})
        write_summary(a.out, env, log)
    write_summary(a.out, env, log)
    print(open(os.path.join(a.out, "suite.md")).read())


if __name__ == "__main__":
    main()
