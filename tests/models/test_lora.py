"""LoRA: only adapters train, optimizer state shrinks to them, merged weights give the same
logits, multi-dim and scanned kernels work."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flaxlm.models import lora as L
from flaxlm.models.config import get_variant
from flaxlm.train.losses import lm_loss_fn
from flaxlm.train.optim import make_optimizer, opt_config
from flaxlm.train.pretrain import model_fns
from flaxlm.train.state import TrainState, new_guard, unbox
from flaxlm.train.step import guard_config, train_step

CFG = get_variant("tiny")  # D=64, N=4, K=2, H=16, F=128, L=2
SPEC = L.LoraSpec(rank=4, alpha=8.0, targets="attn/(q|v|o)")


def np_init(abstract, seed):
    """Random values for a tree of shapes in numpy: compiling a jitted init costs ~10 s here."""
    rng = np.random.default_rng(seed)

    def value(path, s):
        if path[-1].key == "scale":
            return np.ones(s.shape, s.dtype)
        return (0.05 * rng.standard_normal(s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(value, abstract)


@functools.cache
def _lora_params(cfg=CFG, spec=SPEC, seed=0):
    """Base params and adapters with non-zero b (fresh b = 0 would make every check trivial)."""
    init, apply = model_fns(cfg)
    base = np_init(unbox(jax.eval_shape(init, jax.random.PRNGKey(0))), seed)
    return {"base": base, "lora": np_init(L.abstract_adapters(base, spec), seed + 1)}, apply


def _n_scalars(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_adapter_shapes_and_trainable_count():
    params, _ = _lora_params()
    D, N, K, H, r = 64, 4, 2, 16, SPEC.rank
    layer = params["lora"]["layers_0"]["attn"]
    assert layer["q"]["kernel"]["a"].shape == (D, r) and layer["q"]["kernel"]["b"].shape == (
        r,
        N * H,
    )
    assert layer["v"]["kernel"]["b"].shape == (r, K * H)
    assert layer["o"]["kernel"]["a"].shape == (N * H, r)  # (N, H, D): two input dims
    per_layer = (D * r + r * N * H) + (D * r + r * K * H) + (N * H * r + r * D)
    mask = L.trainable_mask(params, SPEC)
    assert L.count_params(params, mask) == L.count_params(params["lora"]) == 2 * per_layer
    assert not any(jax.tree.leaves(mask["base"]))
    with pytest.raises(ValueError, match="matches no kernel"):
        L.target_paths(params["base"], L.LoraSpec(rank=2, targets="attn/nothing"))


def test_merged_logits_equal_adapter_logits():
    params, apply = _lora_params()
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 9), 0, CFG.vocab_size)
    three = jax.jit(
        lambda p, t: (
            L.lora_apply(apply, SPEC)(p, t),
            apply(L.merge(p, SPEC), t),
            apply(p["base"], t),
        )
    )
    adapter, merged, base = three(params, tokens)
    np.testing.assert_allclose(merged, adapter, rtol=1e-5, atol=1e-5)
    assert not np.allclose(adapter, base, atol=1e-3)
    # Independently of `merge`: x·W_merged = x·W + (alpha/r)·(x·a)·b for the query kernel.
    x = jax.random.normal(jax.random.PRNGKey(6), (3, 64))
    w = params["base"]["layers_0"]["attn"]["q"]["kernel"]
    ab = params["lora"]["layers_0"]["attn"]["q"]["kernel"]
    w_merged = L.merge(params, SPEC)["layers_0"]["attn"]["q"]["kernel"]
    want = jnp.einsum("bd,dnh->bnh", x, w) + SPEC.scale * ((x @ ab["a"]) @ ab["b"]).reshape(
        3, 4, 16
    )
    np.testing.assert_allclose(jnp.einsum("bd,dnh->bnh", x, w_merged), want, rtol=1e-5, atol=1e-5)
    # Boxed params (as init returns them, e.g. in a notebook) merge the same adapters.
    import flax.linen as nn

    box = lambda t: jax.tree.map(lambda x: nn.Partitioned(x, (None,) * x.ndim), t)  # noqa: E731
    boxed = L.merge({"base": box(params["base"]), "lora": box(params["lora"])}, SPEC)
    jax.tree.map(np.testing.assert_array_equal, boxed, L.merge(params, SPEC))


def test_scanned_layers_merge_like_unrolled():
    params, apply = _lora_params()
    cfg_s = CFG.replace(scan_layers=True)
    from flaxlm.models.transformer import stack_layers

    stacked = {
        "base": stack_layers(params["base"], CFG.n_layers),
        "lora": stack_layers(params["lora"], CFG.n_layers),
    }
    assert stacked["lora"]["layers"]["attn"]["o"]["kernel"]["a"].shape == (2, 64, 4)
    _, apply_s = model_fns(cfg_s)
    tokens = jax.random.randint(jax.random.PRNGKey(7), (2, 9), 0, CFG.vocab_size)
    both = jax.jit(
        lambda a, b, t: (L.lora_apply(apply_s, SPEC)(a, t), L.lora_apply(apply, SPEC)(b, t))
    )
    np.testing.assert_allclose(
        *both(stacked, params, tokens),
        rtol=1e-5,
        atol=1e-5,
    )


def test_only_adapters_update_and_optimizer_state_shrinks():
    params, apply = _lora_params()
    ocfg = ml_collections.ConfigDict(opt_config())
    ocfg.warmup_steps, ocfg.weight_decay = 0, 0.1
    tx_full, schedule = make_optimizer(ocfg, 10)
    tx, _ = make_optimizer(ocfg, 10, lambda p: L.trainable_mask(p, SPEC))
    full_state = jax.eval_shape(tx_full.init, params["base"])
    lora_state = jax.jit(tx.init)(params)
    n_lora, n_base = L.count_params(params["lora"]), L.count_params(params["base"])
    # Adam keeps mu and nu for every trainable scalar (plus a few step counters).
    assert _n_scalars(full_state) - 2 * n_base < 10
    assert 0 <= _n_scalars(lora_state) - 2 * n_lora < 10
    assert _n_scalars(lora_state) < _n_scalars(full_state) / 10

    tokens = jax.random.randint(jax.random.PRNGKey(8), (4, 16), 0, CFG.vocab_size)
    batch = {
        "tokens": tokens,
        "targets": jnp.roll(tokens, -1, axis=1),
        "loss_mask": jnp.ones((4, 16), jnp.float32),
        "segment_ids": jnp.ones((4, 16), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(16), (4, 16)),
    }
    state = TrainState(jnp.zeros((), jnp.int32), params, lora_state, jax.random.PRNGKey(0),
                       new_guard())  # fmt: skip
    loss_fn = lm_loss_fn(L.lora_apply(apply, SPEC))
    new, metrics = jax.jit(
        lambda s, b: train_step(
            s, b, loss_fn=loss_fn, tx=tx, schedule=schedule, guard=guard_config()
        )  # fmt: skip
    )(state, batch)
    assert float(metrics["skipped"]) == 0
    for old, upd in zip(jax.tree.leaves(params["base"]), jax.tree.leaves(new.params["base"])):
        np.testing.assert_array_equal(old, upd)  # frozen (and not weight-decayed)
    moved = [
        not np.array_equal(o, u)
        for o, u in zip(jax.tree.leaves(params["lora"]), jax.tree.leaves(new.params["lora"]))
    ]
    assert all(moved)


def test_targets_are_logged_and_a_misspelt_member_is_warned_about(caplog):
    """A member of the targets regex that selects no kernel ("dwon", "out": the module is o)
    while the rest matches used to adapt fewer modules silently: warned, each by name, with
    the kinds adapted logged; a regex whose every member matches warns of nothing."""
    spec = L.LoraSpec(rank=4, alpha=8.0, targets="attn/(q|k|v|out)|mlp/(gate|up|dwon)")
    params, _ = _lora_params(spec=spec)
    L._report_targets.cache_clear()
    with caplog.at_level("INFO"):
        L.trainable_mask(params, spec)
        L.trainable_mask(params, spec)  # (asked again by the step and EMA: logged once)
    info = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert "LoRA rank 4 (alpha 8) on 10 kernels: attn/k, attn/q, attn/v, mlp/gate, mlp/up" in info
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2 and "'attn/out' selects no kernel" in warned[0], warned
    assert "'mlp/dwon' selects no kernel" in warned[1]
    assert len(info) == 1
    caplog.clear()
    with caplog.at_level("WARNING"):
        L.trainable_mask(*_lora_params()[:1], SPEC)  # attn/(q|v|o): every member matches
        L.trainable_mask(*_lora_params(spec=L.LoraSpec(4, 8.0, "^layers_0/|[ab|c]x"))[:1],
                         L.LoraSpec(4, 8.0, "^layers_0/|[ab|c]x"))  # fmt: skip
    assert [r.getMessage() for r in caplog.records] == [
        "lora.targets='^layers_0/|[ab|c]x': '[ab|c]x' selects no kernel (module paths look like "
        "'layers_0/attn/q', 'layers_0/mlp/down')"
    ]


def test_spec_from_config_and_train_extra():
    assert L.spec_from_config(L.lora_config(0)) is None
    c = L.lora_config(8)
    c.train_extra = "^final_norm/"
    spec = L.spec_from_config(c)
    assert spec.rank == 8 and spec.scale == 2.0
    params, _ = _lora_params(spec=spec)
    mask = L.trainable_mask(params, spec)
    assert mask["base"]["final_norm"]["scale"] and not mask["base"]["embed"]["embedding"]
