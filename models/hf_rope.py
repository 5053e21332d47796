"""RoPE settings between HF config.json and ModelConfig, both directions.

Both rope layouts are read: the newer `rope_parameters` {rope_type, rope_theta, ...} and the
older `rope_theta` + `rope_scaling` {type|rope_type, factor, ...}; rope types default, linear,
llama3, yarn (Qwen2.5/Qwen3 long context; `mscale`/`mscale_all_dim` become the attention
factor) and longrope (Phi-3.5, Phi-4-mini; "su" and "yarn" in Phi-3's first configs); a
top-level `original_max_position_embeddings` wins over the rope parameters' (as in
transformers 5). Phi-3's `partial_rotary_factor` is `rotary_dim`. Gemma 3's and OLMo 3's two
RoPEs (rope_parameters by layer type, or rope_theta + rope_scaling + Gemma 3's
rope_local_base_freq) are the global layers' rope_theta/rope_scaling and the local layers'
`rope_local_theta`. Export writes both rope layouts, so older and newer transformers read it.

Separate from models/hf_config.py (which calls `_rope_from_hf`, `_rope_by_layer_type`,
`_rotary_dim` and `_rope_to_hf`) because the rope types' parsing and defaults are a subject
of their own; the public API is models/hf.py.
"""

from __future__ import annotations

import math

import numpy as np

from flaxlm.models.attention import rope_attention_factor
from flaxlm.models.config import ModelConfig
from flaxlm.models.hf_arch import _ROPE_BY_TYPE, _number
from flaxlm.models.hf_tokenizer import HFError


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


def _rope_to_hf(cfg: ModelConfig) -> tuple[dict, dict | None]:
    """(rope_parameters, rope_scaling) of `cfg` for config.json: the newer layout (with
    rope_theta) and the older one (None when unscaled)."""
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
    return rope, legacy


def _rope_parameters_by_type(cfg: ModelConfig, rope: dict) -> dict:
    """rope_parameters by layer type (Gemma 3, OLMo 3): the global layers' `rope`, the local
    ones' unscaled base rope_local_theta (or `rope` too without one)."""
    local = ({"rope_type": "default", "rope_theta": cfg.rope_local_theta}
             if cfg.rope_local_theta else dict(rope))  # fmt: skip
    return {"full_attention": rope, "sliding_attention": local}
