"""A rollback restores a checkpoint's state but starts the guard's streak of bad steps again:
a checkpoint saved while a streak was open (the guard skips bad steps; the saves go on) used to
bring its count back, so each rollback to it needed fewer new bad steps than
`guard.max_bad_in_row`, and a short run of bad batches across a checkpoint stopped the run at
`guard.max_rollbacks` with an error counting the old steps as new."""

import json

import numpy as np

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.configs.common import override
from flaxlm.data.markov import MarkovStream
from flaxlm.models.sharding import make_mesh
from flaxlm.train import loop, pretrain


class _Poisoned(MarkovStream):
    bad = range(0)

    def __next__(self):
        i = self.index
        out = super().__next__()
        if i in self.bad:
            out["loss_mask"] = out["loss_mask"] * np.nan
        return out


def _run(workdir, bad):
    """A 10-step run checkpointed at 5 and 10; batch i trains step i + 1."""
    c = pretrain_config.get_config("variant=tiny,runlocal=True,data=markov")
    c = override(c, {"progress_bar": False, "eval_at_start": False, "total_steps": 10,
                     "ckpt_every": 5, "log_every": 1, "eval_every": 0, "async_ckpt": False,
                     "guard.max_bad_in_row": 3, "guard.max_rollbacks": 2})  # fmt: skip
    mesh = make_mesh({"data": -1})
    task = pretrain.build_task(c, mesh)
    stream = _Poisoned(256, c.seq_len, c.batch_size, chain_seed=c.seed)
    stream.bad = bad
    task.train_batches = stream
    state, summary = loop.run(c, str(workdir), task, mesh=mesh)
    events = [json.loads(x) for x in open(workdir / "events.jsonl")]
    return state, summary, [e for e in events if e["event"] == "rollback"]


def test_the_same_bad_batches_finish_wherever_the_checkpoint_falls(tmp_path):
    # Five bad batches each time. Before the checkpoint's step (3..7: steps 4 and 5 bad, so
    # checkpoint 5 holds a streak of 2): rolled back at 6, and every rollback to checkpoint 5
    # then needed only one more bad step: three in a row at step 6, an error. After it (5..9).
    for name, bad in (("open_streak_at_ckpt", range(3, 8)), ("after_ckpt", range(5, 10))):
        state, summary, rollbacks = _run(tmp_path / name, bad)
        assert int(state.step) == 10 and summary["rollbacks"] == 1, name
        # Each rollback counts its own bad steps: max_bad_in_row of them since the checkpoint.
        assert [e["bad_in_row"] for e in rollbacks] == [3], (name, rollbacks)
        assert int(state.guard["bad_in_row"]) == 0
