"""Stopping before `total_steps`, together: SIGTERM (preemption) and the end of the data.

One process: SIGTERM sets a flag the loop checks before every step (it saves a checkpoint and
returns); a batch source that ends (StopIteration: `data.num_epochs` > 0) stops the run at that
step, with a checkpoint.

Several processes have to stop at the same step: each step is a collective, and so are saves
(orbax) and the data state (data/process_state.py), so a process that stopped alone would leave
the others waiting in a collective for ever (or would save a checkpoint the others never join).
They agree at *sync steps*, with one tiny `process_allgather` of
[SIGTERM seen, batches in hand, seconds per step] per process:

  * SIGTERM on any process: every process stops at that sync step (PPO/GRPO at the rollout
    boundary after it, which every process reaches at the same step) and saves there;
  * a finite batch source (`finite` and `prefetch(n)`, data/lookahead.py) draws the batches of
    the steps up to the next sync step ahead; when some process has fewer, every process stops
    after the fewest, and the log names the processes and the step.

Sync steps are the loop's start, the step a guard rollback returns to, and then the multiples
of `interval`: as many steps as take about SYNC_SECONDS (by the slowest process's step time at
the sync before), at most `log_every`. With fast steps they are the log steps, where the loop
waits for the device anyway; with slow ones a SIGTERM is acted on within about SYNC_SECONDS (or
one step, if longer), plus the save. Between sync steps the training step has no extra host
sync.

Why not `jax.experimental.multihost_utils.reached_preemption_sync_point`: its SIGTERM handler
(installed by `jax.distributed.initialize`, C++) and Python's `signal` module replace each other,
it computes the stop step once, from call counters that start at 0 — a notice during a resumed
run's restore or compilation gives step 1, which that run never reaches, and the notice is lost
— and it cannot carry the end of the data. Here the Python handler is installed before the
restore on multi-process runs, so a SIGTERM that arrives while compiling stops the run at its
first sync step.
"""

from __future__ import annotations

import logging
import signal
import time

import jax
import numpy as np

log = logging.getLogger("flaxlm")

SYNC_SECONDS = 5.0  # aim: one agreement per this much training (or per step, if slower)


class Preemption:
    """Turns SIGTERM into a flag (`requested`) the loop checks between steps.

    `install()` may come early (before the restore) and is idempotent; `uninstall()` restores
    the previous handler.
    """

    def __init__(self):
        self.requested = False
        self._old = None
        self._installed = False

    def install(self) -> Preemption:
        if not self._installed:
            try:
                self._old = signal.signal(signal.SIGTERM, self._handle)
                self._installed = True
            except ValueError:  # not in the main thread (e.g. a notebook worker): no handler
                self._old = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def uninstall(self) -> None:
        """Restores the handler from before `install` (a handler set outside Python, such as
        jax's, cannot be restored: ours stays, and only sets the flag)."""
        if self._installed and self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._installed = False


def next_interval(seconds_per_step: float, max_interval: int) -> int:
    """Steps between sync steps: about SYNC_SECONDS of training, 1 to `max_interval`; 1 while
    the step time is unknown (the first steps, which compile)."""
    if seconds_per_step <= 0:
        return 1
    return int(min(max(SYNC_SECONDS // seconds_per_step, 1), max_interval))


class StopSync:
    """Where the processes of a run agree to stop (see the module docstring).

    Args:
      batches: the task's batch iterator (prefetched from when `finite` and multi-process).
      log_every: the loop's log cadence, the most steps between sync steps (0: 100).
      total: the run's last step.
    """

    def __init__(self, batches, log_every: int, total: int):
        self.multi = jax.process_count() > 1
        self.batches = batches
        self.finite = bool(
            self.multi and getattr(batches, "finite", False) and hasattr(batches, "prefetch")
        )
        self.max_interval = log_every if log_every > 0 else 100
        self.total = total
        self.sigterm = False  # agreed: every process stops at the next boundary
        self.data_end: int | None = None  # agreed (or, one process, seen): the last step
        self.batches_left: list[int] = []  # per process, at the sync that set data_end
        self._interval = 1  # length of the window the next sync step starts
        self._next: int | None = None  # the next sync step (None: not yet synced)
        self._seconds_per_step = 0.0
        self._last: tuple[float, int] | None = None  # (time, step) of the last sync

    def stop_requested(self, preempt: Preemption) -> bool:
        """Whether to stop at the next boundary: this process's SIGTERM with one process, the
        agreed one with several (a SIGTERM seen since the last sync waits for the next)."""
        return self.sigterm if self.multi else preempt.requested

    def due(self, step: int) -> bool:
        return self.multi and step < self.total and (self._next is None or step >= self._next)

    def agree(self, step: int, preempt: Preemption) -> None:
        """A sync step (every process calls it at the same step): agrees on SIGTERM and on how
        many batches are left; schedules the next sync step."""
        if not self.multi or step >= self.total:
            return
        end = min((step // self._interval + 1) * self._interval, self.total)
        need = end - step
        have = self.batches.prefetch(need) if self.finite else need
        now = time.perf_counter()
        if self._last is not None and step > self._last[1]:
            self._seconds_per_step = (now - self._last[0]) / (step - self._last[1])
        self._last = (now, step)
        from jax.experimental import multihost_utils

        mine = [int(preempt.requested), int(have), int(min(self._seconds_per_step * 1e3, 2**30))]
        rows = np.asarray(multihost_utils.process_allgather(np.asarray(mine, np.int32)))
        rows = rows.reshape(jax.process_count(), 3)
        sigterm = [p for p in range(len(rows)) if rows[p, 0]]
        if sigterm and not self.sigterm:
            self.sigterm = True
            log.warning(
                "SIGTERM on process(es) %s: every process stops at step %d (or at the batch "
                "source's next boundary) and saves a checkpoint",
                sigterm,
                step,
            )
        fewest = int(rows[:, 1].min())
        self.data_end = None
        if fewest < need:
            self.data_end = step + fewest
            self.batches_left = [int(x) for x in rows[:, 1]]
            short = [p for p in range(len(rows)) if rows[p, 1] == fewest]
            log.warning(
                "data: the batch source of process(es) %s ends after %d more batch(es) (batches "
                "in hand per process, of the %d asked: %s): every process stops after step %d of "
                "total_steps=%d and saves a checkpoint there",
                short, fewest, need, self.batches_left, self.data_end, self.total,
            )  # fmt: skip
        self._interval = next_interval(rows[:, 2].max() / 1e3, self.max_interval)
        self._next = end

    def ran_out(self, step: int) -> None:
        """The batch source raised StopIteration before `step + 1`."""
        if self.multi:
            raise RuntimeError(
                f"the batch source of process {jax.process_index()} ended before step "
                f"{step + 1}, but it does not declare `finite` and `prefetch(n)` "
                "(data/lookahead.py), so the processes could not agree to stop together: the "
                "others are waiting in this step's collectives. Stop the job; give the source "
                "those two (flaxlm's data pipelines have them), or end training (total_steps) "
                "before the data does."
            )
        self.data_end = step
        log.warning("data: the batch source ended after step %d of total_steps=%d: stopping "
                    "and saving a checkpoint there", step, self.total)  # fmt: skip
