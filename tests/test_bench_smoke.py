"""CPU smoke tests of the GPU benchmarks' drivers (bench/train_throughput.py, bench/decode.py):
every case kind the GPU suite runs — plans, XLA flag sets, generate options — goes through the
same subprocess driver and lands in the JSON and the markdown table. No figure is compared
with a threshold (timings belong to benchmarks, not tests); the records must be sane."""

import json
import math
import os
import subprocess
import sys

import pytest

from flaxlm.bench import decode, driver, train_throughput


def test_train_throughput_driver(tmp_path):
    cases = ["tiny:flax", "tiny:flax:cpu:no_triton_gemm", "tiny:flax:cpu:profile"]
    argv = ["--out", str(tmp_path), "--cases", ",".join(cases), "--steps", "2", "--warmup", "1"]
    train_throughput.main(argv)
    lines = (tmp_path / "train_throughput.jsonl").read_text().splitlines()
    recs = {r["case"]: r for r in map(json.loads, lines)}
    assert set(recs) == set(cases)
    for r in recs.values():
        assert "error" not in r, r
        # MFU is against an H200's 989 TFLOP/s: null on the CPU (n/a in the table)
        assert r["tokens_per_s"] > 0 and r["mfu"] is None and r["mfu_causal"] is None
        assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(r["batch"] * r["seq_len"])
        assert r["plan"] == "cpu" and r["loss"] > 0
    # ":profile" traces one more step after the timed ones (the CPU plane here).
    lines = recs["tiny:flax:cpu:profile"]["profile"]["planes"]["/host:CPU"]["lines"]
    assert any(ln["events"] > 0 and ln["busy_us"] > 0 for ln in lines)
    assert all("profile" not in recs[c] for c in cases[:2])
    md = (tmp_path / "train_throughput.md").read_text()
    assert all(f"| {c} |" in md for c in cases)
    assert "| n/a | n/a |" in md and "0.0%" not in md


def test_train_mfu_is_a_gpu_figure():
    """MFU divides by an H200's 989 TFLOP/s: off a GPU the record holds null and the table
    prints n/a (it printed 0.0% on the CPU), as bench/alignment_throughput.py does."""
    cpu = train_throughput._record("tiny:flax", 256, 1.0, 2, None, {"impl": "flaxlm"}, gpu=False)
    assert cpu["mfu"] is None and cpu["mfu_causal"] is None and cpu["tokens_per_s"] == 512
    gpu = train_throughput._record("tiny:flax", 256, 1.0, 2, None, {"impl": "flaxlm"})
    assert 0 < gpu["mfu_causal"] < gpu["mfu"]
    row = train_throughput.table([{**cpu, "plan": "cpu"}]).splitlines()[-1]
    assert row.startswith("| tiny:flax | 512 | 0.500 | n/a | n/a | n/a |"), row


def test_train_table_pairs_each_plan_with_the_peer_of_the_same_memory_plan():
    def rec(case, tps, impl, plan):
        return {"case": case, "tokens_per_s": tps, "step_time_s": 1.0, "mfu": 0.5,
                "mfu_causal": 0.4, "peak_mem_gb": 1.0, "impl": impl, "plan": plan}  # fmt: skip

    md = train_throughput.table([
        rec("7b:hf-eager:ckpt", 8000.0, "hf-eager", "ckpt"),
        rec("7b:hf-eager", 10000.0, "hf-eager", "bf16"),
        rec("7b:flax:bf16_params", 12000.0, "flaxlm", "bf16_params"),
        rec("7b:flax:bf16_full_remat", 10000.0, "flaxlm", "bf16_full_remat"),
    ])  # fmt: skip
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in md.splitlines()}
    assert "1.20x (7b:hf-eager)" in rows["7b:flax:bf16_params"]
    assert "1.25x (7b:hf-eager:ckpt)" in rows["7b:flax:bf16_full_remat"]


def test_decode_driver(tmp_path):
    cases = ["tiny:flax:b4", "tiny:flax:b4:fused", "tiny:flax:b4:while8", "tiny:flax:b4:profile",
             "tiny:flax:b4:kv8"]  # fmt: skip
    # medians of 3: one noisy run on a busy CPU can make decode time (call − prefill) ~0
    decode.main(["--tiny", "--out", str(tmp_path), "--cases", ",".join(cases), "--runs", "3"])
    recs = {r["case"]: r for r in driver.latest_records(str(tmp_path / "decode.jsonl"))}
    assert set(recs) == set(cases)
    for r in recs.values():
        assert "error" not in r, r
        assert r["new_tokens"] == 32 and r["batch"] == 4
        assert r["tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
        # Shares of the H200's bound, computed as the GPU records' are. Not `< 1`: on a busy
        # CPU the decode time (call − prefill, both noisy medians) can come out near 0.
        assert r["hbm_fraction"] > 0 and r["hbm_fraction_e2e"] > 0
    md = (tmp_path / "decode.md").read_text()
    assert all(f"| {c} |" in md for c in cases)
    # Fusing q|k|v and gate|up leaves 3 fewer matmuls per layer in the loop body on the CPU,
    # which has no dot merger (tiny has 2 layers: 6 fewer kernels with jax 0.10).
    kernels = {c: recs[c]["loop_body_kernels"] for c in cases}
    assert kernels["tiny:flax:b4"] - kernels["tiny:flax:b4:fused"] >= 2 * 2
    assert sum(recs["tiny:flax:b4"]["loop_body_ops"].values()) == kernels["tiny:flax:b4"]
    # ":profile" traces one more call: a summary of the CPU plane's lines, set against that
    # call's wall time; the other cases record no profile.
    prof = recs["tiny:flax:b4:profile"]
    assert kernels["tiny:flax:b4:profile"] == kernels["tiny:flax:b4"]  # the same program
    lines = prof["profile"]["planes"]["/host:CPU"]["lines"]
    assert any(ln["events"] > 0 and ln["busy_us"] > 0 for ln in lines), prof["profile"]
    assert prof["profile_wall_us"] > 0
    assert all("profile" not in recs[c] for c in cases[:3])
    # the int8 cache's bound: 1 + 4 / head_dim bytes per value (tiny: float32, head dim 16)
    kv8, kv = recs["tiny:flax:b4:kv8"], recs["tiny:flax:b4"]
    assert kv8["kv_bytes_per_step"] / kv["kv_bytes_per_step"] == pytest.approx((1 + 4 / 16) / 4)


def test_window_cache_bench(tmp_path):
    """bench/window_cache.py end to end on its CI shape: both ways recorded, the rings' KV
    bytes as counted (the 1 local layer of 2 keeps 8 slots of 32 + 128), and the compiled
    program's temporaries smaller with them."""
    from flaxlm.bench import window_cache

    window_cache.main(["--out", str(tmp_path), "--shapes", "tiny-window", "--time"])
    recs = [json.loads(x) for x in (tmp_path / "window_cache.jsonl").read_text().splitlines()]
    full, ring = sorted(recs, key=lambda r: r["window_cache"])
    assert full["kv_gib"] * (160 + 8) == pytest.approx(ring["kv_gib"] * (160 + 160))
    assert ring["temp_gib"] < full["temp_gib"]
    # timed: the tiny shape's decode is a difference of two ~ms wall times, absent when a
    # busy CPU makes it negative (it was, once, in a fresh-clone .ci/run), so only the calls
    # themselves must be timed
    for r in (full, ring):
        assert r["call_s"] > 0 and r["prefill_call_s"] > 0 and r.get("decode_tok_s", 1) > 0
    assert "| tiny-window | cpu | float32 | 2 | 32 + 128 | 8 | True |" in (
        tmp_path / "window_cache.md").read_text()  # fmt: skip


def test_group_prefill_bench(tmp_path):
    """bench/group_prefill.py end to end on its CI shape: both ways recorded; the shared
    prefill counts a G-th of the repeated one's FLOPs and compiles to fewer temporaries."""
    from flaxlm.bench import group_prefill

    group_prefill.main(["--out", str(tmp_path), "--shapes", "tiny-grpo", "--time"])
    recs = [json.loads(x) for x in (tmp_path / "group_prefill.jsonl").read_text().splitlines()]
    repeated, shared = sorted(recs, key=lambda r: r["shared_prefill"])
    assert shared["prefill_tflop"] * 4 == pytest.approx(repeated["prefill_tflop"])
    assert shared["temp_gib"] < repeated["temp_gib"]
    assert min(r[k] for r in recs for k in ("call_s", "prefill_s")) > 0
    assert "| tiny-grpo | cpu | float32 | 2 × 4 | 32 + 4 | shared |" in (
        tmp_path / "group_prefill.md").read_text()  # fmt: skip


def test_stop_strings_bench(tmp_path):
    """bench/stop_strings.py end to end on its CI shape: three ways recorded; rows end
    earlier with the string in the loop, and as without strings when it never comes."""
    from flaxlm.bench import stop_strings

    stop_strings.main(["--out", str(tmp_path), "--tiny"])
    recs = {r["way"]: r for r in map(json.loads, (tmp_path / "stop_strings.jsonl").open())}
    assert set(recs) == {"cut after", "in the loop", "never found"}
    assert recs["cut after"]["mean_tokens"] == recs["never found"]["mean_tokens"]
    assert recs["in the loop"]["mean_tokens"] < recs["cut after"]["mean_tokens"]
    assert "| tiny | 4 | 8 + 16 | in the loop |" in (tmp_path / "stop_strings.md").read_text()


def test_xla_flag_sets_are_known_flags():
    """XLA aborts on an unknown flag (GPU flags parse in CPU builds too), so a misspelt flag
    set fails here, not in the GPU lease."""
    from flaxlm.bench.driver import XLA_FLAG_SETS

    procs = {}  # one process per flag set, all at once
    for name, flags in XLA_FLAG_SETS.items():
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", "import jax.numpy as j; j.ones(2).sum()"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name}: {err[-500:]}"


def test_decode_kernels_bench(tmp_path):
    """bench/decode_kernels.py on its CI shape: each piece recorded with a time and the bytes
    it must move; its XLA attention step and the kernel it is set against compute the same
    step from the same inputs (the comparison is like for like)."""
    import jax.numpy as jnp
    import numpy as np

    from flaxlm.bench import decode_kernels as dk
    from flaxlm.models import decode_attention as kernel
    from flaxlm.models.config import get_variant

    dk.main(["--out", str(tmp_path), "--tiny", "--pieces", "matmul:o,attention,gate_up"])
    lines = (tmp_path / "decode_kernels.jsonl").read_text().splitlines()
    recs = {r["case"]: r for r in map(json.loads, lines)}
    assert set(recs) == {"matmul:o:triton:b4", "matmul:o:cublas:b4", "attention:xla:b4",
                         "attention:pallas:64:4:2:b4", "gate_up:xla:b4",
                         "gate_up:pallas:32:32:4:3:b4",
                         "gate_up:pallas_t:32:32:4:3:b4"}  # fmt: skip
    assert all(r["us"] > 0 and r["bytes"] > 0 for r in recs.values()), recs
    # the candidate kernels compute their XLA counterparts (float32 here), the gate|up one
    # over the weight as stored and transposed
    assert recs["attention:pallas:64:4:2:b4"]["max_abs_err_vs_xla"] < 1e-5
    assert recs["gate_up:pallas:32:32:4:3:b4"]["max_abs_err_vs_xla"] < 1e-5
    assert recs["gate_up:pallas_t:32:32:4:3:b4"]["max_abs_err_vs_xla"] < 1e-5
    # the default attention tiling and each gate|up layout's first also check the folded
    # pre-norm (`decode_norm="fold"`) once
    for piece in ("attention:pallas:64:4:2", "gate_up:pallas:32:32:4:3",
                  "gate_up:pallas_t:32:32:4:3"):  # fmt: skip
        assert recs[piece + ":b4"]["fold_max_abs_err_vs_xla"] < 1e-4
    assert recs["matmul:o:cublas:b4"]["shape"] == [128, 64]  # (heads · head dim, d_model)
    assert "| attention:pallas:64:4:2 | 4 |" in (tmp_path / "decode_kernels.md").read_text()

    cfg = get_variant("tiny", head_dim=32, dtype="float32", param_dtype="float32")
    qkv, cos, sin, caches, mask, idx = dk._attention_inputs(cfg, 2, 128, 70, 1)
    want, want_cache = dk.xla_attention_step(cfg, qkv, cos, sin, *caches[0], mask, idx)
    got, cache = kernel.decode_attention(qkv, cos, sin, *caches[0], mask, idx)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(jnp.stack(cache), jnp.stack(want_cache), atol=1e-6)


def test_speculative_bench(tmp_path):
    """The cost table's arithmetic (E(α, k), the break-even α) and one tiny timed shape."""
    from flaxlm.bench import speculative as sb

    assert sb.expected_tokens(0.0, 4) == 1.0 and sb.expected_tokens(1.0, 4) == 5.0
    assert abs(sb.expected_tokens(0.5, 2) - 1.75) < 1e-12  # 1 + 0.5 + 0.25
    assert abs(sb.expected_tokens(sb.break_even(1.75, 2), 2) - 1.75) < 1e-9
    assert sb.break_even(6.0, 4) == 1.0  # more than k + 1 steps per iteration: never pays
    sb.main(["--out", str(tmp_path), "--shapes", "tiny"])
    recs = [json.loads(x) for x in (tmp_path / "speculative.jsonl").read_text().splitlines()]
    assert [r["k"] for r in recs] == [0, 2]
    # iter_ms is (call - prefill) / iterations, a difference of ~4 ms wall times on this shape:
    # a busy CPU can make it negative (it came out -0.59 once in a full run), so its sign is
    # not a property of the code; the record must hold a number
    assert recs[1]["iterations"] >= 1 and math.isfinite(recs[1]["iter_ms"])
    assert "| tiny | cpu | 2 | 2 |" in (tmp_path / "speculative.md").read_text()


def test_flash_attention_bench(tmp_path, capsys):
    """bench/flash_attention.py on a tiny shape: both kernels' memory and time recorded, the
    blockwise kernel's step temporaries smaller, and fewer tiles visited for short documents."""
    from flaxlm.bench import flash_attention as fb

    out = tmp_path / "flash.json"
    fb.main(["--memory", "tiny:256", "--time", "tiny:128", "--docs", "0,16", "--block", "32",
             "--runs", "1", "--json", str(out)])  # fmt: skip
    recs = json.loads(out.read_text())
    mem = {r["impl"]: r["temp_gib"] for r in recs if r["kind"] == "memory"}
    assert mem["flash"] < mem["xla"]
    times = [r for r in recs if r["kind"] == "time"]
    assert len(times) == 4 and all(r["seconds"] > 0 for r in times)
    tiles = {r["doc"]: r["tiles"] for r in times if r["impl"] == "flash"}
    assert tiles[16] < tiles[0] < 1.0  # 4 × 4 blocks: 10 causal, 4 for 16-token documents
    assert "| tiny | 128 | 1 | 16 | flash |" in capsys.readouterr().out
