"""Muon (`opt.name = "muon"`, train/muon.py) against a numpy float64 reference written here:
Newton–Schulz, the per-matrix reading of each layer kernel, Nesterov momentum, the consistent-
RMS scale and decoupled weight decay; AdamW for every other leaf; scanned = unrolled layers;
sharded = unsharded; it trains."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxlm.models.config import get_variant
from flaxlm.models.sharding import make_mesh
from flaxlm.models.transformer import Transformer, stack_layers
from flaxlm.train import muon
from flaxlm.train.optim import make_optimizer, opt_config
from flaxlm.train.state import unbox

LR, WD, BETA, RMS = 0.01, 0.1, 0.9, 0.2


def _ns_reference(G, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315
    X = np.asarray(G, np.float64)
    X = X / (np.linalg.norm(X) + 1e-7)
    tall = X.shape[0] > X.shape[1]
    X = X.T if tall else X
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def test_newton_schulz_equals_the_reference_and_orthogonalises():
    rng = np.random.default_rng(0)
    ns = jax.jit(muon.newton_schulz, static_argnames="dtype")  # (jitted, as the optimizer runs it)
    for shape in ((8, 8), (16, 40), (48, 12)):
        G = rng.standard_normal(shape)
        got = np.asarray(ns(jnp.asarray(G, jnp.float32)))
        want = _ns_reference(G)
        np.testing.assert_allclose(got, want, atol=2e-5)
        sv = np.linalg.svd(want, compute_uv=False)
        assert 0.6 < sv.min() and sv.max() < 1.25, sv  # near-orthogonal, not exactly
        # bfloat16 iterations (opt.muon_dtype): as orthogonal, within ~6% of float32's
        half = ns(jnp.asarray(G, jnp.float32), dtype=jnp.bfloat16)
        assert half.dtype == jnp.float32
        half = np.asarray(half, np.float64)
        assert np.linalg.norm(half - want) < 0.08 * np.linalg.norm(want)
        sv = np.linalg.svd(half, compute_uv=False)
        assert 0.6 < sv.min() and sv.max() < 1.25, sv


_stack = jax.jit(stack_layers, static_argnums=1)  # one program, not an eager op per leaf


def _params(scan=False):
    cfg = get_variant("tiny", scan_layers=False)
    init = lambda r: unbox(Transformer(cfg).init(r, jnp.zeros((1, 4), jnp.int32)))["params"]  # noqa: E731
    p = jax.jit(init)(jax.random.PRNGKey(0))
    return _stack(p, cfg.n_layers) if scan else p


def _matrix(name, W):
    """A layer kernel (unrolled layout) as fan_in × fan_out, written out per kind."""
    if name in ("q", "k", "v"):
        return W.reshape(W.shape[0], -1)
    if name == "o":
        return W.reshape(-1, W.shape[-1])
    return W


def _cfg(**kw):
    c = opt_config()
    c.update({"name": "muon", "lr": LR, "warmup_steps": 0, "schedule": "constant",
              "weight_decay": WD, "muon_momentum": BETA, "clip_norm": 0.0, **kw})  # fmt: skip
    return c


def test_two_steps_equal_the_formula():
    """Step 1 and 2 of every layer kernel against m_t = β·m + g, d = g + β·m_t,
    W ← W − lr·(rms·√max(fan)·NS(d) + λ·W); the embedding, LM head and norm scales move as
    AdamW alone (same lr, b1/b2/eps, decay mask) moves them."""
    params = _params()
    rng = np.random.default_rng(1)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
             for _ in range(2)]  # fmt: skip
    tx, _ = make_optimizer(_cfg(), 10)
    adam, _ = make_optimizer(_cfg(name="adamw"), 10)
    state, astate, p, ap = tx.init(params), adam.init(params), params, params
    m = jax.tree.map(np.zeros_like, params)
    # Jitted, as a train step runs them (eager, each is hundreds of small programs).
    update, adam_update = jax.jit(tx.update), jax.jit(adam.update)
    apply_updates = jax.jit(optax.apply_updates)
    for g in grads:
        upd, state = update(g, state, p)
        aupd, astate = adam_update(g, astate, ap)
        for layer in ("layers_0", "layers_1"):
            for block, names in (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))):
                for n in names:
                    W = np.asarray(p[layer][block][n]["kernel"], np.float64)
                    gn = np.asarray(g[layer][block][n]["kernel"], np.float64)
                    mm = BETA * m[layer][block][n]["kernel"] + gn
                    m[layer][block][n]["kernel"] = mm
                    ortho = _ns_reference(_matrix(n, gn + BETA * mm))
                    want = -LR * (RMS * np.sqrt(max(ortho.shape)) * ortho.reshape(W.shape) + WD * W)
                    got = np.asarray(upd[layer][block][n]["kernel"])
                    np.testing.assert_allclose(got, want, atol=2e-6, err_msg=f"{layer}/{n}")
        for path in (("embed", "embedding"), ("lm_head", "kernel"), ("final_norm", "scale"),
                     ("layers_1", "mlp_norm", "scale")):  # fmt: skip
            get = lambda t, path=path: np.asarray(t[path[0]][path[1]] if len(path) == 2
                                                  else t[path[0]][path[1]][path[2]])  # fmt: skip
            np.testing.assert_allclose(get(upd), get(aupd), rtol=1e-6, atol=1e-9)
        p, ap = apply_updates(p, upd), apply_updates(ap, aupd)
    labels = jax.tree.leaves(muon.muon_labels(params))
    assert labels.count("muon") == 14 and labels.count("adam") == 7


def test_scanned_layers_update_like_unrolled_ones():
    """A stacked (L, ...) kernel is L matrices, not one: the same updates as unrolled."""
    flat, stacked = _params(False), _params(True)
    rng = np.random.default_rng(2)
    g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), flat)
    tx, _ = make_optimizer(_cfg(), 10)
    update = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])  # a trace per layout
    u_flat, u_stack = update(g, flat), update(_stack(g, 2), stacked)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 _stack(u_flat, 2), u_stack)  # fmt: skip


def test_sharded_update_equals_unsharded():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    params = _params()
    rng = np.random.default_rng(3)
    g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
    tx, _ = make_optimizer(_cfg(), 10)
    update = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))  # one trace, a compile each
    want, _ = update(g, params)
    mesh = make_mesh({"fsdp": 8})
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("fsdp") if x.shape[0] % 8 == 0
                                                       else P()))  # fmt: skip
    ps, gs = jax.tree.map(shard, params), jax.tree.map(shard, g)
    got, _ = update(gs, ps)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, want)


def test_it_trains_a_transformer():
    """30 steps on one fixed batch: the loss falls well below its start."""
    cfg = get_variant("tiny")
    model = Transformer(cfg)
    params = _params()
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (4, 32)))

    def loss(p):
        logits = model.apply({"params": p}, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None],
                                             -1))  # fmt: skip

    tx, _ = make_optimizer(_cfg(weight_decay=0.0, lr=0.02), 30)
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(loss)(p)
        upd, s = tx.update(g, s, p)
        return optax.apply_updates(p, upd), s, value

    first = None
    for _ in range(30):
        params, state, value = step(params, state)
        first = float(value) if first is None else first
    assert float(jax.jit(loss)(params)) < 0.5 * first


@pytest.mark.parametrize("key,value,match", [
    ("muon_momentum", 1.0, "opt.muon_momentum=1.0"),
    ("muon_ns_steps", 0, "opt.muon_ns_steps=0"),
    ("muon_rms", 0.0, "opt.muon_rms=0.0"),
    ("muon_dtype", "float16", "opt.muon_dtype='float16'"),
])  # fmt: skip
def test_bad_muon_settings_name_their_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer(_cfg(**{key: value}), 10)


def test_a_muon_run_resumes_bitwise(tmp_path, caplog):
    """pretrain with opt.name=muon: checkpointed at step 3 (Muon's momentum in the optimizer
    state beside AdamW's), resumed to 6 — the losses of an uninterrupted run, bit for bit."""
    from flaxlm.configs import pretrain as pretrain_config
    from flaxlm.configs.common import override
    from flaxlm.train import pretrain
    from flaxlm.train.metrics import read_metrics

    def run(workdir, steps):
        c = pretrain_config.get_config("variant=tiny,runlocal=True,data=markov")
        c = override(c, {"progress_bar": False, "eval_at_start": False, "total_steps": steps,
                         "ckpt_every": 3, "log_every": 1, "eval_every": 0, "async_ckpt": False,
                         "opt.name": "muon", "opt.schedule": "constant", "opt.warmup_steps": 0,
                         "opt.lr": 0.01})  # fmt: skip
        pretrain.run(c, str(workdir))
        return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}

    straight = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    caplog.set_level(logging.INFO, logger="flaxlm")
    resumed = run(tmp_path / "b", 6)
    assert f"resumed from {tmp_path / 'b'}" in caplog.text and "/3" in caplog.text
    assert sorted(straight) == sorted(resumed) == list(range(1, 7))
    assert straight == resumed
    assert straight[6] < straight[1]
