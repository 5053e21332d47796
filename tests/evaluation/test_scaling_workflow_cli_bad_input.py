"""The scaling workflow's command line: a --workdir that is a file (or lies under one) is one
usage line, not a NotADirectoryError from reading the target's metrics; and with --n_boot 0
(no bootstrap, so no interval) the summary line prints no `[nan, nan]` interval. Runs are
written as a finished study leaves them (no training)."""

import json
import os

import pytest

from flaxlm.configs import scaling as scaling_config
from flaxlm.evaluation import scaling_workflow
from flaxlm.evaluation.scaling import predict_parametric
from flaxlm.train import sweep

LAW = dict(E=0.35, A=60.0, alpha=0.4, B=300.0, beta=0.45)  # L(N, D) the fake runs follow
CONFIG = scaling_workflow.with_arg(scaling_workflow.DEFAULT_CONFIG, "runlocal=True")


def _argv(root):
    return ["--workdir", root, "--config", CONFIG, "--heldout_docs", "5",
            "--tasks", "", "--n_boot", "0", "--target_seeds", "1"]  # fmt: skip


@pytest.mark.parametrize("sub", ["", "sub"])
def test_a_workdir_that_is_a_file_is_refused(tmp_path, capsys, sub):
    afile = tmp_path / "afile"
    afile.write_text("x")
    root = str(afile / sub) if sub else str(afile)
    with pytest.raises(SystemExit) as e:
        scaling_workflow.main(_argv(root))
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--workdir {root}" in err and "not a directory" in err
    assert afile.read_text() == "x"


def _write_run(run_dir, info, total_steps):
    """The files a finished run leaves: its metrics at the last step, and DONE."""
    os.makedirs(run_dir, exist_ok=True)
    loss = float(predict_parametric(LAW, info["n_params_nonembed"], info["tokens"]))
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": total_steps, "loss": loss * 1.01}) + "\n")
        f.write(json.dumps({"step": total_steps, "eval/nll": loss}) + "\n")
    with open(os.path.join(run_dir, "DONE"), "w") as f:
        f.write("{}")


def test_no_bootstrap_prints_no_nan_interval(tmp_path, monkeypatch, capsys):
    root = str(tmp_path / "study")
    for r in sweep.plan(CONFIG, os.path.join(root, "sweep")):
        _write_run(r.workdir, r.info, r.total_steps)
    big = sweep.run_info(scaling_config.get_config("predict=True,runlocal=True"))
    _write_run(os.path.join(root, "target"), big, big["total_steps"])
    monkeypatch.setattr(sweep, "run_local", lambda *a, **k: pytest.fail("nothing to train"))
    report = scaling_workflow.main(_argv(root))
    assert "lo" not in report["prediction"]
    line = [ln for ln in capsys.readouterr().out.splitlines() if "predicted" in ln][0]
    assert "nan" not in line and "actual" in line, line
