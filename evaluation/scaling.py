"""Scaling-law fits: power laws with an irreducible term, the Chinchilla parametric law, and
compute-optimal allocation.

Two families of law, both fitted the same robust way:

* ``L(X) = E + A / X**alpha`` for one scale variable X (parameters N, tokens D or compute C;
  Kaplan et al. 2020 with the irreducible term of Henighan et al. 2020).
* ``L(N, D) = E + A / N**alpha + B / D**beta`` (Hoffmann et al. 2022, "approach 3").

Fitting follows approach 3 of Hoffmann et al.: write the law in log space as a log-sum-exp,
``log L_hat = logsumexp(a - alpha log N, b - beta log D, e)`` with ``A = exp(a)``, ``B = exp(b)``,
``E = exp(e)``, and minimise the Huber loss (delta = 1e-3) of ``log L_hat - log L`` with L-BFGS
from a grid of initialisations. Two details differ from a literal transcription, neither changes
the minimiser:

* Each scale variable is divided by its geometric mean before the fit, so ``a`` and ``b`` live
  near the log of the loss instead of near ``alpha * 20``; the grid then covers the plausible
  region with a few points and is built from the data (``E`` as a fraction of the smallest loss).
  Results are converted back to the unscaled ``A``, ``B``.
* The objective is divided by ``delta**2``. Summed Huber values of well-fitting laws are ~1e-6,
  and L-BFGS-B's relative stopping rule (``ftol`` against ``max(|f|, 1)``) then stops at the first
  step; Besiroglu et al. (2024) traced the badly-fitted published Chinchilla parameters to this.

The whole grid is scored at once (vectorised) and L-BFGS is run from the ``n_starts`` best grid
points; the best local optimum wins.

Compute-optimal allocation for ``C = 6 N D`` (Hoffmann et al., eq. 4):
``G = (alpha A / (beta B))**(1/(alpha+beta))``, ``N* = G (C/6)**(beta/(alpha+beta))``,
``D* = (C/6)**(alpha/(alpha+beta)) / G``.

IsoFLOP parabolas (approach 2) live in ``scaling_isoflop``; bootstrap intervals in
``scaling_bootstrap``; plots in ``scaling_plots``; reading a run table and writing a report in
``scaling_report``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Sequence

import numpy as np
from scipy import optimize, special

try:
    import threadpoolctl
except ImportError:  # optional; the fits are identical without it, only slower on busy CPUs
    threadpoolctl = None

HUBER_DELTA = 1e-3
# Grid of initialisations in scaled coordinates (see module docstring). Exponents as in Hoffmann
# et al.; E as a fraction of the smallest observed loss; each reducible term as a fraction of the
# smallest loss at the geometric-mean scale.
EXPONENT_GRID = (0.0, 0.5, 1.0, 1.5, 2.0)
E_FRACTION_GRID = (0.05, 0.25, 0.5, 0.75, 0.9, 0.98)
TERM_FRACTION_GRID = (0.003, 0.03, 0.1, 0.3, 1.0)
MAX_EXPONENT = 10.0  # L-BFGS-B bound; exponents are also kept >= 0 (a law must not rise with X).


def _as_positive(name: str, x, n: int | None = None) -> np.ndarray:
    """1-D float array, finite and > 0, optionally of length n; errors name the argument."""
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name}: expected {n} values (one per run), got {arr.shape[0]}")
    bad = ~np.isfinite(arr) | (arr <= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}[{i}] = {arr[i]!r}: scaling fits need finite positive values")
    return arr


@functools.cache
def _blas_controller():
    return threadpoolctl.ThreadpoolController() if threadpoolctl else None


def single_threaded_blas():
    """Context in which BLAS (incl. the one inside scipy's L-BFGS-B) runs on one thread.

    The optimisation problems here have 3-5 parameters; OpenBLAS's worker threads buy nothing and,
    on a machine whose cores are shared, their spin-waiting made bootstrap fits 10-20x slower
    (measured on 2 busy cores). A no-op when threadpoolctl is not installed.
    """
    ctrl = _blas_controller()
    return ctrl.limit(limits=1, user_api="blas") if ctrl else contextlib.nullcontext()


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals and its derivative."""
    a = np.abs(r)
    quad = a <= delta
    value = np.where(quad, 0.5 * r * r, delta * (a - 0.5 * delta))
    return value, np.clip(r, -delta, delta)


def _lse_terms(theta: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Log-space terms of the law. theta (..., 2k+1) = [c_1..c_k, g_1..g_k, e]; u (n, k)."""
    k = u.shape[1]
    c, g, e = theta[..., :k], theta[..., k : 2 * k], theta[..., 2 * k]
    reducible = c[..., None, :] - g[..., None, :] * u  # (..., n, k)
    irreducible = np.broadcast_to(e[..., None, None], reducible.shape[:-1] + (1,))
    return np.concatenate([reducible, irreducible], axis=-1)  # (..., n, k+1)


def _objective(theta: np.ndarray, u: np.ndarray, y: np.ndarray, delta: float):
    """Mean Huber loss / delta^2 of log residuals, and its gradient with respect to theta."""
    k = u.shape[1]
    t = _lse_terms(theta, u)  # (n, k+1)
    m = t.max(axis=1, keepdims=True)
    w = np.exp(t - m)
    z = w.sum(axis=1, keepdims=True)
    pred = m[:, 0] + np.log(z[:, 0])
    w /= z  # softmax weights: d pred / d term
    h, dh = _huber(pred - y, delta)
    scale = 1.0 / (y.shape[0] * delta * delta)
    dr = dh * scale
    grad = np.empty_like(theta)
    grad[:k] = (dr[:, None] * w[:, :k]).sum(axis=0)
    grad[k : 2 * k] = -(dr[:, None] * w[:, :k] * u).sum(axis=0)
    grad[2 * k] = (dr * w[:, k]).sum()
    return h.sum() * scale, grad


def _grid_objective(thetas: np.ndarray, u: np.ndarray, y: np.ndarray, delta: float) -> np.ndarray:
    """Objective for many parameter vectors at once: thetas (G, 2k+1) -> (G,)."""
    t = _lse_terms(thetas, u)  # (G, n, k+1)
    m = t.max(axis=-1)
    pred = m + np.log(np.exp(t - m[..., None]).sum(axis=-1))
    h, _ = _huber(pred - y, delta)
    return h.mean(axis=-1) / (delta * delta)


def _init_grid(k: int, y_min: float) -> np.ndarray:
    """All combinations of the initialisation grid for a k-term law, scaled coordinates."""
    c_vals = [y_min + np.log(f) for f in TERM_FRACTION_GRID]
    e_vals = [y_min + np.log(f) for f in E_FRACTION_GRID]
    rows = [
        (*cs, *gs, e)
        for cs in itertools.product(c_vals, repeat=k)
        for gs in itertools.product(EXPONENT_GRID, repeat=k)
        for e in e_vals
    ]
    return np.asarray(rows, dtype=np.float64)


def _minimise_from(starts, u, y, delta, k):
    """Run L-BFGS-B from every start; return the result with the lowest objective."""
    bounds = [(None, None)] * k + [(0.0, MAX_EXPONENT)] * k + [(None, None)]
    best = None
    for x0 in starts:
        x0 = np.array(x0, dtype=np.float64)
        x0[k : 2 * k] = np.clip(x0[k : 2 * k], 0.0, MAX_EXPONENT)  # a warm start may sit outside
        res = optimize.minimize(
            _objective,
            x0,
            args=(u, y, delta),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10},
        )
        if best is None or res.fun < best.fun:
            best = res
    return best


def fit_lse_law(
    x_cols: Sequence[np.ndarray],
    loss: np.ndarray,
    *,
    delta: float = HUBER_DELTA,
    n_starts: int = 10,
    inits: Sequence[Sequence[float]] = (),
) -> dict:
    """Fit ``L = E + sum_j A_j / x_j**g_j`` by Huber regression of log residuals (approach 3).

    Args:
      x_cols: k arrays of positive scale variables, one value per run.
      loss: observed losses, one per run.
      delta: Huber threshold on log-loss residuals.
      n_starts: L-BFGS starts taken from the best points of the initialisation grid (0: only
        ``inits``).
      inits: extra starting points in unscaled log coordinates ``[a_1..a_k, g_1..g_k, e]``
        (``a_j = log A_j``), e.g. a previous fit to warm-start a bootstrap refit.

    Returns:
      dict with ``E``, ``A`` (list), ``exponents`` (list), ``objective`` (mean Huber / delta^2 at
      the optimum), ``rms_log_residual``, ``n_runs`` and ``converged`` (L-BFGS reported success
      or the projected gradient is negligible).
    """
    y = np.log(_as_positive("loss", loss))
    xs = [_as_positive(f"x[{j}]", x, y.shape[0]) for j, x in enumerate(x_cols)]
    k = len(xs)
    if y.shape[0] < 2 * k + 2:
        raise ValueError(f"need at least {2 * k + 2} runs to fit {2 * k + 1} parameters")
    logx = np.stack([np.log(x) for x in xs], axis=1)  # (n, k)
    shift = logx.mean(axis=0)  # log of the geometric mean of each scale variable
    u = logx - shift

    starts = []
    if n_starts > 0:
        grid = _init_grid(k, float(y.min()))
        scores = _grid_objective(grid, u, y, delta)
        starts = list(grid[np.argsort(scores)[:n_starts]])
    for init in inits:  # unscaled a_j -> scaled c_j = a_j - g_j * shift_j
        v = np.asarray(init, dtype=np.float64).copy()
        v[:k] -= v[k : 2 * k] * shift
        starts.append(v)

    if not starts:
        raise ValueError("fit_lse_law: no starting points (n_starts=0 and no inits)")
    with single_threaded_blas():
        best = _minimise_from(starts, u, y, delta, k)
    theta = best.x
    # L-BFGS-B often ends with "ABNORMAL_TERMINATION_IN_LNSRCH" at the optimum: the Huber kink
    # leaves no representable descent step. Judge convergence by the projected gradient instead.
    grad = _objective(theta, u, y, delta)[1]
    at_lower = np.zeros_like(theta, dtype=bool)
    at_lower[k : 2 * k] = (theta[k : 2 * k] <= 0.0) & (grad[k : 2 * k] > 0)
    proj_grad = float(np.abs(np.where(at_lower, 0.0, grad)).max())
    c, g, e = theta[:k], theta[k : 2 * k], theta[2 * k]
    a = c + g * shift
    resid = special.logsumexp(_lse_terms(theta, u), axis=1) - y
    return {
        "E": float(np.exp(e)),
        "A": [float(v) for v in np.exp(a)],
        "log_A": [float(v) for v in a],
        "exponents": [float(v) for v in g],
        "objective": float(best.fun),
        "rms_log_residual": float(np.sqrt(np.mean(resid**2))),
        "n_runs": int(y.shape[0]),
        "converged": bool(best.success or proj_grad <= 1e-4 * max(1.0, best.fun)),
    }


def fit_power_law(x, loss, *, delta: float = HUBER_DELTA, n_starts: int = 10) -> dict:
    """Fit ``L(X) = E + A / X**alpha`` (X = params, tokens or compute) robustly in log space.

    Returns:
      dict(E=, A=, alpha=) plus ``objective``, ``rms_log_residual``, ``n_runs``, ``converged``.
    """
    fit = fit_lse_law([x], loss, delta=delta, n_starts=n_starts)
    return {
        "E": fit["E"],
        "A": fit["A"][0],
        "alpha": fit["exponents"][0],
        **{k: fit[k] for k in ("objective", "rms_log_residual", "n_runs", "converged")},
    }


def predict_power_law(fit: dict, x) -> np.ndarray:
    """Loss of a fitted ``E + A / X**alpha`` law at X."""
    x = np.asarray(x, dtype=np.float64)
    return fit["E"] + fit["A"] * x ** (-fit["alpha"])


def fit_parametric(
    N,
    D,
    loss,
    *,
    delta: float = HUBER_DELTA,
    n_starts: int = 10,
    init: dict | None = None,
) -> dict:
    """Fit ``L(N, D) = E + A / N**alpha + B / D**beta`` (Hoffmann et al. 2022, approach 3).

    Args:
      N: parameter counts, one per run.
      D: training tokens, one per run.
      loss: final losses, one per run.
      delta: Huber threshold on log-loss residuals (1e-3 as in the paper).
      n_starts: L-BFGS starts from the best points of the initialisation grid.
      init: a previous ``fit_parametric`` result to start from as well (bootstrap refits).

    Returns:
      dict(E=, A=, B=, alpha=, beta=) plus ``objective``, ``rms_log_residual``, ``n_runs``,
      ``converged``.
    """
    inits = []
    if init is not None:
        inits.append(
            [
                np.log(init["A"]),
                np.log(init["B"]),
                init["alpha"],
                init["beta"],
                np.log(init["E"]),
            ]
        )
    fit = fit_lse_law([N, D], loss, delta=delta, n_starts=n_starts, inits=inits)
    return {
        "E": fit["E"],
        "A": fit["A"][0],
        "B": fit["A"][1],
        "alpha": fit["exponents"][0],
        "beta": fit["exponents"][1],
        **{k: fit[k] for k in ("objective", "rms_log_residual", "n_runs", "converged")},
    }


def predict_parametric(fit: dict, N, D) -> np.ndarray:
    """Loss of a fitted parametric law at (N, D); broadcasts."""
    N = np.asarray(N, dtype=np.float64)
    D = np.asarray(D, dtype=np.float64)
    return fit["E"] + fit["A"] * N ** (-fit["alpha"]) + fit["B"] * D ** (-fit["beta"])


def compute_optimal(fit: dict, C, *, flops_per_param_token: float = 6.0) -> dict:
    """Compute-optimal N*(C), D*(C) and the loss there, from a parametric fit.

    Minimises ``L(N, D)`` subject to ``C = k N D`` (k = 6 for training a dense transformer).

    Returns:
      dict with arrays ``N``, ``D``, ``loss`` (shaped like C) and the exponents ``a`` (N* ∝ C^a),
      ``b`` (D* ∝ C^b) and the constant ``G``.
    """
    alpha, beta = fit["alpha"], fit["beta"]
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"compute_optimal needs alpha, beta > 0; got {alpha=}, {beta=}")
    a = beta / (alpha + beta)
    b = alpha / (alpha + beta)
    G = (alpha * fit["A"] / (beta * fit["B"])) ** (1.0 / (alpha + beta))
    nd = np.asarray(C, dtype=np.float64) / flops_per_param_token
    n_opt = G * nd**a
    d_opt = nd**b / G
    return {
        "N": n_opt,
        "D": d_opt,
        "loss": predict_parametric(fit, n_opt, d_opt),
        "a": a,
        "b": b,
        "G": G,
    }


def pareto_frontier(x, loss) -> np.ndarray:
    """Indices of runs not beaten by any run with x' <= x (the L(C) frontier, Kaplan et al.).

    Returns indices sorted by x; with ties in x only the lowest loss is kept.
    """
    x = np.asarray(x, dtype=np.float64)
    loss = np.asarray(loss, dtype=np.float64)
    order = np.lexsort((loss, x))
    keep, best = [], np.inf
    for i in order:
        if loss[i] < best:
            keep.append(int(i))
            best = loss[i]
    return np.asarray(keep, dtype=np.int64)


def envelope(x, loss) -> tuple[np.ndarray, np.ndarray]:
    """For each distinct x, the lowest loss: the runs an L(N) or L(D) law should describe."""
    x = np.asarray(x, dtype=np.float64)
    loss = np.asarray(loss, dtype=np.float64)
    xs = np.unique(x)
    return xs, np.array([loss[x == v].min() for v in xs])
