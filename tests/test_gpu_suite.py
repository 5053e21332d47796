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
