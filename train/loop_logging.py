"""The loop's log lines and evaluations: one device fetch per log window (`_log_window`,
averaged by `_summarise` over the steps whose update the guard accepted), the evaluation of
the params and of the EMA weights (`_maybe_eval`), and whether metrics.jsonl already holds a
step's evaluation (`_eval_logged`).
"""

from __future__ import annotations

import logging
import time

import jax
import numpy as np

from flaxlm.models.sharding import any_process
from flaxlm.train import ema as ema_lib
from flaxlm.train.metrics import peak_memory_gb, read_metrics
from flaxlm.train.state import EmaTrainState

log = logging.getLogger("flaxlm")


_LAST = ("bad_in_row", "lr", "ema_decay")  # the state at the window's end: the last step's
_ALL_STEPS = "rollout/"  # the RL tasks' rollout statistics (alignment/rl_rollout.py)


def _mean(steps: list[dict], key: str, keys: list) -> float | None:
    """`key` averaged over `steps` (those that have it); weighted by its count `key_n` when
    there is one, and None when those counts are all 0 (a 0 there is no measurement)."""
    steps = [m for m in steps if key in m]
    if not steps:
        return None
    vals = np.asarray([float(np.asarray(m[key])) for m in steps])
    if key + "_n" not in keys:
        return float(vals.mean())
    n = np.asarray([float(np.asarray(m.get(key + "_n", 0.0))) for m in steps])
    return float((vals * n).sum() / n.sum()) if n.sum() > 0 else None


def _summarise(window: list[dict]) -> dict:
    """Averages a window of per-step metric dicts fetched from the device. Each key over the
    steps that have it (the keys of a step can differ from its neighbours': a KeyError at the
    log step once did). A key `K` next to a count `K_n` (GRPO's rollout/accuracy and
    rollout/accuracy_n: the accuracy over that many samples) is averaged weighted by the
    count, and left out when the counts are all 0: a 0 there is no measurement.

    A step the guard skipped (`skipped` 1: a NaN/Inf loss, gradient or update, or a loss spike)
    is left out of the averages of the loss, the gradient norm and the other metrics of the
    step: its update was discarded, and one NaN step made the whole line NaN (and a sweep's
    final loss, so the scaling report took the run for diverged), a skipped spike inflated
    it. Its loss and gradient norm are logged apart, `skipped_loss` and `skipped_grad_norm` (the
    means over the window's skipped steps, present when there is one), and `skipped` counts
    them. A window whose steps were all
    skipped averages them all, so a NaN stays in sight. Averaged over every step regardless:
    the rollout statistics `rollout/...` (of the samples drawn before the step, whatever became
    of its update); `lr`, `bad_in_row` and `ema_decay` are the last step's."""
    out = {}
    keys = list(dict.fromkeys(k for m in window for k in m))  # (first-seen order)
    # (a step without the key, a task that logs none, counts as accepted)
    bad = [bool(float(np.asarray(m.get("skipped", 0.0)))) for m in window]
    accepted = [m for m, b in zip(window, bad) if not b] or window
    for key in keys:
        if key == "skipped":
            out[key] = float(sum(bad))
        elif key in _LAST:
            out[key] = float(np.asarray([m for m in window if key in m][-1][key]))
        else:
            # (a key only skipped steps have is still their average: kept, not dropped)
            every = key.startswith(_ALL_STEPS) or not any(key in m for m in accepted)
            mean = _mean(window if every else accepted, key, keys)
            if mean is not None:
                out[key] = mean
    skipped = [m for m, b in zip(window, bad) if b]
    for key in ("loss", "grad_norm"):  # what the guard's stop message reads (loop_guard.py)
        if skipped and key in keys:
            out[f"skipped_{key}"] = _mean(skipped, key, keys)
    return out


def _maybe_eval(task, state, step, writer, summary) -> bool:
    """Runs and logs the evaluation (when the task has one); returns whether it ran."""
    if task.eval_fn is None:
        return False
    t0 = time.perf_counter()
    ev = {f"eval/{k}": v for k, v in task.eval_fn(state.params).items()}
    ev["eval/time_s"] = time.perf_counter() - t0
    if isinstance(state, EmaTrainState):  # the same evaluation of the EMA weights
        t0 = time.perf_counter()
        ema_params = ema_lib.swap_in(state.params, state.ema)
        ev.update({f"eval_ema/{k}": v for k, v in task.eval_fn(ema_params).items()})
        ev["eval_ema/time_s"] = time.perf_counter() - t0
    writer.write(step, ev)
    summary["eval"] = ev
    if writer.active:  # once per job (process 0, the one writing metrics.jsonl)
        log.info("step %d eval %s", step, {k: round(float(v), 4) for k, v in ev.items()})
    return True


def _log_window(window, meter, state, writer, summary, bar, step,
                cut_at_checkpoint: bool = False) -> dict:  # fmt: skip
    """Writes the metrics of the steps since the last log line (one device fetch).
    `cut_at_checkpoint`: a line before its log step, at a checkpoint saved there (marked
    `"cut_at_checkpoint": true`; the next line averages the steps after it)."""
    window, n_skipped = jax.device_get((window, state.guard["n_skipped"]))
    rec = _summarise(window)
    if cut_at_checkpoint:
        rec["cut_at_checkpoint"] = True
    rec.update(meter.measure())
    rec["n_skipped"] = int(n_skipped)
    mem = peak_memory_gb()
    if mem is not None:
        rec["peak_mem_gb"] = mem
    writer.write(step, rec)
    summary["train"] = rec
    bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
    return rec


def _eval_logged(writer, step: int) -> bool:
    """Whether metrics.jsonl holds an evaluation line at `step` (read on process 0, the one
    that writes it; agreed by every process, as each must make the same jitted calls)."""
    logged = False
    if writer.active:
        try:
            records = read_metrics(writer.workdir)
        except OSError:
            records = []  # (none to read: evaluate)
        logged = any(isinstance(r, dict) and r.get("step") == step
                     and any(k.startswith("eval/") for k in r) for r in records)  # fmt: skip
    return any_process(logged)
