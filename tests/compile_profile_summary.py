"""Sums a FLAXLM_TEST_COMPILE_PROFILE file (tests/conftest.py) per test file, costliest (CPU) first:
wall seconds, CPU seconds of the test process and of the subprocesses it waited for, and of the
wall seconds those spent tracing, lowering and XLA compiling, with compile and cache-hit counts;
then the compile seconds per jitted function over the suite (a name like `jit(multiply)` is an
op run eagerly, outside any jitted function: one small compile per new shape).

    FLAXLM_TEST_COMPILE_PROFILE=/tmp/prof.jsonl make test
    .venv/bin/python tests/compile_profile_summary.py /tmp/prof.jsonl [TOP]
"""

import collections
import json
import sys

KEYS = (
    "wall_s",
    "cpu_s",
    "child_cpu_s",
    "trace_s",
    "lower_s",
    "compile_s",
    "compiles",
    "cache_hits",
)


def main(path: str, top: int = 40) -> None:
    with open(path) as f:
        records = [json.loads(line) for line in f]
    per_file: dict = collections.defaultdict(lambda: dict.fromkeys(KEYS, 0.0))
    by_fun: dict = collections.defaultdict(lambda: [0.0, 0])  # name -> [seconds, tests]
    for rec in records:
        sums = per_file[rec["test"].split("::")[0]]
        for k in KEYS:
            sums[k] += rec.get(k, 0)
        for name, secs in rec.get("compile_s_by_fun", {}).items():
            by_fun[name][0] += secs
            by_fun[name][1] += 1
    total = {k: sum(s[k] for s in per_file.values()) for k in KEYS}
    print(f"{'file':60s} " + " ".join(f"{k:>10s}" for k in KEYS))
    rows = sorted(per_file.items(), key=lambda kv: -(kv[1]["cpu_s"] + kv[1]["child_cpu_s"]))[:top]
    for name, s in rows + [("TOTAL", total)]:
        print(f"{name[-60:]:60s} " + " ".join(f"{s[k]:10.1f}" for k in KEYS))
    print("\ncompile seconds by jitted function (over 0.05 s in a test), in how many tests:")
    for name, (secs, tests) in sorted(by_fun.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{secs:8.1f} {tests:5d}  {name}")


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
