"""What the loop checks when a run starts or resumes (train/loop.py `_init_or_resume`).

On a resume: the checkpoint's saved config against this run's (`_report_config_changes`: each
changed key logged and recorded, data-order keys loudly, keys that only say how the data is
read at info, held-out data keys as such; data paths compared resolved, so the same files
written relative or absolute are no change) and its optimizer state against this
run's optimizer (`_refuse_another_optimizer`: an error naming the changed `opt.` keys). From
`init_from`: whether its EMA weights can be read (`init_from_ema`), and which model-config keys
differ from the source's (`_init_from_model_changes`: keys that change what the weights compute
are refused; RoPE scaling turned on without `rope_original_max_len` is named,
`_check_rope_original_len`).
"""

from __future__ import annotations

import logging
import os
import re

import jax

from flaxlm.train import checkpoint as ckpt_lib
from flaxlm.train import checkpoint_compat, checkpointer
from flaxlm.train.optim import make_optimizer, opt_config
from flaxlm.train.sweep_plan import ORDER_NEUTRAL_DATA_KEYS, RESULT_NEUTRAL_KEYS

log = logging.getLogger("flaxlm")


def init_from_ema(config) -> bool:
    """Whether the run starts from the EMA weights of its `init_from` run (`init_from_ema`,
    configs/common.py) instead of its params. Checked when set, before anything is built or
    compiled: an unset `init_from`, an HF checkpoint or a run saved without an EMA is an error
    naming the key and the run (`checkpoint.check_ema_source`). The tasks with a reference
    model (DPO, PPO, GRPO, online DPO) take that reference from the same weights: it is the
    policy the run starts from."""
    if not config.get("init_from_ema", False):  # (configs older than the key: params)
        return False
    ckpt_lib.check_ema_source(config.get("init_from", ""), "init_from_ema", "init_from")
    return True


# Keys whose change makes a resumed run draw other batches than the checkpoint's run would have.
DATA_ORDER_KEYS = ("seed", "batch_size", "seq_len")

# data.* keys that choose only the held-out data (pretraining's held-out text, the stages'
# held-out chats or pairs): the training batches continue exactly, the held-out metrics from
# here on measure other data. Warned as a changed key, not as a different data order.
EVAL_DATA_KEYS = ("data.eval_sources", "data.eval_batches", "data.eval")

# Keys whose values are comma-separated paths or globs (pretraining's with ":weight"; data/
# pipeline.py `parse_sources`): the same files spelled another way — relative against absolute,
# "~", through a symlink — are no change (`_same_paths`).
DATA_PATH_KEYS = ("data.sources", "data.eval_sources", "data.train", "data.eval",
                  "data.tokenizer", "data.cache_dir")  # fmt: skip

# "builtin:sft_train", "hf:DIR", "gs://bucket/x": a spec, not a local path; compared as written.
_SCHEME = re.compile(r"^[A-Za-z][\w+.-]*:")


def _path_entries(value) -> list[str] | None:
    """The entries of a path-list value, each local path resolved (`os.path.realpath` after
    "~", against this run's directory: the checkpoint records no other) and its ":weight" kept
    as written; None for a value that is not a string."""
    if not isinstance(value, str):
        return None
    out = []
    for entry in filter(None, (e.strip() for e in value.split(","))):
        path, sep, weight = entry.rpartition(":")
        try:
            float(weight)
        except ValueError:
            path, sep, weight = entry, "", ""  # no weight: a ':' of the spec or path itself
        if path and not _SCHEME.match(path):
            path = os.path.realpath(os.path.expanduser(path))
        out.append(path + sep + weight)
    return out


def _same_paths(key: str, old, new) -> bool:
    """Whether a changed `DATA_PATH_KEYS` value names the same paths, in the same order, with
    the same weights (the order and the weights decide the mixture's draws)."""
    if key not in DATA_PATH_KEYS:
        return False
    a, b = _path_entries(old), _path_entries(new)
    return a is not None and a == b


def _orders_data(key: str) -> bool:
    """Whether a config key can change which batches a resumed run draws."""
    return key in DATA_ORDER_KEYS or key.startswith("data.")


def _report_code_change(saved_meta: dict, step: int) -> None:
    """Says when checkpoint `step` was saved by another flaxlm commit than this process runs
    (`checkpointer.code_commit`): a changed schedule or default then trains the rest of the run,
    and nothing else records which code trained which steps."""
    then = (saved_meta or {}).get("flaxlm_commit")
    now = checkpointer.code_commit().get("flaxlm_commit")
    if now and then != now:
        log.warning("resume from step %d: the checkpoint was saved by flaxlm %s, this is %s: "
                    "the steps from here on train under this code", step,
                    f"commit {then}" if then else "from before commits were recorded",
                    now)  # fmt: skip


def _report_config_changes(config, saved: dict | None, step: int) -> dict:
    """Logs each key where this run's config differs from the one checkpoint `step` was saved
    with (`saved`: its meta's `config`; None for an older checkpoint without one); returns
    {key: (checkpoint's value, this run's)} for events.jsonl. Keys the checkpoint's config lacks
    (added to flaxlm since) are named together in one warning, and so are the keys this run's
    config lacks (removed since: read by nothing here, so neither a data-order change nor
    another result)."""
    if not isinstance(saved, dict):
        return {}
    changes = ckpt_lib.config_changes(saved, config.to_dict())
    for key, (old, new) in list(changes.items()):
        if _same_paths(key, old, new):
            log.info("resume: %s spelled differently (checkpoint %r, this run %r): the same "
                     "paths", key, old, new)  # fmt: skip
            del changes[key]
    data, added, gone = [], [], []
    for key, (old, new) in changes.items():
        if old == ckpt_lib.ABSENT and new != ckpt_lib.ABSENT:  # a key flaxlm added since the save
            added.append(f"{key}={new!r}")
            if _orders_data(key):
                data.append(key)
            continue
        if new == ckpt_lib.ABSENT and old != ckpt_lib.ABSENT:
            # a key flaxlm removed since the save (one no code read: the RL configs' data.shuffle,
            # distillation's rollout.empty_reward): this run cannot read it, so it changes neither
            # the data order nor the results (it was read as a changed data key)
            gone.append(f"{key}={old!r}")
            continue
        if key == "total_steps":  # extending a run is normal; its lr schedule now spans `new`
            log.info("resume: total_steps changed from %s to %s (the lr schedule now spans "
                     "%s steps)", old, new, new)  # fmt: skip
            continue
        if key in RESULT_NEUTRAL_KEYS or key in ORDER_NEUTRAL_DATA_KEYS:
            # a job's time limit, the tqdm bar, grain's threads: the same batches trained
            log.info("resume: %s changed from %s to %s", key, old, new)
            continue
        if key in EVAL_DATA_KEYS:
            log.warning("resume from step %d with a changed held-out data key: %s: checkpoint "
                        "%r, this run %r (the training data continues exactly; held-out "
                        "metrics from here on measure other data)", step, key, old,
                        new)  # fmt: skip
            continue
        log.warning("resume from step %d with a changed config key: %s: checkpoint %r, this "
                    "run %r", step, key, old, new)  # fmt: skip
        if _orders_data(key):
            data.append(key)
    if added:  # one line, not one warning each: 13 after a week of flaxlm changes
        log.warning("resume from step %d: %d config key(s) are new since the checkpoint was "
                    "saved (an older flaxlm), their values here apply from now on: %s", step,
                    len(added), ", ".join(added))  # fmt: skip
    if gone:
        log.warning("resume from step %d: %d config key(s) of the checkpoint no longer exist "
                    "(removed from flaxlm since, or not keys of this config): nothing here reads "
                    "them: %s", step, len(gone), ", ".join(gone))  # fmt: skip
    if data:
        log.warning("RESUME WITH A DIFFERENT DATA ORDER: %s changed since checkpoint %d: the "
                    "batches from here on are not those the checkpoint's run would have drawn "
                    "(the data does not continue exactly)", ", ".join(data), step)  # fmt: skip
    return changes


def _refuse_another_optimizer(ckpt, config, tx, target, trainable_mask) -> None:
    """Raises a CheckpointError naming the changed `opt.` keys when the latest checkpoint was
    saved with optimizer settings whose state does not fit this run's (another `opt.name`,
    `clip_norm` on or off, ...), before orbax fails on it with a dump of the two trees. Settings
    that keep the state's structure (lr, betas, weight_decay) resume, warned as changed keys."""
    step = ckpt.latest_step()
    saved = ((ckpt.read_step_meta(step) or {}).get("config") or {}).get("opt")
    if not isinstance(saved, dict):
        return
    changed = ckpt_lib.config_changes(saved, config.opt.to_dict())
    if not changed:
        return
    try:  # the checkpoint's optimizer, on this run's params: its state's shapes
        old = opt_config()
        for k, v in saved.items():
            if k in old:
                old[k] = v
        old.warmup_steps = 0  # the schedule is no part of the state: no warmup warning again
        old_tx, _ = make_optimizer(old, int(config.total_steps), trainable_mask)
        old_state = jax.eval_shape(old_tx.init, target.params)
    except Exception:  # a config this version cannot build: the restore decides
        return
    new_state = jax.eval_shape(tx.init, target.params)
    shapes = lambda t: [x.shape for x in jax.tree.leaves(t)]  # noqa: E731
    if jax.tree.structure(old_state) == jax.tree.structure(new_state) and (
        shapes(old_state) == shapes(new_state)
    ):
        return
    lines = "".join(f"\n  opt.{k}: checkpoint {a!r}, this run {b!r}"
                    for k, (a, b) in changed.items())  # fmt: skip
    raise ckpt_lib.CheckpointError(
        f"checkpoint {ckpt.directory}/{step} was saved with another optimizer: its state does "
        f"not fit this run's. The opt keys that changed:{lines}\nResume with the checkpoint's "
        "opt settings (its meta item holds its config), or start a new run in another workdir "
        "(init_from=<this workdir> starts it from these params). Nothing was moved."
    )


def _init_from_model_changes(config, task) -> dict:
    """{key: (init_from's value, this run's)} for each ModelConfig key where this run's model
    (`task.model_meta["model_config"]`) differs from its `init_from` run's (that run's meta),
    logged; one that changes what the loaded weights compute (an activation, a norm epsilon, a
    shape) is an error naming each key and both values (checkpoint.init_from_model_changes),
    before any weights are read: pretraining from a run with another `mlp_activation` used to load
    silently into another function. {} without init_from, for an HF source ("hf:DIR": its
    stage resolves the architecture from config.json) or where either side records none."""
    source = config.get("init_from", "")
    ours = task.model_meta.get("model_config")
    if not source or source.startswith("hf:") or not ours:
        return {}
    theirs = ckpt_lib.read_meta(source)[1].get("model_config")
    if not theirs:
        return {}
    changes = ckpt_lib.init_from_model_changes(theirs, ours, f"init_from={source}")
    _check_rope_original_len(config, theirs, ours, f"init_from={source}")
    if changes:
        context = any(k not in ckpt_lib.EXECUTION_ONLY_MODEL_KEYS for k in changes)
        log.log(logging.WARNING if context else logging.INFO,
                "init_from=%s: this run's model config differs from the source's: %s", source,
                "; ".join(f"model.{k}: {a!r} there, {b!r} here"
                          for k, (a, b) in changes.items()))  # fmt: skip
    return changes


def _check_rope_original_len(config, theirs: dict, ours: dict, where: str) -> None:
    """A run whose model is its config's own (pretraining continued from `init_from`) and turns
    on llama3/yarn/longrope scaling over an unscaled source: without model.rope_original_max_len
    it is an error naming the value to set (the source's max_seq_len) — the model was built from
    the config before this, too late to take that default, and the ModelConfig default 8192
    used to apply silently; set larger than that, a warning. The alignment stages build their
    model over the source's (`alignment.common.with_model_keys_set`), which defaults and warns."""
    from flaxlm.configs.common import model_keys_set, to_model_config
    from flaxlm.models.config import ModelConfig

    try:
        own = to_model_config(config.model) == ModelConfig.from_dict(ours)
    except Exception:  # no model section of its own, or an older meta's keys
        return
    if not own:
        return
    set_here = "rope_original_max_len" in model_keys_set(config)
    original, note = checkpoint_compat.init_from_rope_original_len(theirs, ours, set_here, where)
    if original is not None and original != ours["rope_original_max_len"]:
        raise ValueError(
            f"{where}: model.rope_scaling={ours['rope_scaling']!r} is turned on over a source "
            f"trained at max_seq_len {original} without model.rope_original_max_len (the "
            f"default {ours['rope_original_max_len']} would apply): set "
            f"--config.model.rope_original_max_len={original}, the source's context, or the "
            "original context you mean"
        )
    if note and original is None:
        log.warning("%s", note)
