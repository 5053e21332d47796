"""Alignment losses and RL math against independent references.

Every reference here is written from the published formula in plain Python / numpy (float64),
never by calling the flaxlm function it checks: the DPO family end to end from logits (each
variant, its implicit rewards and logged metrics), PPO's rollout math (KL-shaped per-token
rewards with the sequence reward on the last response token, GAE with the terminal bootstrap,
whitening over valid tokens, the combined loss), GRPO (group advantages, per-token clipped
objective with k3 KL, token / sequence aggregation) and the Bradley–Terry reward loss.

Inputs are small and random, with uneven response lengths, prompt tokens and padding whose
values are garbage: the checks also establish that prompt and padding tokens never contribute
and that a batch's padding rows change nothing. Tolerance: float32 against float64.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flaxlm.alignment import dpo, grpo, ppo, reward, rl_common, rl_rollout

TOL = {"rtol": 1e-5, "atol": 1e-5}
V = 13  # vocabulary of the table "models" below


# ---------------------------------------------------------------------------------------------
# Shared helpers: a table "language model" and float64 math


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - (np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True))
                + x.max(-1, keepdims=True))  # fmt: skip


def _logsig(x):
    """log σ(x), stable in float64."""
    return -np.logaddexp(0.0, -float(x))


def _table_apply(params, tokens, positions, segment_ids):
    """logits (B, T, V) = table[token] + pos[position]: a row's logits depend on its own tokens
    only, so a batch's padding rows cannot change the real rows' log-probabilities."""
    del segment_ids
    return params["table"][tokens] + params["pos"][positions]


def _table_params(rng, T):
    return {"table": jnp.asarray(rng.normal(0, 1.5, (V, V)), jnp.float32),
            "pos": jnp.asarray(rng.normal(0, 0.5, (T, V)), jnp.float32)}  # fmt: skip


def _token_logps(params, tokens, positions, targets):
    """float64 log p(target) per token of the table model, with its own log-softmax."""
    table, pos = np.asarray(params["table"], np.float64), np.asarray(params["pos"], np.float64)
    out = np.zeros(tokens.shape)
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            out[b, t] = _log_softmax(table[tokens[b, t]] + pos[positions[b, t]])[targets[b, t]]
    return out


# ---------------------------------------------------------------------------------------------
# DPO family


def _pair_rows(rng, B, T, prompt_lens, resp_lens):
    """Rows laid out like PreferenceBatches: prompt + response from position 0, loss mask on the
    response targets only; padding and the prompt targets hold random (garbage) ids."""
    rows = {}
    for side, lens in (("chosen", resp_lens[0]), ("rejected", resp_lens[1])):
        tok = rng.integers(0, V, (B, T)).astype(np.int32)
        tgt = rng.integers(0, V, (B, T)).astype(np.int32)
        mask = np.zeros((B, T), np.float32)
        seg = np.zeros((B, T), np.int32)
        for b in range(B):
            P, n = prompt_lens[b], lens[b]
            mask[b, P - 1 : P - 1 + n] = 1.0
            seg[b, : P + n - 1] = 1
        rows.update(
            {
                f"{side}_tokens": tok,
                f"{side}_targets": tgt,
                f"{side}_loss_mask": mask,
                f"{side}_segment_ids": seg,
                f"{side}_positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
            }
        )
    return rows


def _dpo_batch(seed=0, B=5, T=12):
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(1, 5, B)
    resp = (rng.integers(1, 8, B), rng.integers(1, 8, B))  # uneven, and different per side
    batch = _pair_rows(rng, B, T, prompt_lens, resp)
    batch["valid"] = np.ones(B, np.float32)
    batch["ref_chosen_logps"] = rng.normal(-12, 3, B).astype(np.float32)
    batch["ref_rejected_logps"] = rng.normal(-12, 3, B).astype(np.float32)
    return batch, _table_params(rng, T)


def _aot_reference(u, v, real, beta):
    """AOT (Melnyk et al. 2024): the real rows' u and v each sorted (their empirical quantiles),
    −log σ(β·(u_(i) − v_(i))) per quantile slot i, given to the row whose u is the i-th smallest
    (0 to the other rows). Plain Python over the rows."""
    rows = [j for j in range(len(u)) if real[j]]
    by_u = sorted(rows, key=lambda j: float(u[j]))
    vs = sorted(float(v[j]) for j in rows)
    out = [0.0] * len(u)
    for i, j in enumerate(by_u):
        out[j] = -_logsig(beta * (float(u[j]) - vs[i]))
    return out


def _dpo_reference(params, batch, d):
    """Per-pair losses and implicit rewards from each paper's formula, token by token (AOT's:
    of the batch's quantiles, `_aot_reference`)."""
    seq, lens = {}, {}
    for s in ("chosen", "rejected"):
        lp = _token_logps(params, batch[f"{s}_tokens"], batch[f"{s}_positions"],
                          batch[f"{s}_targets"])  # fmt: skip
        m = batch[f"{s}_loss_mask"]
        seq[s] = [sum(lp[b, t] for t in range(lp.shape[1]) if m[b, t]) for b in range(len(m))]
        lens[s] = [int(m[b].sum()) for b in range(len(m))]
    beta, eps, gamma = d.beta, d.label_smoothing, d.simpo_gamma
    losses, rc, rr = [], [], []
    for b in range(len(batch["valid"])):
        pc, pr = seq["chosen"][b], seq["rejected"][b]
        ac, ar = pc / lens["chosen"][b], pr / lens["rejected"][b]
        h = (pc - batch["ref_chosen_logps"][b]) - (pr - batch["ref_rejected_logps"][b])
        if d.loss_type == "sigmoid":  # Rafailov et al. 2023, eq. 7
            loss = -_logsig(beta * h)
        elif d.loss_type == "conservative":  # cDPO: the label is wrong with probability ε
            loss = (1 - eps) * -_logsig(beta * h) + eps * -_logsig(-beta * h)
        elif d.loss_type == "ipo":  # Azar et al. 2023, eq. 17, τ = β
            loss = (h - 1 / (2 * beta)) ** 2
        elif d.loss_type == "hinge":  # RSO / SLiC on the normalised likelihood, margin 1/β
            loss = max(0.0, 1 - beta * h)
        elif d.loss_type == "robust":  # Chowdhury et al. 2024, eq. 10: unbiased under flips
            loss = ((1 - eps) * -_logsig(beta * h) - eps * -_logsig(-beta * h)) / (1 - 2 * eps)
        elif d.loss_type == "simpo":  # Meng et al. 2024, eq. 6
            loss = -_logsig(beta * ac - beta * ar - gamma)
        elif d.loss_type == "orpo":  # Hong et al. 2024: L_SFT + λ·L_OR
            odds = lambda a: math.exp(a) / (1 - math.exp(a))  # noqa: E731
            loss = -ac - beta * _logsig(math.log(odds(ac) / odds(ar)))
        elif d.loss_type in dpo.ANCHORED:  # each side's own log ratio, r = β·(π − ρ)
            sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
            a = pc - batch["ref_chosen_logps"][b]
            r = pr - batch["ref_rejected_logps"][b]
            if d.loss_type == "apo_zero":  # D'Oosterlinck et al. 2024, eq. 6 (+ 1)
                loss = 1 - sig(beta * a) + sig(beta * r)
            elif d.loss_type == "apo_down":  # ibid., eq. 7 (+ 1)
                loss = sig(beta * a) + 1 - sig(beta * a - beta * r)
            elif d.loss_type == "nca":  # Chen et al. 2024, the pairwise NCA loss
                loss = -_logsig(beta * a) - 0.5 * _logsig(-beta * a) - 0.5 * _logsig(-beta * r)
            else:  # SPPO (Wu et al. 2024): P(winner) = 1, P(loser) = 0, η = 1/β
                loss = (a - 1 / beta * (1 - 0.5)) ** 2 + (r - 1 / beta * (0 - 0.5)) ** 2
        elif d.loss_type == "exo_pair":  # Ji et al. 2024, eq. 16: KL(p_θ ‖ p_label), K = 2
            q = 1 / (1 + math.exp(-beta * h))  # the model's probability that chosen wins
            loss = q * math.log(q / (1 - eps)) + (1 - q) * math.log((1 - q) / eps)
        elif d.loss_type == "discopop":  # Lu et al. 2024, eq. 5 (LRML), ρ = β·h
            tau, rho = d.discopop_tau, beta * h
            mix = 1 / (1 + math.exp(-rho / tau))
            loss = (1 - mix) * -_logsig(rho) + mix * math.exp(-rho)
        elif d.loss_type in ("aot", "aot_pair"):
            loss = 0.0  # (the batch's, below)
        else:
            raise AssertionError(d.loss_type)
        loss += d.sft_coef * -ac  # RPO (Pang et al. 2024): per-token NLL of the chosen answer
        free = d.loss_type in ("simpo", "orpo")
        losses.append(loss)
        rc.append(beta * ac if free else beta * (pc - batch["ref_chosen_logps"][b]))
        rr.append(beta * ar if free else beta * (pr - batch["ref_rejected_logps"][b]))
    if d.loss_type in ("aot", "aot_pair"):  # chosen's log ratios against the rejected's
        pc, pr = np.array(seq["chosen"]), np.array(seq["rejected"])
        rfc, rfr = (batch[f"ref_{s}_logps"].astype(np.float64) for s in ("chosen", "rejected"))
        # paired: the policy's chosen-to-rejected log ratio against the reference's
        u, v = (pc - pr, rfc - rfr) if d.loss_type == "aot" else (pc - rfc, pr - rfr)
        aot = _aot_reference(u, v, batch["valid"] > 0, beta)
        losses = [x + y for x, y in zip(losses, aot)]  # (+ the RPO term already there)
    return np.array(losses), np.array(rc), np.array(rr), seq


def _dpo_cfg(loss_type, beta, eps=0.0, gamma=0.0, sft_coef=0.0, tau=0.05):
    return ml_collections.ConfigDict({"loss_type": loss_type, "beta": beta,
                                      "label_smoothing": eps, "simpo_gamma": gamma,
                                      "sft_coef": sft_coef, "discopop_tau": tau})  # fmt: skip


DPO_CASES = [
    ("sigmoid", 0.1, 0.0, 0.0, 0.0), ("sigmoid", 2.0, 0.0, 0.0, 0.5),
    ("conservative", 0.3, 0.2, 0.0, 0.0), ("ipo", 0.1, 0.0, 0.0, 0.0),
    ("ipo", 1.0, 0.0, 0.0, 0.0), ("hinge", 0.2, 0.0, 0.0, 0.0), ("hinge", 3.0, 0.0, 0.0, 0.0),
    ("robust", 0.5, 0.1, 0.0, 0.0), ("simpo", 2.0, 0.0, 0.8, 0.0), ("simpo", 2.5, 0.0, 0.0, 0.3),
    ("orpo", 0.1, 0.0, 0.0, 0.0), ("orpo", 1.0, 0.0, 0.0, 0.0),
    ("apo_zero", 0.1, 0.0, 0.0, 0.0), ("apo_zero", 0.5, 0.0, 0.0, 0.2),
    ("apo_down", 0.1, 0.0, 0.0, 0.0), ("apo_down", 1.0, 0.0, 0.0, 0.0),
    ("nca", 0.1, 0.0, 0.0, 0.0), ("nca", 0.7, 0.0, 0.0, 0.0),
    ("sppo_hard", 0.1, 0.0, 0.0, 0.0), ("sppo_hard", 2.0, 0.0, 0.0, 0.0),
    ("exo_pair", 0.1, 1e-3, 0.0, 0.0), ("exo_pair", 1.0, 0.2, 0.0, 0.3),
    ("discopop", 0.05, 0.0, 0.0, 0.0), ("discopop", 1.0, 0.0, 0.0, 0.0),
    ("aot", 0.1, 0.0, 0.0, 0.0), ("aot", 1.0, 0.0, 0.0, 0.3),
    ("aot_pair", 0.1, 0.0, 0.0, 0.0), ("aot_pair", 2.0, 0.0, 0.0, 0.0),
]  # fmt: skip


@pytest.mark.parametrize("loss_type,beta,eps,gamma,sft_coef", DPO_CASES)
def test_dpo_family_from_logits_equals_the_papers(loss_type, beta, eps, gamma, sft_coef):
    batch, params = _dpo_batch()
    d = _dpo_cfg(loss_type, beta, eps, gamma, sft_coef)
    loss, m = dpo.dpo_loss_fn(_table_apply, d)(params, batch, None)
    losses, rc, rr, seq = _dpo_reference(params, batch, d)
    np.testing.assert_allclose(float(loss), losses.mean(), **TOL)
    np.testing.assert_allclose(float(m["rewards/chosen"]), rc.mean(), **TOL)
    np.testing.assert_allclose(float(m["rewards/rejected"]), rr.mean(), **TOL)
    np.testing.assert_allclose(float(m["rewards/margin"]), (rc - rr).mean(), **TOL)
    np.testing.assert_allclose(float(m["rewards/accuracy"]), np.mean(rc > rr), **TOL)
    np.testing.assert_allclose(float(m["logps/chosen"]), np.mean(seq["chosen"]), **TOL)
    np.testing.assert_allclose(float(m["logps/rejected"]), np.mean(seq["rejected"]), **TOL)
    assert float(m["weight"]) == len(batch["valid"])


@pytest.mark.parametrize("loss_type", dpo.LOSS_TYPES)
def test_dpo_ignores_padding_rows_and_prompt_targets(loss_type):
    """Padding rows (valid = 0, garbage everywhere) change neither the loss, its gradient nor
    any metric (AOT's sorts leave them out); nor do the prompt tokens' targets (loss mask 0)."""
    batch, params = _dpo_batch(1, B=4)
    d = _dpo_cfg(loss_type, 0.5, 0.1 if loss_type in dpo.SMOOTHED else 0.0, 0.5)
    fn = dpo.dpo_loss_fn(_table_apply, d)
    # Jitted, the loss, metrics and gradient in one program per batch shape (eager, hundreds
    # of small programs).
    value_and_grad = jax.jit(jax.value_and_grad(fn, has_aux=True))
    (loss, m), g = value_and_grad(params, batch, None)

    garbage, _ = _dpo_batch(2, B=3)
    garbage["valid"][:] = 0.0
    garbage["ref_chosen_logps"][:] = 1e4  # what a reference could say about a padding row
    padded = {k: np.concatenate([batch[k], garbage[k]]) for k in batch}
    (loss_p, m_p), g_p = value_and_grad(params, padded, None)
    np.testing.assert_allclose(float(loss_p), float(loss), **TOL)
    for k in m:
        np.testing.assert_allclose(float(m_p[k]), float(m[k]), err_msg=k, **TOL)
    for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)

    shuffled = dict(batch)
    for s in ("chosen", "rejected"):
        tgt = batch[f"{s}_targets"].copy()
        off = batch[f"{s}_loss_mask"] == 0
        tgt[off] = (tgt[off] + 5) % V
        shuffled[f"{s}_targets"] = tgt
    np.testing.assert_allclose(float(value_and_grad(params, shuffled, None)[0][0]), float(loss),
                               **TOL)  # fmt: skip


def _aot_fn(loss_type, beta=0.5, sft_coef=0.0):
    return jax.jit(jax.value_and_grad(
        dpo.dpo_loss_fn(_table_apply, _dpo_cfg(loss_type, beta, sft_coef=sft_coef)), has_aux=True
    ))  # fmt: skip


@pytest.mark.parametrize("loss_type", ["aot", "aot_pair"])
def test_aot_is_a_loss_of_the_batch_below_dpos(loss_type):
    """AOT is a loss of the batch's distributions, not of its pairs: permuting the pairs leaves
    it (and its gradient) unchanged, but which pairs share the batch changes it. The quantile
    coupling (both sides sorted) is the optimal transport for the convex −log σ(β·(u − v)), so
    on the same batch AOT is at most sigmoid DPO (its coupling is the batch's own pairing) —
    equal where both sides already sort alike (a comonotone batch), below where they do not;
    and a batch of one pair is DPO's loss."""
    batch, params = _dpo_batch(3, B=6)
    (loss, _), g = _aot_fn(loss_type)(params, batch, None)
    (dpo_loss, _), _ = _aot_fn("sigmoid")(params, batch, None)
    perm = np.array([4, 0, 5, 2, 1, 3])
    (loss_p, _), g_p = _aot_fn(loss_type)(params, {k: v[perm] for k, v in batch.items()}, None)
    np.testing.assert_allclose(float(loss_p), float(loss), **TOL)
    for x, y in zip(jax.tree.leaves(g_p), jax.tree.leaves(g)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)
    # ... below DPO here (the sides do not sort alike: strictly)
    assert float(loss) < float(dpo_loss) - 1e-3
    # one pair at a time: DPO's per-pair loss, so their mean is DPO's batch loss
    single = [float(_aot_fn(loss_type)(params, {k: v[j : j + 1] for k, v in batch.items()},
                                       None)[0][0]) for j in range(6)]  # fmt: skip
    np.testing.assert_allclose(np.mean(single), float(dpo_loss), **TOL)
    # ... but the batch is not the mean of its halves (DPO's is): its quantiles are the batch's
    halves = [float(_aot_fn(loss_type)(params, {k: v[i : i + 3] for k, v in batch.items()},
                                       None)[0][0]) for i in (0, 3)]  # fmt: skip
    assert abs(np.mean(halves) - float(loss)) > 1e-3
    dpo_halves = [float(_aot_fn("sigmoid")(params, {k: v[i : i + 3] for k, v in batch.items()},
                                           None)[0][0]) for i in (0, 3)]  # fmt: skip
    np.testing.assert_allclose(np.mean(dpo_halves), float(dpo_loss), **TOL)
    # a comonotone batch (the rejected side's reference log-probabilities moved so that both
    # sides sort alike, by a monotone map of the other side): AOT is DPO exactly
    seq = _dpo_reference(params, batch, _dpo_cfg("sigmoid", 0.5))[3]
    pc, pr = np.array(seq["chosen"]), np.array(seq["rejected"])
    alike = dict(batch)
    if loss_type == "aot_pair":  # b = a/2 − 1
        b = (pc - batch["ref_chosen_logps"]) / 2 - 1
        alike["ref_rejected_logps"] = (pr - b).astype(np.float32)
    else:  # μ = ρ_c − ρ_r = m/2 − 1, m = π_c − π_r
        mu = (pc - pr) / 2 - 1
        alike["ref_rejected_logps"] = (batch["ref_chosen_logps"] - mu).astype(np.float32)
    got, want = (float(_aot_fn(t)(params, alike, None)[0][0]) for t in (loss_type, "sigmoid"))
    np.testing.assert_allclose(got, want, **TOL)


def _aot_reference_of(params, batch, loss_type):
    """The reference's per-row AOT losses (slot losses by rank) of a batch, β = 0.5."""
    return _dpo_reference(params, batch, _dpo_cfg(loss_type, 0.5))[0]


@pytest.mark.parametrize("loss_type", ["aot", "aot_pair"])
def test_aot_sorts_the_global_batch_across_devices(loss_type):
    """Under a data-sharded batch on 8 devices (2 pairs each, padding rows among them) the
    jitted loss and gradient are the single device's: the sort is over the global batch, not
    each device's rows — which would give another loss (checked: the mean of per-shard AOT
    losses differs)."""
    from flaxlm.models.sharding import logical_axis_rules, make_mesh, shard_batch, use_mesh

    assert jax.device_count() == 8
    batch, params = _dpo_batch(5, B=16)
    batch["valid"][[3, 10, 11]] = 0.0  # padding rows, two on one device
    fn = _aot_fn(loss_type, sft_coef=0.2)
    (want, m_want), g_want = fn(params, batch, None)
    mesh = make_mesh({"data": -1})
    assert mesh.shape["data"] == 8
    with use_mesh(mesh, logical_axis_rules("fsdp")):
        sharded = shard_batch(batch, mesh)
        assert len(sharded["valid"].sharding.device_set) == 8
        (got, m_got), g_got = fn(params, sharded, None)
    np.testing.assert_allclose(float(got), float(want), **TOL)
    for k in m_want:
        np.testing.assert_allclose(float(m_got[k]), float(m_want[k]), err_msg=k, **TOL)
    for x, y in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)
    ref = _dpo_reference(params, batch, _dpo_cfg(loss_type, 0.5, sft_coef=0.2))[0]
    real = batch["valid"] > 0
    np.testing.assert_allclose(float(want), ref[real].mean(), **TOL)
    shards = [{k: v[2 * i : 2 * i + 2] for k, v in batch.items()} for i in range(8)]
    per_device = [_dpo_reference(params, b, _dpo_cfg(loss_type, 0.5, sft_coef=0.2))[0]
                  for b in shards]  # fmt: skip
    local = sum(x[b["valid"] > 0].sum() for x, b in zip(per_device, shards)) / real.sum()
    assert abs(local - float(want)) > 1e-3


@pytest.mark.parametrize("loss_type", ["aot", "aot_pair"])
def test_aot_under_grad_accum_sorts_each_micro_batch(loss_type):
    """opt.grad_accum = 2: the step's loss and gradient are the real-pair-weighted mean of the
    two micro-batches' own AOT losses (rows 0, 2, 4, ... and 1, 3, 5, ...: train/step.py's
    strided split), each sorted on its own — not the whole batch's AOT loss."""
    from flaxlm.train.step import loss_and_grads

    batch, params = _dpo_batch(6, B=8)
    batch["valid"][5] = 0.0
    fn = dpo.dpo_loss_fn(_table_apply, _dpo_cfg(loss_type, 0.5))
    loss, _, g = jax.jit(lambda p, b: loss_and_grads(p, b, None, fn, grad_accum=2))(params, batch)
    whole, _, _ = jax.jit(lambda p, b: loss_and_grads(p, b, None, fn))(params, batch)
    micro = [{k: v[i::2] for k, v in batch.items()} for i in range(2)]
    sums = [_aot_reference_of(params, mb, loss_type).sum() for mb in micro]
    n = batch["valid"].sum()
    np.testing.assert_allclose(float(loss), sum(sums) / n, **TOL)
    np.testing.assert_allclose(float(whole), _aot_reference_of(params, batch, loss_type).sum() / n,
                               **TOL)  # fmt: skip
    assert abs(float(loss) - float(whole)) > 1e-3
    # the gradient: the same weighted mean of the micro-batches' gradients
    gs = [jax.grad(lambda p, mb=mb: fn(p, mb, None)[0])(params) for mb in micro]
    ws = [mb["valid"].sum() for mb in micro]
    for x, *parts in zip(jax.tree.leaves(g), *(jax.tree.leaves(gi) for gi in gs)):
        want = sum(w * np.asarray(p) for w, p in zip(ws, parts)) / n
        np.testing.assert_allclose(np.asarray(x), want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Reward model (Bradley–Terry)


def test_pairwise_loss_with_margin_valid_rows_and_padding():
    rng = np.random.default_rng(3)
    B = 7
    r_c, r_r = rng.normal(0, 2, B).astype(np.float32), rng.normal(0, 2, B).astype(np.float32)
    r_r[2] = r_c[2]  # a tie: not counted correct
    margin = rng.uniform(0, 1, B).astype(np.float32)
    valid = np.array([1, 1, 1, 0, 1, 1, 0], np.float32)
    r_c[3], r_r[6] = 300.0, -300.0  # padding rows' rewards: whatever the model says there
    lam = 0.05
    loss, m = reward.pairwise_loss(r_c, r_r, margin, lam, valid)
    idx = [b for b in range(B) if valid[b]]
    bt = [-_logsig(float(r_c[b]) - float(r_r[b]) - float(margin[b])) for b in idx]
    center = [(float(r_c[b]) + float(r_r[b])) ** 2 for b in idx]
    np.testing.assert_allclose(float(loss), np.mean(bt) + lam * np.mean(center), **TOL)
    np.testing.assert_allclose(float(m["accuracy"]), np.mean([r_c[b] > r_r[b] for b in idx]))
    np.testing.assert_allclose(float(m["margin"]), np.mean([r_c[b] - r_r[b] for b in idx]),
                               **TOL)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# KL estimators, entropy, the adaptive KL controller


def test_kl_estimators_and_entropy():
    rng = np.random.default_rng(4)
    lp, ref = rng.normal(-2, 1, (3, 9)), rng.normal(-2, 1, (3, 9))
    k1 = np.asarray(rl_rollout.kl_penalty(lp.astype(np.float32), ref.astype(np.float32), "k1"))
    k3 = np.asarray(rl_rollout.kl_penalty(lp.astype(np.float32), ref.astype(np.float32), "k3"))
    for b, t in np.ndindex(lp.shape):  # Schulman, "Approximating KL divergence" (2020)
        r = math.exp(ref[b, t] - lp[b, t])  # π_ref / π at a sample of π
        np.testing.assert_allclose(k1[b, t], -math.log(r), **TOL)
        np.testing.assert_allclose(k3[b, t], (r - 1) - math.log(r), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError):
        rl_rollout.kl_penalty(lp, ref, "k2")

    logits = rng.normal(0, 3, (2, 5, V)).astype(np.float32)
    ent = np.asarray(rl_rollout.entropy(logits))
    for b, t in np.ndindex(ent.shape):
        logp = _log_softmax(logits[b, t])
        np.testing.assert_allclose(ent[b, t], -np.sum(np.exp(logp) * logp), **TOL)


def test_adaptive_kl_controller_follows_ziegler():
    """β_{k+1} = β_k·(1 + K_β·e_k), e_k = clip(KL_k/KL_target − 1, −0.2, 0.2), K_β = n/horizon
    (Ziegler et al. 2019, §2.2; n the sequences of the rollout)."""
    c = ppo.KLController(0.1, target=3.0, horizon=500)
    beta = 0.1
    for kl, n in [(6.0, 32), (3.3, 32), (0.0, 64), (2.7, 16), (3.0, 8)]:
        c.update(kl, n)
        beta *= 1 + min(max(kl / 3.0 - 1, -0.2), 0.2) * n / 500
        np.testing.assert_allclose(c.value, beta, rtol=1e-12)
    fixed = ppo.KLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1


# ---------------------------------------------------------------------------------------------
# GAE, whitening, the PPO losses


def _gae_direct(r, v, gamma, lam):
    """GAE of one response as the explicit sum A_j = Σ_k (γλ)^k δ_{j+k} (Schulman et al. 2016,
    eq. 16), δ_j = r_j + γ·V_{j+1} − V_j, V_n = 0: the end of the response is terminal."""
    n = len(r)
    vn = list(v) + [0.0]
    delta = [r[j] + gamma * vn[j + 1] - vn[j] for j in range(n)]
    return [sum((gamma * lam) ** k * delta[j + k] for k in range(n - j)) for j in range(n)]


def test_gae_on_rollout_rows_with_prompts_and_padding():
    """Responses after prompts of different lengths (one reaching the row's end, one of a
    single token); values and rewards outside the response are garbage and must not leak."""
    rng = np.random.default_rng(5)
    T, gamma, lam = 12, 0.9, 0.8
    spans = [(2, 5), (0, 1), (4, 8), (3, 1)]  # (prompt length, response length)
    B = len(spans)
    rewards = rng.normal(0, 1, (B, T)) + 100 * (rng.random((B, T)) < 0.3)  # garbage spikes
    values = rng.normal(0, 1, (B, T)) + 100 * (rng.random((B, T)) < 0.3)
    mask = np.zeros((B, T))
    for b, (P, n) in enumerate(spans):
        mask[b, max(P - 1, 0) : max(P - 1, 0) + n] = 1
    mask[1, -1], mask[1, 0] = 1, 0  # a response that ends at the row's last column
    adv, ret = jax.device_get(ppo.gae(rewards.astype(np.float32), values.astype(np.float32),
                                      mask.astype(np.float32), gamma, lam))  # fmt: skip
    for b in range(B):
        idx = np.flatnonzero(mask[b])
        want = _gae_direct(rewards[b, idx], values[b, idx], gamma, lam)
        np.testing.assert_allclose(adv[b, idx], want, **TOL)
        np.testing.assert_allclose(ret[b, idx], np.asarray(want) + values[b, idx], **TOL)
        assert not adv[b, mask[b] == 0].any() and not ret[b, mask[b] == 0].any()


def test_whiten_uses_valid_tokens_only():
    rng = np.random.default_rng(6)
    x = rng.normal(2, 3, (3, 8)).astype(np.float32)
    mask = (rng.random((3, 8)) < 0.6).astype(np.float32)
    x_garbage = np.where(mask > 0, x, 1e6).astype(np.float32)
    vals = [float(x[b, t]) for b, t in np.ndindex(x.shape) if mask[b, t]]
    mu = sum(vals) / len(vals)
    sd = math.sqrt(sum((a - mu) ** 2 for a in vals) / len(vals) + 1e-8)
    out = np.asarray(ppo.whiten(x_garbage, mask))
    np.testing.assert_allclose(out[mask > 0], (x[mask > 0] - mu) / sd, **TOL)


def test_ppo_loss_fn_equals_the_formulas():
    """L = L_clip + c_V·L_V − c_H·H on minibatch response tokens (Schulman et al. 2017, eq. 9;
    the clipped value loss of the PPO2 / InstructGPT implementations)."""
    rng = np.random.default_rng(7)
    B, T, clip, vclip = 4, 10, 0.2, 0.3
    p = ml_collections.ConfigDict({"clip": clip, "value_clip": vclip, "vf_coef": 0.3,
                                   "ent_coef": 0.01})  # fmt: skip
    params = {"policy": _table_params(rng, T),
              "value": jnp.asarray(rng.normal(0, 1, V), jnp.float32)}  # fmt: skip
    value_apply = lambda vp, tokens, positions, segment_ids: vp[tokens]  # noqa: E731
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    batch = {
        "tokens": tokens, "targets": rng.integers(0, V, (B, T)).astype(np.int32),
        "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
        "segment_ids": np.ones((B, T), np.int32), "loss_mask": np.zeros((B, T), np.float32),
    }  # fmt: skip
    for b, (s, n) in enumerate([(1, 5), (3, 7), (0, 2), (6, 3)]):
        batch["loss_mask"][b, s : s + n] = 1
    lp = _token_logps(params["policy"], tokens, batch["positions"], batch["targets"])
    batch["old_logprobs"] = (lp + rng.normal(0, 0.3, (B, T))).astype(np.float32)
    batch["advantages"] = rng.normal(0, 1, (B, T)).astype(np.float32)
    vals = np.asarray(params["value"], np.float64)[tokens]
    batch["old_values"] = (vals + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    batch["returns"] = rng.normal(0, 1, (B, T)).astype(np.float32)
    loss, m = jax.jit(ppo.ppo_loss_fn(_table_apply, value_apply, p))(params, batch, None)

    pg, vf, ent, n = 0.0, 0.0, 0.0, 0
    table, pos = np.asarray(params["policy"]["table"]), np.asarray(params["policy"]["pos"])
    for b, t in np.ndindex(B, T):
        if not batch["loss_mask"][b, t]:
            continue
        n += 1
        ratio = math.exp(lp[b, t] - batch["old_logprobs"][b, t])
        a = float(batch["advantages"][b, t])
        pg += -min(ratio * a, min(max(ratio, 1 - clip), 1 + clip) * a)
        v, v_old, R = vals[b, t], float(batch["old_values"][b, t]), float(batch["returns"][b, t])
        v_clip = v_old + min(max(v - v_old, -vclip), vclip)
        vf += 0.5 * max((v - R) ** 2, (v_clip - R) ** 2)
        logq = _log_softmax(table[tokens[b, t]] + pos[t])
        ent += -np.sum(np.exp(logq) * logq)
    pg, vf, ent = pg / n, vf / n, ent / n
    np.testing.assert_allclose(float(m["pg_loss"]), pg, **TOL)
    np.testing.assert_allclose(float(m["vf_loss"]), vf, **TOL)
    np.testing.assert_allclose(float(m["entropy"]), ent, **TOL)
    np.testing.assert_allclose(float(loss), pg + 0.3 * vf - 0.01 * ent, **TOL)
    assert float(m["weight"]) == n


# ---------------------------------------------------------------------------------------------
# PPO rollout: KL-shaped rewards, the score on the last token, advantages, the KL controller


def _fake_sample(rng, prompt_lens, resp_lens, seq_len, stopped, empty):
    prompts = [rng.integers(3, V, P).astype(np.int32) for P in prompt_lens]
    N = max(resp_lens)
    tokens = rng.integers(3, V, (len(prompts), N)).astype(np.int32)
    rows = rl_common.rollout_rows(prompts, tokens, np.asarray(resp_lens), seq_len, 0)
    B = len(prompts)
    return {
        "rows": rows, "texts": ["x"] * B, "stopped": np.asarray(stopped, bool),
        "lengths": np.asarray(resp_lens), "empty": np.asarray(empty, bool), "gen_s": 0.0,
        "metas": [{} for _ in range(B)], "prompt_lens": np.asarray(prompt_lens),
        "messages": [None] * B, "sample_logprobs": np.zeros((B, seq_len), np.float32),
    }  # fmt: skip


def _source(cls, config, sample, scored):
    """A RolloutSource subclass with its decoder and scoring replaced by fixed arrays."""
    src = object.__new__(cls)
    src.config, src.iteration, src.errors_logged, src.spec = config, 0, 0, None
    src.cursor = type("Cursor", (), {"take": lambda self, k: list(range(k))})()
    src.sample = lambda params, idx, rng, num_samples=1: sample
    src.score = lambda fn, *args: scored
    src._score = None  # (what `score` would run)
    return src


def _ppo_rollout_reference(s, lp, ref_lp, values, score, valid, cfg):
    """Per-token rewards r_j = −β·kl_j (+ the sequence reward at the last response token),
    GAE over each response, whitening over every valid response token of the rollout."""
    r, p = cfg.rollout, cfg.ppo
    beta = p.kl_coef
    advs, rets, kls = {}, {}, {}
    for b, (P, n) in enumerate(zip(s["prompt_lens"], s["lengths"])):
        if not valid[b]:
            continue
        ts = [P - 1 + j for j in range(n)]  # index of the logprob of response token j
        kl = []
        for t in ts:
            d = float(lp[b, t]) - float(ref_lp[b, t])
            kl.append(d if p.kl_estimator == "k1" else math.exp(-d) - 1 + d)
        seq_r = r.empty_reward if s["empty"][b] else float(score[b])
        seq_r -= r.nonstop_penalty * (not s["stopped"][b])
        rew = [-beta * k for k in kl]
        rew[-1] += seq_r
        vs = [float(values[b, t]) for t in ts]
        a = _gae_direct(rew, vs, p.gamma, p.lam)
        advs[b], rets[b], kls[b] = dict(zip(ts, a)), dict(zip(ts, np.add(a, vs))), sum(kl)
    flat = [x for d in advs.values() for x in d.values()]
    mu = sum(flat) / len(flat)
    sd = math.sqrt(sum((x - mu) ** 2 for x in flat) / len(flat) + 1e-8)
    white = {b: {t: (x - mu) / sd for t, x in d.items()} for b, d in advs.items()}
    return white, rets, kls, flat


def _ppo_cfg(kl_estimator, whiten=True):
    c = ml_collections.ConfigDict()
    c.rollout = rl_common.rollout_config(6)
    c.rollout.empty_reward, c.rollout.nonstop_penalty = -1.0, 0.5
    c.seq_len = 14
    c.ppo = ml_collections.ConfigDict({
        "gamma": 0.95, "lam": 0.9, "whiten_advantages": whiten, "kl_coef": 0.2,
        "kl_estimator": kl_estimator, "kl_target": 2.0, "kl_horizon": 100,
    })  # fmt: skip
    return c


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
def test_ppo_rollout_rewards_advantages_and_kl_controller(kl_estimator):
    rng = np.random.default_rng(8)
    cfg = _ppo_cfg(kl_estimator)
    T = cfg.seq_len
    prompt_lens, resp_lens = [3, 5, 2, 6, 4, 1], [4, 1, 6, 8, 3, 5]
    stopped, empty = [1, 1, 1, 0, 1, 1], [0, 1, 0, 0, 0, 0]
    s = _fake_sample(rng, prompt_lens, resp_lens, T, stopped, empty)
    lp = rng.normal(-2, 0.7, (6, T)).astype(np.float32)
    ref_lp = (lp + rng.normal(0, 0.5, (6, T))).astype(np.float32)
    values = rng.normal(0, 1, (6, T)).astype(np.float32)
    score = rng.normal(0, 2, 6).astype(np.float32)
    out_of_response = s["rows"]["loss_mask"] == 0
    lp[out_of_response], values[out_of_response] = np.nan, 1e6  # must not leak anywhere
    score[4] = np.inf  # row 4: a broken reward-model score, skipped with weight 0
    valid = np.isfinite(score)
    src = _source(ppo.PPOSource, cfg, s, (lp, ref_lp, values, score, lp))
    src.kl = ppo.KLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
    src._gae, src._whiten = jax.jit(ppo.gae), jax.jit(ppo.whiten)
    src.ref_params = src.rm_params = None
    rows, stats = src.make_rollout({"policy": None, "value": None}, None)

    white, rets, kls, raw = _ppo_rollout_reference(s, lp, ref_lp, values, score, valid, cfg)
    for b in range(6):
        want_mask = np.zeros(T)
        for t in white.get(b, {}):
            want_mask[t] = 1
            np.testing.assert_allclose(rows["advantages"][b, t], white[b][t], **TOL)
            np.testing.assert_allclose(rows["returns"][b, t], rets[b][t], **TOL)
        np.testing.assert_array_equal(rows["loss_mask"][b], want_mask)
        assert np.all(np.isfinite(rows["old_logprobs"][b])) and not rows["advantages"][b][
            want_mask == 0].any()  # fmt: skip
    kl_mean = np.mean(list(kls.values()))
    np.testing.assert_allclose(stats["kl"], kl_mean, **TOL)
    np.testing.assert_allclose(stats["kl_coef"], cfg.ppo.kl_coef)
    n = int(valid.sum())
    want_beta = cfg.ppo.kl_coef * (1 + np.clip(kl_mean / 2.0 - 1, -0.2, 0.2) * n / 100)
    np.testing.assert_allclose(src.kl.value, want_beta, rtol=1e-6)
    # The logged spread of the raw (GAE) advantages over the valid response tokens. Regression:
    # `rollout/adv_std` was their root mean square, which reads a non-zero mean as spread.
    np.testing.assert_allclose(stats["adv_std"], np.std(raw), **TOL)
    seq_r = [(-1.0 if empty[b] else score[b]) - 0.5 * (not stopped[b]) for b in range(6)]
    np.testing.assert_allclose(stats["reward_mean"], np.mean(np.asarray(seq_r)[valid]), **TOL)
    np.testing.assert_allclose(stats["score_mean"], np.mean(score[valid]), **TOL)


def test_ppo_rollout_does_not_depend_on_invalid_rows():
    """A sample skipped for a bad score is no token of the whitening statistics: the other
    rows' advantages are those of the rollout without it."""
    rng = np.random.default_rng(9)
    cfg = _ppo_cfg("k3")
    T = cfg.seq_len
    s = _fake_sample(rng, [3, 5, 2, 6], [4, 2, 6, 5], T, [1, 1, 1, 1], [0, 0, 0, 0])
    lp = rng.normal(-2, 0.7, (4, T)).astype(np.float32)
    ref_lp = (lp + rng.normal(0, 0.5, (4, T))).astype(np.float32)
    values = rng.normal(0, 1, (4, T)).astype(np.float32)
    score = rng.normal(0, 2, 4).astype(np.float32)

    def run(keep):
        sub = {k: (v[keep] if isinstance(v, np.ndarray) else [v[i] for i in keep])
               for k, v in s.items() if k not in ("rows", "gen_s")}  # fmt: skip
        sub["rows"] = {k: v[keep] for k, v in s["rows"].items()}
        sub["gen_s"] = 0.0
        sc = score[keep].copy()
        src = _source(ppo.PPOSource, cfg, sub, (lp[keep], ref_lp[keep], values[keep], sc, lp[keep]))
        src.kl = ppo.KLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
        src._gae, src._whiten = jax.jit(ppo.gae), jax.jit(ppo.whiten)
        src.ref_params = src.rm_params = None
        return src.make_rollout({"policy": None, "value": None}, None)[0]

    base = run(np.array([0, 1, 2]))
    score[3] = np.nan
    with_bad = run(np.array([0, 1, 2, 3]))
    np.testing.assert_allclose(with_bad["advantages"][:3], base["advantages"], **TOL)
    assert not with_bad["loss_mask"][3].any()


# ---------------------------------------------------------------------------------------------
# GRPO


def _group_adv_reference(rewards, valid, scale_by_std, eps=1e-4):
    out = np.zeros_like(rewards, np.float64)
    for g in range(rewards.shape[0]):
        xs = [float(x) for x, ok in zip(rewards[g], valid[g]) if ok]
        if not xs:
            continue
        mu = sum(xs) / len(xs)
        sd = math.sqrt(sum((x - mu) ** 2 for x in xs) / len(xs))
        for i in range(rewards.shape[1]):
            if valid[g, i]:
                d = rewards[g, i] - mu
                out[g, i] = d / (sd + eps) if scale_by_std else d
    return out


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_flat_and_invalid_groups(scale_by_std):
    r = np.array([[1, 0, 0, 1, 1], [0.3, 0.3, 0.3, 0.3, 0.3], [2, -1, 0.5, 4, 0],
                  [1, 1, 1, 1, 1], [5, 0, 0, 0, 0]], np.float32)  # fmt: skip
    valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0],
                      [0, 1, 1, 1, 1]], bool)  # fmt: skip
    adv = grpo.group_advantages(r, valid, scale_by_std=scale_by_std)
    np.testing.assert_allclose(adv, _group_adv_reference(r, valid, scale_by_std), **TOL)
    assert not adv[1].any() and not adv[3].any()  # std = 0: no signal, no blow-up
    assert not adv[4].any()  # the one deviating sample is invalid: the rest is flat


def _grpo_loss_reference(logp, old, ref, adv, mask, clip, beta, agg, clip_high=0.0,
                         sequence=False):  # fmt: skip
    """DeepSeekMath's objective; clip_high: DAPO's upper ε; sequence: GSPO's ratio
    s_i = (Π_t π/π_old)^(1/|o_i|) for every token of response i."""
    high = clip_high or clip
    per_seq, terms_all = [], []
    for b in range(logp.shape[0]):
        terms = []
        toks = [t for t in range(logp.shape[1]) if mask[b, t]]
        s_i = math.exp(sum(float(logp[b, t]) - float(old[b, t]) for t in toks) / len(toks)) \
            if toks else 1.0  # fmt: skip
        for t in range(logp.shape[1]):
            if mask[b, t]:
                ratio = s_i if sequence else math.exp(float(logp[b, t]) - float(old[b, t]))
                a = float(adv[b])
                surrogate = min(ratio * a, min(max(ratio, 1 - clip), 1 + high) * a)
                q = math.exp(float(ref[b, t]) - float(logp[b, t]))  # π_ref/π
                terms.append(-surrogate + beta * (q - math.log(q) - 1))  # DeepSeekMath eq. 4
        if terms:
            per_seq.append(sum(terms) / len(terms))  # 1/|o_i| Σ_t
        terms_all += terms
    if agg == "constant":  # Dr. GRPO: Σ_i Σ_t over a constant, rows × row length
        return sum(terms_all) / (logp.shape[0] * logp.shape[1])
    return (sum(per_seq) / len(per_seq)) if agg == "seq" else sum(terms_all) / len(terms_all)


@pytest.mark.parametrize("agg", ["seq", "token", "constant"])
def test_grpo_loss_fn_from_logits_and_padding_rows(agg):
    rng = np.random.default_rng(10)
    B, T, clip, beta = 5, 11, 0.2, 0.04
    params = _table_params(rng, T)
    batch = {"tokens": rng.integers(0, V, (B, T)).astype(np.int32),
             "targets": rng.integers(0, V, (B, T)).astype(np.int32),
             "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
             "segment_ids": np.ones((B, T), np.int32),
             "loss_mask": np.zeros((B, T), np.float32)}  # fmt: skip
    for b, (s, n) in enumerate([(2, 6), (0, 1), (4, 7), (1, 3), (0, 0)]):  # last: skipped
        batch["loss_mask"][b, s : s + n] = 1
    lp = _token_logps(params, batch["tokens"], batch["positions"], batch["targets"])
    batch["old_logprobs"] = (lp + rng.normal(0, 0.3, (B, T))).astype(np.float32)
    batch["ref_logprobs"] = (lp + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    batch["advantages"] = rng.normal(0, 1, B).astype(np.float32)
    g = ml_collections.ConfigDict({"clip": clip, "beta": beta, "loss_agg": agg})
    fn = jax.jit(grpo.grpo_loss_fn(_table_apply, g))  # (eager: ~100 small programs)
    loss, m = fn(params, batch, None)
    want = _grpo_loss_reference(
        lp,
        batch["old_logprobs"],
        batch["ref_logprobs"],
        batch["advantages"],
        batch["loss_mask"],
        clip,
        beta,
        agg,
    )
    np.testing.assert_allclose(float(loss), want, **TOL)
    np.testing.assert_allclose(float(m["pg_loss"]) + beta * float(m["kl"]), want, **TOL)
    weight = {"seq": 4, "token": batch["loss_mask"].sum(), "constant": B}[agg]
    assert float(m["weight"]) == weight
    # More fully masked rows (skipped samples, padding) add nothing to the sum ("constant":
    # they count in its rows, as Dr. GRPO's G counts every sample)
    pad = {k: np.concatenate([v, v[:2]]) for k, v in batch.items()}
    pad["loss_mask"][B:] = 0
    pad["advantages"][B:] = 1e3
    loss_p, m_p = fn(params, pad, None)
    scale = B / (B + 2) if agg == "constant" else 1.0
    np.testing.assert_allclose(float(loss_p), float(loss) * scale, **TOL)
    assert float(m_p["weight"]) == float(m["weight"]) + (2 if agg == "constant" else 0)


def test_dr_grpo_gives_every_response_token_the_same_weight():
    """Dr. GRPO (scale_by_std=False, loss_agg="constant"): a 2-token and an 8-token answer
    with the same |advantage| get the same per-token gradient (with "seq", the paper's
    1/|o_i|, the long wrong answer's tokens were pushed down a quarter as hard)."""
    from flaxlm.alignment.grpo_loss import group_advantages, grpo_loss

    adv = jnp.asarray(group_advantages(np.array([[1.0, 0.0, 1.0, 0.0]]), scale_by_std=False)[0])
    mask = np.zeros((4, 8), np.float32)
    mask[:2, :2] = 1
    mask[2:, :8] = 1
    lp = jnp.full((4, 8), -1.0)
    for agg, long_over_short in (("seq", 0.25), ("constant", 1.0)):
        g = jax.grad(lambda x, agg=agg: grpo_loss(x, lp, lp, adv, mask, clip=0.2, beta=0.0,
                                                  agg=agg)[0])(lp)  # fmt: skip
        np.testing.assert_allclose(float(g[3, 0] / g[1, 0]), long_over_short, rtol=1e-6)
        np.testing.assert_allclose(float(g[2, 0] / g[0, 0]), long_over_short, rtol=1e-6)
    # micro-batches weigh by their rows: grad_accum 2 gives the whole batch's loss and grads
    from flaxlm.train.step import loss_and_grads

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(-1, 0.3, (4, 8)), jnp.float32)
    batch = {"old": lp, "adv": adv, "mask": jnp.asarray(mask)}

    def per_row(p, b, _):  # (x is per row: each micro-batch reads its own rows of it)
        return grpo_loss(p["x"][b["row"]], b["old"], b["old"], b["adv"], b["mask"], clip=0.2,
                         beta=0.0, agg="constant")  # fmt: skip

    batch["row"] = jnp.arange(4)
    whole = loss_and_grads({"x": x}, batch, None, per_row, 1)
    accum = loss_and_grads({"x": x}, batch, jax.random.PRNGKey(0), per_row, 2)
    np.testing.assert_allclose(float(accum[0]), float(whole[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(accum[2]["x"]), np.asarray(whole[2]["x"]), atol=1e-7)


def test_grpo_rollout_advantages_and_masks():
    """Group advantages broadcast to each sample's response tokens only; rewards with the
    empty / non-stop policy; invalid samples weigh nothing and are out of their group's stats."""
    rng = np.random.default_rng(11)
    G, T = 4, 14
    cfg = ml_collections.ConfigDict()
    cfg.rollout = rl_common.rollout_config(8)
    cfg.rollout.empty_reward, cfg.rollout.nonstop_penalty = -0.5, 0.25
    cfg.seq_len = T
    cfg.grpo = ml_collections.ConfigDict({"group_size": G, "scale_by_std": True})
    prompt_lens = [3] * G + [5] * G
    resp_lens = [4, 2, 6, 1, 3, 5, 8, 2]
    stopped = [1, 1, 0, 1, 1, 1, 1, 1]
    empty = [0, 0, 0, 1, 0, 0, 0, 0]
    s = _fake_sample(rng, prompt_lens, resp_lens, T, stopped, empty)
    s["metas"] = [{"i": i} for i in range(8)]
    base = np.array([1.0, 0.0, 1.0, 0.7, 0.2, 0.2, 0.2, 0.9], np.float32)
    bad = {5}  # this sample's reward function raises

    def rew(meta, text):
        assert meta["i"] != 3  # the empty response is not judged
        if meta["i"] in bad:
            raise ValueError("boom")
        return float(base[meta["i"]])

    lp = rng.normal(-2, 0.5, (8, T)).astype(np.float32)
    ref_lp = (lp + rng.normal(0, 0.3, (8, T))).astype(np.float32)
    src = _source(grpo.GRPOSource, cfg, s, (lp, ref_lp, lp))
    src.rewards, src.ref_params = [("r", rew, 2.0)], None
    rows, stats = src.make_rollout(None, None)

    valid = np.array([i not in bad for i in range(8)])
    r = 2.0 * base
    r = np.where(s["empty"], cfg.rollout.empty_reward, r) - 0.25 * (~s["stopped"])
    want_adv = _group_adv_reference(r.reshape(-1, G), valid.reshape(-1, G), True).reshape(-1)
    np.testing.assert_allclose(rows["advantages"], want_adv, **TOL)
    for b, (P, n) in enumerate(zip(prompt_lens, resp_lens)):
        want = np.zeros(T)
        if valid[b]:
            want[P - 1 : P - 1 + n] = 1
        np.testing.assert_array_equal(rows["loss_mask"][b], want)
    kl = [
        sum(
            math.exp(ref_lp[b, t] - lp[b, t]) - (ref_lp[b, t] - lp[b, t]) - 1
            for t in range(T)
            if rows["loss_mask"][b, t]
        )
        for b in range(8)
        if valid[b]
    ]
    np.testing.assert_allclose(stats["kl"], np.mean(kl), rtol=1e-5)
    np.testing.assert_allclose(stats["reward_mean"], r[valid].mean(), **TOL)
    # group 2's valid rewards 0.4, 1.8 (0.2 ×2 after weights, one raised): not flat
    assert stats["flat_groups"] == 0.0


def test_grpo_flat_groups_counts_equal_float_rewards():
    """Regression: `rollout/flat_groups` came from np.nanstd(...) == 0, but the std of G equal
    rewards that are not exact binary fractions (0 − nonstop_penalty = −0.1 for a group whose
    samples all ran out of tokens, common early on) is ~1e-17, not 0, at some group sizes (3,
    6, 7): such groups (A = 0, no signal) went uncounted."""
    rng = np.random.default_rng(12)
    G, T = 3, 10
    cfg = ml_collections.ConfigDict()
    cfg.rollout = rl_common.rollout_config(3 * G)
    cfg.rollout.nonstop_penalty = 0.1
    cfg.seq_len = T
    cfg.grpo = ml_collections.ConfigDict({"group_size": G, "scale_by_std": True})
    stopped = [0] * G + [0] * G + [1] * G  # two groups that never stop
    s = _fake_sample(rng, [2] * 3 * G, [3] * 3 * G, T, stopped, [0] * 3 * G)
    values = [0.0] * G + [2.0] * G + list(range(G))  # -> −0.1 ×G, 1.9 ×G, a spread

    def rew(meta, text):
        rew.i += 1
        return values[rew.i - 1]

    rew.i = 0
    lp = rng.normal(-2, 0.5, (3 * G, T)).astype(np.float32)
    src = _source(grpo.GRPOSource, cfg, s, (lp, lp, lp))
    src.rewards, src.ref_params = [("r", rew, 1.0)], None
    rows, stats = src.make_rollout(None, None)
    np.testing.assert_allclose(rows["advantages"][: 2 * G], 0.0, atol=1e-9)
    assert np.abs(rows["advantages"][2 * G :]).max() > 1.0
    np.testing.assert_allclose(stats["flat_groups"], 2 / 3)


def _heldout_pairs(rng, n, T):
    """Rendered pairs as `render_preferences` gives them: (ids, mask) per side, the mask on the
    response ids; uneven prompt and response lengths."""
    pairs = []
    for i in range(n):
        P = int(rng.integers(1, 4))
        prompt = rng.integers(0, V, P).tolist()
        sides = {}
        for side in ("chosen", "rejected"):
            k = int(rng.integers(1, T - P))
            sides[side] = (np.asarray(prompt + rng.integers(0, V, k).tolist(), np.int32),
                           np.asarray([0.0] * P + [1.0] * k, np.float32))  # fmt: skip
        pairs.append({**sides, "margin": 0.0, "meta": {"pair": "ab"[i % 2]}})
    return pairs


@pytest.mark.parametrize("same_reference,loss_type", [(False, "sigmoid"), (True, "sigmoid"),
                                                     (False, "aot_pair")])  # fmt: skip
def test_dpo_heldout_eval_equals_the_reference(same_reference, loss_type):
    """make_eval_fn over 11 pairs in batches of 8 (the last one padded): the mean per-pair
    loss, accuracy with ties ½ (the reference itself as policy: every margin 0, accuracy ½),
    the mean margin, the length-normalised log-probability accuracy, accuracy per pair kind.
    AOT's loss: of the whole held-out set's quantiles (all 11 pairs sorted at once, the padding
    rows left out), not a mean over its batches."""
    from flaxlm.models.sharding import logical_axis_rules, make_mesh

    rng = np.random.default_rng(13)
    T = 10
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    rules = logical_axis_rules("fsdp")
    # (the eval's log-probabilities in 2 micro-batches of 4 pairs, as grad_accum=2 trains)
    cfg = ml_collections.ConfigDict({"seq_len": T, "batch_size": 8, "sharding": "fsdp",
                                     "dpo": _dpo_cfg(loss_type, 0.5),
                                     "opt": {"grad_accum": 2}})  # fmt: skip
    params = _table_params(rng, T)
    ref_params = params if same_reference else _table_params(rng, T)
    pairs = _heldout_pairs(rng, 11, T)
    ref = dpo.RefLogps(_table_apply, ref_params, mesh, rules, cache=True)
    out = dpo.make_eval_fn(cfg, mesh, _table_apply, ref, pairs, 0, None, None)(params)

    def seq(p, ids, mask):
        lp = _token_logps(p, ids[None, :-1], np.arange(len(ids) - 1)[None], ids[None, 1:])[0]
        return float((lp * mask[1:]).sum()), float(mask[1:].sum())

    won, loss, margin, logp_won, by_kind = [], [], [], [], {"a": [], "b": []}
    sides = []
    for pr in pairs:
        (pc, lc), (prj, lr) = seq(params, *pr["chosen"]), seq(params, *pr["rejected"])
        rc, rr = seq(ref_params, *pr["chosen"])[0], seq(ref_params, *pr["rejected"])[0]
        h = (pc - rc) - (prj - rr)
        sides.append((pc - rc, prj - rr))
        loss.append(-_logsig(0.5 * h))
        w = 0.5 if same_reference else float(h > 0)  # a tie counts ½
        won.append(w)
        by_kind[pr["meta"]["pair"]].append(w)
        margin.append(0.5 * h)
        logp_won.append(pc / lc > prj / lr)
    if loss_type == "aot_pair":
        a, b = np.array(sides).T
        loss = _aot_reference(a, b, [True] * len(a), 0.5)
        # (each batch's own quantiles, 8 and 3 pairs, would give another loss)
        per_batch = [_aot_reference(a[i : i + 8], b[i : i + 8], [True] * 8, 0.5) for i in (0, 8)]
        assert abs(sum(map(sum, per_batch)) / len(a) - np.mean(loss)) > 1e-3
    np.testing.assert_allclose(out["loss"], np.mean(loss), **TOL)
    np.testing.assert_allclose(out["accuracy"], np.mean(won), **TOL)
    np.testing.assert_allclose(out["margin"], np.mean(margin), **TOL)
    np.testing.assert_allclose(out["logp_accuracy"], np.mean(logp_won), **TOL)
    for k in "ab":
        np.testing.assert_allclose(out[f"acc_{k}"], np.mean(by_kind[k]), **TOL)


def test_grpo_reasoning_rewards_judge_the_answer_after_the_marker():
    """grpo.reasoning_end: reward functions get the answer after the last marker (and, if they
    take it, the reasoning); a response whose reasoning never ends gets empty_reward."""
    rng = np.random.default_rng(14)
    G, T = 2, 10
    cfg = ml_collections.ConfigDict()
    cfg.rollout = rl_common.rollout_config(2 * G)
    cfg.rollout.empty_reward = -1.0
    cfg.seq_len = T
    cfg.grpo = ml_collections.ConfigDict({"group_size": G, "scale_by_std": False,
                                          "reasoning_end": "</think>"})  # fmt: skip
    s = _fake_sample(rng, [2] * 2 * G, [3] * 2 * G, T, [1] * 2 * G, [0] * 2 * G)
    s["texts"] = ["<think>so 4</think>\n\n4", "<think>hmm</think> a </think>  5",
                  "<think>thinking on and on", "no think block at all"]  # fmt: skip
    seen = []

    def rew(meta, text, reasoning):
        seen.append((text, reasoning))
        return 1.0 if text == "4" else 0.5

    lp = rng.normal(-2, 0.5, (2 * G, T)).astype(np.float32)
    src = _source(grpo.GRPOSource, cfg, s, (lp, lp, lp))
    src.rewards, src.ref_params = [("r", rew, 1.0)], None
    rows, stats = src.make_rollout(None, None)
    # the two unended ones have no answer: not judged
    assert seen == [("4", "<think>so 4"), ("5", "<think>hmm</think> a ")]
    r = np.array([1.0, 0.5, -1.0, -1.0])
    want = (r.reshape(-1, G) - r.reshape(-1, G).mean(1, keepdims=True)).reshape(-1)
    np.testing.assert_allclose(rows["advantages"], want, **TOL)
    assert stats["reasoning_unfinished"] == 0.5 and stats["reward_mean"] == pytest.approx(r.mean())


def test_grpo_responses_without_an_answer_get_empty_reward_unjudged():
    """Regression: the reward functions were called on empty answers and unfinished reasonings
    too, and one that raised or returned NaN on "" (`response.split()[-1]`) marked the sample
    invalid: the empty_reward it got afterwards reached no advantage (0) and no loss (weight
    0), so the policy was never pushed away from answering nothing. Such samples are now not
    judged and stay valid with empty_reward; a reward that fails on every judged sample still
    raises, empty ones or not."""
    rng = np.random.default_rng(17)
    G, T = 4, 14
    cfg = ml_collections.ConfigDict()
    cfg.rollout = rl_common.rollout_config(G)
    cfg.rollout.empty_reward = -1.0
    cfg.seq_len = T
    cfg.grpo = ml_collections.ConfigDict({"group_size": G, "scale_by_std": True,
                                          "reasoning_end": "</think>"})  # fmt: skip
    s = _fake_sample(rng, [3] * G, [5, 5, 1, 8], T, [1, 1, 1, 0], [0, 0, 1, 0])
    s["texts"] = ["<think>ok</think> 7", "<think>ok</think> 3", "", "<think>still thinking"]
    s["metas"] = [{"answer": "7"}] * G

    def last_number(meta, response):  # a plausible user reward: IndexError on ""
        return float(response.split()[-1] == meta["answer"])

    lp = rng.normal(-2, 0.5, (G, T)).astype(np.float32)
    src = _source(grpo.GRPOSource, cfg, s, (lp, lp, lp))
    src.rewards, src.ref_params = [("last_number", last_number, 1.0)], None
    rows, stats = src.make_rollout(None, None)
    r = np.array([1.0, 0.0, -1.0, -1.0])
    np.testing.assert_allclose(rows["advantages"], (r - r.mean()) / (r.std() + 1e-4), **TOL)
    assert (rows["advantages"][2:] < 0).all() and (rows["loss_mask"].sum(1) > 0).all()
    assert stats["bad_reward"] == 0 and stats["reward_mean"] == pytest.approx(r.mean())
    assert stats["r_last_number"] == pytest.approx(0.5)  # over the two it judged

    src = _source(grpo.GRPOSource, cfg, s, (lp, lp, lp))
    src.rewards, src.ref_params = [("broken", lambda meta, text: 1 / 0, 1.0)], None
    with pytest.raises(RuntimeError, match="no valid sample"):
        src.make_rollout(None, None)


def test_grpo_kl_metric_is_over_every_valid_response_with_mask_truncated():
    """Regression: rollout/kl summed each sample's k3 over the loss mask, which
    grpo.mask_truncated zeroes for cut-off responses, then averaged over the valid samples,
    cut-off ones included: their KL entered as 0 and the metric shrank with their share (2.02
    logged as 0.37 here). It is the KL of the policy's responses to the reference: the same
    with the flag on or off; only the loss mask differs."""
    rng = np.random.default_rng(18)
    G, T = 4, 14
    cfg = ml_collections.ConfigDict()
    cfg.rollout = rl_common.rollout_config(G)
    cfg.seq_len = T
    resp_lens = [4, 5, 6, 7]
    s = _fake_sample(rng, [3] * G, resp_lens, T, [1, 0, 0, 0], [0] * G)
    s["metas"] = [{"r": x} for x in (1.0, 0.0, 0.5, 0.0)]
    lp = rng.normal(-2, 0.5, (G, T)).astype(np.float32)
    ref_lp = (lp + rng.normal(0, 0.5, (G, T))).astype(np.float32)
    resp = s["rows"]["loss_mask"]  # each row's response tokens
    want = np.mean([
        sum(math.exp(ref_lp[b, t] - lp[b, t]) - (ref_lp[b, t] - lp[b, t]) - 1
            for t in range(T) if resp[b, t])
        for b in range(G)
    ])  # fmt: skip
    for flag in (False, True):
        cfg.grpo = ml_collections.ConfigDict({"group_size": G, "scale_by_std": True,
                                              "mask_truncated": flag})  # fmt: skip
        src = _source(grpo.GRPOSource, cfg, s, (lp, ref_lp, lp))
        src.rewards, src.ref_params = [("r", lambda meta, text: meta["r"], 1.0)], None
        rows, stats = src.make_rollout(None, None)
        np.testing.assert_allclose(stats["kl"], want, rtol=1e-5)
        assert (rows["loss_mask"].sum(1) > 0).tolist() == [True] + [not flag] * 3


@pytest.mark.parametrize("agg", ["seq", "token"])
@pytest.mark.parametrize("clip_high,importance", [(0.28, "token"), (0.0, "sequence"),
                                                  (0.004, "sequence")])  # fmt: skip
def test_grpo_variants_equal_their_formulas(agg, clip_high, importance):
    """DAPO's clip-higher and GSPO's sequence-level ratio against the direct formulas, and the
    GSPO gradient: ∂/∂logπ_t of s_i·A_i is s_i·A_i/|o_i| for every token t of response i."""
    rng = np.random.default_rng(15)
    B, T, beta = 4, 9, 0.04
    clip = 0.003 if importance == "sequence" and clip_high else 0.2
    logp = rng.normal(-2, 0.5, (B, T)).astype(np.float32)
    old = (logp + rng.normal(0, 0.3 if importance == "token" else 0.002, (B, T))).astype(
        np.float32)  # fmt: skip
    ref = (logp + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    adv = rng.normal(0, 1, B).astype(np.float32)
    mask = np.zeros((B, T), np.float32)
    for b, (s0, n) in enumerate([(1, 5), (0, 2), (3, 6), (2, 4)]):
        mask[b, s0 : s0 + n] = 1
    loss, m = grpo.grpo_loss(logp, old, ref, adv, mask, clip=clip, beta=beta, agg=agg,
                             clip_high=clip_high, importance=importance)  # fmt: skip
    want = _grpo_loss_reference(logp, old, ref, adv, mask, clip, beta, agg, clip_high,
                                importance == "sequence")  # fmt: skip
    np.testing.assert_allclose(float(loss), want, **TOL)
    if importance == "sequence" and agg == "seq" and beta == 0.04:
        g = jax.grad(lambda lp: grpo.grpo_loss(lp, old, ref, adv, mask, clip=clip, beta=0.0,
                                               agg=agg, clip_high=clip_high,
                                               importance=importance)[0])(logp)  # fmt: skip
        for b in range(B):
            n = mask[b].sum()
            s_i = math.exp(float(((logp[b] - old[b]) * mask[b]).sum()) / n)
            inside = 1 - clip <= s_i <= 1 + (clip_high or clip) or (s_i - 1) * adv[b] < 0
            want_g = -s_i * adv[b] / n / B if inside else 0.0  # mean over the B responses
            np.testing.assert_allclose(np.asarray(g[b])[mask[b] == 1], want_g, rtol=1e-4,
                                       atol=1e-7)  # fmt: skip
            assert not np.asarray(g[b])[mask[b] == 0].any()


def test_grpo_clipfrac_counts_ratios_outside_the_clip_range_clip_high_included():
    """clipfrac: the share of response tokens whose ratio lies outside the range the objective
    clips to, [1 − clip, 1 + clip_high] (DAPO's clip-higher; clip_high 0: 1 + clip). With
    clip 0.2 and clip_high 0.28 a ratio of 1.25 is inside: not clipped."""
    ratio = np.array([[0.7, 0.9, 1.0, 1.1, 1.25, 1.3]], np.float32)
    logp = np.log(ratio).astype(np.float32)
    old, mask, adv = np.zeros_like(logp), np.ones_like(logp), np.ones(1, np.float32)
    for clip_high, hi in ((0.0, 1.2), (0.28, 1.28)):
        want = np.mean((ratio < 0.8) | (ratio > hi))
        _, m = grpo.grpo_loss(logp, old, logp, adv, mask, clip=0.2, beta=0.0, agg="token",
                              clip_high=clip_high)  # fmt: skip
        np.testing.assert_allclose(float(m["clipfrac"]), want, **TOL)
    assert want == pytest.approx(2 / 6)  # (0.7 and 1.3; 1.25 is inside with clip_high)


def test_grpo_overlong_penalty_is_dapos_soft_punishment():
    L_max, buf = 20, 6
    lengths = [5, 14, 15, 17, 20]
    want = [0.0, 0.0, (14 - 15) / 6, (14 - 17) / 6, -1.0]  # eq. 13: (L_max - buf - |y|) / buf
    np.testing.assert_allclose(grpo.overlong_penalty(lengths, L_max, buf), want, rtol=1e-6)
    assert not grpo.overlong_penalty(lengths, L_max, 0).any()
    # in a rollout: added to the reward before the group advantages (Dr. GRPO scaling here)
    G, T = 5, 24
    cfg = ml_collections.ConfigDict()
    cfg.rollout = rl_common.rollout_config(G)
    cfg.rollout.max_new_tokens, cfg.rollout.nonstop_penalty = L_max, 0.0
    cfg.seq_len = T
    cfg.grpo = ml_collections.ConfigDict({"group_size": G, "scale_by_std": False,
                                          "overlong_buffer": buf})  # fmt: skip
    rng = np.random.default_rng(16)
    s = _fake_sample(rng, [2] * G, lengths, T, [1] * G, [0] * G)
    lp = rng.normal(-2, 0.5, (G, T)).astype(np.float32)
    src = _source(grpo.GRPOSource, cfg, s, (lp, lp, lp))
    src.rewards, src.ref_params = [("r", lambda meta, text: 1.0, 1.0)], None
    rows, stats = src.make_rollout(None, None)
    r = 1.0 + np.asarray(want)
    np.testing.assert_allclose(rows["advantages"], r - r.mean(), atol=1e-6)


def test_cached_reference_logps_equal_the_uncached_ones():
    """RefLogps(cache=True) keyed a row by its tokens and targets only: two pairs with the same
    text split at another prompt/response boundary (another loss_mask) shared a key, and the
    second got the reference log-probability summed over the first one's span. Pairs that
    share their chosen rows (several rejected answers per prompt) keep their own values."""
    from flaxlm.models.sharding import logical_axis_rules, make_mesh

    rng = np.random.default_rng(21)
    T, B = 10, 8
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    rules = logical_axis_rules("fsdp")
    params = _table_params(rng, T)
    tokens = rng.integers(0, V, (2, T)).astype(np.int32)
    batch = {"valid": np.ones(B, np.float32)}
    for side, row in (("chosen_", 0), ("rejected_", 1)):
        batch[f"{side}tokens"] = np.repeat(tokens[row : row + 1, :-1], B, 0)
        batch[f"{side}targets"] = np.repeat(tokens[row : row + 1, 1:], B, 0)
        batch[f"{side}positions"] = np.tile(np.arange(T - 1, dtype=np.int32), (B, 1))
        batch[f"{side}segment_ids"] = np.ones((B, T - 1), np.int32)
        # row b's response starts at token 1 + b % 4: the same text, other boundaries
        batch[f"{side}loss_mask"] = (np.arange(T - 1)[None] >= 1 + np.arange(B)[:, None] % 4
                                     ).astype(np.float32)  # fmt: skip
    batch["rejected_targets"][4:, -1] = (batch["rejected_targets"][4:, -1] + 1) % V
    cached = dpo.RefLogps(_table_apply, params, mesh, rules, cache=True)
    cached.precompute([batch])
    got = cached.add(batch)
    want = dpo.RefLogps(_table_apply, params, mesh, rules, cache=False).add(batch)
    for k in ("ref_chosen_logps", "ref_rejected_logps"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6)
    assert len(set(np.round(want["ref_chosen_logps"], 5))) == 4  # four spans


def test_value_loss_counts_only_tokens_where_the_clipped_term_is_larger():
    """Values within ±ε of the old ones: V_clip = V, the two terms are equal, nothing is
    clipped (vf_clipfrac 0); past ε where clipping raises the error: counted."""
    v = jnp.asarray([[0.5, 1.0, 3.0]])
    ret, mask = jnp.asarray([[0.0, 0.0, 0.0]]), jnp.ones((1, 3))
    loss, frac = ppo.value_loss(v, v, ret, mask, 0.2)
    assert float(frac) == 0.0
    np.testing.assert_allclose(float(loss), 0.5 * (0.25 + 1.0 + 9.0) / 3, **TOL)
    old = jnp.asarray([[0.5, 1.0, 2.0]])  # the last value moved by 1.0 > ε
    loss, frac = ppo.value_loss(jnp.asarray([[0.5, 1.0, 1.0]]), old, ret, mask, 0.2)
    assert float(frac) == pytest.approx(1 / 3)  # V_clip = 1.8: (1.8)^2 > 1^2
