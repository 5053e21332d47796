"""Checkpointer: the orbax CheckpointManager a training run saves to and resumes from.

Saves (async, atomic; `keep` prunes only after a commit), restores into the target's shardings
(adapting to an EMA turned on or off since the save), and `restore_latest`: the newest step
that restores, refusing another run's steps (`meta_mismatch`), moving unreadable ones to
`WORKDIR/checkpoints_corrupt/` or failing (`ckpt_on_corrupt`; a step this user may not read
is an error naming the path, never moved), with the processes of a
multi-process job agreeing on every attempt through the coordination service. Separate from
the readers of a finished run's checkpoint (train/checkpoint_read.py), which never write, move
or fall back. train/checkpoint.py describes the format and re-exports all of this.
"""

from __future__ import annotations

import datetime
import gc
import itertools
import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from flaxlm import __version__
from flaxlm.train import checkpoint_fingerprint as fingerprint
from flaxlm.train import ema as ema_lib
from flaxlm.train.checkpoint_compat import meta_mismatch
from flaxlm.train.checkpoint_inspect import (
    CheckpointError,
    _describe,
    permission_denied,
    saved_state_keys,
)
from flaxlm.train.checkpoint_orbax import _read_only_options
from flaxlm.train.code_version import code_commit  # noqa: F401 (loop_resume reads it here)
from flaxlm.train.state import EmaTrainState, with_ema, without_ema

log = logging.getLogger("flaxlm")

ON_CORRUPT = ("fallback", "fail")  # config.ckpt_on_corrupt

CORRUPT_DIR = "checkpoints_corrupt"  # beside WORKDIR/checkpoints, where orbax never looks
# Multi-process resume: how long a process whose restore failed waits for the others to report
# theirs (a restore that failed on only some processes leaves the others stuck in its
# collectives).
RESTORE_WAIT_ENV = "FLAXLM_RESTORE_WAIT_S"
_agreements = itertools.count()  # the same sequence on every process


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, every: int = 0,
                 on_corrupt: str = "fallback"):  # fmt: skip
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"ckpt_on_corrupt={on_corrupt!r}: expected one of {ON_CORRUPT}")
        self.on_corrupt = on_corrupt  # what restore_latest does with an unreadable step
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.corrupt_directory = os.path.join(os.path.abspath(workdir), CORRUPT_DIR)
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep or None,
            enable_async_checkpointing=async_save,
            create=True,
            save_interval_steps=1,
        )
        self.every = every
        self.manager = self._new_manager()

    def _new_manager(self):
        return ocp.CheckpointManager(
            self.directory, options=self._options, item_names=("state", "data", "meta")
        )

    # ------------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict | None = None, meta: dict | None = None):
        """Starts an (async) save of `state` at `step`; returns immediately.

        Saving a step that is already saved (a preemption right after a periodic save) is a
        no-op.
        """
        if step in self.manager.all_steps():
            return
        meta = {"flaxlm_version": __version__, **code_commit(), **(meta or {}),
                fingerprint.META_KEY: fingerprint.record(state)}  # fmt: skip
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state or {}),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def restore(self, step: int, target) -> tuple[Any, dict, dict]:
        """Restores (state, data_state, meta) at `step` into `target`'s structure and shardings.

        `target` is a pytree of `jax.ShapeDtypeStruct`s with shardings (train/state.py's
        `abstract_state`), so arrays land directly in their shards on any mesh shape.
        """
        try:
            return self._restore(step, target)
        except Exception as e:  # orbax raises many types; name the directory for the user
            raise CheckpointError(
                f"cannot restore checkpoint {self._step_dir(step)}: "
                f"{_describe(e, self._step_dir(step))}. The directory may be corrupt or come "
                "from a different model/optimizer configuration; move it aside to resume from "
                "an earlier step."
            ) from e

    def _restore(self, step: int, target) -> tuple[Any, dict, dict]:
        keys = saved_state_keys(self._step_dir(step))
        saved_ema = isinstance(target, EmaTrainState) if keys is None else "ema" in keys
        if not saved_ema and isinstance(target, EmaTrainState):
            state, data, meta = self._restore(step, without_ema(target))
            log.warning("checkpoint %s has no EMA of the weights (written with ema.decay=0): "
                        "the EMA starts at its params", self._step_dir(step))  # fmt: skip
            return with_ema(state, ema_lib.start(state.params, target.ema)), data, meta
        if saved_ema and not isinstance(target, EmaTrainState):
            log.warning("checkpoint %s holds an EMA of the weights; this run has ema.decay=0: "
                        "it is not restored, and the checkpoints saved from here on have none",
                        self._step_dir(step))  # fmt: skip
            out = {"state": self._restore_without_ema(step, target)}
            out |= self.manager.restore(step, args=ocp.args.Composite(
                data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))  # fmt: skip
        else:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        meta = dict(out["meta"] or {})
        bad = fingerprint.mismatches(meta, out["state"])
        if bad:
            raise CheckpointError(fingerprint.describe(self._step_dir(step), bad))
        return out["state"], dict(out["data"] or {}), meta

    def _restore_without_ema(self, step: int, target):
        """The state of an EMA step without its EMA (`target` has none): a partial read, through
        a read-only manager of its own. Through self.manager it bound the `state` item to
        orbax's PyTreeCheckpointHandler for good, and every later save (StandardSave) failed
        with a ValueError, leaving a `<step>.orbax-checkpoint-tmp`."""
        args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype),
                            target)  # fmt: skip
        item = ocp.args.PyTreeRestore(target, restore_args=args, partial_restore=True)
        reader = ocp.CheckpointManager(self.directory, options=_read_only_options(),
                                       item_names=("state", "data", "meta"))  # fmt: skip
        try:
            return reader.restore(step, args=ocp.args.Composite(state=item))["state"]
        finally:
            reader.close()

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def read_step_meta(self, step: int) -> dict | None:
        """The meta of one step, or None when it cannot be read (then the restore decides)."""
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return dict(out["meta"] or {})
        except Exception:
            return None

    def restore_latest(self, target, on_corrupt: str | None = None,
                       expect_meta: dict | None = None):  # fmt: skip
        """Resumes: (step, state, data_state, meta) of the newest step that restores, or None
        when there is no checkpoint. State, data state and meta always come from one step.

        With `expect_meta` (this run's task, model_config, head, lora), a step whose readable
        meta differs in one of them (`meta_mismatch`) raises a CheckpointError naming the
        step and each key, before any array is read or any step moved: it is another run's.

        A step that cannot be restored is logged (directory and cause). With
        `on_corrupt="fail"` that raises a CheckpointError and nothing is moved. With
        "fallback" the next newest step is tried, and so on; once one restores, the unreadable
        newer steps are moved to `WORKDIR/checkpoints_corrupt/<step>-<UTC time>/` (files
        intact, out of orbax's sight, so the run saves those steps afresh) and the manager
        forgets them. When no step restores (corruption everywhere, or a config that no longer
        fits the checkpoints) the CheckpointError lists every step and why, and nothing is
        moved. A step this user may not read (permission denied) is no damage: the
        CheckpointError names the path, and nothing is moved or skipped. With several
        processes they agree on each attempt before any keeps a state; a step that fails on
        only some of them stops the job, moving nothing.
        """
        on_corrupt = on_corrupt or self.on_corrupt
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"ckpt_on_corrupt={on_corrupt!r}: expected one of {ON_CORRUPT}")
        steps = sorted(self.all_steps(), reverse=True)
        failed: list[tuple[int, str]] = []  # (step, cause), newest first
        for step in steps:
            saved = self.read_step_meta(step) if expect_meta else None
            diff = meta_mismatch(saved, expect_meta) if saved is not None else []
            if diff:  # every process reads the same file: they all stop here
                lines = "".join(f"\n  {d}" for d in diff)
                raise CheckpointError(
                    f"checkpoint {self._step_dir(step)} was written by another run; its meta "
                    f"differs from this run's in:{lines}\nResuming it would mix two runs. "
                    "Resume with the config that wrote it (its meta item holds that config), or "
                    f"train in another workdir (or move {self.directory} aside). Nothing was "
                    "moved."
                )
            try:
                restored, err = self._restore(step, target), None
            except Exception as e:  # orbax raises many types
                restored, err = None, e
            path = self._step_dir(step)
            cause = _describe(err, path) if err is not None else ""
            denied = permission_denied(path, err) if err is not None else None
            if denied and f"permission denied: {denied}" not in cause:
                cause += f"; permission denied: {denied}"
            if err is not None:
                log.warning("checkpoint %s cannot be restored: %s", path, cause)
            status = "ok" if err is None else "denied" if denied else "failed"
            flags = _restore_agreement(status)
            if flags is None:  # only some processes failed: the others hang in orbax's restore
                self._give_up_on_step(step, cause)
            bad = sorted(p for p, f in flags.items() if f != "ok")
            if not bad:
                break
            restored = None  # never keep one process's state when another's failed
            cause = cause or f"it failed to restore on process(es) {bad} (see their logs)"
            if any(f == "denied" for f in flags.values()):
                # Not damage: the step may be intact, so neither moved aside nor skipped for an
                # older one (which would train its steps again); and "fail" says the same.
                who = [p for p, f in flags.items() if f == "denied"]
                raise CheckpointError(
                    f"cannot restore checkpoint {path}: {cause}. Nothing was moved: this user "
                    f"may not read the step (permission denied on process(es) {sorted(who)}), "
                    "which says nothing of whether it is intact. Give this user read access to "
                    "it (or resume as the user that wrote it) and resume again."
                ) from err
            if on_corrupt == "fail":
                raise CheckpointError(
                    f"cannot restore checkpoint {path}: {cause}. Nothing was moved. It may be "
                    "corrupt (a truncated or missing file) or come from a different "
                    "model/optimizer configuration. ckpt_on_corrupt=fallback moves an "
                    f"unreadable step to {self.corrupt_directory}/ and resumes from the next "
                    f"newest step (steps here: {sorted(steps)})."
                ) from err
            failed.append((step, cause))
            err = None  # its traceback holds the arrays read so far: free them before the next
            gc.collect()
        else:
            if not steps:
                return None
            tried = "\n".join(f"  {self._step_dir(s)}: {c}" for s, c in failed)
            raise CheckpointError(
                f"no checkpoint under {self.directory} can be restored; tried, newest first:\n"
                f"{tried}\nNothing was moved or deleted. If every step fails alike, the config "
                "probably no longer fits them (model or optimizer shapes): resume with the "
                "config that wrote them. To start afresh instead, move the checkpoints/ "
                "directory aside or use another workdir."
            )
        if failed:
            moved = self._move_aside([s for s, _ in failed])
            for (s, cause), dest in zip(failed, moved):
                if jax.process_index() != 0:  # process 0 moved them
                    continue
                log.warning(
                    "UNREADABLE CHECKPOINT %s moved to %s (nothing deleted): %s",
                    self._step_dir(s),
                    dest,
                    cause,
                )
            log.warning(
                "resuming from step %d, the newest readable checkpoint: steps %d..%d are trained "
                "again (ckpt_on_corrupt=fail stops instead)",
                step,
                step + 1,
                failed[0][0],
            )
        return step, *restored

    def _give_up_on_step(self, step: int, cause: str):
        """Multi-process: this process could not restore `step` and some other process did not
        report back: it is stuck in orbax's restore, whose collectives this one left, so the
        job has to stop. Nothing is moved: no process has shown that an older step restores
        (a fault of this host, such as a full device memory, would fail on every step)."""
        path = self._step_dir(step)
        raise CheckpointError(
            f"cannot restore checkpoint {path} on process {jax.process_index()}: {cause}. The "
            f"other processes did not finish restoring it within {_restore_wait_s()} s "
            f"({RESTORE_WAIT_ENV}): it failed on this process only, and they are stuck in the "
            "restore this process left, so the job must stop. Nothing was moved. If the step is "
            f"corrupt, move it to {self.corrupt_directory}/ to resume from the step before."
        )

    def _move_aside(self, steps: list[int]) -> list[str]:
        """Moves step directories to WORKDIR/checkpoints_corrupt/<step>-<UTC time>/ (process 0
        on a shared filesystem) and rebuilds the manager so it forgets them."""
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        dests = []
        for step in steps:
            dest = os.path.join(self.corrupt_directory, f"{step}-{stamp}")
            n = 1
            while os.path.exists(dest):  # the same step moved twice within a second
                dest = os.path.join(self.corrupt_directory, f"{step}-{stamp}-{n}")
                n += 1
            dests.append(dest)
        if jax.process_index() == 0:
            os.makedirs(self.corrupt_directory, exist_ok=True)
            for step, dest in zip(steps, dests):
                try:
                    shutil.move(self._step_dir(step), dest)  # a rename on one filesystem
                except OSError as e:
                    raise CheckpointError(
                        f"cannot move unreadable checkpoint {self._step_dir(step)} to {dest}: "
                        f"{e}. Move it aside by hand (nothing was deleted)."
                    ) from e
        if jax.process_count() > 1:  # no process lists the steps before they are moved
            ocp.multihost.get_jax_distributed_client().wait_at_barrier(
                f"flaxlm_moved_checkpoints_{next(_agreements)}", _restore_wait_s() * 1000
            )
        self.manager.close()
        self.manager = self._new_manager()  # it cached the moved steps
        return dests

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _restore_wait_s() -> int:
    return int(os.environ.get(RESTORE_WAIT_ENV, "900"))


def _restore_agreement(status: str) -> dict[int, str] | None:
    """{process: its status} of one restore attempt, which every process calls once: "ok",
    "failed" (unreadable) or "denied" (permission denied: not moved aside).

    Through the coordination service, not device collectives: when only some processes failed,
    the others are still inside orbax's restore, waiting in its collectives for them; they never
    report, and a failed process learns it here (None) after RESTORE_WAIT_ENV seconds instead
    of joining them in a mismatched collective.
    """
    if jax.process_count() == 1:
        return {0: status}
    client = ocp.multihost.get_jax_distributed_client()
    key = f"flaxlm_restore_{next(_agreements)}"
    client.key_value_set(f"{key}/{jax.process_index()}", status)
    try:
        # A process that restored waits as long as it takes: only failed ones give up.
        ok = status == "ok"
        client.wait_at_barrier(key, (24 * 3600 if ok else _restore_wait_s()) * 1000)
    except Exception:  # the barrier timed out
        return None
    return {int(k.rsplit("/", 1)[-1]): v for k, v in client.key_value_dir_get(key)}
