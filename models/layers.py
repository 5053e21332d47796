"""Building blocks of the Llama family: projections, RMSNorm, embeddings, gated MLP.

Every parameter is declared with logical axis names (see models/sharding.py), stored in
`param_dtype` and cast to the compute `dtype` where it is used (fp32 master weights, bf16 math).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from flaxlm.models import decode_mlp
from flaxlm.models.config import ModelConfig


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


def _kernel_param(module: nn.Module, shape, axes, cfg: ModelConfig):
    """A projection's "kernel" parameter, declared in `module` (stored dtype, logical axes)."""
    init = nn.with_logical_partitioning(_normal(cfg.init_std), tuple(axes))
    return module.param("kernel", init, tuple(shape), cfg.weight_dtype)


def load_kernel(module: nn.Module, shape, axes, cfg: ModelConfig):
    """(kernel in the compute dtype, its output scale or None): the stored float kernel cast
    and None, or an int8 one (decoding with `quantize="int8"`, models/quant.py) cast and its
    per-output-channel "kernel_scale" (input axes kept as size 1), for the caller to apply
    to the matmul's output — where it costs one multiply per output, and the int8→bf16
    convert fuses into the matmul reading the weight. (Scaling the weight instead, compiled
    for the H200 decode step, dequantized every weight into a bf16 copy every token: 3 GiB
    more traffic per token.)"""
    kernel = _kernel_param(module, shape, axes, cfg)
    if kernel.dtype == jnp.int8 and module.has_variable("params", "kernel_scale"):
        return kernel.astype(cfg.compute_dtype), module.get_variable("params", "kernel_scale")
    return kernel.astype(cfg.compute_dtype), None


def output_scale(scale, n_in: int, dtype):
    """A kernel's "kernel_scale" (input axes of size 1) as the factor of its matmul's output
    (the output axes)."""
    return scale.reshape(scale.shape[n_in:]).astype(dtype)


def _bias_param(module: nn.Module, shape, axes, cfg: ModelConfig):
    """A projection's "bias" over its output axes (the last `len(shape)` of the kernel's)."""
    init = nn.with_logical_partitioning(nn.initializers.zeros, tuple(axes))
    return module.param("bias", init, tuple(shape), cfg.weight_dtype)


class ProjWeights(nn.Module):
    """Just a `Proj`'s parameters, under the same names and paths ("NAME/kernel",
    "NAME/bias"), in the compute dtype: for a caller that joins several projections into one
    matmul (`stacked_projection`). Returns (kernel, bias or None)."""

    shape: Sequence[int]
    axes: Sequence[str]
    cfg: ModelConfig
    n_in: int = 1
    use_bias: bool = False
    # True: an int8 kernel comes as is, with its "kernel_scale" (None if not quantized) as a
    # third value, for the caller to scale its matmul's output (`load_kernel` says why)
    keep_scale: bool = False

    @nn.compact
    def __call__(self):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        kernel, scale = load_kernel(self, self.shape, self.axes, cfg)
        bias = None
        if self.use_bias:
            out = len(self.shape) - self.n_in
            bias = _bias_param(self, self.shape[-out:], self.axes[-out:], cfg).astype(dt)
        if self.keep_scale:
            return kernel, bias, scale
        if scale is not None:  # (a caller joining kernels reads them dequantized)
            kernel = kernel * scale.astype(dt)
        return kernel, bias


def joins_projections(cfg: ModelConfig) -> bool:
    """Whether projections of one input run as one matmul (`stacked_projection`): when every
    step casts the stored weights to the compute dtype anyway (fp32 master weights, bf16
    math), the cast writes them joined at no extra cost. `cfg.join_projections=False` keeps
    them apart (to measure the difference)."""
    return cfg.join_projections and cfg.weight_dtype != cfg.compute_dtype


def stacked_projection(x, weights, axis: int, names, remat_name: str):
    """One matmul for several projections of the same input x (..., D): their (kernel, bias)
    pairs (`ProjWeights`, kernels (D, ...)) joined on output `axis` of the kernel — stacked
    on a new axis when every kernel is (D, F) (gate|up), concatenated on an existing one
    (q|k|v heads) otherwise. Returns the joined output, output axes named `names`."""
    kernels = [k for k, _ in weights]
    same = all(k.shape == kernels[0].shape for k in kernels) and kernels[0].ndim == 2
    join = jnp.stack if same else jnp.concatenate
    w = nn.with_logical_constraint(join(kernels, axis=axis), ("embed", *names))
    x = x.astype(w.dtype)
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
    if weights[0][1] is not None:
        y = y + join([b for _, b in weights], axis=axis - 1)
    return checkpoint_name(y, remat_name)


class Proj(nn.Module):
    """y = x·W (+ b), contracting the last `n_in` axes of x with the first ones of W.

    `shape` is the kernel's shape and `axes` its logical names, e.g. a query projection has
    shape (D, N, H) and axes ("embed", "q_heads", "head_dim").
    """

    shape: Sequence[int]
    axes: Sequence[str]
    cfg: ModelConfig
    n_in: int = 1
    use_bias: bool = False
    remat_name: str | None = None  # names the output for the `save_proj` remat policy

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        kernel, scale = load_kernel(self, self.shape, self.axes, cfg)
        x = x.astype(cfg.compute_dtype)
        n_out = len(self.shape) - self.n_in
        contract_x = tuple(range(x.ndim - self.n_in, x.ndim))
        y = jax.lax.dot_general(x, kernel, ((contract_x, tuple(range(self.n_in))), ((), ())))
        if scale is not None:  # an int8 kernel (models/quant.py)
            y = y * output_scale(scale, self.n_in, cfg.compute_dtype)
        if self.use_bias:
            bias = _bias_param(self, self.shape[-n_out:], self.axes[-n_out:], cfg)
            y = y + bias.astype(cfg.compute_dtype)
        if self.remat_name:
            y = checkpoint_name(y, self.remat_name)
        return y


def _normalized_f32(x, eps: float):
    """x / sqrt(mean(x²) + eps) over the last axis, computed in float32 (as HF Llama does)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def rms_normalize(x, eps: float, dtype):
    """RMSNorm without its scale, in `dtype` — what a layer runs on its input when the scale
    is folded into the next weights (`transformer.fold_norms`) and no kernel folds the
    division in."""
    return _normalized_f32(x, eps).astype(dtype)


class RMSNorm(nn.Module):
    """x / rms(x) · scale, computed in float32 (as HF Llama does) and returned in compute dtype.

    With `cfg.norm_unit_offset` (Gemma) the stored scale is an offset from 1, initialised at 0,
    and the product is taken in float32 before the cast: x / rms(x) · (1 + scale), Gemma's
    order (Llama casts first, then multiplies)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        offset = self.cfg.norm_unit_offset
        init = nn.initializers.zeros if offset else nn.initializers.ones
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(init, ("norm",)),
            (x.shape[-1],),
            self.cfg.weight_dtype,
        )
        x32 = _normalized_f32(x, self.cfg.norm_eps)
        if offset:
            return (x32 * (1.0 + scale.astype(jnp.float32))).astype(self.cfg.compute_dtype)
        # Match HF: normalise in fp32, cast back, then multiply by the weight.
        return x32.astype(self.cfg.compute_dtype) * scale.astype(self.cfg.compute_dtype)


class Embed(nn.Module):
    """Token embedding table (V, D); `attend` reuses it as the LM head when tied (unscaled,
    also with `cfg.scale_embeddings`, whose sqrt(D) applies to the lookup only)."""

    cfg: ModelConfig

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(_normal(self.cfg.init_std), ("vocab", "embed")),
            (self.cfg.vocab_size, self.cfg.d_model),
            self.cfg.weight_dtype,
        )

    def __call__(self, tokens):
        # A gather (not a one-hot matmul): cheap, and excluded from the FLOP count. The table is
        # gathered whole for it, as FSDP gathers a weight to use it: from a table split over
        # the vocab and the embed dim (fsdp_tp) the partitioner cannot produce batch-split rows
        # and falls back to replicating the looked-up activations ("involuntary full
        # rematerialization"); under fsdp alone it gathered the table anyway.
        table = nn.with_logical_constraint(self.embedding, (None, None))
        x = jnp.take(table, tokens, axis=0).astype(self.cfg.compute_dtype)
        if self.cfg.scale_embeddings:  # Gemma: sqrt(D) rounded to the compute dtype, as HF does
            x = x * jnp.asarray(self.cfg.d_model**0.5, self.cfg.compute_dtype)
        return x

    def attend(self, x):
        return jnp.einsum("btd,vd->btv", x, self.embedding.astype(self.cfg.compute_dtype))


class MLP(nn.Module):
    """Gated MLP: wo(act(x·W_gate) ⊙ x·W_up) — SwiGLU with silu, GeGLU with gelu.

    `fused` reads gate and up from one (D, 2, F) kernel "gate_up" (one matmul instead of two).
    With separate "gate" and "up" kernels stored in another dtype than the compute dtype (fp32
    master weights), the cast that runs every step anyway writes them stacked as one (D, 2, F)
    weight, so gate and up are still one matmul, and the backward is one matmul for the input
    gradient (contracting 2F), one for the weights' and one elementwise pass for the
    activation's gradient, where separate kernels cost two, two and two. Compiled for the H200
    (bench/gpu_aot.py), this took the 1.1B step from 1930 to 1819 kernels, and joining q|k|v
    the same way (models/attention.py) to 1643, with 30 GiB less memory traffic per step
    (bench/RESULTS.md). Without a cast (bf16 params; decoding) stacking would be an extra copy,
    so the kernels stay apart there (XLA's dot merger joins the forward matmuls itself when it
    pays); `join_projections=False` keeps them apart always.

    `decode_kernel="pallas"` computes a decode step's silu(gate)·up with one Pallas kernel
    (models/decode_mlp.py) from the same "gate" and "up" kernels, or the fused "gate_up"
    (`generate(..., decode_mlp="pallas")`); other calls, and meshes with an axis of size > 1,
    keep XLA's.

    `norm_eps` (not None): x is the raw residual stream and the pre-norm's scale is folded into
    the gate and up weights (`transformer.fold_norms`, `generate(..., decode_norm="fold")`):
    the kernel divides by rms(x) itself; the XLA path normalises x (unscaled) first.
    """

    cfg: ModelConfig
    fused: bool = False
    # "pallas" (or "pallas:BN:BK:W:S", `decode_mlp.variant_options`): one-token steps'
    # silu(gate)·up as one kernel
    decode_kernel: str = "xla"

    @nn.compact
    def __call__(self, x, norm_eps: float | None = None):
        cfg = self.cfg
        if self._runs_kernel(x):
            h = self._kernel_gate_up(x, norm_eps)
        else:
            if norm_eps is not None:
                x = rms_normalize(x, norm_eps, cfg.compute_dtype)
            h = self._gate_up(x)
        h = nn.with_logical_constraint(h, ("act_batch", "act_len", "act_mlp"))
        return Proj(
            (cfg.d_ff, cfg.d_model), ("mlp", "embed"), cfg, name="down", remat_name="mlp_out"
        )(h)

    def _transposed(self) -> bool:
        """The params hold "gate_up_t" (`transformer.transpose_gate_up`): decode_mlp="pallas_t"."""
        return self.decode_kernel.split(":")[0] == "pallas_t"

    def _gate_up(self, x):
        cfg = self.cfg
        shape, axes = (cfg.d_model, cfg.d_ff), ("embed", "mlp")
        if self._transposed():  # (prefill and meshes, next to the kernel's decode steps)
            w_t = ProjWeights((2 * cfg.d_ff, cfg.d_model), ("mlp", "embed"), cfg,
                              name="gate_up_t")()[0]  # fmt: skip
            h2 = jnp.einsum("...d,nd->...n", x.astype(w_t.dtype), w_t)
            gate, up = h2[..., : cfg.d_ff], h2[..., cfg.d_ff :]
        elif self.fused:
            gate_up = Proj((cfg.d_model, 2, cfg.d_ff), ("embed", None, "mlp"), cfg, name="gate_up")
            h2 = checkpoint_name(gate_up(x), "mlp_in")  # (..., 2, F)
            gate, up = h2[..., 0, :], h2[..., 1, :]
        elif joins_projections(cfg):
            weights = [ProjWeights(shape, axes, cfg, name=n)() for n in ("gate", "up")]
            h2 = stacked_projection(x, weights, 1, (None, "mlp"), "mlp_in")  # (..., 2, F)
            gate, up = h2[..., 0, :], h2[..., 1, :]
        else:
            gate = Proj(shape, axes, cfg, name="gate", remat_name="mlp_in")(x)
            up = Proj(shape, axes, cfg, name="up", remat_name="mlp_in")(x)
        act = nn.silu if cfg.mlp_activation == "silu" else nn.gelu
        return act(gate) * up

    def _kernel_gate_up(self, x, norm_eps: float | None):
        """silu(gate)·up of a decode step as one kernel (models/decode_mlp.py), reading the
        same "gate" and "up" kernels (or the one "gate_up" of the fused layout); with
        `norm_eps`, x / rms(x) inside it."""
        cfg = self.cfg
        D, F = cfg.d_model, cfg.d_ff
        if self._transposed():
            weights = [ProjWeights((2 * F, D), ("mlp", "embed"), cfg, name="gate_up_t")()[0]]
        elif self.fused:
            weights = [ProjWeights((D, 2, F), ("embed", None, "mlp"), cfg, name="gate_up")()[0]]
        else:
            weights = [ProjWeights((D, F), ("embed", "mlp"), cfg, name=n)()[0]
                       for n in ("gate", "up")]  # fmt: skip
        B, T, _ = x.shape
        x_BD = x.reshape(B * T, D).astype(cfg.compute_dtype)
        options = decode_mlp.variant_options(self.decode_kernel)
        h = decode_mlp.gate_up_silu(x_BD, *weights, norm_eps=norm_eps, **options)
        return h.reshape(B, T, F)

    def _runs_kernel(self, x) -> bool:
        """The kernel applies to one-token steps (decoding; prefill and training keep XLA's)
        of a SwiGLU MLP (separate or fused gate and up kernels), whole tiles, and no mesh axis of
        size > 1 (a custom call is not partitioned: split rows or weights keep XLA's)."""
        cfg = self.cfg
        mesh = jax.sharding.get_abstract_mesh()
        if not self.decode_kernel.startswith("pallas"):
            return False
        tiles = decode_mlp.variant_options(self.decode_kernel)
        tiles = {k: v for k, v in tiles.items() if k in ("block_n", "block_k")}
        return (x.ndim == 3 and x.shape[1] == 1
                and cfg.mlp_activation == "silu"
                and decode_mlp.supports(cfg.d_model, cfg.d_ff, **tiles)
                and (mesh.empty or all(n == 1 for n in mesh.shape.values())))  # fmt: skip
