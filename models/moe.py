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

Few tokens (a decode step, a speculative verify) dispatch otherwise (`few_token_dispatch`):
when a call's A = B·T·k assignments are fewer than E, and capacity cannot drop (C = T: a
factor of 0, or T = 1), each assignment gathers its own expert's kernels — gate, up, down,
and their int8 scales when quantized (models/quant.py) — and applies them as batched
matrix-vector products (`Experts.gathered`), combined with the router weights as above. The
same function (dropless both; padding weighted 0; the same statistics, from the same
`route`), reading A experts' kernels where the capacity path runs all E over a buffer that is
mostly zeros. Compiled for the H200 (bench/gpu_aot.py), XLA fuses the gather into the
reduction computing each product, so a chosen kernel is read once and never copied; a
Qwen3-30B-A3B-shaped decode step (E = 128, k = 8) at batch 1 (two rows, 16 assignments)
moved 1.55 GiB instead of 9.47 (8 layers; int8: 0.79 instead of 4.78), bench/RESULTS.md. The
bytes meet at A = E (batch 16, 128 assignments: 9.97 GiB by capacity, 9.60 gathering), hence
the threshold; batch 64 keeps the capacity path. The gather is differentiable (its transpose
scatter-adds into the (E, D, F) kernels) and a test holds its gradients to the capacity
path's, but training calls (B·T·k ≥ E at any sequence length worth training on) do not
reach it.

Under the fsdp_tp preset the experts are split G ways over `tensor` and their D over `fsdp`.
A plain gather from an operand split along the gathered axis would make the partitioner
gather in every shard with masked indices and all-reduce the gathered (A, D, F) kernels —
weights over the interconnect every step. Instead the experts are viewed as (G, E/G) and each
group gathers at the local index e mod E/G from its own shard, computing every assignment
(the groups that do not hold its expert, on the wrong kernels, zeroed afterwards); the sum
over G is one all-reduce of (B, k·T, D) activations. Compiled for 8 CPU devices (data, fsdp,
tensor = 2, 2, 2), no kernel leaves its device: each gathers its D/fsdp slice for its fsdp
group's rows, and only activations are reduced (the partial products over fsdp, the groups
over tensor), where the capacity path all-gathers the experts over fsdp as FSDP does. A
device then reads at most A kernels, against E/G for the capacity path: the threshold is
A·G < E, A counted over the whole batch (conservative when the rows are split).

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
from flaxlm.models.sharding import logical_axis_size

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
    # Count, then divide: `1 - kept/assigned` under jit can round to -5e-8 with none dropped.
    dropped = (n_tok * k - jnp.sum(keep, dtype=jnp.float32)) / (n_tok * k)
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
    """E gated MLPs, over their capacity buffers (`__call__`: (B, E, C, D) -> (B, E, C, D)) or
    per token assignment with its expert's weights gathered (`gathered`). The same parameters
    either way."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        E, D, F = cfg.n_experts, cfg.d_model, cfg.d_expert_
        up_axes, down_axes = ("expert", "embed", "expert_mlp"), ("expert", "expert_mlp", "embed")
        # int8 kernels (decoding, models/quant.py) scale the outputs: (E, 1, out) -> (E, 1, out)
        self.gate = ProjWeights((E, D, F), up_axes, cfg, keep_scale=True)
        self.up = ProjWeights((E, D, F), up_axes, cfg, keep_scale=True)
        self.down = ProjWeights((E, F, D), down_axes, cfg, keep_scale=True)

    def _mlp(self, x, matmul):
        act = nn.silu if self.cfg.mlp_activation == "silu" else nn.gelu
        weights = {"gate": self.gate(), "up": self.up(), "down": self.down()}
        h = act(matmul(x, weights["gate"])) * matmul(x, weights["up"])
        return h, lambda h: matmul(h, weights["down"])

    def __call__(self, buf):
        dt = self.cfg.compute_dtype

        def matmul(x, w):
            kernel, _, scale = w
            y = jnp.einsum("becd,edf->becf", x, kernel)
            return y if scale is None else y * scale[None].astype(dt)  # (1, E, 1, out)

        h, down = self._mlp(buf.astype(dt), matmul)
        h = nn.with_logical_constraint(h, ("act_batch", "act_expert", None, None))
        return down(h)

    def gathered(self, x_BAD, expert_BA, groups: int = 1):
        """Each assignment's token (B, A, D) through its own expert (B, A) int: (B, A, D).
        The kernels (and int8 scales) of the chosen experts are gathered, A per row, and
        applied as batched matrix-vector products: the step reads A experts, not E.

        `groups` G > 1 (experts split G ways over a mesh axis, `few_token_dispatch`): the
        experts are viewed as (G, E/G) and each group gathers every assignment's expert at
        the local index e mod E/G, so the gather never leaves a device's own experts; the
        outputs of groups that do not hold an assignment's expert are zeroed, and the sum
        over G (one all-reduce of (B, A, D) activations) keeps the right one. Each device
        reads A of its own experts' kernels, whatever the split (right, if not useful, ones
        for the other groups' assignments): against E/G for the capacity path."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        G, per = groups, cfg.n_experts // groups
        local = expert_BA % per

        def pick(a):  # (E, ...) -> (G, B, A, ...): each group's kernel at the local index
            return a.reshape(G, per, *a.shape[1:])[:, local]

        def matmul(x, w):
            kernel, _, scale = w
            y = jnp.einsum("gbai,gbaio->gbao", x, pick(kernel))
            return y if scale is None else y * pick(scale)[..., 0, :].astype(dt)

        x = jnp.broadcast_to(x_BAD.astype(dt), (G, *x_BAD.shape))
        h, down = self._mlp(x, matmul)
        out = down(h)  # (G, B, A, D)
        if G == 1:
            return out[0]
        mine = expert_BA // per == jnp.arange(G)[:, None, None]  # (G, B, A)
        return jnp.sum(jnp.where(mine[..., None], out, 0), axis=0)


def few_token_dispatch(cfg: ModelConfig, batch: int, tokens_per_row: int, groups: int = 1) -> bool:
    """Whether a call of `batch` rows of `tokens_per_row` tokens gathers each assignment's
    expert (`Experts.gathered`) instead of dispatching by capacity (module doc): when its
    B·T·k assignments times `groups` (the ways the expert axis is split) are fewer than E —
    a device then reads fewer expert kernels than its E/G — and the capacity path would not
    drop (C = T: a capacity factor of 0, or T = 1), so both compute the same function."""
    E, k = cfg.n_experts, cfg.n_experts_per_token
    if E % groups or capacity(cfg, tokens_per_row) < tokens_per_row:
        return False
    return batch * tokens_per_row * k * groups < E


class MoE(nn.Module):
    """The mixture-of-experts MLP of one layer (see module doc). `valid` (B, T) bool marks the
    real tokens (None: all are). `dispatch` "auto" picks by `few_token_dispatch`; "capacity"
    or "gather" force one (tests, measurements; "gather" needs C = T)."""

    cfg: ModelConfig
    dispatch: str = "auto"

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
        experts = Experts(cfg, name="experts")
        groups = logical_axis_size("expert")
        if self.dispatch not in ("auto", "capacity", "gather"):
            raise ValueError(f"MoE: dispatch={self.dispatch!r}; expected auto|capacity|gather")
        if self.dispatch == "gather" and (C < T or E % groups):
            raise ValueError(f"MoE: dispatch='gather' needs capacity {C} = T = {T} and "
                             f"n_experts={E} divisible by the expert axis' {groups} "
                             "shards")  # fmt: skip
        gather = self.dispatch == "gather" or (
            self.dispatch == "auto" and few_token_dispatch(cfg, B, T, groups))  # fmt: skip

        if gather:
            # C = T: nothing dropped, so `slot` = expert·T + rank for every valid assignment
            # and the dump slot E·T for padding, whose output is zeroed (any expert computes it)
            expert = jnp.minimum(slot // C, E - 1)
            x_BAD = jnp.tile(x, (1, k, 1))  # assignment a = j·T + t reads token t
            y = experts.gathered(x_BAD, expert, groups)
            y = jnp.where((slot < E * C)[..., None], y * weight[..., None].astype(y.dtype), 0)
        else:
            # Dispatch: buffer slot (e, c) holds the token of the assignment ranked c for e.
            src = _scatter_rows(E * C, slot, fill=k * T)  # (B, E·C): assignment or k·T (none)
            token = jnp.where(src < k * T, src % T, T)  # row T of x_pad is zeros
            x_pad = jnp.concatenate([x, jnp.zeros((B, 1, D), x.dtype)], axis=1)
            buf = jnp.take_along_axis(x_pad, token[..., None], axis=1).reshape(B, E, C, D)
            buf = nn.with_logical_constraint(buf, ("act_batch", "act_expert", None, "act_embed"))
            out = experts(buf).reshape(B, E * C, D)

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
