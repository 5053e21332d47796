"""init_from a run of another model shape: refused naming the parameters, never half-loaded."""

import os
import shutil

import jax
import pytest

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.configs.common import override, to_model_config
from flaxlm.models.sharding import make_mesh
from flaxlm.train import pretrain
from flaxlm.train.checkpoint import CheckpointError, load_params, read_meta
from flaxlm.train.state import unbox


def _config(**overrides):
    c = pretrain_config.get_config("variant=tiny,runlocal=True,data=markov")
    return override(c, {"progress_bar": False, "eval_at_start": False, "eval_every": 0,
                        "total_steps": 1, "ckpt_every": 1, **overrides})  # fmt: skip


def _target(config):
    init = pretrain.model_fns(to_model_config(config.model))[0]
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
                        unbox(jax.eval_shape(init, jax.random.PRNGKey(0))))  # fmt: skip


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("src"))
    pretrain.run(_config(), workdir)
    return workdir


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model.n_layers": 1}, r"extra \['layers_1'\]"),  # used to load, silently dropping it
        ({"model.n_layers": 3}, r"no \['layers_2'\]"),
        ({"model.d_ff": 96}, r"\['layers_0'\]\['mlp'\].* has shape .*, expected"),
    ],
)
def test_init_from_another_shape_names_the_params(source, change, match):
    c = _config(init_from=source, **change)
    task = pretrain.build_task(c, make_mesh(dict(c.mesh)))
    with pytest.raises(CheckpointError, match=f"init_from={source}: .*{match}"):
        task.load_init_params(source, _target(c))
    same = _config(init_from=source)
    loaded = pretrain.build_task(same, make_mesh(dict(same.mesh))).load_init_params(
        source, _target(same)
    )
    assert not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(loaded))


def test_load_params_names_what_the_checkpoint_lacks(source):
    target = _target(_config())
    with pytest.raises(CheckpointError, match=r"has no params \[\"\['value'\]\['w'\]\"\]"):
        load_params(source, {**target, "value": {"w": target["final_norm"]["scale"]}})


def test_unreadable_meta_names_the_step(source, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(source, run)
    os.remove(os.path.join(run, "checkpoints", "1", "meta", "metadata"))
    with pytest.raises(CheckpointError, match=r"cannot read the meta of checkpoint .*/run/"):
        read_meta(run)


def test_reading_a_checkpoint_logs_no_read_only_notice(source, caplog):
    import logging

    caplog.set_level(logging.INFO)
    read_meta(source)
    assert "Given directory is read only" not in caplog.text
