"""PPO (RLHF) from an SFT run, scored by a reward-model run that also initialises the critic.

    python -m flaxlm.train.main --config configs/ppo.py:runlocal=True \
        --config.init_from=runs/sft --config.reward_from=runs/rm --workdir runs/ppo

arg keys: variant (sizes of the run; the architecture comes from the checkpoints), runlocal
(a CPU-sized run), steps (0 = default), lora (adapter rank on the policy and the critic; 0 = full
fine-tuning; > 0 also multiplies opt.lr by 10).
One rollout of `rollout.batch` responses gives rollout.epochs × rollout.batch / batch_size
optimizer steps.

Data: `data.train` (the prompts) and `eval_gen.sets` default to the built-in demo world's; for
your own set both (records {"prompt": text or messages, "meta": {...}}, alignment/rl_common.py;
held-out: chats or prompts with meta.answer, scored by exact match; "" = no generation eval):

    --config.data.train=prompts.jsonl --config.eval_gen.sets=chat_heldout.jsonl

`data.eval` is not read here (held-out prompts come from `eval_gen.sets` and
`rollout.heldout_prompts`), and there is no `data.shuffle`: the prompts are reshuffled every
epoch (by `seed`).
"""

from __future__ import annotations

import ml_collections

from flaxlm.alignment import common as align
from flaxlm.alignment.rl_common import rl_run_config, rollout_config, size_rollout_rows
from flaxlm.configs import common
from flaxlm.models.lora import lora_config

# (optimizer steps, rollout batch, minibatch, row-width cap, lr) per variant; runlocal shrinks
# them.
_SIZES = {
    "tiny": (128, 64, 16, 96, 1e-5),
    "mini": (256, 64, 16, 96, 1e-5),
    "small": (512, 128, 32, 128, 5e-6),
    "125m": (1000, 256, 64, 512, 2e-6),
    "1b": (1000, 512, 64, 1024, 1e-6),
    "7b": (1000, 512, 64, 2048, 5e-7),
}


def ppo_config() -> ml_collections.ConfigDict:
    """The `ppo` section: advantage estimation, clipping, KL penalty, loss weights."""
    c = ml_collections.ConfigDict()
    c.gamma = 1.0  # GAE discount γ in [0, 1] (1: the final reward counts fully at every token)
    c.lam = 0.95  # λ of GAE, in [0, 1] (bias–variance trade-off)
    c.whiten_advantages = True  # normalise advantages over each rollout
    c.clip = 0.2  # ε > 0 of the clipped policy ratio
    c.value_clip = 0.2  # ε_V > 0 of the clipped value loss (a large ε_V turns clipping off)
    c.vf_coef = 0.1  # weight of the value loss in the combined loss
    c.ent_coef = 0.0  # weight >= 0 of the entropy bonus (0 = none)
    # β >= 0 of the per-token KL penalty. Adaptive (kl_target > 0): the initial value (> 0),
    # continued from the checkpoint on a resume; fixed: this value, also on a resume.
    c.kl_coef = 0.05
    c.kl_estimator = "k1"  # k1 (log-ratio) | k3 ((r − 1) − log r, always >= 0)
    c.kl_target = 0.0  # > 0: adapt β toward this per-sequence KL (Ziegler et al.); 0 = fixed β
    c.kl_horizon = 10000  # horizon (sequences) of the adaptive β controller
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = common.parse_arg(arg, variant="tiny", runlocal=False, steps=0, lora=0)
    steps, rbatch, mbatch, seq, lr = common.lookup(_SIZES, a.variant, "variant")
    if a.runlocal:
        steps, rbatch, mbatch, seq = min(steps, 16), min(rbatch, 32), min(mbatch, 16), min(seq, 96)
    c = common.trainer_config(a.steps or steps, mbatch, seq)
    c.task = "ppo"  # which task main.py runs
    c.reward_from = ""  # reward-model run: scores rollouts and initialises the critic
    c.reward_from_ema = False  # True: reward_from's EMA weights (a run with ema.decay > 0)
    c.model = common.model_config(a.variant)  # unused: the architecture comes from init_from
    c.data = align.data_config("builtin:rl_prompts", "")  # data.train: the RL prompts
    # no data.shuffle: the prompts are reshuffled every epoch (by `seed`), always
    del c.data["shuffle"]
    c.rollout = rollout_config(rbatch)  # generation and bad-input policy (alignment/rl_common)
    c.rollout.epochs = 2  # PPO epochs over each rollout
    size_rollout_rows(c, seq)
    c.ppo = ppo_config()
    # moe_aux, moe_z: a policy or critic with experts (models/moe.py), each its own router loss
    c.loss = common.router_loss_keys()
    # LoRA adapters on the policy and the critic (models/lora.py; the critic's head trains
    # whole); rank 0 = off. The reference is then the policy's frozen base (no second copy).
    c.lora = lora_config(a.lora)
    # held-out evals (greedy accuracy / RM score), schedule, cadence (rl_common)
    rl_run_config(c, lr * (10 if a.lora else 1), a.runlocal)  # (adapters start at zero)
    c.lock()
    return c


def sweep(add, arg=None):
    """KL coefficient × estimator."""
    for kl in (0.02, 0.1):
        for est in ("k1", "k3"):
            add(**{"ppo.kl_coef": kl, "ppo.kl_estimator": est})
