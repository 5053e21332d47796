"""The one training loop. Every task (pretraining, SFT, reward model, DPO, PPO, GRPO) is a
`Task` — parameters, a loss and a batch source — run by `run(config, workdir, task)`.

What the loop does, so tasks never do it again:
  * builds the mesh, the optimizer and the sharded TrainState; resumes from the latest checkpoint
    in the workdir (state and data-iterator position; an unreadable latest step is moved aside
    and the next newest resumed, `ckpt_on_corrupt`; another run's checkpoints — another task
    or model config — are refused, naming the keys), or starts from `config.init_from` (its
    latest params, or with `init_from_ema` its EMA weights: `init_from_ema` below; a model
    config that differs from the source's where that changes what its weights compute is
    refused, naming the keys, and the keys that may differ are logged and recorded in
    events.jsonl, `init_from_model_changed`), or branches from `config.branch_from` (another
    run's whole state at a step, resumed under this run's schedule and data: train/branch.py);
  * dispatches step N before reading step N−1's metrics and fetches metrics only every
    `log_every` steps, so the host never stalls the device; `jax_transfer_guard` is set to
    "disallow" around the step so an accidental host↔device copy is an error;
  * logs metrics.jsonl / TensorBoard with tokens/s and MFU, runs `task.eval_fn` every
    `eval_every` steps, checkpoints every `ckpt_every` steps (async);
  * with `ema.decay` > 0 keeps an EMA of the weights in the state (train/ema.py: started at the
    initial or `init_from` params, updated in the step, checkpointed) and evaluates it too,
    logged as `eval_ema/<metric>` beside `eval/<metric>`;
  * rolls back to the last checkpoint after `guard.max_bad_in_row` skipped steps in a row (the
    data iterator keeps going, so the offending batches are skipped, as PaLM did); after
    `guard.max_rollbacks` rollbacks in a row that got no further than the step of the one
    before, stops with an error instead (the checkpoints left as they are);
  * on SIGTERM (preemption), or once the process has run `max_runtime_minutes` (> 0; a job's
    time limit), logs the steps since the last log line, saves a checkpoint and returns cleanly
    (`summary["preempted"]`, `summary["stop_reason"]`); when a finite batch source
    (`data.num_epochs` > 0) ends before `total_steps`, evaluates there (as at
    `total_steps`), saves and returns. With several
    processes both are agreed (train/stopping.py): every process stops at the same step, even
    when only one saw the signal or ran out of data. Saves (periodic and on SIGTERM) wait for
    the batch source's boundary when it has one (`at_boundary()`: PPO/GRPO finish the current
    rollout's minibatches, no generation), so every checkpoint resumes bit for bit;
  * keeps metrics.jsonl to one line per logged step of the run as it finally went (and one at
    each checkpoint saved between log steps: no step is left out by a resume from it): a rollback
    or a resume moves the lines of the steps it trains again to metrics.superseded.jsonl and
    records the event in events.jsonl (train/metrics.py);
  * on a resume, compares the checkpoint's saved config with this run's: each changed key is
    logged (a changed seed, batch_size, seq_len or data key loudly: the data order does not
    continue exactly) and recorded in events.jsonl (`config_changed`); an optimizer change
    whose state does not fit the checkpoint's is an error naming the changed `opt.` keys; a
    checkpoint at or past `total_steps` is said to leave nothing to train.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
from tqdm.auto import tqdm

from flaxlm.config_values import is_int
from flaxlm.models.sharding import (
    logical_axis_rules,
    make_mesh,
    shard_batch,
    unused_mesh_axes,
    use_mesh,
)
from flaxlm.train import branch, stopping
from flaxlm.train import checkpoint as ckpt_lib
from flaxlm.train import ema as ema_lib

# The loop's parts in their own modules, re-exported here (tests and callers use loop.<name>).
from flaxlm.train.loop_guard import _log_and_guard, _rollback, _RollbackLimit  # noqa: F401
from flaxlm.train.loop_logging import (  # noqa: F401
    _eval_logged,
    _log_window,
    _maybe_eval,
    _summarise,
)
from flaxlm.train.loop_resume import (  # noqa: F401
    DATA_ORDER_KEYS,
    _check_rope_original_len,
    _init_from_model_changes,
    _refuse_another_optimizer,
    _report_code_change,
    _report_config_changes,
    init_from_ema,
)
from flaxlm.train.metrics import MetricWriter, Throughput, tokens_in_batch
from flaxlm.train.optim import make_optimizer
from flaxlm.train.state import abstract_state, create_train_state, state_shardings
from flaxlm.train.step import check_guard, jit_train_step

log = logging.getLogger("flaxlm")

KILL_ENV = "FLAXLM_KILL_AT_STEP"  # fault injection for tests: SIGKILL self at this step


@dataclasses.dataclass
class Task:
    """What a training task plugs into the loop.

    Attributes:
      name: shown in logs and checkpoints.
      init_params: rng -> parameter pytree with logical partitioning (linen `init`).
      loss_fn: (params, batch, rng) -> (loss, metrics); metrics["weight"] = loss denominator.
      train_batches: iterator of per-process batch slices with get_state()/set_state().
      eval_fn: optional params -> dict of held-out metrics (prefixed "eval/" in the logs;
        with an EMA also called on the EMA weights, "eval_ema/"). Pure: called twice a step.
      flops_per_token / flops_per_token_causal: training FLOPs per token for MFU (0 = skip).
      trainable_mask: optional pytree/function of bools; False leaves are frozen (LoRA).
      init_from_transform: (loaded_params, fresh_params) -> params, when `init_from` loads a
        checkpoint of a different structure (a reward model from an SFT model). It receives
        the loaded params as returned by `load_init_params`. Tree surgery only: it runs
        traced inside the jitted init (`create_train_state(loaded=...)`), and once on trees
        of leaf indices to place the loaded leaves (`state.place_loaded`).
      load_init_params: optional (run_dir, fresh_params_abstract) -> loaded params; defaults
        to reading the whole params tree of the same structure. With `init_from_ema` it is
        called with `ema=True` too and must then read the run's EMA weights.
      before_step: optional hook called with the current state before each batch is drawn
        (PPO/GRPO refresh their rollouts with the current policy here). At the batch source's
        boundaries (`at_boundary()`; every step without one) its time is no training time:
        left out of step_time_s, tokens_per_s and mfu (`_before_step`).
      model_meta: JSON-able description stored in every checkpoint (e.g. the model config).
      frozen: optional pytree of arrays the loss reads but never trains (distillation's
        teacher, the reference model of KTO and of DPO's `ref_logps=online`; placed on the
        mesh): passed to every step as an argument, and
        `loss_fn` then takes it as a 4th argument. Not checkpointed.
    """

    name: str
    init_params: Callable[[jax.Array], Any]
    loss_fn: Callable
    train_batches: Iterator[dict]
    eval_fn: Callable[[Any], dict] | None = None
    flops_per_token: float = 0.0
    flops_per_token_causal: float = 0.0
    trainable_mask: Any = None
    init_from_transform: Callable[[Any, Any], Any] | None = None
    load_init_params: Callable[[str, Any], Any] | None = None
    before_step: Callable[[Any], None] | None = None
    model_meta: dict = dataclasses.field(default_factory=dict)
    frozen: Any = None


def itstime(step: int, every: int, total: int | None = None, first: bool = False) -> bool:
    """True on multiples of `every` (and at the last step); big_vision's cadence helper."""
    if every <= 0:
        return False
    return step % every == 0 or (total is not None and step == total) or (first and step == 0)


def check_cadence(config) -> None:
    """Refuses, naming the key, a cadence the loop cannot mean. `log_every` < 1 used to turn off
    the metrics and the guard's rollbacks silently (and the host kept every step's metrics);
    `eval_every` / `ckpt_every` keep their documented 0 (never / only on SIGTERM), but a
    negative value meant the same silently. `keep_ckpts` (0 keeps every checkpoint) < 0 failed
    in orbax's save with a traceback naming no key. `total_steps=0` trained nothing and exited
    0, looking like a finished run (the optimizer allows 0: it is built for reading as well)."""
    keys = {"total_steps": 1, "log_every": 1, "eval_every": 0, "ckpt_every": 0,
            "guard.max_rollbacks": 0, "keep_ckpts": 0}  # fmt: skip
    for key, least in keys.items():
        value = config
        for part in key.split("."):
            value = value[part]
        if not (is_int(value) and value >= least):
            raise ValueError(f"config: {key}={value!r} must be an integer >= {least}")
    stopping.check_max_runtime(config.get(stopping.TIME_LIMIT, 0.0))


def _init_or_resume(config, task, ckpt, tx, mesh, rules):
    """(state, shardings, start step, resumed, changes): on a resume the config keys changed
    since the checkpoint, on a start from `init_from` the model keys that differ from the
    source's."""
    ema = dict(ema=ema_lib.settings(config)[0] > 0, trainable_mask=task.trainable_mask)
    shardings = state_shardings(task.init_params, tx, mesh, rules, **ema)
    if ckpt is not None and ckpt.latest_step() is not None:
        # The newest step that restores: an unreadable newer one is moved aside and logged
        # (ckpt_on_corrupt="fallback") or is an error ("fail"). Data state from the same step.
        target = abstract_state(task.init_params, tx, shardings)
        _refuse_another_optimizer(ckpt, config, tx, target, task.trainable_mask)
        # A checkpoint of another task or model config is refused, naming the keys.
        expect = {"task": task.name, **task.model_meta}
        latest, state, data_state, saved = ckpt.restore_latest(target, expect_meta=expect)
        # (a branch with branch_data="restart": its own data from the start, at the branch point)
        restart = branch.restarts_data(os.path.dirname(ckpt.directory), latest)
        if data_state and hasattr(task.train_batches, "set_state") and not restart:
            task.train_batches.set_state(data_state)
        log.info("resumed from %s/%d", ckpt.directory, latest)
        _report_code_change(saved, latest)
        changes = _report_config_changes(config, saved.get("config"), latest)
        return state, shardings, latest, True, changes
    from_ema = init_from_ema(config)  # a bad source fails before the init is compiled
    model_changes = _init_from_model_changes(config, task)  # (likewise)
    loaded = None
    if config.get("init_from"):
        # Read into the training shardings, then one jitted init builds the state around them
        # (`create_train_state(loaded=...)`: no random init of the weights they replace; the
        # optimizer state and the EMA start at the loaded weights).
        target = abstract_state(task.init_params, tx, shardings).params
        loader = task.load_init_params or ckpt_lib.load_params
        loaded = loader(config.init_from, target, **({"ema": True} if from_ema else {}))
    state, shardings = create_train_state(
        task.init_params,
        tx,
        mesh,
        rules,
        config.seed,
        **ema,
        loaded=loaded,
        transform=task.init_from_transform,
    )
    if loaded is not None:
        log.info("initialised params from %s%s", config.init_from, " (EMA)" if from_ema else "")
    return state, shardings, 0, False, model_changes


def run(config, workdir: str, task: Task, mesh=None) -> tuple[Any, dict]:
    """Trains `task` for `config.total_steps` steps in `workdir`. Returns (state, summary)."""
    check_cadence(config)  # before anything is built or compiled
    check_guard(config.guard)  # (every trainer's loop: pretraining and each alignment stage)
    branch.check(config)
    os.makedirs(workdir, exist_ok=True)
    # A branch's first start: the source's step put in place before the checkpointer looks.
    branched = branch.seed_workdir(config, workdir)
    mesh = mesh or make_mesh(dict(config.mesh))
    rules = logical_axis_rules(config.sharding)
    for axis in unused_mesh_axes(mesh, rules):
        log.warning("mesh.%s=%d but sharding=%r splits nothing over %r: those devices repeat "
                    "each other's work (--config.sharding=fsdp_tp splits the heads, MLP and "
                    "vocabulary over tensor; or give the devices to mesh.data / mesh.fsdp)",
                    axis, mesh.shape[axis], config.sharding, axis)  # fmt: skip
    total = int(config.total_steps)
    tx, schedule = make_optimizer(config.opt, total, task.trainable_mask)
    # An unknown ckpt_on_corrupt fails here, on every start, not first on a resume.
    ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_ckpts, async_save=config.async_ckpt,
                                 on_corrupt=config.get("ckpt_on_corrupt", "fallback"))  # fmt: skip
    meta = {"task": task.name, "config": config.to_dict(), **task.model_meta}
    if (origin := branch.record(workdir)) is not None:  # every checkpoint says where it began
        meta["branch"] = origin

    writer = None
    preempt = stopping.Preemption(config.get(stopping.TIME_LIMIT, 0.0))
    try:
        if jax.process_count() > 1:
            # Before the restore and compilation: jax.distributed.initialize installed jax's own
            # SIGTERM handler, which would swallow a notice arriving meanwhile (stopping.py).
            preempt.install()
        with use_mesh(mesh, rules):
            state, shardings, start, resumed, changes = _init_or_resume(config, task, ckpt, tx,
                                                                        mesh, rules)  # fmt: skip
            step_fn = jit_train_step(
                task.loss_fn,
                tx,
                schedule,
                config.guard,
                config.opt.grad_accum,
                shardings,
                mesh,
                task.trainable_mask,
                *ema_lib.settings(config),
                frozen=task.frozen is not None,
            )
            if task.frozen is not None:
                jitted = step_fn
                step_fn = lambda s, b: jitted(s, b, task.frozen)  # noqa: E731
            writer = MetricWriter(workdir, resume_step=start if resumed else None)
            if branched:
                src, data = branched["from"], branched["data"]
                writer.event("branched", f"started from {src}@{start} (its whole training "
                             f"state; data: {data})", step=start, source=src,
                             data=data)  # fmt: skip
            if changes and resumed:
                writer.event("config_changed", f"resumed from checkpoint {start} with "
                             f"{len(changes)} config key(s) changed", step=start,
                             changes={k: {"checkpoint": a, "run": b}
                                      for k, (a, b) in changes.items()})  # fmt: skip
            elif changes:  # a start from init_from: its model keys that differ
                writer.event("init_from_model_changed", f"started from init_from="
                             f"{config.init_from} with {len(changes)} model key(s) of its "
                             "config changed", step=0,
                             changes={f"model.{k}": {"init_from": a, "run": b}
                                      for k, (a, b) in changes.items()})  # fmt: skip
            if resumed and start >= total:
                why = (f"checkpoint {start} is at or past total_steps={total}: nothing to train "
                       "(raise total_steps to train on)")  # fmt: skip
                log.warning("%s", why)
                writer.event("nothing_to_train", why, step=start, total_steps=total)
            meter = Throughput(
                task.flops_per_token, task.flops_per_token_causal, config.get("peak_tflops", 0.0)
            )
            summary = _loop(config, task, state, step_fn, ckpt, writer, meter, start, total,
                            meta, shardings, tx, mesh, preempt, resumed)  # fmt: skip
    finally:
        preempt.uninstall()
        # Also when the loop raises (a data error, Ctrl-C): an async save still in flight is
        # finished, not left as a `<step>.orbax-checkpoint-tmp` that the exiting interpreter
        # abandons — the checkpoint a rerun resumes from.
        if writer is not None:
            writer.close()
        ckpt.close()
    return summary.pop("state"), summary


def _loop(config, task, state, step_fn, ckpt, writer, meter, start, total, meta, shardings, tx,
          mesh, preempt, resumed):  # fmt: skip
    kill_at = int(os.environ.get(KILL_ENV, "-1"))
    window: list = []
    limit = _RollbackLimit(config.guard.max_rollbacks)
    first_step = True  # it compiles (and follows the restore or init): not in the tokens/s
    # preempted: stopped early by SIGTERM or the time limit (`stop_reason`), a checkpoint saved
    summary: dict = {"train": {}, "eval": {}, "rollbacks": 0, "preempted": False,
                     "stop_reason": None, "data_exhausted": False}  # fmt: skip
    bar = tqdm(
        total=total,
        initial=start,
        desc=task.name,
        # One bar per job: every process ran one (a SLURM job's merged output got a copy per
        # task, their carriage returns garbling each other). Process 0 reports, as it writes.
        disable=not config.progress_bar or not writer.active,
        dynamic_ncols=True,
    )
    step = start
    trained = False  # a step trained since the start or resume (a rollback does not undo it)
    if not resumed and config.get("eval_at_start", False):  # a resume at 0 already logged it
        _maybe_eval(task, state, 0, writer, summary)
    save_due = False  # a periodic save waiting for the batch source's next boundary
    preempt.install()  # one process: from here on (several: since before the restore)
    sync = stopping.StopSync(task.train_batches, config.log_every, total)
    sync.agree(step, preempt)  # several processes: SIGTERM while compiling, data in hand
    while step < total:
        # SIGTERM or max_runtime_minutes (agreed by every process at sync steps): the same stop
        stop = sync.stop_reason(preempt)
        if stop and _at_boundary(task):
            if window:  # the steps since the last log line, as at the end of the data
                state, step, _ = _log_and_guard(config, window, meter, state, step, writer,
                                                summary, bar, limit, ckpt, task, tx,
                                                shardings)  # fmt: skip
                window = []
            # (After a rollback: the checkpoint it restored, already saved, so a no-op.)
            ckpt.save(step, state, _data_state(task), meta)
            ckpt.wait()
            summary["preempted"], summary["stop_reason"] = True, stop
            why = preempt.describe(stop)
            log.warning("%s: saved checkpoint at step %d and stopping", why, step)
            writer.event("preempted", f"{why}: checkpoint saved at step {step}", step=step,
                         stopped_by=stop)  # fmt: skip
            break
        if stop and not summary["preempted"]:
            summary["preempted"], summary["stop_reason"] = True, stop  # saved at the boundary
            log.warning("%s at step %d: finishing the rollout's minibatches first",
                        preempt.describe(stop), step)  # fmt: skip
        if sync.data_end is not None and step >= sync.data_end:
            _end_of_data(config, task, state, step, ckpt, writer, meter, meta, window, summary,
                         bar, sync, idle=resumed and not trained)  # fmt: skip
            break
        if step == kill_at:
            # Once the saves started earlier have landed: a test then knows which step the
            # rerun resumes from (on a busy machine an async save can outlast 5 steps).
            ckpt.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        if task.before_step is not None:
            _before_step(task, state, meter)
        try:
            batch = next(task.train_batches)
        except StopIteration:
            sync.ran_out(step)  # one process (several: the sources agree ahead, or an error)
            _end_of_data(config, task, state, step, ckpt, writer, meter, meta, window, summary,
                         bar, sync, idle=resumed and not trained)  # fmt: skip
            break
        meter.add(tokens_in_batch(batch))
        batch = shard_batch(batch, mesh)
        with jax.transfer_guard("disallow"):
            state, metrics = step_fn(state, batch)
        window.append(metrics)
        step += 1
        trained = True
        bar.update(1)
        if first_step:
            jax.block_until_ready(metrics)  # one host wait, once
            meter.skip("first_step_s")
            first_step = False

        rolled_back = False
        if itstime(step, config.log_every, total):
            state, step, rolled_back = _log_and_guard(config, window, meter, state, step, writer,
                                                      summary, bar, limit, ckpt, task, tx,
                                                      shardings)  # fmt: skip
            window = []
        if rolled_back:  # at the checkpoint's step, whose eval and save are done (and logged)
            if sync.multi:  # the steps until the next sync step are more now
                sync.agree(step, preempt)
            continue
        save_due |= itstime(step, config.ckpt_every, total)
        save_now = save_due and (_at_boundary(task) or step == total)
        if save_now and window:
            # Every checkpoint ends on a logged line: a resume or rollback to it trains from
            # the next step on, and the steps since the last log line used to be in no line.
            _log_window(window, meter, state, writer, summary, bar, step, cut_at_checkpoint=True)
            window = []
        if itstime(step, config.eval_every, total):
            if _maybe_eval(task, state, step, writer, summary):
                meter.skip()  # evaluating is no training time
        if save_now:
            ckpt.save(step, state, _data_state(task), meta)
            meter.skip()  # nor is copying the state out for the save
            save_due = False
        if sync.due(step):
            sync.agree(step, preempt)
    bar.close()
    ckpt.wait()
    summary["state"] = state
    summary["step"] = step
    return summary


def _end_of_data(config, task, state, step, ckpt, writer, meter, meta, window, summary, bar,
                 sync, idle: bool = False):  # fmt: skip
    """The batch source has ended (on some process): log the steps since the last log line,
    evaluate, save, and record why the run stopped before total_steps.

    The evaluation is the one the run makes at total_steps (`eval_every` > 0): a run stopped by
    its data used to end without a held-out loss at its last step, so a sweep's table had none
    for it. Skipped where the cadence evaluated this step already (and at step 0: nothing was
    trained); every process decides alike, from the step and the config.

    `idle`: a resumed run that trained no step before its data ended — a rerun of a run whose
    data had ended (each rerun used to append another eval line and data_end event at the same
    step), or a run stopped (SIGTERM, a kill) at its last batch before it got here. Nothing to
    train, said as a resume at total_steps says it; the evaluation is skipped when metrics.jsonl
    holds one at this step already (these very params: the checkpoint's), else made (the
    stopped run's was never logged)."""
    if window:
        _log_window(window, meter, state, writer, summary, bar, step)
        window.clear()
    if idle:
        log.warning("resumed from checkpoint %d, where the batch source had already ended: "
                    "nothing to train", step)  # fmt: skip
    due = config.eval_every > 0 and not itstime(step, config.eval_every, sync.total)
    if due and not (idle and _eval_logged(writer, step)):
        _maybe_eval(task, state, step, writer, summary)
    ckpt.save(step, state, _data_state(task), meta)
    ckpt.wait()
    summary["data_exhausted"] = True
    left = {"batches_left": sync.batches_left} if sync.batches_left else {}
    # Written on an idle rerun too: the resume event MetricWriter appended must not be the last
    # one, since a data_end last is how a sweep and its table tell a run that its data ended
    # (metrics.data_end_step) from one stopped short; its reason says nothing was trained.
    if idle:
        why = (f"resumed at checkpoint {step}, where the batch source had already ended: "
               f"nothing to train (total_steps {sync.total})")  # fmt: skip
    else:
        why = (f"the batch source ended after step {step} of total_steps {sync.total}: "
               "checkpoint saved there")  # fmt: skip
    writer.event("data_end", why, step=step, **left)


def _data_state(task) -> dict:
    get = getattr(task.train_batches, "get_state", None)
    return get() if get else {}


def _before_step(task, state, meter) -> None:
    """Runs the task's hook, at its batch source's boundaries outside the step time: PPO/GRPO
    make a rollout there (generation, scoring, their compiles), timed as `rollout/gen_s` and
    `rollout/score_s`; in step_time_s, tokens_per_s and mfu it made a rollout's steps look
    several times slower. Its seconds are logged as `before_step_s` (summed over the line's
    steps). The steps dispatched before it are waited for first, so their time stays in.
    Elsewhere the hook is expected to return at once (the rollout sources' does) and
    is not waited for: a wait every step would stall the dispatch of the next."""
    if not _at_boundary(task):
        task.before_step(state)
        return
    jax.block_until_ready(state.params)
    t0 = time.perf_counter()
    task.before_step(state)
    meter.exclude(time.perf_counter() - t0, "before_step_s")


def _at_boundary(task) -> bool:
    """Whether a checkpoint now resumes exactly: a batch source whose state cannot hold what it
    has buffered (PPO/GRPO: a rollout's unused minibatches) says so with `at_boundary()`."""
    at = getattr(task.train_batches, "at_boundary", None)
    return at() if at else True
