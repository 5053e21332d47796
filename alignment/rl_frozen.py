"""Frozen models of the alignment tasks: the reference policy, the reward model, a teacher.

Loaded from a run directory (LoRA adapters merged), sharded with the training run's logical
rules, optionally in bfloat16 or with int8 projection weights (`rollout.frozen_dtype`, DPO/KTO
`ref_dtype`, distillation's `teacher_dtype`): they are never differentiated, so lower precision
costs little and halves or quarters their memory. With `ema=True` they are the run's EMA
weights (`reward_from_ema`). Re-exported by alignment/rl_common.py; callers use
`rl_common.frozen_lm` (tests patch it there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxlm.alignment import common
from flaxlm.models import lora as lora_lib
from flaxlm.models import quant
from flaxlm.models.config import ModelConfig
from flaxlm.models.heads import scalar_model_fns
from flaxlm.train import checkpoint as ckpt_lib
from flaxlm.train.pretrain import model_fns
from flaxlm.train.state import param_shardings


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


def frozen_lm(source: str, mesh, rules, dtype: str = "float32", ema: bool = False,
              key: str = "frozen dtype"):  # fmt: skip
    """(cfg, apply, params) of a language model run (plain or LoRA-merged) or "hf:DIR", frozen,
    placed with the training rules; kept and computed in `dtype` (`_frozen`; `key`: the
    config key that set it, for errors). `ema`: the run's EMA weights (an HF source, or a run
    without them, is an error)."""
    meta = common.source_meta(source)
    if meta.get("model_config"):
        cfg = ModelConfig.from_dict(meta["model_config"])
    elif source.startswith(common.HF_PREFIX):
        from flaxlm.models import hf

        cfg = hf.load_config(source[len(common.HF_PREFIX) :])
    else:
        raise ValueError(f"{source}: no model_config in its checkpoint meta")
    _check_frozen_dtype(dtype, key)  # (before anything is loaded)
    init, _ = model_fns(cfg)
    params = common.load_lm_params(source, _placed_target(init, mesh, rules), ema=ema)
    cfg, params = _frozen(cfg, params, dtype)
    return cfg, model_fns(cfg)[1], params


def load_scalar_params(run_dir: str, target, ema: bool = False):
    """A scalar-head run's {"transformer", "head"} params (LoRA adapters merged) like `target`
    (`ema`: its EMA weights)."""
    step, meta = ckpt_lib.read_meta(run_dir)  # the params below come from this step
    if meta.get("head") != "scalar":
        raise ValueError(f"{run_dir}: not a reward-model run (meta head={meta.get('head')!r})")
    spec = lora_lib.LoraSpec(**meta["lora"]) if meta.get("lora", {}).get("rank") else None
    if spec is None:
        return ckpt_lib.load_params(run_dir, target, step, ema)
    adapters = common.replicated_like(lora_lib.abstract_adapters(target, spec), target)
    both = ckpt_lib.load_params(run_dir, {"base": target, "lora": adapters}, step, ema)
    return lora_lib.merge(both, spec)


def frozen_scalar(run_dir: str, mesh, rules, dtype: str = "float32", ema: bool = False,
                  key: str = "frozen dtype"):  # fmt: skip
    """(cfg, apply, params) of a reward-model run, frozen (see `frozen_lm`; `ema`: its EMA
    weights). The scalar head stays in the compute dtype with "int8"."""
    _check_frozen_dtype(dtype, key)
    cfg = ModelConfig.from_dict(ckpt_lib.read_meta(run_dir)[1]["model_config"])
    init, _ = scalar_model_fns(cfg)
    params = load_scalar_params(run_dir, _placed_target(init, mesh, rules), ema)
    cfg, params = _frozen(cfg, params, dtype)
    return cfg, scalar_model_fns(cfg)[1], params
