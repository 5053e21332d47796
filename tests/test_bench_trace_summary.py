"""bench/trace_summary.py: the interval arithmetic on hand-made events, and a real CPU trace
read through jax.profiler.ProfileData."""

import json

import jax
import jax.numpy as jnp

from flaxlm.bench.trace_summary import (
    busy_ns,
    kernel_kind,
    line_stats,
    plane_stats,
    summarize_trace,
)


def test_busy_is_the_union_of_nested_overlapping_and_disjoint_events():
    events = [
        ("outer", 0, 100),  # [0, 100)
        ("inner", 10, 20),  # nested in outer: adds nothing
        ("tail", 90, 30),  # overlaps outer's end: adds [100, 120)
        ("later", 200, 50),  # disjoint: adds 50
        ("touch", 250, 10),  # starts where `later` ends: adds 10
        ("marker", 500, 0),  # zero length: counted as an event, no time
    ]
    s = line_stats([(n, st * 1000, d * 1000) for n, st, d in events], top=3)  # ns from µs
    assert s["events"] == 6
    assert s["sum_us"] == 210.0
    assert s["busy_us"] == 180.0  # 120 + 50 + 10
    assert s["span_us"] == 500.0  # 0 .. the marker at 500
    assert s["top"] == [["outer", 1, 100.0], ["later", 1, 50.0], ["tail", 1, 30.0]]
    assert busy_ns([]) == 0 and busy_ns([(5, 0)]) == 0
    assert busy_ns([(0, 10), (0, 10), (2, 3)]) == 10  # duplicates count once


def test_top_aggregates_by_name_and_stream_union_spans_lines():
    def us(events):  # (name, start µs, duration µs) -> ns
        return [(n, st * 1000, d * 1000) for n, st, d in events]

    plane = plane_stats(
        [
            ("Stream #13(Kernel)", us([("gemm", 0, 40), ("gemm", 100, 40), ("fusion", 50, 10)])),
            ("Stream #14(MemcpyD2D)", us([("copy", 30, 30)])),  # overlaps gemm [0, 40)
            ("XLA Ops", us([("op", 0, 500)])),  # not a stream: out of the union
            ("empty", []),  # left out
        ]
    )
    names = [ln["name"] for ln in plane["lines"]]
    assert names == ["Stream #13(Kernel)", "Stream #14(MemcpyD2D)", "XLA Ops"]
    assert plane["lines"][0]["top"] == [["gemm", 2, 80.0], ["fusion", 1, 10.0]]
    assert plane["stream_lines"] == 2
    assert plane["stream_busy_us"] == 100.0  # [0, 60) (gemm + copy, fusion inside) + [100, 140)
    assert plane["stream_span_us"] == 140.0
    assert "stream_busy_us" not in plane_stats([("XLA Ops", us([("op", 0, 5)]))])


def test_top_kinds_add_up_the_layers_copies_of_a_kernel():
    events = [("loop_add_fusion_21", 0, 5e3), ("loop_add_fusion_3", 1e4, 5e3),
              ("gemm_fusion_dot.1130", 2e4, 8e3), ("gemm_fusion_dot.1131", 3e4, 8e3),
              ("input_reduce_fusion", 4e4, 1e3)]  # fmt: skip
    stats = line_stats(events)
    assert stats["top_kinds"] == [["gemm_fusion_dot", 2, 16.0], ["loop_add_fusion", 2, 10.0],
                                  ["input_reduce_fusion", 1, 1.0]]  # fmt: skip
    assert len(stats["top"]) == 5
    assert kernel_kind("fusion_1_2") == "fusion" and kernel_kind("123") == "123"


def test_summarize_a_cpu_trace(tmp_path):
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    x = jnp.ones((256, 256))
    f(x).block_until_ready()  # compiled before the trace
    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0
    with jax.profiler.trace(str(tmp_path), profiler_options=opts):
        for _ in range(3):
            f(x).block_until_ready()
    s = summarize_trace(str(tmp_path), plane_prefix="/host:CPU", top=5)
    assert list(s["planes"]) == ["/host:CPU"]
    lines = s["planes"]["/host:CPU"]["lines"]
    assert any(ln["events"] > 0 and ln["busy_us"] > 0 for ln in lines), lines
    for ln in lines:
        assert 0 <= ln["busy_us"] <= ln["span_us"] + 0.1 and ln["busy_us"] <= ln["sum_us"] + 0.1
        assert len(ln["top"]) <= 5
    assert len(json.dumps(s)) < 20_000
    none = summarize_trace(str(tmp_path), plane_prefix="/device:")
    assert none["planes"] == {} and "/host:CPU" in none["note"]


def test_decode_table_reads_gpu_busy_from_a_profile():
    from flaxlm.bench.decode import _busy

    lines = [
        {"name": "Stream #13(Kernel)",
         "top_kinds": [["gemm_fusion_dot", 10, 500.0], ["loop_add_fusion", 5, 100.0]]},
        {"name": "XLA Ops", "top_kinds": [["op", 1, 900.0]]},  # not a stream: not counted
    ]  # fmt: skip
    plane = {"lines": lines, "stream_busy_us": 700.0}
    rec = {"profile_wall_us": 1000.0, "profile": {"planes": {"/device:GPU:0": plane}}}
    assert _busy(rec) == "70%; most: gemm_fusion_dot 71%"
    assert _busy({}) == "" and _busy({"profile": {"error": "x"}}) == ""
