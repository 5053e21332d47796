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

Weight layout. HF Linear weights are (out, in); our projection kernels contract their leading
axes: q/k/v (D, heads, H) = W.T reshaped, o (N, H, D) = W.T reshaped, MLP (in, out) = W.T, LM
head (D, V). Both use the "rotate half" RoPE layout, so no q/k permutation is needed (the parity
fixtures in tests/fixtures/hf prove it to 1e-4 in fp32 against transformers).

Config. Both rope layouts are read: the newer `rope_parameters` {rope_type, rope_theta, ...} and
the older `rope_theta` + `rope_scaling` {type|rope_type, factor, ...}; rope types default, linear,
llama3, yarn (Qwen2.5/Qwen3 long context; `mscale`/`mscale_all_dim` become the attention factor)
and longrope; a top-level `original_max_position_embeddings` wins over the rope parameters' (as in
transformers 5). Sliding windows: Mistral's `sliding_window`; Qwen2/3's `use_sliding_window` /
`max_window_layers` / `layer_types` (all layers alike); Gemma 2/3's and OLMo 3's `layer_types` (or
Gemma's older `sliding_window_pattern`) with every P-th layer global, `sliding_window_pattern=P`;
other mixes are an error. What sets a family apart is fixed per arch (ARCH_FIXED): Qwen3's per-head
q/k RMSNorms are `qk_norm="head"`; OLMo 2's norms over all heads' q and k are `qk_norm="all"` and
its norms after attention and the MLP `norm_placement="post"`; Gemma's norms scale by (1 + w)
(`norm_unit_offset`) and its embeddings by sqrt(D) (`scale_embeddings`), Gemma 2/3 normalise before
and after attention and the MLP (`norm_placement="sandwich"`) and scale logits by
`query_pre_attn_scalar`; Gemma 2's soft-caps are `attn_logit_softcap` / `final_logit_softcap`;
Gemma 3's and OLMo 3's two RoPEs (rope_parameters by layer type, or rope_theta + rope_scaling +
Gemma 3's rope_local_base_freq) are the global layers' rope_theta/rope_scaling and the local
layers' `rope_local_theta`; OLMo 3 is OLMo 2's blocks with such layers. Phi-3/Phi-4: their fused
qkv_proj and gate_up_proj weights split into q/k/v and gate/up (joined again on export),
`partial_rotary_factor` is `rotary_dim`, a `sliding_window` covers every layer; their long-context
LongRoPE (Phi-3.5, Phi-4-mini; "su" and "yarn" in Phi-3's first configs) is
`rope_scaling="longrope"`, short or long factors chosen per forward as transformers chooses them.
(One difference in generation: when a sequence grows past the original context, transformers' Phi-3
`generate` recomputes its whole cache with the long factors once; flaxlm's decode keeps the keys it
cached.) Gemma 3 loads as `gemma3_text` (Gemma3ForCausalLM), also from the image-text checkpoints
of Gemma 3 4B-27B (model_type "gemma3", MULTIMODAL): their text_config (sparse; Gemma3TextConfig's
defaults fill it) and the tensors under language_model.; the image tower is skipped, export writes
gemma3_text. SmolLM3's layers without RoPE (`no_rope_layers`, or every `no_rope_layer_interval`-th)
are `nope_layer_interval`; its windows (on those layers) are refused. Export writes both rope
layouts, so older and newer transformers read it.

Mixtures of experts (models/moe.py): Mixtral (router block_sparse_moe.gate, experts w1 gate /
w3 up / w2 down, top-k weights always renormalised, Mistral's window), Qwen2-MoE (q/k/v biases,
a shared expert scaled by sigmoid(shared_expert_gate)), Qwen3-MoE (Qwen3's per-head q/k norms)
and OLMoE (q/k norms over all heads, before attention and the MLP). num_experts or
num_local_experts (both written on export: transformers 5 writes Qwen3-MoE's as the latter,
older versions read the former) is `n_experts`, num_experts_per_tok `n_experts_per_token`,
norm_topk_prob `router_norm_topk`, moe_intermediate_size (Mixtral's, OLMoE's
intermediate_size) the experts' width, shared_expert_intermediate_size `d_shared_expert`.
Every layer must be sparse: Qwen's decoder_sparse_step != 1 or mlp_only_layers (dense layers
mixed in) are refused, as are their use_sliding_window (transformers versions disagree on
which layers) and OLMoE's clip_qkv. Import reads the per-expert tensors of every published
checkpoint and of transformers' save_pretrained (experts.j.{gate,up,down}_proj), one host
buffer per stacked (E, ...) kernel placed when its E rows are read, and transformers 5's
fused layout (save_original_format=False: experts.gate_up_proj (E, 2F, D), experts.down_proj
(E, D, F), Mixtral's under mlp.); export writes the per-expert layout, which old and new
transformers load. HF never drops assignments, so import sets moe_capacity_factor=0; a model
trained with a capacity factor still exports (with a warning: the factor is not written and
the export computes the dropless forward).
router_aux_loss_coef is a training setting: ignored on import, each class's default written.

Large checkpoints load shard by shard (model.safetensors.index.json; a model.safetensors beside
it wins, as in transformers): each tensor is read from
the memory-mapped file, converted and placed on device (in its shards when a mesh is given)
before the next is read, so the host never holds a second copy of the model. Export writes a
temporary directory and renames it into place: an interrupted export leaves nothing half-written.
A run's export (model or adapter) refuses a target that is the run directory, holds it or lies
inside it (with --overwrite the replaced directory is deleted). A run finds the tokenizer its
meta names, or, moved or copied with the original gone, its own copy (checkpoint read_meta).

Bad input (unsupported architecture, missing / unexpected tensors, shape mismatches, a
tokenizer whose vocab does not fit) raises `HFError` naming the file and the key or tensor.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import tempfile
import warnings

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.models.attention import rope_attention_factor
from flaxlm.models.config import ModelConfig
from flaxlm.models.hf_tokenizer import (
    HFError,
    HFTokenizer,
    copy_tokenizer,
    load_tokenizer,
    sentencepiece_hf_files,
    set_template_kwargs,
)
from flaxlm.models.transformer import Transformer, unstack_layers

__all__ = ["HFError", "HFTokenizer", "load_tokenizer", "load_config", "load_pretrained",
           "save_pretrained", "forward", "config_from_hf", "config_to_hf",
           "set_template_kwargs"]  # fmt: skip

ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
         "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
         "phi3": "Phi3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
         "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
         "gemma3_text": "Gemma3ForCausalLM", "smollm3": "SmolLM3ForCausalLM",
         "olmo3": "Olmo3ForCausalLM", "mixtral": "MixtralForCausalLM",
         "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
         "olmoe": "OlmoeForCausalLM"}  # fmt: skip
# What a family always has, where it differs from Llama's (LLAMA_FIXED): import sets these,
# export refuses a model that differs (naming an arch that fits).
LLAMA_FIXED = {"qk_norm": "none", "norm_placement": "pre", "norm_unit_offset": False,
               "scale_embeddings": False}  # fmt: skip
_GEMMA_FIXED = {"norm_unit_offset": True, "scale_embeddings": True}
ARCH_FIXED = {
    "qwen3": {"qk_norm": "head"},
    "qwen3_moe": {"qk_norm": "head"},
    "olmoe": {"qk_norm": "all"},  # (over all heads, as OLMo 2's, but before attention / MLP)
    "olmo2": {"qk_norm": "all", "norm_placement": "post"},
    "olmo3": {"qk_norm": "all", "norm_placement": "post"},
    "gemma": _GEMMA_FIXED,
    "gemma2": {**_GEMMA_FIXED, "norm_placement": "sandwich"},
    "gemma3_text": {**_GEMMA_FIXED, "norm_placement": "sandwich", "qk_norm": "head"},
}
# Optional features only some families' configs can state: field -> those archs
ARCH_FEATURES = {
    "sliding_window": (
        "mistral",
        "qwen2",
        "qwen3",
        "phi3",
        "gemma2",
        "gemma3_text",
        "olmo3",
        "mixtral",
    ),
    "sliding_window_pattern": ("gemma2", "gemma3_text", "olmo3"),
    "rope_local_theta": ("gemma3_text", "olmo3"),
    "query_pre_attn_scalar": ("gemma2", "gemma3_text"),
    "attn_logit_softcap": ("gemma2",),  # (Gemma 3's config has the key, its model ignores it)
    "final_logit_softcap": ("gemma2", "gemma3_text"),
    "rotary_dim": ("phi3",),
    "nope_layer_interval": ("smollm3",),
    "qkv_bias": (
        "llama",
        "qwen2",
        "qwen3",
        "olmo2",
        "olmo3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "smollm3",
        "qwen2_moe",
        "qwen3_moe",
        "olmoe",
    ),
    "d_shared_expert": ("qwen2_moe",),
    "shared_expert_gate": ("qwen2_moe",),
}
# Mixture-of-experts families (models/moe.py): every layer's MLP is E experts and a router
_MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
# each expert's (gate, up, down) weight names (the others': gate_proj, up_proj, down_proj)
_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}
# router_aux_loss_coef written on export (a training setting: their config classes' defaults)
_ROUTER_AUX_DEFAULT = {"mixtral": 0.001, "qwen2_moe": 0.001, "qwen3_moe": 0.001, "olmoe": 0.01}
_GEMMA = ("gemma", "gemma2", "gemma3_text")
# Families whose config class ties the embeddings when config.json does not say (the others untie)
_TIED_BY_DEFAULT = (*_GEMMA, "smollm3")
# Families with every P-th layer global and the rest local: P when a config lists no layer_types
_LAYER_PERIOD = {"gemma2": 2, "gemma3_text": 6, "olmo3": 4}
# ... and with a RoPE per layer type: (global, local) base frequencies by default
_ROPE_BY_TYPE = {"gemma3_text": (1_000_000.0, 10_000.0), "olmo3": (500_000.0, 500_000.0)}
# Multimodal checkpoints whose text model loads (and exports as) a text-only arch: the
# config's text_config, tensors under the prefix; the other towers' tensors are skipped.
MULTIMODAL = {"gemma3": ("gemma3_text", "language_model.")}
_OTHER_TOWERS = ("vision_tower.", "multi_modal_projector.")
# Gemma3TextConfig's defaults (transformers 5): the hub's Gemma 3 4B/12B/27B text_configs
# state only what differs from them.
_GEMMA3_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 256, "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096,
}  # fmt: skip
# Phi-3/Phi-4 keep q|k|v in one qkv_proj and gate|up in one gate_up_proj weight
_FUSED_WEIGHTS = ("phi3",)
_QWEN = ("qwen2", "qwen3")  # sliding windows by use_sliding_window / max_window_layers
_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu"}
_DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------------------------
# config.json


def _number(d: dict, key: str, where: str, default=None, cast=float, null_is_default=False):
    """d[key] as a number (`cast`): `default` when absent (and, with `null_is_default`, when
    null: where transformers treats null as its default); a null that has no default, or a
    value that is no number, is an HFError naming the key (not a TypeError from float(None))."""
    value = d.get(key)
    if value is None and (key not in d or null_is_default) and default is not None:
        return cast(default)
    if value is None:
        raise HFError(f"{where}: {key} is {'null' if key in d else 'missing'}; expected a number")
    try:
        if isinstance(value, bool):
            raise TypeError
        return cast(value)
    except (TypeError, ValueError):
        raise HFError(f"{where}: {key}={value!r} is not a number") from None


def _rope_params(hf: dict, where: str) -> dict:
    params = dict(hf.get("rope_scaling") or {})
    new = hf.get("rope_parameters") or {}
    if new and all(isinstance(v, dict) for v in new.values()):
        raise HFError(f"{where}: per-layer-type rope_parameters are not supported")
    params.update(new)
    return params


def _rotary_dim(hf: dict, head_dim: int, where: str) -> int:
    """`rotary_dim` of a partial_rotary_factor (top level or in the rope parameters)."""
    params = _rope_params(hf, where)
    src = params if params.get("partial_rotary_factor") is not None else hf
    factor = _number(src, "partial_rotary_factor", where, 1.0, null_is_default=True)
    dim = int(head_dim * factor)
    if not 0 < dim <= head_dim or dim % 2:
        raise HFError(f"{where}: partial_rotary_factor={factor} gives {dim} rotary dims of "
                      f"head_dim={head_dim}; need an even number in (0, head_dim]")  # fmt: skip
    return 0 if dim == head_dim else dim


def _rope_from_hf(hf: dict, where: str) -> dict:
    params = _rope_params(hf, where)
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params if "rope_theta" in params else hf
    out = {"rope_theta": _number(theta, "rope_theta", where, 10000.0)}
    if kind in ("su", "yarn") and hf.get("model_type") == "phi3":
        kind = "longrope"  # (Phi-3's early configs' names for it, as Phi3Config reads them)
    if kind == "default":
        return out
    if kind == "longrope":
        return {**out, **_longrope_from_hf(params, hf, where)}
    if params.get("factor") is None:
        raise HFError(f"{where}: rope scaling {kind!r} lacks 'factor'")
    out.update(rope_scaling_factor=_number(params, "factor", where + " rope scaling"))
    if kind == "linear":
        return {**out, "rope_scaling": "linear"}
    if kind == "llama3":
        try:
            return {
                **out,
                "rope_scaling": "llama3",
                "rope_low_freq_factor": _number(params, "low_freq_factor", where + " rope"),
                "rope_high_freq_factor": _number(params, "high_freq_factor", where + " rope"),
                "rope_original_max_len": _original_len(params, hf, where),
            }
        except KeyError as e:
            raise HFError(f"{where}: llama3 rope scaling lacks {e.args[0]!r}") from None
    if kind == "yarn":
        return {**out, **_yarn_from_hf(params, hf, out["rope_scaling_factor"], where)}
    raise HFError(
        f"{where}: rope type {kind!r} is not supported (default, linear, llama3, yarn, longrope)"
    )


def _original_len(params: dict, hf: dict, where: str) -> int:
    """The pretraining context of llama3 / yarn / longrope scaling, as transformers 5 settles
    it: a top-level original_max_position_embeddings wins (Phi3Config always has one, 4096 by
    default), then the rope parameters', then max_position_embeddings."""
    top = hf.get("original_max_position_embeddings")
    if top is None and hf.get("model_type") == "phi3":
        top = 4096
    original = top or params.get("original_max_position_embeddings") or hf.get(
        "max_position_embeddings")  # fmt: skip
    if not original:
        raise HFError(f"{where}: rope scaling lacks 'original_max_position_embeddings'")
    return int(original)


def _longrope_from_hf(params: dict, hf: dict, where: str) -> dict:
    """LongRoPE as transformers reads it: short_factor / long_factor lists, the original
    context (rope parameters, else the top-level key), the factor (default: max positions /
    original) and the attention factor (default sqrt(1 + ln(factor) / ln(original)), kept
    explicit so export writes what was used)."""
    original = _original_len(params, hf, where)
    for k in ("short_factor", "long_factor"):
        if not isinstance(params.get(k), list):
            raise HFError(f"{where}: longrope rope scaling lacks {k!r} (a list of numbers), got "
                          f"{params.get(k)!r}")  # fmt: skip
    try:
        short, long = (list(map(float, params[k])) for k in ("short_factor", "long_factor"))
    except (TypeError, ValueError) as e:
        raise HFError(f"{where}: longrope short_factor/long_factor: {e}") from None
    context = hf.get("max_position_embeddings") or original
    factor = float(params.get("factor") or context / original)
    attn = params.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {"rope_scaling": "longrope", "rope_scaling_factor": factor,
            "rope_original_max_len": int(original), "rope_short_factors": tuple(short),
            "rope_long_factors": tuple(long), "rope_attention_factor": float(attn)}  # fmt: skip


def _yarn_from_hf(params: dict, hf: dict, factor: float, where: str) -> dict:
    """YaRN settings as transformers 5 reads them: the original context defaults to
    max_position_embeddings, the attention factor to mscale/mscale_all_dim's ratio or
    0.1·ln(factor) + 1 (kept explicit here, so export writes what was used)."""
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFError(f"{where}: partial_rotary_factor is not supported")
    original = _original_len(params, hf, where)

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * np.log(scale) + 1.0

    attn = params.get("attention_factor")
    if attn is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return {
        "rope_scaling": "yarn",
        "rope_original_max_len": int(original),
        "rope_yarn_beta_fast": float(params.get("beta_fast") or 32.0),
        "rope_yarn_beta_slow": float(params.get("beta_slow") or 1.0),
        "rope_yarn_truncate": bool(params.get("truncate", True)),
        "rope_attention_factor": float(attn),
    }


def _window_from_hf(hf: dict, mt: str, n_layers: int, where: str) -> tuple[int, int]:
    """(sliding_window, sliding_window_pattern) of an HF config's window and layer types."""
    window = int(hf.get("sliding_window") or 0)
    types = hf.get("layer_types")
    if types is None and mt in _QWEN:  # transformers < 4.53 derives them from these
        start = (_number(hf, "max_window_layers", where, n_layers, int)
                 if hf.get("use_sliding_window") else n_layers)  # fmt: skip
        types = ["full_attention" if i < start else "sliding_attention" for i in range(n_layers)]
    if types is None and mt in _LAYER_PERIOD:  # (older configs: the period alone)
        period = int(hf.get("sliding_window_pattern") or _LAYER_PERIOD[mt])
        types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention"
                 for i in range(n_layers)]  # fmt: skip
    if mt == "smollm3" and hf.get("use_sliding_window"):
        raise HFError(f"{where}: use_sliding_window=true is not supported for smollm3 (its "
                      "windows sit on the NoPE layers)")  # fmt: skip
    if mt == "smollm3":
        return 0, 0
    if types is None:
        return (window if mt in ("mistral", "phi3", "mixtral") else 0), 0
    if len(types) != n_layers:
        raise HFError(f"{where}: layer_types has {len(types)} entries for {n_layers} layers")
    kinds = set(types)
    if not kinds <= {"full_attention", "sliding_attention"}:
        raise HFError(f"{where}: layer_types {sorted(kinds)}: only full_attention and "
                      "sliding_attention are supported")  # fmt: skip
    if kinds == {"full_attention"}:
        return 0, 0
    if not window:
        raise HFError(f"{where}: layer_types has sliding_attention layers but sliding_window is "
                      f"{hf.get('sliding_window')!r}")  # fmt: skip
    if kinds == {"sliding_attention"}:
        return window, 0
    period = types.index("full_attention") + 1  # every period-th layer global, as Gemma's
    periodic = all((t == "full_attention") == ((i + 1) % period == 0) for i, t in enumerate(types))
    if mt in _LAYER_PERIOD and period >= 2 and periodic:
        return window, period
    raise HFError(
        f"{where}: layer_types {types} (sliding_window={hf.get('sliding_window')}) — supported: "
        "all full, all sliding, or (Gemma 2/3, OLMo 3) every P-th layer full"
    )


def _rope_by_layer_type(hf: dict, mt: str, window: int, pattern: int, where: str) -> dict:
    """Gemma 3's and OLMo 3's two RoPEs: rope_parameters {"full_attention": ...,
    "sliding_attention": ...} (transformers 5), or the flat layout: rope_theta and
    rope_scaling for the global layers, the local ones unscaled with base
    rope_local_base_freq (Gemma 3) or 500000 (OLMo 3: Olmo3Config gives its sliding layers the
    default whatever rope_theta says, transformers 5.24). The global one becomes
    rope_theta/rope_scaling; a differing local one (unscaled only) is rope_local_theta. With
    every layer local, the local one is simply the model's RoPE."""
    glob_theta, loc_theta = _ROPE_BY_TYPE[mt]
    glob_theta = hf.get("rope_theta") or glob_theta
    loc_theta = hf.get("rope_local_base_freq") or loc_theta
    params = hf.get("rope_parameters") or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        unknown = set(params) - {"full_attention", "sliding_attention"}
        if unknown:
            raise HFError(f"{where}: rope_parameters for unknown layer types {sorted(unknown)}")
        glob = dict(params.get("full_attention") or {})
        loc = dict(params.get("sliding_attention") or {})
    else:  # the older flat layout
        glob = {**(hf.get("rope_scaling") or {}), **params}
        loc = {"rope_type": "default"}
    glob.setdefault("rope_theta", glob_theta)
    loc.setdefault("rope_theta", loc_theta)
    # The top-level keys scaled RoPEs fall back on (yarn's / llama3's original context: a
    # top-level original_max_position_embeddings, else max_position_embeddings), as for
    # every other family; the rest of the top level belongs to the flat layout read above.
    top = {k: hf[k] for k in ("original_max_position_embeddings", "max_position_embeddings")
           if k in hf}  # fmt: skip
    ours_glob = _rope_from_hf({**top, "rope_parameters": glob}, where + " (full_attention rope)")
    ours_loc = _rope_from_hf({**top, "rope_parameters": loc}, where + " (sliding_attention rope)")
    if not pattern:  # all layers of one kind: that kind's RoPE is the model's
        return ours_loc if window else ours_glob
    if ours_loc == ours_glob:
        return ours_glob
    if ours_loc.get("rope_scaling", "none") != "none":
        raise HFError(f"{where}: a scaled RoPE on sliding_attention layers that differs from the "
                      "full_attention one is not supported")  # fmt: skip
    return {**ours_glob, "rope_local_theta": ours_loc["rope_theta"]}


def text_config(hf: dict) -> dict:
    """The text model's config: a multimodal checkpoint's text_config (dtype and tied
    embeddings from the top level where it does not state them), else `hf` itself."""
    mt = hf.get("model_type")
    if mt not in MULTIMODAL:
        return hf
    text = dict(hf.get("text_config") or {})
    text.setdefault("model_type", MULTIMODAL[mt][0])
    for key in ("dtype", "torch_dtype", "tie_word_embeddings"):
        if key in hf:
            text.setdefault(key, hf[key])
    return text


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Our ModelConfig for an HF config dict (dtype from its `dtype`/`torch_dtype`); of a
    multimodal checkpoint's (MULTIMODAL), its text model."""
    hf = text_config(hf)
    mt = hf.get("model_type")
    if mt == "gemma3_text":
        hf = {**_GEMMA3_DEFAULTS, **hf}
    if mt not in ARCHS:
        raise HFError(
            f"{where}: model_type {mt!r} (architectures {hf.get('architectures')}) is not "
            f"supported; supported: {sorted(ARCHS)}"
        )

    def need(key):
        if hf.get(key) is None:
            raise HFError(f"{where}: missing key {key!r}")
        return hf[key]

    D, N, L = (
        int(need("hidden_size")),
        int(need("num_attention_heads")),
        int(need("num_hidden_layers")),
    )
    act = _hidden_act(hf, mt)
    if act not in _ACTS:
        raise HFError(f"{where}: hidden_act {act!r} is not supported ({sorted(_ACTS)})")
    if hf.get("mlp_bias"):
        raise HFError(f"{where}: mlp_bias=true is not supported")
    dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    if dtype not in _DTYPES:
        raise HFError(f"{where}: dtype {dtype!r} is not supported ({_DTYPES})")
    head_dim = int(hf.get("head_dim") or D // N)
    moe = _moe_from_hf(hf, mt, D, N, head_dim, where) if mt in _MOE else {}
    window, pattern = _window_from_hf(hf, mt, L, where)
    if mt == "gemma3_text" and hf.get("use_bidirectional_attention"):
        raise HFError(f"{where}: use_bidirectional_attention=true is not supported")
    if mt in _ROPE_BY_TYPE:
        rope = _rope_by_layer_type(hf, mt, window, pattern, where)
    else:
        rope = _rope_from_hf(hf, where)
    gemma2 = mt in ("gemma2", "gemma3_text")
    nope = _nope_interval(hf, L, where) if mt == "smollm3" else 0
    return ModelConfig(
        vocab_size=int(need("vocab_size")),
        d_model=D,
        n_layers=L,
        n_heads=N,
        n_kv_heads=int(hf.get("num_key_value_heads") or N),
        head_dim=0 if head_dim * N == D else head_dim,
        d_ff=int(need("intermediate_size")),
        # (null: only a length warning in decoding hangs on it; missing and null alike 2048)
        max_seq_len=_number(hf, "max_position_embeddings", where, 2048, int, null_is_default=True),
        norm_eps=_number(hf, "rms_norm_eps", where, 1e-6),
        qkv_bias=_qkv_bias(hf, mt),
        rotary_dim=0 if mt in _ROPE_BY_TYPE else _rotary_dim(hf, head_dim, where),
        tie_embeddings=bool(hf.get("tie_word_embeddings", mt in _TIED_BY_DEFAULT)),
        mlp_activation=_ACTS[act],
        sliding_window=window,
        sliding_window_pattern=pattern,
        nope_layer_interval=nope,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or 256) if gemma2 else 0.0,
        # (transformers' Gemma 3 ignores attn_logit_softcapping: so do we)
        attn_logit_softcap=float(hf.get("attn_logit_softcapping") or 0) if mt == "gemma2" else 0.0,
        final_logit_softcap=float(hf.get("final_logit_softcapping") or 0) if gemma2 else 0.0,
        dtype=dtype,
        param_dtype=dtype,
        **{**LLAMA_FIXED, **ARCH_FIXED.get(mt, {})},
        **rope,
        **moe,
    )


def _qkv_bias(hf: dict, mt: str) -> bool:
    if mt == "qwen2":
        return True
    if mt == "qwen2_moe":  # (transformers 5 reads qkv_bias; before, they were always there)
        return bool(hf.get("qkv_bias", True))
    return bool(hf.get("attention_bias", False))


def _moe_from_hf(hf: dict, mt: str, D: int, N: int, head_dim: int, where: str) -> dict:
    """The mixture-of-experts fields of an HF MoE config. Every layer must be sparse (Qwen's
    decoder_sparse_step / mlp_only_layers mix dense MLP layers in: refused); nothing is
    dropped (moe_capacity_factor 0, as HF computes); router_aux_loss_coef, a training
    setting, is ignored."""
    counts = {k: hf[k] for k in ("num_experts", "num_local_experts") if hf.get(k) is not None}
    if not counts:
        raise HFError(f"{where}: missing key 'num_experts' (or 'num_local_experts')")
    if len(set(counts.values())) > 1:
        raise HFError(f"{where}: num_experts={counts['num_experts']} and num_local_experts="
                      f"{counts['num_local_experts']} disagree")  # fmt: skip
    E = int(next(iter(counts.values())))
    if E < 2:
        raise HFError(f"{where}: num_experts={E}: flaxlm's mixture of experts needs >= 2 (a "
                      "dense model is another model_type)")  # fmt: skip
    k = hf.get("num_experts_per_tok")
    if k is None:
        raise HFError(f"{where}: missing key 'num_experts_per_tok'")
    if not 1 <= int(k) <= E:
        raise HFError(f"{where}: num_experts_per_tok={k} must be in [1, num_experts={E}]")
    if mt in ("qwen2_moe", "qwen3_moe"):
        step = int(hf.get("decoder_sparse_step") or 1)
        dense = list(hf.get("mlp_only_layers") or [])
        if step != 1 or dense:
            raise HFError(f"{where}: decoder_sparse_step={step}, mlp_only_layers={dense}: dense "
                          "MLP layers mixed among the MoE layers are not supported (flaxlm's "
                          "experts replace every layer's MLP; need decoder_sparse_step=1 and "
                          "mlp_only_layers=[])")  # fmt: skip
        if hf.get("use_sliding_window"):  # (transformers versions disagree on which layers)
            raise HFError(f"{where}: use_sliding_window=true is not supported for {mt}")
    if mt == "olmoe":
        if hf.get("clip_qkv") is not None:
            raise HFError(f"{where}: clip_qkv={hf['clip_qkv']} is not supported")
        if head_dim * N != D:  # (OlmoeAttention's q_norm has hidden_size weights)
            raise HFError(f"{where}: head_dim={head_dim} × num_attention_heads={N} != "
                          f"hidden_size={D}; OLMoE's q/k norms need them equal")  # fmt: skip
    norm_topk = mt == "mixtral" or bool(hf.get("norm_topk_prob", False))
    out = {"n_experts": E, "n_experts_per_token": int(k), "moe_capacity_factor": 0.0,
           "router_norm_topk": norm_topk}  # fmt: skip
    if mt in ("qwen2_moe", "qwen3_moe"):  # (Mixtral's, OLMoE's: intermediate_size = d_ff)
        if not hf.get("moe_intermediate_size"):
            raise HFError(f"{where}: missing key 'moe_intermediate_size'")
        out["d_expert"] = int(hf["moe_intermediate_size"])
    if mt == "qwen2_moe":
        S = hf.get("shared_expert_intermediate_size")
        if not S:
            raise HFError(f"{where}: shared_expert_intermediate_size={S!r}: Qwen2-MoE without a "
                          "shared expert is not supported")  # fmt: skip
        out.update(d_shared_expert=int(S), shared_expert_gate=True)
    return out


def _nope_interval(hf: dict, n_layers: int, where: str) -> int:
    """SmolLM3's NoPE layers: `no_rope_layers` (1 = RoPE, 0 = none per layer) or, without
    it, a NoPE layer every `no_rope_layer_interval` (default 4), as SmolLM3Config derives
    them; supported when every P-th layer is the NoPE one."""
    flags = hf.get("no_rope_layers")
    if flags is None:
        P = int(hf.get("no_rope_layer_interval") or 4)
        flags = [int((i + 1) % P != 0) for i in range(n_layers)]
    if len(flags) != n_layers:
        raise HFError(f"{where}: no_rope_layers has {len(flags)} entries for {n_layers} layers")
    if all(flags):
        return 0
    P = list(flags).index(0) + 1
    if P < 2 or any(bool(f) != ((i + 1) % P != 0) for i, f in enumerate(flags)):
        raise HFError(f"{where}: no_rope_layers {flags}: supported are RoPE everywhere or every "
                      "P-th layer without (P >= 2)")  # fmt: skip
    return P


def _hidden_act(hf: dict, mt: str) -> str:
    """The MLP activation's HF name: Gemma 2/3 read `hidden_activation`, the rest
    `hidden_act`; Gemma's legacy "gelu" means the tanh approximation (as transformers reads it)."""
    if mt in ("gemma2", "gemma3_text"):
        return hf.get("hidden_activation") or "gelu_pytorch_tanh"
    act = hf.get("hidden_act") or ("gelu_pytorch_tanh" if mt == "gemma" else "silu")
    return "gelu_pytorch_tanh" if mt == "gemma" and act == "gelu" else act


def _fixed(arch: str) -> dict:
    return {**LLAMA_FIXED, **ARCH_FIXED.get(arch, {})}


def _check_expressible(cfg: ModelConfig, arch: str) -> None:
    """Raises HFError naming the field and an arch that fits when `arch`'s config.json cannot
    state `cfg` (transformers would build another model from it)."""
    ours = {k: getattr(cfg, k) for k in LLAMA_FIXED}
    used = [
        k
        for k in ARCH_FEATURES
        if getattr(cfg, k)
        and not (k == "query_pre_attn_scalar" and cfg.query_pre_attn_scalar == cfg.head_dim_)
    ]
    fits = [a for a in ARCHS if _fixed(a) == ours and all(a in ARCH_FEATURES[k] for k in used)
            and _moe_mismatch(cfg, a) is None]  # fmt: skip
    hint = f"use arch={fits[0]!r}" if fits else "no supported arch can state this model"
    for key, want in _fixed(arch).items():
        if ours[key] != want:
            raise HFError(f"export: arch {arch!r} has {key}={want!r}, this model "
                          f"{key}={ours[key]!r}; {hint}")  # fmt: skip
    for key in used:
        if arch not in ARCH_FEATURES[key]:
            raise HFError(f"export: arch {arch!r} cannot state {key}={getattr(cfg, key)!r}; "
                          f"{hint}")  # fmt: skip
    why = _moe_mismatch(cfg, arch)
    if why:
        raise HFError(f"export: {why}; {hint}")


def _moe_mismatch(cfg: ModelConfig, arch: str) -> str | None:
    """Why `arch` cannot state `cfg`'s MLP (dense or experts), or None."""
    E = cfg.n_experts
    if E and arch not in _MOE:
        return f"arch {arch!r} has a dense MLP, this model n_experts={E}"
    if not E and arch in _MOE:
        return f"arch {arch!r} is a mixture of experts, this model has a dense MLP (n_experts=0)"
    if arch == "mixtral" and not cfg.router_norm_topk:
        return (
            "arch 'mixtral' always renormalises the top-k router weights, this model "
            "router_norm_topk=False"
        )
    if arch == "qwen2_moe" and not (cfg.d_shared_expert and cfg.shared_expert_gate):
        return (f"arch 'qwen2_moe' always has a gated shared expert, this model d_shared_expert="
                f"{cfg.d_shared_expert} shared_expert_gate={cfg.shared_expert_gate}")  # fmt: skip
    if arch == "olmoe" and cfg.head_dim_ * cfg.n_heads != cfg.d_model:
        return (f"arch 'olmoe' needs head_dim × n_heads = d_model, this model {cfg.head_dim_} × "
                f"{cfg.n_heads} != {cfg.d_model}")  # fmt: skip
    return None


def config_to_hf(cfg: ModelConfig, arch: str = "llama", **extra) -> dict:
    """The config.json of `cfg` as an HF `arch` model; raises if that arch cannot express it."""
    if arch not in ARCHS:
        raise HFError(f"export: arch {arch!r} is not supported; choose one of {sorted(ARCHS)}")
    _check_expressible(cfg, arch)
    if cfg.n_experts and cfg.moe_capacity_factor > 0:
        warnings.warn(f"export: moe_capacity_factor={cfg.moe_capacity_factor} is not written: "
                      f"transformers' {arch} never drops expert assignments, so the export "
                      "computes flaxlm's dropless forward (moe_capacity_factor=0)",
                      stacklevel=2)  # fmt: skip
    if arch == "phi3" and cfg.rope_scaling == "yarn":  # (Phi3Config reads "yarn" as longrope)
        raise HFError("export: arch 'phi3' reads rope type 'yarn' as longrope; use arch='qwen3' "
                      "or 'llama'")  # fmt: skip
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=cfg.rope_scaling_factor)
    elif cfg.rope_scaling == "llama3":
        rope.update(
            rope_type="llama3",
            factor=cfg.rope_scaling_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_len,
        )
    elif cfg.rope_scaling == "yarn":
        rope.update(
            rope_type="yarn",
            factor=cfg.rope_scaling_factor,
            original_max_position_embeddings=cfg.rope_original_max_len,
            beta_fast=cfg.rope_yarn_beta_fast,
            beta_slow=cfg.rope_yarn_beta_slow,
            truncate=cfg.rope_yarn_truncate,
            attention_factor=rope_attention_factor(cfg),
        )
    elif cfg.rope_scaling == "longrope":
        rope.update(
            rope_type="longrope",
            factor=cfg.rope_scaling_factor,
            original_max_position_embeddings=cfg.rope_original_max_len,
            short_factor=list(cfg.rope_short_factors),
            long_factor=list(cfg.rope_long_factors),
            attention_factor=rope_attention_factor(cfg),
        )
    legacy = None if rope["rope_type"] == "default" else {**rope, "type": rope["rope_type"]}
    legacy and legacy.pop("rope_theta")
    dtype = jnp.dtype(cfg.param_dtype).name
    out = {
        "architectures": [ARCHS[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim_,
        "hidden_act": "silu" if cfg.mlp_activation == "silu" else "gelu_pytorch_tanh",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": legacy,
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if arch in ARCH_FEATURES["qkv_bias"] and arch not in ("qwen2", "qwen2_moe"):
        out.update(attention_bias=cfg.qkv_bias)  # (Qwen2 and Qwen2-MoE always have them)
    if arch in ("olmo2", "olmo3", "phi3", "olmoe", *_GEMMA):  # (their configs' defaults: their
        out.update(pad_token_id=None, bos_token_id=None, eos_token_id=None)  # own ids)
    if arch in _MOE:
        out.update(_moe_to_hf(cfg, arch))
        out.update(pad_token_id=None, bos_token_id=None, eos_token_id=None)
    if arch == "llama":
        out.update(mlp_bias=False)
    elif arch in ("mistral", "phi3"):
        out.update(sliding_window=cfg.sliding_window or None)
        if arch == "phi3":
            factor = cfg.rotary_dim_ / cfg.head_dim_
            # (a top-level original length wins over the rope parameters' in transformers:
            # the scaled ropes' own, else the context)
            scaled = cfg.rope_scaling in ("llama3", "longrope")
            original = cfg.rope_original_max_len if scaled else cfg.max_seq_len
            out.update(partial_rotary_factor=factor,
                       original_max_position_embeddings=original)  # fmt: skip
            rope["partial_rotary_factor"] = factor
    elif arch == "smollm3":
        P = cfg.nope_layer_interval
        out.update(no_rope_layers=[int(cfg.layer_has_rope(i)) for i in range(cfg.n_layers)],
                   no_rope_layer_interval=P or cfg.n_layers + 1, use_sliding_window=False,
                   sliding_window=None, mlp_bias=False, pad_token_id=None, bos_token_id=None,
                   eos_token_id=None,  # (SmolLM3Config's defaults are its own ids)
                   layer_types=["full_attention"] * cfg.n_layers)  # fmt: skip
    elif arch in _QWEN:
        w = cfg.sliding_window
        out.update(
            use_sliding_window=bool(w),
            sliding_window=w or None,
            max_window_layers=0 if w else cfg.n_layers,
            layer_types=["sliding_attention" if w else "full_attention"] * cfg.n_layers,
        )
    elif arch in ("gemma2", "gemma3_text"):
        out.pop("hidden_act")  # (they read hidden_activation)
        out.update(
            hidden_activation="silu" if cfg.mlp_activation == "silu" else "gelu_pytorch_tanh",
            query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar or cfg.head_dim_),
            final_logit_softcapping=cfg.final_logit_softcap or None,
            sliding_window=cfg.sliding_window or None,
            layer_types=[
                "sliding_attention" if cfg.layer_is_local(i) else "full_attention"
                for i in range(cfg.n_layers)
            ],  # fmt: skip
        )
        if arch == "gemma2":
            out.update(attn_logit_softcapping=cfg.attn_logit_softcap or None)
        else:  # (older readers: rope_local_base_freq)
            out.update(rope_parameters=_rope_parameters_by_type(cfg, rope),
                       rope_local_base_freq=cfg.rope_local_theta or cfg.rope_theta,
                       attn_logit_softcapping=None, use_bidirectional_attention=False)  # fmt: skip
    elif arch == "olmo3":
        out.update(sliding_window=cfg.sliding_window or None,
                   layer_types=[
                       "sliding_attention" if cfg.layer_is_local(i) else "full_attention"
                       for i in range(cfg.n_layers)],
                   rope_parameters=_rope_parameters_by_type(cfg, rope))  # fmt: skip
    return {**out, **extra}


def _moe_to_hf(cfg: ModelConfig, arch: str) -> dict:
    """The experts' keys of an MoE arch's config.json. Both spellings of the expert count
    (transformers 5's Qwen3-MoE writes num_local_experts, older ones read num_experts)."""
    E, L = cfg.n_experts, cfg.n_layers
    out = {"num_experts": E, "num_local_experts": E,
           "num_experts_per_tok": cfg.n_experts_per_token, "output_router_logits": False,
           "router_aux_loss_coef": _ROUTER_AUX_DEFAULT[arch]}  # fmt: skip
    if arch == "mixtral":
        return {**out, "intermediate_size": cfg.d_expert_, "router_jitter_noise": 0.0,
                "sliding_window": cfg.sliding_window or None}  # fmt: skip
    out["norm_topk_prob"] = cfg.router_norm_topk
    if arch == "olmoe":
        return {**out, "intermediate_size": cfg.d_expert_, "clip_qkv": None}
    out.update(moe_intermediate_size=cfg.d_expert_, decoder_sparse_step=1, mlp_only_layers=[],
               use_sliding_window=False, sliding_window=None, max_window_layers=L)  # fmt: skip
    if arch == "qwen2_moe":
        out.update(shared_expert_intermediate_size=cfg.d_shared_expert, qkv_bias=True,
                   layer_types=["full_attention"] * L)  # fmt: skip
    return out


def _rope_parameters_by_type(cfg: ModelConfig, rope: dict) -> dict:
    """rope_parameters by layer type (Gemma 3, OLMo 3): the global layers' `rope`, the local
    ones' unscaled base rope_local_theta (or `rope` too without one)."""
    local = ({"rope_type": "default", "rope_theta": cfg.rope_local_theta}
             if cfg.rope_local_theta else dict(rope))  # fmt: skip
    return {"full_attention": rope, "sliding_attention": local}


def _int_if_whole(x: float):
    """transformers' strict configs type some float-valued fields int (query_pre_attn_scalar)."""
    return int(x) if float(x).is_integer() else float(x)


def load_config(path: str) -> ModelConfig:
    """ModelConfig of an HF directory (its config.json) without reading weights."""
    where = os.path.join(path, "config.json")
    if not os.path.exists(where):
        raise HFError(f"{path}: no config.json (not an HF checkpoint directory)")
    return config_from_hf(load_hf_json(path), where)


# ----------------------------------------------------------------------------------------------
# Tensor names and layouts


class _Row(tuple):
    """A plan target that is one row of a stacked param: (path, row, rows) — expert `row` of
    an (E, ...) expert kernel, which HF keeps as one tensor per expert."""

    path = property(lambda self: self[0])
    row = property(lambda self: self[1])
    rows = property(lambda self: self[2])


def _plan(cfg: ModelConfig, arch: str | None = None, fused_experts: bool = False
          ) -> dict[str, tuple]:  # fmt: skip
    """HF tensor name -> (our param path, HF shape, to_ours, to_hf); for an HF weight that
    holds several of ours (Phi-3's fused ones) a list of paths, to_ours giving a list; for one
    expert's weight a `_Row` of our stacked expert kernel. `fused_experts`: the experts as
    transformers 5 keeps them in memory (and writes with save_original_format=False), one
    gate_up_proj (E, 2F, D) and one down_proj (E, D, F) per layer; else one tensor per expert
    and projection, as every published checkpoint (and transformers' save_pretrained)."""
    D, N, K, H, F, V = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim_, cfg.d_ff,
                        cfg.vocab_size)  # fmt: skip
    same = (lambda w: w, lambda p: p)
    lin = (lambda w: w.T, lambda p: p.T)

    def heads(n):  # (n*H, D) <-> (D, n, H)
        return (lambda w: w.T.reshape(D, n, H), lambda p: p.reshape(D, n * H).T)

    def bias(n):
        return (lambda b: b.reshape(n, H), lambda p: p.reshape(n * H))

    def joined(parts, rows):  # one HF weight stacking several of ours on its output rows
        cuts = np.cumsum(rows)[:-1]
        return (
            lambda w: [f(x) for (f, _), x in zip(parts, np.split(w, cuts, axis=0))],
            lambda ps: np.concatenate([g(p) for (_, g), p in zip(parts, ps)], axis=0),
        )

    fused = arch in _FUSED_WEIGHTS
    out = {"model.embed_tokens.weight": (("embed", "embedding"), (V, D), *same)}
    out["model.norm.weight"] = (("final_norm", "scale"), (D,), *same)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (("lm_head", "kernel"), (V, D), *lin)
    o = (lambda w: w.T.reshape(N, H, D), lambda p: p.reshape(N * H, D).T)
    for i in range(cfg.n_layers):
        hf, us = f"model.layers.{i}.", f"layers_{i}"
        if cfg.norm_placement == "post":  # OLMo 2: after attention / the MLP
            out[hf + "post_attention_layernorm.weight"] = ((us, "attn_norm", "scale"), (D,), *same)
            out[hf + "post_feedforward_layernorm.weight"] = ((us, "mlp_norm", "scale"), (D,),
                                                             *same)  # fmt: skip
        elif cfg.norm_placement == "sandwich":  # Gemma 2/3: before and after each
            for theirs, ours in (("input_layernorm", "attn_norm"),
                                 ("post_attention_layernorm", "attn_post_norm"),
                                 ("pre_feedforward_layernorm", "mlp_norm"),
                                 ("post_feedforward_layernorm", "mlp_post_norm")):  # fmt: skip
                out[hf + f"{theirs}.weight"] = ((us, ours, "scale"), (D,), *same)
        else:
            out[hf + "input_layernorm.weight"] = ((us, "attn_norm", "scale"), (D,), *same)
            out[hf + "post_attention_layernorm.weight"] = ((us, "mlp_norm", "scale"), (D,), *same)
        for name, n in (("q", N), ("k", K), ("v", K)) if not fused else ():
            p = hf + f"self_attn.{name}_proj."
            out[p + "weight"] = ((us, "attn", name, "kernel"), (n * H, D), *heads(n))
            if cfg.qkv_bias:
                out[p + "bias"] = ((us, "attn", name, "bias"), (n * H,), *bias(n))
        if fused:  # one weight, split on the output rows: q (N·H), k (K·H), v (K·H)
            paths = [(us, "attn", x, "kernel") for x in "qkv"]
            out[hf + "self_attn.qkv_proj.weight"] = (paths, ((N + 2 * K) * H, D), *joined(
                [heads(N), heads(K), heads(K)], [N * H, K * H, K * H]))  # fmt: skip
        if cfg.qk_norm != "none":  # per head: (H,); OLMo 2's over all heads: (N·H,), (K·H,)
            for name, n in (("q_norm", N), ("k_norm", K)):
                size = H if cfg.qk_norm == "head" else n * H
                out[hf + f"self_attn.{name}.weight"] = ((us, "attn", name, "scale"), (size,), *same)
        out[hf + "self_attn.o_proj.weight"] = ((us, "attn", "o", "kernel"), (D, N * H), *o)
        if cfg.n_experts:
            out.update(_expert_plan(cfg, arch, i, fused_experts))
            continue
        for name, shape in (("gate", (F, D)), ("up", (F, D)), ("down", (D, F))):
            if fused and name != "down":
                continue
            out[hf + f"mlp.{name}_proj.weight"] = ((us, "mlp", name, "kernel"), shape, *lin)
        if fused:  # gate rows first, then up (Phi3MLP chunks the output in two)
            paths = [(us, "mlp", x, "kernel") for x in ("gate", "up")]
            split = joined([lin, lin], [F, F])
            out[hf + "mlp.gate_up_proj.weight"] = (paths, (2 * F, D), *split)
    return out


def _expert_plan(cfg: ModelConfig, arch: str | None, i: int, fused: bool) -> dict[str, tuple]:
    """Layer i's router, experts (and Qwen2-MoE's shared expert) in `_plan`'s terms. Mixtral
    keeps them under block_sparse_moe. (w1 gate, w3 up, w2 down), transformers 5 in memory under
    mlp.; the others under mlp. (gate_proj, up_proj, down_proj)."""
    D, E, F, S = cfg.d_model, cfg.n_experts, cfg.d_expert_, cfg.d_shared_expert
    us = (f"layers_{i}", "mlp")
    lin = (lambda w: w.T, lambda p: p.T)
    block = "block_sparse_moe" if arch == "mixtral" and not fused else "mlp"
    hf = f"model.layers.{i}.{block}."
    out = {hf + "gate.weight": ((*us, "router", "kernel"), (E, D), *lin)}
    experts = {x: (*us, "experts", x, "kernel") for x in ("gate", "up", "down")}
    if fused:  # (E, 2F, D): gate rows, then up rows, per expert; down (E, D, F)
        swap = (lambda w: np.swapaxes(w, 1, 2), lambda p: np.swapaxes(p, 1, 2))
        out[hf + "experts.gate_up_proj"] = (
            [experts["gate"], experts["up"]], (E, 2 * F, D),
            lambda w: [np.swapaxes(w[:, :F], 1, 2), np.swapaxes(w[:, F:], 1, 2)],
            lambda ps: np.concatenate([np.swapaxes(p, 1, 2) for p in ps], axis=1),
        )  # fmt: skip
        out[hf + "experts.down_proj"] = (experts["down"], (E, D, F), *swap)
    else:  # all experts' gates, then ups, then downs: export fetches each kernel once
        names = _EXPERT_NAMES.get(arch, ("gate_proj", "up_proj", "down_proj"))
        for x, theirs, shape in zip(("gate", "up", "down"), names, ((F, D), (F, D), (D, F))):
            for j in range(E):
                out[hf + f"experts.{j}.{theirs}.weight"] = (_Row((experts[x], j, E)), shape, *lin)
    if S:  # Qwen2-MoE's shared expert, scaled by sigmoid(x · shared_expert_gate)
        for x, shape in (("gate", (S, D)), ("up", (S, D)), ("down", (D, S))):
            out[hf + f"shared_expert.{x}_proj.weight"] = ((*us, "shared", x, "kernel"), shape, *lin)
    if cfg.shared_expert_gate:
        out[hf + "shared_expert_gate.weight"] = ((*us, "shared_gate", "kernel"), (1, D), *lin)
    return out


def _zero_extras(cfg: ModelConfig, arch: str) -> dict[str, tuple]:
    """Tensors an HF arch needs that our model does not have (written as zeros on export):
    Qwen2 and Qwen2-MoE always have q/k/v biases; the others' attention_bias also biases
    o_proj."""
    D, H = cfg.d_model, cfg.head_dim_
    out = {}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}.self_attn."
        if arch in ("qwen2", "qwen2_moe") and not cfg.qkv_bias:
            for name, n in (("q", cfg.n_heads), ("k", cfg.n_kv_heads), ("v", cfg.n_kv_heads)):
                out[p + f"{name}_proj.bias"] = (n * H,)
        if arch not in ("qwen2", "qwen2_moe") and cfg.qkv_bias:
            out[p + "o_proj.bias"] = (D,)
    return out


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight")


def _has_fused_experts(path: str) -> bool:
    """Whether a checkpoint keeps its experts fused (transformers 5's in-memory layout:
    mlp.experts.gate_up_proj / down_proj), judged by the tensor names (headers only)."""
    from safetensors import safe_open

    try:
        files = _shard_files(path)
        if files == ["model.safetensors"]:
            with safe_open(os.path.join(path, files[0]), framework="numpy") as f:
                names = list(f.keys())
        else:
            names = load_hf_json(path, "model.safetensors.index.json")["weight_map"]
    except Exception:  # (unreadable: load_pretrained names the problem)
        return False
    return any(n.endswith(".experts.gate_up_proj") for n in names)


def _shard_files(path: str) -> list[str]:
    # transformers reads model.safetensors when both it and an index are present (a stale index
    # left beside a re-saved single file): so do we, or we would load other weights than it does
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return ["model.safetensors"]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = load_hf_json(path, "model.safetensors.index.json").get("weight_map")
        if not weight_map:
            raise HFError(f"{index}: no 'weight_map'")
        return sorted(set(weight_map.values()))
    raise HFError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def _placements(cfg: ModelConfig, mesh, rules):
    """Our param path -> sharding (or None: default device)."""
    if mesh is None:
        return lambda path: None
    import flax.linen as nn

    boxed = jax.eval_shape(
        lambda r: Transformer(cfg).init(r, jnp.zeros((1, 4), jnp.int32)), jax.random.PRNGKey(0)
    )["params"]
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    return lambda path: _get(shardings, path)


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
    from safetensors import safe_open

    cfg = load_config(path)
    if dtype is not None:
        dtype = _dtype_name(dtype, "import")
        cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    arch = load_hf_json(path).get("model_type")
    prefix = MULTIMODAL[arch][1] if arch in MULTIMODAL else ""
    fused = bool(cfg.n_experts) and _has_fused_experts(path)
    plan, place = _plan(cfg, arch, fused), _placements(cfg, mesh, rules)
    params, seen = {}, set()
    stacks = {}  # our expert kernel -> [host buffer (E, ...), rows filled], until complete
    for fname in _shard_files(path):
        full = os.path.join(path, fname)
        if not os.path.exists(full):
            raise HFError(f"{path}: shard {fname} listed in the index is missing")
        try:  # safetensors' own errors ("incomplete metadata", ...) name no file
            handle = safe_open(full, framework="numpy")
        except Exception as e:
            raise HFError(f"{full}: cannot read safetensors: {type(e).__name__}: {e}") from e
        with handle as f:
            for stored in f.keys():
                if prefix and stored.startswith(_OTHER_TOWERS):
                    continue  # (a multimodal checkpoint's image tower: not the text model)
                name = stored[len(prefix) :] if prefix and stored.startswith(prefix) else stored
                if prefix and name == stored:
                    raise HFError(f"{full}: unexpected tensor {stored} (the text model's are "
                                  f"under {prefix!r})")  # fmt: skip
                if name in seen:
                    raise HFError(f"{full}: tensor {stored} appears in two shards")
                if name not in plan:
                    if name.endswith("o_proj.bias") and cfg.qkv_bias:
                        if np.any(_tensor(f, stored, full) != 0):  # Llama attention_bias
                            raise HFError(f"{full}: {name} is nonzero; o_proj bias unsupported")
                        continue
                    if _ignorable(name, cfg):
                        continue
                    j = re.search(r"\.experts\.(\d+)\.", name)
                    if j and cfg.n_experts and int(j.group(1)) >= cfg.n_experts:
                        raise HFError(f"{full}: tensor {name} is expert {j.group(1)}, but "
                                      f"config.json has {cfg.n_experts} experts (num_experts / "
                                      "num_local_experts)")  # fmt: skip
                    raise HFError(f"{full}: unexpected tensor {name} for {cfg_summary(cfg)}")
                ours, shape, to_ours, _ = plan[name]
                w = _tensor(f, stored, full)
                if tuple(w.shape) != shape:
                    raise HFError(
                        f"{full}: tensor {name} has shape {tuple(w.shape)}, expected {shape} "
                        "from config.json"
                    )
                if isinstance(ours, list):  # a fused HF weight: several of ours
                    for p, part in zip(ours, to_ours(w)):
                        part = np.asarray(part).astype(cfg.weight_dtype)
                        _set(params, p, jax.device_put(part, place(p)))
                elif isinstance(ours, _Row):  # one expert's: placed when all E are read
                    row = np.asarray(to_ours(w)).astype(cfg.weight_dtype)
                    if ours.path not in stacks:
                        buf = np.empty((ours.rows, *row.shape), row.dtype)
                        stacks[ours.path] = [buf, 0]
                    stack = stacks[ours.path]
                    stack[0][ours.row] = row
                    stack[1] += 1
                    if stack[1] == ours.rows:
                        _set(params, ours.path, jax.device_put(stack[0], place(ours.path)))
                        del stacks[ours.path], stack
                    del row
                else:
                    w = np.asarray(to_ours(w)).astype(cfg.weight_dtype)
                    _set(params, ours, jax.device_put(w, place(ours)))
                seen.add(name)
                del w
    missing = [n for n in plan if n not in seen]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise HFError(f"{path}: missing tensor(s) {missing[:5]}{more}")
    return cfg, params


def _dtype_name(dtype, where: str) -> str:
    """The name of a float dtype HF config.json can state (and load_pretrained reads back)."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _DTYPES:
        raise HFError(f"{where}: dtype {dtype!r} is not supported; choose one of {_DTYPES}")
    return name


def _tensor(f, name: str, full: str) -> np.ndarray:
    try:
        return f.get_tensor(name)
    except Exception as e:  # a truncated or corrupt file
        raise HFError(f"{full}: cannot read tensor {name}: {type(e).__name__}: {e}") from e


def cfg_summary(cfg: ModelConfig) -> str:
    return (f"L={cfg.n_layers} D={cfg.d_model} N={cfg.n_heads} K={cfg.n_kv_heads} "
            f"qkv_bias={cfg.qkv_bias} qk_norm={cfg.qk_norm} norms={cfg.norm_placement} "
            f"tied={cfg.tie_embeddings}"
            + (f" experts={cfg.n_experts} top-{cfg.n_experts_per_token} "
               f"shared={cfg.d_shared_expert}" if cfg.n_experts else ""))  # fmt: skip


def _safe_dtype(x: np.ndarray, dtype) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x).astype(dtype))


def save_pretrained(cfg: ModelConfig, params, path: str, arch: str = "llama", *,
                    dtype=None, max_shard_bytes: int = 4 << 30, tokenizer: str | None = None,
                    overwrite: bool = False, extra_config: dict | None = None,
                    extra_files: dict[str, dict] | None = None) -> None:  # fmt: skip
    """Writes `params` as an HF `arch` checkpoint (config.json + safetensors) at `path`.

    Writes into a temporary sibling directory and renames it into place, so `path` is either
    absent/old or complete. Shards above `max_shard_bytes` with an index, as HF does.
    `tokenizer`: a tokenizer file or directory whose tokenizer files are copied along;
    `extra_files`: JSON files (name → object) written last, e.g. a tokenizer_config.json.
    """
    from safetensors.numpy import save_file

    config = config_to_hf(cfg, arch, **(extra_config or {}))
    params = flax.linen.meta.unbox(params)  # boxed, as `Transformer.init` returns them, too
    if cfg.scan_layers:
        params = unstack_layers(params, cfg.n_layers)
    np_dtype = jnp.dtype(_dtype_name(dtype or cfg.param_dtype, "export"))
    config["dtype"] = config["torch_dtype"] = np_dtype.name
    tensors = []  # (name, fetch) in HF order; fetched one at a time while writing

    last = [None, None]  # the last param fetched: an expert kernel serves its E tensors

    def host(path):  # one param on the host
        if last[0] != path:
            last[:] = path, None  # (the previous one freed first)
            last[1] = np.asarray(jax.device_get(_get(params, path)))
        return last[1]

    def ours_on_host(ours):
        if isinstance(ours, _Row):
            return host(ours.path)[ours.row]
        return [host(p) for p in ours] if isinstance(ours, list) else host(ours)

    for name, (ours, shape, _, to_hf) in _plan(cfg, arch).items():
        tensors.append((name, shape, lambda ours=ours, to_hf=to_hf: to_hf(ours_on_host(ours))))
    for name, shape in _zero_extras(cfg, arch).items():
        tensors.append((name, shape, lambda shape=shape: np.zeros(shape, np.float32)))
    shards, size = [[]], 0
    for t in tensors:
        nbytes = int(np.prod(t[1])) * np_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    with atomic_directory(path, overwrite) as tmp:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = (
                "model.safetensors"
                if len(shards) == 1
                else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            )
            arrays = {}
            for name, _, fetch in shard:
                arrays[name] = _safe_dtype(fetch(), np_dtype)
                weight_map[name] = fname
                total += arrays[name].nbytes
            save_file(arrays, os.path.join(tmp, fname), metadata={"format": "pt"})
            del arrays
        if len(shards) > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(
                    {"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1
                )
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if tokenizer:
            copy_tokenizer(tokenizer, tmp)
        for name, obj in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=2, ensure_ascii=False)


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = False):
    """Yields a temporary sibling directory to write an export into, renamed to `path` when
    the block completes (removed if it raises): `path` is either absent/old or complete. An
    existing non-empty `path` needs `overwrite`; the old one is moved aside first, then
    deleted. Files get the umask's mode (safetensors writes its own 0600, which left a shared
    or served export unreadable), the directory 0755."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):  # overwrite replaces directories only
        raise HFError(f"export: {path} exists and is not a directory")
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise HFError(f"export: {path} exists and is not empty (pass overwrite=True)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
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


def forward(cfg: ModelConfig, params, tokens, positions=None, segment_ids=None):
    """Logits (B, T, V) in float32-or-compute dtype, jitted once per config and shape.

    HF-style batches map as: segment_ids = attention_mask, positions = cumsum(mask) - 1 (left
    padding) — padded positions get meaningless logits; compare only real ones.
    """
    return _forward_fn(cfg)(params, jnp.asarray(tokens), positions, segment_ids)


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


def default_arch(cfg: ModelConfig) -> str:
    """The HF family that expresses `cfg` (Gemma's for Gemma-style norms and embeddings, OLMo 2
    for post-norm blocks, Qwen3 for per-head q/k norms, Phi-3 for partial rotary, Qwen2 for
    q/k/v biases, Mistral for a window; with experts: OLMoE for norms over all heads, Qwen3-MoE
    per head, Qwen2-MoE for a shared expert, else Mixtral)."""
    if cfg.n_experts:
        if cfg.qk_norm != "none":
            return "olmoe" if cfg.qk_norm == "all" else "qwen3_moe"
        return "qwen2_moe" if cfg.d_shared_expert else "mixtral"
    if cfg.nope_layer_interval:
        return "smollm3"
    if cfg.norm_unit_offset or cfg.scale_embeddings:
        if cfg.qk_norm != "none" or cfg.rope_local_theta:
            return "gemma3_text"
        sandwich = cfg.norm_placement == "sandwich"
        gemma2 = (cfg.sliding_window or cfg.attn_logit_softcap or cfg.final_logit_softcap
                  or cfg.query_pre_attn_scalar not in (0, cfg.head_dim_))  # fmt: skip
        return "gemma2" if sandwich or gemma2 else "gemma"
    if cfg.norm_placement == "post":
        return "olmo3" if cfg.sliding_window else "olmo2"
    if cfg.qk_norm != "none":
        return "qwen3"
    if cfg.rotary_dim:
        return "phi3"
    return "qwen2" if cfg.qkv_bias else "mistral" if cfg.sliding_window else "llama"


def import_to_run(hf_dir: str, run_dir: str, dtype=None) -> str:
    """Writes an HF checkpoint as a flaxlm run (step 0; params only) that `load_model`,
    `init_from` and `python -m flaxlm.generate` read; copies the tokenizer along."""
    from flaxlm.train.checkpoint import Checkpointer

    if os.path.realpath(run_dir) == os.path.realpath(hf_dir):  # (was shutil's SameFileError)
        raise HFError(f"import: the run directory {run_dir} is the HF checkpoint; import into a "
                      "new directory")  # fmt: skip
    ckpts = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(ckpts) and os.listdir(ckpts):  # the step-0 save would be skipped or hidden
        raise HFError(f"import: {run_dir} already holds checkpoints; import into a new directory")
    cfg, params = load_pretrained(hf_dir, dtype)
    meta = {
        "model_config": cfg.to_dict(),
        "task": "hf_import",
        "hf_source": os.path.abspath(hf_dir),
        "hf_arch": text_config(load_hf_json(hf_dir))["model_type"],
    }
    for f in ("tokenizer.json", "tokenizer.model"):
        if os.path.exists(os.path.join(hf_dir, f)):
            load_tokenizer(os.path.join(hf_dir, f), cfg.vocab_size)  # unreadable: fail now
            os.makedirs(run_dir, exist_ok=True)
            copy_tokenizer(hf_dir, run_dir)
            meta["tokenizer"] = os.path.join(os.path.abspath(run_dir), f)
            break
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
        extra = {k: v for k, v in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id))
                 if v >= 0}  # fmt: skip
        if tok_path.endswith(".json"):
            tok_path = os.path.dirname(tok_path)
        else:  # flaxlm's SentencePiece model: settings (and chat template) for AutoTokenizer
            files = sentencepiece_hf_files(tok)
    save_pretrained(cfg, params, hf_dir, arch, dtype=dtype, tokenizer=tok_path or None,
                    overwrite=overwrite, extra_config=extra, extra_files=files)  # fmt: skip
    return hf_dir


def load_hf_json(path: str, name: str = "config.json") -> dict:
    """A JSON object file of an HF directory; malformed JSON raises HFError naming the file."""
    where = os.path.join(path, name)
    try:
        with open(where) as f:
            out = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise HFError(f"{where}: expected a JSON object, got {type(out).__name__}")
    return out


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
