"""What the benchmark drivers share (train_throughput, decode, alignment_throughput).

Every case runs in its own subprocess (a fresh accelerator; a crash, OOM or hang costs only
that case) that appends one JSON record to OUT/<bench>.jsonl; the driver records a timeout, and
a child that died without writing its record (an abort, a segfault, an XLA CHECK, the OOM
killer), as an error record, and renders the table from the latest record of each case, so
cases run by separate invocations (bench/gpu_suite.py) share one table. A bench exits non-zero
when the latest record of one of the cases it ran is an error (`exit_if_failed`), so whoever
runs it (the GPU suite) sees the failure without reading the records. A case that cannot run
here (the HF peer without torch: `skip_record`) is recorded with a "skipped" key instead of
"error": the table shows why, and it counts as no failure.

FLAXLM_BENCH_MD=0 in the environment: `write_table` writes no .md file (the GPU suite sets it:
its OUT comes back from the device machine 8 files at most, and suite.md holds every table,
built from the .jsonl files).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping

# Named XLA flag sets a case may add as an option ("1b:flax:b64:cmdbuf"); the driver puts them in
# the case subprocess's XLA_FLAGS. Each is kept only if it pays on the H200, measured against
# the same case without it.
XLA_FLAG_SETS = {
    # CUDA graphs over whole loop bodies, while loops included: a decode step of small kernels
    # then costs one graph launch instead of one launch per kernel.
    "cmdbuf": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL,"
    "CONDITIONAL,WHILE --xla_gpu_graph_min_graph_size=1",
    "lhs": "--xla_gpu_enable_latency_hiding_scheduler=true",
    "no_triton_gemm": "--xla_gpu_enable_triton_gemm=false",  # cuBLAS for every matmul
}


# The HF peer's packages: a case that misses one is skipped (`skip_record`), not failed.
PEER_PACKAGES = ("torch", "transformers")


def skip_record(case: str, e: ModuleNotFoundError) -> dict | None:
    """The record of a peer case whose python lacks `PEER_PACKAGES` (a "skipped" note, no
    "error"), or None for any other missing module (a failure)."""
    if (e.name or "").split(".")[0] not in PEER_PACKAGES:
        return None
    return {"case": case, "skipped": f"{e} (the HF peer needs {' and '.join(PEER_PACKAGES)})"}


def append_record(path: str, rec: dict) -> None:
    """Appends `rec` as one line; on a new line if the file's last one was cut short (a child
    killed mid-write leaves no newline), so the record is not glued onto the cut one."""
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        cut = False
        if f.tell():
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
        f.write((("\n" if cut else "") + json.dumps(rec) + "\n").encode())


def run_one(path: str, case: str, fn: Callable[[], dict]) -> dict:
    """The child's side: runs one case in-process and appends its record; an exception becomes
    an error record, so one failing case does not hide the others."""
    try:
        rec = fn()
    except Exception as e:
        rec = {"case": case, "error": f"{type(e).__name__}: {e}"}
    append_record(path, rec)
    print(json.dumps(rec), flush=True)
    return rec


def _records_since(path: str, offset: int) -> list[dict]:
    """The records appended to the JSONL file after byte `offset` (a line cut short by a killed
    writer is skipped)."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    recs = []
    for line in lines:
        try:
            recs.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in recs if isinstance(r, dict)]


def run_case(cmd: list[str], case: str, path: str, timeout: float, env=None) -> float:
    """The driver's side: runs a case's subprocess; a timeout is appended as an error record,
    and so is a non-zero exit that left no record of the case (the child died before writing
    it: "exit -6" is SIGABRT). Returns the seconds it took."""
    t0 = time.perf_counter()
    offset = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        code = subprocess.run(cmd, timeout=timeout, check=False, env=env).returncode
    except subprocess.TimeoutExpired:
        append_record(path, {"case": case, "error": f"timeout {timeout}s"})
    else:
        if code != 0 and not any(r.get("case") == case for r in _records_since(path, offset)):
            append_record(path, {"case": case, "error": f"exit {code}"})
    seconds = time.perf_counter() - t0
    print(f"[{case}] {seconds:.0f}s", flush=True)
    return seconds


def latest_records(path: str) -> list[dict]:
    """The latest record of every case in the JSONL file, in the order of their last runs (a
    line cut short by a killed writer is skipped, as in `_records_since`)."""
    latest: dict[str, dict] = {}
    for rec in _records_since(path, 0):
        if "case" in rec:
            latest.pop(rec["case"], None)
            latest[rec["case"]] = rec
    return list(latest.values())


def case_env(case: str, names: list[str], flag_sets: Mapping[str, str] = XLA_FLAG_SETS,
             allowed=()) -> dict:  # fmt: skip
    """os.environ plus the XLA flag sets a case names (its parts after the fixed ones). A part
    that is neither a flag set nor in `allowed` (options the case's child reads) stops the
    driver with the lists of both."""
    env = dict(os.environ)
    for name in names:
        if name in flag_sets:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag_sets[name]).strip()
        elif name not in allowed:
            raise SystemExit(
                f"case {case!r}: {name!r} is none of the XLA flag sets {sorted(flag_sets)}"
                + (f" or options {sorted(allowed)}" if allowed else "")
            )
    return env


def failed_cases(path: str, cases) -> list[dict]:
    """The latest records of `cases` in the JSONL file that are errors (or missing); a skipped
    case ("skipped", no "error") is not one."""
    latest = {r["case"]: r for r in latest_records(path)}
    return [latest.get(c, {"case": c, "error": "no record"}) for c in dict.fromkeys(cases)
            if "error" in latest.get(c, {"error": ""})]  # fmt: skip


def exit_if_failed(path: str, cases) -> None:
    """Exits 1, naming them, when the latest record of one of `cases` is an error."""
    failed = failed_cases(path, cases)
    if failed:
        lines = [f"  {r['case']}: {str(r['error'])[:200]}" for r in failed]
        print(f"{len(failed)} of {len(set(cases))} cases failed:", *lines, sep="\n",
              file=sys.stderr, flush=True)  # fmt: skip
        raise SystemExit(1)


def write_table(out: str, name: str, md: str) -> None:
    """OUT/NAME, unless FLAXLM_BENCH_MD=0 (module docstring)."""
    if os.environ.get("FLAXLM_BENCH_MD", "1") == "0":
        return
    with open(os.path.join(out, name), "w") as f:
        f.write(md + "\n")
