"""Fingerprints of a checkpoint's arrays: damage to a step's files that still reads is caught.

A truncated or deleted file fails the restore, but a flipped bit inside an array's data
(a disk, a copy or a network fault) does not: TensorStore reads the bytes back without a
checksum, and training went on from a silently changed optimizer moment or weight. Each save
therefore records, in the step's meta item, a 32-bit fingerprint of every array of the state,
and every restore recomputes it over what was read and refuses the step when one differs,
naming the arrays; resuming then falls back to the previous step like over any other
unreadable one (train/checkpointer.py), and readers of one step fail naming it.

The fingerprint of an array is the sum, modulo 2**32, of each element's raw bits (as an
unsigned integer) times (2 * its flat index + 1). Integer sums are exact and do not depend on
the order of the additions, so it is the same on any mesh, any device count and any backend;
the odd weights make every single flipped bit change it (a flip of bit k of an element changes
the sum by 2**k times an odd number, never 0 modulo 2**32), and most larger damage too. It is
computed on the devices, one jitted program over all the arrays (one pass over each, no host
copy), the per-element index built from iotas of each axis, so sharded arrays are never gathered.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

META_KEY = "state_fingerprints"  # in a step's meta: {"version": 2, "arrays": {path: "dtype:hex"}}
VERSION = (
    2  # 1 (never released) keyed arrays by keystr, which differs between dicts and dataclasses
)


def _bits(x: jax.Array) -> jax.Array:
    """The raw bits of `x` as uint32 (8-byte elements as two uint32 along a new last axis)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return lax.bitcast_convert_type(x, width).astype(jnp.uint32)


def _fingerprint(x: jax.Array) -> jax.Array:
    bits = _bits(x)
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):  # row-major flat index, wrapping modulo 2**32
        index = index + lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * np.uint32(stride)
        stride = (stride * bits.shape[axis]) % 2**32
    return jnp.sum(bits * (index * np.uint32(2) + np.uint32(1)), dtype=jnp.uint32)


# One program over every array, not one per array: programs with collectives in flight side
# by side (the sums of arrays sharded over different device groups) deadlocked XLA's CPU
# runtime in a PPO save ("Termination timeout for all reduce ... only 1 of 2 arrived"). It
# compiles once per state structure (about a second for a tiny model on a CPU).
_fingerprint_all = jax.jit(lambda arrays: [_fingerprint(x) for x in arrays])


def _dtype_name(x) -> str:
    return str(x.dtype)


def _name(key) -> str:
    for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_name(path) -> str:
    """ "params/layers_0/attn/q/kernel": a leaf's path, the same whether its state is a
    TrainState (attributes) or a dict ({"params": ...}: HF and PEFT imports save one)."""
    return "/".join(_name(k) for k in path)


def _arrays(tree, prefix: str = "") -> dict[str, jax.Array]:
    """{path: array} of the array leaves of `tree` (None and abstract leaves are left out),
    paths after `prefix` ("params" for a state's params read on their own)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, (jax.Array, np.ndarray)):
            out["/".join(filter(None, (prefix, path_name(path))))] = leaf
    return out


def _hex(arrays: dict[str, jax.Array]) -> dict[str, str]:
    if not arrays:
        return {}
    sums = jax.device_get(_fingerprint_all(list(arrays.values())))
    return {k: f"{_dtype_name(x)}:{int(s):08x}" for (k, x), s in zip(arrays.items(), sums)}


def fingerprints(tree, prefix: str = "") -> dict[str, str]:
    """{path: "dtype:8 hex digits"} of every array of `tree`; paths are `path_name`s after
    `prefix` ("params" for a state's params read on their own)."""
    return _hex(_arrays(tree, prefix))


def record(state) -> dict:
    """What a save adds to its meta under META_KEY."""
    return {"version": VERSION, "arrays": fingerprints(state)}


def mismatches(saved_meta: dict | None, tree, prefix: str = "") -> list[str]:
    """The arrays of `tree` (a restored state, or a subtree read at `prefix`) whose fingerprint
    differs from the one its save recorded. Arrays the save did not record (a checkpoint written
    before fingerprints, a leaf the restore created) and arrays read into another dtype than
    the saved one (a cast changes the bits) are not compared."""
    saved = (saved_meta or {}).get(META_KEY)
    if not isinstance(saved, dict) or saved.get("version") != VERSION:
        return []
    recorded = saved.get("arrays") or {}
    arrays = {k: x for k, x in _arrays(tree, prefix).items()
              if isinstance(recorded.get(k), str)
              and recorded[k].rsplit(":", 1)[0] == _dtype_name(x)}  # fmt: skip
    return [k for k, got in _hex(arrays).items() if got != recorded[k]]


def describe(step_dir: str, bad: list[str]) -> str:
    """The error text for a step whose arrays `bad` read back other than saved."""
    shown = ", ".join(bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
    return (
        f"checkpoint {step_dir}: {len(bad)} array(s) read back differ from what was saved "
        f"(their fingerprints in the step's meta do not match): {shown}. The files were "
        "changed after the save (a disk, copy or network fault); the step cannot be trusted"
    )
