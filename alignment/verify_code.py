"""Code execution rewards: run a response's program against a prompt's tests.

NOT A SECURITY SANDBOX. A program runs as the training job's own user, on its machine, with
its network and its files: the limits below stop runaway programs (infinite loops, memory and
output bombs, forks left behind) and the guard refuses the usual accidents (writing or
deleting files outside its directory, the network, shelling out), not a program written to do
harm — a process that calls setsid() leaves the killed process group, the guard is a Python
audit hook that native code never meets, a program can read any file the user can. For
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
of processes, twice: the harness counts the forks of the run's whole process tree (an audit
hook on os.fork / os.forkpty, and on subprocess / spawn / os.system where `shell` allows them,
appending to one shared file) and fails the fork past `max_processes` of them with
BlockingIOError (EAGAIN), as the kernel would — a budget per run, so it binds root too and
counts forks that already exited; and RLIMIT_NPROC, `max_processes` more than the user ran when
last counted (from /proc, at most a second ago), stops forks the hook cannot see (native code).
That count is per user and Linux's covers every thread and zombie of the user, so a program
forking while many others run may be refused a process, and it never binds root.
`max_processes=None` turns both off. Stdin is /dev/null for assert tests. The program is a new
session: at the wall timeout, and after it exits, its whole process group
is killed with SIGKILL, so a forked child sleeping in the background does not outlive it (it
is reaped by PID 1: in a container, run under an init such as `docker --init`, or such
children stay zombies).

The guard (against accidents, not adversaries: PEP 578 audit hooks, which only see what goes
through the interpreter — a C extension, a ctypes call once allowed, an os.open with dir_fd
relative to that descriptor, or a program that finds the hook's state with gc gets past it).
Before the program's first line the harness installs a hook (sys.addaudithook: it cannot be
removed, and forked children keep it) that raises PermissionError, naming the action, the
reason and the Limits flag that allows it, e.g. `PermissionError: os.system(b'rm -rf ~') runs
another program: refused by verify_code's guard (Limits.shell=True allows it)`. The program
fails like any crash (0 for an assert script), unless it catches the error — then nothing
happened either. Refused unless the flag allows it:
  `writes_outside`  changing a file outside the run's directory: opening it to write, append,
                    create or truncate (open / os.open flags), os.remove / unlink, rename /
                    replace, mkdir, rmdir, shutil.rmtree, symlink / link (the new name; a hard
                    link's target too), chmod, chown, utime, truncate, setxattr / removexattr,
                    and sqlite3.connect (sqlite opens its files itself). A path is resolved with
                    os.path.realpath against the cwd at the time (a dir_fd's directory via
                    /proc), so `..`, a chdir and symlinks out of the directory do not escape;
                    remove / rename act on a link itself, so removing a link that points out is
                    fine. Reads stay allowed anywhere (imports need them), as do /dev/null and
                    a new file (O_CREAT|O_EXCL) under /dev/shm, which this process may then
                    remove again: multiprocessing's Value / Array keep their memory there. A
                    descriptor already open is not checked again (os.ftruncate, fchmod), and
                    bytecode caches outside go unwritten (importlib ignores the error).
  `network`         socket connect, bind, sendto / sendmsg, and name lookups (getaddrinfo,
                    gethostbyname*, gethostbyaddr, getnameinfo): no connection anywhere, not
                    even DNS; creating a socket is fine (socketpair, asyncio's event loop).
  `shell`           running another program: os.system, subprocess (os.popen), the exec*
                    family, posix_spawn, spawn* (the exec in its forked child: status 127),
                    pty.spawn; and os.kill / killpg of a process outside the run's own process
                    group (kill(-1) would signal every process of the user, the trainer
                    included). os.fork is allowed: multiprocessing (its default fork start
                    method; spawn and forkserver exec, refused) is legitimate, RLIMIT_NPROC
                    above stops fork bombs, and a child keeps the hook.
  `ctypes`          loading a library (ctypes.CDLL(name)) or looking a function up in one
                    (dlsym: CDLL(None).system, pythonapi), the usual way around the hook;
                    `import ctypes` itself and its data types still work. `site_packages=True`
                    allows it too (packages load their libraries through ctypes).
All four default to refused. The fork count above goes through the same hook, as does one more
check that no flag turns off: the program may lower the resource limits the harness set but not
raise them (resource.setrlimit / prlimit: root could, undoing the timeout, memory, output and
process limits; `RLIMIT_STACK`, which the harness leaves alone, stays free). The harness reads
the program and the tests before it installs the hook, and writes its result inside the run's
directory, so its own work is never refused. Cost: the hook is a Python call on every
audited event (each file opened, import, exec / compile, builtins.id call...), ~0.3 us each,
and a realpath per write-like call, ~60 us. For ordinary MBPP-style programs it is within the
noise: ten of them, run one at a time 60 times each, took a median 27.5 ms before the guard,
27.6 ms with every flag allowed and 27.7 ms guarded; a first pass of 30 each, 21.2 / 22.9 /
23.7 ms (a busy 2-CPU machine; the message of the commit adding the guard says how). The
harness reaches the child precompiled: its longer source would cost each run ~1.5 ms more to
compile. Worst cases: 10**6 id() calls 61 -> 352 ms, 2000 file writes in the cwd 456 -> 572
ms, 10**5 exec() calls 960 -> 1099 ms.

An assert script passes only if the harness reaches the end of the tests and says so with a
per-run random token: exit status 0 alone would pay a program that calls sys.exit(0) or
os._exit(0) before the tests run. The program is run with __name__ == "solution" under tests
(its `if __name__ == "__main__":` demo, often reading input(), does not run) and as
"__main__" for stdin/stdout cases (a script's main guard must run).

Settings: a run's `Limits` come from the RL stage's `code_limits` section (`grpo.code_limits`,
`online.code_limits`: every field above, e.g. `--config.grpo.code_limits.memory_mb=4096
--config.grpo.code_limits.site_packages=True`); `limits_from_config` checks it, naming the key,
and `with_limits` binds it to code_tests / code_tests_partial. Evaluation's `"scoring": "code"`
tasks take them from the spec's `code_limits` object and the command line's `--code_limits
timeout=20,memory_mb=4096` (over the spec's), best-of-N from its `--code_limits`
(`parse_limits` reads that flag). A prompt's meta.timeout still wins over `timeout`.

Batches: a rollout scores many samples; each run is a subprocess that waits (no GIL held), so
`code_tests.max_workers` (os.cpu_count()) tells the rollouts (rl_rollout.call_reward_fns) to
call it on that many samples at once from threads; `score_batch` does the same for any list.
"""

from __future__ import annotations

import dataclasses
import functools
import marshal
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

import ml_collections


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-run limits of a program (the module docstring says what each one stops)."""

    timeout: float = 5.0  # wall seconds per run (meta["timeout"] overrides); CPU: this + 1
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    output_bytes: int = 1 << 20  # the largest file the program may write, stdout included
    max_processes: int | None = 32  # forks per run (and processes beyond the user's); None: off
    site_packages: bool = False  # True: run without -S (the interpreter's installed packages)
    # the guard (module docstring): what a program may do beyond its own directory
    network: bool = False  # True: sockets may connect, bind, send to and look up addresses
    writes_outside: bool = False  # True: files outside the run's directory may be changed
    shell: bool = False  # True: other programs may run and processes outside the run be signalled
    ctypes: bool = False  # True (or site_packages): ctypes may load libraries and functions


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
# argv: mode (stdio | tests), partial (0 | 1), the tests' path, the result's path, the guard
# (the Limits flags it refuses, comma-separated; "" installs no hook), NAME=limit...
# The guard's hook is installed after the harness has read the program and the tests and just
# before the program runs; the result it writes at the end lies in the run's directory.
_HARNESS = r"""
import _ast, os, resource, sys
mode, partial, tests_path, result_path, guard, *limits = sys.argv[1:]
nonce = os.environ.pop("FLAXLM_RUN_TOKEN", "")
forks = None
fixed = {}  # resource -> the limit set here, which the program may lower but not raise
for item in limits:
    name, value = item.split("=")
    if name == "FORKS":
        forks = int(value)
        continue
    what, value = getattr(resource, name, None), int(value)
    if what is None:
        continue
    hard = resource.getrlimit(what)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    try:
        resource.setrlimit(what, (value, value))
        fixed[what] = value
    except (ValueError, OSError):
        pass


checks = {}  # audit event -> check(args): the guard's and the fork count's, one hook for all


def install_guard(deny):
    P = os.path
    root = P.realpath(os.getcwd())
    prefix = root + "/"
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    NEW = os.O_CREAT | os.O_EXCL
    made = set()  # files this process created under /dev/shm (multiprocessing's shared memory)

    whys = {"writes_outside": "writes outside the run's directory", "network": "uses the network",
            "shell": "runs another program",
            "ctypes": "loads a C library or function through ctypes"}  # fmt: skip

    def refuse(event, args, flag, why=None, shown=None):
        why = why or whys[flag]
        if shown is None:
            shown = ", ".join(repr(a) for a in args if type(a).__name__ != "socket")
        raise PermissionError(f"{event}({shown[:300]}) {why}: refused by verify_code's guard "
                              f"(Limits.{flag}=True allows it)")

    def outside(path, dir_fd=None, follow=True):
        # None when `path` lies in the run's directory (or is /dev/null or a descriptor), else
        # where it resolves to; `follow`: the last component too (open, chmod), not for what
        # acts on a link itself (remove, rename).
        if isinstance(path, int):  # an open descriptor: checked when it was opened
            return None
        try:
            path = os.fsdecode(os.fspath(path))
            if not P.isabs(path) and isinstance(dir_fd, int) and dir_fd >= 0:
                path = P.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
            head, tail = P.split(path.rstrip("/") or "/")
            if follow or tail in ("", ".", ".."):
                path = P.realpath(path)
            else:
                path = P.join(P.realpath(head or "."), tail)
        except (OSError, TypeError, ValueError):
            return "?"
        return None if path == root or path.startswith(prefix) or path == "/dev/null" else path

    if "writes_outside" in deny:

        def check_open(args):
            path, m, flags = args
            if not ((isinstance(flags, int) and flags & WRITE)
                    or (isinstance(m, str) and any(c in m for c in "wax+"))):
                return  # a read: anywhere
            where = outside(path)
            if where is None:
                return
            if where.startswith("/dev/shm/") and isinstance(flags, int) and flags & NEW == NEW:
                made.add(where)  # a new file, never someone's
                return
            shown = f"{path!r}, {m!r}" if m is not None else f"{path!r}, flags={flags:#o}"
            refuse("open", args, "writes_outside", shown=shown)

        def check_remove(args):
            where = outside(args[0], args[1], False)
            if where is not None and where not in made:
                refuse("os.remove", args, "writes_outside")
            made.discard(where)

        def paths(event, *spec):  # spec: (the path's index, its dir_fd's index or None, follow)
            def check(args):
                for i, d, follow in spec:
                    if outside(args[i], None if d is None else args[d], follow) is not None:
                        refuse(event, args, "writes_outside")
            checks[event] = check

        checks["open"], checks["os.remove"] = check_open, check_remove
        paths("os.rename", (0, 2, False), (1, 3, False))
        paths("os.rmdir", (0, 1, False))
        paths("os.mkdir", (0, 2, False))
        paths("shutil.rmtree", (0, 1, False))
        paths("os.symlink", (1, 2, False))
        paths("os.link", (0, 2, True), (1, 3, False))
        paths("os.chmod", (0, 2, True))
        paths("os.chown", (0, 3, True))
        paths("os.utime", (0, 3, True))
        paths("os.truncate", (0, None, True))
        paths("os.setxattr", (0, None, True))
        paths("os.removexattr", (0, None, True))

        def check_sqlite(args):  # (sqlite opens its files itself: no "open" event)
            db = args[0]
            if isinstance(db, (str, bytes)):
                db = os.fsdecode(db)
                db = db[5:].split("?")[0] if db.startswith("file:") else db
                if db in ("", ":memory:"):
                    return
            if outside(db) is not None:
                refuse("sqlite3.connect", args, "writes_outside")

        checks["sqlite3.connect"] = check_sqlite

    def always(events, flag):
        for event in events:
            checks[event] = lambda args, e=event: refuse(e, args, flag)

    if "network" in deny:
        always(("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
                "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
                "socket.gethostbyaddr", "socket.getnameinfo", "socket.sethostname"),
               "network")
    if "shell" in deny:
        always(("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn",
                "pty.spawn", "os.startfile"), "shell")

        def own(pid):  # in the run's process group (itself, its forks)
            try:
                return os.getpgid(pid) == os.getpgrp()
            except ProcessLookupError:
                return True  # (no such process: the kill fails by itself)
            except OSError:
                return False

        def check_kill(args):
            pid, sig = args
            if not (sig == 0 or pid == 0 or (pid > 0 and own(pid)) or -pid == os.getpgrp()):
                refuse("os.kill", args, "shell", "signals a process outside the run")

        def check_killpg(args):
            if not (args[1] == 0 or args[0] in (0, os.getpgrp())):
                refuse("os.killpg", args, "shell", "signals a process outside the run")

        checks["os.kill"], checks["os.killpg"] = check_kill, check_killpg
    if "ctypes" in deny:
        always(("ctypes.dlsym", "ctypes.dlsym/handle"), "ctypes")
        checks["ctypes.dlopen"] = lambda args: (  # (None, the process itself: import ctypes)
            None if args[0] is None else refuse("ctypes.dlopen", args, "ctypes"))


def count_forks(budget):
    # Every fork of the run's process tree appends a byte to one file (O_APPEND: atomic, and
    # the descriptor is inherited), so its size counts them all; past the budget a fork fails
    # as the kernel's process limit makes it fail. For root too, whom RLIMIT_NPROC never binds.
    fd = os.open(".forks", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def check(args, event):
        try:
            os.write(fd, b"x")
            n = os.fstat(fd).st_size
        except OSError:
            n = budget + 1
        if n > budget:
            raise BlockingIOError(11, f"{event}: the run has made its {budget} processes "
                                      "(Limits.max_processes)")

    # (with Limits.shell the programs it starts count too; without it the guard refuses them:
    # install_guard's checks replace these)
    for event in ("os.fork", "os.forkpty", "subprocess.Popen", "os.posix_spawn", "os.spawn",
                  "os.system"):
        checks[event] = lambda args, e=event: check(args, e)


def keep_limits():
    # Root may raise its own hard limits (CAP_SYS_RESOURCE): a program that does would undo
    # the timeout, memory, output and process limits, so raising one of them is refused (for
    # everyone: the kernel already refuses others a hard limit above its own).
    def check(event, what, new):
        cap = fixed.get(what)
        if cap is not None and new is not None and any(
                v == resource.RLIM_INFINITY or v > cap for v in new):
            raise PermissionError(f"{event}({what}, {new}) raises a limit of the run "
                                  f"(Limits: its maximum is {cap}); lowering it is allowed")

    checks["resource.setrlimit"] = lambda args: check("resource.setrlimit", *args)
    checks["resource.prlimit"] = lambda args: check("resource.prlimit", *args[1:])


def install_hook():
    # (installed last, just before the program runs: the harness's own work is never checked)
    keep_limits()
    if forks is not None:
        count_forks(forks)
    if guard:
        install_guard(guard.split(","))

    def hook(event, args, get=checks.get):
        check = get(event)
        if check is not None:
            check(args)

    if checks:
        sys.addaudithook(hook)


sys.argv = ["solution.py"]
with open("solution.py", encoding="utf-8") as f:
    code = compile(f.read(), "solution.py", "exec")
if mode == "stdio":
    install_hook()
    exec(code, {"__name__": "__main__", "__file__": "solution.py", "__builtins__": __builtins__})
    sys.exit(0)
with open(tests_path, encoding="utf-8") as f:  # (read before the program could rewrite it)
    tests = compile(f.read(), "tests.py", "exec", _ast.PyCF_ONLY_AST)
ns = {"__name__": "solution", "__file__": "solution.py", "__builtins__": __builtins__}
install_hook()
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

# The harness compiled once, in this process: each run then skips compiling its source (~2 ms
# of a ~25 ms run). Marshal, which the same interpreter loads; as hex, since argv holds no NUL.
_HARNESS_HEX = marshal.dumps(compile(_HARNESS, "<verify_code harness>", "exec")).hex()
_BOOT = "import marshal, sys; exec(marshal.loads(bytes.fromhex(sys.argv.pop(1))))"


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


def _guard(limits: Limits) -> str:
    """The harness's guard argument: the Limits flags whose actions the hook refuses."""
    allowed = {"network": limits.network, "writes_outside": limits.writes_outside,
               "shell": limits.shell, "ctypes": limits.ctypes or limits.site_packages}  # fmt: skip
    return ",".join(name for name, ok in allowed.items() if not ok)


def _rlimits(limits: Limits, timeout: float) -> list[str]:
    """The harness's NAME=value limit arguments (FORKS: its own fork count, not a resource)."""
    tasks = _user_tasks() if limits.max_processes is not None else None
    nproc = {} if tasks is None else {"RLIMIT_NPROC": tasks + limits.max_processes}
    forks = {} if limits.max_processes is None else {"FORKS": limits.max_processes}
    values = {"RLIMIT_CPU": int(timeout) + 1, "RLIMIT_AS": limits.memory_mb << 20,
              "RLIMIT_FSIZE": limits.output_bytes, "RLIMIT_CORE": 0, **nproc, **forks}  # fmt: skip
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
    argv = [sys.executable, *flags, "-c", _BOOT, _HARNESS_HEX, *args]
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
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
        raise ValueError(f"meta.timeout={t!r} must be a finite number of seconds > 0")
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
        settings = [_guard(limits), *_rlimits(limits, timeout)]  # the guard, NAME=limit...
        if script is not None:
            result = _run_asserts(tmp, settings, script, limits, timeout, partial)
        else:
            result = _run_cases(tmp, settings, cases, limits, timeout)
    result.seconds = time.perf_counter() - t0
    return result


def _run_asserts(tmp: str, settings: list[str], script: str, limits: Limits, timeout: float,
                 partial: bool) -> RunResult:  # fmt: skip
    tests, result = os.path.join(tmp, ".tests.py"), os.path.join(tmp, ".result")
    with open(tests, "w", encoding="utf-8") as f:
        f.write(script)
    token = secrets.token_hex(16)
    args = ["tests", str(int(partial)), tests, result, *settings]
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


def _run_cases(tmp: str, settings: list[str], cases, limits: Limits, timeout: float) -> RunResult:
    passed, status, detail = 0, "passed", ""
    for stdin, want in cases:
        args = ["stdio", "0", "", "", *settings]
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


# --- limits from a config ----------------------------------------------------------------------


def code_limits_config() -> ml_collections.ConfigDict:
    """The `code_limits` section of the RL stages (grpo / online): `Limits`' fields at their
    defaults, for `--config.grpo.code_limits.memory_mb=4096`, `...network=True` and the like."""
    return ml_collections.ConfigDict(dataclasses.asdict(DEFAULT_LIMITS))


def limits_from_config(settings, key: str) -> Limits:
    """The `Limits` a config's `code_limits` section (ConfigDict or dict; None: the defaults)
    sets. A field Limits lacks, or a value of the wrong kind (flags are booleans; timeout a
    positive number; the sizes positive integers, max_processes also None), is a ValueError
    naming `key`.field."""
    if settings is None:
        return DEFAULT_LIMITS
    if not hasattr(settings, "items"):
        raise ValueError(f"{key} must be a dict of Limits fields, got {settings!r}")
    fields = {f.name for f in dataclasses.fields(Limits)}
    values = {}
    for name, value in settings.items():
        if name not in fields:
            raise ValueError(f"{key}.{name}: no such limit; known: {sorted(fields)}")
        default = getattr(DEFAULT_LIMITS, name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "True or False"
        elif name == "timeout":
            ok, want = number and 0 < value < float("inf"), "a positive number of seconds"
        else:
            ok = (number and value == int(value) and value > 0) or (
                name == "max_processes" and value is None
            )
            want = "a positive integer" + (" or None" if name == "max_processes" else "")
        if not ok:
            raise ValueError(f"{key}.{name}={value!r}: expected {want}")
        # (an integer field given 2048.0 by a plain dict keeps its int type)
        values[name] = int(value) if type(default) is int and value is not None else value
    return dataclasses.replace(DEFAULT_LIMITS, **values)


def parse_limits(text: str, flag: str = "--code_limits") -> dict:
    """The `Limits` fields a command-line flag sets, "timeout=20,memory_mb=4096,network=true"
    (true / false, none, numbers; blanks around the commas and the = are fine), as a dict to
    lay over other settings. Each is checked as `limits_from_config` checks a config's: a
    malformed item, an unknown field or a bad value is a ValueError naming `flag` (and the
    field)."""
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, eq, raw = (x.strip() for x in item.partition("="))
        if not eq or not name or not raw:
            raise ValueError(f"{flag}: {item!r} is not FIELD=VALUE (e.g. timeout=20)")
        if name in values:
            raise ValueError(f"{flag}: {name} is given twice")
        word = raw.lower()
        if word in ("true", "false", "none"):
            values[name] = {"true": True, "false": False, "none": None}[word]
            continue
        try:
            values[name] = int(raw)
        except ValueError:
            try:
                values[name] = float(raw)
            except ValueError:
                raise ValueError(f"{flag}: {name}={raw!r} is not a number, true, false or "
                                 "none") from None  # fmt: skip
    if not values:
        raise ValueError(f"{flag}: no limits given (e.g. timeout=20,memory_mb=4096)")
    limits_from_config(values, flag)  # (the fields and their values, named as flag.field)
    return values


def with_limits(fn, limits: Limits):
    """`code_tests` / `code_tests_partial` running their programs under `limits` (same name,
    reference keys and workers); any other reward, or the default limits, `fn` itself."""
    if limits == DEFAULT_LIMITS or fn not in (code_tests, code_tests_partial):
        return fn
    partial = fn is code_tests_partial

    def reward(meta: dict, response: str) -> float:
        return run_tests(response, meta, limits=limits, partial=partial).fraction

    return functools.update_wrapper(reward, fn)


def score_batch(fn, metas: Sequence[dict], responses: Sequence[str],
                max_workers: int | None = None) -> list[float]:  # fmt: skip
    """fn(meta, response) for every pair, `max_workers` (default fn.max_workers, else the CPU
    count) at once from threads: the runs are subprocesses, so they overlap."""
    workers = max_workers or getattr(fn, "max_workers", None) or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, metas, responses))
