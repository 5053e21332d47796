"""Checkpoints: orbax CheckpointManager over `WORKDIR/checkpoints/<step>/`.

Each step directory holds three items:
    state  the TrainState (params, optimizer state, step, base RNG, guard counters), sharded
    data   the data iterator's state (JSON), so a resumed run sees exactly the next batches
    meta   JSON: the run's config, the model config and the flaxlm version — a checkpoint
           describes itself, so notebooks and `init_from` need nothing else — and a
           fingerprint of each array of the state
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
node that died mid-copy), or read back changed (a flipped bit, which TensorStore does not see:
every save records a fingerprint of each array in its meta, and every restore and reader
checks them, train/checkpoint_fingerprint.py). Resuming (`Checkpointer.restore_latest`) then
moves it aside to `WORKDIR/checkpoints_corrupt/<step>-<UTC time>/`, never deleting anything,
and resumes from the
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

The code lives in modules of its own; this one describes the format and re-exports every name
of the first five below (private ones included; tests/train/test_checkpoint_reexports.py), so
`from flaxlm.train import checkpoint` and `from flaxlm.train.checkpoint import ...` keep
working, and patching `checkpoint.read_meta` reaches the readers, which call it through this
module:
    train/checkpointer.py       Checkpointer: save, restore, resume with the corrupt-step fallback
    train/checkpoint_read.py    readers: read_meta, load_params, load_model, check_ema_source,
                                warn_if_unfinished
    train/checkpoint_compat.py  is a checkpoint this run's: meta_mismatch, init_from_model_changes,
                                config_changes
    train/checkpoint_inspect.py CheckpointError; a step's saved keys and why it did not read
    train/checkpoint_orbax.py   process-wide orbax settings (array handler, log filter)
    train/checkpoint_fingerprint.py  the arrays' fingerprints a save records and restores check
"""

from __future__ import annotations

from flaxlm.train.checkpoint_compat import ABSENT as ABSENT
from flaxlm.train.checkpoint_compat import CONTEXT_MODEL_KEYS as CONTEXT_MODEL_KEYS
from flaxlm.train.checkpoint_compat import EXECUTION_ONLY_MODEL_KEYS as EXECUTION_ONLY_MODEL_KEYS
from flaxlm.train.checkpoint_compat import INIT_FROM_FREE_MODEL_KEYS as INIT_FROM_FREE_MODEL_KEYS
from flaxlm.train.checkpoint_compat import RESUME_META_KEYS as RESUME_META_KEYS
from flaxlm.train.checkpoint_compat import _flat as _flat
from flaxlm.train.checkpoint_compat import _normal_model_config as _normal_model_config
from flaxlm.train.checkpoint_compat import config_changes as config_changes
from flaxlm.train.checkpoint_compat import init_from_model_changes as init_from_model_changes
from flaxlm.train.checkpoint_compat import (
    init_from_rope_original_len as init_from_rope_original_len,
)
from flaxlm.train.checkpoint_compat import meta_mismatch as meta_mismatch
from flaxlm.train.checkpoint_inspect import CheckpointError as CheckpointError
from flaxlm.train.checkpoint_inspect import _bad_file as _bad_file
from flaxlm.train.checkpoint_inspect import _describe as _describe
from flaxlm.train.checkpoint_inspect import _one_line as _one_line
from flaxlm.train.checkpoint_inspect import _other_steps_hint as _other_steps_hint
from flaxlm.train.checkpoint_inspect import _require_step as _require_step
from flaxlm.train.checkpoint_inspect import _saved_tree as _saved_tree
from flaxlm.train.checkpoint_inspect import permission_denied as permission_denied
from flaxlm.train.checkpoint_inspect import saved_param_keys as saved_param_keys
from flaxlm.train.checkpoint_inspect import saved_state_keys as saved_state_keys
from flaxlm.train.checkpoint_orbax import MIN_REPLICA_SLICE_BYTES as MIN_REPLICA_SLICE_BYTES
from flaxlm.train.checkpoint_orbax import _DropMessage as _DropMessage
from flaxlm.train.checkpoint_orbax import _NoReadOnlyNotice as _NoReadOnlyNotice
from flaxlm.train.checkpoint_orbax import _read_only_options as _read_only_options
from flaxlm.train.checkpoint_orbax import _register_array_handler as _register_array_handler
from flaxlm.train.checkpoint_orbax import quiet_orbax_logs as quiet_orbax_logs
from flaxlm.train.checkpoint_read import MeshError as MeshError
from flaxlm.train.checkpoint_read import _check_mesh_fits as _check_mesh_fits
from flaxlm.train.checkpoint_read import _fill as _fill
from flaxlm.train.checkpoint_read import _nested_params as _nested_params
from flaxlm.train.checkpoint_read import _not_a_run as _not_a_run
from flaxlm.train.checkpoint_read import _step_arg as _step_arg
from flaxlm.train.checkpoint_read import _where_none as _where_none
from flaxlm.train.checkpoint_read import check_ema_source as check_ema_source
from flaxlm.train.checkpoint_read import lm_params_target as lm_params_target
from flaxlm.train.checkpoint_read import load_model as load_model
from flaxlm.train.checkpoint_read import load_params as load_params
from flaxlm.train.checkpoint_read import located_tokenizer as located_tokenizer
from flaxlm.train.checkpoint_read import read_meta as read_meta
from flaxlm.train.checkpoint_read import run_steps as run_steps
from flaxlm.train.checkpoint_read import shape_diff as shape_diff
from flaxlm.train.checkpoint_read import warn_if_unfinished as warn_if_unfinished
from flaxlm.train.checkpointer import CORRUPT_DIR as CORRUPT_DIR
from flaxlm.train.checkpointer import ON_CORRUPT as ON_CORRUPT
from flaxlm.train.checkpointer import RESTORE_WAIT_ENV as RESTORE_WAIT_ENV
from flaxlm.train.checkpointer import Checkpointer as Checkpointer
from flaxlm.train.checkpointer import _agreements as _agreements
from flaxlm.train.checkpointer import _restore_agreement as _restore_agreement
from flaxlm.train.checkpointer import _restore_wait_s as _restore_wait_s
from flaxlm.train.checkpointer import log as log
