"""Scaling-law fitting, prediction and reporting against independent references: scipy's
`curve_fit` (plain least squares on the loss, a different estimator from the library's Huber
regression in log space) on synthetic runs drawn from known laws, for parameter recovery and
extrapolation error; and the report path on the sweeps that used to break it (an exponent at
its bound 0, a bootstrap interval that excludes its estimate, malformed run tables).

Conventions checked: ``L(X) = E + A / X**alpha`` and ``L(N, D) = E + A / N**alpha + B / D**beta``
with E the irreducible loss (>= 0, recovered when the runs pin it, ~0 for a pure power law);
2k + 2 runs are the minimum for a k-variable law; the initialisation grid always runs, so a
wrong `init` cannot trap the fit.
"""

import json
import os

import numpy as np
import pytest
from scipy.optimize import curve_fit

from flaxlm.evaluation.scaling import (
    compute_optimal,
    fit_parametric,
    fit_power_law,
    predict_parametric,
    predict_power_law,
)
from flaxlm.evaluation.scaling_isoflop import group_by_compute
from flaxlm.evaluation.scaling_plots import plot_prediction
from flaxlm.evaluation.scaling_report import fit_report, load_runs
from flaxlm.evaluation.scaling_report import main as report_main

TRUE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def _curve_fit_power_law(x, y, p0):
    """scipy least squares of y = E + exp(log_a - alpha log x) (log A keeps A's scale sane)."""
    f = lambda lx, E, log_a, alpha: E + np.exp(log_a - alpha * lx)
    (E, log_a, alpha), _ = curve_fit(f, np.log(x), y, p0=p0, maxfev=20000)
    return {"E": E, "A": np.exp(log_a), "alpha": alpha}


@pytest.mark.parametrize(
    "E, A, alpha",
    [
        (1.7, 400.0, 0.35),  # Chinchilla-like
        (1e-6, 50.0, 0.3),  # a pure power law: E is ~0, not forced to a grid value
        (3.0, 8.0, 0.25),  # E is 97-99% of every loss: the irreducible term dominates
        (2.0, 1e6, 1.5),  # steep
        (1000.0, 5e4, 0.3),  # losses in the thousands (a scale the grid is built from)
    ],
)  # fmt: skip
def test_power_law_recovers_known_laws_as_curve_fit_does(E, A, alpha):
    x = np.geomspace(1e6, 1e9, 5)
    y = E + A * x**-alpha
    fit = fit_power_law(x, y)
    ref = _curve_fit_power_law(x, y, p0=[E * 1.2 + 0.1, np.log(A) - 0.5, alpha * 0.8])
    for got in (fit, ref):
        assert got["alpha"] == pytest.approx(alpha, rel=1e-4)
        assert got["A"] == pytest.approx(A, rel=1e-3)
        assert got["E"] == pytest.approx(E, rel=1e-4, abs=1e-4)
    assert fit["converged"] and fit["n_runs"] == 5
    x4 = 4 * x[-1]  # a 4x larger model
    assert predict_power_law(fit, x4) == pytest.approx(E + A * x4**-alpha, rel=1e-6)


def test_power_law_extrapolation_error_on_noisy_runs_is_that_of_curve_fit():
    """Five runs with 0.5% multiplicative noise, 15 draws: the 4x-extrapolation error of the
    Huber log-space fit is within 1.5x that of least squares (measured: 1.16% vs 1.11% RMS)."""
    rng = np.random.default_rng(0)
    E, A, alpha = 1.7, 400.0, 0.35
    x = np.geomspace(1e6, 1e8, 5)
    x4, truth = 4e8, E + A * 4e8**-alpha
    errs, errs_ref = [], []
    for _ in range(15):
        y = (E + A * x**-alpha) * np.exp(rng.normal(0, 0.005, x.size))
        errs.append(predict_power_law(fit_power_law(x, y), x4) / truth - 1)
        ref = _curve_fit_power_law(x, y, p0=[1.0, 5.0, 0.3])
        errs_ref.append(predict_power_law(ref, x4) / truth - 1)
    rms, rms_ref = np.sqrt(np.mean(np.square(errs))), np.sqrt(np.mean(np.square(errs_ref)))
    assert rms < 1.5 * rms_ref + 1e-3 and rms < 0.03


def test_few_runs_the_minimum_and_below():
    x = np.geomspace(1e6, 1e9, 4)  # 4 runs, 3 parameters: the minimum, still exact
    fit = fit_power_law(x, 1.5 + 200 * x**-0.3)
    assert (fit["E"], fit["A"], fit["alpha"]) == pytest.approx((1.5, 200, 0.3), rel=1e-6)
    with pytest.raises(ValueError, match="need at least 4 runs to fit 3 parameters"):
        fit_power_law(x[:3], (1.5 + 200 * x**-0.3)[:3])
    N, D = np.geomspace(1e7, 1e9, 5), np.geomspace(1e9, 1e11, 5)
    with pytest.raises(ValueError, match="need at least 6 runs to fit 5 parameters"):
        fit_parametric(N, D, predict_parametric(TRUE, N, D))


def test_a_bad_initial_guess_does_not_trap_the_parametric_fit():
    """`init` adds a start; the grid's starts still run, so a wrong guess (exponents at the
    bound, coefficients off by 1e17) ends at the truth on a noise-free 4 x 4 sweep."""
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e7, 1e9, 4), np.geomspace(3e8, 3e10, 4)))
    loss = predict_parametric(TRUE, N, D)
    for init in (dict(E=100.0, A=1e-3, B=1e9, alpha=5.0, beta=0.01),
                 dict(E=1.0, A=1e20, B=1e20, alpha=9.0, beta=9.0)):  # fmt: skip
        fit = fit_parametric(N, D, loss, init=init)
        assert {k: fit[k] for k in TRUE} == pytest.approx(TRUE, rel=1e-4)
        assert fit["rms_log_residual"] < 1e-8


# --- the report on sweeps that used to break it -------------------------------------------------


def _rows(N, D, loss):
    return [{"n_params": n, "n_params_nonembed": n, "tokens": d, "flops": 6 * n * d,
             "final_loss": lo, "heldout_loss": lo} for n, d, lo in zip(N, D, loss)]  # fmt: skip


def test_report_with_an_exponent_at_zero_still_writes_plots_and_json(tmp_path):
    """Held-out loss that rises with D (overfitting) drives beta to its bound 0: the
    compute-optimal allocation does not exist and the report says so ('skipped') — but the
    loss-vs-compute plot then called compute_optimal anyway and the whole report (and the
    scaling workflow's fit step) died with its ValueError."""
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e6, 1e8, 4), np.geomspace(1e8, 1e10, 4)))
    loss = 2.0 + 300 * N**-0.3 + 0.02 * np.log(D / 1e8)
    report = fit_report(_rows(N, D, loss), str(tmp_path), n_boot=0)
    assert report["parametric"]["beta"] == 0.0
    assert "skipped" in report["compute_optimal"]
    assert any("beta" in w for w in report["warnings"])
    assert os.path.getsize(report["plots"]["loss_vs_compute"]) > 10_000
    assert json.load(open(tmp_path / "scaling_report.json"))["parametric"]["beta"] == 0.0


def test_prediction_plot_with_the_estimate_outside_its_interval(tmp_path):
    """A percentile bootstrap interval need not contain the point estimate; the error bar's
    negative side made matplotlib raise ('yerr' must not contain negative values)."""
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e6, 1e8, 3), np.geomspace(1e8, 1e10, 3)))
    loss = predict_parametric(TRUE, N, D)
    target = dict(N=4e8, D=1e10, predicted=2.0, lo=2.01, hi=2.05, actual=2.02)
    path = plot_prediction(N, D, loss, TRUE, target, str(tmp_path / "p.png"))
    assert os.path.getsize(path) > 10_000


def test_malformed_run_tables_name_file_and_line(tmp_path):
    """json's own message of a .jsonl line said "line 1 column 1" (of the one line it parsed)
    and no file; a .json table's error named no file either."""
    good = json.dumps(_rows([1e6], [1e8], [3.0])[0])
    (tmp_path / "runs.jsonl").write_text(f"{good}\n\n{good[:-5]}\n")
    with pytest.raises(ValueError, match=r"runs\.jsonl:3: invalid JSON"):
        load_runs(str(tmp_path / "runs.jsonl"))
    with pytest.raises(SystemExit, match=r"scaling_report: .*runs\.jsonl:3: invalid JSON"):
        report_main([str(tmp_path / "runs.jsonl"), "--n_boot", "0"])
    (tmp_path / "runs.json").write_text('{"runs": [\n' + good + ",\n]}")
    with pytest.raises(ValueError, match=r"runs\.json:3: invalid JSON"):
        load_runs(str(tmp_path / "runs.json"))


def test_a_compute_budget_spans_at_most_one_plus_rtol():
    """Budgets were cut only where consecutive runs differed by more than 1 + rtol, so a dense
    grid chained into one "budget": 56 runs spanning 6.9x in compute, whose parabola put N_opt
    1.2x off the true optimum."""
    chain = 1e18 * 1.04 ** np.arange(6)  # each 4% above the one before
    assert [g.tolist() for g in group_by_compute(chain)] == [[0, 1], [2, 3], [4, 5]]  # was 1
    assert [g.tolist() for g in group_by_compute(chain[::-1])] == [[4, 5], [2, 3], [0, 1]]
    N, D = (a.ravel() for a in np.meshgrid(1e7 * 1.2 ** np.arange(12), 1e9 * 1.5 ** np.arange(8)))
    C = 6 * N * D
    groups = group_by_compute(C, rtol=0.05)
    assert sorted(np.concatenate(groups).tolist()) == list(range(C.size))
    assert max(C[g].max() / C[g].min() for g in groups) <= 1.05
    assert [C[g].min() for g in groups] == sorted(C[g].min() for g in groups)


def test_the_report_leaves_out_isoflop_budgets_with_an_extrapolated_minimum():
    """fit_report kept a budget whose parabola vertex lay outside its sampled sizes (only an
    `interior` flag in the JSON said so), and fitted N_opt(C) through it. Such budgets are now
    skipped, with the reason; the exponents come from the budgets that bracket their minimum."""
    rows = []
    for c in np.geomspace(1e18, 1e21, 4):
        opt = float(compute_optimal(TRUE, c)["N"])
        # the last budget's sizes all lie below its optimum: its vertex is extrapolated
        sizes = opt * (np.geomspace(1 / 40, 1 / 4, 5) if c == 1e21 else np.geomspace(1 / 4, 4, 5))
        for n in sizes:
            d = c / (6 * n)
            loss = float(predict_parametric(TRUE, n, d))
            rows.append({"n_params": n, "n_params_nonembed": n, "tokens": d, "flops": c,
                         "final_loss": loss, "heldout_loss": loss})  # fmt: skip
    iso = fit_report(rows, None, n_boot=0)["isoflop"]
    assert len(iso["budgets"]) == 3 and all(b["interior"] for b in iso["budgets"])
    assert [s["reason"] for s in iso["skipped"]] == [
        "parabola vertex outside the sampled model sizes"
    ]
    assert iso["skipped"][0]["C"] == pytest.approx(1e21)
    assert iso["a"] == pytest.approx(compute_optimal(TRUE, 1.0)["a"], abs=0.02)


def test_cached_task_scores_are_recomputed_for_a_new_checkpoint(tmp_path, monkeypatch):
    """RUN/tasks.json is reused only for the checkpoint step and `limit` that computed it: a run
    trained further since used to keep its old scores."""
    import types

    import jax

    from flaxlm.evaluation import harness, scaling_emergence, tasks
    from flaxlm.models.config import get_variant
    from flaxlm.train.checkpoint import Checkpointer
    from flaxlm.train.pretrain import model_fns
    from flaxlm.train.state import unbox

    cfg = get_variant("tiny", vocab_size=256, n_layers=1)
    abstract = unbox(jax.eval_shape(model_fns(cfg)[0], jax.random.PRNGKey(0)))
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    tok_path = str(tmp_path / "tokenizer.model")
    run = str(tmp_path / "run")
    meta = {"model_config": cfg.to_dict(), "tokenizer": tok_path, "head": "lm"}

    def save(step):
        ck = Checkpointer(run, keep=3, async_save=False)
        ck.save(step, {"params": params}, {}, meta)
        ck.wait()
        ck.close()

    seen = []  # (checkpoint step the evaluator got, limit) per evaluation

    class FakeEvaluator:
        def __init__(self, cfg, params, tok):
            pass

        def run(self, spec, limit=None):
            seen.append(limit)
            return {"metrics": {"acc": 0.5}}

    monkeypatch.setattr(harness, "Evaluator", FakeEvaluator)
    monkeypatch.setattr(tasks, "resolve_tasks", lambda names, world: [
        types.SimpleNamespace(name=n) for n in names])  # fmt: skip
    monkeypatch.setattr("flaxlm.data.tokenizer.Tokenizer.load", staticmethod(lambda p: None))
    evaluate = lambda **kw: scaling_emergence.evaluate_run(run, "", ["t"], **kw)  # noqa: E731
    save(1)
    evaluate(limit=4)
    evaluate(limit=4)
    assert seen == [4]  # the second call read the cache
    save(2)
    evaluate(limit=4)
    assert seen == [4, 4]  # a newer checkpoint: evaluated again
    evaluate(limit=8)
    assert seen == [4, 4, 8]  # another limit: evaluated again
    evaluate(limit=8)
    assert seen == [4, 4, 8]
    with open(os.path.join(run, "tasks.source.json")) as f:
        assert json.load(f) == {"step": 2, "limit": 8}


def test_a_diverged_run_is_named_and_can_be_left_out(tmp_path):
    """A sweep's table lists finished runs only: the error named `runs[2]` (the position among
    those) for the run of sweep index 3, and the report had no way past a diverged run."""
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e6, 1e8, 3), np.geomspace(1e8, 1e10, 3)))
    rows = _rows(N, D, predict_parametric(TRUE, N, D))
    for i, row in enumerate(rows):
        row.update(index=i + (i > 1), name=f"run-{i}")  # sweep index 2 failed: not in the table
    rows[2]["heldout_loss"] = float("nan")
    with pytest.raises(ValueError, match=r"run-2, sweep index 3\): column 'heldout_loss' = nan "
                       r".*--drop_nonfinite"):  # fmt: skip
        fit_report(rows, None, n_boot=0)
    with pytest.warns(UserWarning, match=r"left out 1 run.*run-2, sweep index 3\): heldout_loss"):
        report = fit_report(rows, None, n_boot=0, drop_nonfinite=True)
    assert report["n_runs"] == 8 and len(report["dropped_runs"]) == 1
    assert report["parametric"]["alpha"] == pytest.approx(TRUE["alpha"], rel=1e-2)

    (tmp_path / "runs.json").write_text(json.dumps({"runs": rows}))
    with pytest.raises(SystemExit, match=r"runs.json run 2 \(run-2, sweep index 3\)"):
        report_main([str(tmp_path / "runs.json"), "--n_boot", "0"])
    with pytest.warns(UserWarning, match="left out 1 run"):
        cli = report_main([str(tmp_path / "runs.json"), "--n_boot", "0", "--drop_nonfinite"])
    assert cli["n_runs"] == 8


def test_a_folder_that_is_not_a_sweep_is_a_one_line_error(tmp_path):
    """A folder without sweep.json (a scaling_workflow root keeps its sweep in ROOT/sweep)
    ended in a FileNotFoundError traceback."""
    with pytest.raises(SystemExit, match=r"not a sweep folder \(no sweep.json\)$"):
        report_main([str(tmp_path), "--n_boot", "0"])
    os.makedirs(tmp_path / "sweep")
    (tmp_path / "sweep" / "sweep.json").write_text('{"runs": []}')
    with pytest.raises(SystemExit, match=f"for a scaling_workflow root pass {tmp_path}/sweep"):
        report_main([str(tmp_path), "--n_boot", "0"])
    with pytest.raises(SystemExit, match="scaling_report: .*nope.csv"):
        report_main([str(tmp_path / "nope.csv"), "--n_boot", "0"])
