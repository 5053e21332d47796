"""Process reward model (PRM): a step-level verifier — a scalar head on the SFT model that scores
every reasoning step of a solution (Lightman et al. 2023, "Let's Verify Step by Step";
Math-Shepherd; TRL's PRMTrainer), used to rerank best-of-N samples or to guide search.

    python -m flaxlm.train.main --config configs/prm.py:runlocal=True \
        --config.init_from=runs/sft --workdir runs/prm

Data (data/stepwise.py): {"prompt", "steps": [...], "labels": [true|false|1|0|p, ...]} records,
p a soft label in [0, 1] (Math-Shepherd's soft estimation: the fraction of rollouts from the step
that reach the right answer); TRL's {"prompt", "completions", "labels"} too; rendered with the
run's chat template as the prompt turns and one assistant turn of the steps, each followed by
`prm.step_separator`; step i's label is read at the last token of the separator closing it
(data/stepwise.py says why).
Model: models/heads.py ScalarHeadModel, one logit x_t per token (what PPO's critic uses),
params {"transformer": init_from's backbone, "head": fresh} (init_from a PRM or reward-model
run: its head too). Loss: binary cross-entropy with logits at the labelled positions only,

    mean over the batch's trained steps of   softplus(x) − y·x
                                           = −[y log σ(x) + (1 − y) log(1 − σ(x))]

(padding rows and unlabelled tokens count nowhere; `weight` = trained steps, so gradient
accumulation weighs micro-batches by their steps). The same expression is the cross-entropy
against a soft target y, so soft labels train with it unchanged (its minimum over x is at
σ(x) = y, where it equals the label's entropy, not 0). A mixture-of-experts backbone adds the
router losses (`loss.moe_aux`, `loss.moe_z`) as the reward model does.

Which steps train (`prm.train_on`): "all" (a PRM) every labelled step; "last" the final step of
each solution alone — an outcome reward model on the same data and head, the baseline a PRM
should beat (under "every step from the first error on is wrong" labels the final step's label
is the solution's outcome). A solution whose final step was cut by truncation trains nothing in
"last" mode: the last step kept is not the outcome (data/stepwise.py `final_step`).

Right and wrong (`prm.label_threshold`, t, default 0.5): a step is labelled right when y >= t
and predicted right when σ(x) >= t (x >= logit t: the same rule on the model's probability, so
a calibrated model's verdicts are the labels'); hard 0/1 labels are the same at any t in (0, 1).
With Math-Shepherd's soft labels from N rollouts, t = 1/N is its "hard estimation" (right when
any rollout reaches the answer) and t = 0.5 a majority of them.

Metrics, training (over the trained steps: in "last" mode the final steps alone, so solution and
first-error accuracy are then the final step's accuracy) and held-out (`data.eval`, every
`eval_every` steps; over every labelled step in either mode, so a PRM and its last-step baseline
are compared on the same numbers — in "last" mode `eval/loss` is thus not the training
objective):
  * `step_accuracy`: steps whose verdict (right/wrong at t) is the label's; `label_mean` the
    mean label (with hard labels the fraction of steps that are right; with soft ones the
    expected fraction); held-out: `majority_accuracy`, what always answering the commoner verdict
    (at t) scores — the baseline step accuracy must beat;
  * `prob_mae`: mean |σ(x) − y|, how far the step probabilities are from the labels — the
    measure of a fit to soft labels that thresholding hides;
  * `step_kl`: mean KL(y ‖ σ(x)) = the loss less the labels' entropy: 0 only at σ(x) = y, where
    the loss itself stops at the entropy floor (with hard labels it is the loss);
  * `solution_accuracy`: solutions (rows) whose verdict "every step right" is the truth (every
    label right at t) — what best-of-N filtering needs;
  * `first_error_accuracy`: solutions whose first step predicted wrong is the first labelled
    wrong (or neither has one) — ProcessBench's question, where the reasoning first fails;
  * held-out `final_step_accuracy`: the verdict on each solution's final step (kept whole) —
    the outcome, what a "last" run is trained for and a PRM can be compared on.

Scoring with a trained PRM (per-step probabilities, aggregated by min / prod / last / mean) and
best-of-N with it: evaluation/prm_scorer.py, `python -m flaxlm.evaluation.best_of_n --prm RUN`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import xlogy

from flaxlm.alignment import common
from flaxlm.data import stepwise as SW
from flaxlm.data.chat_examples import OVERLENGTH
from flaxlm.models.sharding import fetch, make_mesh, same_batch_count, shard_batch
from flaxlm.train import loop
from flaxlm.train.losses import add_router_losses, router_forward
from flaxlm.train.step import RATIOS, jit_eval_rows

TRAIN_ON = ("all", "last")  # prm.train_on: every labelled step, or each solution's final one


def cuts(threshold: float) -> tuple[float, float]:
    """(label cut, logit cut) of `prm.label_threshold` t, both float32 values (as floats): a
    step is labelled right when y >= t and predicted right when x >= logit t (σ(x) >= t). The
    labels are float32 in the batches, so comparing against t rounded the same way gives the
    host's metrics the device's verdict on a label exactly at t (0.7 is not a float32)."""
    t = float(np.float32(threshold))
    return t, float(np.float32(np.log(threshold) - np.log1p(-threshold)))


def step_loss(logits, labels, mask, threshold: float = 0.5):
    """BCE with logits over the masked positions and the metrics (module docstring).

    Args:
      logits: (B, T) one logit per token.
      labels: (B, T) a label in [0, 1] (1 right, 0 wrong, or soft) at labelled positions,
        anything elsewhere.
      mask: (B, T) 1 at the trained positions of real rows (every labelled step, or the final
        ones: `prm.train_on`), 0 elsewhere (padding, other tokens).
      threshold: `prm.label_threshold`, where a label or a probability turns right.

    Returns: (scalar loss, metrics: step_accuracy, label_mean, prob_mae, step_kl, weight =
    masked steps, and RATIOS of solution_accuracy and first_error_accuracy over rows with a
    masked step).
    """
    x = jnp.asarray(logits, jnp.float32)
    y = jnp.asarray(labels, jnp.float32)
    m = jnp.asarray(mask, jnp.float32)
    n = jnp.sum(m)
    mean = lambda v: jnp.sum(v * m) / jnp.maximum(n, 1.0)  # noqa: E731
    # softplus(x) − y·x: finite for any x (no log of an underflowed sigmoid)
    bce = jax.nn.softplus(x) - y * x
    y_cut, x_cut = cuts(threshold)
    label_wrong, pred_wrong = y < y_cut, x < x_cut
    labelled = m > 0
    rows = jnp.any(labelled, axis=1).astype(jnp.float32)  # solutions in the batch
    all_right = ~jnp.any(labelled & label_wrong, axis=1)
    all_pred = ~jnp.any(labelled & pred_wrong, axis=1)
    t = jnp.arange(x.shape[1])
    first = lambda wrong: jnp.min(jnp.where(labelled & wrong, t, x.shape[1]), axis=1)  # noqa: E731
    ratio = lambda ok: (jnp.sum(rows * ok)[None], jnp.sum(rows)[None])  # noqa: E731
    # −H(y) = y log y + (1 − y) log(1 − y), 0 log 0 = 0: the loss's floor at σ(x) = y
    neg_entropy = xlogy(y, y) + xlogy(1.0 - y, 1.0 - y)
    metrics = {
        "step_accuracy": mean((label_wrong == pred_wrong).astype(jnp.float32)),
        "label_mean": mean(y),
        "prob_mae": mean(jnp.abs(jax.nn.sigmoid(x) - y)),
        "step_kl": mean(bce + neg_entropy),
        "weight": n,  # trained steps: the loss's mean
        RATIOS: {
            "solution_accuracy": ratio(all_right == all_pred),
            "first_error_accuracy": ratio(first(label_wrong) == first(pred_wrong)),
        },
    }
    return mean(bce), metrics


def check_train_on(train_on) -> str:
    """`train_on` when it is one of TRAIN_ON; a ValueError naming `prm.train_on` otherwise."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"prm.train_on={train_on!r}; expected one of {TRAIN_ON}")
    return train_on


def steps_of(batch, which: str = "all"):
    """(B, T) 1 at the steps `which` names, of real rows: every labelled step ("all") or each
    solution's kept final step ("last")."""
    steps = batch["final_step"] if check_train_on(which) == "last" else batch["step_mask"]
    return steps * batch["valid"][:, None]


def prm_loss_fn(apply, router: tuple | None = None, *, train_on: str = "all",
                threshold: float = 0.5):  # fmt: skip
    """The loop's loss over a `StepBatches` batch (`train_on`, `threshold`: `prm.train_on`,
    `prm.label_threshold`); `router` (train/losses.py `router_coefs`: a mixture-of-experts
    backbone) adds the router losses and logs `moe/*`."""
    check_train_on(train_on)

    def loss_fn(params, batch, rng):
        del rng
        logits, stats = router_forward(apply, router, params, batch["tokens"],
                                       batch["positions"], batch["segment_ids"])  # fmt: skip
        mask = steps_of(batch, train_on)
        loss, metrics = step_loss(logits, batch["step_labels"], mask, threshold)
        return add_router_losses(loss, metrics, stats, router)

    return loss_fn


def np_step_metrics(logits, labels, mask, threshold: float = 0.5,
                    final=None) -> dict[str, float]:  # fmt: skip
    """`step_loss`'s loss and metrics in numpy (float64) over whole (N, T) arrays, for the
    held-out evaluation, plus `majority_accuracy`, `steps` and `solutions`, and with `final`
    ((N, T), 1 at each solution's kept final step) `final_step_accuracy`."""
    x = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.float64)
    m = np.asarray(mask, np.float64) > 0
    xs, ys = x[m], y[m]
    y_cut, x_cut = cuts(threshold)
    right, pred = ys >= y_cut, xs >= x_cut
    q = float(right.mean())
    right_sol = first_ok = 0
    rows = [r for r in range(len(m)) if m[r].any()]
    for r in rows:
        yr, pr = y[r][m[r]] >= y_cut, x[r][m[r]] >= x_cut
        right_sol += bool(yr.all() == pr.all())
        first_ok += _first_wrong(yr) == _first_wrong(pr)
    bce = np.logaddexp(0.0, xs) - ys * xs
    out = {
        "loss": float(np.mean(bce)),
        "step_accuracy": float(np.mean(pred == right)),
        "majority_accuracy": max(q, 1.0 - q),
        "label_mean": float(ys.mean()),
        "prob_mae": float(np.mean(np.abs(_sigmoid(xs) - ys))),
        "step_kl": float(np.mean(bce - _entropy(ys))),
        "solution_accuracy": right_sol / len(rows),
        "first_error_accuracy": first_ok / len(rows),
        "steps": int(m.sum()),
        "solutions": len(rows),
    }
    if final is not None and (f := (np.asarray(final) > 0) & m).any():
        out["final_step_accuracy"] = float(np.mean((x[f] >= x_cut) == (y[f] >= y_cut)))
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for any x


def _entropy(y: np.ndarray) -> np.ndarray:
    """−[y log y + (1 − y) log(1 − y)], 0 at y = 0 and y = 1."""
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(y * np.log(y) + (1.0 - y) * np.log1p(-y))
    return np.where((y <= 0) | (y >= 1), 0.0, h)


def _first_wrong(right: np.ndarray) -> int:
    wrong = np.flatnonzero(~right)
    return int(wrong[0]) if len(wrong) else len(right)


def make_eval_fn(config, mesh, apply, examples):
    """params -> held-out metrics (`np_step_metrics`) over every labelled step of `examples`
    (whatever `prm.train_on`: module docstring); the logits come from `opt.grad_accum`
    micro-batches of rows, as the train step splits them."""
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
        logits, labels, mask, final = [], [], [], []
        for b in batches:
            logits.append(fetch(fn(params, b)))
            h = fetch({k: b[k] for k in ("step_labels", "step_mask", "final_step", "valid")})
            labels.append(h["step_labels"])
            mask.append(steps_of(h, "all"))
            final.append(steps_of(h, "last"))
        x, y, m, f = map(np.concatenate, (logits, labels, mask, final))
        return np_step_metrics(x, y, m, config.prm.label_threshold, final=f)

    return eval_fn


def check_settings(config) -> None:
    """Raises on a bad PRM setting, naming the key, before anything is loaded."""
    SW.check_separator(config.prm.step_separator, "prm.step_separator")
    check_train_on(config.prm.train_on)
    t = config.prm.label_threshold
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1:
        raise ValueError(f"prm.label_threshold={t!r} must be a number in (0, 1): a step is "
                         "right when its label (or σ of its logit) is at least it")  # fmt: skip
    if config.data.overlength not in OVERLENGTH:
        raise ValueError(f"data.overlength={config.data.overlength!r}; expected one of "
                         f"{OVERLENGTH}")  # fmt: skip


def load_examples(spec: str, config, template, report: SW.StepReport) -> list[dict]:
    d = config.data
    return SW.render_stepwise(
        common.iter_records(spec, d, report), template, config.seq_len,
        separator=config.prm.step_separator, fields=d.fields, overlength=d.overlength,
        report=report, threshold=config.prm.label_threshold,
    )  # fmt: skip


def build_task(config, mesh, workdir: str | None = None) -> loop.Task:
    """The PRM Task; writes data_report.json into `workdir`. The meta's "prm" section is what a
    scorer renders with (evaluation/prm_scorer.py): the label positions are the separator's."""
    check_settings(config)
    return common.scalar_head_task(
        "prm", config, mesh, workdir, what="stepwise examples", new_report=SW.StepReport,
        load=load_examples, batches=SW.StepBatches, make_eval_fn=make_eval_fn,
        make_loss=lambda apply, router: prm_loss_fn(
            apply, router, train_on=config.prm.train_on, threshold=config.prm.label_threshold),
        # train_on: an outcome-trained run ("last") is best read at the last step
        extra_meta={"prm": {"step_separator": config.prm.step_separator,
                            "train_on": config.prm.train_on}},
    )  # fmt: skip


def run(config, workdir: str):
    mesh = make_mesh(dict(config.mesh))
    return loop.run(config, workdir, build_task(config, mesh, workdir), mesh=mesh)
