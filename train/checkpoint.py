"""Checkpoints: orbax CheckpointManager over `WORKDIR/checkpoints/<step>/`.

Each step directory holds three items:
    state  the TrainState (params, optimizer state, step, base RNG, guard counters), sharded
    data   the data iterator's state (JSON), so a resumed run sees exactly the next batches
    meta   JSON: the run's config, the model config and the flaxlm version — a checkpoint
           describes itself, so notebooks and `init_from` need nothing else
Saves are asynchronous (training continues while the write finishes) and atomic (orbax writes a
temporary directory and renames it), so a killed process never leaves a half checkpoint that
looks complete.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from flaxlm import __version__


class CheckpointError(RuntimeError):
    """A checkpoint could not be read; the message names the directory and the cause."""


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, every: int = 0):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep or None,
            enable_async_checkpointing=async_save,
            create=True,
            save_interval_steps=1,
        )
        self.every = every
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
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
        path = os.path.join(self.directory, str(step))
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # orbax raises many types; name the directory for the user
            raise CheckpointError(
                f"cannot restore checkpoint {path}: {type(e).__name__}: {e}. The directory may "
                "be corrupt or come from a different model/optimizer configuration; delete it "
                "to resume from an earlier step."
            ) from e
        return out["state"], dict(out["data"] or {}), dict(out["meta"] or {})

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
        raise CheckpointError(f"no checkpoint under {ckpt_dir}/checkpoints")
    try:
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
        raise CheckpointError(
            f"cannot read the meta of checkpoint {mgr.directory}/{step}: {type(e).__name__}: {e}"
        ) from e
    finally:
        mgr.close()
    return step, dict(meta)


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


def load_params(run_dir: str, target_params, step: int | None = None):
    """Parameters of another run's checkpoint (for `init_from` and notebooks).

    `target_params` is a pytree of ShapeDtypeStructs (with shardings) of the parameters; only
    the `params` subtree of the saved state is read.
    """
    directory = os.path.join(os.path.abspath(run_dir), "checkpoints")
    mgr = ocp.CheckpointManager(
        directory,
        options=_read_only_options(),
        item_names=("state", "data", "meta"),
    )
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"init_from: no checkpoint under {directory}")
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype), target_params
    )
    try:
        out = mgr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": target_params},
                    restore_args={"params": restore_args},
                    partial_restore=True,
                )
            ),
        )
    except Exception as e:
        raise CheckpointError(
            f"init_from: cannot read params of {directory}/{step}: {type(e).__name__}: {e}"
        ) from e
    finally:
        mgr.close()
    params = out["state"]["params"]
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


def load_model(run_dir: str, step: int | None = None, mesh=None, rules=None):
    """(ModelConfig, params, meta) of a run's checkpoint — for notebooks, eval and generation.

    The model config comes from the checkpoint's meta, so nothing else is needed. Params are
    placed replicated on one device unless a mesh (and logical-axis rules) is given. Any language
    model run loads: plain, LoRA (adapters merged) or PPO (its policy); a reward-model run is
    refused.
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

    return cfg, load_lm_params(run_dir, target, step), meta
