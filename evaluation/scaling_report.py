"""From a table of sweep runs to a scaling-law report: every fit, intervals, prediction, plots.

A run table has one row per finished run with the columns the sweep collects (``RUN_COLUMNS``):
total and non-embedding parameters, training tokens, exact training FLOPs, final train loss and
held-out loss. It can be a list of dicts, or a ``.csv``, ``.json`` (a list of rows, or
``{"runs": [...]}``) or ``.jsonl`` file. ``fit_report`` fits

* Kaplan-style ``L(N)``, ``L(D)`` on the best loss per size / per token count, and ``L(C)`` on the
  compute frontier (runs no cheaper run beats);
* the parametric ``L(N, D)`` with bootstrap intervals, and the compute-optimal allocation it
  implies;
* IsoFLOP minima, when the sweep has budgets with >= 3 sizes each (runs within 5% of a budget's
  smallest compute) and the minimum lies among the sizes sampled (not extrapolated);
* optionally the prediction for a held-out target run (a bigger model) against its actual loss,

and writes ``scaling_report.json`` plus PNG plots to ``out_dir``. ``L(N, D)`` needs >= 3 distinct
N and >= 3 distinct D (with one D, E and B/D^beta are one constant and the bootstrap would report
a spuriously exact split); fewer is refused (``fit_power_law`` fits L(N) at a fixed D).

From the command line, on a sweep's directory (its ``sweep.json``: train/sweep_table.collect) or
a run table file::

    python -m flaxlm.evaluation.scaling_report runs/sw [--out runs/sw/fit] [--n_boot 200]
        [--n_key n_params_nonembed] [--loss_key heldout_loss] [--target_json big.json]
        [--drop_nonfinite] [--require_all]

A run whose loss is nan or inf (diverged) is an error naming it (its name and sweep index);
``--drop_nonfinite`` leaves such runs out instead, naming each. A planned run of the sweep that
has no row (failed, unfinished, not started: train/sweep_table.collect_all) is named, with why,
in the report's ``warnings`` and ``missing_runs``; ``--require_all`` refuses to fit without it.
A one-variable law whose exponent sits at a bound of its fit is a warning too. A
scaling_workflow's sweep is ``ROOT/sweep``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from flaxlm.evaluation import scaling_plots
from flaxlm.evaluation.scaling import (
    HUBER_DELTA,
    MAX_EXPONENT,
    compute_optimal,
    envelope,
    fit_parametric,
    fit_power_law,
    pareto_frontier,
    predict_parametric,
)
from flaxlm.evaluation.scaling_bootstrap import bootstrap_parametric
from flaxlm.evaluation.scaling_isoflop import fit_isoflop, group_by_compute
from flaxlm.train.code_version import mixed_commits

RUN_COLUMNS = ("n_params", "n_params_nonembed", "tokens", "flops", "final_loss", "heldout_loss")


def _run_label(row, where: str) -> str:
    """`where` (file:line, runs[i]) with the run's name and sweep index when the row has them:
    a sweep's table lists only finished runs, so a row's position is not its run's index."""
    if not isinstance(row, Mapping) or not row.get("name"):
        return where
    index = row.get("index")
    at = f", sweep index {index}" if index not in (None, "") else ""
    return f"{where} ({row['name']}{at})"


def _read_rows(source) -> tuple[list[Mapping], list[str]]:
    """Rows of a run table and a location label per row for error messages."""
    rows, where = _read_rows_at(source)
    return rows, [_run_label(row, loc) for row, loc in zip(rows, where)]


def _read_rows_at(source) -> tuple[list[Mapping], list[str]]:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        name = os.path.basename(path)
        if path.endswith(".csv"):
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            return rows, [f"{path}:{i + 2}" for i in range(len(rows))]  # line 1 is the header
        if path.endswith(".jsonl"):
            with open(path) as f:
                lines = [(i, ln) for i, ln in enumerate(f, 1) if ln.strip()]
            rows = []
            for i, ln in lines:  # json's own message says "line 1": of the one line it saw
                try:
                    rows.append(json.loads(ln))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: invalid JSON: {e.msg}") from None
            return rows, [f"{path}:{i}" for i, _ in lines]
        if path.endswith(".json"):
            with open(path) as f:
                try:
                    data = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
            rows = data["runs"] if isinstance(data, dict) and "runs" in data else data
            if not isinstance(rows, list):
                raise ValueError(f"{path}: expected a list of runs or {{'runs': [...]}}")
            return rows, [f"{name} run {i}" for i in range(len(rows))]
        raise ValueError(f"{path}: run table must be .csv, .json or .jsonl")
    rows = list(source)
    return rows, [f"runs[{i}]" for i in range(len(rows))]


def _nonfinite(row, columns: Sequence[str]) -> list[str]:
    """The columns of `row` that hold a number that is not finite (a diverged run's nan)."""
    bad = []
    for col in columns:
        v = row.get(col) if isinstance(row, Mapping) else None
        try:
            if v not in (None, "") and not np.isfinite(float(v)):
                bad.append(col)
        except (TypeError, ValueError):
            continue  # not a number: load_runs names it
    return bad


def _drop_nonfinite(rows, where, columns: Sequence[str]) -> tuple[list, list, list[str]]:
    """(rows, labels) without the rows whose `columns` hold nan or inf, and what was dropped
    (label: values); a warning names each dropped run and its values."""
    kept, dropped = [], []
    for row, loc in zip(rows, where):
        bad = _nonfinite(row, columns)
        if bad:
            dropped.append(f"{loc}: " + ", ".join(f"{c}={row[c]}" for c in bad))
        else:
            kept.append((row, loc))
    if dropped:
        warnings.warn(
            f"run table: left out {len(dropped)} run(s) with a non-finite value "
            f"(--drop_nonfinite): {'; '.join(dropped)}",
            stacklevel=3,
        )
    return [r for r, _ in kept], [loc for _, loc in kept], dropped


def finite_rows(rows: Sequence[Mapping], columns: Sequence[str]) -> list[Mapping]:
    """The rows (dicts, e.g. sweep_table.collect's) whose `columns` are finite, with a warning
    naming each run left out (a diverged run's nan loss)."""
    rows = list(rows)
    _, where = _read_rows(rows)
    return _drop_nonfinite(rows, where, columns)[0]


def load_runs(
    source, *, required: Sequence[str] = RUN_COLUMNS, drop_nonfinite: bool = False
) -> dict[str, np.ndarray]:
    """Read a run table into float columns.

    Args:
      source: list of dicts, or path to a .csv / .json / .jsonl file.
      required: columns every row must have, finite and > 0 (a clear error names the row, by
        its run's name and sweep index when the table has them, and the column).
      drop_nonfinite: leave out, with a warning naming each, the rows whose required columns
        hold nan or inf (diverged runs) instead of refusing the table.

    Returns:
      {column: float array} for the required columns and every other ``RUN_COLUMNS`` column that
      all rows have. Rows equal to an earlier one in every column are kept, with a warning.
    """
    return _load_runs(source, required, drop_nonfinite)[0]


def _load_runs(source, required, drop_nonfinite) -> tuple[dict[str, np.ndarray], list, list]:
    """`load_runs`, and the warnings about its rows: the runs `drop_nonfinite` left out, and
    runs trained under different flaxlm commits (a sweep table's ``flaxlm_commit`` column)."""
    rows, where = _read_rows(source)
    dropped = []
    if drop_nonfinite:
        rows, where, dropped = _drop_nonfinite(rows, where, required)
    if not rows:
        raise ValueError("run table is empty" + (" (every run non-finite)" if dropped else ""))
    out = {}
    for col in dict.fromkeys([*required, *RUN_COLUMNS]):
        values = []
        for row, loc in zip(rows, where):
            v = row.get(col) if isinstance(row, Mapping) else None
            if v is None or v == "":
                if col in required:
                    raise ValueError(f"{loc}: missing column {col!r}")
                break
            try:
                x = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"{loc}: column {col!r} = {v!r} is not a number") from None
            if col in required and not (np.isfinite(x) and x > 0):
                # e.g. a diverged run's nan loss: name the row here, not an index in the fit
                hint = "" if np.isfinite(x) else " (--drop_nonfinite leaves such runs out)"
                raise ValueError(
                    f"{loc}: column {col!r} = {v!r} is not a finite positive number{hint}"
                )
            values.append(x)
        else:
            out[col] = np.asarray(values, dtype=np.float64)
    _warn_repeated_rows(out, where)
    commits = {loc: row.get("flaxlm_commit") for row, loc in zip(rows, where)
               if isinstance(row, Mapping)}  # fmt: skip
    mixed = mixed_commits(commits)
    if mixed:
        warnings.warn(f"run table: {mixed}", stacklevel=3)
    return out, dropped, [mixed] if mixed else []


def _warn_repeated_rows(columns: dict[str, np.ndarray], where: Sequence[str]) -> list[str]:
    """Warns about (and returns) rows equal to an earlier row in every column: the same run
    listed twice (two sweep roots, a copied line) counts twice in the fit."""
    table = np.stack(list(columns.values()), axis=1)
    _, first = np.unique(table, axis=0, return_index=True)
    repeated = [where[i] for i in sorted(set(range(len(table))) - set(first.tolist()))]
    if repeated:
        warnings.warn(
            f"run table: {len(repeated)} row(s) repeat an earlier row in every column "
            f"({', '.join(repeated[:5])}{', ...' if len(repeated) > 5 else ''}); each counts "
            "as a separate run in the fits: drop them if they are one run listed twice",
            stacklevel=3,
        )
    return repeated


def _jsonable(x):
    """Plain Python numbers/lists/dicts, so the report can be written with json.dump."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def _target_number(target: Mapping, key: str) -> float:
    """target[key] as a finite positive number, or a ValueError naming the key (a bad N or D
    gave a NaN prediction, a string float()'s bare message)."""
    if key not in target:
        raise ValueError(f"target: missing {key!r}")
    try:
        v = float(target[key])
    except (TypeError, ValueError):
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"target: {key!r} = {target[key]!r} is not a finite positive number")
    return v


def fit_warnings(fit: Mapping, intervals: Mapping, loss) -> list[str]:
    """What makes an L(N, D) fit untrustworthy even though it converged: E collapsed to ~0 (the
    runs do not pin the irreducible loss, and a bootstrap interval of E then looks exact), an
    exponent at a bound, a coefficient whose interval spans more than 100x."""
    out = []
    if not fit.get("converged", True):  # (the bootstrap's bound warnings miss it at n_boot 0)
        out.append("the L(N, D) fit did not converge (L-BFGS-B stopped short of an optimum): "
                   "do not trust its parameters")  # fmt: skip
    if fit["E"] < 1e-6 * float(np.min(loss)):
        out.append(f"E = {fit['E']:.3g} collapsed to ~0: the runs do not constrain the "
                   "irreducible loss (its interval is not a measure of certainty)")  # fmt: skip
    for k in ("alpha", "beta"):
        vals = [
            fit[k],
            intervals.get(k, {}).get("lo", fit[k]),
            intervals.get(k, {}).get("hi", fit[k]),
        ]
        if any(v <= 1e-6 or v >= MAX_EXPONENT * (1 - 1e-6) for v in vals):
            out.append(
                f"{k} (or its interval) is at a bound (0 or {MAX_EXPONENT:g}): unconstrained"
            )
    for k in ("A", "B"):
        iv = intervals.get(k, {})
        if iv.get("lo", 0) > 0 and iv.get("hi", 0) / iv["lo"] > 100:
            out.append(f"{k}'s interval spans {iv['hi'] / iv['lo']:.2g}x: poorly constrained")
    return out


def power_law_warnings(power_laws: Mapping) -> list[str]:
    """A one-variable law (L(N), L(D), L(C)) whose exponent sits at a bound of the fit (0 or
    MAX_EXPONENT): the points it was fitted on do not bend like a power law (too few, or a
    gap: runs missing from one end), so its exponent says nothing."""
    out = []
    for name, law in power_laws.items():
        a = law.get("alpha")
        if a is not None and not law.get("converged", True):
            out.append(f"L({name}): the fit did not converge: do not trust alpha = {a:.3g}")
        if a is not None and (a <= 1e-6 or a >= MAX_EXPONENT * (1 - 1e-6)):
            out.append(f"L({name}): alpha = {a:.3g} is at a bound (0 or {MAX_EXPONENT:g}) of "
                       f"the fit on {law.get('n_runs')} points ({law.get('fitted_on')}): "
                       "unconstrained")  # fmt: skip
    return out


def missing_run_warnings(missing: Sequence[Mapping]) -> list[str]:
    """One line per planned run of the sweep that is not in the fit (sweep_table.collect_all:
    failed, unfinished, not started): the fit stands on the others only."""
    return [f"run {m['name']} (sweep index {m.get('index')}) is not in the fit: {m['why']}"
            for m in missing]  # fmt: skip


def _power_laws(N, D, C, loss) -> dict:
    """Kaplan-style one-variable laws, each on the runs that bound loss for that variable."""
    # Kaplan et al. fit L(N) on models trained to convergence and L(C) on the compute frontier;
    # a finite sweep can only offer the best run per size (its longest) and the frontier runs.
    # On an IsoFLOP sweep every size is distinct, so L(N) and L(D) then mix budgets: read them
    # with that in mind (``fitted_on`` says what was used).
    frontier = pareto_frontier(C, loss)
    # (x, loss, what was fitted, what too few of it are): L(C) sees only the frontier's runs,
    # so its count is of those, not of every distinct C (12 budgets, 3 on the frontier).
    subsets = {
        "N": (*envelope(N, loss), "best loss per distinct N", "distinct N values"),
        "D": (*envelope(D, loss), "best loss per distinct D", "distinct D values"),
        "C": (C[frontier], loss[frontier], "runs on the compute frontier",
              f"runs on the compute frontier (of {np.unique(C).size} distinct C)"),
    }  # fmt: skip
    out = {}
    for name, (x, y, fitted_on, counted) in subsets.items():
        if np.unique(x).size < 4:
            out[name] = {"skipped": f"{np.unique(x).size} {counted}; need >= 4"}
            continue
        out[name] = {
            **fit_power_law(x, y),
            "fitted_on": fitted_on,
            "x": x.tolist(),
            "loss": y.tolist(),
        }
    return out


def fit_report(
    runs,
    out_dir: str | os.PathLike | None = None,
    *,
    n_key: str = "n_params_nonembed",
    loss_key: str = "heldout_loss",
    compute: str = "6nd",
    target: Mapping | None = None,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
    drop_nonfinite: bool = False,
    missing_runs: Sequence[Mapping] = (),
) -> dict:
    """Fit every scaling law to a run table; optionally predict a target run; write plots.

    Args:
      runs: a run table (see ``load_runs``).
      out_dir: where ``scaling_report.json`` and the PNGs go; None writes nothing.
      n_key: the parameter count to fit on (non-embedding as in Kaplan et al., or ``n_params``
        as in Hoffmann et al.).
      loss_key: which loss column to fit.
      compute: ``"6nd"`` (C = 6 N D, the convention of the compute-optimal formulas) or a column
        name such as ``"flops"`` for the exact count; used for L(C) and IsoFLOP budgets, and its
        mean FLOPs per parameter-token replaces the 6 in the compute-optimal allocation.
      target: a run (same column names) to predict, e.g. a model 4x larger than any fitted; its
        ``loss_key`` value, if present, is the actual loss to compare against.
      n_boot: bootstrap resamples for the parametric intervals (0: none).
      level, seed: bootstrap interval coverage and seed.
      drop_nonfinite: leave out the runs whose loss (or N, D, compute) is nan or inf, e.g.
        diverged runs, with a warning naming each (``load_runs``); else they are an error.
      missing_runs: the sweep's planned runs that have no row, with why
        (``sweep_table.collect_all``): recorded, and each named in ``warnings``.

    Returns:
      JSON-serialisable dict: ``settings``, ``n_runs``, ``dropped_runs`` (those left out by
      ``drop_nonfinite``), ``missing_runs``, ``power_laws``, ``parametric``,
      ``parametric_intervals``, ``warnings`` (why not to trust the fit: ``fit_warnings``,
      ``power_law_warnings``, ``missing_run_warnings``, runs of different flaxlm commits),
      ``compute_optimal``, ``isoflop``, ``prediction`` (if target), ``plots`` (paths).
    """
    required = [n_key, "tokens", loss_key] + ([] if compute == "6nd" else [compute])
    cols, dropped, code = _load_runs(runs, required, drop_nonfinite)
    N, D, loss = cols[n_key], cols["tokens"], cols[loss_key]
    C = 6.0 * N * D if compute == "6nd" else cols[compute]
    # The compute-optimal formulas take C = k N D. With an exact FLOPs column, k is the sweep's
    # own FLOPs per parameter-token (geometric mean of C / (N D)), so the N*, D* reported at a
    # budget C cost C by that column's count (with k = 6 they would cost C * k_true / 6).
    k_flops = 6.0 if compute == "6nd" else float(np.exp(np.mean(np.log(C / (N * D)))))
    n_distinct, d_distinct = np.unique(N).size, np.unique(D).size
    if n_distinct < 3 or d_distinct < 3:
        raise ValueError(
            f"L(N, D) needs >= 3 distinct {n_key} and >= 3 distinct token counts; got "
            f"{n_distinct} and {d_distinct} over {N.shape[0]} runs (the law's terms cannot be "
            "told apart: sweep more sizes/budgets, or fit_power_law(N, loss) at one D)"
        )

    point = None
    if target is not None:
        point = (_target_number(target, n_key), _target_number(target, "tokens"))
        actual = _target_number(target, loss_key) if target.get(loss_key) is not None else None
    if n_boot > 0:
        boot = bootstrap_parametric(
            N, D, loss, predict_at=[point] if point else [], n_boot=n_boot, level=level, seed=seed
        )
        fit, intervals = boot["fit"], boot["intervals"]
        n_failed = boot["n_failed"]
    else:
        fit, intervals, n_failed = fit_parametric(N, D, loss), {}, 0

    budgets = [float(np.exp(np.log(C[g]).mean())) for g in group_by_compute(C)]
    report = {
        "settings": {
            "n_key": n_key,
            "loss_key": loss_key,
            "compute": compute,
            "flops_per_param_token": k_flops,
            "huber_delta": HUBER_DELTA,
            "n_boot": n_boot,
            "bootstrap_failed": n_failed,
            "level": level,
            "seed": seed,
            "drop_nonfinite": drop_nonfinite,
        },
        "n_runs": int(N.shape[0]),
        "dropped_runs": dropped,
        "missing_runs": [dict(m) for m in missing_runs],
        "power_laws": _power_laws(N, D, C, loss),
        "parametric": fit,
        "parametric_intervals": intervals,
        # Only budgets whose parabola has its vertex among the sizes sampled: an extrapolated
        # vertex is the parabola's shape, not the data's (a dense grid's edge budgets put N_opt
        # 20% off, all on one side); those budgets are in `skipped`, with why.
        "isoflop": fit_isoflop(N, D, loss, C, require_interior=True),
    }
    report["warnings"] = [
        *missing_run_warnings(missing_runs),
        *code,
        *fit_warnings(fit, intervals, loss),
        *power_law_warnings(report["power_laws"]),
    ]
    try:
        opt = compute_optimal(fit, np.asarray(budgets), flops_per_param_token=k_flops)
        report["compute_optimal"] = {
            "a": opt["a"],
            "b": opt["b"],
            "G": opt["G"],
            "at_budgets": [
                {"C": c, "N": n, "D": d, "loss": lo}
                for c, n, d, lo in zip(budgets, opt["N"], opt["D"], opt["loss"])
            ],
        }
    except ValueError as e:  # an exponent at 0: no finite optimum
        report["compute_optimal"] = {"skipped": str(e)}

    if point is not None:
        pred = float(predict_parametric(fit, *point))
        prediction = {"N": point[0], "D": point[1], "predicted": pred}
        if n_boot > 0:
            ci = boot["predictions"][0]
            prediction.update(lo=ci["lo"], hi=ci["hi"])
        if actual is not None:
            prediction.update(actual=actual, rel_error=pred / actual - 1.0)
        report["prediction"] = prediction

    report["plots"] = {}
    if out_dir is not None:
        report["plots"] = _write_plots(report, N, D, C, loss, fit, out_dir, compute, k_flops)
    report = _jsonable(report)
    if out_dir is not None:
        with open(os.path.join(out_dir, "scaling_report.json"), "w") as f:
            json.dump(report, f, indent=2)
    return report


def _write_plots(report, N, D, C, loss, fit, out_dir, compute, k_flops=6.0) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    law_c = report["power_laws"]["C"]
    paths = {
        "loss_vs_compute": scaling_plots.plot_loss_vs_compute(
            N,
            D,
            loss,
            os.path.join(out_dir, "loss_vs_compute.png"),
            C=None if compute == "6nd" else C,
            fit=fit,
            power_law_c=law_c if "alpha" in law_c else None,
            flops_per_param_token=k_flops,
        )
    }
    if report["isoflop"]["budgets"]:
        paths["isoflop"] = scaling_plots.plot_isoflop(
            N, loss, report["isoflop"], os.path.join(out_dir, "isoflop.png")
        )
    if "prediction" in report:
        paths["prediction"] = scaling_plots.plot_prediction(
            N, D, loss, fit, report["prediction"], os.path.join(out_dir, "prediction.png")
        )
    return paths


def _read_target(path: str) -> dict:
    """The --target_json run row; a file that is not a JSON object is an error naming it."""
    with open(path) as f:
        try:
            target = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(target, dict):
        raise ValueError(f"{path}: expected a run row (a JSON object), got {type(target).__name__}")
    return target


def main(argv: Sequence[str] | None = None) -> dict:
    """Fits a sweep directory or run table and prints the laws (see the module docstring)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m flaxlm.evaluation.scaling_report",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("runs", help="sweep directory (with sweep.json) or a .csv/.json/.jsonl table")
    p.add_argument("--out", default="", help="report directory (default: RUNS/fit or TABLE_fit)")
    p.add_argument("--n_key", default="n_params_nonembed", help="parameter-count column")
    p.add_argument("--loss_key", default="heldout_loss", help="loss column")
    p.add_argument("--compute", default="6nd", help="6nd or a FLOPs column (e.g. flops)")
    p.add_argument("--n_boot", type=int, default=200, help="bootstrap resamples (0: none)")
    p.add_argument("--target_json", default="", help="a run row (JSON) to predict")
    p.add_argument("--drop_nonfinite", action="store_true",
                   help="leave out runs whose loss is nan/inf (diverged), naming each; "
                   "default: such a run is an error")  # fmt: skip
    p.add_argument("--require_all", action="store_true",
                   help="sweep directory: refuse to fit when a planned run has no row (failed, "
                   "unfinished, not started); default: fit the others, naming each")  # fmt: skip
    args = p.parse_args(argv)
    try:  # bad input (a folder without sweep.json, a missing file): its message, no traceback
        missing = []
        if os.path.isdir(args.runs):
            from flaxlm.train.sweep_table import collect_all

            runs, missing = collect_all(args.runs)
            out = args.out or os.path.join(args.runs, "fit")
            if missing and args.require_all:
                raise ValueError(
                    f"--require_all: {len(missing)} of {len(runs) + len(missing)} planned runs "
                    "have no row: " + "; ".join(f"{m['name']} {m['why']}" for m in missing)
                )
        else:
            runs = args.runs
            out = args.out or os.path.splitext(args.runs)[0] + "_fit"
        target = _read_target(args.target_json) if args.target_json else None
        report = fit_report(runs, out, n_key=args.n_key, loss_key=args.loss_key,
                            compute=args.compute, target=target, n_boot=args.n_boot,
                            drop_nonfinite=args.drop_nonfinite,
                            missing_runs=missing)  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"scaling_report: {e}") from None
    fit, ci = report["parametric"], report["parametric_intervals"]
    for d in report["dropped_runs"]:
        print(f"  left out (non-finite): {d}")
    print(f"{report['n_runs']} runs; L(N, D) = E + A/N^alpha + B/D^beta "
          f"(rms log residual {fit['rms_log_residual']:.3g}"
          f"{'' if fit.get('converged', True) else '; NOT CONVERGED'})")  # fmt: skip
    for k in ("E", "A", "alpha", "B", "beta"):
        band = f"  [{ci[k]['lo']:.4g}, {ci[k]['hi']:.4g}]" if k in ci else ""
        print(f"  {k:<6} {fit[k]:.4g}{band}")
    for name, law in report["power_laws"].items():
        print(f"  L({name}): " + (law["skipped"] if "skipped" in law else
                                  f"alpha={law['alpha']:.4g} E={law['E']:.4g}"))  # fmt: skip
    if "prediction" in report:
        print(f"  prediction: {report['prediction']}")
    for w in report["warnings"]:
        print(f"  WARNING: {w}")
    print(f"report: {os.path.join(out, 'scaling_report.json')}")
    return report


if __name__ == "__main__":
    main()
