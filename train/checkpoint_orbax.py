"""Orbax settings every checkpoint path relies on, applied once per process on import.

The array handler with a minimum replica slice (saves), the filter of orbax's read-only notice
(readers), `quiet_orbax_logs` (CLIs) and the read-only manager options. Separate from the code
that saves and reads checkpoints (train/checkpointer.py, train/checkpoint_read.py) because these
are process-wide side effects of importing orbax here: both of those import this module, so
the handler is registered before any save whichever of them is imported first.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

# Orbax saves a replicated array "replica-parallel" by default (off GPUs): each of its R replicas
# writes 1/R of it, which takes an eager slice of the array per replica, each a program to lower
# and dispatch. For small arrays (norm scales, biases, counters, the tiny models of tests and
# notebooks) that costs far more than the bytes it spreads: a run on 8 CPU devices spent more
# time slicing than writing. Arrays whose per-replica slice is under this many bytes are written
# whole by one replica; bigger ones are still split.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _register_array_handler() -> None:
    """Replaces orbax's jax.Array handler (process-wide) by one with the threshold, keeping
    the default's array-metadata store; an orbax without the option keeps its default."""
    default = ocp.type_handlers.get_type_handler(jax.Array)
    try:
        handler = ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
            array_metadata_store=getattr(default, "_array_metadata_store", None),
        )
    except TypeError:
        return
    # (orbax warns 'Type handler registry type ... overriding jax.Array' for the override asked
    # for here: a WARNING line on every import of flaxlm's checkpoints, in every CLI and test)
    quiet = _DropMessage("Type handler registry type")
    logging.getLogger("absl").addFilter(quiet)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        logging.getLogger("absl").removeFilter(quiet)


class _DropMessage(logging.Filter):
    """Drops log records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


_register_array_handler()


class _NoReadOnlyNotice(logging.Filter):
    """Orbax warns "Given directory is read only" for every read-only manager, i.e. on every
    checkpoint flaxlm reads (eval, generate, init_from, the demo's report): noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_NoReadOnlyNotice())


def quiet_orbax_logs() -> None:
    """CLIs: orbax logs ~25 INFO lines per save through absl's logger, burying the run's own
    lines; keep its warnings. FLAXLM_ORBAX_LOGS=1 keeps everything (debugging a save)."""
    if os.environ.get("FLAXLM_ORBAX_LOGS") != "1":
        logging.getLogger("absl").setLevel(logging.WARNING)


def _read_only_options():
    # Spelled out: orbax logs a warning for each default it has to override in read-only mode.
    return ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
