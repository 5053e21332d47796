"""metrics.jsonl holds one line per logged step of the run as it finally went: the lines of steps
a guard rollback or a resume trains again move to metrics.superseded.jsonl (tagged with the
event and why; nothing logged is lost) and events.jsonl records each event. The move is one
atomic replace: a kill in the middle of it leaves the old files or the new ones."""

import json
import os

import numpy as np
import pytest

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.configs.common import override
from flaxlm.data.markov import MarkovStream
from flaxlm.models.sharding import make_mesh
from flaxlm.train import loop, metrics, pretrain


def _config(**overrides):
    c = pretrain_config.get_config("variant=tiny,runlocal=True,data=markov")
    return override(c, {"progress_bar": False, "eval_at_start": False, "eval_every": 0,
                        "async_ckpt": False, **overrides})  # fmt: skip


class _Stream(MarkovStream):
    """NaN loss masks on batches `bad`; drawing batch `fail_at` raises (a crashed trainer)."""

    bad, fail_at = range(0), -1

    def __next__(self):
        i = self.index
        if i == self.fail_at:
            raise RuntimeError("node lost")
        out = super().__next__()
        if i in self.bad:
            out["loss_mask"] = out["loss_mask"] * np.nan
        return out


def _run(c, workdir, **stream_attrs):
    mesh = make_mesh({"data": -1})
    task = pretrain.build_task(c, mesh)
    task.train_batches = _Stream(256, c.seq_len, c.batch_size, chain_seed=c.seed)
    for k, v in stream_attrs.items():
        setattr(task.train_batches, k, v)
    return loop.run(c, str(workdir), task, mesh=mesh)


def _lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _files(workdir):
    return [_lines(os.path.join(workdir, name)) for name in
            ("metrics.jsonl", "metrics.superseded.jsonl", "events.jsonl")]  # fmt: skip


def _untagged(recs):
    return [{k: v for k, v in r.items() if k != "superseded"} for r in recs]


def test_rollback_moves_the_lines_of_the_redone_steps_aside(tmp_path, monkeypatch):
    written = []  # every line the trainer logged, in order
    write = metrics.MetricWriter.write

    def logging_write(self, step, m):
        written.append(step)
        write(self, step, m)

    monkeypatch.setattr(metrics.MetricWriter, "write", logging_write)
    c = _config(total_steps=24, ckpt_every=10, log_every=2, eval_every=10,
                **{"guard.max_bad_in_row": 3, "data.eval_batches": 1})  # fmt: skip
    _, summary = _run(c, tmp_path, bad=range(12, 16))
    assert summary["rollbacks"] >= 1
    final, superseded, events = _files(tmp_path)
    # One line per log step, in order: the redone steps 12..(rollback step) appear once; the
    # eval at checkpoint 10 is not repeated after rolling back to it.
    assert [r["step"] for r in final if "loss" in r] == list(range(2, 25, 2))
    assert [r["step"] for r in final if "eval/nll" in r] == [10, 20, 24]
    assert len(written) > len(final)
    # Nothing lost: the lines rolled back over are in the superseded file, tagged.
    assert sorted(written) == sorted(r["step"] for r in final + superseded)
    assert superseded and all(r["superseded"]["event"] == "rollback" for r in superseded)
    assert all(r["step"] > 10 for r in superseded)
    assert "rolled back to checkpoint 10" in superseded[0]["superseded"]["reason"]
    assert any(r["loss"] == "nan" for r in superseded)  # the bad streak the rollback undid
    rollbacks = [e for e in events if e["event"] == "rollback"]
    assert len(rollbacks) == summary["rollbacks"]
    assert all(e["to_step"] == 10 and e["at_step"] > 10 for e in rollbacks)
    assert sum(e["superseded_lines"] for e in rollbacks) == len(superseded)
    assert metrics.read_superseded(str(tmp_path)) == superseded
    assert metrics.read_events(str(tmp_path)) == events


def test_resume_moves_the_interrupted_runs_lines_aside(tmp_path):
    c = _config(total_steps=20, ckpt_every=10, log_every=1)
    with pytest.raises(RuntimeError, match="node lost"):
        _run(c, tmp_path, fail_at=15)  # logged steps 1..15, checkpoint 10
    before = _files(tmp_path)[0]
    assert [r["step"] for r in before] == list(range(1, 16))
    _, summary = _run(c, tmp_path)  # resumes from 10
    assert summary["step"] == 20
    final, superseded, events = _files(tmp_path)
    assert [r["step"] for r in final] == list(range(1, 21))
    assert [r["step"] for r in superseded] == list(range(11, 16))
    assert _untagged(superseded) == before[10:]  # the interrupted run's lines, unchanged
    assert all(r["superseded"]["event"] == "resume" for r in superseded)
    assert final[:10] == before[:10]
    # Bitwise resume: the redone steps log the losses the interrupted run had.
    assert [r["loss"] for r in final[10:15]] == [r["loss"] for r in superseded]
    (resume,) = events
    assert resume["event"] == "resume" and resume["to_step"] == 10
    assert resume["last_logged_step"] == 15 and resume["superseded_lines"] == 5


def test_a_resume_from_a_checkpoint_between_log_steps_leaves_no_step_out(tmp_path):
    """Every checkpoint ends on a logged line (`cut_at_checkpoint`). Resumed from checkpoint 12
    of a log_every=5 run, steps 11 and 12 used to be in no line of metrics.jsonl, and the first
    line after the resume (15) averaged 3 steps where the uninterrupted run's averaged 5. Now
    the resumed run's file is the uninterrupted run's, line for line."""
    c = _config(total_steps=20, ckpt_every=3, log_every=5)
    _run(c, tmp_path / "ref")
    with pytest.raises(RuntimeError, match="node lost"):
        _run(c, tmp_path / "run", fail_at=14)  # 14 steps done, checkpoint 12
    _run(c, tmp_path / "run")
    ref, final = _files(tmp_path / "ref")[0], _files(tmp_path / "run")[0]
    assert [r["step"] for r in final] == [3, 5, 6, 9, 10, 12, 15, 18, 20]
    assert [r["step"] for r in final if r.get("cut_at_checkpoint")] == [3, 6, 9, 12, 18]
    assert [r["step"] for r in ref] == [r["step"] for r in final]
    assert [r["loss"] for r in ref] == [r["loss"] for r in final]  # (a bitwise resume)
    (resume,) = _files(tmp_path / "run")[2]
    assert resume["to_step"] == 12 and resume["last_logged_step"] == 12


def test_a_rollback_to_a_checkpoint_between_log_steps_leaves_no_step_out(tmp_path):
    """The rollback path: a checkpoint (10) saved inside a NaN streak, between log steps,
    ends on a cut line; the rollback at log step 12 moves only line 12 aside, and the steps
    trained again after it are in the lines that follow, each step of the run in one line."""
    c = _config(total_steps=20, ckpt_every=5, log_every=4, **{"guard.max_bad_in_row": 3})
    _, summary = _run(c, tmp_path, bad=range(6, 12))  # steps 7..12 are bad
    assert summary["rollbacks"] == 1
    final, superseded, events = _files(tmp_path)
    assert [r["step"] for r in final] == [4, 5, 8, 10, 12, 15, 16, 20]
    assert [r["step"] for r in final if r.get("cut_at_checkpoint")] == [5, 10, 15]
    assert final[3]["skipped"] == 2 and final[4]["skipped"] == 0  # 9, 10 bad; 11, 12 redone
    assert [r["step"] for r in superseded] == [12] and superseded[0]["skipped"] == 2
    assert [(e["event"], e["to_step"]) for e in events] == [("rollback", 10)]


def test_restart_without_a_checkpoint_moves_every_line_aside(tmp_path):
    c = _config(total_steps=4, ckpt_every=0, log_every=1)
    with pytest.raises(RuntimeError, match="node lost"):
        _run(c, tmp_path, fail_at=3)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a line cut short by the kill
    _run(c, tmp_path)
    final, superseded, events = _files(tmp_path)
    assert [r["step"] for r in final] == [1, 2, 3, 4]
    assert [r.get("step") for r in superseded] == [1, 2, 3, None]
    assert superseded[-1]["unparsed"] == '{"step": 4, "lo'
    assert [e["event"] for e in events] == ["restart"] and events[0]["superseded_lines"] == 4


def _write_lines(path, steps):
    with open(path, "w") as f:
        f.writelines(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in steps)


@pytest.mark.parametrize("fail_on", [1, 2])
def test_a_kill_inside_the_move_leaves_old_or_new_files(tmp_path, monkeypatch, fail_on):
    """fail_on=1: killed before the commit point — the old files stay and the next start
    moves the lines; 2: killed after it — the next start completes the move. Either way each
    line ends up in exactly one file."""
    _write_lines(tmp_path / "metrics.jsonl", range(1, 9))
    calls, real = [], os.replace

    def dying_replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_on:
            raise KeyboardInterrupt("killed")
        real(src, dst)

    monkeypatch.setattr(metrics.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        metrics.MetricWriter(str(tmp_path), resume_step=5, tensorboard=False)
    monkeypatch.setattr(metrics.os, "replace", real)
    metrics.MetricWriter(str(tmp_path), resume_step=5, tensorboard=False)
    final, superseded, events = _files(tmp_path)
    assert [r["step"] for r in final] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in superseded] == [6, 7, 8]
    # Killed after the commit point, the first start's event stands; the next start is a
    # resume of its own (that moves nothing).
    assert [e["event"] for e in events] == ["resume"] * fail_on
    assert sum(e["superseded_lines"] for e in events) == 3
    assert sorted(os.listdir(tmp_path)) == ["events.jsonl", "metrics.jsonl",
                                            "metrics.superseded.jsonl"]  # fmt: skip


def _tensorboard_scalars(tb_dir) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in a directory of TFRecord event files."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out = []
    for name in sorted(os.listdir(tb_dir)):
        data = open(os.path.join(tb_dir, name), "rb").read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4  # length, its crc, the record, its crc
            out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    return out


def test_a_nan_or_inf_metric_reaches_tensorboard(tmp_path):
    """metrics.jsonl writes a NaN as "nan" (JSON has none); TensorBoard was given that string,
    skipped it, and showed a diverged loss as a gap in the curve."""
    w = metrics.MetricWriter(str(tmp_path))
    w.write(1, {"loss": 2.5, "grad_norm": np.float32(1.0)})
    w.write(2, {"loss": float("nan"), "grad_norm": np.float32("inf")})
    w.close()
    got = {(s, t): v for s, t, v in _tensorboard_scalars(tmp_path / "tb")}
    assert got[(1, "loss")] == 2.5 and got[(1, "grad_norm")] == 1.0
    assert np.isnan(got[(2, "loss")]) and got[(2, "grad_norm")] == float("inf")
    assert metrics.read_metrics(str(tmp_path))[1] == {"step": 2, "loss": "nan", "grad_norm": "inf"}
