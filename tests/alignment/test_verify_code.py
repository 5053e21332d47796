"""Code execution rewards (alignment/verify_code.py): which program a response holds; passing,
failing and partly passing programs against asserts and stdin/stdout cases; what stops a
runaway program (wall timeout, memory, output size, forked children) and how fast; the guard
against accidents (writes and removals outside the run's directory, the network, shelling
out, ctypes; each allowed again by its Limits flag); early exits that must not pass; missing
tests named before training; and the rollouts calling a reward on many samples at once
(`max_workers`). Short timeouts keep the file to a few seconds."""

import dataclasses
import os
import socket
import subprocess
import sys
import time

import pytest

from flaxlm.alignment import verify_code as C
from flaxlm.alignment.grpo_rewards import REWARDS, check_references, parse_rewards
from flaxlm.alignment.rl_rollout import call_reward_fns

# (nothing run under FAST should time out: a roomy timeout costs nothing and holds on a busy CI)
FAST = C.Limits(timeout=3.0, memory_mb=256)
ADD = "```python\ndef add(a, b):\n    return a + b\n```"
SUB = "```python\ndef add(a, b):\n    return a - b\n```"
MBPP = {"tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(5, 0) == 5"]}
SUM_IO = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
IO_CASES = {"test_cases": [{"input": "1 2\n", "output": "3\n"}, {"input": "2 2", "output": "4"},
                           {"input": "0 0", "output": "1"}]}  # fmt: skip


def py(code: str) -> str:
    return f"Here it is:\n```python\n{code}\n```\n"


# (response, the program extracted; None: none)
PROGRAMS = [
    ("```python\nx = 1\n```", "x = 1\n"),
    ("draft:\n```python\nx = 1\n```\nfixed:\n```py\nx = 2\n```", "x = 2\n"),  # the last
    ("```python\nx = 1\n```\noutput:\n```\n1\n```", "x = 1\n"),  # python before untagged
    ("```\nx = 3\n```", "x = 3\n"),
    ("```bash\nls\n```", None),  # fenced, but no python
    ("x = 4\nprint(x)", "x = 4\nprint(x)"),  # no fence: the whole response
    ("```python\nx = 5\n", "x = 5\n"),  # cut at the budget: to the end
    ("", None),
]


@pytest.mark.parametrize("response,program", PROGRAMS)
def test_the_program_of_a_response(response, program):
    assert C.extract_program(response) == program


def test_a_response_without_a_fence_can_be_refused():
    assert C.extract_program("x = 4", whole_without_fence=False) is None


def test_asserts_pass_fail_and_give_partial_credit():
    assert C.code_tests(MBPP, ADD) == 1.0
    assert C.code_tests({"tests": ["assert add(1, 2) == 3", "assert add(1, 1) == 0"]}, ADD) == 0
    # all-or-nothing by default; per top-level assert with code_tests_partial
    one_wrong = {"tests": MBPP["tests"] + ["assert add(1, 1) == 3"]}
    assert C.code_tests(one_wrong, ADD) == 0.0
    assert C.code_tests_partial(one_wrong, ADD) == 0.75
    assert C.code_tests_partial(MBPP, SUB) == pytest.approx(1 / 3)  # add(5, 0) == 5 holds
    r = C.run_tests(ADD, one_wrong, limits=FAST)
    assert (r.passed, r.total, r.status) == (0, 1, "failed") and "AssertionError" in r.detail


def test_humaneval_style_tests_with_an_entry_point():
    meta = {"tests": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
            "entry_point": "add"}  # fmt: skip
    assert C.code_tests(meta, ADD) == 1.0 and C.code_tests(meta, SUB) == 0.0


def test_stdin_stdout_cases_score_the_fraction_passed():
    assert C.run_tests(SUM_IO, IO_CASES, limits=FAST).fraction == pytest.approx(2 / 3)
    apps = {"test_cases": {"inputs": ["3\n", "5\n"], "outputs": ["6  \n\n", "10"]}}
    doubled = py("import sys\nprint(int(input()) * 2)\nsys.exit()")  # exit() after printing
    assert C.code_tests(apps, doubled) == 1.0  # trailing spaces and blank lines are no error
    crash = py("print(int(input()) * 2)\nraise SystemExit(3)")  # right output, bad status
    assert C.code_tests(apps, crash) == 0.0


@pytest.mark.parametrize("program", [
    "def add(a, b)\n    return a + b",  # syntax error
    "import sys\nsys.exit(0)",  # exits before the tests run: exit status 0 is no pass
    "import os\nos._exit(0)",
    "raise RuntimeError('no')",
])  # fmt: skip
def test_programs_that_never_finish_the_tests_score_zero(program):
    r = C.run_tests(py(program), MBPP, limits=FAST)
    assert r.fraction == 0.0 and r.status == "error", r


def test_no_program_scores_zero_and_the_main_guard_does_not_run_under_tests():
    assert C.code_tests(MBPP, "I cannot do that.\n```bash\nrm -rf /\n```") == 0.0
    demo = ADD.replace("```\n", "") + "\nif __name__ == '__main__':\n    print(add(*input()))\n```"
    assert C.code_tests(MBPP, demo) == 1.0  # (run, input() would fail on no stdin)


def test_an_infinite_loop_is_killed_at_the_timeout_meta_overrides():
    t0 = time.perf_counter()
    r = C.run_tests(py("while True:\n    pass"), {**MBPP, "timeout": 0.5})
    elapsed = time.perf_counter() - t0
    assert r.status == "timeout" and r.fraction == 0.0
    assert 0.5 <= elapsed < 3.0, elapsed  # (the default timeout is 5 s)
    for bad in (0, float("inf")):  # (inf: no CPU limit to set, int(inf) raised)
        with pytest.raises(ValueError, match=f"meta.timeout={bad!r} must be a finite number"):
            C.code_tests({**MBPP, "timeout": bad}, ADD)


def test_memory_bombs_are_stopped():
    r = C.run_tests(py("x = bytearray(8 * 1024 ** 3)"), MBPP, limits=FAST)
    assert r.status == "error" and "MemoryError" in r.detail
    grow = py("a = []\nwhile True:\n    a.append(' ' * 10 ** 7)")
    t0 = time.perf_counter()
    r = C.run_tests(grow, MBPP, limits=C.Limits(timeout=4.0, memory_mb=96))
    assert r.status == "error" and "MemoryError" in r.detail, r
    assert time.perf_counter() - t0 < 4.0


def test_an_output_bomb_is_capped():
    r = C.run_tests(py("while True:\n    print('x' * 1000)"), IO_CASES, limits=FAST)
    assert r.fraction == 0.0 and r.status == "error" and r.seconds < 3.0, r


def _dead(pid: int) -> bool:
    """Gone, or a zombie: killed, not yet reaped by this container's init."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
@pytest.mark.parametrize("parent", ["def add(a, b):\n    return a + b", "while True:\n    pass"])
def test_a_forked_child_does_not_outlive_the_run(tmp_path, parent):
    """The child sleeps; the parent returns (passing the tests) or loops (timeout): either way
    the process group is killed when the run ends."""
    pid_file = tmp_path / "child.pid"
    program = (f"import os, time\nchild = os.fork()\nif child == 0:\n"
               f"    time.sleep(60)\n    os._exit(0)\n"
               f"open({str(pid_file)!r}, 'w').write(str(child))\n{parent}")  # fmt: skip
    passes = "def add" in parent
    t0 = time.perf_counter()
    # (writes_outside: the child's pid reaches the test through a file outside the run)
    limits = C.Limits(timeout=3.0 if passes else 0.5, writes_outside=True)
    r = C.run_tests(py(program), MBPP, limits=limits)
    assert time.perf_counter() - t0 < 3.0
    assert r.status == ("passed" if passes else "timeout"), r
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 2.0  # (SIGKILL is delivered when the child is next scheduled)
    while not _dead(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _dead(pid)


def test_a_fork_bomb_runs_out_of_processes():
    """(root too: the harness counts the run's forks; RLIMIT_NPROC never binds root)"""
    bomb = py("import os\nkids = 0\nfor _ in range(200):\n    if os.fork() == 0:\n"
              "        import time; time.sleep(5); os._exit(0)\n    kids += 1\n"
              "def add(a, b):\n    return a + b")  # fmt: skip
    r = C.run_tests(bomb, MBPP, limits=C.Limits(timeout=2.0, max_processes=8))
    assert r.status == "error" and "BlockingIOError" in r.detail, r


DOUBLING_FORKS = """
import os, time
ROOT = os.getpid()
for depth in range(6):  # every process forks: 2^6 - 1 = 63 forks wanted
    try:
        if os.fork() == 0:
            open(f"born.{os.getpid()}", "w").close()
    except BlockingIOError:
        open(f"refused.{os.getpid()}.{depth}", "w").close()
        break
time.sleep(0.5)  # (alive while the tree forks: no pid, so no file's name, is used twice)
while True:  # each process waits for its children: the root's count below is final, however
    try:     # slowly a loaded machine runs the tree (a fixed 1 s wait once counted too early)
        os.wait()
    except ChildProcessError:
        break
if os.getpid() != ROOT:
    os._exit(0)
born = [f for f in os.listdir(".") if f.startswith("born.")]
refused = [f for f in os.listdir(".") if f.startswith("refused.")]
# every attempt is one byte (a fork made or refused), and at most the budget of 9 were made:
# fewer when two forks raced for the 9th byte (each saw the other's; both refused)
assert refused and os.path.getsize(".forks") == len(born) + len(refused) and len(born) <= 9

def add(a, b):
    return a + b
"""


def test_the_fork_budget_counts_the_whole_process_tree_and_spares_a_small_pool():
    """Children that fork spend the same budget (a tree of doubling forks stops at it), and a
    program's multiprocessing pool within it runs."""
    doubling = py(DOUBLING_FORKS)
    r = C.run_tests(doubling, MBPP, limits=C.Limits(timeout=5.0, max_processes=9))
    assert r.status == "passed", r  # 2^6 - 1 = 63 forks wanted: at most 9 made, the rest refused
    pool = py("import multiprocessing as mp\nwith mp.Pool(4) as p:\n"
              "    assert p.map(abs, [-1, -2, -3]) == [1, 2, 3]\n"
              "def add(a, b):\n    return a + b")  # fmt: skip
    assert C.run_tests(pool, MBPP, limits=C.Limits(timeout=5.0, max_processes=8)).status == "passed"
    r = C.run_tests(pool, MBPP, limits=C.Limits(timeout=5.0, max_processes=3))
    assert r.status == "error" and "BlockingIOError" in r.detail, r

    # with shell allowed, the programs it starts spend the budget too
    runs = py("import subprocess\nfor _ in range(5):\n    subprocess.run(['true'])" + ADD_DEF)
    shell = C.Limits(timeout=5.0, shell=True, max_processes=8)
    assert C.run_tests(runs, MBPP, limits=shell).status == "passed"
    r = C.run_tests(runs, MBPP, limits=dataclasses.replace(shell, max_processes=3))
    assert r.status == "error" and "subprocess.Popen: the run has made its 3" in r.detail, r


def test_the_environment_is_scrubbed_and_site_packages_are_out_of_reach():
    probe = py("import os, sys\n"
               "assert 'FLAXLM_RUN_TOKEN' not in os.environ and 'PYTHONPATH' not in os.environ\n"
               "assert os.environ['HOME'] == os.getcwd()\n"
               "try:\n    import numpy\nexcept ImportError:\n    pass\n"
               "else:\n    raise AssertionError('site-packages reachable')\n"
               "def add(a, b):\n    return a + b")  # fmt: skip
    r = C.run_tests(probe, MBPP, limits=FAST)
    assert r.status == "passed", r


ADD_DEF = "\ndef add(a, b):\n    return a + b\n"


def refused(r: C.RunResult, action: str, flag: str) -> bool:
    """The run crashed on the guard's PermissionError naming `action` and `flag`."""
    want = f"PermissionError: {action}"
    return (r.status == "error" and r.fraction == 0.0 and want in r.detail
            and f"(Limits.{flag}=True allows it)" in r.detail)  # fmt: skip


def test_the_guard_lets_a_program_work_in_its_own_directory():
    """Files in its cwd / TMPDIR (made, renamed, removed), /dev/null, reads anywhere, forks,
    multiprocessing (its shared memory under /dev/shm), asyncio, ctypes' data types."""
    program = ("import asyncio, ctypes, multiprocessing, os, shutil, tempfile\n"
               "open('out.txt', 'w').write('1')\nos.makedirs('d/e')\n"
               "os.rename('out.txt', 'd/e/out.txt')\nshutil.rmtree('d')\n"
               "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('x')\n"
               "with tempfile.TemporaryDirectory() as d:\n    open(os.path.join(d, 'f'), 'w')\n"
               "open(os.devnull, 'w').write('x')\nassert open(os.__file__).read(1)\n"
               "v = multiprocessing.Value('i', 3)\n"
               "with multiprocessing.Pool(2) as p:\n    assert p.map(abs, [-1, -2]) == [1, 2]\n"
               "asyncio.run(asyncio.sleep(0))\nassert ctypes.c_int(2).value == 2\n"
               "os.symlink('/', 'root')\nos.remove('root')\n" + ADD_DEF)  # fmt: skip
    r = C.run_tests(py(program), MBPP, limits=FAST)
    assert r.status == "passed", r


@pytest.mark.parametrize("write", [
    "open({out!r}, 'w').write('x')",
    "open({out!r}, 'a')",
    "os.close(os.open({out!r}, os.O_WRONLY | os.O_CREAT))",
    "pathlib.Path({out!r}).write_text('x')",
    "os.chdir(os.path.dirname({out!r}))\nopen('out.txt', 'w')",  # relative to a new cwd
    "os.symlink(os.path.dirname({out!r}), 'link')\nopen('link/out.txt', 'w')",
    "open('../' * 40 + {out!r}.lstrip('/'), 'w')",
    "shutil.copy(__file__, {out!r})",
    "sqlite3.connect({out!r}).execute('create table t (x)')",
])  # fmt: skip
def test_writing_outside_the_run_directory_is_refused(tmp_path, write):
    out = tmp_path / "out.txt"  # (pytest's tmp_path: outside the run's directory)
    program = "import os, pathlib, shutil, sqlite3\n" + write.format(out=str(out)) + ADD_DEF
    r = C.run_tests(py(program), MBPP, limits=FAST)
    assert refused(r, "", "writes_outside") and "writes outside the run's directory" in r.detail
    assert not out.exists()
    r = C.run_tests(py(program), MBPP, limits=C.Limits(timeout=3.0, writes_outside=True))
    assert r.status == "passed" and out.exists(), r  # (allowed again by the flag)


@pytest.mark.parametrize("change", [
    "os.remove({victim!r})", "os.unlink({victim!r})", "os.rename({victim!r}, 'mine.txt')",
    "os.replace('mine.txt', {victim!r})", "shutil.rmtree(os.path.dirname({victim!r}))",
    "os.truncate({victim!r}, 0)", "os.chmod({victim!r}, 0o600)",
    "os.rmdir('..')",  # (the parent, not a name in the run's directory; fails anyway)
])  # fmt: skip
def test_removing_or_changing_an_outside_file_is_refused(tmp_path, change):
    victim = tmp_path / "keep" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    before = victim.stat().st_mode
    program = ("import os, shutil\nopen('mine.txt', 'w').write('mine')\n"
               + change.format(victim=str(victim)) + ADD_DEF)  # fmt: skip
    r = C.run_tests(py(program), MBPP, limits=FAST)
    assert refused(r, change.split("(")[0].replace("unlink", "remove").replace("replace",
                   "rename"), "writes_outside"), r  # fmt: skip
    assert victim.read_text() == "precious" and victim.stat().st_mode == before


def test_writing_outside_is_refused_for_stdin_stdout_cases_too(tmp_path):
    out = tmp_path / "out.txt"
    program = py(f"open({str(out)!r}, 'w')\na, b = map(int, input().split())\nprint(a + b)")
    r = C.run_tests(program, IO_CASES, limits=FAST)
    assert r.fraction == 0.0 and "writes outside" in r.detail and not out.exists(), r


def test_the_network_is_refused_connections_and_name_lookups():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        connect = f"import socket\nsocket.socket().connect(('127.0.0.1', {port}))" + ADD_DEF
        r = C.run_tests(py(connect), MBPP, limits=FAST)
        assert refused(r, "socket.connect(('127.0.0.1', ", "network"), r
        with pytest.raises(BlockingIOError):
            server.accept()  # (no connection came)
        r = C.run_tests(py(connect), MBPP, limits=C.Limits(timeout=3.0, network=True))
        assert r.status == "passed", r
        server.setblocking(True)
        server.settimeout(3.0)
        server.accept()[0].close()  # (the allowed one reached it)
    for lookup in ("socket.getaddrinfo('localhost', 80)", "socket.gethostbyname('localhost')"):
        r = C.run_tests(py(f"import socket\n{lookup}" + ADD_DEF), MBPP, limits=FAST)
        assert refused(r, lookup.split("(")[0] + "('localhost'", "network"), r
    udp = "import socket\nsocket.socket(type=socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', 9))"
    assert refused(C.run_tests(py(udp + ADD_DEF), MBPP, limits=FAST), "socket.sendto", "network")


@pytest.mark.parametrize("shell", [
    "os.system('touch {marker}')",
    "subprocess.run(['touch', {marker!r}])",
    "os.popen('touch {marker}').read()",
    "os.execv('/bin/touch', ['touch', {marker!r}])",
    "os.posix_spawn('/bin/touch', ['touch', {marker!r}], {{}})",
])  # fmt: skip
def test_shelling_out_is_refused(tmp_path, shell):
    marker = tmp_path / "ran"
    program = "import os, subprocess\n" + shell.format(marker=str(marker)) + ADD_DEF
    r = C.run_tests(py(program), MBPP, limits=FAST)
    event = {"os.popen": "subprocess.Popen", "subprocess.run": "subprocess.Popen",
             "os.execv": "os.exec"}.get(shell.split("(")[0], shell.split("(")[0])  # fmt: skip
    assert refused(r, event, "shell") and "runs another program" in r.detail, r
    assert not marker.exists()
    if shell.startswith("os.system"):  # allowed again by the flag
        r = C.run_tests(py(program), MBPP, limits=C.Limits(timeout=3.0, shell=True))
        assert r.status == "passed" and marker.exists(), r


def test_signalling_a_process_outside_the_run_is_refused():
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        program = f"import os, signal\nos.kill({other.pid}, 0)\nos.kill({other.pid}, 15)"
        r = C.run_tests(py(program + ADD_DEF), MBPP, limits=FAST)
        assert refused(r, f"os.kill({other.pid}, 15)", "shell"), r  # (signal 0 only probes)
        assert other.poll() is None
        # every process of the user (SIGWINCH, ignored by default, in case the guard failed)
        r = C.run_tests(py("import os\nos.kill(-1, 28)" + ADD_DEF), MBPP, limits=FAST)
        assert refused(r, "os.kill(-1, 28)", "shell") and other.poll() is None, r
    finally:
        other.kill()
        other.wait()


def test_ctypes_cannot_load_libraries_unless_allowed():
    for call in ("ctypes.CDLL('libc.so.6')", "ctypes.CDLL(None).getpid()",
                 "ctypes.pythonapi.Py_GetVersion"):  # fmt: skip
        r = C.run_tests(py(f"import ctypes\n{call}" + ADD_DEF), MBPP, limits=FAST)
        assert refused(r, "ctypes.dl", "ctypes") and "through ctypes" in r.detail, r
    load = py("import ctypes\nassert ctypes.CDLL(None).getpid() > 0" + ADD_DEF)
    for limits in (C.Limits(timeout=3.0, ctypes=True), C.Limits(timeout=3.0, site_packages=True)):
        r = C.run_tests(load, MBPP, limits=limits)
        assert r.status == "passed", r


def test_missing_or_malformed_tests_are_errors_naming_the_field():
    with pytest.raises(KeyError, match=r"code_tests needs the prompt record's meta.tests"):
        C.code_tests({"answer": "3"}, ADD)
    with pytest.raises(KeyError, match=r"meta.tests"):
        C.code_tests({}, "no code")  # (also when the response holds no program)
    with pytest.raises(ValueError, match=r"meta.test_cases: each case needs input and output"):
        C.code_tests({"test_cases": [{"input": "1"}]}, SUM_IO)
    with pytest.raises(ValueError, match=r"meta.tests must be Python code"):
        C.code_tests({"tests": 3}, ADD)


def test_prompts_without_tests_are_refused_before_training():
    from flaxlm.data.source_errors import DataError

    rewards = parse_rewards("code_tests,format:0.1")
    assert rewards[0][1] is REWARDS["code_tests"]
    check_references(rewards, [{"meta": MBPP, "loc": "p:1"}, {"meta": IO_CASES, "loc": "p:2"}],
                     "grpo.rewards")  # fmt: skip
    want = r"data.train: 1 of 1 prompts \(e.g. p:1\) have no meta.tests or meta.test_cases"
    with pytest.raises(DataError, match=want):
        check_references(rewards, [{"meta": {"answer": "1"}, "loc": "p:1"}], "online.rewards")


def test_the_rollouts_run_a_batch_concurrently_with_per_sample_results():
    """code_tests declares max_workers: call_reward_fns starts the batch's runs from threads;
    rewards, validity and errors (in sample order) are those of one call at a time."""
    assert C.code_tests.max_workers == (os.cpu_count() or 1)
    metas = [MBPP, MBPP, {}, IO_CASES, MBPP, {"tests": 7}, MBPP, IO_CASES]
    texts = [ADD, SUB, ADD, SUM_IO, "no code at all", ADD, py("while True: pass"), SUB]
    metas[6] = {**MBPP, "timeout": 0.5}
    got, valid, errors = call_reward_fns([C.code_tests], [2.0], metas, texts)
    assert got.tolist() == pytest.approx([2, 0, 0, 4 / 3, 0, 0, 0, 0])
    assert valid.tolist() == [True, True, False, True, True, False, True, True]
    assert "KeyError" in errors[0] and "meta.tests must be" in errors[1]  # (sample order)


def test_a_plain_reward_with_max_workers_overlaps_and_keeps_sample_order():
    def slow(meta, response):
        time.sleep(0.2)
        if meta["i"] == 1:
            raise ValueError("one")
        return float(meta["i"])

    slow.max_workers = 8
    metas = [{"i": i} for i in range(8)]
    t0 = time.perf_counter()
    got, valid, errors = call_reward_fns([slow], [1.0], metas, [""] * 8)
    assert time.perf_counter() - t0 < 1.2  # not 8 × 0.2 s
    assert got.tolist() == [0, 0, 2, 3, 4, 5, 6, 7] and valid.sum() == 7
    assert errors == [f"reward slow raised ValueError: one ({os.path.basename(__file__)}:"
                      f"{slow.__code__.co_firstlineno + 3} in slow)"]  # fmt: skip


def test_score_batch_outside_the_rollouts():
    got = C.score_batch(C.code_tests, [MBPP] * 4, [ADD, SUB, ADD, SUB], max_workers=4)
    assert got == [1.0, 0.0, 1.0, 0.0]


# --- limits from the config (grpo.code_limits / online.code_limits) ---------------------------


def test_code_limits_from_the_config_and_bad_values_named():
    from flaxlm.configs import grpo, online_dpo

    section = grpo.get_config().grpo.code_limits
    assert C.limits_from_config(section, "grpo.code_limits") == C.DEFAULT_LIMITS
    assert C.limits_from_config(None, "grpo.code_limits") == C.DEFAULT_LIMITS  # older configs
    assert online_dpo.get_config().online.code_limits.to_dict() == section.to_dict()
    section.timeout, section.network, section.max_processes = 2, True, None
    section.memory_mb = 2048
    got = C.limits_from_config(section, "grpo.code_limits")
    assert got == C.Limits(timeout=2, memory_mb=2048, network=True, max_processes=None)
    got = C.limits_from_config({"memory_mb": 2048.0}, "online.code_limits")  # (a plain dict)
    assert got.memory_mb == 2048 and isinstance(got.memory_mb, int)
    for field, value, want in [
        ("memory_mb", 0, "grpo.code_limits.memory_mb=0: expected a positive integer"),
        ("output_bytes", 1.5, "output_bytes=1.5: expected a positive integer"),
        ("max_processes", -1, "max_processes=-1: expected a positive integer or None"),
        ("timeout", "5", "timeout='5': expected a positive number of seconds"),
        ("memory_mb", True, "memory_mb=True: expected a positive integer"),
        ("shell", 1, "shell=1: expected True or False"),
        ("netwrok", True, r"grpo.code_limits.netwrok: no such limit; known: \['ctypes'"),
        ("timeout", float("inf"), "timeout=inf: expected a positive number of seconds"),
    ]:
        with pytest.raises(ValueError, match=want):
            C.limits_from_config({field: value}, "grpo.code_limits")


def test_code_limits_flag_reads_values_and_names_what_is_wrong():
    got = C.parse_limits(" timeout = 2.5, memory_mb=4096,network=TRUE, max_processes=none ,")
    assert got == {"timeout": 2.5, "memory_mb": 4096, "network": True, "max_processes": None}
    assert C.limits_from_config(got, "--code_limits") == C.Limits(
        timeout=2.5, memory_mb=4096, network=True, max_processes=None)  # fmt: skip
    assert C.parse_limits("shell=false,timeout=3") == {"shell": False, "timeout": 3}
    for text, want in [
        ("timeout", r"--code_limits: 'timeout' is not FIELD=VALUE"),
        ("timeout=", r"'timeout=' is not FIELD=VALUE"),
        ("=3", r"'=3' is not FIELD=VALUE"),
        ("timeout=fast", r"--code_limits: timeout='fast' is not a number, true, false or none"),
        ("timeout=1,timeout=2", "--code_limits: timeout is given twice"),
        ("memory_mb=0", r"--code_limits.memory_mb=0: expected a positive integer"),
        ("network=1", r"--code_limits.network=1: expected True or False"),
        ("netwrok=true", r"--code_limits.netwrok: no such limit"),
        ("timeout=nan", r"--code_limits.timeout=nan: expected a positive number"),
        (" , ", r"--code_limits: no limits given"),
    ]:
        with pytest.raises(ValueError, match=want):
            C.parse_limits(text)
    with pytest.raises(ValueError, match=r"^--lim: 'x' is not FIELD=VALUE"):
        C.parse_limits("x", "--lim")


def test_with_limits_runs_the_code_rewards_under_them_and_leaves_others(tmp_path):
    out = tmp_path / "out.txt"
    response = py(f"open({str(out)!r}, 'w').write('x')" + ADD_DEF)
    allowed = C.Limits(timeout=3.0, writes_outside=True)
    assert C.code_tests(MBPP, response) == 0 and not out.exists()  # (the defaults: refused)
    for fn in (C.code_tests, C.code_tests_partial):
        bound = C.with_limits(fn, allowed)
        assert bound.__name__ == fn.__name__ and bound.max_workers == fn.max_workers
        assert bound.reference_keys == fn.reference_keys
        assert bound(MBPP, response) == 1 and out.exists()
        out.unlink()
    assert C.with_limits(C.code_tests, C.DEFAULT_LIMITS) is C.code_tests
    assert C.with_limits(REWARDS["exact_match"], allowed) is REWARDS["exact_match"]


def test_the_grpo_task_binds_its_code_limits_before_loading_anything(tmp_path, monkeypatch):
    """build_task reads grpo.code_limits where it parses grpo.rewards: a bad value is refused
    naming the key before any checkpoint is read, and the rewards the task trains with run
    their programs under the limits it sets."""
    from flaxlm.alignment import grpo
    from flaxlm.configs import grpo as grpo_config

    config = grpo_config.get_config()
    config.init_from = str(tmp_path / "no_sft_run")
    config.grpo.rewards = "code_tests,format:0.1"
    config.grpo.code_limits.memory_mb = 0
    with pytest.raises(ValueError, match=r"grpo.code_limits.memory_mb=0: expected a positive"):
        grpo.build_task(config, mesh=None)

    seen = []

    class Stop(Exception):
        pass

    def capture(rewards, *args):
        seen.extend(rewards)
        raise Stop

    monkeypatch.setattr(grpo, "check_rewards", capture)
    config.grpo.code_limits.memory_mb = 512
    config.grpo.code_limits.writes_outside = True
    with pytest.raises(Stop):
        grpo.build_task(config, mesh=None)
    (name, fn, weight), (other, _, _) = seen
    assert (name, weight, other) == ("code_tests", 1.0, "format")
    out = tmp_path / "out.txt"
    assert fn(MBPP, py(f"open({str(out)!r}, 'w').write('x')" + ADD_DEF)) == 1 and out.exists()


@pytest.mark.parametrize("call,allowed", [
    ("resource.setrlimit(resource.RLIMIT_AS, (-1, -1))", False),  # unlimited: root could
    ("resource.setrlimit(resource.RLIMIT_CPU, (100, 100))", False),
    ("resource.prlimit(0, resource.RLIMIT_FSIZE, (1 << 40, 1 << 40))", False),
    ("resource.setrlimit(resource.RLIMIT_AS, (1 << 28, 1 << 28))", True),  # lowering
    ("resource.setrlimit(resource.RLIMIT_STACK, (-1, -1))", True),  # (not one of the run's)
    ("resource.prlimit(0, resource.RLIMIT_CPU)", True),  # a query
])  # fmt: skip
def test_the_run_limits_cannot_be_raised_by_the_program(call, allowed):
    r = C.run_tests(py(f"import resource\n{call}" + ADD_DEF), MBPP, limits=FAST)
    if allowed:
        assert r.status == "passed", r
    else:
        assert r.status == "error" and "raises a limit of the run" in r.detail, r
    # (with every guard flag allowed and no process limit, the check stays)
    open_limits = C.Limits(timeout=3.0, network=True, writes_outside=True, shell=True,
                           ctypes=True, max_processes=None)  # fmt: skip
    assert C.run_tests(py(f"import resource\n{call}" + ADD_DEF), MBPP,
                       limits=open_limits).status == r.status  # fmt: skip
