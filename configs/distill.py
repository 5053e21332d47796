"""Knowledge distillation of a frozen teacher into a student on the SFT data
(alignment/distill.py).

    python -m flaxlm.train.main --config configs/distill.py:runlocal=True \
        --config.distill.teacher=runs/sft --workdir runs/distill          # a fresh tiny student
    # a pretrained student: --config.init_from=runs/pt_small; an HF teacher: teacher=hf:DIR
    # GKD's JSD(0.9): --config.distill.divergence=jsd --config.distill.jsd_beta=0.9
    # on-policy (the student's own answers to prompts, judged by the teacher token by token):
    #   configs/distill.py:on_policy=True --config.data.train=prompts.jsonl
    # GKD's mix, half the rollouts the data's answers: on_policy=True
    #   --config.distill.on_policy_fraction=0.5 --config.data.train=chats.jsonl
    # pretraining text: configs/distill.py:variant=125m,text=True --config.data.sources=DIR \
    #   --config.data.eval_sources=HELDOUT_DIR

arg keys: variant (the run's sizes — steps, batch, seq_len, lr — and a fresh student's
architecture when init_from is empty; its vocab_size is the teacher's unless
--config.model.vocab_size is given), runlocal (a CPU-sized run), steps (0 = default), lora
(adapter rank for a pretrained student; 0 = full; > 0 also multiplies opt.lr by 10),
on_policy (distill.on_policy on, the built-in world's RL prompts as data.train, rows sized to
rollout.max_prompt_len + rollout.max_new_tokens), text (pretraining text instead of chats: the
`data` section is pretraining's — data.sources, data.eval_sources, ... — and every token of the
packed documents is distilled).

`distill` keys: teacher (required: a flaxlm run or hf:DIR with the student's tokenizer),
teacher_ema, teacher_dtype (bfloat16 halves the teacher's memory), divergence (forward_kl |
reverse_kl | jsd), jsd_beta (β of jsd, in (0, 1)), temperature (τ; the loss is scaled by τ²),
ce_weight (α: the share of the data's own cross-entropy in the loss; on-policy, the "data"
are the student's own samples), eval_teacher (the teacher's generation accuracy once, at the
first evaluation: the student's mark), on_policy (train on the student's samples: the `rollout`
section — batch, epochs, temperature, prompt and response caps — as for GRPO),
on_policy_fraction (GKD's λ, with on_policy: each rollout is the student's samples with this
probability, else the data's answers to the same prompts; below 1, data.train holds chats).

Data: SFT's (`data.train`, `data.eval`, `eval_gen.sets`; defaults the built-in world's chats):
the divergence is taken on the answer tokens of the packed conversations. On-policy,
`data.train` holds prompts (GRPO's: `{"prompt"}` or `{"messages"}` ending with a user turn);
`data.eval` stays chats, the held-out divergence on their answers.
"""

from __future__ import annotations

import ml_collections

from flaxlm.alignment import common as align
from flaxlm.alignment import rl_common
from flaxlm.alignment.sft import eval_gen_config
from flaxlm.configs import common
from flaxlm.configs import sft as sft_config
from flaxlm.data.pipeline import data_config
from flaxlm.models.lora import lora_config
from flaxlm.train.optim import opt_config

# (steps, global batch, seq_len, lr) per variant: SFT's (a fresh student starts from nothing,
# so distilling into one takes as long as SFT on the same data at least).
_SIZES = sft_config._SIZES


def distill_config() -> ml_collections.ConfigDict:
    """The `distill` section."""
    c = ml_collections.ConfigDict()
    c.teacher = ""  # the frozen teacher: a flaxlm run or hf:DIR (required)
    c.teacher_ema = False  # the teacher run's EMA weights instead of its params
    # storage / compute dtype of the teacher copy: float32, bfloat16, or int8 (int8 projection
    # weights, bf16 compute; models/quant.py)
    c.teacher_dtype = "float32"
    c.divergence = "forward_kl"  # forward_kl | reverse_kl | jsd
    c.jsd_beta = 0.5  # jsd's β: the teacher's weight in the mixture M
    c.temperature = 1.0  # τ: both distributions softened; the loss is scaled by τ²
    c.ce_weight = 0.0  # α: loss = α·CE(data) + (1 − α)·τ²·divergence
    c.eval_teacher = True  # the teacher's generation accuracy once, as the student's mark
    c.on_policy = False  # True: rows are the student's own samples (the `rollout` section)
    # GKD's λ with on_policy: the share of rollouts sampled by the student; the others are the
    # data's own answers to the same prompts (data.train then holds chats, not prompts)
    c.on_policy_fraction = 1.0
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = common.parse_arg(arg, variant="tiny", runlocal=False, steps=0, lora=0, on_policy=False,
                         text=False)  # fmt: skip
    steps, batch, seq, lr = common.lookup(_SIZES, a.variant, "variant")
    if a.runlocal:
        steps, batch, seq = min(steps, 40), min(batch, 16), min(seq, 128)
    c = common.trainer_config(a.steps or steps, batch, seq)
    c.task = "distill"  # which task main.py runs
    c.model = common.model_config(a.variant)  # a fresh student's architecture (no init_from)
    c.data = align.data_config("builtin:sft_train", "builtin:sft_heldout")
    if a.variant in ("tiny", "mini", "small"):
        # the built-in tokenizer's vocab; a fresh student takes the teacher's vocab_size instead
        # unless --config.model.vocab_size is given (alignment/distill.py fresh_student_vocab)
        c.model.vocab_size = c.data.builtin_vocab_size
    c.distill = distill_config()
    c.loss = ml_collections.ConfigDict()
    c.loss.chunk_tokens = 0  # > 0: both models' logits over chunks of this many positions
    common.router_loss_keys(c.loss)  # moe_aux, moe_z: a student with experts (models/moe.py)
    c.lora = lora_config(a.lora)  # LoRA adapters for a pretrained student; rank 0 = off
    c.eval_gen = eval_gen_config("builtin:sft_heldout", c.get_ref("seq_len"))
    # on-policy only: one sample per prompt, each rollout trained on once
    c.rollout = rl_common.rollout_config(batch)
    # The RL stages' keys that distillation never reads: no rewards (empty_reward,
    # nonstop_penalty), no held-out RL prompts (held-out data is data.eval), and the teacher's
    # dtype is distill.teacher_dtype (frozen_dtype)
    for key in ("empty_reward", "nonstop_penalty", "heldout_prompts", "frozen_dtype"):
        del c.rollout[key]
    if a.on_policy:
        c.distill.on_policy = True
        c.data.train = "builtin:rl_prompts"
        rl_common.size_rollout_rows(c, seq)
    if a.text:  # pretraining's data section: packed documents, every token distilled
        c.data = data_config()
        c.data.kind = "text"  # stays "text": distill.py tells this section from the chat one by it
        c.data.eval_sources = ""  # held-out text ("" = the built-in world's; required with sources)
        c.data.eval_batches = 4  # held-out batches per evaluation
        c.eval_gen.sets = ""  # (no chats to answer)
    c.opt.lr = lr * (10 if a.lora else 1)
    c.opt.warmup_steps = max(c.total_steps // 20, 1)
    # fine-tuning stays near its start; a run on pretraining text keeps pretraining's decay
    c.opt.weight_decay = opt_config().weight_decay if a.text else 0.0
    c.eval_every = c.total_steps // 2 if a.runlocal else 200
    c.ckpt_every = c.total_steps if a.runlocal else 500
    if a.runlocal:
        c.eval_gen.examples = 16
        c.eval_gen.batch = 16
        c.eval_gen.max_new_tokens = 12
    c.lock()
    return c


def sweep(add, arg=None):
    """The three divergences, and forward KL softened (τ = 2)."""
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        add(**{"distill.divergence": kind})
    add(**{"distill.temperature": 2.0})
