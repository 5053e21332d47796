"""Scalar heads on the Transformer backbone: reward models and value functions (PPO's critic).

    model = ScalarHeadModel(cfg)
    params = model.init(rng, tokens)["params"]   # {"transformer": {...}, "head": {...}}
    values = model.apply({"params": params}, tokens, positions, segment_ids)   # (B, T) float32
    rewards = sequence_values(values, segment_ids)                             # (B,)

The backbone is the same `Transformer` module (its `backbone` method: final normed hidden
states), living under the "transformer" key, so the params of a language model — a pretraining
or SFT checkpoint — slot into `params["transformer"]` unchanged. The vocabulary projection
(`lm_head`) is never called here and therefore never created: a scalar-head model has no
(V × D) head to store or train.

A reward is read at each sequence's last real token (the last position with segment id > 0).
The chat template (data/formats.py) closes every conversation with EOS after the final
`<|end|>`, so the last *input* token of a rendered conversation is that `<|end|>`: the reward is
read from the hidden state that has seen the whole prompt and the whole response, and a
generated response that stopped at `<|end|>` is scored at the same place. Per-token values
(a critic's V(s_t)) are the full (B, T) output.

Rows hold one sequence each, right-padded (segment id 0): attention is causal, so neither the
padding amount nor the padding ids nor the other rows change a sequence's values (equal, to
float32 rounding, to the sequence run alone; tests/models/test_heads_audit.py), with or without
explicit positions. The head is h·w + b computed in float32 whatever the backbone's dtype; a
fresh head has w ~ N(0, init_std²) over d_model (logical axis "embed") and b = 0, stored in the
weight dtype. A reward model trained with LoRA trains its head through `lora.train_extra`
("^head/" in configs/reward.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from flaxlm.models.config import ModelConfig
from flaxlm.models.moe import COLLECTION as MOE_STATS
from flaxlm.models.moe import collect_stats
from flaxlm.models.transformer import Transformer


class ScalarHead(nn.Module):
    """h·w + b per token, in float32 (rewards are compared across sequences; keep precision)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        w = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("embed",)),
            (cfg.d_model,),
            cfg.weight_dtype,
        )
        b = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, ()), (), cfg.weight_dtype
        )
        out = jnp.einsum("btd,d->bt", x_BTD.astype(jnp.float32), w.astype(jnp.float32))
        return out + b.astype(jnp.float32)


class ScalarHeadModel(nn.Module):
    """Transformer backbone + scalar head; `__call__` returns per-token values (B, T) float32."""

    cfg: ModelConfig

    def setup(self):
        self.transformer = Transformer(self.cfg)
        self.head = ScalarHead(self.cfg)

    def __call__(self, tokens, positions=None, segment_ids=None):
        x, _ = self.transformer.backbone(tokens, positions, segment_ids)
        return self.head(x)


def last_token_index(segment_ids_BT) -> jnp.ndarray:
    """(B,) index of each row's last position with segment id > 0 (rows hold one sequence,
    right-padded with segment id 0). A row with no real token gives 0."""
    real = segment_ids_BT > 0
    T = real.shape[1]
    idx = jnp.arange(T, dtype=jnp.int32)
    return jnp.max(jnp.where(real, idx, 0), axis=1)


def sequence_values(values_BT, segment_ids_BT) -> jnp.ndarray:
    """(B,) the value at each row's last real token: the sequence's reward."""
    idx = last_token_index(segment_ids_BT)
    return jnp.take_along_axis(values_BT, idx[:, None], axis=1)[:, 0]


def scalar_model_fns(cfg: ModelConfig):
    """(init_params, apply) of a ScalarHeadModel: init is rng -> boxed params; apply returns
    per-token values (B, T), and with `moe_stats=True` (values, {router statistic: mean over
    layers}) — the LM's convention (train/pretrain.py `model_fns`), so a trained mixture-of-
    experts reward model or critic gets the router losses ({} for a dense backbone)."""
    model = ScalarHeadModel(cfg)

    def init_params(rng):
        return model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]

    def apply(params, tokens, positions=None, segment_ids=None, moe_stats=False):
        if not moe_stats:
            return model.apply({"params": params}, tokens, positions, segment_ids)
        out, state = model.apply({"params": params}, tokens, positions, segment_ids,
                                 mutable=[MOE_STATS])  # fmt: skip
        return out, collect_stats(state.get(MOE_STATS, {}))

    return init_params, apply
