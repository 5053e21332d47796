"""The KV cache's side of attention: writing each row's new keys and values at its own slot
(`write_rows`; into a cache under a mesh `write_cache_rows`), an int8 cache's quantized
entries (`quantize_kv`) and attention of a few queries over the heads-major (B, K, S, H)
cache (`cached_attention`, int8 scales applied to the scores and probabilities, never to a
dequantized copy).

Separate from models/attention.py because decoding code beyond the `Attention` module uses
it: transformer.py and speculative.py write rows of their caches with `write_rows`, and the
decode kernel (models/decode_attention.py) is tested against `cached_attention`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlm.models import quant
from flaxlm.models.attention_kernels import softcap


def write_rows(buf, new, slots_B, axis: int):
    """`buf` with row b's `new[b]` written at slot `slots_B[b]` of `axis` (an axis of a row,
    the batch axis left out): each row its own place, as a ring cache's decode step writes."""

    def one(row, value, slot):
        start = [0] * row.ndim
        start[axis] = slot
        return jax.lax.dynamic_update_slice(row, value, start)

    return jax.vmap(one)(buf, new, slots_B)


# A cache buffer's logical axes with its slot axis whole on every device (None, not `act_len`,
# which every preset splits over `context`): (B, K, S, H) keys, values and int8 scales; (B, S)
# segment ids and positions. decode_program._constrain_cache(per_row=True) keeps them so.
WHOLE_SLOTS = {4: ("act_batch", "act_kv_heads", None, "head_dim"), 2: ("act_batch", None)}


def write_cache_rows(buf, new, slots_B):
    """`write_rows` into a cache buffer, (B, K, S, H) or (B, S), at a slot per row, its slot
    axis whole on every device before and after (`WHOLE_SLOTS`; no-ops outside a mesh).

    Why: with the slot axis split over `context`, XLA (jax 0.10, CPU) partitions the per-row
    write as a scatter at shard-relative slots, out of range on the shards that do not hold
    the slot (a scatter skips those). Its scatter expander writes the old value back there,
    read at the slot clamped into the shard; the algebraic simplifier then folds that read —
    a dynamic slice of the shard, itself a dynamic slice of the whole buffer where that was
    made earlier in the same program (a prefill) — into one slice at shard offset + slot,
    clamped over the whole buffer: the shard's edge slot took the next shard's old value.
    Speculative decoding's 1- and 2-token draft steps so emptied the first shard's last slot
    (segment id 0, other keys): wrong draft logits, the model as its own draft accepted
    less than always (tests/models/test_speculative_context_mesh.py). With the slot axis
    whole, every write is at an in-range slot of the device's own rows."""
    names = WHOLE_SLOTS[buf.ndim]
    buf = nn.with_logical_constraint(buf, names)
    new = write_rows(buf, new, slots_B, axis=buf.ndim // 2 - 1)  # (B, S): 0; (B, K, S, H): 1
    return nn.with_logical_constraint(new, names)


def quantize_kv(k_BTKH, v_BTKH):
    """An int8 cache's entries for new keys and values: (k int8, v int8, k scale, v scale),
    one float32 scale per token and head, max |x| / 127 over the head dim (models/quant.py's
    rounding: error ≤ scale / 2 per value)."""
    (kq, ks), (vq, vs) = (quant.quantize_kernel(x, (3,)) for x in (k_BTKH, v_BTKH))
    return kq, vq, ks, vs


def cached_attention(q_BTNH, k_BKSH, v_BKSH, mask_B1TS, scale=None, cap: float = 0.0,
                     kv_scales=()) -> jax.Array:  # fmt: skip
    """Attention over a heads-major (B, K, S, H) KV cache, laid out for few queries: each kv
    head's G query heads × T positions are the rows of one (G·T, H) × (H, S) matmul with (B, K)
    as batch dims, so a decode step reads the cache in place (no transpose of the buffer), and
    the scores leave the matmul in float32 with S minor, so the masked softmax is one row-wise
    fusion instead of separate max / sum / normalise passes. Compiled for the H200
    (bench/gpu_aot.py) that is 2 kernels fewer per layer and decode step than `xla_attention`'s
    layout (44 fewer per step at the 1.1B shape).

    `kv_scales` (k_scale, v_scale), (B, K, S, 1) each: the cache holds int8 keys and values
    (`quantize_kv`; passed here converted to q's dtype), each slot's and head's to be
    multiplied by its scale. The scales multiply the score columns and the probabilities
    instead, (q · k_s) s_k and Σ_s (p_s s_v) v_s: the same sums, with no dequantized copy
    of the cache."""
    B, T, N, H = q_BTNH.shape
    K, S = k_BKSH.shape[1], k_BKSH.shape[2]
    G = N // K
    q = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    scores = jnp.einsum("bkmh,bksh->bkms", q, k_BKSH, preferred_element_type=jnp.float32)
    if kv_scales:
        k_scale, v_scale = (x[..., 0][:, :, None, :].astype(jnp.float32) for x in kv_scales)
        scores = scores * k_scale
    mask = jnp.broadcast_to(mask_B1TS[:, :, None], (B, 1, G, T, S)).reshape(B, 1, G * T, S)
    scores = scores / math.sqrt(H) if scale is None else scores * scale
    scores = jnp.where(mask, softcap(scores, cap), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if kv_scales:
        probs = probs * v_scale
    probs = probs.astype(v_BKSH.dtype)
    out = jnp.einsum("bkms,bksh->bkmh", probs, v_BKSH)  # (B, K, G·T, H), row m = g·T + t
    return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
