"""Pretraining task: next-token loss on packed batches, held-out loss/perplexity as eval.

`build_task(config, mesh)` returns the loop's Task; `run(config, workdir)` trains it.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from flaxlm.configs.common import to_model_config
from flaxlm.models.sharding import batch_divisor, make_mesh, shard_batch
from flaxlm.models.transformer import Transformer
from flaxlm.train import loop
from flaxlm.train.losses import lm_loss_fn
from flaxlm.train.step import eval_step


def model_fns(cfg):
    """(init_params, apply) for a Transformer: init is rng -> boxed params."""
    model = Transformer(cfg)

    def init_params(rng):
        tokens = np.zeros((1, 8), np.int32)
        return model.init(rng, tokens)["params"]

    def apply(params, tokens, positions=None, segment_ids=None):
        return model.apply({"params": params}, tokens, positions, segment_ids)

    return init_params, apply


def make_batches(config, mesh, *, seed: int):
    """The training batch iterator named by `config.data.source`."""
    d = config.data
    if d.source == "markov":
        from flaxlm.data.markov import MarkovStream

        return MarkovStream(
            config.model.vocab_size,
            config.seq_len,
            config.batch_size,
            seed=seed,
            branching=d.markov_branching,
            chain_seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    raise ValueError(f"config.data.source={d.source!r}; expected 'markov'")


def make_eval_fn(config, mesh, loss_fn):
    """Held-out loss over a fixed set of batches drawn with a different seed."""
    it = make_batches(config, mesh, seed=config.seed + 10_000)
    batches = [shard_batch(next(it), mesh) for _ in range(config.data.eval_batches)]
    step = jax.jit(lambda p, b: eval_step(p, b, None, loss_fn=loss_fn))

    def eval_fn(params):
        sums, weight = {}, 0.0
        for b in batches:
            m = jax.device_get(step(params, b))
            w = float(m["weight"])
            weight += w
            for k, v in m.items():
                if k != "weight":
                    sums[k] = sums.get(k, 0.0) + w * float(v)
        out = {k: v / max(weight, 1.0) for k, v in sums.items()}
        out["perplexity"] = math.exp(min(out["nll"], 50.0))
        return out

    return eval_fn


def build_task(config, mesh) -> loop.Task:
    cfg = to_model_config(config.model)
    if config.batch_size % batch_divisor(mesh):
        raise ValueError(
            f"batch_size={config.batch_size} is not a multiple of data×fsdp={batch_divisor(mesh)}"
        )
    init_params, apply = model_fns(cfg)
    loss_fn = lm_loss_fn(apply, z_loss=config.loss.z_loss)
    return loop.Task(
        name="pretrain",
        init_params=init_params,
        loss_fn=loss_fn,
        train_batches=make_batches(config, mesh, seed=config.seed),
        eval_fn=make_eval_fn(config, mesh, loss_fn) if config.eval_every else None,
        flops_per_token=cfg.flops_per_token(config.seq_len),
        flops_per_token_causal=cfg.flops_per_token(config.seq_len, causal=True),
        model_meta={"model_config": cfg.to_dict()},
    )


def run(config, workdir: str):
    mesh = make_mesh(dict(config.mesh))
    return loop.run(config, workdir, build_task(config, mesh), mesh=mesh)
