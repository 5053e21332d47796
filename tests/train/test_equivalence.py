"""Equal results across mesh shapes, and gradient accumulation as one update over the whole batch,
for every task's loss: next-token (pretraining, SFT; plain and chunked, with z-loss), reward
model, DPO, PPO and GRPO (`loss_agg` seq and token).

Accumulation is checked where it can go wrong: micro-batches that hold very different numbers
of loss tokens / pairs / sequences (45 vs 2 tokens, and one micro-batch with none), against the
loss and gradient written out by hand over the whole batch — not against another accumulated
run. A plain mean of the micro-batch losses (the classic bug) is off by 5-75% here.

Tolerances, float32 (eps = 2^-24 ≈ 6e-8): the same sums in another order (micro-batches, shards,
chunks) differ by a few eps per term in the worst case, ~sqrt(n)·eps typically; the observed
differences are <= 7e-7 relative. The checks allow 1e-5 relative plus 1e-6 absolute (times the
largest entry when that is > 1; for results that cancel to ~0, like a reward margin of 0.006
from rewards of ~1), ~10x above what reordering gives and >= 10^2x below what a
normalisation bug gives (2e-4 to 0.7 relative here for a plain mean of micro-batch losses).
The mesh runs use SGD with momentum: parameters move linearly in the gradients. Adam's
g/(sqrt(v) + eps) turns float noise in near-zero gradients (rarely used embedding rows) into
updates of up to ~lr, which measures Adam, not the mesh.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flaxlm.alignment import dpo, grpo, ppo, reward
from flaxlm.models.config import get_variant
from flaxlm.models.heads import sequence_values
from flaxlm.models.sharding import logical_axis_rules, make_mesh, shard_batch, use_mesh
from flaxlm.train import losses, pretrain
from flaxlm.train.optim import make_optimizer, opt_config
from flaxlm.train.state import create_train_state
from flaxlm.train.step import guard_config, jit_train_step, loss_and_grads

RTOL = 1e-5
V, T = 16, 12
# Loss tokens per row. Micro-batch k holds rows k, k + n, ... (train/step.py `_split_micro`):
# with n = 2 they hold 45 and 2 tokens, with n = 4 23, 2, 22 and 0 tokens.
LENGTHS = np.array([12, 1, 12, 0, 11, 1, 10, 0])
B = len(LENGTHS)
VALID = np.array([1, 1, 1, 0, 1, 0, 0, 0], np.float32)  # pairs: 3 + 1, or 2, 1, 1, 0


def _close(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    atol = 1e-6 * max(float(np.max(np.abs(want), initial=0.0)), 1.0)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=atol, err_msg=what)


# ---------------------------------------------------------------------------------------------
# Toy models (a bigram LM and a per-token value table): every loss path, quick to compile


def lm_apply(p, tokens, positions=None, segment_ids=None):
    return p["emb"][tokens]


def value_apply(p, tokens, positions=None, segment_ids=None):
    return p["v"][tokens]


def _rows(rng, lengths, prefix="", t=T):
    """Right-padded rows whose first `lengths[b]` targets carry the loss."""
    tokens = rng.integers(0, V, (len(lengths), t)).astype(np.int32)
    real = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return {
        f"{prefix}tokens": tokens,
        f"{prefix}targets": rng.integers(0, V, (len(lengths), t)).astype(np.int32),
        f"{prefix}loss_mask": real.astype(np.float32),
        f"{prefix}segment_ids": real,
        f"{prefix}positions": np.tile(np.arange(t, dtype=np.int32), (len(lengths), 1)),
    }


def _np_logp(table, tokens, targets):
    """log p(target) per token in float64."""
    logits = np.asarray(table, np.float64)[tokens]
    lse = np.log(np.exp(logits).sum(-1))
    return np.take_along_axis(logits, targets[..., None], -1)[..., 0] - lse, lse


def _jnp_logp(table, tokens, targets):
    logits = table[tokens]
    return jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]


def _lm_case(rng, chunked):
    z = 1e-2
    params = {"emb": rng.normal(size=(V, V)).astype(np.float32)}
    batch = _rows(rng, LENGTHS)
    if chunked:

        def model(p, x, positions=None, segment_ids=None, method=None):
            if method == "backbone":
                return p["emb"][x], None
            return x  # "logits": the hidden states already are the logits

        loss_fn = losses.chunked_lm_loss_fn(model, chunk=4, z_loss=z)
    else:
        loss_fn = losses.lm_loss_fn(lm_apply, z_loss=z)

    def by_hand(p, b):  # Σ over every loss token of the batch / their count
        logits = p["emb"][b["tokens"]]
        lse = jax.nn.logsumexp(logits, -1)
        nll = lse - jnp.take_along_axis(logits, b["targets"][..., None], -1)[..., 0]
        m = b["loss_mask"]
        return jnp.sum((nll + z * lse**2) * m) / jnp.sum(m)

    return params, batch, loss_fn, by_hand


def _reward_case(rng):
    params = {"v": rng.normal(size=(V,)).astype(np.float32)}
    batch = {**_rows(rng, np.where(VALID > 0, LENGTHS + 1, 0), "chosen_"),
             **_rows(rng, np.where(VALID > 0, 12 - LENGTHS, 0), "rejected_")}  # fmt: skip
    batch["margin"] = rng.random(B).astype(np.float32)
    batch["valid"] = VALID
    loss_fn = reward.reward_loss_fn(value_apply, use_margin=True, center_coef=0.1)

    def by_hand(p, b):  # mean over the valid pairs only
        rc = sequence_values(p["v"][b["chosen_tokens"]], b["chosen_segment_ids"])
        rr = sequence_values(p["v"][b["rejected_tokens"]], b["rejected_segment_ids"])
        per = jax.nn.softplus(-(rc - rr - b["margin"])) + 0.1 * (rc + rr) ** 2
        return jnp.sum(per * b["valid"]) / jnp.sum(b["valid"])

    return params, batch, loss_fn, by_hand


def _dpo_case(rng):
    params = {"emb": rng.normal(size=(V, V)).astype(np.float32)}
    batch = {**_rows(rng, np.where(VALID > 0, LENGTHS + 1, 0), "chosen_"),
             **_rows(rng, np.where(VALID > 0, 12 - LENGTHS, 0), "rejected_")}  # fmt: skip
    batch["valid"] = VALID
    batch["ref_chosen_logps"] = -rng.random(B).astype(np.float32) * 20
    batch["ref_rejected_logps"] = -rng.random(B).astype(np.float32) * 20
    d = ml_collections.ConfigDict({"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0,
                                   "simpo_gamma": 0.0, "sft_coef": 0.5})  # fmt: skip
    loss_fn = dpo.dpo_loss_fn(lm_apply, d)

    def by_hand(p, b):
        def seq(side):
            lp = _jnp_logp(p["emb"], b[f"{side}_tokens"], b[f"{side}_targets"])
            m = b[f"{side}_loss_mask"]
            return jnp.sum(lp * m, 1), jnp.sum(m, 1)

        (pc, nc), (pr, _) = seq("chosen"), seq("rejected")
        h = (pc - b["ref_chosen_logps"]) - (pr - b["ref_rejected_logps"])
        per = -jax.nn.log_sigmoid(0.1 * h) + 0.5 * (-pc / jnp.maximum(nc, 1.0))
        return jnp.sum(per * b["valid"]) / jnp.sum(b["valid"])

    return params, batch, loss_fn, by_hand


def _rl_rows(rng, params_emb):
    batch = _rows(rng, LENGTHS)
    lp = np.asarray(_jnp_logp(params_emb, batch["tokens"], batch["targets"]))
    m = batch["loss_mask"]
    batch["old_logprobs"] = ((lp + 0.3 * rng.normal(size=lp.shape)) * m).astype(np.float32)
    batch["rollout/reward_mean"] = np.full(B, 0.25, np.float32)  # a passthrough statistic
    return batch


def _ppo_case(rng):
    params = {"policy": {"emb": rng.normal(size=(V, V)).astype(np.float32)},
              "value": {"v": rng.normal(size=(V,)).astype(np.float32)}}  # fmt: skip
    batch = _rl_rows(rng, params["policy"]["emb"])
    m = batch["loss_mask"]
    for k in ("old_values", "advantages", "returns"):
        batch[k] = (rng.normal(size=(B, T)) * m).astype(np.float32)
    p = ml_collections.ConfigDict({"clip": 0.2, "value_clip": 0.2, "vf_coef": 0.5,
                                   "ent_coef": 0.01})  # fmt: skip
    loss_fn = ppo.ppo_loss_fn(lm_apply, value_apply, p)

    def by_hand(prm, b):  # token means over every response token of the batch
        logits = prm["policy"]["emb"][b["tokens"]]
        logp = _jnp_logp(prm["policy"]["emb"], b["tokens"], b["targets"])
        ratio = jnp.exp(logp - b["old_logprobs"])
        a = b["advantages"]
        pg = jnp.maximum(-a * ratio, -a * jnp.clip(ratio, 0.8, 1.2))
        val = prm["value"]["v"][b["tokens"]]
        vc = b["old_values"] + jnp.clip(val - b["old_values"], -0.2, 0.2)
        vf = 0.5 * jnp.maximum((val - b["returns"]) ** 2, (vc - b["returns"]) ** 2)
        ent = -jnp.sum(jax.nn.softmax(logits) * jax.nn.log_softmax(logits), -1)
        mm = b["loss_mask"]
        return jnp.sum((pg + 0.5 * vf - 0.01 * ent) * mm) / jnp.sum(mm)

    return params, batch, loss_fn, by_hand


def _grpo_case(rng, agg):
    params = {"emb": rng.normal(size=(V, V)).astype(np.float32)}
    batch = _rl_rows(rng, params["emb"])
    m = batch["loss_mask"]
    batch["ref_logprobs"] = ((batch["old_logprobs"] - 0.2 * rng.random((B, T))) * m).astype(
        np.float32
    )
    batch["advantages"] = rng.normal(size=B).astype(np.float32)
    g = ml_collections.ConfigDict({"clip": 0.2, "beta": 0.04, "loss_agg": agg})
    loss_fn = grpo.grpo_loss_fn(lm_apply, g)

    def by_hand(p, b):
        logp = _jnp_logp(p["emb"], b["tokens"], b["targets"])
        ratio = jnp.exp(logp - b["old_logprobs"])
        a = b["advantages"][:, None]
        pg = -jnp.minimum(ratio * a, jnp.clip(ratio, 0.8, 1.2) * a)
        d = logp - b["ref_logprobs"]
        per = pg + 0.04 * (jnp.exp(-d) - 1 + d)
        mm = b["loss_mask"]
        if agg == "token":  # DAPO: one mean over every response token of the batch
            return jnp.sum(per * mm) / jnp.sum(mm)
        n = jnp.sum(mm, 1)  # seq: each response's token mean, then the mean over responses
        has = n > 0
        return jnp.sum(jnp.where(has, jnp.sum(per * mm, 1) / jnp.maximum(n, 1), 0)) / jnp.sum(has)

    return params, batch, loss_fn, by_hand


CASES = {
    "lm": lambda rng: _lm_case(rng, chunked=False),
    "lm_chunked": lambda rng: _lm_case(rng, chunked=True),
    "reward": _reward_case,
    "dpo": _dpo_case,
    "ppo": _ppo_case,
    "grpo_seq": lambda rng: _grpo_case(rng, "seq"),
    "grpo_token": lambda rng: _grpo_case(rng, "token"),
}
ACCUM = (1, 2, 4)


@functools.cache
def _accumulated(name):
    """(the by-hand (loss, grads) over the whole batch, [(loss, metrics, grads) for each
    number of micro-batches in ACCUM]), one compiled program per case."""
    params, batch, loss_fn, by_hand = CASES[name](np.random.default_rng(0))

    def run(p, b):
        rng = jax.random.PRNGKey(0)
        return jax.value_and_grad(by_hand)(p, b), [
            loss_and_grads(p, b, rng, loss_fn, n) for n in ACCUM
        ]

    return jax.device_get(jax.jit(run)(params, jax.tree.map(jnp.asarray, batch)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_accumulation_normalises_over_the_whole_batch(name):
    """Loss and gradient with 1, 2 and 4 micro-batches = the formula over the whole batch;
    the metrics (and the `weight` total) do not depend on the number of micro-batches."""
    (want_loss, want_grads), runs = _accumulated(name)
    full_metrics = runs[0][1]
    for n, (loss, metrics, grads) in zip(ACCUM, runs):
        _close(loss, want_loss, f"{name}: loss with {n} micro-batches")
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads),
                                jax.tree.leaves(want_grads)):  # fmt: skip
            _close(g, w, f"{name}: grad {jax.tree_util.keystr(path)} with {n} micro-batches")
        assert set(metrics) == set(full_metrics)
        for k, v in metrics.items():  # GRPO "seq": pg_loss/kl/clipfrac/entropy too (they were
            # token means under a per-sequence weight, so accumulation reweighted them)
            _close(v, full_metrics[k], f"{name}: metric {k} with {n} micro-batches")


def test_reward_loss_ignores_padding_pairs():
    """A partial batch's padding rows (valid = 0) are no pairs: the loss, metrics and `weight`
    are those of the valid pairs alone (as DPO's)."""
    params, batch, loss_fn, _ = _reward_case(np.random.default_rng(1))
    keep = VALID > 0
    loss, metrics = loss_fn(params, jax.tree.map(jnp.asarray, batch), None)
    only = {k: v[keep] for k, v in batch.items()}
    want, want_metrics = loss_fn(params, jax.tree.map(jnp.asarray, only), None)
    _close(loss, want, "reward loss")
    for k in ("accuracy", "margin", "reward_mean", "weight"):
        _close(metrics[k], want_metrics[k], f"reward metric {k}")
    assert float(metrics["weight"]) == keep.sum()


# ---------------------------------------------------------------------------------------------
# The Transformer's train step under three meshes and with accumulation

MESHES = {
    "dp": {"data": 8, "fsdp": 1, "tensor": 1},
    "fsdp": {"data": 1, "fsdp": 8, "tensor": 1},
    "fsdp_tp": {"data": 2, "fsdp": 2, "tensor": 2},
}
STEPS, ROWS, SEQ = 3, 16, 16


def _lm_batches():
    """Packed rows with very different loss-token counts (0 to 16, two documents in some)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        lengths = rng.permutation(np.r_[0, 1, 1, 2, 16, 16, 15, 3, 16, 0, 9, 14, 16, 2, 12, 16])
        b = _rows(rng, lengths, t=SEQ)
        b["targets"] = (3 * b["tokens"] + 1) % V  # a rule the model learns in a few steps
        split = lengths // 2  # a second document from the middle of each row
        for r, s in enumerate(split):
            if s:
                b["segment_ids"][r, s : lengths[r]] = 2
                b["positions"][r, s:] -= s
        b["loss_mask"] *= rng.random(b["loss_mask"].shape) > 0.2  # prompt tokens are masked
        out.append(b)
    return out


def _train(preset: str, grad_accum: int):
    cfg = get_variant("tiny", vocab_size=V, n_layers=1)
    init_params, apply = pretrain.model_fns(cfg)
    loss_fn = losses.lm_loss_fn(apply, z_loss=1e-3)
    o = opt_config()
    o.name, o.lr, o.b1, o.warmup_steps, o.weight_decay = "sgd", 0.5, 0.9, 0, 0.01
    tx, schedule = make_optimizer(o, STEPS)
    mesh, rules = make_mesh(MESHES[preset]), logical_axis_rules(preset)
    with use_mesh(mesh, rules):
        state, shardings = create_train_state(init_params, tx, mesh, rules, seed=0)
        step = jit_train_step(loss_fn, tx, schedule, guard_config(), grad_accum, shardings, mesh)
        batches = [shard_batch(b, mesh) for b in _lm_batches()]
        compiled = step.lower(state, batches[0]).compile()
        history = []
        for b in batches:
            state, m = compiled(state, b)
            history.append(jax.device_get(m))
    return history, jax.device_get(state.params), compiled.as_text()


@pytest.fixture(scope="module")
def reference_run():
    return _train("dp", 1)


@pytest.mark.parametrize("preset,grad_accum", [("dp", 2), ("fsdp", 1), ("fsdp_tp", 4)])
def test_train_step_equal_across_meshes_and_accumulation(reference_run, preset, grad_accum):
    """Per-step loss, metrics and final params of 3 SGD steps equal the data-parallel
    single-batch run's, whatever the mesh and the number of micro-batches."""
    ref, ref_params, _ = reference_run
    got, params, hlo = _train(preset, grad_accum)
    for i, (a, b) in enumerate(zip(got, ref)):
        for k in ("loss", "nll", "z_loss", "accuracy", "weight", "grad_norm", "param_norm"):
            _close(a[k], b[k], f"{preset} x{grad_accum}: step {i + 1} {k}")
    for (path, p), q in zip(jax.tree_util.tree_leaves_with_path(params),
                            jax.tree.leaves(ref_params)):  # fmt: skip
        _close(p, q, f"{preset} x{grad_accum}: param {jax.tree_util.keystr(path)}")
    assert ref[-1]["loss"] < ref[0]["loss"] - 0.1  # the steps did train
    if preset == "dp":
        # Data parallel: each device accumulates its own rows of every micro-batch; the only
        # collective is the gradients' all-reduce (no activations moved between devices).
        moved = [op for op in ("all-gather(", "all-to-all(", "collective-permute(") if op in hlo]
        assert not moved, f"accumulation loop moves data between devices: {moved}"
