"""Frozen models of the alignment tasks: the reference policy, the reward model, a teacher.

Loaded from a run directory (LoRA adapters merged), sharded with the training run's logical
rules, optionally in bfloat16 or with int8 projection weights (`rollout.frozen_dtype`, DPO/KTO
`ref_dtype`, distillation's `teacher_dtype`): they are never differentiated, so lower precision
costs little and halves or quarters their memory. With `ema=True` they are the run's EMA
weights (`reward_from_ema`). Re-exported by alignment/rl_common.py; callers use
`rl_common.frozen_lm` (tests patch it there).

Which step of its source a frozen model is (`FrozenSources`): they are loaded again on every
start of a run, resumes included, so "the source's latest step" would silently be another
model once the source run trained on (a reference, a reward model or a teacher that changes
mid-run, and no bit-for-bit resume). A fresh start resolves each source's latest step and
records it in the run's checkpoint meta (`frozen_sources`: {config key: {"path", "step"}}); a
resume reads exactly the recorded step, and stops, naming the key, the run and both steps, when
that step is gone. A checkpoint written before steps were recorded resumes from the latest
step, with a warning.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp

from flaxlm.alignment import common
from flaxlm.models import lora as lora_lib
from flaxlm.models import quant
from flaxlm.models.config import ModelConfig
from flaxlm.models.heads import scalar_model_fns
from flaxlm.train import checkpoint as ckpt_lib
from flaxlm.train.checkpoint_read import run_steps
from flaxlm.train.pretrain import model_fns
from flaxlm.train.state import param_shardings

log = logging.getLogger("flaxlm")
FROZEN_SOURCES = "frozen_sources"  # checkpoint meta: {config key: {"path", "step"}}


def _same_path(a: str, b: str) -> bool:
    real = lambda p: os.path.realpath(os.path.expanduser(p))  # noqa: E731
    return real(a) == real(b)


def _recorded_sources(workdir: str | None):
    """(step, its meta's `frozen_sources` or None) of the newest checkpoint of `workdir` whose
    meta reads; None when there is none (a fresh start: the loop resumes nothing either)."""
    for step in run_steps(workdir) if workdir else []:
        try:
            meta = ckpt_lib.read_meta(workdir, step)[1]
        except ckpt_lib.CheckpointError:  # (the loop's resume moves or names it)
            continue
        return step, meta.get(FROZEN_SOURCES)
    return None


class FrozenSources:
    """The step each frozen model's source run is read at (module docstring): `sources` maps
    the config key that names it ("init_from" as the reference, "reward_from",
    "distill.teacher", "dpo.ref_from", ...) to its run; an empty or "hf:DIR" source has no
    steps and is skipped. On a fresh start (`workdir` without a checkpoint) the latest step;
    on a resume the step its checkpoint meta records. `step(key)` for the loads, `meta()` for
    the task's model_meta (so every checkpoint of the run records the same steps)."""

    def __init__(self, workdir: str | None, sources: dict[str, str]):
        self.steps: dict[str, int] = {}
        self.paths: dict[str, str] = {}
        recorded = _recorded_sources(workdir)
        for key, path in sources.items():
            if path and not path.startswith(common.HF_PREFIX):
                self.steps[key] = _source_step(key, path, recorded, workdir)
                self.paths[key] = path

    def step(self, key: str) -> int | None:
        return self.steps.get(key)

    def meta(self) -> dict:
        return {FROZEN_SOURCES: {k: {"path": self.paths[k], "step": s}
                                 for k, s in self.steps.items()}}  # fmt: skip


def _source_step(key: str, path: str, recorded, workdir) -> int:
    """The step of `key`=`path` this start reads (`FrozenSources`)."""
    steps = run_steps(path)
    latest = steps[0] if steps else None
    if latest is None:
        raise ckpt_lib.CheckpointError(f"{key}={path}: no checkpoint under {path}/checkpoints")
    if recorded is None:  # a fresh start
        return latest
    ckpt_step, pins = recorded
    pin = (pins or {}).get(key)
    if pin is None or not _same_path(pin["path"], path):
        why = (
            "records no step of its frozen models (it was written before they were recorded)"
            if pins is None else f"records no step of {key}" if pin is None
            else f"recorded {key}={pin['path']}, another run"
        )  # fmt: skip
        log.warning(
            "%s=%s: checkpoint %d of %s %s; reading that run's latest step %d, which need not "
            "be the one this run started from (recorded from now on)",
            key, path, ckpt_step, workdir, why, latest,
        )  # fmt: skip
        return latest
    step = int(pin["step"])
    if step not in steps:
        raise ckpt_lib.CheckpointError(
            f"{key}={path}: this run read its step {step} (recorded in checkpoint {ckpt_step} "
            f"of {workdir}), and that step is gone; the run's latest step is now {latest} "
            f"(steps there: {sorted(steps)}). Resuming with another step would swap the model "
            f"mid-run: put step {step} back under {path}/checkpoints, or start afresh in "
            "another workdir."
        )
    if step != latest:
        log.info("%s=%s: reading step %d, as this run started with (its latest is %d)",
                 key, path, step, latest)  # fmt: skip
    return step


def _placed_target(init_params, mesh, rules):
    """ShapeDtypeStructs of `init_params`'s (unboxed) params with the training shardings: a
    frozen model is read straight into them, each device (of each process) reading its part."""
    abstract, shardings = param_shardings(init_params, jax.random.PRNGKey(0), mesh, rules)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings
    )


def _cast(params, dtype: str):
    """Floating params cast to `dtype`, each keeping its sharding (one jitted call)."""
    dt = jnp.dtype(dtype)
    cast = lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    shardings = jax.tree.map(lambda x: x.sharding, params)
    return jax.jit(lambda p: jax.tree.map(cast, p), out_shardings=shardings)(params)


def reward_from_ema(config) -> bool:
    """Whether the reward model (`reward_from`: PPO's scorer and critic start, GRPO's and
    online DPO's "rm") is that run's EMA weights (`reward_from_ema`) instead of its params.
    Checked when set, before anything is loaded: an unset `reward_from` or a run saved without
    an EMA is an error naming the key and the run."""
    if not config.get("reward_from_ema", False):  # (configs older than the key: params)
        return False
    ckpt_lib.check_ema_source(config.get("reward_from", ""), "reward_from_ema", "reward_from")
    return True


FROZEN_DTYPES = ("float32", "bfloat16", "int8")


def _check_frozen_dtype(dtype: str, key: str) -> None:
    if dtype not in FROZEN_DTYPES:
        raise ValueError(f"{key}={dtype!r}; expected one of {FROZEN_DTYPES}")


def _frozen(cfg: ModelConfig, params, dtype: str):
    """(cfg, params) of a frozen model kept in `dtype`: float32 or bfloat16 cast; "int8":
    bfloat16 compute with int8 projection weights and a scale per output channel
    (models/quant.py, as int8 decoding): a quarter of float32's bytes for the matrices, each
    matmul's output scaled (no dequantized copy)."""
    compute = "bfloat16" if dtype == "int8" else dtype
    if dtype == "int8":  # from the stored weights, then the rest cast (as int8 decoding does)
        params = jax.jit(quant.quantize_params)(params)
    return cfg.replace(dtype=compute, param_dtype=compute), _cast(params, compute)


def _source_meta(source: str, step: int | None, where: str) -> tuple[int | None, dict]:
    """(step, meta) of a flaxlm run at `step` (None: its latest, warned about when the run
    stopped short of its total_steps: `warn_if_unfinished`), errors prefixed with `where` (the
    config key and the run); (None, {}) for "hf:DIR"."""
    if source.startswith(common.HF_PREFIX):
        return None, {}
    try:
        found, meta = ckpt_lib.read_meta(source, step)
    except ckpt_lib.CheckpointError as e:
        raise ckpt_lib.CheckpointError(f"{where}: {e}") from e
    if step is None:
        ckpt_lib.warn_if_unfinished(source, found, meta, where)
    return found, meta


def frozen_lm(source: str, mesh, rules, dtype: str = "float32", ema: bool = False,
              key: str = "frozen dtype", *, source_key: str = "",
              step: int | None = None):  # fmt: skip
    """(cfg, apply, params) of a language model run (plain or LoRA-merged) or "hf:DIR", frozen,
    placed with the training rules; kept and computed in `dtype` (`_frozen`; `key`: the
    config key that set it, for errors). `ema`: the run's EMA weights (an HF source, or a run
    without them, is an error). `step`: the run's step to read (None: its latest;
    `FrozenSources.step`); `source_key`: the config key that named the run, for errors."""
    where = f"{source_key}={source}" if source_key else source
    step, meta = _source_meta(source, step, where)
    if meta.get("head") == "scalar":  # (its backbone has no lm_head: the read fails on that)
        raise ValueError(f"{where}: a reward-model run (scalar head), not a language model")
    if meta.get("model_config"):
        cfg = ModelConfig.from_dict(meta["model_config"])
    elif source.startswith(common.HF_PREFIX):
        from flaxlm.models import hf

        cfg = hf.load_config(source[len(common.HF_PREFIX) :])
    else:
        raise ValueError(f"{where}: no model_config in its checkpoint meta")
    _check_frozen_dtype(dtype, key)  # (before anything is loaded)
    init, _ = model_fns(cfg)
    params = common.load_lm_params(source, _placed_target(init, mesh, rules), step, ema=ema,
                                   key=where)  # fmt: skip
    cfg, params = _frozen(cfg, params, dtype)
    return cfg, model_fns(cfg)[1], params


def load_scalar_params(run_dir: str, target, ema: bool = False, step: int | None = None, *,
                       source_key: str = ""):  # fmt: skip
    """A scalar-head run's {"transformer", "head"} params (LoRA adapters merged) like `target`
    (`ema`: its EMA weights; `step`: None = the latest; `source_key`: the config key that
    named the run, for errors)."""
    where = f"{source_key}={run_dir}" if source_key else run_dir
    step, meta = _source_meta(run_dir, step, where)  # the params below come from this step
    if meta.get("head") != "scalar":
        raise ValueError(f"{where}: not a reward-model run (meta head={meta.get('head')!r})")
    spec = lora_lib.LoraSpec(**meta["lora"]) if meta.get("lora", {}).get("rank") else None
    if spec is None:
        return ckpt_lib.load_params(run_dir, target, step, ema, key=where)
    adapters = common.replicated_like(lora_lib.abstract_adapters(target, spec), target)
    both = ckpt_lib.load_params(run_dir, {"base": target, "lora": adapters}, step, ema, key=where)
    return lora_lib.merge(both, spec)


def frozen_scalar(run_dir: str, mesh, rules, dtype: str = "float32", ema: bool = False,
                  key: str = "frozen dtype", *, source_key: str = "",
                  step: int | None = None):  # fmt: skip
    """(cfg, apply, params) of a reward-model run, frozen (see `frozen_lm`; `ema`: its EMA
    weights; `step`, `source_key` as there). The scalar head stays in the compute dtype with
    "int8"."""
    _check_frozen_dtype(dtype, key)
    where = f"{source_key}={run_dir}" if source_key else run_dir
    step, meta = _source_meta(run_dir, step, where)
    if meta.get("head") != "scalar":  # (before a target is built for it)
        raise ValueError(f"{where}: not a reward-model run (meta head={meta.get('head')!r})")
    cfg = ModelConfig.from_dict(meta["model_config"])
    init, _ = scalar_model_fns(cfg)
    params = load_scalar_params(run_dir, _placed_target(init, mesh, rules), ema, step,
                                source_key=source_key)  # fmt: skip
    cfg, params = _frozen(cfg, params, dtype)
    return cfg, scalar_model_fns(cfg)[1], params
