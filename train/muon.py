"""Muon for the Transformer's hidden matrices (`opt.name = "muon"`; train/optim.py builds it).

Muon (Jordan et al. 2024, "Muon is Scalable for LLM Training", Liu et al. 2025) updates a
weight matrix W (fan_in × fan_out) with the orthogonalised momentum of its gradient:

    m_t = β·m_{t−1} + g_t                           momentum (β = opt.muon_momentum)
    d_t = g_t + β·m_t                               Nesterov's look-ahead
    O_t = NS(d_t) ≈ U·Vᵀ   (d_t = U·S·Vᵀ)           Newton–Schulz, `opt.muon_ns_steps` steps
    W  ← W − lr·(rms·√max(fan_in, fan_out)·O_t + λ·W)

The √max(fan_in, fan_out) · rms factor (Moonshot's "consistent RMS", rms = opt.muon_rms = 0.2)
gives the update the root-mean-square of a typical AdamW update, so the run's `opt.lr`,
schedule and weight decay λ carry over from AdamW. NS is the quintic iteration
X ← a·X + (b·A + c·A²)·X with A = X·Xᵀ and (a, b, c) = (3.4445, −4.7750, 2.0315), started from
d_t / ‖d_t‖_F; it drives every singular value into roughly [0.7, 1.2] in five steps (not
exactly 1: speed over precision, as in the references), in float32 — or bfloat16
(`opt.muon_dtype`), as Jordan's implementation runs it: bf16 matmuls and less memory traffic,
as orthogonal, within about 6% (Frobenius) of float32's result.

Which weights: the kernels inside the layers — attention q, k, v (D × heads·head_dim), o
(heads·head_dim × D), the MLP's gate, up, down — each its own matrix, per layer when layers
are stacked for scan (the layer axis is a batch axis), per expert in a mixture of experts
(models/moe.py; the expert axis is a batch axis too, the router is AdamW's). Everything else
— the embedding, the LM head, norm scales, biases, scalar heads, LoRA adapters — is updated by
AdamW with the same learning rate (`muon_labels`), as the references do.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

NS_COEFFS = (3.4445, -4.7750, 2.0315)

# How each layer kernel is read as a matrix: (reduction axes, output axes), counted after the
# scanned layer axis. q/k/v: (D, heads, head_dim) → D × (heads·head_dim); o: the reverse.
_MATRIX_AXES = {
    "q": ((0,), (1, 2)), "k": ((0,), (1, 2)), "v": ((0,), (1, 2)), "o": ((0, 1), (2,)),
    "gate": ((0,), (1,)), "up": ((0,), (1,)), "down": ((0,), (1,)),
}  # fmt: skip


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def matrix_axes(path, x) -> tuple | None:
    """(batch axes, reduction axes, output axes) of a leaf Muon updates, else None."""
    names = _names(path)
    if len(names) < 3 or names[-1] != "kernel" or names[-2] not in _MATRIX_AXES:
        return None
    layer = next((n for n in names if n == "layers" or n.startswith("layers_")), None)
    if layer is None:
        return None
    # scanned layers: a leading layer axis; a mixture of experts: then the expert axis, each
    # expert's kernel its own matrix
    lead = (layer == "layers") + ("experts" in names)
    red, out = _MATRIX_AXES[names[-2]]
    if lead + len(red) + len(out) != x.ndim:
        return None  # not the layout this table knows (a future layer kind): AdamW
    return (tuple(range(lead)), tuple(a + lead for a in red), tuple(a + lead for a in out))


def muon_labels(params):
    """ "muon" or "adam" per leaf."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: "muon" if matrix_axes(p, x) is not None else "adam", params
    )


def newton_schulz(G, steps: int = 5, eps: float = 1e-7, dtype=jnp.float32):
    """The quintic Newton–Schulz orthogonalisation of each (m, n) matrix in G (..., m, n), its
    iterations in `dtype` (the normalisation in float32)."""
    a, b, c = NS_COEFFS
    X = G.astype(jnp.float32)
    X = (X / (jnp.linalg.norm(X, axis=(-2, -1), keepdims=True) + eps)).astype(dtype)
    wide = X.shape[-2] > X.shape[-1]  # iterate on the smaller Gram matrix
    if wide:
        X = jnp.swapaxes(X, -2, -1)
    for _ in range(steps):
        A = X @ jnp.swapaxes(X, -2, -1)
        X = a * X + (b * A + c * A @ A) @ X
    X = X.astype(jnp.float32)
    return jnp.swapaxes(X, -2, -1) if wide else X


def as_matrices(x, axes):
    """(mats (n, fan_in, fan_out), back: mats -> x's layout): the leaf as its n matrices."""
    batch, red, out = axes
    perm = (*batch, *red, *out)
    moved = jnp.transpose(x, perm)
    fan_in = math.prod(x.shape[a] for a in red)
    fan_out = math.prod(x.shape[a] for a in out)
    mats = moved.reshape(-1, fan_in, fan_out)
    inverse = tuple(perm.index(i) for i in range(x.ndim))
    return mats, lambda m: jnp.transpose(m.reshape(moved.shape), inverse)


def orthogonalize_all(leaves: list, axes: list, steps: int, rms: float, dtype=jnp.float32):
    """Muon's update for each leaf: NS of its matrices, scaled to rms·√max(fan_in, fan_out),
    in the leaf's layout and dtype. Matrices of one shape — the same projection in every
    layer — run as one batched NS (a few kernels per iteration for all layers, not per layer;
    stacking them costs one copy)."""
    mats, backs = zip(*(as_matrices(x, a) for x, a in zip(leaves, axes))) if leaves else ((), ())
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault(m.shape[1:], []).append(i)
    out = [None] * len(leaves)
    for (fan_in, fan_out), idx in groups.items():
        stacked = jnp.concatenate([mats[i] for i in idx]) if len(idx) > 1 else mats[idx[0]]
        o = newton_schulz(stacked, steps, dtype=dtype) * (rms * math.sqrt(max(fan_in, fan_out)))
        start = 0
        for i in idx:
            n = mats[i].shape[0]
            out[i] = backs[i](o[start : start + n]).astype(leaves[i].dtype)
            start += n
    return out


class MuonState(NamedTuple):
    momentum: optax.Updates


def scale_by_muon(momentum: float = 0.95, steps: int = 5, rms: float = 0.2,
                  mu_dtype=None, ns_dtype=jnp.float32) -> optax.GradientTransformation:  # fmt: skip
    """Nesterov momentum, then `orthogonalize_all`, for leaves `matrix_axes` knows (the
    others — masked out by the caller's partition — pass through untouched)."""

    def init(params):
        return MuonState(jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype), params))

    def update(updates, state, params=None):
        del params
        mom = jax.tree.map(lambda m, g: (momentum * m + g).astype(m.dtype), state.momentum,
                           updates)  # fmt: skip

        flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
        directions = [g + momentum * m.astype(g.dtype)
                      for (_, g), m in zip(flat, jax.tree.leaves(mom))]  # fmt: skip
        axes = [matrix_axes(path, g) for path, g in flat]
        idx = [i for i, a in enumerate(axes) if a is not None]
        done = orthogonalize_all([directions[i] for i in idx], [axes[i] for i in idx], steps,
                                 rms, ns_dtype)  # fmt: skip
        for i, o in zip(idx, done):
            directions[i] = o
        return jax.tree_util.tree_unflatten(treedef, directions), MuonState(mom)

    return optax.GradientTransformation(init, update)
