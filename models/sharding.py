"""Device meshes and logical-axis sharding rules.

Every parameter and the main activations carry *logical* axis names (`embed`, `mlp`,
`act_batch`, ...). A preset turns those into mesh axes (`data`, `fsdp`, `context`, `tensor`),
so configs choose a parallelism strategy by name instead of pasting tables (t5x's rules-as-code
idea):

    dp       pure data parallelism: parameters replicated, batch split over data×fsdp
    fsdp     ZeRO-3 style: parameters split along `embed` over fsdp, batch over data×fsdp
    fsdp_tp  fsdp plus Megatron tensor parallelism of heads / mlp / vocab over `tensor`

Every preset splits the sequence (`act_len`) over the `context` axis (size 1 unless the mesh
asks for more): context parallelism for long sequences. Each device of a context group holds
T/C positions of every activation and gathers the keys and values of the whole sequence for
its queries' attention (models/attention.py `gather_sequence`); the weights are whole across
the group. The rows of a batch are not split over `context` (the batch divides data×fsdp).
Axis order is outermost to innermost — the last axes get the devices that talk fastest:
tensor (every matmul), then context (every attention layer's keys and values).

Logical names used by the model:
    parameters:  vocab, embed, q_heads, kv_heads, head_dim, mlp, norm, layers, expert, expert_mlp
    activations: act_batch, act_len, act_embed, act_heads, act_kv_heads, act_mlp, act_vocab,
                 act_expert
"""

from __future__ import annotations

import contextlib
import functools
import math
import zlib
from collections.abc import Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both

_COMMON = (
    ("act_batch", BATCH_AXES),
    ("act_len", "context"),  # context parallelism (size 1: nothing split)
    ("layers", None),
    ("head_dim", None),
    ("norm", None),
)

RULE_PRESETS: dict[str, tuple] = {
    "dp": _COMMON,
    "fsdp": _COMMON + (("embed", "fsdp"),),
    "fsdp_tp": _COMMON
    + (
        ("embed", "fsdp"),
        ("vocab", "tensor"),
        ("mlp", "tensor"),
        ("q_heads", "tensor"),
        ("kv_heads", "tensor"),
        ("act_heads", "tensor"),
        ("act_kv_heads", "tensor"),
        ("act_mlp", "tensor"),
        ("act_vocab", "tensor"),
        # experts split over tensor: each shard runs its experts on all its rows (models/moe.py)
        ("expert", "tensor"),
        ("act_expert", "tensor"),
    ),
}


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def unboxed(tree):
    """`tree` with every flax axis-metadata box (`nn.Partitioned`, `nn.LogicallyPartitioned`:
    the params `Transformer.init` returns) replaced by its value, no sharding constraint
    applied: code that walks params by path or reads `.dtype` sees the arrays."""
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if _is_box(x) else x, tree, is_leaf=_is_box
    )


def logical_axis_rules(preset: str) -> tuple:
    """The logical→mesh rule table for a named preset (dp | fsdp | fsdp_tp); a ValueError
    naming `config.sharding` for another (the trainer CLI's one line: it was a KeyError
    traceback naming no key)."""
    if preset not in RULE_PRESETS:
        raise ValueError(f"config.sharding={preset!r}: unknown sharding preset; known: "
                         f"{', '.join(sorted(RULE_PRESETS))}")  # fmt: skip
    return RULE_PRESETS[preset]


def unused_mesh_axes(mesh: Mesh, rules) -> list[str]:
    """The mesh axes of size > 1 that no rule of `rules` splits anything over: their devices
    repeat each other's work (mesh.tensor=2 under sharding=fsdp, whose rules leave `tensor`
    out, ran twice the devices for the same steps, silently)."""
    used = set()
    for _, axes in rules:
        used.update((axes,) if isinstance(axes, str) else (axes or ()))
    return [a for a, n in mesh.shape.items() if n > 1 and a not in used]


def resolve_mesh_shape(shape: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
    """Fills one -1 entry with the devices left over; checks the product equals n_devices."""
    unknown = [k for k in shape if k not in MESH_AXES]
    if unknown:
        raise KeyError(f"mesh: unknown axis {unknown}; axes are {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if any(s < 1 and s != -1 for s in sizes):
        raise ValueError(f"mesh {dict(shape)}: axis sizes must be >= 1, or -1 for the rest")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(shape)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"mesh {dict(shape)}: {n_devices} devices not divisible by {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(f"mesh {dict(shape)} needs {math.prod(sizes)} devices, have {n_devices}")
    return tuple(sizes)


def make_mesh(shape: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A (data, fsdp, context, tensor) mesh over all (or the given) devices, Auto axis types.
    jax.make_mesh puts the last axes on the devices closest together (one host's).

    Auto axes keep sharding decisions in the compiler (GSPMD) guided by our constraints; JAX's
    default for `jax.make_mesh` is Explicit sharding-in-types, which linen does not use.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape or {"data": -1}, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == jax.device_count():
        return jax.make_mesh(sizes, MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=auto)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a batch array: leading dim over data×fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's slice of the global batch into global sharded arrays.

    On one process this is a plain device_put; with several processes every process passes
    its own rows and the result is one global array (no process sees the others' data).
    """
    if jax.process_count() > 1:
        _check_rows_per_process(mesh)
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        sharding = batch_sharding(mesh, v.ndim) if v.ndim else replicated(mesh)
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


@functools.lru_cache(maxsize=8)
def _check_rows_per_process(mesh: Mesh) -> None:
    """Each process passes rows no other process has, so every group of devices that holds
    the same rows (the context × tensor devices at one data × fsdp index) must sit in one
    process: a ValueError naming the axes otherwise (two hosts splitting one sequence would
    each bring other rows for it)."""
    groups = np.asarray(mesh.devices).reshape(batch_divisor(mesh), -1)
    for group in groups:
        procs = {d.process_index for d in group}
        if len(procs) > 1:
            raise ValueError(
                f"mesh {dict(mesh.shape)}: the context × tensor devices that share rows span "
                f"processes {sorted(procs)}; each process loads its own rows, so context × "
                f"tensor must fit in one process's {jax.local_device_count()} devices"
            )


def global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """The WHOLE batch, which every process holds alike, as global sharded arrays (each device
    keeps its rows). `shard_batch`'s counterpart for a replicated host view, such as an RL
    rollout (alignment/rl_rollout.py): one process, the same arrays as `shard_batch` gives."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = jax.device_put(v, batch_sharding(mesh, v.ndim) if v.ndim else replicated(mesh))
    return out


def fetch(tree):
    """`jax.device_get` that also reads arrays split over several processes: each process gets
    the whole value (a gather over processes for those, so every process must call it at the
    same point, as it calls the jitted function that made them). One process: device_get."""

    def get(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return multihost_utils.process_allgather(x, tiled=True)
        return jax.device_get(x)

    return jax.tree.map(get, tree)


def local_rows(tree):
    """This process's rows of batch-sharded global arrays — the rows `shard_batch` placed from
    its host, in that order — as numpy; replicated arrays whole. One process: device_get."""

    def get(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        parts = {}
        for shard in x.addressable_shards:  # (replicas over other axes: one per row range)
            parts.setdefault(shard.index[0].start or 0, shard.data)
        return np.concatenate([np.asarray(parts[k]) for k in sorted(parts)])

    return jax.tree.map(get, tree)


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process (a collective: every process calls it); for a
    decision every process must take alike, such as whether to run a jitted call."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32))).any())


def same_batch_count(batches: list[dict], blank=None) -> list[dict]:
    """Every process's list of host batches made as long as the longest process's with empty
    batches (`blank()`, by default an all-zero copy of a batch: no tokens, no loss weight,
    `valid` 0): a jitted call on a global batch runs on every process, so each must make the
    same number of calls — held-out sets split over processes need not divide evenly. One
    process: as is."""
    if jax.process_count() == 1:
        return batches
    counts = np.asarray(multihost_utils.process_allgather(np.asarray([len(batches)], np.int32)))
    missing = int(counts.max()) - len(batches)
    if missing and blank is None:
        if not batches:
            raise ValueError(f"process {jax.process_index()} holds no held-out batch to pad with")
        blank = lambda: {k: np.zeros_like(v) for k, v in batches[0].items()}  # noqa: E731
    return batches + [blank() for _ in range(missing)]


def check_same_on_processes(what: str, *arrays) -> None:
    """Raises ValueError on every process if the host `arrays` differ between processes (a
    checksum each, gathered): for calls whose every process must pass the whole input alike.
    One process: nothing to check, no collective."""
    if jax.process_count() == 1:
        return
    digest = np.asarray([zlib.crc32(np.ascontiguousarray(a).tobytes()) for a in arrays], np.uint32)
    every = np.asarray(multihost_utils.process_allgather(digest))  # (processes, len(arrays))
    if not (every == every[:1]).all():
        differ = [i for i in range(len(every)) if not (every[i] == every[0]).all()]
        raise ValueError(
            f"{what}: processes {differ} passed other values than process 0; every process "
            "must pass the whole input, the same on all"
        )


def batch_divisor(mesh: Mesh) -> int:
    """The global batch must be a multiple of this (the data×fsdp device count)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def uneven_split(abstract, boxed, shardings, mesh: Mesh) -> str | None:
    """The first weight dimension the shardings split unevenly over the mesh, described
    ("parameter ['layers_0']['attn']['k']['kernel'] (64, 2, 16): its dim 1 ('kv_heads', size
    2) does not split over mesh axes tensor=4 = 4"), or None. `abstract`: the params (shapes
    suffice), `boxed`: the same tree with its logical names (nn.Partitioned), `shardings`:
    their NamedShardings. Every caller turns it into its own error with its own advice: jax's
    and orbax's errors name neither the weight nor the flag to change."""
    names = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )[0]
    for (path, box), leaf, sharding in zip(
        names, jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True
    ):
        logical = getattr(box, "names", (None,) * leaf.ndim)
        for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec, strict=False)):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            parts = math.prod(mesh.shape[a] for a in axes)
            if size % parts:
                return (
                    f"parameter {jax.tree_util.keystr(path)} {tuple(leaf.shape)}: its dim {dim} "
                    f"({logical[dim]!r}, size {size}) does not split over mesh axes "
                    f"{' × '.join(f'{a}={mesh.shape[a]}' for a in axes)} = {parts}"
                )
    return None


def check_batch_divides(batch_size: int, mesh: Mesh) -> None:
    """Raises unless ``batch_size`` (config.batch_size) splits over the mesh's data×fsdp
    devices, saying how to fix it: by default (``mesh.data=-1``) every visible device is a data
    device, so a config's small batch (configs/scaling.py's 4) fails on a host with more."""
    divisor = batch_divisor(mesh)
    if batch_size % divisor:
        shape = {k: v for k, v in mesh.shape.items() if v > 1} or {"data": 1}
        raise ValueError(
            f"batch_size={batch_size} is not a multiple of data×fsdp={divisor} (mesh {shape} "
            f"over {mesh.size} devices): set --config.batch_size to a multiple of {divisor}, "
            "split the devices otherwise (e.g. --config.mesh.tensor=2 --config.sharding=fsdp_tp: "
            "only fsdp_tp splits anything over tensor), or make fewer devices visible "
            "(CUDA_VISIBLE_DEVICES=0,1)"
        )


def logical_axes_unsplit(*names: str) -> bool:
    """Whether, in the ambient mesh and rules (`use_mesh`), no logical axis of `names` is split
    over a mesh axis of size > 1 (True outside a mesh). Lets model code pick a layout that
    would need communication if those axes were sharded."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return True
    axes = nn.logical_to_mesh_axes(tuple(names))
    mesh_axes = [a for x in axes if x for a in ((x,) if isinstance(x, str) else x)]
    return all(mesh.shape[a] == 1 for a in mesh_axes)


def logical_axis_size(name: str) -> int:
    """How many ways the ambient mesh and rules (`use_mesh`) split logical axis `name` (1
    outside a mesh): e.g. "act_len" -> the context axis's size."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    (axes,) = nn.logical_to_mesh_axes((name,))
    if not axes:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules):
    """Context in which model code is traced: the mesh plus the logical→mesh rules.

    `with_logical_constraint` inside the model reads both at trace time; outside this context
    the constraints are no-ops. (`jax.set_mesh` replaces the deprecated `with mesh:`.)
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
