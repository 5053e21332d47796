"""TPU attention through jax's splash-attention Pallas kernel (`attention_impl="splash"`).

On TPUs the fused kernel to use is splash attention (jax.experimental.pallas.ops.tpu.
splash_attention, what MaxText runs on TPU pods): block-sparse flash attention written for the
TPU's vector and matrix units, with a forward and two backward kernels (dq, dk|dv). This
module adapts it to the model's conventions:

  * layout: the model's (B, T, N, H) activations become the kernel's (N, T, H) per example
    (vmapped over the batch); grouped-query heads go in as (K, T, H) keys and values;
  * masks: causal rows, a sliding window (`LocalMask`, left W - 1, right 0) and packed
    documents (`SegmentIds`: a query sees keys of its own segment id). The mask is static per
    (T, window) and the kernel precomputes which (query block, key block) tiles it hides,
    so masked tiles are skipped; segment ids are checked per tile at run time;
  * logits: q is multiplied by the scale (head_dim^-1/2 or `attn_scale`) before the kernel,
    which does not scale; soft-capping (Gemma 2) is the kernel's own `attn_logits_soft_cap`;
  * sharding: a `pallas_call` cannot be partitioned by XLA, so under a mesh each device runs
    it on its own rows and heads (`shard_map` over the batch and head mesh axes the logical
    axis rules give; heads split over `tensor` keep each kv head's query heads together).

Differences from `attention.attention_mask`, by construction of the kernel's masks: padding
tokens (segment id 0) attend to each other (their outputs are never used; real tokens never
see them), and the window counts indices, not positions — the same for packed documents
whose positions run 0, 1, … within each document, as the packer writes them.

Elsewhere than on a TPU the same kernel runs in Pallas' interpreter (tests; slow), so the
results can be checked on a CPU against `xla_attention` (tests/models/test_splash_attention.py).
A sequence split over devices (context parallelism), and rows that are not whole blocks of a
multiple of 128 tokens (the block is 512, or the row when shorter), take the blockwise kernel
instead (models/flash_attention.py), which computes the same function.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

# Query / key rows per kernel block (all the kernel's block sizes): MaxText's default on TPU v5.
BLOCK = 512


def supports(seq_len: int, block: int | None = None) -> bool:
    """Whether the kernel takes rows of `seq_len` tokens: whole blocks of a multiple of 128
    rows (the TPU's lane width; the kernel asks it of its key blocks, interpreted too)."""
    b = min(block or BLOCK, seq_len)
    return seq_len % b == 0 and b % 128 == 0


def _kernel(n_heads: int, n_kv_heads: int, seq_len: int, window: int, cap: float, block: int,
            interpret: bool):  # fmt: skip
    """The splash kernel for one example's (N, T, H) queries over (K, T, H) keys/values. Made
    per trace, not cached: it holds arrays, which inside a jit are that trace's values."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    shape = (seq_len, seq_len)
    one = sm.LocalMask(shape, window_size=(window - 1, 0), offset=0) if window else (
        sm.CausalMask(shape))  # fmt: skip
    b = min(block, seq_len)
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                          block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b,
                          block_kv_dq=b)  # fmt: skip
    make = sk.make_splash_mqa if n_kv_heads == 1 else sk.make_splash_mha
    return make(sm.MultiHeadMask([one] * n_heads), block_sizes=sizes, head_shards=1,
                q_seq_shards=1, attn_logits_soft_cap=cap or None,
                interpret=interpret)  # fmt: skip


def _local(q_BNTH, k_BKTH, v_BKTH, seg_BT, *, window: int, cap: float, block: int,
           interpret: bool):  # fmt: skip
    """One device's rows and heads through the kernel (vmapped over the rows)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )

    _, N, T, _ = q_BNTH.shape
    K = k_BKTH.shape[1]
    kernel = _kernel(N, K, T, window, cap, block, interpret)
    if K == 1:  # the MQA kernel takes (T, H) keys and values
        k_BKTH, v_BKTH = k_BKTH[:, 0], v_BKTH[:, 0]
    if seg_BT is None:
        return jax.vmap(kernel)(q_BNTH, k_BKTH, v_BKTH)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(q=s, kv=s)))(
        q_BNTH, k_BKTH, v_BKTH, seg_BT
    )


def splash_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT=None, *, window: int = 0,
                     scale: float | None = None, cap: float = 0.0,
                     block: int | None = None) -> jax.Array:  # fmt: skip
    """Causal self-attention (B, T, N, H) through the splash kernel (module docstring)."""
    B, T, N, H = q_BTNH.shape
    if not supports(T, block):
        raise ValueError(f"splash_attention: {T} tokens are not whole blocks of a multiple "
                         f"of 128 rows (block {block or BLOCK})")  # fmt: skip
    scale = 1.0 / math.sqrt(H) if scale is None else float(scale)
    q = (q_BTNH * jnp.asarray(scale, q_BTNH.dtype)).transpose(0, 2, 1, 3)
    k, v = (x.transpose(0, 2, 1, 3) for x in (k_BTKH, v_BTKH))
    options = dict(window=int(window), cap=float(cap), block=int(block or BLOCK))
    args = (q, k, v) if segment_ids_BT is None else (q, k, v, segment_ids_BT.astype(jnp.int32))

    def branch(interpret: bool):
        def call(q, k, v, seg=None):
            return _local(q, k, v, seg, interpret=interpret, **options)

        return call

    def run(*a):
        return jax.lax.platform_dependent(*a, tpu=branch(False), default=branch(True))

    rows, heads, kv_heads = _mesh_axes()
    if rows or heads:
        q_spec, kv_spec = P(rows or None, heads or None), P(rows or None, kv_heads or None)
        specs = (q_spec, kv_spec, kv_spec) + ((P(rows or None),) if len(args) == 4 else ())
        run = jax.shard_map(run, in_specs=specs, out_specs=q_spec, check_vma=False)
    return run(*args).transpose(0, 2, 1, 3)


def _mesh_axes():
    """The ambient mesh's axes (of size > 1) the rows, the query heads and the kv heads are
    split over by the logical axis rules; () each without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), (), ()

    def axes(name):
        found = nn.logical_to_mesh_axes((name,))[0] or ()
        found = (found,) if isinstance(found, str) else tuple(found)
        return tuple(a for a in found if mesh.shape[a] > 1)

    return axes("act_batch"), axes("act_heads"), axes("act_kv_heads")
