"""Bootstrap confidence intervals for scaling-law fits: resample runs, refit, take percentiles.

The unit of resampling is a run (one row of the sweep table), drawn with replacement, so the
intervals reflect how much the fit depends on which runs happened to be in the sweep, including
their seed noise. Intervals are percentile intervals of the refitted quantities.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from flaxlm.evaluation.scaling import (
    HUBER_DELTA,
    compute_optimal,
    fit_parametric,
    predict_parametric,
    single_threaded_blas,
)

PARAMETRIC_KEYS = ("E", "A", "B", "alpha", "beta")


def _interval(samples: np.ndarray, estimate: float, level: float) -> dict:
    """Percentile interval over the finite samples; `n` counts them. A quantity a resample
    leaves undefined (NaN: e.g. the compute-optimal exponents of a refit with alpha = 0) is
    left out rather than turning the whole interval into NaN; `n` < the resamples says so."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        lo = hi = float("nan")
    else:
        lo, hi = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return {
        "estimate": float(estimate),
        "lo": float(lo),
        "hi": float(hi),
        "std": float(finite.std(ddof=1)) if finite.size > 1 else float("nan"),
        "n": int(finite.size),
    }


def bootstrap(
    fit_fn: Callable[..., Mapping[str, float]],
    columns: Mapping[str, np.ndarray],
    *,
    keys: Sequence[str] | None = None,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Percentile bootstrap of any fit over a table of runs.

    Args:
      fit_fn: called as ``fit_fn(**columns)`` on the full table and on each resample; returns a
        mapping with (at least) the float quantities named by ``keys``.
      columns: equal-length arrays, one value per run.
      keys: quantities to report; default every float-valued key of the full-data fit.
      n_boot: number of resamples.
      level: central coverage of the interval (0.95 -> 2.5th and 97.5th percentiles).
      seed: seed of the resampling generator (the result is deterministic given it).

    Returns:
      dict with ``fit`` (the full-data result), ``intervals`` ({key: estimate, lo, hi, std, n
        (finite samples)}),
      ``samples`` ({key: array}), ``n_boot``, ``n_failed`` (resamples whose fit raised) and
      ``level``.
    """
    cols = {k: np.asarray(v) for k, v in columns.items()}
    sizes = {v.shape[0] for v in cols.values()}
    if len(sizes) != 1:
        raise ValueError(
            f"bootstrap: columns differ in length: { {k: len(v) for k, v in cols.items()} }"
        )
    (n,) = sizes
    point = fit_fn(**cols)
    if keys is None:
        keys = [k for k, v in point.items() if isinstance(v, float)]
    rng = np.random.default_rng(seed)
    samples = {k: [] for k in keys}
    n_failed = 0
    with single_threaded_blas():
        for _ in range(n_boot):
            idx = rng.integers(0, n, size=n)
            try:
                fit = fit_fn(**{k: v[idx] for k, v in cols.items()})
            except (ValueError, np.linalg.LinAlgError, KeyError):
                # A resample can be degenerate (e.g. too few distinct sizes): count it, go on.
                n_failed += 1
                continue
            for k in keys:
                samples[k].append(fit[k])
    if n_failed == n_boot:
        raise ValueError(f"bootstrap: all {n_boot} refits failed")
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in samples.items()}
    return {
        "fit": point,
        "intervals": {k: _interval(arrays[k], point[k], level) for k in keys},
        "samples": arrays,
        "n_boot": n_boot,
        "n_failed": n_failed,
        "level": level,
    }


def bootstrap_parametric(
    N,
    D,
    loss,
    *,
    predict_at: Sequence[tuple[float, float]] = (),
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
    delta: float = HUBER_DELTA,
    n_starts: int = 0,
) -> dict:
    """Bootstrap intervals for the parametric law's parameters and for predicted losses.

    Each refit starts from the full-data optimum (found from the whole initialisation grid), plus
    the ``n_starts`` best grid points of the resample if asked: a resample is a small perturbation
    of the data, and the warm start alone keeps a refit at ~20 ms instead of ~100 ms.

    Args:
      N, D, loss: one value per run, as for ``fit_parametric``.
      predict_at: (N, D) points whose predicted loss gets an interval too.
      n_boot, level, seed: as for ``bootstrap``.
      delta: Huber threshold.
      n_starts: grid starts per refit besides the warm start.

    Returns:
      dict with ``fit`` (full-data fit), ``intervals`` for E, A, B, alpha, beta and ``a``, ``b``
      (the compute-optimal exponents N* ∝ C^a, D* ∝ C^b), ``predictions`` (per point: N, D,
      estimate, lo, hi, std), ``n_boot``, ``n_failed``, ``level``.
    """
    full = fit_parametric(N, D, loss, delta=delta)
    points = [(float(n), float(d)) for n, d in predict_at]

    def fit_fn(N, D, loss):
        if min(len(np.unique(N)), len(np.unique(D))) < 3:
            # the law's terms cannot be told apart (fit_report refuses such a table): counted
            # in n_failed, not kept as a spuriously exact refit
            raise ValueError("resample with < 3 distinct N or D")
        fit = fit_parametric(N, D, loss, delta=delta, n_starts=n_starts, init=full)
        opt = compute_optimal(fit, 1.0) if min(fit["alpha"], fit["beta"]) > 0 else None
        out = dict(fit)
        out["a"] = opt["a"] if opt else float("nan")
        out["b"] = opt["b"] if opt else float("nan")
        for i, (n, d) in enumerate(points):
            out[f"pred_{i}"] = float(predict_parametric(fit, n, d))
        return out

    keys = [*PARAMETRIC_KEYS, "a", "b", *(f"pred_{i}" for i in range(len(points)))]
    boot = bootstrap(
        fit_fn, {"N": N, "D": D, "loss": loss}, keys=keys, n_boot=n_boot, level=level, seed=seed
    )
    intervals = boot.pop("intervals")
    boot["intervals"] = {k: intervals[k] for k in (*PARAMETRIC_KEYS, "a", "b")}
    boot["predictions"] = [
        {"N": n, "D": d, **intervals[f"pred_{i}"]} for i, (n, d) in enumerate(points)
    ]
    boot["fit"] = {k: v for k, v in boot["fit"].items() if not k.startswith("pred_")}
    return boot
