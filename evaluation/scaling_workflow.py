"""Predictable scaling, end to end: sweep → run table → fit → predict → train the bigger model →
compare → report.

    python -m flaxlm.evaluation.scaling_workflow --workdir runs/scaling [--parallel 2] [--gpus auto]

Steps (each resumable; re-running the command skips what is done):
  1. sweep: the runs of `configs/scaling.py`'s sweep() under ROOT/sweep (train/sweep.py);
  2. target: the config's `predict=True` variant (a model >= 4x larger in non-embedding
     parameters) trained in ROOT/target (and ROOT/target-seed<k> with --target_seeds);
  3. tasks: multiple-choice accuracy of every run on the built-in world's tasks (ROOT/world),
     written to RUN/tasks.json (evaluation/scaling_emergence.py);
  4. table: ROOT/runs.csv + runs.json (the sweep's runs, then the target);
  5. fit: `fit_report` on the sweep's runs only (N = non-embedding parameters, held-out loss),
     with the target's prediction against its actual loss; plots and scaling_report.json in
     ROOT/report, plus emergence.png and ROOT/report/report.md. As a cross-check, L(N) =
     E + A/N^alpha on the runs of the target's own token budget predicts it too. A run whose
     held-out loss is nan (diverged) stops the fit, naming it; --drop_nonfinite fits without
     such runs (named in the report's warnings; runs.csv keeps them).
Wall time, CPU time of the trainers and the machine's load average during each step go to
ROOT/timing.json (the machine may be shared; the report says how loaded it was).

ROOT/workflow.json records the settings the runs depend on (--config, --heldout_docs): a re-run
with others is refused, naming both, before anything trains (its runs would mix two studies). A
target directory trained with another config (target.json, or a DONE target short of the
config's total_steps) is refused the same way; the report's "Command:" is the full command line.

The records name no place: the config file of the checkout relative to the checkout's root
(configs/scaling.py; another file by its absolute path), the held-out file relative to ROOT
(`heldout=world/heldout_text.jsonl` in sweep/sweep.json and target.json). A study moved or
copied (trained on a cluster, reported at home), or re-run from another directory or checkout,
resumes; the trainers get both paths absolute. ROOT is a local folder (a bucket: mount it, e.g.
gcsfuse) without ',' in its path (the held-out file reaches the trainers in comma-separated lists).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import sys
import threading
import time
from collections.abc import Sequence

import numpy as np

from flaxlm.evaluation import scaling_emergence as emergence
from flaxlm.train import sweep as sweep_lib
from flaxlm.train import sweep_devices, sweep_table
from flaxlm.train.sweep_plan import (
    _check_same_runs,
    _same_config_arg,
    as_recorded,
    check_local_workdir,
    portable_config,
    resolve_config,
)

SETTINGS_FILE = "workflow.json"  # the settings ROOT's runs were trained with
# The checkout's scaling config, named as a study records it (relative to the checkout's root:
# sweep_plan.resolve_config finds it from any directory), so that a moved checkout's study, whose
# workflow.json names this, is the same study.
DEFAULT_CONFIG = os.path.join("configs", "scaling.py")
HELDOUT = os.path.join("world", "heldout_text.jsonl")  # the held-out documents, in ROOT


class Meter:
    """Wall time, children's CPU time and the 1-minute load average (sampled) of a step."""

    def __init__(self, every: float = 10.0):
        self.every, self.loads, self._stop = every, [], threading.Event()

    def __enter__(self):
        self.t0 = time.monotonic()
        self.cpu0 = self._cpu()
        self.loads.append(os.getloadavg()[0])
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.every):
            self.loads.append(os.getloadavg()[0])

    @staticmethod
    def _cpu() -> float:
        ch, me = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(0)
        return ch.ru_utime + ch.ru_stime + me.ru_utime + me.ru_stime

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.loads.append(os.getloadavg()[0])
        wall = time.monotonic() - self.t0
        self.result = {
            "wall_s": round(wall, 1),
            "cpu_s": round(self._cpu() - self.cpu0, 1),
            "cpus": os.cpu_count(),
            "load_mean": round(sum(self.loads) / len(self.loads), 2),
            "load_max": round(max(self.loads), 2),
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }


def _record(root: str, step: str, result: dict, **extra):
    """Appends one timing entry of `step` to ROOT/timing.json (every attempt is kept)."""
    path = os.path.join(root, "timing.json")
    timing = {}
    if os.path.exists(path):
        with open(path) as f:
            timing = json.load(f)
    timing.setdefault(step, []).append({**result, **extra})
    with open(path, "w") as f:
        json.dump(timing, f, indent=1)


def check_settings(root: str, config: str, heldout_docs: int) -> None:
    """Refuses a workflow re-run in `root` with another --config or --heldout_docs than its runs
    were started with (ROOT/workflow.json, `write_settings`; a workdir from before that file:
    its sweep.json's config arg), naming both. The run names of two configs can
    differ entirely (another sweep), so the sweep's own check of each run would never fire, and
    the old runs would be skipped as finished, or fitted beside the new ones."""
    path = os.path.join(root, SETTINGS_FILE)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        same = _same_config_arg(old.get("config"), config)  # (each file resolved)
        if not same or old.get("heldout_docs") != heldout_docs:
            raise ValueError(
                f"{root} holds a study run with --config {old.get('config')} --heldout_docs "
                f"{old.get('heldout_docs')}; now: --config {config} --heldout_docs "
                f"{heldout_docs}. Re-run with the first settings, or use another --workdir"
            )
        return
    index = os.path.join(root, "sweep", "sweep.json")
    if os.path.exists(index):  # started before workflow.json was written
        with open(index) as f:
            old_arg = json.load(f).get("config")
        new_arg = study_config(config, heldout_docs)
        trainers = effective_config(root, config, heldout_docs)  # as recorded before relative
        if not _same_config_arg(as_recorded({"config": old_arg}, trainers, new_arg)["config"],
                                new_arg):  # fmt: skip
            raise ValueError(
                f"{root}/sweep was trained with --config {old_arg}; these settings give "
                f"--config {new_arg}. Re-run with the first settings, or use another --workdir"
            )


def write_settings(root: str, config: str, heldout_docs: int) -> None:
    """ROOT/workflow.json: the settings `check_settings` holds later runs to (the config file
    as `portable_config` names it: the same wherever the checkout lies)."""
    os.makedirs(root, exist_ok=True)
    config = portable_config(resolve_config(config))
    with open(os.path.join(root, SETTINGS_FILE), "w") as f:
        json.dump({"config": config, "heldout_docs": heldout_docs}, f, indent=1)


def check_workdir(root: str, heldout_docs: int) -> None:
    """Refuses a ROOT the trainers could not be given: a URL (`check_local_workdir`), or, with
    held-out documents, a path with a ',': the held-out file reaches the trainers inside the
    config arg's `k=v,k=v` and then `data.eval_sources`, both lists split at commas."""
    check_local_workdir(root)
    if heldout_docs and "," in os.path.abspath(root):
        raise ValueError(
            f"--workdir {root}: a ',' in its path cannot reach the trainers (they get "
            f"ROOT/{HELDOUT} in comma-separated lists: the config arg, data.eval_sources); use "
            "a --workdir without ',', or --heldout_docs 0 (the config's own held-out set)"
        )


def study_config(config: str, heldout_docs: int) -> str:
    """The config arg the study records (sweep/sweep.json; with predict=True, target.json) and
    holds re-runs to: the config file as `portable_config` names it and the held-out file
    relative to ROOT, so the records stay true wherever ROOT and the checkout are moved."""
    recorded = portable_config(resolve_config(config))
    return with_arg(recorded, f"heldout={HELDOUT}") if heldout_docs else recorded


def effective_config(root: str, config: str, heldout_docs: int) -> str:
    """The config arg the runs are trained with: --config plus the world's held-out file, both
    absolute (`study_config` resolved), as the trainers need them from their directory."""
    config = resolve_config(config)
    if not heldout_docs:
        return config
    return with_arg(config, f"heldout={os.path.join(os.path.abspath(root), HELDOUT)}")


def _train(root: str, step: str, config_arg: str, runs, parallel: int, gpus=()) -> dict:
    """Trains the unfinished `runs` (sweep_lib.run_local) under a Meter; records the timing.
    `gpus`: (ids, per run) to split between the trainers (train/sweep_devices.py), or ()."""
    todo = [r for r in runs if not sweep_lib.is_done(r)]
    if not todo:
        print(f"[workflow] {step}: all {len(runs)} runs finished; skipping", flush=True)
        return {"skipped": True}
    cache = os.path.join(root, ".jax_cache")
    with Meter() as m:
        ids, per_run = gpus or ((), 1)
        status = sweep_lib.run_local(config_arg, runs, parallel=parallel, cache_dir=cache,
                                     gpus=ids, gpus_per_run=per_run)  # fmt: skip
    _record(root, step, m.result, trained=len(todo), of=len(runs))
    failed = [n for n, s in status.items() if s in ("failed", "busy", "blocked")]
    if failed:
        raise RuntimeError(f"{step}: runs failed: {failed}; see their train.log")
    print(f"[workflow] {step}: {m.result}", flush=True)
    return m.result


def plan_sweep(root: str, config: str, heldout_docs: int = 0) -> tuple[str, list]:
    """(the trainers' config arg, runs) of the sweep in ROOT/sweep, its index written with
    `study_config` (write_index refuses a started run of other settings, naming it)."""
    sweep_root = os.path.join(root, "sweep")
    trainers = effective_config(root, config, heldout_docs)
    runs = sweep_lib.plan(trainers, sweep_root)
    recorded = study_config(config, heldout_docs)
    sweep_lib.write_index(sweep_root, trainers, runs, [], recorded=recorded)
    return trainers, runs


def run_sweep(root: str, config: str, parallel: int, gpus=(), heldout_docs: int = 0) -> list:
    trainers, runs = plan_sweep(root, config, heldout_docs)
    _train(root, "sweep", trainers, runs, parallel, gpus)
    return runs


def with_arg(config: str, item: str) -> str:
    """ "file.py" + "k=v" -> "file.py:k=v"; "file.py:a=1" -> "file.py:a=1,k=v"."""
    return f"{config},{item}" if ":" in config else f"{config}:{item}"


def target_runs(root: str, config: str, seeds: int = 1,
                heldout_docs: int = 0) -> tuple[str, str, list[sweep_lib.Run]]:  # fmt: skip
    """(the trainers' config arg, the one target.json records, runs) of the bigger model: the
    config's predict=True variant in ROOT/target, and with seeds > 1 again in
    ROOT/target-seed<k> (`--config.seed=k`). A target directory started with another config arg
    (ROOT/target.json), or finished (DONE) short of this config's total_steps, is refused: it
    used to be skipped as finished, and then never counted as finished by `target_row`."""
    config_arg = with_arg(effective_config(root, config, heldout_docs), "predict=True")
    recorded = with_arg(study_config(config, heldout_docs), "predict=True")
    module, arg = sweep_lib.load_config_module(config_arg)
    info = sweep_lib.run_info(module.get_config(arg))
    runs = []
    for k in range(seeds):
        name, ov = ("target", {}) if k == 0 else (f"target-seed{k}", {"seed": k})
        runs.append(sweep_lib.Run(k, name, ov, os.path.join(root, name), info["total_steps"], info))
    path = os.path.join(root, "target.json")
    if os.path.exists(path):
        with open(path) as f:
            _check_same_runs(as_recorded(json.load(f), config_arg, recorded), recorded, runs)
    for run in runs:
        finished = sweep_table.final_metrics(run.workdir, run.total_steps) is not None
        if sweep_lib.is_done(run) and not finished:
            last = sweep_table.final_metrics(run.workdir)
            raise ValueError(
                f"{run.workdir} is finished (DONE) at step {last['step'] if last else None}, but "
                f"the target of --config {config_arg} trains {run.total_steps} steps: it was "
                "trained with other settings. Use another --workdir, or delete that directory "
                "to train the target again"
            )
    return config_arg, recorded, runs


def plan_target(root: str, config: str, seeds: int = 1,
                heldout_docs: int = 0) -> tuple[str, list[sweep_lib.Run]]:  # fmt: skip
    """(the trainers' config arg, runs) of `target_runs`, recorded in ROOT/target.json."""
    config_arg, recorded, runs = target_runs(root, config, seeds, heldout_docs)
    with open(os.path.join(root, "target.json"), "w") as f:
        json.dump({"config": recorded, "runs": [r.to_dict() for r in runs]}, f, indent=1)
    return config_arg, runs


def run_target(root: str, config: str, seeds: int = 1, gpus=(),
               heldout_docs: int = 0) -> list[sweep_lib.Run]:  # fmt: skip
    """Trains the bigger model (`target_runs`), so its actual loss is a mean over seeds."""
    config_arg, runs = plan_target(root, config, seeds, heldout_docs)
    _train(root, "target", config_arg, runs, parallel=1, gpus=gpus)
    return runs


def evaluate_tasks(root: str, run_dirs: Sequence[str], tasks: Sequence[str]) -> None:
    """Task scores of every run (RUN/tasks.json). Each run goes to `emergence.evaluate_run`,
    whose cache knows which tasks and checkpoint it holds: a run with a tasks.json used to be
    skipped, so tasks asked for later were never evaluated."""
    world = os.path.join(root, "world")
    evaluated = 0
    with Meter() as m:
        for d in run_dirs:
            path = os.path.join(d, sweep_table.TASKS_FILE)
            before = os.stat(path).st_mtime_ns if os.path.exists(path) else None
            scores = emergence.evaluate_run(d, world, tasks)
            if not os.path.exists(path) or os.stat(path).st_mtime_ns != before:
                evaluated += 1
                accs = {t: round(v["acc"], 3) for t, v in scores.items() if t in tasks}
                print(f"[workflow] tasks {os.path.basename(d)}: {accs}", flush=True)
    if evaluated:
        _record(root, "tasks", m.result, evaluated=evaluated)


def target_row(runs: Sequence[sweep_lib.Run]) -> dict:
    """The target's row: losses averaged over its seeds (each listed), tasks of the first."""
    finals = []
    for run in runs:
        final = sweep_table.final_metrics(run.workdir, run.total_steps)
        if final is None:
            raise RuntimeError(f"{run.workdir}: the target run has not finished")
        finals.append(final)
    row = {"index": -1, "name": "target", "overrides": {"predict": True}}
    row.update(sweep_table.trained_sizes(runs[0].info, finals[0]))
    row.update(finals[0])
    for key in ("final_loss", "heldout_loss"):
        row[f"{key}_seeds"] = [f[key] for f in finals]
        row[key] = float(np.mean(row[f"{key}_seeds"]))
    row.update(sweep_table.task_metrics(runs[0].workdir))
    return row


def slopes_by_budget(rows: Sequence[dict], n_key: str = "n_params_nonembed") -> list[dict]:
    """Per token budget: the losses by size, the gap between the smallest and the largest size,
    and the log-log slope d ln L / d ln N (a pure power law through all sizes). The additive law
    E + A/N^a + B/D^b keeps the gap the same at every budget; a law L = f(N) g(D) keeps the
    slope instead, so the two columns show which the sweep is closer to."""
    out = []
    for d in sorted({r["tokens"] for r in rows}):
        same = sorted((r[n_key], r["heldout_loss"]) for r in rows if r["tokens"] == d)
        n, loss = (np.array(v, dtype=np.float64) for v in zip(*same))
        slope = float(np.polyfit(np.log(n), np.log(loss), 1)[0]) if n.size >= 2 else None
        gap = float(loss[0] - loss[-1]) if n.size >= 2 else None
        out.append(
            {"tokens": d, "N": n.tolist(), "loss": loss.tolist(), "gap": gap, "slope": slope}
        )
    return out


def fixed_budget_prediction(rows, target, n_key: str = "n_params_nonembed") -> dict:
    """L(N) = E + A / N^alpha fitted on the runs trained on the target's own token budget (the
    slice of the sweep the target belongs to), evaluated at the target's N."""
    from flaxlm.evaluation.scaling import fit_power_law, predict_power_law

    same = [r for r in rows if r["tokens"] == target["tokens"]]
    if len({r[n_key] for r in same}) < 4:
        return {"skipped": f"{len(same)} runs at the target's budget; need >= 4 sizes"}
    n = np.array([r[n_key] for r in same], dtype=np.float64)
    loss = np.array([r["heldout_loss"] for r in same], dtype=np.float64)
    law = fit_power_law(n, loss)
    pred = float(predict_power_law(law, float(target[n_key])))
    out = {"tokens": target["tokens"], "N": float(target[n_key]), "fit": law,
           "fitted_N": n.tolist(), "fitted_loss": loss.tolist(), "predicted": pred}  # fmt: skip
    if target.get("heldout_loss") is not None:
        actual = float(target["heldout_loss"])
        out.update(actual=actual, rel_error=pred / actual - 1.0)
    return out


FIT_COLUMNS = ("n_params_nonembed", "tokens", "heldout_loss")  # what `fit` reads of each run


def fitted_rows(rows: list, drop_nonfinite: bool) -> tuple[list, list[str]]:
    """(rows to fit, names of the runs left out). A run whose held-out loss is nan or inf
    (diverged) is fit_report's ValueError naming it; with `drop_nonfinite` it is left out,
    with a warning naming it."""
    if not drop_nonfinite:
        return rows, []
    from flaxlm.evaluation.scaling_report import finite_rows

    kept = finite_rows(rows, FIT_COLUMNS)
    return kept, [r["name"] for r in rows if not any(r is k for k in kept)]


def fit(root: str, rows: list, target: dict | None, tasks: Sequence[str], n_boot: int,
        dropped: Sequence[str] = ()) -> dict:  # fmt: skip
    """The fit step on `rows`; `dropped`: runs `fitted_rows` left out (the report warns)."""
    from flaxlm.evaluation.scaling_report import fit_report
    from flaxlm.evaluation.scaling_workflow_report import plot_fixed_budget

    out_dir = os.path.join(root, "report")
    with Meter() as m:
        report = fit_report(rows, out_dir, target=target, n_boot=n_boot)
    _record(root, "fit", m.result)
    if dropped:
        report["dropped_runs"] = list(dropped)
        report["warnings"].append(
            f"{len(dropped)} run(s) with a non-finite held-out loss left out of the fit "
            f"(--drop_nonfinite): {', '.join(dropped)}"
        )
    report["slopes_by_budget"] = slopes_by_budget(rows)
    if target is not None:
        fixed = fixed_budget_prediction(rows, target)
        report["prediction_fixed_budget"] = fixed
        if "predicted" in fixed:
            path = os.path.join(out_dir, "fixed_budget.png")
            report["plots"]["fixed_budget"] = plot_fixed_budget(rows, fixed, path)
    chance = {t: emergence.chance_level(os.path.join(root, "world"), t) for t in tasks}
    if any(f"task/{t}/acc" in r for r in rows for t in tasks):
        report["plots"]["emergence"] = emergence.plot_emergence(
            rows, os.path.join(out_dir, "emergence.png"), tasks=tasks, target=target, chance=chance
        )
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m flaxlm.evaluation.scaling_workflow",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--workdir", required=True, help="root of the whole study")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="config with sweep() and predict=")
    p.add_argument(
        "--parallel", type=int, default=2, help="sweep trainers at once (one thread each)"
    )
    p.add_argument("--gpus", default="",
                   help="GPUs to split between the trainers ('auto' or '0,1,...'; "
                   "train.sweep's --gpus)")  # fmt: skip
    p.add_argument("--gpus_per_run", type=int, default=1, help="with --gpus: GPUs per run")
    p.add_argument("--tasks", default=",".join(emergence.DEFAULT_TASKS),
                   help="multiple-choice tasks of the built-in world ('' = none)")  # fmt: skip
    p.add_argument("--n_boot", type=int, default=200, help="bootstrap resamples of the fit")
    p.add_argument("--heldout_docs", type=int, default=1000,
                   help="held-out documents for the loss (config arg heldout=; 0 = the "
                   "config's own eval set)")  # fmt: skip
    p.add_argument("--no_target", action="store_true", help="fit only; do not train the target")
    p.add_argument("--target_seeds", type=int, default=2,
                   help="seeds of the target; its actual loss is their mean")  # fmt: skip
    p.add_argument("--drop_nonfinite", action="store_true",
                   help="fit without the sweep's runs whose held-out loss is nan/inf (diverged), "
                   "naming each; default: such a run stops the fit, naming it")  # fmt: skip
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    root, heldout, seeds = args.workdir, args.heldout_docs, max(1, args.target_seeds)
    tasks = [t for t in args.tasks.split(",") if t.strip()]
    try:  # before anything is written or trained
        check_workdir(root, heldout)
        check_settings(root, args.config, heldout)
        if not args.no_target:
            target_runs(root, args.config, seeds, heldout)
        gpus = sweep_devices.visible_gpus(args.gpus)
        if gpus:
            sweep_devices.GPUSlots(gpus, args.gpus_per_run)  # a bad split, refused up front
    except (KeyError, ValueError, FileNotFoundError) as e:
        p.error(_message(e))
    write_settings(root, args.config, heldout)
    emergence.ensure_world(os.path.join(root, "world"), heldout)

    split = (gpus, args.gpus_per_run) if gpus else ()
    try:  # the sweep's index: a run started with other settings is named, before any training
        trainers, runs = plan_sweep(root, args.config, heldout)
        target_arg, targets = ("", []) if args.no_target else plan_target(
            root, args.config, seeds, heldout)  # fmt: skip
    except (KeyError, ValueError, FileNotFoundError) as e:
        p.error(_message(e))
    _train(root, "sweep", trainers, runs, args.parallel, split)
    if targets:
        _train(root, "target", target_arg, targets, parallel=1, gpus=split)
    if tasks:
        evaluate_tasks(root, [r.workdir for r in runs + targets[:1]], tasks)
    rows = sweep_table.collect(os.path.join(root, "sweep"))
    t_row = target_row(targets) if targets else None
    sweep_table.write_table(rows + ([t_row] if t_row else []), root)
    rows, dropped = fitted_rows(rows, args.drop_nonfinite)  # runs.csv above keeps them all
    try:
        report = fit(root, rows, t_row, tasks, args.n_boot, dropped)
    except ValueError as e:  # a diverged run, too few sizes: the message names it
        raise SystemExit(f"[workflow] fit: {e}") from None
    from flaxlm.evaluation.scaling_workflow_report import write_markdown

    # Every argument as given: re-running this line resumes this study (not another one).
    command = shlex.join(["python", "-m", "flaxlm.evaluation.scaling_workflow", *argv])
    config = study_config(args.config, heldout)  # the report names no place either
    md = write_markdown(root, report, rows, t_row, tasks, config, command)
    print(f"[workflow] report: {md}", flush=True)
    with open(os.path.join(root, "report", "workflow_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    pred = report.get("prediction")
    if pred and "actual" in pred:
        # No interval without a bootstrap (--n_boot 0): not "[nan, nan]"
        iv = f" [{pred['lo']:.4f}, {pred['hi']:.4f}]" if "lo" in pred and "hi" in pred else ""
        print(f"[workflow] target N={pred['N']:.4g} D={pred['D']:.4g}: predicted "
              f"{pred['predicted']:.4f}{iv}, actual {pred['actual']:.4f}, "
              f"error {100 * pred['rel_error']:+.2f}%", flush=True)  # fmt: skip
    fixed = report.get("prediction_fixed_budget", {})
    if "actual" in fixed:
        err = 100 * fixed["rel_error"]
        print(f"[workflow] fixed-budget L(N): predicted {fixed['predicted']:.4f}, actual "
              f"{fixed['actual']:.4f}, error {err:+.2f}%", flush=True)  # fmt: skip
    return report


def _message(e: Exception) -> str:
    """The message of a bad-input error (a KeyError's str() is its repr, quotes and all)."""
    return e.args[0] if isinstance(e, KeyError) and e.args else str(e)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:
        print(f"[workflow] {e or 'interrupted'}; re-run the same command to resume", flush=True)
        sys.exit(130)
