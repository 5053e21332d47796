"""Stopping before `total_steps`, together: SIGTERM (preemption), the wall-clock limit and the
end of the data.

One process: SIGTERM sets a flag the loop checks before every step (it saves a checkpoint and
returns); `max_runtime_minutes` > 0 (a cluster job's time limit) stops the run the same way once
the process has run that long (`runtime_s`: since the process started, not since the loop did);
a batch source that ends (StopIteration: `data.num_epochs` > 0) stops the run at that step, with
a checkpoint.

Several processes have to stop at the same step: each step is a collective, and so are saves
(orbax) and the data state (data/process_state.py), so a process that stopped alone would leave
the others waiting in a collective for ever (or would save a checkpoint the others never join).
They agree at *sync steps*, with one tiny `process_allgather` of
[SIGTERM seen / time up, batches in hand, seconds per step] per process:

  * SIGTERM or the time limit on any process: every process stops at that sync step (PPO/GRPO
    at the rollout boundary after it, which every process reaches at the same step) and saves
    there (the processes' clocks differ a little; the first past the limit decides);
  * a finite batch source (`finite` and `prefetch(n)`, data/lookahead.py) draws the batches of
    the steps up to the next sync step ahead; when some process has fewer, every process stops
    after the fewest, and the log names the processes and the step.

Sync steps are the loop's start, the step a guard rollback returns to, and then the multiples
of `interval`: as many steps as take about SYNC_SECONDS (by the slowest process's step time at
the sync before), at most `log_every`. With fast steps they are the log steps, where the loop
waits for the device anyway; with slow ones a SIGTERM (or the time limit) is acted on within
about SYNC_SECONDS (or one step, if longer), plus the save. Between sync steps the training step
has no extra host sync.

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
import os
import signal
import time

import jax
import numpy as np

from flaxlm.config_values import is_finite_real

log = logging.getLogger("flaxlm")

SYNC_SECONDS = 5.0  # aim: one agreement per this much training (or per step, if slower)

SIGTERM = "SIGTERM"
TIME_LIMIT = "max_runtime_minutes"  # the config key, and the reason `Preemption.reason` gives


def _seconds_since_start() -> float | None:
    """How long this process has been running (Linux: its start time in /proc/self/stat, clock
    ticks after boot, against CLOCK_BOOTTIME); None where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": comm may hold spaces
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, `starttime`
        since = time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return since if 0 <= since < 10 * 365 * 86400 else None


# The process's start on the monotonic clock: a job's time limit counts from its start, and the
# imports and the compiles before the loop count too. Where the start cannot be read, this
# module's import (one of the first flaxlm imports of a trainer).
_STARTED = time.monotonic() - (_seconds_since_start() or 0.0)


def runtime_s() -> float:
    """Seconds since this process started (the clock `max_runtime_minutes` reads)."""
    return time.monotonic() - _STARTED


def check_max_runtime(value) -> None:
    """Refuses, naming the key, a `max_runtime_minutes` that is not a number >= 0 (0 = off)."""
    if not (is_finite_real(value) and value >= 0):
        raise ValueError(f"config: {TIME_LIMIT}={value!r} must be a number >= 0 (0 = no limit)")


class Preemption:
    """This process's reasons to stop early, which the loop checks between steps: SIGTERM, as
    a flag (`requested`), and the wall-clock limit (`max_runtime_minutes` > 0: once `runtime_s`
    passes it; then it stays passed).

    `install()` may come early (before the restore) and is idempotent; `uninstall()` restores
    the previous handler.
    """

    def __init__(self, max_runtime_minutes: float = 0.0):
        self.requested = False
        self.max_runtime_minutes = float(max_runtime_minutes)
        self.timed_out = False
        self._old = None
        self._installed = False

    def reason(self) -> str | None:
        """SIGTERM, TIME_LIMIT or None: why this process wants to stop."""
        if self.requested:
            return SIGTERM
        if not self.timed_out and self.max_runtime_minutes > 0:
            self.timed_out = runtime_s() >= 60.0 * self.max_runtime_minutes
        return TIME_LIMIT if self.timed_out else None

    def describe(self, reason: str) -> str:
        """`reason` for the log and events.jsonl (an agreed one may be another process's)."""
        if reason != TIME_LIMIT:
            return reason
        where = (f"{runtime_s() / 60:.1f} min since the process started"
                 if self.reason() == TIME_LIMIT else "by another process")  # fmt: skip
        return f"{TIME_LIMIT}={self.max_runtime_minutes:g} reached ({where})"

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
        self.stop: str | None = None  # agreed (SIGTERM or TIME_LIMIT): every process stops at
        # the next boundary
        self.data_end: int | None = None  # agreed (or, one process, seen): the last step
        self.batches_left: list[int] = []  # per process, at the sync that set data_end
        self._interval = 1  # length of the window the next sync step starts
        self._next: int | None = None  # the next sync step (None: not yet synced)
        self._seconds_per_step = 0.0
        self._last: tuple[float, int] | None = None  # (time, step) of the last sync

    def stop_reason(self, preempt: Preemption) -> str | None:
        """Why to stop at the next boundary (SIGTERM, TIME_LIMIT), or None: this process's
        reason with one process, the agreed one with several (a SIGTERM seen, or the limit
        passed, since the last sync waits for the next)."""
        return self.stop if self.multi else preempt.reason()

    def due(self, step: int) -> bool:
        return self.multi and step < self.total and (self._next is None or step >= self._next)

    def agree(self, step: int, preempt: Preemption) -> None:
        """A sync step (every process calls it at the same step): agrees on SIGTERM and the time
        limit and on how many batches are left; schedules the next sync step."""
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

        flag = {None: 0, SIGTERM: 1, TIME_LIMIT: 2}[preempt.reason()]
        mine = [flag, int(have), int(min(self._seconds_per_step * 1e3, 2**30))]
        rows = np.asarray(multihost_utils.process_allgather(np.asarray(mine, np.int32)))
        rows = rows.reshape(jax.process_count(), 3)
        names = {1: SIGTERM, 2: TIME_LIMIT}
        stop = {p: names[int(rows[p, 0])] for p in range(len(rows)) if rows[p, 0]}
        if stop and self.stop is None:
            # Every process reads the same rows, so every process names the same reason.
            self.stop = SIGTERM if SIGTERM in stop.values() else TIME_LIMIT
            log.warning(
                "%s on process(es) %s: every process stops at step %d (or at the batch "
                "source's next boundary) and saves a checkpoint",
                self.stop,
                sorted(p for p, r in stop.items() if r == self.stop),
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
