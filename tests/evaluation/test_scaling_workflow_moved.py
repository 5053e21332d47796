"""A scaling study is the same study wherever it lies: moved or copied (trained on a cluster,
reported at home), re-run from another directory, or started before its records were written
relative to ROOT. Runs are written as a finished sweep would leave them (no training), so the
workflow skips them and a re-run that wanted to retrain one calls a fake trainer instead. Also
the workflow CLI's other one-line refusals (a comma, a URL or a file as --workdir) and its
summary line without a bootstrap."""

import json
import os
import shutil

import numpy as np
import pytest

from flaxlm.configs import scaling as scaling_config
from flaxlm.evaluation import scaling_report, scaling_workflow
from flaxlm.evaluation.scaling import predict_parametric
from flaxlm.train import sweep, sweep_launch

LAW = dict(E=0.35, A=60.0, alpha=0.4, B=300.0, beta=0.45)  # L(N, D) the fake runs follow
CONFIG = scaling_workflow.with_arg(scaling_workflow.DEFAULT_CONFIG, "runlocal=True")
HELDOUT = 5  # held-out documents of the world (the workflow's default is 1000)


def _write_run(run_dir, info, total_steps):
    """The files a finished run leaves: its metrics at the last step, and DONE."""
    os.makedirs(run_dir, exist_ok=True)
    loss = float(predict_parametric(LAW, info["n_params_nonembed"], info["tokens"]))
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": total_steps, "loss": loss * 1.01}) + "\n")
        f.write(json.dumps({"step": total_steps, "eval/nll": loss}) + "\n")
    with open(os.path.join(run_dir, "DONE"), "w") as f:
        f.write("{}")


def _finished_study(root):
    """ROOT with every run of the runlocal sweep and its target finished."""
    for r in sweep.plan(CONFIG, os.path.join(root, "sweep")):
        _write_run(r.workdir, r.info, r.total_steps)
    big = sweep.run_info(scaling_config.get_config("predict=True,runlocal=True"))
    _write_run(os.path.join(root, "target"), big, big["total_steps"])


def _argv(root):
    return ["--workdir", root, "--config", CONFIG, "--heldout_docs", str(HELDOUT),
            "--tasks", "", "--n_boot", "0", "--target_seeds", "1"]  # fmt: skip


@pytest.fixture
def trained(monkeypatch):
    """Fake trainers: they record the config arg they got, the runs they would train (the
    unfinished ones) and that its held-out file is there, and finish their runs."""
    calls = []

    def run_local(config_arg, runs, **kw):
        heldout = config_arg.rpartition("heldout=")[2]
        todo = [r.name for r in runs if not sweep.is_done(r)]  # (run_local skips the rest)
        calls.append((config_arg, todo, os.path.isfile(heldout)))
        for r in runs:
            if not sweep.is_done(r):
                _write_run(r.workdir, r.info, r.total_steps)
        return {r.name: "done" for r in runs}

    monkeypatch.setattr(sweep, "run_local", run_local)
    return calls


def test_a_moved_study_resumes_and_reports(tmp_path, monkeypatch, trained):
    """The trainers' config arg named the held-out file by its absolute path, and sweep.json and
    target.json recorded it: after `mv studyA studyB` every finished run was "started by a
    sweep with other settings" (a traceback advising to delete them). The records now name it
    relative to ROOT (and the config file relative to the checkout); trainers still get paths
    that work from their directory: here, another one than the checkout's."""
    a, b = str(tmp_path / "studyA"), str(tmp_path / "studyB")
    _finished_study(a)
    scaling_workflow.main(_argv(a))
    assert trained == []  # everything was finished
    for name in ("workflow.json", "target.json", os.path.join("sweep", "sweep.json")):
        with open(os.path.join(a, name)) as f:
            config = json.load(f)["config"]
        assert str(tmp_path) not in config and not os.path.isabs(config), name
    with open(os.path.join(a, "sweep", "sweep.json")) as f:
        assert json.load(f)["config"] == CONFIG + ",heldout=world/heldout_text.jsonl"

    shutil.move(a, b)
    done = sorted(os.listdir(os.path.join(b, "sweep")))
    victim = next(d for d in done if d.startswith("run-"))
    os.remove(os.path.join(b, "sweep", victim, "DONE"))  # one run left to train after the move
    monkeypatch.chdir(tmp_path)  # neither the checkout nor ROOT: the config is found all the same
    report = scaling_workflow.main(_argv(b))
    assert report["n_runs"] == len(scaling_config.WIDTHS) * len(scaling_config.RUNLOCAL_STEPS)
    ((config_arg, names, heldout_found),) = trained  # the one run, nothing retrained
    assert names == [victim] and heldout_found
    assert f"heldout={b}/world/heldout_text.jsonl" in config_arg and a not in config_arg
    assert sorted(os.listdir(os.path.join(b, "sweep"))) == done  # every finished run kept


def test_a_study_recorded_with_absolute_paths_resumes_where_it_lies(tmp_path, trained):
    """A study started before the records were relative (sweep.json and target.json hold the
    trainers' absolute config arg, workflow.json the config file's absolute path) is the same
    study in its own place; its records are rewritten in the new form."""
    root = str(tmp_path / "old")
    _finished_study(root)
    scaling_workflow.main(_argv(root))
    config_file = os.path.join(sweep_launch.checkout_root(), "configs", "scaling.py")
    absolute = f"{config_file}:runlocal=True,heldout={root}/world/heldout_text.jsonl"
    for name, config in (("workflow.json", f"{config_file}:runlocal=True"),
                         ("target.json", absolute + ",predict=True"),
                         (os.path.join("sweep", "sweep.json"), absolute)):  # fmt: skip
        path = os.path.join(root, name)
        with open(path) as f:
            record = json.load(f)
        with open(path, "w") as f:
            json.dump({**record, "config": config}, f)
    scaling_workflow.main(_argv(root))
    assert trained == []
    with open(os.path.join(root, "sweep", "sweep.json")) as f:
        assert json.load(f)["config"] == CONFIG + ",heldout=world/heldout_text.jsonl"


def test_a_rerun_with_other_settings_after_the_move_is_still_refused(tmp_path, capsys):
    """The records being relative does not make another study the same: one line, naming the
    run directory, and no traceback (run_sweep's ValueError was uncaught)."""
    root = str(tmp_path / "s")
    _finished_study(root)
    scaling_workflow.main(_argv(root))
    os.remove(os.path.join(root, "workflow.json"))  # (its own check would fire first)
    sweep_json = os.path.join(root, "sweep", "sweep.json")
    with open(sweep_json) as f:
        index = json.load(f)
    run = index["runs"][0]
    run["overrides"] = {**run["overrides"], "opt.lr": 0.5}
    with open(sweep_json, "w") as f:
        json.dump(index, f)
    with pytest.raises(SystemExit) as e:
        scaling_workflow.main(_argv(root))
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{root}/sweep/{run['name']} was started by a sweep" in err
    assert "Traceback" not in err


def test_a_comma_in_the_workdir_is_a_usage_error(tmp_path, capsys):
    """The held-out file reaches the trainers inside a comma-separated list (the config arg's
    k=v,k=v; data.eval_sources): a ',' in ROOT was an unexplained KeyError traceback."""
    root = str(tmp_path / "scaling,v2")
    with pytest.raises(SystemExit) as e:
        scaling_workflow.main(["--workdir", root, "--config", CONFIG, "--tasks", ""])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--workdir" in err and "','" in err
    assert not os.path.exists(root)  # refused before anything is written


def test_a_url_workdir_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """`--workdir gs://bucket/study` made ./gs:/bucket/study here."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        scaling_workflow.main(["--workdir", "gs://mybucket/study", "--config", CONFIG])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "gs://mybucket/study" in err and "gcsfuse" in err
    assert os.listdir(tmp_path) == []


def test_the_compute_law_names_the_frontier_when_it_is_too_short():
    """12 runs of 12 distinct compute budgets, 3 of them on the compute frontier: the skip
    said "3 distinct C values; need >= 4"."""
    c = 10.0 ** (15 + 0.1 * np.arange(12))
    loss = [3.0, 2.5, 2.0] + [4.0 + 0.01 * i for i in range(9)]  # only the first 3 improve
    n = [1e5 * (1 + i % 4) for i in range(12)]
    d = [x / (6 * y) for x, y in zip(c, n)]
    laws = scaling_report._power_laws(*(np.array(v) for v in (n, d, c, loss)))
    assert laws["C"] == {"skipped": "3 runs on the compute frontier (of 12 distinct C); need >= 4"}


@pytest.mark.parametrize("sub", ["", "sub"])
def test_a_workdir_that_is_a_file_is_refused(tmp_path, capsys, sub):
    """A --workdir that is a file (or lies under one): one usage line, not a
    NotADirectoryError from reading the target's metrics."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    root = str(afile / sub) if sub else str(afile)
    with pytest.raises(SystemExit) as e:
        scaling_workflow.main(_argv(root))
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--workdir {root}" in err and "not a directory" in err
    assert afile.read_text() == "x"


def test_no_bootstrap_prints_no_nan_interval(tmp_path, monkeypatch, capsys):
    """--n_boot 0 (no bootstrap, so no interval): the summary line printed `[nan, nan]`."""
    root = str(tmp_path / "study")
    _finished_study(root)
    monkeypatch.setattr(sweep, "run_local", lambda *a, **k: pytest.fail("nothing to train"))
    report = scaling_workflow.main(_argv(root))
    assert "lo" not in report["prediction"]
    line = [ln for ln in capsys.readouterr().out.splitlines() if "predicted" in ln][0]
    assert "nan" not in line and "actual" in line, line
