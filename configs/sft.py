"""Supervised fine-tuning (instruction tuning) of a pretrained model.

    python -m flaxlm.train.main --config configs/sft.py:runlocal=True \
        --config.init_from=runs/pt --workdir runs/sft
    # LoRA: configs/sft.py:lora=8     an HF checkpoint: --config.init_from=hf:/path/to/model

arg keys: variant (the run's sizes — steps, batch, seq_len, lr — and the architecture of a fresh
model when init_from is empty; with init_from the checkpoint's own architecture is used and
the sizes still come from variant), runlocal (a CPU-sized run), steps (0 = default), lora
(adapter rank; 0 = full fine-tuning; > 0 also multiplies opt.lr by 10, which
`--config.lora.rank` alone does not).

Data: `data.train`, `data.eval` and `eval_gen.sets` default to the built-in demo world's splits;
for your own chats set all three (jsonl/parquet or .json array records of data/formats.py:
`messages`, or `prompt` + `completion`; `eval_gen.sets=""` skips generation eval):

    --config.data.train=chat.jsonl --config.data.eval=heldout.jsonl \
        --config.eval_gen.sets=heldout.jsonl
"""

from __future__ import annotations

import ml_collections

from flaxlm.alignment import common as align
from flaxlm.alignment.sft import eval_gen_config
from flaxlm.configs import common
from flaxlm.models.lora import lora_config

# (steps, global batch, seq_len, lr) per variant; runlocal shrinks them.
_SIZES = {
    "tiny": (300, 32, 128, 1e-3),
    "mini": (600, 32, 128, 1e-3),
    "small": (1000, 64, 256, 5e-4),
    "125m": (2000, 64, 1024, 1e-4),
    "1b": (3000, 128, 2048, 2e-5),
    "7b": (3000, 128, 4096, 1e-5),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = common.parse_arg(arg, variant="tiny", runlocal=False, steps=0, lora=0)
    steps, batch, seq, lr = common.lookup(_SIZES, a.variant, "variant")
    if a.runlocal:
        steps, batch, seq = min(steps, 40), min(batch, 16), min(seq, 128)
    c = common.trainer_config(a.steps or steps, batch, seq)
    c.task = "sft"  # which task main.py runs
    c.model = common.model_config(a.variant)  # architecture of a fresh model (no init_from)
    c.data = align.data_config("builtin:sft_train", "builtin:sft_heldout")
    if a.variant in ("tiny", "mini", "small"):
        c.model.vocab_size = c.data.builtin_vocab_size  # the built-in tokenizer's vocab
    c.loss = ml_collections.ConfigDict()
    c.loss.z_loss = 0.0  # PaLM z-loss coefficient
    c.loss.chunk_tokens = 0  # > 0: CE over chunks of this many positions (no full logits)
    common.router_loss_keys(c.loss)  # moe_aux, moe_z: models with experts (models/moe.py)
    c.lora = lora_config(a.lora)  # LoRA adapters (models/lora.py); rank 0 = off
    # (eval_gen.max_prompt_len follows seq_len − eval_gen.max_new_tokens unless set itself)
    c.eval_gen = eval_gen_config("builtin:sft_heldout,builtin:heldout_facts", c.get_ref("seq_len"))
    c.opt.lr = lr * (10 if a.lora else 1)  # adapters start at zero and need a larger step
    c.opt.warmup_steps = max(c.total_steps // 20, 1)
    c.opt.weight_decay = 0.0  # fine-tuning: stay near the pretrained weights by few steps
    c.eval_every = c.total_steps // 2 if a.runlocal else 200
    c.ckpt_every = c.total_steps if a.runlocal else 500
    if a.runlocal:
        c.eval_gen.examples = 16
        c.eval_gen.batch = 16
        c.eval_gen.max_new_tokens = 12
    c.lock()
    return c


def sweep(add, arg=None):
    """Learning rate × full fine-tuning vs LoRA."""
    for lr in (3e-4, 1e-3):
        for rank in (0, 8):
            add(**{"opt.lr": lr * (10 if rank else 1), "lora.rank": rank})
