"""A few-KB summary of a `jax.profiler` trace: where a program's time goes, as JSON.

Why: a benchmark's wall time says how slow a program is, not why. On a GPU the gap between a
decode step's time and its HBM-bandwidth bound is either idle time between kernels (launch
latency, host round trips) or kernels that run slower than the bytes they move allow. A trace
tells the two apart, but a trace is tens of MB and needs a viewer; a bench record wants a few
numbers it can keep next to its timings. So, per timeline line of the device planes:

    events    how many events the line holds
    sum_us    their summed durations (counts nested/overlapping events twice)
    busy_us   the union of their [start, start + duration) intervals: time something ran
    span_us   first start to last end; span − busy is the line's idle time
    top       the `top` event names by summed duration: [name, count, total_us]
    top_kinds the same over names without their instance numbers (`kernel_kind`): one entry
              for all 22 layers' "loop_add_fusion_N", say

and per plane, when it has lines named "Stream ..." (the CUPTI tracer gives one per CUDA stream,
"Stream #13(Kernel,MemcpyH2D)"), `stream_busy_us` / `stream_span_us`: the union over all of
them, i.e. the time at least one kernel or copy ran on the GPU. Set against the traced call's
wall time it says what fraction of it the GPU was working.

It reads the trace through the public `jax.profiler.ProfileData`; the aggregation itself
(`line_stats`, `busy_ns`) takes plain `(name, start_ns, duration_ns)` tuples.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable

NAME_CHARS = 120  # kernel names (cuBLAS/cutlass) can be hundreds of characters


def busy_ns(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, start + duration) intervals; nested and overlapping
    intervals count once, zero-length ones not at all."""
    total, end = 0.0, None
    for s, d in sorted((s, d) for s, d in intervals if d > 0):
        e = s + d
        if end is None or s >= end:  # a gap: a new run starts
            total += e - s
            end = e
        elif e > end:  # overlaps the current run and extends it
            total += e - end
            end = e
    return total


def _span_ns(intervals: list[tuple[float, float]]) -> float:
    if not intervals:
        return 0.0
    return max(s + d for s, d in intervals) - min(s for s, _ in intervals)


def _us(ns: float) -> float:
    return round(ns / 1e3, 1)


def line_stats(events: Iterable[tuple[str, float, float]], top: int = 25) -> dict:
    """Summary of one timeline line from its (name, start_ns, duration_ns) events."""
    events = list(events)
    intervals = [(s, d) for _, s, d in events]
    by_name: dict[str, list] = {}
    for name, _, d in events:
        agg = by_name.setdefault(name, [0, 0.0])
        agg[0] += 1
        agg[1] += d
    by_kind: dict[str, list] = {}
    for name, (n, t) in by_name.items():
        agg = by_kind.setdefault(kernel_kind(name), [0, 0.0])
        agg[0] += n
        agg[1] += t

    def ranked(groups):
        best = sorted(groups.items(), key=lambda kv: (-kv[1][1], kv[0]))[:top]
        return [[name[:NAME_CHARS], n, _us(t)] for name, (n, t) in best]

    return {
        "events": len(events),
        "sum_us": _us(sum(d for _, d in intervals)),
        "busy_us": _us(busy_ns(intervals)),
        "span_us": _us(_span_ns(intervals)),
        "top": ranked(by_name),
        "top_kinds": ranked(by_kind),
    }


def kernel_kind(name: str) -> str:
    """A kernel's name without its instance numbers: XLA names each layer's copy of a fusion
    apart ("loop_add_fusion_21", "gemm_fusion_dot.1130"), so `top_kinds` adds the layers up."""
    return re.sub(r"(?:[._]\d+)+$", "", name) or name


def plane_stats(lines: Iterable[tuple[str, list]], top: int = 25) -> dict:
    """Summary of one plane from (line name, [(name, start_ns, duration_ns), ...]) pairs; lines
    without events are left out."""
    out: dict = {"lines": []}
    stream: list[tuple[float, float]] = []
    for name, events in lines:
        if not events:
            continue
        out["lines"].append({"name": name, **line_stats(events, top)})
        if name.startswith("Stream"):
            stream.extend((s, d) for _, s, d in events)
    if stream:
        out["stream_lines"] = sum(ln["name"].startswith("Stream") for ln in out["lines"])
        out["stream_busy_us"] = _us(busy_ns(stream))
        out["stream_span_us"] = _us(_span_ns(stream))
    return out


def find_xplane(logdir_or_path: str) -> str:
    """The trace file itself, or the newest `*.xplane.pb` under a `jax.profiler.trace` logdir
    (it writes plugins/profile/<timestamp>/<host>.xplane.pb)."""
    if os.path.isfile(logdir_or_path):
        return logdir_or_path
    found = glob.glob(os.path.join(logdir_or_path, "**", "*.xplane.pb"), recursive=True)
    if not found:
        raise FileNotFoundError(f"no *.xplane.pb under {logdir_or_path}")
    return max(found, key=os.path.getmtime)


def summarize_trace(logdir_or_xplane_path: str, plane_prefix: str = "/device:", top: int = 25):
    """{"planes": {plane name: plane_stats}} for every plane whose name starts with
    `plane_prefix` ("/device:GPU:0" on a GPU; "/host:CPU" holds the XLA CPU threads' events),
    or, when none does, {"planes": {}, "note": ...} naming the planes the trace has."""
    from jax.profiler import ProfileData

    path = find_xplane(logdir_or_xplane_path)
    data = ProfileData.from_file(path)
    planes, names = {}, []
    for plane in data.planes:
        names.append(plane.name)
        if plane.name.startswith(plane_prefix):
            lines = [(ln.name, [(e.name, e.start_ns, e.duration_ns) for e in ln.events])
                     for ln in plane.lines]  # fmt: skip
            planes[plane.name] = plane_stats(lines, top)
    out: dict = {"planes": planes, "plane_prefix": plane_prefix}
    if not planes:
        out["note"] = f"no plane starts with {plane_prefix!r}; the trace has {names}"
    return out


def profile_call(fn) -> dict:
    """Traces one call of `fn` (already compiled and warm) and summarises the trace: the
    record's "profile" and "profile_wall_us". The Python tracer stays off: it would add its
    own cost to every Python call and flood the host plane."""
    import tempfile
    import time

    import jax

    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0
    prefix = "/host:CPU" if jax.default_backend() == "cpu" else "/device:"
    try:
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d, profiler_options=opts):
                t0 = time.perf_counter()
                fn()
                wall = time.perf_counter() - t0
            return {"profile_wall_us": wall * 1e6, "profile": summarize_trace(d, prefix)}
    except Exception as e:  # the timings already taken stand without a profile
        return {"profile": {"error": f"{type(e).__name__}: {e}"}}
