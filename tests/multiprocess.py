"""Running a script as several jax processes on this machine (jax.distributed over gloo, each
process with its own simulated CPU devices), for the tests of multi-process behaviour.

Loaded by path (`importlib`), as tests/hf_tokenizers.py is: tests are not a package.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def cpu_env(n_devices: int) -> dict:
    """The environment of a process with `n_devices` simulated CPU devices."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={n_devices}",
    }


def run_processes(argv_of, n: int = 2, devices: int = 4, timeout: float = 240,
                  during=None) -> list[str]:  # fmt: skip
    """Starts `n` processes, process i running `argv_of(i)` (a list; sys.executable is put
    first), each with `devices` CPU devices; calls `during()` here meanwhile (e.g. the
    one-process reference run); returns their outputs (stdout and stderr). A process that
    fails fails the test with every output's tail; one still running `timeout` seconds after
    `during` returned (left alone in a collective) is killed and fails it too.

    Outputs go to files, not pipes: read one process after another, a pipe the test is not
    reading fills up (64 KiB) and blocks its writer — inside a collective, the other process
    then waits for it, and the test "hangs" for `timeout` seconds."""
    logs = [tempfile.TemporaryFile("w+") for _ in range(n)]
    procs = [
        subprocess.Popen([sys.executable, *map(str, argv_of(i))], env=cpu_env(devices),
                         stdout=logs[i], stderr=subprocess.STDOUT, text=True)
        for i in range(n)
    ]  # fmt: skip

    def outputs() -> list[str]:
        for log in logs:
            log.seek(0)
        return [log.read() for log in logs]

    try:
        if during is not None:
            during()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except BaseException as e:
        for p in procs:
            p.kill()
            p.wait()
        outs = outputs()
        if not isinstance(e, subprocess.TimeoutExpired):
            raise
        pytest.fail("a process hung (left alone in a collective?):\n" +
                    "\n---\n".join(o[-3000:] for o in outs))  # fmt: skip
    outs = outputs()
    if any(p.returncode for p in procs):
        pytest.fail("a process failed:\n" + "\n---\n".join(o[-3000:] for o in outs))
    return outs
