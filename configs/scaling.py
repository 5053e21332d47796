"""Scaling-law sweep on the built-in world: tiny models × token budgets, and one bigger model to
predict.

    python -m flaxlm.train.sweep --config configs/scaling.py --workdir runs/scaling
    python -m flaxlm.train.main --config configs/scaling.py:predict=True --workdir runs/scaling/big
    python -m flaxlm.evaluation.scaling_workflow --workdir runs/scaling     # all of it + report

The family: 2-layer Llama blocks of width d (head_dim 16, d/16 heads, SwiGLU width 3d), tied
input/output embeddings, so the non-embedding parameter count (Kaplan et al. 2020's N) is the
blocks alone, 26·d² + 5·d. The sweep crosses `WIDTHS` with `STEPS` (batch 4 × 128 tokens, so
D = 512 × steps); `predict=True` is a model of width `BIG_WIDTH` (at least 4× the
non-embedding parameters of the widest swept model) trained for `BIG_STEPS`.

Learning rate, warmup and the cadences are FieldReferences of `model.d_model` and `total_steps`,
so `--config.model.d_model=48 --config.total_steps=600` (what the sweep passes) moves them too:
lr = LR_BASE · (64 / d)^LR_EXPONENT, warmup = 10% of the steps, held-out eval and the final
checkpoint at the last step, one more checkpoint halfway (interrupted runs resume from it).

arg keys: width (d_model), steps (optimizer steps), predict (the big model), runlocal (a few
steps only: smoke tests; the sweep's budgets become `RUNLOCAL_STEPS`), heldout (a jsonl of
held-out documents; "" = the built-in 100), cooldowns (below).

cooldowns=True: every run (the target too) follows a WSD schedule whose last `cooldown_frac`
(default `COOLDOWN_FRAC`, 0.5) of the steps decay as `cooldown_shape` (default 1 − √x), and the
sweep trains one run per width, of the longest budget; each shorter budget is a branch of it
(train/branch.py) at the step where that budget's decay begins, so it trains only its own decay.
Per width that is 1200 + 300 + 450 = 1950 optimizer steps instead of 600 + 900 + 1200 = 2700
(1500 with cooldown_frac=0.2; Hägele et al. 2024: one WSD run and its cooldowns give the loss at
every length). bench/RESULTS.md ("Scaling studies with cooldown branches") compares the studies.

Why these numbers (measured on 2 shared CPU cores, 2026-11-28; runs/scaling/report/report.md):
  * width 32 sat ~9% above the power law of the wider models (cause not isolated: a 32-wide tied
    embedding, two heads, a longer transient), so the fitted widths start at 48;
  * the first ~200-300 steps are a transient in which loss falls from 6 to ~1.5 at a
    size-dependent speed; a 150-step budget put every width at the same loss and broke the fit
    (7% RMS residual), so budgets start at 600 steps; batch 4 x 128 gives more steps per token
    (at equal tokens, batch 4 x 1200 steps beat batch 8 x 600 by 2-3%);
  * lr = 6e-3 * 64/d is within noise of the best of {0.5x, 1x, 2x} at widths 48 and 96;
  * the held-out loss varies by ~1-1.5% (std) from seed to seed (up to 4% apart over 3-5 seeds
    at width 64; the target's two seeds differ by 2.4%); about half of that variance came from
    the 100-document held-out set, hence 1000 documents and 2 seeds of the target.
"""

from __future__ import annotations

import math

import ml_collections

from flaxlm.configs import common
from flaxlm.data.pipeline import data_config

WIDTHS = (48, 64, 80, 96)  # swept d_model; non-embedding N from 60k to 240k
STEPS = (600, 900, 1200)  # swept budgets; D = 512 x steps = 307k..614k tokens
# (the corpus is 243k tokens with the 512-token vocabulary: 1.3 to 2.5 epochs)
BIG_WIDTH = 208  # predict=True: 4.7x the non-embedding N of width 96 (192 would be 3.996x)
BIG_STEPS = 1200  # predict=True: the largest swept budget
RUNLOCAL_STEPS = (8, 12, 16)  # runlocal=True: the swept budgets (the target trains 8 steps)
LR_BASE = 6e-3  # peak learning rate at width 64
LR_EXPONENT = 1.0  # lr ∝ width^-LR_EXPONENT (Adam: hidden updates scale like 1/width)
HEAD_DIM = 16
BATCH, SEQ_LEN = 4, 128
VOCAB = 512  # built-in tokenizer size: a 2048 table would dwarf the smallest models' blocks
# cooldowns=True: the share of each run's steps in its final (WSD) decay, and the decay's shape
# (opt.wsd_decay_shape). Measured (bench/RESULTS.md, "Scaling studies with cooldown branches"):
# 1 − √x over the last half gave the cosine runs' held-out losses (mean −0.6% over the 12 runs,
# +1.4% at the target), a linear decay over the last 20% did not (+1.4%, +5.8% at the target).
COOLDOWN_FRAC = 0.5
COOLDOWN_SHAPE = "sqrt"


def _parse(arg: str | None) -> ml_collections.ConfigDict:
    return common.parse_arg(arg, width=64, steps=900, predict=False, runlocal=False, heldout="",
                            cooldowns=False, cooldown_frac=COOLDOWN_FRAC,
                            cooldown_shape=COOLDOWN_SHAPE)  # fmt: skip


def decay_start(steps: int, frac: float = COOLDOWN_FRAC) -> int:
    """The step at which a `steps`-long WSD run whose last `frac` decays starts its decay (the
    updates after it are below the peak lr; train/optim.make_schedule): where a cooldown
    branches."""
    return steps - max(int(steps * frac), 1)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = _parse(arg)
    width, steps = (BIG_WIDTH, BIG_STEPS) if a.predict else (a.width, a.steps)
    if a.runlocal:
        steps = min(steps, 8)
    c = common.trainer_config(steps, BATCH, SEQ_LEN)
    c.task = "pretrain"  # which task main.py runs
    c.model = common.model_config("tiny")  # architecture (models/config.py ModelConfig)
    m = c.model  # the family of the module docstring: 2 blocks of width d, head_dim 16, SwiGLU 3d
    m.d_model = width
    d = m.get_ref("d_model")
    m.n_layers = 2
    m.head_dim = HEAD_DIM
    m.n_heads = d // HEAD_DIM  # follows model.d_model
    m.n_kv_heads = d // HEAD_DIM
    m.d_ff = d * 3
    m.tie_embeddings = True  # the LM head is the embedding table: N excludes both
    m.max_seq_len = SEQ_LEN
    c.data = data_config()  # text pipeline keys (data/pipeline.py documents each)
    c.data.builtin_vocab_size = VOCAB
    # identity(): a new reference that follows the key; overriding it leaves the key alone.
    m.vocab_size = c.data.get_ref("builtin_vocab_size").identity()  # the world's tokenizer
    c.data.kind = "text"  # text | markov (pretrain.py)
    c.data.markov_branching = 4  # markov only (unused here; pretrain.py reads the key)
    # Held-out text: "" = the built-in world's 100 documents (11.8k tokens: 23 batches), or a
    # jsonl of more documents from the same generator (the workflow writes 1000).
    c.data.eval_sources = a.heldout
    # Batches per evaluation: a bound no held-out set reaches, so each evaluation reads all of
    # it (it ends with the documents), whether heldout= or --config.data.eval_sources named it.
    c.data.eval_batches = 100_000
    c.loss = ml_collections.ConfigDict()
    c.loss.z_loss = 0.0  # PaLM z-loss coefficient
    c.loss.chunk_tokens = 0  # > 0: CE over chunks of this many positions (no full logits)
    common.router_loss_keys(c.loss)  # moe_aux, moe_z: models with experts (models/moe.py)

    c.opt.lr = LR_BASE * (64.0 / d.to_float()) ** LR_EXPONENT  # follows model.d_model
    if a.cooldowns:  # constant lr after warmup, then the decay over the last cooldown_frac
        c.opt.schedule = "wsd"
        c.opt.wsd_decay_frac = a.cooldown_frac
        c.opt.wsd_decay_shape = a.cooldown_shape
    total = c.get_ref("total_steps")
    c.opt.warmup_steps = total // 10  # follows total_steps
    c.eval_every = total.identity()  # one held-out evaluation, at the last step
    c.eval_at_start = False
    c.ckpt_every = total // 2  # halfway (resume point) and the last step
    c.keep_ckpts = 1  # the newest checkpoint only (0 keeps every checkpoint)
    c.log_every = 10
    c.progress_bar = False  # runs are logged to files by the sweep
    c.lock()
    return c


def sweep(add, arg=None):
    """Every width in WIDTHS at every budget in STEPS (the fitted runs; RUNLOCAL_STEPS with
    runlocal=True, since the sweep sets total_steps itself). cooldowns=True: per width, the
    longest budget's run, checkpointed at every other budget's decay start, and those budgets
    as branches of it."""
    a = _parse(arg)
    budgets = sorted(RUNLOCAL_STEPS if a.runlocal else STEPS)
    for width in WIDTHS:
        if not a.cooldowns:
            for steps in budgets:
                add(**{"model.d_model": width, "total_steps": steps})
            continue
        longest, shorter = budgets[-1], budgets[:-1]
        # checkpoints at every branch point, kept (the branches may start after the run ends)
        every = math.gcd(longest, *(decay_start(s, a.cooldown_frac) for s in shorter))
        source = add(**{"model.d_model": width, "total_steps": longest, "ckpt_every": every,
                        "keep_ckpts": 0})  # fmt: skip
        for steps in shorter:
            add(**{"model.d_model": width, "total_steps": steps,
                   "branch_from": source.at(decay_start(steps, a.cooldown_frac))})  # fmt: skip
