"""Process reward model (step-level verifier) on stepwise-labelled solutions, initialised from an
SFT run (alignment/prm.py).

    python -m flaxlm.train.main --config configs/prm.py:runlocal=True \
        --config.init_from=runs/sft --workdir runs/prm

arg keys: variant (the run's sizes — steps, batch, seq_len, lr — and the architecture of a fresh
model when init_from is empty; with init_from the checkpoint's own architecture is used and
the sizes still come from variant), runlocal (a CPU-sized run), steps (0 = default), lora
(adapter rank; 0 = full fine-tuning; > 0 also multiplies opt.lr by 10; the scalar head always
trains).

Data: `data.train` and `data.eval` default to the built-in world's running-sum chains
(data/synthetic_steps.py); for your own set both (jsonl/parquet records of data/stepwise.py:
`prompt` + `steps` + `labels`, or TRL's `prompt` + `completions` + `labels`; `data.eval=""`
skips the held-out eval):

    --config.data.train=steps.jsonl --config.data.eval=steps_heldout.jsonl

Labels may be soft (probabilities in [0, 1], Math-Shepherd's rollout estimates; the built-in
`builtin:prm_steps_soft` / `builtin:prm_steps_soft_heldout` are the same chains labelled so):
`prm.label_threshold` is where a label, or a predicted probability, counts as a right step for
the accuracy metrics (the loss takes the labels as they are). `prm.train_on="last"` trains on
each solution's final step alone — an outcome reward model on the same data, the baseline for
the PRM; its held-out metrics are still over every labelled step (alignment/prm.py).

Overlength (`data.overlength`): truncate_left keeps the prompt and the leading steps that fit
(the later steps' labels dropped, counted as `steps_cut` in data_report.json); the prompt is
cut from the left only when not even the first step fits. drop: drop what does not fit.
"""

from __future__ import annotations

import ml_collections

from flaxlm.alignment import common as align
from flaxlm.configs import common
from flaxlm.data.stepwise import step_fields
from flaxlm.models.lora import lora_config

# (steps, global batch in solutions, seq_len, lr) per variant; runlocal shrinks them.
_SIZES = {
    "tiny": (200, 32, 128, 5e-4),
    "mini": (400, 32, 256, 3e-4),
    "small": (600, 64, 512, 1e-4),
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
    c.task = "prm"  # which task main.py runs
    c.model = common.model_config(a.variant)  # architecture of a fresh model (no init_from)
    c.data = align.data_config("builtin:prm_steps", "builtin:prm_steps_heldout")
    c.data.fields = step_fields()  # + `steps` and `labels` field names (data/stepwise.py)
    if a.variant in ("tiny", "mini", "small"):
        c.model.vocab_size = c.data.builtin_vocab_size  # the built-in tokenizer's vocab
    c.prm = ml_collections.ConfigDict()
    # Joins the steps into the assistant's answer, after every step; each step's label is read
    # at its separator's last token. best_of_n --prm splits completions at it (the run's own)
    c.prm.step_separator = "\n"
    # a step is right when its label (or the predicted probability) is >= this; in (0, 1)
    c.prm.label_threshold = 0.5
    c.prm.train_on = "all"  # "all" labelled steps (a PRM) | "last": each final one (an ORM)
    c.loss = common.router_loss_keys()  # moe_aux, moe_z: a backbone with experts (models/moe.py)
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
    """Learning rate."""
    for lr in (1e-4, 3e-4, 1e-3):
        add(**{"opt.lr": lr})
