"""Sweeps whose runs branch from other runs of the same sweep (`branch_from=handle.at(STEP)`,
train/sweep_plan.py): the planned names and commands, the checks made before anything trains,
a local sweep that starts each branch once its source's checkpoint exists, a branch whose source
was never trained, SLURM arrays (refused) and a branch of a moved sweep (resumed).

The trainers are the real `python -m flaxlm.train.main` on the tiny markov config.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from flaxlm.train import branch, sweep
from flaxlm.train.metrics import read_metrics

CONFIG_FILE = """
from flaxlm.configs import pretrain


def get_config(arg=None):
    c = pretrain.get_config("variant=tiny,runlocal=True,data=markov")
    c.unlock()
    c.progress_bar, c.eval_at_start, c.eval_every, c.log_every = False, False, 0, 1
    c.opt.schedule, c.opt.warmup_steps, c.opt.wsd_decay_frac = "wsd", 1, 0.5
    c.lock()
    return c


def sweep(add, arg=None):
    case = arg or "good"
    src = add(**{"total_steps": 12, "ckpt_every": 4, "keep_ckpts": 0, "seed": 0})
    if case == "good":
        add(**{"total_steps": 8, "branch_from": src.at(4)})
        add(**{"total_steps": 10, "branch_from": src.at(8)})
    elif case == "keep":
        bad = add(**{"total_steps": 12, "ckpt_every": 4, "keep_ckpts": 2, "seed": 1})
        add(**{"total_steps": 6, "branch_from": bad.at(4)})
    elif case == "every":
        add(**{"total_steps": 6, "branch_from": src.at(6)})
    elif case == "beyond":
        add(**{"total_steps": 20, "branch_from": src.at(16)})
    elif case == "key":
        add(**{"total_steps": 6, "init_from": src.at(4)})
    elif case == "handle":
        add(**{"total_steps": 6, "branch_from": src})
    elif case == "zero":
        add(**{"total_steps": 6, "branch_from": src.at(0)})
"""


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "branchy.py"
    path.write_text(textwrap.dedent(CONFIG_FILE))
    return str(path)


SOURCE = "run-ckpt_every=4,keep_ckpts=0,seed=0,total_steps=12"


def test_branch_points_become_source_names_and_directories(config_file, tmp_path):
    root = str(tmp_path / "sw")
    runs = sweep.plan(config_file, root)
    assert [r.name for r in runs][0] == SOURCE and runs[0].branch_of is None
    assert [r.branch_of for r in runs[1:]] == [(SOURCE, 4), (SOURCE, 8)]
    assert runs[1].overrides["branch_from"] == f"{SOURCE}@4"  # relative: a moved sweep is one
    cmd = sweep.train_command(config_file, runs[2])
    assert f"--config.branch_from={os.path.join(root, SOURCE)}@8" in cmd
    sweep.write_index(root, config_file, runs, [])
    index = json.load(open(os.path.join(root, "sweep.json")))
    assert index["runs"][2]["branch_of"] == [SOURCE, 8]
    assert index["runs"][2]["overrides"]["branch_from"] == f"{SOURCE}@8"
    # --only a branch: its source is checked, not listed
    only = sweep.plan(config_file, root, only=[2])
    assert [r.index for r in only] == [2] and only[0].branch_of == (SOURCE, 8)
    # the pod script trains the runs in order (a source before its branches); a SLURM array
    # cannot, and is refused naming the two launches that work
    from flaxlm.train import sweep_launch

    pod = sweep_launch.pod_script(config_file, runs)
    assert f"branch_from={os.path.abspath(os.path.join(root, SOURCE))}@4" in pod
    with pytest.raises(ValueError, match=r"launch --only 0 first, then --only 1,2"):
        sweep_launch._check_no_branch_waits(runs)
    sweep_launch._check_no_branch_waits(only)  # the source is not in this array: fine


@pytest.mark.parametrize(
    "case, match",
    [
        ("keep", r"keeps only its newest 2 checkpoints \(keep_ckpts\).*keep_ckpts=0"),
        ("every", r"at step 6, but that run saves checkpoints every 4 steps \(ckpt_every\)"),
        ("beyond", r"at step 16, but that run trains 12 steps"),
        ("key", r"init_from=<run 0>.at\(4\); a run handle's .at\(\) is a branch_from value"),
        ("handle", r"branch_from=<run 0>; branch from a step of it: branch_from=handle.at"),
        ("zero", r"run 0.at\(0\): expected a step >= 1"),
    ],
)
def test_branch_points_that_cannot_work_are_refused_before_training(config_file, tmp_path,
                                                                    case, match):  # fmt: skip
    with pytest.raises(ValueError, match=match):
        sweep.plan(f"{config_file}:{case}", str(tmp_path))
    assert not os.listdir(tmp_path)


def _sweep(config_file, root, *args):
    env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    env.pop("XLA_FLAGS", None)  # trainers run like the CLI: one CPU device
    cmd = [sys.executable, "-m", "flaxlm.train.sweep", "--config", config_file, "--workdir",
           root, *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)


def test_a_branch_whose_source_never_trained_is_blocked(config_file, tmp_path):
    out = _sweep(config_file, str(tmp_path), "--only", "1", "--no_table")
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"it branches from {SOURCE} at step 4, which has no checkpoint there" in out.stdout
    assert "not in this sweep's runs (--only)" in out.stdout and "start run" not in out.stdout


@pytest.fixture(scope="module")
def branched_sweep(config_file, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sweep"))
    out = _sweep(config_file, root, "--parallel", "2")
    return root, out


def test_branches_start_after_their_sources_checkpoint_and_continue_it(config_file,
                                                                       branched_sweep):  # fmt: skip
    root, out = branched_sweep
    assert out.returncode == 0, out.stdout + out.stderr
    runs = sweep.plan(config_file, root)
    src_losses = {r["step"]: r["loss"] for r in read_metrics(os.path.join(root, SOURCE))}
    for run, step in zip(runs[1:], (4, 8)):
        assert os.path.exists(os.path.join(run.workdir, "DONE"))
        rec = branch.record(run.workdir)
        assert rec["from"] == os.path.abspath(os.path.join(root, SOURCE)) and rec["step"] == step
        assert rec["from_rel"] == os.path.join("..", SOURCE)
        losses = {r["step"]: r["loss"] for r in read_metrics(run.workdir) if "loss" in r}
        assert sorted(losses) == list(range(1, run.total_steps + 1))
        assert all(losses[s] == src_losses[s] for s in range(1, step + 1))  # the source's curve
        # its first own update: the source's weights, optimizer state and batch (the same loss),
        # under its own decayed lr (another update: the next loss differs)
        assert losses[step + 1] == src_losses[step + 1]
        assert losses[step + 2] != src_losses[step + 2]
    # the start order: a branch starts only once its source's step exists
    starts = [ln for ln in out.stdout.splitlines() if ln.startswith("[sweep] start ")]
    assert starts[0].startswith(f"[sweep] start {SOURCE}")
    table = json.load(open(os.path.join(root, "runs.json")))["runs"]
    assert sorted(r["step"] for r in table) == [8, 10, 12]


def test_a_moved_sweep_resumes_its_branches(config_file, branched_sweep, tmp_path):
    root, _ = branched_sweep
    moved = str(tmp_path / "moved")
    shutil.copytree(root, moved, symlinks=True)
    run = sweep.plan(config_file, moved)[1]
    c = ml_collections.ConfigDict({"branch_from": f"{os.path.join(moved, SOURCE)}@4"})
    assert branch.seed_workdir(c, run.workdir) is None  # resumes from its own steps
    c.branch_from = f"{os.path.join(moved, 'elsewhere')}@4"
    with pytest.raises(ValueError, match="was branched from"):
        branch.seed_workdir(c, run.workdir)
