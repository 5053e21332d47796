"""Int8 weight-only quantization for decoding (`generate(..., quantize="int8")`).

A decode step at a small batch reads every weight once and does little arithmetic with it: its
time is the bytes it moves. Storing the matmul weights as int8 with one float scale per output
channel halves those bytes against bf16:

    scale[o] = max_i |W[i, o]| / 127          (i: the kernel's input axes, o: its outputs)
    Wq[i, o] = round(W[i, o] / scale[o])      in [-127, 127], int8
    W ≈ Wq · scale                            error ≤ scale / 2 per weight

The model dequantizes where it reads a kernel (models/layers.py `load_kernel`: an int8
kernel stored beside its "kernel_scale"), Wq.astype(bf16) · scale, and XLA fuses that into the
matmul: compiled for the H200 (bench/gpu_aot.py) the Triton gemm reads the int8 weight and
the scale directly, no bf16 copy. Quantized: the attention and MLP projections (fused or not,
the experts of a mixture too) and an untied LM head. Kept in float: the embedding table (a
gather, and the tied head), norms, biases, the MoE router (few bytes; its top-k is sensitive).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxlm.models.sharding import unboxed

# Input axes of each quantized kernel, by module name (after a scanned-layer or expert axis).
INPUT_AXES = {
    "q": (0,), "k": (0,), "v": (0,), "qkv": (0,), "o": (0, 1),
    "gate": (0,), "up": (0,), "down": (0,), "gate_up": (0,), "lm_head": (0,),
}  # fmt: skip
MODES = ("none", "int8")


def quantize_kernel(w, input_axes: tuple[int, ...]):
    """(int8 kernel, float32 scale with the input axes kept as size 1) of a float kernel."""
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=input_axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return q, scale


def dequantize(q, scale, dtype):
    return q.astype(dtype) * scale.astype(dtype)


def is_quantized(params) -> bool:
    """Whether `params` (arrays or their shapes; None: no) hold int8 kernels already, with
    their "kernel_scale" (`quantize_params` run beforehand: a server's weights, a rollout
    loop's): decoding then treats them as `quantize="int8"` where the choice depends on it
    (models/decode.py `resolve_decode_gemm`) and keeps each kernel's scale with it."""
    leaves = jax.tree_util.tree_leaves_with_path(unboxed(params))
    return any(getattr(path[-1], "key", None) == "kernel_scale" for path, _ in leaves)


def quantize_params(params, mode: str = "int8"):
    """The params with every kernel `INPUT_AXES` names replaced by (int8 "kernel",
    "kernel_scale"); layers unrolled or scanned (a leading layer axis), experts' kernels per
    expert. `mode` "none" returns them as they are."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}; expected one of {MODES}")
    if mode == "none":
        return params
    params = unboxed(params)  # (as `Transformer.init` returns them: boxed)

    def walk(node, path):
        if not isinstance(node, dict):
            return node
        name = path[-1] if path else ""
        kernel = node.get("kernel")
        if name in INPUT_AXES and kernel is not None and jnp.issubdtype(kernel.dtype, jnp.floating):
            lead = ("layers" in path) + ("experts" in path)
            axes = tuple(a + lead for a in INPUT_AXES[name])
            if lead + len(INPUT_AXES[name]) < kernel.ndim:  # it has output axes
                q, scale = quantize_kernel(kernel, axes)
                return {**node, "kernel": q, "kernel_scale": scale}
        return {k: walk(v, (*path, k)) for k, v in node.items()}

    return walk(params, ())
