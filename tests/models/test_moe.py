"""Mixture of experts (models/moe.py) against an independent per-token reference: routing,
renormalisation, the shared expert, capacity drops by choice rank, padding, the router
statistics; then the model around it — scanned layers, remat, meshes, KV-cache decoding, the
LM loss's router terms, LoRA and Muon over expert kernels, parameter and FLOP counts."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flaxlm.models import moe
from flaxlm.models.config import get_variant
from flaxlm.models.sharding import logical_axis_rules, logical_axis_size, make_mesh, use_mesh
from flaxlm.models.transformer import stack_layers
from flaxlm.train.pretrain import lm_loss, model_fns

BASE = dict(n_experts=4, n_experts_per_token=2, d_expert=24, init_std=0.2)


def _unbox(tree):
    return jax.tree.map(lambda x: getattr(x, "value", x), tree,
                        is_leaf=lambda x: hasattr(x, "value"))  # fmt: skip


# Inits and applies run jitted: one program each, where eagerly every op of a new shape is a
# program of its own to lower and compile (the suite runs on a few CPU cores).
def _layer_params(cfg, seed=0, B=3, T=10):
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (B, T, cfg.d_model))
    params = _unbox(jax.jit(moe.MoE(cfg).init)(jax.random.PRNGKey(seed), x)["params"])
    return params, np.asarray(x, np.float64)


def _silu(x):
    return x / (1 + np.exp(-x))


def _dense(x, gate, up, down):
    return (_silu(x @ gate) * (x @ up)) @ down


def reference(cfg, params, x, valid=None):
    """Per token, in float64: softmax router, top-k, (renormalised) weights, each chosen
    expert's MLP — with capacity drops replayed choice-major, row by row. Returns (y, stats)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    B, T, _ = x.shape
    E, k, C = cfg.n_experts, cfg.n_experts_per_token, moe.capacity(cfg, T)
    valid = np.ones((B, T), bool) if valid is None else valid
    logits = x @ p["router"]["kernel"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    choice = np.argsort(-probs, axis=-1, kind="stable")[..., :k]  # (B, T, k)
    w = np.take_along_axis(probs, choice, -1)
    if cfg.router_norm_topk:
        w = w / w.sum(-1, keepdims=True)
    ex = p["experts"]
    y = np.zeros_like(x)
    kept = 0
    counts = np.zeros(E)
    for b in range(B):
        load = np.zeros(E, int)
        for j in range(k):  # every token's first choice before any second one
            for t in range(T):
                if not valid[b, t]:
                    continue
                e = choice[b, t, j]
                counts[e] += 1
                if load[e] < C:
                    load[e] += 1
                    kept += 1
                    f = _dense(x[b, t], ex["gate"]["kernel"][e], ex["up"]["kernel"][e],
                               ex["down"]["kernel"][e])  # fmt: skip
                    y[b, t] += w[b, t, j] * f
    if cfg.d_shared_expert:
        s = p["shared"]
        shared = _dense(x, s["gate"]["kernel"], s["up"]["kernel"], s["down"]["kernel"])
        if cfg.shared_expert_gate:
            shared = shared / (1 + np.exp(-(x @ p["shared_gate"]["kernel"])))
        y += shared * valid[..., None]
    n = valid.sum()
    share = counts / (n * k)
    lse = np.log(np.exp(logits).sum(-1))
    stats = {"load_balance": E * np.sum(share * probs[valid].mean(0)),
             "router_z": np.mean(lse[valid] ** 2), "dropped": 1 - kept / (n * k),
             "max_load": E * share.max()}  # fmt: skip
    return y, stats


def _run_layer(cfg, params, x, valid=None, dispatch="auto"):
    def run(params, x, valid):
        out, state = moe.MoE(cfg, dispatch=dispatch).apply({"params": params}, x, valid,
                                                           mutable=[moe.COLLECTION])  # fmt: skip
        return out, moe.collect_stats(state[moe.COLLECTION])

    out, stats = jax.jit(run)(params, jnp.asarray(x, jnp.float32),
                              None if valid is None else jnp.asarray(valid))  # fmt: skip
    return np.asarray(out), stats


@pytest.mark.parametrize(
    "extra",
    [
        {},  # Mixtral / Qwen3-MoE: top-k renormalised
        {"router_norm_topk": False, "d_shared_expert": 40, "shared_expert_gate": True},  # Qwen2
        {"n_experts_per_token": 1, "mlp_activation": "silu", "d_shared_expert": 16},
    ],
)
def test_layer_matches_per_token_reference(extra):
    cfg = get_variant("tiny", **{**BASE, **extra})
    params, x = _layer_params(cfg)
    y, stats = _run_layer(cfg, params, x)
    want, want_stats = reference(cfg, params, x)
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
    assert float(stats["dropped"]) == 0.0  # capacity factor 0: nothing dropped
    for name, v in want_stats.items():
        np.testing.assert_allclose(float(stats[name]), v, rtol=1e-5, err_msg=name)
    assert want_stats["max_load"] > 1.05  # the init routes unevenly: a real check of the stats


def test_capacity_drops_lower_choices_first_and_padding_routes_nowhere():
    cfg = get_variant("tiny", **BASE, moe_capacity_factor=0.75)  # C = ceil(0.75·12·2/4) = 5
    params, x = _layer_params(cfg, seed=3, B=4, T=12)
    valid = np.ones((4, 12), bool)
    valid[1, 7:] = valid[3, 2:] = False  # padding: no assignment, no capacity, no statistic
    y, stats = _run_layer(cfg, params, x, valid)
    want, want_stats = reference(cfg, params, x, valid)
    assert moe.capacity(cfg, 12) == 5
    assert 0.05 < want_stats["dropped"] < 0.5  # this routing overflows some experts
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(y[1, 7:], 0.0)
    for name, v in want_stats.items():
        np.testing.assert_allclose(float(stats[name]), v, rtol=1e-5, err_msg=name)


def test_config_errors_and_counts():
    with pytest.raises(ValueError, match="n_experts_per_token=5"):
        get_variant("tiny", n_experts=4, n_experts_per_token=5)
    with pytest.raises(ValueError, match="set n_experts too"):
        get_variant("tiny", d_expert=8)
    with pytest.raises(ValueError, match="moe_capacity_factor"):
        get_variant("tiny", n_experts=4, moe_capacity_factor=-1.0)
    cfg = get_variant("tiny", **BASE, d_shared_expert=16, shared_expert_gate=True)
    params = jax.eval_shape(model_fns(cfg)[0], jax.random.PRNGKey(0))  # the shapes suffice
    n = sum(x.size for x in jax.tree.leaves(_unbox(params)))
    counts = cfg.param_counts()
    assert counts["total"] == n
    D, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    attn = 2 * D * cfg.n_heads * cfg.head_dim_ + 2 * D * cfg.n_kv_heads * cfg.head_dim_
    active = D * 4 + 2 * 3 * D * 24 + 3 * D * 16 + D  # router, k=2 experts, shared + gate
    assert counts["matmul"] == L * (attn + active) + V * D


def _model(cfg, B=2, T=12, seed=0):
    tokens = jax.random.randint(jax.random.PRNGKey(seed + 7), (B, T), 0, cfg.vocab_size)
    return _model_params(cfg, seed), model_fns(cfg)[1], tokens


@functools.cache  # (the KV-cache and fsdp_tp decoding tests init the same model)
def _model_params(cfg, seed):
    return _unbox(jax.jit(model_fns(cfg)[0])(jax.random.PRNGKey(seed)))


def test_scanned_and_rematerialised_layers_match_unrolled():
    cfg = get_variant("tiny", **BASE, moe_capacity_factor=1.0)
    params, apply, tokens = _model(cfg)
    want, want_stats = jax.jit(functools.partial(apply, moe_stats=True))(params, tokens)
    assert 0 < float(want_stats["dropped"]) < 1
    scan_cfg = cfg.replace(scan_layers=True, remat_policy="full")
    scanned = stack_layers(params, cfg.n_layers)
    got, stats = jax.jit(functools.partial(model_fns(scan_cfg)[1], moe_stats=True))(scanned, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for name in moe.STATS:
        np.testing.assert_allclose(float(stats[name]), float(want_stats[name]), rtol=1e-5)


def _loss_cfg(aux, z):
    return ml_collections.ConfigDict({"z_loss": 0.0, "moe_aux": aux, "moe_z": z})


def _loss_and_grads(cfg, params, batch, mesh=None, preset="fsdp_tp"):
    loss_fn = lm_loss(model_fns(cfg)[1], _loss_cfg(0.5, 0.01), moe=True)

    def run():
        return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, None), has_aux=True))(params)

    if mesh is None:
        return run()
    with use_mesh(mesh, logical_axis_rules(preset)):
        return run()


def test_router_losses_and_mesh_shapes_agree():
    cfg = get_variant("tiny", **{**BASE, "n_experts": 8}, moe_capacity_factor=1.5)
    params, _, tokens = _model(cfg, B=8, T=16)
    seg = np.ones((8, 16), np.int32)
    seg[3, 10:] = 0
    batch = {"tokens": tokens, "segment_ids": jnp.asarray(seg), "targets": jnp.roll(tokens, -1, 1),
             "loss_mask": jnp.asarray(seg, jnp.float32)}  # fmt: skip
    (loss, m), grads = _loss_and_grads(cfg, params, batch)
    want = m["nll"] + 0.5 * m["moe/load_balance"] + 0.01 * m["moe/router_z"]
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    assert float(m["moe/load_balance"]) > 1.0
    # the load-balance term reaches the router (its counts carry no gradient, its probs do)
    aux_only = lm_loss(model_fns(cfg)[1], _loss_cfg(1.0, 0.0), moe=True)

    def aux_part(p):
        loss, metrics = aux_only(p, batch, None)
        return loss - metrics["nll"]

    g_aux = jax.jit(jax.grad(aux_part))(params)
    last = f"layers_{cfg.n_layers - 1}"  # (earlier layers' experts feed later routers)
    assert float(jnp.abs(g_aux[last]["mlp"]["router"]["kernel"]).max()) > 1e-4
    assert float(jnp.abs(g_aux[last]["mlp"]["experts"]["up"]["kernel"]).max()) == 0.0
    # experts split over tensor (fsdp_tp's "expert" rule), rows over data × fsdp
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    (l2, m2), g2 = _loss_and_grads(cfg, params, batch, mesh, "fsdp_tp")
    np.testing.assert_allclose(float(l2), float(loss), rtol=1e-5)
    np.testing.assert_allclose(float(m2["moe/dropped"]), float(m["moe/dropped"]), atol=1e-6)
    assert float(m["moe/dropped"]) > 0
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


# The few-token dispatch (`few_token_dispatch`, `Experts.gathered`): enough experts that a few
# rows' assignments are fewer. FEW for layers; DECODE_FEW for decoding, also on a mesh whose
# tensor axis splits the experts in two (4 rows × 2 choices × 2 groups < 32).
FEW = dict(BASE, n_experts=8)
DECODE_FEW = dict(BASE, n_experts=32, d_shared_expert=16, shared_expert_gate=True)
PROMPTS = [[5, 9, 33, 2, 7], [11, 4]]


@pytest.mark.parametrize("n_experts", [4, 32])  # decode steps by capacity (4), by gather (32)
def test_kv_cache_greedy_equals_full_recompute(n_experts):
    from flaxlm.models.decode import generate

    cfg = get_variant("tiny", **{**DECODE_FEW, "n_experts": n_experts})
    # a step's 2 rows × 2 choices: fewer than 32 experts, not fewer than 4
    assert moe.few_token_dispatch(cfg, 2, 1) == (n_experts == 32)
    assert not moe.few_token_dispatch(cfg, 2, 8)  # the prefill's bucket: capacity
    params, apply, _ = _model(cfg)
    out = generate(cfg, params, PROMPTS, max_new_tokens=6, rng=jax.random.PRNGKey(0),
                   temperature=0.0)  # fmt: skip
    full = jax.jit(apply)  # one shape: causal, and no capacity to share (factor 0)
    for row, prompt in enumerate(PROMPTS):
        seq, n = list(prompt), len(prompt)
        for _ in range(6):
            logits = full(params, jnp.asarray([seq + [0] * (11 - len(seq))]))
            seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
        assert np.asarray(out.tokens[row]).tolist() == seq[n:]
        lp = jax.nn.log_softmax(full(params, jnp.asarray([seq + [0] * (12 - len(seq))]))[0], -1)
        want = [float(lp[n - 1 + i, t]) for i, t in enumerate(seq[n:])]
        np.testing.assert_allclose(np.asarray(out.logprobs[row]), want, atol=1e-5)


def test_decoding_is_dropless_whatever_the_capacity_factor():
    """A model trained with a capacity factor decodes without drops (`decode.decode_config`):
    `generate` gives the tokens and logprobs of the same model with factor 0, and greedy
    speculative decoding (prompt lookup) gives greedy `generate`'s. It used to run the
    factor: the prefill dropped by the capacity of the padded prompt bucket (a prompt's
    tokens depended on its batch mates' lengths) and verifying k + 1 tokens dropped what
    one-token steps keep, so the two greedy decodes differed."""
    from flaxlm.models.decode import generate
    from flaxlm.models.speculative import prompt_lookup_generate

    cfg0 = get_variant("tiny", **{**DECODE_FEW, "n_experts": 4})  # the test above's model
    cfg = cfg0.replace(moe_capacity_factor=0.5)
    # capacities: 2 per expert of the prefill's bucket of 8 (the 5-token prompt routes 10
    # assignments to 4 experts), 1 of a 4-token verification chunk: both forwards would drop
    assert moe.capacity(cfg, 8) * 4 < 10 and moe.capacity(cfg, 4) * 4 < 8
    params = _model_params(cfg0, 0)
    kw = dict(max_new_tokens=6, rng=jax.random.PRNGKey(0), temperature=0.0)
    want = generate(cfg0, params, PROMPTS, **kw)  # (the test above's program)
    got = generate(cfg, params, PROMPTS, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-6)
    spec = prompt_lookup_generate(cfg, params, PROMPTS, draft_tokens=3, **kw)
    np.testing.assert_array_equal(np.asarray(spec.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(spec.logprobs), np.asarray(want.logprobs), atol=1e-5)


@pytest.mark.parametrize(
    "extra, B, T",
    [
        ({}, 3, 1),  # renormalised top 2: a decode step of 3 rows, 6 assignments
        ({"router_norm_topk": False, "d_shared_expert": 40, "shared_expert_gate": True}, 3, 1),
        ({"n_experts": 16}, 2, 3),  # T = 3 without drops (factor 0): 12 assignments of 16
    ],
)
def test_few_token_dispatch_is_the_reference_and_the_capacity_path(extra, B, T):
    cfg = get_variant("tiny", **{**FEW, **extra})
    params, x = _layer_params(cfg, seed=2, B=B, T=T)
    assert moe.few_token_dispatch(cfg, B, T)
    y, stats = _run_layer(cfg, params, x)
    want, want_stats = reference(cfg, params, x)
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
    y_cap, stats_cap = _run_layer(cfg, params, x, dispatch="capacity")
    np.testing.assert_allclose(y, y_cap, rtol=1e-5, atol=1e-6)
    for name, v in want_stats.items():
        np.testing.assert_allclose(float(stats[name]), v, rtol=1e-5, err_msg=name)
        assert float(stats[name]) == float(stats_cap[name]), name  # the same `route`
    if T > 1:  # (the shape a gradient could reach, were a training call ever this small)
        _same_gradients(cfg, params, x)


def _same_gradients(cfg, params, x):
    """The gather is differentiable, with the capacity path's gradients (params and input)."""

    def grads(dispatch):
        def f(p, x):
            return jnp.sum(jnp.sin(moe.MoE(cfg, dispatch=dispatch).apply({"params": p}, x)))

        return jax.jit(jax.grad(f, argnums=(0, 1)))(params, jnp.asarray(x, jnp.float32))

    for a, b in zip(jax.tree.leaves(grads("gather")), jax.tree.leaves(grads("capacity")),
                    strict=True):  # fmt: skip
        # Float32 sums in another order (a gather against the capacity einsums): an element
        # that cancels to far below its leaf's scale keeps the leaf's absolute error, not its
        # own relative one (a fresh machine's XLA gave 4.6e-6 on 0.0301, 1.5e-4 relative).
        scale = float(np.max(np.abs(np.asarray(b))))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)


def test_few_token_dispatch_padding_and_when_it_applies():
    cfg = get_variant("tiny", **{**FEW, "n_experts": 16})
    params, x = _layer_params(cfg, seed=4, B=2, T=3)
    valid = np.ones((2, 3), bool)
    valid[1, 1:] = False  # padding: routed nowhere, counted in no statistic
    y, stats = _run_layer(cfg, params, x, valid)
    want, want_stats = reference(cfg, params, x, valid)
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(y[1, 1:], 0.0)
    for name, v in want_stats.items():
        np.testing.assert_allclose(float(stats[name]), v, rtol=1e-5, err_msg=name)
    # A·G < E, counting the ways the expert axis is split; never where capacity could drop
    assert moe.few_token_dispatch(cfg, 7, 1) and not moe.few_token_dispatch(cfg, 8, 1)
    assert moe.few_token_dispatch(cfg, 2, 1, groups=2)
    assert not moe.few_token_dispatch(cfg, 4, 1, groups=2)
    assert not moe.few_token_dispatch(cfg, 1, 1, groups=3)  # 16 experts do not split 3 ways
    drops = cfg.replace(moe_capacity_factor=1.0)  # C = ceil(3·2/16) = 1 < T = 3
    assert moe.few_token_dispatch(drops, 2, 1) and not moe.few_token_dispatch(drops, 2, 3)
    with pytest.raises(ValueError, match="needs capacity 1 = T = 3"):
        _run_layer(drops, params, x, dispatch="gather")


def test_few_token_dispatch_of_int8_experts_is_the_dequantized_model():
    """Int8 kernels gathered with their own experts' scales: the dequantized float layer's
    output, layer by layer and over a greedy decode (steps by gather: 2 rows × 2 of 8)."""
    from flaxlm.models import quant
    from flaxlm.models.decode import generate
    from tests.models.test_quant import _dequantized

    cfg = get_variant("tiny", **FEW, d_shared_expert=16)
    params, x = _layer_params(cfg, seed=6, B=3, T=1)
    q = jax.jit(quant.quantize_params)({"experts": params["experts"]})["experts"]
    assert q["up"]["kernel"].dtype == jnp.int8 and q["up"]["kernel_scale"].shape == (8, 1, 24)
    deq = {**params, "experts": jax.jit(_dequantized)(q)}
    y, _ = _run_layer(cfg, {**params, "experts": q}, x)
    np.testing.assert_allclose(y, _run_layer(cfg, deq, x, dispatch="capacity")[0], rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    assert np.abs(y - _run_layer(cfg, params, x)[0]).max() > 1e-4  # rounding shows

    params, apply, _ = _model(cfg.replace(init_std=0.05))
    deq = jax.jit(lambda p: _dequantized(quant.quantize_params(p)))(params)
    prompts = [[5, 9, 33, 2, 7], [11, 4]]
    out = generate(cfg, params, prompts, max_new_tokens=5, rng=jax.random.PRNGKey(0),
                   temperature=0.0, quantize="int8")  # fmt: skip
    full = jax.jit(apply)
    for row, prompt in enumerate(prompts):
        seq, n = list(prompt), len(prompt)
        for _ in range(5):
            logits = full(deq, jnp.asarray([seq + [0] * (10 - len(seq))]))
            seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
        assert np.asarray(out.tokens[row]).tolist() == seq[n:]
        lp = jax.nn.log_softmax(full(deq, jnp.asarray([seq + [0] * (11 - len(seq))]))[0], -1)
        want = [float(lp[n - 1 + i, t]) for i, t in enumerate(seq[n:])]
        np.testing.assert_allclose(np.asarray(out.logprobs[row]), want, atol=1e-4)


def test_few_token_dispatch_under_fsdp_tp_equals_one_device():
    """Experts split 2 ways over `tensor` (and their D over `fsdp`): each group gathers from
    its own shard, so no collective moves as much as one expert's kernel (the capacity path
    all-gathers them over fsdp; a plain gather all-reduces the gathered ones over tensor), and
    greedy decoding on the 2×2×2 mesh gives one device's tokens and logprobs."""
    import re

    import flax.linen as nn

    from flaxlm.models.decode import generate
    from flaxlm.models.transformer import Transformer

    mesh, rules = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), logical_axis_rules("fsdp_tp")

    def shard(params, init, *args):
        boxed = jax.eval_shape(init, jax.random.PRNGKey(0), *args)["params"]
        return jax.device_put(params, nn.logical_to_mesh_sharding(
            nn.get_partition_spec(boxed), mesh, rules))  # fmt: skip

    layer_cfg = get_variant("tiny", **{**FEW, "n_experts": 32})
    params, x = _layer_params(layer_cfg, B=4, T=1)
    x = jnp.asarray(x, jnp.float32)
    sharded = shard(params, moe.MoE(layer_cfg).init, x)
    assert sharded["experts"]["up"]["kernel"].sharding.spec == P("tensor", "fsdp", None)
    f = jax.jit(lambda p, x: moe.MoE(layer_cfg).apply({"params": p}, x))
    with use_mesh(mesh, rules):
        assert logical_axis_size("expert") == 2
        assert moe.few_token_dispatch(layer_cfg, 4, 1, groups=2)
        compiled = f.lower(sharded, x).compile()  # (run, and read, the one program)
        got, hlo = compiled(sharded, x), compiled.as_text()
    want = f(params, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    moved = [math.prod(int(d) for d in dims.split(",") if d)  # each collective's outputs
             for m in re.finditer(r"= (.*?) (all-gather|all-reduce|reduce-scatter|all-to-all|"
                                  r"collective-permute)\(", hlo)
             for dims in re.findall(r"\[([\d,]*)\]", m.group(1))]  # fmt: skip
    assert moved and max(moved) < layer_cfg.d_model * layer_cfg.d_expert_, moved

    cfg = get_variant("tiny", **DECODE_FEW)
    params, *_ = _model(cfg)
    init = lambda r: Transformer(cfg).init(r, jnp.zeros((1, 4), jnp.int32))  # noqa: E731
    kw = dict(max_new_tokens=6, rng=jax.random.PRNGKey(0), temperature=0.0)
    one = generate(cfg, params, PROMPTS, **kw)  # (compiled by the KV-cache test already)
    got = generate(cfg, shard(params, init), PROMPTS, mesh=mesh, rules=rules, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(one.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(one.logprobs), atol=1e-5)


def test_aux_loss_alone_balances_the_router():
    """Gradient descent on the load-balancing loss alone takes a lopsided router to an even
    load: the loss is a working signal, not just a number."""
    cfg = get_variant("tiny", **{**BASE, "n_experts": 8})
    params, x = _layer_params(cfg, seed=5, B=4, T=32)
    # lopsided: every token shares a direction the router maps onto expert 0
    u = np.zeros(cfg.d_model)
    u[0] = 3.0
    x = jnp.asarray(x + u, jnp.float32)
    params["router"]["kernel"] = params["router"]["kernel"].at[0, 0].add(1.0)

    def lb(p):
        _, state = moe.MoE(cfg).apply({"params": p}, x, mutable=[moe.COLLECTION])
        return moe.collect_stats(state[moe.COLLECTION])

    start = jax.jit(lb)(params)
    grad = jax.grad(lambda q: lb(q)["load_balance"])
    step = jax.jit(lambda p: jax.tree.map(lambda a, g: a - 0.5 * g, p, grad(p)))
    for _ in range(40):
        params = step(params)
    end = jax.jit(lb)(params)
    assert float(start["max_load"]) > 3.0  # expert 0 in nearly every token's top 2
    assert float(end["load_balance"]) < float(start["load_balance"]) - 0.1
    assert float(end["max_load"]) < float(start["max_load"])


def test_lora_and_muon_treat_each_expert_as_a_matrix():
    from flaxlm.models import lora
    from flaxlm.train.muon import matrix_axes

    cfg = get_variant("tiny", **BASE)
    params, apply, tokens = _model(cfg)
    spec = lora.LoraSpec(rank=2, alpha=4, targets="mlp/experts/(gate|up|down)")
    adapters = lora.init_adapters(jax.random.PRNGKey(1), params, spec)
    a = adapters["layers_0"]["mlp"]["experts"]["up"]["kernel"]["a"]
    assert a.shape == (4, cfg.d_model, 2)  # one adapter per expert
    up = params["layers_0"]["mlp"]["experts"]["up"]["kernel"]
    path = tuple(jax.tree_util.DictKey(k) for k in ("layers_0", "mlp", "experts", "up", "kernel"))
    assert matrix_axes(path, up) == ((0,), (1,), (2,))
    stacked = stack_layers(params, cfg.n_layers)["layers"]["mlp"]["experts"]["down"]["kernel"]
    path = tuple(jax.tree_util.DictKey(k) for k in ("layers", "mlp", "experts", "down", "kernel"))
    assert matrix_axes(path, stacked) == ((0, 1), (2,), (3,))
    router = tuple(jax.tree_util.DictKey(k) for k in ("layers_0", "mlp", "router", "kernel"))
    assert matrix_axes(router, params["layers_0"]["mlp"]["router"]["kernel"]) is None
    b = jax.random.normal(jax.random.PRNGKey(2), (4, 2, cfg.d_expert_)) * 0.1
    adapters["layers_0"]["mlp"]["experts"]["up"]["kernel"]["b"] = b
    merged = lora.merge({"base": params, "lora": adapters}, spec)
    delta = merged["layers_0"]["mlp"]["experts"]["up"]["kernel"] - up
    want = jnp.einsum("edr,erf->edf", a, b) * spec.alpha / spec.rank
    np.testing.assert_allclose(np.asarray(delta), np.asarray(want), rtol=1e-5, atol=1e-6)
