#!/usr/bin/env bash
# Compares the CPU cost of test files between a base revision and the working tree, fairly:
# each side gets its own fresh persistent compilation cache, run once cold and once warm. (With
# one shared cache, whichever side runs second finds the other's programs compiled already.)
#
#   bash tests/compare_test_time.sh BASE_REV tests/models/test_moe.py [more test files...]
#
# Prints one line per (file, side, cold|warm): wall, user and system seconds. The base side runs
# from a temporary git worktree with this checkout's .venv.
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,8p "$0"; exit 2; }
base_rev=$1; shift
root=$(git rev-parse --show-toplevel)
work=$(mktemp -d)
git -C "$root" worktree add -q --detach "$work/base" "$base_rev"
ln -s "$root/.venv" "$work/base/.venv"
trap 'git -C "$root" worktree remove --force "$work/base"; rm -rf "$work"' EXIT
export XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
for file in "$@"; do
  for side in base after; do
    dir=$root; [ $side = base ] && dir=$work/base
    cache=$work/cache-$side; rm -rf "$cache"
    for run in cold warm; do
      (cd "$dir" && JAX_COMPILATION_CACHE_DIR=$cache /usr/bin/time -f \
        "$file $side $run: %e s wall, %U s user, %S s sys" "$root/.venv/bin/python" -m pytest \
        -o addopts=--import-mode=importlib -q -p no:cacheprovider "$file" 2>&1 | tail -n 2)
    done
  done
done
