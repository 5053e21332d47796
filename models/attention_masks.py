"""Which keys each query sees: the boolean masks, each layer's view of the shared per-forward
values (mask, window, rope tables: `layer_context`) and the choice between a layer's local and
global window (`by_window`).

Shape legend: B batch, T query length, S key length.

Masking works on three per-token arrays that every call carries:
  * segment ids — packed documents have ids 1, 2, ...; 0 marks padding. A query only sees keys
    of its own (non-zero) segment, so packed documents never attend to each other.
  * slots — where a token sits in the key/value buffer (its index in the row, or its cache slot
    while decoding); causality is `key slot <= query slot`.
  * positions — the token's position inside its document, used by RoPE and by the sliding
    window (`query pos - key pos < window`).

Separate from models/attention.py because transformer.py builds the masks and layer views once
per forward, without the attention module, and the kernels (flash, splash, cuDNN) imply the
same masks without building them; this is the one place their rules are written down.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxlm.models.config import ModelConfig


def attention_mask(
    q_segment_BT, kv_segment_BS, q_slot_BT, kv_slot_BS, q_pos_BT, kv_pos_BS, window: int = 0
) -> jax.Array:
    """Boolean (B, 1, T, S): True where query t may attend to key s."""
    q_seg, kv_seg = q_segment_BT[:, :, None], kv_segment_BS[:, None, :]
    mask = (q_seg == kv_seg) & (q_seg != 0)
    mask &= kv_slot_BS[:, None, :] <= q_slot_BT[:, :, None]
    if window:
        mask &= (q_pos_BT[:, :, None] - kv_pos_BS[:, None, :]) < window
    return mask[:, None, :, :]


def causal_mask(T: int, S: int, window: int, start=0) -> jax.Array:
    """(1, 1, T, S): key s visible to query t (both from 0; the queries' from `start`) when
    s <= t (and t - s < window)."""
    rows = start + jnp.arange(T)[:, None]
    mask = jnp.arange(S)[None, :] <= rows
    if window:
        mask &= (rows - jnp.arange(S)[None, :]) < window
    return mask[None, None]


def layer_context(cfg: ModelConfig, ctx: dict, kind: dict) -> dict:
    """One layer's view of the shared per-forward values: its rope tables, mask and window.

    `kind` is `cfg.layer_kind(i)`: Python bools when layers are unrolled, traced ones when
    they are scanned (then the layer selects elementwise). With local and global layers mixed
    (`cfg.sliding_window_pattern`), `ctx` holds both kinds' masks ("mask" global,
    "mask_local") and, with `rope_local_theta`, both kinds' tables ("cos_local", "sin_local");
    a scanned layer without masks (plain causal rows) gets "window" None and `by_window`
    branches on its "local". Over ring caches (`transformer.init_cache(..., rings=True)`) a
    windowed layer also gets "ring_slot" (a decode step) or "ring_src" (a prefill): where
    each row writes into its ring. A NoPE layer (`cfg.nope_layer_interval`) gets the identity
    rotation, cos 1 and sin 0 (exact: x·1 − y·0 = x). Otherwise every layer sees `ctx` as is."""
    ring = ("ring_slot", "ring_src")
    out = {k: v for k, v in ctx.items()
           if k not in ("mask_local", "cos_local", "sin_local", *ring)}  # fmt: skip
    out["window"] = cfg.sliding_window
    local, nope = kind.get("local"), kind.get("nope")

    def pick(flag, when_set, otherwise):
        if isinstance(flag, bool):
            return when_set if flag else otherwise
        return jnp.where(flag, when_set, otherwise)

    if local is not None:
        pairs = [("mask", "mask_local")] + (
            [("cos", "cos_local"), ("sin", "sin_local")] if "cos_local" in ctx else [])  # fmt: skip
        for glob, loc in pairs:
            if ctx[glob] is not None:
                out[glob] = pick(local, ctx[loc], ctx[glob])
        if isinstance(local, bool):
            out["window"] = cfg.sliding_window if local else 0
        else:
            out["window"], out["local"] = None, local
    if out["window"]:  # a windowed layer's ring cache, if any
        out.update({k: ctx[k] for k in ring if k in ctx})
    if nope is not None:
        out["cos"] = pick(nope, jnp.ones_like(out["cos"]), out["cos"])
        out["sin"] = pick(nope, jnp.zeros_like(out["sin"]), out["sin"])
    return out


def by_window(cfg: ModelConfig, ctx: dict, attend):
    """`attend(window)` for this layer: with its static window, or (a scanned layer of a mixed
    pattern, kind traced) with the local or the global one by `lax.cond` — both kernels
    compiled, one run, and the fast causal(+window) modes kept, no (B, T, T) masks built. An
    explicit mask already carries the layer's window: window 0 then (packed rows under
    attention_impl="flash" carry per-token ids instead, `ctx["segments"]`, and need theirs)."""
    if ctx["window"] is not None:
        return attend(ctx["window"])
    if ctx["mask"] is not None:
        return attend(0)
    return jax.lax.cond(ctx["local"], lambda: attend(cfg.sliding_window), lambda: attend(0))
