"""The formulas of `python -m flaxlm.train.merge`, one tensor at a time, in float32.

Each function takes float32 arrays of one parameter tensor (one per model) and returns the
merged tensor in float32; train/merge.py reads the tensors, casts the result back to the
parameter dtype and writes the run. Every formula works on a tensor alone, so that the merge
never needs more than one group of tensors of each model at once; the two statistics that TIES
takes over a whole task vector (`--ties_scope global`) are gathered a tensor at a time in
passes of their own (`KthMagnitude`, `sign_mass`) and handed back in as scalars.

    mean              Σ_i w_i θ_i, the weights normalised to sum to 1 (model soups, Wortsman
                      et al. 2022; checkpoint averaging, LAWA, Sanyal et al. 2023)
    task arithmetic   θ_base + λ Σ_t w_t (θ_t − θ_base)                 (Ilharco et al. 2023)
    TIES              θ_base + λ τ_m, τ_m from the task vectors τ_t = θ_t − θ_base by trim,
                      elect sign, disjoint mean (Yadav et al. 2023; `ties` below)
    DARE              each τ_t's entries dropped with probability 1 − p, the kept ones scaled
                      by 1/p (Yu et al. 2024; `dare`), then summed as task arithmetic
                      (dare_linear) or elected and merged as TIES without its trim (dare_ties)
    SLERP             spherical interpolation of two models' flattened tensors (`slerp`)

TIES by default trims and takes the majority sign per tensor (as mergekit does); the paper's
reference code (prateeksha10/ties-merging) flattens each whole task vector into one row, so its
top-k% threshold and its majority sign are over all the parameters at once: `--ties_scope
global` computes both exactly, without a whole task vector in memory (`KthMagnitude`,
`sign_mass`). Its trim also keeps ⌊k·n⌋ + 1 entries (the (n − ⌊k·n⌋)-th smallest magnitude and
above); here ⌊k·n⌋, at least 1 (`trim_count`), in both scopes.

DARE's drop mask is drawn by JAX, not numpy, so that it is drawn where the tensor lives (each
device its shard, under a mesh) rather than on the host: `jax.random.bernoulli` with a
threefry2x32 key made of (seed, the input's index, crc32 of the tensor's path) (`dare_key`),
under `jax.threefry_partitionable(True)` whatever the process's setting (the flag changes the
bits drawn). A tensor's mask is thus a function of those three alone: not of the `--chunk_mb`
grouping, the mesh or the order the tensors are read in; and dare_linear and dare_ties with one
seed drop the same entries. It may change with JAX's threefry implementation (not with numpy's).
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np

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


def trim_at(tau, threshold: float | None):
    """TIES' trim at a threshold found over the whole task vector (`KthMagnitude`): the
    entries with |τ| >= `threshold` kept; None (density 1) keeps them all."""
    return tau if threshold is None else _trim(tau, jnp.float32(threshold))


# --- the exact k-th largest magnitude over a whole task vector, a tensor at a time -------------
# A float32 >= 0 orders as its bit pattern read as an unsigned integer (NaN above +inf, as a sort
# puts it), so the m-th largest |τ| is found digit by digit of that pattern (radix selection):
# a first pass counts the |τ| by their top 16 bits and finds the bin that holds the m-th largest
# (and its rank within the bin), a second counts the low 16 bits of the entries in that bin
# alone. Two histograms of 2^16 counts per input, whatever the model's size; exact: the value is
# one of the |τ| themselves, found by counting, no rounding anywhere.
RADIX_BITS = 16
BINS = 1 << RADIX_BITS


def _magnitude_bits(tau):
    return jax.lax.bitcast_convert_type(jnp.abs(tau).astype(jnp.float32), jnp.uint32).ravel()


@jax.jit
def _high_counts(tau):
    return jnp.bincount((_magnitude_bits(tau) >> RADIX_BITS).astype(jnp.int32), length=BINS)


@jax.jit
def _low_counts(tau, high):
    bits = _magnitude_bits(tau)
    # the entries of other high bins go to an extra bin, dropped
    low = jnp.where(bits >> RADIX_BITS == high, bits & (BINS - 1), BINS).astype(jnp.int32)
    return jnp.bincount(low, length=BINS + 1)[:BINS]


def select_bin(counts: np.ndarray, rank: int) -> tuple[int, int]:
    """(the bin holding the `rank`-th largest (1 = the largest) of the values counted in
    `counts`, that value's rank among the bin's own values)."""
    from_top = np.cumsum(counts[::-1])
    j = int(np.searchsorted(from_top, rank))  # the first bin from the top reaching `rank`
    if j == len(counts):
        raise ValueError(f"rank {rank} of {int(from_top[-1])} values")
    above = int(from_top[j] - counts[::-1][j])
    return len(counts) - 1 - j, rank - above


class KthMagnitude:
    """The exact `m`-th largest |x| over a stream of float32 tensors read twice (radix
    selection on the bit patterns, above): `add` each tensor of the stream, `end_pass`, then
    the same tensors again (in any order and grouping) and `end_pass`; `value` is then the
    float32 threshold that keeps at least m entries (all of those tied with it)."""

    PASSES = 2

    def __init__(self, m: int):
        self.rank, self.high, self.value = m, None, None
        self.counts = np.zeros(BINS, np.int64)  # (int32 per tensor, int64 over the model)

    def add(self, tau) -> None:
        got = _high_counts(tau) if self.high is None else _low_counts(tau, jnp.uint32(self.high))
        self.counts += np.asarray(jax.device_get(got), np.int64)

    def end_pass(self) -> None:
        found, self.rank = select_bin(self.counts, self.rank)
        self.counts = np.zeros(BINS, np.int64)
        if self.high is None:
            self.high = found
        else:
            bits = np.array([(self.high << RADIX_BITS) | found], np.uint32)
            self.value = float(bits.view(np.float32)[0])


# --- TIES' sign election and disjoint merge -----------------------------------------------------
@jax.jit
def _elect(trimmed):
    """γ = sgn(Σ_t τ̂_t) per entry (the paper's elected sign, before zeros are resolved)."""
    return jnp.sign(jnp.sum(trimmed, axis=0))


@jax.jit
def _sign_mass(trimmed):
    # counted in int32 (exact), not summed in float32 (inexact past 2^24 entries)
    return jnp.sum(_elect(trimmed).astype(jnp.int32))


def sign_mass(trimmed) -> int:
    """Σ γ over the entries of one tensor's trimmed task vectors (stacked on axis 0): the
    majority sign an entry whose Σ_t τ̂_t is exactly 0 takes is the sign of this, summed over
    the tensor (`--ties_scope tensor`) or over every tensor (global)."""
    return int(_sign_mass(trimmed))


@jax.jit
def _disjoint_mean(trimmed, majority):
    """TIES steps 2 and 3 over trimmed task vectors stacked on axis 0: the merged τ_m."""
    # Elect: the sign of each entry's total mass Σ_t τ̂_t (the paper's γ = sgn(Σ_t τ̂_t)); an
    # entry whose sum is exactly 0 takes the majority sign (the reference code's
    # resolve_zero_signs "majority": the sign of Σ γ, over the tensor or the whole vector).
    sign = _elect(trimmed)
    sign = jnp.where(sign == 0, majority, sign)
    # Disjoint merge: the mean over the tasks whose trimmed value agrees with the elected sign
    # (trimmed-away zeros agree with neither); 0 where none does.
    agree = jnp.where(sign > 0, trimmed > 0, trimmed < 0)
    count = jnp.sum(agree, axis=0)
    total = jnp.sum(jnp.where(agree, trimmed, 0.0), axis=0)
    return total / jnp.maximum(count, 1)


def elect_and_merge(base, trimmed: list, scale: float, majority: int | None = None):
    """TIES steps 2 and 3: `base` plus `scale` times the disjoint mean of the `trimmed` task
    vectors (trimmed by TIES, or DARE's dropped and rescaled ones) under the elected signs;
    `majority`: the sign of the whole vector's Σ γ (None: this tensor's, `sign_mass`)."""
    trimmed = jnp.stack(trimmed)
    if majority is None:
        majority = sign_mass(trimmed)
    merged = _disjoint_mean(trimmed, jnp.float32(np.sign(majority)))
    # θ_base + λ·τ_m op by op, outside the jit: within one fusion XLA's CPU code makes it a
    # fused multiply-add for some shapes and shardings and not others (a mesh gave other bits
    # than one device); apart, each op rounds to float32 on every backend, as merge.py's sums.
    return base + scale * merged


def ties(base, taus, density: float, scale: float):
    """TIES-merging of one tensor: `base` (float32) plus `scale` (λ) times the merged task
    vector of the task vectors `taus` (τ_t = θ_t − θ_base, float32), each trimmed to its
    top-`density` entries by magnitude (per tensor), signs elected by total mass, and the
    agreeing values averaged (Yadav et al. 2023, Algorithm 1)."""
    return elect_and_merge(base, [trim(t, density) for t in taus], scale)


# --- DARE ---------------------------------------------------------------------------------------
def dare_key(seed: int, index: int, path: tuple[str, ...]):
    """The key of input `index`'s mask of the tensor at `path` (module docstring): a threefry
    key (whatever jax_default_prng_impl says) of `seed`, folded with the index and crc32 of
    the path "a/b/kernel" (a collision, ~n²/2^33 over n tensors, only repeats a mask)."""
    key = jax.random.key(seed, impl="threefry2x32")
    key = jax.random.fold_in(key, index)
    return jax.random.fold_in(key, np.uint32(zlib.crc32("/".join(path).encode())))


@jax.jit
def _dare(tau, key, density, rescale):
    keep = jax.random.bernoulli(key, density, tau.shape)
    return jnp.where(keep, tau * rescale, 0.0)


def dare(tau, key, density: float):
    """DARE (drop and rescale) of one task vector tensor: each entry kept with probability
    `density` (p), independently, and the kept ones scaled by 1/p (times float32(1/p)), so
    that E[result] = τ; density 1 gives `tau` itself."""
    # Kept entries are τ · float32(1/p), not τ / p: compiled for a mesh's shards, this division
    # (fused with the draw) came out 1 ulp off one device's in ~1 % of entries on XLA's CPU
    # backend; a multiplication by a given float32 rounds the same way everywhere.
    with jax.threefry_partitionable(True):  # (the mask's bits depend on this flag: pin it)
        return _dare(tau, key, jnp.float32(density), jnp.float32(1.0 / density))


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
