"""KTO (Kahneman-Tversky Optimization) from an SFT run, on unpaired desirable / undesirable
answers (alignment/kto.py).

    python -m flaxlm.train.main --config configs/kto.py:runlocal=True \
        --config.init_from=runs/sft --workdir runs/kto [--config.kto.undesirable_weight=1.33]

arg keys: variant (sizes of the run; the architecture comes from init_from), runlocal (a
CPU-sized run), steps (0 = default), lora (adapter rank; 0 = full, the reference a frozen copy
of init_from; > 0: the reference is the policy's own frozen base, and opt.lr is multiplied by 10).

`kto` keys: beta (β), desirable_weight / undesirable_weight (λ_D, λ_U: keep λ_D·n_D / (λ_U·n_U)
in [1, 4/3] for n_D desirable and n_U undesirable training examples — a run outside it warns),
ref_from (the reference run; "" = init_from), ref_dtype.

Data: `data.train`, `data.eval` and `eval_gen.sets` default to the built-in demo world's
preference pairs, each split into a desirable and an undesirable example. For your own data set
all three: jsonl / parquet records `{"prompt": ..., "completion": ..., "label": true}` or
`{"messages": [...], "label": false}` (the label field is `data.fields.label`), or preference
records (`prompt`, `chosen`, `rejected`), split the same way; eval_gen.sets: chats or prompt
records with meta.answer, scored by exact match ("" skips generation eval):

    --config.data.train=feedback.jsonl --config.data.eval=feedback_heldout.jsonl \
        --config.eval_gen.sets=chat_heldout.jsonl
"""

from __future__ import annotations

import ml_collections

from flaxlm.alignment import common as align
from flaxlm.alignment.sft import eval_gen_config
from flaxlm.configs import common
from flaxlm.configs import dpo as dpo_config
from flaxlm.models.lora import lora_config

# (steps, global batch in examples, seq_len, lr) per variant; runlocal shrinks them: DPO's
# sizes, one example where DPO has a pair. The batch must hold at least 2 examples (the KL
# estimate pairs each completion with another example's prompt in the same global batch).
_SIZES = dpo_config._SIZES


def kto_config() -> ml_collections.ConfigDict:
    """The `kto` section."""
    c = ml_collections.ConfigDict()
    c.beta = 0.1  # β > 0: scale of the implicit reward log π/π_ref in the value function
    c.desirable_weight = 1.0  # λ_D, weight of the desirable examples' loss
    c.undesirable_weight = 1.0  # λ_U, weight of the undesirable examples' loss
    c.ref_from = ""  # reference run ("" = init_from; its EMA with init_from_ema); not with LoRA
    # dtype of the frozen reference copy: bfloat16 halves its memory, int8 (int8 projection
    # weights, bf16 compute) quarters its matrices
    c.ref_dtype = "float32"
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = common.parse_arg(arg, variant="tiny", runlocal=False, steps=0, lora=0)
    steps, batch, seq, lr = common.lookup(_SIZES, a.variant, "variant")
    if a.runlocal:
        steps, batch, seq = min(steps, 40), min(batch, 16), min(seq, 128)
    c = common.trainer_config(a.steps or steps, batch, seq)
    c.task = "kto"  # which task main.py runs
    c.model = common.model_config(a.variant)  # unused: the architecture comes from init_from
    c.data = align.data_config("builtin:preferences", "builtin:preferences_heldout")
    c.kto = kto_config()
    c.loss = common.router_loss_keys()  # moe_aux, moe_z: a policy with experts (models/moe.py)
    c.lora = lora_config(a.lora)  # LoRA adapters (models/lora.py); rank 0 = off
    # The task metric (greedy accuracy): the world's held-out questions, and the RL prompts
    # (questions that the preference pairs also ask: the trained distribution).
    c.eval_gen = eval_gen_config("builtin:sft_heldout,builtin:rl_prompts", c.get_ref("seq_len"))
    # > 0: also the accuracy of answers sampled at this temperature, `samples` per prompt
    # (alignment/rl_eval.py `make_policy_eval`, as the RL stages report it); 0 = greedy only
    c.eval_gen.sample_temperature = 0.0
    c.eval_gen.samples = 1
    c.opt.lr = lr * (10 if a.lora else 1)
    c.opt.schedule = "linear"
    c.opt.warmup_steps = max(c.total_steps // 10, 1)
    c.opt.weight_decay = 0.0
    c.eval_every = c.total_steps // 2 if a.runlocal else 100
    c.ckpt_every = c.total_steps if a.runlocal else 500
    if a.runlocal:
        c.eval_gen.examples = 32
        c.eval_gen.batch = 32
        c.eval_gen.max_new_tokens = 16
    c.lock()
    return c


def sweep(add, arg=None):
    """β around the default 0.1, and balanced data's desirable examples weighted up to the top
    of the recommended range (λ_D·n_D / (λ_U·n_U) = 4/3)."""
    for beta in (0.03, 0.1, 0.3):
        add(**{"kto.beta": beta})
    add(**{"kto.desirable_weight": 4.0 / 3.0})
