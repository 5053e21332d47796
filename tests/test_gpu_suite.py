"""The GPU suite (bench/gpu_suite.py, bench/gpu_run.sh) and the drivers' side of it: a case that
runs past its time is killed with its children (a bench driver's per-case child holds the GPU;
an orphan would starve every later case); a case whose child crashed or recorded an error is
not "ok"; estimates cover the measured times; a later call of a lease resumes; --only; the 8
files that come back. No GPU and no jax: the case processes are stubbed or plain Python."""

import json
import os
import sys
import time

import pytest

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
        {"piece": "attention:pallas:128:4:2", "batch": 64, "us": 11.0, "max_abs_err_vs_xla": 0.01},
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


def test_a_split_k_tiling_is_picked_and_run_whole(tmp_path):
    """A split-K record (a fourth number, the parts) is a tiling like the others: the tuned
    case decodes with it, and the decode bench's option hands it to `generate`."""
    import json

    from flaxlm.bench.decode import CASE_OPTIONS, option_settings
    from flaxlm.bench.gpu_suite import tuned_attention

    recs = [
        {"piece": "attention:pallas:128:4:2", "batch": 64, "us": 11.0, "max_abs_err_vs_xla": 0.01},
        {"piece": "attention:pallas:32:4:2:8", "batch": 64, "us": 7.0, "max_abs_err_vs_xla": 0.01},
    ]
    (tmp_path / "decode_kernels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    args = tuned_attention("1b", 64)(str(tmp_path))
    assert args == ["decode", "--cases", "1b:flax:b64:attn32-4-2-8"]
    assert "attn32-4-2-8" in CASE_OPTIONS and "attn32-4-2-8-1-1" not in CASE_OPTIONS
    assert option_settings("attn32-4-2-8") == {"decode_attention": "pallas:32:4:2:8"}
    assert option_settings("attn128-8-3") == {"decode_attention": "pallas:128:8:3"}
    folded = tuned_attention("1b", 64, "fold")
    assert folded(str(tmp_path)) == ["decode", "--cases", "1b:flax:b64:fold:attn32-4-2-8"]
    recs[1]["us"] = 12.0  # the default tiling fastest: the folded case still runs, untuned
    (tmp_path / "decode_kernels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert folded(str(tmp_path)) == ["decode", "--cases", "1b:flax:b64:fold"]


def test_the_ppo_control_runs_only_after_a_failure(tmp_path):
    """`if_failed`: skipped before the case has a record and when its latest one succeeded;
    the control's args when it failed, in this call's OUT or an earlier call's state."""
    import json

    from flaxlm.bench.gpu_suite import if_failed

    control = if_failed("125m:ppo:c8", ["alignment_throughput", "--cases", "125m:ppo:c8:xla"])
    out, state = tmp_path / "out", tmp_path / "state"
    out.mkdir(), state.mkdir()
    assert "no record" in control([str(out), str(state)])
    ok = {"case": "125m:ppo:c8", "gen_share": 0.5}
    failed = {"case": "125m:ppo:c8", "error": "RuntimeError: step 8: 8 bad steps"}
    (state / "alignment_throughput.jsonl").write_text(json.dumps(failed) + "\n")
    assert control([str(out), str(state)]) == ["alignment_throughput", "--cases",
                                               "125m:ppo:c8:xla"]  # fmt: skip
    (out / "alignment_throughput.jsonl").write_text(json.dumps(ok) + "\n")
    assert "ran" in control([str(out), str(state)])  # (the state's first, then OUT's: latest)


def test_tuned_fold_mlp_runs_the_fastest_attention_and_gate_up_tilings(tmp_path):
    """The folded-norm decode with the fastest correct tilings of both kernels (each left at
    its default when that won), skipped when neither beat its default."""
    import json

    from flaxlm.bench.decode import CASE_OPTIONS, option_settings
    from flaxlm.bench.gpu_suite import tuned_fold_mlp

    pick = tuned_fold_mlp("1b", 64)
    assert "skipped" in pick(str(tmp_path))  # nothing timed yet
    recs = [
        {"piece": "attention:pallas:128:4:2", "batch": 64, "us": 11.0, "max_abs_err_vs_xla": 0.01},
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


# --- a case's status: a crashed child, an error record ------------------------------------------


def test_driver_records_a_child_that_died_without_its_record(tmp_path):
    """A case child killed by an abort (an XLA CHECK, a segfault, the OOM killer) writes no
    record: the driver appends one saying how it exited, so the table and the bench's exit
    status show the case; a child that wrote its own record keeps it, whatever its exit."""
    from flaxlm.bench import driver

    path = str(tmp_path / "x.jsonl")
    driver.run_case([sys.executable, "-c", "import os; os.abort()"], "a", path, 60)
    rec = json.dumps({"case": "b", "x": 1})
    wrote = f"open({path!r}, 'a').write({rec!r} + chr(10)); raise SystemExit(3)"
    driver.run_case([sys.executable, "-c", wrote], "b", path, 60)
    driver.run_case([sys.executable, "-c", "pass"], "c", path, 60)
    recs = driver.latest_records(path)
    assert recs == [{"case": "a", "error": "exit -6"}, {"case": "b", "x": 1}]
    assert [r["case"] for r in driver.failed_cases(path, ["a", "b", "c"])] == ["a", "c"]


def test_a_crashed_case_fails_the_suite_case(tmp_path, monkeypatch):
    """The reviewer's repro: the train bench's case child aborts at start-up (no jax is loaded,
    so this is cheap); the bench records it and exits 1, so the suite does not say "ok"."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\nif '--one' in sys.argv:\n    os.abort()\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ["PYTHONPATH"]]))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "flaxlm.bench.train_throughput", "--out", str(out),
           "--cases", "tiny:flax", "--steps", "1", "--warmup", "1"]  # fmt: skip
    assert run_case(cmd, 120) == "exit 1"
    rec = json.loads((out / "train_throughput.jsonl").read_text())
    assert rec == {"case": "tiny:flax", "error": "exit -6"}
    # as the suite runs it, reading the bench's records
    status = run_case(cmd, 120, str(out / "train_throughput.jsonl"))
    assert status == "failed (exit 1; 1 of 1 records errors, first tiny:flax: exit -6)"


def test_an_error_record_fails_the_suite_case(tmp_path):
    """A bench that exits 0 but recorded an error for a case (a raising case) is not "ok"."""
    path = tmp_path / "decode.jsonl"
    path.write_text(json.dumps({"case": "old", "error": "boom"}) + "\n")  # an earlier call's
    rec = json.dumps({"case": "new", "tokens_per_s": 1})
    ok = f"open({str(path)!r}, 'a').write({rec!r} + chr(10))"
    assert run_case([sys.executable, "-c", ok], 30, str(path)) == "ok"
    rec = '{"case": "x", "error": "ValueError: no"}'
    bad = f"open({str(path)!r}, 'a').write({rec!r} + chr(10))"
    status = run_case([sys.executable, "-c", bad], 30, str(path))
    assert status == "failed (1 of 1 records errors, first x: ValueError: no)"


@pytest.mark.parametrize("bench", ["train_throughput", "decode", "alignment_throughput"])
def test_bench_exits_nonzero_when_a_case_failed(tmp_path, monkeypatch, bench):
    """Each suite bench exits 1 when the latest record of a case it ran is an error, after
    writing its table; 0 when they all passed (the case processes are stubbed)."""
    import importlib

    from flaxlm.bench import driver

    mod = importlib.import_module(f"flaxlm.bench.{bench}")
    case = {"train_throughput": "tiny:flax", "decode": "tiny:flax:b4",
            "alignment_throughput": "tiny:ppo"}[bench]  # fmt: skip
    monkeypatch.setattr(driver, "run_case", lambda cmd, c, path, timeout, env=None:
                        driver.append_record(path, {"case": c, "error": "exit -11"}))  # fmt: skip
    with pytest.raises(SystemExit) as e:
        mod.main(["--out", str(tmp_path), "--cases", case])
    assert e.value.code == 1
    assert "exit -11" in (tmp_path / f"{bench}.md").read_text()
    # a later run of the case that passed: the latest record counts
    monkeypatch.setattr(driver, "run_case", lambda cmd, c, path, timeout, env=None:
                        driver.append_record(path, {"case": c, "fine": True}))  # fmt: skip
    monkeypatch.setattr(mod, "table", lambda records: "table")
    mod.main(["--out", str(tmp_path), "--cases", case])


# --- estimates and order --------------------------------------------------------------------------


def _effective_estimates(cases, first_decode_s):
    """Each case's estimate as the suite counts it in a call that starts with `cases`."""
    first, out = True, []
    for name, est, args in cases:
        flax_decode = not callable(args) and args[0] == "decode" and ":flax:" in " ".join(args)
        flax_decode = flax_decode or (callable(args) and "decode" in name)
        if flax_decode and first:
            est, first = max(est, first_decode_s), False
        out.append((name, est))
    return out


def test_estimates_cover_the_committed_measurements():
    """Every case the committed H200 logs timed has an estimate at least its measured time,
    the first flaxlm decode case of each call (119 s killed, 132, 180, 156) counting
    FIRST_DECODE_S: `gpu_run.sh 480` reached the cases it planned."""
    import glob
    import re

    from flaxlm.bench import gpu_suite

    GPU_CASES, FIRST_DECODE_S = gpu_suite.GPU_CASES, getattr(gpu_suite, "FIRST_DECODE_S", 0)
    by_name = {c[0]: c for c in GPU_CASES}
    checked = 0
    for log in sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "bench",
                                             "results", "gpu-*log.txt"))):  # fmt: skip
        ran = re.findall(r"^=== (.+?): (?:ok|timeout|exit -?\d+) in (\d+)s", open(log).read(),
                         re.M)  # fmt: skip
        first = True
        for name, seconds in ran:
            # (the "decode kernels" cases run bench/decode_kernels.py, not a flaxlm decode)
            flax_decode = (name.startswith("decode") and "hf" not in name.split()
                           and not name.startswith("decode kernels"))  # fmt: skip
            est = by_name[name][1] if name in by_name else None
            if flax_decode and first:
                first = False
                est = max(est or 0, FIRST_DECODE_S)
            if est is not None:
                assert int(seconds) <= est, (log, name, seconds, est)
                checked += 1
    assert checked >= 10


def test_first_call_reaches_the_ppo_case_and_the_default_decode():
    """The open goals' cases fit the first 480 s call by their estimates (start-up counted:
    the wheels and imports take ~15 s of the budget)."""
    from flaxlm.bench import gpu_suite

    GPU_CASES, FIRST_DECODE_S = gpu_suite.GPU_CASES, getattr(gpu_suite, "FIRST_DECODE_S", 0)
    left, ran = 480 - 15, []
    for name, est in _effective_estimates(GPU_CASES, FIRST_DECODE_S):
        if est <= left:
            left -= est
            ran.append(name)
    assert "alignment ppo c8" in ran and "decode 1b flaxlm b64" in ran
    assert "alignment ppo c8 xla (if ppo failed)" in ran  # (planned for: PPO failing again)
    assert len({c[0] for c in GPU_CASES}) == len(GPU_CASES)  # --resume keys on the names


def _fake_suite(monkeypatch, cases, kernels=None):
    """gpu_suite with `cases` as its tiny list and each case's process replaced by a record in
    the bench's JSONL (decode_kernels: `kernels`); returns the commands it was given."""
    from flaxlm.bench import gpu_suite

    ran = []

    def fake(cmd, timeout, jsonl=None, env=None):
        module = cmd[2].split(".")[-1]
        ran.append((" ".join(cmd[5 : len(cmd) - len(gpu_suite.FLAGS[module])]), timeout, env))
        out = cmd[cmd.index("--out") + 1]
        recs = kernels if cmd[2].endswith("decode_kernels") else [{"case": cmd[-1]}]
        with open(os.path.join(out, os.path.basename(jsonl)), "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
        return "timeout" if "slow" in cmd else "ok"

    monkeypatch.setattr(gpu_suite, "run_case", fake)
    monkeypatch.setattr(gpu_suite, "TINY_CASES", cases)
    return ran


def test_resume_skips_finished_cases_and_reads_the_kernel_records(tmp_path, monkeypatch):
    """A second call (empty OUT, --resume) skips what the first finished, reruns a case the
    first call's budget cut, and decodes with the tiling the first call's decode kernels
    timed; the first call's own state is forgotten by a call without --resume."""
    from flaxlm.bench import gpu_suite

    kernels = [{"case": "k", "piece": "attention:pallas:128:8:3", "batch": 4, "us": 1.0,
                "max_abs_err_vs_xla": 0.0},
               {"case": "d", "piece": "attention:pallas:128:4:2", "batch": 4, "us": 9.0,
                "max_abs_err_vs_xla": 0.0}]  # fmt: skip
    cases = [
        ("kernels", 1, ["decode_kernels", "--tiny"]),
        ("tuned", 1, gpu_suite.tuned_attention("tiny", 4)),
        ("cut", 300, ["train_throughput", "slow"]),
        ("never", 10_000, ["train_throughput", "never"]),
    ]
    ran = _fake_suite(monkeypatch, cases, kernels)
    state, out1, out2 = tmp_path / "state", tmp_path / "out1", tmp_path / "out2"
    base = ["--tiny", "--budget", "310", "--state", str(state)]
    gpu_suite.main([*base, "--out", str(out1)])
    # the tuned case ran in the first call already, from this OUT's records
    assert [c for c, _, _ in ran] == ["--tiny", "--cases tiny:flax:b4:attn128-8-3", "slow"]
    assert all(env["FLAXLM_BENCH_MD"] == "0" for _, _, env in ran)
    finished = [json.loads(x)["name"] for x in (state / "finished.jsonl").open()]
    assert finished == ["kernels", "tuned"]  # "cut": killed by the budget, not at 3x
    assert (state / "decode_kernels.jsonl").read_text().count("\n") == 2
    ran.clear()
    gpu_suite.main([*base, "--out", str(out2), "--resume"])
    assert [c for c, _, _ in ran] == ["slow"]
    md = (out2 / "suite.md").read_text()
    assert "| kernels | done in an earlier call (ok) |" in md and "| never | skipped" in md
    # the tuned case reads the state when OUT has no kernel records
    args = gpu_suite.tuned_attention("tiny", 4)([str(out2), str(state)])
    assert args == ["decode", "--cases", "tiny:flax:b4:attn128-8-3"]
    gpu_suite.main([*base, "--out", str(tmp_path / "out3")])  # no --resume: a new series
    assert [json.loads(x)["name"] for x in (state / "finished.jsonl").open()] == finished


def test_first_flaxlm_decode_of_a_call_counts_its_measured_time(tmp_path, monkeypatch):
    """The first flaxlm decode case of a call is estimated at FIRST_DECODE_S (measured), not
    at its own estimate; the next ones at theirs."""
    from flaxlm.bench import gpu_suite

    cases = [("hf", 40, ["decode", "--cases", "1b:hf:b64"]),
             ("a", 40, ["decode", "--cases", "1b:flax:b64"]),
             ("b", 40, ["decode", "--cases", "1b:flax:b64:xla"])]  # fmt: skip
    monkeypatch.setattr(gpu_suite, "GPU_CASES", cases)
    ran = _fake_suite(monkeypatch, [])
    gpu_suite.main(["--out", str(tmp_path / "o1"), "--budget", "150"])
    md = (tmp_path / "o1" / "suite.md").read_text()
    assert [c for c, _, _ in ran] == ["--cases 1b:hf:b64"]
    assert "| a | skipped (" in md and f"< {gpu_suite.FIRST_DECODE_S}s)" in md
    assert "| b | skipped (" in md  # still the first to run
    ran.clear()
    gpu_suite.main(["--out", str(tmp_path / "o2"), "--budget", "400"])
    assert [c.split()[1] for c, _, _ in ran] == ["1b:hf:b64", "1b:flax:b64", "1b:flax:b64:xla"]
    assert ran[1][1] > 3 * 40 and ran[2][1] == 3 * 40  # capped at 3x the estimate counted


# --- --only -----------------------------------------------------------------------------------


def test_only_takes_names_with_commas_and_indices_and_refuses_unknown_names(
    tmp_path, monkeypatch, capsys
):
    from flaxlm.bench import gpu_suite

    ran = _fake_suite(monkeypatch, [])
    names = [c[0] for c in gpu_suite.GPU_CASES]
    assert any("," in n for n in names)
    pick = "decode 1b flaxlm b64 mlp, fold"
    gpu_suite.main(["--out", str(tmp_path), "--budget", "0", "--only", pick, "--only", "1"])
    rows = [ln for ln in (tmp_path / "suite.md").read_text().splitlines() if "| skipped" in ln]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == [names[1], pick] and not ran
    with pytest.raises(SystemExit) as e:
        gpu_suite.main(["--out", str(tmp_path), "--only", "decode 1b flaxlm b64 mlp"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no such case" in err and f"{names.index(pick)}: {pick}" in err


# --- what comes back: 8 files at most, every table in suite.md ----------------------------------


def test_summary_tables_come_from_the_records_and_out_stays_within_8_files(tmp_path, monkeypatch):
    """suite.md's tables are built from the benches' .jsonl (a bench cut off mid-call wrote
    no .md), the benches write no .md under the suite, and the files a suite call can leave in
    OUT, killed or not, are at most the 8 that come back."""
    from flaxlm.bench import driver, gpu_suite

    results = os.path.join(os.path.dirname(__file__), "..", "bench", "results")
    rec = open(os.path.join(results, "gpu-2026-11-30b-call2-decode.jsonl")).readline()
    timeout = {"case": "1b:flax:b1", "error": "timeout 45s"}
    (tmp_path / "decode.jsonl").write_text(rec + json.dumps(timeout) + "\n")
    crash = {"case": "1b:hf-eager", "error": "exit -6"}
    (tmp_path / "train_throughput.jsonl").write_text(json.dumps(crash) + "\n")
    gpu_suite.write_summary(str(tmp_path), {}, [{"name": "x", "status": "timeout", "seconds": 1}])
    md = (tmp_path / "suite.md").read_text()
    assert "| 1b:flax:b64:pallas:fused:no_triton_gemm | 43,584 | 48,374 | 1.32 |" in md
    assert "| 1b:flax:b1 | timeout 45s |" in md and "| 1b:hf-eager | failed: exit -6 |" in md
    monkeypatch.setenv("FLAXLM_BENCH_MD", "0")
    driver.write_table(str(tmp_path), "decode.md", "table")
    assert sorted(os.listdir(tmp_path)) == ["decode.jsonl", "suite.md", "train_throughput.jsonl"]
    modules = {args[0] for _, _, args in gpu_suite.GPU_CASES if not callable(args)}
    files = {"log.txt", "suite.md"} | {gpu_suite.JSONL[m] for m in modules}
    assert len(files) <= 8, files
