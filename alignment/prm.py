"""Process reward model (PRM): a step-level verifier — a scalar head on the SFT model that scores
every reasoning step of a solution (Lightman et al. 2023, "Let's Verify Step by Step";
Math-Shepherd; TRL's PRMTrainer), used to rerank best-of-N samples or to guide search.

    python -m flaxlm.train.main --config configs/prm.py:runlocal=True \
        --config.init_from=runs/sft --workdir runs/prm

Data (data/stepwise.py): {"prompt", "steps": [...], "labels": [true|false|1|0, ...]} records
(TRL's {"prompt", "completions", "labels"} too), rendered with the run's chat template as the
prompt turns and one assistant turn of the steps, each followed by `prm.step_separator`; step
i's label is read at the last token of the separator closing it (data/stepwise.py says why).
Model: models/heads.py ScalarHeadModel, one logit x_t per token (what PPO's critic uses),
params {"transformer": init_from's backbone, "head": fresh} (init_from a PRM or reward-model
run: its head too). Loss: binary cross-entropy with logits at the labelled positions only,

    mean over the batch's labelled steps of  softplus(x) − y·x
                                           = −[y log σ(x) + (1 − y) log(1 − σ(x))]

(padding rows and unlabelled tokens count nowhere; `weight` = labelled steps, so gradient
accumulation weighs micro-batches by their steps). A mixture-of-experts backbone adds the
router losses (`loss.moe_aux`, `loss.moe_z`) as the reward model does.

Metrics, training and held-out (`data.eval`, every `eval_every` steps):
  * `step_accuracy`: steps whose prediction (x > 0: "right") is the label; `label_mean` the
    fraction of labelled steps that are right (held-out: `majority_accuracy`, what always
    answering the commoner label scores — the baseline step accuracy must beat);
  * `solution_accuracy`: solutions (rows) whose verdict "every step right" (all x > 0) is the
    truth (every label 1) — what best-of-N filtering needs;
  * `first_error_accuracy`: solutions whose first step predicted wrong is the first labelled
    wrong (or neither has one) — ProcessBench's question, where the reasoning first fails.

Scoring with a trained PRM (per-step probabilities, aggregated by min / prod / last / mean) and
best-of-N with it: evaluation/prm_scorer.py, `python -m flaxlm.evaluation.best_of_n --prm RUN`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.alignment import common
from flaxlm.data import stepwise as SW
from flaxlm.data.chat_examples import OVERLENGTH
from flaxlm.models.sharding import fetch, make_mesh, same_batch_count, shard_batch
from flaxlm.train import loop
from flaxlm.train.losses import add_router_losses, router_forward
from flaxlm.train.step import RATIOS, jit_eval_rows


def step_loss(logits, labels, mask):
    """BCE with logits over the labelled positions and the metrics (module docstring).

    Args:
      logits: (B, T) one logit per token.
      labels: (B, T) 1 (right) / 0 (wrong) at labelled positions, anything elsewhere.
      mask: (B, T) 1 at labelled positions of real rows, 0 elsewhere (padding, other tokens).

    Returns: (scalar loss, metrics: step_accuracy, label_mean, weight = labelled steps, and
    RATIOS of solution_accuracy and first_error_accuracy over rows with a labelled step).
    """
    x = jnp.asarray(logits, jnp.float32)
    y = jnp.asarray(labels, jnp.float32)
    m = jnp.asarray(mask, jnp.float32)
    n = jnp.sum(m)
    mean = lambda v: jnp.sum(v * m) / jnp.maximum(n, 1.0)  # noqa: E731
    # softplus(x) − y·x: finite for any x (no log of an underflowed sigmoid)
    loss = mean(jax.nn.softplus(x) - y * x)
    pred = (x > 0).astype(jnp.float32)
    labelled = m > 0
    rows = jnp.any(labelled, axis=1).astype(jnp.float32)  # solutions in the batch
    all_right = ~jnp.any(labelled & (y < 0.5), axis=1)
    all_pred = ~jnp.any(labelled & (pred < 0.5), axis=1)
    t = jnp.arange(x.shape[1])
    first = lambda wrong: jnp.min(jnp.where(labelled & wrong, t, x.shape[1]), axis=1)  # noqa: E731
    same_first = first(y < 0.5) == first(pred < 0.5)
    ratio = lambda ok: (jnp.sum(rows * ok)[None], jnp.sum(rows)[None])  # noqa: E731
    metrics = {
        "step_accuracy": mean((pred == y).astype(jnp.float32)),
        "label_mean": mean(y),
        "weight": n,  # labelled steps: the loss's mean
        RATIOS: {
            "solution_accuracy": ratio(all_right == all_pred),
            "first_error_accuracy": ratio(same_first),
        },
    }
    return loss, metrics


def prm_loss_fn(apply, router: tuple | None = None):
    """The loop's loss over a `StepBatches` batch; `router` (train/losses.py `router_coefs`:
    a mixture-of-experts backbone) adds the router losses and logs `moe/*`."""

    def loss_fn(params, batch, rng):
        del rng
        logits, stats = router_forward(apply, router, params, batch["tokens"],
                                       batch["positions"], batch["segment_ids"])  # fmt: skip
        mask = batch["step_mask"] * batch["valid"][:, None]
        loss, metrics = step_loss(logits, batch["step_labels"], mask)
        return add_router_losses(loss, metrics, stats, router)

    return loss_fn


def np_step_metrics(logits, labels, mask) -> dict[str, float]:
    """`step_loss`'s loss and metrics in numpy (float64) over whole (N, T) arrays, for the
    held-out evaluation, plus `majority_accuracy`, `steps` and `solutions`."""
    x = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.float64)
    m = np.asarray(mask, np.float64) > 0
    xs, ys = x[m], y[m]
    pred = xs > 0
    p = float(ys.mean())
    right_sol = first_ok = 0
    rows = [r for r in range(len(m)) if m[r].any()]
    for r in rows:
        yr, pr = y[r][m[r]] > 0.5, x[r][m[r]] > 0
        right_sol += bool(yr.all() == pr.all())
        first_ok += _first_wrong(yr) == _first_wrong(pr)
    return {
        "loss": float(np.mean(np.logaddexp(0.0, xs) - ys * xs)),
        "step_accuracy": float(np.mean(pred == (ys > 0.5))),
        "majority_accuracy": max(p, 1.0 - p),
        "label_mean": p,
        "solution_accuracy": right_sol / len(rows),
        "first_error_accuracy": first_ok / len(rows),
        "steps": int(m.sum()),
        "solutions": len(rows),
    }


def _first_wrong(right: np.ndarray) -> int:
    wrong = np.flatnonzero(~right)
    return int(wrong[0]) if len(wrong) else len(right)


def make_eval_fn(config, mesh, apply, examples):
    """params -> held-out metrics (`np_step_metrics`) over every example of `examples`; the
    logits come from `opt.grad_accum` micro-batches of rows, as the train step splits them."""
    it = SW.StepBatches(
        examples, seq_len=config.seq_len, batch=config.batch_size // jax.process_count(),
        pad_id=0, shuffle=False, num_epochs=1, process_index=jax.process_index(),
        process_count=jax.process_count(),
    )  # fmt: skip
    # Several processes: each holds its share of the examples (as many batches on each); the
    # metrics are over every process's rows (gathered), the same on all.
    batches = [shard_batch(b, mesh) for b in same_batch_count(list(it), it.blank)]
    fn = jit_eval_rows(lambda p, b: apply(p, b["tokens"], b["positions"], b["segment_ids"]),
                       config.opt.grad_accum)  # fmt: skip

    def eval_fn(params):
        logits, labels, mask = [], [], []
        for b in batches:
            logits.append(fetch(fn(params, b)))
            h = fetch({k: b[k] for k in ("step_labels", "step_mask", "valid")})
            labels.append(h["step_labels"])
            mask.append(h["step_mask"] * h["valid"][:, None])
        return np_step_metrics(*map(np.concatenate, (logits, labels, mask)))

    return eval_fn


def check_settings(config) -> None:
    """Raises on a bad PRM setting, naming the key, before anything is loaded."""
    SW.check_separator(config.prm.step_separator, "prm.step_separator")
    if config.data.overlength not in OVERLENGTH:
        raise ValueError(f"data.overlength={config.data.overlength!r}; expected one of "
                         f"{OVERLENGTH}")  # fmt: skip


def load_examples(spec: str, config, template, report: SW.StepReport) -> list[dict]:
    d = config.data
    return SW.render_stepwise(
        common.iter_records(spec, d, report), template, config.seq_len,
        separator=config.prm.step_separator, fields=d.fields, overlength=d.overlength,
        report=report,
    )  # fmt: skip


def build_task(config, mesh, workdir: str | None = None) -> loop.Task:
    """The PRM Task; writes data_report.json into `workdir`. The meta's "prm" section is what a
    scorer renders with (evaluation/prm_scorer.py): the label positions are the separator's."""
    check_settings(config)
    return common.scalar_head_task(
        "prm", config, mesh, workdir, what="stepwise examples", new_report=SW.StepReport,
        load=load_examples, batches=SW.StepBatches, make_eval_fn=make_eval_fn,
        make_loss=prm_loss_fn, extra_meta={"prm": {"step_separator": config.prm.step_separator}},
    )  # fmt: skip


def run(config, workdir: str):
    mesh = make_mesh(dict(config.mesh))
    return loop.run(config, workdir, build_task(config, mesh, workdir), mesh=mesh)
