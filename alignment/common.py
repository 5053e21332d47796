"""What every alignment task (SFT, reward model, DPO, ...) needs besides its loss.

  * `records(spec, data_cfg, report)` (`iter_records`: read as consumed): chat / preference
    records from jsonl or parquet files, or from the built-in world ("builtin:sft_train",
    "builtin:preferences_heldout", ...);
  * `resolve_tokenizer` / `resolve_model_config`: from the config, the `init_from` checkpoint's
    meta (where pretraining records its tokenizer), an HF directory, or the built-in world (the
    tokenizer half lives in run_tokenizer.py, re-exported here);
  * `load_lm_params(source, target)`: a language model's params from a flaxlm run (plain, LoRA —
    merged — or the backbone of a scalar-head run) or from an HF checkpoint ("hf:DIR");
    `ema=True`: the run's EMA weights (train/ema.py);
  * `init_hooks(kind, spec)`: the loop Task's `load_init_params` / `init_from_transform`
    that put those params into the task's own param tree ({"transformer", "head"}, LoRA's
    {"base", "lora"}; a reward model's head too when `init_from` is one);
    `load_policy(run_dir)`: (cfg, plain params, meta) of any LM run.

`init_from` is a flaxlm run directory, or "hf:DIR" for an imported HF checkpoint
(flaxlm.models.hf.load_pretrained). `init_from_ema=True` starts from that run's EMA weights
instead (checked in `resolve_source`, before anything is loaded: train/loop.py `init_from_ema`).
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flaxlm.alignment.run_tokenizer import (  # noqa: F401 (re-exported: the tokenizer half)
    HF_PREFIX,
    TOKENIZER_PROBE,
    check_same_chat_template,
    check_same_tokenizer,
    resolve_tokenizer,
    save_tokenizer,
    source_meta,
    source_tokenizer_path,
    tokenizer_meta,
)
from flaxlm.configs.common import model_keys_set, to_model_config  # noqa: F401 (model_keys_set: its API)
from flaxlm.data import formats as F
from flaxlm.data.source_errors import DataError
from flaxlm.data.source_paths import expand_paths
from flaxlm.models import lora as lora_lib
from flaxlm.models.config import ModelConfig, check_trainable_dtypes, rows_past_max_seq_len
from flaxlm.models.sharding import check_batch_divides
from flaxlm.train import checkpoint as ckpt_lib
from flaxlm.train import loop
from flaxlm.train.checkpoint_compat import init_from_rope_original_len

log = logging.getLogger("flaxlm")
_WORLDS: dict = {}


def data_config(train: str, eval_: str) -> ml_collections.ConfigDict:
    """The `data` section shared by alignment configs."""
    c = ml_collections.ConfigDict()
    c.train = train  # comma-separated jsonl/parquet globs, or builtin:<world split>
    c.eval = eval_  # held-out records in the same form ("" = no held-out eval)
    c.world = "demo"  # built-in world preset used by builtin:<split> (data/synthetic.py)
    c.world_seed = 0  # ...and its seed (pretraining on the built-in corpus uses demo/0)
    c.tokenizer = ""  # .model path; "" = init_from's tokenizer, else the built-in one
    # extra variables for a Jinja chat template, a JSON object, e.g. '{"enable_thinking": false}'
    # (Qwen3); "" = the init_from run's (its meta records what it trained with)
    c.chat_template_kwargs = ""
    c.builtin_vocab_size = 2048  # vocab of the tokenizer trained on the built-in corpus
    c.cache_dir = "~/.cache/flaxlm"  # where that tokenizer is cached
    c.fields = F.fields_config()  # record field names (data/formats.py)
    c.overlength = "truncate_left"  # truncate_left (cut oldest prompt tokens) | drop
    c.strict = False  # True: the first bad record raises with file:line
    c.shuffle = True  # reshuffle training examples every epoch
    # A resume whose data.train files changed since the checkpoint: "error" stops naming them
    # (the saved position indexes the old records' order), "warn" resumes there anyway
    c.on_changed_sources = "error"
    return c


def no_usable(config, what: str, report: F.DataReport, why: str = "") -> DataError:
    """The error of a data.train that gave no usable `what` (examples, pairs, prompts): a
    DataError (one line from the trainer CLI) saying what became of its records, reason by
    reason with a file:line example (`DataReport.dropped_summary`); `why` first, when the
    stage knows more (GKD's mix needs completions)."""
    return DataError(f"data.train={config.data.train!r}: no usable {what}{why}: "
                       f"{report.dropped_summary()}")  # fmt: skip


def train_source_check(config) -> dict:
    """The training batches' keyword arguments for checking, at a resume, that data.train's
    files hold what the checkpoint's run read (data/chat_batches.py `source_fingerprints`):
    per part of data.train (a glob sees a file added under it), per `data.on_changed_sources`
    (configs older than the key: "error")."""
    return {"sources": config.data.train,
            "on_changed_sources": config.data.get("on_changed_sources", "error")}  # fmt: skip


def world(preset: str, seed: int):
    """The built-in world (cached per process)."""
    from flaxlm.data import synthetic

    key = (preset, seed)
    if key not in _WORLDS:
        _WORLDS[key] = synthetic.build_world(preset, seed=seed)
    return _WORLDS[key]


def records(spec: str, data_cfg, report: F.DataReport) -> list[tuple[dict, str]]:
    """(record, location) pairs of every source in `spec` (see `data_config`), as a list."""
    return list(iter_records(spec, data_cfg, report))


def iter_records(spec: str, data_cfg, report: F.DataReport) -> Iterator[tuple[dict, str]]:
    """(record, location) pairs of every source in `spec`, read as they are consumed: a stage
    that renders each record into a smaller example (SFT, pairs, KTO) never holds every raw
    record at once. A file that several parts match is read once, where it first appears,
    with a warning naming it (`train/*.jsonl,train/extra.jsonl` read extra.jsonl twice, as
    pretraining's paths do not)."""
    seen = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part.startswith("builtin:"):
            name = part.split(":", 1)[1]
            w = world(data_cfg.world, data_cfg.world_seed)
            if not isinstance(getattr(w, name, None), list):
                raise ValueError(f"data: {part!r} is not a record split of the built-in world")
            rows = getattr(w, name)
            report.read += len(rows)
            yield from ((r, f"{part}:{i + 1}") for i, r in enumerate(rows))
        else:
            paths = expand_paths(part)
            again = [p for p in paths if os.path.realpath(p) in seen]
            if again:
                log.warning("data: %s named again by %r; read once", ", ".join(again), part)
            seen.update(os.path.realpath(p) for p in paths)
            yield from F.read_records([p for p in paths if p not in again], report)


# ---------------------------------------------------------------------------------------------
# Tokenizer, model config


def resolve_model_config(config, meta: dict) -> ModelConfig:
    """The init_from checkpoint's architecture (its meta, or HF config.json), else config.model.

    Over a source's architecture go the `model.` keys this run's config sets
    (`model_keys_set`): the execution ones (`remat_policy`, `dtype`, `attention_impl`, ...)
    and the context-length ones (`max_seq_len`, `rope_scaling`, ...: long-context fine-tuning),
    each logged; one that would change what the source's weights compute (`d_model`,
    `mlp_activation`, `norm_eps`, ...) and differs from the source's is an error naming each
    key and both values (train/checkpoint.py `init_from_model_changes`). They used to be
    dropped silently, and the checkpoint's model_config then named a model other than the
    config's. Rows of `seq_len` past its max_seq_len are warned about (`rows_past_max_seq_len`:
    a long-context run that forgot `model.max_seq_len` trained without a word)."""
    cfg = _source_model_config(config, meta)
    check_trainable_dtypes(cfg)
    if why := rows_past_max_seq_len(cfg, config.get("seq_len", 0)):
        log.warning("%s", why)
    return cfg


def _source_model_config(config, meta: dict) -> ModelConfig:
    if meta.get("model_config"):
        source = ModelConfig.from_dict(meta["model_config"])
    elif config.init_from.startswith(HF_PREFIX):
        from flaxlm.models import hf

        source = hf.load_config(config.init_from[len(HF_PREFIX) :])
    else:
        return to_model_config(config.model)
    return with_model_keys_set(config, source)


# Keys a user sets to choose how a model runs, which the source's value silently overrode when
# this run's config held the variant's default (`_warn_kept_source_keys`).
# (Not dtype: a bfloat16 pretraining run's SFT would warn at every stage; a float16 source is
# refused by `check_trainable_dtypes`, naming the key.)
_KEPT_SOURCE_NOTICE_KEYS = ("attention_impl", "flash_block", "remat_policy", "join_projections")


def _warn_kept_source_keys(config, base: dict, keys_set: dict, where: str) -> None:
    """Warns where init_from's value of an execution key is kept over a different one in this
    run's config: a value equal to the variant's default is not known to be this run's choice
    (`model_keys_set`), so `config.model.attention_impl = "xla"` typed in a notebook, the
    default, was dropped for a source's "cudnn" without a word. `--config.model.X` and
    `override(config, {"model.X": ...})` record the choice."""
    ours = to_model_config(config.model).to_dict()
    kept = {k: (base[k], ours[k]) for k in _KEPT_SOURCE_NOTICE_KEYS
            if k in base and k not in keys_set and ours.get(k) != base[k]}  # fmt: skip
    if kept:
        said = ", ".join(
            f"model.{k}={src!r} (this config: {cfg!r})" for k, (src, cfg) in kept.items()
        )
        log.warning("%s: keeps the source's %s; to use this config's value, set it with "
                    "--config.model.KEY=VALUE or configs.common.override(config, {'model.KEY': "
                    "VALUE}) (a plain assignment equal to the variant's default is not told "
                    "apart from it)", where, said)  # fmt: skip


def with_model_keys_set(config, source: ModelConfig) -> ModelConfig:
    """`source` (init_from's architecture) with the `model.` keys this run sets
    (`model_keys_set`) that differ from it; each is logged, and any outside
    `checkpoint.INIT_FROM_FREE_MODEL_KEYS` is refused (a ValueError naming each such key and
    both values)."""
    base, keys_set = source.to_dict(), model_keys_set(config)
    run = {**base, **keys_set}
    where = f"init_from={config.init_from}"
    _warn_kept_source_keys(config, base, keys_set, where)
    # Scaling turned on over an unscaled source: its original context is the source's.
    original, note = init_from_rope_original_len(base, run, "rope_original_max_len" in keys_set,
                                                 where)  # fmt: skip
    if original is not None:
        run["rope_original_max_len"] = original
    if note:
        log.log(logging.INFO if original is not None else logging.WARNING, "%s", note)
    changes = ckpt_lib.init_from_model_changes(base, run, where)
    if not changes:
        return source
    for key, (old, new) in changes.items():
        execution = key in ckpt_lib.EXECUTION_ONLY_MODEL_KEYS
        log.log(logging.INFO if execution else logging.WARNING,
                "%s: model.%s=%r from this run's config, over the source's %r%s", where, key,
                new, old, "" if execution else " (the context the model runs at)")  # fmt: skip
    return ModelConfig.from_dict({**base, **{k: new for k, (_, new) in changes.items()}})


def warn_builtin_eval(config) -> list[str]:
    """The eval keys that still name the built-in world while `data.train` names only your own
    files (the configs' defaults are built-in sets); logs a warning naming them."""

    def builtin(spec):
        return [p for p in (q.strip() for q in spec.split(",")) if p.startswith("builtin:")]

    d = config.data
    if not d.train.strip() or builtin(d.train) or not config.eval_every:
        return []
    keys = [k for k, spec in (("data.eval", d.eval),
                              ("eval_gen.sets", config.get("eval_gen", {}).get("sets", "")))
            if builtin(spec)]  # fmt: skip
    if keys:
        log.warning(
            "data.train=%s is your own data, but %s still evaluate on the built-in demo "
            "world; set %s to your held-out files ('' = none)",
            d.train, " and ".join(keys), ", ".join(f"--config.{k}" for k in keys),
        )  # fmt: skip
    return keys


def warn_sizes_from_another_variant(config, cfg: ModelConfig) -> str | None:
    """The stage configs take their sizes (steps, batch, seq_len, lr) from their `variant`
    argument even when `init_from` brings the architecture: a 125m SFT run without
    `:variant=125m` silently trains with the tiny sizes. Logs (and returns) a warning when the
    config's variant is not init_from's shape, naming the variant that is, if one is."""
    if not config.init_from:
        return None
    shape = lambda m: (m.n_layers, m.d_model, m.n_heads)  # noqa: E731
    if shape(config.model) == shape(cfg):
        return None
    from flaxlm.models.config import VARIANTS

    match = [n for n, v in VARIANTS.items() if shape(v) == shape(cfg)]
    hint = f"pass :variant={match[0]} for its sizes" if match else "set them for it"
    msg = (
        f"init_from={config.init_from} is a {cfg.n_layers}-layer d_model={cfg.d_model} model, "
        f"but this run's sizes (batch_size={config.batch_size}, seq_len={config.seq_len}, "
        f"opt.lr={config.opt.lr}, total_steps={config.total_steps}) come from the config's "
        f"variant, a {config.model.n_layers}-layer d_model={config.model.d_model} model: {hint}"
    )
    log.warning(msg)
    return msg


def resolve_source(config, mesh):
    """(tokenizer, ModelConfig, chat template: `formats.training_template`) of a stage started
    from `config.init_from` (or from `config.model` and `data.tokenizer` without one), after
    the checks every stage makes: the batch splits over the mesh's data×fsdp devices, the
    tokenizer fits the vocabulary, and with `init_from_ema` the source has EMA weights (an error
    naming the key and the run before any model is loaded)."""
    check_batch_divides(config.batch_size, mesh)
    loop.init_from_ema(config)
    meta = source_meta(config.init_from)
    warn_builtin_eval(config)
    tok = resolve_tokenizer(config, meta)
    cfg = resolve_model_config(config, meta)
    tok.check_fits(cfg.vocab_size)
    warn_sizes_from_another_variant(config, cfg)
    template = F.training_template(tok)  # the tokenizer's own Jinja template when it has one
    if template.jinja:
        log.info("chat data renders through the tokenizer's chat template %s", template.describe())
    return tok, cfg, template


def eval_set_names(parts: list[str], taken: dict[str, str] | None = None) -> list[str]:
    """The metric names of the `eval_gen.sets` sources `parts` (eval/<name>/accuracy, ...): a
    source's file stem ("builtin:sft_heldout" -> sft_heldout, "data/a/heldout.jsonl" ->
    heldout). Sources sharing a stem are named with their folder ("a_heldout", "b_heldout"):
    under one name the later set's metrics overwrote the earlier's. A name that is still
    shared, or one of `taken` ({name: what already reports under it}), is an error naming
    both."""

    def stem(part: str) -> str:
        return part.split(":")[-1].rsplit("/", 1)[-1].split(".")[0]

    def with_folder(part: str) -> str:
        folder = os.path.basename(os.path.dirname(os.path.normpath(part.split(":")[-1])))
        return f"{folder}_{stem(part)}" if folder else stem(part)

    stems = [stem(p) for p in parts]
    names = [with_folder(p) if stems.count(s) > 1 else s for p, s in zip(parts, stems)]
    owner = dict(taken or {})
    for part, name in zip(parts, names):
        if name in owner:
            raise ValueError(
                f"eval_gen.sets: {part} and {owner[name]} would both report as eval/{name}/...; "
                "rename one of the files"
            )
        owner[name] = part
    return names


def write_report(workdir: str | None, report: dict) -> None:
    """Logs what was dropped or truncated and writes data_report.json into the workdir."""
    for split, r in report.items():
        if r["dropped"] or r["truncated"]:
            log.warning(
                "data %s: %d of %d records dropped %s, %d truncated (e.g. %s)",
                split, r["dropped"], r["records"], r["bad_input"]["counts"], r["truncated"],
                r["truncated_examples"][:1],
            )  # fmt: skip
    if workdir and jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "data_report.json"), "w") as f:
            json.dump(report, f, indent=1)


# ---------------------------------------------------------------------------------------------
# Loading language-model params into a task's tree


def accuracy_by_kind(kinds, index, won) -> dict[str, float]:
    """{"acc_<kind>": mean of `won` over the rows of that kind} for each non-empty kind, row r
    holding item `index[r]` of the held-out set whose kinds are `kinds` (e.g. the world's pair
    kinds: correct vs wrong, well-formed vs rambling)."""
    by = collections.defaultdict(list)
    for i, w in zip(index, won):
        by[kinds[int(i)]].append(float(w))
    return {f"acc_{k}": sum(v) / len(v) for k, v in sorted(by.items()) if k}


def replicated_like(abstract, tree):
    """ShapeDtypeStructs of `abstract` replicated over the mesh of `tree`'s first leaf (small
    trees read next to a sharded one, e.g. LoRA adapters next to their base)."""
    s = jax.tree.leaves(tree)[0].sharding
    rep = NamedSharding(s.mesh, P()) if isinstance(s, NamedSharding) else s
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), abstract)


def _select(full, target, where: str):
    """The subtree of `full` with `target`'s keys (HF params may carry more, e.g. lm_head)."""
    if not isinstance(target, dict):
        if tuple(full.shape) != tuple(target.shape):
            raise ValueError(f"{where}: shape {full.shape} != expected {target.shape}")
        sharding = getattr(target, "sharding", None)
        if sharding is None:
            return jnp.asarray(full, target.dtype)
        # Into the target's shardings, each device given its own block (an HF teacher or
        # reference on one device failed every multi-device step, and a large one would not
        # fit there); works across processes, each holding the whole host array.
        host = np.asarray(full).astype(target.dtype)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    missing = sorted(set(target) - set(full))
    if missing:
        raise KeyError(f"{where}: params lack {missing}")
    return {k: _select(full[k], target[k], f"{where}/{k}") for k in target}


def load_lm_params(source: str, target, step: int | None = None, ema: bool = False, *,
                   key: str = "init_from", with_head: bool = False):  # fmt: skip
    """Language-model params shaped like `target` (ShapeDtypeStructs with shardings).

    `source` is "hf:DIR" or a flaxlm run: a plain LM run, a LoRA run (adapters merged), a
    scalar-head run (its "transformer" backbone; then `target` must lack `lm_head`), or a PPO
    run (its policy). `ema`: the run's EMA weights (a LoRA run: its adapters' EMA merged into
    the base); a run without an EMA, or an HF source, is an error. `key`: the reader the
    errors name (ckpt_lib.load_params).

    `with_head` (a scalar-head task): `target` is the whole {"transformer", "head"} tree; a
    scalar-head source fills both, any other source only "transformer" (the returned tree lacks
    "head": the caller keeps its fresh head).
    """
    lm_target = target["transformer"] if with_head else target
    wrap = (lambda lm: {"transformer": lm}) if with_head else (lambda lm: lm)  # noqa: E731
    if source.startswith(HF_PREFIX):
        if ema:
            raise ckpt_lib.CheckpointError(f"{source}: an HF checkpoint holds no EMA weights")
        from flaxlm.models import hf

        _, params = hf.load_pretrained(source[len(HF_PREFIX) :])
        return wrap(_select(params, lm_target, source))
    # The step read from here on: "latest" resolved once, so a save that lands meanwhile (a
    # run still training) cannot pair this meta with another step's params.
    latest = step is None
    step, meta = ckpt_lib.read_meta(source, step)
    if latest:
        ckpt_lib.warn_if_unfinished(source, step, meta, key)
    load = functools.partial(ckpt_lib.load_params, source, key=key)
    scalar = meta.get("head") == "scalar"
    if scalar and not with_head and isinstance(lm_target, dict) and "lm_head" in lm_target:
        # (its backbone has no lm_head: the read would fail naming a missing tensor; an LM
        # with tied embeddings takes the backbone on purpose)
        raise ValueError(f"{key}={source}: a reward-model run (scalar head), not a language "
                         "model")  # fmt: skip
    spec = lora_lib.LoraSpec(**meta["lora"]) if meta.get("lora", {}).get("rank") else None
    if meta.get("head") == "policy_value":  # a PPO run: {"policy": LM, "value": critic}
        if spec is None:
            return wrap(load({"policy": lm_target}, step, ema)["policy"])
        adapters = replicated_like(lora_lib.abstract_adapters(lm_target, spec), lm_target)
        both = {"policy": {"base": lm_target, "lora": adapters}}
        return wrap(lora_lib.merge(load(both, step, ema)["policy"], spec))
    # a scalar-head source read into a scalar-head task: the head too (its base head: a LoRA
    # reward model trains it whole, `lora.train_extra`)
    inner = (target if with_head else {"transformer": target}) if scalar else lm_target
    if spec is None:
        loaded = load(inner, step, ema)
    else:
        adapters = replicated_like(lora_lib.abstract_adapters(inner, spec), lm_target)
        both = load({"base": inner, "lora": adapters}, step, ema)
        loaded = lora_lib.merge(both, spec)
    if scalar:
        return loaded if with_head else loaded["transformer"]
    return wrap(loaded)


def init_hooks(kind: str, spec: lora_lib.LoraSpec | None, step: int | None = None):
    """(load_init_params, init_from_transform) for a task whose params are an LM ("lm") or a
    scalar-head model ("scalar"), with or without LoRA; the loader reads the source's EMA
    weights when the loop passes `ema=True` (`init_from_ema`), and its `step` (None: the
    latest; GRPO: the step its frozen reference copy was pinned to, rl_frozen.FrozenSources).

    A scalar-head task from a scalar-head run (a reward model trained on) takes its head too,
    logged; from a language model its backbone, with a fresh head. (It kept only the backbone
    of a reward model, silently.)"""

    def load(source, target, ema=False):
        target = target["base"] if spec else target
        if kind != "scalar":
            return load_lm_params(source, target, step, ema=ema)
        loaded = load_lm_params(source, target, step, ema=ema, with_head=True)
        log.info("init_from=%s: %s", source, "a scalar-head run: its backbone and head loaded"
                 if "head" in loaded else "backbone loaded, the scalar head is fresh")  # fmt: skip
        return loaded

    def transform(loaded, fresh):
        inner = fresh["base"] if spec else fresh
        inner = {**inner, **loaded} if kind == "scalar" else loaded
        return {"base": inner, "lora": fresh["lora"]} if spec else inner

    return load, transform


def supervised_task(
    name: str,
    head: str,
    config,
    cfg: ModelConfig,
    spec: lora_lib.LoraSpec | None,
    tok,
    workdir: str | None,
    data_report: dict,
    *,
    init_params,
    loss_fn,
    train_batches,
    eval_fn,
    extra_meta: dict | None = None,
):
    """The loop.Task of a stage that trains one model on fixed data (SFT, reward model, DPO):
    what they share — FLOPs per token (`ModelConfig.flops_per_token`: a "scalar" head has no
    vocabulary projection; under LoRA the frozen base gets no weight gradients), the LoRA
    trainable mask, the init_from hooks, and the checkpoint meta that load_policy reads back
    (plus `extra_meta`: DPO/KTO's pinned reference step, rl_frozen.FrozenSources)."""
    load, transform = init_hooks(head, spec)
    count = dict(frozen_base=spec is not None, lm_head=head != "scalar")
    return loop.Task(
        name=name,
        init_params=init_params,
        loss_fn=loss_fn,
        train_batches=train_batches,
        eval_fn=eval_fn,
        flops_per_token=cfg.flops_per_token(config.seq_len, **count),
        flops_per_token_causal=cfg.flops_per_token(config.seq_len, causal=True, **count),
        trainable_mask=(lambda p: lora_lib.trainable_mask(p, spec)) if spec else None,
        load_init_params=load,
        init_from_transform=transform,
        model_meta={
            "model_config": cfg.to_dict(),
            **tokenizer_meta(tok, workdir),
            "head": head,
            "lora": spec.to_dict() if spec else {},
            "data_report": data_report,
            **(extra_meta or {}),
        },
    )


def scalar_head_task(name: str, config, mesh, workdir: str | None, *, what: str, new_report,
                     load, batches, make_eval_fn, make_loss,
                     extra_meta: dict | None = None):  # fmt: skip
    """The loop.Task of a stage that trains a scalar head on the SFT model over fixed data (the
    reward model on pairs, the PRM on stepwise records): the train and held-out sets read with
    `load(spec, config, template, report)` into reports made by `new_report(strict)` (written as
    data_report.json), the ScalarHeadModel (with LoRA when config.lora asks), `batches(train,
    **kw)` the training batch source, `make_eval_fn(config, mesh, apply, heldout)` and
    `make_loss(apply, router)`; `what` names the records when none is usable."""
    from flaxlm.models.heads import scalar_model_fns
    from flaxlm.train.losses import router_coefs

    tok, cfg, template = resolve_source(config, mesh)
    report = new_report(config.data.strict)
    train = load(config.data.train, config, template, report)
    if not train:
        raise no_usable(config, what, report)
    eval_report = new_report(config.data.strict)
    heldout = load(config.data.eval, config, template, eval_report) if config.data.eval else []
    data_report = {"train": report.to_dict(), "eval": eval_report.to_dict()}
    write_report(workdir, data_report)

    init_params, apply = scalar_model_fns(cfg)
    spec = lora_lib.spec_from_config(config.lora)
    if spec:
        init_params, apply = lora_lib.with_lora(init_params, spec), lora_lib.lora_apply(apply, spec)
    train_batches = batches(
        train, seq_len=config.seq_len, batch=config.batch_size // jax.process_count(),
        pad_id=tok.pad_id, seed=config.seed, shuffle=config.data.shuffle,
        process_index=jax.process_index(), process_count=jax.process_count(),
        **train_source_check(config),
    )  # fmt: skip
    eval_fn = make_eval_fn(config, mesh, apply, heldout) if heldout and config.eval_every else None
    router = router_coefs(config.loss, cfg.n_experts > 0)  # (None: a dense backbone)
    # "scalar": no vocabulary projection in the FLOP count
    return supervised_task(
        name, "scalar", config, cfg, spec, tok, workdir, data_report,
        init_params=init_params, loss_fn=make_loss(apply, router),
        train_batches=train_batches, eval_fn=eval_fn, extra_meta=extra_meta,
    )  # fmt: skip


def load_policy(run_dir: str, step: int | None = None, ema: bool = False):
    """(ModelConfig, plain LM params (LoRA merged), meta) of a pretrain/SFT run, on one device
    (`ema`: its EMA weights)."""
    from flaxlm.models.transformer import Transformer
    from flaxlm.train.state import unbox

    step, meta = ckpt_lib.read_meta(run_dir, step)  # the params below come from this step
    cfg = ModelConfig.from_dict(meta["model_config"])
    abstract = unbox(
        jax.eval_shape(
            lambda r: Transformer(cfg).init(r, jnp.zeros((1, 4), jnp.int32))["params"],
            jax.random.PRNGKey(0),
        )
    )
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), abstract)
    return cfg, load_lm_params(run_dir, target, step, ema), meta
