"""DPO family (DPO, cDPO, IPO, SLiC hinge, robust DPO, SimPO, ORPO, APO-zero / APO-down, NCA,
SPPO, EXO, DiscoPOP, AOT) from an SFT run.

    python -m flaxlm.train.main --config configs/dpo.py:runlocal=True \
        --config.init_from=runs/sft --workdir runs/dpo [--config.dpo.loss_type=ipo]

arg keys: variant (sizes of the run; the architecture comes from init_from), runlocal (a
CPU-sized run), steps (0 = default), loss (dpo.loss_type with its usual dpo.beta and
dpo.label_smoothing; `--config.dpo.loss_type` alone keeps sigmoid's β = 0.1 and ε = 0), lora
(adapter rank; 0 = full; > 0 also multiplies opt.lr by 10).

Data: `data.train`, `data.eval` and `eval_gen.sets` default to the built-in demo world's; for
your own pairs set all three (preference records as in configs/reward.py; eval_gen.sets: chats or
prompt records with meta.answer, scored by exact match; "" skips generation eval):

    --config.data.train=prefs.jsonl --config.data.eval=prefs_heldout.jsonl \
        --config.eval_gen.sets=chat_heldout.jsonl
"""

from __future__ import annotations

import ml_collections

from flaxlm.alignment import common as align
from flaxlm.alignment.sft import eval_gen_config
from flaxlm.configs import common
from flaxlm.models.lora import lora_config

# (steps, global batch in pairs, seq_len, lr) per variant; runlocal shrinks them.
_SIZES = {
    "tiny": (200, 32, 128, 5e-6),
    "mini": (300, 32, 128, 5e-6),
    "small": (500, 64, 256, 2e-6),
    "125m": (1000, 64, 1024, 1e-6),
    "1b": (2000, 128, 2048, 5e-7),
    "7b": (2000, 128, 4096, 5e-7),
}

# Typical β per loss type (its meaning differs: see alignment/dpo.py); simpo also uses γ.
_BETA = {"sigmoid": 0.1, "conservative": 0.1, "ipo": 0.1, "hinge": 0.1, "robust": 0.1,
         "simpo": 2.0, "orpo": 0.1, "apo_zero": 0.1, "apo_down": 0.1, "nca": 0.1,
         "sppo_hard": 0.1, "exo_pair": 0.1, "discopop": 0.05, "aot": 0.1,
         "aot_pair": 0.1}  # fmt: skip
# Usual ε of the types that read it (another type refuses ε ≠ 0): cDPO / robust DPO's flip
# rate, EXO's label distribution (1 − ε, ε) (TRL's 1e-3; EXO needs ε > 0).
_EPS = {"conservative": 0.1, "robust": 0.1, "exo_pair": 1e-3}


def dpo_config(loss_type: str = "sigmoid") -> ml_collections.ConfigDict:
    """The `dpo` section."""
    c = ml_collections.ConfigDict()
    # sigmoid | conservative | ipo | hinge | robust | simpo | orpo | apo_zero | apo_down | nca |
    # sppo_hard | exo_pair | discopop | aot | aot_pair (alignment/dpo.py)
    c.loss_type = loss_type
    c.beta = common.lookup(_BETA, loss_type, "loss")  # β > 0 (ORPO: weight λ of the odds ratio)
    # ε, read by conservative / robust (flip rate, 0 <= ε < 0.5) and exo_pair (its labels'
    # (1 − ε, ε), 0 < ε < 0.5) only (another type refuses ε ≠ 0)
    c.label_smoothing = _EPS.get(loss_type, 0.0)
    c.simpo_gamma = 1.0  # SimPO target reward margin γ >= 0 (read by simpo only)
    # DiscoPOP's temperature τ > 0 of σ(βh/τ), its switch between the logistic and the
    # exponential loss (read by discopop only; the paper's 0.05)
    c.discopop_tau = 0.05
    c.sft_coef = 0.0  # α of an added per-token NLL of the chosen response (RPO); 0 = off
    c.ref_logps = "precompute"  # precompute (once, when the task is built) | online (in the step)
    c.ref_from = ""  # reference run, its params ("" = init_from; its EMA with init_from_ema)
    # dtype of the frozen reference: bfloat16 halves its memory, int8 (int8 projection weights,
    # bf16 compute) quarters its matrices
    c.ref_dtype = "float32"
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = common.parse_arg(arg, variant="tiny", runlocal=False, steps=0, loss="sigmoid", lora=0)
    steps, batch, seq, lr = common.lookup(_SIZES, a.variant, "variant")
    if a.runlocal:
        steps, batch, seq = min(steps, 40), min(batch, 16), min(seq, 128)
    c = common.trainer_config(a.steps or steps, batch, seq)
    c.task = "dpo"  # which task main.py runs
    c.model = common.model_config(a.variant)  # unused: the architecture comes from init_from
    c.data = align.data_config("builtin:preferences", "builtin:preferences_heldout")
    c.dpo = dpo_config(a.loss)
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
    """Every loss type at its usual β and ε (`loss=` arg's section: conservative and robust with
    sweep-set ε = 0 would be sigmoid DPO again, three identical runs)."""
    for loss in _BETA:
        d = dpo_config(loss)
        add(**{"dpo.loss_type": loss, "dpo.beta": d.beta, "dpo.label_smoothing": d.label_smoothing})
