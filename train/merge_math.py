"""The formulas of `python -m flaxlm.train.merge`, one tensor at a time, in float32.

Each function takes float32 arrays of one parameter tensor (one per model) and returns the
merged tensor in float32; train/merge.py reads the tensors, casts the result back to the
parameter dtype and writes the run. Every formula works on a tensor alone, so that the merge
never needs more than one group of tensors of each model at once.

    mean              Σ_i w_i θ_i, the weights normalised to sum to 1 (model soups, Wortsman
                      et al. 2022; checkpoint averaging, LAWA, Sanyal et al. 2023)
    task arithmetic   θ_base + λ Σ_t w_t (θ_t − θ_base)                 (Ilharco et al. 2023)
    TIES              θ_base + λ τ_m, τ_m from the task vectors τ_t = θ_t − θ_base by trim,
                      elect sign, disjoint mean (Yadav et al. 2023; `ties` below)
    SLERP             spherical interpolation of two models' flattened tensors (`slerp`)

TIES here trims and takes the majority sign per tensor (as mergekit does); the paper's
reference code (prateeksha10/ties-merging) flattens each whole task vector into one row, so its
top-k% threshold and its majority sign are over all the parameters at once, which would need a
whole task vector of each input in memory. Its trim also keeps ⌊k·n⌋ + 1 entries (the
(n − ⌊k·n⌋)-th smallest magnitude and above); here ⌊k·n⌋, at least 1 (`trim_count`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# SLERP falls back to linear interpolation where the two tensors' directions are this close to
# colinear (|cos Ω| above it: Ω within 1.8° of 0 or 180°), where sin Ω → 0 makes the
# spherical weights ill-conditioned, or where either tensor is all zeros (no direction).
# The value mergekit uses (DOT_THRESHOLD).
SLERP_COLINEAR = 0.9995


def trim_count(n: int, density: float) -> int:
    """How many entries TIES keeps of a tensor of `n` (its `density` share): ⌊density·n⌋,
    at least 1 (a product like 0.29·100 = 28.999… counts as 29)."""
    return max(1, min(n, math.floor(density * n + 1e-6)))


@jax.jit
def _trim(tau, threshold):
    return jnp.where(jnp.abs(tau) >= threshold, tau, 0.0)


def trim(tau, density: float):
    """TIES step 1 (trim): `tau` with all but its top-`density` entries by magnitude set to 0.
    The threshold is the m-th largest |τ| (m = `trim_count`); entries tied with it are kept,
    as the paper's reference code does (`|τ| >= the k-th value`)."""
    if density >= 1.0:
        return tau
    m = trim_count(tau.size, density)
    threshold = jnp.sort(jnp.abs(tau).ravel())[tau.size - m]
    return _trim(tau, threshold)


@jax.jit
def _elect_and_merge(trimmed, scale, base):
    """TIES steps 2 and 3 over trimmed task vectors stacked on axis 0."""
    # Elect: the sign of each entry's total mass Σ_t τ̂_t (the paper's γ = sgn(Σ_t τ̂_t)); an
    # entry whose sum is exactly 0 takes the tensor's majority sign (the reference code's
    # resolve_zero_signs "majority": the sign of Σ γ over the tensor).
    sign = jnp.sign(jnp.sum(trimmed, axis=0))
    sign = jnp.where(sign == 0, jnp.sign(jnp.sum(sign)), sign)
    # Disjoint merge: the mean over the tasks whose trimmed value agrees with the elected sign
    # (trimmed-away zeros agree with neither); 0 where none does.
    agree = jnp.where(sign > 0, trimmed > 0, trimmed < 0)
    count = jnp.sum(agree, axis=0)
    total = jnp.sum(jnp.where(agree, trimmed, 0.0), axis=0)
    return base + scale * (total / jnp.maximum(count, 1))


def ties(base, taus, density: float, scale: float):
    """TIES-merging of one tensor: `base` (float32) plus `scale` (λ) times the merged task
    vector of the task vectors `taus` (τ_t = θ_t − θ_base, float32), each trimmed to its
    top-`density` entries by magnitude (per tensor), signs elected by total mass, and the
    agreeing values averaged (Yadav et al. 2023, Algorithm 1)."""
    return _elect_and_merge(jnp.stack([trim(t, density) for t in taus]), scale, base)


@jax.jit
def _slerp(t, a, b):
    norm_a, norm_b = jnp.sqrt(jnp.sum(a * a)), jnp.sqrt(jnp.sum(b * b))
    cos = jnp.clip(jnp.sum(a * b) / jnp.maximum(norm_a * norm_b, 1e-30), -1.0, 1.0)
    linear = (jnp.abs(cos) > SLERP_COLINEAR) | (norm_a == 0) | (norm_b == 0)
    omega = jnp.arccos(jnp.where(linear, 0.0, cos))
    sin = jnp.where(linear, 1.0, jnp.sin(omega))
    sa = jnp.where(linear, 1.0 - t, jnp.sin((1.0 - t) * omega) / sin)
    sb = jnp.where(linear, t, jnp.sin(t * omega) / sin)
    return sa * a + sb * b, linear


def slerp(t: float, a, b):
    """(merged, linear) of one tensor of two models: the spherical interpolation (Shoemake
    1985) between the flattened float32 tensors `a` (t=0) and `b` (t=1),

        sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b,   cos Ω = a·b / (|a| |b|),

    applied to the tensors as they are (their norms interpolate along with the direction, as
    mergekit does); `linear` (a bool array) where it fell back to (1−t)·a + t·b: |cos Ω| >
    SLERP_COLINEAR, or a zero tensor. t=0 gives a and t=1 gives b exactly."""
    return _slerp(jnp.float32(t), a, b)
