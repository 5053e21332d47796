"""A sweep run whose finite data ends before total_steps: the loop evaluates where the data ended
(train/loop.py `_end_of_data`), so the sweep's run table has that run's held-out loss at the steps
it trained. A tiny model on the Markov data, its batch source cut short."""

import json
import logging

import pytest

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.configs.common import override
from flaxlm.data.markov import MarkovStream
from flaxlm.models.sharding import make_mesh
from flaxlm.train import loop, pretrain, sweep_table
from flaxlm.train.metrics import read_events, read_metrics

TOTAL, EVAL_EVERY = 20, 4


class _Ends(MarkovStream):
    """The Markov stream, ended (StopIteration) after `n` batches."""

    n = 0

    def __next__(self):
        if self.index >= self.n:
            raise StopIteration
        return super().__next__()


def _run(workdir, batches):
    """(summary) of a run on the Markov data ended after `batches` batches (or its rerun)."""
    c = override(pretrain_config.get_config("variant=tiny,runlocal=True,data=markov"),
                 {"progress_bar": False, "eval_at_start": False, "total_steps": TOTAL,
                  "eval_every": EVAL_EVERY, "log_every": 3, "ckpt_every": 0,
                  "async_ckpt": False, "data.eval_batches": 1})  # fmt: skip
    mesh = make_mesh({"data": -1})
    task = pretrain.build_task(c, mesh)
    task.train_batches = _Ends(256, c.seq_len, c.batch_size, chain_seed=c.seed)
    task.train_batches.n = batches
    return loop.run(c, str(workdir), task, mesh=mesh)[1]


@pytest.mark.parametrize("batches, evals", [(6, [4, 6]), (8, [4, 8])])
def test_the_end_of_the_data_is_evaluated_like_the_last_step(tmp_path, batches, evals):
    """The loop saved and stopped at the end of its data without the evaluation it makes at
    total_steps, so such a run had no held-out loss in the sweep's table. A data end on the
    eval cadence (8) was evaluated there already: not twice."""
    summary = _run(tmp_path, batches)
    assert summary["data_exhausted"] and summary["step"] == batches
    assert [e["event"] for e in read_events(str(tmp_path))] == ["data_end"]
    assert [r["step"] for r in read_metrics(tmp_path) if "eval/nll" in r] == evals
    final = sweep_table.final_metrics(str(tmp_path), TOTAL)
    assert final["data_end"] and final["step"] == batches
    assert final["heldout_loss"] == pytest.approx(summary["eval"]["eval/nll"])


def test_a_rerun_after_the_data_ended_logs_no_second_evaluation(tmp_path, caplog):
    """Rerunning a run whose data had ended (a SLURM sweep's job run again: its script marks a
    run DONE only at total_steps' checkpoint) resumed at that checkpoint, trained nothing, and
    appended another eval line at the same step every time. Now it says there is nothing to
    train, and metrics.jsonl is left as it was. Its data_end event is stated again, after the
    resume event: the sweep and its table read the last event (metrics.data_end_step). A run
    stopped at its last batch before its data-end evaluation was logged gets it on the rerun."""
    _run(tmp_path, 6)
    before = (tmp_path / "metrics.jsonl").read_text()
    with caplog.at_level(logging.WARNING, logger="flaxlm"):
        summary = _run(tmp_path, 6)
    assert summary["data_exhausted"] and summary["step"] == 6 and not summary["eval"]
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert "where the batch source had already ended: nothing to train" in caplog.text
    events = read_events(str(tmp_path))
    assert [e["event"] for e in events] == ["data_end", "resume", "data_end"]
    assert "nothing to train" in events[-1]["reason"] and events[-1]["step"] == 6
    final = sweep_table.final_metrics(str(tmp_path), TOTAL)
    assert final["data_end"] and final["step"] == 6 and "heldout_loss" in final
    # Stopped before the evaluation at the data end was logged: the rerun makes it, once.
    lines = before.splitlines(keepends=True)
    (tmp_path / "metrics.jsonl").write_text("".join(x for x in lines if "eval/nll" not in x
                                                    or json.loads(x)["step"] != 6))  # fmt: skip
    summary = _run(tmp_path, 6)
    assert [r["step"] for r in read_metrics(tmp_path) if "eval/nll" in r] == [4, 6]
    assert summary["eval"]["eval/nll"] == pytest.approx(final["heldout_loss"])


def test_the_final_loss_is_the_last_steps_not_the_lowest(tmp_path):
    """The tiny runs' losses only fall, so a table reading the minimum passed as the last."""
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step, loss in ((1, 3.0), (2, 2.0), (3, 2.5)):
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")
    final = sweep_table.final_metrics(str(tmp_path), 3)
    assert final["step"] == 3 and final["final_loss"] == 2.5
