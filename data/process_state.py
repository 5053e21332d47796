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

A run resumed with another process count (a state without per-process entries is a
single-process run's) shards the documents differently, so a saved shard index means another
document there. An iterator that can convert passes ``reshard`` to ``unwrap``; pretraining's
(data/pipeline.py) goes through global positions (``shard_index``): it restarts at the first
document some saved process had not finished, so none is skipped and the few the faster
processes had finished past it are trained again (a warning). The chat and preference batches
(data/chat_batches.py) draw global batches that do not depend on the process count, so theirs
maps the lowest saved process's position onto the new layout exactly (logged at info).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

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


def shard_index(saved: list[int], process_index: int, process_count: int) -> int:
    """Where process ``process_index`` of ``process_count`` starts in its shard
    (``ds[process_index::process_count]``), given each saved process's next unfinished shard
    index (``saved[p]`` of process ``p`` of ``len(saved)``).

    Shard index ``i`` of process ``p`` of ``P`` is global position ``i * P + p``; every global
    position below ``g = min_p(saved[p] * P + p)`` is finished in its shard, so the new
    processes start at the first of their positions ``>= g``: none is skipped, and what is read
    again is what the faster processes had finished past ``g``."""
    g = min(i * len(saved) + p for p, i in enumerate(saved))
    return max(0, -(-(g - process_index) // process_count))


def unwrap(
    state: dict,
    process_index: int,
    process_count: int,
    what: str,
    reshard: Callable[[list[dict], int, int], tuple[dict, str, bool]] | None = None,
) -> dict:
    """This process's position in a state from ``wrap``.

    A state without per-process entries is a single-process run's. With another process count
    ``reshard(entries, process_index, process_count)`` (all saved processes' entries in process
    order) gives this process's position, a note for the line logged and whether the data
    continues exactly (logged at info; else a warning); without it (or when the state lacks
    some process's entry) every process resumes from one saved position, logged as a warning,
    since the order then differs from the uninterrupted run's."""
    if PROCESSES not in state:
        entries, saved = {"0": state}, 1
    else:
        entries, saved = state[PROCESSES], state.get("process_count")
    key = str(process_index)
    if saved == process_count:
        if key not in entries:
            raise ValueError(
                f"{what}: the data state has no position for process {process_index} "
                f"(it holds processes {sorted(entries, key=int)})"
            )
        return entries[key]
    keys = [str(p) for p in range(saved)] if isinstance(saved, int) else []
    if reshard is not None and keys and all(k in entries for k in keys):
        local, note, exact = reshard([entries[k] for k in keys], process_index, process_count)
        logging.log(
            logging.INFO if exact else logging.WARNING,
            "%s: the data state was saved by %d processes, this run has %d: %s",
            what,
            saved,
            process_count,
            note,
        )
        return local
    if key not in entries:
        key = min(entries, key=int)
    logging.warning(
        "%s: the data state was saved by %s processes (holding %s), this run has %d: every "
        "process resumes from process %s's position, so the data order differs from the "
        "uninterrupted run's",
        what,
        saved,
        sorted(entries, key=int),
        process_count,
        key,
    )
    return entries[key]
