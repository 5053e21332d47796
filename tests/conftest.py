"""Test setup: 8 simulated CPU devices, set before JAX initialises its backends.

A persistent compilation cache (in the temp dir) lets the many tests that compile the same
tiny programs — and the subprocesses they start, which inherit the environment — skip XLA
compilation after the first time: the suite runs about twice as fast on 2 cores.
"""

import gc
import json
import multiprocessing
import os
import subprocess
import tempfile
import time

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "flaxlm-test-jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# One source frame per op in the lowered IR, not the whole Python stack: with a warm cache a
# program's tracing and lowering are most of its cost, and the stacks are metadata (not in the
# cache key, not in what runs). tests/models/test_decode.py: 51.3 → 47.0 user s.
os.environ.setdefault("JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS", "false")
# The subprocesses also load tests/subprocess_site/sitecustomize.py: every process of a
# multi-process job writes its programs to that cache (jax writes process 0's alone).
_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "subprocess_site")
_paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
if _SITE not in _paths:
    os.environ["PYTHONPATH"] = os.pathsep.join([_SITE, *filter(None, _paths)])

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


import pytest  # noqa: E402


# --- garbage collection: what outlived a test file is not scanned again -------------------------
# The process ends the suite with about 2M objects (jax's caches of traced and compiled programs,
# session fixtures), and every full collection scanned them all: ~2 s each by the train/ tests,
# ~50 s over the suite, much of it in the gc.collect() the checkpoint restore runs after each
# unreadable step. After each test file, one collection and then gc.freeze() of the survivors
# leave later collections only the objects created since. (A frozen object is still freed when
# its reference count drops to zero; only cycles among frozen objects are never collected.)
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _spent.clear()
    _by_fun.clear()
    start, cpu = time.perf_counter(), (_cpu_seconds() if _PROFILE else None)
    yield  # the file's module-scoped fixtures are torn down by now if nextitem is in another
    if nextitem is None or nextitem.path != item.path:
        gc.collect()
        gc.freeze()
    if _PROFILE:  # setup, call and teardown (module fixtures land on a file's first test)
        used = [round(after - before, 3) for before, after in zip(cpu, _cpu_seconds())]
        _write_profile(item, time.perf_counter() - start, *used)


# --- where a test's time goes: FLAXLM_TEST_COMPILE_PROFILE=FILE -------------------------------
# Appends one JSON line per test: its xdist worker, when it ended (the workers' timelines),
# its wall time (setup, call and teardown), the CPU seconds of this process and of the
# subprocesses it started and waited for (on 2 cores the suite is CPU bound: CPU seconds, not
# wall, are what a test costs), and the seconds jax spent tracing, lowering and compiling (the
# XLA backend, reads of the persistent cache included), with the number of compiles and cache
# hits and the compile seconds per jitted function. On a cold cache most of the suite is
# compile time; this says which tests' programs cost it (tests/compile_profile_summary.py).
_PROFILE = os.environ.get("FLAXLM_TEST_COMPILE_PROFILE")
_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "compile_s",
}
_spent: dict = {}  # this test's totals
_by_fun: dict = {}  # this test's compile seconds per jitted function


def _on_event(event, **_):
    if event == "/jax/compilation_cache/cache_hits":
        _spent["cache_hits"] = _spent.get("cache_hits", 0) + 1


def _on_duration(event, secs, fun_name="?", **_):
    key = _EVENTS.get(event)
    if key:
        _spent[key] = _spent.get(key, 0.0) + secs
        if key == "compile_s":
            _spent["compiles"] = _spent.get("compiles", 0) + 1
            _by_fun[fun_name] = _by_fun.get(fun_name, 0.0) + secs


if _PROFILE:
    import jax.monitoring

    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    jax.monitoring.register_event_listener(_on_event)


def _cpu_seconds():
    """(this process's CPU seconds, all threads; its finished children's, user + system)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time(), children.ru_utime + children.ru_stime


def _write_profile(item, wall_s, cpu_s, child_cpu_s):
    record = {"test": item.nodeid, "wall_s": round(wall_s, 3), "cpu_s": cpu_s}
    record.update(child_cpu_s=child_cpu_s, worker=_XDIST_WORKER or "", end=round(time.time(), 1))
    record.update({k: round(v, 3) for k, v in _spent.items()})
    record["compile_s_by_fun"] = {k: round(v, 3) for k, v in _by_fun.items() if v >= 0.05}
    with open(_PROFILE, "a") as f:
        f.write(json.dumps(record) + "\n")


@pytest.fixture(scope="session")
def chat_tokenizer(tmp_path_factory):
    """(path, Tokenizer): a small SentencePiece model with flaxlm's chat tokens (vocab 400),
    trained once per session on a few generated sentences."""
    import random

    from flaxlm.data import tokenizer

    rng = random.Random(0)
    words = "where does Kavo live in Brel the city of 42 yes no a number say or".split()
    texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(1000)]
    path = str(tmp_path_factory.mktemp("chat_tokenizer") / "tokenizer.model")
    return path, tokenizer.train(texts, 400, model_path=path)


def _write_token_shard(d, records, tok, bos_eos) -> str:
    """Writes directory `d`: one token-id ArrayRecord shard of `records` and the meta.json that
    preprocess (or another tool) writes beside it (`bos_eos`: records already framed); returns
    `d`."""
    import json

    import numpy as np
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(d)
    meta = {"format": "tokens", "dtype": "int32", "bos_eos": bos_eos}
    meta.update(tokenizer_sha256=tok.sha256, vocab_size=tok.vocab_size)
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f)
    w = ArrayRecordWriter(os.path.join(d, "shard-00000.arrayrecord"), "group_size:1")
    for r in records:
        w.write(np.asarray(r, np.int32).tobytes())
    w.close()
    return str(d)


@pytest.fixture(scope="session")
def write_token_shard():
    """`write(d, records, tok, bos_eos) -> d`: a token-id shard directory (`_write_token_shard`)."""
    return _write_token_shard


@pytest.fixture(scope="session")
def byte_chat_tokenizer():
    """make(dir, chat_template) -> dir: an HF tokenizer.json whose ids are single bytes (byte
    level, no merges, so trained ids decode to exactly the trained text) plus the ChatML
    specials <|endoftext|> <|im_start|> <|im_end|>, and a tokenizer_config.json with the
    template (EOS <|im_end|>); written by tests/hf_tokenizers.py."""
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(
        "hf_tokenizers", os.path.join(here, "hf_tokenizers.py")
    )
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)

    def make(d: str, template: str) -> str:
        return helpers.write_hf_tokenizer(
            d, template, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        )

    return make


@pytest.fixture
def hf_live():
    """run(script, *args) -> the JSON of its last stdout line: a python script run under
    .venv-hf (HF transformers; CI has none) with each arg JSON-encoded in sys.argv. Skips the
    test unless FLAXLM_HF_LIVE=1 and .venv-hf exists."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    python = os.path.join(repo, ".venv-hf", "bin", "python")
    if os.environ.get("FLAXLM_HF_LIVE") != "1" or not os.path.exists(python):
        pytest.skip("live transformers check: set FLAXLM_HF_LIVE=1 and create .venv-hf")

    def run(script, *args):
        res = subprocess.run([python, "-c", script, *map(json.dumps, args)],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert res.returncode == 0, res.stderr[-2000:]
        return json.loads(res.stdout.strip().splitlines()[-1])

    return run


# --- the demo's end-to-end run (tests/test_demo.py), started at collection ---------------------
# `flaxlm.demo.main([... "--runlocal"])` runs every stage of the recipe: 1-1.5 min, nearly all
# single-threaded Python (tracing and lowering) that leaves the second CPU core idle. It runs in
# one worker process, spawned as soon as collection has selected a test of tests/test_demo.py, so
# the first run overlaps the tests collected before that file. The tests' further demo.main calls
# (reruns of a finished workdir) go to the same worker, warm from that run as the test process
# was when the demo ran in-process (`demo_main`).
_DEMO_TEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_demo.py")
_demo: dict = {}


def _start_demo(root: str) -> None:
    from concurrent.futures import ProcessPoolExecutor

    log = os.path.join(root, "demo.log")  # the worker's stdout and stderr
    redirect = (f"import os\nfd = os.open({log!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND)\n"
                "os.dup2(fd, 1)\nos.dup2(fd, 2)\n")  # fmt: skip
    worker = ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn"), initializer=exec, initargs=(redirect,)
    )
    workdir = os.path.join(root, "demo")
    _demo.update(worker=worker, calls=[], workdir=workdir, log=log)
    _demo["first"] = _demo_submit(["--workdir", workdir, "--runlocal"])


def _demo_submit(argv):
    from flaxlm import demo

    future = _demo["worker"].submit(demo.main, argv)
    _demo["calls"].append(future)
    return future


# Under pytest-xdist (`make test` runs two workers, `--dist loadfile`) every worker collects every
# test, so none starts the demo at collection: the worker that is given tests/test_demo.py starts
# it in `demo_run`, and that file is put first so the demo runs from the start, while the other
# worker goes on with the rest.
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")


def pytest_collection_modifyitems(session, config, items):
    if _XDIST_WORKER:
        items.sort(key=lambda item: str(item.path) != _DEMO_TEST)  # stable: the rest keep order


def pytest_collection_finish(session):
    if (
        _XDIST_WORKER
        or session.config.option.collectonly
        or not any(str(item.path) == _DEMO_TEST for item in session.items)
    ):
        return
    _start_demo(str(session.config._tmp_path_factory.mktemp("demo_run")))


def pytest_sessionfinish(session):
    worker = _demo.pop("worker", None)
    if worker is None:
        return
    if not all(f.done() for f in _demo["calls"]):  # the session ended before the demo did
        for proc in list(getattr(worker, "_processes", {}).values()):
            proc.kill()
    worker.shutdown(wait=True, cancel_futures=True)


def _demo_call(future):
    try:
        return future.result(timeout=1800)
    except BaseException:
        if os.path.exists(_demo["log"]):
            with open(_demo["log"]) as f:
                print(f"--- tail of {_demo['log']} ---\n{f.read()[-5000:]}")
        raise


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The workdir of a finished `python -m flaxlm.demo --runlocal`."""
    if "worker" not in _demo:  # collection started none
        _start_demo(str(tmp_path_factory.mktemp("demo_run")))
    _demo_call(_demo["first"])
    return _demo["workdir"]


@pytest.fixture(scope="session")
def demo_main(demo_run):
    """flaxlm.demo.main(argv), run in the worker that ran `demo_run` (its exceptions, SystemExit
    included, are raised here)."""
    return lambda argv: _demo_call(_demo_submit(argv))
