"""Scaling fitters recover known laws from noisy synthetic sweeps; reports and plots are written.

Data come from the Chinchilla law (Hoffmann et al. 2022, eq. 10 constants) with multiplicative
log-normal noise of 0.3% per run, a typical seed-to-seed spread of final losses. Every generator is
seeded, so each assertion checks one fixed draw; tolerances are ~2x the errors measured on it.
"""

import csv
import json

import numpy as np
import pytest

from flaxlm.evaluation.scaling import (
    compute_optimal,
    fit_parametric,
    fit_power_law,
    predict_parametric,
    predict_power_law,
)
from flaxlm.evaluation.scaling_bootstrap import bootstrap_parametric
from flaxlm.evaluation.scaling_isoflop import fit_isoflop
from flaxlm.evaluation.scaling_report import fit_report, load_runs

TRUE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
NOISE = 0.003
# The extrapolation target: 4x the largest fitted size, at Chinchilla's 20 tokens per parameter
# (also beyond the largest fitted token count).
BIG_N = 4e9
BIG_D = 20 * BIG_N


def _grid_sweep(seed: int, noise: float = NOISE):
    """6 sizes (1e7..1e9) x 6 token counts (3e8..3e10) = 36 runs."""
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e7, 1e9, 6), np.geomspace(3e8, 3e10, 6)))
    rng = np.random.default_rng(seed)
    loss = predict_parametric(TRUE, N, D) * np.exp(noise * rng.standard_normal(N.shape))
    return N, D, loss


def _isoflop_sweep(seed: int, noise: float = NOISE):
    """6 budgets (1e18..1e21 FLOPs) x 9 sizes spanning 36x around the (jittered) true optimum."""
    rng = np.random.default_rng(seed)
    N, D = [], []
    for c in np.geomspace(1e18, 1e21, 6):
        centre = compute_optimal(TRUE, c)["N"] * np.exp(rng.uniform(-0.3, 0.3))
        n = centre * np.geomspace(1 / 6, 6, 9)
        N.extend(n)
        D.extend(c / (6 * n))
    N, D = np.array(N), np.array(D)
    loss = predict_parametric(TRUE, N, D) * np.exp(noise * rng.standard_normal(N.shape))
    return N, D, loss


def test_fit_parametric_exact_on_noise_free_data():
    N, D, loss = _grid_sweep(0, noise=0.0)
    fit = fit_parametric(N, D, loss)
    assert fit["converged"]
    for k, v in TRUE.items():
        assert fit[k] == pytest.approx(v, rel=1e-4), k


def test_fit_parametric_recovers_law_and_predicts_4x_model():
    N, D, loss = _grid_sweep(0)
    fit = fit_parametric(N, D, loss)
    assert set(TRUE) <= set(fit) and fit["converged"]
    # Measured on this draw: E +2.6%, alpha +0.010, beta +0.007, prediction +0.44%.
    assert fit["E"] == pytest.approx(TRUE["E"], rel=0.05)
    assert fit["alpha"] == pytest.approx(TRUE["alpha"], abs=0.02)
    assert fit["beta"] == pytest.approx(TRUE["beta"], abs=0.015)
    pred = predict_parametric(fit, BIG_N, BIG_D)
    assert pred == pytest.approx(predict_parametric(TRUE, BIG_N, BIG_D), rel=0.01)


def test_huber_fit_resists_outliers_that_break_least_squares():
    N, D, loss = _grid_sweep(0)
    loss[[3, 17]] *= 1.2  # two diverged runs
    truth = predict_parametric(TRUE, BIG_N, BIG_D)
    huber = predict_parametric(fit_parametric(N, D, loss), BIG_N, BIG_D)
    # delta = 1 makes every residual quadratic: plain least squares in log space.
    squares = predict_parametric(fit_parametric(N, D, loss, delta=1.0), BIG_N, BIG_D)
    assert abs(huber / truth - 1) < 0.01  # measured 0.45%
    assert abs(squares / truth - 1) > 0.015  # measured 2.2%


@pytest.mark.parametrize(
    "lo, hi, E, A, alpha",
    [(1e6, 1e10, 2.0, 50.0, 0.3), (1e18, 1e23, 1.7, 2e3, 0.15)],  # L(N)-like, L(C)-like scales
)
def test_fit_power_law_recovers_exponent(lo, hi, E, A, alpha):
    x = np.geomspace(lo, hi, 10)
    rng = np.random.default_rng(1)
    loss = (E + A * x**-alpha) * np.exp(NOISE * rng.standard_normal(x.shape))
    fit = fit_power_law(x, loss)
    assert fit["converged"]
    # Measured: alpha 0.2995 / 0.1500, E 2.002 / 1.701.
    assert fit["alpha"] == pytest.approx(alpha, abs=0.01)
    assert fit["E"] == pytest.approx(E, rel=0.02)
    np.testing.assert_allclose(predict_power_law(fit, x), E + A * x**-alpha, rtol=0.005)


def test_compute_optimal_closed_form_is_the_isoflop_minimum():
    opt = compute_optimal(TRUE, np.array([1e20, 1e23]))
    assert opt["a"] == pytest.approx(0.28 / 0.62) and opt["b"] == pytest.approx(0.34 / 0.62)
    np.testing.assert_allclose(6 * opt["N"] * opt["D"], [1e20, 1e23], rtol=1e-12)
    for c, n_star, l_star in zip([1e20, 1e23], opt["N"], opt["loss"]):
        n = n_star * np.geomspace(0.5, 2, 201)
        along = predict_parametric(TRUE, n, c / (6 * n))
        assert n[np.argmin(along)] == pytest.approx(n_star, rel=0.01)
        assert l_star <= along.min() + 1e-12


def test_isoflop_recovers_optimum_exponents():
    N, D, loss = _isoflop_sweep(1)
    iso = fit_isoflop(N, D, loss)
    assert len(iso["budgets"]) == 6 and not iso["skipped"]
    assert all(b["interior"] for b in iso["budgets"])
    true = compute_optimal(TRUE, 1.0)
    # Measured: a 0.4528 vs 0.4516, b 0.5472 vs 0.5484; vertices within 9% of the true N*.
    assert iso["a"] == pytest.approx(true["a"], abs=0.01)
    assert iso["b"] == pytest.approx(true["b"], abs=0.01)
    for b in iso["budgets"]:
        assert b["N_opt"] == pytest.approx(compute_optimal(TRUE, b["C"])["N"], rel=0.15)
        assert 6 * b["N_opt"] * b["D_opt"] == pytest.approx(b["C"], rel=1e-6)


def test_isoflop_skips_budgets_without_a_minimum():
    N, D, loss = _isoflop_sweep(1)
    # One more budget with only two sizes: no parabola can be fitted there.
    N = np.append(N, [1e9, 2e9])
    D = np.append(D, [1e23 / 6e9, 1e23 / 12e9])
    loss = np.append(loss, predict_parametric(TRUE, N[-2:], D[-2:]))
    iso = fit_isoflop(N, D, loss)
    assert len(iso["budgets"]) == 6
    assert [s["reason"] for s in iso["skipped"]] == ["fewer than 3 distinct model sizes"]


def test_bootstrap_intervals_contain_the_truth():
    truth_big = predict_parametric(TRUE, BIG_N, BIG_D)
    hits = {k: 0 for k in ("E", "alpha", "beta", "a", "pred")}
    n_sets = 6
    for seed in range(n_sets):
        N, D, loss = _grid_sweep(seed)
        boot = bootstrap_parametric(N, D, loss, predict_at=[(BIG_N, BIG_D)], n_boot=100, seed=seed)
        assert boot["n_failed"] == 0
        ci = boot["intervals"]
        truths = {"E": TRUE["E"], "alpha": TRUE["alpha"], "beta": TRUE["beta"], "a": 0.28 / 0.62}
        for k, v in truths.items():
            hits[k] += ci[k]["lo"] <= v <= ci[k]["hi"]
            assert ci[k]["lo"] <= ci[k]["estimate"] <= ci[k]["hi"]
        p = boot["predictions"][0]
        hits["pred"] += p["lo"] <= truth_big <= p["hi"]
        assert (
            p["hi"] - p["lo"]
        ) / truth_big < 0.03  # informative, not vacuous (measured 0.7-2.0%)
        assert ci["alpha"]["hi"] - ci["alpha"]["lo"] < 0.06
    # 95% intervals; measured: E in 5 of 6 (the first draw's E estimate is 2.6% high), rest 6/6.
    assert hits["E"] >= n_sets - 1
    assert hits["alpha"] == hits["beta"] == hits["a"] == hits["pred"] == n_sets


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _run_rows(N, D, loss):
    return [
        {
            "n_params": 1.2 * n,
            "n_params_nonembed": n,
            "tokens": d,
            "flops": 6.3 * n * d,
            "final_loss": 0.99 * lo,
            "heldout_loss": lo,
        }
        for n, d, lo in zip(N, D, loss)
    ]


def test_fit_report_from_csv_writes_report_and_plots(tmp_path):
    N, D, loss = _isoflop_sweep(2)
    _write_csv(tmp_path / "runs.csv", _run_rows(N, D, loss))
    big_loss = float(predict_parametric(TRUE, BIG_N, BIG_D))
    (target,) = _run_rows([BIG_N], [BIG_D], [big_loss])
    out = tmp_path / "report"
    report = fit_report(tmp_path / "runs.csv", out, target=target, n_boot=40, seed=0)

    assert report["n_runs"] == 54
    assert set(report["plots"]) == {"loss_vs_compute", "isoflop", "prediction"}
    for path in report["plots"].values():
        with open(path, "rb") as f:
            head = f.read()
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) > 20_000
    on_disk = json.loads((out / "scaling_report.json").read_text())
    assert on_disk["prediction"] == report["prediction"]
    pred = report["prediction"]
    assert abs(pred["rel_error"]) < 0.01  # measured +0.15%
    assert pred["lo"] <= pred["actual"] <= pred["hi"]
    assert report["isoflop"]["a"] == pytest.approx(0.28 / 0.62, abs=0.02)
    assert report["compute_optimal"]["a"] == pytest.approx(0.28 / 0.62, abs=0.03)
    for name in ("N", "D", "C"):
        assert report["power_laws"][name]["alpha"] > 0, name
    assert report["warnings"] == []  # a well-posed sweep raises no flags


def test_load_runs_reads_json_and_names_bad_rows(tmp_path):
    rows = _run_rows([1e7, 2e7], [1e9, 1e9], [3.0, 2.9])
    (tmp_path / "runs.json").write_text(json.dumps({"runs": rows}))
    cols = load_runs(tmp_path / "runs.json")
    np.testing.assert_array_equal(cols["n_params_nonembed"], [1e7, 2e7])

    del rows[1]["tokens"]
    _write_csv(tmp_path / "bad.csv", [rows[0], {**rows[1], "tokens": ""}])
    with pytest.raises(ValueError, match=r"bad\.csv:3: missing column 'tokens'"):
        load_runs(tmp_path / "bad.csv")
    rows[1]["tokens"] = "lots"
    with pytest.raises(ValueError, match=r"runs\[1\]: column 'tokens' = 'lots' is not a number"):
        load_runs(rows)


def test_fit_report_refuses_a_sweep_with_one_token_budget(tmp_path):
    # one D: E and B/D^beta are one constant; the bootstrap would report an exact, wrong split
    N = np.geomspace(1e7, 1e9, 6)
    D = np.full(6, 1e9)
    rows = _run_rows(N, D, predict_parametric(TRUE, N, D))
    with pytest.raises(ValueError, match="got 6 and 1 over 6 runs"):
        fit_report(rows, None, n_boot=0)


def test_scaling_report_cli_fits_a_run_table(tmp_path, capsys):
    from flaxlm.evaluation import scaling_report

    N, D, loss = _grid_sweep(0)
    _write_csv(tmp_path / "runs.csv", _run_rows(N, D, loss))
    report = scaling_report.main([str(tmp_path / "runs.csv"), "--n_boot", "5"])
    assert report["n_runs"] == 36 and (tmp_path / "runs_fit" / "scaling_report.json").exists()
    out = capsys.readouterr().out
    assert "alpha" in out and "[" in out  # estimates with bootstrap intervals
    _write_csv(tmp_path / "few.csv", _run_rows(N[:6], np.full(6, 1e9), loss[:6]))
    with pytest.raises(SystemExit, match="distinct"):
        scaling_report.main([str(tmp_path / "few.csv"), "--n_boot", "0"])


def test_fit_warnings_flag_a_collapsed_E_bounded_exponents_and_wide_intervals():
    from flaxlm.evaluation.scaling_report import fit_warnings

    fit = dict(E=4e-13, A=353.0, B=2990.0, alpha=0.49, beta=0.66)
    ci = {"alpha": {"lo": 0.15, "hi": 10.0}, "beta": {"lo": 0.33, "hi": 0.9},
          "A": {"lo": 17.7, "hi": 1e47}, "B": {"lo": 100.0, "hi": 5000.0}}  # fmt: skip
    warnings = fit_warnings(fit, ci, np.array([3.0, 4.0]))
    assert len(warnings) == 3
    assert "E = 4e-13 collapsed" in warnings[0] and "alpha" in warnings[1] and "A's" in warnings[2]
    assert fit_warnings({**TRUE}, {}, np.array([2.0])) == []
    # a fit that stopped short (n_boot 0 has no bootstrap bounds to warn instead)
    unconverged = fit_warnings({**TRUE, "converged": False}, {}, np.array([2.0]))
    assert unconverged == ["the L(N, D) fit did not converge (L-BFGS-B stopped short of an "
                           "optimum): do not trust its parameters"]  # fmt: skip
    from flaxlm.evaluation.scaling_report import power_law_warnings

    laws = {"N": {"alpha": 0.3, "converged": False}, "D": {"alpha": 0.3, "converged": True}}
    assert power_law_warnings(laws) == ["L(N): the fit did not converge: do not trust alpha = 0.3"]


def test_bootstrap_counts_resamples_too_degenerate_to_fit_as_failed(monkeypatch):
    """A 3 x 3 sweep: a resample with fewer than 3 distinct N or D (the table fit_report
    refuses) is counted in n_failed, not refitted into a spuriously exact interval."""
    from flaxlm.evaluation import scaling_bootstrap

    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e7, 1e9, 3), np.geomspace(3e8, 3e10, 3)))
    noise = np.exp(0.01 * np.random.default_rng(0).standard_normal(9))
    loss = predict_parametric(TRUE, N, D) * noise
    fitted, real = [], scaling_bootstrap.fit_parametric

    def counted(n, d, *a, **k):
        fitted.append((n, d))
        return real(n, d, *a, **k)

    monkeypatch.setattr(scaling_bootstrap, "fit_parametric", counted)
    boot = bootstrap_parametric(N, D, loss, n_boot=40, seed=0)
    assert all(min(len(np.unique(n)), len(np.unique(d))) >= 3 for n, d in fitted)
    degenerate = 0
    rng = np.random.default_rng(0)
    for _ in range(40):  # bootstrap's own resampling: the same draws
        idx = rng.integers(0, 9, size=9)
        degenerate += min(len(np.unique(N[idx])), len(np.unique(D[idx]))) < 3
    assert boot["n_failed"] == degenerate > 0
