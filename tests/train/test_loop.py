"""The one training loop: learning, exact resume after SIGKILL, SIGTERM, rollback, init_from."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.configs.common import override
from flaxlm.data.markov import MarkovStream
from flaxlm.models.sharding import make_mesh
from flaxlm.train import loop, pretrain
from flaxlm.train.checkpoint import Checkpointer, read_meta
from flaxlm.train.metrics import read_metrics
from flaxlm.train.optim import make_optimizer
from flaxlm.train.state import abstract_state, state_shardings

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(**overrides):
    c = pretrain_config.get_config("variant=tiny,runlocal=True,data=markov")
    return override(c, {"progress_bar": False, "eval_at_start": False, **overrides})


def _main(workdir, *overrides, env=None, **popen):
    cmd = [
        sys.executable,
        "-m",
        "flaxlm.train.main",
        "--config",
        os.path.join(REPO, "configs/pretrain.py") + ":variant=tiny,runlocal=True,data=markov",
        "--workdir",
        str(workdir),
        "--config.progress_bar=False",
    ]
    cmd += [f"--config.{o}" for o in overrides]
    full_env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        **(env or {}),
    }
    return subprocess.Popen(
        cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def test_tiny_model_learns_the_markov_chain(tmp_path):
    # 100 steps reach a held-out nll of 1.35 nats: far under the bound of 2.25 (unigram entropy
    # − 3), above the floor of 1.04 (150 steps reached 1.19).
    c = _config(total_steps=100, eval_every=100, ckpt_every=0, **{"opt.lr": 3e-3})
    _, summary = pretrain.run(c, str(tmp_path))
    chain = MarkovStream(256, 8, 1, branching=c.data.markov_branching, chain_seed=c.seed)
    unigram, rate = chain.unigram_entropy(), chain.entropy_rate()
    nll = summary["eval"]["eval/nll"]
    # A context-free model cannot beat the unigram entropy; the chain's entropy rate is the floor.
    assert nll < unigram - 3.0, (nll, unigram, rate)
    assert nll > rate - 0.05
    recs = read_metrics(tmp_path)
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert key in recs[0], key
    assert os.path.isdir(tmp_path / "tb")


def test_resume_after_sigkill_reproduces_losses_bitwise(tmp_path):
    common = ["total_steps=20", "ckpt_every=10", "log_every=1", "eval_every=0", "async_ckpt=True"]
    # The uninterrupted run and the run to be killed are independent: they run at once.
    straight = _main(tmp_path / "straight", *common)
    killed = _main(tmp_path / "resumed", *common, env={loop.KILL_ENV: "15"})
    out = killed.communicate(timeout=300)[0]
    assert killed.returncode == -signal.SIGKILL, out
    out = straight.communicate(timeout=300)[0]
    assert straight.returncode == 0, out
    assert Checkpointer(tmp_path / "resumed").all_steps() == [10]
    resumed = _main(tmp_path / "resumed", *common)
    out = resumed.stdout.read()
    assert resumed.wait(timeout=300) == 0, out
    # The run's own lines are not buried under orbax's INFO logs of each save.
    assert "resumed from" in out and "checkpoint_manager.py" not in out, out
    a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight") if "loss" in r}
    b = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "resumed") if "loss" in r}
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert a == b  # bitwise: the same floats, not merely close


def test_sigterm_saves_a_restorable_checkpoint(tmp_path):
    proc = _main(tmp_path, "total_steps=100000", "ckpt_every=0", "log_every=1", "eval_every=0")
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    step, meta = read_meta(str(tmp_path))
    assert step >= 3 and meta["task"] == "pretrain"
    c = _config()
    mesh = make_mesh({"data": -1})
    task = pretrain.build_task(c, mesh)
    tx, _ = make_optimizer(c.opt, c.total_steps)
    from flaxlm.models.sharding import logical_axis_rules

    shardings = state_shardings(task.init_params, tx, mesh, logical_axis_rules(c.sharding))
    state, data_state, _ = Checkpointer(tmp_path).restore(
        step, abstract_state(task.init_params, tx, shardings)
    )
    assert int(state.step) == step and data_state["index"] == step


class _PoisonedStream(MarkovStream):
    """Batches [bad_from, bad_to) have NaN loss masks."""

    bad = range(0)
    limit = None  # batches a test expects the run to stay under (a run that never stops fails)

    def __next__(self):
        i = self.index
        if self.limit is not None and i >= self.limit:
            raise AssertionError(f"the run read batch {i}: it should have stopped before")
        out = super().__next__()
        if i in self.bad:
            out["loss_mask"] = out["loss_mask"] * np.nan
        return out


def test_bad_steps_in_a_row_roll_back_and_skip_the_batches(tmp_path):
    c = _config(
        total_steps=30,
        ckpt_every=10,
        log_every=1,
        eval_every=0,
        async_ckpt=False,
        **{"guard.max_bad_in_row": 3},
    )
    mesh = make_mesh({"data": -1})
    task = pretrain.build_task(c, mesh)
    stream = _PoisonedStream(256, c.seq_len, c.batch_size, chain_seed=c.seed)
    stream.bad = range(12, 20)
    task.train_batches = stream
    state, summary = loop.run(c, str(tmp_path), task, mesh=mesh)
    assert summary["rollbacks"] >= 2
    assert int(state.step) == 30 and stream.index > 30  # the bad batches were skipped
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))


def test_bad_steps_without_a_checkpoint_stop_saying_what_was_non_finite(tmp_path):
    """No checkpoint to roll back to: the error names the skipped steps' loss and gradient norm
    and which was non-finite (the bare count was all a failed GPU benchmark recorded)."""
    c = _config(total_steps=12, ckpt_every=0, log_every=4, eval_every=0,
                **{"guard.max_bad_in_row": 3})  # fmt: skip
    mesh = make_mesh({"data": -1})
    task = pretrain.build_task(c, mesh)
    stream = _PoisonedStream(256, c.seq_len, c.batch_size, chain_seed=c.seed)
    stream.bad = range(0, 10**9)
    task.train_batches = stream
    with pytest.raises(RuntimeError, match=r"step 4: 4 bad steps in a row .*\(the skipped steps' "
                       r"mean loss nan, grad_norm nan: a NaN/Inf in the forward or backward "
                       r"pass\) and no checkpoint to roll back to"):  # fmt: skip
        loop.run(c, str(tmp_path), task, mesh=mesh)


def test_the_detail_says_when_loss_and_gradient_were_finite():
    from flaxlm.train.loop_guard import bad_steps_detail
    from flaxlm.train.loop_logging import _summarise

    assert "both finite: the updates were non-finite" in bad_steps_detail(
        {"skipped_loss": 2.5, "skipped_grad_norm": 1.0}
    )
    # A streak sharing its window with good steps: the skipped steps' NaN gradient norm, not
    # the accepted steps' mean (which said "both finite" of NaN gradients)
    good = {"loss": 2.0, "grad_norm": 1.0, "skipped": 0.0, "bad_in_row": 0.0}
    bad = {"loss": 2.1, "grad_norm": float("nan"), "skipped": 1.0, "bad_in_row": 1.0}
    rec = _summarise([good, good, bad, bad, bad])
    assert rec["grad_norm"] == 1.0 and np.isnan(rec["skipped_grad_norm"])
    assert "grad_norm nan: a NaN/Inf in the forward or backward pass" in bad_steps_detail(rec)
    assert bad_steps_detail({"lr": 1e-3}) == ""


def test_bad_steps_that_never_end_stop_after_max_rollbacks(tmp_path):
    """Every batch bad from 12 on: the run used to roll back to checkpoint 10 for ever (139
    times until killed), growing events.jsonl and metrics.superseded.jsonl. Now it stops with
    an error naming guard.max_rollbacks, the checkpoint left as it was."""
    c = _config(total_steps=30, ckpt_every=10, log_every=1, eval_every=0, async_ckpt=False,
                **{"guard.max_bad_in_row": 3, "guard.max_rollbacks": 2})  # fmt: skip
    mesh = make_mesh({"data": -1})
    task = pretrain.build_task(c, mesh)
    stream = _PoisonedStream(256, c.seq_len, c.batch_size, chain_seed=c.seed)
    stream.bad, stream.limit = range(12, 10**9), 100
    task.train_batches = stream
    want = r"at steps \[15, 13\].*loss nan.*a NaN/Inf in the forward.*guard\.max_rollbacks=2"
    with pytest.raises(RuntimeError, match=want):
        loop.run(c, str(tmp_path), task, mesh=mesh)
    # Rollbacks at 15 (batches 12..14), 13 and 13 again: the third is refused.
    assert stream.index == 21
    events = [json.loads(x) for x in open(tmp_path / "events.jsonl")]
    assert [e["event"] for e in events] == ["rollback", "rollback", "rollback_limit"]
    assert events[-1]["rollback_steps"] == [15, 13] and events[-1]["step"] == 13
    assert Checkpointer(tmp_path).all_steps() == [10]
    assert read_meta(str(tmp_path))[0] == 10  # readable: a rerun resumes there


def _run_poisoned_around_a_checkpoint(workdir, bad):
    """A 10-step run checkpointed at 5 and 10; batch i trains step i + 1."""
    c = pretrain_config.get_config("variant=tiny,runlocal=True,data=markov")
    c = override(c, {"progress_bar": False, "eval_at_start": False, "total_steps": 10,
                     "ckpt_every": 5, "log_every": 1, "eval_every": 0, "async_ckpt": False,
                     "guard.max_bad_in_row": 3, "guard.max_rollbacks": 2})  # fmt: skip
    mesh = make_mesh({"data": -1})
    task = pretrain.build_task(c, mesh)
    stream = _PoisonedStream(256, c.seq_len, c.batch_size, chain_seed=c.seed)
    stream.bad = bad
    task.train_batches = stream
    state, summary = loop.run(c, str(workdir), task, mesh=mesh)
    events = [json.loads(x) for x in open(workdir / "events.jsonl")]
    return state, summary, [e for e in events if e["event"] == "rollback"]


def test_the_same_bad_batches_finish_wherever_the_checkpoint_falls(tmp_path):
    """A rollback restores a checkpoint's state but starts the guard's streak of bad steps
    again: a checkpoint saved while a streak was open (the guard skips bad steps; the saves go
    on) used to bring its count back, so each rollback to it needed fewer new bad steps than
    `guard.max_bad_in_row`, and a short run of bad batches across a checkpoint stopped the run
    at `guard.max_rollbacks` with an error counting the old steps as new."""
    # Five bad batches each time. Before the checkpoint's step (3..7: steps 4 and 5 bad, so
    # checkpoint 5 holds a streak of 2): rolled back at 6, and every rollback to checkpoint 5
    # then needed only one more bad step: three in a row at step 6, an error. After it (5..9).
    for name, bad in (("open_streak_at_ckpt", range(3, 8)), ("after_ckpt", range(5, 10))):
        state, summary, rollbacks = _run_poisoned_around_a_checkpoint(tmp_path / name, bad)
        assert int(state.step) == 10 and summary["rollbacks"] == 1, name
        # Each rollback counts its own bad steps: max_bad_in_row of them since the checkpoint.
        assert [e["bad_in_row"] for e in rollbacks] == [3], (name, rollbacks)
        assert int(state.guard["bad_in_row"]) == 0


def test_cadence_keys_below_their_least_are_named():
    """log_every=0 used to turn off the metrics and the guard's rollbacks silently (and keep
    every step's metrics); negative eval_every / ckpt_every meant 0 silently."""
    for key, value in (
        ("log_every", 0),
        ("log_every", -1),
        ("eval_every", -1),
        ("ckpt_every", -5),
        ("guard.max_rollbacks", -1),
    ):
        with pytest.raises(ValueError, match=rf"{key}={value!r} must be an integer >= [01]"):
            loop.check_cadence(_config(**{key: value}))
    loop.check_cadence(_config(eval_every=0, ckpt_every=0, **{"guard.max_rollbacks": 0}))
    with pytest.raises(ValueError, match="log_every=0"):  # loop.run checks first
        pretrain.run(_config(log_every=0), "/nonexistent/never-created")


def test_keep_ckpts_below_zero_is_named_and_zero_keeps_every_checkpoint(tmp_path):
    """keep_ckpts=-1 used to fail in orbax's first save with a traceback naming no key."""
    with pytest.raises(ValueError, match=r"config: keep_ckpts=-1 must be an integer >= 0"):
        loop.check_cadence(_config(keep_ckpts=-1))
    with pytest.raises(ValueError, match="keep_ckpts=-1"):  # loop.run checks first
        pretrain.run(_config(keep_ckpts=-1), "/nonexistent/never-created")
    loop.check_cadence(_config(keep_ckpts=0))
    ckpt = Checkpointer(tmp_path, keep=0, async_save=False)  # what loop.run makes of it
    for step in range(1, 6):
        ckpt.save(step, {"x": np.full(2, step, np.float32)})
    ckpt.close()
    assert Checkpointer(tmp_path).all_steps() == [1, 2, 3, 4, 5]


def test_rollback_over_an_unreadable_latest_checkpoint_takes_the_one_before(tmp_path):
    """The rollback restores like a resume: an unreadable newest step is moved aside and the
    one before it restored, instead of the run crashing."""
    c = _config(total_steps=24, ckpt_every=5, log_every=1, eval_every=0, async_ckpt=False,
                **{"guard.max_bad_in_row": 3})  # fmt: skip
    mesh = make_mesh({"data": -1})
    task = pretrain.build_task(c, mesh)
    step10 = os.path.join(str(tmp_path), "checkpoints", "10")

    class Stream(_PoisonedStream):
        def __next__(self):  # at the first bad batch, checkpoint 10's metadata is lost
            if self.index == 12:
                open(os.path.join(step10, "state", "_METADATA"), "w").close()
            return super().__next__()

    stream = Stream(256, c.seq_len, c.batch_size, chain_seed=c.seed)
    stream.bad = range(12, 15)
    task.train_batches = stream
    state, summary = loop.run(c, str(tmp_path), task, mesh=mesh)
    assert summary["rollbacks"] == 1 and int(state.step) == 24
    moved = os.listdir(os.path.join(str(tmp_path), "checkpoints_corrupt"))
    assert len(moved) == 1 and moved[0].startswith("10-")


class _RolloutLike(MarkovStream):
    """A batch source that buffers 3 batches at a time (as PPO/GRPO buffer a rollout's
    minibatches): only every third step is a boundary a checkpoint may be taken at."""

    sigterm_at = -1

    def at_boundary(self):
        return self.index % 3 == 0

    def __next__(self):
        if self.index == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__next__()


def test_saves_wait_for_the_batch_sources_boundary(tmp_path):
    c = _config(total_steps=11, ckpt_every=2, log_every=1, eval_every=0, async_ckpt=False)
    mesh = make_mesh({"data": -1})
    task = pretrain.build_task(c, mesh)
    task.train_batches = _RolloutLike(256, c.seq_len, c.batch_size, chain_seed=c.seed)
    task.train_batches.sigterm_at = 7  # inside the buffer of steps 6..8
    _, summary = loop.run(c, str(tmp_path), task, mesh=mesh)
    assert summary["preempted"] and summary["step"] == 9
    # Periodic saves due at 2, 4 and 6 waited for the boundaries at 3, 6; SIGTERM for 9.
    assert Checkpointer(tmp_path).all_steps() == [3, 6, 9]
    # Without SIGTERM the last step is saved wherever it falls (the run is complete).
    c2 = _config(total_steps=7, ckpt_every=4, eval_every=0, async_ckpt=False)
    task = pretrain.build_task(c2, mesh)
    task.train_batches = _RolloutLike(256, c2.seq_len, c2.batch_size, chain_seed=c2.seed)
    loop.run(c2, str(tmp_path / "b"), task, mesh=mesh)
    assert Checkpointer(tmp_path / "b").all_steps() == [6, 7]


class _SigtermPoisoned(_PoisonedStream):
    sigterm_at = -1

    def __next__(self):
        if self.index == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__next__()


EVAL_S = 2.0  # the fake evaluation's time: far longer than a tiny step


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory):
    """Metrics lines (no eval lines) of a run preempted while drawing batch 4 (so after step 5)
    with log_every=3, then resumed to step 8. Every batch is NaN and rollback is off, so a
    line's `skipped` counts the steps it averages; a fake eval sleeps EVAL_S at steps 4, 8."""
    workdir = str(tmp_path_factory.mktemp("preempted"))
    c = _config(total_steps=8, ckpt_every=0, log_every=3, eval_every=4, async_ckpt=False,
                **{"guard.max_bad_in_row": 0})  # fmt: skip
    mesh = make_mesh({"data": -1})
    summaries = []
    for sigterm_at in (4, -1):
        task = pretrain.build_task(c, mesh)
        task.eval_fn = lambda params: (time.sleep(EVAL_S), {"fake": 0.0})[1]
        stream = _SigtermPoisoned(256, c.seq_len, c.batch_size, chain_seed=c.seed)
        stream.bad, stream.sigterm_at = range(10**9), sigterm_at
        task.train_batches = stream
        summaries.append(loop.run(c, workdir, task, mesh=mesh)[1])
    assert summaries[0]["preempted"] and summaries[0]["step"] == 5
    assert summaries[1]["step"] == 8
    return [r for r in read_metrics(workdir) if "loss" in r]


def test_sigterm_logs_the_steps_since_the_last_line(preempted_run):
    """Steps 4 and 5 were never logged (the end of the data logged its window, SIGTERM threw
    it away); the resumed run's lines average the steps after the checkpoint only."""
    got = [(r["step"], r["skipped"], r["n_skipped"]) for r in preempted_run]
    assert got == [(3, 3, 3), (5, 2, 5), (6, 1, 6), (8, 2, 8)]


def test_tokens_per_s_leaves_out_startup_compilation_and_eval(preempted_run):
    """The first step of a run (and of its resume) compiles: it used to make step 1's
    step_time_s tens of seconds, as an eval made the step after it's. Now that time is
    logged once as first_step_s, and the rate is of training steps only."""
    by_step = {r["step"]: r for r in preempted_run}
    for step in (3, 5, 8):  # 3: step 1 left out; 5: the eval at 4 too; 8: a resumed window
        assert by_step[step]["step_time_s"] < EVAL_S / 2, by_step[step]
    for step in (3, 6):  # the first line of each start
        assert by_step[step]["first_step_s"] > 5 * by_step[8]["step_time_s"]
    assert "first_step_s" not in by_step[5] and "first_step_s" not in by_step[8]
    # Resumed with log_every=3 at step 6: its one step compiled, so no rate to log.
    assert by_step[6]["tokens_per_s"] is None and by_step[6]["step_time_s"] is None


def test_step_time_leaves_out_the_before_step_hook(tmp_path):
    """PPO/GRPO generate and score a rollout in `before_step` at their source's boundaries
    (logged as rollout/gen_s, rollout/score_s): that time used to be in step_time_s,
    tokens_per_s and mfu. A hook that sleeps HOOK_S at a boundary (every third step of the
    `_RolloutLike` source) leaves the rate of the steps as it is."""
    HOOK_S = 2.0
    c = _config(total_steps=7, ckpt_every=0, log_every=6, eval_every=0, async_ckpt=False)
    mesh = make_mesh({"data": -1})
    task = pretrain.build_task(c, mesh)
    task.train_batches = _RolloutLike(256, c.seq_len, c.batch_size, chain_seed=c.seed)
    slept = []

    def before_step(state):  # at the boundaries before steps 1, 4, 7
        if task.train_batches.at_boundary():
            slept.append(int(state.step))
            if state.step == 3:  # (the one inside a logged window of timed steps)
                time.sleep(HOOK_S)

    task.before_step = before_step
    loop.run(c, str(tmp_path), task, mesh=mesh)
    assert slept == [0, 3, 6]
    line = next(r for r in read_metrics(str(tmp_path)) if r["step"] == 6)
    # steps 2..6 (step 1 compiled: first_step_s), HOOK_S among them: it made them >= HOOK_S / 5
    assert line["step_time_s"] < HOOK_S / 10, line
    assert HOOK_S <= line["before_step_s"] < HOOK_S * 1.5  # the hook's time, logged apart


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """(workdir, final state) of a finished 3-step run checkpointed at its end; the tests that
    read it copy it before changing anything."""
    workdir = str(tmp_path_factory.mktemp("finished_run"))
    state, _ = pretrain.run(_config(total_steps=3, ckpt_every=3, eval_every=0), workdir)
    assert Checkpointer(workdir).all_steps() == [3]
    return workdir, state


def test_init_from_loads_another_runs_params(tmp_path, finished_run):
    source, first = finished_run
    # One step at lr 0 leaves the loaded params as they are (total_steps=0 is refused now).
    c2 = _config(total_steps=1, init_from=source, eval_every=0, ckpt_every=0,
                 **{"opt.lr": 0.0})  # fmt: skip
    second, _ = pretrain.run(c2, str(tmp_path / "b"))
    for x, y in zip(jax.tree.leaves(first.params), jax.tree.leaves(second.params)):
        np.testing.assert_array_equal(x, y)
    assert int(second.step) == 1  # a new run: fresh optimizer and step counter


def test_resume_with_a_changed_config_says_what_changed(tmp_path, finished_run, caplog):
    """A resume with other settings used to be silent, and one at or past total_steps looked
    like a finished training."""
    shutil.copytree(finished_run[0], tmp_path, dirs_exist_ok=True)
    c = _config(total_steps=2, ckpt_every=3, eval_every=0,
                **{"opt.lr": 1e-3, "data.markov_branching": 3})  # fmt: skip
    with caplog.at_level(logging.INFO, logger="flaxlm"):
        state, _ = pretrain.run(c, str(tmp_path))
    assert int(state.step) == 3
    text = caplog.text
    assert "total_steps changed from 3 to 2" in text
    assert "opt.lr: checkpoint 0.003, this run 0.001" in text
    assert "RESUME WITH A DIFFERENT DATA ORDER: data.markov_branching changed" in text
    assert "checkpoint 3 is at or past total_steps=2: nothing to train" in text
    events = {e["event"]: e for e in (json.loads(x) for x in open(tmp_path / "events.jsonl"))}
    changes = events["config_changed"]["changes"]
    assert set(changes) == {"data.markov_branching", "opt.lr", "total_steps"}
    assert changes["total_steps"] == {"checkpoint": 3, "run": 2}
    assert events["nothing_to_train"]["step"] == 3


def test_resume_with_the_same_data_paths_written_otherwise_is_no_change(tmp_path, monkeypatch,
                                                                       caplog):  # fmt: skip
    """The checkpoint's data paths relative (with a weight, a glob, "~", a builtin spec), this
    run's absolute or through a symlink: the same files, so no data-order warning and no
    recorded change; another path, weight or order still is one."""
    from flaxlm.train.loop_resume import _report_config_changes

    (tmp_path / "d").mkdir()
    os.symlink(tmp_path / "d", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    saved = _config(**{"data.sources": "d/tokens:0.7,d/*.jsonl:0.3",
                       "data.eval_sources": "d/heldout", "data.tokenizer": "~/d/tok.model",
                       "data.cache_dir": "builtin:x"}).to_dict()  # fmt: skip
    same = _config(**{"data.sources": f" {tmp_path}/d/tokens:0.7, {tmp_path}/link/*.jsonl:0.3",
                      "data.eval_sources": f"{tmp_path}/d/./heldout",
                      "data.tokenizer": f"{tmp_path}/d/tok.model",
                      "data.cache_dir": "builtin:x"})  # fmt: skip
    with caplog.at_level(logging.INFO, logger="flaxlm"):
        assert _report_config_changes(same, saved, 3) == {}
    assert "DIFFERENT DATA ORDER" not in caplog.text
    assert "data.sources spelled differently" in caplog.text
    for key, value in [
        ("data.sources", "d/tokens:0.7,d/*.jsonl:0.4"),
        ("data.sources", "d/*.jsonl:0.3,d/tokens:0.7"),
        ("data.eval_sources", "d/heldout2"),
        ("data.cache_dir", "builtin:y"),
    ]:
        other = _config(**{**{k: saved["data"][k.split(".")[1]] for k in (
            "data.sources", "data.eval_sources", "data.tokenizer", "data.cache_dir")},
            key: value})  # fmt: skip
        assert set(_report_config_changes(other, saved, 3)) == {key}, (key, value)


@pytest.mark.parametrize("opt", [{"opt.name": "lion"}, {"opt.clip_norm": 0.0}])
def test_resume_with_an_optimizer_whose_state_does_not_fit_names_the_opt_keys(
    tmp_path, finished_run, opt
):
    """Instead of orbax's dump of the two state trees (and a warning per step tried)."""
    from flaxlm.train.checkpoint import CheckpointError

    shutil.copytree(finished_run[0], tmp_path, dirs_exist_ok=True)
    c = _config(total_steps=6, ckpt_every=3, eval_every=0, **{"opt.b1": 0.8, **opt})
    (key,) = opt
    with pytest.raises(CheckpointError, match=rf"another optimizer(.|\n)*{key}: checkpoint"):
        pretrain.run(c, str(tmp_path))
    assert Checkpointer(tmp_path).all_steps() == [3]  # nothing moved
    assert not os.path.exists(tmp_path / "checkpoints_corrupt")


def test_corrupt_checkpoint_error_names_the_directory(tmp_path, finished_run):
    shutil.copytree(finished_run[0], tmp_path, dirs_exist_ok=True)
    step_dir = tmp_path / "checkpoints" / "3" / "state"
    for root, _, files in os.walk(step_dir):
        for f in files:
            if f.endswith(".zarray") or "manifest" in f or f == "_METADATA":
                with open(os.path.join(root, f), "w") as fh:
                    fh.write("{corrupt")
    c = _config(total_steps=6, ckpt_every=3, eval_every=0)
    with pytest.raises(Exception, match=str(tmp_path / "checkpoints" / "3")):
        pretrain.run(c, str(tmp_path))
    json.dumps({})  # keep json import used for debugging output


def test_load_model_reads_config_and_params_from_the_checkpoint(finished_run):
    from flaxlm.models.transformer import forward
    from flaxlm.train.checkpoint import load_model

    workdir, state = finished_run
    c = _config()
    cfg, params, meta = load_model(workdir)
    assert cfg.d_model == c.model.d_model and meta["task"] == "pretrain"
    tokens = np.zeros((1, 5), np.int32)
    np.testing.assert_allclose(
        forward(cfg, params, tokens), forward(cfg, jax.device_get(state.params), tokens), atol=1e-6
    )


def test_load_model_merges_lora_takes_ppo_policy_refuses_reward_model(tmp_path):
    """generate / HF export / evaluation read runs with load_model: a LoRA run (DPO/SFT with
    lora.rank) loads merged, a PPO run its policy, a reward-model run is refused by name."""
    from flaxlm.models import lora as lora_lib
    from flaxlm.models.config import get_variant
    from flaxlm.train.checkpoint import CheckpointError, load_model
    from flaxlm.train.pretrain import model_fns
    from flaxlm.train.state import unbox

    cfg = get_variant("tiny", vocab_size=64)
    abstract = unbox(jax.eval_shape(model_fns(cfg)[0], jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    base = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(s.dtype), abstract)
    spec = lora_lib.LoraSpec(rank=2)
    adapters = jax.tree.map(
        lambda s: np.full(s.shape, 0.05, s.dtype), lora_lib.abstract_adapters(abstract, spec)
    )
    meta = {"model_config": cfg.to_dict(), "lora": {}}
    runs = {
        "lora": ({"base": base, "lora": adapters}, {**meta, "head": "lm", "lora": spec.to_dict()}),
        "ppo": ({"policy": base, "value": {"w": np.ones(3, np.float32)}},
                {**meta, "head": "policy_value"}),
        "rm": ({"transformer": base}, {**meta, "head": "scalar"}),
    }  # fmt: skip
    for name, (params, m) in runs.items():
        ck = Checkpointer(str(tmp_path / name), async_save=False)
        ck.save(1, {"params": params}, {}, m)
        ck.close()
    merged = lora_lib.merge({"base": base, "lora": adapters}, spec)
    _, got, _ = load_model(str(tmp_path / "lora"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, merged)
    assert not np.allclose(got["layers_0"]["attn"]["q"]["kernel"],
                           base["layers_0"]["attn"]["q"]["kernel"])  # fmt: skip
    _, got, _ = load_model(str(tmp_path / "ppo"))
    jax.tree.map(np.testing.assert_array_equal, got, base)
    with pytest.raises(CheckpointError, match="reward-model run"):
        load_model(str(tmp_path / "rm"))


def test_only_the_writing_process_reports_progress_and_eval(tmp_path, monkeypatch, caplog,
                                                             capsys):  # fmt: skip
    """Every process of a multi-process job drew the tqdm bar and logged each eval line (a
    SLURM job's merged output got a copy per task). A process that does not write the metrics
    (process ≠ 0; simulated by its writer) now reports neither; process 0 reports both."""
    from flaxlm.train import metrics

    class Silent(metrics.MetricWriter):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.active = False

    c = _config(total_steps=2, eval_every=2, ckpt_every=0, log_every=1, progress_bar=True)
    for writer_cls, reports in ((Silent, False), (metrics.MetricWriter, True)):
        monkeypatch.setattr(loop, "MetricWriter", writer_cls)
        capsys.readouterr()
        with caplog.at_level(logging.INFO, logger="flaxlm"):
            caplog.clear()
            pretrain.run(c, str(tmp_path / writer_cls.__name__))
        bar = capsys.readouterr().err
        evals = [r for r in caplog.records if r.getMessage().startswith("step 2 eval")]
        assert ("2/2" in bar) == reports, bar
        assert bool(evals) == reports


def test_the_detail_shows_the_skipped_steps_values_not_the_windows():
    """With both in the logged line, the detail reads the skipped steps' loss and gradient
    norm, not the window's mean over its accepted steps."""
    from flaxlm.train.loop_guard import bad_steps_detail

    rec = {"loss": 2.0, "grad_norm": 1.0, "skipped_loss": float("nan"),
           "skipped_grad_norm": 3.5}  # fmt: skip
    detail = bad_steps_detail(rec)
    assert "mean loss nan, grad_norm 3.5:" in detail and "a NaN/Inf in the forward" in detail
