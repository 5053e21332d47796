"""Sweeps: expansion into named runs, launch files, a killed sweep that resumes, the run table.

The training tests run the real trainer (`python -m flaxlm.train.main`) on the tiny markov config
through the sweep's own subprocesses; one module-scoped fixture runs a 2-run sweep, kills it once
the first run finished and runs it again, and two tests read the result.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flaxlm.train import sweep, sweep_table
from flaxlm.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "pretrain.py") + ":variant=tiny,runlocal=True,data=markov"
NAMES = [
    "run-model.d_model=64,opt.lr=0.001",
    "run-model.d_model=128,opt.lr=0.001",
    "run-model.d_model=64,opt.lr=0.003",
    "run-model.d_model=128,opt.lr=0.003",
]
STEPS = 12
# Fast tiny runs: eval and checkpoints only at the end; resumed runs reuse the compile cache.
EXTRA = [f"total_steps={STEPS}", f"eval_every={STEPS}", f"ckpt_every={STEPS}", "log_every=4",
         "progress_bar=False", "eval_at_start=False", "data.eval_batches=1"]  # fmt: skip


def test_sweep_expands_into_named_runs(tmp_path):
    runs = sweep.plan(CONFIG, str(tmp_path), extra=EXTRA)
    assert [r.name for r in runs] == NAMES
    assert [r.workdir for r in runs] == [str(tmp_path / n) for n in NAMES]
    assert runs[1].overrides["model.d_model"] == 128 and runs[1].overrides["total_steps"] == STEPS
    assert all(r.total_steps == STEPS for r in runs)
    cmd = sweep.train_command(CONFIG, runs[3])
    assert cmd[1:3] == ["-m", "flaxlm.train.main"] and "--config.opt.lr=0.003" in cmd
    assert "--config.model.d_model=128" in cmd and f"--config.total_steps={STEPS}" in cmd

    only = sweep.plan(CONFIG, str(tmp_path), extra=EXTRA, only=[1, 3])
    assert [r.name for r in only] == [NAMES[1], NAMES[3]] and [r.index for r in only] == [1, 3]
    sweep.write_index(str(tmp_path), CONFIG, only, EXTRA)
    index = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["name"] for r in index["runs"]] == [NAMES[1], NAMES[3]]
    with pytest.raises(KeyError, match="opt.lrr"):
        sweep.plan(CONFIG, str(tmp_path), extra=["opt.lrr=1"])
    with pytest.raises(IndexError, match="0..3"):
        sweep.plan(CONFIG, str(tmp_path), only=[7])


def test_run_names_are_deterministic_and_safe():
    a = sweep.run_name({"opt.lr": 1e-3, "model.d_model": 128})
    b = sweep.run_name({"model.d_model": 128, "opt.lr": 0.001})
    assert a == b == "run-model.d_model=128,opt.lr=0.001"
    assert "/" not in sweep.run_name({"data.sources": "a/b.jsonl"})
    # a replaced character leaves a hash of the exact value: two paths never share a directory
    assert sweep.run_name({"data.sources": "a/b"}) != sweep.run_name({"data.sources": "a_b"})
    assert len(sweep.run_name({f"k{i}": "x" * 20 for i in range(20)})) < 180
    assert sweep.run_name({}) == "run"


def test_run_name_edges_a_finished_legacy_directory_and_bool_flags(tmp_path):
    """A body of exactly MAX_NAME characters is kept; one more is cut and hashed back to
    MAX_NAME; a float's exponent keeps its "+" (no hash); of two directories an older sweep
    made for the same overrides the finished one is resumed; a bool override from the command
    line is read case-insensitively, as the trainer's flags read it."""
    import re

    import ml_collections

    from flaxlm.train.sweep_plan import MAX_NAME

    body = "x" * (MAX_NAME - 2)  # "k=" + body: MAX_NAME characters
    assert sweep.run_name({"k": body}) == "run-k=" + body
    longer = sweep.run_name({"k": body + "x"})
    assert len(longer) == len("run-") + MAX_NAME and re.fullmatch(r"run-k=x+-[0-9a-f]{8}", longer)
    assert sweep.run_name({"opt.lr": 1e20}) == "run-opt.lr=1e+20"
    for d in ("run-000-model.d_model=64", "run-003-model.d_model=64"):
        os.makedirs(tmp_path / d)
    (tmp_path / "run-003-model.d_model=64" / "DONE").write_text("{}")
    assert sweep.resolve_name(str(tmp_path), {"model.d_model": 64}) == "run-003-model.d_model=64"
    config = ml_collections.ConfigDict({"flag": False})
    for text, want in [("True", True), ("TRUE", True), ("1", True), ("False", False), ("0", False)]:
        sweep.set_dotted(config, "flag", text, from_string=True)
        assert config.flag is want, text


def test_launch_files_have_one_line_per_pending_run(tmp_path, capsys):
    root = tmp_path / "sw"
    os.makedirs(root / NAMES[2])
    (root / NAMES[2] / "DONE").write_text("{}")  # a finished run is left out
    rc = sweep.main(["--config", CONFIG, "--workdir", str(root), "--launch", "print",
                     "--nodes", "2", "--config.total_steps=5"])  # fmt: skip
    assert rc == 0
    launch = root / "launch"
    slurm = (launch / "slurm_array.sh").read_text()
    assert "#SBATCH --array=0-2\n" in slurm and "#SBATCH --nodes=2" in slurm
    # jax's SLURM detection gives each task one GPU: one task per GPU, not one per node
    assert "#SBATCH --ntasks-per-node=8\n" in slurm and "#SBATCH --gpus-per-node=8\n" in slurm
    assert f"#SBATCH --chdir={os.getcwd()}\n" in slurm  # relative paths work from any sbatch dir
    cases = [ln for ln in slurm.splitlines() if ln.strip()[:2] in ("0)", "1)", "2)")]
    assert len(cases) == 3 and all("srun" not in c and "--distributed" in c for c in cases)
    assert NAMES[2] not in slurm and 'srun "${CMD[@]}"' in slurm
    pod = [ln for ln in (launch / "tpu_pod.sh").read_text().splitlines() if ln.startswith("gcloud")]
    assert len(pod) == 3 and all("--worker=all" in ln and "--distributed" in ln for ln in pod)
    for h in range(2):
        lines = (launch / f"host-{h}.sh").read_text().splitlines()
        trainers = [ln for ln in lines if "flaxlm.train.main" in ln]
        assert len(trainers) == 3
        assert all(f"--process_id={h}" in ln and "--num_processes=2" in ln for ln in trainers)
    assert "gcloud compute tpus tpu-vm ssh" in capsys.readouterr().out
    assert not any((root / n / "checkpoints").exists() for n in NAMES)  # nothing was run


def _sweep_cmd(root):
    return [sys.executable, "-m", "flaxlm.train.sweep", "--config", CONFIG, "--workdir", root,
            "--only", "0,1"] + [f"--config.{e}" for e in EXTRA]  # fmt: skip


@pytest.fixture(scope="module")
def resumed_sweep(tmp_path_factory):
    """A 2-run sweep killed (SIGKILL) as soon as its second run has started (the first is
    done), then run again."""
    root = str(tmp_path_factory.mktemp("sweep"))
    env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    env.pop("XLA_FLAGS", None)  # trainers run like the CLI: one CPU device
    first = subprocess.Popen(_sweep_cmd(root), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    done0 = os.path.join(root, NAMES[0], "DONE")
    # Wait for the second run's trainer, not just the first run's DONE: under load the sweep
    # can be killed between writing DONE and starting the next run.
    running1 = os.path.join(root, NAMES[1], "RUNNING")
    deadline = time.monotonic() + 240
    while not os.path.exists(running1) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert os.path.exists(running1), (
        first.communicate()[0] if first.poll() is not None else "timeout"
    )
    assert os.path.exists(done0)
    first.send_signal(signal.SIGKILL)  # its running trainer gets SIGTERM (parent-death signal)
    out1 = first.communicate()[0]
    assert not os.path.exists(os.path.join(root, NAMES[1], "DONE"))
    second = subprocess.run(_sweep_cmd(root), env=env, capture_output=True, text=True,
                            timeout=240)  # fmt: skip
    return root, out1, second


def test_interrupted_sweep_resumes_where_it_stopped(resumed_sweep):
    root, out1, second = resumed_sweep
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"start {NAMES[1]}" in out1  # the second run had started when the sweep was killed
    assert f"skip {NAMES[0]} (finished)" in second.stdout
    assert f"start {NAMES[0]}" not in second.stdout and f"done {NAMES[1]}" in second.stdout
    log0 = open(os.path.join(root, NAMES[0], "train.log")).read()
    log1 = open(os.path.join(root, NAMES[1], "train.log")).read()
    assert log0.count("\n=== ") == 1 and log1.count("\n=== ") == 2  # trained once / started twice
    for name in NAMES[:2]:
        run_dir = os.path.join(root, name)
        assert os.path.exists(os.path.join(run_dir, "DONE"))
        assert not os.path.exists(os.path.join(run_dir, "RUNNING"))
        assert os.path.isdir(os.path.join(run_dir, "checkpoints", str(STEPS)))
        steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
        assert steps == list(range(4, STEPS + 1, 4))  # one uninterrupted-looking log


def test_run_table_has_sizes_tokens_compute_and_losses(resumed_sweep):
    from flaxlm.configs import pretrain as pretrain_config
    from flaxlm.configs.common import to_model_config

    root, _, _ = resumed_sweep
    rows = sweep_table.collect(root)
    assert [r["name"] for r in rows] == NAMES[:2]
    for row, d_model in zip(rows, (64, 128)):
        c = pretrain_config.get_config("variant=tiny,runlocal=True,data=markov")
        c.model.d_model = d_model
        cfg = to_model_config(c.model)
        counts = cfg.param_counts()
        tokens = STEPS * c.batch_size * c.seq_len
        assert row["n_params"] == counts["total"] and row["tokens"] == tokens == STEPS * 16 * 128
        assert row["n_params_nonembed"] == counts["total"] - counts["embedding"]
        assert row["c_6nd"] == pytest.approx(6 * counts["non_embedding"] * tokens)
        assert row["flops"] == pytest.approx(cfg.flops_per_token(c.seq_len) * tokens)
        records = read_metrics(os.path.join(root, row["name"]))
        assert row["final_loss"] == [r["loss"] for r in records if "loss" in r][-1]
        assert row["heldout_loss"] == [r["eval/nll"] for r in records if "eval/nll" in r][-1]
        assert row["step"] == STEPS and "eval/accuracy" in row
    assert rows[1]["n_params_nonembed"] > rows[0]["n_params_nonembed"]
    csv_text = open(os.path.join(root, "runs.csv")).read().splitlines()
    assert len(csv_text) == 3 and csv_text[0].startswith("index,name,overrides")
    table = json.loads(open(os.path.join(root, "runs.json")).read())["runs"]
    assert [r["tokens"] for r in table] == [STEPS * 16 * 128] * 2
