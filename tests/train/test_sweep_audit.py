"""Sweeps under bad input and partial failure, without training: planning errors, a resumed sweep
whose settings changed, failed and stale runs (fake trainers stand in for train/main.py), the run
table's malformed files, the launch files executed with fake srun / gcloud / python (quoting,
DONE marking, jax.distributed flags), and main.py's multi-process flags."""

import json
import logging
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from absl import app

from flaxlm.train import main as train_main
from flaxlm.train import sweep, sweep_table
from flaxlm.train.sweep_plan import train_command

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN = os.path.join(REPO, "configs", "pretrain.py")
CONFIG = PRETRAIN + ":variant=tiny,runlocal=True,data=markov"
NAMES = [
    "run-model.d_model=64,opt.lr=0.001",
    "run-model.d_model=128,opt.lr=0.001",
    "run-model.d_model=64,opt.lr=0.003",
    "run-model.d_model=128,opt.lr=0.003",
]
STEPS = 12


def _write_config(tmp_path, sweep_body):
    """A config file: pretrain's config with the given sweep() body."""
    path = tmp_path / "my_config.py"
    path.write_text(
        f"from flaxlm.configs.pretrain import get_config  # noqa: F401\n\n\n"
        f"def sweep(add, arg=None):\n{textwrap.indent(sweep_body, '    ')}\n"
    )
    return str(path)


# --------------------------------------------------------------------------------------------
# Planning


def test_plan_matches_the_sweep_exactly(tmp_path):
    runs = sweep.plan(CONFIG, str(tmp_path), extra=[f"total_steps={STEPS}", "seed=3"])
    assert [r.name for r in runs] == NAMES and [r.index for r in runs] == [0, 1, 2, 3]
    assert len({r.workdir for r in runs}) == 4
    for r, (lr, d) in zip(runs, [(1e-3, 64), (1e-3, 128), (3e-3, 64), (3e-3, 128)]):
        # the sweep's keys plus the typed command-line extras, nothing else
        assert r.overrides == {"opt.lr": lr, "model.d_model": d, "total_steps": STEPS, "seed": 3}
        assert r.total_steps == STEPS and r.info["tokens"] == STEPS * 16 * 128


def test_plan_names_bad_overrides(tmp_path):
    root = str(tmp_path / "sw")
    cases = [
        (["opt.lrr=1"], KeyError, r"no key 'opt.lrr' \(did you mean 'opt.lr'\?\)"),
        (["optim.lr=1"], KeyError, r"no key 'optim' \(did you mean 'opt'\?\)"),
        (["opt.lr.x=1"], KeyError, "'opt.lr' is a value, not a section"),  # was "not iterable"
        (["total_steps=1.5"], ValueError, "override total_steps='1.5'"),
        (["eval_at_start=maybe"], ValueError, "expected a boolean"),
        (["total_steps"], ValueError, "expected --config.key=value"),
        # a swept key set for every run: all runs alike, their names still showing the sweep's
        (["opt.lr=0.01"], ValueError, "opt.lr is varied by .*sweep"),
    ]
    for extra, error, message in cases:
        with pytest.raises(error, match=message):
            sweep.plan(CONFIG, root, extra=extra)
    bad = _write_config(tmp_path, 'add(**{"opt.lr": "fast"})')
    with pytest.raises(TypeError, match="override opt.lr='fast'"):  # names the full key
        sweep.plan(bad, root)
    unknown = PRETRAIN + ":variant=huge"
    with pytest.raises(KeyError, match="unknown variant 'huge'"):
        sweep.plan(unknown, root)
    assert not os.path.exists(root)  # nothing written by a failed plan


def test_duplicate_runs_are_an_error(tmp_path):
    same = _write_config(tmp_path, 'add(**{"opt.lr": 1e-3})\nadd(**{"opt.lr": 0.001})')
    with pytest.raises(ValueError, match=r"runs 0 \(run-opt.lr=0.001\) and 1 \(run-opt.lr=0.001\)"):
        sweep.plan(same, str(tmp_path / "sw"))
    # {} is the default config, which already has lr 3e-3: the same run under two names
    default = _write_config(tmp_path, 'add(**{"opt.lr": 3e-3})\nadd()')
    with pytest.raises(ValueError, match="same config"):
        sweep.plan(default + ":variant=tiny", str(tmp_path / "sw"))


def test_resume_with_other_settings_is_an_error(tmp_path, monkeypatch):
    root = str(tmp_path / "sw")
    extra = [f"total_steps={STEPS}"]
    runs = sweep.plan(CONFIG, root, extra=extra)
    sweep.write_index(root, CONFIG, runs, extra)
    os.makedirs(runs[1].workdir)
    (tmp_path / "sw" / NAMES[1] / "train.log").write_text("started\n")
    # Same settings, spelled differently (relative path, other arg order): fine.
    monkeypatch.chdir(REPO)
    same = "./configs/pretrain.py:data=markov,variant=tiny,runlocal=True"
    sweep.write_index(root, same, sweep.plan(same, root, extra=extra), extra)
    longer = ["total_steps=100"]  # would skip DONE runs / resume their checkpoints longer
    with pytest.raises(ValueError, match=f"{NAMES[1]} was started .*total_steps': {STEPS}"):
        sweep.write_index(root, CONFIG, sweep.plan(CONFIG, root, extra=longer), longer)
    full = PRETRAIN + ":variant=tiny,data=markov"  # runlocal dropped: same names, other runs
    with pytest.raises(ValueError, match="was started by a sweep with --config"):
        sweep.write_index(root, full, sweep.plan(full, root, extra=extra), extra)
    # An unstarted run may change: nothing to mix.
    sweep.write_index(root, CONFIG, sweep.plan(CONFIG, root, extra=longer, only=[0]), longer)


def test_a_new_time_limit_or_progress_bar_resubmits_the_same_runs(tmp_path, caplog):
    """A job resubmitted with `--config.max_runtime_minutes=` (or `progress_bar=`, or grain's
    `data.read_threads=` on a machine with more cores) was refused as a changed run, while the
    trainer resumes it as no change; other keys still stop it."""
    from ml_collections import ConfigDict

    from flaxlm.train.loop_resume import _report_config_changes

    root = str(tmp_path / "sw")
    extra = [f"total_steps={STEPS}"]
    runs = sweep.plan(CONFIG, root, extra=extra, only=[0])
    sweep.write_index(root, CONFIG, runs, extra)
    os.makedirs(runs[0].workdir)
    (tmp_path / "sw" / NAMES[0] / "metrics.jsonl").write_text('{"step": 4, "loss": 1.0}\n')
    limit = extra + ["max_runtime_minutes=55", "progress_bar=False", "data.read_threads=8"]
    sweep.write_index(root, CONFIG, sweep.plan(CONFIG, root, extra=limit, only=[0]), limit)
    sweep.write_index(root, CONFIG, sweep.plan(CONFIG, root, extra=extra, only=[0]), extra)
    seed = limit + ["seed=1"]
    with pytest.raises(ValueError, match=f"{NAMES[0]} was started .*'seed': 1"):
        sweep.write_index(root, CONFIG, sweep.plan(CONFIG, root, extra=seed, only=[0]), seed)
    # The trainer's side takes the same keys as no change: logged, no warning.
    saved = {"max_runtime_minutes": 0.0, "progress_bar": True, "seed": 0}
    now = ConfigDict({"max_runtime_minutes": 55.0, "progress_bar": False, "seed": 0})
    with caplog.at_level(logging.INFO, logger="flaxlm"):
        _report_config_changes(now, saved, 4)
    assert "progress_bar changed from True to False" in caplog.text
    assert not [r for r in caplog.records if r.name == "flaxlm" and r.levelno >= logging.WARNING]


def test_a_config_arg_spelt_another_way_is_the_same_sweep(tmp_path):
    """`:runlocal` and `:runlocal=True` build the same runs; the resume check compared the
    strings and refused the second spelling as a changed config."""
    root = str(tmp_path / "sw")
    extra = [f"total_steps={STEPS}"]
    runs = sweep.plan(CONFIG, root, extra=extra)
    sweep.write_index(root, CONFIG, runs, extra)
    _finished(runs[0].workdir)
    bare = CONFIG.replace("runlocal=True", "runlocal")
    sweep.write_index(root, bare, sweep.plan(bare, root, extra=extra), extra)
    assert [r["name"] for r in sweep_table.collect(root)] == NAMES[:1]
    other = CONFIG.replace("runlocal=True", "runlocal=False")  # really another config
    with pytest.raises(ValueError, match="was started by a sweep with --config"):
        sweep.write_index(root, other, sweep.plan(other, root, extra=extra), extra)


def test_bad_input_is_a_usage_error_that_names_it(tmp_path, capsys):
    """`--only 0,a`, a misspelt `--config.` key or config arg, a missing config file used to end
    the sweep in a traceback; now argparse's usage error (exit 2) with the message."""
    root = str(tmp_path / "sw")
    cases = [
        ([CONFIG, "--only", "0,a"], "--only '0,a': expected comma-separated run indices"),
        ([CONFIG, "--only", "9"], r"--only \[9\]: the sweep has runs 0..3"),
        ([CONFIG, "--config.opt.lrr=3"], r"no key 'opt.lrr' \(did you mean 'opt.lr'\?\)"),
        ([CONFIG.replace("runlocal", "runloca"), "--only", "0"], "unknown key 'runloca'"),
        ([str(tmp_path / "nope.py")], "no config file"),
        # a section given a value, a sweep() value of the wrong type, a file without sweep():
        # TypeError / AttributeError tracebacks
        ([CONFIG, "--config.opt=3"], "override opt='3': 'opt' is a section, not a value"),
        ([_write_config(tmp_path, 'add(**{"opt.lr": "fast"})')], "override opt.lr='fast'"),
        (
            [os.path.join(REPO, "configs", "preprocess_world.py")],
            r"preprocess_world.py defines no sweep\(add, arg\)",
        ),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            sweep.main(["--workdir", root, "--launch", "print", "--config", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and re.search(f"error: .*{message}", err), err
        assert "Traceback" not in err
    assert not os.path.exists(root)


def test_numpy_values_plan_like_python_numbers(tmp_path):
    """A sweep() of np.geomspace / np.arange values named its runs `opt.lr=np.float64(0.001)` and
    passed that to the trainer (every run failed); an np.int64 made sweep.json unwritable."""
    body = ('import numpy as np\nfor lr in np.array([1e-3, 3e-3]):\n'
            '    for d in np.array([64, 128], dtype=np.int64):\n'
            '        add(**{"model.d_model": d, "opt.lr": lr})')  # fmt: skip
    cfg = _write_config(tmp_path, body) + ":variant=tiny,runlocal=True,data=markov"
    root = str(tmp_path / "sw")
    runs = sweep.plan(cfg, root, extra=[f"total_steps={STEPS}"])
    assert [r.name for r in runs] == NAMES
    plain = sweep.plan(CONFIG, root, extra=[f"total_steps={STEPS}"])
    for r, p in zip(runs, plain):
        assert r.overrides == p.overrides
        assert all(type(r.overrides[k]) is type(v) for k, v in p.overrides.items())
        assert sorted(train_command(cfg, r)[5:]) == sorted(train_command(CONFIG, p)[5:])
    sweep.write_index(root, cfg, runs, [])  # np.int64 was not JSON serializable
    assert [r["name"] for r in json.load(open(os.path.join(root, "sweep.json")))["runs"]] == NAMES
    assert sweep.format_value((np.float64(0.5), np.int64(2))) == "(0.5,2)"


def test_tuple_fields_take_what_the_trainer_takes(tmp_path):
    """`--config.model.rope_long_factors=(1.0,2.0)` (the trainer's flags read tuples as Python
    literals) reached the config as a string and the sweep died with a TypeError."""
    root = str(tmp_path / "sw")
    runs = sweep.plan(CONFIG, root, extra=["model.rope_long_factors=(1.0,2.0)"], only=[0])
    assert runs[0].overrides["model.rope_long_factors"] == (1.0, 2.0)
    assert "--config.model.rope_long_factors=(1.0,2.0)" in train_command(CONFIG, runs[0])
    one = sweep.plan(CONFIG, root, extra=["model.rope_long_factors=3"], only=[0])
    assert one[0].overrides["model.rope_long_factors"] == (3,)  # as the trainer: one element
    with pytest.raises(ValueError, match=r"override model.rope_long_factors='\(1.0 2.0\)'"):
        sweep.plan(CONFIG, root, extra=["model.rope_long_factors=(1.0 2.0)"])


def test_a_run_of_no_steps_is_refused_and_never_done(tmp_path):
    """`--config.total_steps=0` planned a run that trained nothing, and the sweep marked it DONE
    (its logged step 0 "reached" total_steps 0): a run of no steps in the table."""
    root = str(tmp_path / "sw")
    with pytest.raises(ValueError, match=r"total_steps=0 must be >= 1 \(set by --config.total"):
        sweep.plan(CONFIG, root, extra=["total_steps=0"])
    cfg = _write_config(tmp_path, 'add(**{"total_steps": -3})') + ":variant=tiny,runlocal=True"
    with pytest.raises(ValueError, match=r"total_steps=-3 must be >= 1 \(set by sweep\(\)\)"):
        sweep.plan(cfg, root)
    # A trainer that exits cleanly without a logged step is not finished, whatever the plan.
    for steps in (0, None):
        run = sweep.Run(0, "r", {}, str(tmp_path / f"r{steps}"), steps)
        os.makedirs(run.workdir)
        assert sweep._finish(run, 0, 1.0) == "failed"
        assert not os.path.exists(os.path.join(run.workdir, "DONE"))


def test_a_run_keeps_its_directory_when_the_sweep_grows(tmp_path):
    """Run names started with the run's index: a budget added to sweep() renamed every later
    run (trained again under its new name), and sweep.json kept the old names beside the new,
    so the run table listed those configs twice."""
    root = str(tmp_path / "sw")

    def plan(steps):
        body = f"for s in {steps}:\n    for d in (64, 128):\n"
        body += '        add(**{"model.d_model": d, "total_steps": s})'
        cfg = _write_config(tmp_path, body) + ":variant=tiny,runlocal=True,data=markov"
        runs = sweep.plan(cfg, root)
        sweep.write_index(root, cfg, runs, [])
        return runs

    first = plan((8,))
    for r in first:
        _finished(r.workdir, steps=8)
    second = plan((4, 8))  # the new budget comes first: every earlier run moves two places
    assert [r.index for r in second if r.total_steps == 8] == [2, 3]
    assert [(r.name, r.workdir) for r in second[2:]] == [(r.name, r.workdir) for r in first]
    assert [sweep.is_done(r) for r in second] == [False, False, True, True]
    rows = sweep_table.collect(root)
    assert [(r["name"], r["index"]) for r in rows] == [(r.name, r.index) for r in second[2:]]
    index = json.load(open(os.path.join(root, "sweep.json")))
    assert [r["name"] for r in index["runs"]] == [r.name for r in second]
    plan((8,))  # and the budget dropped again: its runs leave the index and the table
    assert len(json.load(open(os.path.join(root, "sweep.json")))["runs"]) == 2


def test_a_sweep_named_the_old_way_resumes_without_retraining(tmp_path):
    """A sweep directory made while names held the index (`run-<index>-k=v,...`) keeps its runs:
    each is found by its overrides, whatever its index is now, and is listed once."""
    root = tmp_path / "sw"
    body = 'for s in (4, 8):\n    add(**{"model.d_model": 64, "total_steps": s})'
    cfg = _write_config(tmp_path, body) + ":variant=tiny,runlocal=True,data=markov"
    # What the old names made of this sweep before its 4-step run was added: run 0, finished.
    old = root / "run-000-model.d_model=64,total_steps=8"
    _finished(str(old), steps=8)
    overrides = {"model.d_model": 64, "total_steps": 8}
    (root / "sweep.json").write_text(json.dumps({"config": cfg, "extra_overrides": [], "runs": [
        {"index": 0, "name": old.name, "overrides": overrides, "workdir": str(old),
         "total_steps": 8, "info": {"total_steps": 8}}]}))  # fmt: skip
    runs = sweep.plan(cfg, str(root))
    assert [r.name for r in runs] == ["run-model.d_model=64,total_steps=4", old.name]
    assert runs[1].workdir == str(old) and runs[1].index == 1
    assert sweep.is_done(runs[1]) and not sweep.is_done(runs[0])
    sweep.write_index(str(root), cfg, runs, [])
    assert [r["name"] for r in sweep_table.collect(str(root))] == [old.name]
    assert sweep.legacy_run_name(0, overrides) == old.name


# --------------------------------------------------------------------------------------------
# Local runs with fake trainers

FAKE_TRAINER = r"""
import json, os, sys
workdir, total = sys.argv[1], int(sys.argv[2])
name = os.path.basename(workdir)
last = total
if name in os.environ.get("FAKE_FAIL", "").split(";"):
    last = total // 3
elif name in os.environ.get("FAKE_STOP", "").split(";"):
    last = total - 4  # preempted: exits cleanly before total_steps
elif name in os.environ.get("FAKE_DATA_END", "").split(";"):
    last = total - 4  # its finite data ended: exits cleanly, as train/loop.py records it
    with open(os.path.join(workdir, "events.jsonl"), "a") as f:
        f.write(json.dumps({"event": "data_end", "step": last, "reason": "fake"}) + "\n")
start = 0
path = os.path.join(workdir, "metrics.jsonl")
if os.path.exists(path):
    start = max(json.loads(l)["step"] for l in open(path) if l.strip())
with open(path, "a") as f:
    for step in range(start + 4, last + 1, 4):
        rec = {"step": step, "loss": 10.0 / step}
        if step == total:
            rec["eval/nll"] = 9.0 / step
        f.write(json.dumps(rec) + "\n")
print("trained", name, "to", last)
if os.environ.get("FAKE_GPU_LOG"):  # which GPUs this trainer saw, and when it ran
    import time
    t0 = time.time()
    time.sleep(0.5)
    with open(os.environ["FAKE_GPU_LOG"], "a") as f:
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        f.write(json.dumps({"name": name, "gpus": gpus, "t0": t0, "t1": time.time()}) + "\n")
sys.exit(1 if last < total - 4 else 0)
"""


@pytest.fixture
def fake_trainer(tmp_path, monkeypatch):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setattr(sweep, "train_command", lambda config_arg, run, python="": [
        sys.executable, str(script), run.workdir, str(run.total_steps)])  # fmt: skip
    monkeypatch.delenv("FAKE_FAIL", raising=False)
    monkeypatch.delenv("FAKE_STOP", raising=False)
    monkeypatch.delenv("FAKE_DATA_END", raising=False)
    monkeypatch.delenv("FAKE_GPU_LOG", raising=False)
    return script


def test_parallel_trainers_each_get_their_own_gpus(tmp_path, monkeypatch, capsys, fake_trainer):
    """`--parallel 8` on a GPU host started every trainer on every GPU: XLA preallocates 75% of
    each visible GPU per process, so the second one ran out of memory. `--gpus` splits them:
    each trainer sees only its slice (CUDA_VISIBLE_DEVICES), never one a running trainer has."""
    root, log = str(tmp_path / "sw"), tmp_path / "gpus.jsonl"
    monkeypatch.setenv("FAKE_GPU_LOG", str(log))
    argv = ["--config", CONFIG, "--workdir", root, "--cache_dir", "", "--parallel", "4",
            "--gpus", "0,1,2,3,4", "--gpus_per_run", "2",
            f"--config.total_steps={STEPS}"]  # fmt: skip
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert "--parallel 4: 2 at once (5 GPUs, 2 each)" in out  # GPU 4 is left over
    seen = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(r["name"] for r in seen) == sorted(NAMES)
    assert {r["gpus"] for r in seen} <= {"0,1", "2,3"}
    for a in seen:  # trainers that ran at the same time had disjoint GPUs
        for b in seen:
            if a is not b and a["t0"] < b["t1"] and b["t0"] < a["t1"]:
                assert a["gpus"] != b["gpus"], (a, b)
    assert f"start {seen[0]['name']}" in out and " on GPU " in out
    for bad, message in ((["--gpus", "0", "--gpus_per_run", "2"], "--gpus gives 1 GPU"),
                         (["--gpus", "0,0"], "a GPU is named twice")):  # fmt: skip
        with pytest.raises(SystemExit):
            sweep.main(argv[:6] + bad + argv[-1:])
        assert message in capsys.readouterr().err


def test_failed_runs_keep_the_others_and_rerun(tmp_path, monkeypatch, capsys, fake_trainer):
    root = str(tmp_path / "sw")
    argv = ["--config", CONFIG, "--workdir", root, "--cache_dir", "", "--parallel", "2",
            f"--config.total_steps={STEPS}"]  # fmt: skip
    monkeypatch.setenv("FAKE_FAIL", NAMES[1])
    monkeypatch.setenv("FAKE_STOP", NAMES[2])
    assert sweep.main(argv) == 1
    out = capsys.readouterr().out
    assert (
        f"FAILED {NAMES[1]} (rc=1" in out and f"FAILED {NAMES[2]} (stopped at step 8 of 12" in out
    )
    done = [n for n in NAMES if os.path.exists(os.path.join(root, n, "DONE"))]
    assert done == [NAMES[0], NAMES[3]]
    assert not any(os.path.exists(os.path.join(root, n, "RUNNING")) for n in NAMES)
    assert [r["name"] for r in sweep_table.collect(root)] == done
    assert open(os.path.join(root, "runs.csv")).read().count("\n") == 3  # header + 2 runs

    monkeypatch.delenv("FAKE_FAIL")
    monkeypatch.delenv("FAKE_STOP")
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    for n in done:
        assert f"skip {n} (finished)" in out and f"start {n}" not in out
    for n in (NAMES[1], NAMES[2]):
        assert f"done {n}" in out
    for n in done:  # trained once
        assert open(os.path.join(root, n, "train.log")).read().count("trained ") == 1
    rows = sweep_table.collect(root)
    assert [r["name"] for r in rows] == NAMES and all(r["step"] == STEPS for r in rows)
    assert all(r["heldout_loss"] == pytest.approx(9.0 / STEPS) for r in rows)


def test_a_run_whose_data_ended_is_finished_not_failed(tmp_path, monkeypatch, capsys, fake_trainer):
    """A run stopped by the end of its finite data (events.jsonl's last event is data_end) is
    done: the sweep neither reports it failed nor retrains it, and the table lists it."""
    root = str(tmp_path / "sw")
    argv = ["--config", CONFIG, "--workdir", root, "--cache_dir", "", "--only", "0,1",
            f"--config.total_steps={STEPS}"]  # fmt: skip
    monkeypatch.setenv("FAKE_DATA_END", NAMES[1])
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert f"done {NAMES[1]}" in out and "its data ended at step 8 of 12" in out
    assert json.load(open(os.path.join(root, NAMES[1], "DONE")))["data_end"] == 8
    rows = {r["name"]: r for r in sweep_table.collect(root)}
    assert rows[NAMES[1]]["step"] == 8 and rows[NAMES[1]]["data_end"] is True
    assert rows[NAMES[0]]["step"] == STEPS and not rows[NAMES[0]].get("data_end")
    assert sweep.main(argv) == 0
    assert f"skip {NAMES[1]} (finished)" in capsys.readouterr().out


def test_a_run_whose_data_ended_counts_the_steps_it_trained(tmp_path):
    """The run table took D and the compute from the plan's total_steps: a run whose finite
    data ended at step 5 of 16 entered the scaling fit with 16 steps' tokens and FLOPs."""
    root = str(tmp_path / "sw")
    (run,) = sweep.plan(CONFIG, root, extra=["total_steps=16"], only=[0])
    sweep.write_index(root, CONFIG, [run], [])
    os.makedirs(run.workdir)
    with open(os.path.join(run.workdir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 5, "loss": 3.0}) + "\n")
        f.write(json.dumps({"step": 5, "eval/nll": 3.1}) + "\n")
    with open(os.path.join(run.workdir, "events.jsonl"), "w") as f:
        f.write(json.dumps({"event": "data_end", "step": 5}) + "\n")
    with open(os.path.join(run.workdir, "DONE"), "w") as f:
        json.dump({"step": 5, "data_end": 5}, f)
    (row,) = sweep_table.collect(root)
    assert row["data_end"] is True and (row["step"], row["total_steps"]) == (5, 16)
    assert row["tokens"] == 5 * 16 * 128 and row["planned_tokens"] == 16 * 16 * 128
    for key in ("c_6nd", "flops", "flops_causal"):
        assert row[key] == pytest.approx(run.info[key] * 5 / 16), key
    assert row["heldout_loss"] == 3.1


def test_stale_running_file_of_another_process_is_not_busy(tmp_path, fake_trainer):
    """A RUNNING file left by a crashed sweep host whose pid now belongs to another process (after
    a reboot) made the run "busy" forever."""
    root = str(tmp_path / "sw")
    runs = sweep.plan(CONFIG, root, extra=[f"total_steps={STEPS}"], only=[0])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        os.makedirs(runs[0].workdir)
        with open(os.path.join(runs[0].workdir, "RUNNING"), "w") as f:
            f.write(f"{other.pid}\n")
        status = sweep.run_local(CONFIG, runs, cache_dir="", stale_timeout=1.0)
    finally:
        other.kill()
        other.wait()
    assert status == {NAMES[0]: "done"}


# --------------------------------------------------------------------------------------------
# A sweep's trainers end with it

# Stands in for train/main.py, which calls exit_with_sweep() first: writes DIR/READY once set
# up, DIR/TERM (with what it sees of the variable) on SIGTERM.
LIFETIME_TRAINER = r"""
import os, signal, sys, time
from flaxlm.train.sweep_plan import SWEEP_PID_ENV, exit_with_sweep
workdir = sys.argv[1]

def write(name, text):  # whole or not at all: the test polls for the file, then reads it
    with open(os.path.join(workdir, name + ".tmp"), "w") as f:
        f.write(text)
    os.replace(os.path.join(workdir, name + ".tmp"), os.path.join(workdir, name))

def on_term(*_):
    write("TERM", repr(os.environ.get(SWEEP_PID_ENV)))
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
exit_with_sweep()
write("READY", str(os.getpid()))
time.sleep(120)
"""

# A sweep that starts one run with `sweep._start` (the trainer command replaced) and waits.
LIFETIME_SWEEP = r"""
import os, sys, time
from flaxlm.train import sweep
from flaxlm.train.sweep_plan import Run
script, workdir = sys.argv[1], sys.argv[2]
sweep.train_command = lambda config_arg, run, python="": [sys.executable, script, run.workdir]
sweep._start("unused.py", Run(0, "r", {}, workdir), dict(os.environ))
time.sleep(120)
"""


def _wait_for(path, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.1)
    return os.path.exists(path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_trainer_gets_sigterm_when_its_sweep_dies(tmp_path):
    """The sweep passes its pid (no Popen preexec_fn: it can deadlock a multithreaded parent);
    the trainer asks for SIGTERM at its parent's death and drops the variable for its own
    children. A sweep killed with SIGKILL (no chance to forward anything) still ends it."""
    trainer, sweeper = tmp_path / "trainer.py", tmp_path / "sweep.py"
    trainer.write_text(LIFETIME_TRAINER)
    sweeper.write_text(LIFETIME_SWEEP)
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(sweeper), str(trainer), str(workdir)])
    try:
        assert _wait_for(workdir / "READY"), "the trainer did not start"
        pid = int((workdir / "READY").read_text())
        assert (workdir / "RUNNING").read_text().split() == [str(pid)]
        assert not (workdir / "TERM").exists()
    finally:
        proc.kill()
        proc.wait()
    assert _wait_for(workdir / "TERM", timeout=30), "the trainer outlived its sweep"
    assert (workdir / "TERM").read_text() == "None"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_trainer_whose_sweep_already_died_does_not_train(tmp_path):
    """Its parent is not the sweep named (the sweep died before the trainer asked for the
    signal, and the trainer was handed to another parent): it exits at once, saying so."""
    trainer = tmp_path / "trainer.py"
    trainer.write_text(LIFETIME_TRAINER)
    env = {**os.environ, sweep.SWEEP_PID_ENV: "1"}
    out = subprocess.run([sys.executable, str(trainer), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 1
    assert "the sweep (pid 1) that started this trainer has exited" in out.stderr
    assert not (tmp_path / "READY").exists()
    env[sweep.SWEEP_PID_ENV] = "12a"  # not a pid: named, and nothing runs
    out = subprocess.run([sys.executable, str(trainer), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 1 and "FLAXLM_SWEEP_PID='12a' is not a process id" in out.stderr
    assert not (tmp_path / "READY").exists()


# --------------------------------------------------------------------------------------------
# The run table


def _finished(run_dir, steps=STEPS, tasks=None):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for s in range(4, steps + 1, 4):
            f.write(json.dumps({"step": s, "loss": 1.0 / s, **({"eval/nll": 2.0} if s == steps
                                                                 else {})}) + "\n")  # fmt: skip
    with open(os.path.join(run_dir, "DONE"), "w") as f:
        f.write("{}")
    if tasks is not None:
        with open(os.path.join(run_dir, "tasks.json"), "w") as f:
            f.write(tasks)


def test_table_names_missing_and_malformed_files(tmp_path):
    root = tmp_path / "sw"
    runs = sweep.plan(CONFIG, str(root), extra=[f"total_steps={STEPS}"])
    sweep.write_index(str(root), CONFIG, runs, [])
    _finished(runs[0].workdir, tasks='{"qa": {"accuracy": 0.5, "n": 10}}')
    _finished(runs[1].workdir, tasks="{not json")  # its task/* columns are left out
    _finished(runs[2].workdir)
    os.remove(os.path.join(runs[2].workdir, "metrics.jsonl"))  # DONE, metrics lost
    _finished(runs[3].workdir)
    with open(os.path.join(runs[3].workdir, "metrics.jsonl"), "a") as f:
        f.write('{"loss": 1.0}\n')  # no step: was KeyError 'step', no file named
    with pytest.warns(UserWarning) as caught:
        rows = sweep_table.collect(str(root))
    messages = "\n".join(str(w.message) for w in caught)
    assert os.path.join(runs[1].workdir, "tasks.json") in messages
    assert f"{NAMES[2]} is DONE but {os.path.join(runs[2].workdir, 'metrics.jsonl')}" in messages
    assert f"{NAMES[3]} left out: {os.path.join(runs[3].workdir, 'metrics.jsonl')}" in messages
    assert [r["name"] for r in rows] == NAMES[:2]
    assert rows[0]["task/qa/accuracy"] == 0.5 and "task/qa/accuracy" not in rows[1]
    assert rows[0]["heldout_loss"] == 2.0 and rows[0]["final_loss"] == 1.0 / STEPS


def test_table_of_a_copied_sweep_reads_the_copy(tmp_path):
    """sweep.json holds the path each run was started at; the table read that path whenever
    it existed, so a sweep folder copied or moved aside read the original's runs (or those of
    a new study started where it was) and not its own."""
    old = tmp_path / "sw"
    runs = sweep.plan(CONFIG, str(old), extra=[f"total_steps={STEPS}"], only=[0, 1])
    sweep.write_index(str(old), CONFIG, runs, [])
    for r in runs:
        _finished(r.workdir)
    copy = tmp_path / "sw_copy"
    shutil.copytree(old, copy)
    shutil.rmtree(copy / NAMES[1])  # not (yet) in the copy: not a row of it
    with open(old / NAMES[0] / "metrics.jsonl", "a") as f:  # the original trains on
        f.write(json.dumps({"step": STEPS, "loss": 0.5, "eval/nll": 1.25}) + "\n")
    assert [r["heldout_loss"] for r in sweep_table.collect(str(old))] == [1.25, 2.0]
    assert [(r["name"], r["heldout_loss"]) for r in sweep_table.collect(str(copy))] == [
        (NAMES[0], 2.0)
    ]


def test_table_reads_a_sweep_moved_with_absolute_paths(tmp_path):
    """A sweep copied off a cluster: sweep.json holds the old absolute run paths."""
    old = tmp_path / "cluster" / "sw"
    runs = sweep.plan(CONFIG, str(old), extra=[f"total_steps={STEPS}"], only=[0, 1])
    sweep.write_index(str(old), CONFIG, runs, [])
    for r in runs:
        _finished(r.workdir)
    new = tmp_path / "laptop" / "sw"
    os.makedirs(new.parent)
    os.rename(old, new)
    assert [r["name"] for r in sweep_table.collect(str(new))] == NAMES[:2]  # was []


# --------------------------------------------------------------------------------------------
# Launch files, executed with fake cluster tools

FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["ARGV_LOG"], "a") as f:
    f.write(json.dumps({{"cwd": os.getcwd(), "argv": args}}) + "\\n")
if os.environ.get("FAKE_CKPT"):
    workdir, steps = args[args.index("--workdir") + 1], os.environ["FAKE_CKPT"]
    os.makedirs(os.path.join(workdir, "checkpoints", steps))
"""
FAKE_SRUN = '#!/bin/bash\nexec "$@"\n'
# gcloud ... --command=CMD: run CMD in a shell, as ssh does on each worker
FAKE_GCLOUD = """#!/bin/bash
for a in "$@"; do case "$a" in --command=*) exec bash -c "${a#--command=}";; esac; done
exit 2
"""


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_launch_files_run_the_exact_commands(tmp_path, capsys):
    bin_dir = tmp_path / "bin dir"  # a space in the interpreter's path
    bin_dir.mkdir()
    python = _executable(bin_dir / "fake python", FAKE_PYTHON)
    _executable(bin_dir / "srun", FAKE_SRUN)
    _executable(bin_dir / "gcloud", FAKE_GCLOUD)
    repo = tmp_path / "repo"
    repo.mkdir()
    root = tmp_path / "sw root #1"  # space and '#' (sbatch cuts #SBATCH lines at '#')
    tricky = 'it\'s "$HOME" `date` a,b; $(id) \\n'
    argv = ["--config", CONFIG, "--workdir", str(root), "--launch", "print", "--only", "1,2",
            "--nodes", "2", "--python", python, "--repo_dir", str(repo),
            f"--config.init_from={tricky}", f"--config.total_steps={STEPS}"]  # fmt: skip
    assert sweep.main(argv) == 0
    printed = capsys.readouterr().out
    # dry run: the files are printed, nothing ran, no run directory exists
    assert sorted(os.listdir(root)) == ["launch", "sweep.json"]
    runs = sweep.plan(CONFIG, str(root), extra=[f"init_from={tricky}", f"total_steps={STEPS}"],
                      only=[1, 2])  # fmt: skip
    launch = root / "launch"
    for name in ("slurm_array.sh", "tpu_pod.sh", "host-0.sh", "host-1.sh"):
        assert (launch / name).read_text() in printed
    log = tmp_path / "argv.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ARGV_LOG": str(log),
           "TPU_NAME": "pod", "ZONE": "z", "HOST0": "10.0.0.1"}  # fmt: skip

    def run(script, **more):
        if log.exists():
            log.unlink()
        out = subprocess.run(["bash", str(launch / script)], env={**env, **more}, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        calls = [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []
        return out, calls

    def expected(run, *tail, config=CONFIG):
        return train_command(config, run, python)[1:] + list(tail)

    # the pod and host scripts `cd` to the hosts' checkout: its config file, relative to it
    on_hosts = os.path.relpath(PRETRAIN, REPO) + CONFIG[len(PRETRAIN) :]

    # SLURM: every #SBATCH option is one word for sbatch; task i runs runs[i] under srun.
    slurm = (launch / "slurm_array.sh").read_text()
    for line in slurm.splitlines():
        if line.startswith("#SBATCH"):
            assert len(shlex.split(line)) == 2, line
    assert shlex.split(slurm.split("--job-name=")[1].splitlines()[0]) == ["sw root #1"]
    for i, r in enumerate(runs):
        _, calls = run("slurm_array.sh", SLURM_ARRAY_TASK_ID=str(i))
        assert [c["argv"] for c in calls] == [expected(r, "--distributed")]
        assert not (root / r.name / "DONE").exists()  # no final checkpoint: not finished
    _, calls = run("slurm_array.sh", SLURM_ARRAY_TASK_ID="0", FAKE_CKPT=str(STEPS))
    assert (root / runs[0].name / "DONE").exists()
    out, calls = run("slurm_array.sh", SLURM_ARRAY_TASK_ID="0")
    assert calls == [] and "finished" in out.stdout  # a requeued finished task trains nothing

    # TPU pod: the same command on every worker (one fake worker here), from the repo dir.
    _, calls = run("tpu_pod.sh")
    assert [c["argv"] for c in calls] == [
        expected(r, "--distributed", config=on_hosts) for r in runs
    ]
    assert {c["cwd"] for c in calls} == {str(repo)}

    # Multi-host: host h passes the coordinator, the host count and its own index.
    for h in range(2):
        _, calls = run(f"host-{h}.sh")
        tail = ["--coordinator=10.0.0.1:1234", "--num_processes=2", f"--process_id={h}"]
        assert [c["argv"] for c in calls] == [expected(r, *tail, config=on_hosts) for r in runs]


# --------------------------------------------------------------------------------------------
# main.py: jax.distributed arguments


def test_process_flags_without_a_coordinator_are_an_error():
    with pytest.raises(app.UsageError, match="need --coordinator"):
        train_main.init_distributed("", num_processes=2, process_id=1)


def test_explicit_coordinator_keeps_all_local_devices_under_slurm():
    """`--coordinator/--num_processes/--process_id` is one process per host driving all its GPUs;
    inside a SLURM allocation jax's auto-detection still set the visible GPUs to SLURM_LOCALID
    (one GPU per host)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    code = (
        "from flaxlm.train.main import init_distributed\n"
        f"init_distributed('localhost:{port}', 1, 0)\n"
        "import jax\nfrom jax._src import xla_bridge\n"
        "print('VISIBLE', xla_bridge.CUDA_VISIBLE_DEVICES.value, jax.process_count())\n"
    )
    slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "1",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "3"}  # fmt: skip
    env = {**os.environ, **slurm, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "VISIBLE all 1" in out.stdout
