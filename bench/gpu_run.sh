#!/usr/bin/env bash
# The command the GPU lease runs (device tool, carry .whl): wheels the image lacks, the flaxlm
# namespace as a symlink farm (no pip install needed), then the suite.
# Usage: bench/gpu_run.sh BUDGET_S [fresh|START]
#   BUDGET_S counts from this script's start (installing the wheels and imports included), so
#   give the device call a timeout_s of about BUDGET_S + 60 (the last summary, the copy back).
#   A later call on the same warm machine resumes: the suite keeps the finished cases' names
#   and decode_kernels' records in $STATE (/tmp on the device machine outlives a call while it
#   is warm) and skips those cases; the tuned decode cases read those records. "fresh" forgets
#   the state first; START (a number) also skips the first START cases of GPU_CASES.
# At most 8 files come back from $OUT, and the suite never leaves more there, even when the
# call is killed: log.txt, suite.md (every bench's table, built from its .jsonl) and one
# .jsonl per bench that ran — train, decode, decode-kernel, alignment, window-cache and
# speculative (6). No bench writes its .md into $OUT (FLAXLM_BENCH_MD=0, set by the suite).
set -u
T0=$(date +%s.%N)
STATE=/tmp/flaxlm_gpu_state
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkg/flaxlm && cp flaxlm/*.py /tmp/pkg/flaxlm/
for f in models train data alignment configs evaluation bench; do ln -sfn "$PWD/$f" /tmp/pkg/flaxlm/$f; done
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
# One compilation cache for every case process (and the next call, while the machine is warm):
# jax also keeps XLA's per-fusion autotuning results there, so cases that share programs or
# fusions (the PPO variants, a rerun) skip compiling and autotuning them again. Timings are of
# warmed-up steps, so they do not change.
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
args=(--out "$OUT" --budget "${1:-230}" --t0 "$T0" --state "$STATE")
case "${2:-}" in
  fresh) ;;
  "") [ -d "$STATE" ] && args+=(--resume) ;;
  *) args+=(--start "$2"); [ -d "$STATE" ] && args+=(--resume) ;;
esac
cd /tmp && python3 -m flaxlm.bench.gpu_suite "${args[@]}" 2>&1 | tee "$OUT/log.txt"
