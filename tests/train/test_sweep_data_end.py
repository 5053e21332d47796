"""A sweep run whose finite data ends before total_steps: the loop evaluates where the data ended
(train/loop.py `_end_of_data`), so the sweep's run table has that run's held-out loss at the steps
it trained. A tiny model on the Markov data, its batch source cut short."""

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


@pytest.mark.parametrize("batches, evals", [(6, [4, 6]), (8, [4, 8])])
def test_the_end_of_the_data_is_evaluated_like_the_last_step(tmp_path, batches, evals):
    """The loop saved and stopped at the end of its data without the evaluation it makes at
    total_steps, so such a run had no held-out loss in the sweep's table. A data end on the
    eval cadence (8) was evaluated there already: not twice."""
    c = override(pretrain_config.get_config("variant=tiny,runlocal=True,data=markov"),
                 {"progress_bar": False, "eval_at_start": False, "total_steps": TOTAL,
                  "eval_every": EVAL_EVERY, "log_every": 3, "ckpt_every": 0,
                  "async_ckpt": False, "data.eval_batches": 1})  # fmt: skip
    mesh = make_mesh({"data": -1})
    task = pretrain.build_task(c, mesh)
    task.train_batches = _Ends(256, c.seq_len, c.batch_size, chain_seed=c.seed)
    task.train_batches.n = batches
    _, summary = loop.run(c, str(tmp_path), task, mesh=mesh)
    assert summary["data_exhausted"] and summary["step"] == batches
    assert [e["event"] for e in read_events(str(tmp_path))] == ["data_end"]
    assert [r["step"] for r in read_metrics(tmp_path) if "eval/nll" in r] == evals
    final = sweep_table.final_metrics(str(tmp_path), TOTAL)
    assert final["data_end"] and final["step"] == batches
    assert final["heldout_loss"] == pytest.approx(summary["eval"]["eval/nll"])
