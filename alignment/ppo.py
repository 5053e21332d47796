"""PPO for RLHF (InstructGPT): a policy and a critic trained on rollouts scored by a frozen reward
model, with a per-token KL penalty to the frozen reference (the SFT model).

    python -m flaxlm.train.main --config configs/ppo.py:runlocal=True \
        --config.init_from=runs/sft --config.reward_from=runs/rm --workdir runs/ppo

One iteration (alignment/rl_rollout.py `RolloutSource`, called by the loop's `before_step`):
  1. generate: `rollout.batch` prompts, one decoder call with the current policy;
  2. score (one jitted call): policy logprobs log π_old, reference logprobs log π_ref, critic
     values V_old per token, and the reward model's score at each response's last token;
     every logprob here and in the loss is at the rollout temperature (below);
  3. rewards per response token: r_t = −β·kl_t, plus the sequence reward at the last token
     (the score; `rollout.empty_reward` for an empty response, minus `nonstop_penalty` for one
     that never stopped); kl_t is the k1 or k3 estimator (`ppo.kl_estimator`); β is fixed or
     adapted toward `ppo.kl_target` per rollout (Ziegler et al. 2019);
  4. advantages: GAE(γ, λ) (`gae`) over the response tokens, whitened over the rollout
     (`whiten`); returns = advantages + V_old (before whitening);
  5. train: `rollout.epochs` passes over the rollout in minibatches of `batch_size` rows — each
     one optimizer step of the shared train_step on the combined loss

         L = L_clip(π) + vf_coef·L_V − ent_coef·H(π)
         L_clip = mean_t max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 ± ε)),   ρ_t = π(a_t|s_t)/π_old(a_t|s_t)
         L_V    = mean_t ½·max((V − R)², (V_old + clip(V − V_old, ±ε_V) − R)²)

     (means over the minibatch's response tokens).

Temperature: π, π_old and π_ref above (so ρ, kl_t and the entropy H) are all softmax(logits / T)
at the sampling temperature T = `rollout.temperature` (T = 0, greedy: 1), TRL's convention: the
responses are samples of the tempered policy, so only its logprobs make ρ an importance ratio
of the distribution they came from and kl_t an estimate of a KL between the distributions
actually sampled and regularised; raw (T = 1) logits would optimise neither policy consistently
when T ≠ 1 (alignment/rl_rollout.py). The critic's values do not depend on T.

Conventions (tests/alignment/test_losses_reference.py checks each against its formula): a
response's end is terminal (V = 0 after its last token) whether it stopped or ran out of
tokens, as in TRL; whitening uses the population variance over the rollout's valid response
tokens; `clipfrac` counts tokens with |ρ − 1| > ε (OpenAI baselines), a superset of those where
the clipped term is the active one (TRL's count); `approx_kl` is the k2 estimator
mean_t ½(log π − log π_old)² of KL(π_old‖π) (OpenAI baselines, TRL), `vf_clipfrac` the share of
tokens where the clipped squared error is the larger. A fixed β (`kl_target` = 0) is always
`ppo.kl_coef`, also on a resume; an adaptive one continues from the checkpoint's value.

Why one TrainState with params {"policy": LM, "value": scalar-head model}: the loop and the step
own exactly one state, so the critic's update rides in the same jitted step and checkpoint as
the policy's, with no second loop or optimizer to keep in sync. The two trees share no
parameter, so each gets its own Adam statistics; the only coupling is the global-norm clip
(which `vf_coef` weighs). The critic starts from the reward model (`reward_from`), whose
backbone already reads responses; the frozen reward model and reference are separate copies
kept out of the state (optionally bfloat16, `rollout.frozen_dtype`), read at the step of their
runs this run started with, also on a resume after those runs trained on (alignment/rl_frozen.py
`FrozenSources`). `init_from_ema` takes the policy's start and the reference from the SFT
run's EMA weights (the reference is the policy the run starts from); `reward_from_ema` takes
the scorer and the critic's start from the reward-model run's.

LoRA (`lora.rank` > 0): adapters on the policy and the critic (each {"base", "lora"}; the
critic's head, new, trains whole); the reference is the policy's frozen base (no reference copy
loaded); rollouts decode with the adapters merged. Readers of the run merge them (the policy of a
PPO checkpoint loads as a plain language model either way).

Mixture-of-experts models (n_experts > 0): the policy and the critic each add pretraining's
router losses of their training forward pass, `loss.moe_aux` × load balance + `loss.moe_z` ×
router z-loss (train/losses.py `router_coefs`), logged as `moe/*` and `value/moe/*`; the frozen
reference and reward model only score, with no gradient and no router loss. Without them the
RL gradient alone is free to collapse a router onto a few experts.

Metrics (metrics.jsonl): loss-side `pg_loss`, `vf_loss`, `entropy`, `clipfrac`, `vf_clipfrac`,
`approx_kl`; per rollout `rollout/score_mean|std` (reward model), `rollout/reward_mean|std`
(sequence reward with penalties), `rollout/kl` (per-sequence KL to the reference),
`rollout/kl_coef`, `rollout/non_score_reward` (−β × that KL: the penalty's share of the
reward), `rollout/explained_var`, `rollout/value_mean` (the critic's mean value over response
tokens), `rollout/adv_std` (the spread of the GAE advantages before whitening),
`rollout/response_len`, `rollout/stopped` (the fraction of responses that ended with a stop
token; `rollout/nonstop`, `rollout/empty` and `rollout/bad_reward` count the others), the
rollout's number `rollout/iteration`, and the time split `rollout/gen_s`, `rollout/score_s`,
`rollout/train_s`, and `rollout/logprob_gap` (mean |decoder − scoring forward| logprob of the
sampled tokens, both at T = 1: ~0 unless the decoder's numerics drift from the training
forward's). Evaluation: greedy answers on held-out prompts — world-judge accuracy and the
reward model's mean score.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.alignment import common, rl_common, rl_eval
from flaxlm.alignment.rl_rollout import (
    KL_ESTIMATORS,
    RolloutSource,
    check_sampling,
    entropy,
    kl_penalty,
    lm_logprobs,
    logprob_gap,
    passthrough_stats,
    policy_logprobs,
    sample_stats,
    scoring_temperature,
    tempered,
)
from flaxlm.config_values import is_real
from flaxlm.models import lora as lora_lib
from flaxlm.models.config import ModelConfig
from flaxlm.models.heads import scalar_model_fns, sequence_values
from flaxlm.models.sharding import logical_axis_rules, make_mesh
from flaxlm.train import checkpoint as ckpt_lib
from flaxlm.train import loop
from flaxlm.train.losses import (
    add_router_losses,
    masked_mean,
    router_coefs,
    router_forward,
    token_logprobs,
)
from flaxlm.train.pretrain import model_fns

# ---------------------------------------------------------------------------------------------
# Advantages and losses (pure; tests check them against the published formulas)


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016) over (B, T) token rows.

    The episode of a row is its masked positions, which must be contiguous; the position after
    the last one is terminal (value 0). With δ_t = r_t + γ·V_{t+1}·m_{t+1} − V_t,

        A_t = δ_t + γλ·m_{t+1}·A_{t+1},      R_t = A_t + V_t

    Returns (advantages, returns), float32, 0 where mask == 0.
    """
    r = jnp.asarray(rewards, jnp.float32)
    v = jnp.asarray(values, jnp.float32)
    m = jnp.asarray(mask, jnp.float32)
    zero = jnp.zeros_like(m[:, :1])
    m_next = jnp.concatenate([m[:, 1:], zero], axis=1)
    v_next = jnp.concatenate([v[:, 1:], zero], axis=1) * m_next
    delta = (r + gamma * v_next - v) * m

    def back(carry, xs):  # one step of the backward recursion, over all rows at once
        d, mn = xs
        a = d + gamma * lam * mn * carry
        return a, a

    _, adv_TB = jax.lax.scan(back, jnp.zeros_like(m[:, 0]), (delta.T, m_next.T), reverse=True)
    adv = adv_TB.T * m
    return adv, (adv + v) * m


def whiten(x, mask, shift_mean: bool = True):
    """(x − mean)/std over the masked entries (population std, ε = 1e-8 under the root); with
    `shift_mean=False` the mean is added back (only the scale changes). Entries outside the
    mask are transformed too but carry no weight in the statistics."""
    x = jnp.asarray(x, jnp.float32)
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    return out + mean if not shift_mean else out


def policy_loss(logp, old_logp, advantages, mask, clip: float):
    """PPO's clipped surrogate (masked token mean) and the fraction of clipped tokens."""
    ratio = jnp.exp(logp - old_logp)
    pg = jnp.maximum(-advantages * ratio, -advantages * jnp.clip(ratio, 1 - clip, 1 + clip))
    clipped = (jnp.abs(ratio - 1.0) > clip).astype(jnp.float32)
    return masked_mean(pg, mask), masked_mean(clipped, mask)


def value_loss(values, old_values, returns, mask, clip: float):
    """PPO's clipped value loss ½·max((V − R)², (V_clip − R)²) (masked token mean) and the
    fraction of tokens where the clipped term is the larger one."""
    v_clip = old_values + jnp.clip(values - old_values, -clip, clip)
    a, b = jnp.square(values - returns), jnp.square(v_clip - returns)
    clipped = (b > a).astype(jnp.float32)
    return 0.5 * masked_mean(jnp.maximum(a, b), mask), masked_mean(clipped, mask)


def explained_variance(values, returns, mask) -> float:
    """1 − Var(R − V)/Var(R) over the masked entries (1 = perfect critic, ≤ 0 = useless)."""
    m = np.asarray(mask) > 0
    if m.sum() < 2:
        return 0.0
    r, v = np.asarray(returns)[m], np.asarray(values)[m]
    var = np.var(r)
    return float(1.0 - np.var(r - v) / var) if var > 0 else 0.0


class KLController:
    """β of the KL penalty: fixed, or (target > 0) adapted after each rollout as in Ziegler
    et al. (2019): β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon), n = sequences seen."""

    def __init__(self, init: float, target: float = 0.0, horizon: int = 10000):
        self.value, self.target, self.horizon = float(init), float(target), int(horizon)

    def update(self, kl: float, n: int) -> None:
        if self.target > 0:
            err = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
            self.value *= 1.0 + err * n / self.horizon


def ppo_loss_fn(policy_apply, value_apply, p, temperature: float = 1.0,
                routers: tuple = (None, None)):  # fmt: skip
    """The combined policy + critic loss (module docstring) over a rollout minibatch; the
    policy's logprobs and entropy at `temperature` (the rollout's, `scoring_temperature`).
    `routers` = (policy's, critic's) router-loss coefficients (train/losses.py
    `router_coefs`; None for a dense model): each mixture adds the router losses of its own
    forward pass here, logged as `moe/*` (policy) and `value/moe/*` (critic)."""

    def loss_fn(params, batch, rng):
        del rng
        mask = batch["loss_mask"]
        args = (batch["tokens"], batch["positions"], batch["segment_ids"])
        logits, policy_stats = router_forward(policy_apply, routers[0], params["policy"], *args)
        logits = tempered(logits, temperature)
        logp = token_logprobs(logits, batch["targets"])
        values, value_stats = router_forward(value_apply, routers[1], params["value"], *args)
        pg, clipfrac = policy_loss(logp, batch["old_logprobs"], batch["advantages"], mask, p.clip)
        vf, vf_clipfrac = value_loss(
            values, batch["old_values"], batch["returns"], mask, p.value_clip
        )
        ent = masked_mean(entropy(logits), mask)
        loss = pg + p.vf_coef * vf - p.ent_coef * ent
        metrics = {
            "pg_loss": pg,
            "vf_loss": vf,
            "entropy": ent,
            "clipfrac": clipfrac,
            "vf_clipfrac": vf_clipfrac,
            "approx_kl": masked_mean(0.5 * jnp.square(logp - batch["old_logprobs"]), mask),
            "weight": jnp.sum(mask),
            **passthrough_stats(batch),
        }
        loss, metrics = add_router_losses(loss, metrics, policy_stats, routers[0])
        return add_router_losses(loss, metrics, value_stats, routers[1], prefix="value/moe/")

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Rollouts


def check_settings(config) -> None:
    """Raises on a bad `ppo.*` setting, naming the key. build_task calls it before anything is
    loaded: `kl_estimator` is first read at the first rollout, after the decoder call and the
    scoring, whose error ("kl estimator 'K3'") named no key; the numbers were never checked —
    λ = 2 or γ = 1.5 made GAE's sums grow with the response length, and a clip ε <= 0 made the
    surrogate clip(ρ, 1 − ε, 1 + ε) a constant 1 − ε (0.1 at ratio 1 and advantage 1 for ε =
    −0.2, not 0), all of it trained on without a word."""
    p = config.ppo
    est = p.kl_estimator
    if est not in KL_ESTIMATORS:
        raise ValueError(f"ppo.kl_estimator={est!r}; expected {' | '.join(KL_ESTIMATORS)}")
    checks = {
        "gamma": (lambda x: 0 <= x <= 1, "in [0, 1] (GAE's discount)"),
        "lam": (lambda x: 0 <= x <= 1, "in [0, 1] (GAE's λ)"),
        "clip": (lambda x: x > 0, "> 0 (the policy ratio's ε)"),
        # (0 is not "off": the clipped term is then V_old's error, a floor under the loss, so V
        # is never trained closer to the return than V_old was; a large ε turns clipping off)
        "value_clip": (lambda x: x > 0, "> 0 (the value's ε; e.g. 1e9 turns clipping off)"),
        "kl_coef": (lambda x: x >= 0, ">= 0 (β of the KL penalty)"),
        "kl_target": (lambda x: x >= 0, ">= 0 (0 = a fixed β)"),
        "kl_horizon": (lambda x: x > 0, "> 0 (sequences)"),
        "vf_coef": (lambda x: x >= 0, ">= 0"),
        # (the loss is … − ent_coef·H: a negative weight would be an entropy penalty)
        "ent_coef": (lambda x: x >= 0, ">= 0 (the entropy bonus's weight; 0 = none)"),
    }
    for key, (ok, what) in checks.items():
        v = p[key]
        if not is_real(v) or not ok(v):
            raise ValueError(f"ppo.{key}={v!r} must be {what}")
        # (inf passed ">= 0"; kl_coef=inf gave −inf·0 = NaN rewards: every advantage NaN)
        if not np.isfinite(v):
            raise ValueError(f"ppo.{key}={v!r} must be finite")
    # The adaptive controller multiplies β by (1 + e·n/horizon): from 0 it stays 0, so
    # kl_target > 0 with kl_coef = 0 trained with no KL penalty at all, the target unread.
    if p.kl_target > 0 and p.kl_coef == 0:
        raise ValueError(f"ppo.kl_coef={p.kl_coef!r} must be > 0 when ppo.kl_target > 0 (the "
                         "adaptive β is multiplied each rollout: from 0 it stays 0)")  # fmt: skip


class PPOSource(RolloutSource):
    """Rollouts scored by the reward model, with KL-shaped rewards and GAE advantages."""

    def __init__(self, config, mesh, rules, prompts, *, cfg, template, applies, ref, rm,
                 spec=None):  # fmt: skip
        super().__init__(config, mesh, rules, prompts, cfg=cfg, template=template, spec=spec)
        check_settings(config)  # (build_task checked them before any load; cheap)
        p = config.ppo
        self.kl = KLController(p.kl_coef, p.kl_target, p.kl_horizon)
        # LoRA (`spec`): the policy's frozen base is the reference (ref[2] is None).
        self.ref_params, self.rm_params = ref[2], rm[2]
        policy_apply, value_apply = applies
        temp = scoring_temperature(config.rollout.temperature)

        def score(policy, value, ref_p, rm_p, rows):
            args = (rows["tokens"], rows["positions"], rows["segment_ids"])
            lp, lp_t1 = policy_logprobs(policy_apply, policy, rows, temp)
            ref_lp = lm_logprobs(ref[1], ref_p, rows, temp)
            vals = value_apply(value, *args)
            sc = sequence_values(rm[1](rm_p, *args), rows["segment_ids"])
            return lp, ref_lp, vals, sc, lp_t1

        self._score = jax.jit(score)
        self._gae = jax.jit(gae)
        self._whiten = jax.jit(whiten)

    def make_rollout(self, params, rng):
        r, p = self.config.rollout, self.config.ppo
        policy = params["policy"]
        decoding = self.decoding_params(policy)
        s = self.sample(decoding, self.cursor.take(r.batch), rng)
        del decoding  # (a LoRA policy's merged copy: freed before scoring)
        rows = s["rows"]
        t0 = time.perf_counter()
        ref_params = policy["base"] if self.spec else self.ref_params
        lp, ref_lp, values, score, lp_t1 = self.score(
            self._score, policy, params["value"], ref_params, self.rm_params, rows
        )
        mask = rows["loss_mask"]
        finite = lambda x: np.all(np.isfinite(np.where(mask > 0, x, 0.0)), axis=1)  # noqa: E731
        valid = np.isfinite(score) & finite(lp) & finite(ref_lp) & finite(values)
        errors = [f"row {b}: non-finite reward-model score or logprob/value"
                  for b in np.flatnonzero(~valid)]  # fmt: skip
        self.log_errors(errors, int(valid.sum()))
        m = mask * valid[:, None]
        lp, ref_lp, values = (np.where(m > 0, x, 0.0) for x in (lp, ref_lp, values))
        seq_reward = np.where(s["empty"], r.empty_reward, np.nan_to_num(score))
        seq_reward = seq_reward - r.nonstop_penalty * (~s["stopped"])
        kl = np.asarray(kl_penalty(lp, ref_lp, p.kl_estimator)) * m
        beta = self.kl.value
        tok_rewards = -beta * kl
        last = s["prompt_lens"] + s["lengths"] - 2  # index of each response's final token
        tok_rewards[np.arange(len(last)), last] += np.where(valid, seq_reward, 0.0)
        adv, returns = self._gae(tok_rewards, values, m, p.gamma, p.lam)
        adv_w = self._whiten(adv, m) * m if p.whiten_advantages else adv
        adv, returns, adv_w = jax.device_get((adv, returns, adv_w))
        score_s = time.perf_counter() - t0

        kl_seq = kl.sum(1)[valid]
        self.kl.update(float(kl_seq.mean()), int(valid.sum()))
        v = valid
        n_tok = max(m.sum(), 1.0)
        adv_mean = (adv * m).sum() / n_tok  # GAE advantages need not be centred: subtract it
        stats = {
            **sample_stats(s, valid),
            "score_mean": score[v].mean(), "score_std": score[v].std(),
            "reward_mean": seq_reward[v].mean(), "reward_std": seq_reward[v].std(),
            "kl": kl_seq.mean(), "kl_coef": beta, "non_score_reward": -beta * kl_seq.mean(),
            "explained_var": explained_variance(values, returns, m),
            "value_mean": (values * m).sum() / n_tok,
            "adv_std": np.sqrt((np.square(adv - adv_mean) * m).sum() / n_tok),
            "logprob_gap": logprob_gap(s["sample_logprobs"], lp_t1, m),
            "score_s": score_s,
        }  # fmt: skip
        train_rows = {
            **{k: rows[k] for k in ("tokens", "targets", "positions", "segment_ids")},
            "loss_mask": m.astype(np.float32), "old_logprobs": lp.astype(np.float32),
            "old_values": values.astype(np.float32), "advantages": adv_w.astype(np.float32),
            "returns": returns.astype(np.float32),
        }  # fmt: skip
        return train_rows, stats

    def get_state(self) -> dict:
        return {**super().get_state(), "kl_coef": self.kl.value}

    def set_state(self, st: dict) -> None:
        super().set_state(st)
        # An adaptive β is the controller's state and continues; a fixed one (kl_target = 0) is
        # the config's ppo.kl_coef, so a resume with another value uses it (restoring the
        # checkpoint's kept the old β while the loop reported the key as changed).
        if self.kl.target > 0:
            self.kl.value = float(st.get("kl_coef", self.kl.value))


# ---------------------------------------------------------------------------------------------
# Task


def train_flops_per_token(cfg: ModelConfig, vcfg: ModelConfig, seq_len: int,
                          lora: bool) -> tuple[float, float]:  # fmt: skip
    """(PaLM, causal) training FLOPs per token of a PPO step: the policy's and the critic's
    forward+backward (the critic has no vocabulary projection; under LoRA neither frozen base
    gets weight gradients: `ModelConfig.flops_per_token`). The loop's MFU and
    bench/alignment_throughput.py both count with this."""
    return tuple(
        cfg.flops_per_token(seq_len, causal, frozen_base=lora)
        + vcfg.flops_per_token(seq_len, causal, frozen_base=lora, lm_head=False)
        for causal in (False, True)
    )


def build_task(config, mesh, workdir: str | None = None) -> loop.Task:
    """The PPO Task; `init_from` (SFT run: policy and reference — its EMA weights for both with
    `init_from_ema`) and `reward_from` (reward model run: scorer and critic — its EMA weights
    for both with `reward_from_ema`) are required."""
    if not config.init_from or not config.reward_from:
        raise ValueError("ppo: set --config.init_from=SFT_RUN and --config.reward_from=RM_RUN")
    check_settings(config)
    check_sampling(config.rollout)
    rm_ema = rl_common.reward_from_ema(config)  # (a bad source fails here, before any load)
    tok, cfg, template = common.resolve_source(config, mesh)  # (checks init_from_ema)
    # The scorer and the critic read the policy's token ids (before any data or model loads)
    common.check_same_tokenizer(tok, config.reward_from, "reward_from")
    common.check_same_chat_template(tok, config.reward_from, "reward_from")
    spec = lora_lib.spec_from_config(config.get("lora", {}))  # (configs older than the key)
    lora_lib.check_base_is_reference(spec, "ppo")
    # The steps of the frozen copies: the ones this run started with, also on a resume
    # (LoRA's reference is the policy's own base, restored with the state).
    pins = rl_common.FrozenSources(
        workdir,
        {"reward_from": config.reward_from, **({} if spec else {"init_from": config.init_from})},
    )
    prompts, held, report = rl_eval.training_prompts(config, template)
    rules = logical_axis_rules(config.sharding)
    dtype = config.rollout.frozen_dtype
    rm = rl_common.frozen_scalar(
        config.reward_from, mesh, rules, dtype, ema=rm_ema, key="rollout.frozen_dtype",
        source_key="reward_from", step=pins.step("reward_from"),
    )  # fmt: skip
    vcfg = ModelConfig.from_dict(
        ckpt_lib.read_meta(config.reward_from, pins.step("reward_from"))[1]["model_config"]
    )

    lm_init, lm_apply = model_fns(cfg)
    v_init, v_apply = scalar_model_fns(vcfg)
    # LoRA: adapters on the policy and on the critic (whose new head trains whole, as a LoRA
    # reward model's); the reference is the policy's frozen base, so no second copy of the
    # model is loaded.
    vspec = dataclasses.replace(spec, train_extra="^head/") if spec else None
    if spec:
        ref = (cfg, lm_apply, None)
        lm_init, lm_apply = lora_lib.with_lora(lm_init, spec), lora_lib.lora_apply(lm_apply, spec)
        v_init, v_apply = lora_lib.with_lora(v_init, vspec), lora_lib.lora_apply(v_apply, vspec)
    else:  # the policy's start: init_from's EMA weights with init_from_ema
        ref = rl_common.frozen_lm(config.init_from, mesh, rules, dtype,
                                  ema=bool(config.get("init_from_ema", False)),
                                  key="rollout.frozen_dtype", source_key="init_from",
                                  step=pins.step("init_from"))  # fmt: skip
    plain = (lambda policy: lora_lib.merge(policy, spec)) if spec else (lambda policy: policy)

    def init_params(rng):
        return {"policy": lm_init(rng), "value": v_init(jax.random.fold_in(rng, 1))}

    def load(source, target, ema=False):  # ema: init_from_ema (the loop passes it)
        # (a fresh start: the policy is its reference, the critic the scorer, step for step)
        base = (lambda t: t["base"]) if spec else (lambda t: t)
        return {
            "policy": common.load_lm_params(source, base(target["policy"]),
                                            pins.step("init_from"), ema=ema),
            "value": rl_common.load_scalar_params(
                config.reward_from, base(target["value"]), rm_ema, pins.step("reward_from"),
                source_key="reward_from",
            ),
        }  # fmt: skip

    def transform(loaded, fresh):  # fresh adapters on the loaded policy and critic
        return {k: {"base": loaded[k], "lora": fresh[k]["lora"]} for k in ("policy", "value")}

    def trainable(params):  # the adapters, and the critic's head
        return {"policy": lora_lib.trainable_mask(params["policy"], spec),
                "value": lora_lib.trainable_mask(params["value"], vspec)}  # fmt: skip

    source = PPOSource(
        config, mesh, rules, prompts, cfg=cfg, template=template,
        applies=(lm_apply, v_apply), ref=ref, rm=rm, spec=spec,
    )  # fmt: skip
    policy_eval, data_report = rl_eval.policy_eval_and_report(
        config, cfg, template, prompts, held, report, mesh, rules, workdir, rm=rm
    )
    eval_fn = None if policy_eval is None else (lambda p: policy_eval(plain(p["policy"])))
    flops, flops_causal = train_flops_per_token(cfg, vcfg, config.seq_len, spec is not None)
    # the trained mixtures' router losses (policy, critic); None for a dense one
    routers = tuple(router_coefs(config.get("loss"), c.n_experts > 0) for c in (cfg, vcfg))
    return loop.Task(
        name="ppo",
        init_params=init_params,
        loss_fn=ppo_loss_fn(
            lm_apply, v_apply, config.ppo, scoring_temperature(config.rollout.temperature), routers
        ),
        train_batches=source,
        before_step=source.before_step,
        eval_fn=eval_fn,
        flops_per_token=flops,
        flops_per_token_causal=flops_causal,
        trainable_mask=trainable if spec else None,
        load_init_params=load,
        init_from_transform=transform if spec else None,
        model_meta={
            "model_config": cfg.to_dict(),
            "value_model_config": vcfg.to_dict(),
            **common.tokenizer_meta(tok, workdir),
            "head": "policy_value",
            "lora": spec.to_dict() if spec else {},  # (the policy's adapters)
            "data_report": data_report,
            **pins.meta(),
        },
    )


def run(config, workdir: str):
    mesh = make_mesh(dict(config.mesh))
    return loop.run(config, workdir, build_task(config, mesh, workdir), mesh=mesh)
