"""The GPU suite's case runner: a case that runs past its time is killed with its children (a
bench driver's per-case child holds the GPU; an orphan would starve every later case)."""

import sys
import time

from flaxlm.bench.gpu_suite import run_case


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()  # a zombie is dead, merely not reaped yet
    except FileNotFoundError:
        return False


def test_timeout_kills_the_case_and_its_children(tmp_path):
    pid_file = tmp_path / "child_pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    driver = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    assert run_case([sys.executable, "-c", driver], timeout=5) == "timeout"
    pid = int(pid_file.read_text())
    # SIGKILL is delivered at once but a loaded machine may take a moment to tear the
    # grandchild down; without the group kill it would sleep on for 60 s.
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


def test_exit_status_is_reported():
    assert run_case([sys.executable, "-c", "pass"], timeout=30) == "ok"
    assert run_case([sys.executable, "-c", "raise SystemExit(3)"], timeout=30) == "exit 3"


def test_tuned_attention_runs_the_fastest_timed_tiling(tmp_path):
    """The case after "decode kernels" decodes with the fastest attention tiling that case
    timed at its batch (outputs near XLA's), skipping when there is nothing to gain or read."""
    import json

    from flaxlm.bench.decode import CASE_OPTIONS, option_settings
    from flaxlm.bench.gpu_suite import tuned_attention

    pick = tuned_attention("1b", 64)
    assert "no decode_kernels.jsonl" in pick(str(tmp_path))
    recs = [
        {"piece": "attention:pallas:64:4:2", "batch": 64, "us": 11.0, "max_abs_err_vs_xla": 0.01},
        {"piece": "attention:pallas:128:8:3", "batch": 64, "us": 6.0, "max_abs_err_vs_xla": 0.01},
        # faster, but wrong (not the step): never picked
        {"piece": "attention:pallas:256:4:1", "batch": 64, "us": 2.0, "max_abs_err_vs_xla": 3.0},
        {"piece": "attention:pallas:64:8:1", "batch": 2, "us": 1.0, "max_abs_err_vs_xla": 0.0},
        {"piece": "attention:xla", "batch": 64, "us": 0.5},
    ]
    (tmp_path / "decode_kernels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    args = pick(str(tmp_path))
    assert args == ["decode", "--cases", "1b:flax:b64:attn128-8-3"]
    option = args[-1].split(":")[-1]
    assert option in CASE_OPTIONS
    assert option_settings(option) == {"decode_attention": "pallas:128:8:3"}
    recs[1]["us"] = 12.0  # now the default tiling is the fastest correct one
    (tmp_path / "decode_kernels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert "default tiling" in pick(str(tmp_path))


def test_tuned_fold_mlp_runs_the_fastest_attention_and_gate_up_tilings(tmp_path):
    """The folded-norm decode with the fastest correct tilings of both kernels (each left at
    its default when that won), skipped when neither beat its default."""
    import json

    from flaxlm.bench.decode import CASE_OPTIONS, option_settings
    from flaxlm.bench.gpu_suite import tuned_fold_mlp

    pick = tuned_fold_mlp("1b", 64)
    assert "skipped" in pick(str(tmp_path))  # nothing timed yet
    recs = [
        {"piece": "attention:pallas:64:4:2", "batch": 64, "us": 11.0, "max_abs_err_vs_xla": 0.01},
        {"piece": "attention:pallas:128:8:3", "batch": 64, "us": 6.0, "max_abs_err_vs_xla": 0.01},
        {"piece": "gate_up:pallas:32:128:4:3", "batch": 64, "us": 20.0, "max_abs_err_vs_xla": 0.02},
        {"piece": "gate_up:pallas:16:64:4:4", "batch": 64, "us": 14.0, "max_abs_err_vs_xla": 0.02},
        # faster, but wrong, or at another batch: never picked
        {"piece": "gate_up:pallas:64:64:4:3", "batch": 64, "us": 1.0, "max_abs_err_vs_xla": 9.0},
        {"piece": "gate_up:pallas:64:128:4:4", "batch": 2, "us": 1.0, "max_abs_err_vs_xla": 0.0},
    ]
    path = tmp_path / "decode_kernels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    args = pick(str(tmp_path))
    assert args == ["decode", "--cases", "1b:flax:b64:fold:mlp16-64-4-4:attn128-8-3"]
    options = args[-1].split(":")[3:]
    assert all(o in CASE_OPTIONS for o in options)
    assert option_settings("mlp16-64-4-4") == {"decode_mlp": "pallas:16:64:4:4"}
    recs[1]["us"] = 12.0  # the attention default is now the fastest: only the MLP's tiling
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert pick(str(tmp_path))[-1] == "1b:flax:b64:fold:mlp16-64-4-4"
    recs[3]["us"] = 30.0  # and the MLP's default too
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert "skipped" in pick(str(tmp_path))
    # a tiling over the transposed weight, fastest: ":mlpt…", `decode_mlp="pallas_t:…"`
    recs.append({"piece": "gate_up:pallas_t:16:256:4:3", "batch": 64, "us": 10.0,
                 "max_abs_err_vs_xla": 0.02})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert pick(str(tmp_path))[-1] == "1b:flax:b64:fold:mlpt16-256-4-3"
    assert option_settings("mlpt16-256-4-3") == {"decode_mlp": "pallas_t:16:256:4:3"}
    assert "mlpt16-256-4-3" in CASE_OPTIONS
