"""Scaling fits against independent references: scipy on the same objectives, closed forms checked
by direct minimisation, and synthetic sweeps whose true laws are known.

The references never call into ``flaxlm.evaluation.scaling`` internals: the Huber objective is
scipy's own (``least_squares(loss="huber")`` is exactly the Huber loss of the residuals for
``f_scale = delta``), minimised in unscaled log coordinates from starts near the truth.
"""

import csv
import itertools

import numpy as np
import pytest
from scipy import optimize

from flaxlm.evaluation.scaling import (
    HUBER_DELTA,
    compute_optimal,
    envelope,
    fit_parametric,
    fit_power_law,
    pareto_frontier,
    predict_parametric,
    predict_power_law,
)
from flaxlm.evaluation.scaling_bootstrap import bootstrap
from flaxlm.evaluation.scaling_isoflop import fit_isoflop
from flaxlm.evaluation.scaling_report import fit_report, load_runs

TRUE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def _sweep(noise: float, seed: int = 0):
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e7, 1e9, 6), np.geomspace(3e8, 3e10, 6)))
    rng = np.random.default_rng(seed)
    return N, D, predict_parametric(TRUE, N, D) * np.exp(noise * rng.standard_normal(N.shape))


def _reference_parametric(N, D, loss, delta=HUBER_DELTA):
    """Huber fit of log L = logsumexp(a - alpha log N, b - beta log D, e) with scipy."""

    def resid(p):
        a, b, al, be, e = p
        t = np.stack([a - al * np.log(N), b - be * np.log(D), np.full(N.shape, e)])
        return np.logaddexp.reduce(t, axis=0) - np.log(loss)

    t = [np.log(TRUE["A"]), np.log(TRUE["B"]), TRUE["alpha"], TRUE["beta"], np.log(TRUE["E"])]
    best = None
    for s in (0.7, 1.0, 1.3):
        x0 = np.array(t) * np.array([s, s, s, s, 1.0])
        r = optimize.least_squares(resid, x0, loss="huber", f_scale=delta, xtol=1e-15,
                                   ftol=1e-15, gtol=1e-15, max_nfev=20000)  # fmt: skip
        if best is None or r.cost < best.cost:
            best = r
    a, b, al, be, e = best.x
    fit = dict(E=np.exp(e), A=np.exp(a), B=np.exp(b), alpha=al, beta=be)
    return fit, best.cost / (N.size * delta**2)  # the library reports mean Huber / delta^2


def test_parametric_fit_is_the_huber_optimum_found_by_scipy():
    N, D, loss = _sweep(noise=0.01, seed=5)  # noisy enough that the optimum is not the truth
    fit = fit_parametric(N, D, loss)
    ref, ref_objective = _reference_parametric(N, D, loss)
    assert fit["objective"] <= ref_objective * (1 + 1e-6)
    for k in ("E", "alpha", "beta"):
        assert fit[k] == pytest.approx(ref[k], rel=2e-3), k
    big = (4e9, 8e10)
    assert predict_parametric(fit, *big) == pytest.approx(predict_parametric(ref, *big), rel=1e-4)


def test_parametric_errors_shrink_with_noise_and_extrapolate_in_compute():
    c_max = 6 * 1e9 * 3e10
    targets = [compute_optimal(TRUE, m * c_max) for m in (4.0, 100.0)]
    errors = []
    for noise in (0.01, 0.001, 0.0):
        fit = fit_parametric(*_sweep(noise, seed=3))
        pred_err = max(
            abs(float(predict_parametric(fit, t["N"], t["D"]) / t["loss"]) - 1) for t in targets
        )
        errors.append((abs(fit["alpha"] - 0.34), abs(fit["beta"] - 0.28), pred_err))
    (a1, b1, p1), (a2, b2, p2), (a3, b3, p3) = errors
    assert a2 < a1 and b2 < b1 and p2 < p1
    assert a2 < 0.01 and b2 < 0.01 and p2 < 0.003  # 0.1% noise: 4x and 100x compute within 0.3%
    assert a3 < 1e-4 and b3 < 1e-4 and p3 < 1e-5
    assert p1 < 0.02


def test_power_law_in_compute_matches_scipy_on_the_same_objective():
    C = np.geomspace(1e18, 1e23, 12)
    rng = np.random.default_rng(7)
    loss = (1.7 + 2e3 * C**-0.15) * np.exp(0.003 * rng.standard_normal(C.shape))

    def resid(p):  # log residuals of E + A C^-alpha, parametrised (log E, log A, alpha)
        return np.logaddexp(p[0], p[1] - p[2] * np.log(C)) - np.log(loss)

    x0 = [np.log(1.7), np.log(2e3), 0.15]
    for delta, kwargs in ((HUBER_DELTA, dict(loss="huber", f_scale=HUBER_DELTA)), (1.0, {})):
        ref = optimize.least_squares(resid, x0, xtol=1e-15, ftol=1e-15, gtol=1e-15, **kwargs)
        fit = fit_power_law(C, loss, delta=delta)
        assert fit["alpha"] == pytest.approx(ref.x[2], rel=1e-3), delta
        assert fit["E"] == pytest.approx(np.exp(ref.x[0]), rel=1e-3), delta
        assert fit["objective"] <= ref.cost / (C.size * delta**2) * (1 + 1e-6)
    fit = fit_power_law(C, loss)
    assert fit["alpha"] == pytest.approx(0.15, abs=0.01)
    # 0.3% noise on 12 runs over 5 decades; measured +0.2% at 4x and +0.5% at 100x compute.
    for m, tol in ((4, 0.005), (100, 0.01)):
        c = m * C.max()
        assert predict_power_law(fit, c) == pytest.approx(1.7 + 2e3 * c**-0.15, rel=tol)


@pytest.mark.parametrize("k", [6.0, 6.6])
def test_compute_optimal_matches_direct_minimisation(k):
    for C in (1e19, 1e22, 1e25):
        res = optimize.minimize_scalar(
            lambda x, C=C: float(predict_parametric(TRUE, np.exp(x), C / (k * np.exp(x)))),
            bounds=(np.log(1e3), np.log(C / k / 1e3)),
            method="bounded",
            options={"xatol": 1e-10},
        )
        opt = compute_optimal(TRUE, C, flops_per_param_token=k)
        assert float(opt["N"]) == pytest.approx(np.exp(res.x), rel=1e-4)
        assert k * float(opt["N"]) * float(opt["D"]) == pytest.approx(C, rel=1e-12)
        assert float(opt["loss"]) == pytest.approx(res.fun, rel=1e-10)


def test_isoflop_vertices_and_power_laws_match_numpy_least_squares():
    # Exact parabolas in log N with known vertices N_opt = 0.1 C^0.5; D = C / (6 N).
    rng = np.random.default_rng(0)
    budgets = np.geomspace(1e18, 1e21, 4)
    N, D, loss = [], [], []
    for c in budgets:
        x_opt = np.log(0.1 * c**0.5)
        x = x_opt + np.linspace(-1.5, 1.5, 7) + rng.uniform(-0.1, 0.1, 7)
        N.extend(np.exp(x))
        D.extend(c / (6 * np.exp(x)))
        loss.extend(2.0 + 0.05 * (x - x_opt) ** 2 + 0.3 * c**-0.05)
    iso = fit_isoflop(np.array(N), np.array(D), np.array(loss))
    assert [b["C"] for b in iso["budgets"]] == pytest.approx(budgets, rel=1e-12)
    for b, c in zip(iso["budgets"], budgets):
        assert b["N_opt"] == pytest.approx(0.1 * c**0.5, rel=1e-8)
        assert b["D_opt"] == pytest.approx(c / (6 * 0.1 * c**0.5), rel=1e-8)
        assert b["loss_opt"] == pytest.approx(2.0 + 0.3 * c**-0.05, rel=1e-10)
    assert iso["a"] == pytest.approx(0.5, abs=1e-8) and iso["b"] == pytest.approx(0.5, abs=1e-8)
    assert iso["N_coef"] == pytest.approx(0.1, rel=1e-6)
    assert iso["D_coef"] == pytest.approx(1 / 0.6, rel=1e-6)


def test_bootstrap_resamples_whole_runs_and_takes_percentiles():
    x = np.arange(20.0)
    seen = []

    def fit_fn(x, y):
        np.testing.assert_array_equal(y, 3 * x)  # columns stay paired: the unit is a run
        seen.append(np.unique(x).size)
        return {"mean": float(x.mean())}

    boot = bootstrap(fit_fn, {"x": x, "y": 3 * x}, n_boot=300, level=0.9, seed=1)
    assert max(seen[1:]) < 20  # with replacement: runs repeat
    s = boot["samples"]["mean"]
    iv = boot["intervals"]["mean"]
    assert (iv["lo"], iv["hi"]) == pytest.approx(tuple(np.quantile(s, [0.05, 0.95])))
    assert iv["estimate"] == pytest.approx(9.5)


def test_bootstrap_percentile_interval_coverage_is_nominal():
    rng = np.random.default_rng(0)
    hits, reps = 0, 300
    for i in range(reps):
        y = rng.standard_normal(40)
        iv = bootstrap(lambda y: {"m": float(y.mean())}, {"y": y}, n_boot=200, seed=i)
        hits += iv["intervals"]["m"]["lo"] <= 0.0 <= iv["intervals"]["m"]["hi"]
    assert 0.89 <= hits / reps <= 0.99  # nominal 0.95 (percentile bootstrap runs a bit low)


def _rows(N, D, loss, k):
    return [
        {
            "n_params": n,
            "n_params_nonembed": n,
            "tokens": d,
            "flops": k * n * d,
            "final_loss": lo,
            "heldout_loss": lo,
        }  # fmt: skip
        for n, d, lo in zip(N, D, loss)
    ]


def test_report_compute_optimal_uses_the_compute_columns_convention():
    # Exact FLOPs = 6.6 N D: the N*, D* reported at a budget must cost that budget in the same
    # count (with the hard-coded 6 they cost 10% more than the budget they are reported at).
    N, D, loss = _sweep(noise=0.0)
    report = fit_report(_rows(N, D, loss, 6.6), None, compute="flops", n_boot=0)
    at = report["compute_optimal"]["at_budgets"]
    assert at and report["settings"]["flops_per_param_token"] == pytest.approx(6.6)
    for p in at:
        assert 6.6 * p["N"] * p["D"] == pytest.approx(p["C"], rel=1e-9)
        assert p["N"] == pytest.approx(
            float(compute_optimal(TRUE, p["C"], flops_per_param_token=6.6)["N"]), rel=1e-3
        )
    six = fit_report(_rows(N, D, loss, 6.6), None, n_boot=0)["compute_optimal"]["at_budgets"]
    for p in six:
        assert 6 * p["N"] * p["D"] == pytest.approx(p["C"], rel=1e-9)


@pytest.mark.parametrize("bad", ["nan", "inf", "-1.0", "0"])
def test_load_runs_names_the_row_with_a_non_finite_or_non_positive_value(tmp_path, bad):
    N, D, loss = _sweep(noise=0.0)
    rows = _rows(N[:4], D[:4], loss[:4], 6.0)
    rows[2]["heldout_loss"] = bad  # a diverged run
    with open(tmp_path / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(ValueError, match=r"runs\.csv:4: column 'heldout_loss' = '" + bad):
        load_runs(tmp_path / "runs.csv")
    # optional columns are only read, not judged
    cols = load_runs(tmp_path / "runs.csv", required=["n_params", "tokens"])
    np.testing.assert_equal(cols["heldout_loss"][2], float(bad))


def test_grid_covers_the_objective_landscape():
    # The fit keeps its best over several starts: a worse-than-truth optimum is never returned on
    # noise-free data from any of these (different) sweep layouts.
    for lo_n, lo_d in itertools.product((1e6, 1e8), (1e8, 1e10)):
        N, D = (a.ravel() for a in np.meshgrid(np.geomspace(lo_n, 100 * lo_n, 5),
                                               np.geomspace(lo_d, 100 * lo_d, 5)))  # fmt: skip
        fit = fit_parametric(N, D, predict_parametric(TRUE, N, D))
        assert fit["alpha"] == pytest.approx(0.34, rel=1e-3)
        assert fit["beta"] == pytest.approx(0.28, rel=1e-3)


def test_bootstrap_interval_leaves_out_undefined_samples():
    """A resample whose quantity is undefined (NaN) is left out of that interval, and counted,
    instead of making the whole interval NaN."""
    from flaxlm.evaluation.scaling_bootstrap import bootstrap

    x = np.arange(20, dtype=np.float64)

    def fit(x):  # undefined whenever the resample misses run 0
        return {"mean": float(x.mean()) if 0 in x else float("nan"), "max": float(x.max())}

    out = bootstrap(fit, {"x": x}, n_boot=100, seed=0)
    iv = out["intervals"]["mean"]
    assert 0 < iv["n"] < 100 and np.isfinite([iv["lo"], iv["hi"], iv["std"]]).all()
    assert iv["lo"] <= 9.5 <= iv["hi"] and out["intervals"]["max"]["n"] == 100


def test_a_run_listed_twice_is_warned(tmp_path):
    rows = [{"n_params": n, "tokens": 20 * n, "heldout_loss": 3.0 - n / 1e7, "final_loss": 3.0}
            for n in (1e6, 2e6, 4e6)]  # fmt: skip
    with pytest.warns(UserWarning, match=r"1 row\(s\) repeat an earlier row.*runs\[3\]"):
        cols = load_runs(rows + [dict(rows[1])], required=("n_params", "tokens", "heldout_loss"))
    assert len(cols["n_params"]) == 4  # kept: the warning tells, the user decides
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_runs(rows, required=("n_params", "tokens", "heldout_loss"))


def _frontier_brute_force(x, loss):
    """Kaplan's L(C) frontier by its definition: run i is on it when its loss is strictly below
    that of every run before it, a run being before i when it has less compute, or the same
    compute and a lower loss (or the same loss and a lower index): one run per compute value,
    and a run no better than a cheaper one is off it."""
    x, loss = np.asarray(x, np.float64), np.asarray(loss, np.float64)
    keep = []
    for i in range(len(x)):
        before = [j for j in range(len(x)) if j != i and (
            x[j] < x[i] or (x[j] == x[i] and (loss[j], j) < (loss[i], i)))]  # fmt: skip
        if all(loss[i] < loss[j] for j in before):
            keep.append(i)
    return sorted(keep, key=lambda i: (x[i], loss[i]))


def test_pareto_frontier_keeps_strict_improvements_only():
    # a duplicated run (x 2), a plateau (x 3 no better than x 2), a tie at x 4, a plateau at x 5
    x = [1.0, 2.0, 2.0, 3.0, 4.0, 4.0, 5.0]
    loss = [3.0, 2.5, 2.5, 2.5, 2.0, 1.0, 1.0]
    assert _frontier_brute_force(x, loss) == [0, 1, 5]
    np.testing.assert_array_equal(pareto_frontier(x, loss), [0, 1, 5])
    rng = np.random.default_rng(0)
    for _ in range(20):  # coarse values: many ties in x and in loss
        x, loss = rng.integers(1, 6, 12).astype(float), rng.integers(1, 5, 12).astype(float)
        np.testing.assert_array_equal(pareto_frontier(x, loss), _frontier_brute_force(x, loss))


def test_envelope_is_the_lowest_loss_of_each_distinct_x():
    """L(N) and L(D) are fitted on the best run of each size (the envelope): for each distinct
    x, ascending, the lowest loss among its runs."""
    rng = np.random.default_rng(1)
    x = rng.integers(1, 5, 15).astype(float)
    loss = rng.uniform(1.0, 3.0, 15)
    xs, best = envelope(x, loss)
    want = sorted({v: min(lo for u, lo in zip(x, loss) if u == v) for v in x}.items())
    np.testing.assert_array_equal(xs, [v for v, _ in want])
    np.testing.assert_array_equal(best, [lo for _, lo in want])
