"""Bad input to the sweep's command line is one usage line naming it, not a traceback: a
--workdir that is a file (or lies under one), and a sweep() of the wrong shape (a dict passed
positionally to add, a sweep() without its `arg` parameter, a None value). And
`python -m flaxlm.train.sweep_table ROOT` prints the run table (it used to print nothing)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from flaxlm.train import sweep, sweep_launch, sweep_plan, sweep_table

CONFIG = os.path.join(sweep_launch.checkout_root(), "configs", "scaling.py") + ":runlocal=True"


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        sweep.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("sub", ["", "sub"])
def test_a_workdir_that_is_a_file_is_refused(tmp_path, capsys, sub):
    afile = tmp_path / "afile"
    afile.write_text("x")
    root = str(afile / sub) if sub else str(afile)
    err = _usage_error(capsys, ["--config", CONFIG, "--workdir", root, "--launch", "print"])
    assert f"--workdir {root}" in err and "not a directory" in err
    assert afile.read_text() == "x"


def test_check_local_workdir_paths(tmp_path):
    (tmp_path / "afile").write_text("x")
    sweep_plan.check_local_workdir(str(tmp_path / "new" / "deeper"))  # to be made: fine
    sweep_plan.check_local_workdir(str(tmp_path))  # an existing folder: fine
    for bad in ("afile", "afile/sub", "afile/sub/deeper"):
        with pytest.raises(ValueError, match="not a directory"):
            sweep_plan.check_local_workdir(str(tmp_path / bad))


def _config(tmp_path, sweep_src: str) -> str:
    path = tmp_path / "cfg.py"
    path.write_text(
        f"from flaxlm.configs.scaling import get_config  # noqa: F401\n\n"
        f"{textwrap.dedent(sweep_src)}"
    )
    return f"{path}:runlocal=True"


@pytest.mark.parametrize(
    "src, expect",
    [
        ('def sweep(add, arg=None):\n    add({"model.d_model": 48})\n', 'add(**{"key": value})'),
        ('def sweep(add):\n    add(**{"model.d_model": 48})\n', "def sweep(add, arg=None)"),
        ('def sweep(add, arg=None):\n    add(**{"model.d_model": None})\n', "model.d_model"),
    ],
    ids=["positional-dict", "no-arg-parameter", "none-value"],
)
def test_a_sweep_of_the_wrong_shape_is_one_line(tmp_path, capsys, src, expect):
    config = _config(tmp_path, src)
    err = _usage_error(capsys, ["--config", config, "--workdir", str(tmp_path / "sw"),
                                "--launch", "print"])  # fmt: skip
    last = err.strip().splitlines()[-1]
    assert str(tmp_path / "cfg.py") in last and expect in last, err
    assert not (tmp_path / "sw").exists()


def test_a_type_error_inside_the_sweep_body_is_its_own(tmp_path):
    """A sweep of the right shape whose body fails with a TypeError keeps that error (with its
    traceback into the body); it is not reported as a sweep of the wrong shape."""
    src = 'def sweep(add, arg=None):\n    add(**{"model.d_model": 48 + "1"})\n'
    module, _ = sweep_plan.load_config_module(_config(tmp_path, src))
    with pytest.raises(TypeError, match="unsupported operand"):
        sweep_plan.expand(module, "runlocal=True")


def _finished_sweep(root):
    runs = sweep.plan(CONFIG, root)
    sweep.write_index(root, CONFIG, runs, [])
    r = runs[0]
    os.makedirs(r.workdir)
    with open(os.path.join(r.workdir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": r.total_steps, "loss": 3.5}) + "\n")
        f.write(json.dumps({"step": r.total_steps, "eval/nll": 3.25}) + "\n")
    open(os.path.join(r.workdir, "DONE"), "w").close()
    return runs


def test_sweep_table_cli_prints_and_writes_the_table(tmp_path, capsys):
    root = str(tmp_path / "sw")
    runs = _finished_sweep(root)
    assert sweep_table.main([root]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].startswith("index,name,")
    assert runs[0].name in out and "3.25" in out and len(out.splitlines()) == 2
    assert f"no row for {runs[1].name}" in err  # the others: not started
    with open(os.path.join(root, "runs.csv")) as f:
        assert f.read() == out
    csv_out = str(tmp_path / "elsewhere" / "t.csv")
    assert sweep_table.main([root, "--csv", csv_out]) == 0
    with open(csv_out) as f:
        assert runs[0].name in f.read()


def test_sweep_table_cli_not_a_sweep(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flaxlm.train.sweep_table", str(tmp_path)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "not a sweep folder" in proc.stderr
    assert "Traceback" not in proc.stderr
