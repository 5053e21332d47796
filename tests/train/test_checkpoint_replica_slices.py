"""train/checkpoint.py `MIN_REPLICA_SLICE_BYTES`: a replicated array is saved replica-parallel
(each replica writes a slice, orbax cutting it with `jax.lax.slice_in_dim`) only when each
replica's slice would hold at least that many bytes; smaller arrays are written whole by one
replica, with no per-replica slicing. Both restore bit for bit."""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from flaxlm.train import checkpoint as ckpt_lib


def test_only_arrays_with_big_replica_slices_are_split_across_replicas(tmp_path, monkeypatch):
    mesh = jax.make_mesh((8,), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    big_rows = 8 * ckpt_lib.MIN_REPLICA_SLICE_BYTES // (4 * 64)  # 8 slices of exactly the minimum
    arrays = {
        "big": np.arange(big_rows * 64, dtype=np.float32).reshape(big_rows, 64),
        "small": np.arange(7 * 64, dtype=np.float32).reshape(7 * 8, 8),
        "step": np.asarray(3, np.int32),
    }
    state = {k: jax.device_put(v, replicated) for k, v in arrays.items()}
    sliced = []  # the shapes orbax cut replica slices from
    real = jax.lax.slice_in_dim
    monkeypatch.setattr(jax.lax, "slice_in_dim",
                        lambda x, *a, **k: sliced.append(x.shape) or real(x, *a, **k))  # fmt: skip
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, state)
    ckpt.wait()
    assert sliced == [(big_rows, 64)] * 8  # the big array split over the 8 replicas; no other
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          state)  # fmt: skip
    restored, _, _ = ckpt.restore(1, target)
    for k in state:
        np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]))
    ckpt.close()
