"""Reward model: a scalar head on the SFT model, trained on preference pairs (Bradley–Terry).

    python -m flaxlm.train.main --config configs/reward.py:runlocal=True \
        --config.init_from=runs/sft --workdir runs/rm

Model: `models/heads.py` ScalarHeadModel, params {"transformer": SFT params, "head": fresh}
(`init_from` a reward-model run: its head too, trained on), reward read at each sequence's last
real token (the conversation's final `<|end|>`).
Loss (`pairwise_loss`), per pair with rewards r_c (chosen) and r_r (rejected):

    −log σ(r_c − r_r − margin)  averaged over pairs   [+ λ · mean((r_c + r_r)²)]

The optional margin (a per-pair number from the data, Llama 2) asks for a larger gap where
annotators were more certain; the centering term (λ = `loss.center_coef`) keeps rewards near
zero mean, since Bradley–Terry only fixes their differences. A mixture-of-experts backbone
(n_experts > 0) adds pretraining's router losses, `loss.moe_aux` × load balance + `loss.moe_z` ×
router z-loss (train/losses.py `router_coefs`), and logs `moe/*`. Metrics: `accuracy` (fraction
with r_c > r_r) and `margin` (mean r_c − r_r). Held-out evaluation reports the same on `data.eval`,
plus accuracy per pair kind when the records carry the built-in world's meta.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.alignment import common
from flaxlm.config_values import is_real
from flaxlm.data import formats as F
from flaxlm.models.heads import sequence_values
from flaxlm.models.sharding import fetch, make_mesh, same_batch_count, shard_batch
from flaxlm.train import loop
from flaxlm.train.losses import add_router_losses
from flaxlm.train.step import jit_eval_rows


def pairwise_loss(r_chosen, r_rejected, margin=None, center_coef=None, valid=None):
    """Bradley–Terry loss of reward pairs (see the module docstring).

    Args:
      r_chosen, r_rejected: (B,) rewards.
      margin: optional (B,) or scalar margin subtracted from the difference.
      center_coef: optional λ of the centering term λ·mean((r_c + r_r)²).
      valid: optional (B,) 1/0 per pair: the means are over the valid pairs only (a batch's
        padding rows, `valid = 0`, are no pairs; see `PreferenceBatches`).

    Returns: (scalar loss, {"accuracy", "margin"}).
    """
    r_c = jnp.asarray(r_chosen, jnp.float32)
    r_r = jnp.asarray(r_rejected, jnp.float32)
    w = jnp.ones_like(r_c) if valid is None else jnp.asarray(valid, jnp.float32)
    mean = lambda x: jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)  # noqa: E731
    diff = r_c - r_r
    logits = diff if margin is None else diff - jnp.asarray(margin, jnp.float32)
    # −log σ(x) = softplus(−x): finite for any x (no log of an underflowed sigmoid).
    loss = mean(jax.nn.softplus(-logits))
    if center_coef:
        loss = loss + center_coef * mean(jnp.square(r_c + r_r))
    metrics = {"accuracy": mean((diff > 0).astype(jnp.float32)), "margin": mean(diff)}
    return loss, metrics


def check_settings(loss) -> None:
    """Raises on a bad `loss.*` number of the reward model, naming the key; build_task calls it
    before anything is loaded. The centering weight λ (`center_coef`) finite and >= 0: below 0
    the term rewards large |r_c + r_r| and the loss is unbounded below (the rewards drift off
    together, which Bradley–Terry cannot see), NaN / ∞ make every loss NaN / ∞."""
    lam = loss.center_coef
    if not (is_real(lam) and 0 <= lam < math.inf):
        raise ValueError(f"loss.center_coef={lam!r} must be >= 0 and finite (0 = off)")


def _both_sides(batch) -> dict[str, jnp.ndarray]:
    """Chosen rows then rejected rows as one (2B, T) batch: one forward pass for both."""
    keys = ("tokens", "positions", "segment_ids")
    return {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in keys}


def rewards(apply, params, batch, moe_stats: bool = False):
    """(r_chosen, r_rejected), each (B,); `moe_stats=True` (a mixture-of-experts backbone)
    appends the pass's router statistics (over both sides' real tokens: padding, segment id 0,
    counts in none)."""
    x = _both_sides(batch)
    args = (params, x["tokens"], x["positions"], x["segment_ids"])
    values, stats = apply(*args, moe_stats=True) if moe_stats else (apply(*args), None)
    r = jnp.split(sequence_values(values, x["segment_ids"]), 2)
    return (*r, stats) if moe_stats else r


def reward_loss_fn(apply, use_margin: bool, center_coef: float, router: tuple | None = None):
    """The loop's loss over a batch of pairs. `router` (train/losses.py `router_coefs`: a
    mixture-of-experts backbone) adds the router losses of the forward pass and logs `moe/*`,
    so training the reward model cannot collapse its router either."""

    def loss_fn(params, batch, rng):
        del rng
        out = rewards(apply, params, batch, moe_stats=router is not None)
        r_c, r_r = out[:2]
        margin = batch["margin"] if use_margin else None
        # Pairs with valid = 0 (a partial batch's padding) count nowhere: `weight` is the
        # number of real pairs, the loss's denominator, so accumulation weighs micro-batches
        # by what they hold.
        valid = batch.get("valid")
        w = jnp.ones_like(r_c) if valid is None else jnp.asarray(valid, jnp.float32)
        loss, metrics = pairwise_loss(r_c, r_r, margin, center_coef, w)
        metrics["reward_mean"] = jnp.sum((r_c + r_r) * w) / jnp.maximum(2.0 * jnp.sum(w), 1.0)
        metrics["weight"] = jnp.sum(w)  # pairs: the loss's mean
        return add_router_losses(loss, metrics, out[2] if router is not None else {}, router)

    return loss_fn


def np_pairwise_loss(r_c, r_r, margin=None, center_coef=None) -> float:
    """pairwise_loss in numpy (float64) for host-side held-out evaluation."""
    r_c, r_r = np.asarray(r_c, np.float64), np.asarray(r_r, np.float64)
    x = r_c - r_r - (0.0 if margin is None else np.asarray(margin, np.float64))
    loss = np.mean(np.logaddexp(0.0, -x))
    if center_coef:
        loss += center_coef * np.mean((r_c + r_r) ** 2)
    return float(loss)


def make_eval_fn(config, mesh, apply, pairs):
    """params -> held-out loss, accuracy, margin (and accuracy per world pair kind). The
    rewards of each batch's pairs come from `opt.grad_accum` micro-batches of pairs, as the
    train step splits them (train/step.py `eval_rows`: a pair's two sides together); the
    metrics are over the whole held-out set, whatever the split."""
    it = F.PreferenceBatches(
        pairs, seq_len=config.seq_len, batch=config.batch_size // jax.process_count(),
        pad_id=0, shuffle=False, num_epochs=1, process_index=jax.process_index(),
        process_count=jax.process_count(), with_index=True,
    )  # fmt: skip
    # Several processes: each holds its share of the pairs (as many batches on each); the
    # metrics are over every process's rows (gathered), the same on all.
    host = same_batch_count(list(it), it.blank)
    batches = [shard_batch(b, mesh) for b in host]
    fn = jit_eval_rows(lambda p, b: rewards(apply, p, b), config.opt.grad_accum)
    kinds = [p["meta"].get("pair", "") for p in pairs]

    def eval_fn(params):
        rc, rr, margin, index = [], [], [], []
        for b in batches:
            c, r = fetch(fn(params, b))
            # every process's rows of the host fields, in the global order of the outputs
            h = fetch({k: b[k] for k in ("valid", "margin", "index")})
            keep = h["valid"] > 0
            rc.append(c[keep])
            rr.append(r[keep])
            margin.append(h["margin"][keep])
            index.append(h["index"][keep])
        rc, rr, margin, index = map(np.concatenate, (rc, rr, margin, index))
        use = margin if config.loss.use_margin else None
        out = {
            "loss": np_pairwise_loss(rc, rr, use, config.loss.center_coef),
            "accuracy": float(np.mean(rc > rr)),
            "margin": float(np.mean(rc - rr)),
            "reward_mean": float(np.mean(np.r_[rc, rr])),
        }
        out.update(common.accuracy_by_kind(kinds, index, rc > rr))
        return out

    return eval_fn


def load_pairs(spec: str, config, template, report: F.DataReport) -> list[dict]:
    d = config.data
    recs = common.iter_records(spec, d, report)
    return F.render_preferences(
        recs, template, config.seq_len, fields=d.fields, overlength=d.overlength, report=report
    )


def build_task(config, mesh, workdir: str | None = None) -> loop.Task:
    """The reward-model Task; writes data_report.json into `workdir`. (tokens_in_batch counts
    the chosen and the rejected tokens.)"""
    check_settings(config.loss)
    loss = config.loss
    return common.scalar_head_task(
        "reward", config, mesh, workdir, what="pairs", new_report=F.DataReport, load=load_pairs,
        batches=F.PreferenceBatches, make_eval_fn=make_eval_fn,
        make_loss=lambda apply, router: reward_loss_fn(apply, loss.use_margin, loss.center_coef,
                                                       router),
    )  # fmt: skip


def run(config, workdir: str):
    mesh = make_mesh(dict(config.mesh))
    return loop.run(config, workdir, build_task(config, mesh, workdir), mesh=mesh)
