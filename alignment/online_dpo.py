"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"): the
DPO loss on pairs the *current* policy samples, ranked by rewards — GRPO's rollout with groups
of two and DPO's loss instead of the clipped policy gradient.

    python -m flaxlm.train.main --config configs/online_dpo.py:runlocal=True \
        --config.init_from=runs/sft --workdir runs/odpo \
        --config.online.rewards=exact_match,format:0.2

One iteration (alignment/rl_rollout.py `RolloutSource`, driven by the loop's `before_step`):
  1. generate: `rollout.batch / 2` prompts, two samples each, in one decoder call with the
     current policy (GRPO's `make_rollout`, alignment/grpo.py, with the `online` section for
     its settings: rewards — reward functions and/or "rm", the reward model of `reward_from` —
     `dynamic_sampling`, `reasoning_end`, `overlong_buffer`);
  2. rank: the sample with the higher reward is "chosen", the other "rejected"; a pair whose
     rewards tie, or with a sample whose reward is invalid, carries no preference and gets
     `valid` = 0 (`online.dynamic_sampling` = N draws more prompts to replace tied pairs, as for
     GRPO's flat groups; a rollout with no valid pair is warned about and its steps train on
     nothing, as GRPO's all-flat ones); an empty answer (or an unfinished reasoning) is not
     judged: it has `rollout.empty_reward`, so a pair of a rewarded answer and an empty one
     keeps its preference;
  3. score: the reference's log-probability of each response (and the policy's, for the KL and
     logprob-gap statistics), both at temperature 1;
  4. train: `rollout.epochs` passes over the rollout's pairs in minibatches of `batch_size`
     pairs, each an optimizer step on DPO's loss (`dpo.*`: β, loss type — sigmoid, ipo, ...,
     alignment/dpo.py `preference_loss`).

Temperature: the responses are sampled at `rollout.temperature`, but DPO's objective is about
the model's own distribution: the policy's and the reference's log-probabilities are at T = 1
(as in the offline DPO task; TRL's OnlineDPOTrainer does the same).

LoRA (`lora.rank` > 0), the reference, the reward model, evaluation and checkpoints are GRPO's
(the reference is the policy's frozen base under LoRA).

Metrics: DPO's loss-side `rewards/chosen|rejected|margin|accuracy`, `logps/chosen|rejected`
(and, for a mixture-of-experts policy, DPO's router losses and `moe/*`);
per rollout GRPO's `rollout/*` (reward, lengths, KL to the reference, time split) and
`rollout/pairs_valid` (share of pairs with a preference).
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from flaxlm.alignment import grpo
from flaxlm.alignment.dpo import check_loss_settings, dpo_loss_fn
from flaxlm.alignment.rl_rollout import lm_logprobs, passthrough_stats
from flaxlm.models.sharding import make_mesh
from flaxlm.train import loop

log = logging.getLogger(__name__)

ROW_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


def preference_pairs(rows: dict, advantages, ref_logprobs) -> tuple[dict, np.ndarray]:
    """Pair rows (B/2 pairs) from rollout rows in groups of two (rows 2i, 2i + 1): the one with
    the larger advantage (the higher reward) is chosen; `ref_{chosen,rejected}_logps` are the
    reference's sequence log-probabilities (Σ over the response tokens); `valid` is 0 where the
    two tie or a row has no loss tokens (an invalid sample). Returns (pairs, valid)."""
    adv = np.asarray(advantages).reshape(-1, 2)
    first = adv[:, 0] >= adv[:, 1]
    idx = np.arange(0, 2 * len(adv), 2)
    chosen, rejected = np.where(first, idx, idx + 1), np.where(first, idx + 1, idx)
    mask = np.asarray(rows["loss_mask"])
    ref_seq = (np.asarray(ref_logprobs) * mask).sum(1)
    has_tokens = mask.sum(1) > 0
    valid = (adv[:, 0] != adv[:, 1]) & has_tokens[chosen] & has_tokens[rejected]
    pairs = {f"{side}_{k}": rows[k][at] for side, at in (("chosen", chosen),
                                                          ("rejected", rejected))
             for k in ROW_KEYS}  # fmt: skip
    pairs["ref_chosen_logps"] = ref_seq[chosen].astype(np.float32)
    pairs["ref_rejected_logps"] = ref_seq[rejected].astype(np.float32)
    pairs["valid"] = valid.astype(np.float32)
    return pairs, valid


class OnlineDPOSource(grpo.GRPOSource):
    """GRPO's rollout with groups of two, turned into preference pairs with reference logps."""

    SECTION = "online"

    def __init__(self, config, mesh, rules, prompts, *, apply, ref, **kw):
        super().__init__(config, mesh, rules, prompts, apply=apply, ref=ref, **kw)

        def score(policy, ref_p, rows):  # at T = 1: DPO's objective (module docstring)
            lp = lm_logprobs(apply, policy, rows)
            return lp, lm_logprobs(ref[1], ref_p, rows), lp

        self._score = jax.jit(score)

    @classmethod
    def check_settings(cls, config) -> None:
        """GRPO's checks of the `online` section, pairs that fill whole minibatches, and DPO's
        loss settings (`dpo.*`, traced only at the first step after a rollout): build_task
        calls it before any load."""
        if config.online.group_size != 2:
            raise ValueError(f"online.group_size={config.online.group_size}: a pair is 2")
        super().check_settings(config)
        pairs = config.rollout.batch // 2
        if pairs % config.batch_size:
            raise ValueError(
                f"rollout.batch / 2 = {pairs} pairs is not a multiple of "
                f"batch_size={config.batch_size} (pairs per minibatch)"
            )
        check_loss_settings(config.dpo)

    def make_rollout(self, params, rng):
        rows, stats = super().make_rollout(params, rng)
        pairs, valid = preference_pairs(rows, rows["advantages"], rows["ref_logprobs"])
        if not valid.any():
            # As GRPO's all-flat groups: the rollout's steps have nothing to learn (zero
            # gradients), logged, and the run goes on (it raised, ending a long run at a rollout
            # its resume would draw again)
            log.warning(
                "rollout %d: no pair with a preference (every pair's rewards tie): its steps "
                "train on nothing; check online.rewards, or set online.dynamic_sampling",
                self.iteration,
            )
        return pairs, {**stats, "pairs_valid": float(valid.mean())}


def online_dpo_loss_fn(apply, d, router: tuple | None = None):
    """DPO's loss over a minibatch of pairs (with the router losses of a mixture-of-experts
    policy: `router`, as `dpo_loss_fn`), with the rollout statistics passed through."""
    dpo = dpo_loss_fn(apply, d, router)

    def loss_fn(params, batch, rng):
        loss, metrics = dpo(params, batch, rng)
        return loss, {**metrics, **passthrough_stats(batch)}

    return loss_fn


def build_task(config, mesh, workdir: str | None = None, rewards=None) -> loop.Task:
    """The online DPO Task: GRPO's (rollouts, reference, LoRA, evaluation) with pairs and
    DPO's loss. `rewards`: optional [(name, callable, weight)] replacing `online.rewards`."""
    return grpo.build_task(
        config, mesh, workdir, rewards, source_cls=OnlineDPOSource,
        make_loss=lambda apply, router: online_dpo_loss_fn(apply, config.dpo, router),
    )  # fmt: skip


def run(config, workdir: str, rewards=None):
    mesh = make_mesh(dict(config.mesh))
    return loop.run(config, workdir, build_task(config, mesh, workdir, rewards), mesh=mesh)
