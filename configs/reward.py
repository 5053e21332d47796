"""Reward model on preference pairs, initialised from an SFT run.

    python -m flaxlm.train.main --config configs/reward.py:runlocal=True \
        --config.init_from=runs/sft --workdir runs/rm

arg keys: variant (the run's sizes — steps, batch, seq_len, lr — and the architecture of a fresh
model when init_from is empty; with init_from the checkpoint's own architecture is used and
the sizes still come from variant), runlocal (a CPU-sized run), steps (0 = default), lora
(adapter rank; 0 = full fine-tuning; > 0 also multiplies opt.lr by 10; the scalar head always
trains).

Data: `data.train` and `data.eval` default to the built-in demo world's pairs; for your own set
both (jsonl/parquet records of data/formats.py: `prompt` + `chosen` + `rejected`, optional
numeric `margin`; `data.eval=""` skips the held-out eval, whose accuracy is on data.eval):

    --config.data.train=prefs.jsonl --config.data.eval=prefs_heldout.jsonl
"""

from __future__ import annotations

import ml_collections

from flaxlm.alignment import common as align
from flaxlm.configs import common
from flaxlm.models.lora import lora_config

# (steps, global batch in pairs, seq_len, lr) per variant; runlocal shrinks them.
_SIZES = {
    "tiny": (200, 32, 128, 5e-4),
    "mini": (400, 32, 160, 3e-4),
    "small": (600, 64, 256, 1e-4),
    "125m": (1000, 64, 1024, 3e-5),
    "1b": (2000, 128, 2048, 1e-5),
    "7b": (2000, 128, 4096, 9e-6),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = common.parse_arg(arg, variant="tiny", runlocal=False, steps=0, lora=0)
    steps, batch, seq, lr = common.lookup(_SIZES, a.variant, "variant")
    if a.runlocal:
        steps, batch, seq = min(steps, 40), min(batch, 16), min(seq, 128)
    c = common.trainer_config(a.steps or steps, batch, seq)
    c.task = "reward"  # which task main.py runs
    c.model = common.model_config(a.variant)  # architecture of a fresh model (no init_from)
    c.data = align.data_config("builtin:preferences", "builtin:preferences_heldout")
    if a.variant in ("tiny", "mini", "small"):
        c.model.vocab_size = c.data.builtin_vocab_size  # the built-in tokenizer's vocab
    c.loss = ml_collections.ConfigDict()
    c.loss.use_margin = True  # subtract each pair's `margin` field (0 when the data has none)
    c.loss.center_coef = 0.01  # λ of the reward-centering term λ·mean((r_c + r_r)²); 0 = off
    common.router_loss_keys(c.loss)  # moe_aux, moe_z: a backbone with experts (models/moe.py)
    c.lora = lora_config(a.lora)  # LoRA adapters (models/lora.py); rank 0 = off
    c.lora.train_extra = "^head/"  # the scalar head is new: it always trains
    c.opt.lr = lr * (10 if a.lora else 1)  # adapters start at zero and need a larger step
    c.opt.warmup_steps = max(c.total_steps // 20, 1)
    c.opt.weight_decay = 0.0  # stay near the SFT weights
    c.eval_every = c.total_steps // 2 if a.runlocal else 100
    c.ckpt_every = c.total_steps if a.runlocal else 500
    c.lock()
    return c


def sweep(add, arg=None):
    """Learning rate × centering."""
    for lr in (1e-4, 3e-4):
        for center in (0.0, 0.01):
            add(**{"opt.lr": lr, "loss.center_coef": center})
