"""read_meta / load_model given a step of the wrong type or a directory that is not a run: a
TypeError naming the argument, or a CheckpointError saying what to pass instead."""

import os

import numpy as np
import pytest

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.configs.common import override
from flaxlm.train import pretrain
from flaxlm.train.checkpoint import CheckpointError, load_model, read_meta


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    c = pretrain_config.get_config("variant=tiny,runlocal=True,data=markov")
    c = override(c, {"progress_bar": False, "eval_at_start": False, "eval_every": 0,
                     "total_steps": 1, "ckpt_every": 1})  # fmt: skip
    workdir = str(tmp_path_factory.mktemp("run"))
    pretrain.run(c, workdir)
    return workdir


@pytest.mark.parametrize(
    "step, match",
    [
        ("1", r"step='1' must be an int or None, not a str; pass int\('1'\)"),  # "no step 1"
        (1.0, r"step=1.0 must be an int or None, not a float"),  # read directory "1.0"
        (True, r"step=True must be an int or None, not a bool"),
    ],
)
@pytest.mark.parametrize("reader", [read_meta, load_model], ids=lambda f: f.__name__)
def test_a_step_that_is_not_an_int_is_a_type_error_naming_the_argument(run, reader, step, match):
    with pytest.raises(TypeError, match=f"^{reader.__name__}: {match}"):
        reader(run, step)


def test_a_numpy_int_step_reads_that_step_as_an_int(run):
    step, _ = read_meta(run, np.int64(1))
    assert step == 1 and type(step) is int  # (was np.int64, into meta and file names)
    assert load_model(run, np.int32(1))[0].vocab_size > 0


def test_a_runs_checkpoints_directory_names_the_run_to_pass(run):
    ckpts = os.path.join(run, "checkpoints")
    with pytest.raises(CheckpointError, match=f"pass the run directory {run}$"):
        load_model(ckpts)
    with pytest.raises(CheckpointError, match=f"pass the run directory {run}$"):
        load_model(ckpts, 1)  # (was "there is no step 1; steps there: none")
    with pytest.raises(CheckpointError, match=f"pass the run directory {run} and step=1$"):
        read_meta(os.path.join(ckpts, "1"))


def test_a_hugging_face_directory_names_the_importer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"Hugging Face .*load_pretrained\(dir\).*hf import"):
        load_model(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # nothing made
