"""HF config.json <-> ModelConfig: per-family reading (`config_from_hf`, `load_config`),
writing (`config_to_hf`, refusing a model the arch cannot state) and `default_arch`.

Config. RoPE is read and written by models/hf_rope.py. Sliding windows: Mistral's
`sliding_window`; Qwen2/3's `use_sliding_window` / `max_window_layers` / `layer_types` (all
layers alike); Gemma 2/3's and OLMo 3's `layer_types` (or Gemma's older
`sliding_window_pattern`) with every P-th layer global, `sliding_window_pattern=P`; other mixes
are an error. What sets a family apart is fixed per arch (ARCH_FIXED): Qwen3's per-head q/k
RMSNorms are `qk_norm="head"`; OLMo 2's norms over all heads' q and k are `qk_norm="all"` and
its norms after attention and the MLP `norm_placement="post"`; Gemma's norms scale by (1 + w)
(`norm_unit_offset`) and its embeddings by sqrt(D) (`scale_embeddings`), Gemma 2/3 normalise
before and after attention and the MLP (`norm_placement="sandwich"`) and scale logits by
`query_pre_attn_scalar`; Gemma 2's soft-caps are `attn_logit_softcap` / `final_logit_softcap`;
Gemma 3's and OLMo 3's two RoPEs are the global layers' rope_theta/rope_scaling and the local
layers' `rope_local_theta`; OLMo 3 is OLMo 2's blocks with such layers. Phi-3/Phi-4: their fused
qkv_proj and gate_up_proj weights split into q/k/v and gate/up (joined again on export,
models/hf_weights.py), `partial_rotary_factor` is `rotary_dim`, a `sliding_window` covers every
layer; their long-context LongRoPE (Phi-3.5, Phi-4-mini; "su" and "yarn" in Phi-3's first
configs) is `rope_scaling="longrope"`, short or long factors chosen per row by the row's own
last real position (models/rope.py `longrope_long`): as transformers chooses for one unpadded
sequence, but transformers takes one choice for a padded batch from its longest row, so its
shorter rows there depend on their batch mates and flaxlm's do not. (In generation too: when a
sequence grows past the original context, transformers' Phi-3 `generate` recomputes its whole
cache with the long factors once; flaxlm's decode keeps the keys it cached.) Gemma 3 loads as
`gemma3_text` (Gemma3ForCausalLM), also from the image-text checkpoints of Gemma 3 4B-27B
(model_type "gemma3", MULTIMODAL): their text_config (sparse; Gemma3TextConfig's defaults fill
it) and the tensors under language_model.; the image tower is skipped, export writes
gemma3_text. SmolLM3's layers
without RoPE (`no_rope_layers`, or every `no_rope_layer_interval`-th) are
`nope_layer_interval`; its windows (on those layers) are refused.

Mixtures of experts: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE; their config keys are read,
checked and written by models/hf_moe.py.

Separate from the tensors (models/hf_weights.py) because a config is read and checked without
touching weights (`load_config`); the public API is models/hf.py, which re-exports these.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings

import jax.numpy as jnp

from flaxlm.models.config import ModelConfig
from flaxlm.models.hf_arch import (
    _ACTS,
    _DTYPES,
    _GEMMA,
    _GEMMA3_DEFAULTS,
    _LAYER_PERIOD,
    _MOE,
    _QWEN,
    _ROPE_BY_TYPE,
    _TIED_BY_DEFAULT,
    ARCH_FEATURES,
    ARCH_FIXED,
    ARCHS,
    LLAMA_FIXED,
    _number,
    load_hf_json,
    text_config,
)
from flaxlm.models.hf_moe import _moe_from_hf, _moe_mismatch, _moe_to_hf
from flaxlm.models.hf_rope import (
    _rope_by_layer_type,
    _rope_from_hf,
    _rope_parameters_by_type,
    _rope_to_hf,
    _rotary_dim,
)
from flaxlm.models.hf_tokenizer import HFError

# ----------------------------------------------------------------------------------------------
# config.json -> ModelConfig


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

    def need(key):  # a required integer; a value that is no number names its key
        if hf.get(key) is None:
            raise HFError(f"{where}: missing key {key!r}")
        return _number(hf, key, where, cast=int)

    def count(key, default):  # an optional integer: null or 0 mean the default
        return _number(hf, key, where, default, int, null_is_default=True) or default

    def scalar(key, default=0.0):  # an optional float: null or 0 mean the default
        return _number(hf, key, where, default, float, null_is_default=True) or default

    D, N, L = need("hidden_size"), need("num_attention_heads"), need("num_hidden_layers")
    for key, value in (("hidden_size", D), ("num_attention_heads", N), ("num_hidden_layers", L)):
        if value < 1:  # (0 heads was a ZeroDivisionError below, before ModelConfig's checks)
            raise HFError(f"{where}: {key} must be >= 1, got {value}")
    act = _hidden_act(hf, mt)
    if act not in _ACTS:
        raise HFError(f"{where}: hidden_act {act!r} is not supported ({sorted(_ACTS)})")
    if hf.get("mlp_bias"):
        raise HFError(f"{where}: mlp_bias=true is not supported")
    dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    if dtype not in _DTYPES:
        raise HFError(f"{where}: dtype {dtype!r} is not supported ({_DTYPES})")
    head_dim = count("head_dim", D // N)
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
    with _config_rejected(hf, where):
        return ModelConfig(
            vocab_size=need("vocab_size"),
            d_model=D,
            n_layers=L,
            n_heads=N,
            n_kv_heads=count("num_key_value_heads", N),
            head_dim=0 if head_dim * N == D else head_dim,
            d_ff=need("intermediate_size"),
            # (null: only a length warning in decoding hangs on it; missing and null alike 2048)
            max_seq_len=_number(
                hf, "max_position_embeddings", where, 2048, int, null_is_default=True
            ),
            norm_eps=_number(hf, "rms_norm_eps", where, 1e-6),
            qkv_bias=_qkv_bias(hf, mt),
            rotary_dim=0 if mt in _ROPE_BY_TYPE else _rotary_dim(hf, head_dim, where),
            tie_embeddings=_flag(hf, "tie_word_embeddings", mt in _TIED_BY_DEFAULT, where),
            mlp_activation=_ACTS[act],
            sliding_window=window,
            sliding_window_pattern=pattern,
            nope_layer_interval=nope,
            query_pre_attn_scalar=scalar("query_pre_attn_scalar", 256.0) if gemma2 else 0.0,
            # (transformers' Gemma 3 ignores attn_logit_softcapping: so do we)
            attn_logit_softcap=scalar("attn_logit_softcapping") if mt == "gemma2" else 0.0,
            final_logit_softcap=scalar("final_logit_softcapping") if gemma2 else 0.0,
            dtype=dtype,
            param_dtype=dtype,
            **{**LLAMA_FIXED, **ARCH_FIXED.get(mt, {})},
            **rope,
            **moe,
        )


def _flag(hf: dict, key: str, default: bool, where: str) -> bool:
    """A true/false config.json key (null or absent: `default`); the string "false" would be
    true to bool(), so a value that is no JSON boolean is an HFError naming the key."""
    value = hf.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise HFError(f"{where}: {key}={value!r} is not true or false")
    return value


# config.json keys each ModelConfig field is read from (what a rejection of the field names)
_HF_KEYS = {
    "vocab_size": ("vocab_size",),
    "d_model": ("hidden_size",),
    "n_layers": ("num_hidden_layers",),
    "n_heads": ("num_attention_heads",),
    "n_kv_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "d_ff": ("intermediate_size",),
    "max_seq_len": ("max_position_embeddings",),
    "norm_eps": ("rms_norm_eps",),
    "rotary_dim": ("partial_rotary_factor", "rotary_dim"),
    "sliding_window": ("sliding_window",),
    "sliding_window_pattern": ("sliding_window_pattern", "layer_types"),
    "rope_theta": ("rope_theta", "rope_parameters"),
    "rope_local_theta": ("rope_local_base_freq", "rope_parameters"),
    "n_experts": ("num_experts", "num_local_experts"),
    "n_experts_per_token": ("num_experts_per_tok",),
    "d_expert": ("moe_intermediate_size",),
    "d_shared_expert": ("shared_expert_intermediate_size",),
    "query_pre_attn_scalar": ("query_pre_attn_scalar",),
    "attn_logit_softcap": ("attn_logit_softcapping",),
    "final_logit_softcap": ("final_logit_softcapping",),
    **dict.fromkeys(("rope_scaling_factor", "rope_original_max_len", "rope_yarn_beta_fast",
                     "rope_yarn_beta_slow", "rope_short_factors", "rope_long_factors"),
                    ("rope_scaling", "rope_parameters")),
}  # fmt: skip


@contextlib.contextmanager
def _config_rejected(hf: dict, where: str):
    """ModelConfig's own checks (a head count the kv heads do not divide, an odd head_dim)
    raised a bare ValueError naming neither the file nor its keys: re-raised as an HFError
    naming `where` and the config.json keys (with their values) of the fields it names."""
    try:
        yield
    except (TypeError, ValueError) as e:
        if isinstance(e, HFError):
            raise
        msg = str(e)
        fields = [f for f in _HF_KEYS if re.search(rf"\b{f}\b", msg)]
        keys = [k for f in fields for k in _HF_KEYS[f]]
        if "head_dim" in fields and hf.get("head_dim") is None:  # derived: D // N
            keys += ["hidden_size", "num_attention_heads"]
        shown = [
            f"{k}={hf[k]!r}" if isinstance(hf[k], (int, float, str)) else k
            for k in dict.fromkeys(keys) if hf.get(k) is not None
        ]  # fmt: skip
        head = f"{where}: {', '.join(shown)}: " if shown else f"{where}: "
        raise HFError(f"{head}not a model flaxlm can build ({msg})") from None


def _qkv_bias(hf: dict, mt: str) -> bool:
    if mt == "qwen2":
        return True
    if mt == "qwen2_moe":  # (transformers 5 reads qkv_bias; before, they were always there)
        return bool(hf.get("qkv_bias", True))
    return bool(hf.get("attention_bias", False))


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


def load_config(path: str) -> ModelConfig:
    """ModelConfig of an HF directory (its config.json) without reading weights."""
    where = os.path.join(path, "config.json")
    if not os.path.exists(where):
        raise HFError(f"{path}: no config.json (not an HF checkpoint directory)")
    return config_from_hf(load_hf_json(path), where)


# ----------------------------------------------------------------------------------------------
# ModelConfig -> config.json


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
    rope, legacy = _rope_to_hf(cfg)
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


def _int_if_whole(x: float):
    """transformers' strict configs type some float-valued fields int (query_pre_attn_scalar)."""
    return int(x) if float(x).is_integer() else float(x)


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
