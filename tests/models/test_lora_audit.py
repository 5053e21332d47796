"""LoRA against independent references written here (numpy float64 merges, the chain rule
through the merged kernel, a single-device unrolled run), for what tests/models/test_lora.py
leaves implicit:

* the adapted linear map is x·W + (alpha/r)·(x·a)·b for q (D, N, H), o (N, H, D — its two input
  dims flattened row-major) and MLP (D, F) / (F, D) kernels: the model under `lora_apply`, and
  with scanned layers, computes the logits of the base model whose kernels are the float64
  merges;
* fresh adapters: b = 0 (merged weights are the base bit for bit), a ~ N(0, 1/d_in) with a key
  of its own per kernel and per scanned layer, boxed with no mesh axis (replicated);
* gradients: exactly zero for frozen base params; the adapters' equal (alpha/r)·Gᵀ-chain-rule
  products of the plain model's gradient G at the merged kernel; `train_extra` params get G;
* the optimizer holds state only for what trains and gives frozen params a zero update even
  with weight decay;
* a LoRA run's checkpoint reads back merged (load_model, on one device or a fsdp_tp mesh with
  the training shardings; load_lm_params; load_scalar_params) and exports to HF merged;
* under a data×fsdp×tensor mesh with scanned layers, loss and gradients equal the single-device
  unrolled ones;
* bad `lora` settings (alpha, regexes, a train_extra that matches nothing) are errors naming
  the key.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flaxlm.models import lora as L
from flaxlm.models.config import get_variant
from flaxlm.models.transformer import stack_layers, unstack_layers
from flaxlm.train.losses import lm_loss_fn
from flaxlm.train.optim import make_optimizer, opt_config
from flaxlm.train.pretrain import model_fns
from flaxlm.train.state import TrainState, new_guard, unbox
from flaxlm.train.step import guard_config, train_step

# One layer keeps compiles short; test_fresh_adapters... stacks three for the scanned draws.
CFG = get_variant("tiny", vocab_size=512, n_layers=1)  # D=64, N=4, K=2, H=16, F=128
D, N, K, H, F = 64, 4, 2, 16, 128
SPEC = L.LoraSpec(
    rank=4, alpha=8.0, targets="attn/(q|v|o)|mlp/(up|down)", train_extra="^final_norm/"
)


def _random(abstract, seed, scale=0.05):
    """Numpy values for a tree of shapes (a jitted init would cost seconds of compiling)."""
    rng = np.random.default_rng(seed)

    def value(path, s):
        if path[-1].key == "scale":
            return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(s.dtype)
        return (scale * rng.standard_normal(s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(value, abstract)


@functools.cache
def _setup():
    init, apply = model_fns(CFG)
    base = _random(unbox(jax.eval_shape(init, jax.random.PRNGKey(0))), 0)
    lora = _random(L.abstract_adapters(base, SPEC), 1, scale=0.2)  # b != 0: merges matter
    return {"base": base, "lora": lora}, apply


def _np_merge(params, spec):
    """The base tree with each adapted kernel replaced by its float64 merge, written per kernel
    shape from the definition (not with lora.delta): W[i.., o..] + s·Σ_r a[i, r]·b[r, o]."""
    s = spec.alpha / spec.rank
    out = jax.tree.map(lambda x: np.asarray(x, np.float64), params["base"])
    for layer, mods in params["lora"].items():
        for group, kernels in mods.items():
            for name, ab in kernels.items():
                a = np.asarray(ab["kernel"]["a"], np.float64)
                b = np.asarray(ab["kernel"]["b"], np.float64)
                w = out[layer][group][name]["kernel"]
                if name == "o":  # (N, H, D): x[n, h] is input n·H + h
                    d = np.einsum("nhr,rd->nhd", a.reshape(N, H, -1), b)
                elif w.ndim == 3:  # q / k / v (D, heads, H): output j·H + h
                    d = np.einsum("dr,rjh->djh", a, b.reshape(b.shape[0], w.shape[1], H))
                else:  # MLP (in, out)
                    d = np.einsum("ir,ro->io", a, b)
                out[layer][group][name]["kernel"] = w + s * d
    return out


def _f32(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def _batch(seed=3, B=4, T=16):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[1, 11:] = 0  # a right-padded row
    return {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, 1),
        "loss_mask": (seg > 0).astype(np.float32),
        "segment_ids": seg,
        "positions": np.where(seg > 0, np.arange(T), 0).astype(np.int32),
    }


# --- the forward -------------------------------------------------------------------------------


def test_adapted_linear_maps_and_logits_match_the_float64_merge():
    params, apply = _setup()
    ref = _np_merge(params, SPEC)
    merged = L.merge(params, SPEC)
    x = np.random.default_rng(4).standard_normal((3, D))
    layer, lo = params["base"]["layers_0"], params["lora"]["layers_0"]
    s = SPEC.alpha / SPEC.rank
    # x·W + s·(x·a)·b for each kernel shape, in float64, against the merged float32 kernel.
    q = lo["attn"]["q"]["kernel"]
    want = np.einsum("bd,dnh->bnh", x, np.asarray(layer["attn"]["q"]["kernel"], np.float64))
    want += s * ((x @ np.asarray(q["a"], np.float64)) @ np.asarray(q["b"], np.float64)).reshape(
        3, N, H
    )
    got = np.einsum("bd,dnh->bnh", x, merged["layers_0"]["attn"]["q"]["kernel"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    xo = np.random.default_rng(5).standard_normal((3, N, H))  # attention output: (N, H) in
    o = lo["attn"]["o"]["kernel"]
    want = np.einsum("bnh,nhd->bd", xo, np.asarray(layer["attn"]["o"]["kernel"], np.float64))
    want += s * (xo.reshape(3, N * H) @ np.asarray(o["a"], np.float64)) @ np.asarray(o["b"])
    got = np.einsum("bnh,nhd->bd", xo, merged["layers_0"]["attn"]["o"]["kernel"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for path, w in jax.tree_util.tree_flatten_with_path(merged)[0]:
        np.testing.assert_allclose(w, _get(ref, path), rtol=1e-6, atol=1e-7)
    # Untargeted kernels (k, gate, lm_head) and non-kernels are the base, unchanged.
    np.testing.assert_array_equal(merged["layers_0"]["attn"]["k"]["kernel"],
                                  params["base"]["layers_0"]["attn"]["k"]["kernel"])  # fmt: skip

    # The model under lora_apply = the plain model on the float64 merge (cast to float32), and
    # so does the scanned model on stacked params and adapters.
    b = _batch()
    _, apply_s = model_fns(CFG.replace(scan_layers=True))
    stacked = {k: stack_layers(v, CFG.n_layers) for k, v in params.items()}
    assert stacked["lora"]["layers"]["attn"]["o"]["kernel"]["a"].shape == (1, N * H, 4)
    fwd = jax.jit(
        lambda p, ps, r, t, pos, sg: (
            L.lora_apply(apply, SPEC)(p, t, pos, sg),
            L.lora_apply(apply_s, SPEC)(ps, t, pos, sg),
            apply(r, t, pos, sg),
            apply(p["base"], t, pos, sg),
        )
    )
    adapted, scanned, want, base = fwd(params, stacked, _f32(ref), b["tokens"], b["positions"],
                                       b["segment_ids"])  # fmt: skip
    np.testing.assert_allclose(adapted, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scanned, want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(want) - np.asarray(base)).max() > 1e-2  # the adapters matter


def _get(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_fresh_adapters_start_at_the_base_model():
    params, _ = _setup()
    base = params["base"]
    # One compile each (eagerly, every op of every kernel shape would compile on its own).
    init = jax.jit(L.init_adapters, static_argnums=(2, 3))
    fresh = init(jax.random.PRNGKey(7), base, SPEC, False)
    merged = jax.jit(L.merge, static_argnums=1)({"base": base, "lora": fresh}, SPEC)
    jax.tree.map(np.testing.assert_array_equal, merged, base)  # b = 0: bit for bit
    a_all = []
    for path, x in jax.tree_util.tree_flatten_with_path(fresh)[0]:
        x = np.asarray(x)
        if path[-1].key == "b":
            assert not x.any()
            continue
        assert x.dtype == np.float32 and x.shape[-1] == SPEC.rank
        z = x * math.sqrt(x.shape[-2])  # a · sqrt(d_in) ~ N(0, 1)
        assert abs(z.mean()) < 0.2 and abs(z.std() - 1) < 0.2, (path, z.mean(), z.std())
        a_all.append(x.ravel()[:32])
    # Every kernel draws its own a (no two share a key).
    assert len({tuple(np.round(v, 6)) for v in a_all}) == len(a_all) == 5  # q v o up down
    # Scanned (3 layers): one (L, d_in, r) draw whose layers differ; boxed with no mesh axis.
    stacked = stack_layers({**base, "layers_1": base["layers_0"], "layers_2": base["layers_0"]}, 3)
    fresh_s = init(jax.random.PRNGKey(7), stacked, SPEC, True)
    box = fresh_s["layers"]["attn"]["q"]["kernel"]["a"]
    assert box.names == (None, None, None) and box.value.shape == (3, D, 4)
    assert not np.allclose(box.value[0], box.value[1])
    assert not np.allclose(box.value[1], box.value[2])
    # The scale is alpha / rank: doubling alpha doubles the update.
    twice = L.LoraSpec(rank=4, alpha=16.0, targets=SPEC.targets)
    ab = params["lora"]["layers_0"]["mlp"]["up"]["kernel"]
    d1, d2 = (L.delta("layers_0/mlp/up/kernel", (D, F), ab, s) for s in (SPEC, twice))
    np.testing.assert_allclose(d2, 2 * d1, rtol=1e-6)
    np.testing.assert_allclose(d1, 2.0 * np.asarray(ab["a"]) @ np.asarray(ab["b"]), rtol=1e-5)
    assert SPEC.scale == 2.0


# --- gradients and the optimizer ---------------------------------------------------------------


@functools.cache
def _grads():
    """(LoRA-tree gradients, the plain model's gradients at the merged weights), unrolled, on
    one device."""
    params, apply = _setup()
    b = _batch()
    lora_loss = lm_loss_fn(L.lora_apply(apply, SPEC))
    plain_loss = lm_loss_fn(apply)
    g = jax.jit(jax.grad(lambda p: lora_loss(p, b, None)[0]))(params)
    G = jax.jit(jax.grad(lambda p: plain_loss(p, b, None)[0]))(_f32(_np_merge(params, SPEC)))
    return jax.device_get(g), jax.device_get(G)


def test_gradients_frozen_zero_adapters_by_the_chain_rule():
    params, _ = _setup()
    g, G = _grads()
    s = SPEC.alpha / SPEC.rank
    for path, x in jax.tree_util.tree_flatten_with_path(g["base"])[0]:
        if path[0].key == "final_norm":  # train_extra: the plain gradient
            np.testing.assert_allclose(x, _get(G, path), rtol=1e-4, atol=1e-7)
            assert np.abs(x).max() > 0
        else:
            assert not np.asarray(x).any(), jax.tree_util.keystr(path)  # exactly zero
    # dL/da = s·G·bᵀ and dL/db = s·aᵀ·G, with G the merged kernel's gradient flattened to
    # (prod(in), prod(out)).
    for layer, mods in params["lora"].items():
        for group, kernels in mods.items():
            for name, ab in kernels.items():
                a = np.asarray(ab["kernel"]["a"], np.float64)
                b = np.asarray(ab["kernel"]["b"], np.float64)
                Gk = np.asarray(G[layer][group][name]["kernel"], np.float64).reshape(len(a), -1)
                got = g["lora"][layer][group][name]["kernel"]
                scale = np.abs(Gk).max() * s
                np.testing.assert_allclose(got["a"], s * Gk @ b.T, atol=1e-4 * scale)
                np.testing.assert_allclose(got["b"], s * a.T @ Gk, atol=1e-4 * scale)


def test_optimizer_state_and_updates_only_for_what_trains():
    params, _ = _setup()
    g, _ = _grads()
    oc = ml_collections.ConfigDict(opt_config())
    oc.warmup_steps, oc.weight_decay, oc.lr = 0, 0.1, 1e-2
    tx, _ = make_optimizer(oc, 10, lambda p: L.trainable_mask(p, SPEC))
    state = jax.jit(tx.init)(params)
    n = lambda t: sum(math.prod(np.shape(x)) for x in jax.tree.leaves(t))  # noqa: E731
    n_train = n(params["lora"]) + n(params["base"]["final_norm"])
    assert 0 <= n(state) - 2 * n_train < 8  # Adam's mu and nu of trainable params + counters
    updates, _ = jax.jit(tx.update)(g, state, params)
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        trains = path[0].key == "lora" or path[1].key == "final_norm"
        # Frozen params get exactly zero, weight decay included (their gradient is 0 too, but
        # decay alone would move them).
        assert bool(np.asarray(u).any()) == trains, jax.tree_util.keystr(path)


def test_gradient_accumulation_keeps_no_buffer_for_frozen_params():
    """grad_accum > 1 accumulates the trainable leaves only: the same step as accumulating every
    leaf (frozen ones exactly zero), without a float32 copy of the frozen base model in the
    compiled step's temporaries (a 7B LoRA run's ~28 GB)."""
    params, apply = _setup()
    mask = lambda p: L.trainable_mask(p, SPEC)  # noqa: E731
    tx, schedule = make_optimizer(ml_collections.ConfigDict(opt_config()), 10, mask)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(0),
        guard=new_guard(),
    )
    step = lambda m: jax.jit(  # noqa: E731
        functools.partial(
            train_step,
            loss_fn=lm_loss_fn(L.lora_apply(apply, SPEC)),
            tx=tx,
            schedule=schedule,
            guard=guard_config(),
            grad_accum=2,
            trainable_mask=m,
        )
    )
    b = _batch()
    ref, got = (step(m).lower(state, b).compile() for m in (None, mask))
    (s_ref, m_ref), (s_got, m_got) = ref(state, b), got(state, b)
    np.testing.assert_allclose(m_got["loss"], m_ref["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_got["grad_norm"], m_ref["grad_norm"], rtol=1e-5)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-8),
        s_got.params,
        s_ref.params,
    )
    temp = lambda f: f.memory_analysis().temp_size_in_bytes  # noqa: E731
    frozen = sum(
        4 * math.prod(np.shape(x))
        for x, t in zip(jax.tree.leaves(params), jax.tree.leaves(mask(params)))
        if not t
    )
    assert temp(ref) - temp(got) >= 0.9 * frozen, (temp(ref), temp(got), frozen)


# --- runs: checkpoints, export, the mesh -------------------------------------------------------


def test_lora_runs_load_and_export_merged(tmp_path):
    from flaxlm.alignment import common, rl_common
    from flaxlm.models import hf
    from flaxlm.models.heads import scalar_model_fns
    from flaxlm.models.sharding import logical_axis_rules, make_mesh
    from flaxlm.train.checkpoint import Checkpointer, load_model
    from flaxlm.train.state import param_shardings

    params, _ = _setup()
    ref = _f32(_np_merge(params, SPEC))
    meta = {"model_config": CFG.to_dict(), "lora": SPEC.to_dict(), "task": "sft"}
    ck = Checkpointer(str(tmp_path / "sft"), keep=1, async_save=False)
    ck.save(5, {"params": params}, {}, {**meta, "head": "lm"})
    ck.close()
    _, got, _ = load_model(str(tmp_path / "sft"))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), got, ref)
    # On a fsdp_tp mesh: the same values, in the training shardings.
    mesh, rules = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), logical_axis_rules("fsdp_tp")
    _, sharded, _ = load_model(str(tmp_path / "sft"), mesh=mesh, rules=rules)
    _, want_sh = param_shardings(model_fns(CFG)[0], jax.random.PRNGKey(0), mesh, rules)
    for x, sh, y in zip(jax.tree.leaves(sharded), jax.tree.leaves(want_sh), jax.tree.leaves(ref)):
        assert x.sharding.is_equivalent_to(sh, x.ndim)
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    # HF export writes the merged weights.
    hf.export_run(str(tmp_path / "sft"), str(tmp_path / "hf"))
    _, back = hf.load_pretrained(str(tmp_path / "hf"))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), back, ref)

    # A LoRA reward-model run: its backbone (init_from) and its full tree (PPO, win rate).
    init_s = scalar_model_fns(CFG)[0]
    abstract = unbox(jax.eval_shape(init_s, jax.random.PRNGKey(0)))
    rm_base = {"transformer": {k: v for k, v in params["base"].items() if k != "lm_head"},
               "head": _random(abstract["head"], 9)}  # fmt: skip
    rm_lora = {"transformer": params["lora"]}
    ck = Checkpointer(str(tmp_path / "rm"), keep=1, async_save=False)
    ck.save(5, {"params": {"base": rm_base, "lora": rm_lora}}, {}, {**meta, "head": "scalar"})
    ck.close()
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), abstract)
    rm = rl_common.load_scalar_params(str(tmp_path / "rm"), target)
    backbone = common.load_lm_params(str(tmp_path / "rm"), target["transformer"])
    want = {k: v for k, v in ref.items() if k != "lm_head"}
    for tree in (rm["transformer"], backbone):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), tree,
                     want)  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, rm["head"], rm_base["head"])


def test_sharded_scanned_lora_loss_and_grads_equal_one_device():
    from flaxlm.models.sharding import logical_axis_rules, make_mesh, shard_batch, use_mesh
    from flaxlm.train.state import param_shardings

    params, _ = _setup()
    g_ref, _ = _grads()
    cfg_s = CFG.replace(scan_layers=True)
    init_s, apply_s = model_fns(cfg_s)
    mesh, rules = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), logical_axis_rules("fsdp_tp")
    _, sh = param_shardings(L.with_lora(init_s, SPEC), jax.random.PRNGKey(0), mesh, rules)
    assert all(
        s.spec == jax.sharding.PartitionSpec(None, None, None) for s in jax.tree.leaves(sh["lora"])
    )  # fmt: skip  adapters: replicated
    assert (
        sh["base"]["layers"]["attn"]["q"]["kernel"].spec
        != sh["lora"]["layers"]["attn"]["q"]["kernel"]["a"].spec
    )
    stacked = {k: stack_layers(v, CFG.n_layers) for k, v in params.items()}
    placed = jax.tree.map(jax.device_put, stacked, sh)
    loss = lm_loss_fn(L.lora_apply(apply_s, SPEC))
    with use_mesh(mesh, rules):
        g = jax.jit(jax.grad(lambda p, b: loss(p, b, None)[0]), out_shardings=sh)(
            placed, shard_batch(_batch(), mesh)
        )
    g = jax.device_get(g)
    g = {k: unstack_layers(v, CFG.n_layers) for k, v in g.items()}
    for path, x in jax.tree_util.tree_flatten_with_path(g)[0]:
        want = _get(g_ref, path)
        np.testing.assert_allclose(x, want, rtol=1e-4, atol=1e-6 * (np.abs(want).max() + 1e-3))


# --- bad settings ------------------------------------------------------------------------------


def test_bad_lora_settings_are_errors_naming_the_key():
    c = L.lora_config(8)
    for key, value, message in (
        ("alpha", 0.0, "lora.alpha=0.0 must be > 0"),
        ("alpha", float("nan"), "lora.alpha=nan must be > 0"),
        ("targets", "attn/(q|v", r"lora.targets='attn/\(q\|v' is not a regular expression"),
        ("train_extra", "head[", r"lora.train_extra='head\[' is not a regular expression"),
    ):
        bad = ml_collections.ConfigDict(c.to_dict())
        bad[key] = value
        with pytest.raises(ValueError, match=message):
            L.spec_from_config(bad)
    assert L.spec_from_config(L.lora_config(0)) is None


def test_train_extra_must_match_a_base_param():
    params, _ = _setup()
    # A train_extra that matches nothing (a reward head spelt "^heads/") is an error, not a
    # silently frozen head.
    typo = L.LoraSpec(rank=4, train_extra="^heads/")
    with pytest.raises(ValueError, match=r"lora.train_extra='\^heads/' matches no base param"):
        L.trainable_mask(params, typo)
    # The reward config's train_extra selects the scalar head, and only it.
    from flaxlm.configs import reward as reward_config
    from flaxlm.models.heads import scalar_model_fns

    spec = L.spec_from_config(reward_config.get_config("lora=4").lora)
    abstract = unbox(jax.eval_shape(L.with_lora(scalar_model_fns(CFG)[0], spec),
                                    jax.random.PRNGKey(0)))  # fmt: skip
    mask = L.trainable_mask(abstract, spec)
    on = [jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_flatten_with_path(mask["base"])[0]
          if m]  # fmt: skip
    assert on == ["['head']['bias']", "['head']['kernel']"]
