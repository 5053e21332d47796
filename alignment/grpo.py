"""GRPO (Shao et al. 2024, DeepSeekMath): a group of samples per prompt, rewards from Python
functions (verifiable rewards), advantages normalised within each group — no critic, no reward
model — and a clipped objective with a KL term to the frozen reference.

    python -m flaxlm.train.main --config configs/grpo.py:runlocal=True \
        --config.init_from=runs/sft --workdir runs/grpo --config.grpo.rewards=exact_match,format:0.1

One iteration (alignment/rl_rollout.py `RolloutSource`, driven by the loop's `before_step`):
  1. generate: `rollout.batch / grpo.group_size` prompts, `group_size` samples each, in one
     decoder call with the current policy (temperature `rollout.temperature`; each prompt's
     prefill runs once, `generate(..., num_samples=group_size)`);
  2. rewards: r_i = Σ_k w_k·f_k(meta, response) over `grpo.rewards` (see REWARDS; any callable
     `(meta, response_text) -> float` can be named as "module:function" in `grpo.rewards`,
     registered, or passed to `build_task`; `meta` is the prompt record's, configs/grpo.py; a
     function with a `prompt` parameter also gets the prompt as chat turns, `prompt=[{"role",
     "content"}, ...]`); "rm" names the reward model of `reward_from` (a reward-model run),
     its score at each response's last token as PPO reads it — alone for open-ended prompts,
     or weighted next to verifiable rewards ("exact_match,rm:0.5"). A reasoning model
     (`grpo.reasoning_end`, e.g. "</think>"): the functions judge the answer after the marker
     (one taking `reasoning` also gets the text before it), and a response whose reasoning
     never ends gets `rollout.empty_reward` (no answer), counted as
     `rollout/reasoning_unfinished`, as does one with nothing after the marker (counted as
     `rollout/empty`); the held-out evaluation judges the answer after the marker too (an
     unfinished reasoning is wrong, `eval/<set>/reasoning_unfinished`: alignment/rl_eval.py);
  3. advantages per group (`group_advantages`): A_i = (r_i − mean_g r) / (std_g r + ε)
     over the group's valid samples (population std, ε = 1e-4; TRL divides by the unbiased
     std), so a group of equal rewards gets A = 0, not 0/0 (`scale_by_std=False`: just
     r_i − mean_g r, Dr. GRPO; `baseline="loo"`: the mean of the other samples' rewards, RLOO
     with `scale_by_std=False`; `std_scope="batch"`: divided by the std over the whole
     rollout's valid samples, REINFORCE++-baseline), the same for every token of i;
  4. score (one jitted call): log π_old and log π_ref per token, at the rollout temperature
     like every logprob here (below);
  5. train: `rollout.epochs` passes in minibatches through the shared step, with the loss
     (`grpo_loss`) per response token t of sample i

         ℓ_{i,t} = −min(ρ·A_i, clip(ρ, 1 ± ε)·A_i) + β·KL_t,    ρ = π/π_old,
         KL_t = π_ref/π − log(π_ref/π) − 1            (k3: unbiased, >= 0)

     averaged over each response's tokens, then over responses (`loss_agg="seq"`, the paper's
     1/G Σ_i 1/|o_i| Σ_t), over all tokens of the minibatch (`"token"`, DAPO), or summed and
     divided by a constant, rows × seq_len (`"constant"`: Dr. GRPO, with
     `scale_by_std=False`; no response-length bias).
     Variants: `clip_high` > 0 clips ρ to [1 − ε, 1 + clip_high] (DAPO's clip-higher);
     `importance="sequence"` replaces ρ by the response's length-normalised sequence ratio
     s_i = exp(1/|o_i| Σ_t log π/π_old) for all its tokens (GSPO, Zheng et al. 2025);
     `overlong_buffer` adds DAPO's soft overlong punishment to the reward
     (`overlong_penalty`); `mask_truncated` drops responses that reached `max_new_tokens`
     without stopping from the loss (DAPO's overlong filtering; they still count in their
     group's advantages); `dynamic_sampling` = N > 0 is DAPO's dynamic sampling (below).

Temperature: π, π_old and π_ref (so ρ, KL_t and the entropy metric) are all softmax(logits / T)
at the sampling temperature T = `rollout.temperature` (T = 0, greedy: 1), TRL's convention
(GRPOTrainer divides the logits by its temperature for the policy, old policy and reference
alike): the responses are samples of the tempered policy, so only its logprobs make ρ an
importance ratio of the distribution they came from and KL_t (k3, unbiased only for samples
of π) an estimate of the KL between the distributions sampled and regularised; raw (T = 1)
logits would optimise neither policy consistently when T ≠ 1 (alignment/rl_rollout.py).

Groups whose valid rewards are all equal carry no signal (A = 0), counted as
`rollout/flat_groups`. As training goes on, more groups are all right (or all wrong) and the
batch shrinks in effect. `grpo.dynamic_sampling` = N (DAPO, Yu et al. 2025) sets such groups
aside (also groups with fewer than two valid samples) and makes up to N more decoder calls per
rollout on the next prompts until `rollout.batch / group_size` groups with signal are found; if
the calls run out, set-aside groups fill the rest. The batch keeps its shape; the prompt cursor
moves past every prompt drawn (a resumed run draws the same ones). Metrics
`rollout/sample_calls` (decoder calls) and `rollout/drawn_without_signal` (share of the drawn
groups set aside); `rollout/gen_s` is all calls' time.

LoRA (`lora.rank` > 0, models/lora.py): only adapters on the policy train; the reference is the
policy's own frozen base (`params["base"]`), so no second copy of the model is loaded, and each
rollout decodes with the adapters merged into a copy of the weights in the compute dtype
(`RolloutSource.decoding_params`: no full-precision merged copy). The
checkpoint holds {"base", "lora"}; every reader merges (as for SFT/DPO LoRA runs).

The reference is the policy the run starts from: `init_from`'s params, or with `init_from_ema`
its EMA weights (as the policy's start; under LoRA the frozen base is then that EMA). The reward
model (`reward_from`, "rm" in the rewards) is its params, or its EMA weights with
`reward_from_ema`. Both are read at the step of their run this run started with, also on a
resume after that run trained on (alignment/rl_frozen.py `FrozenSources`).

The bad-input policy (a reward function that raises or returns NaN, empty responses, over-long
prompts) is rl_rollout's: the sample is skipped with a count; so is one whose combined reward
is not finite (`grpo.rewards` refuses an inf or NaN weight); a rollout with no valid sample
(or none among the samples judged) raises. A response without an answer (empty, a reasoning
that never ended, or nothing after it) is not judged: the reward functions are not called on it
and it gets `rollout.empty_reward`, a valid sample.

Metrics: `rollout/reward_mean|std`, `rollout/accuracy` (`exact_match` over the samples whose
prompt's meta has an `answer`: the world's judge on its questions, else the stripped answer; an
unfinished reasoning is wrong) and `rollout/accuracy_n` (how many samples that is; a log line
whose rollouts had none leaves `rollout/accuracy` out, and one that mixes rollouts weights
each by its count),
`rollout/r_<name>` per reward function (over the samples it judged),
`rollout/kl` (per-sequence KL of the valid responses to the reference, cut-off ones included
under `mask_truncated`), `rollout/response_len`, the bad-input counts, the time split
`rollout/gen_s`, `score_s`, `train_s`, `rollout/logprob_gap` (mean |decoder − scoring
forward| logprob of the sampled tokens, both at T = 1: ~0 unless the decoder's numerics drift
from the training forward's); loss-side `pg_loss`, `kl`, `clipfrac`, `entropy`. A
mixture-of-experts policy (n_experts > 0) adds pretraining's router losses on the training
forward pass, `loss.moe_aux` × load balance + `loss.moe_z` × router z-loss (train/losses.py
`router_coefs`), and logs `moe/*`: without them the policy gradient alone is free to collapse
the router onto a few experts.

The reward functions live in alignment/grpo_rewards.py and the advantages and loss in
alignment/grpo_loss.py; both are re-exported here.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from flaxlm.alignment import common, rl_common, rl_eval, verify_code
from flaxlm.alignment.grpo_loss import (  # noqa: F401
    LOSS_AGGS,
    STD_SCOPES,
    aggregate,
    group_advantages,
    grpo_loss,
    grpo_loss_fn,
    overlong_penalty,
)
from flaxlm.alignment.grpo_rewards import (  # noqa: F401
    REWARD_MODEL,
    REWARDS,
    check_references,
    check_rewards,
    exact_match,
    format_reward,
    import_reward,
    judge_reward,
    parse_rewards,
    register_reward,
)
from flaxlm.alignment.rl_rollout import (
    RolloutSource,
    call_reward_fns,
    check_sampling,
    kl_penalty,
    lm_logprobs,
    logprob_gap,
    policy_logprobs,
    sample_stats,
    scoring_temperature,
)
from flaxlm.data.formats import split_reasoning
from flaxlm.models import lora as lora_lib
from flaxlm.models.sharding import logical_axis_rules, make_mesh
from flaxlm.train import loop
from flaxlm.train.losses import router_coefs
from flaxlm.train.pretrain import model_fns

# ---------------------------------------------------------------------------------------------
# Rollouts


def group_reward_range(reward, valid, G: int) -> tuple[np.ndarray, np.ndarray]:
    """(lowest, highest) valid reward of each group of G consecutive samples: lo == hi is a flat
    group (equal rewards), lo < hi one with signal; no valid sample gives (inf, -inf). Compared
    exactly, not as std == 0: the std of equal values like −0.1 (0 − nonstop_penalty) is ~1e-17
    at some group sizes."""
    lo = np.where(valid, reward, np.inf).reshape(-1, G).min(1)
    return lo, np.where(valid, reward, -np.inf).reshape(-1, G).max(1)


def take_samples(calls: list[dict], idx: list[int]) -> dict:
    """The samples at `idx` of several equal-sized `_judged` results taken as one (sample j of
    call q is index q·size + j): per-sample arrays and lists (also inside dicts: "rows",
    "parts") indexed, decoder seconds "gen_s" summed."""
    out = {}
    for key, first in calls[0].items():
        values = [c[key] for c in calls]
        if key == "gen_s":
            out[key] = sum(values)
        elif isinstance(first, dict):
            out[key] = take_samples(values, idx)
        elif first is None:
            out[key] = None
        elif isinstance(first, list):
            every = [x for v in values for x in v]
            out[key] = [every[i] for i in idx]
        else:
            out[key] = np.concatenate(values)[idx]
    return out


class GRPOSource(RolloutSource):
    """Groups of samples per prompt, rewarded by Python functions (and a reward model). Its
    settings are the config section SECTION ("grpo"; online DPO's source reads "online")."""

    SECTION = "grpo"

    def __init__(self, config, mesh, rules, prompts, *, cfg, template, apply, ref, rewards,
                 spec=None, rm=None):  # fmt: skip
        super().__init__(config, mesh, rules, prompts, cfg=cfg, template=template, spec=spec)
        self.check_settings(config)  # (build_task checked them before any load; cheap)
        # LoRA (`spec`): the policy's frozen base is the reference (ref[2] is None).
        self.rewards, self.ref_params = rewards, ref[2]
        # A reward model ("rm" in grpo.rewards; rm = (cfg, apply, params) of reward_from):
        # its score at each response's last token, like PPO's.
        self._rm = (rl_common.reward_scorer(rm[1]), rm[2]) if rm else None
        temp = scoring_temperature(config.rollout.temperature)

        def score(policy, ref_p, rows):
            lp, lp_t1 = policy_logprobs(apply, policy, rows, temp)
            return lp, lm_logprobs(ref[1], ref_p, rows, temp), lp_t1

        self._score = jax.jit(score)

    @classmethod
    def check_settings(cls, config) -> None:
        """Raises on a bad setting of the SECTION, naming the key. build_task calls it before
        anything is loaded: a typo must not cost the reference's load and a decoder call."""
        g, k = config[cls.SECTION], cls.SECTION
        G = g.group_size
        # A group of one is its own baseline: every advantage is 0 and only the KL term would
        # train (a run that learns nothing from its rewards, without a word).
        if not (isinstance(G, int) and G >= 2):
            raise ValueError(
                f"{k}.group_size={G!r}: a group needs at least 2 samples (the advantages are "
                "relative to the group's other samples; 1 makes every one 0)"
            )
        if config.rollout.batch % g.group_size:
            raise ValueError(
                f"rollout.batch={config.rollout.batch} is not a multiple of {k}.group_size={G}"
            )
        if g.get("baseline", "mean") not in ("mean", "loo"):
            raise ValueError(f"{k}.baseline={g.baseline!r}; expected mean | loo")
        if g.get("std_scope", "group") not in STD_SCOPES:
            raise ValueError(f"{k}.std_scope={g.std_scope!r}; expected one of {STD_SCOPES}")
        if g.get("importance", "token") not in ("token", "sequence"):
            raise ValueError(f"{k}.importance={g.importance!r}; expected token | sequence")
        if not g.get("clip_high", 0.0) >= 0:
            raise ValueError(f"{k}.clip_high={g.clip_high} must be >= 0 (0 = {k}.clip)")
        # (online DPO's section has neither: its loss reads dpo.*)
        if "clip" in g and not g.clip > 0:  # (<= 0: [1 − ε, 1 + ε] a point, or upside down)
            raise ValueError(f"{k}.clip={g.clip} must be > 0 (the ratio's ε)")
        if "beta" in g and not g.beta >= 0:  # < 0 rewarded moving away from the reference
            raise ValueError(f"{k}.beta={g.beta} must be >= 0 (the KL weight; 0 = no KL term)")
        if not (
            isinstance(g.get("dynamic_sampling", 0), int) and g.get("dynamic_sampling", 0) >= 0
        ):
            raise ValueError(
                f"{k}.dynamic_sampling={g.dynamic_sampling!r}: the most extra decoder calls per "
                "rollout, an integer >= 0 (0 = off)"
            )
        if not 0 <= g.get("overlong_buffer", 0) <= config.rollout.max_new_tokens:
            raise ValueError(
                f"{k}.overlong_buffer={g.overlong_buffer} must be in "
                f"[0, rollout.max_new_tokens={config.rollout.max_new_tokens}]"
            )

    def _judged(self, s: dict) -> dict:
        """A `sample` result with its rewards: "reward", "valid", "errors", "answers" (what the
        functions judged), "unfinished", "reasonings", "no_answer" (empty or unfinished: not
        judged, rollout.empty_reward) and "parts" (each function's values; 0 where no_answer).
        With a reasoning marker "empty" is the answer's: "<think>…</think>" alone is empty."""
        r, g = self.config.rollout, self.config[self.SECTION]
        n = len(s["texts"])
        answers, reasonings, unfinished = s["texts"], None, np.zeros(n, bool)
        marker = g.get("reasoning_end", "")
        if marker:  # rewards judge the answer after the reasoning
            split = [split_reasoning(t, marker) for t in answers]
            reasonings, answers, unfinished = (list(x) for x in zip(*split))
            unfinished = np.asarray(unfinished, bool)
            # A finished reasoning with nothing after it is an empty answer: judged on "" it
            # used to raise in `response.split()[-1]` (skipped as bad_reward, never punished).
            # (An unfinished one is counted as such, not as empty, unless the text is.)
            s = {**s, "empty": s["empty"] | (~unfinished & np.asarray(
                [not a.strip() for a in answers], bool))}  # fmt: skip
        # No answer (an empty response, or a reasoning that never ended): its reward is
        # rollout.empty_reward by the stated policy, whatever the functions would say, so they
        # are not called on it. Called on "", a function that raises or returns NaN there
        # (`response.split()[-1]`) used to mark the sample invalid: dropped from the loss and
        # its group's advantages instead of punished, the very answer the policy should learn
        # to avoid.
        no_answer = s["empty"] | unfinished
        judged = np.flatnonzero(~no_answer)
        reward, valid, errors, parts = np.zeros(n, np.float32), np.ones(n, bool), [], {}
        for name, fn, w in self.rewards:  # each function once per judged sample
            if fn is None:  # the reward model, on the rendered rows (all of them: one call)
                vals = np.asarray(self.score(self._rm[0], self._rm[1], s["rows"]), np.float32)
                ok = np.isfinite(vals) | no_answer
                errs = [
                    f"reward model score {v} (row {b})" for b, v in enumerate(vals) if not ok[b]
                ]
                vals = np.where(np.isfinite(vals) & ~no_answer, vals, 0.0).astype(np.float32)
            else:
                got, got_ok, errs = call_reward_fns(
                    [fn], [1.0], *(None if xs is None else [xs[j] for j in judged]
                                   for xs in (s["metas"], answers, s["messages"], reasonings))
                )  # fmt: skip
                vals, ok = np.zeros(n, np.float32), np.ones(n, bool)
                vals[judged], ok[judged] = got, got_ok
            reward, valid, errors, parts[name] = reward + w * vals, valid & ok, errors + errs, vals
        reward = np.where(no_answer, r.empty_reward, reward) - r.nonstop_penalty * (~s["stopped"])
        reward = reward + overlong_penalty(s["lengths"], r.max_new_tokens,
                                           g.get("overlong_buffer", 0))  # fmt: skip
        # Finite values can still combine to inf or NaN (a weight × value past float32, inf −
        # inf): such a sample is skipped like a bad reward, not passed on as NaN advantages.
        bad = valid & ~np.isfinite(reward)
        errors = errors + [f"combined reward {reward[b]} (row {b})" for b in np.flatnonzero(bad)]
        valid, reward = valid & ~bad, np.where(bad, 0.0, reward).astype(np.float32)
        return {**s, "parts": parts, "reward": reward, "valid": valid, "errors": errors,
                "answers": answers, "unfinished": unfinished, "reasonings": reasonings,
                "no_answer": no_answer}  # fmt: skip

    def make_rollout(self, params, rng):
        r, g = self.config.rollout, self.config[self.SECTION]
        G, n_groups = g.group_size, r.batch // g.group_size
        # DAPO's dynamic sampling (`grpo.dynamic_sampling` = N > 0): a group without signal
        # (its valid rewards all equal, or fewer than two valid: A = 0) is set aside and up to N
        # more decoder calls draw the next prompts until the batch is full of groups with
        # signal; set-aside groups fill what the last call leaves short.
        extra = g.get("dynamic_sampling", 0)  # (configs older than the key: off)
        drawn, errors, kept, aside = [], [], [], []  # per call; groups by index over the calls
        t0 = time.perf_counter()
        decoding = self.decoding_params(params)
        for k in range(1 + extra):
            key = rng if k == 0 else jax.random.fold_in(rng, k)
            prompts = self.cursor.take(n_groups)
            s = self._judged(self.sample(decoding, prompts, key, num_samples=G))
            errors += s.pop("errors")
            lo, hi = group_reward_range(s["reward"], s["valid"], G)
            for j, signal in enumerate(lo < hi):
                (kept if signal or not extra else aside).append(len(drawn) * n_groups + j)
            drawn.append(s)
            if len(kept) >= n_groups:
                break
        del decoding  # (a LoRA policy's merged copy: freed before scoring)
        groups = (kept + aside)[:n_groups]  # (off: every group of the one call, in order)
        s = take_samples(drawn, [q * G + i for q in groups for i in range(G)])
        reward, valid, texts, unfinished = s["reward"], s["valid"], s["answers"], s["unfinished"]
        judged = ~s["no_answer"]
        # A broken reward must not pass for a run of empty answers (valid, empty_reward): a
        # rollout whose judged samples all failed raises, as one with no valid sample does.
        self.log_errors(errors, int(valid[judged].sum() if judged.any() else valid.sum()))
        adv = group_advantages(
            reward.reshape(-1, G),
            valid.reshape(-1, G),
            scale_by_std=g.scale_by_std,
            baseline=g.get("baseline", "mean"),  # (configs older than the key: the mean)
            std_scope=g.get("std_scope", "group"),
        ).reshape(-1)
        rows = s["rows"]
        ref_params = params["base"] if self.spec else self.ref_params
        lp, ref_lp, lp_t1 = self.score(self._score, params, ref_params, rows)
        responses = rows["loss_mask"] * valid[:, None]  # every valid sample's response tokens
        # zero outside them (as PPO does): a large value at a prompt position must not become
        # inf·0 = NaN in kl_seq, nor reach the step as an old/ref logprob
        lp, ref_lp = (np.where(responses > 0, x, 0.0) for x in (lp, ref_lp))
        # rollout/kl: the KL of the policy's responses to the reference, the mean over valid
        # samples of each one's summed k3, cut-off ones included (they are the policy's too).
        # Taken over the loss mask, grpo.mask_truncated's rows summed to 0 yet still counted in
        # the mean over valid samples: the logged KL shrank with the share of cut-off responses.
        kl_seq = (np.asarray(kl_penalty(lp, ref_lp, "k3")) * responses).sum(1)
        m = responses
        if g.get("mask_truncated", False):  # DAPO's overlong filtering: no loss on cut-off ones
            m = m * s["stopped"][:, None]
            lp, ref_lp = (np.where(m > 0, x, 0.0) for x in (lp, ref_lp))
        score_s = time.perf_counter() - t0 - s["gen_s"]  # rewards and scoring, no decoding

        # Flat: every valid reward of the group equal. Compared exactly, not as std == 0: the
        # std of equal values like −0.1 (0 − nonstop_penalty) is ~1e-17 at some group sizes.
        lo, hi = group_reward_range(reward, valid, G)
        flat = lo == hi  # (no valid sample: lo = inf, hi = -inf, not flat)
        v = valid
        stats = {
            **sample_stats(s, valid),
            "reward_mean": reward[v].mean(), "reward_std": reward[v].std(),
            "flat_groups": float(np.mean(flat)), "kl": kl_seq[v].mean(), "score_s": score_s,
            "logprob_gap": logprob_gap(s["sample_logprobs"], lp_t1, m),
        }  # fmt: skip
        if extra:  # decoder calls, and the share of the groups they drew that had no signal
            stats["sample_calls"] = len(drawn)
            stats["drawn_without_signal"] = len(aside) / (len(drawn) * n_groups)
        # each function's mean over the samples it judged (a sample without an answer was not:
        # its 0 in "parts" is no value of the function); 0 when it judged none
        vj = v & judged
        stats.update({f"r_{name}": vals[vj].mean() if vj.any() else 0.0
                      for name, vals in s["parts"].items()})  # fmt: skip
        if g.get("reasoning_end", ""):
            stats["reasoning_unfinished"] = float(unfinished[v].mean())
        # exact_match: the world's judge on its questions, else the stripped `answer` (yours),
        # over the samples whose prompt has an answer (an unfinished reasoning: wrong, as in
        # eval); accuracy_n counts them. Both keys in every rollout (0 and 0 when none has
        # one; the log line then leaves accuracy out, train/loop_logging.py `_summarise`): the
        # stats become batch fields, and a key present in some rollouts only changed the
        # batch's structure (a recompile of the step) and broke the log line's average.
        hits = [0.0 if u else exact_match(mt, tx)
                for mt, tx, u in zip(s["metas"], texts, unfinished) if "answer" in mt]  # fmt: skip
        stats["accuracy"] = float(np.mean(hits)) if hits else 0.0
        stats["accuracy_n"] = float(len(hits))
        train_rows = {
            **{k: rows[k] for k in ("tokens", "targets", "positions", "segment_ids")},
            "loss_mask": m.astype(np.float32), "old_logprobs": lp.astype(np.float32),
            "ref_logprobs": ref_lp.astype(np.float32), "advantages": adv.astype(np.float32),
        }  # fmt: skip
        return train_rows, stats


# ---------------------------------------------------------------------------------------------
# Task


def build_task(config, mesh, workdir: str | None = None, rewards=None, *,
               source_cls=GRPOSource, make_loss=None) -> loop.Task:  # fmt: skip
    """The GRPO Task. `rewards`: optional [(name, callable, weight)] replacing `grpo.rewards`.
    Online DPO (alignment/online_dpo.py) is this task with its own source (`source_cls`, whose
    SECTION names its settings) and loss (`make_loss(apply, router)`, apply LoRA-wrapped if
    any, router the policy's router-loss coefficients or None: train/losses.py
    `router_coefs`)."""
    k = source_cls.SECTION
    if not config.init_from:
        raise ValueError(f"{config.task}: set --config.init_from=SFT_RUN (policy and reference)")
    # Settings first, naming the key: before this, a typo surfaced only when the source was
    # built (after the reference's load) or when the loss was first traced (after a rollout).
    source_cls.check_settings(config)
    check_sampling(config.rollout)
    if make_loss is None and config.grpo.loss_agg not in LOSS_AGGS:
        raise ValueError(f"grpo.loss_agg={config.grpo.loss_agg!r}; expected one of {LOSS_AGGS}")
    rewards = rewards if rewards is not None else parse_rewards(config[k].rewards, f"{k}.rewards")
    # code rewards run their programs under the stage's code_limits (configs older than the key,
    # or a section without it: the defaults)
    limits = verify_code.limits_from_config(config[k].get("code_limits"), f"{k}.code_limits")
    rewards = [(name, verify_code.with_limits(fn, limits), w) for name, fn, w in rewards]
    check_rewards(rewards, f"{k}.rewards", f"{k}.reasoning_end", config[k].get("reasoning_end", ""))
    reward_from = config.get("reward_from", "")  # (configs older than the key: none)
    if any(fn is None for _, fn, _ in rewards) != bool(reward_from):
        raise ValueError(
            f"{k}.rewards names rm (the reward model) but reward_from is not set"
            if reward_from == "" else
            f"reward_from={reward_from!r} is set but {k}.rewards={config[k].rewards!r} does "
            "not name rm (e.g. rm or exact_match,rm:0.5)"
        )  # fmt: skip
    rm_ema = rl_common.reward_from_ema(config)  # (a bad source fails here, before any load)
    tok, cfg, template = common.resolve_source(config, mesh)  # (checks init_from_ema)
    if reward_from:  # the reward model reads the policy's token ids (before any load)
        common.check_same_tokenizer(tok, reward_from, "reward_from")
        common.check_same_chat_template(tok, reward_from, "reward_from")
    spec = lora_lib.spec_from_config(config.get("lora", {}))  # (configs older than the key)
    lora_lib.check_base_is_reference(spec, "grpo" if k == "grpo" else "online_dpo")
    if spec and not reward_from and config.rollout.frozen_dtype != "float32":
        raise ValueError(
            f"rollout.frozen_dtype={config.rollout.frozen_dtype!r} has no frozen model to apply "
            "to: with LoRA the reference is the policy's own base and no reward_from is set"
        )
    # The steps of the frozen copies: the ones this run started with, also on a resume
    # (LoRA's reference is the policy's own base, restored with the state).
    pins = rl_common.FrozenSources(
        workdir, {"reward_from": reward_from, **({} if spec else {"init_from": config.init_from})}
    )
    prompts, held, report = rl_eval.training_prompts(config, template)
    check_references(rewards, prompts + held, f"{k}.rewards")
    rules = logical_axis_rules(config.sharding)
    init_params, apply = model_fns(cfg)
    if spec:  # the reference is the policy's frozen base: no second copy of the model
        ref = (cfg, apply, None)
        init_params, apply = lora_lib.with_lora(init_params, spec), lora_lib.lora_apply(apply, spec)
    else:  # the policy's start: init_from's EMA weights with init_from_ema
        ref = rl_common.frozen_lm(config.init_from, mesh, rules, config.rollout.frozen_dtype,
                                  ema=bool(config.get("init_from_ema", False)),
                                  key="rollout.frozen_dtype", source_key="init_from",
                                  step=pins.step("init_from"))  # fmt: skip
    rm = None
    if reward_from:
        rm = rl_common.frozen_scalar(reward_from, mesh, rules, config.rollout.frozen_dtype,
                                     ema=rm_ema, key="rollout.frozen_dtype",
                                     source_key="reward_from",
                                     step=pins.step("reward_from"))  # fmt: skip
        if rm[0].vocab_size != cfg.vocab_size:
            raise ValueError(
                f"reward_from={reward_from}: its vocab ({rm[0].vocab_size}) is not the policy's "
                f"({cfg.vocab_size}); a reward model reads the policy's tokens"
            )
    source = source_cls(
        config, mesh, rules, prompts, cfg=cfg, template=template, apply=apply, ref=ref,
        rewards=rewards, spec=spec, rm=rm,
    )  # fmt: skip
    # (the eval judges the answer after grpo.reasoning_end, as the rollouts' rewards do, and
    # the RL prompt sets' answers by the rewards too: eval/rl_heldout/reward/math_verify, ...)
    eval_fn, data_report = rl_eval.policy_eval_and_report(
        config, cfg, template, prompts, held, report, mesh, rules, workdir,
        reasoning_end=config[k].get("reasoning_end", ""), rewards=rewards,
        empty_reward=config.rollout.empty_reward,
    )  # fmt: skip
    if spec and eval_fn:
        plain_eval = eval_fn
        eval_fn = lambda params: plain_eval(lora_lib.merge(params, spec))  # noqa: E731
    # (a fresh start: the policy starts at its reference's step)
    load, transform = common.init_hooks("lm", spec, pins.step("init_from"))
    temperature = scoring_temperature(config.rollout.temperature)
    router = router_coefs(config.get("loss"), cfg.n_experts > 0)
    if make_loss is None:
        loss_fn = grpo_loss_fn(apply, config.grpo, temperature, router, config.seq_len)
    else:
        loss_fn = make_loss(apply, router)
    return loop.Task(
        name=config.task,
        init_params=init_params,
        loss_fn=loss_fn,
        train_batches=source,
        before_step=source.before_step,
        eval_fn=eval_fn,
        # under LoRA the frozen base gets no weight gradients (ModelConfig.flops_per_token)
        flops_per_token=cfg.flops_per_token(config.seq_len, frozen_base=spec is not None),
        flops_per_token_causal=cfg.flops_per_token(
            config.seq_len, causal=True, frozen_base=spec is not None
        ),
        trainable_mask=(lambda p: lora_lib.trainable_mask(p, spec)) if spec else None,
        load_init_params=load,
        init_from_transform=transform,
        model_meta={
            "model_config": cfg.to_dict(),
            **common.tokenizer_meta(tok, workdir),
            "head": "lm",
            "lora": spec.to_dict() if spec else {},
            "data_report": data_report,
            **pins.meta(),
        },
    )


def run(config, workdir: str, rewards=None):
    mesh = make_mesh(dict(config.mesh))
    return loop.run(config, workdir, build_task(config, mesh, workdir, rewards), mesh=mesh)
