"""A sweep's gaps, without training (a tiny config without a model; fake trainers): the run table
names every planned run it has no row for and why, launch files for other hosts hold paths the
hosts have, a corrupt sweep.json or metrics line names its file, and Ctrl-C while trainers start up
reports them interrupted, not failed."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import warnings

import pytest

from flaxlm.train import sweep, sweep_launch, sweep_plan, sweep_table
from flaxlm.train.metrics import read_metrics
from tests.train.test_sweep_audit import FAKE_GCLOUD, _executable

STEPS = 12
CONFIG_PY = f"""
from ml_collections import ConfigDict


def get_config(arg=None):
    return ConfigDict({{"total_steps": {STEPS}, "lr": 0.1}})


def sweep(add, arg=None):
    for lr in (0.1, 0.2, 0.3, 0.4):
        add(lr=lr)
"""


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(CONFIG_PY)
    return str(path)


def _metrics(run_dir, last, final=True):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for s in range(4, last + 1, 4):
            f.write(json.dumps({"step": s, "loss": 1.0 / s, "eval/nll": 2.0}) + "\n")
    if final:
        with open(os.path.join(run_dir, "DONE"), "w") as f:
            f.write("{}")


def test_the_table_names_each_planned_run_it_has_no_row_for(tmp_path, config, capsys):
    """Runs with no DONE and no metrics at total_steps were left out without a word, and the
    scaling fit went on with the rest."""
    root = str(tmp_path / "sw")
    runs = sweep.plan(config, root)
    sweep.write_index(root, config, runs, [])
    done, failed, cut, unstarted = runs
    _metrics(done.workdir, STEPS)
    _metrics(failed.workdir, 4, final=False)
    with open(os.path.join(failed.workdir, "train.log"), "w") as f:
        # (as train/main.py ends a refused config: the error, then its traceback hint)
        f.write("=== start\nValueError: boom\n(FLAXLM_TRACEBACK=1 shows where it was raised)\n")
    assert sweep._finish(failed, 1, 2.0) == "failed"  # what run_local records of it
    _metrics(cut.workdir, 8, final=False)  # a killed sweep, or a launch-file run cut short

    rows, missing = sweep_table.collect_all(root)
    assert [r["name"] for r in rows] == [done.name]
    assert [(m["name"], m["status"]) for m in missing] == [
        (failed.name, "failed"),
        (cut.name, "unfinished"),
        (unstarted.name, "not started"),
    ]
    why = {m["name"]: m["why"] for m in missing}
    assert "rc=1" in why[failed.name] and "ValueError: boom" in why[failed.name]
    assert os.path.join(failed.workdir, "train.log") in why[failed.name]
    assert "step 8 of 12" in why[cut.name]
    with pytest.warns(UserWarning, match="3 of 4 planned runs have no row") as caught:
        assert sweep_table.collect(root) == rows
    message = str(caught[0].message)
    assert all(m["name"] in message for m in missing)

    # a rerun that finishes the failed run clears its failure record
    _metrics(failed.workdir, STEPS, final=False)
    assert sweep._finish(failed, 0, 2.0) == "done"
    assert not os.path.exists(os.path.join(failed.workdir, "FAILED"))
    _, missing = sweep_table.collect_all(root)
    assert [m["name"] for m in missing] == [cut.name, unstarted.name]


def test_a_run_killed_after_its_last_step_has_no_row(tmp_path, config):
    """A trainer killed in its final evaluation (rc=-9) after logging its last step: the sweep
    said FAILED, but the table listed the run as finished, without heldout_loss, and the
    scaling report then failed on the missing column. Now the run is named as failed; one the
    sweep finished (DONE), or one a launch file ran (no marker at all), keeps its row."""
    root = str(tmp_path / "sw")
    runs = sweep.plan(config, root)
    sweep.write_index(root, config, runs, [])
    killed, done, launched, _ = runs
    for r in (killed, done, launched):
        _metrics(r.workdir, STEPS, final=False)
    assert sweep._finish(killed, -9, 2.0) == "failed"
    assert sweep._finish(done, 0, 2.0) == "done"
    rows, missing = sweep_table.collect_all(root)
    assert [r["name"] for r in rows] == [done.name, launched.name]
    assert (missing[0]["name"], missing[0]["status"]) == (killed.name, "failed")
    assert "rc=-9" in missing[0]["why"]
    rows, _ = sweep_table.collect_all(root, include_unfinished=True)
    assert killed.name in [r["name"] for r in rows]


def test_a_sweep_json_cut_short_names_its_file(tmp_path, config, capsys):
    root = tmp_path / "sw"
    root.mkdir()
    (root / "sweep.json").write_text('{"config": "x", "runs": [\n')  # full disk, killed copy
    path = str(root / "sweep.json")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: invalid JSON")):
        sweep_table.collect(str(root))
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: invalid JSON")):
        sweep_plan.write_index(str(root), config, [], [])
    with pytest.raises(SystemExit):
        sweep.main(["--config", config, "--workdir", str(root), "--launch", "print"])
    assert f"{path}:2: invalid JSON" in capsys.readouterr().err


def test_a_metrics_line_that_is_not_utf8_is_skipped_and_named(tmp_path, config):
    """A byte that is not UTF-8 raised UnicodeDecodeError from read_metrics, naming no file;
    the run table then dropped the whole run."""
    root = str(tmp_path / "sw")
    runs = sweep.plan(config, root, only=[0])
    sweep.write_index(root, config, runs, [])
    _metrics(runs[0].workdir, STEPS)
    path = os.path.join(runs[0].workdir, "metrics.jsonl")
    with open(path, "ab") as f:
        f.write(b"\xff\xfe junk\n")
    with pytest.warns(UserWarning, match=re.escape(f"{path}:4: not UTF-8 text")):
        records = read_metrics(path)
    assert [r["step"] for r in records] == [4, 8, 12]
    assert sweep._logged_step(runs[0].workdir) == STEPS
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        (row,) = sweep_table.collect(root)
    assert row["step"] == STEPS and row["heldout_loss"] == 2.0


FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["ARGV_LOG"], "a") as f:
    f.write(json.dumps({{"cwd": os.getcwd(), "argv": sys.argv[1:]}}) + "\\n")
"""


@pytest.mark.parametrize("in_checkout", [False, True])
def test_pod_and_host_scripts_name_paths_the_hosts_have(tmp_path, config, monkeypatch,
                                                        in_checkout):  # fmt: skip
    """The pod and multi-host scripts `cd` to --repo_dir, then passed --config and --workdir as
    typed: a relative sweep root trained (and finished) its runs under the repo, not the
    sweep's root, whose table stayed empty. Then every path was made absolute, and a config
    file of the local checkout (the README's `configs/pretrain.py`) named a path the hosts,
    whose checkout is at --repo_dir, do not have. Run directories are absolute; a config file
    in the checkout is relative to its root; one outside it absolute."""
    bin_dir, repo, here = tmp_path / "bin", tmp_path / "repo", tmp_path / "here"
    for d in (bin_dir, repo, here):
        d.mkdir()
    python = _executable(bin_dir / "python", FAKE_PYTHON)
    _executable(bin_dir / "gcloud", FAKE_GCLOUD)
    if in_checkout:  # the local checkout is `here`; the hosts' checkout (repo) has the file too
        for d in (here, repo):
            (d / "configs").mkdir()
            (d / "configs" / "cfg.py").write_text(CONFIG_PY)
        config = str(here / "configs" / "cfg.py")
        monkeypatch.setattr(sweep_launch, "checkout_root", lambda: str(here))
    monkeypatch.chdir(here)
    rel_config = os.path.relpath(config) + ":arg=1"  # the ':args' part is kept as written
    argv = ["--config", rel_config, "--workdir", "sw", "--launch", "print", "--only", "0",
            "--python", python, "--repo_dir", str(repo)]  # fmt: skip
    assert sweep.main(argv) == 0
    (run,) = sweep.plan(rel_config, "sw", only=[0])
    log = tmp_path / "argv.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ARGV_LOG": str(log),
           "HOST0": "h0", "TPU_NAME": "pod", "ZONE": "z"}  # fmt: skip
    for script in ("tpu_pod.sh", "host-0.sh"):
        if log.exists():
            log.unlink()
        out = subprocess.run(["bash", str(here / "sw" / "launch" / script)], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        (call,) = [json.loads(line) for line in log.read_text().splitlines()]
        assert call["cwd"] == str(repo)
        args = call["argv"]
        want = "configs/cfg.py" if in_checkout else config
        assert args[args.index("--config") + 1] == f"{want}:arg=1", script
        assert os.path.isfile(os.path.join(call["cwd"], want)), script  # the hosts' file
        assert args[args.index("--workdir") + 1] == str(here / run.workdir), script


def test_the_checkout_root_holds_the_config_package(tmp_path, monkeypatch):
    """The real checkout's root (setup.py maps flaxlm.configs to its configs/ folder): its
    config files are written relative to it, from any working directory."""
    root = sweep_launch.checkout_root()
    assert os.path.isfile(os.path.join(root, "setup.py"))
    assert os.path.isfile(os.path.join(root, "configs", "pretrain.py"))
    monkeypatch.chdir(tmp_path)
    arg = os.path.join(root, "configs", "pretrain.py") + ":variant=tiny"
    assert sweep_launch._host_paths(arg, [])[0] == "configs/pretrain.py:variant=tiny"
    monkeypatch.chdir(root)
    assert sweep_launch._host_paths("./configs/pretrain.py", [])[0] == "configs/pretrain.py"


def test_ctrl_c_while_trainers_start_reports_them_interrupted(tmp_path, config, monkeypatch,
                                                             capsys):  # fmt: skip
    """Trainers still starting up die of the SIGTERM the sweep forwards (rc=-15, before their
    own handler is set); the sweep reported them FAILED."""
    root = str(tmp_path / "sw")
    runs = sweep.plan(config, root, only=[0, 1])
    started = [str(tmp_path / f"started-{r.index}") for r in runs]
    code = "import sys, time; open(sys.argv[1], 'w').close(); time.sleep(60)"
    monkeypatch.setattr(sweep, "train_command", lambda config_arg, run, python="": [
        sys.executable, "-c", code, started[run.index]])  # fmt: skip

    def interrupt():  # Ctrl-C once the trainers run (a trainer's own handler never comes)
        for _ in range(600):
            if all(os.path.exists(p) for p in started):
                break
            threading.Event().wait(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Thread(target=interrupt, daemon=True)
    timer.start()
    with pytest.raises(KeyboardInterrupt, match="signal 2"):
        sweep.run_local(config, runs, parallel=2, cache_dir="")
    timer.join()
    out = capsys.readouterr().out
    assert "FAILED" not in out
    for r in runs:
        assert f"interrupted {r.name} at step 0" in out
        assert not os.path.exists(os.path.join(r.workdir, "FAILED"))


def test_the_skipped_hint_is_the_one_the_trainer_prints():
    from flaxlm.train import main

    assert sweep_table._HINT_PREFIX == f"({main.TRACEBACK_ENV}="


def test_path_overrides_name_the_sweeps_files_after_the_cd(tmp_path, monkeypatch):
    """The scripts `cd` to the checkout, and then path-valued overrides typed relative to the
    sweep's directory named the checkout's files: a `runs/sft` there silently became the
    init_from, and a reward module beside the sweep could not be imported. Existing relative
    paths (globs, hf: and comma lists too) are made absolute, and the sweep's directory joins
    PYTHONPATH."""
    from flaxlm.train.sweep_plan import Run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "sft").mkdir(parents=True)
    (tmp_path / "d").mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / "d" / name).write_text("{}\n")
    overrides = {"init_from": "runs/sft", "distill.teacher": "hf:runs/sft",
                 "data.train": "d/*.jsonl,d/a.jsonl,builtin:sft", "grpo.rewards": "mine:fn",
                 "data.eval": "nowhere.jsonl", "lr": 0.1}  # fmt: skip
    _, (run,) = sweep_launch._host_paths("cfg.py", [Run(0, "r", overrides, "sw/r")])
    assert run.overrides == {
        "init_from": f"{tmp_path}/runs/sft", "distill.teacher": f"hf:{tmp_path}/runs/sft",
        "data.train": f"{tmp_path}/d/*.jsonl,{tmp_path}/d/a.jsonl,builtin:sft",
        "grpo.rewards": "mine:fn", "data.eval": "nowhere.jsonl", "lr": 0.1,
    }  # fmt: skip
    script = sweep_launch.host_script("cfg.py", [run], 0, 2, repo_dir="/repo")
    assert f"export PYTHONPATH=${{PYTHONPATH:+$PYTHONPATH:}}{tmp_path}\n" in script
    assert f"--config.init_from={tmp_path}/runs/sft" in script
    pod = sweep_launch.pod_script("cfg.py", [run], tpu_name="t", zone="z", repo_dir="/repo")
    assert f"PYTHONPATH=${{PYTHONPATH:+$PYTHONPATH:}}{tmp_path} " in pod
