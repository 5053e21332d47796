"""Hugging Face checkpoints: import/export (safetensors + config.json) and tokenizers.

    cfg, params = load_pretrained("Llama-3.2-1B/")   # Llama, Mistral, Qwen2/3, Phi-3/4, OLMo 2/3,
                                                     # Gemma 1/2/3 (text), SmolLM3; MoE: Mixtral,
                                                     # Qwen2-MoE, Qwen3-MoE, OLMoE
    logits = forward(cfg, params, tokens, positions, segment_ids)
    save_pretrained(cfg, params, "out/", arch="llama")         # transformers loads it back
    tok = load_tokenizer("Llama-3.2-1B/")                      # tokenizer.json or tokenizer.model

    python -m flaxlm.models.hf import HF_DIR RUN_DIR           # HF → flaxlm run (orbax)
    python -m flaxlm.models.hf export RUN_DIR HF_DIR [--arch llama]
    python -m flaxlm.models.hf export LORA_RUN_DIR ADAPTER_DIR --adapter     # PEFT (models/peft.py)
    python -m flaxlm.models.hf export RUN_DIR HF_DIR --ema    # the run's EMA weights (train/ema.py)
    python -m flaxlm.models.hf import-adapter HF_DIR ADAPTER_DIR RUN_DIR
    python -m flaxlm.models.hf extend-vocab SRC OUT --tokens '<tool_call>,</tool_call>' [--special]
        # new tokens + grown embeddings, a new HF dir for init_from=hf:OUT (models/hf_extend.py)

This module is the public API; the work is done in
  models/hf_arch.py     the supported families' tables (ARCHS, ARCH_FIXED, ARCH_FEATURES, ...),
                        config.json's JSON and a multimodal checkpoint's text config;
  models/hf_config.py   config.json <-> ModelConfig per family (windows, norms, soft-caps,
                        NoPE layers), what an arch cannot state, `default_arch`;
  models/hf_rope.py     rope_parameters / rope_scaling <-> ModelConfig's RoPE fields;
  models/hf_moe.py      the mixture-of-experts families' config keys (Mixtral, Qwen2-MoE, ...);
  models/hf_weights.py  tensor names and layouts, shard-by-shard loading, the export's shards;
  models/hf_tokenizer.py  tokenizers (tokenizer.json, SentencePiece) and chat templates;
  models/hf_sentencepiece.py  a SentencePiece model as a tokenizer.json (the export's);
  models/hf_extend.py   `extend-vocab`: tokens added to a checkpoint's tokenizer, its
                        embedding (and untied output) rows grown and initialised;
and every name callers used from here is still importable from here.

Export writes a temporary directory and renames it into place: an interrupted export leaves
nothing half-written. A run's export (model or adapter) refuses a target that is the run
directory, holds it or lies inside it (with --overwrite the replaced directory is deleted). A
run finds the tokenizer its meta names, or, moved or copied with the original gone, its own
copy (checkpoint read_meta).

Bad input (unsupported architecture, missing / unexpected tensors, shape mismatches, a
tokenizer whose vocab does not fit) raises `HFError` naming the file and the key or tensor.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile

import flax.linen
import jax
import jax.numpy as jnp

from flaxlm.models.config import ModelConfig

# (re-exported: the names callers import from flaxlm.models.hf)
from flaxlm.models.hf_arch import (  # noqa: F401
    _FUSED_WEIGHTS,
    ARCH_FEATURES,
    ARCH_FIXED,
    ARCHS,
    LLAMA_FIXED,
    MULTIMODAL,
    _dtype_name,
    load_hf_json,
    text_config,
)
from flaxlm.models.hf_config import (  # noqa: F401
    config_from_hf,
    config_to_hf,
    default_arch,
    load_config,
)
from flaxlm.models.hf_tokenizer import (
    HFError,
    HFTokenizer,
    _chat_templates,
    _eos_list,
    _json_object,
    copy_tokenizer,
    exported_template_files,
    load_tokenizer,
    sentencepiece_hf_files,
    set_template_kwargs,
    tokenizer_file,
)
from flaxlm.models.hf_weights import (  # noqa: F401
    cfg_summary,
    export_tensors,
    read_params,
    write_shards,
)
from flaxlm.models.transformer import Transformer, checked_tokens, unstack_layers

log = logging.getLogger(__name__)

__all__ = ["HFError", "HFTokenizer", "load_tokenizer", "load_config", "load_pretrained",
           "save_pretrained", "forward", "config_from_hf", "config_to_hf",
           "set_template_kwargs"]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Import / export


def load_pretrained(path: str, dtype=None, *, mesh=None, rules=None):
    """(ModelConfig, params) of an HF checkpoint directory, read shard by shard.

    Args:
      path: directory with config.json and model.safetensors (or an index + shards).
      dtype: parameter (and compute) dtype; default the checkpoint's own `dtype`.
      mesh, rules: place each tensor directly in its shards (logical rules as in training).
    Returns: (cfg, params) with params in the unrolled layer layout.
    """
    cfg = load_config(path)
    if dtype is not None:
        dtype = _dtype_name(dtype, "import")
        cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    arch = load_hf_json(path).get("model_type")
    params = read_params(path, cfg, arch, mesh, rules)
    return cfg, params


def save_pretrained(cfg: ModelConfig, params, path: str, arch: str = "llama", *,
                    dtype=None, max_shard_bytes: int = 4 << 30, tokenizer: str | None = None,
                    overwrite: bool = False, extra_config: dict | None = None,
                    extra_files: dict[str, dict] | None = None) -> None:  # fmt: skip
    """Writes `params` as an HF `arch` checkpoint (config.json + safetensors) at `path`.

    Writes into a temporary sibling directory and renames it into place, so `path` is either
    absent/old or complete. Shards above `max_shard_bytes` with an index, as HF does.
    `tokenizer`: a tokenizer file or directory whose tokenizer files are copied along;
    `extra_files`: JSON files (name → object) written last, e.g. a tokenizer_config.json.
    Int8 params (`quant.quantize_params`) are written dequantized, kernel · kernel_scale.
    """
    config = config_to_hf(cfg, arch, **(extra_config or {}))
    params = flax.linen.meta.unbox(params)  # boxed, as `Transformer.init` returns them, too
    if cfg.scan_layers:
        params = unstack_layers(params, cfg.n_layers)
    np_dtype = jnp.dtype(_dtype_name(dtype or cfg.param_dtype, "export"))
    config["dtype"] = config["torch_dtype"] = np_dtype.name
    shards = export_tensors(cfg, params, arch, np_dtype, max_shard_bytes)
    with atomic_directory(path, overwrite) as tmp:
        write_shards(shards, tmp, np_dtype)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if tokenizer:
            copy_tokenizer(tokenizer, tmp)
        for name, obj in (extra_files or {}).items():
            os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                if isinstance(obj, str):  # a text file (a chat template's .jinja)
                    f.write(obj)
                else:
                    json.dump(obj, f, indent=2, ensure_ascii=False)


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = False):
    """Yields a temporary sibling directory to write an export into, renamed to `path` when
    the block completes (removed if it raises): `path` is either absent/old or complete. An
    existing non-empty `path` needs `overwrite`; the old one is moved aside first, then
    deleted. Files get the umask's mode (safetensors writes its own 0600, which left a shared
    or served export unreadable), the directory 0755."""
    path = os.path.abspath(path)
    _recover_interrupted(path)
    if os.path.exists(path) and not os.path.isdir(path):  # overwrite replaces directories only
        raise HFError(f"export: {path} exists and is not a directory")
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise HFError(f"export: {path} exists and is not empty (pass --overwrite, or "
                      "overwrite=True, to replace it)")  # fmt: skip
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        # (mkdtemp made `tmp` 0700 and orbax/shutil files may be 0600: an export is shared.
        # Directories need their x bit: additional_chat_templates/ made 0644 could not be
        # listed or read by its owner when not root.)
        for root, dirs, files in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~umask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~umask)
        os.chmod(tmp, 0o755)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _recover_interrupted(path: str) -> None:
    """Mends what an export to `path` killed part way left beside it (`atomic_directory`): the
    previous export, moved aside into `.NAME.old-*/x` just before the new one was renamed in,
    goes back to `path` when `path` is missing (else it would stay hidden there); unfinished
    `.NAME.tmp-*` writes (full-size copies no later run removed) and emptied `.NAME.old-*` are
    deleted. Each is logged."""
    parent, name = os.path.split(path)
    if not os.path.isdir(parent):
        return
    olds = sorted(
        (os.path.join(parent, d) for d in os.listdir(parent) if d.startswith(f".{name}.old-")),
        key=os.path.getmtime,
        reverse=True,  # the newest first: the export an interrupted overwrite last replaced
    )
    for old in olds:
        moved = os.path.join(old, "x")
        if not os.path.lexists(path) and os.path.isdir(moved):
            os.replace(moved, path)
            log.warning("export: restored %s, moved aside by an --overwrite export that was "
                        "interrupted", path)  # fmt: skip
        shutil.rmtree(old, ignore_errors=True)
    for d in os.listdir(parent):
        if d.startswith(f".{name}.tmp-"):
            log.warning("export: removing %s, left by an export that was interrupted",
                        os.path.join(parent, d))  # fmt: skip
            shutil.rmtree(os.path.join(parent, d), ignore_errors=True)


def forward(cfg: ModelConfig, params, tokens, positions=None, segment_ids=None):
    """Logits (B, T, V) in float32-or-compute dtype, jitted once per config and shape.

    HF-style batches map as: segment_ids = attention_mask, positions = cumsum(mask) - 1 (left
    padding) — padded positions get meaningless logits; compare only real ones.
    """
    tokens = checked_tokens(cfg, tokens, "forward")
    return _forward_fn(cfg)(params, tokens, positions, segment_ids)


@functools.lru_cache(maxsize=16)
def _forward_fn(cfg: ModelConfig):
    def fwd(params, tokens, positions, segment_ids):
        if positions is not None:
            positions = jnp.asarray(positions, jnp.int32)
        if segment_ids is not None:
            segment_ids = jnp.asarray(segment_ids, jnp.int32)
        return Transformer(cfg).apply({"params": params}, tokens, positions, segment_ids)

    return jax.jit(fwd)


# ----------------------------------------------------------------------------------------------
# Command line: HF directory <-> flaxlm run directory


def import_to_run(hf_dir: str, run_dir: str, dtype=None) -> str:
    """Writes an HF checkpoint as a flaxlm run (step 0; params only) that `load_model`,
    `init_from` and `python -m flaxlm.generate` read; copies the tokenizer along."""
    from flaxlm.train.checkpoint import Checkpointer

    if os.path.realpath(run_dir) == os.path.realpath(hf_dir):  # (was shutil's SameFileError)
        raise HFError(f"import: the run directory {run_dir} is the HF checkpoint; import into a "
                      "new directory")  # fmt: skip
    ckpts = os.path.join(run_dir, "checkpoints")
    held = sorted(os.listdir(ckpts)) if os.path.isdir(ckpts) else []
    unfinished = [n for n in held if ".orbax-checkpoint-tmp" in n]
    if len(unfinished) < len(held):  # the step-0 save would be skipped or hidden
        raise HFError(f"import: {run_dir} already holds checkpoints; import into a new directory")
    for name in unfinished:  # a save that never finished (an import killed mid-write)
        log.warning("import: removing %s, an unfinished save", os.path.join(ckpts, name))
        shutil.rmtree(os.path.join(ckpts, name))
    cfg, params = load_pretrained(hf_dir, dtype)
    meta = {
        "model_config": cfg.to_dict(),
        "task": "hf_import",
        "hf_source": os.path.abspath(hf_dir),
        "hf_arch": text_config(load_hf_json(hf_dir))["model_type"],
    }
    if tok_file := tokenizer_file(hf_dir):  # (a flaxlm export's: its tokenizer.model)
        load_tokenizer(tok_file, cfg.vocab_size)  # unreadable: fail now
        os.makedirs(run_dir, exist_ok=True)
        copy_tokenizer(hf_dir, run_dir)
        meta["tokenizer"] = os.path.join(os.path.abspath(run_dir), os.path.basename(tok_file))
    ckpt = Checkpointer(run_dir, async_save=False)
    ckpt.save(0, {"params": params}, meta=meta)
    ckpt.close()
    return run_dir


def check_export_target(run_dir: str, path: str) -> None:
    """Refuses an export of the run `run_dir` to `path` when, real paths compared (symlinks,
    "..", a trailing "/"), `path` is the run directory, a directory holding it, or inside it:
    with --overwrite the export's replace-then-delete would remove the run (or part of it)."""
    run, target = os.path.realpath(run_dir), os.path.realpath(path)
    common = os.path.commonpath([run, target])
    if common == target:
        what = "is the run directory" if target == run else "holds the run directory"
        raise HFError(f"export: target {path} {what} {run_dir}; export to a directory outside "
                      "the run (an overwrite would delete the run)")  # fmt: skip
    if common == run:
        raise HFError(f"export: target {path} is inside the run directory {run_dir}; export to a "
                      "directory outside the run")  # fmt: skip


def export_run(run_dir: str, hf_dir: str, arch: str | None = None, step=None, dtype=None,
               overwrite: bool = False, ema: bool = False) -> str:  # fmt: skip
    """Writes a flaxlm run's params (latest or `step`; `ema`: its EMA weights) as an HF
    checkpoint directory (outside the run: `check_export_target`)."""
    from flaxlm.train.checkpoint import load_model

    check_export_target(run_dir, hf_dir)
    cfg, params, meta = load_model(run_dir, step, ema=ema)
    arch = arch or meta.get("hf_arch") or default_arch(cfg)
    tok_path, extra, files = meta.get("tokenizer") or "", {}, {}  # (read_meta located it)
    if tok_path and os.path.exists(tok_path):
        tok = load_tokenizer(tok_path, cfg.vocab_size)
        # config.json names the BOS token even when the tokenizer adds none (SmolLM2's)
        bos = getattr(tok, "bos_token_id", tok.bos_id)
        extra = {k: v for k, v in (("bos_token_id", bos), ("eos_token_id", tok.eos_id))
                 if v >= 0}  # fmt: skip
        if tok_path.endswith(".json"):
            tok_path = os.path.dirname(tok_path)
            # the template variables the run trained with, as the exported templates' defaults
            files = exported_template_files(tok_path, meta.get("chat_template_kwargs") or {},
                                            files)  # fmt: skip
        else:  # flaxlm's SentencePiece model: tokenizer.json, settings, chat template for HF
            files = _over_source_files(sentencepiece_hf_files(tok), os.path.dirname(tok_path))
        _warn_if_chat_untemplated(meta, files, tok_path)
    save_pretrained(cfg, params, hf_dir, arch, dtype=dtype, tokenizer=tok_path or None,
                    overwrite=overwrite, extra_config=extra, extra_files=files)  # fmt: skip
    return hf_dir


def _over_source_files(generated: dict, tok_dir: str) -> dict:
    """A SentencePiece run's generated HF tokenizer files, merged over the tokenizer_config /
    generation_config an HF import copied beside its tokenizer.model (an import of a Llama-2
    style checkpoint): the source's chat template (the generated files have one only for
    flaxlm's chat tokens) and sampling defaults stay, and its stop ids join the generated
    ones. They were replaced: an import and export without training changed how the model
    is served."""
    out = dict(generated)
    for name in ("tokenizer_config.json", "generation_config.json"):
        source = _json_object(os.path.join(tok_dir, name))
        if not source or name not in out:
            continue
        merged = {**source, **out[name]}
        if name == "generation_config.json":
            ids = [*_eos_list(out[name]), *_eos_list(source, os.path.join(tok_dir, name))]
            ids = list(dict.fromkeys(ids))
            if ids:
                merged["eos_token_id"] = ids if len(ids) > 1 else ids[0]
        out[name] = merged
    return out


# the tasks that train on chat-formatted data (their runs render with a chat template)
_CHAT_TASKS = ("sft", "dpo", "kto", "reward", "grpo", "ppo", "online_dpo", "distill")


def _warn_if_chat_untemplated(meta: dict, files: dict, tok_path: str) -> None:
    """A chat-trained run whose export carries no chat template (an HF base without one:
    flaxlm trained its text-header fallback) is served without its chat format: say so."""
    # a merged run (python -m flaxlm.train.merge) is a chat run when any of its inputs was
    merged_chats = meta.get("task") == "merge" and (meta.get("merge") or {}).get("trained_on_chats")
    if meta.get("task") not in _CHAT_TASKS and not merged_chats:
        return
    if os.path.isdir(tok_path):
        config = files.get("tokenizer_config.json") or _json_object(
            os.path.join(tok_path, "tokenizer_config.json"))  # fmt: skip
        has = bool(_chat_templates(tok_path, config.get("chat_template"))[0])
    else:
        has = bool((files.get("tokenizer_config.json") or {}).get("chat_template"))
    if not has:
        log.warning("export: this %s run's tokenizer has no chat template, so the export has "
                    "none: it trained on flaxlm's text-header chat format, which HF's "
                    "apply_chat_template cannot reproduce", meta["task"])  # fmt: skip


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m flaxlm.models.hf", description=__doc__.split("\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="HF directory -> flaxlm run directory")
    imp.add_argument("hf_dir")
    imp.add_argument("run_dir")
    imp.add_argument("--dtype", default=None, help="parameter dtype (default: the checkpoint's)")
    exp = sub.add_parser("export", help="flaxlm run directory -> HF directory")
    exp.add_argument("run_dir")
    exp.add_argument("hf_dir")
    exp.add_argument("--arch", default=None, choices=sorted(ARCHS), help="default: inferred")
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    exp.add_argument("--dtype", default=None, help="tensor dtype (default: the params')")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing HF_DIR")
    exp.add_argument("--adapter", action="store_true",
                     help="a LoRA run's adapters only, as a PEFT adapter directory")  # fmt: skip
    exp.add_argument("--ema", action="store_true",
                     help="the run's EMA weights (trained with ema.decay > 0)")  # fmt: skip
    imp_a = sub.add_parser("import-adapter", help="HF base + PEFT adapter -> flaxlm LoRA run")
    imp_a.add_argument("hf_dir")
    imp_a.add_argument("adapter_dir")
    imp_a.add_argument("run_dir")
    ext = sub.add_parser("extend-vocab", help="add tokens to an HF checkpoint's tokenizer and "
                         "grow its embeddings -> a new HF directory")  # fmt: skip
    ext.add_argument("src", help="HF checkpoint directory, or a flaxlm run (exported first)")
    ext.add_argument("out", help="the new HF directory (init_from=hf:OUT)")
    ext.add_argument("--tokens", default="", help="comma-separated tokens ('<a>, <b>': stripped)")
    ext.add_argument("--tokens_file", default=None, help="one token per line, as written")
    ext.add_argument("--special", action="store_true",
                     help="as special tokens (a chat format's: <|im_start|>)")  # fmt: skip
    ext.add_argument("--pad_to_multiple_of", type=int, default=0,
                     help="round the grown vocab_size up to a multiple of this")  # fmt: skip
    ext.add_argument("--init", default="mean", choices=("mean", "mean_noise"),
                     help="new rows: the old rows' mean, or plus noise (Hewitt 2021)")  # fmt: skip
    ext.add_argument("--seed", type=int, default=0, help="the noise of --init mean_noise")
    ext.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    a = ap.parse_args(argv)
    from flaxlm.models import peft
    from flaxlm.train.checkpoint import CheckpointError

    try:
        if a.cmd == "import":
            import_to_run(a.hf_dir, a.run_dir, a.dtype)
            print(f"imported {a.hf_dir} -> {a.run_dir}")
        elif a.cmd == "import-adapter":
            peft.import_adapter_to_run(a.hf_dir, a.adapter_dir, a.run_dir)
            print(f"imported {a.hf_dir} + {a.adapter_dir} -> {a.run_dir}")
        elif a.cmd == "extend-vocab":
            from flaxlm.models import hf_extend

            tokens = hf_extend.cli_tokens(a.tokens, a.tokens_file)
            done = hf_extend.extend_vocab(a.src, a.out, tokens, special=a.special,
                                          pad_to_multiple_of=a.pad_to_multiple_of, init=a.init,
                                          seed=a.seed, overwrite=a.overwrite)  # fmt: skip
            print(done.summary())
        elif a.adapter:
            peft.export_run_adapter(a.run_dir, a.hf_dir, a.step, a.dtype, a.overwrite, a.ema)
            print(f"exported the adapters of {a.run_dir} -> {a.hf_dir}")
        else:
            export_run(a.run_dir, a.hf_dir, a.arch, a.step, a.dtype, a.overwrite, a.ema)
            print(f"exported {a.run_dir} -> {a.hf_dir}")
    except (HFError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
