"""Checkpoints: orbax CheckpointManager over `WORKDIR/checkpoints/<step>/`.

Each step directory holds three items:
    state  the TrainState (params, optimizer state, step, base RNG, guard counters), sharded
    data   the data iterator's state (JSON), so a resumed run sees exactly the next batches
    meta   JSON: the run's config, the model config and the flaxlm version — a checkpoint
           describes itself, so notebooks and `init_from` need nothing else
Saves are asynchronous (training continues while the write finishes) and atomic (orbax writes a
temporary directory and renames it), so a killed process never leaves a half checkpoint that
looks complete (a leftover `<step>.orbax-checkpoint-tmp*` directory is not a step, for resuming
and for readers alike). `keep` (max_to_keep) deletes the oldest steps only in orbax's save
finalisation, after the new step is committed: a failed save never costs the last good step.
A restore lands each array in the target's shardings, so a checkpoint saved on one mesh
restores bit for bit on any other (data=8 → fsdp=4×tensor=2 or one device), every leaf in its
saved dtype (float32 masters, bfloat16 moments, int32 counters, the uint32 RNG key);
tests/train/test_checkpoint_audit.py checks these.

A run with an EMA of the weights (`ema.decay` > 0, train/ema.py) saves it in the state item
(`EmaTrainState.ema`, `ema_count`). Resuming with the EMA on from a step saved without one starts
the EMA at that step's params (warmup restarting), with a warning naming the step; resuming with
the EMA off from a step that has one leaves it unread (also warned): the EMA follows the
resuming run's config, as the learning rate does. Readers take the EMA weights instead of the
params with `ema=True`; a step without an EMA is then an error naming it.

A step can still become unreadable afterwards (a file truncated or deleted by a full disk or a
node that died mid-copy). Resuming (`Checkpointer.restore_latest`) then moves it aside to
`WORKDIR/checkpoints_corrupt/<step>-<UTC time>/`, never deleting anything, and resumes from the
next newest readable step; `ckpt_on_corrupt="fail"` stops instead. Readers of a given or the
latest step (`read_meta`, `load_params`, `load_model`) never fall back: their errors name the
step directory and the other steps there.

Resuming also refuses, naming each differing meta key, a checkpoint written by another run:
another task, head or LoRA spec, or a model config that differs in any key but the execution-
only ones (`EXECUTION_ONLY_MODEL_KEYS`: how the same function is computed). Without that check
a changed `model.param_dtype` silently cast the float32 master weights, and a changed
`rope_theta` silently resumed a different model; shape changes failed on every step with an
error naming no key. Nothing is moved then (the steps are readable, just not this run's). A run
started from another's weights (`init_from`) may also differ from its source in the context-length
keys (`CONTEXT_MODEL_KEYS`: long-context fine-tuning); any other difference is refused the same
way (`init_from_model_changes`, used by the loop and the alignment stages).
"""

from __future__ import annotations

import datetime
import gc
import itertools
import json
import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from flaxlm import __version__
from flaxlm.train import ema as ema_lib
from flaxlm.train.state import EmaTrainState, with_ema, without_ema

log = logging.getLogger("flaxlm")

ON_CORRUPT = ("fallback", "fail")  # config.ckpt_on_corrupt

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
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


_register_array_handler()

CORRUPT_DIR = "checkpoints_corrupt"  # beside WORKDIR/checkpoints, where orbax never looks
# Multi-process resume: how long a process whose restore failed waits for the others to report
# theirs (a restore that failed on only some processes leaves the others stuck in its
# collectives).
RESTORE_WAIT_ENV = "FLAXLM_RESTORE_WAIT_S"
_agreements = itertools.count()  # the same sequence on every process


class CheckpointError(RuntimeError):
    """A checkpoint could not be read; the message names the directory and the cause."""


# Meta keys that say which run wrote a checkpoint; resuming requires them to match
# (`meta_mismatch`). The run's `config` is not compared: a resume may change total_steps, lr, ...
RESUME_META_KEYS = ("task", "model_config", "head", "lora")
# ModelConfig keys that change how, not what, the model computes (or only its initialisation):
# free to change on resume. `dtype` is the compute precision (e.g. bfloat16 compute on a GPU
# after float32 on a CPU); `param_dtype`, the stored weights', is not free.
EXECUTION_ONLY_MODEL_KEYS = frozenset(
    {"attention_impl", "flash_block", "remat_policy", "join_projections", "dtype", "init_std"}
)
# ModelConfig keys of the context a model runs at: its length and RoPE's frequencies (base and
# scaling). A run started from another's weights (`init_from`) may set them differently from its
# source — long-context fine-tuning extends a model's context this way — but a resume may not:
# that would be another model than the checkpoint's.
CONTEXT_MODEL_KEYS = frozenset(
    {"max_seq_len", "rope_theta", "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor",
     "rope_high_freq_factor", "rope_original_max_len", "rope_yarn_beta_fast",
     "rope_yarn_beta_slow", "rope_yarn_truncate", "rope_attention_factor",
     "rope_short_factors", "rope_long_factors"}
)  # fmt: skip
# What a run started from another run's weights may change of its source's model config: also
# `param_dtype`, as a new run may store its weights otherwise (bfloat16 params to fit a 7B
# fine-tune on one GPU, from float32 or an HF import; `load_params` reads each leaf in the
# target's dtype). Every other key (shapes, activation, norms, MoE routing, ...) changes what
# the loaded weights compute and is refused (`init_from_model_changes`).
INIT_FROM_FREE_MODEL_KEYS = EXECUTION_ONLY_MODEL_KEYS | CONTEXT_MODEL_KEYS | {"param_dtype"}


def init_from_model_changes(source: dict, run: dict, where: str) -> dict[str, tuple[Any, Any]]:
    """{key: (the source's value, this run's)} for every ModelConfig key where the model config
    of a run started from another's weights (`run`) differs from its source's (`source`, both
    dicts; `where` names the source, "init_from=RUN"). Raises a ValueError naming each differing
    key outside INIT_FROM_FREE_MODEL_KEYS with both values: loaded into another function (an
    activation, a norm epsilon, another shape) the weights would train on silently as a
    different model."""
    a = json.loads(json.dumps(_normal_model_config(source)))  # tuples as lists on both sides
    b = json.loads(json.dumps(_normal_model_config(run)))
    changes = {k: (a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(set(a) | set(b))
               if a.get(k, ABSENT) != b.get(k, ABSENT)}  # fmt: skip
    refused = {k: v for k, v in changes.items() if k not in INIT_FROM_FREE_MODEL_KEYS}
    if refused:
        lines = "".join(f"\n  model.{k}: {where} has {old!r}, this run {new!r}"
                        for k, (old, new) in refused.items())  # fmt: skip
        raise ValueError(
            f"{where}: this run's model config differs from its source's where that changes "
            f"what the loaded weights compute (or their shapes or storage):{lines}\nSet these "
            "keys as the source has them. Only the execution keys "
            f"({', '.join(sorted(EXECUTION_ONLY_MODEL_KEYS))}) and the context-length ones "
            f"({', '.join(sorted(CONTEXT_MODEL_KEYS))}) may differ."
        )
    return changes


def _normal_model_config(d):
    """A model_config dict with every field (defaults filled in for an older checkpoint's)."""
    from flaxlm.models.config import ModelConfig

    try:
        return ModelConfig.from_dict(d).to_dict()
    except Exception:  # unknown keys: compare the raw dicts
        return dict(d)


def meta_mismatch(saved: dict, expected: dict) -> list[str]:
    """The RESUME_META_KEYS where checkpoint meta `saved` and this run's `expected` differ, one
    line each ("model_config.param_dtype: checkpoint 'float32', this run 'bfloat16'"). A key
    absent from either side is not compared (meta of older versions, HF imports)."""
    expected = json.loads(json.dumps(expected))  # tuples -> lists, as the saved JSON holds them
    out = []
    for key in RESUME_META_KEYS:
        if key not in saved or key not in expected:
            continue
        a, b = saved[key], expected[key]
        if key == "model_config" and isinstance(a, dict) and isinstance(b, dict):
            a, b = _normal_model_config(a), _normal_model_config(b)
            a = {k: v for k, v in a.items() if k not in EXECUTION_ONLY_MODEL_KEYS}
            b = {k: v for k, v in b.items() if k not in EXECUTION_ONLY_MODEL_KEYS}
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                if a.get(k, "<absent>") != b.get(k, "<absent>"):
                    out.append(f"{key}.{k}: checkpoint {a.get(k, '<absent>')!r}, "
                               f"this run {b.get(k, '<absent>')!r}")  # fmt: skip
        elif a != b:
            out.append(f"{key}: checkpoint {a!r}, this run {b!r}")
    return out


ABSENT = "<absent>"  # a key one side of a comparison lacks


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """{"opt.lr": (checkpoint's value, this run's)} for every config key (dotted) where the
    config a checkpoint was saved with (its meta's `config`) and this run's differ; a key only
    one side has is ABSENT on the other. Values compare as their JSON (tuples as lists)."""
    a, b = _flat(json.loads(json.dumps(saved))), _flat(json.loads(json.dumps(current)))
    return {k: (a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(set(a) | set(b))
            if a.get(k, ABSENT) != b.get(k, ABSENT)}  # fmt: skip


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
        meta = {"flaxlm_version": __version__, **(meta or {})}
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
            args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding,
                                                               dtype=s.dtype), target)  # fmt: skip
            state = ocp.args.PyTreeRestore(target, restore_args=args, partial_restore=True)
        else:
            state = ocp.args.StandardRestore(target)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=state,
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], dict(out["data"] or {}), dict(out["meta"] or {})

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
        moved. With several processes they agree on each attempt before any keeps a state;
        a step that fails on only some of them stops the job, moving nothing.
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
            if err is not None:
                log.warning("checkpoint %s cannot be restored: %s", path, cause)
            bad = _processes_that_failed(err is not None)
            if bad is None:  # only some processes failed: the others hang in orbax's restore
                self._give_up_on_step(step, cause)
            if not bad:
                break
            restored = None  # never keep one process's state when another's failed
            cause = cause or f"it failed to restore on process(es) {bad} (see their logs)"
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


class _NoReadOnlyNotice(logging.Filter):
    """Orbax warns "Given directory is read only" for every read-only manager, i.e. on every
    checkpoint this module reads (eval, generate, init_from, the demo's report): noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_NoReadOnlyNotice())


def quiet_orbax_logs() -> None:
    """CLIs: orbax logs ~25 INFO lines per save through absl's logger, burying the run's own
    lines; keep its warnings. FLAXLM_ORBAX_LOGS=1 keeps everything (debugging a save)."""
    if os.environ.get("FLAXLM_ORBAX_LOGS") != "1":
        logging.getLogger("absl").setLevel(logging.WARNING)


def _one_line(e: BaseException, limit: int = 800) -> str:
    # TensorStore errors append dumps of the array's spec: cut them.
    text = str(e).split("See full TensorStore details")[0].split(" [tensorstore_spec")[0]
    text = " ".join(text.split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _describe(e: BaseException, step_dir: str) -> str:
    """One line on why `step_dir` did not restore: the exception, its root cause (TensorStore's
    names the array and the file), and a file of the step that is missing or not JSON."""
    root, seen = e, {id(e)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        root = nxt
        seen.add(id(nxt))
    out = _one_line(e)
    if root is not e:
        out += f" (caused by {_one_line(root)})"
    bad = _bad_file(step_dir)
    return f"{out}; {bad}" if bad else out


def _bad_file(step_dir: str) -> str | None:
    """A missing item directory or an unparsable JSON file of a step, if there is one."""
    for item in ("state", "data", "meta"):
        if not os.path.isdir(os.path.join(step_dir, item)):
            return f"missing: {os.path.join(step_dir, item)}"
    for name in ("state/_METADATA", "data/metadata", "meta/metadata"):
        path = os.path.join(step_dir, name)
        try:
            with open(path) as f:
                json.load(f)
        except FileNotFoundError:
            continue  # orbax versions differ in which files they write
        except (OSError, ValueError):
            return f"not readable JSON: {path}"
    return None


def saved_state_keys(step_dir: str) -> set[str] | None:
    """The top-level keys of a step's saved state ("params", "opt_state", "ema", ...), from its
    tree metadata (no array is read); None when that cannot be read: then the restore itself
    fails or succeeds as it did before EMAs existed (its error names the cause)."""
    from etils import epath

    handler = ocp.StandardCheckpointHandler()
    try:
        return set(handler.metadata(epath.Path(step_dir) / "state").tree)
    except Exception:  # orbax raises many types; a missing or truncated file among them
        return None
    finally:
        handler.close()


def _restore_wait_s() -> int:
    return int(os.environ.get(RESTORE_WAIT_ENV, "900"))


def _processes_that_failed(failed: bool) -> list[int] | None:
    """The processes whose restore attempt failed; every process calls this once per attempt.

    Through the coordination service, not device collectives: when only some processes failed,
    the others are still inside orbax's restore, waiting in its collectives for them; they never
    report, and a failed process learns it here (None) after RESTORE_WAIT_ENV seconds instead
    of joining them in a mismatched collective.
    """
    if jax.process_count() == 1:
        return [0] if failed else []
    client = ocp.multihost.get_jax_distributed_client()
    key = f"flaxlm_restore_{next(_agreements)}"
    client.key_value_set(f"{key}/{jax.process_index()}", "1" if failed else "0")
    try:
        # A process that restored waits as long as it takes: only failed ones give up.
        client.wait_at_barrier(key, (_restore_wait_s() if failed else 24 * 3600) * 1000)
    except Exception:  # the barrier timed out
        return None
    flags = dict(client.key_value_dir_get(key))
    return sorted(int(k.rsplit("/", 1)[-1]) for k, v in flags.items() if v == "1")


def _other_steps_hint(mgr, directory: str, step: int) -> str:
    """Where to go when `step` is unreadable: the other steps there and how to read one."""
    try:
        others = [s for s in sorted(mgr.all_steps()) if s != step]
    except Exception:  # the hint must not hide the error it explains
        others = []
    if not others:
        return f" No other step under {directory}."
    return (
        f" Other steps under {directory}: {others}; read one with --step N (eval, generate, "
        f"HF export) or step=N, or move {directory}/{step} aside (init_from reads the latest)."
    )


def _require_step(mgr, directory: str, step: int) -> None:
    """A requested step (--step N) that is not there is named with the steps that are (an
    unfinished `<step>.orbax-checkpoint-tmp` is not one), not reported as a corrupt step."""
    steps = sorted(mgr.all_steps())
    if step not in steps:
        mgr.close()
        raise CheckpointError(
            f"cannot read checkpoint {directory}/{step}: FileNotFoundError: there is no step "
            f"{step}; steps there: {steps or 'none'}"
        )


def _read_only_options():
    # Spelled out: orbax logs a warning for each default it has to override in read-only mode.
    return ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)


def read_meta(ckpt_dir: str, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of a run's checkpoint without loading arrays (latest step by default)."""
    mgr = ocp.CheckpointManager(
        os.path.join(os.path.abspath(ckpt_dir), "checkpoints"),
        options=_read_only_options(),
        item_names=("state", "data", "meta"),
    )
    step = mgr.latest_step() if step is None else step
    if step is None:
        mgr.close()
        raise CheckpointError(f"no checkpoint under {ckpt_dir}/checkpoints")
    _require_step(mgr, str(mgr.directory), step)
    try:
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
        path = f"{mgr.directory}/{step}"
        raise CheckpointError(
            f"cannot read the meta of checkpoint {path}: {_describe(e, path)}."
            + _other_steps_hint(mgr, str(mgr.directory), step)
        ) from e
    finally:
        mgr.close()
    return step, located_tokenizer(dict(meta), ckpt_dir)


def located_tokenizer(meta: dict, run_dir: str) -> dict:
    """`meta` with its `tokenizer` path found again after the run directory moved.

    Runs record the tokenizer they copied into their own directory by absolute path. A run
    copied to another machine or folder (the original gone) then named a missing file, and
    every reader (generate, export, evaluation, init_from, distillation) failed; the lookup
    (`run_tokenizer_path`) finds the copy's own file, and a relative path in the run."""
    from flaxlm.models.hf_tokenizer import run_tokenizer_path

    if isinstance(meta.get("tokenizer"), str) and meta["tokenizer"]:
        meta["tokenizer"] = run_tokenizer_path(meta["tokenizer"], run_dir)
    return meta


def check_ema_source(source: str, key: str, source_key: str) -> int:
    """Refuses, naming `key` and the run, a source whose EMA weights are asked for (`key`=True:
    `init_from_ema` of `init_from`, `reward_from_ema` of `reward_from`) but that has none: no
    source, an HF checkpoint ("hf:DIR"), or a run whose latest step was saved without an EMA
    (trained with ema.decay=0). Reads no array; returns that step."""
    if not source:
        raise ValueError(f"{key}=True but {source_key} is not set: no run to take EMA weights from")
    if source.startswith("hf:"):
        raise CheckpointError(
            f"{key}=True: {source_key}={source} is an HF checkpoint, which holds no EMA of the "
            f"weights; set {key}=False"
        )
    try:
        step, _ = read_meta(source)
    except CheckpointError as e:
        raise CheckpointError(f"{key}=True: {source_key}={source}: {e}") from e
    path = os.path.join(os.path.abspath(source), "checkpoints", str(step))
    keys = saved_state_keys(path)
    if keys is not None and "ema" not in keys:  # unknown: the read names what is wrong
        raise CheckpointError(
            f"{key}=True: {source_key}={source} holds no EMA of the weights (its latest step "
            f"{path} was saved without one: that run trained with ema.decay=0); set {key}=False "
            "to start from its params, or name a run trained with ema.decay > 0"
        )
    return step


def shape_diff(expected, found) -> list[str]:
    """How `found` differs from `expected` (parameter pytrees): missing, extra and reshaped
    leaves, by path."""
    flat = lambda t: {jax.tree_util.keystr(p): tuple(x.shape) for p, x in  # noqa: E731
                      jax.tree_util.tree_flatten_with_path(t)[0]}  # fmt: skip
    a, b = flat(expected), flat(found)
    out = [f"no {k}" for k in a if k not in b]
    out += [f"extra {k}" for k in b if k not in a]
    out += [f"{k} has shape {b[k]}, expected {a[k]}" for k in a if k in b and a[k] != b[k]]
    return out


def load_params(run_dir: str, target_params, step: int | None = None, ema: bool = False):
    """Parameters of another run's checkpoint (for `init_from` and notebooks).

    `target_params` is a pytree of ShapeDtypeStructs (with shardings) of the parameters; only
    the `params` subtree of the saved state is read. With `ema`, the EMA of the weights where
    the run kept one (its trainable leaves) and the params elsewhere (frozen leaves), each
    leaf read once, in the target's dtype; a step without an EMA is an error.
    """
    directory = os.path.join(os.path.abspath(run_dir), "checkpoints")
    mgr = ocp.CheckpointManager(
        directory,
        options=_read_only_options(),
        item_names=("state", "data", "meta"),
    )
    step = mgr.latest_step() if step is None else step
    if step is None:
        mgr.close()
        raise CheckpointError(f"init_from: no checkpoint under {directory}")
    _require_step(mgr, directory, step)
    path = f"{directory}/{step}"

    def read(key, target):
        args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype),
                            target)  # fmt: skip
        item = ocp.args.PyTreeRestore(item={key: target}, restore_args={key: args},
                                      partial_restore=True)  # fmt: skip
        return mgr.restore(step, args=ocp.args.Composite(state=item))["state"][key]

    try:
        if ema and "ema" not in (saved_state_keys(path) or {"ema"}):  # unknown: try to read
            raise CheckpointError(
                f"checkpoint {path} holds no EMA of the weights (its run trained with "
                "ema.decay=0, or it is an import); read its params without ema"
            )
        params = read("ema" if ema else "params", target_params)
        if ema:  # a frozen leaf (LoRA's base) restores as None: the EMA keeps none of it
            frozen = _where_none(target_params, params)
            if frozen is not None:
                params = _fill(params, read("params", frozen))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"cannot read the {'EMA weights' if ema else 'params'} of checkpoint {path}: "
            f"{_describe(e, path)}." + _other_steps_hint(mgr, directory, step)
        ) from e
    finally:
        mgr.close()
    # partial_restore leaves target leaves the checkpoint lacks as ShapeDtypeStructs.
    missing = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
               if isinstance(x, jax.ShapeDtypeStruct)]  # fmt: skip
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(
            f"init_from: checkpoint {directory}/{step} has no params {missing[:5]}{more}; it "
            "holds a different model (or task) than the one being initialised"
        )
    return params


def _where_none(target, got):
    """The part of `target` (nested dicts) where the partial restore `got` of it is None."""
    if not isinstance(target, dict):
        return target if got is None else None
    sub = {k: _where_none(target[k], got[k]) for k in target}
    return {k: v for k, v in sub.items() if v is not None} or None


def _fill(got, more):
    """`got` with its None leaves taken from `more` (a sparse tree of the same keys)."""
    if more is None:
        return got
    if isinstance(got, dict):
        return {k: _fill(v, more.get(k)) for k, v in got.items()}
    return more if got is None else got


def load_model(run_dir: str, step: int | None = None, mesh=None, rules=None, ema: bool = False):
    """(ModelConfig, params, meta) of a run's checkpoint — for notebooks, eval and generation.

    The model config comes from the checkpoint's meta, so nothing else is needed. Params are
    placed replicated on one device unless a mesh (and logical-axis rules) is given. Any language
    model run loads: plain, LoRA (adapters merged) or PPO (its policy); a reward-model run is
    refused. `ema`: the run's EMA weights instead (`load_params`).
    """
    import flax.linen as nn
    import jax.numpy as jnp

    from flaxlm.models.config import ModelConfig
    from flaxlm.models.transformer import Transformer
    from flaxlm.train.state import unbox

    step, meta = read_meta(run_dir, step)
    if "model_config" not in meta:
        raise CheckpointError(
            f"{run_dir}: checkpoint meta has no model_config (task "
            f"{meta.get('task')!r}); use load_params with an explicit target"
        )
    if meta.get("head") == "scalar":
        raise CheckpointError(f"{run_dir}: a reward-model run (scalar head), not a language model")
    cfg = ModelConfig.from_dict(meta["model_config"])
    boxed = jax.eval_shape(
        lambda r: Transformer(cfg).init(r, jnp.zeros((1, 4), jnp.int32))["params"],
        jax.random.PRNGKey(0),
    )
    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: dev, unbox(boxed))
    else:
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), unbox(boxed), shardings
    )
    from flaxlm.alignment.common import load_lm_params  # LoRA / PPO trees (it imports us)

    return cfg, load_lm_params(run_dir, target, step, ema=ema), meta
