"""IsoFLOP analysis (Hoffmann et al. 2022, approach 2): compute-optimal model size per budget.

Runs are grouped by compute budget; within each group the final loss is fitted by a parabola in
``log N`` and its vertex is the compute-optimal size ``N_opt(C)``. Power laws
``N_opt = k_N C^a`` and ``D_opt = k_D C^b`` are then fitted by least squares in log-log space
across budgets.

``D_opt`` is read off the group's own ``log D`` vs ``log N`` line at the vertex rather than computed
as ``C / (6 N_opt)``, so the result stays consistent whichever compute count (6ND or the exact
FLOPs of the model) defined the budgets.
"""

from __future__ import annotations

import numpy as np

from flaxlm.evaluation.scaling import _as_positive


def group_by_compute(C, *, rtol: float = 0.05) -> list[np.ndarray]:
    """Cluster runs whose compute agrees within ``rtol`` (relative) into budgets.

    Sorted by compute, a run joins the current group while its compute is within a factor
    ``1 + rtol`` of the group's first (smallest) member, and starts a new group otherwise, so
    every group spans at most ``1 + rtol``. (Comparing consecutive runs instead chained a dense
    grid of runs into one "budget" spanning 6.9x in compute.) Returns index arrays, one per
    budget, in increasing compute.
    """
    C = _as_positive("C", C)
    order = np.argsort(C, kind="stable")
    logc = np.log(C[order])
    cuts, first = [], logc[0] if logc.size else 0.0
    for i in range(1, logc.size):
        if logc[i] - first > np.log1p(rtol):
            cuts.append(i)
            first = logc[i]
    return [np.sort(g) for g in np.split(order, cuts)]


def _budget_minimum(logn: np.ndarray, logd: np.ndarray, loss: np.ndarray) -> dict | str:
    """Vertex of the parabola loss(log N) for one budget, or the reason there is none."""
    if np.unique(logn).size < 3:
        return "fewer than 3 distinct model sizes"
    p2, p1, p0 = np.polyfit(logn, loss, 2)
    if p2 <= 0:
        return "loss is not convex in log N (parabola opens downward)"
    x_opt = -p1 / (2 * p2)
    d1, d0 = np.polyfit(logn, logd, 1)
    return {
        "N_opt": float(np.exp(x_opt)),
        "D_opt": float(np.exp(d1 * x_opt + d0)),
        "loss_opt": float(p0 - p1 * p1 / (4 * p2)),
        "parabola": [float(p2), float(p1), float(p0)],
        # A vertex outside the sampled sizes is an extrapolation; Hoffmann et al. centre their
        # sweeps so that it is not.
        "interior": bool(logn.min() <= x_opt <= logn.max()),
    }


def fit_isoflop(
    N,
    D,
    loss,
    C=None,
    *,
    flops_per_param_token: float = 6.0,
    rtol: float = 0.05,
    require_interior: bool = False,
) -> dict:
    """IsoFLOP minima per budget and the power laws N_opt(C), D_opt(C).

    Args:
      N: parameter counts, one per run.
      D: training tokens, one per run.
      loss: final losses, one per run.
      C: compute per run; default ``flops_per_param_token * N * D``.
      flops_per_param_token: the 6 of C = 6ND when C is not given.
      rtol: runs whose compute agrees within this relative tolerance share a budget.
      require_interior: drop budgets whose parabola vertex lies outside the sampled sizes.

    Returns:
      dict with ``budgets`` (per budget: ``C``, ``N_opt``, ``D_opt``, ``loss_opt``, ``parabola``
      coefficients in log N, ``interior``, ``indices`` of its runs), ``skipped`` (budgets without a
      usable minimum and why), and, when at least two budgets remain, ``a``, ``N_coef``, ``b``,
      ``D_coef`` with ``N_opt = N_coef * C**a`` and ``D_opt = D_coef * C**b``.
    """
    N = _as_positive("N", N)
    n = N.shape[0]
    D = _as_positive("D", D, n)
    loss = _as_positive("loss", loss, n)
    C = flops_per_param_token * N * D if C is None else _as_positive("C", C, n)

    budgets, skipped = [], []
    for idx in group_by_compute(C, rtol=rtol):
        c_budget = float(np.exp(np.log(C[idx]).mean()))
        found = _budget_minimum(np.log(N[idx]), np.log(D[idx]), loss[idx])
        if isinstance(found, dict) and require_interior and not found["interior"]:
            found = "parabola vertex outside the sampled model sizes"
        if isinstance(found, str):
            skipped.append({"C": c_budget, "n_runs": int(idx.size), "reason": found})
            continue
        budgets.append({"C": c_budget, **found, "n_runs": int(idx.size), "indices": idx.tolist()})

    out = {"budgets": budgets, "skipped": skipped}
    if len(budgets) < 2:
        out["error"] = f"need minima at >= 2 compute budgets for the exponents, got {len(budgets)}"
        return out
    logc = np.log([b["C"] for b in budgets])
    a, log_kn = np.polyfit(logc, np.log([b["N_opt"] for b in budgets]), 1)
    b, log_kd = np.polyfit(logc, np.log([b["D_opt"] for b in budgets]), 1)
    out.update(a=float(a), N_coef=float(np.exp(log_kn)), b=float(b), D_coef=float(np.exp(log_kd)))
    return out


def predict_isoflop(fit: dict, C) -> tuple[np.ndarray, np.ndarray]:
    """Compute-optimal (N, D) at compute C from a ``fit_isoflop`` result."""
    C = np.asarray(C, dtype=np.float64)
    return fit["N_coef"] * C ** fit["a"], fit["D_coef"] * C ** fit["b"]
