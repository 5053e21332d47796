"""Iterator states of multi-process runs: every process's position, not only process 0's.

Each process packs its own shard of the documents, so after the same number of steps the
processes stand at different document indices. The trainer's checkpoint keeps one JSON data
state, written by process 0 (orbax's ``JsonSave`` writes on the primary host only) and read back
by every process; a state holding only the writer's position would move every other process to
process 0's place in *its* shard (documents skipped or repeated, not the uninterrupted run).

``wrap`` therefore gathers all processes' states into one (a collective: every process calls
``get_state`` at the same step, as the training loop does) and ``unwrap`` picks this process's.
Processes simulated in one Python process (``process_count`` > ``jax.process_count()``, the
tests) cannot gather; each keeps its own entry.
"""

from __future__ import annotations

import json
import logging

import numpy as np

PROCESSES = "processes"


def _allgather(local: dict, process_count: int) -> list[dict]:
    """Every process's JSON ``local``, in process order (a jax collective)."""
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(local, sort_keys=True).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32)))
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(process_count, -1)
    return [
        json.loads(rows[p, : int(sizes.reshape(-1)[p])].tobytes()) for p in range(process_count)
    ]


def _jax_process_count() -> int:
    try:
        import jax

        return jax.process_count()
    except Exception:  # no jax backend: a data-only job
        return 1


def wrap(local: dict, process_index: int, process_count: int) -> dict:
    """The state to save: ``local`` itself with one process, else every process's (gathered)."""
    if process_count == 1:
        return local
    if _jax_process_count() == process_count:
        entries = dict(enumerate(_allgather(local, process_count)))
    else:  # simulated processes: no collective to gather with
        entries = {process_index: local}
    return {
        "process_count": process_count,
        PROCESSES: {str(p): s for p, s in entries.items()},
    }


def unwrap(state: dict, process_index: int, process_count: int, what: str) -> dict:
    """This process's position in a state from ``wrap``.

    A state with another process count, or a single-process state on several processes (from a
    single-process run, or written before per-process states existed), resumes every process
    from one position: logged as a warning, since the order then differs from the uninterrupted
    run's."""
    if PROCESSES not in state:
        if process_count > 1:
            logging.warning(
                "%s: the data state holds one position (a single-process run's, or process 0's "
                "from a checkpoint written before per-process states); all %d processes resume "
                "from it, so the data order differs from the uninterrupted run's",
                what,
                process_count,
            )
        return state
    entries, saved = state[PROCESSES], state.get("process_count")
    if saved != process_count:
        logging.warning(
            "%s: the data state was saved by %s processes, this run has %d: the document shards "
            "differ, so the data order differs from the uninterrupted run's",
            what,
            saved,
            process_count,
        )
    key = str(process_index)
    if key not in entries:
        if saved == process_count:
            raise ValueError(
                f"{what}: the data state has no position for process {process_index} "
                f"(it holds processes {sorted(entries, key=int)})"
            )
        key = min(entries, key=int)
    return entries[key]
