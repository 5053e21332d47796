"""ROOT/report/report.md of the scaling workflow: what ran, how long it took on how loaded a
machine, the run table, the fitted law, predicted vs actual for the bigger model, the plots."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _fmt(v, spec: str = ".4g") -> str:
    if v is None or v == "":
        return "–"
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return str(v)


def _timing_lines(root: str) -> list[str]:
    path = os.path.join(root, "timing.json")
    if not os.path.exists(path):
        return ["(no timing recorded)"]
    with open(path) as f:
        timing = json.load(f)
    lines = ["| step | attempt | wall (s) | CPU (s) | CPU use | load avg mean / max | finished |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for step, entries in timing.items():
        for i, e in enumerate(entries):
            use = e["cpu_s"] / max(e["wall_s"] * e["cpus"], 1e-9)
            lines.append(
                f"| {step} | {i + 1} | {e['wall_s']:.0f} | {e['cpu_s']:.0f} | {100 * use:.0f}% of "
                f"{e['cpus']} cores | {e['load_mean']:.1f} / {e['load_max']:.1f} | "
                f"{e['finished_at']} |"
            )
    lines.append("")
    lines.append("CPU use = CPU seconds of this workflow and its trainers ÷ (wall × cores); the "
                 "load average counts every process on the machine, not only ours.")  # fmt: skip
    return lines


# Overrides that say how a run was trained, not which (N, D) point it is: left out of its label
_BOOKKEEPING = ("ckpt_every", "keep_ckpts", "branch_from")


def _overrides(row: dict) -> dict:
    ov = row.get("overrides") or {}
    return json.loads(ov) if isinstance(ov, str) else ov


def run_label(row: dict) -> str:
    """A run as the table names it: its sweep overrides but the bookkeeping ones (a branch's
    directory name holds its source's whole name, hashed), "branched at STEP" for a branch;
    the run's name where it has no overrides (the target)."""
    ov = _overrides(row)
    label = ",".join(f"{k}={v}" for k, v in sorted(ov.items()) if k not in _BOOKKEEPING)
    start = str(ov.get("branch_from") or "").rpartition("@")[2]
    return (label or row["name"]) + (f" (branched at {start})" if start.isdigit() else "")


def _table_lines(rows: Sequence[dict], target: dict | None, tasks: Sequence[str]) -> list[str]:
    head = "| run | N non-emb | N total | D tokens | C=6ND | FLOPs (exact) | train loss | held-out"
    head += "".join(f" | {t} acc" for t in tasks) + " |"
    lines = [head, "|" + "---|" * (8 + len(tasks))]
    for r in list(rows) + ([target] if target else []):
        cells = [run_label(r), _fmt(r["n_params_nonembed"], ".4g"), _fmt(r["n_params"], ".4g"),
                 _fmt(r["tokens"], ".3g"), _fmt(r["c_6nd"], ".3g"), _fmt(r["flops"], ".3g"),
                 _fmt(r["final_loss"], ".4f"), _fmt(r["heldout_loss"], ".4f")]  # fmt: skip
        cells += [_fmt(r.get(f"task/{t}/acc"), ".3f") for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _branch_lines(rows: Sequence[dict]) -> list[str]:
    """What the sweep's branches saved (configs/scaling.py:cooldowns=True): a branch trains only
    its steps after its branch point (`branch_from=RUN@STEP`), the ones before are its
    source's. Nothing when no run is a branch."""
    listed = trained = branches = 0
    for r in rows:
        ov = _overrides(r)
        steps = int(r.get("total_steps") or r["step"])
        start = str(ov.get("branch_from") or "").rpartition("@")[2]
        listed += steps
        trained += steps - (int(start) if start.isdigit() else 0)
        branches += start.isdigit()
    if not branches:
        return []
    return [f"{branches} of the {len(rows)} runs are branches of another run (`branch_from`): "
            f"the sweep trained {trained} optimizer steps, against {listed} for the same runs "
            f"trained separately ({100 * trained / listed:.0f}%).", ""]  # fmt: skip


def _law_lines(report: dict) -> list[str]:
    fit, ci = report["parametric"], report.get("parametric_intervals", {})
    lines = [
        "L(N, D) = E + A / N^alpha + B / D^beta, fitted by Huber (delta 1e-3) on log-loss "
        f"residuals with L-BFGS (evaluation/scaling.py) on {report['n_runs']} runs; "
        f"N = {report['settings']['n_key']}, loss = {report['settings']['loss_key']}.",
        "",
        "| parameter | estimate | 95% bootstrap interval |",
        "|---|---|---|",
    ]
    for k in ("E", "A", "B", "alpha", "beta"):
        iv = ci.get(k, {})
        lines.append(f"| {k} | {_fmt(fit[k])} | [{_fmt(iv.get('lo'))}, {_fmt(iv.get('hi'))}] |")
    rms = fit["rms_log_residual"]
    lines += ["", f"RMS log residual of the fit: {rms:.4f} (≈ {100 * rms:.2f}% per run); "
              f"converged: {fit['converged']}."]  # fmt: skip
    lines += [f"**Warning:** {w}." for w in report.get("warnings", [])]
    law_n = report["power_laws"].get("N", {})
    if "alpha" in law_n:
        lines.append(
            f"One-variable L(N) on the best run per size: E={law_n['E']:.4g}, "
            f"A={law_n['A']:.4g}, alpha={law_n['alpha']:.4g}."
        )
    return lines


def _prediction_lines(pred: dict | None, target: dict | None) -> list[str]:
    if not pred:
        return ["(no target run)"]
    lines = [
        f"Target: N = {pred['N']:.4g} non-embedding parameters, D = {pred['D']:.4g} tokens.",
        "",
        f"- predicted held-out loss: **{pred['predicted']:.4f}**"
        + (f" (95% bootstrap [{pred['lo']:.4f}, {pred['hi']:.4f}])" if "lo" in pred else ""),
    ]
    if "actual" in pred:
        seeds = (target or {}).get("heldout_loss_seeds", [])
        per_seed = ""
        if len(seeds) > 1:
            spread = 100 * (max(seeds) - min(seeds)) / min(seeds)
            per_seed = (f" (mean of {len(seeds)} seeds: " + ", ".join(f"{v:.4f}" for v in seeds)
                        + f"; they differ by {spread:.1f}%)")  # fmt: skip
        lines.append(f"- actual held-out loss: **{pred['actual']:.4f}**{per_seed}")
        lines.append(f"- error (predicted / actual − 1): **{100 * pred['rel_error']:+.2f}%**")
    return lines


def _fixed_budget_lines(fixed: dict | None, slopes: Sequence[dict]) -> list[str]:
    lines = []
    if fixed and "predicted" in fixed:
        law = fixed["fit"]
        lines += [
            f"Cross-check: L(N) = E + A / N^alpha fitted on the {len(fixed['fitted_N'])} runs "
            f"trained on the target's own budget (D = {fixed['tokens']:.4g} tokens): "
            f"E={law['E']:.4g}, A={law['A']:.4g}, alpha={law['alpha']:.4g}.",
            "",
            f"- predicted: **{fixed['predicted']:.4f}**",
        ]
        if "actual" in fixed:
            lines.append(f"- error (predicted / actual − 1): **{100 * fixed['rel_error']:+.2f}%**")
    elif fixed:
        lines.append(f"(fixed-budget cross-check skipped: {fixed.get('skipped')})")
    if slopes:
        lines += ["", "N-dependence per budget: the additive law keeps the gap between the "
                  "smallest and largest size constant across budgets, L = f(N) g(D) keeps the "
                  "log-log slope constant.", "",
                  "| D tokens | held-out loss by size (small → large) | gap | d ln L / d ln N |",
                  "|---|---|---|---|"]  # fmt: skip
        for s in slopes:
            losses = ", ".join(f"{v:.4f}" for v in s["loss"])
            lines.append(f"| {s['tokens']:.4g} | {losses} | {_fmt(s.get('gap'), '.4f')} | "
                         f"{_fmt(s['slope'], '.3f')} |")  # fmt: skip
    return lines


def plot_fixed_budget(rows: Sequence[dict], fixed: dict, path: str) -> str:
    """Held-out loss vs N at the target's budget: fitted runs, the law, predicted and actual."""
    n, loss = np.asarray(fixed["fitted_N"]), np.asarray(fixed["fitted_loss"])
    law = fixed["fit"]
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    others = [r for r in rows if r["tokens"] != fixed["tokens"]]
    for d in sorted({r["tokens"] for r in others}):
        pts = sorted(
            (r["n_params_nonembed"], r["heldout_loss"]) for r in others if r["tokens"] == d
        )
        ax.plot(*zip(*pts), "o:", color="0.7", ms=3, lw=0.8)
    ax.scatter(n, loss, color="C0", zorder=3, label=f"fitted runs, D={fixed['tokens']:.3g}")
    grid = np.geomspace(n.min() / 1.3, fixed["N"] * 1.3, 100)
    ax.plot(grid, law["E"] + law["A"] * grid ** -law["alpha"], "C0-", lw=1, label="E + A/N^alpha")
    ax.scatter([fixed["N"]], [fixed["predicted"]], color="C3", zorder=4, label="predicted")
    if "actual" in fixed:
        ax.scatter([fixed["N"]], [fixed["actual"]], marker="x", s=80, color="k", zorder=5,
                   label=f"actual ({100 * fixed['rel_error']:+.2f}%)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("held-out loss")
    ax.set_title("fixed-budget L(N) (grey: other budgets)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def write_markdown(
    root: str,
    report: dict,
    rows: Sequence[dict],
    target: dict | None,
    tasks: Sequence[str],
    config: str,
    command: str = "",
) -> str:
    """Writes ROOT/report/report.md and returns its path."""
    out_dir = os.path.join(root, "report")
    os.makedirs(out_dir, exist_ok=True)
    largest = max(float(r["n_params_nonembed"]) for r in rows)
    lines = [
        "# Scaling study: fit on small runs, predict a bigger one",
        "",
        f"Config: `{config}`.",
        "",
        f"Command: `{command or 'python -m flaxlm.evaluation.scaling_workflow --workdir ' + root}`"
        " (re-running it resumes: finished runs are skipped).",
        "",
        "## Prediction",
        *_prediction_lines(report.get("prediction"), target),
    ]
    if target:
        lines.append(
            f"- the target has {float(target['n_params_nonembed']) / largest:.2f}x the "
            "non-embedding parameters of the largest fitted run"
        )
    lines += ["", "## Fitted law", *_law_lines(report), "",
              "## Fixed-budget cross-check",
              *_fixed_budget_lines(report.get("prediction_fixed_budget"),
                                   report.get("slopes_by_budget", [])), "", "## Runs",
              *_table_lines(rows, target, tasks), "",
              "N non-emb excludes the (tied) embedding table; C=6ND uses it; FLOPs (exact) is "
              "flops_per_token × D (6·N_matmul + 12·L·d·T, attention non-causal, DESIGN.md).",
              "", *_branch_lines(rows), "## Time and machine load", *_timing_lines(root), "",
              "## Plots"]  # fmt: skip
    for name, path in report.get("plots", {}).items():
        lines.append(f"- {name}: ![{name}]({os.path.relpath(path, out_dir)})")
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
