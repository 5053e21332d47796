"""Stopping before total_steps, together (train/stopping.py), with two real jax processes on CPU
(jax.distributed, gloo): a SIGTERM that only one process sees, and a finite dataset that runs out
on one process first, stop both at the same step with one checkpoint there. One process: the end
of the data stops the run with a checkpoint (it used to raise StopIteration)."""

import importlib.util
import json
import os

import numpy as np
import pytest

from flaxlm.data import tokenizer as T
from flaxlm.train.checkpoint import Checkpointer
from flaxlm.train.metrics import read_events, read_metrics
from flaxlm.train.stopping import next_interval

_spec = importlib.util.spec_from_file_location(
    "multiprocess", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "multiprocess.py"))  # fmt: skip
mp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mp)

SCRIPT = r"""
import json, os, signal, sys

from flaxlm.train.main import init_distributed

port, pid, workdir, mode, corpus, tok = sys.argv[1:7]
init_distributed(f"localhost:{port}", 2, int(pid))

import jax
from flaxlm.configs import pretrain as pretrain_config
from flaxlm.configs.common import override
from flaxlm.data.markov import MarkovStream
from flaxlm.models.sharding import make_mesh
from flaxlm.train import loop, pretrain

common = {"progress_bar": False, "eval_at_start": False, "eval_every": 0, "async_ckpt": False}
if mode.startswith("sigterm"):
    c = override(pretrain_config.get_config("variant=tiny,runlocal=True,data=markov"),
                 {**common, "total_steps": 40, "log_every": 4, "ckpt_every": 0})
else:
    c = override(pretrain_config.get_config("variant=tiny,runlocal=True,data=text"),
                 {**common, "total_steps": 500, "log_every": 3, "ckpt_every": 5,
                  "model.vocab_size": 512, "data.sources": corpus, "data.tokenizer": tok,
                  "data.num_epochs": 1, "data.shuffle": False, "data.read_threads": 1})


class SigtermOnProcess1(MarkovStream):
    def __next__(self):
        if jax.process_index() == 1 and self.index == 5:  # drawing the batch of step 6
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__next__()


mesh = make_mesh(dict(c.mesh))
task = pretrain.build_task(c, mesh, workdir)
if mode.startswith("sigterm"):
    task.train_batches = SigtermOnProcess1(
        c.model.vocab_size, c.seq_len, c.batch_size, seed=c.seed, chain_seed=c.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
if mode == "sigterm_at_startup" and jax.process_index() == 0:
    init = task.init_params

    def init_params(rng):  # traced while restoring: before the loop, long after jax's handler
        os.kill(os.getpid(), signal.SIGTERM)
        return init(rng)

    task.init_params = init_params
_, summary = loop.run(c, workdir, task, mesh=mesh)
print("SUMMARY", json.dumps({k: summary[k] for k in ("step", "preempted", "data_exhausted")}))
"""


def _two_processes(tmp_path, mode, corpus="", tok="", timeout=240):
    """Runs SCRIPT on two processes × 4 CPU devices; returns (summaries, outputs). A process
    still running at `timeout` (one waiting in a collective the other left) fails the test."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    port, workdir = mp.free_port(), tmp_path / "run"
    outs = mp.run_processes(lambda i: [script, port, i, workdir, mode, corpus, tok],
                            timeout=timeout)  # fmt: skip
    summaries = []
    for out in outs:
        line = [x for x in out.splitlines() if x.startswith("SUMMARY ")][-1]
        summaries.append(json.loads(line[len("SUMMARY ") :]))
    return summaries, outs


def test_sigterm_on_one_process_stops_both_at_the_same_step(tmp_path):
    summaries, outs = _two_processes(tmp_path, "sigterm")
    step = summaries[0]["step"]
    assert summaries == [{"step": step, "preempted": True, "data_exhausted": False}] * 2
    # Process 1 saw SIGTERM drawing the batch of step 6; both stop at a sync step after it
    # (at most log_every = 4 steps later), long before total_steps = 40.
    assert 6 <= step <= 10, step
    assert Checkpointer(tmp_path / "run").all_steps() == [step]
    assert all("SIGTERM on process(es) [1]" in out for out in outs)
    (event,) = [e for e in read_events(str(tmp_path / "run")) if e["event"] == "preempted"]
    assert event["step"] == step
    # Resumed, a SIGTERM on process 0 while restoring (jax.distributed.initialize's own SIGTERM
    # handler used to swallow it: the run trained on to total_steps) stops both at once.
    summaries, outs = _two_processes(tmp_path, "sigterm_at_startup")
    assert summaries == [{"step": step, "preempted": True, "data_exhausted": False}] * 2
    assert all("SIGTERM on process(es) [0]" in out for out in outs)
    assert Checkpointer(tmp_path / "run").all_steps() == [step]


WORDS = "the river runs past old mill into green valley where farmers grow wheat".split()


@pytest.fixture(scope="module")
def uneven_corpus(tmp_path_factory):
    """Even documents long, odd ones short: with data.shuffle=False process 0 (even) packs about
    twice the batches process 1 (odd) does (13 and 7; one process alone, 10). Few batches: on two
    processes each step waits on cross-process collectives."""
    root = tmp_path_factory.mktemp("uneven")
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, 30 if i % 2 == 0 else 12)) + f" {i}." for i in range(720)]
    path = root / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = str(root / "tok.model")
    T.train(docs, 400, model_path=tok)
    return str(path), tok


def _batches_per_process(corpus, tok, process_count):
    from flaxlm.configs import pretrain as pretrain_config
    from flaxlm.data import pipeline

    c = pretrain_config.get_config("variant=tiny,runlocal=True,data=text")
    d = c.data
    d.sources, d.tokenizer, d.num_epochs, d.shuffle, d.read_threads = corpus, tok, 1, False, 1
    return [
        sum(1 for _ in pipeline.make_pretrain_iterator(
            d, seq_len=c.seq_len, global_batch=c.batch_size, seed=c.seed,
            process_index=p, process_count=process_count))
        for p in range(process_count)
    ]  # fmt: skip


def test_uneven_finite_data_stops_both_processes_at_the_fewest_batches(tmp_path, uneven_corpus):
    counts = _batches_per_process(*uneven_corpus, 2)
    assert counts[1] < counts[0] - 3 and counts[1] % 3 and counts[1] % 5  # inside a window
    summaries, outs = _two_processes(tmp_path, "data", *uneven_corpus)
    assert summaries == [{"step": counts[1], "preempted": False, "data_exhausted": True}] * 2
    run = tmp_path / "run"
    assert Checkpointer(run).all_steps()[-1] == counts[1]  # saved where the data ended
    assert all("the batch source of process(es) [1] ends after" in out for out in outs)
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps[-1] == counts[1] and len(steps) == len(set(steps))  # the last steps logged
    (event,) = [e for e in read_events(str(run)) if e["event"] == "data_end"]
    assert event["step"] == counts[1] and event["batches_left"][1] < event["batches_left"][0]


def test_one_process_stops_with_a_checkpoint_when_the_data_ends(
    tmp_path, uneven_corpus, monkeypatch
):
    from jax.experimental import multihost_utils

    from flaxlm.configs import pretrain as pretrain_config
    from flaxlm.configs.common import override
    from flaxlm.train import pretrain

    def no_collective(*a, **k):
        raise AssertionError("one process needs no agreement (no host sync added)")

    monkeypatch.setattr(multihost_utils, "process_allgather", no_collective)

    corpus, tok = uneven_corpus
    (n,) = _batches_per_process(corpus, tok, 1)
    c = override(pretrain_config.get_config("variant=tiny,runlocal=True,data=text"),
                 {"progress_bar": False, "eval_at_start": False, "eval_every": 0,
                  "async_ckpt": False, "total_steps": n + 50, "log_every": 4, "ckpt_every": 0,
                  "model.vocab_size": 512, "data.sources": corpus, "data.tokenizer": tok,
                  "data.num_epochs": 1, "data.shuffle": False, "data.read_threads": 1})  # fmt: skip
    state, summary = pretrain.run(c, str(tmp_path))
    assert summary["data_exhausted"] and summary["step"] == int(state.step) == n
    assert Checkpointer(tmp_path).all_steps() == [n]
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r][-1] == n
    assert [e["event"] for e in read_events(str(tmp_path))] == ["data_end"]


def test_sync_interval_follows_the_step_time():
    assert next_interval(0.0, 10) == 1  # unknown: the first steps compile
    assert next_interval(0.01, 10) == 10  # fast steps: only the log steps
    assert next_interval(1.0, 10) == 5  # about SYNC_SECONDS apart
    assert next_interval(30.0, 10) == 1


def test_a_sync_step_asks_for_the_batches_up_to_the_next_one_and_no_further(monkeypatch):
    """StopSync with two processes (the allgather replaced: process 1 reports what this one
    does, at `other_ms` per step): the batches asked for are those of the steps up to the next
    sync step, never past total_steps; having them all is no end of the data; the next sync
    step is that step, not the one after; the interval follows the slowest process's step
    time, up to log_every (100 when 0)."""
    import jax
    from jax.experimental import multihost_utils

    from flaxlm.train import stopping
    from flaxlm.train.stopping import Preemption, StopSync

    other_ms = [0]
    clock = type("Clock", (), {"perf_counter": staticmethod(lambda: 0.0)})
    monkeypatch.setattr(stopping, "time", clock)  # this process's own step time: 0

    def allgather(x):
        return np.stack([x, np.asarray([x[0], x[1], other_ms[0]], x.dtype)])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)

    class Source:
        finite, left, asked = True, 2, []

        def prefetch(self, n):
            self.asked.append(n)
            return min(n, self.left)

    sync = StopSync(Source(), log_every=4, total=10)
    sync._interval = 4  # (as after a sync that measured the step time)
    sync.agree(8, Preemption())
    assert Source.asked == [2] and sync.data_end is None  # steps 8 and 9, then the end
    sync._interval = 4
    sync.agree(4, Preemption())
    assert Source.asked[-1] == 4 and sync.data_end == 6  # two of the four: stop after step 6
    assert not sync.due(7) and sync.due(8)
    Source.left, other_ms[0] = 10**6, 2000  # process 1 takes 2 s a step: every 2 steps
    sync = StopSync(Source(), log_every=4, total=100)
    for step in (0, 1, 2):
        sync.agree(step, Preemption())
    assert not sync.due(3) and sync.due(4)
    other_ms[0] = 1  # fast steps and log_every=0: every 100 steps
    sync = StopSync(Source(), log_every=0, total=1000)
    for step in (0, 1):
        sync.agree(step, Preemption())
    assert not sync.due(99) and sync.due(100)
