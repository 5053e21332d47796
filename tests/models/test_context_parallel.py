"""Context parallelism (models/sharding.py's `context` axis): the sequence split over devices
gives the loss and gradients of one device — packed documents, sliding windows, a mixture of
experts — and splits the activations' memory; the keys and values are what is gathered."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flaxlm.models import attention
from flaxlm.models.config import get_variant
from flaxlm.models.sharding import logical_axis_rules, make_mesh, use_mesh
from flaxlm.train.pretrain import lm_loss, model_fns


def _unbox(tree):
    return jax.tree.map(lambda x: getattr(x, "value", x), tree,
                        is_leaf=lambda x: hasattr(x, "value"))  # fmt: skip


def _batch(cfg, B, T, packed: bool):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1),
             "loss_mask": np.ones((B, T), np.float32)}  # fmt: skip
    if packed:  # three documents per row, the last one padding-terminated
        seg = np.ones((B, T), np.int32)
        seg[:, T // 3 :] = 2
        seg[:, 2 * T // 3 :] = 3
        seg[0, -5:] = 0
        pos = np.concatenate([np.arange(n) for n in np.bincount(seg[1])[1:]])
        batch["segment_ids"] = seg
        batch["positions"] = np.broadcast_to(pos, (B, T)).astype(np.int32).copy()
        batch["positions"][0, -5:] = 0
        batch["loss_mask"] = (seg != 0).astype(np.float32)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _loss_and_grads(cfg, params, batch, mesh=None, preset="fsdp"):
    loss_cfg = ml_collections.ConfigDict({"z_loss": 1e-4, "moe_aux": 0.01, "moe_z": 0.001})
    loss_fn = lm_loss(model_fns(cfg)[1], loss_cfg, moe=cfg.n_experts > 0)
    fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, None)[0]))
    if mesh is None:
        return fn(params)
    with use_mesh(mesh, logical_axis_rules(preset)):
        return fn(params)


@pytest.mark.parametrize(
    "overrides, packed, shape, preset",
    [
        # attention_impl="cudnn" would fail on this CPU: a split sequence takes XLA's
        ({"attention_impl": "cudnn"}, False, {"data": 2, "context": 2, "tensor": 2}, "fsdp_tp"),
        # packed documents, a window and experts, the sequence over 4 devices
        ({"sliding_window": 6, "n_experts": 4, "d_expert": 32}, True,
         {"data": 2, "context": 4}, "fsdp"),
    ],
)  # fmt: skip
def test_split_sequence_gives_one_devices_loss_and_grads(overrides, packed, shape, preset,
                                                         monkeypatch):  # fmt: skip
    # blocks of 4 query rows: each device's 16 (context 2) or 8 (context 4) rows in 4 or 2
    monkeypatch.setattr(attention, "ATTENTION_CHUNK", 4)
    cfg = get_variant("tiny", **overrides)
    one_device = cfg.replace(attention_impl="xla")
    params = _unbox(model_fns(one_device)[0](jax.random.PRNGKey(0)))
    batch = _batch(cfg, B=4, T=32, packed=packed)
    want_loss, want_grads = _loss_and_grads(one_device, params, batch)
    loss, grads = _loss_and_grads(cfg, params, batch, make_mesh(shape), preset)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=2e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("packed", [False, True])
def test_flash_over_a_row_the_devices_do_not_divide(packed):
    """30 tokens over 4 devices with attention_impl="flash": the loss and gradients of one
    device (the queries padded to 32 inside `context_flash_attention`, then cut)."""
    cfg = get_variant("tiny", attention_impl="flash", flash_block=8, sliding_window=9)
    one_device = cfg.replace(attention_impl="xla")
    params = _unbox(model_fns(one_device)[0](jax.random.PRNGKey(0)))
    batch = _batch(cfg, B=2, T=30, packed=packed)
    want_loss, want_grads = _loss_and_grads(one_device, params, batch)
    loss, grads = _loss_and_grads(cfg, params, batch, make_mesh({"data": 2, "context": 4}))
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=2e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


def _compiled(cfg, params, batch, mesh):
    loss_cfg = ml_collections.ConfigDict({"z_loss": 0.0})
    loss_fn = lm_loss(model_fns(cfg)[1], loss_cfg)
    fn = jax.jit(jax.grad(lambda p: loss_fn(p, batch, None)[0]))
    with use_mesh(mesh, logical_axis_rules("fsdp")):
        return fn.lower(params).compile()


def test_activation_memory_splits_and_only_keys_and_values_are_gathered():
    """One long row (2048 tokens): split over 8 devices, each device's temporaries (the
    activations and scores of its 256 queries) are a fraction of one device's; the program
    gathers keys and values, never the (T, V) logits or the residual stream."""
    cfg = get_variant("tiny", vocab_size=512, max_seq_len=2048, n_layers=2)
    params = _unbox(model_fns(cfg)[0](jax.random.PRNGKey(0)))
    batch = _batch(cfg, B=1, T=2048, packed=False)
    one = _compiled(cfg, params, batch, make_mesh({"data": 1}, devices=jax.devices()[:1]))
    split = _compiled(cfg, params, batch, make_mesh({"context": 8}))
    t_one = one.memory_analysis().temp_size_in_bytes
    t_split = split.memory_analysis().temp_size_in_bytes
    assert t_split < 0.25 * t_one, (t_split, t_one)
    hlo = split.as_text()
    gathers = [line for line in hlo.splitlines() if " all-gather(" in line]
    shapes = {line.split("=")[1].split("all-gather")[0].strip() for line in gathers}
    # keys/values: f32[1,2048,2,16] (K = 2 heads of 16); never (2048, 512) logits or
    # (2048, 64) activations
    assert shapes and all("[1,2048,2,16]" in s for s in shapes), shapes
    assert not any("512]" in s or "2048,64]" in s for s in shapes), shapes


def test_a_sequence_split_over_processes_is_refused():
    """Each process loads its own rows: devices sharing rows (context × tensor) must sit in
    one process. Checked on a mesh of stand-in devices of two processes."""
    from jax.sharding import Mesh

    from flaxlm.models.sharding import MESH_AXES, _check_rows_per_process

    class Device:
        def __init__(self, i):
            self.id, self.process_index, self.platform = i, i // 4, "cpu"

    devices = np.asarray([Device(i) for i in range(8)], dtype=object)
    with pytest.raises(ValueError, match=r"span processes \[0, 1\].*context × tensor"):
        _check_rows_per_process(Mesh(devices.reshape(1, 1, 8, 1), MESH_AXES))
    _check_rows_per_process(Mesh(devices.reshape(2, 1, 2, 2), MESH_AXES))  # 4 per process


def test_flash_keeps_its_memory_when_the_devices_do_not_divide_the_row():
    """2046 tokens over 4 devices take the blockwise kernel's temporaries, as 2048 do (they
    fell back to XLA's whole (T × S) scores: ~10× as much)."""
    cfg = get_variant("tiny", vocab_size=512, max_seq_len=2048, n_layers=2,
                      attention_impl="flash", flash_block=128)  # fmt: skip
    params = _unbox(model_fns(cfg)[0](jax.random.PRNGKey(0)))
    mesh = make_mesh({"context": 4}, devices=jax.devices()[:4])
    temp = {T: _compiled(cfg, params, _batch(cfg, B=1, T=T, packed=False), mesh)
            .memory_analysis().temp_size_in_bytes for T in (2046, 2048)}  # fmt: skip
    xla = _compiled(cfg.replace(attention_impl="xla"), params,
                    _batch(cfg, B=1, T=2046, packed=False), mesh)  # fmt: skip
    assert temp[2046] < 1.2 * temp[2048], temp
    assert temp[2046] < 0.3 * xla.memory_analysis().temp_size_in_bytes, temp
