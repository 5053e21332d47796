"""TrainState and its sharded initialisation.

The state is a plain pytree (params are unboxed arrays, easy to use in notebooks); shardings are
computed once from the parameters' logical axis names:

    eval_shape(init) → logical partition specs → mesh shardings → jit(init, out_shardings)

so parameters are created directly in their shards (a 7B model never materialises on one chip).
Optimizer-state leaves that mirror a parameter (Adam's mu/nu, ...) take that parameter's
sharding; other leaves (counters, Adafactor's factored rows/columns) are replicated.

A run with an EMA of the weights (`config.ema.decay` > 0, train/ema.py) holds an `EmaTrainState`:
the same fields plus the EMA (sharded like the params) and its update count. Without one the state
is the plain `TrainState`, so such a run's pytree, compiled step and checkpoints are unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flaxlm.models.sharding import uneven_split
from flaxlm.train import ema as ema_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken (including skipped ones)
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 base key; the step's key is fold_in(rng, step), so resume is exact
    guard: dict  # loss statistics and counters of the trouble guard (see train/step.py)


@flax.struct.dataclass
class EmaTrainState(TrainState):
    """A TrainState with an EMA of the weights (train/ema.py). A subclass, not an optional
    field: a `None` field would still change the saved tree, and no checkpoint written without
    an EMA would restore."""

    ema: Any  # float32 EMA of the trainable params; optax.MaskedNode() at frozen leaves
    ema_count: jax.Array  # int32 scalar: EMA updates made (the warmup counts these)


def with_ema(state: TrainState, ema, count=None) -> EmaTrainState:
    """`state` (a TrainState of arrays, shardings or shapes) with an EMA and its count."""
    count = jnp.zeros((), jnp.int32) if count is None else count
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(TrainState)}
    return EmaTrainState(**fields, ema=ema, ema_count=count)


def without_ema(state: TrainState) -> TrainState:
    """The plain TrainState of `state` (itself when it has no EMA)."""
    if not isinstance(state, EmaTrainState):
        return state
    return TrainState(**{f.name: getattr(state, f.name) for f in dataclasses.fields(TrainState)})


def unbox(tree):
    """Strips partitioning metadata boxes (no sharding constraint, unlike `nn.meta.unbox`,
    which would need a traced context)."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box
    )


def new_guard() -> dict:
    return {
        "loss_mean": jnp.zeros((), jnp.float32),  # EMA of accepted losses
        "loss_var": jnp.zeros((), jnp.float32),  # EMA of their squared deviation
        "n_accepted": jnp.zeros((), jnp.int32),
        "n_skipped": jnp.zeros((), jnp.int32),  # total skipped updates (NaN/Inf or spikes)
        "bad_in_row": jnp.zeros((), jnp.int32),  # current run of skipped updates
    }


def _path_key(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh: Mesh):
    """Shardings for optimizer state: a leaf mirroring a parameter shares its sharding."""
    by_path = {}
    for (path, p), s in zip(
        jax.tree_util.tree_flatten_with_path(abstract_params)[0],
        jax.tree.leaves(param_shardings),
    ):
        by_path[_path_key(path)] = (p.shape, s)
    longest = max((len(k) for k in by_path), default=0)

    def pick(path, leaf):
        key = _path_key(path)
        for n in range(min(longest, len(key)), 0, -1):
            hit = by_path.get(key[-n:])
            if hit is not None and hit[0] == getattr(leaf, "shape", None):
                return hit[1]
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def param_shardings(init_params: Callable, rng, mesh: Mesh, rules):
    """(abstract unboxed params, their NamedShardings) from a boxed init function."""
    boxed = jax.eval_shape(init_params, rng)
    specs = nn.get_partition_spec(boxed)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    _check_divisible(unbox(boxed), boxed, shardings, mesh)
    return unbox(boxed), shardings


def _check_divisible(abstract, boxed, shardings, mesh: Mesh) -> None:
    """Refuses, naming the parameter, a mesh that splits a weight dimension unevenly (e.g.
    mesh.tensor=4 over 2 kv heads): jax's own error names neither the weight nor the config."""
    what = uneven_split(abstract, boxed, shardings, mesh)
    if what:
        raise ValueError(f"{what}; change config.mesh or config.sharding (or the model size)")


def create_train_state(
    init_params: Callable,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules,
    seed: int,
    *,
    ema: bool = False,
    trainable_mask=None,
    loaded=None,
    transform: Callable | None = None,
) -> tuple[TrainState, TrainState]:
    """Initialises a sharded TrainState.

    Args:
      init_params: rng -> params pytree with logical partitioning metadata (a linen
        `model.init(...)["params"]`).
      tx: the optimizer.
      mesh, rules: device mesh and logical→mesh axis rules.
      seed: integer seed for the parameters and the state's base RNG.
      ema: make an EmaTrainState, its EMA starting at the initial params (of the leaves
        that `trainable_mask` trains; train/ema.py).
      loaded: weights read from another run (`init_from`, already sharded): the params are
        `transform(loaded, fresh)` (LoRA adapters, a new head: fresh leaves beside loaded
        ones), or `loaded` itself without a transform. Inside the one jitted init, so the
        fresh leaves the params do not keep are never computed (XLA drops them: no random
        init of weights that are replaced), the optimizer state is that of the params the
        run starts from, and the loaded buffers are donated (no second copy of the model).

    Returns: (state, state_shardings).
    """
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
    shardings = state_shardings(
        init_params, tx, mesh, rules, init_rng, ema=ema, trainable_mask=trainable_mask
    )

    def init(rng, loaded=None):
        params = unbox(init_params(rng))
        if loaded is not None:
            params = transform(loaded, params) if transform is not None else loaded
        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=state_rng,
            guard=new_guard(),
        )
        return with_ema(state, ema_lib.init(params, trainable_mask)) if ema else state

    with jax.set_mesh(mesh):
        if loaded is None:
            state = jax.jit(init, out_shardings=shardings)(init_rng)
        else:
            loaded = place_loaded(loaded, transform, shardings.params)
            state = jax.jit(init, out_shardings=shardings, donate_argnums=1)(init_rng, loaded)
    return state, shardings


def place_loaded(loaded, transform: Callable | None, param_shardings):
    """`loaded` with each leaf on the sharding its place in the params has (`transform` says
    which place: it is run on leaf indices). Host arrays (an HF checkpoint) become global
    arrays there — on several processes each passes the whole array — and arrays already so
    placed stay as they are."""
    leaves, treedef = jax.tree.flatten(loaded)
    marks = treedef.unflatten(list(range(len(leaves))))
    fresh = jax.tree.map(lambda _: -1, param_shardings)
    full = transform(marks, fresh) if transform is not None else marks
    where = {}
    for mark, sharding in zip(jax.tree.leaves(full), jax.tree.leaves(param_shardings)):
        if mark >= 0:
            where[mark] = sharding
    return treedef.unflatten([jax.device_put(x, where[i]) for i, x in enumerate(leaves)])


def state_shardings(init_params: Callable, tx, mesh: Mesh, rules, rng=None, *,
                    ema: bool = False, trainable_mask=None) -> TrainState:  # fmt: skip
    """The NamedSharding of every TrainState leaf (also used to restore checkpoints); with
    `ema`, of an EmaTrainState whose EMA leaves are sharded like their params."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    abstract_params, p_shard = param_shardings(init_params, rng, mesh, rules)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    rep = NamedSharding(mesh, P())
    out = TrainState(
        step=rep,
        params=p_shard,
        opt_state=opt_state_shardings(abstract_opt, abstract_params, p_shard, mesh),
        rng=rep,
        guard=jax.tree.map(lambda _: rep, new_guard()),
    )
    if not ema:
        return out
    return with_ema(out, ema_lib.like_params(p_shard, abstract_params, trainable_mask), rep)


def abstract_state(init_params: Callable, tx, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs with shardings for every TrainState leaf (a restore target); an
    EmaTrainState when `shardings` is one."""
    rng = jax.random.PRNGKey(0)

    def init(rng):
        params = unbox(init_params(rng))
        state = TrainState(
            jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0), new_guard()
        )
        if not isinstance(shardings, EmaTrainState):
            return state
        # The EMA's leaves are the ones `shardings.ema` has (the trainable ones).
        mask = jax.tree.map(lambda s: not ema_lib.frozen(s), shardings.ema,
                            is_leaf=ema_lib.frozen)  # fmt: skip
        return with_ema(state, ema_lib.init(params, mask))

    shapes = jax.eval_shape(init, rng)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
