"""Mutation testing, round 6: evaluation/scaling_isoflop.py behaviours the other tests left
open, against hand-computed values."""

import numpy as np
import pytest

from flaxlm.evaluation.scaling_isoflop import fit_isoflop


def test_a_budgets_compute_is_the_geometric_mean_of_its_runs():
    """Runs within rtol share a budget whose C is the centre of their log C (the axis the power
    laws are fitted on): exp(mean log C), not the arithmetic mean."""
    N = np.array([1e6, 2e6, 4e6, 1e7, 2e7, 4e7])
    C = np.array([1.00e18, 1.04e18, 1.02e18, 1.00e20, 1.04e20, 1.02e20])
    D = C / (6 * N)
    x = np.log(N)
    loss = np.r_[(x[:3] - np.log(2e6)) ** 2, (x[3:] - np.log(2e7)) ** 2] + 2.0
    fit = fit_isoflop(N, D, loss, C=C)
    got = [b["C"] for b in fit["budgets"]]
    want = [np.exp(np.log(C[:3]).mean()), np.exp(np.log(C[3:]).mean())]
    np.testing.assert_allclose(got, want, rtol=1e-9)
    assert abs(got[0] - C[:3].mean()) > 1e-5 * got[0]  # (the two means differ here)
    np.testing.assert_allclose([b["N_opt"] for b in fit["budgets"]], [2e6, 2e7], rtol=1e-6)
    assert fit["a"] == pytest.approx(np.log(10) / np.log(want[1] / want[0]), rel=1e-6)


def test_predict_isoflop_uses_each_power_law_its_own_exponent():
    from flaxlm.evaluation.scaling_isoflop import predict_isoflop

    fit = {"N_coef": 2.0, "a": 0.5, "D_coef": 3.0, "b": 0.25}
    n, d = predict_isoflop(fit, [16.0, 1e8])
    np.testing.assert_allclose(n, [8.0, 2e4])
    np.testing.assert_allclose(d, [6.0, 300.0])


def test_an_extrapolated_vertex_is_kept_unless_interior_is_required():
    """A budget whose parabola's vertex lies beyond its largest model is kept, marked
    interior=False (an extrapolation); require_interior=True skips it, saying why."""
    N = np.array([1e6, 2e6, 4e6, 1e7, 2e7, 4e7])
    C = np.array([1e18] * 3 + [1e20] * 3)
    x = np.log(N)
    loss = np.r_[(x[:3] - np.log(8e6)) ** 2, (x[3:] - np.log(2e7)) ** 2] + 2.0
    fit = fit_isoflop(N, C / (6 * N), loss, C=C)
    assert [b["interior"] for b in fit["budgets"]] == [False, True]
    assert fit["budgets"][0]["N_opt"] == pytest.approx(8e6, rel=1e-6)
    strict = fit_isoflop(N, C / (6 * N), loss, C=C, require_interior=True)
    assert [b["N_opt"] for b in strict["budgets"]] == [pytest.approx(2e7, rel=1e-6)]
    assert strict["skipped"][0]["reason"] == "parabola vertex outside the sampled model sizes"


def test_compute_defaults_to_flops_per_param_token_times_n_times_d():
    """Without C, each run's compute is flops_per_param_token·N·D: the budgets scale with it,
    the optima (read off N and D) do not, and the exponents move by the budgets' rescaling
    alone (a log-log slope is unchanged, its coefficient is not)."""
    N = np.array([1e6, 2e6, 4e6, 1e7, 2e7, 4e7])
    D = np.array([1e9 / n for n in N[:3]] + [1e11 / n for n in N[3:]])
    x = np.log(N)
    loss = np.r_[(x[:3] - np.log(2e6)) ** 2, (x[3:] - np.log(2e7)) ** 2] + 2.0
    six, two = fit_isoflop(N, D, loss), fit_isoflop(N, D, loss, flops_per_param_token=2.0)
    np.testing.assert_allclose([b["C"] for b in six["budgets"]], [6e9, 6e11], rtol=1e-9)
    np.testing.assert_allclose([b["C"] for b in two["budgets"]], [2e9, 2e11], rtol=1e-9)
    assert two["a"] == pytest.approx(six["a"]) and two["b"] == pytest.approx(six["b"])
    assert two["N_coef"] == pytest.approx(six["N_coef"] * 3 ** six["a"], rel=1e-6)
