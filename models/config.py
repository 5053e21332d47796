"""Model configuration: one frozen dataclass for the whole Llama family, plus named variants.

A `ModelConfig` describes the architecture (and its numerics) completely; checkpoints store it
as JSON next to the weights, and HF import/export translates it to and from `config.json`.
Configs files hold the same fields as a `ConfigDict` (`config.model`), so every field can be
overridden from the command line (`--config.model.n_layers=4`).

Sentinels instead of None (0 = "derived"/"off") keep the fields typed for ConfigDict overrides.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Llama-family decoder-only Transformer (covers Llama 1/2/3, Mistral, Qwen2/3, Phi-3,
    OLMo 2, Gemma 1/2/3, SmolLM3, TinyLlama), with a mixture-of-experts MLP (Mixtral, Qwen2-MoE,
    Qwen3-MoE, OLMoE) when n_experts > 0."""

    vocab_size: int = 256  # rows of the embedding table (>= the tokenizer's vocab)
    d_model: int = 64  # residual stream width D
    n_layers: int = 2  # number of Transformer blocks L
    n_heads: int = 4  # query heads N
    n_kv_heads: int = 4  # key/value heads K (N = MHA, 1 = MQA, else GQA); divides n_heads
    head_dim: int = 0  # H; 0 = d_model // n_heads
    d_ff: int = 256  # hidden width of the gated MLP
    max_seq_len: int = 2048  # longest sequence the model is meant for (RoPE tables, decoding)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base frequency
    rotary_dim: int = 0  # leading head dims RoPE rotates (Phi's partial rotary); 0 = head_dim
    rope_scaling: str = "none"  # none | linear | llama3 | yarn | longrope
    # context extension factor for linear / llama3 / yarn; longrope's attention factor's (1:
    # max_seq_len / rope_original_max_len, transformers' default)
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 scaling: long wavelengths are fully scaled
    rope_high_freq_factor: float = 4.0  # llama3 scaling: short wavelengths are kept
    rope_original_max_len: int = 8192  # llama3 / yarn / longrope: pretraining context length
    # yarn scaling (Qwen2.5/Qwen3 long context, DeepSeek): frequencies that turn more than
    # beta_fast times over the original context are kept, fewer than beta_slow times scaled,
    # ramped in between; cos/sin are multiplied by the attention factor (0 = 0.1·ln(factor)+1)
    rope_yarn_beta_fast: float = 32.0
    rope_yarn_beta_slow: float = 1.0
    rope_yarn_truncate: bool = True  # round the ramp's ends to whole dims (HF's default)
    rope_attention_factor: float = 0.0
    # longrope (Phi-3.5, Phi-4-mini long context): each rotary frequency divided by its own
    # factor, the short ones while a batch's positions stay within rope_original_max_len and
    # the long ones beyond; cos/sin times the attention factor (0 = sqrt(1 + ln(factor) /
    # ln(original))). rotary_dim / 2 factors each.
    rope_short_factors: tuple = ()
    rope_long_factors: tuple = ()
    qkv_bias: bool = False  # biases on q/k/v projections (Qwen2)
    # RMSNorm of q and k before RoPE: none | head (over head_dim, each head: Qwen3) | all (over
    # all heads' dims at once: OLMo 2)
    qk_norm: str = "none"
    # pre: x + f(norm(x)) (Llama) | post: x + norm(f(x)) (OLMo 2) | sandwich: x + norm(f(norm(x)))
    # (Gemma 2/3)
    norm_placement: str = "pre"
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + scale), scale starting at 0 (Gemma)
    scale_embeddings: bool = False  # embeddings times sqrt(d_model) before the first block (Gemma)
    # attention logits times query_pre_attn_scalar^-1/2 instead of head_dim^-1/2 (Gemma 2/3);
    # 0 = head_dim
    query_pre_attn_scalar: float = 0.0
    attn_logit_softcap: float = 0.0  # attention logits -> cap * tanh(logits / cap) (Gemma 2)
    final_logit_softcap: float = 0.0  # LM logits -> cap * tanh(logits / cap) (Gemma 2); 0 = off
    tie_embeddings: bool = False  # LM head reuses the embedding table
    mlp_activation: str = "silu"  # silu (SwiGLU) | gelu (GeGLU)
    # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; models/moe.py): n_experts > 0
    # replaces every layer's MLP by n_experts gated MLPs of width d_expert (0 = d_ff), each token
    # routed to its top n_experts_per_token by a softmax router
    n_experts: int = 0
    n_experts_per_token: int = 2
    d_expert: int = 0
    # the top-k router probabilities renormalised to sum 1 (Mixtral, Qwen3-MoE), or used as
    # they are (Qwen2-MoE, OLMoE)
    router_norm_topk: bool = True
    # assignments an expert takes per row: ceil(factor · T · k / E); beyond that they are dropped
    # (the residual carries the token). 0 = never drop (capacity T; E/k× the expert compute)
    moe_capacity_factor: float = 0.0
    d_shared_expert: int = 0  # width of a dense expert every token also passes (Qwen2-MoE)
    shared_expert_gate: bool = False  # the shared expert scaled by sigmoid(x·w) (Qwen2-MoE)
    sliding_window: int = 0  # Mistral-style local attention window; 0 = full causal attention
    # Local and global layers mixed (Gemma 2: 2, Gemma 3: 6): with a sliding_window, layer i
    # attends globally when (i + 1) % P == 0 and within the window otherwise; 0 = every layer
    # local (Mistral)
    sliding_window_pattern: int = 0
    # RoPE base of the local layers of a mixed pattern, unscaled (Gemma 3: 10000, while its
    # global layers use rope_theta and rope_scaling); 0 = the global layers' tables
    rope_local_theta: float = 0.0
    # NoPE layers (SmolLM3: 4): layer i has no RoPE when (i + 1) % P == 0; 0 = RoPE everywhere
    nope_layer_interval: int = 0
    dtype: str = "float32"  # activation / matmul dtype (bfloat16 on accelerators)
    param_dtype: str = "float32"  # parameter storage dtype (float32 master weights by default)
    # xla | cudnn (jax.nn.dot_product_attention on NVIDIA GPUs) | flash (blockwise, any backend:
    # memory linear in the sequence, masked blocks skipped; models/flash_attention.py) | splash
    # (jax's TPU splash-attention kernel, models/splash_attention.py; interpreted elsewhere)
    attention_impl: str = "xla"
    flash_block: int = 512  # query and key rows per block of attention_impl="flash" / "splash"
    # q|k|v and gate|up as one matmul each, joined in the per-step weight cast, when weights
    # are stored in another dtype than the compute dtype (layers.stacked_projection)
    join_projections: bool = True
    remat_policy: str = "none"  # none | full | dots | dots_no_batch | save_proj (see transformer)
    scan_layers: bool = False  # nn.scan over blocks: compile time O(1) in depth
    init_std: float = 0.02  # std of the normal initialiser of every weight matrix

    def __post_init__(self):
        # (n_kv_heads=0 was a ZeroDivisionError naming nothing; d_ff=0 trained without an MLP,
        # max_seq_len=0 was accepted)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                     "max_seq_len"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)}; must be >= 1")
        # 0 is "d_ff" / "no shared expert"; a negative width was an MLIRError naming nothing
        for name, zero in (("d_expert", "d_ff"), ("d_shared_expert", "no shared expert")):
            if getattr(self, name) < 0:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)}; must be >= 0 "
                                 f"(0 = {zero})")  # fmt: skip

        # Float fields are checked as `not x > 0` / `not x >= 0` plus finiteness: NaN fails
        # every comparison, so `x < 0` let it through (NaN logits, or a math.ceil error naming
        # no key), and an infinite value gave inf/NaN tables or logits the same way.
        def check_float(name: str, value: float, lowest: str, why: str = "") -> None:
            ok = value > 0 if lowest == "> 0" else value >= 0
            if not (ok and math.isfinite(value)):
                raise ValueError(f"ModelConfig.{name}={value}; must be {lowest}{why}, and finite")

        # These gave every logit NaN (a zero or negative RoPE base, a negative RMSNorm epsilon;
        # eps=0 divides a zero vector by zero): no HF config uses 0.
        for name in ("rope_theta", "norm_eps"):
            check_float(name, getattr(self, name), "> 0")
        check_float("rope_local_theta", self.rope_local_theta, ">= 0",
                    " (0 = the global layers' tables)")  # fmt: skip
        if self.rope_scaling != "none":  # (rope_scaling="none" ignores these fields)
            # factor 0 divided every frequency by zero (NaN logits); an original length of 0
            # was a math domain error in YaRN's log
            with_scaling = f" with rope_scaling={self.rope_scaling!r}"
            check_float("rope_scaling_factor", self.rope_scaling_factor, "> 0", with_scaling)
            if self.rope_scaling != "linear" and self.rope_original_max_len < 1:
                raise ValueError(f"ModelConfig.rope_original_max_len={self.rope_original_max_len}"
                                 f"; must be >= 1{with_scaling}")  # fmt: skip
        if self.rope_scaling == "llama3":
            # The band between the two wavelengths old_len / low and old_len / high is blended
            # over (high - low): a factor 0 was a ZeroDivisionError in init, low == high a
            # division by zero, low > high an empty band (HF requires low < high too; Llama
            # 3.1/3.2 have 1 and 4)
            for name in ("rope_low_freq_factor", "rope_high_freq_factor"):
                check_float(name, getattr(self, name), "> 0", " with rope_scaling='llama3'")
            if not self.rope_low_freq_factor < self.rope_high_freq_factor:
                low, high = self.rope_low_freq_factor, self.rope_high_freq_factor
                raise ValueError(f"ModelConfig.rope_low_freq_factor={low} must be < "
                                 f"rope_high_freq_factor={high} with "
                                 "rope_scaling='llama3'")  # fmt: skip
        if self.rope_scaling == "yarn":  # (0 divided by zero, < 0 was a math domain error)
            for name in ("rope_yarn_beta_fast", "rope_yarn_beta_slow"):
                check_float(name, getattr(self, name), "> 0", " with rope_scaling='yarn'")
        if self.rope_scaling in ("yarn", "longrope"):  # (cos and sin are multiplied by it)
            check_float("rope_attention_factor", self.rope_attention_factor, ">= 0",
                        f" (0 = derived) with rope_scaling={self.rope_scaling!r}")  # fmt: skip
        if self.sliding_window < 0:  # -1 is "off" elsewhere (flash-attn); here it masked every
            # key, and attention over all-masked scores averages every key, future ones too
            raise ValueError(
                f"ModelConfig.sliding_window={self.sliding_window}; must be >= 0 (0 = off)"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig: n_heads={self.n_heads} is not a multiple of "
                f"n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim == 0 and self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "set head_dim explicitly"
            )
        choices = {
            "rope_scaling": ("none", "linear", "llama3", "yarn", "longrope"),
            "qk_norm": ("none", "head", "all"),
            "norm_placement": ("pre", "post", "sandwich"),
            "mlp_activation": ("silu", "gelu"),
            "attention_impl": ("xla", "cudnn", "flash", "splash"),
            "remat_policy": ("none", "full", "dots", "dots_no_batch", "save_proj"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"ModelConfig.{name}={getattr(self, name)!r}; expected one of {allowed}"
                )
        floats = ("float32", "bfloat16", "float16")
        for name in ("dtype", "param_dtype"):
            # A name jnp.dtype reads (or a dtype object) of a float type the model computes in;
            # a bad one ("bfloat", "int8") used to fail deep inside init, naming no key.
            value = getattr(self, name)
            try:
                ok = jnp.dtype(value).name in floats
            except (TypeError, ValueError):
                ok = False
            if not ok:
                hint = ("; int8 weights are for decoding (generate --quantize int8, "
                        "rollout.frozen_dtype=int8), not for the model's own params or "
                        "compute" if str(value) == "int8" else "")  # fmt: skip
                raise ValueError(f"ModelConfig.{name}={value!r}; expected one of "
                                 f"{floats}{hint}")  # fmt: skip
        if self.head_dim_ % 2:
            raise ValueError(f"ModelConfig: head_dim={self.head_dim_} must be even for RoPE")
        if self.rotary_dim_ % 2 or not 0 < self.rotary_dim_ <= self.head_dim_:
            raise ValueError(f"ModelConfig: rotary_dim={self.rotary_dim} must be even and in "
                             f"(0, head_dim={self.head_dim_}] (0 = head_dim)")  # fmt: skip
        for name in ("rope_short_factors", "rope_long_factors"):  # (lists from JSON/ConfigDict)
            object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        if self.rope_scaling == "longrope":
            half = self.rotary_dim_ // 2
            for name in ("rope_short_factors", "rope_long_factors"):
                if len(getattr(self, name)) != half:
                    raise ValueError(f"ModelConfig.{name} has {len(getattr(self, name))} factors; "
                                     f"longrope needs rotary_dim / 2 = {half}")  # fmt: skip
                # each frequency is divided by its factor: 0 divided by zero, a negative or
                # non-finite one turned the rotation backwards or into NaN
                for i, f in enumerate(getattr(self, name)):
                    check_float(f"{name}[{i}]", f, "> 0", " with rope_scaling='longrope'")
        nope = self.nope_layer_interval
        if nope < 0 or nope == 1:
            raise ValueError(f"ModelConfig: nope_layer_interval={nope}; expected 0 (RoPE "
                             "everywhere) or P >= 2 (every P-th layer without RoPE)")  # fmt: skip
        P = self.sliding_window_pattern
        if P == 1 or P < 0:
            raise ValueError(f"ModelConfig: sliding_window_pattern={P}; expected 0 (every layer "
                             "local) or P >= 2 (every P-th layer global)")  # fmt: skip
        if (self.sliding_window_pattern or self.rope_local_theta) and not self.sliding_window:
            raise ValueError("ModelConfig: sliding_window_pattern / rope_local_theta describe "
                             "local layers; set sliding_window too")  # fmt: skip
        if self.rope_local_theta and not self.sliding_window_pattern:
            raise ValueError("ModelConfig: rope_local_theta needs a sliding_window_pattern "
                             "(with every layer local, set rope_theta instead)")  # fmt: skip
        if self.n_experts < 0 or self.n_experts == 1:
            raise ValueError(f"ModelConfig: n_experts={self.n_experts}; expected 0 (a dense MLP) "
                             "or >= 2")  # fmt: skip
        if self.n_experts and not 1 <= self.n_experts_per_token <= self.n_experts:
            raise ValueError(f"ModelConfig: n_experts_per_token={self.n_experts_per_token} must be "
                             f"in [1, n_experts={self.n_experts}]")  # fmt: skip
        check_float("moe_capacity_factor", self.moe_capacity_factor, ">= 0", " (0 = no drops)")
        expert_keys = (self.d_expert, self.d_shared_expert, self.shared_expert_gate)
        if not self.n_experts and any(expert_keys):
            raise ValueError("ModelConfig: d_expert / d_shared_expert / shared_expert_gate "
                             "describe experts; set n_experts too")  # fmt: skip
        if self.shared_expert_gate and not self.d_shared_expert:
            raise ValueError("ModelConfig: shared_expert_gate needs a d_shared_expert")
        if self.flash_block < 1:
            raise ValueError(f"ModelConfig.flash_block={self.flash_block} must be >= 1")
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            check_float(name, getattr(self, name), ">= 0", " (0 = off)")
        check_float("init_std", self.init_std, ">= 0")  # (NaN / inf initialised NaN weights)

    # --- derived quantities -------------------------------------------------------------------
    @property
    def head_dim_(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def d_expert_(self) -> int:
        return self.d_expert or self.d_ff

    @property
    def rotary_dim_(self) -> int:
        return self.rotary_dim or self.head_dim_

    @property
    def mixed_layers(self) -> bool:
        """Whether local (windowed) and global layers alternate."""
        return bool(self.sliding_window and self.sliding_window_pattern)

    def layer_is_local(self, i: int) -> bool:
        """Whether layer i attends within the sliding window (see sliding_window_pattern)."""
        if not self.sliding_window:
            return False
        P = self.sliding_window_pattern
        return not P or (i + 1) % P != 0

    def layer_has_rope(self, i: int) -> bool:
        """Whether layer i rotates q and k (see nope_layer_interval)."""
        P = self.nope_layer_interval
        return not P or (i + 1) % P != 0

    def layer_kind(self, i: int) -> dict[str, bool]:
        """What sets layer i apart where layers differ: {"local": ...} with mixed local and
        global attention, {"nope": ...} with NoPE layers; {} when all layers are alike."""
        kind = {}
        if self.mixed_layers:
            kind["local"] = self.layer_is_local(i)
        if self.nope_layer_interval:
            kind["nope"] = not self.layer_has_rope(i)
        return kind

    def layer_window(self, i: int) -> int:
        """Layer i's attention window (0 = full causal)."""
        return self.sliding_window if self.layer_is_local(i) else 0

    @property
    def attn_scale(self) -> float:
        """The factor attention logits q·k are multiplied by."""
        return 1.0 / math.sqrt(self.query_pre_attn_scalar or self.head_dim_)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d) -> ModelConfig:
        """Builds a config from a dict/ConfigDict; unknown keys are an error naming the key."""
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise KeyError(f"ModelConfig: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    # --- sizes and FLOPs (DESIGN.md convention) -------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Parameter counts: total, embedding table, non-embedding, and matmul weights.

        `matmul` is PaLM's N for the FLOP count: every weight that takes part in a matmul,
        i.e. everything but the embedding lookup and norm scales; the LM head is included
        (also when tied, since the tied table is then used as a matmul weight). With experts
        it counts the weights a token uses — the router and k experts' — not all E: the
        FLOPs a token needs, not those a capacity above 1 (or 0, no drops) spends on empty
        slots.
        """
        D, H, N, K, F, V, L = (
            self.d_model,
            self.head_dim_,
            self.n_heads,
            self.n_kv_heads,
            self.d_ff,
            self.vocab_size,
            self.n_layers,
        )
        attn = D * N * H + 2 * D * K * H + N * H * D
        bias = (N * H + 2 * K * H) if self.qkv_bias else 0
        mlp = active_mlp = 3 * D * F
        if self.n_experts:  # router, experts, shared expert (+ its gate); k experts per token
            E, Fe, S = self.n_experts, self.d_expert_, self.d_shared_expert
            shared = 3 * D * S + (D if self.shared_expert_gate else 0)
            mlp = D * E + E * 3 * D * Fe + shared
            active_mlp = D * E + self.n_experts_per_token * 3 * D * Fe + shared
        qk = {"none": 0, "head": 2 * H, "all": (N + K) * H}[self.qk_norm]
        norms = (4 if self.norm_placement == "sandwich" else 2) * D + qk
        per_layer = attn + bias + mlp + norms
        embed = V * D
        head = 0 if self.tie_embeddings else V * D
        total = embed + head + L * per_layer + D
        matmul = L * (attn + active_mlp) + V * D
        return {
            "total": total,
            "embedding": embed,
            "non_embedding": total - embed,
            "matmul": matmul,
        }

    def flops_per_token(
        self, seq_len: int, causal: bool = False, *, frozen_base: bool = False,
        lm_head: bool = True,
    ) -> float:  # fmt: skip
        """Training FLOPs per token: 6·N_matmul + 12·L·d_attn·T (PaLM, appendix B).

        Attention is counted non-causal by default (PaLM); `causal=True` halves the attention
        term, the count a FlashAttention-style kernel actually performs. A layer with a sliding
        window W attends to at most W keys: its T is min(T, W), and causally its average span,
        T/2 up to W and W − W²/(2T) beyond (each query sees min(t, W) keys). Full-attention
        models count exactly as before.

        `frozen_base=True` is a LoRA run's count: the base weights are frozen, so the backward
        pass computes their activation gradients (2·N) but no weight gradients (the other 2·N):
        4·N_matmul + the attention term, which is unchanged (the backward still runs through
        every score to reach the adapters). The adapters' own 6·r·(d_in + d_out) per adapted
        kernel are left out (1.4% of the 1.1B shape's count at rank 16 on all seven
        projections). The training loop's MFU (alignment/) and bench/alignment_throughput.py
        both count through here, so a run and its benchmark report one MFU.
        `lm_head=False`: a scalar-head model (reward model, PPO critic), which has no
        vocabulary projection (V·D fewer matmul weights).
        """
        per_layer = 12 * self.n_heads * self.head_dim_
        attn = 0.0
        for i in range(self.n_layers):
            W = self.layer_window(i) or seq_len
            if not causal:
                attn += per_layer * min(seq_len, W)
            elif seq_len <= W:
                attn += per_layer * seq_len / 2
            else:
                attn += per_layer * (W - W * W / (2 * seq_len))
        matmul = self.param_counts()["matmul"] - (0 if lm_head else self.vocab_size * self.d_model)
        return (4 if frozen_base else 6) * matmul + attn


def rows_past_max_seq_len(cfg: ModelConfig, seq_len: int) -> str:
    """A warning's text ("" when none) for training rows of `seq_len` tokens that run past the
    model's `max_seq_len`: RoPE extrapolates past it, and the checkpoint still records the old
    length (`generate` then warns about positions the run trained on). A run meant to extend
    the context sets `model.max_seq_len` (and, for a pretrained source, `model.rope_scaling`),
    which `init_from` runs take over the source's (README: long context)."""
    if not seq_len or seq_len <= cfg.max_seq_len:
        return ""
    return (f"seq_len={seq_len} is past the model's max_seq_len={cfg.max_seq_len}: positions "
            f"{cfg.max_seq_len}..{seq_len - 1} extrapolate RoPE, and the checkpoint will record "
            f"max_seq_len={cfg.max_seq_len}; set --config.model.max_seq_len={seq_len} (and "
            "model.rope_scaling for a pretrained source) if the longer context is meant"
            )  # fmt: skip


def check_trainable_dtypes(cfg: ModelConfig) -> None:
    """A ValueError naming the key for float16 in a model about to train: the trainers do no
    loss scaling, so float16 compute underflows most of the logits' gradient at real batch sizes
    (each entry is about p / tokens) and float16 weights drop updates below their rounding.
    float16 stays for import, export and generation (an HF float16 checkpoint imports as one:
    training it needs the keys below given)."""
    if cfg.dtype == "float16":
        raise ValueError(
            "model.dtype='float16': training in float16 has no loss scaling here, so small "
            "gradients underflow to zero; train with --config.model.dtype=bfloat16 (and "
            "--config.model.param_dtype=float32)"
        )
    if cfg.param_dtype == "float16":
        raise ValueError(
            "model.param_dtype='float16': float16 weights lose every update below their "
            "rounding; set --config.model.param_dtype=float32 (or bfloat16)"
        )


# Named variants. `tiny` is for tests; `125m` is GPT-3-small sized; `1b` is the TinyLlama-1.1B
# shape (GQA 32/4); `7b` is the Llama-2-7B shape.
VARIANTS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=256
    ),
    "mini": ModelConfig(
        vocab_size=2048,
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        d_ff=384,
        max_seq_len=512,
    ),
    "small": ModelConfig(
        vocab_size=2048,
        d_model=256,
        n_layers=6,
        n_heads=8,
        n_kv_heads=4,
        d_ff=768,
        max_seq_len=512,
    ),
    "125m": ModelConfig(
        vocab_size=32000,
        d_model=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=12,
        d_ff=2048,
        max_seq_len=2048,
    ),
    "1b": ModelConfig(
        vocab_size=32000,
        d_model=2048,
        n_layers=22,
        n_heads=32,
        n_kv_heads=4,
        d_ff=5632,
        max_seq_len=2048,
    ),
    "7b": ModelConfig(
        vocab_size=32000,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        d_ff=11008,
        max_seq_len=4096,
    ),
}


def get_variant(name: str, **overrides) -> ModelConfig:
    """Returns the named variant with field overrides; an unknown name lists the known ones."""
    if name not in VARIANTS:
        raise KeyError(f"unknown model variant {name!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[name].replace(**overrides)
