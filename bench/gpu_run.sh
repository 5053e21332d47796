#!/usr/bin/env bash
# The command the GPU lease runs (device tool, carry .whl): wheels the image lacks, the flaxlm
# namespace as a symlink farm (no pip install needed), then the suite.
# Usage: bench/gpu_run.sh BUDGET_S [START]   (START: skip the first START cases of GPU_CASES)
# At most 8 files come back from $OUT: log.txt, suite.md and the train, decode, decode-kernel
# and alignment benches' .jsonl (6). Their .md tables are removed at the end: suite.md holds
# every one of them. bench/window_cache.py's two go too: its records and table are in log.txt
# (it prints them) and its table in suite.md.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkg/flaxlm && cp flaxlm/*.py /tmp/pkg/flaxlm/
for f in models train data alignment configs evaluation bench; do ln -sfn "$PWD/$f" /tmp/pkg/flaxlm/$f; done
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
# One compilation cache for every case process (and the next call, while the machine is warm):
# jax also keeps XLA's per-fusion autotuning results there, so cases that share programs or
# fusions (the PPO variants, a rerun) skip compiling and autotuning them again. Timings are of
# warmed-up steps, so they do not change.
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
cd /tmp && python3 -m flaxlm.bench.gpu_suite --out "$OUT" --budget "${1:-230}" --start "${2:-0}" 2>&1 | tee "$OUT/log.txt"
rm -f "$OUT/window_cache.jsonl"
for f in "$OUT"/*.md; do [ "$(basename "$f")" = suite.md ] || rm -f "$f"; done
