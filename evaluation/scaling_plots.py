"""PNG plots of scaling-law fits: loss vs compute, IsoFLOP curves, predicted vs actual.

Figures are built on ``matplotlib.figure.Figure`` and written through the Agg canvas, never
through pyplot, so importing this module does not switch the backend of a notebook or a GUI
session and nothing global is left open. Every function writes one PNG and returns its path.
"""

from __future__ import annotations

import os

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from flaxlm.evaluation.scaling import compute_optimal, predict_parametric, predict_power_law


def _save(fig: Figure, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _colors(n: int) -> list:
    cmap = matplotlib.colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def plot_loss_vs_compute(
    N,
    D,
    loss,
    path,
    *,
    C=None,
    fit: dict | None = None,
    power_law_c: dict | None = None,
    flops_per_param_token: float = 6.0,
    max_curves: int = 8,
) -> str:
    """Loss vs compute, coloured by model size, with the parametric fit's curve per size.

    Args:
      N, D, loss: one value per run.
      path: PNG to write.
      C: compute per run (default ``6 N D``).
      fit: a ``fit_parametric`` result; draws L(N, C / (6N)) for up to ``max_curves`` sizes
        (spread over the sizes present) and the compute-optimal frontier (when alpha, beta > 0).
      power_law_c: a ``fit_power_law`` result for L(C); drawn dotted.
    """
    N, D, loss = (np.asarray(v, dtype=np.float64) for v in (N, D, loss))
    C = flops_per_param_token * N * D if C is None else np.asarray(C, dtype=np.float64)
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"]
    norm = LogNorm(N.min(), N.max()) if N.max() > N.min() else LogNorm(N.min() / 2, N.max() * 2)
    points = ax.scatter(C, loss, c=N, cmap=cmap, norm=norm, s=22, zorder=3)
    fig.colorbar(points, ax=ax, label="parameters N")
    c_grid = np.geomspace(C.min() / 2, C.max() * 4, 200)
    if fit is not None:
        sizes = np.unique(N)
        pick = np.unique(np.round(np.linspace(0, sizes.size - 1, min(max_curves, sizes.size))))
        for s in sizes[pick.astype(int)]:
            d = c_grid / (flops_per_param_token * s)
            ax.plot(c_grid, predict_parametric(fit, s, d), color=cmap(norm(s)), lw=1, alpha=0.8)
        # An exponent at its bound 0 has no finite compute-optimal allocation (compute_optimal
        # raises; fit_report records it as skipped): the frontier is left out, not the report.
        if min(fit["alpha"], fit["beta"]) > 0:
            opt = compute_optimal(fit, c_grid, flops_per_param_token=flops_per_param_token)
            ax.plot(c_grid, opt["loss"], "k--", lw=1.2, label="compute-optimal (parametric fit)")
    if power_law_c is not None:
        ax.plot(c_grid, predict_power_law(power_law_c, c_grid), "k:", lw=1.2, label="L(C) fit")
    ax.set_xscale("log")
    ax.set_ylim(loss.min() * 0.95, loss.max() * 1.1)
    ax.set_xlabel("compute C (FLOPs)")
    ax.set_ylabel("loss")
    ax.set_title("loss vs compute (curves: parametric fit per model size)")
    if fit is not None or power_law_c is not None:
        ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def plot_isoflop(N, loss, iso: dict, path) -> str:
    """IsoFLOP curves (loss vs N per budget, parabola, vertex) and N_opt(C), D_opt(C).

    Args:
      N, loss: one value per run (the runs ``iso`` was fitted on).
      iso: a ``fit_isoflop`` result.
      path: PNG to write.
    """
    N = np.asarray(N, dtype=np.float64)
    loss = np.asarray(loss, dtype=np.float64)
    fig = Figure(figsize=(11, 4.2))
    ax, ax_opt = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    budgets = iso["budgets"]
    colors = _colors(len(budgets))
    for i, b in enumerate(budgets):
        idx = np.asarray(b["indices"])
        ax.scatter(N[idx], loss[idx], color=colors[i], s=18, label=f"C={b['C']:.2g}")
        x = np.linspace(np.log(N[idx]).min() - 0.3, np.log(N[idx]).max() + 0.3, 100)
        ax.plot(np.exp(x), np.polyval(b["parabola"], x), color=colors[i], lw=1)
        ax.scatter(
            [b["N_opt"]],
            [b["loss_opt"]],
            color=colors[i],
            marker="*",
            s=120,
            edgecolor="k",
            zorder=4,
        )
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("loss")
    ax.set_title("IsoFLOP curves")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)

    if budgets:
        cs = np.array([b["C"] for b in budgets])
        ax_opt.scatter(cs, [b["N_opt"] for b in budgets], color="C0", label="N_opt")
        ax_opt.scatter(cs, [b["D_opt"] for b in budgets], color="C1", label="D_opt")
        if "a" in iso:
            grid = np.geomspace(cs.min() / 2, cs.max() * 2, 50)
            ax_opt.plot(grid, iso["N_coef"] * grid ** iso["a"], "C0-", label=f"∝ C^{iso['a']:.3f}")
            ax_opt.plot(grid, iso["D_coef"] * grid ** iso["b"], "C1-", label=f"∝ C^{iso['b']:.3f}")
    ax_opt.set_xscale("log")
    ax_opt.set_yscale("log")
    ax_opt.set_xlabel("compute C (FLOPs)")
    ax_opt.set_title("compute-optimal N and D")
    ax_opt.legend(fontsize=8)
    ax_opt.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def plot_prediction(
    N,
    D,
    loss,
    fit: dict,
    target: dict,
    path,
    *,
    flops_per_param_token: float = 6.0,
) -> str:
    """Predicted vs actual: the fitted runs and a held-out target run.

    Left: each fitted run's predicted vs observed loss, the target as a star (with its interval).
    Right: loss vs compute for the fitted runs, the fit's curve at the target's size, and the
    target's predicted point (error bar) next to its actual loss.

    Args:
      N, D, loss: the runs the law was fitted on.
      fit: a ``fit_parametric`` result.
      target: dict with ``N``, ``D``, ``predicted`` and optionally ``actual``, ``lo``, ``hi``.
      path: PNG to write.
    """
    N, D, loss = (np.asarray(v, dtype=np.float64) for v in (N, D, loss))
    k = flops_per_param_token
    pred = predict_parametric(fit, N, D)
    t_pred, t_act = target["predicted"], target.get("actual")
    err = None
    if "lo" in target and "hi" in target:
        # A percentile interval need not contain the point estimate; matplotlib rejects a
        # negative error-bar length, so such a side is drawn as 0.
        err = [[max(t_pred - target["lo"], 0.0)], [max(target["hi"] - t_pred, 0.0)]]
    fig = Figure(figsize=(11, 4.5))
    ax_par, ax_c = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)

    ax_par.scatter(loss, pred, s=16, color="C0", label="fitted runs")
    if t_act is not None:
        ax_par.errorbar([t_act], [t_pred], yerr=err, fmt="*", color="C3", ms=12, label="target")
    lims = np.array([min(loss.min(), pred.min(), t_pred), max(loss.max(), pred.max(), t_pred)])
    lims = lims * np.array([0.98, 1.02])
    ax_par.plot(lims, lims, "k--", lw=1)
    ax_par.set_xlabel("actual loss")
    ax_par.set_ylabel("predicted loss")
    ax_par.set_title("predicted vs actual")
    ax_par.legend(fontsize=8)
    ax_par.grid(True, alpha=0.3)

    C = k * N * D
    t_c = k * target["N"] * target["D"]
    ax_c.scatter(C, loss, s=16, color="0.5", label="fitted runs")
    c_grid = np.geomspace(min(C.min(), t_c) / 2, max(C.max(), t_c) * 2, 200)
    ax_c.plot(
        c_grid,
        predict_parametric(fit, target["N"], c_grid / (k * target["N"])),
        "C3-",
        lw=1,
        label=f"fit at N={target['N']:.3g}",
    )
    ax_c.errorbar([t_c], [t_pred], yerr=err, fmt="o", color="C3", capsize=4, label="predicted")
    if t_act is not None:
        rel = 100 * (t_pred / t_act - 1)
        ax_c.scatter(
            [t_c],
            [t_act],
            marker="x",
            s=80,
            color="k",
            zorder=4,
            label=f"actual (pred. error {rel:+.2f}%)",
        )
    ax_c.set_xscale("log")
    ax_c.set_ylim(min(loss.min(), t_pred) * 0.95, loss.max() * 1.05)
    ax_c.set_xlabel(f"compute {k:g}·N·D (FLOPs)")
    ax_c.set_ylabel("loss")
    ax_c.set_title("prediction for the target run")
    ax_c.legend(fontsize=8)
    ax_c.grid(True, which="both", alpha=0.3)
    return _save(fig, path)
