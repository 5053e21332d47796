"""`max_runtime_minutes` (a cluster job's time limit): once the process has run that long the
loop stops as on SIGTERM, with a checkpoint at the batch source's boundary, and a resubmitted
job resumes there bit for bit. With several processes the first past the limit stops them all
at the same step (train/stopping.py)."""

import time

import jax
import numpy as np
import pytest

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.configs.common import override
from flaxlm.data.markov import MarkovStream
from flaxlm.models.sharding import make_mesh
from flaxlm.train import loop, pretrain, stopping
from flaxlm.train.checkpoint import Checkpointer
from flaxlm.train.metrics import read_events, read_metrics


class _Rollouts(MarkovStream):
    """Three batches per "rollout" (as PPO/GRPO buffer one): a checkpoint only every third."""

    def at_boundary(self):
        return self.index % 3 == 0


def _run(workdir, minutes, clock, monkeypatch):
    """A 9-step run whose process clock is `clock(stream)` minutes."""
    c = pretrain_config.get_config("variant=tiny,runlocal=True,data=markov")
    c = override(c, {"progress_bar": False, "eval_at_start": False, "total_steps": 9,
                     "ckpt_every": 0, "log_every": 1, "eval_every": 0, "async_ckpt": False,
                     "max_runtime_minutes": minutes})  # fmt: skip
    mesh = make_mesh({"data": -1})
    task = pretrain.build_task(c, mesh)
    stream = task.train_batches = _Rollouts(256, c.seq_len, c.batch_size, chain_seed=c.seed)
    monkeypatch.setattr(stopping, "runtime_s", lambda: 60.0 * clock(stream))
    return loop.run(c, str(workdir), task, mesh=mesh)[1]


def test_the_time_limit_stops_at_the_boundary_with_a_checkpoint_and_resumes_bitwise(
    tmp_path, monkeypatch, caplog
):
    # One minute a batch: past 3.5 min at step 4, inside a rollout: stops at its end, step 6.
    summary = _run(tmp_path / "limited", 3.5, lambda s: s.index, monkeypatch)
    assert summary["step"] == 6 and summary["preempted"], summary
    assert summary["stop_reason"] == "max_runtime_minutes"
    assert Checkpointer(tmp_path / "limited").all_steps() == [6]
    last = read_events(str(tmp_path / "limited"))[-1]
    assert last["event"] == "preempted" and last["stopped_by"] == "max_runtime_minutes"
    assert last["step"] == 6 and last["reason"].startswith("max_runtime_minutes=3.5 reached")
    # Resubmitted (another limit: a job's own, not a changed run, so no warning): a new process
    # (its clock from 0) resumes at 6 and ends.
    with caplog.at_level("WARNING", logger="flaxlm"):
        summary = _run(tmp_path / "limited", 4.0, lambda s: s.index - 6, monkeypatch)
    assert not [r for r in caplog.records if "changed config key" in r.getMessage()]
    assert summary["step"] == 9 and not summary["preempted"] and summary["stop_reason"] is None
    # The same losses as a run without a limit: bit for bit.
    assert _run(tmp_path / "straight", 0.0, lambda s: 1e9, monkeypatch)["step"] == 9
    a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight") if "loss" in r}
    b = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "limited") if "loss" in r}
    assert sorted(a) == sorted(b) == list(range(1, 10)) and a == b


def test_the_clock_counts_from_the_process_start():
    psutil = pytest.importorskip("psutil")
    age = time.time() - psutil.Process().create_time()
    assert abs(stopping.runtime_s() - age) < 2.0, (stopping.runtime_s(), age)
    assert stopping.Preemption(0.0).reason() is None  # 0: no limit
    assert stopping.Preemption(age / 60 + 60).reason() is None
    late = stopping.Preemption(1e-6)
    assert late.reason() == "max_runtime_minutes" and late.reason() == "max_runtime_minutes"
    assert "max_runtime_minutes=1e-06 reached" in late.describe(late.reason())


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), True, "30"])
def test_a_limit_that_is_no_number_of_minutes_is_named(value):
    with pytest.raises(ValueError, match=r"config: max_runtime_minutes=.* must be a number >= 0"):
        stopping.check_max_runtime(value)


def test_the_loop_checks_the_limit_before_anything_is_built():
    c = pretrain_config.get_config("variant=tiny,runlocal=True,data=markov")
    with pytest.raises(ValueError, match=r"config: max_runtime_minutes=-1\.0 must be"):
        loop.check_cadence(override(c, {"max_runtime_minutes": -1.0}))


def test_every_trainer_config_has_the_key_off_by_default():
    from flaxlm.configs import dpo, ppo, sft

    for module in (pretrain_config, sft, dpo, ppo):
        assert module.get_config("variant=tiny,runlocal=True").max_runtime_minutes == 0.0


@pytest.mark.parametrize(
    "flags,agreed",
    [
        ([0, 2], "max_runtime_minutes"),  # only process 1 is past the limit: both stop
        ([2, 1], "SIGTERM"),  # both: SIGTERM is named
        ([0, 0], None),
    ],
)
def test_processes_agree_on_the_limit_that_one_of_them_passed(monkeypatch, flags, agreed):
    """The agreement's all-gather, as two processes would see it (this one has no reason)."""
    from jax.experimental import multihost_utils

    sync = stopping.StopSync(iter(()), log_every=4, total=100)
    sync.multi = True
    rows = np.asarray([[f, 4, 10] for f in flags], np.int32)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda mine: rows)
    mine = stopping.Preemption(0.0)
    assert sync.stop_reason(mine) is None
    sync.agree(0, mine)
    assert sync.stop_reason(mine) == agreed
