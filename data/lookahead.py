"""Batches drawn ahead of training, so the processes of a run can agree how many are left.

A finite batch source (``num_epochs > 0``) ends after a different number of batches on each
process: each packs its own documents, and theirs differ in length. A process that ran out
while the others trained on would leave them waiting in the next step's collectives, so the
training loop (train/stopping.py) asks every process, a few steps ahead, how many of the next
``n`` batches it has — ``prefetch(n)`` — and all stop at the fewest.

``Lookahead`` gives a batch iterator that: ``prefetch(n)`` draws up to ``n`` batches into a
queue (fewer only at the end of the data) and returns how many it holds; ``next()`` takes from
the queue first. With each queued batch it keeps the iterator's position *before* that batch,
so ``get_state()`` still names the next batch training will see — a checkpoint taken with
batches in hand resumes at the first of them, bit for bit — and ``set_state`` drops the queue.

A subclass implements ``_next_batch()`` (raises StopIteration at the end), ``_local_state()``
and ``_set_local_state(state)`` (this process's position, a JSON dict), and sets
``process_index``, ``process_count`` and ``finite``.
"""

from __future__ import annotations

import collections

from flaxlm.data import process_state


class Lookahead:
    """Mixin: ``prefetch``, ``__next__``, ``get_state``/``set_state`` over a queue of batches."""

    process_index: int = 0
    process_count: int = 1
    finite: bool = False  # whether the data ends (the loop only prefetches from such sources)

    state_name: str = ""  # names the iterator in data-state warnings (default: the class name)

    @property
    def _queue(self) -> collections.deque:  # (position before the batch, batch)
        return self.__dict__.setdefault("_lookahead_queue", collections.deque())

    def __iter__(self):
        return self

    def prefetch(self, n: int) -> int:
        """Draws batches until ``n`` are queued or the data ends; returns how many are queued."""
        q = self._queue
        while len(q) < n:
            before = self._local_state()
            try:
                batch = self._next_batch()
            except StopIteration:
                break
            q.append((before, batch))
        return min(len(q), n)

    def __next__(self) -> dict:
        if self._queue:
            return self._queue.popleft()[1]
        return self._next_batch()

    def get_state(self) -> dict:
        """The position of the next batch ``next()`` returns (queued or not); with several
        processes, every process's (a collective: all processes call it at the same step, as
        the training loop does when it saves; data/process_state.py)."""
        local = self._queue[0][0] if self._queue else self._local_state()
        return process_state.wrap(local, self.process_index, self.process_count)

    def set_state(self, state: dict) -> None:
        name = self.state_name or type(self).__name__
        local = process_state.unwrap(
            state, self.process_index, self.process_count, name, self._reshard
        )
        self._queue.clear()
        self._set_local_state(local)

    # Subclasses ----------------------------------------------------------------------------
    def _next_batch(self) -> dict:
        raise NotImplementedError

    def _local_state(self) -> dict:
        raise NotImplementedError

    def _set_local_state(self, state: dict) -> None:
        raise NotImplementedError

    # A position from the states of a run with another process count (process_state.unwrap's
    # `reshard`: (position, note, exact)), for an iterator that can convert one; None: one
    # saved position is reused, with a warning.
    _reshard = None
