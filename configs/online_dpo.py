"""Online DPO from an SFT run: pairs sampled by the current policy, ranked by rewards.

    python -m flaxlm.train.main --config configs/online_dpo.py:runlocal=True \
        --workdir runs/odpo --config.init_from=runs/sft \
        --config.online.rewards=exact_match,format:0.2

arg keys: variant (sizes of the run; the architecture comes from init_from), runlocal (a
CPU-sized run), steps (0 = default), loss (dpo.loss_type with its usual dpo.beta and
dpo.label_smoothing, as configs/dpo.py), lora (adapter rank; 0 = full fine-tuning; > 0 also
multiplies opt.lr by 10). One rollout holds rollout.batch / 2 prompts × 2 samples = as many
pairs, and gives rollout.epochs × pairs / batch_size optimizer steps (`batch_size` counts pairs).

Rewards rank each pair: `online.rewards` names reward functions as GRPO's `grpo.rewards` does
(configs/grpo.py: built-ins, module:function, "rm" for the reward model of `reward_from`;
errors name online.rewards); the prompts are `data.train` records {"prompt", "meta"} as GRPO's
(`exact_match` compares with meta.answer unless the record is the built-in world's). The `dpo`
section is DPO's loss (configs/dpo.py); the reference is the `init_from` run (frozen,
`rollout.frozen_dtype`), or the policy's frozen base under LoRA. `data.eval` is not read here
(held-out prompts come from `eval_gen.sets` and `rollout.heldout_prompts`), and there is no
`data.shuffle`: the prompts are reshuffled every epoch (by `seed`).
"""

from __future__ import annotations

import ml_collections

from flaxlm.alignment import common as align
from flaxlm.alignment.rl_common import rl_run_config, rollout_config, size_rollout_rows
from flaxlm.alignment.verify_code import code_limits_config
from flaxlm.configs import common
from flaxlm.configs.dpo import dpo_config
from flaxlm.models.lora import lora_config

# (optimizer steps, rollout batch (samples), minibatch (pairs), row-width cap, lr) per variant;
# runlocal shrinks them.
_SIZES = {
    "tiny": (128, 64, 16, 96, 5e-6),
    "mini": (256, 64, 16, 96, 5e-6),
    "small": (512, 128, 32, 128, 2e-6),
    "125m": (1000, 256, 64, 512, 1e-6),
    "1b": (1000, 512, 64, 1024, 5e-7),
    "7b": (1000, 512, 64, 2048, 5e-7),
}


def online_config() -> ml_collections.ConfigDict:
    """The `online` section: how pairs are drawn and ranked (GRPO's keys of the same names)."""
    c = ml_collections.ConfigDict()
    c.group_size = 2  # samples per prompt: a pair (fixed)
    c.rewards = "exact_match"  # name[:weight],...: as grpo.rewards (alignment/grpo.py)
    c.scale_by_std = True  # (the ranking only needs the order of the two rewards)
    # DAPO's dynamic sampling: tied pairs (no preference) are set aside and up to this many
    # extra decoder calls per rollout draw more prompts; 0 = off
    c.dynamic_sampling = 0
    # responses longer than rollout.max_new_tokens − buffer lose up to 1 reward; 0 = off
    c.overlong_buffer = 0
    # a reasoning model's end-of-thinking marker: rewards judge the text after it
    c.reasoning_end = ""
    c.code_limits = code_limits_config()  # as grpo.code_limits
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = common.parse_arg(arg, variant="tiny", runlocal=False, steps=0, loss="sigmoid", lora=0)
    steps, rbatch, mbatch, seq, lr = common.lookup(_SIZES, a.variant, "variant")
    if a.runlocal:
        steps, rbatch, mbatch, seq = min(steps, 16), min(rbatch, 32), min(mbatch, 8), min(seq, 96)
    c = common.trainer_config(a.steps or steps, mbatch, seq)
    c.task = "online_dpo"  # which task main.py runs
    c.model = common.model_config(a.variant)  # unused: the architecture comes from init_from
    c.reward_from = ""  # a reward-model run, named "rm[:weight]" in online.rewards
    c.reward_from_ema = False  # True: reward_from's EMA weights (a run with ema.decay > 0)
    c.data = align.data_config("builtin:rl_prompts", "")  # data.train: the prompts
    # no data.shuffle: the prompts are reshuffled every epoch (by `seed`), always
    del c.data["shuffle"]
    c.rollout = rollout_config(rbatch)  # generation and bad-input policy (alignment/rl_common)
    size_rollout_rows(c, seq)
    c.rollout.empty_reward = 0.0  # an empty answer earns what a wrong one does
    c.online = online_config()
    c.loss = common.router_loss_keys()  # moe_aux, moe_z: a policy with experts (models/moe.py)
    d = dpo_config(a.loss)
    # the loss keys of DPO's section (configs/dpo.py)
    keys = ("loss_type", "beta", "label_smoothing", "simpo_gamma", "discopop_tau", "sft_coef")
    c.dpo = ml_collections.ConfigDict({k: d[k] for k in keys})
    c.lora = lora_config(a.lora)  # LoRA adapters on the policy (models/lora.py); rank 0 = off
    # held-out evals, schedule, cadence (rl_common); adapters start at zero: a larger step
    rl_run_config(c, lr * (10 if a.lora else 1), a.runlocal)
    c.lock()
    return c


def sweep(add, arg=None):
    """β of the sigmoid loss."""
    for beta in (0.05, 0.1, 0.3):
        add(**{"dpo.beta": beta})
