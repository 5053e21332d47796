"""Causal-LM pretraining.

    python -m flaxlm.train.main --config configs/pretrain.py:variant=tiny,runlocal=True \
        --workdir runs/pt --config.opt.lr=1e-3

arg keys: variant (a model variant: tiny | mini | small | 125m | 1b | 7b), runlocal (shrink to a
CPU-sized run), steps (0 = the variant's default), data (text: the grain text pipeline over
`data.sources`, or the built-in world when empty | markov: a synthetic chain with known entropy,
no tokenizer — tests and benchmarks). Change the length with the `steps` arg rather than
`--config.total_steps`: warmup and the eval/checkpoint cadences are derived from it.

Your own data (token shards from `python -m flaxlm.data.preprocess`, which carry their tokenizer):

    python -m flaxlm.train.main --config configs/pretrain.py:variant=tiny,steps=300 \
        --config.data.sources=data/tokens --config.data.eval_sources=heldout/tokens \
        --config.model.vocab_size=512 --workdir runs/pt

`data.eval_sources` is required with `data.sources` (or `--config.eval_every=0`); held-out token
shards come from preprocessing held-out raw text with `--config.tokenizer=data/tokenizer.model`.
tiny/mini/small set `model.vocab_size` to the built-in tokenizer's (2048): set it to your
tokenizer's vocab (a larger value trains, but leaves unused embedding rows).

Continued pretraining of an HF checkpoint (`--config.init_from=hf:DIR`): the model is the
checkpoint's (config.json; `--config.model.X` execution and context keys apply over it, as in
the alignment stages), its weights the start, its tokenizer (tokenizer.json or tokenizer.model)
the data's unless `data.tokenizer` names another (a warning), copied into the workdir. A flaxlm
run as init_from keeps `config.model` (checked against the run's) and also lends its tokenizer.
"""

from __future__ import annotations

import ml_collections

from flaxlm.configs import common
from flaxlm.data.pipeline import data_config

# (steps, global batch, seq_len, lr) per variant for a real run; runlocal shrinks them.
_SIZES = {
    "tiny": (300, 16, 128, 3e-3),
    "mini": (2000, 32, 256, 2e-3),
    "small": (5000, 64, 512, 1e-3),
    "125m": (20000, 256, 2048, 6e-4),
    "1b": (100000, 512, 2048, 3e-4),
    "7b": (250000, 1024, 4096, 3e-4),
}


def _parse(arg: str | None) -> ml_collections.ConfigDict:
    return common.parse_arg(arg, variant="tiny", runlocal=False, steps=0, data="text")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = _parse(arg)
    steps, batch, seq, lr = common.lookup(_SIZES, a.variant, "variant")
    if a.runlocal:
        steps, batch, seq = min(steps, 200), min(batch, 16), min(seq, 128)
    c = common.trainer_config(a.steps or steps, batch, seq)
    c.task = "pretrain"  # which task main.py runs
    c.model = common.model_config(a.variant)  # architecture (models/config.py ModelConfig)
    if a.variant in ("125m", "1b", "7b") and not a.runlocal:
        c.model.dtype = "bfloat16"  # bf16 compute, fp32 master weights
    c.opt.lr = lr
    # From total_steps, so the `steps` arg moves warmup too (a short run is not all warmup).
    total = c.total_steps
    c.opt.warmup_steps = max(total // 20, 1) if a.runlocal else min(2000, total // 20)
    c.loss = ml_collections.ConfigDict()
    c.loss.z_loss = 0.0  # PaLM z-loss coefficient (1e-4 stabilises bf16 runs)
    c.loss.chunk_tokens = 0  # > 0: CE over chunks of this many positions (no full logits)
    common.router_loss_keys(c.loss)  # moe_aux, moe_z: models with experts (models/moe.py)
    c.data = data_config()  # text pipeline keys (data/pipeline.py documents each)
    c.data.kind = a.data  # text | markov
    c.data.markov_branching = 4  # markov: successors per token of the synthetic chain
    # Held-out text for the eval loss: jsonl/parquet/text or token shards. "" = the built-in
    # world's held-out text, which is refused when data.sources is set (or set eval_every=0).
    # Several "PATTERN[:WEIGHT]" entries are interleaved by weight in documents (no weights: in
    # turn) in the eval_batches, so each is measured; one that runs out early is logged
    # (train/pretrain.py text_eval_batches)
    c.data.eval_sources = ""
    c.data.eval_batches = 4  # held-out batches per evaluation
    if a.data == "text" and a.variant in ("tiny", "mini", "small"):
        c.model.vocab_size = c.data.builtin_vocab_size  # the built-in tokenizer's vocab
    c.eval_every = max(c.total_steps // 4, 1) if a.runlocal else 1000
    c.ckpt_every = max(c.total_steps // 2, 1) if a.runlocal else 1000  # 0 would save nothing
    c.log_every = 10
    c.lock()
    return c


def sweep(add, arg=None):
    """Learning rate × width around the arg's variant: its lr and a third of it × its d_model and
    twice it (tiny: 1e-3, 3e-3 × 64, 128). Fixed tiny widths broke every other variant: d_model
    64 is not divisible by 125m's 12 heads."""
    variant = _parse(arg).variant
    lr = common.lookup(_SIZES, variant, "variant")[3]
    width = common.model_config(variant).d_model
    for run_lr in (float(f"{lr / 3:.3g}"), lr):  # 6e-4 / 3 is 0.00019999999999999998
        for d_model in (width, 2 * width):
            add(**{"opt.lr": run_lr, "model.d_model": d_model})
