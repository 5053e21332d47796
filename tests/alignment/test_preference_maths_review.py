"""Preference-optimisation maths against each paper's formula, losses AND gradients.

Every reference here is float64 numpy written from the published formulas (never by calling
the flaxlm function it checks), with the gradient with respect to the policy's sequence
log-probabilities derived by hand and itself cross-checked by central differences of the
reference loss:

- the DPO family of alignment/dpo.py: sigmoid DPO (Rafailov et al. 2023, eq. 7), cDPO (the
  label flipped with probability ε), IPO (Azar et al. 2023, eq. 17, sequence sums), the
  RSO / SLiC calibration hinge on h, robust DPO (Chowdhury et al. 2024, eq. 10), SimPO (Meng et
  al. 2024, eq. 6, mean token log-probabilities and the margin γ outside β), ORPO (Hong et al.
  2024, NLL + λ·log-odds-ratio term on mean token log-probabilities) and the RPO NLL term;
- and APO-zero / APO-down, NCA, SPPO (hard labels), pairwise EXO (Ji et al. 2024, eq. 16: the
  reverse KL to the label distribution (1 − ε, ε)), DiscoPOP (Lu et al. 2024, eq. 5) and AOT
  (Melnyk et al. 2024: the batch's quantiles, paired and unpaired);
- KTO (Ethayarajh et al. 2024): λ_y − v(x, y) with the batch's detached reference point
  z0 = max(0, mean KL of the mismatched rows);
- the reward model's Bradley–Terry loss with per-pair margins (Llama 2) and the centering term.

Edge cases: β scaling, padding rows and masked tokens, length normalisation, the reference
detached (no gradient into its weights), ε = 0 and 0.5, identical chosen / rejected, the logged
metrics; and the config checks (a bad value is an error naming its key, a key the chosen variant
does not read is not silently accepted). Tolerance: float32 against float64.
"""

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flaxlm.alignment import dpo, kto, reward
from flaxlm.configs import reward as reward_config

_spec = importlib.util.spec_from_file_location(
    "rl_helpers", os.path.join(os.path.dirname(__file__), "rl_helpers.py")
)
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

TOL = {"rtol": 2e-5, "atol": 2e-6}
V = 11  # vocabulary of the table "model"


def _sig(x):
    """σ(x) in float64, stable for any sign."""
    x = np.asarray(x, np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def _logsig(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


# ---------------------------------------------------------------------------------------------
# DPO family: per-pair loss and its gradient (∂/∂π_c, ∂/∂π_r) in float64


def _aot_ref(u, v, real, beta):
    """AOT over the real rows: u and v each sorted, slot i's loss −log σ(β·(u_(i) − v_(i)))
    given to the row holding u_(i); (loss, ∂/∂u, ∂/∂v) per row: with ℓ' = −β·σ(−β·gap),
    ∂/∂u_j = ℓ' at u_j's slot, ∂/∂v_j = −ℓ' at v_j's slot (the sort is locally a fixed
    permutation). Padding rows: 0."""
    real = np.asarray(real, bool)
    idx = np.flatnonzero(real)
    by_u, by_v = idx[np.argsort(u[idx], kind="stable")], idx[np.argsort(v[idx], kind="stable")]
    gap = u[by_u] - v[by_v]
    loss, du, dv = np.zeros(len(u)), np.zeros(len(u)), np.zeros(len(u))
    loss[by_u] = -_logsig(beta * gap)
    du[by_u] = -beta * _sig(-beta * gap)
    dv[by_v] = beta * _sig(-beta * gap)
    return loss, du, dv


def _pref_ref(kind, pc, pr, rc, rr, lc, lr, beta, eps=0.0, gamma=0.0, alpha=0.0, tau=0.05,
              valid=None):  # fmt: skip
    """(loss, ∂loss/∂π_c, ∂loss/∂π_r, reward_c, reward_r) per pair, from each paper (AOT's per
    row: its quantile slot's, of the whole batch of `valid` rows; its gradients of the sum)."""
    pc, pr, rc, rr, lc, lr = (np.asarray(a, np.float64) for a in (pc, pr, rc, rr, lc, lr))
    valid = np.ones(len(pc)) if valid is None else np.asarray(valid)
    h = (pc - rc) - (pr - rr)
    x = beta * h
    if kind == "sigmoid":
        loss, dh = -_logsig(x), -beta * _sig(-x)
    elif kind == "conservative":  # E over a label flipped w.p. ε of DPO's loss
        loss = -(1 - eps) * _logsig(x) - eps * _logsig(-x)
        dh = -(1 - eps) * beta * _sig(-x) + eps * beta * _sig(x)
    elif kind == "ipo":
        loss, dh = (h - 1 / (2 * beta)) ** 2, 2 * (h - 1 / (2 * beta))
    elif kind == "hinge":
        loss, dh = np.maximum(0.0, 1 - x), np.where(x < 1, -beta, 0.0)
    elif kind == "robust":  # unbiased estimator of the clean loss under ε flips
        loss = ((1 - eps) * -_logsig(x) - eps * -_logsig(-x)) / (1 - 2 * eps)
        dh = (-(1 - eps) * beta * _sig(-x) - eps * beta * _sig(x)) / (1 - 2 * eps)
    elif kind == "exo_pair":  # KL((q, 1 − q) ‖ (1 − ε, ε)), q = σ(x)
        q = _sig(x)
        loss = q * (np.log(q) - np.log(1 - eps)) + (1 - q) * (np.log(1 - q) - np.log(eps))
        # dKL/dq = log(q/(1 − q)) − log((1 − ε)/ε) = x − log((1 − ε)/ε); dq/dx = q(1 − q)
        dh = beta * q * (1 - q) * (x - np.log((1 - eps) / eps))
    elif kind == "discopop":  # (1 − σ(x/τ))·(−log σ(x)) + σ(x/τ)·e^(−x)
        m = _sig(x / tau)
        loss = (1 - m) * -_logsig(x) + m * np.exp(-x)
        dm = m * (1 - m) / tau
        dh = beta * (-dm * -_logsig(x) - (1 - m) * _sig(-x) + dm * np.exp(-x) - m * np.exp(-x))
    elif kind in ("aot", "aot_pair"):
        if kind == "aot":  # the policy's chosen-to-rejected log ratio against the reference's
            loss, du, _ = _aot_ref(pc - pr, rc - rr, valid > 0, beta)
            gc, gr = du, -du
        else:  # the chosen log ratios' quantiles against the rejected ones'
            loss, gc, gr = _aot_ref(pc - rc, pr - rr, valid > 0, beta)
    a, b = pc - rc, pr - rr  # (the anchored types read each side's log ratio)
    ds = lambda z: _sig(z) * _sig(-z)  # noqa: E731  (σ')
    if kind == "apo_zero":  # chosen up, rejected down
        loss = 1 - _sig(beta * a) + _sig(beta * b)
        gc, gr = -beta * ds(beta * a), beta * ds(beta * b)
    elif kind == "apo_down":  # both down, the rejected more
        loss = _sig(beta * a) + 1 - _sig(x)
        gc, gr = beta * ds(beta * a) - beta * ds(x), beta * ds(x)
    elif kind == "nca":
        loss = -_logsig(beta * a) - 0.5 * _logsig(-beta * a) - 0.5 * _logsig(-beta * b)
        gc, gr = -beta * _sig(-beta * a) + 0.5 * beta * _sig(beta * a), 0.5 * beta * _sig(beta * b)
    elif kind == "sppo_hard":
        loss = (a - 1 / (2 * beta)) ** 2 + (b + 1 / (2 * beta)) ** 2
        gc, gr = 2 * (a - 1 / (2 * beta)), 2 * (b + 1 / (2 * beta))
    if kind in ("simpo", "orpo"):
        ac, ar = pc / lc, pr / lr
        if kind == "simpo":
            u = beta * (ac - ar) - gamma
            loss = -_logsig(u)
            gc, gr = -_sig(-u) * beta / lc, _sig(-u) * beta / lr
        else:
            # odds(y) = P/(1 − P) with P = exp(mean token log-prob); d log odds / dā = 1/(1 − P)
            lo = lambda a: a - np.log(-np.expm1(a))  # noqa: E731
            v = lo(ac) - lo(ar)
            loss = -ac - beta * _logsig(v)
            gc = -1 / lc - beta * _sig(-v) / (-np.expm1(ac)) / lc
            gr = beta * _sig(-v) / (-np.expm1(ar)) / lr
        rew_c, rew_r = beta * ac, beta * ar
    else:
        if kind not in dpo.ANCHORED + dpo.BATCHWISE:  # functions of h alone
            gc, gr = dh, -dh
        rew_c, rew_r = beta * (pc - rc), beta * (pr - rr)
    loss = loss + alpha * (-pc / lc)  # RPO: + α · per-token NLL of the chosen answer
    gc = gc - alpha / lc
    return loss, gc, gr, rew_c, rew_r


def _inputs(seed, B=16):
    rng = np.random.default_rng(seed)
    lc, lr = rng.integers(1, 30, B).astype(np.float32), rng.integers(1, 30, B).astype(np.float32)
    pc = (-rng.uniform(0.05, 3.0, B) * lc).astype(np.float32)
    pr = (-rng.uniform(0.05, 3.0, B) * lr).astype(np.float32)
    rc = (pc + rng.normal(0, 4, B)).astype(np.float32)
    rr = (pr + rng.normal(0, 4, B)).astype(np.float32)
    return pc, pr, rc, rr, lc, lr


CASES = [("sigmoid", 0.1, 0.0, 0.0, 0.0), ("sigmoid", 1.0, 0.0, 0.0, 0.3),
         ("conservative", 0.1, 0.1, 0.0, 0.0), ("conservative", 0.5, 0.4, 0.0, 0.0),
         ("ipo", 0.1, 0.0, 0.0, 0.0), ("ipo", 1.0, 0.0, 0.0, 0.0),
         ("hinge", 0.1, 0.0, 0.0, 0.0), ("hinge", 2.0, 0.0, 0.0, 0.0),
         ("robust", 0.1, 0.1, 0.0, 0.0), ("robust", 0.5, 0.3, 0.0, 0.0),
         ("simpo", 2.0, 0.0, 1.0, 0.0), ("simpo", 2.5, 0.0, 0.0, 0.0),
         ("simpo", 2.0, 0.0, 0.5, 0.2), ("orpo", 0.1, 0.0, 0.0, 0.0),
         ("orpo", 1.0, 0.0, 0.0, 0.0), ("apo_zero", 0.1, 0.0, 0.0, 0.0),
         ("apo_zero", 1.0, 0.0, 0.0, 0.3), ("apo_down", 0.1, 0.0, 0.0, 0.0),
         ("apo_down", 1.0, 0.0, 0.0, 0.0), ("nca", 0.1, 0.0, 0.0, 0.0),
         ("nca", 1.0, 0.0, 0.0, 0.0), ("sppo_hard", 0.1, 0.0, 0.0, 0.0),
         ("sppo_hard", 1.0, 0.0, 0.0, 0.0), ("exo_pair", 0.1, 1e-3, 0.0, 0.0),
         ("exo_pair", 0.5, 0.3, 0.0, 0.0), ("exo_pair", 1.0, 0.01, 0.0, 0.3),
         ("discopop", 0.05, 0.0, 0.0, 0.0), ("discopop", 0.5, 0.0, 0.0, 0.0),
         ("aot", 0.1, 0.0, 0.0, 0.0), ("aot", 1.0, 0.0, 0.0, 0.3),
         ("aot_pair", 0.1, 0.0, 0.0, 0.0), ("aot_pair", 1.0, 0.0, 0.0, 0.0)]  # fmt: skip


def test_reference_gradients_are_the_derivatives_of_the_reference_losses():
    """The hand-derived gradients above are right: central differences of the float64 losses
    (AOT's, a loss of the whole batch: of its sum, one coordinate at a time, with a padding
    row; DiscoPOP's also at τ = 0.5 and 3)."""
    pc, pr, rc, rr, lc, lr = (a.astype(np.float64) for a in _inputs(7))
    step = 1e-6
    cases = [(*c, 0.05) for c in CASES] + [("discopop", 0.3, 0.0, 0.0, 0.0, 0.5),
                                           ("discopop", 1.0, 0.0, 0.0, 0.0, 3.0)]  # fmt: skip
    for kind, beta, eps, gamma, alpha, tau in cases:
        kw = dict(beta=beta, eps=eps, gamma=gamma, alpha=alpha, tau=tau)
        if kind in dpo.BATCHWISE:
            valid = np.r_[np.ones(len(pc) - 1), 0.0]
            f = lambda c, r: _pref_ref(kind, c, r, rc, rr, lc, lr, valid=valid, **kw)[0].sum()  # noqa: E731,B023
            _, gc, gr, _, _ = _pref_ref(kind, pc, pr, rc, rr, lc, lr, valid=valid, **kw)
            fd_c, fd_r = np.zeros(len(pc)), np.zeros(len(pc))
            for j in range(len(pc)):
                e = np.eye(len(pc))[j] * step
                fd_c[j] = (f(pc + e, pr) - f(pc - e, pr)) / (2 * step)
                fd_r[j] = (f(pc, pr + e) - f(pc, pr - e)) / (2 * step)
            if alpha == 0:
                assert gc[-1] == gr[-1] == 0.0  # (the padding row)
        else:
            f = lambda c, r: _pref_ref(kind, c, r, rc, rr, lc, lr, **kw)[0]  # noqa: E731,B023
            _, gc, gr, _, _ = _pref_ref(kind, pc, pr, rc, rr, lc, lr, **kw)
            fd_c = (f(pc + step, pr) - f(pc - step, pr)) / (2 * step)
            fd_r = (f(pc, pr + step) - f(pc, pr - step)) / (2 * step)
        np.testing.assert_allclose(gc, fd_c, rtol=1e-5, atol=1e-7, err_msg=kind)
        np.testing.assert_allclose(gr, fd_r, rtol=1e-5, atol=1e-7, err_msg=kind)


@pytest.mark.parametrize("kind,beta,eps,gamma,alpha", CASES)
def test_each_variant_loss_rewards_and_gradient(kind, beta, eps, gamma, alpha):
    """preference_loss (+ the RPO term as dpo_loss_fn adds it) and its gradient w.r.t. the
    policy's log-probabilities equal the paper's; the reference's log-probabilities receive no
    gradient from the loss function of the step (they are inputs, or stop_gradient'ed)."""
    pc, pr, rc, rr, lc, lr = _inputs(1)

    def total(c, r):
        losses, rew_c, rew_r = dpo.preference_loss(
            c, r, rc, rr, beta=beta, loss_type=kind, label_smoothing=eps,
            chosen_lengths=lc, rejected_lengths=lr, simpo_gamma=gamma,
        )  # fmt: skip
        losses = losses + alpha * (-c / jnp.maximum(lc, 1.0))
        return losses.sum(), (losses, rew_c, rew_r)

    (_, (losses, rew_c, rew_r)), (gc, gr) = jax.value_and_grad(total, (0, 1), has_aux=True)(pc, pr)
    want, wgc, wgr, wrc, wrr = _pref_ref(kind, pc, pr, rc, rr, lc, lr, beta, eps, gamma, alpha)
    np.testing.assert_allclose(losses, want, **TOL)
    np.testing.assert_allclose(gc, wgc, **TOL)
    np.testing.assert_allclose(gr, wgr, **TOL)
    np.testing.assert_allclose(rew_c, wrc, **TOL)
    np.testing.assert_allclose(rew_r, wrr, **TOL)


@pytest.mark.parametrize("kind", dpo.LOSS_TYPES)
def test_beta_scaling_of_rewards_and_of_the_logistic_losses(kind):
    """Implicit rewards are linear in β; sigmoid DPO depends on β·h only (β = 2 at h is β = 1
    at 2h), IPO's target margin is 1/(2β)."""
    pc, pr, rc, rr, lc, lr = _inputs(2)
    kw = dict(loss_type=kind, chosen_lengths=lc, rejected_lengths=lr, simpo_gamma=0.0,
              label_smoothing=0.1 if kind in dpo.SMOOTHED else 0.0)  # fmt: skip
    _, c1, r1 = dpo.preference_loss(pc, pr, rc, rr, beta=0.5, **kw)
    _, c3, r3 = dpo.preference_loss(pc, pr, rc, rr, beta=1.5, **kw)
    np.testing.assert_allclose(np.asarray(c3), 3 * np.asarray(c1), **TOL)
    np.testing.assert_allclose(np.asarray(r3), 3 * np.asarray(r1), **TOL)
    if kind == "sigmoid":
        a = dpo.preference_loss(pc, pr, rc, rr, beta=2.0, **kw)[0]
        b = dpo.preference_loss(2 * pc, 2 * pr, 2 * rc, 2 * rr, beta=1.0, **kw)[0]
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    if kind == "ipo":  # zero loss and gradient exactly at h = 1/(2β)
        h0 = 1 / (2 * 0.25)
        grad = jax.grad(lambda c: dpo.preference_loss(c, pr, rc, rr, beta=0.25, **kw)[0].sum())
        at = (rc + h0 + (pr - rr)).astype(np.float32)
        np.testing.assert_allclose(dpo.preference_loss(at, pr, rc, rr, beta=0.25, **kw)[0], 0,
                                   atol=1e-8)  # fmt: skip
        np.testing.assert_allclose(grad(at), 0, atol=1e-5)


def test_label_smoothing_zero_is_dpo_and_half_is_refused():
    """ε = 0: cDPO and robust DPO are plain DPO, gradient included. ε = 0.5: not a flat loss —
    cDPO's gradient is β/2·(σ(βh) − σ(−βh)), which pulls every pair back to h = 0 (no
    preference), robust DPO's divides by 0 — so both are refused, naming the key."""
    pc, pr, rc, rr, lc, lr = _inputs(3)

    def loss_and_grad(kind, eps):
        f = lambda c: dpo.preference_loss(c, pr, rc, rr, beta=0.3, loss_type=kind,  # noqa: E731
                                          label_smoothing=eps)[0].sum()  # fmt: skip
        return jax.value_and_grad(f)(pc)

    base = loss_and_grad("sigmoid", 0.0)
    for kind in ("conservative", "robust"):  # (exo_pair: test_exo_pair_needs_0_lt_eps_lt_half)
        got = loss_and_grad(kind, 0.0)
        np.testing.assert_allclose(got[0], base[0], **TOL)
        np.testing.assert_allclose(got[1], base[1], **TOL)
        with pytest.raises(ValueError, match="label_smoothing"):
            loss_and_grad(kind, 0.5)
        cfg = _dpo_cfg(kind, label_smoothing=0.5)
        with pytest.raises(ValueError, match="dpo.label_smoothing=0.5"):
            dpo.check_loss_settings(cfg)
    # (the reference's cDPO at ε = 0.5 is not flat: a nonzero gradient wherever h ≠ 0)
    _, g, _, _, _ = _pref_ref("conservative", pc, pr, rc, rr, lc, lr, 0.3, 0.5)
    h = (pc - rc) - (pr - rr)
    assert np.all(np.sign(g) == np.sign(h)) and np.abs(g).max() > 0.05


def test_exo_pair_needs_0_lt_eps_lt_half_and_its_small_eps_limit():
    """EXO's KL to (1 − ε, ε) is 0 exactly at βh = log((1 − ε)/ε), its gradient 0 there, and
    positive elsewhere: a finite target margin (6.9 at TRL's ε = 1e-3) that grows without bound
    as ε → 0, the loss with it: it is −log ε·σ(−βh) and a rest, q·log q + (1 − q)·log(1 − q)
    − q·log(1 − ε), in [−log 2, −log(1 − ε)] for every ε (so loss/(−log ε) → σ(−βh), a
    sigmoid-shaped loss whose gradient vanishes for pairs far the wrong way). At ε = 0 it is
    log 0: refused by preference_loss and check_loss_settings (naming the key), as ε >= 0.5
    is (its target h <= 0); configs/dpo.py's loss=exo_pair sets 1e-3."""
    from flaxlm.configs import dpo as dpo_config

    pc, pr, rc, rr, _, _ = _inputs(4)
    beta = 0.5
    h = ((pc - rc) - (pr - rr)).astype(np.float64)
    for eps in (0.3, 1e-3, 1e-12, 1e-300):

        def f(c, eps=eps):
            return dpo.preference_loss(c, pr, rc, rr, beta=beta, loss_type="exo_pair",
                                       label_smoothing=eps)[0]  # fmt: skip

        loss = np.asarray(f(pc), np.float64)
        np.testing.assert_allclose(loss, _pref_ref("exo_pair", pc, pr, rc, rr, 1, 1, beta,
                                                   eps)[0], rtol=2e-5, atol=1e-5)  # fmt: skip
        bound = -np.log(eps) * _sig(-beta * h)
        rest = loss - bound
        assert np.all(rest <= -math.log1p(-eps) + 1e-4) and np.all(rest >= -math.log(2) - 1e-4)
        assert np.all(loss > 0)
        # at the target margin: loss 0, gradient 0
        target = math.log((1 - eps) / eps) / beta
        if target < 100:  # (float32: beyond, σ(βh) rounds to 1 before the target)
            at = (rc + (pr - rr) + target).astype(np.float32)
            np.testing.assert_allclose(f(at), 0.0, atol=2e-5)
            np.testing.assert_allclose(jax.grad(lambda c, f=f: f(c).sum())(at), 0.0, atol=2e-4)
    for eps in (0.0, 0.5, -1e-3):
        with pytest.raises(ValueError, match=r"exo_pair DPO needs 0 < label_smoothing < 0.5"):
            dpo.preference_loss(pc, pr, rc, rr, beta=beta, loss_type="exo_pair",
                                label_smoothing=eps)  # fmt: skip
    with pytest.raises(ValueError, match=r"dpo\.label_smoothing=0.0: dpo\.loss_type=exo_pair "
                                         r"needs 0 < ε < 0.5"):  # fmt: skip
        dpo.check_loss_settings(_dpo_cfg("exo_pair", label_smoothing=0.0))
    d = dpo_config.get_config("loss=exo_pair").dpo
    assert d.label_smoothing == 1e-3
    dpo.check_loss_settings(d)


@pytest.mark.parametrize("tau", [0.05, 0.5, 3.0])
def test_discopop_tau_and_far_margins(tau):
    """DiscoPOP at τ = discopop_tau: loss and gradient as the paper's eq. 5 (hand-derived
    gradient) for any τ; at τ < 1 finite where e^(−βh) alone overflows float32 (βh < −88,
    σ(βh/τ) underflowing to 0: ∞·0 would be NaN) — there it is DPO's logistic loss, −βh; τ → 0
    makes the switch a step (logistic below h = 0, exponential above)."""
    pc, pr, rc, rr, lc, lr = _inputs(5)
    beta = 0.3
    f = lambda c: dpo.preference_loss(c, pr, rc, rr, beta=beta, loss_type="discopop",  # noqa: E731
                                      discopop_tau=tau)[0]  # fmt: skip
    want, wgc, _, _, _ = _pref_ref("discopop", pc, pr, rc, rr, lc, lr, beta, tau=tau)
    np.testing.assert_allclose(f(pc), want, **TOL)
    np.testing.assert_allclose(jax.grad(lambda c: f(c).sum())(pc), wgc, **TOL)
    if tau < 1:  # (τ > 1: σ(βh/τ)·e^(−βh) ~ e^(−βh(1 − 1/τ)) overflows: the formula's own)
        far = (rc + (pr - rr) + np.array([-1e4, -500, -300] + [0] * 13)).astype(np.float32)
        loss, g = f(far), jax.grad(lambda c: f(c).sum())(far)
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(g))
        np.testing.assert_allclose(loss[:3], -beta * np.array([-1e4, -500, -300]), rtol=1e-5)
        np.testing.assert_allclose(g[:3], -beta, rtol=1e-5)
    x = np.array([-2.0, -0.5, 0.5, 2.0], np.float32)
    zero = np.zeros_like(x)
    sharp = dpo.preference_loss(x, zero, zero, zero, beta=1.0, loss_type="discopop",
                                discopop_tau=1e-4)[0]  # fmt: skip
    np.testing.assert_allclose(sharp, np.where(x < 0, -_logsig(x), np.exp(-x)), rtol=1e-5)
    # not monotone at h = 0: slope β·((1 − log 2)/(4τ) − ¾), > 0 for τ < 0.1
    tie = (rc + (pr - rr)).astype(np.float32)
    slope = beta * ((1 - math.log(2)) / (4 * tau) - 0.75)
    np.testing.assert_allclose(jax.grad(lambda c: f(c).sum())(tie), slope, rtol=1e-4)
    with pytest.raises(ValueError, match="discopop DPO needs 0 < discopop_tau"):
        dpo.preference_loss(pc, pr, rc, rr, beta=beta, loss_type="discopop", discopop_tau=0.0)


# ---------------------------------------------------------------------------------------------
# The step's loss: from logits, with masked tokens, padding rows and an online reference


def _table_apply(params, tokens, positions, segment_ids):
    del segment_ids
    return params["table"][tokens] + params["pos"][positions]


def _np_seq_logps(params, tokens, positions, targets, mask):
    table, pos = np.asarray(params["table"], np.float64), np.asarray(params["pos"], np.float64)
    logits = table[tokens] + pos[positions]
    m = logits.max(-1, keepdims=True)
    logp = logits - (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return (picked * mask).sum(-1), mask.sum(-1)


def _params(rng, T, scale=1.0):
    return {"table": jnp.asarray(rng.normal(0, 1.5 * scale, (V, V)), jnp.float32),
            "pos": jnp.asarray(rng.normal(0, 0.5 * scale, (T, V)), jnp.float32)}  # fmt: skip


def _pair_batch(rng, B=6, T=14, identical=False):
    """Rows as PreferenceBatches lays them out: prompt then response, loss mask on the response
    targets only, garbage (random) ids under the mask's zeros; the last row padding."""
    batch = {}
    for side in ("chosen", "rejected"):
        if identical and side == "rejected":
            batch.update({k.replace("chosen", "rejected"): v.copy() for k, v in batch.items()})
            continue
        mask = np.zeros((B, T), np.float32)
        for b in range(B):
            p, n = rng.integers(1, 5), rng.integers(1, 9)
            mask[b, p - 1 : p - 1 + n] = 1.0
        batch.update({
            f"{side}_tokens": rng.integers(0, V, (B, T)).astype(np.int32),
            f"{side}_targets": rng.integers(0, V, (B, T)).astype(np.int32),
            f"{side}_positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
            f"{side}_segment_ids": np.ones((B, T), np.int32), f"{side}_loss_mask": mask,
        })  # fmt: skip
    batch["valid"] = np.r_[np.ones(B - 1), 0.0].astype(np.float32)
    return batch


def _dpo_cfg(loss_type, beta=0.2, label_smoothing=0.0, simpo_gamma=0.0, sft_coef=0.0,
             discopop_tau=0.05):  # fmt: skip
    return ml_collections.ConfigDict({"loss_type": loss_type, "beta": beta,
                                      "label_smoothing": label_smoothing,
                                      "simpo_gamma": simpo_gamma, "sft_coef": sft_coef,
                                      "discopop_tau": discopop_tau})  # fmt: skip


def _ref_param_grad(params, batch, d, ref_params):
    """float64 gradient of the batch loss w.r.t. the policy table entries, by the chain rule:
    Σ_b ∂L/∂π_b · ∂π_b/∂θ with ∂π_b/∂θ by central differences of numpy log-probabilities."""
    lp = {s: _np_seq_logps(params, *(batch[f"{s}_{k}"] for k in
                                     ("tokens", "positions", "targets", "loss_mask")))
          for s in ("chosen", "rejected")}  # fmt: skip
    rl = {s: _np_seq_logps(ref_params, *(batch[f"{s}_{k}"] for k in
                                         ("tokens", "positions", "targets", "loss_mask")))[0]
          for s in ("chosen", "rejected")}  # fmt: skip
    (pc, lc), (pr, lr) = lp["chosen"], lp["rejected"]
    loss, gc, gr, rew_c, rew_r = _pref_ref(d.loss_type, pc, pr, rl["chosen"], rl["rejected"],
                                           lc, lr, d.beta, d.label_smoothing, d.simpo_gamma,
                                           d.sft_coef, d.discopop_tau,
                                           valid=batch["valid"])  # fmt: skip
    w = batch["valid"].astype(np.float64)
    n = w.sum()
    grads = {}
    for name in ("table", "pos"):
        g = np.zeros(params[name].shape)
        for idx in np.ndindex(g.shape):
            dl = {}
            for sign in (1, -1):
                p = {k: np.asarray(v, np.float64).copy() for k, v in params.items()}
                p[name][idx] += sign * 1e-5
                dl[sign] = [_np_seq_logps(p, *(batch[f"{s}_{k}"] for k in
                                              ("tokens", "positions", "targets", "loss_mask")))[0]
                            for s in ("chosen", "rejected")]  # fmt: skip
            dpc = (dl[1][0] - dl[-1][0]) / 2e-5
            dpr = (dl[1][1] - dl[-1][1]) / 2e-5
            g[idx] = np.sum(w * (gc * dpc + gr * dpr)) / n
        grads[name] = g
    stats = {"loss": np.sum(w * loss) / n, "rew_c": rew_c, "rew_r": rew_r, "pc": pc, "pr": pr}
    return grads, stats


@pytest.mark.parametrize("kind,beta,eps,gamma,alpha", [
    ("sigmoid", 0.5, 0.0, 0.0, 0.0), ("conservative", 0.5, 0.2, 0.0, 0.0),
    ("ipo", 0.5, 0.0, 0.0, 0.0), ("hinge", 0.5, 0.0, 0.0, 0.0), ("robust", 0.5, 0.2, 0.0, 0.0),
    ("simpo", 2.0, 0.0, 0.5, 0.0), ("orpo", 0.5, 0.0, 0.0, 0.0), ("sigmoid", 0.5, 0.0, 0.0, 0.4),
    ("exo_pair", 0.5, 0.05, 0.0, 0.0), ("discopop", 0.5, 0.0, 0.0, 0.0),
    ("aot", 0.5, 0.0, 0.0, 0.0), ("aot_pair", 0.5, 0.0, 0.0, 0.2),
])  # fmt: skip
def test_step_loss_gradient_metrics_with_online_reference(kind, beta, eps, gamma, alpha):
    """dpo_loss_fn with the reference scored in the step (`ref_apply`): the loss, its gradient
    w.r.t. the policy's weights (float64 chain rule through the paper's ∂L/∂π), no gradient
    into the reference's weights, and the logged metrics — over real pairs only (the padding
    row's garbage changes nothing, AOT's sorts leave it out) with only the response tokens
    summed (lengths from the mask: SimPO / ORPO's |y|)."""
    rng = np.random.default_rng(11)
    batch = _pair_batch(rng)
    params, ref_params = _params(rng, 14), _params(rng, 14, scale=0.8)
    d = _dpo_cfg(kind, beta, eps, gamma, alpha)
    fn = dpo.dpo_loss_fn(_table_apply, d, ref_apply=_table_apply)
    (loss, m), (g, g_ref) = jax.value_and_grad(fn, (0, 3), has_aux=True)(
        params, batch, None, ref_params
    )
    want_g, s = _ref_param_grad(params, batch, d, ref_params)
    np.testing.assert_allclose(float(loss), s["loss"], **TOL)
    for name in want_g:
        np.testing.assert_allclose(np.asarray(g[name]), want_g[name], rtol=1e-3, atol=2e-5,
                                   err_msg=name)  # fmt: skip
    for leaf in jax.tree.leaves(g_ref):
        assert np.all(np.asarray(leaf) == 0.0)
    real = batch["valid"] > 0
    rc, rr = s["rew_c"][real], s["rew_r"][real]
    np.testing.assert_allclose(float(m["rewards/chosen"]), rc.mean(), **TOL)
    np.testing.assert_allclose(float(m["rewards/rejected"]), rr.mean(), **TOL)
    np.testing.assert_allclose(float(m["rewards/margin"]), (rc - rr).mean(), **TOL)
    np.testing.assert_allclose(float(m["rewards/accuracy"]), np.mean(rc > rr), **TOL)
    np.testing.assert_allclose(float(m["logps/chosen"]), s["pc"][real].mean(), **TOL)
    np.testing.assert_allclose(float(m["logps/rejected"]), s["pr"][real].mean(), **TOL)
    assert float(m["weight"]) == real.sum()


@pytest.mark.parametrize("kind", dpo.LOSS_TYPES)
def test_identical_chosen_and_rejected(kind):
    """The same response on both sides: h = 0, the rewards equal (margin 0, accuracy 0: a tie
    is no win), each paper's constant loss (log 2; IPO 1/(4β²); hinge 1; SimPO
    −log σ(−γ); ORPO the NLL + λ·log 2; APO-zero 1; EXO KL((½, ½) ‖ (1 − ε, ε)) =
    −log 2 − ½·log(ε(1 − ε)); DiscoPOP (log 2 + 1)/2; both AOTs log 2: each side's quantiles
    are the other's), and a zero gradient w.r.t. the weights — except ORPO's, which is its NLL
    term's alone. The other anchored losses read each side's log ratio a = π − ρ, not h alone:
    APO-down σ(βa) + ½, NCA −log σ(βa) − log σ(−βa), SPPO 2a² + 1/(2β²), each with a gradient
    (it moves the shared likelihood)."""
    rng = np.random.default_rng(5)
    batch = _pair_batch(rng, identical=True)
    params, ref_params = _params(rng, 14), _params(rng, 14, scale=0.8)
    beta, eps, gamma = 0.4, (0.2 if kind in dpo.SMOOTHED else 0.0), 0.3
    d = _dpo_cfg(kind, beta, eps, gamma)
    fn = dpo.dpo_loss_fn(_table_apply, d, ref_apply=_table_apply)
    (loss, m), g = jax.value_and_grad(fn, has_aux=True)(params, batch, None, ref_params)
    rows = [batch[f"chosen_{k}"] for k in ("tokens", "positions", "targets", "loss_mask")]
    pc, lc = _np_seq_logps(params, *rows)
    real = batch["valid"] > 0
    nll = np.mean(-pc[real] / lc[real])
    ref_c, _ = _np_seq_logps(ref_params, *rows)
    a = (pc - ref_c)[real]
    want = {"sigmoid": math.log(2), "conservative": math.log(2), "robust": math.log(2),
            "ipo": 1 / (4 * beta**2), "hinge": 1.0, "simpo": -float(_logsig(-gamma)),
            "orpo": nll + beta * math.log(2), "apo_zero": 1.0,
            "apo_down": np.mean(_sig(beta * a) + 0.5),
            "nca": np.mean(-_logsig(beta * a) - _logsig(-beta * a)),
            "sppo_hard": np.mean(2 * a**2 + 1 / (2 * beta**2)),
            "exo_pair": -math.log(2) - 0.5 * math.log(eps * (1 - eps)) if eps else None,
            "discopop": (math.log(2) + 1) / 2, "aot": math.log(2),
            "aot_pair": math.log(2)}[kind]  # fmt: skip
    np.testing.assert_allclose(float(loss), want, **TOL)
    assert float(m["rewards/margin"]) == 0.0 and float(m["rewards/accuracy"]) == 0.0
    if kind in ("apo_down", "nca", "sppo_hard"):
        assert max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(g)) > 1e-3
    elif kind != "orpo":
        for leaf in jax.tree.leaves(g):
            np.testing.assert_allclose(np.asarray(leaf), 0.0, atol=1e-6)
    else:
        nll_grad = jax.grad(
            lambda p: dpo.dpo_loss_fn(
                _table_apply, _dpo_cfg("sigmoid", beta, sft_coef=1.0), ref_apply=_table_apply
            )(p, batch, None, ref_params)[0]
        )(params)  # sigmoid's part is 0 here: NLL alone
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(nll_grad)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# DPO config checks: a bad value names its key; a value the loss type would ignore is refused


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge", "simpo", "orpo", "discopop", "aot",
                                  "aot_pair"])  # fmt: skip
def test_label_smoothing_on_a_type_that_ignores_it_is_refused(kind):
    """dpo.label_smoothing=0.1 with loss_type=sigmoid (TRL's spelling of cDPO) trained plain
    DPO without a word; only conservative, robust and exo_pair read ε (TRL's AOT losses read it
    as cDPO's flip rate; here they do not)."""
    with pytest.raises(ValueError, match=rf"dpo.label_smoothing=0.1.*dpo.loss_type={kind}"):
        dpo.check_loss_settings(_dpo_cfg(kind, label_smoothing=0.1))
    dpo.check_loss_settings(_dpo_cfg(kind, label_smoothing=0.0))  # the default: accepted


@pytest.mark.parametrize("key,bad,kind", [
    ("beta", float("inf"), "sigmoid"), ("beta", float("nan"), "ipo"),
    ("sft_coef", float("inf"), "sigmoid"), ("sft_coef", float("nan"), "orpo"),
    ("label_smoothing", float("nan"), "robust"), ("simpo_gamma", float("nan"), "simpo"),
    ("simpo_gamma", -0.5, "simpo"), ("simpo_gamma", float("inf"), "simpo"),
    ("label_smoothing", 0.0, "exo_pair"), ("label_smoothing", 0.5, "exo_pair"),
    ("label_smoothing", -1e-3, "exo_pair"), ("label_smoothing", float("nan"), "exo_pair"),
    ("discopop_tau", 0.0, "discopop"), ("discopop_tau", -0.05, "discopop"),
    ("discopop_tau", float("inf"), "discopop"), ("discopop_tau", float("nan"), "discopop"),
])  # fmt: skip
def test_bad_dpo_numbers_name_their_key(key, bad, kind):
    """Each was accepted: NaN / inf losses from the first step (a negative SimPO γ asks for
    rejected answers up to |γ|/β per token likelier than chosen ones; EXO at ε = 0 has log 0,
    at 0.5 its target is h = 0; DiscoPOP's τ <= 0 flips or breaks its switch). (A string is
    already refused by ConfigDict's typed fields.)"""
    cfg = _dpo_cfg(kind, label_smoothing=0.1 if kind in dpo.SMOOTHED else 0.0)
    cfg[key] = bad
    with pytest.raises(ValueError, match=rf"dpo\.{key}="):
        dpo.check_loss_settings(cfg)


def test_online_dpo_key_prefix_is_used():
    cfg = _dpo_cfg("sigmoid", label_smoothing=0.2)
    with pytest.raises(ValueError, match=r"online\.label_smoothing=0.2"):
        dpo.check_loss_settings(cfg, key="online")


# ---------------------------------------------------------------------------------------------
# KTO


def _kto_ref(pol, ref, label, z0, beta, wd, wu):
    """(per-example loss λ_y − v(x, y), ∂/∂π) with z0 a constant (the paper's reference point)."""
    d = np.asarray(pol, np.float64) - np.asarray(ref, np.float64)
    x = beta * (d - z0)
    good = np.asarray(label) > 0.5
    # λ_D·(1 − σ(x)) = λ_D·σ(−x);  λ_U·(1 − σ(−x)) = λ_U·σ(x)
    loss = np.where(good, wd * _sig(-x), wu * _sig(x))
    grad = np.where(good, -wd * beta * _sig(x) * _sig(-x), wu * beta * _sig(x) * _sig(-x))
    return loss, grad


@pytest.mark.parametrize(
    "beta,wd,wu,kl_shift",
    [(0.1, 1.0, 1.0, 3.0), (0.5, 1.33, 1.0, 1.0), (1.0, 1.0, 1.5, -2.0), (2.0, 0.0, 1.0, 0.5)],
)
def test_kto_loss_gradient_and_detached_reference_point(beta, wd, wu, kl_shift):
    """The step's composition (kl_estimate then kto_loss, mean over real examples): loss and
    gradient w.r.t. the matched log-probabilities as the paper's with z0 constant; no gradient
    into the mismatched ones nor the reference's; z0 = max(0, mean over kl_valid rows)."""
    rng = np.random.default_rng(4)
    B = 12
    pol, ref = rng.normal(-20, 5, B).astype(np.float32), rng.normal(-20, 5, B).astype(np.float32)
    pol_kl = rng.normal(-25, 5, B).astype(np.float32)
    ref_kl = (pol_kl - kl_shift + rng.normal(0, 0.5, B)).astype(np.float32)
    label = (rng.random(B) < 0.5).astype(np.float32)
    valid = np.r_[np.ones(B - 2), 0.0, 0.0].astype(np.float32)
    kl_valid = valid.copy()
    kl_valid[3] = 0.0
    k = ml_collections.ConfigDict({"beta": beta, "desirable_weight": wd,
                                   "undesirable_weight": wu})  # fmt: skip

    def total(p, pk, r, rk):
        z0 = kto.kl_estimate(pk, rk, kl_valid)
        losses, rewards = kto.kto_loss(p, r, label, z0, beta=k.beta,
                                       desirable_weight=k.desirable_weight,
                                       undesirable_weight=k.undesirable_weight)  # fmt: skip
        return jnp.sum(losses * valid) / jnp.sum(valid), (z0, rewards)

    (loss, (z0, rewards)), grads = jax.value_and_grad(total, (0, 1, 2, 3), has_aux=True)(
        pol, pol_kl, ref, ref_kl
    )
    raw = np.sum((pol_kl.astype(np.float64) - ref_kl) * kl_valid) / kl_valid.sum()
    want_z0 = max(raw, 0.0)
    np.testing.assert_allclose(float(z0), want_z0, **TOL)
    per, g = _kto_ref(pol, ref, label, want_z0, beta, wd, wu)
    np.testing.assert_allclose(float(loss), np.sum(per * valid) / valid.sum(), **TOL)
    np.testing.assert_allclose(grads[0], g * valid / valid.sum(), **TOL)
    np.testing.assert_allclose(grads[2], -g * valid / valid.sum(), **TOL)  # (ref: an input)
    assert np.all(np.asarray(grads[1]) == 0) and np.all(np.asarray(grads[3]) == 0)
    np.testing.assert_allclose(rewards, beta * (pol.astype(np.float64) - ref), **TOL)


def test_kto_loss_keeps_its_precision_when_the_value_saturates():
    """λ·(1 − σ(x)) in float32 cancels: at x = β(Δ − z0) = 10 its relative error was 4.6e-4,
    from x ≈ 16.7 the loss and its gradient were exactly 0 (true values 4e-8 at 17, 2e-9 at
    20). As σ(−x) it keeps float32's relative precision."""
    xs = np.array([5.0, 10.0, 17.0, 20.0, 30.0], np.float32)
    for good in (1.0, 0.0):
        sign = 1.0 if good else -1.0  # an undesirable example saturates at Δ − z0 → −∞
        pol = (sign * xs).astype(np.float32)

        def f(p, good=good):
            return kto.kto_loss(p, np.zeros_like(xs), np.full_like(xs, good), 0.0, beta=1.0)[0]

        loss = np.asarray(f(pol))
        grad = np.asarray(jax.grad(lambda p, f=f: f(p).sum())(pol))
        want, wgrad = _kto_ref(pol, np.zeros_like(xs), np.full_like(xs, good), 0.0, 1.0, 1, 1)
        np.testing.assert_allclose(loss, want, rtol=1e-5, atol=0)
        np.testing.assert_allclose(grad, wgrad, rtol=1e-5, atol=0)


@pytest.mark.parametrize("key,bad", [("beta", float("inf")), ("beta", float("nan")),
                                     ("desirable_weight", float("inf")),
                                     ("undesirable_weight", float("nan"))])  # fmt: skip
def test_bad_kto_numbers_name_their_key(key, bad):
    k = ml_collections.ConfigDict({"beta": 0.1, "desirable_weight": 1.0,
                                   "undesirable_weight": 1.0})  # fmt: skip
    k[key] = bad
    with pytest.raises(ValueError, match=rf"kto\.{key}="):
        kto.check_settings(k)


# ---------------------------------------------------------------------------------------------
# Reward model: Bradley–Terry with margin and centering


@pytest.mark.parametrize("lam,use_margin", [(0.0, False), (0.01, True), (0.5, True)])
def test_pairwise_loss_and_gradient(lam, use_margin):
    """L = mean over real pairs of −log σ(r_c − r_r − m) + λ·mean((r_c + r_r)²); ∂L/∂r_c =
    [−σ(−x) + 2λ(r_c + r_r)]/n, ∂L/∂r_r = [σ(−x) + 2λ(r_c + r_r)]/n on real pairs, 0 on padding.
    Metrics: accuracy (r_c > r_r, margin not subtracted, ties lose), margin = mean(r_c − r_r)."""
    rng = np.random.default_rng(9)
    B = 10
    rc, rr = rng.normal(0, 3, B).astype(np.float32), rng.normal(0, 3, B).astype(np.float32)
    rr[1] = rc[1]  # a tie
    rc[4] = 60.0  # saturated
    margin = rng.uniform(0, 2, B).astype(np.float32)
    valid = np.r_[np.ones(B - 3), 0, 0, 0].astype(np.float32)
    m_in = margin if use_margin else None
    (loss, met), (gc, gr) = jax.value_and_grad(
        lambda c, r: reward.pairwise_loss(c, r, m_in, lam, valid), (0, 1), has_aux=True
    )(rc, rr)
    c64, r64 = rc.astype(np.float64), rr.astype(np.float64)
    x = c64 - r64 - (margin if use_margin else 0.0)
    n = valid.sum()
    want = np.sum(valid * -_logsig(x)) / n + lam * np.sum(valid * (c64 + r64) ** 2) / n
    np.testing.assert_allclose(float(loss), want, **TOL)
    np.testing.assert_allclose(gc, valid * (-_sig(-x) + 2 * lam * (c64 + r64)) / n, **TOL)
    np.testing.assert_allclose(gr, valid * (_sig(-x) + 2 * lam * (c64 + r64)) / n, **TOL)
    real = valid > 0
    np.testing.assert_allclose(float(met["accuracy"]), np.mean(rc[real] > rr[real]), **TOL)
    np.testing.assert_allclose(float(met["margin"]), np.mean((c64 - r64)[real]), **TOL)
    # the held-out evaluation's float64 loss: the same formula over its (real) pairs
    got = reward.np_pairwise_loss(rc[real], rr[real], m_in[real] if use_margin else None, lam)
    np.testing.assert_allclose(got, want, rtol=1e-9)


@pytest.mark.parametrize("key,bad", [("center_coef", -0.01), ("center_coef", float("nan")),
                                     ("center_coef", float("inf"))])  # fmt: skip
def test_bad_reward_loss_settings_name_their_key(key, bad):
    """loss.center_coef < 0 rewarded large |r_c + r_r| (the opposite of centering: the loss is
    unbounded below), NaN / inf made every loss NaN / inf."""
    loss = ml_collections.ConfigDict({"use_margin": True, "center_coef": 0.01})
    reward.check_settings(loss)  # the defaults pass
    loss[key] = bad
    with pytest.raises(ValueError, match=rf"loss\.{key}="):
        reward.check_settings(loss)


def test_reward_build_task_refuses_a_negative_center_coef_before_any_load(cache_dir):
    """Checked when the task is built, before anything is read (init_from names no run)."""
    c = H.tiny(reward_config, cache_dir, init_from="/no/such/run", **{"loss.center_coef": -0.5})
    with pytest.raises(ValueError, match=r"loss\.center_coef=-0.5"):
        reward.build_task(c, None, None)
