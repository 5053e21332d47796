"""The decoder-only Transformer: embeddings → L blocks → final norm → LM head.

Call: `Transformer(cfg).apply({"params": p}, tokens, positions, segment_ids, cache=None)`.
  * tokens, positions, segment_ids: (B, T) int32. `positions=None` means 0..T-1;
    `segment_ids=None` means one unpadded document per row, which lets the cuDNN kernel use its
    fast causal mode; packed rows pass segment ids (0 = padding) and never attend across.
  * cache: None for training / scoring. For decoding, a dict from `init_cache` holding the
    key/value buffers, the segment ids and positions of the cached slots and the write `index`
    (a scalar: every row writes there; or (B,) int32, each row at its own slot, full caches
    only — speculative decoding's rows advance by different counts, models/speculative.py);
    the call then returns `(logits, new_cache)`.
`Transformer.backbone` returns the final normed hidden states (B, T, D) instead of logits (used
by the reward model and critic heads, which never need the vocabulary projection).

Layers are unrolled or `nn.scan`-ned (`cfg.scan_layers`). The two layouts hold the same model
(`stack_layers` / `unstack_layers` convert a checkpoint) but draw different initial weights from
one seed (scan splits the layer rng, unrolled layers fold in their names), so a scan-vs-unrolled
comparison from scratch differs by the init, not only by rounding. Either way, layers can be
rematerialised with a named policy (`cfg.remat_policy`):
    none           keep every activation (fastest, most memory)
    full           keep only block inputs, recompute everything in the backward pass
    dots           keep all matmul outputs (jax checkpoint_dots)
    dots_no_batch  keep matmul outputs without batch dims, i.e. the weight matmuls
    save_proj      keep the q/k/v, attention-output and MLP projections (named checkpoints)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlm.models.attention import (
    Attention,
    attention_mask,
    layer_context,
    local_rope_config,
    rope_tables,
    write_cache_rows,
    write_rows,
)
from flaxlm.models.config import ModelConfig
from flaxlm.models.layers import MLP, Embed, Proj, RMSNorm
from flaxlm.models.moe import MoE

ACT = ("act_batch", "act_len", "act_embed")


class Block(nn.Module):
    """Residual block: pre-norm x + attn(norm(x)), then x + mlp(norm(x)) (Llama); with
    `norm_placement="post"`, x + norm(attn(x)), then x + norm(mlp(x)) (OLMo 2); "sandwich"
    normalises both sides, x + norm(attn(norm(x))) (Gemma 2/3).

    `kind` is what sets the layer apart where layers differ (`ModelConfig.layer_kind`: local
    or global attention, RoPE or not), as (name, bool) pairs for an unrolled layer; scanned
    layers get it as the traced `kind` argument."""

    cfg: ModelConfig
    fused: bool = False  # fused q|k|v and gate|up kernels (see `fuse_projections`)
    decode_attention: str = "xla"  # one-token cache attention: xla | pallas (see Attention)
    kind: tuple = ()
    decode_mlp: str = "xla"  # one-token steps' silu(gate)·up: xla | pallas (see MLP)
    # "fold": the params' pre-norm scales are folded into the projections (`fold_norms`) and
    # attention and MLP get the raw residual stream, dividing by its rms themselves
    decode_norm: str = "xla"

    @nn.compact
    def __call__(self, x, ctx, layer_cache=None, kind=None):
        cfg = self.cfg
        x = nn.with_logical_constraint(x, ACT)
        ctx = layer_context(cfg, ctx, dict(self.kind) if kind is None else kind)
        attn = Attention(cfg, self.fused, self.decode_attention, name="attn")
        if cfg.n_experts:  # mixture of experts (models/moe.py); padding is routed nowhere
            moe = MoE(cfg, name="mlp")
            mlp = lambda h: moe(h, ctx.get("valid"))  # noqa: E731
        else:
            mlp = MLP(cfg, self.fused, self.decode_mlp, name="mlp")
        attn_norm, mlp_norm = RMSNorm(cfg, name="attn_norm"), RMSNorm(cfg, name="mlp_norm")
        if cfg.norm_placement == "post":
            a, layer_cache = attn(x, ctx, layer_cache)
            x = x + attn_norm(a)
            x = x + mlp_norm(mlp(x))
        elif cfg.norm_placement == "sandwich":
            a, layer_cache = attn(attn_norm(x), ctx, layer_cache)
            x = x + RMSNorm(cfg, name="attn_post_norm")(a)
            x = x + RMSNorm(cfg, name="mlp_post_norm")(mlp(mlp_norm(x)))
        elif self.decode_norm == "fold":  # (`fold_norms` checked that the model allows it)
            a, layer_cache = attn(x, ctx, layer_cache, norm_eps=cfg.norm_eps)
            x = x + a
            x = x + mlp(x, norm_eps=cfg.norm_eps)
        else:
            a, layer_cache = attn(attn_norm(x), ctx, layer_cache)
            x = x + a
            x = x + mlp(mlp_norm(x))
        return nn.with_logical_constraint(x, ACT), layer_cache


def remat_policy(name: str):
    cp = jax.checkpoint_policies
    return {
        "full": cp.nothing_saveable,
        "dots": cp.checkpoint_dots,
        "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
        "save_proj": cp.save_only_these_names("qkv", "attn_out", "mlp_in", "mlp_out"),
    }[name]


def block_class(cfg: ModelConfig):
    if cfg.remat_policy == "none":
        return Block
    # prevent_cse is only needed outside scan (scan already stops CSE across iterations).
    return nn.remat(Block, policy=remat_policy(cfg.remat_policy), prevent_cse=not cfg.scan_layers)


class Transformer(nn.Module):
    """The model. `fused_projections` selects the parameter layout `fuse_projections` makes
    (one q|k|v and one gate|up kernel per layer), which decoding uses: fewer, larger matmuls
    per generated token. Checkpoints, HF interop and training use the unfused layout.
    `decode_attention` picks the kernel of one-token steps over a cache ("xla" or "pallas",
    models/decode_attention.py), `decode_mlp` that of their MLP's silu(gate)·up ("xla" or
    "pallas", models/decode_mlp.py); neither changes a parameter."""

    cfg: ModelConfig
    fused_projections: bool = False
    decode_attention: str = "xla"
    decode_mlp: str = "xla"
    decode_norm: str = "xla"  # "fold": params from `fold_norms` (see Block)

    def setup(self):
        cfg = self.cfg
        self.embed = Embed(cfg, name="embed")
        block = block_class(cfg)
        fused = self.fused_projections
        if cfg.scan_layers:
            self.layers = nn.scan(
                block,
                variable_axes={"params": 0, "moe": 0},  # (MoE router statistics, models/moe.py)
                split_rngs={"params": True},
                in_axes=(nn.broadcast, 0, 0),  # ctx, the layer's cache, its kind
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, fused, self.decode_attention, decode_mlp=self.decode_mlp,
              decode_norm=self.decode_norm, name="layers")  # fmt: skip
        else:
            self.layers = [
                block(
                    cfg,
                    fused,
                    self.decode_attention,
                    kind=tuple(cfg.layer_kind(i).items()),
                    decode_mlp=self.decode_mlp,
                    decode_norm=self.decode_norm,
                    name=f"layers_{i}",
                )  # fmt: skip
                for i in range(cfg.n_layers)
            ]
        self.final_norm = RMSNorm(cfg, name="final_norm")
        if not cfg.tie_embeddings:
            self.lm_head = Proj(
                (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg, name="lm_head"
            )

    def _context(self, tokens, positions, segment_ids, cache, prefill=False):
        """Per-forward values shared by all layers: rope tables, masks, cache bookkeeping.

        With local and global layers mixed, "mask" is the global layers' and "mask_local" the
        local ones' (and "cos_local"/"sin_local" their tables with `rope_local_theta`); each
        layer picks its own (`attention.layer_context`)."""
        cfg = self.cfg
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        # (a cached step that is no prefill decides LongRoPE's factors per token: `longrope_long`)
        step = cache is not None and not prefill
        cos, sin = rope_tables(cfg, positions, segment_ids, per_token=step)
        ctx = {"cos": cos, "sin": sin, "index": None}
        if cfg.n_experts and segment_ids is not None:  # real tokens, for the MoE router
            ctx["valid"] = segment_ids != 0
        if cfg.rope_local_theta:
            ctx["cos_local"], ctx["sin_local"] = rope_tables(local_rope_config(cfg), positions)
        # (window for the global "mask"; the local one's)
        windows = (0, cfg.sliding_window) if cfg.mixed_layers else (cfg.sliding_window,)
        new_meta = None
        if cache is not None and "ring" in cache:
            ctx.update(self._ring_context(cache["ring"], positions, segment_ids, prefill))
        if cache is not None:
            idx = cache["index"]
            seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids
            if jnp.ndim(idx) == 1:  # one write index per row (models/speculative.py)
                if "ring" in cache or prefill:
                    raise ValueError("Transformer: a per-row cache index needs full caches "
                                     "(no rings) and no prefill")  # fmt: skip
                # (slot axis whole under a mesh: a split one was written wrong, `write_cache_rows`)
                kv_seg = write_cache_rows(cache["segment_ids"], seg, idx)
                kv_pos = write_cache_rows(cache["positions"], positions, idx)
                q_slot = idx[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
            else:
                # (zeros_like: a literal 0 is int64 under jax_enable_x64, the index int32,
                # and dynamic_update_slice wants one integer type)
                at = (jnp.zeros_like(idx), idx)
                kv_seg = jax.lax.dynamic_update_slice(cache["segment_ids"], seg, at)
                kv_pos = jax.lax.dynamic_update_slice(cache["positions"], positions, at)
                q_slot = jnp.broadcast_to(idx + jnp.arange(T, dtype=jnp.int32), (B, T))
            S = kv_seg.shape[1]
            kv_slot = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
            masks = [attention_mask(seg, kv_seg, q_slot, kv_slot, positions, kv_pos, w)
                     for w in windows]  # fmt: skip
            new_meta = {"segment_ids": kv_seg, "positions": kv_pos, "index": idx + T}
            ctx["index"] = idx
            if prefill:  # attention over the chunk itself, plain causal rows (`backbone`)
                masks, ctx["prefill"] = [None] * len(windows), True
            if "ring" in cache:  # a decode step's windowed layers attend over their rings
                new_meta["ring"] = ctx.pop("ring_meta")
                if not prefill:
                    masks[-1] = ctx.pop("ring_mask")
        elif segment_ids is None:
            # one unpadded document per row: the kernels' plain causal mode (each layer knows
            # its window, `attention.by_window`)
            masks = [None] * len(windows)
        elif cfg.attention_impl in ("flash", "splash"):
            # packed rows: the blockwise kernels mask tile by tile from the per-token ids (no
            # (B, 1, T, T) mask; `attention.Attention` builds one where another kernel runs)
            masks = [None] * len(windows)
            ctx["segments"] = (segment_ids, positions)
        else:
            seg, slot = segment_ids, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            masks = [attention_mask(seg, seg, slot, slot, positions, positions, w)
                     for w in windows]  # fmt: skip
        ctx["mask"] = masks[0]
        if cfg.mixed_layers:
            ctx["mask_local"] = masks[1]
        return ctx, new_meta

    def _ring_context(self, ring, positions, segment_ids, prefill: bool):
        """The windowed layers' view of their rings (`init_cache(..., rings=True)`): where
        each row writes, the rings' new segment ids and positions, and their mask.

        A prefill (right-padded rows from position 0, an empty cache) fills ring slot r of row
        b with the position p ≡ r (mod W) among its last W tokens, p = len_b − 1 −
        ((len_b − 1 − r) mod W), and leaves it empty (segment id 0) where p < 0: "ring_src"
        is (those positions clipped into the chunk, whether they exist). A decode step writes
        each row's one token at slot position mod W ("ring_slot"), over the oldest, so the
        ring always holds the W positions the window needs; there is no slot order, so the
        mask is causal by position (one document per row while decoding)."""
        cfg = self.cfg
        B, T = positions.shape
        seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids
        W = ring["positions"].shape[1]
        if cfg.scan_layers:  # scanned layers share one cache shape; decoding unrolls them
            raise ValueError("Transformer: ring caches need unrolled layers")
        if prefill:
            last = jnp.sum(seg != 0, axis=1, keepdims=True, dtype=jnp.int32) - 1  # (B, 1)
            pos = last - (last - jnp.arange(W, dtype=jnp.int32)[None, :]) % W  # (B, W)
            held = pos >= 0
            src = jnp.clip(pos, 0, T - 1)
            meta = {"segment_ids": jnp.where(held, jnp.take_along_axis(seg, src, axis=1), 0),
                    "positions": jnp.where(held, pos, 0)}  # fmt: skip
            return {"ring_src": (src, held), "ring_meta": meta}
        if T != 1:  # T tokens written at once would overwrite keys their own queries need
            raise ValueError(f"Transformer: a ring cache takes one token per decode step, "
                             f"got {T} (a prefill fills it: backbone(prefill=True))")  # fmt: skip
        slot = positions[:, 0] % W  # (B,): each row writes where its position falls
        r_seg = write_rows(ring["segment_ids"], seg, slot, axis=0)
        r_pos = write_rows(ring["positions"], positions, slot, axis=0)
        q_slot, r_slot = jnp.zeros((B, 1), jnp.int32), jnp.zeros((B, W), jnp.int32)
        mask = attention_mask(seg, r_seg, q_slot, r_slot, positions, r_pos, cfg.sliding_window)
        mask &= (r_pos <= positions)[:, None, None, :]
        return {"ring_slot": slot, "ring_mask": mask,
                "ring_meta": {"segment_ids": r_seg, "positions": r_pos}}  # fmt: skip

    def backbone(self, tokens, positions=None, segment_ids=None, cache=None, input_embeds=None,
                 prefill: bool = False):  # fmt: skip
        """Final normed hidden states (B, T, D), and the updated cache when one is given.

        `input_embeds` (B, T, D) replaces the embedding lookup (soft prompts; gradient tests).
        `prefill=True` (with a cache) promises an empty cache and rows whose real tokens are a
        prefix at positions 0, 1, … (right padding only, `generate`'s prompts): attention then
        runs over the chunk's own keys as plain causal rows — the training kernels (cuDNN's
        flash attention on a GPU), not a (B, N, T, S) float32 score matrix over the cache
        buffer. Padding queries then see earlier padding; their outputs are never used, and
        their cache slots keep segment id 0, never attended to.
        """
        ctx, new_meta = self._context(tokens, positions, segment_ids, cache, prefill)
        x = self.embed(tokens) if input_embeds is None else input_embeds
        x = nn.with_logical_constraint(x, ACT)
        kv = None if cache is None else cache["kv"]
        if self.cfg.scan_layers:
            kinds = [self.cfg.layer_kind(i) for i in range(self.cfg.n_layers)]
            kinds = {k: jnp.asarray([d[k] for d in kinds]) for k in kinds[0]} or None
            x, kv = self.layers(x, ctx, kv, kinds)
        else:
            new_kv = []
            for i, layer in enumerate(self.layers):
                x, layer_kv = layer(x, ctx, None if kv is None else kv[i])
                new_kv.append(layer_kv)
            kv = new_kv
        x = self.final_norm(x)
        if cache is None:
            return x, None
        return x, {"kv": kv, **new_meta}

    def logits(self, x):
        if self.cfg.tie_embeddings:
            out = self.embed.attend(x)
        else:
            out = self.lm_head(x)
        if self.cfg.final_logit_softcap:  # Gemma 2: tanh in float32, logits in their dtype
            cap = self.cfg.final_logit_softcap
            out = (cap * jnp.tanh(out.astype(jnp.float32) / cap)).astype(out.dtype)
        return nn.with_logical_constraint(out, ("act_batch", "act_len", "act_vocab"))

    def __call__(self, tokens, positions=None, segment_ids=None, cache=None, input_embeds=None,
                 prefill: bool = False):  # fmt: skip
        x, new_cache = self.backbone(tokens, positions, segment_ids, cache, input_embeds, prefill)
        logits = self.logits(x)
        return logits if cache is None else (logits, new_cache)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None, rings: bool = False
               ) -> dict:  # fmt: skip
    """Empty decoding cache for `batch` rows of up to `max_len` tokens.

    `rings=True` (unrolled layers with a sliding window W < max_len) gives each windowed layer
    a ring of W slots instead of max_len — a local layer never looks further back than its
    window, so it need not keep more (Mistral: every layer; Gemma 2/3: the local ones, 1 in 2
    or 5 in 6), and a decode step reads W slots there instead of all. A ring is filled by a
    prefill (`Transformer.backbone(..., prefill=True)`) and then takes one token per step
    (`Transformer._ring_context` says how); "ring" holds the rings' segment ids and
    positions, (B, W) each, shared by the windowed layers.

    "kv" holds each layer's keys and values as a pair of (B, K, S, H) buffers: a list of pairs
    when layers are unrolled (each buffer updated in place by XLA inside a decode loop), one
    pair of (L, B, K, S, H) arrays when layers are scanned. `dtype` int8 stores int8 keys and
    values with a float32 scale per token and head, (B, K, S, 1) each, after them in the tuple
    (keys, values, key scales, value scales; `attention.quantize_kv`): (H + 4) / 2H of a bf16
    cache's bytes, 53% at H = 64.

    Why two buffers and not one (2, B, K, S, H): reading keys and values out of a shared
    buffer is a slice of it. The XLA of jax 0.10 fused that slice into the attention matmuls,
    but jax 0.11's (the GPU image's) copies each half out first, compiled for the H200
    (bench/gpu_aot.py): 2 more kernels per layer and the whole cache copied every decode
    step (1.49 GiB memory-bound traffic per batch-64 token at the 1.1B shape, 0.57 with two
    buffers). Two buffers cost one more in-place write kernel per layer, on either version.
    """
    dtype = jnp.dtype(dtype or cfg.dtype)
    if not (jnp.issubdtype(dtype, jnp.floating) or dtype == jnp.int8):
        raise ValueError(f"init_cache: cache dtype {dtype.name}; expected a float dtype or int8")
    # Heads-major (B, K, S, H): decode attention reads it without a per-step transpose.
    shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim_)
    W = cfg.sliding_window
    rings = rings and 0 < W < max_len
    if rings and cfg.scan_layers:
        raise ValueError("init_cache: ring caches need unrolled layers (scan_layers=False)")

    def buffers(shape):  # keys, values (and with int8 their scales, one per token and head)
        kv = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
        if dtype == jnp.int8:
            kv += (jnp.zeros((*shape[:-1], 1), jnp.float32),) * 2
        return kv

    if cfg.scan_layers:
        kv = buffers((cfg.n_layers, *shape))
    else:
        kv = [buffers((*shape[:2], W, shape[3]) if rings and cfg.layer_window(i) else shape)
              for i in range(cfg.n_layers)]  # fmt: skip
    cache = {
        "kv": kv,
        "segment_ids": jnp.zeros((batch, max_len), jnp.int32),  # 0 = empty slot
        "positions": jnp.zeros((batch, max_len), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }
    if rings:
        cache["ring"] = {"segment_ids": jnp.zeros((batch, W), jnp.int32),
                         "positions": jnp.zeros((batch, W), jnp.int32)}  # fmt: skip
    return cache


def stack_layers(params, n_layers: int):
    """Unrolled params (layers_0 … layers_{L-1}) → scanned layout (one `layers` subtree with a
    leading L axis). Lets a checkpoint trained one way be used the other way."""
    layers = [params[f"layers_{i}"] for i in range(n_layers)]
    rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
    return {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def unstack_layers(params, n_layers: int):
    """Scanned layout → unrolled params (the inverse of `stack_layers`)."""
    rest = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n_layers):
        rest[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return rest


def fuse_projections(params, n_layers: int):
    """Unrolled params → the fused layout of `Transformer(cfg, fused_projections=True)`: per
    layer, attn q (D,N,H), k (D,K,H), v (D,K,H) become one "qkv" (D, N+2K, H) (biases too), and
    mlp gate (D,F), up (D,F) become one "gate_up" (D, 2, F). Every other leaf is unchanged.

    Int8 kernels (models/quant.py, quantized beforehand) are joined with their
    "kernel_scale"s, (1, N+2K, H) and (1, 2, F): a scale is per output channel, and joining
    kernels only lays their output channels side by side, so the fused int8 model is exactly
    the unfused one (and what quantizing the fused float kernel gives)."""

    def joined(mods, join, what):
        out = {"kernel": join([m["kernel"] for m in mods], axis=1)}
        scaled = ["kernel_scale" in m for m in mods]
        if any(scaled):
            if not all(scaled):
                raise ValueError(f"fuse_projections: {what} mixes int8 and float kernels")
            out["kernel_scale"] = join([m["kernel_scale"] for m in mods], axis=1)
        return out

    out = dict(params)
    for i in range(n_layers):
        layer = dict(params[f"layers_{i}"])
        attn, mlp = dict(layer["attn"]), dict(layer["mlp"])
        q, k, v = (attn.pop(n) for n in ("q", "k", "v"))
        qkv = joined([q, k, v], jnp.concatenate, f"layers_{i}/attn q|k|v")
        if "bias" in q:
            qkv["bias"] = jnp.concatenate([q["bias"], k["bias"], v["bias"]], axis=0)
        if "gate" in mlp:  # (a mixture of experts keeps its layout: models/moe.py)
            gate, up = mlp.pop("gate"), mlp.pop("up")
            mlp["gate_up"] = joined([gate, up], jnp.stack, f"layers_{i}/mlp gate|up")
        out[f"layers_{i}"] = {**layer, "attn": {**attn, "qkv": qkv}, "mlp": mlp}
    return out


def transpose_gate_up(params, n_layers: int):
    """Unrolled params (fused or not) → each dense layer's gate and up kernels as one
    "gate_up_t" (2F, D): gate's F rows, then up's — the layout `decode_mlp="pallas_t"` streams
    (models/decode_mlp.py says why). Every other leaf is unchanged."""
    out = dict(params)
    for i in range(n_layers):
        layer = dict(params[f"layers_{i}"])
        mlp = dict(layer["mlp"])
        if any("kernel_scale" in mlp.get(n, {}) for n in ("gate_up", "gate", "up")):
            raise ValueError("transpose_gate_up: int8 kernels (models/quant.py); the "
                             "transposed layout is for float weights")  # fmt: skip
        if "gate_up" in mlp:  # (D, 2, F)
            w = mlp.pop("gate_up")["kernel"]
            w_t = w.reshape(w.shape[0], -1).T
        elif "gate" in mlp and "up" in mlp:
            w_t = jnp.concatenate([mlp.pop("gate")["kernel"].T, mlp.pop("up")["kernel"].T])
        else:
            continue
        out[f"layers_{i}"] = {**layer, "mlp": {**mlp, "gate_up_t": {"kernel": w_t}}}
    return out


def fold_norms_unsupported(cfg: ModelConfig) -> str:
    """Why `fold_norms` does not apply to this model ("" when it does): it needs pre-norm
    blocks whose normalised input goes only to plain matmuls — no q|k|v biases (added after
    the division), no q/k norms, no experts' router."""
    if cfg.norm_placement != "pre":
        return f"norm_placement={cfg.norm_placement!r} (needs 'pre')"
    if cfg.qkv_bias:
        return "qkv_bias (the biases add after the division by rms)"
    if cfg.qk_norm != "none":
        return f"qk_norm={cfg.qk_norm!r}"
    if cfg.n_experts:
        return "a mixture of experts (its router reads the normalised input)"
    return ""


def fold_norms(cfg: ModelConfig, params, n_layers: int):
    """Unrolled params (fused or not) → the same with each layer's pre-norm scale g (1 + g with
    `norm_unit_offset`) multiplied into the input rows of the projections that read it: q, k,
    v (or qkv) by attn_norm's, gate and up (or gate_up) by mlp_norm's. Then x/rms(x)·g·W =
    (x·(g⊙W))/rms(x): a decode step can skip the norm kernel and divide the projection's
    output rows by rms(x) where it reads them (`Transformer(..., decode_norm="fold")`). The
    norm scales stay (unused). In the params' dtype: fold fp32 master weights before the cast
    to the compute dtype, so W' is rounded once. ValueError when the model does not allow it
    (`fold_norms_unsupported`), and for int8 kernels (models/quant.py, quantized beforehand):
    g scales a kernel's input rows and an int8 kernel's scale is per output channel, so g⊙W
    is no int8 kernel with those scales — folding would mean quantizing again, another model
    (`generate` folds float weights before its `quantize="int8"` instead)."""
    if why := fold_norms_unsupported(cfg):
        raise ValueError(f"decode_norm='fold' does not apply to this model: {why}")

    def scaled(module: dict, names, scale):
        out = dict(module)
        for n in names:
            if n in out:
                w = out[n]["kernel"]
                if not jnp.issubdtype(w.dtype, jnp.floating):
                    why = "the norm scales fold into float weights only (quantize after)"
                    raise ValueError(f"fold_norms: {n} has a {w.dtype} kernel; {why}")
                g = scale.reshape((-1,) + (1,) * (w.ndim - 1)).astype(w.dtype)
                out[n] = {**out[n], "kernel": w * g}
        return out

    out = dict(params)
    for i in range(n_layers):
        layer = dict(params[f"layers_{i}"])
        g_attn, g_mlp = (layer[n]["scale"] for n in ("attn_norm", "mlp_norm"))
        if cfg.norm_unit_offset:
            g_attn, g_mlp = 1.0 + g_attn, 1.0 + g_mlp
        layer["attn"] = scaled(layer["attn"], ("q", "k", "v", "qkv"), g_attn)
        layer["mlp"] = scaled(layer["mlp"], ("gate", "up", "gate_up"), g_mlp)
        out[f"layers_{i}"] = layer
    return out


def forward(cfg: ModelConfig, params, tokens, positions=None, segment_ids=None):
    """Logits (B, T, V) of a parameter pytree — the functional entry point for notebooks.
    `tokens`: (B, T) token ids (a nested list too)."""
    tokens = checked_tokens(cfg, tokens, "forward")
    return Transformer(cfg).apply({"params": params}, tokens, positions, segment_ids)


def checked_tokens(cfg: ModelConfig, tokens, where: str):
    """`tokens` as a (B, T) integer array, or an error naming `where`: a 1-D list broadcast
    into a wrong shape deep in the model, and an id past the embedding (or a negative one,
    which wraps) gave NaN or another token's logits without a word. Ids are checked where
    they are concrete (a call from a notebook), not under jit."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        hint = ": one sequence is [ids]" if tokens.ndim == 1 else ""
        raise ValueError(f"{where}: tokens must be (batch, length) ids, got shape "
                         f"{tokens.shape}{hint}")  # fmt: skip
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"{where}: tokens must be integer ids, got {tokens.dtype}")
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= cfg.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"{where}: token id {bad} is outside the model's vocabulary "
                             f"(0..{cfg.vocab_size - 1})")  # fmt: skip
    return tokens
