"""Readers of a run's checkpoint: meta, params and the whole model, never writing anything.

`read_meta` (with the tokenizer found again in a moved run), `run_steps`, `load_params`
(`init_from`, frozen models, notebooks; the EMA weights on request), `load_model` (inference:
eval, generate, notebooks), `check_ema_source` and `shape_diff`. They read a given or the
latest step and never fall back to another: their errors name the step directory and the
other steps there. Separate from the Checkpointer (train/checkpointer.py), which a training
run resumes with.
"""

from __future__ import annotations

import glob
import logging
import operator
import os

import jax
import orbax.checkpoint as ocp

from flaxlm.train import checkpoint_fingerprint as fingerprint
from flaxlm.train.checkpoint_inspect import (
    CheckpointError,
    _describe,
    _other_steps_hint,
    _require_step,
    saved_param_keys,
    saved_state_keys,
)
from flaxlm.train.checkpoint_orbax import _read_only_options

log = logging.getLogger("flaxlm")


def read_meta(ckpt_dir: str, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of a run's checkpoint without loading arrays (latest step by default)."""
    step = _step_arg(step, "read_meta")
    mgr = ocp.CheckpointManager(
        os.path.join(os.path.abspath(ckpt_dir), "checkpoints"),
        options=_read_only_options(),
        item_names=("state", "data", "meta"),
    )
    latest = mgr.latest_step()
    if latest is None:  # (a step asked for is not there either: say what the directory is)
        mgr.close()
        raise CheckpointError(f"no checkpoint under {ckpt_dir}/checkpoints{_not_a_run(ckpt_dir)}")
    step = latest if step is None else step
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


def _step_arg(step, where: str) -> int | None:
    """`step` as an int (None stays None): anything `operator.index` takes but a bool. A str or
    a float is refused, naming the argument: "50" was looked up as no step ("there is no step
    50; steps there: [50]") and 50.0 as a directory "50.0"."""
    if step is None:
        return None
    if not isinstance(step, bool):
        try:
            return operator.index(step)
        except TypeError:
            pass
    integral = (isinstance(step, str) and step.strip().isdecimal()) or (
        isinstance(step, float) and step.is_integer()
    )
    hint = f"; pass int({step!r})" if integral else ""
    raise TypeError(f"{where}: step={step!r} must be an int or None, not a "
                    f"{type(step).__name__}{hint}")  # fmt: skip


def _not_a_run(path: str) -> str:
    """A hint when `path`, which holds no checkpoint, is something else a reader may be pointed
    at: a Hugging Face directory, or a run's checkpoints/ (or step) directory; "" otherwise."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "config.json")) and glob.glob(
        os.path.join(glob.escape(path), "*.safetensors*")
    ):
        return (
            f"; {path} is a Hugging Face checkpoint directory (config.json, *.safetensors), not "
            "a flaxlm run: load it with flaxlm.models.hf.load_pretrained(dir), or make it a run "
            "with python -m flaxlm.models.hf import DIR RUN_DIR"
        )
    parent, name = os.path.split(path)
    if name.isdecimal() and os.path.basename(parent) == "checkpoints":
        run = os.path.dirname(parent)
        return f"; {path} is a step directory: pass the run directory {run} and step={int(name)}"
    steps = os.path.isdir(path) and any(
        d.isdecimal() and os.path.isdir(os.path.join(path, d, "meta")) for d in os.listdir(path)
    )  # (step directories: digits holding a meta item)
    if name == "checkpoints" or steps:
        return (
            f"; {path} looks like a run's checkpoints/ directory: pass the run directory {parent}"
        )
    return ""


def run_steps(run_dir: str) -> list[int]:
    """The saved steps of a run, newest first ([] when it has no checkpoint directory; an
    unfinished `<step>.orbax-checkpoint-tmp` is not one). Reads no meta or array, and lists
    the directory itself: constructing an orbax CheckpointManager is a barrier of all
    processes, so one made or not by timing (a workdir whose `checkpoints/` another process
    just created) would leave the processes waiting in different barriers."""
    directory = os.path.join(os.path.abspath(run_dir), "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted((int(d) for d in os.listdir(directory) if d.isdigit()), reverse=True)


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
    from flaxlm.train import checkpoint  # imports this module

    if not source:
        raise ValueError(f"{key}=True but {source_key} is not set: no run to take EMA weights from")
    if source.startswith("hf:"):
        raise CheckpointError(
            f"{key}=True: {source_key}={source} is an HF checkpoint, which holds no EMA of the "
            f"weights; set {key}=False"
        )
    try:
        step, _ = checkpoint.read_meta(source)  # the facade's: tests patch it there
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


def load_params(run_dir: str, target_params, step: int | None = None, ema: bool = False, *,
                key: str = "init_from"):  # fmt: skip
    """Parameters of another run's checkpoint (for `init_from`, frozen models and notebooks).

    `target_params` is a pytree of ShapeDtypeStructs (with shardings) of the parameters; only
    the `params` subtree of the saved state is read. With `ema`, the EMA of the weights where
    the run kept one (its trainable leaves) and the params elsewhere (frozen leaves), each
    leaf read once, in the target's dtype; a step without an EMA is an error. `key`: what the
    errors name as the reader ("init_from", "distill.teacher=RUN", ...).
    """
    step = _step_arg(step, key)
    directory = os.path.join(os.path.abspath(run_dir), "checkpoints")
    mgr = ocp.CheckpointManager(
        directory,
        options=_read_only_options(),
        item_names=("state", "data", "meta"),
    )
    latest = step is None
    newest = mgr.latest_step()
    if newest is None:
        mgr.close()
        raise CheckpointError(f"{key}: no checkpoint under {directory}{_not_a_run(run_dir)}")
    step = newest if step is None else step
    _require_step(mgr, directory, step)
    path = f"{directory}/{step}"

    saved_meta: list[dict] = []  # the step's meta, read once for both reads below

    def read(subtree: str, target):  # ("params" or "ema"; `key` is the reader's config key)
        args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype),
                            target)  # fmt: skip
        item = ocp.args.PyTreeRestore(item={subtree: target}, restore_args={subtree: args},
                                      partial_restore=True)  # fmt: skip
        got = mgr.restore(step, args=ocp.args.Composite(state=item))["state"][subtree]
        if not saved_meta:
            meta = ocp.args.Composite(meta=ocp.args.JsonRestore())
            saved_meta.append(mgr.restore(step, args=meta)["meta"])
        bad = fingerprint.mismatches(saved_meta[0], got, prefix=subtree)
        if bad:
            raise CheckpointError(
                fingerprint.describe(path, bad) + "." + _other_steps_hint(mgr, directory, step)
            )
        return got

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
    log.info("%s: read %s", key, path)
    if latest:
        warn_if_unfinished(run_dir, step, saved_meta[0] if saved_meta else {}, key)
    # partial_restore leaves target leaves the checkpoint lacks as ShapeDtypeStructs.
    missing = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
               if isinstance(x, jax.ShapeDtypeStruct)]  # fmt: skip
    if missing:
        nested = _nested_params(path, target_params)
        if nested:
            raise CheckpointError(
                f"{key}: checkpoint {path} is {nested}; this reader takes a plain language "
                "model's (at the top of params/): read it with flaxlm.alignment.common."
                "load_lm_params (adapters merged, the policy, the backbone), as init_from does"
            )
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{key}: checkpoint {directory}/{step} has no params {missing[:5]}{more}; it "
            "holds a different model (or task) than the one being read"
        )
    return params


# How the runs that wrap a language model keep its weights: the key under params/ -> the words.
_NESTED = {
    "base": "a LoRA run: its base weights are under params/base, the adapters under params/lora",
    "policy": "a PPO run: its policy's weights are under params/policy, the critic under "
              "params/value",
    "transformer": "a reward-model run (scalar head): its backbone's weights are under "
                   "params/transformer, the head under params/head",
}  # fmt: skip


_WARNED_UNFINISHED: set[tuple[str, int]] = set()  # (run, step) already warned about, per process


def warn_if_unfinished(run_dir: str, step: int, meta: dict, key: str) -> None:
    """Warns when the latest checkpoint of the run `key` reads stopped short of the run's own
    `total_steps`, and not because its data ended: a preempted (SIGTERM, time limit) or killed
    run, whose trainer may even have exited 0. A chain `pretrain && sft` went on from it with
    only "initialised params from RUN"."""
    from flaxlm.train.metrics import read_events  # (metrics imports checkpoint modules)

    total = ((meta or {}).get("config") or {}).get("total_steps")
    if not isinstance(total, int) or isinstance(total, bool) or step >= total:
        return
    try:
        events = read_events(run_dir)
    except (OSError, ValueError):
        events = []
    if any(e.get("event") == "data_end" and e.get("step") == step for e in events):
        return  # its finite data ended it there: that is the run's end
    if (os.path.abspath(run_dir), step) in _WARNED_UNFINISHED:  # (a policy and its reference)
        return
    _WARNED_UNFINISHED.add((os.path.abspath(run_dir), step))
    why = next((e.get("reason") for e in reversed(events)
                if e.get("event") == "preempted" and e.get("step") == step), None)  # fmt: skip
    log.warning(
        "%s: %s stopped at step %d of its total_steps=%d%s; reading that checkpoint (resume "
        "that run first if it was meant to train on).",
        key, run_dir, step, total, f" ({why})" if why else " (preempted or killed?)",
    )  # fmt: skip


def _nested_params(step_dir: str, target) -> str | None:
    """What wraps the weights of the step (`_NESTED`'s words) when they sit under a key that
    `target` (the tree being read) does not have; None otherwise."""
    keys = saved_param_keys(step_dir) or set()
    top = set(target) if isinstance(target, dict) else set()
    return next((what for k, what in _NESTED.items() if k in keys and k not in top), None)


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


class MeshError(ValueError):
    """A mesh (and sharding rules) that cannot hold a model's weights: a weight dimension does
    not split evenly over the mesh axes the rules put it on."""


def _check_mesh_fits(run_dir: str, boxed, shardings, mesh) -> None:
    """Refuses, before anything is read, a mesh that splits a weight dimension unevenly
    (mesh tensor=4 over 2 kv heads), naming the parameter, its dimension and the mesh axes:
    orbax's IndivisibleError surfaced from the read, reported as an unreadable checkpoint
    ("read another step or move it aside"), though every step fails the same way."""
    from flaxlm.models.sharding import uneven_split
    from flaxlm.train.state import unbox

    what = uneven_split(unbox(boxed), boxed, shardings, mesh)
    if what:
        raise MeshError(f"{run_dir}: {what}; read it under another mesh or sharding (python -m "
                        "flaxlm.generate: --mesh, --sharding)")  # fmt: skip


def lm_params_target(cfg, mesh=None, rules=None, label: str = ""):
    """ShapeDtypeStructs of a language model's params (`cfg`, a ModelConfig) with their
    shardings: one device, or `mesh`'s per the logical `rules` (a mesh the params cannot be
    split over is an error naming `label`) — what load_model restores into."""
    import flax.linen as nn
    import jax.numpy as jnp

    from flaxlm.models.transformer import Transformer
    from flaxlm.train.state import unbox

    boxed = jax.eval_shape(
        lambda r: Transformer(cfg).init(r, jnp.zeros((1, 4), jnp.int32))["params"],
        jax.random.PRNGKey(0),
    )
    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: dev, unbox(boxed))
    else:
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
        _check_mesh_fits(label, boxed, shardings, mesh)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), unbox(boxed), shardings
    )


def load_model(run_dir: str, step: int | None = None, mesh=None, rules=None, ema: bool = False):
    """(ModelConfig, params, meta) of a run's checkpoint — for notebooks, eval and generation.

    The model config comes from the checkpoint's meta, so nothing else is needed. Params are
    placed replicated on one device unless a mesh (and logical-axis rules) is given. Any language
    model run loads: plain, LoRA (adapters merged) or PPO (its policy); a reward-model run is
    refused. `ema`: the run's EMA weights instead (`load_params`). A Hugging Face directory or
    a run's checkpoints/ directory is refused (CheckpointError) with what to read it with.
    """

    from flaxlm.models.config import ModelConfig
    from flaxlm.train import checkpoint  # imports this module

    step = _step_arg(step, "load_model")  # (named here: read_meta's error would name read_meta)
    step, meta = checkpoint.read_meta(run_dir, step)  # the facade's: tests patch it there
    if "model_config" not in meta:
        raise CheckpointError(
            f"{run_dir}: checkpoint meta has no model_config (task "
            f"{meta.get('task')!r}); use load_params with an explicit target"
        )
    if meta.get("head") == "scalar":
        raise CheckpointError(f"{run_dir}: a reward-model run (scalar head), not a language model")
    cfg = ModelConfig.from_dict(meta["model_config"])
    target = lm_params_target(cfg, mesh, rules, run_dir)
    from flaxlm.alignment.common import load_lm_params  # LoRA / PPO trees (it imports us)

    return cfg, load_lm_params(run_dir, target, step, ema=ema), meta
