"""The run table of a sweep: one row per finished run, its sizes and its final metrics.

    rows = collect("runs/sw")            # reads runs/sw/sweep.json and every run's metrics.jsonl
    write_table(rows, "runs/sw")         # runs/sw/runs.csv and runs/sw/runs.json

    python -m flaxlm.train.sweep_table runs/sw [--csv OUT.csv]   # the same, and prints the CSV

Columns (the names evaluation/scaling_report.py reads): `name`, `index`, `overrides` (JSON in the
CSV), `n_params` (total), `n_params_nonembed` (total minus the input embedding; with tied
embeddings the LM head is that table, so it is excluded too), `n_params_embed`, `tokens`
(D = steps x batch x seq_len), `c_6nd` (6 N_nonembed D), `flops` (exact training FLOPs,
flops_per_token x D, DESIGN.md count), `final_loss` (train loss of the last logged window),
`heldout_loss` (`eval/nll` at the last step), every other `eval/<metric>` logged at that step,
and `task/<task>/<metric>` from the run's `tasks.json` when an evaluation wrote one. A run whose
finite data ended before `total_steps` has `data_end` true, and its `tokens`, `c_6nd`, `flops`
and `flops_causal` are those of the steps it trained (`step`), not of the plan's `total_steps`
(`planned_tokens` keeps the plan's). A planned run without a row (failed, unfinished, not
started, or finished with a metrics.jsonl missing or malformed) is named with why
(`collect_all`; `collect` warns), as is a tasks.json that is malformed; the other runs' rows are
kept.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import warnings
from collections.abc import Sequence

from flaxlm.train.code_version import mixed_commits
from flaxlm.train.metrics import data_end_step, read_metrics
from flaxlm.train.sweep_plan import read_index

TASKS_FILE = "tasks.json"  # {task: {metric: value}} written by the evaluation of a run
_FIRST = ("index", "name", "overrides", "step", "total_steps", "n_params", "n_params_nonembed",
          "n_params_embed", "tokens", "c_6nd", "flops", "final_loss", "heldout_loss",
          "data_end")  # fmt: skip


def final_metrics(run_dir: str, total_steps: int | None = None) -> dict | None:
    """`step`, `final_loss`, `heldout_loss` and eval/* at the last step of a run; None when the
    run has not reached `total_steps` (unless its finite data ended it there: `data_end`) or
    logged nothing. Records that are not objects with a
    `step` (a file that is not a metrics log) are an error naming the file."""
    try:
        records = read_metrics(run_dir)
    except FileNotFoundError:
        return None
    bad = [r for r in records if not isinstance(r, dict) or not isinstance(r.get("step"), int)]
    if bad:
        path = os.path.join(run_dir, "metrics.jsonl") if os.path.isdir(run_dir) else run_dir
        raise ValueError(f"{path}: {len(bad)} records without an integer 'step': {bad[0]!r:.80}")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/nll" in r or "eval/loss" in r]
    if not train:
        return None
    last = max(r["step"] for r in records)
    data_end = data_end_step(run_dir) if os.path.isdir(run_dir) else None
    if total_steps is not None and last < total_steps and data_end != last:
        return None
    out = {"step": last, "final_loss": train[-1]["loss"]}
    if data_end == last and (total_steps is None or last < total_steps):
        out["data_end"] = True  # finite data stopped it before total_steps
    if evals and evals[-1]["step"] == last:
        ev = evals[-1]
        out["heldout_loss"] = ev.get("eval/nll", ev.get("eval/loss"))
        out.update({k: v for k, v in ev.items() if k.startswith("eval/") and k != "eval/time_s"})
    return out


_SCALED = ("tokens", "c_6nd", "flops", "flops_causal")  # grow with the steps trained


def trained_sizes(info: dict, final: dict | None) -> dict:
    """The planned sizes `info` (sweep_plan.run_info) of a run, with its token count and compute
    scaled to the steps it trained when its data ended first (`final["data_end"]`): a fit that
    took D from the plan put a run of 5 steps at its 16 steps' tokens."""
    out = dict(info)
    planned = info.get("total_steps")
    if not (final and final.get("data_end") and planned):
        return out
    step = int(final["step"])
    for key in _SCALED:
        if key in out:
            out[key] = out[key] * step // planned if key == "tokens" else out[key] * step / planned
    if "tokens" in info:
        out["planned_tokens"] = info["tokens"]
    return out


def task_metrics(run_dir: str) -> dict:
    """Flattened `task/<task>/<metric>` numbers from the run's tasks.json (if any)."""
    path = os.path.join(run_dir, TASKS_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            tasks = json.load(f)
        if not isinstance(tasks, dict) or not all(isinstance(m, dict) for m in tasks.values()):
            raise ValueError("expected {task: {metric: value}}")
    except ValueError as e:  # JSONDecodeError included: say which file, keep the other columns
        warnings.warn(f"{path}: unreadable, its task/* columns are left out ({e})", stacklevel=2)
        return {}
    out = {}
    for task, metrics in tasks.items():
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n":
                out[f"task/{task}/{k}"] = v
    return out


def collect(root: str, *, include_unfinished: bool = False) -> list[dict]:
    """Rows of the sweep under `root` (from its sweep.json), finished runs only by default;
    one warning names every planned run left without a row, and why (`collect_all`)."""
    rows, missing = collect_all(root, include_unfinished=include_unfinished)
    if missing:
        warnings.warn(_missing_message(root, missing, len(rows) + len(missing)), stacklevel=2)
    if mixed := code_warning(rows):
        warnings.warn(f"{root}: {mixed}", stacklevel=2)
    return rows


def collect_all(root: str, *, include_unfinished: bool = False) -> tuple[list[dict], list[dict]]:
    """(rows, missing): the rows of the sweep under `root` (finished runs only by default), and
    each planned run of its sweep.json without a row: {index, name, status, why}, status one of
    "failed" (the sweep recorded its exit code; `why` has the last line of its train.log),
    "running", "unfinished" (its last logged step short of total_steps: interrupted, cut short,
    or run by a launch file), "not started", "unreadable" (a finished run (DONE) whose metrics
    are missing, cut short or malformed: one bad run does not cost the table the others).

    Each run is read from ROOT/<name>, where the sweep puts it (sweep_plan.plan), never from
    the `workdir` sweep.json recorded: that is where the run was started, and after the sweep
    folder was copied or moved (off a cluster, aside for a new study in its place) that path
    holds another sweep's run, or nothing."""
    path = os.path.join(root, "sweep.json")
    if not os.path.exists(path):
        hint = ""
        if os.path.exists(os.path.join(root, "sweep", "sweep.json")):  # a scaling_workflow root
            hint = f"; for a scaling_workflow root pass {os.path.join(root, 'sweep')}"
        raise FileNotFoundError(f"{root}: not a sweep folder (no sweep.json){hint}")
    index = read_index(path)
    rows, missing = [], []
    for run in index["runs"]:
        workdir = os.path.join(root, run["name"])
        metrics = os.path.join(workdir, "metrics.jsonl")
        gone = {"index": run.get("index"), "name": run["name"]}
        try:
            final = final_metrics(workdir, run.get("total_steps"))
        except ValueError as e:
            missing.append({**gone, "status": "unreadable", "why": f"left out: {e}"})
            continue
        if final is None and os.path.exists(os.path.join(workdir, "DONE")):
            steps = run.get("total_steps")
            why = "is missing" if not os.path.exists(metrics) else f"has no loss at step {steps}"
            why = f"is DONE but {metrics} {why}"
            if not include_unfinished:
                missing.append({**gone, "status": "unreadable", "why": why})
                continue
            warnings.warn(f"run {run['name']} {why}", stacklevel=2)
        if final is not None and _stopped_after_last_step(workdir) and not include_unfinished:
            # its last step logged, then killed or failed (in the final evaluation, or saving
            # the final checkpoint): the row would lack what that stage writes (heldout_loss)
            missing.append({**gone, **_why_unfinished(workdir, run.get("total_steps"))})
            continue
        if final is None and not include_unfinished:
            missing.append({**gone, **_why_unfinished(workdir, run.get("total_steps"))})
            continue
        row = {"index": run["index"], "name": run["name"], "overrides": run["overrides"]}
        row.update(trained_sizes(run.get("info", {}), final))
        row.update(final or {"step": None})
        row.update(task_metrics(workdir))
        row.update(_done_commit(workdir))
        rows.append(row)
    return rows, missing


def _done_commit(workdir: str) -> dict:
    """{"flaxlm_commit": ...} from the run's DONE marker (the code that finished it, since
    2026-12-06), else {}."""
    try:
        with open(os.path.join(workdir, "DONE")) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return {}
    commit = done.get("flaxlm_commit") if isinstance(done, dict) else None
    return {"flaxlm_commit": commit} if isinstance(commit, str) else {}


def code_warning(rows: Sequence[dict]) -> str | None:
    """`code_version.mixed_commits` over the rows' ``flaxlm_commit``."""
    labelled = {str(r.get("name", i)): r.get("flaxlm_commit") for i, r in enumerate(rows)}
    return mixed_commits(labelled)


def _stopped_after_last_step(workdir: str) -> bool:
    """Whether the sweep recorded a run as failed, or it is still running, although its metrics
    reach the last step: no `DONE` marker, and a `FAILED` record or a live trainer. (A run that
    a launch file ran has neither marker: its metrics are all there is to go by.)"""
    from flaxlm.train.sweep import FAILED_FILE, _running_pid  # (sweep imports this module)

    if os.path.exists(os.path.join(workdir, "DONE")):
        return False
    return os.path.exists(os.path.join(workdir, FAILED_FILE)) or _running_pid(workdir) is not None


def _why_unfinished(workdir: str, total_steps: int | None) -> dict:
    """{status, why} of a planned run that has not reached its last step."""
    from flaxlm.train.sweep import FAILED_FILE, _running_pid  # (sweep imports this module)

    metrics = os.path.join(workdir, "metrics.jsonl")
    with warnings.catch_warnings():  # final_metrics has read (and warned about) this file
        warnings.simplefilter("ignore")
        records = read_metrics(workdir) if os.path.exists(metrics) else None
    steps = [r.get("step") for r in records or () if isinstance(r, dict)]
    at = f"at step {max((s for s in steps if isinstance(s, int)), default=0)} of {total_steps}"
    log = os.path.join(workdir, "train.log")
    pid = _running_pid(workdir)
    if pid is not None:
        return {"status": "running", "why": f"running (pid {pid}), {at}"}
    if os.path.exists(os.path.join(workdir, FAILED_FILE)):
        try:
            with open(os.path.join(workdir, FAILED_FILE)) as f:
                rc = json.load(f).get("rc")
        except (ValueError, AttributeError):  # a record cut short: the failure stands
            rc = "?"
        last = _last_line(log)
        return {
            "status": "failed",
            "why": f"failed (rc={rc}) {at}; see {log}" + (f": {last}" if last else ""),
        }
    if records is None and not os.path.exists(log):
        return {"status": "not started", "why": f"not started (no {metrics})"}
    see = f"; see {log}" if os.path.exists(log) else ""
    return {"status": "unfinished", "why": f"unfinished: stopped {at}{see}"}


# The hint train/main.py prints after a refused config's one-line error (its TRACEBACK_ENV):
# not the line that says why the run failed.
_HINT_PREFIX = "(FLAXLM_TRACEBACK="


def _last_line(path: str, limit: int = 160) -> str:
    """The last non-empty line of a (possibly large) log, cut to `limit` characters — the
    error, not the traceback hint that follows a refused config's."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(_HINT_PREFIX)] or lines
    return lines[-1][:limit] if lines else ""


def _missing_message(root: str, missing: Sequence[dict], planned: int) -> str:
    return (f"{root}: {len(missing)} of {planned} planned runs have no row: "
            + "; ".join(f"{m['name']} {m['why']}" for m in missing))  # fmt: skip


def _columns(rows: Sequence[dict]) -> list[str]:
    seen = dict.fromkeys(c for c in _FIRST if any(c in r for r in rows))
    for r in rows:
        seen.update(dict.fromkeys(r))
    return list(seen)


def write_table(rows: Sequence[dict], out_dir: str, stem: str = "runs") -> tuple[str, str]:
    """Writes `<stem>.csv` and `<stem>.json` ({"runs": rows}); returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    cols = _columns(rows)
    csv_path = os.path.join(out_dir, f"{stem}.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v
                        for k, v in r.items()})  # fmt: skip
    json_path = os.path.join(out_dir, f"{stem}.json")
    with open(json_path, "w") as f:
        json.dump({"runs": list(rows)}, f, indent=1)
    return csv_path, json_path


def main(argv: Sequence[str] | None = None) -> int:
    """(Re)writes the run table of a sweep, as the sweep does after its runs (ROOT/runs.csv and
    runs.json, or OUT.csv and OUT.json with --csv), prints the CSV, and names on stderr each
    planned run without a row. Without this the module ran nothing: `python -m` printed nothing
    and exited 0."""
    p = argparse.ArgumentParser(
        prog="python -m flaxlm.train.sweep_table", description="Write and print a run table."
    )
    p.add_argument("root", help="the sweep's --workdir (the folder holding sweep.json)")
    p.add_argument(
        "--csv", default=None, help="write it here (and OUT.json beside it), not ROOT/runs.csv"
    )
    args = p.parse_args(argv)
    try:
        rows, missing = collect_all(args.root)
    except (FileNotFoundError, ValueError) as e:  # not a sweep folder, a malformed sweep.json
        p.error(str(e))
    if args.csv:
        out_dir, name = os.path.split(os.path.abspath(args.csv))
        stem = name[: -len(".csv")] if name.endswith(".csv") else name
        csv_path, _ = write_table(rows, out_dir, stem)
    else:
        csv_path, _ = write_table(rows, args.root)
    with open(csv_path) as f:
        sys.stdout.write(f.read())
    print(f"run table: {csv_path} ({len(rows)} finished runs)", file=sys.stderr)
    for m in missing:
        print(f"  no row for {m['name']}: {m['why']}", file=sys.stderr)
    if mixed := code_warning(rows):
        print(f"  WARNING: {mixed}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
