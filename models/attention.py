"""Grouped-query self-attention: the `Attention` linen module (q|k|v projections, q/k norms,
RoPE, the KV cache write, the choice of attention kernel, the output projection).

Shape legend: B batch, T query length, S key length, N query heads, K kv heads, G = N // K
query heads per kv head, H head dim, D model dim. How masks are made from segment ids, slots
and positions: models/attention_masks.py.

The functions the module uses live in modules of their own; every name callers import from
`flaxlm.models.attention` stays importable from here (the same objects):
  * models/rope.py — RoPE frequencies, scalings and tables, `apply_rope`
  * models/attention_masks.py — masks, each layer's view (`layer_context`), `by_window`
  * models/attention_kernels.py — XLA (whole or in row blocks) and cuDNN attention
  * models/attention_cache.py — KV cache writes, int8 cache entries, `cached_attention`
  * models/attention_context_parallel.py — attention with the sequence split over devices
`Attention` looks them up here, so a test that patches `attention.apply_rope`,
`attention.cudnn_attention` or `attention.ATTENTION_CHUNK` changes what the module runs.
"""

from __future__ import annotations

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlm.models import decode_attention as decode_kernel
from flaxlm.models import splash_attention as splash

# (re-exported: the names callers import from flaxlm.models.attention)
from flaxlm.models.attention_cache import (  # noqa: F401
    cached_attention,
    quantize_kv,
    write_cache_rows,
    write_rows,
)
from flaxlm.models.attention_context_parallel import (  # noqa: F401
    context_attention,
    context_flash_attention,
    gather_sequence,
)
from flaxlm.models.attention_kernels import (  # noqa: F401
    ATTENTION_CHUNK,
    attention_probs,
    chunked_attention,
    cudnn_attention,
    cudnn_supports_head_dim,
    softcap,
    xla_attention,
)
from flaxlm.models.attention_masks import (  # noqa: F401
    attention_mask,
    by_window,
    causal_mask,
    layer_context,
)
from flaxlm.models.config import ModelConfig
from flaxlm.models.flash_attention import flash_attention
from flaxlm.models.layers import (
    Proj,
    ProjWeights,
    RMSNorm,
    joins_projections,
    rms_normalize,
    stacked_projection,
)
from flaxlm.models.rope import (  # noqa: F401
    _yarn_inv_freq,
    apply_rope,
    local_rope_config,
    longrope_inv_freqs,
    longrope_long,
    rope_attention_factor,
    rope_inv_freq,
    rope_tables,
)
from flaxlm.models.sharding import logical_axes_unsplit, logical_axis_size

log = logging.getLogger(__name__)


# The kernel itself, to tell a stand-in patched over `cudnn_attention` apart (`_cudnn_or_rows`)
_real_cudnn_attention = cudnn_attention


@functools.cache
def cudnn_present() -> bool:
    """Whether jax can stage out cuDNN attention at all: its cuDNN path traces only with jax's
    CUDA plugin (and its cuDNN) installed — "cuDNN is not detected." otherwise, and then no
    program can target a CUDA GPU. Tried once, on a small causal problem."""
    q = jax.ShapeDtypeStruct((1, 128, 1, 64), jnp.bfloat16)
    try:
        jax.eval_shape(lambda q: jax.nn.dot_product_attention(
            q, q, q, is_causal=True, implementation="cudnn"), q)  # fmt: skip
    except Exception as e:  # (RuntimeError without the plugin; whatever else, the same answer)
        level = logging.WARNING if jax.default_backend() == "gpu" else logging.INFO
        log.log(level, "attention_impl='cudnn': jax cannot stage out cuDNN attention here "
                "(%s: %s), so attention runs as XLA in blocks of query rows",
                type(e).__name__, e)  # fmt: skip
        return False
    return True


@functools.cache
def _log_once(message: str) -> None:
    log.info(message)


def _mask_fn(ctx, T: int, S: int):
    """window -> the (B|1, 1, T, S) mask the self-attention kernels imply for `ctx`: packed
    rows' segments and positions, else the given mask, else plain causal."""
    packed = ctx.get("segments")

    def mask_of(window):
        if packed is not None:
            seg, pos = packed
            slot = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), seg.shape)
            return attention_mask(seg, seg, slot, slot, pos, pos, window)
        return causal_mask(T, S, window) if ctx["mask"] is None else ctx["mask"]

    return mask_of


class Attention(nn.Module):
    """Multi-head / grouped-query / multi-query self-attention with RoPE and an optional cache.

    `ctx` is the layer's view (`layer_context`) of what every layer shares (computed once per
    forward in transformer.py): rope `cos`/`sin`, the boolean `mask` (None = plain causal
    rows, no packing), the layer's sliding `window` (0 = none) and while decoding the cache
    write `index`. `layer_cache` is the layer's (keys, values) buffers,
    heads-major, (B, K, S, H) each, or None.

    `fused` reads q, k and v from one (D, N + 2K, H) kernel "qkv" (one matmul instead of three;
    the layout `fuse_projections` in transformer.py makes for decoding). `decode_attention`
    "pallas" runs one-token steps over the cache — RoPE, cache write, attention over the
    written slots — as one kernel (models/decode_attention.py; the cache length must be a
    multiple of its BLOCK_K, which `generate` arranges); other shapes keep the XLA path.
    "pallas:BK:W:S" runs it with key block BK, W warps and S stages (`variant_options`).

    `norm_eps` (not None): x is the raw residual stream and the pre-norm's scale is folded into
    the q|k|v weights (`transformer.fold_norms`, `generate(..., decode_norm="fold")`): the
    decode kernel divides q|k|v by rms(x) itself (`decode_attention.norm_supports`: d_model a
    power of two); every other path normalises x (unscaled) first.
    """

    cfg: ModelConfig
    fused: bool = False
    decode_attention: str = "xla"  # xla | pallas | pallas:BK:W:S

    @nn.compact
    def __call__(self, x_BTD, ctx, layer_cache=None, norm_eps: float | None = None):
        cfg = self.cfg
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim_
        bias = cfg.qkv_bias
        kernel_options = (decode_kernel.variant_options(self.decode_attention)
                          if self.decode_attention.startswith("pallas") else None)  # fmt: skip
        T = x_BTD.shape[1]
        runs_kernel = (layer_cache is not None and kernel_options is not None
                       and cfg.rotary_dim_ == H  # the kernel rotates whole heads
                       # (no block_k: the default, or one that divides a ring's W slots)
                       and decode_kernel.supports(layer_cache[0].shape[2], T, H,
                                                  kernel_options.get("block_k"))
                       and decode_kernel.mesh_supports())  # fmt: skip
        norm_x = None  # the raw input whose rms the kernel divides by
        if norm_eps is not None:
            if runs_kernel and decode_kernel.norm_supports(D):
                norm_x = x_BTD
            else:
                x_BTD = rms_normalize(x_BTD, norm_eps, cfg.compute_dtype)
        if self.fused:
            qkv = Proj(
                (D, N + 2 * K, H),
                ("embed", "qkv_heads", "head_dim"),
                cfg,
                use_bias=bias,
                name="qkv",
                remat_name="qkv",
            )(x_BTD)
            q, k, v = jnp.split(qkv, [N, N + K], axis=2)
        elif joins_projections(cfg) and logical_axes_unsplit("q_heads", "kv_heads"):
            # The per-step cast writes q|k|v joined: one matmul each way (layers.MLP says why);
            # not with heads split over devices, where joining them would move data.
            weights = [
                ProjWeights((D, n, H), ("embed", axis, "head_dim"), cfg, use_bias=bias, name=name)()
                for name, (n, axis) in self._heads().items()
            ]
            qkv = stacked_projection(x_BTD, weights, 1, ("qkv_heads", "head_dim"), "qkv")
            q, k, v = jnp.split(qkv, [N, N + K], axis=2)
        else:
            q, k, v = (
                Proj(
                    (D, n, H),
                    ("embed", axis, "head_dim"),
                    cfg,
                    use_bias=bias,
                    name=name,
                    remat_name="qkv",
                )(x_BTD)
                for name, (n, axis) in self._heads().items()
            )
        if cfg.qk_norm == "head":  # Qwen3: each head's q and k normalised over head_dim
            q = RMSNorm(cfg, name="q_norm")(q)
            k = RMSNorm(cfg, name="k_norm")(k)
        elif cfg.qk_norm == "all":  # OLMo 2: q and k each normalised over all their heads
            q = RMSNorm(cfg, name="q_norm")(q.reshape(*q.shape[:2], -1)).reshape(q.shape)
            k = RMSNorm(cfg, name="k_norm")(k.reshape(*k.shape[:2], -1)).reshape(k.shape)
        q = nn.with_logical_constraint(q, ("act_batch", "act_len", "act_heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("act_batch", "act_len", "act_kv_heads", "head_dim"))
        # (v too: under context parallelism the partitioner would otherwise gather the layer's
        # input x and project the whole sequence's values on every device)
        v = nn.with_logical_constraint(v, ("act_batch", "act_len", "act_kv_heads", "head_dim"))
        # logits' scale: None = head_dim^-1/2 as it always was (divided, bit for bit)
        scale, cap = (cfg.attn_scale if cfg.query_pre_attn_scalar else None), cfg.attn_logit_softcap
        if runs_kernel:
            # One kernel: RoPE, the cache write and attention over the written slots.
            qkv = jnp.concatenate([q, k, v], axis=2)  # the merged projection's own output
            ring = "ring_slot" in ctx  # a windowed layer's ring: each row's own slot
            out, layer_cache = decode_kernel.decode_attention(
                qkv,
                ctx["cos"],
                ctx["sin"],
                *layer_cache[:2],
                ctx["mask"],
                ctx["ring_slot"] if ring else ctx["index"],
                kv_scales=layer_cache[2:],  # an int8 cache's
                scale=cfg.attn_scale,
                cap=cap,
                ring=ring,
                norm_x_BTD=norm_x,
                norm_eps=norm_eps or 0.0,
                **kernel_options,
            )
            return self._out_proj(out), layer_cache
        q = apply_rope(q, ctx["cos"], ctx["sin"])
        k = apply_rope(k, ctx["cos"], ctx["sin"])

        if layer_cache is not None:
            # Write this chunk's keys and values at the cache index (in place), then attend
            # over the whole buffer (the mask hides unwritten slots). A windowed layer's ring
            # (`transformer.init_cache`) takes a prefill's last W tokens of each row, and a
            # decode step's one token at that row's own slot. An int8 cache (4 buffers) takes
            # each token's and head's int8 values and their scale alike.
            new = (k, v) if len(layer_cache) == 2 else quantize_kv(k, v)
            new = [x.transpose(0, 2, 1, 3).astype(buf.dtype) for buf, x in zip(layer_cache, new)]
            if "ring_src" in ctx:
                src, held = (x[:, None, :, None] for x in ctx["ring_src"])  # (B, 1, W, 1)
                layer_cache = tuple(
                    jnp.where(held, jnp.take_along_axis(x, src, axis=2), 0).astype(x.dtype)
                    for x in new
                )
            elif "ring_slot" in ctx:  # each row writes at its own slot of its ring
                layer_cache = tuple(write_rows(buf, x, ctx["ring_slot"], axis=1)
                                    for buf, x in zip(layer_cache, new))  # fmt: skip
            elif jnp.ndim(ctx["index"]) == 1:  # each row at its own slot (speculative decoding)
                # (the slot axis whole under a mesh: a split one was written wrong,
                # `write_cache_rows`)
                layer_cache = tuple(write_cache_rows(buf, x, ctx["index"])
                                    for buf, x in zip(layer_cache, new))  # fmt: skip
            else:
                idx = ctx["index"]
                zero = jnp.zeros_like(idx)  # (one integer type under jax_enable_x64 too)
                layer_cache = tuple(jax.lax.dynamic_update_slice(buf, x, (zero, zero, idx, zero))
                                    for buf, x in zip(layer_cache, new))  # fmt: skip
            if ctx.get("prefill"):  # an empty cache, right-padded prompts: plain causal rows
                out = self._self_attention(q, k, v, ctx, scale, cap)
            else:
                ck, cv, *kv_scales = layer_cache
                out = cached_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), ctx["mask"],
                                       scale, cap, kv_scales)  # fmt: skip
        else:
            out = self._self_attention(q, k, v, ctx, scale, cap)
        return self._out_proj(out), layer_cache

    def _self_attention(self, q, k, v, ctx, scale, cap):
        """Attention of the chunk's queries over its own keys (`_attend`), and, for inspection
        (`apply(..., mutable="intermediates")`), its weights sown whichever kernel ran: the
        cuDNN, context-parallel and prefill paths sowed none, and the inspect notebook failed
        with KeyError 'intermediates' on a run trained with attention_impl='cudnn'."""
        out = self._attend(q, k, v, ctx, scale, cap)
        if self.is_mutable_collection("intermediates"):
            k = gather_sequence(k)
            self._sow_probs(q, k, ctx, _mask_fn(ctx, q.shape[1], k.shape[1]), scale, cap)
        return out

    def _attend(self, q, k, v, ctx, scale, cap, cudnn: bool = True):
        """Attention of the chunk's queries over its own keys (training, scoring, and a
        prefill into an empty cache): the blockwise kernel where the config asks for "flash"
        (models/flash_attention.py); cuDNN's flash kernel where the config asks for it and it
        applies; the blockwise kernel for every other prefill (inference: a long prompt's
        float32 scores one (block × block) tile at a time, the causal half skipped); XLA in
        blocks of query rows where cuDNN is asked for but cannot run (soft-capped logits, a
        head dim it does not take) or where the program does not target a CUDA GPU
        (`_cudnn_or_rows`, which asks with `cudnn=False`); else plain XLA. Under context
        parallelism, blocks of each device's own rows (`context_attention`,
        `context_flash_attention`)."""
        cfg = self.cfg
        split = not logical_axes_unsplit("act_len")  # context parallelism
        k, v = gather_sequence(k), gather_sequence(v)
        T, S = q.shape[1], k.shape[1]
        packed = ctx.get("segments")  # (segment ids, positions) of packed rows (flash, splash)
        if cfg.attention_impl == "splash" and not split and splash.supports(T, cfg.flash_block):
            seg = None if packed is None else packed[0]
            return by_window(cfg, ctx, lambda w: splash.splash_attention(
                q, k, v, seg, window=w, scale=scale, cap=cap, block=cfg.flash_block))  # fmt: skip
        if cfg.attention_impl in ("flash", "splash") and not split:
            # (splash: rows it does not take; the same function)
            return by_window(cfg, ctx, lambda w: flash_attention(
                q, k, v, *(packed or ()), window=w, scale=scale, cap=cap,
                block=cfg.flash_block))  # fmt: skip
        if (cudnn and cfg.attention_impl == "cudnn" and not cap and not split
                and cudnn_supports_head_dim(q.shape[-1])):  # fmt: skip
            return self._cudnn_or_rows(q, k, v, ctx, scale)
        C = logical_axis_size("act_len")
        if split and cfg.attention_impl in ("flash", "splash"):
            # each device's own rows against the gathered keys (any T: the queries padded to
            # a multiple of C inside)
            return by_window(cfg, ctx, lambda w: context_flash_attention(
                q, k, v, packed, w, C, scale, cap, cfg.flash_block))  # fmt: skip
        if split and T % C == 0:
            # cuDNN's partitioner refuses queries split along the sequence, and the row blocks
            # below would gather them: each device's own rows, in blocks (`context_attention`)
            # (the row blocks' size: this module's ATTENTION_CHUNK, which tests patch)
            return by_window(cfg, ctx, lambda w: context_attention(
                q, k, v, ctx["mask"], w, C, scale, cap, chunk=ATTENTION_CHUNK))  # fmt: skip
        if ctx.get("prefill"):
            # inference over plain causal rows: the blockwise kernel's forward, (block × block)
            # score tiles, the causal half and what windows hide skipped (a 4096-token prompt:
            # bench/RESULTS.md "prefill")
            return by_window(cfg, ctx, lambda w: flash_attention(
                q, k, v, window=w, scale=scale, cap=cap, block=cfg.flash_block))  # fmt: skip
        if cfg.attention_impl == "cudnn":

            def rows_of(window):
                def mask_fn(start, rows):
                    if ctx["mask"] is None:
                        return causal_mask(rows, S, window, start)
                    return jax.lax.dynamic_slice_in_dim(ctx["mask"], start, rows, axis=2)

                return mask_fn

            return by_window(cfg, ctx, lambda w: chunked_attention(
                q, k, v, rows_of(w), scale, cap, chunk=ATTENTION_CHUNK))  # fmt: skip

        mask_of = _mask_fn(ctx, T, S)
        return by_window(cfg, ctx, lambda w: xla_attention(q, k, v, mask_of(w), scale, cap))

    def _cudnn_or_rows(self, q, k, v, ctx, scale):
        """cuDNN's kernel where the program is lowered for a CUDA GPU, the path it takes where
        cuDNN cannot run (XLA in blocks of query rows, the blockwise kernel for a prefill)
        anywhere else. attention_impl is an execution key (a checkpoint trained on GPUs keeps
        it), and cuDNN fails to trace without jax's CUDA plugin ("cuDNN is not detected.") and
        to compile for a CPU: evaluating such a checkpoint on a CPU failed. Chosen by
        `lax.platform_dependent`, not by this process's devices: bench/gpu_aot.py compiles
        for an H200 from a CPU-only process (JAX_PLATFORMS=cpu, the CUDA plugin installed),
        and gets cuDNN's kernel; only the chosen branch is lowered."""
        cfg = self.cfg

        def on_cuda(q, k, v):
            return by_window(cfg, ctx, lambda w: cudnn_attention(q, k, v, ctx["mask"], w, scale))

        def elsewhere(q, k, v):
            return self._attend(q, k, v, ctx, scale, 0.0, cudnn=False)

        if cudnn_attention is not _real_cudnn_attention:
            # a stand-in (tests; bench/memory_plan.py, which traces a GPU's program on a CPU):
            # called where the kernel would run on a GPU, as before
            return on_cuda(q, k, v)
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            # cuDNN's kernel takes float16/bfloat16 only: a cudnn checkpoint evaluated with
            # model.dtype=float32 failed to trace where jax has its CUDA plugin, on a CPU too
            _log_once(
                "attention_impl='cudnn' with float32 activations: cuDNN takes float16 and "
                "bfloat16 only, so attention runs as XLA in blocks of query rows"
            )
            return elsewhere(q, k, v)
        if not cudnn_present():  # (no CUDA target possible: the fallback, nothing to choose)
            return elsewhere(q, k, v)
        if jax.default_backend() != "gpu":
            _log_once("attention_impl='cudnn': cuDNN's kernel runs where a program is lowered "
                      "for a CUDA GPU; for other targets, XLA in blocks of query rows")  # fmt: skip
        # Rematerialised whole under the switch: a switch's branches hand the backward pass
        # one set of residuals, each branch zeros for those only the other saves; checkpointed,
        # this one saves just its inputs (the shapes of cuDNN's own), no (B, N, T, S) weights.
        return jax.lax.platform_dependent(q, k, v, cuda=on_cuda,
                                          default=jax.checkpoint(elsewhere))  # fmt: skip

    def _sow_probs(self, q, k, ctx, mask_of, scale, cap):
        """Inspection only (apply(..., mutable="intermediates")): the attention weights as
        (B, N, T, S), sown as "attn_probs" (head n = k·G + g)."""
        (B, T, N, _), S = q.shape, k.shape[1]
        probs = by_window(self.cfg, ctx,
                          lambda w: attention_probs(q, k, mask_of(w), scale, cap))  # fmt: skip
        self.sow("intermediates", "attn_probs", probs.reshape(B, N, T, S))

    def _heads(self) -> dict:
        cfg = self.cfg
        return {"q": (cfg.n_heads, "q_heads"), "k": (cfg.n_kv_heads, "kv_heads"),
                "v": (cfg.n_kv_heads, "kv_heads")}  # fmt: skip

    def _out_proj(self, out_BTNH):
        cfg = self.cfg
        names = ("act_batch", "act_len", "act_heads", "head_dim")
        out = nn.with_logical_constraint(out_BTNH, names)
        shape = (cfg.n_heads, cfg.head_dim_, cfg.d_model)
        names = ("q_heads", "head_dim", "embed")
        return Proj(shape, names, cfg, n_in=2, name="o", remat_name="attn_out")(out)
