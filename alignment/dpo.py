"""The DPO family: preference optimisation directly on (prompt, chosen, rejected) pairs, no reward
model, through the shared step and loop.

    python -m flaxlm.train.main --config configs/dpo.py:runlocal=True \
        --config.init_from=runs/sft --workdir runs/dpo --config.dpo.loss_type=ipo

Per pair, with sequence log-probabilities (sums over the response tokens) π_c, π_r of the
policy, ρ_c, ρ_r of the frozen reference, h = (π_c − ρ_c) − (π_r − ρ_r), σ the logistic
function and ε = `label_smoothing`, `preference_loss` computes (`loss_type`):

    sigmoid       −log σ(β·h)                                          DPO (Rafailov et al. 2023)
    conservative  −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)                  cDPO (labels flipped w.p. ε)
    ipo           (h − 1/(2β))²                                        IPO (Azar et al. 2023)
    hinge         max(0, 1 − β·h)                                      SLiC / RSO (Liu et al. 2024)
    robust        [(1 − ε)·(−log σ(β·h)) − ε·(−log σ(−β·h))] / (1 − 2ε)
                                                                       rDPO (Chowdhury et al. 2024)
    simpo         −log σ(β·(π_c/|y_c| − π_r/|y_r|) − γ)                SimPO (Meng et al. 2024)
    orpo          −π_c/|y_c| − β·log σ(log odds_c − log odds_r)        ORPO (Hong et al. 2024)

and, with a = π_c − ρ_c and b = π_r − ρ_r (so h = a − b), losses that also anchor each
response's own likelihood ratio, not only their difference:

    apo_zero      1 − σ(β·a) + σ(β·b)                                  APO-zero (D'Oosterlinck
    apo_down      σ(β·a) + 1 − σ(β·h)                                  APO-down   et al. 2024)
    nca           −log σ(β·a) − ½·log σ(−β·a) − ½·log σ(−β·b)          NCA (Chen et al. 2024)
    sppo_hard     (a − 1/(2β))² + (b + 1/(2β))²                        SPPO, hard labels (Wu et
                                                                       al. 2024; η = 1/β)

APO-zero raises the chosen likelihood and lowers the rejected one (for chosen answers better
than the model's own), APO-down lowers both, the rejected more (for chosen answers worse than
the model's); the paper's forms have no "1 +", a constant that keeps each loss >= 0 (TRL's).
NCA's pairwise loss keeps DPO's drift of both likelihoods down in check; SPPO with hard labels
is IPO's square loss on each side's log ratio with targets ±1/(2β). A pair with the same
answer on both sides (h = 0) still has a gradient under apo_down, nca and sppo_hard.

Two more functions of h alone, with q = σ(β·h) the model's probability that the chosen answer
wins (its pairwise preference) and τ = `discopop_tau`:

    exo_pair      q·log(q/(1 − ε)) + (1 − q)·log((1 − q)/ε)            EXO, pairwise (Ji et al.
                                                                       2024, eq. 16; 0 < ε < ½)
    discopop      (1 − σ(β·h/τ))·(−log σ(β·h)) + σ(β·h/τ)·e^(−β·h)     DiscoPOP (Lu et al. 2024,
                                                                       eq. 5: LRML)

EXO minimises the reverse KL divergence KL(q ‖ p) from the model's preference (q, 1 − q) to the
label's p = (1 − ε, ε), where cDPO's cross-entropy is the forward one, KL(p ‖ q) + a constant:
mode-seeking instead of mean-covering. It is 0 exactly at β·h = log((1 − ε)/ε) (a finite
target margin, 6.9 at ε = 1e-3) and needs ε > 0: at ε → 0 it is −log ε·σ(−β·h) plus a rest in
[−log 2, −log(1 − ε)], its target margin goes to infinity and the loss with it (TRL silently
uses ε = 1e-3 when given 0; here 0 is refused, and configs/dpo.py's loss=exo_pair sets 1e-3).
Like APO's, its gradient vanishes for a pair the policy ranks far the wrong way (q → 0), not
only far the right way. DiscoPOP (an
LLM-discovered loss) blends DPO's logistic loss, where the policy prefers the rejected answer
(β·h < 0), with the exponential loss, where it prefers the chosen one, the switch σ(β·h/τ) as
sharp as τ is small; its loss at h = 0 is (log 2 + 1)/2 and it is not monotone there: its
slope at h = 0 is β·((1 − log 2)/(4τ) − ¾), > 0 for τ < 0.1 (at τ = 0.05 a local minimum at
β·h ≈ −0.12 and a bump at ≈ +0.08, between which its gradient lowers h).

Two AOT losses (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
Transport") compare distributions over the batch instead of pairs. With x_(1) <= ... <= x_(n)
the values of x over the batch's n real pairs sorted (its empirical quantiles):

    aot           (1/n)·Σ_i −log σ(β·(m_(i) − μ_(i))),  m = π_c − π_r,   AOT, paired data
                                                      μ = ρ_c − ρ_r
    aot_pair      (1/n)·Σ_i −log σ(β·(a_(i) − b_(i)))                  AOT, unpaired data

Each asks for first-order stochastic dominance, relaxed by the logistic loss on the quantiles'
differences (1-D optimal transport between the two sorted samples): `aot` that the policy's
log ratio of chosen to rejected dominates the reference's, quantile by quantile; `aot_pair` that
the chosen answers' implicit reward β·a dominates the rejected answers' β·b — each side sorted
on its own, so the pairing is not used: it is the unpaired form, under TRL's (older) name
`aot_pair` (TRL now calls it `aot_unpaired`). A single pair makes both −log σ(β·h), DPO's loss.
Being batch-level:

  * `preference_loss`'s losses[j] is the loss of the quantile slot that row j's m (aot) or a
    (aot_pair) occupies among the real rows: the vector's mean over the real rows is the
    batch's AOT loss, but an entry is not pair j's own loss (it depends on every pair of the
    batch). Padding rows (`valid` = 0, which dpo_loss_fn passes) are left out of both sorts and
    get 0; the implicit rewards are each pair's own, β·a and β·b, as for the other types.
  * Gradient accumulation: each of the `opt.grad_accum` micro-batches (rows k, k + n, ... of the
    batch, train/step.py) is sorted on its own, so the step's loss is the mean of the
    micro-batches' AOT losses (weighted by their real pairs), not the whole batch's: quantiles
    of B/n pairs, not B — noisier, and at B/n = 1 DPO's loss. Keep the micro-batch large.
  * Devices and hosts: the sort is over the whole (global) batch of the jitted step, every
    device's and process's rows together, as one device would sort it (TRL sorts each GPU's
    share of the batch on its own).
  * Held-out evaluation sorts the whole held-out set at once (`make_eval_fn` scores every pair,
    then takes one `preference_loss`): its `loss` is the full set's AOT loss, not a mean over
    batches.

Conventions (each checked against its paper in tests/alignment/test_losses_reference.py): h
uses the sequence sums for every reference-based type — IPO included, as in the paper's eq. 17
(TRL length-normalises IPO's log-probabilities instead); `hinge` is SLiC's calibration hinge
on the reference-normalised h with margin 1/β (RSO's form, TRL's "hinge"), not SLiC-HF's raw
log-likelihood hinge; ε is read by conservative, robust and exo_pair only (TRL reads it as
cDPO's flip rate in its sigmoid and AOT losses; here cDPO is `loss_type=conservative`), and
ε ≠ 0 with another type is refused.

SimPO and ORPO are reference-free and length-normalised: they need each response's token count
|y| (`chosen_lengths`, `rejected_lengths`), which the loss reads off the batch's loss mask; ORPO's
log odds(y) = ā − log(1 − e^ā) with ā = π/|y| the mean token log-probability, and its first
term is the chosen response's (per-token) NLL — SFT and preference in one loss. Implicit rewards:
β·(π − ρ) for the DPO variants, β·π/|y| for SimPO and ORPO.

`dpo.sft_coef` = α > 0 adds α·(−π_c/|y_c|), the chosen response's per-token NLL, to any loss
type (RPO, Pang et al. 2024): plain DPO can satisfy its objective by pushing the rejected
responses down alone, and off-policy rejected responses are not what the policy would say.

Reference log-probabilities (`dpo.ref_logps`): "precompute" runs the reference once over every
training and held-out pair when the task is built (a table keyed by each pair's tokens, so any
order or epoch finds them), so they arrive in the batch as `ref_chosen_logps` /
`ref_rejected_logps`, and then frees the reference weights (`RefLogps.release`); "online"
keeps them and scores every batch inside the jitted step (`loop.Task.frozen`, an argument of
the step as distillation's teacher is), so the host never waits on the device for a batch;
the held-out pairs are scored once when the task is built either way. The loss is the same.
The reference is the `init_from` model (with `init_from_ema` its EMA weights, the policy's
start) unless `dpo.ref_from` names another run (read as its params); `dpo.ref_dtype` may be
bfloat16.

A mixture-of-experts policy (n_experts > 0) adds pretraining's router losses to the loss,
`loss.moe_aux` × load balance + `loss.moe_z` × router z-loss of the policy's forward pass over
both sides' rows (train/losses.py `router_coefs`, `add_router_losses`), and logs `moe/*`:
without them DPO's gradient alone is free to collapse the router onto a few experts.

Metrics (means over the batch's real pairs, `valid` = 1): `rewards/chosen`, `rewards/rejected`,
`rewards/margin`, `rewards/accuracy` (implicit reward of chosen strictly > rejected, as TRL),
`logps/chosen`, `logps/rejected`. Evaluation on held-out pairs: `loss` (the training objective,
RPO term included; with `sft_coef` > 0 also its parts, `pref_loss` and `sft_nll`), the
accuracy and margin with ties counted ½ (at step 0 every DPO-variant margin is 0),
`logp_accuracy` (mean token log-probability of chosen > rejected: a reference-free preference
accuracy that is meaningful at step 0 too), accuracy per pair kind, and greedy generation
accuracy on `eval_gen.sets` (the task metric).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import logging
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.alignment import common, rl_common, rl_eval
from flaxlm.alignment.reward import load_pairs
from flaxlm.config_values import is_real
from flaxlm.data import formats as F
from flaxlm.models import lora as lora_lib
from flaxlm.models.sharding import (
    any_process,
    fetch,
    local_rows,
    logical_axis_rules,
    make_mesh,
    same_batch_count,
    shard_batch,
    use_mesh,
)
from flaxlm.train import loop
from flaxlm.train.losses import add_router_losses, router_coefs, token_logprobs
from flaxlm.train.pretrain import model_fns
from flaxlm.train.step import jit_eval_rows

LOSS_TYPES = ("sigmoid", "conservative", "ipo", "hinge", "robust", "simpo", "orpo", "apo_zero",
              "apo_down", "nca", "sppo_hard", "exo_pair", "discopop", "aot",
              "aot_pair")  # fmt: skip
REFERENCE_FREE = ("simpo", "orpo")
ANCHORED = ("apo_zero", "apo_down", "nca", "sppo_hard")  # not functions of h alone
SMOOTHED = ("conservative", "robust", "exo_pair")  # the types that read label_smoothing (ε)
BATCHWISE = ("aot", "aot_pair")  # losses of the batch's sorted log ratios, not of each pair
DISCOPOP_TAU = 0.05  # DiscoPOP's τ (the paper's; configs/dpo.py `dpo.discopop_tau`)


def check_loss_settings(d, key: str = "dpo") -> None:
    """Raises on a bad loss setting of the DPO section `d`, naming the key: the loss type, and
    ε of conservative / robust in [0, 0.5), of exo_pair in (0, 0.5). cDPO's and EXO's losses
    are smallest at βh = log((1 − ε)/ε): at ε > 0.5 that is where the policy prefers the
    *rejected* answer, at 0.5 at h = 0 (it pulls every pair back to the reference's
    preference), and robust DPO's divides by 1 − 2ε <= 0; EXO's has log ε in it (at ε = 0 its
    target margin is infinite). ε ≠ 0 with any other type is refused too: it would be ignored
    (TRL's sigmoid and AOT losses read it as cDPO; here that is loss_type=conservative).
    build_task calls it before any load or reference precompute (the loss, where robust was
    checked, is traced only after them). β > 0 and finite for every type: at 0 IPO's target
    1/(2β) divided by zero and the others' losses are constants (nothing trains), below 0 they
    prefer the rejected answers, at ∞ the rewards are ±∞ (losses 0, ∞ or NaN); the RPO weight
    `sft_coef` finite and >= 0 (below 0 it raises the chosen answers' NLL); SimPO's target
    margin γ (`simpo_gamma`, read by simpo only) finite and >= 0 (the paper's γ > 0, 0 its
    ablation; below 0 it asks the chosen answer to lose by up to |γ|/β per token); DiscoPOP's τ
    (`discopop_tau`, read by discopop only) > 0 and finite (at 0 the switch σ(βh/τ) divides by
    zero, below 0 it is reversed — the exponential loss where the policy prefers the rejected
    answer, e^(−βh) unbounded there — and at ∞ it is a constant ½)."""
    if d.loss_type not in LOSS_TYPES:
        raise ValueError(f"{key}.loss_type={d.loss_type!r}; expected one of {LOSS_TYPES}")
    if not (_positive(d.beta) and math.isfinite(d.beta)):
        raise ValueError(
            f"{key}.beta={d.beta!r} must be > 0 and finite (the scale of the implicit reward"
            f"{'; ORPO: the odds-ratio term' if d.loss_type == 'orpo' else ''})"
        )
    coef = d.get("sft_coef", 0.0)
    if not (is_real(coef) and 0 <= coef < math.inf):
        raise ValueError(f"{key}.sft_coef={coef!r} must be >= 0 and finite (0 = off)")
    eps = d.get("label_smoothing", 0.0)
    if d.loss_type == "exo_pair" and not (is_real(eps) and 0.0 < eps < 0.5):
        raise ValueError(
            f"{key}.label_smoothing={eps}: {key}.loss_type=exo_pair needs 0 < ε < 0.5 (the "
            "label distribution (1 − ε, ε) its KL divergence is to; 0 has log 0 in it and an "
            "infinite target margin, >= 0.5 trains towards the rejected answers; EXO's usual "
            "1e-3)"
        )
    if d.loss_type in SMOOTHED and not (is_real(eps) and 0.0 <= eps < 0.5):
        raise ValueError(
            f"{key}.label_smoothing={eps}: {key}.loss_type={d.loss_type} needs 0 <= ε < 0.5 "
            "(the assumed label-flip rate; >= 0.5 trains towards the rejected answers)"
        )
    if d.loss_type not in SMOOTHED and eps != 0:
        raise ValueError(
            f"{key}.label_smoothing={eps}: {key}.loss_type={d.loss_type} does not read it (only "
            f"{', '.join(SMOOTHED)} do); for cDPO set {key}.loss_type=conservative"
        )
    gamma = d.get("simpo_gamma", 0.0)
    if d.loss_type == "simpo" and not (is_real(gamma) and 0 <= gamma < math.inf):
        raise ValueError(
            f"{key}.simpo_gamma={gamma!r} must be >= 0 and finite (SimPO's target reward margin)"
        )
    tau = d.get("discopop_tau", DISCOPOP_TAU)
    if d.loss_type == "discopop" and not (_positive(tau) and math.isfinite(tau)):
        raise ValueError(
            f"{key}.discopop_tau={tau!r} must be > 0 and finite (DiscoPOP's temperature τ of the "
            "switch σ(βh/τ) between its logistic and exponential losses; the paper's 0.05)"
        )


def _positive(x) -> bool:
    return is_real(x) and x > 0


def _quantile_gaps(u, v, real):
    """u_(r) − v_(r) for each row, r its u's rank among the real rows: u's and v's values over the
    real rows, each sorted on its own, differenced slot by slot (the 1-D optimal transport
    between the two samples), each slot's gap given to the row whose u holds that slot (0 on
    padding rows, which neither sort sees). A sort of the whole array, under jit the global
    batch: every device's rows."""
    pad = (~real).astype(jnp.int32)  # the sorts' first key: the real rows first
    by_u, by_v = jnp.lexsort((u, pad)), jnp.lexsort((v, pad))
    gaps = u[by_u] - v[by_v]  # slot i: the i-th smallest real u against the i-th smallest v
    rank_u = jnp.zeros_like(by_u).at[by_u].set(jnp.arange(u.shape[0], dtype=by_u.dtype))
    # (padding: 0, not the gap of two garbage values, which could be ∞ − ∞ and its gradient NaN)
    return jnp.where(real, gaps[rank_u], 0.0)


def _log1mexp(a):
    """log(1 − e^a) for a < 0 (a is clamped to <= −1e-6: a response of probability ~1 would
    otherwise have infinite odds)."""
    return jnp.log(-jnp.expm1(jnp.minimum(a, -1e-6)))


def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                    ref_rejected_logps, *, beta: float, loss_type: str,
                    label_smoothing: float = 0.0, chosen_lengths=None, rejected_lengths=None,
                    simpo_gamma: float = 0.0, discopop_tau: float = DISCOPOP_TAU,
                    valid=None):  # fmt: skip
    """Per-pair losses of the DPO family (module docstring) and the implicit rewards.

    Args:
      policy_*_logps, ref_*_logps: (B,) sequence log-probabilities (sums over the response
        tokens); the reference ones are ignored by the reference-free simpo / orpo.
      beta: the β of each formula (ORPO: the weight λ of its odds-ratio term).
      loss_type: one of LOSS_TYPES.
      label_smoothing: ε of conservative / robust (the assumed label-flip rate, < 0.5) and of
        exo_pair (its label distribution (1 − ε, ε), 0 < ε < 0.5).
      chosen_lengths, rejected_lengths: (B,) response token counts (simpo, orpo).
      simpo_gamma: SimPO's target reward margin γ.
      discopop_tau: DiscoPOP's temperature τ.
      valid: (B,) > 0 for the real pairs (None: every row), read by the batch-level aot /
        aot_pair alone: padding rows are left out of their sorts (and get loss 0); the other
        types' losses are each pair's own, padding rows' included (the caller weighs them 0).

    Returns: (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), float32. aot /
    aot_pair: losses[j] is the loss of the quantile slot of row j's rank (module docstring),
    their mean over the real rows the batch's loss.
    """
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    pc, pr = f32(policy_chosen_logps), f32(policy_rejected_logps)
    eps = float(label_smoothing)
    if loss_type in SMOOTHED:  # (check_loss_settings: the why)
        exo = loss_type == "exo_pair"  # (its KL has log ε: ε = 0 is refused too)
        if not ((0.0 < eps < 0.5) if exo else (0.0 <= eps < 0.5)):
            raise ValueError(f"{loss_type} DPO needs 0 {'<' if exo else '<='} label_smoothing "
                             f"< 0.5, got {eps}")  # fmt: skip
    if isinstance(beta, numbers.Real) and not _positive(beta):  # (a traced β: the caller's)
        raise ValueError(f"{loss_type} DPO needs beta > 0, got {beta!r}")
    if loss_type == "discopop" and not (_positive(discopop_tau) and math.isfinite(discopop_tau)):
        raise ValueError(f"discopop DPO needs 0 < discopop_tau < inf, got {discopop_tau!r}")
    if loss_type in REFERENCE_FREE:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type={loss_type!r} needs chosen_lengths / rejected_lengths")
        ac = pc / jnp.maximum(f32(chosen_lengths), 1.0)  # mean token log-probabilities
        ar = pr / jnp.maximum(f32(rejected_lengths), 1.0)
        rew_c, rew_r = beta * ac, beta * ar
        if loss_type == "simpo":
            losses = -jax.nn.log_sigmoid(beta * (ac - ar) - simpo_gamma)
        else:
            log_odds = (ac - _log1mexp(ac)) - (ar - _log1mexp(ar))
            losses = -ac - beta * jax.nn.log_sigmoid(log_odds)
        return losses, rew_c, rew_r
    rc, rr = f32(ref_chosen_logps), f32(ref_rejected_logps)
    a, b = pc - rc, pr - rr  # each side's log likelihood ratio
    h = a - b
    rew_c, rew_r = beta * a, beta * b
    if loss_type == "sigmoid":
        losses = -jax.nn.log_sigmoid(beta * h)
    elif loss_type == "conservative":
        losses = -(1 - eps) * jax.nn.log_sigmoid(beta * h) - eps * jax.nn.log_sigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = jnp.square(h - 1.0 / (2.0 * beta))
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * h)
    elif loss_type == "robust":
        losses = (
            -(1 - eps) * jax.nn.log_sigmoid(beta * h) + eps * jax.nn.log_sigmoid(-beta * h)
        ) / (1 - 2 * eps)
    elif loss_type == "apo_zero":
        losses = 1.0 - jax.nn.sigmoid(beta * a) + jax.nn.sigmoid(beta * b)
    elif loss_type == "apo_down":
        losses = jax.nn.sigmoid(beta * a) + 1.0 - jax.nn.sigmoid(beta * h)
    elif loss_type == "nca":
        losses = (-jax.nn.log_sigmoid(beta * a) - 0.5 * jax.nn.log_sigmoid(-beta * a)
                  - 0.5 * jax.nn.log_sigmoid(-beta * b))  # fmt: skip
    elif loss_type == "sppo_hard":
        losses = jnp.square(a - 0.5 / beta) + jnp.square(b + 0.5 / beta)
    elif loss_type == "exo_pair":  # KL((q, 1 − q) ‖ (1 − ε, ε)), q = σ(βh)
        x = beta * h
        log_q, log_1mq = jax.nn.log_sigmoid(x), jax.nn.log_sigmoid(-x)
        losses = (jnp.exp(log_q) * (log_q - math.log1p(-eps))
                  + jnp.exp(log_1mq) * (log_1mq - math.log(eps)))  # fmt: skip
    elif loss_type == "discopop":
        x = beta * h
        # σ(x/τ)·e^(−x) as exp(log σ(x/τ) − x): e^(−x) alone overflows at x < −88 (float32),
        # where σ(x/τ) underflows to 0, and ∞·0 made the loss NaN
        losses = (jax.nn.sigmoid(-x / discopop_tau) * -jax.nn.log_sigmoid(x)
                  + jnp.exp(jax.nn.log_sigmoid(x / discopop_tau) - x))  # fmt: skip
    elif loss_type in BATCHWISE:
        # aot: the policy's log ratio of chosen to rejected against the reference's; aot_pair:
        # the chosen answers' log ratios against the rejected answers', each sorted on its own
        u, v = (pc - pr, rc - rr) if loss_type == "aot" else (a, b)
        real = jnp.ones(u.shape, bool) if valid is None else f32(valid) > 0
        delta = _quantile_gaps(u, v, real)
        losses = jnp.where(real, -jax.nn.log_sigmoid(beta * delta), 0.0)
    else:
        raise ValueError(f"dpo.loss_type={loss_type!r}; expected one of {LOSS_TYPES}")
    return losses, rew_c, rew_r


# ---------------------------------------------------------------------------------------------
# Sequence log-probabilities of both sides

ROW_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")
PAIR = ("chosen_", "rejected_")  # the row prefixes of a preference batch


def rows_logps(apply, params, batch, prefixes=PAIR, moe_stats: bool = False):
    """([sequence log-probability (B,) per prefix], [response length (B,) per prefix]): one
    forward pass over the rows of every prefix together (`{prefix}tokens`, ...; a pair's
    chosen and rejected rows, KTO's matched and mismatched ones). `moe_stats=True` (a
    mixture-of-experts policy) appends the pass's router statistics (`apply`'s convention,
    train/pretrain.py `model_fns`): over every row's real tokens, padding (segment id 0)
    routed nowhere and counted in none."""
    x = {k: jnp.concatenate([batch[f"{p}{k}"] for p in prefixes]) for k in ROW_KEYS}
    args = (params, x["tokens"], x["positions"], x["segment_ids"])
    logits, stats = apply(*args, moe_stats=True) if moe_stats else (apply(*args), None)
    lp = jnp.sum(token_logprobs(logits, x["targets"]) * x["loss_mask"], axis=-1)
    n = jnp.sum(x["loss_mask"], axis=-1)
    out = jnp.split(lp, len(prefixes)), jnp.split(n, len(prefixes))
    return (*out, stats) if moe_stats else out


def pair_logps(apply, params, batch, moe_stats: bool = False):
    """((π_c, π_r) sequence log-probabilities, (|y_c|, |y_r|) response lengths), each (B,):
    one forward pass over the chosen and rejected rows together (+ its router statistics
    with `moe_stats`, as `rows_logps`)."""
    return rows_logps(apply, params, batch, PAIR, moe_stats)


def dpo_loss_fn(apply, d, router: tuple | None = None, ref_apply=None):
    """The loop's loss over a batch of pairs (offline DPO's and online DPO's). `router`
    (train/losses.py `router_coefs`: a mixture-of-experts policy) adds the router losses of the
    policy's forward pass and logs `moe/*`. The reference's log-probabilities, with no gradient
    and no router loss, arrive in the batch (`ref_chosen_logps`, `ref_rejected_logps`; the loss
    is `(params, batch, rng)`), or with `ref_apply` are scored here from the frozen reference
    weights the step passes in (`loop.Task.frozen`; the loss is `(params, batch, rng, ref)`)."""

    def loss_fn(params, batch, rng, ref=None):
        del rng
        out = pair_logps(apply, params, batch, moe_stats=router is not None)
        (pc, pr), (lc, lr) = out[:2]
        stats = out[2] if router is not None else {}
        if ref_apply is None:
            rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            (rc, rr), _ = pair_logps(ref_apply, jax.lax.stop_gradient(ref), batch)
        w = batch["valid"]
        losses, rew_c, rew_r = preference_loss(
            pc, pr, rc, rr, beta=d.beta,
            loss_type=d.loss_type, label_smoothing=d.label_smoothing, chosen_lengths=lc,
            rejected_lengths=lr, simpo_gamma=d.simpo_gamma,
            discopop_tau=d.get("discopop_tau", DISCOPOP_TAU), valid=w,
        )  # fmt: skip
        if d.sft_coef:  # RPO: + α·(per-token NLL of the chosen response)
            losses = losses + d.sft_coef * (-pc / jnp.maximum(lc, 1.0))
        n = jnp.maximum(jnp.sum(w), 1.0)
        mean = lambda x: jnp.sum(x * w) / n  # noqa: E731
        metrics = {
            "rewards/chosen": mean(rew_c),
            "rewards/rejected": mean(rew_r),
            "rewards/margin": mean(rew_c - rew_r),
            "rewards/accuracy": mean((rew_c > rew_r).astype(jnp.float32)),
            "logps/chosen": mean(pc),
            "logps/rejected": mean(pr),
            "weight": jnp.sum(w),
        }
        return add_router_losses(mean(losses), metrics, stats, router)

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Reference log-probabilities in the data path


def _row_key(batch, b: int, prefixes) -> bytes:
    """Batch row b's cache key: every field the reference's log-probability depends on, of
    every prefix's row. (Tokens and targets alone gave two rows that split the same text at
    another prompt/response boundary, another `loss_mask`, one key: the second got a sum over
    the first's span.)"""
    h = hashlib.blake2b(digest_size=16)
    for p in prefixes:
        for k in ROW_KEYS:
            h.update(np.ascontiguousarray(batch[f"{p}{k}"][b]).tobytes())
    return h.digest()


class RefLogps:
    """Reference sequence log-probabilities of a batch's rows — `ref_{prefix}logps` (B,) for
    each row prefix: `ref_chosen_logps`, `ref_rejected_logps` of preference batches (the
    default), `ref_logps`, `ref_kl_logps` of KTO's (prefixes "", "kl_") — cached by the
    tokens of each batch row's rows of every prefix (`cache=True`, filled by `precompute`) or
    computed per batch (`cache=False`).

    With a cache, `release()` drops the reference weights once every pair is scored (a whole
    model in device memory for nothing: 14 GB for a 7B reference in bfloat16); a pair missing
    from the table after that reloads them with `reload()` (a warning), so a miss costs time,
    never a wrong value.
    """

    def __init__(self, apply, params, mesh, rules, cache: bool, zeros: bool = False, reload=None,
                 prefixes=PAIR):  # fmt: skip
        self.params, self.mesh, self.rules = params, mesh, rules
        self.prefixes = tuple(prefixes)
        self.table: dict[bytes, tuple[float, ...]] | None = {} if cache else None
        self.zeros = zeros  # reference-free losses: no forward pass at all
        self._fn = jax.jit(lambda p, b: rows_logps(apply, p, b, self.prefixes)[0])
        self._reload = reload  # () -> params, the reference loaded again (after `release`)
        self.forward_rows = 0  # batch rows the reference has scored (tests, logs)

    def release(self) -> None:
        """Drops the reference weights (cache mode with a `reload` only)."""
        if self.table is not None and self._reload is not None:
            self.params = None

    def _forward(self, batch) -> list[np.ndarray]:
        if self.params is None:
            logging.warning(
                "dpo: a preference pair missing from the precomputed reference table; "
                "reloading the reference model to score it (it stays loaded from now on)"
            )
            self.params = self._reload()
        rows = {f"{p}{k}": batch[f"{p}{k}"] for p in self.prefixes for k in ROW_KEYS}
        with use_mesh(self.mesh, self.rules):
            out = local_rows(self._fn(self.params, shard_batch(rows, self.mesh)))
        self.forward_rows += len(out[0])
        return [np.asarray(x, np.float32) for x in out]

    def add(self, batch: dict) -> dict:
        """`batch` with `ref_{prefix}logps` (B,) added for each row prefix."""
        B = len(batch["valid"])
        if self.zeros:
            cols = [np.zeros(B, np.float32) for _ in self.prefixes]
        elif self.table is None:
            cols = self._forward(batch)
        else:
            keys = [_row_key(batch, b, self.prefixes) for b in range(B)]
            # (several processes: each scores its own rows, in one call they all make)
            if any_process(not all(k in self.table for k in keys)):
                new = self._forward(batch)
                self.table.update({k: tuple(c[b] for c in new) for b, k in enumerate(keys)})
            cols = [np.asarray([self.table[k][i] for k in keys], np.float32)
                    for i in range(len(self.prefixes))]  # fmt: skip
        return {**batch, **{f"ref_{p}logps": c for p, c in zip(self.prefixes, cols)}}

    def precompute(self, batches) -> None:
        # (one call per batch on every process)
        for b in same_batch_count(list(batches), getattr(batches, "blank", None)):
            self.add(b)


class WithRefLogps:
    """A preference-batch iterator whose batches carry the reference log-probabilities."""

    def __init__(self, inner, ref: RefLogps):
        self.inner, self.ref = inner, ref

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.ref.add(next(self.inner))

    def get_state(self) -> dict:
        return self.inner.get_state()

    def set_state(self, st: dict) -> None:
        self.inner.set_state(st)


def _pair_batches(pairs, config, pad_id, **kw):
    return F.PreferenceBatches(
        pairs, seq_len=config.seq_len, batch=config.batch_size // jax.process_count(),
        pad_id=pad_id, process_index=jax.process_index(), process_count=jax.process_count(), **kw,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Evaluation and task


def make_eval_fn(config, mesh, apply, ref: RefLogps, heldout, pad_id, gen_eval, spec):
    """params -> held-out preference metrics (+ greedy generation metrics). The policy's
    log-probabilities of each batch's pairs come from `opt.grad_accum` micro-batches of pairs,
    as the train step splits them (train/step.py `eval_rows`: a pair's chosen and rejected
    rows together): one pass over both sides of the whole batch could run out of memory where
    training fits. The metrics are over the whole held-out set's pairs, whatever the split."""
    d = config.dpo
    # Several processes: each holds its share of the held-out pairs; the metrics are over
    # every process's rows (gathered), the same on all.
    it = _pair_batches(heldout, config, pad_id, shuffle=False, num_epochs=1,
                       with_index=True) if heldout else None  # fmt: skip
    host = [ref.add(b) for b in same_batch_count(list(it), it.blank)] if heldout else []
    kinds = [p["meta"].get("pair", "") for p in heldout]
    fn = jit_eval_rows(lambda p, b: pair_logps(apply, p, b), config.opt.grad_accum)

    def eval_fn(params):
        out, cols = {}, collections.defaultdict(list)
        for hb in host:
            with use_mesh(mesh, logical_axis_rules(config.sharding)):
                b = shard_batch(hb, mesh)
                (pc, pr), (lc, lr) = fetch(fn(params, b))
            # every process's rows of the host fields, in the global order of the outputs
            h = fetch({k: b[k] for k in ("valid", "index", "ref_chosen_logps",
                                         "ref_rejected_logps")})  # fmt: skip
            keep = h["valid"] > 0
            ref_c, ref_r = h["ref_chosen_logps"], h["ref_rejected_logps"]
            for k, v in zip(("pc", "pr", "lc", "lr", "rc", "rr", "index"),
                            (pc, pr, lc, lr, ref_c, ref_r, h["index"])):  # fmt: skip
                cols[k].append(np.asarray(v)[keep])
        if host:
            c = {k: np.concatenate(v) for k, v in cols.items()}
            losses, rew_c, rew_r = jax.device_get(preference_loss(
                c["pc"], c["pr"], c["rc"], c["rr"], beta=d.beta, loss_type=d.loss_type,
                label_smoothing=d.label_smoothing, chosen_lengths=c["lc"],
                rejected_lengths=c["lr"], simpo_gamma=d.simpo_gamma,
                discopop_tau=d.get("discopop_tau", DISCOPOP_TAU),
            ))  # fmt: skip
            if d.sft_coef:  # the training objective's RPO term too (dpo_loss_fn), and its parts
                nll = -c["pc"] / np.maximum(c["lc"], 1.0)
                out.update({"pref_loss": float(np.mean(losses)), "sft_nll": float(np.mean(nll))})
                losses = losses + d.sft_coef * nll
            won = (rew_c > rew_r) + 0.5 * (rew_c == rew_r)
            out.update({
                "loss": float(np.mean(losses)), "accuracy": float(np.mean(won)),
                "margin": float(np.mean(rew_c - rew_r)),
                "logp_accuracy": float(np.mean(c["pc"] / c["lc"] > c["pr"] / c["lr"])),
            })  # fmt: skip
            out.update(common.accuracy_by_kind(kinds, c["index"], won))
        if gen_eval is not None:
            out.update(gen_eval(lora_lib.merge(params, spec) if spec else params))
        return out

    return eval_fn


def build_task(config, mesh, workdir: str | None = None) -> loop.Task:
    """The DPO-family Task; `init_from` (the SFT run) is required: it is also the reference
    (its EMA weights for both with `init_from_ema`, unless `dpo.ref_from` names the reference)."""
    d = config.dpo
    check_loss_settings(d)
    if d.ref_logps not in ("precompute", "online"):
        raise ValueError(f"dpo.ref_logps={d.ref_logps!r}; expected precompute | online")
    if not config.init_from:
        raise ValueError("dpo: set --config.init_from=SFT_RUN (the policy's start and reference)")
    tok, cfg, template = common.resolve_source(config, mesh)
    if d.ref_from and d.loss_type not in REFERENCE_FREE:  # (before any data or model loads)
        common.check_same_tokenizer(tok, d.ref_from, "dpo.ref_from")
    report, eval_report = F.DataReport(config.data.strict), F.DataReport(config.data.strict)
    train = load_pairs(config.data.train, config, template, report)
    if not train:
        raise common.no_usable(config, "pairs", report)
    heldout = (
        load_pairs(config.data.eval, config, template, eval_report) if config.data.eval else []
    )

    rules = logical_axis_rules(config.sharding)
    free = d.loss_type in REFERENCE_FREE
    # The reference's step: the one this run started with, also on a resume (its logps are
    # scored again on every start)
    ref_key = "dpo.ref_from" if d.ref_from else "init_from"
    pins = rl_common.FrozenSources(
        workdir, {} if free else {ref_key: d.ref_from or config.init_from}
    )
    frozen, ref_cfg, ref_apply = None, None, None  # (online: the reference, scored in the step)
    if free:
        ref = RefLogps(None, None, mesh, rules, cache=False, zeros=True)
    else:
        ref_ema = not d.ref_from and bool(config.get("init_from_ema", False))
        load_ref = functools.partial(
            rl_common.frozen_lm,
            d.ref_from or config.init_from,
            mesh,
            rules,
            d.ref_dtype,
            ref_ema,
            key="dpo.ref_dtype",
            source_key=ref_key,
            step=pins.step(ref_key),
        )
        ref_cfg, ref_apply, ref_params = load_ref()
        ref = RefLogps(
            ref_apply,
            ref_params,
            mesh,
            rules,
            cache=d.ref_logps == "precompute",
            reload=lambda: load_ref()[2],
        )
        online = d.ref_logps == "online"
        # precompute: `ref` holds the only reference to them, release() frees them; online:
        # they are the step's frozen argument (`ref` scores the held-out pairs with them)
        frozen = ref_params if online else None
        del ref_params
        if not online:
            ref.precompute(_pair_batches(train, config, tok.pad_id, shuffle=False, num_epochs=1))
    init_params, apply = model_fns(cfg)
    spec = lora_lib.spec_from_config(config.lora)
    if spec:
        init_params, apply = lora_lib.with_lora(init_params, spec), lora_lib.lora_apply(apply, spec)
    batches = _pair_batches(train, config, tok.pad_id, seed=config.seed,
                            shuffle=config.data.shuffle,
                            **common.train_source_check(config))  # fmt: skip
    if frozen is None:  # precompute (a table look-up) or reference-free (zeros): no forward pass
        batches = WithRefLogps(batches, ref)
    eval_fn = None
    gen_report = F.DataReport(config.data.strict)  # its own section: a file may be both
    if config.eval_every and (heldout or config.eval_gen.sets):
        gen_eval = rl_eval.sets_eval(config, template, cfg, mesh, rules, gen_report)
        eval_fn = make_eval_fn(config, mesh, apply, ref, heldout, tok.pad_id, gen_eval, spec)
    ref.release()  # precompute: every training and held-out pair is scored by now
    data_report = {"train": report.to_dict(), "eval": eval_report.to_dict(),
                   **rl_eval.gen_report_section(gen_report)}  # fmt: skip
    common.write_report(workdir, data_report)
    router = router_coefs(config.get("loss"), cfg.n_experts > 0)  # (None: a dense policy)
    loss_fn = dpo_loss_fn(apply, d, router, ref_apply if frozen is not None else None)
    task = common.supervised_task(
        "dpo", "lm", config, cfg, spec, tok, workdir, data_report,
        init_params=init_params, loss_fn=loss_fn, train_batches=batches,
        eval_fn=eval_fn, extra_meta=pins.meta(),
    )  # fmt: skip
    if frozen is None:
        return task
    # online: the reference's forward pass over every row is part of the step (distill counts
    # its teacher's so): 2 of the 6 FLOPs per parameter and token of training
    return dataclasses.replace(
        task, frozen=frozen,
        flops_per_token=task.flops_per_token + ref_cfg.flops_per_token(config.seq_len) / 3,
        flops_per_token_causal=task.flops_per_token_causal
        + ref_cfg.flops_per_token(config.seq_len, causal=True) / 3,
    )  # fmt: skip


def run(config, workdir: str):
    mesh = make_mesh(dict(config.mesh))
    return loop.run(config, workdir, build_task(config, mesh, workdir), mesh=mesh)
