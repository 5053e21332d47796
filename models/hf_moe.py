"""The mixture-of-experts keys of HF config.json <-> ModelConfig's experts fields.

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
which layers) and OLMoE's clip_qkv. HF never drops assignments, so import sets
moe_capacity_factor=0; a model trained with a capacity factor still exports (with a warning:
the factor is not written and the export computes the dropless forward).
router_aux_loss_coef is a training setting: ignored on import, each class's default written.
The experts' tensors are models/hf_weights.py's.

Separate from models/hf_config.py, which calls `_moe_from_hf`, `_moe_mismatch` and
`_moe_to_hf`, because the MoE families' keys and their checks are a subject of their own;
the public API is models/hf.py.
"""

from __future__ import annotations

from flaxlm.models.config import ModelConfig
from flaxlm.models.hf_arch import _MOE, _ROUTER_AUX_DEFAULT
from flaxlm.models.hf_tokenizer import HFError


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
