"""GRPO with verifiable rewards from an SFT run (no reward model, no critic).

    python -m flaxlm.train.main --config configs/grpo.py:runlocal=True --workdir runs/grpo \
        --config.init_from=runs/sft --config.grpo.rewards=exact_match,format:0.1

arg keys: variant (sizes of the run; the architecture comes from init_from), runlocal (a
CPU-sized run), steps (0 = default), group (samples per prompt), lora (adapter rank; 0 = full
fine-tuning; with adapters the reference is the policy's frozen base). One rollout holds
rollout.batch / group prompts × group samples and gives rollout.epochs × rollout.batch /
batch_size optimizer steps.

Your own prompts and rewards. `data.train` (and `eval_gen.sets`, held-out) are jsonl/parquet
records {"prompt": text or messages, "meta": {"answer": "42", ...}}: `meta` is what every reward
function sees (other fields are ignored; one that asks for it also gets the prompt, below),
`meta.answer` the reference answer. The built-in `exact_match` then compares the whole response
to `meta.answer` (stripped), whatever else `meta` holds ("task": "sort" too: the world's rules
score only the world's records, whose meta carries its mark, "world": "flaxlm-builtin");
`format` and `judge` are the demo world's. Your own reward is a function (meta: dict,
response: str) -> float in any importable module (the working directory counts), named as
module:function:

    # my_rewards.py
    def numeric(meta, response):
        nums = re.findall("[0-9]+", response)
        return float(bool(nums) and nums[-1] == meta["answer"])

    --config.data.train=prompts.jsonl --config.eval_gen.sets=heldout.jsonl \
        --config.grpo.rewards=my_rewards:numeric,exact_match:0.1

A reward that needs the question too takes a third parameter named `prompt`: the record's
prompt as chat turns, [{"role": "user", "content": ...}, ...] (a text prompt is one user turn):

    def cites_question(meta, response, prompt):
        return float(prompt[-1]["content"].split()[0] in response)

A reward model trained here (configs/reward.py) scores too: `--config.reward_from=runs/rm
--config.grpo.rewards=rm` (or `exact_match,rm:0.5`); its vocabulary must be the policy's.

Each is logged as rollout/r_<module>.<function> (rollout/r_my_rewards.numeric); a sample whose
reward raises or is NaN is skipped and counted (rollout/bad_reward). The held-out eval's
accuracy is exact match with the reference (alignment/sft.py `score`), not your reward.

`data.eval` is not read here (held-out prompts come from `eval_gen.sets` and
`rollout.heldout_prompts`), and there is no `data.shuffle`: the prompts are reshuffled every
epoch (by `seed`).
"""

from __future__ import annotations

import ml_collections

from flaxlm.alignment import common as align
from flaxlm.alignment.rl_common import rl_run_config, rollout_config, size_rollout_rows
from flaxlm.alignment.verify_code import code_limits_config
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


def grpo_config(group: int) -> ml_collections.ConfigDict:
    """The `grpo` section."""
    c = ml_collections.ConfigDict()
    c.group_size = group  # samples per prompt (G)
    c.rewards = "exact_match"  # name[:weight],...: alignment/grpo.py REWARDS or module:function
    # A = (r − mean)/std per group; False: r − mean (Dr. GRPO, with loss_agg="constant")
    c.scale_by_std = True
    # mean: the group's mean reward | loo: the mean of the *other* samples' (RLOO with
    # scale_by_std=False)
    c.baseline = "mean"
    # group: divide by each group's std | batch: by the std of the whole rollout's baselined
    # rewards (REINFORCE++-baseline; with scale_by_std)
    c.std_scope = "group"
    c.clip = 0.2  # ε > 0 of the clipped ratio: [1 − ε, 1 + ε]
    c.clip_high = 0.0  # upper ε when > 0: [1 − clip, 1 + clip_high] (DAPO's clip-higher, 0.28)
    # token: per-token ratio π/π_old (GRPO) | sequence: each response's length-normalised ratio
    # exp(mean log π/π_old) for all its tokens (GSPO; use clip ~3e-4 / clip_high ~4e-4 there)
    c.importance = "token"
    # DAPO's soft overlong punishment: responses longer than rollout.max_new_tokens − buffer
    # lose up to 1 reward, linearly; 0 = off (rollout.nonstop_penalty still applies)
    c.overlong_buffer = 0
    # DAPO's overlong filtering: responses cut at rollout.max_new_tokens (no stop) get no loss;
    # they still count in their group's mean and std
    c.mask_truncated = False
    # DAPO's dynamic sampling: groups whose rewards are all equal (no signal) are set aside and
    # up to this many extra decoder calls per rollout draw more prompts; 0 = off
    c.dynamic_sampling = 0
    c.beta = 0.04  # weight >= 0 of the per-token KL (k3) to the reference (0: no KL term)
    # seq: mean over each response, then over responses | token: token mean (DAPO) | constant:
    # token sum / (rows × seq_len) (Dr. GRPO: no 1/|o_i|, so no response-length bias)
    c.loss_agg = "seq"
    # a reasoning model's end-of-thinking marker (e.g. "</think>"): rewards judge the text after
    # it; a response without it gets rollout.empty_reward. "" = the whole response is judged
    c.reasoning_end = ""
    # code_tests / code_tests_partial: each program's limits and what the guard allows
    # (alignment/verify_code.py Limits: timeout, memory_mb, ..., network, writes_outside, shell)
    c.code_limits = code_limits_config()
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = common.parse_arg(arg, variant="tiny", runlocal=False, steps=0, group=8, lora=0)
    steps, rbatch, mbatch, seq, lr = common.lookup(_SIZES, a.variant, "variant")
    if a.runlocal:
        steps, rbatch, mbatch, seq = min(steps, 16), min(rbatch, 32), min(mbatch, 16), min(seq, 96)
    c = common.trainer_config(a.steps or steps, mbatch, seq)
    c.task = "grpo"  # which task main.py runs
    c.model = common.model_config(a.variant)  # unused: the architecture comes from init_from
    # a reward-model run: named "rm[:weight]" in grpo.rewards, its score at the response's last
    # token joins the reward functions' (open-ended prompts; mixed with verifiable rewards)
    c.reward_from = ""
    c.reward_from_ema = False  # True: reward_from's EMA weights (a run with ema.decay > 0)
    c.data = align.data_config("builtin:rl_prompts", "")  # data.train: the RL prompts
    # no data.shuffle: the prompts are reshuffled every epoch (by `seed`), always
    del c.data["shuffle"]
    c.rollout = rollout_config(rbatch)  # generation and bad-input policy (alignment/rl_common)
    size_rollout_rows(c, seq)
    c.rollout.empty_reward = 0.0  # an empty answer earns what a wrong one does
    c.grpo = grpo_config(a.group)
    c.loss = common.router_loss_keys()  # moe_aux, moe_z: a policy with experts (models/moe.py)
    # LoRA adapters on the policy (models/lora.py); rank 0 = off. The reference is then the
    # policy's frozen base: no second copy of the model is loaded.
    c.lora = lora_config(a.lora)
    # held-out evals, schedule, cadence (rl_common); adapters start at zero: a larger step
    rl_run_config(c, lr * (10 if a.lora else 1), a.runlocal)
    c.lock()
    return c


def sweep(add, arg=None):
    """Group size × KL weight."""
    for group in (4, 8):
        for beta in (0.0, 0.04):
            add(**{"grpo.group_size": group, "grpo.beta": beta})
