"""Mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): a softmax router sends each
token to its top-k of E gated MLPs ("experts"), and the token's output is the router-weighted
sum of theirs.

    probs = softmax(x·W_router)            (B, T, E), float32
    w, e  = top_k(probs, k)                 renormalised to sum 1 with `router_norm_topk`
    y     = Σ_j w_j · expert_{e_j}(x)       (+ sigmoid(x·w_g) · shared(x): Qwen2-MoE)

Dispatch is by capacity (GShard / Switch), one row of T tokens per group: each expert takes
at most C of a row's token assignments, C = ceil(capacity_factor · T · k / E), and a token
assignment beyond that is dropped (the residual stream carries the token past the layer).
Assignments are ranked choice-major — every token's first choice before any second choice —
so drops fall on the lower choices first. `moe_capacity_factor = 0` makes C = T, which no
routing can overflow (a token picks an expert once): no drops, exact — what HF's models
compute — at E/k times the expert compute and activation memory of a factor-1 run. A decode
step (T = 1) has C = 1 and never drops, whatever the factor.

The dispatch moves tokens with gathers, not the one-hot einsums of GShard: a (B, k·T, E)
integer cumsum ranks the assignments, an integer scatter inverts the ranking into a source
index per (expert, slot), and one gather fills the (B, E, C, D) expert buffer; the combine is
another gather. The one-hot einsum would cost 2·T·E·C·D FLOPs per row, as much as the experts
themselves at T ≈ F. Only the gathers are differentiated.

Padding tokens (segment id 0) are routed nowhere and count in no statistic.

Parameters, under the layer's "mlp": router/kernel (D, E); experts/{gate,up}/kernel (E, D, F)
and experts/down/kernel (E, F, D); with a shared expert, shared/{gate,up,down} as a dense MLP's
and shared_gate/kernel (D, 1). Logical axes: the expert axis is "expert" (split over `tensor`
by the fsdp_tp preset: each tensor shard computes its experts for all its rows, no all-to-all,
since rows are replicated over `tensor`), an expert's hidden axis "expert_mlp".

Each layer sows into its own collection, ("moe", "stats"), a vector of router statistics over
its valid tokens
(`STATS`): the Switch load-balancing loss E·Σ_e f_e·P_e (f_e: share of assignments routed to
e, P_e: mean router probability of e; 1 when balanced, E/k at worst), the router z-loss
mean(logsumexp(logits)²) (ST-MoE), the share of assignments dropped, and the busiest
expert's load E·max_e f_e. `collect_stats` averages them over layers; the LM losses add
`loss.moe_aux` × load balance + `loss.moe_z` × z-loss (train/pretrain.py `lm_loss`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlm.models.config import ModelConfig
from flaxlm.models.layers import MLP, Proj, ProjWeights

STATS = ("load_balance", "router_z", "dropped", "max_load")
COLLECTION = "moe"  # where the layers sow them: apply(..., mutable=[COLLECTION])


def capacity(cfg: ModelConfig, tokens_per_row: int) -> int:
    """Assignments each expert takes per row of `tokens_per_row` tokens (see module doc)."""
    if cfg.moe_capacity_factor <= 0:
        return tokens_per_row
    per = cfg.moe_capacity_factor * tokens_per_row * cfg.n_experts_per_token / cfg.n_experts
    return max(1, min(tokens_per_row, math.ceil(per)))


def route(cfg: ModelConfig, logits_BTE, valid_BT, C: int):
    """Routing of one batch: (slot (B, k·T) int32, weight (B, k·T) float32, stats (4,)).

    Assignment a = j·T + t is token t's j-th choice; `slot` is where it sits in the row's
    flattened (E·C) expert buffer, or E·C (a dump slot, read as zeros) when it is dropped or
    its token is padding."""
    B, T, E = logits_BTE.shape
    k = cfg.n_experts_per_token
    probs = jax.nn.softmax(logits_BTE, axis=-1)
    top_p, top_e = jax.lax.top_k(probs, k)  # (B, T, k)
    if cfg.router_norm_topk:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    expert = jnp.swapaxes(top_e, 1, 2).reshape(B, k * T)  # choice-major: (B, k·T)
    weight = jnp.swapaxes(top_p, 1, 2).reshape(B, k * T)
    valid = jnp.tile(valid_BT, (1, k))
    onehot = (expert[..., None] == jnp.arange(E)) & valid[..., None]  # (B, k·T, E)
    rank = jnp.sum((jnp.cumsum(onehot, axis=1, dtype=jnp.int32) - 1) * onehot, axis=-1)
    keep = valid & (rank < C)
    slot = jnp.where(keep, expert * C + rank, E * C)

    # Statistics over the valid tokens of the whole batch.
    n_tok = jnp.maximum(jnp.sum(valid_BT, dtype=jnp.float32), 1.0)
    vmask = valid_BT[..., None].astype(jnp.float32)
    share = jnp.sum(onehot, axis=(0, 1), dtype=jnp.float32) / (n_tok * k)  # f_e, sums to 1
    mean_prob = jnp.sum(probs * vmask, axis=(0, 1)) / n_tok  # P_e
    z = jnp.sum(jnp.square(jax.nn.logsumexp(logits_BTE, axis=-1)) * valid_BT) / n_tok
    dropped = 1.0 - jnp.sum(keep, dtype=jnp.float32) / (n_tok * k)
    # f_e counts (no gradient); the loss moves the router through P_e.
    stats = jnp.stack([E * jnp.sum(share * mean_prob), z, dropped, E * jnp.max(share)])
    return slot, weight, stats


def _scatter_rows(n_slots: int, slot_BA, fill: int):
    """For each row, the assignment index filling each of `n_slots` slots (`fill` where none
    does): the inverse of `slot` (an integer scatter; the dump slot's index is discarded)."""
    B, A = slot_BA.shape
    src = jnp.full((B, n_slots + 1), fill, jnp.int32)
    rows = jnp.arange(B, dtype=jnp.int32)[:, None]
    src = src.at[rows, slot_BA].set(jnp.broadcast_to(jnp.arange(A, dtype=jnp.int32), (B, A)))
    return src[:, :n_slots]


class Experts(nn.Module):
    """E gated MLPs applied to their buffers (B, E, C, D) -> (B, E, C, D)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, buf):
        cfg = self.cfg
        E, D, F = cfg.n_experts, cfg.d_model, cfg.d_expert_
        up_axes, down_axes = ("expert", "embed", "expert_mlp"), ("expert", "expert_mlp", "embed")
        dt = cfg.compute_dtype
        # int8 kernels (decoding, models/quant.py) scale the outputs: (E, 1, out) -> (E, 1, out)
        weights = {
            name: ProjWeights(shape, axes, cfg, keep_scale=True, name=name)()
            for name, shape, axes in (("gate", (E, D, F), up_axes), ("up", (E, D, F), up_axes),
                                      ("down", (E, F, D), down_axes))
        }  # fmt: skip

        def matmul(x, name):
            kernel, _, scale = weights[name]
            y = jnp.einsum("becd,edf->becf", x, kernel)
            return y if scale is None else y * scale[None].astype(dt)  # (1, E, 1, out)

        buf = buf.astype(dt)
        act = nn.silu if cfg.mlp_activation == "silu" else nn.gelu
        h = act(matmul(buf, "gate")) * matmul(buf, "up")
        h = nn.with_logical_constraint(h, ("act_batch", "act_expert", None, None))
        return matmul(h, "down")


class MoE(nn.Module):
    """The mixture-of-experts MLP of one layer (see module doc). `valid` (B, T) bool marks the
    real tokens (None: all are)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, valid=None):
        cfg = self.cfg
        B, T, D = x.shape
        E, k = cfg.n_experts, cfg.n_experts_per_token
        C = capacity(cfg, T)
        valid = jnp.ones((B, T), bool) if valid is None else valid.astype(bool)
        logits = Proj((D, E), ("embed", None), cfg, name="router")(x).astype(jnp.float32)
        slot, weight, stats = route(cfg, logits, valid, C)
        # its own collection: asking for "intermediates" would also make every attention layer
        # sow its (B, N, T, S) probabilities (models/attention.py, for inspection)
        self.sow(COLLECTION, "stats", stats)

        # Dispatch: buffer slot (e, c) holds the token of the assignment ranked c for e.
        src = _scatter_rows(E * C, slot, fill=k * T)  # (B, E·C): assignment or k·T (none)
        token = jnp.where(src < k * T, src % T, T)  # row T of x_pad is zeros
        x_pad = jnp.concatenate([x, jnp.zeros((B, 1, D), x.dtype)], axis=1)
        buf = jnp.take_along_axis(x_pad, token[..., None], axis=1).reshape(B, E, C, D)
        buf = nn.with_logical_constraint(buf, ("act_batch", "act_expert", None, "act_embed"))
        out = Experts(cfg, name="experts")(buf).reshape(B, E * C, D)

        # Combine: each assignment reads its slot (the dump slot reads zeros), weighted.
        out = jnp.concatenate([out, jnp.zeros((B, 1, D), out.dtype)], axis=1)
        y = jnp.take_along_axis(out, slot[..., None], axis=1)  # (B, k·T, D)
        y = y * weight[..., None].astype(y.dtype)
        y = jnp.sum(y.reshape(B, k, T, D), axis=1)
        if cfg.d_shared_expert:
            shared = MLP(cfg.replace(d_ff=cfg.d_shared_expert), name="shared")(x)
            if cfg.shared_expert_gate:
                g = Proj((D, 1), ("embed", None), cfg, name="shared_gate")(x)
                shared = jax.nn.sigmoid(g.astype(jnp.float32)).astype(shared.dtype) * shared
            y = y + shared
        return y


def collect_stats(sown) -> dict:
    """{name: mean over layers} of the router statistics the MoE layers sowed (`STATS`);
    {} when there are none (a dense model)."""
    leaves = jax.tree.leaves(sown)
    if not leaves:
        return {}
    rows = jnp.concatenate([x.reshape(-1, len(STATS)) for x in leaves])
    mean = jnp.mean(rows, axis=0)
    return {name: mean[i] for i, name in enumerate(STATS)}
