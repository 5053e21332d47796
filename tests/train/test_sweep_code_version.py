"""Which code trained a sweep's runs: each run's DONE marker and the sweep's index record the
flaxlm commit, the run table has it as a column, and a table (or a scaling fit) whose runs
trained under different commits says so. Before, nothing recorded the code: a sweep resumed
after a `git pull` fitted runs of two code versions as one study, silently."""

import json
import os
import warnings

import numpy as np
import pytest

from flaxlm.train import code_version, sweep, sweep_plan, sweep_table
from tests.evaluation.test_scaling import _grid_sweep, _run_rows
from tests.train.test_sweep_missing_runs import STEPS, _metrics

CONFIG_PY = f"""
from ml_collections import ConfigDict


def get_config(arg=None):
    return ConfigDict({{"total_steps": {STEPS}, "lr": 0.1}})


def sweep(add, arg=None):
    for lr in (0.1, 0.2, 0.3):
        add(lr=lr)
"""


@pytest.fixture
def root(tmp_path, monkeypatch):
    config = tmp_path / "cfg.py"
    config.write_text(CONFIG_PY)
    root = str(tmp_path / "sw")
    monkeypatch.setattr(sweep_plan, "code_commit", lambda: {"flaxlm_commit": "aaaaaaaaaaaa"})
    runs = sweep.plan(str(config), root)
    sweep.write_index(root, str(config), runs, [])
    return root, runs


def _finish_under(monkeypatch, run, commit):
    """The run trains to its last step and the sweep finishes it under `commit`."""
    _metrics(run.workdir, STEPS, final=False)
    monkeypatch.setattr(sweep, "code_commit", lambda: {"flaxlm_commit": commit} if commit else {})
    assert sweep._finish(run, 0, 1.0) == "done"


def test_done_and_the_index_record_the_commit(root, monkeypatch):
    root, runs = root
    assert sweep_plan.read_index(os.path.join(root, "sweep.json"))["flaxlm_commit"] == (
        "aaaaaaaaaaaa"
    )
    _finish_under(monkeypatch, runs[0], "bbbbbbbbbbbb+dirty")
    with open(os.path.join(runs[0].workdir, "DONE")) as f:
        assert json.load(f)["flaxlm_commit"] == "bbbbbbbbbbbb+dirty"


def test_one_commit_is_a_column_and_no_warning(root, monkeypatch):
    root, runs = root
    for run in runs:
        _finish_under(monkeypatch, run, "cccccccccccc")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = sweep_table.collect(root)
    assert [r["flaxlm_commit"] for r in rows] == ["cccccccccccc"] * 3
    csv_path, _ = sweep_table.write_table(rows, root)
    assert "flaxlm_commit" in open(csv_path).readline()


def test_runs_of_two_commits_are_named(root, monkeypatch, capsys):
    root, runs = root
    _finish_under(monkeypatch, runs[0], "cccccccccccc")
    _finish_under(monkeypatch, runs[1], "dddddddddddd")
    _finish_under(monkeypatch, runs[2], "dddddddddddd")
    with pytest.warns(UserWarning, match="2 flaxlm commits") as caught:
        sweep_table.collect(root)
    said = str(caught[0].message)
    assert f"cccccccccccc (1 run: {runs[0].name})" in said
    assert f"dddddddddddd (2 runs: {runs[1].name}, {runs[2].name})" in said
    assert sweep_table.main([root]) == 0
    assert "WARNING: the runs trained under 2 flaxlm commits" in capsys.readouterr().err


def test_runs_without_a_recorded_commit_are_not_counted(root, monkeypatch):
    """A DONE from before commits were recorded ({}), beside runs of one commit: nothing to
    compare it with, so no warning (and no column value for it)."""
    root, runs = root
    _finish_under(monkeypatch, runs[0], None)
    _finish_under(monkeypatch, runs[1], "cccccccccccc")
    _finish_under(monkeypatch, runs[2], "cccccccccccc")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = sweep_table.collect(root)
    assert [r.get("flaxlm_commit") for r in rows] == [None, "cccccccccccc", "cccccccccccc"]


def test_a_scaling_fit_over_two_commits_warns():
    from flaxlm.evaluation.scaling_report import fit_report

    N, D, loss = _grid_sweep(0)
    rows = _run_rows(N, D, loss)
    for i, row in enumerate(rows):
        row["name"] = f"run{i}"
        row["flaxlm_commit"] = "eeeeeeeeeeee" if i < 30 else "ffffffffffff"
    with pytest.warns(UserWarning, match="2 flaxlm commits"):
        report = fit_report(rows, None, n_boot=0)
    (mixed,) = [w for w in report["warnings"] if "flaxlm commits" in w]
    assert "ffffffffffff (6 runs: runs[30] (run30), runs[31] (run31), runs[32] (run32), ...)" in (
        mixed
    )
    for row in rows:
        row["flaxlm_commit"] = "eeeeeeeeeeee"
    assert fit_report(rows, None, n_boot=0)["warnings"] == []
    assert np.isfinite(report["parametric"]["E"])


def test_mixed_commits_edges():
    assert code_version.mixed_commits({}) is None
    assert code_version.mixed_commits({"a": None, "b": "", "c": "x"}) is None
    assert "2 flaxlm commits" in code_version.mixed_commits({"a": "x", "b": "x+dirty"})
