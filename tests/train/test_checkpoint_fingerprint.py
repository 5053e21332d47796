"""The array fingerprints checkpoints record (train/checkpoint_fingerprint.py): every single
flipped bit changes one, in every dtype a state holds; they do not depend on the mesh an array
is sharded over; and they equal an independent numpy computation of the documented formula."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flaxlm.train import checkpoint_fingerprint as fp


def _numpy_fingerprint(x: np.ndarray) -> int:
    """sum(bits * (2 * flat index + 1)) mod 2**32, over the raw bytes read as unsigned ints."""
    width = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize]
    bits = np.ascontiguousarray(x).view(width).reshape(-1).astype(np.uint64)
    index = np.arange(bits.size, dtype=np.uint64)
    return int(np.sum(bits * (2 * index + 1)) % 2**32)


def _hex(x) -> int:
    return int(fp.fingerprints({"x": x})["x"].split(":")[1], 16)


@pytest.mark.parametrize(
    "dtype", [np.float32, ml_dtypes.bfloat16, np.int8, np.uint32, np.int32, np.float16]
)
def test_equals_the_formula_and_every_single_bit_flip_changes_it(dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 5)) * 100).astype(dtype)
    base = _hex(jnp.asarray(x))
    assert base == _numpy_fingerprint(x)
    raw = x.reshape(-1).view(np.uint8).copy()
    for byte in range(raw.size):
        for bit in range(8):
            flipped = raw.copy()
            flipped[byte] ^= 1 << bit
            assert _hex(jnp.asarray(flipped.view(dtype).reshape(x.shape))) != base, (byte, bit)


def test_bool_and_prng_key_leaves_are_fingerprinted():
    key = jax.random.key(3)
    out = fp.fingerprints({"k": key, "b": jnp.array([True, False])})
    assert set(out) == {"k", "b"}
    assert out["k"] != fp.fingerprints({"k": jax.random.key(4)})["k"]


def test_the_same_on_every_mesh():
    x = jnp.arange(8 * 12, dtype=jnp.float32).reshape(8, 12) / 7
    devices = np.array(jax.devices()[:8])
    one = fp.fingerprints({"x": jax.device_put(x, jax.devices()[0])})
    for shape, spec in [((8,), P("a")), ((4, 2), P("a", "b")), ((2, 4), P(None, "b"))]:
        mesh = jax.sharding.Mesh(devices.reshape(shape), ("a", "b")[: len(shape)])
        sharded = jax.device_put(x, NamedSharding(mesh, spec))
        assert fp.fingerprints({"x": sharded}) == one, spec


def test_mismatches_compares_only_recorded_arrays_of_the_saved_dtype():
    tree = {"a": jnp.ones((2, 3)), "b": jnp.zeros((4,), jnp.bfloat16)}
    meta = {fp.META_KEY: fp.record(tree)}
    assert fp.mismatches(meta, tree) == []
    changed = {"a": tree["a"].at[1, 2].set(2.0), "b": tree["b"]}
    assert fp.mismatches(meta, changed) == ["a"]
    cast = {"a": changed["a"].astype(jnp.bfloat16), "b": tree["b"]}  # read into another dtype
    assert fp.mismatches(meta, cast) == []
    assert fp.mismatches({}, changed) == [] and fp.mismatches(None, changed) == []
    # A subtree read on its own is keyed by the prefix its state gives it; a dataclass state
    # (TrainState) and a dict one ({"params": ...}, as HF imports save) name a leaf alike.
    assert fp.mismatches({fp.META_KEY: fp.record({"p": changed})}, tree, prefix="p") == ["p/a"]


def test_paths_are_the_same_for_a_dataclass_and_a_dict_state():
    """A TrainState names its fields as attributes, a dict state ({"params": ...}: HF and PEFT
    imports save one) as keys: keyed by jax's keystr, a reader looking for one never found the
    other, and an imported run's arrays were never checked."""
    from flaxlm.train.state import TrainState

    params = {"layers_0": {"q": {"kernel": jnp.arange(4.0).reshape(2, 2)}}}
    state = TrainState(step=jnp.int32(3), params=params, opt_state=(),
                       rng=jnp.zeros((2,), jnp.uint32), guard={})  # fmt: skip
    from_state = fp.fingerprints(state)
    from_dict = fp.fingerprints({"params": params})
    assert from_dict == {"params/layers_0/q/kernel": from_state["params/layers_0/q/kernel"]}
    assert fp.fingerprints(params, prefix="params") == from_dict
