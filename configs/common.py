"""Shared pieces of config files: argument parsing, the model section, the trainer sections.

A config file exposes `get_config(arg)` returning a locked ConfigDict and, optionally,
`sweep(add, arg)`. `arg` is big_vision's "k=v,k2=v2" string (`configs/pretrain.py:variant=tiny`),
parsed against typed defaults so a typo fails loudly. `runlocal=True` shrinks a config to run on a
laptop CPU in minutes.
"""

from __future__ import annotations

import dataclasses
import difflib

import ml_collections

from flaxlm.models.config import ModelConfig, get_variant
from flaxlm.train.ema import ema_config
from flaxlm.train.losses import MOE_AUX, MOE_Z
from flaxlm.train.optim import opt_config
from flaxlm.train.step import guard_config


def did_you_mean(name: str, known, prefix: str = "") -> str:
    """The closest of `known` to a misspelt `name` as " (did you mean 'PREFIXx'?)", else ""."""
    close = difflib.get_close_matches(name, [str(k) for k in known], n=1)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def _hint(name: str, node, prefix: str) -> str:
    return did_you_mean(name, node, prefix) if isinstance(node, ml_collections.ConfigDict) else ""


def lookup(table: dict, name: str, what: str):
    """table[name] for an arg value such as `variant=125m`: an unknown name is an error listing
    the known ones (a bare KeyError 'huge' did not say which arg was wrong)."""
    if name not in table:
        raise KeyError(
            f"config arg: unknown {what} {name!r}{did_you_mean(name, table)}; known: {list(table)}"
        )
    return table[name]


def _convert(value: str, like):
    if isinstance(like, bool):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if isinstance(like, int):
        return int(value)
    if isinstance(like, float):
        return float(value)
    return value


def override(c: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Sets {"a.b": value} on a locked config in place (and returns it) — the Python-side twin of
    `--config.a.b=value`: the key must already exist, so a typo fails naming the key."""
    with c.unlocked():
        for key, value in overrides.items():
            node = c
            *path, last = key.split(".")
            prefix = ""  # the sections walked so far, "opt." — for the closest-key hint
            for p in path:
                if not isinstance(node, ml_collections.ConfigDict) or p not in node:
                    hint = _hint(p, node, prefix)
                    raise KeyError(f"config has no key {key!r} (no section {p!r}){hint}")
                node, prefix = node[p], prefix + p + "."
            if not isinstance(node, ml_collections.ConfigDict) or last not in node:
                raise KeyError(f"config has no key {key!r}{_hint(last, node, prefix)}")
            node[last] = value
    note_model_keys_given(c, overrides)
    return c


def note_model_keys_given(c: ml_collections.ConfigDict, overrides) -> None:
    """Adds the `model.X` keys among `overrides` (dotted names: `override`'s, or the
    `--config.` flags' `config_flags.get_override_values`) to `c.model_keys_given`, which
    `model_keys_set` reads: a key given equal to the variant's default is still this run's
    (over an init_from source whose value differs)."""
    if "model_keys_given" not in c:  # a config without the trainer sections
        return
    given = {k[len("model.") :] for k in overrides if k.startswith("model.")}
    if given - set(c.model_keys_given):
        with c.unlocked():
            c.model_keys_given = tuple(sorted(given | set(c.model_keys_given)))


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses "k=v,k2=v2" into a ConfigDict typed like `defaults`; unknown keys are errors."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise KeyError(
                f"config arg: unknown key {key!r}{did_you_mean(key, defaults)} in {arg!r}; "
                f"known: {sorted(defaults)}"
            )
        if not sep:  # bare "runlocal" means runlocal=True
            value = "true"
        try:
            out[key] = _convert(value.strip(), defaults[key])
        except ValueError as e:
            raise ValueError(f"config arg {key}={value!r}: {e}") from None
    return out


def model_config(variant: str, **overrides) -> ml_collections.ConfigDict:
    """The `model` section: every ModelConfig field, starting from a named variant.

    Field meanings are documented on `flaxlm.models.config.ModelConfig`.
    """
    return ml_collections.ConfigDict(dataclasses.asdict(get_variant(variant, **overrides)))


def to_model_config(section) -> ModelConfig:
    return ModelConfig.from_dict(section.to_dict() if hasattr(section, "to_dict") else section)


def trainer_config(total_steps: int, batch_size: int, seq_len: int) -> ml_collections.ConfigDict:
    """Keys every task shares: length, batch, mesh, optimizer, guard, logging, checkpoints."""
    if total_steps < 1:  # `steps=-300` (a typo) would build a run that never trains
        raise ValueError(f"config: total_steps={total_steps} must be >= 1 (the steps arg: 0 = "
                         "the variant's default)")  # fmt: skip
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init and data order
    c.total_steps = total_steps  # optimizer steps of the run (the schedule decays over them)
    c.batch_size = batch_size  # global batch in rows (all processes together)
    c.seq_len = seq_len  # tokens per row
    # -1: the rest; context > 1 splits each sequence over that many devices (long contexts)
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "context": 1, "tensor": 1})
    c.sharding = "fsdp"  # logical→mesh rules preset: dp | fsdp | fsdp_tp
    c.opt = opt_config()  # optimizer and schedule (train/optim.py)
    c.guard = guard_config()  # NaN / spike handling (train/step.py)
    c.ema = ema_config()  # EMA of the weights (train/ema.py); decay 0 = none
    # steps between metric fetches / log lines, >= 1 (the only host syncs, and where the guard
    # decides on rollbacks; with several processes also where they agree on stopping: SIGTERM,
    # end of data — train/stopping.py)
    c.log_every = 10
    c.eval_every = 200  # steps between held-out evaluations (0 = never)
    c.eval_at_start = True  # also evaluate the initial model (a baseline for the curves)
    c.ckpt_every = 500  # steps between checkpoints, and at the last step (0 = none but on SIGTERM)
    c.keep_ckpts = 3  # newest checkpoints kept on disk (0 keeps every checkpoint)
    c.async_ckpt = True  # write checkpoints in the background
    # Resuming when the latest checkpoint cannot be restored (a truncated or missing file):
    # "fallback" moves it to WORKDIR/checkpoints_corrupt/<step>-<UTC time>/ (nothing deleted),
    # warns and resumes from the next newest readable step; "fail" stops with an error, nothing
    # moved. When no step restores, both stop and move nothing.
    c.ckpt_on_corrupt = "fallback"
    # A run directory whose latest params start this run, or hf:DIR for an HF checkpoint
    # ("" = fresh init)
    c.init_from = ""
    # True: start from init_from's EMA weights (a run trained with ema.decay > 0; train/ema.py)
    # instead of its params; DPO/PPO/GRPO/online DPO's reference is then that EMA too
    c.init_from_ema = False
    # A run whose whole training state at RUN@STEP (or RUN's latest) starts this run: params,
    # optimizer, step, EMA, data position — then this run's own schedule, total_steps and data
    # (a WSD cooldown, an annealing mixture; train/branch.py). "" = no branch
    c.branch_from = ""
    # continue: the source's place in its data (the same data) | restart: this run's data
    # from its beginning (another mixture)
    c.branch_data = "continue"
    # The `model.` keys this run gave (`--config.model.X=...`, recorded by train/main.py, and
    # `override`): with init_from they apply over the source's even when equal to the variant's
    # default; () = none or unknown (`model_keys_set` also diffs against the variant)
    c.model_keys_given = ()
    # Wall-clock limit in minutes since the process started (0 = none): past it the run stops
    # as on SIGTERM — a checkpoint (PPO/GRPO: at the rollout's end), a clean exit — so a job
    # resubmitted after a cluster's time limit resumes bit for bit (train/stopping.py). Leave
    # the save's time below the job's limit.
    c.max_runtime_minutes = 0.0
    c.progress_bar = True  # tqdm bar on stderr
    c.peak_tflops = 0.0  # per-chip peak TFLOP/s for MFU (> 0 overrides the built-in table)
    return c


def router_loss_keys(loss: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """`loss` (a new section when None) with the router-loss keys added: every task that
    trains a model with experts adds them to its loss (train/losses.py `router_coefs`), so
    each config lists them where `--config.loss.moe_aux=...` can set them."""
    loss = ml_collections.ConfigDict() if loss is None else loss
    # models with experts (model.n_experts > 0; models/moe.py): router load-balancing loss
    # (Switch; 1 when balanced) and router z-loss (ST-MoE) coefficients
    loss.moe_aux = MOE_AUX
    loss.moe_z = MOE_Z
    return loss


def _default_model_sections(config) -> list[dict]:
    """The `model` sections the config file builds by itself, one per `variant` arg
    (`flaxlm.configs.<task>.get_config("variant=...")`; the variants' own configs when the
    task has no config module there)."""
    import importlib

    from flaxlm.models.config import VARIANTS

    out = []
    try:
        module = importlib.import_module(f"flaxlm.configs.{config.get('task', '')}")
    except ImportError:
        module = None
    for name in VARIANTS:
        try:
            out.append(module.get_config(f"variant={name}").model.to_dict())
        except Exception:  # no such module or arg, a variant it does not size
            continue
    if not out:
        out = [model_config(name).to_dict() for name in VARIANTS]
    return [to_model_config(m).to_dict() for m in out]


def model_keys_set(config) -> dict:
    """{key: value} of the `model.` keys this run's config sets itself: those it records as
    given (`model_keys_given`: `--config.model.X=...` through train/main.py,
    `override(config, {"model.X": ...})`), and those where `config.model` differs from the model
    section its config file builds for the variant closest to it (a Python config file or an
    older config that edits config.model directly; the stage configs take `model` from their
    `variant` arg, which the config does not record; two variants differ in several shape keys,
    so the closest one is the config's unless most of them were set)."""
    ours = to_model_config(config.model).to_dict()
    best = None
    for default in _default_model_sections(config):
        diff = {k: v for k, v in ours.items() if default.get(k) != v}
        if best is None or len(diff) < len(best):
            best = diff
    given = {k: ours[k] for k in config.get("model_keys_given", ()) if k in ours}
    return {**(best or {}), **given}
