"""The request queue of `python -m flaxlm.serve`: concurrent decode requests whose per-call
values agree are merged into one batched call (flaxlm/serve.py, "Serving"). No jax here: a
`Batcher` only groups jobs and hands each its result; what a batch runs is `run_batch`.

One worker thread owns the queue. It waits for a job, takes the device lock (so requests that
arrive while another batch or a scoring call runs pile up and join the next batch), waits up
to `wait_s` more for batch mates, then takes the oldest job and every later queued job with
the same key, oldest first, while their rows fit `max_rows` (the oldest alone may exceed it:
it runs by itself). Jobs with another key wait for a later batch; the oldest job always goes
next, so none starves.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(eq=False)
class Job:
    """One request's decode work: `key` (jobs with equal keys may share a call), `rows` (the
    rows it adds to a batch) and `payload` (what `run_batch` reads). The worker sets `result`
    or `error`, then `done`."""

    key: Any
    rows: int
    payload: Any
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class Batcher:
    """Runs queued jobs in batches: `run_batch(payloads) -> results` (one per payload) is
    called by one worker thread under `lock`. `submit` blocks until its job's batch ran."""

    def __init__(self, run_batch: Callable, lock: threading.Lock, max_rows: int = 64,
                 wait_s: float = 0.005, log: Callable = print):  # fmt: skip
        self.run_batch, self.lock, self.log = run_batch, lock, log
        self.max_rows, self.wait_s = max_rows, wait_s
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def submit(self, key, rows: int, payload):
        """The result of `payload`'s batch for this job; its error re-raised (the batch's
        exception, or a RuntimeError if the batcher stopped first)."""
        job = Job(key, rows, payload)
        with self._cond:
            self._start()
            self._queue.append(job)
            self._cond.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def queued(self) -> int:
        """How many jobs wait (for tests and logs)."""
        with self._cond:
            return len(self._queue)

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the worker after its current batch; jobs still queued fail. A later `submit`
        starts a new worker."""
        with self._cond:
            thread, self._stopping = self._thread, True
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout)
        with self._cond:
            pending, self._queue = self._queue, []
            self._thread, self._stopping = None, False
        for job in pending:
            self._finish(job, error=RuntimeError("the server is shutting down"))

    def _start(self) -> None:
        """Starts the worker if none runs (the caller holds `_cond`). A daemon: a process
        that exits without `stop` is not held up by it."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="flaxlm.serve batcher",
                                            daemon=True)  # fmt: skip
            self._thread.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
            with self.lock:  # (requests arriving meanwhile join this batch)
                batch = self._take()
                self._run(batch)

    def _take(self) -> list[Job]:
        """Removes and returns the next batch, first waiting up to `wait_s` for batch mates
        while it is not full."""
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while True:
                batch = self._select()
                left = deadline - time.monotonic()
                if sum(j.rows for j in batch) >= self.max_rows or left <= 0 or self._stopping:
                    break
                self._cond.wait(left)
            taken = set(map(id, batch))
            self._queue = [j for j in self._queue if id(j) not in taken]
            return batch

    def _select(self) -> list[Job]:
        """The oldest job and the later ones with its key that fit `max_rows`, oldest first."""
        first = self._queue[0]
        batch, rows = [first], first.rows
        for job in self._queue[1:]:
            if job.key == first.key and rows + job.rows <= self.max_rows:
                batch.append(job)
                rows += job.rows
        return batch

    def _run(self, batch: list[Job]) -> None:
        """Runs one batch; an exception fails each of its jobs (the worker serves on)."""
        try:
            results = list(self.run_batch([j.payload for j in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for {len(batch)} requests")
        except Exception as e:
            self.log(f"a batch of {len(batch)} request(s) failed:\n{traceback.format_exc()}")
            for job in batch:
                self._finish(job, error=e)
            return
        except BaseException as e:  # (never leave a request waiting forever)
            for job in batch:
                self._finish(job, error=RuntimeError(f"the batch was interrupted: {e!r}"))
            raise
        for job, result in zip(batch, results):
            self._finish(job, result=result)

    @staticmethod
    def _finish(job: Job, result=None, error=None) -> None:
        job.result, job.error = result, error
        job.done.set()
