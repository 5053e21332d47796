"""Whether a checkpoint belongs to this run: meta and config comparisons, no orbax.

Resuming refuses a step another run wrote (`meta_mismatch` over RESUME_META_KEYS: task, model
config but its execution-only keys, head, LoRA spec); a run started from another's weights
(`init_from`) may differ from its source only in the execution, context-length and
`param_dtype` keys (`init_from_model_changes`); `config_changes` lists the run-config keys a
resume changed (logged, recorded as `config_changed`). Pure functions on the meta dicts, separate
from reading and writing checkpoints so the loop and the alignment stages can use them on
meta read any way.
"""

from __future__ import annotations

import json
from typing import Any

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


# RoPE scalings that stretch the frequencies of an original context (`rope_original_max_len`).
ORIGINAL_CONTEXT_SCALINGS = ("llama3", "yarn", "longrope")


def init_from_rope_original_len(source: dict, run: dict, set_here: bool,
                                where: str) -> tuple[int | None, str | None]:  # fmt: skip
    """(the `rope_original_max_len` a run started from another's weights should take, a
    message) where the run turns on a scaling that stretches an original context (llama3,
    yarn, longrope) over a source without scaling; (None, None) elsewhere.

    The original context is the one the source was trained at, its `max_seq_len`. Left unset
    (`set_here` False), the run used to keep ModelConfig's default 8192 silently, and a source
    trained at 256 tokens got another extension than meant (llama3's nearly none): the value
    is then the source's max_seq_len, the message the line to log. Set larger than that, the
    value stays the run's (None) and the message is a warning."""
    src, ours = _normal_model_config(source), _normal_model_config(run)
    scaling = ours.get("rope_scaling", "none")
    if src.get("rope_scaling", "none") != "none" or scaling not in ORIGINAL_CONTEXT_SCALINGS:
        return None, None
    trained, original = int(src["max_seq_len"]), int(ours["rope_original_max_len"])
    if not set_here:
        return trained, (f"{where}: model.rope_scaling={scaling!r} turned on over a source trained "
                         f"at max_seq_len {trained}: model.rope_original_max_len (unset, "
                         f"{original}) is taken as {trained}")  # fmt: skip
    if original > trained:
        return None, (f"{where}: model.rope_original_max_len={original} is more than the "
                      f"max_seq_len {trained} the source was trained at: model.rope_scaling="
                      f"{scaling!r} then extends a context the model never saw (the original "
                      f"context is usually the source's max_seq_len, {trained})")  # fmt: skip
    return None, None


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
