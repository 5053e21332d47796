"""The Hugging Face families flaxlm reads and writes, as tables, and the small readers that
config import, config export and tensor loading share.

ARCHS maps each supported model_type to its transformers class; LLAMA_FIXED / ARCH_FIXED say
what a family always has (import sets it, export refuses a model that differs), ARCH_FEATURES
which optional fields a family's config.json can state; the private tables name the
mixture-of-experts, Gemma, Qwen, multimodal and fused-weight families and their defaults.
Beside them: `load_hf_json` (a directory's JSON files), `text_config` (a multimodal
checkpoint's text model), `_number` (a config value as a number) and `_dtype_name`.

Separate so that the config modules (models/hf_config.py with hf_rope.py and hf_moe.py) and
the tensor module (models/hf_weights.py) share one set of tables while neither imports the
other; models/hf.py is the public API (and re-exports the names here that callers used from
it).
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp

from flaxlm.models.hf_tokenizer import HFError

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
        if isinstance(value, bool) or (cast is int and isinstance(value, float)
                                       and not value.is_integer()):  # fmt: skip
            raise TypeError  # (int(1.5) would be 1: a size that is no integer is no size)
        return cast(value)
    except (TypeError, ValueError):
        what = "an integer" if cast is int else "a number"
        raise HFError(f"{where}: {key}={value!r} is not {what}") from None


def load_hf_json(path: str, name: str = "config.json") -> dict:
    """A JSON object file of an HF directory; malformed JSON raises HFError naming the file."""
    where = os.path.join(path, name)
    try:
        with open(where) as f:
            out = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFError(f"{where}: not valid JSON ({e})") from None
    except RecursionError:  # (a traceback through every CLI)
        raise HFError(f"{where}: nested too deeply to parse") from None
    if not isinstance(out, dict):
        raise HFError(f"{where}: expected a JSON object, got {type(out).__name__}")
    return out


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


def _dtype_name(dtype, where: str) -> str:
    """The name of a float dtype HF config.json can state (and load_pretrained reads back)."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _DTYPES:
        raise HFError(f"{where}: dtype {dtype!r} is not supported; choose one of {_DTYPES}")
    return name
