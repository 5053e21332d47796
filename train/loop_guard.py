"""Rollbacks: after `guard.max_bad_in_row` bad steps in a row (NaN/Inf or loss spikes, counted
by the step's guard, train/step.py) the loop restores the last checkpoint and keeps the data
iterator's place, so the offending batches are skipped (`_log_and_guard`, `_rollback`); the
restored streak starts at 0, so every rollback takes `guard.max_bad_in_row` new bad steps.
`guard.max_rollbacks` rollbacks in a row without progress stop the run (`_RollbackLimit`).
"""

from __future__ import annotations

import logging
import math

import jax

from flaxlm.train.loop_logging import _log_window
from flaxlm.train.state import abstract_state

log = logging.getLogger("flaxlm")


class _RollbackLimit:
    """`guard.max_rollbacks`: how many rollbacks in a row may get no further than the step that
    triggered the one before (bad batches that never end rolled back for ever, each time
    appending to events.jsonl and metrics.superseded.jsonl)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.steps: list[int] = []  # trigger steps of the rollbacks in a row without progress

    def check(self, step: int, bad_in_row: int, ckpt, writer, detail: str = "") -> None:
        """Before a rollback triggered at `step`: raises once the limit is exceeded."""
        if self.steps and step > self.steps[-1]:
            self.steps = []  # the run got past the last rollback's step: progress
        self.steps.append(step)
        if self.limit <= 0 or len(self.steps) <= self.limit:
            return
        before = self.steps[:-1]
        ckpt.wait()  # a save in flight lands first: the latest step named is the one on disk
        why = (
            f"step {step}: {bad_in_row} bad steps in a row (NaN/Inf or loss spikes) again, after "
            f"{len(before)} rollbacks in a row (at steps {before}) none of which got past step "
            f"{max(before)}{detail}: stopping instead of rolling back again "
            f"(guard.max_rollbacks={self.limit}; 0 = no limit). "
            f"The checkpoints are left as they are (latest: step {ckpt.latest_step()}); the "
            "batches after it keep failing: check the data there, or lower the learning rate."
        )
        writer.event("rollback_limit", why, step=step, rollback_steps=before)
        raise RuntimeError(why)


def _log_and_guard(config, window, meter, state, step, writer, summary, bar, limit, ckpt, task,
                   tx, shardings):  # fmt: skip
    """Logs the window, then rolls back to the last checkpoint when the guard's streak of bad
    steps is long enough. Returns (state, step, rolled back)."""
    rec = _log_window(window, meter, state, writer, summary, bar, step)
    # 0 turns rollback off (as 0 turns off the guard's other thresholds); without the first
    # test every log step would roll back (bad_in_row >= 0 always).
    max_bad = config.guard.max_bad_in_row
    if not (max_bad > 0 and rec["bad_in_row"] >= max_bad):
        return state, step, False
    detail = bad_steps_detail(rec)
    limit.check(step, int(rec["bad_in_row"]), ckpt, writer, detail)
    state, step = _rollback(ckpt, state, step, task, tx, shardings, summary, writer,
                            int(rec["bad_in_row"]), detail)  # fmt: skip
    bar.n = step
    meter.skip()  # the restore is no training time
    return state, step, True


def bad_steps_detail(rec: dict) -> str:
    """What the logged line says of the window's skipped steps, for the errors that stop a run:
    whether the loss or the gradient norm was non-finite, or neither (then the update was —
    the optimizer's state — or the loss a spike). The bare count left a user (and a GPU
    benchmark's record) nothing to look at."""
    # (the skipped steps' own: a window's accepted steps, averaged into loss and grad_norm,
    # said "both finite" of a streak of NaN gradients)
    loss = rec.get("skipped_loss", rec.get("loss"))
    grad = rec.get("skipped_grad_norm", rec.get("grad_norm"))
    if loss is None and grad is None:
        return ""
    shown = [f"{name} {float(v):.4g}" for name, v in (("loss", loss), ("grad_norm", grad))
             if v is not None]  # fmt: skip
    finite = all(math.isfinite(float(v)) for v in (loss, grad) if v is not None)
    why = ("both finite: the updates were non-finite (the optimizer's state) or the losses "
           "spikes" if finite else "a NaN/Inf in the forward or backward pass")  # fmt: skip
    return f" (the skipped steps' mean {', '.join(shown)}: {why})"


def _rollback(ckpt, state, step, task, tx, shardings, summary, writer, bad_in_row,
              detail: str = ""):  # fmt: skip
    """Restores the last readable checkpoint's model and optimizer (an unreadable newest step
    is handled as on resume, `ckpt.on_corrupt`); the data iterator keeps its place. The metrics
    lines after the checkpoint move to metrics.superseded.jsonl (the steps are trained again).

    The restored guard's streak (`bad_in_row`) starts at 0: a checkpoint saved while a streak
    was open (saves go on while the guard skips steps) used to bring its count back, so each
    rollback to it took only the rest of `max_bad_in_row` new bad steps, and three of them at
    the same step stopped the run claiming `max_bad_in_row` bad steps again. The rest of the
    guard is kept: its loss statistics and `n_skipped` (the lr schedule skips the skipped
    steps) are those of the steps the checkpoint holds, and the skipped steps changed neither
    the params nor the optimizer, so that checkpoint is the one before the streak, renumbered."""
    ckpt.wait()
    got = None
    if ckpt.latest_step() is not None:
        got = ckpt.restore_latest(abstract_state(task.init_params, tx, shardings))
    if got is None:
        raise RuntimeError(
            f"step {step}: {int(state.guard['bad_in_row'])} bad steps in a row (NaN/Inf or loss "
            f"spikes){detail} and no checkpoint to roll back to; lower the learning rate or "
            "check the data"
        )
    last, restored = got[0], got[1]
    streak = restored.guard["bad_in_row"]
    # `* 0`: the same dtype and sharding as restored (a fresh array would be one device's)
    restored = restored.replace(guard={**restored.guard, "bad_in_row": streak * 0})
    summary["rollbacks"] += 1
    moved = writer.rolled_back(
        step, last, f"{bad_in_row} bad steps in a row (NaN/Inf or loss spikes) at step {step}: "
        f"rolled back to checkpoint {last}", checkpoint=last, bad_in_row=bad_in_row,
    )  # fmt: skip
    log.warning(
        "step %d: rolled back to checkpoint %d, skipping the batches in between (%d metrics "
        "lines of steps %d..%d moved to metrics.superseded.jsonl)",
        step, last, moved, last + 1, step,
    )  # fmt: skip
    return restored, int(jax.device_get(restored.step))
