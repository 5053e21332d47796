"""Code execution rewards: run a response's program against a prompt's tests.

NOT A SECURITY SANDBOX. A program runs as the training job's own user, on its machine, with
its network and its files: the limits below stop runaway programs (infinite loops, memory and
output bombs, forks left behind), not a program written to do harm — a process that calls
setsid() leaves the killed process group, a program can read any file the user can. For
untrusted models or at scale, run the rewards inside a container or a dedicated sandbox
service (nsjail, gVisor, Firecracker), e.g. behind a "module:function" reward of your own.

Used by GRPO / online DPO / best-of-N as the `code_tests` and `code_tests_partial` rewards
(alignment/grpo_rewards.py). The prompt record's meta holds the tests:

    "tests"       Python code run after the program (MBPP / HumanEval-style asserts), a string
                  or a list of strings (MBPP's test_list); with "entry_point" (HumanEval),
                  `check(<entry_point>)` is appended
    "test_cases"  a list of {"input": stdin, "output": expected stdout} (APPS / CodeContests),
                  or APPS' {"inputs": [...], "outputs": [...]}: the program runs once per case
                  with that stdin; a case passes when it exits with status 0 and its stdout
                  equals the expected one up to trailing whitespace per line and blank lines
                  at the end
    "timeout"     seconds per run of the program, overriding the default (`Limits.timeout`)

Scores (`run_tests` returns the details, `RunResult`): `code_tests` is the fraction of test
cases passed, or 1/0 for an assert script (all its asserts pass, the benchmarks' pass@1);
`code_tests_partial` also gives an assert script the fraction of its top-level asserts that
pass (denser, but a policy can then be paid for special-casing the easy asserts). A timeout,
a crash, a syntax error or no program at all scores 0.

Which program (`extract_program`): the last fenced block tagged python (py, python3), else the
last untagged one, else — when the response has no fence at all — the whole response
(`whole_without_fence`). The last, because a model drafts and then corrects; a response whose
last python block is only an example call fails (NameError), which teaches the policy to end
on its solution.

How a program runs (`run_program`): in a fresh temporary directory (its cwd, HOME and TMPDIR,
deleted afterwards), as `sys.executable -I -S` — isolated mode (no PYTHON* variables, no user
site, no cwd on sys.path) and no site-packages: the standard library only, which is what
MBPP / HumanEval / APPS solutions use, it starts twice as fast (~40 ms), and a program cannot
import the training stack (jax, torch) and grab the accelerator (`Limits.site_packages=True`
allows them). The environment is scrubbed to PATH, HOME, TMPDIR and a UTF-8 locale (GPUs
hidden). A small harness sets `resource` limits on itself before it runs the program: CPU
seconds (the timeout + 1), address space (`memory_mb`), the size of any file written
(`output_bytes`, which caps the captured stdout and stderr: they go to files in the temporary
directory, so a print loop cannot fill the trainer's memory), no core files, and the number
of processes: `max_processes` more than the user ran when last counted (from /proc, at most a
second ago). That count is per user and Linux's covers every thread and zombie of the user,
so a program forking while many others run may be refused a process; `max_processes=None`
turns the limit off, and it never binds root. Stdin is /dev/null for assert tests. The
program is a new session: at the wall timeout, and after it exits, its whole process group
is killed with SIGKILL, so a forked child sleeping in the background does not outlive it (it
is reaped by PID 1: in a container, run under an init such as `docker --init`, or such
children stay zombies).

An assert script passes only if the harness reaches the end of the tests and says so with a
per-run random token: exit status 0 alone would pay a program that calls sys.exit(0) or
os._exit(0) before the tests run. The program is run with __name__ == "solution" under tests
(its `if __name__ == "__main__":` demo, often reading input(), does not run) and as
"__main__" for stdin/stdout cases (a script's main guard must run).

Batches: a rollout scores many samples; each run is a subprocess that waits (no GIL held), so
`code_tests.max_workers` (os.cpu_count()) tells the rollouts (rl_rollout.call_reward_fns) to
call it on that many samples at once from threads; `score_batch` does the same for any list.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-run limits of a program (the module docstring says what each one stops)."""

    timeout: float = 5.0  # wall seconds per run (meta["timeout"] overrides); CPU: this + 1
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    output_bytes: int = 1 << 20  # the largest file the program may write, stdout included
    max_processes: int | None = 32  # processes / threads beyond the user's own; None: no limit
    site_packages: bool = False  # True: run without -S (the interpreter's installed packages)


DEFAULT_LIMITS = Limits()


@dataclasses.dataclass
class RunResult:
    """What a run of the tests found: `passed` of `total` tests, and why not all passed."""

    passed: int
    total: int
    status: str  # passed | failed | timeout | error (crash, syntax error) | no_program
    detail: str = ""  # the end of stderr, or what went wrong
    seconds: float = 0.0

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


# --- extraction ------------------------------------------------------------------------------

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:^[ \t]*```[ \t]*$|\Z)",
                    re.MULTILINE | re.DOTALL)  # fmt: skip
_PYTHON_TAGS = ("python", "py", "python3", "py3")


def extract_program(response: str, *, whole_without_fence: bool = True) -> str | None:
    """The program in a response (the module docstring's rule), or None. A fence that never
    closes (a response cut at the token budget) runs to the end of the text."""
    if not isinstance(response, str):
        return None
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(response)]
    for wanted in (lambda t: t in _PYTHON_TAGS, lambda t: t == ""):
        chosen = [code for tag, code in blocks if wanted(tag)]
        if chosen:
            return chosen[-1] if chosen[-1].strip() else None
    if blocks or "```" in response or not whole_without_fence:
        return None  # fenced, but no python: a shell command, an output block
    return response if response.strip() else None


# --- the harness (runs in the child) -----------------------------------------------------------

# Sets the limits on its own process, then runs the program (and the tests) by exec, so the
# limits hold from the program's first line without a preexec_fn (unsafe in a threaded parent).
# Plain argv and the builtin _ast, not json / ast: their imports would double the start time.
# argv: mode (stdio | tests), partial (0 | 1), the tests' path, the result's path, NAME=limit...
_HARNESS = r"""
import _ast, os, resource, sys
mode, partial, tests_path, result_path, *limits = sys.argv[1:]
nonce = os.environ.pop("FLAXLM_RUN_TOKEN", "")
for item in limits:
    name, value = item.split("=")
    what, value = getattr(resource, name, None), int(value)
    if what is None:
        continue
    hard = resource.getrlimit(what)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    try:
        resource.setrlimit(what, (value, value))
    except (ValueError, OSError):
        pass
sys.argv = ["solution.py"]
with open("solution.py", encoding="utf-8") as f:
    code = compile(f.read(), "solution.py", "exec")
if mode == "stdio":
    exec(code, {"__name__": "__main__", "__file__": "solution.py", "__builtins__": __builtins__})
    sys.exit(0)
with open(tests_path, encoding="utf-8") as f:  # (read before the program could rewrite it)
    tests = compile(f.read(), "tests.py", "exec", _ast.PyCF_ONLY_AST)
ns = {"__name__": "solution", "__file__": "solution.py", "__builtins__": __builtins__}
exec(code, ns)
passed = asserts = 0
ok = True
for node in tests.body:
    try:
        exec(compile(_ast.Module([node], []), "tests.py", "exec"), ns)
        passed += isinstance(node, _ast.Assert)
    except Exception as e:
        ok = False
        print(f"tests.py:{node.lineno}: {type(e).__name__}: {e}", file=sys.stderr)
        if partial == "0":
            break
    asserts += isinstance(node, _ast.Assert)
with open(result_path, "w") as f:
    f.write(f"{nonce} {passed:x} {asserts:x} {int(ok):x}")
"""


# --- running ---------------------------------------------------------------------------------

_tasks_cache: tuple[float, int | None] = (0.0, None)
_tasks_lock = threading.Lock()


def _user_tasks() -> int | None:
    """How many processes / threads this user runs (what Linux's RLIMIT_NPROC counts), from
    /proc, cached for a second (a rollout starts many programs); None without /proc."""
    global _tasks_cache
    with _tasks_lock:
        at, n = _tasks_cache
        if time.monotonic() - at < 1.0:
            return n
        n, uid = None, os.getuid()
        if os.path.isdir("/proc/self/task"):
            n = 0
            for pid in os.listdir("/proc"):
                try:
                    if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                        n += len(os.listdir(f"/proc/{pid}/task"))
                except OSError:  # (gone meanwhile)
                    pass
        _tasks_cache = (time.monotonic(), n)
        return n


def _rlimits(limits: Limits, timeout: float) -> list[str]:
    """The harness's NAME=value limit arguments."""
    tasks = _user_tasks() if limits.max_processes is not None else None
    nproc = {} if tasks is None else {"RLIMIT_NPROC": tasks + limits.max_processes}
    values = {"RLIMIT_CPU": int(timeout) + 1, "RLIMIT_AS": limits.memory_mb << 20,
              "RLIMIT_FSIZE": limits.output_bytes, "RLIMIT_CORE": 0, **nproc}  # fmt: skip
    return [f"{k}={v}" for k, v in values.items()]


def _exited(proc: subprocess.Popen, timeout: float) -> bool:
    """Whether `proc` exits within `timeout` seconds. A pidfd (Linux) wakes at the exit itself
    and leaves the process unreaped, so its pid — the group's id — is not reused before the
    group is killed; Popen.wait(timeout), the fallback, polls with sleeps of up to 50 ms."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # every member already gone
        pass


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _run_once(tmp: str, args: list[str], token: str, limits: Limits, timeout: float,
              stdin: str | None):  # fmt: skip
    """One run of the harness in `tmp` with `args`: (exit status or None on timeout, stdout,
    stderr tail). The process group is killed after it, whatever happened."""
    flags = ["-I"] if limits.site_packages else ["-I", "-S"]
    argv = [sys.executable, *flags, "-c", _HARNESS, *args]
    env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
           "LC_ALL": "C.UTF-8", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "FLAXLM_RUN_TOKEN": token}  # fmt: skip
    out, err = os.path.join(tmp, ".stdout"), os.path.join(tmp, ".stderr")
    if stdin is not None:
        with open(os.path.join(tmp, ".stdin"), "w", encoding="utf-8") as f:
            f.write(stdin)
    stdin_path = os.devnull if stdin is None else os.path.join(tmp, ".stdin")
    with open(stdin_path, "rb") as fin, open(out, "wb") as fout, open(err, "wb") as ferr:
        proc = subprocess.Popen(argv, cwd=tmp, env=env, stdin=fin, stdout=fout, stderr=ferr,
                                start_new_session=True, close_fds=True)  # fmt: skip
        try:
            exited = _exited(proc, timeout)
        finally:
            _kill_group(proc.pid)  # (its children too, on a timeout or left behind)
            status = proc.wait()
        status = status if exited else None
    with open(out, "rb") as f:
        stdout = f.read(limits.output_bytes + 1).decode("utf-8", "replace")
    return status, stdout, _tail(err)


def _timeout(meta: dict, limits: Limits) -> float:
    t = meta.get("timeout", limits.timeout)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
        raise ValueError(f"meta.timeout={t!r} must be a number of seconds > 0")
    return float(t)


def _why(status: int | None, err: str) -> tuple[str, str]:
    if status is None:
        return "timeout", "wall-clock timeout"
    if status < 0:
        return "error", f"killed by signal {-status} ({err.strip()[-300:]})"
    return "error", err.strip()[-500:]


def _outputs_equal(got: str, want: str) -> bool:
    """Equal up to trailing whitespace per line and blank lines at the end (a judge's usual
    leniency: a missing final newline or trailing spaces are no wrong answer)."""
    norm = lambda s: [line.rstrip() for line in s.replace("\r\n", "\n").rstrip().split("\n")]
    return norm(got) == norm(want)


def _cases(meta: dict) -> list[tuple[str, str]]:
    """meta.test_cases as (stdin, expected stdout) pairs; a bad shape is a ValueError."""
    cases = meta["test_cases"]
    if isinstance(cases, dict) and {"inputs", "outputs"} <= cases.keys():
        cases = [{"input": i, "output": o} for i, o in zip(cases["inputs"], cases["outputs"])]
    if not isinstance(cases, list) or not cases:
        raise ValueError("meta.test_cases must be a non-empty list of {input, output} objects")
    out = []
    for c in cases:
        if not (isinstance(c, dict) and isinstance(c.get("input"), str)
                and isinstance(c.get("output"), str)):  # fmt: skip
            raise ValueError(f"meta.test_cases: each case needs input and output strings, "
                             f"got {str(c)[:200]}")  # fmt: skip
        out.append((c["input"], c["output"]))
    return out


def _test_script(meta: dict) -> str:
    tests = meta["tests"]
    if isinstance(tests, list) and all(isinstance(t, str) for t in tests):
        tests = "\n".join(tests)
    if not isinstance(tests, str) or not tests.strip():
        raise ValueError("meta.tests must be Python code (a string or a list of strings)")
    if entry := meta.get("entry_point"):  # HumanEval: the tests define check(candidate)
        tests += f"\n\ncheck({entry})\n"
    return tests


def _check_tests(meta: dict) -> None:
    if "tests" not in meta and "test_cases" not in meta:
        raise KeyError("code_tests needs the prompt record's meta.tests (Python asserts) or "
                       "meta.test_cases ([{input, output}])")  # fmt: skip


def run_program(program: str, meta: dict, *, limits: Limits = DEFAULT_LIMITS,
                partial: bool = False) -> RunResult:  # fmt: skip
    """Runs `program` against meta's "tests" (or else its "test_cases"); the module docstring
    says how. A missing or malformed test field is an error (KeyError / ValueError) naming it;
    anything the program does is a result."""
    _check_tests(meta)
    timeout = _timeout(meta, limits)
    script = _test_script(meta) if "tests" in meta else None
    cases = _cases(meta) if script is None else []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flaxlm-code-", ignore_cleanup_errors=True) as tmp:
        with open(os.path.join(tmp, "solution.py"), "w", encoding="utf-8") as f:
            f.write(program)
        rlimits = _rlimits(limits, timeout)
        if script is not None:
            result = _run_asserts(tmp, rlimits, script, limits, timeout, partial)
        else:
            result = _run_cases(tmp, rlimits, cases, limits, timeout)
    result.seconds = time.perf_counter() - t0
    return result


def _run_asserts(tmp: str, rlimits: list[str], script: str, limits: Limits, timeout: float,
                 partial: bool) -> RunResult:  # fmt: skip
    tests, result = os.path.join(tmp, ".tests.py"), os.path.join(tmp, ".result")
    with open(tests, "w", encoding="utf-8") as f:
        f.write(script)
    token = secrets.token_hex(16)
    args = ["tests", str(int(partial)), tests, result, *rlimits]
    status, _, err = _run_once(tmp, args, token, limits, timeout, None)
    try:
        with open(result, encoding="utf-8") as f:
            said, passed, asserts, ok = (int(x, 16) for x in f.read().split())
    except (OSError, ValueError):  # the tests never ended: a crash, a timeout, an early exit
        if status == 0:
            return RunResult(0, 1, "error", "the program exited before the tests ended")
        return RunResult(0, 1, *_why(status, err))
    if said != int(token, 16):
        return RunResult(0, 1, "error", "the result was not the harness's")
    if partial and asserts:  # each top-level assert a test
        total = asserts
    else:  # the script is one test
        total, passed = 1, ok
    return RunResult(passed, total, "passed" if passed == total else "failed", err.strip()[-500:])


def _run_cases(tmp: str, rlimits: list[str], cases, limits: Limits, timeout: float) -> RunResult:
    passed, status, detail = 0, "passed", ""
    for stdin, want in cases:
        args = ["stdio", "0", "", "", *rlimits]
        code, stdout, err = _run_once(tmp, args, "", limits, timeout, stdin)
        if code == 0 and _outputs_equal(stdout, want):
            passed += 1
            continue
        if status == "passed":  # the first failure says why
            status, detail = _why(code, err) if code != 0 else ("failed", "wrong output")
    return RunResult(passed, len(cases), status if passed < len(cases) else "passed", detail)


def run_tests(response: str, meta: dict, *, limits: Limits = DEFAULT_LIMITS,
              partial: bool = False) -> RunResult:  # fmt: skip
    """The program of `response` (`extract_program`) run against meta's tests."""
    program = extract_program(response)
    if program is None:
        _check_tests(meta)  # (missing tests are the data's error, whatever the response)
        return RunResult(0, 1, "no_program", "no python code block in the response")
    return run_program(program, meta, limits=limits, partial=partial)


def code_tests(meta: dict, response: str) -> float:
    """GRPO reward: the fraction of meta.test_cases the response's program passes, or 1/0 for
    meta.tests (all asserts pass); 0 on a timeout, crash or syntax error (module docstring)."""
    return run_tests(response, meta).fraction


def code_tests_partial(meta: dict, response: str) -> float:
    """`code_tests`, with an assert script's top-level asserts each a test (partial credit)."""
    return run_tests(response, meta, partial=True).fraction


for _fn in (code_tests, code_tests_partial):
    _fn.reference_keys = ("tests", "test_cases")  # (grpo_rewards.check_references)
    _fn.max_workers = os.cpu_count() or 1  # (rl_rollout.call_reward_fns: threads at once)


def score_batch(fn, metas: Sequence[dict], responses: Sequence[str],
                max_workers: int | None = None) -> list[float]:  # fmt: skip
    """fn(meta, response) for every pair, `max_workers` (default fn.max_workers, else the CPU
    count) at once from threads: the runs are subprocesses, so they overlap."""
    workers = max_workers or getattr(fn, "max_workers", None) or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, metas, responses))
