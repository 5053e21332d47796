"""KTO (Kahneman-Tversky Optimization, Ethayarajh et al. 2024): DPO's relative for unpaired
feedback — each example a prompt, one completion and a label, desirable or undesirable — through
the shared step and loop.

    python -m flaxlm.train.main --config configs/kto.py:runlocal=True \
        --config.init_from=runs/sft --workdir runs/kto

Per example, with sequence log-probabilities (sums over the completion tokens) π of the policy
and ρ of the frozen reference, Δ = π − ρ and the implicit reward r = β·Δ, the loss (`kto_loss`:
the paper's λ_y − v(x, y), as TRL's KTOTrainer computes it) is

    desirable     λ_D · (1 − σ(β·(Δ − z0)))
    undesirable   λ_U · (1 − σ(β·(z0 − Δ)))

averaged over the batch's examples, with z0 the reference point: the policy's KL to the
reference, estimated per batch from mismatched pairs and never differentiated (`kl_estimate`):

    z0 = max(0, mean over the batch of (π̃ − ρ̃)),

π̃, ρ̃ the log-probabilities of each example's completion after the prompt of another example of
the batch (`data/formats.py` `kl_partners`: the next row with another prompt, a shift by one
when the prompts are distinct, so the mismatched rows hold the batch's own completions, each
once; `UnpairedBatches` builds them as `kl_*` rows; a batch whose rows all share one prompt has
none, and its z0 is 0 — `label_balance` warns when the whole training set has one prompt). In
reward units the reference point is β·z0;
the `kl` metric is z0 in nats. z0 is a mean over the global batch: the loss is jitted over the
global (data×fsdp-sharded) arrays, so XLA reduces across devices and processes; with
`opt.grad_accum` > 1 it is each micro-batch's (as TRL's is each forward pass's). The mismatched
rows go through the policy in a forward pass of their own under stop_gradient, so they cost a
forward and no backward; MFU counts them so (2 of the 6 FLOPs per parameter and token).

The weights λ_D, λ_U (`kto.desirable_weight`, `kto.undesirable_weight`): the paper advises
λ_D·n_D / (λ_U·n_U) in [1, 4/3] for n_D desirable and n_U undesirable examples; the task
warns outside it and records the counts and the ratio in data_report.json.

Reference: the `init_from` run (with `init_from_ema` its EMA weights, the policy's start) or
`kto.ref_from`, a frozen copy (`kto.ref_dtype`) scored over every batch's rows inside the
jitted step (`loop.Task.frozen`, an argument of the step as distillation's teacher is), so the
host never waits on the device for a batch. No precompute: the mismatched rows change with
every epoch's shuffle. The held-out examples are scored once when the task is built (DPO's
`RefLogps`, with KTO's row prefixes). With LoRA (`lora.rank` > 0) the reference is the
policy's own frozen base, scored inside the loss (no second copy of the model, GRPO's way).

A mixture-of-experts policy (n_experts > 0) adds pretraining's router losses of the matched
rows' forward pass (the one with gradient), `loss.moe_aux` × load balance + `loss.moe_z` ×
router z-loss (train/losses.py `router_coefs`), and logs `moe/*`: without them KTO's gradient
alone is free to collapse the router onto a few experts.

Data (`data/formats.py` `render_unpaired`): `{"prompt", "completion", "label": true/false}` or
`{"messages", "label"}` records, or preference records split into a desirable and an undesirable
example (the built-in world's pairs by default). Bad input names file:line.

Metrics (means over the batch's desirable / undesirable examples, 0 for a batch without any;
with `opt.grad_accum` > 1 still the whole batch's — sums and counts that the step adds up over
the micro-batches, train/step.py `finish_metrics` — except the per-micro-batch z0 above):
`rewards/desirable`, `rewards/undesirable`, `rewards/margin` (their difference),
`rewards/accuracy` (share with Δ > z0 if desirable, Δ < z0 if not), `kl` (z0), `kl_unclamped`
(the estimate before the clamp: it falls below 0 when training lowers the data's completions
under every prompt, which the policy never sampled), `logps/desirable`, `logps/undesirable`,
`count/desirable`, `count/undesirable`. Held-out evaluation: `loss`, `accuracy` (ties ½: every
Δ = z0 = 0 at step 0), `kl`, `kl_unclamped`, `rewards/*` and `margin` with z0 estimated once
over the whole held-out set's mismatched rows, accuracy per pair kind for the built-in world,
and greedy generation accuracy on `eval_gen.sets` (DPO's).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.alignment import common, rl_common, rl_eval
from flaxlm.alignment.dpo import RefLogps, rows_logps
from flaxlm.config_values import is_real
from flaxlm.data import formats as F
from flaxlm.models import lora as lora_lib
from flaxlm.models.sharding import (
    fetch,
    logical_axis_rules,
    make_mesh,
    same_batch_count,
    shard_batch,
    use_mesh,
)
from flaxlm.train import loop
from flaxlm.train.losses import add_router_losses, router_coefs
from flaxlm.train.pretrain import model_fns
from flaxlm.train.step import RATIOS, SUMS, jit_eval_rows

log = logging.getLogger("flaxlm")
ROWS = ("", "kl_")  # the row prefixes of a KTO batch: matched, mismatched (KL)
RATIO_RANGE = (1.0, 4.0 / 3.0)  # the paper's advice for λ_D·n_D / (λ_U·n_U)


def mismatched_kl(policy_kl_logps, ref_kl_logps, kl_valid):
    """The batch's KL estimate before the clamp: the mean of π̃ − ρ̃ over the rows with
    `kl_valid` = 1 (0 without any), with no gradient."""
    d = jnp.asarray(policy_kl_logps, jnp.float32) - jnp.asarray(ref_kl_logps, jnp.float32)
    w = jnp.asarray(kl_valid, jnp.float32)
    return jax.lax.stop_gradient(jnp.sum(d * w) / jnp.maximum(jnp.sum(w), 1.0))


def kl_estimate(policy_kl_logps, ref_kl_logps, kl_valid):
    """z0 = max(0, `mismatched_kl`): a KL is >= 0, the estimate (over completions the policy did
    not sample) need not be. No gradient flows through it (the paper's reference point is a
    constant of each step)."""
    return jnp.maximum(mismatched_kl(policy_kl_logps, ref_kl_logps, kl_valid), 0.0)


def kto_loss(policy_logps, ref_logps, desirable, z0, *, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):  # fmt: skip
    """Per-example KTO losses (module docstring) and implicit rewards.

    Args:
      policy_logps, ref_logps: (B,) sequence log-probabilities of the completions.
      desirable: (B,) 1 for a desirable example, 0 for an undesirable one.
      z0: the reference point (scalar, nats: `kl_estimate`).
      beta, desirable_weight, undesirable_weight: β, λ_D, λ_U.

    Returns: (losses (B,), rewards β·(π − ρ) (B,)), float32.
    """
    delta = jnp.asarray(policy_logps, jnp.float32) - jnp.asarray(ref_logps, jnp.float32)
    good = jnp.asarray(desirable, jnp.float32) > 0.5
    # 1 − σ(x) written σ(−x): in float32 the difference cancels (relative error 5e-4 at x = 10,
    # loss and gradient exactly 0 from x ≈ 17 on, where σ(−x) is still 4e-8)
    losses = jnp.where(
        good,
        desirable_weight * jax.nn.sigmoid(beta * (z0 - delta)),
        undesirable_weight * jax.nn.sigmoid(beta * (delta - z0)),
    )
    return losses, beta * delta


def kto_logps(apply, params, batch, base_apply=None, moe_stats: bool = False, ref_apply=None,
              ref_params=None):  # fmt: skip
    """(π, π̃, ρ, ρ̃), each (B,): the policy's log-probabilities of the matched rows (with
    gradient) and of the mismatched rows (a forward pass of their own, no gradient), and the
    reference's — from the batch, with LoRA (`base_apply`) of the policy's frozen base, or with
    `ref_apply` of the frozen reference weights `ref_params`.
    `moe_stats=True` appends the router statistics of the matched rows' pass, the only one
    with gradient (a router loss on the others would train nothing)."""
    matched = rows_logps(apply, params, batch, ("",), moe_stats)
    (pol,), stats = matched[0], matched[2:]
    (pol_kl,), _ = rows_logps(apply, jax.lax.stop_gradient(params), batch, ("kl_",))
    if ref_apply is not None:
        (ref, ref_kl), _ = rows_logps(ref_apply, jax.lax.stop_gradient(ref_params), batch, ROWS)
    elif base_apply is None:
        ref, ref_kl = batch["ref_logps"], batch["ref_kl_logps"]
    else:
        frozen = jax.lax.stop_gradient(params["base"])
        (ref, ref_kl), _ = rows_logps(base_apply, frozen, batch, ROWS)
    return (pol, pol_kl, ref, ref_kl, *stats)


def _metrics(losses, rewards, delta, policy_logps, z0, desirable, valid, xp=jnp):
    """The metrics of one batch (or the held-out set): means over its desirable and its
    undesirable examples; `xp` is jnp in the loss, np in evaluation."""
    good = valid * desirable
    bad = valid * (1.0 - desirable)
    mean = lambda x, m: xp.sum(x * m) / xp.maximum(xp.sum(m), 1.0)  # noqa: E731
    right = xp.where(desirable > 0.5, delta > z0, delta < z0).astype(np.float32)
    return {
        "loss": mean(losses, valid),
        "rewards/desirable": mean(rewards, good),
        "rewards/undesirable": mean(rewards, bad),
        "rewards/margin": mean(rewards, good) - mean(rewards, bad),
        "rewards/accuracy": mean(right, valid),
        "kl": z0,
        "logps/desirable": mean(policy_logps, good),
        "logps/undesirable": mean(policy_logps, bad),
        "count/desirable": xp.sum(good),
        "count/undesirable": xp.sum(bad),
    }


def kto_loss_fn(apply, k, base_apply=None, router: tuple | None = None, ref_apply=None):
    """The loop's loss: KTO over a batch of `UnpairedBatches`. The reference is scored in here:
    with `ref_apply`, from the frozen reference weights the step passes in (`loop.Task.frozen`;
    the loss is `(params, batch, rng, ref)`), or with `base_apply` (LoRA's) from the policy's
    frozen base; else its log-probabilities are read from the batch (`ref_logps`,
    `ref_kl_logps`). `router` (train/losses.py `router_coefs`: a mixture-of-experts policy)
    adds the router losses of the matched rows' forward pass and logs `moe/*`."""

    def loss_fn(params, batch, rng, ref=None):
        del rng
        out = kto_logps(apply, params, batch, base_apply, moe_stats=router is not None,
                        ref_apply=ref_apply, ref_params=ref)  # fmt: skip
        pol, pol_kl, ref, ref_kl = out[:4]
        z0 = kl_estimate(pol_kl, ref_kl, batch["kl_valid"])
        raw = mismatched_kl(pol_kl, ref_kl, batch["kl_valid"])  # (the same sum: XLA shares it)
        losses, rewards = kto_loss(
            pol, ref, batch["label"], z0, beta=k.beta, desirable_weight=k.desirable_weight,
            undesirable_weight=k.undesirable_weight,
        )  # fmt: skip
        m = _metrics(losses, rewards, pol - ref, pol, z0, batch["label"], batch["valid"])
        loss = m.pop("loss")
        # The per-kind metrics as sums and counts (train/step.py `finish_metrics`): with
        # opt.grad_accum > 1 they are then the whole batch's, not an average over micro-batches
        # (counts divided by their number, a micro-batch without one kind pulling its means to 0)
        good = batch["valid"] * batch["label"]
        bad = batch["valid"] * (1.0 - batch["label"])
        n = jnp.stack([jnp.sum(good), jnp.sum(bad)])
        r = jnp.stack([jnp.sum(rewards * good), jnp.sum(rewards * bad)])
        lp = jnp.stack([jnp.sum(pol * good), jnp.sum(pol * bad)])
        ratios = {
            "rewards/desirable": (r[:1], n[:1]), "rewards/undesirable": (r[1:], n[1:]),
            "rewards/margin": (r * jnp.array([1.0, -1.0]), n),
            "logps/desirable": (lp[:1], n[:1]), "logps/undesirable": (lp[1:], n[1:]),
        }  # fmt: skip
        sums = {"count/desirable": n[0], "count/undesirable": n[1]}
        m = {k: v for k, v in m.items() if k not in ratios and k not in sums}
        metrics = {**m, "kl_unclamped": raw, "weight": jnp.sum(batch["valid"]),
                   SUMS: sums, RATIOS: ratios}  # fmt: skip
        return add_router_losses(loss, metrics, out[4] if router is not None else {}, router)

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Data, evaluation and task


def load_examples(spec: str, config, template, report: F.DataReport) -> list[dict]:
    d = config.data
    recs = common.iter_records(spec, d, report)
    return F.render_unpaired(
        recs, template, config.seq_len, fields=d.fields, overlength=d.overlength, report=report
    )


def label_balance(examples, k) -> dict:
    """{"desirable": n_D, "undesirable": n_U, "weighted_ratio": λ_D·n_D / (λ_U·n_U),
    "distinct_prompts": n}; warns when the ratio is outside the paper's advised [1, 4/3],
    naming the weight that fixes it, and when every example has one prompt: a row's KL
    partner must have another prompt (data/chat_batches.py `kl_partners`), so then no row has
    one, z0 is 0 at every step and the logged kl reads 0 however far the policy moves."""
    prompts = len({ex["ids"][: ex["split"]].tobytes() for ex in examples})
    if len(examples) > 1 and prompts < 2:
        log.warning(
            "kto: all %d training examples share one prompt, so no batch has a mismatched "
            "(other prompt) row to estimate the reference point z0 from: z0 = 0 at every step, "
            "and the logged kl is 0 whatever the policy does", len(examples),
        )  # fmt: skip
    n_d = sum(bool(ex["label"]) for ex in examples)
    n_u = len(examples) - n_d
    num, den = k.desirable_weight * n_d, k.undesirable_weight * n_u
    ratio = num / den if den else None  # (None: no undesirable example to weigh against)
    lo, hi = RATIO_RANGE
    if ratio is None or not lo <= ratio <= hi:
        hint = (
            f"e.g. --config.kto.desirable_weight={k.undesirable_weight * n_u / n_d:.3g} (ratio 1)"
            if n_d and n_u else "the data has only one kind of example"
        )  # fmt: skip
        log.warning(
            "kto: λ_D·n_D / (λ_U·n_U) = %.3g·%d / (%.3g·%d) = %s is outside [1, 4/3], the "
            "range the KTO paper advises for balancing the two kinds of examples; %s",
            k.desirable_weight, n_d, k.undesirable_weight, n_u,
            "∞" if ratio is None else f"{ratio:.3g}", hint,
        )  # fmt: skip
    return {"desirable": n_d, "undesirable": n_u, "weighted_ratio": ratio,
            "distinct_prompts": prompts}  # fmt: skip


def _batches(examples, config, pad_id, **kw):
    return F.UnpairedBatches(
        examples, seq_len=config.seq_len, batch=config.batch_size // jax.process_count(),
        pad_id=pad_id, process_index=jax.process_index(), process_count=jax.process_count(), **kw,
    )  # fmt: skip


def make_eval_fn(config, mesh, apply, ref, heldout, pad_id, gen_eval, spec, base_apply):
    """params -> held-out KTO metrics, z0 estimated over every held-out mismatched row
    (+ greedy generation metrics). The log-probabilities of each batch's rows come from
    `opt.grad_accum` micro-batches, as the train step splits them (train/step.py `eval_rows`:
    an example's matched and mismatched rows together): one pass over the whole batch could
    run out of memory where training fits. Unlike training's z0 (each micro-batch's, as TRL's
    is each forward pass's), the held-out z0 and every metric are taken over the whole
    held-out set on the host, so the split changes none of them."""
    k = config.kto
    # Several processes: each holds its share of the held-out examples (as many batches on
    # each); the metrics are over every process's rows (gathered), the same on all.
    it = _batches(heldout, config, pad_id, shuffle=False, num_epochs=1,
                  with_index=True) if heldout else None  # fmt: skip
    host = same_batch_count(list(it), it.blank) if heldout else []
    host = [ref.add(b) if ref is not None else b for b in host]
    kinds = [ex["meta"].get("pair", "") for ex in heldout]
    fn = jit_eval_rows(lambda p, b: kto_logps(apply, p, b, base_apply), config.opt.grad_accum)
    rules = logical_axis_rules(config.sharding)

    def eval_fn(params):
        out, cols = {}, collections.defaultdict(list)
        for hb in host:
            with use_mesh(mesh, rules):
                b = shard_batch(hb, mesh)
                got = fetch(fn(params, b))
            # every process's rows of the host fields, in the global order of the outputs
            h = fetch({k: b[k] for k in ("valid", "label", "kl_valid", "index")})
            keep = h["valid"] > 0
            for name, v in zip(("pol", "pol_kl", "ref", "ref_kl"), got):
                cols[name].append(np.asarray(v, np.float64)[keep])
            for name in ("label", "kl_valid"):
                cols[name].append(h[name][keep].astype(np.float64))
            cols["index"].append(h["index"][keep])
        if host:
            c = {name: np.concatenate(v) for name, v in cols.items()}
            raw = float(mismatched_kl(c["pol_kl"], c["ref_kl"], c["kl_valid"]))
            z0 = max(raw, 0.0)
            losses, rewards = jax.device_get(kto_loss(
                c["pol"], c["ref"], c["label"], z0, beta=k.beta,
                desirable_weight=k.desirable_weight, undesirable_weight=k.undesirable_weight,
            ))  # fmt: skip
            delta = c["pol"] - c["ref"]
            m = _metrics(np.asarray(losses), np.asarray(rewards), delta, c["pol"], z0,
                         c["label"], np.ones_like(delta), xp=np)  # fmt: skip
            # Ties count ½: at step 0 every Δ is 0 and z0 is 0 (the policy is the reference).
            won = np.where(c["label"] > 0.5, delta > z0, delta < z0) + 0.5 * (delta == z0)
            out.update({key: float(v) for key, v in m.items() if not key.startswith("count/")})
            out.update({"accuracy": float(np.mean(won)), "margin": out.pop("rewards/margin"),
                        "kl_unclamped": raw})  # fmt: skip
            out.pop("rewards/accuracy")
            out.update(common.accuracy_by_kind(kinds, c["index"], won))
        if gen_eval is not None:
            out.update(gen_eval(lora_lib.merge(params, spec) if spec else params))
        return out

    return eval_fn


def _reference(config, mesh, rules, pins):
    """(cfg, apply, params) of the frozen reference copy of `kto.ref_from` or `init_from` (its
    EMA weights with `init_from_ema`), at the step `pins` (rl_frozen.FrozenSources) holds for
    it."""
    k = config.kto
    ema = not k.ref_from and bool(config.get("init_from_ema", False))
    src, key = (k.ref_from, "kto.ref_from") if k.ref_from else (config.init_from, "init_from")
    return rl_common.frozen_lm(
        src, mesh, rules, k.ref_dtype, ema, key="kto.ref_dtype", source_key=key,
        step=pins.step(key),
    )  # fmt: skip


def check_settings(k) -> None:
    """Raises on a bad `kto.*` number, naming the key; build_task calls it before anything is
    loaded. β > 0: at 0 every loss is λ/2 whatever the policy (nothing trains), below 0 the
    value function prefers the undesirable examples; λ_D, λ_U >= 0 (a negative weight
    trains a kind of example the wrong way) and not both 0; all finite (∞ gives NaN losses)."""
    if not (is_real(k.beta) and 0 < k.beta < math.inf):
        raise ValueError(
            f"kto.beta={k.beta!r} must be > 0 and finite (the scale of the implicit reward)"
        )
    for key in ("desirable_weight", "undesirable_weight"):
        if not (is_real(k[key]) and 0 <= k[key] < math.inf):
            raise ValueError(f"kto.{key}={k[key]!r} must be >= 0 and finite")
    if k.desirable_weight == 0 and k.undesirable_weight == 0:
        raise ValueError("kto.desirable_weight = kto.undesirable_weight = 0: no loss to train")


def build_task(config, mesh, workdir: str | None = None) -> loop.Task:
    """The KTO Task; `init_from` (the SFT run) is required: it is the policy's start and, unless
    `kto.ref_from` names another run, the reference (LoRA: the policy's frozen base)."""
    k = config.kto
    check_settings(k)
    if not config.init_from:
        raise ValueError("kto: set --config.init_from=SFT_RUN (the policy's start and reference)")
    if config.batch_size // jax.process_count() < 2:
        raise ValueError(
            f"kto: batch_size={config.batch_size} over {jax.process_count()} processes leaves "
            "fewer than 2 examples per process: the KL estimate needs another example's prompt"
        )
    spec = lora_lib.spec_from_config(config.lora)
    lora_lib.check_base_is_reference(spec, "kto")
    if spec and k.ref_from:
        raise ValueError("kto.ref_from with LoRA: the reference is the policy's own frozen base")
    tok, cfg, template = common.resolve_source(config, mesh)
    if k.ref_from:  # (before any data or model loads)
        common.check_same_tokenizer(tok, k.ref_from, "kto.ref_from")
    report, eval_report = F.DataReport(config.data.strict), F.DataReport(config.data.strict)
    train = load_examples(config.data.train, config, template, report)
    if not train:
        raise common.no_usable(config, "examples", report)
    heldout = (
        load_examples(config.data.eval, config, template, eval_report) if config.data.eval else []
    )
    rules = logical_axis_rules(config.sharding)
    init_params, apply = model_fns(cfg)
    base_apply, ref, ref_cfg, ref_apply, frozen = None, None, None, None, None
    # The reference's step: the one this run started with, also on a resume (its logps are
    # scored again on every start; LoRA: none, the reference is the policy's own base)
    ref_key = "kto.ref_from" if k.ref_from else "init_from"
    pins = rl_common.FrozenSources(
        workdir, {} if spec else {ref_key: k.ref_from or config.init_from}
    )
    if spec:  # the reference is the policy's frozen base: no second copy of the model
        base_apply = apply
        init_params, apply = lora_lib.with_lora(init_params, spec), lora_lib.lora_apply(apply, spec)
    else:  # a frozen copy: the step's argument, scored in the loss; held-out pairs: `ref`
        ref_cfg, ref_apply, frozen = _reference(config, mesh, rules, pins)
        ref = RefLogps(ref_apply, frozen, mesh, rules, cache=False, prefixes=ROWS)
    batches = _batches(train, config, tok.pad_id, seed=config.seed, shuffle=config.data.shuffle,
                       **common.train_source_check(config))  # fmt: skip
    eval_fn = None
    gen_report = F.DataReport(config.data.strict)  # its own section: a file may be both
    if config.eval_every and (heldout or config.eval_gen.sets):
        gen_eval = rl_eval.sets_eval(config, template, cfg, mesh, rules, gen_report)
        eval_fn = make_eval_fn(config, mesh, apply, ref, heldout, tok.pad_id, gen_eval, spec,
                               base_apply)  # fmt: skip
    data_report = {"train": {**report.to_dict(), **label_balance(train, k)},
                   "eval": eval_report.to_dict(),
                   **rl_eval.gen_report_section(gen_report)}  # fmt: skip
    common.write_report(workdir, data_report)
    router = router_coefs(config.get("loss"), cfg.n_experts > 0)  # (None: a dense policy)
    task = common.supervised_task(
        "kto", "lm", config, cfg, spec, tok, workdir, data_report,
        init_params=init_params, loss_fn=kto_loss_fn(apply, k, base_apply, router, ref_apply),
        train_batches=batches, eval_fn=eval_fn, extra_meta=pins.meta(),
    )  # fmt: skip

    # The loop counts every `*tokens` row: the matched rows train (the task's count: 6 FLOPs
    # per parameter and token, 4 under LoRA), the mismatched ones only run forward (2, a third
    # of a full training count): the mean of the two. (2/3 of the task's count was that mean
    # for full fine-tuning only; under LoRA it undercounted the matmuls by a ninth.) A frozen
    # reference copy's forward pass over every row is part of the step too (2; distill counts
    # its teacher's so); LoRA's base pass is not counted.
    def fwd(model_cfg, causal):
        return model_cfg.flops_per_token(config.seq_len, causal=causal) / 3

    ref_fwd, ref_fwd_causal = (
        (fwd(ref_cfg, False), fwd(ref_cfg, True)) if ref_cfg is not None else (0.0, 0.0)
    )
    return dataclasses.replace(
        task, frozen=frozen,
        flops_per_token=(task.flops_per_token + fwd(cfg, False)) / 2 + ref_fwd,
        flops_per_token_causal=(task.flops_per_token_causal + fwd(cfg, True)) / 2 + ref_fwd_causal,
    )  # fmt: skip


def run(config, workdir: str):
    mesh = make_mesh(dict(config.mesh))
    return loop.run(config, workdir, build_task(config, mesh, workdir), mesh=mesh)
