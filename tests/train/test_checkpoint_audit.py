"""Checkpoints (train/checkpoint.py and its users) against references written here.

* a run saved on data=8 restores bit for bit, every leaf in its own dtype (float32 masters,
  bfloat16 Adam moments, int32 counters, uint32 RNG key, guard statistics), with the data
  iterator's position, on fsdp=4×tensor=2 and on one device — compared with the state the run
  itself returned, leaf by leaf;
* resuming a workdir that holds another run's checkpoints (another param dtype, RoPE base,
  vocabulary, layer layout, task or LoRA spec) stops naming each differing meta key, moving and
  changing nothing; execution-only model keys (remat, attention implementation) may change;
* `--step N` for a step that is not there (or only an unfinished `.orbax-checkpoint-tmp`) names
  the step and the steps there;
* readers resolve "latest" once: a save landing between reading the meta and the params (eval
  while the run trains) cannot pair one step's meta with another's params;
* retention: with keep=2 a fallback over an unreadable step keeps its moved copy byte for byte
  while later saves rotate the kept steps; an unfinished save is invisible to readers;
* scan_layers and unrolled layouts do not load into each other: init_from names the leaves.
"""

import glob
import hashlib
import os
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flaxlm.alignment import common
from flaxlm.configs import pretrain as pretrain_config
from flaxlm.configs.common import override, to_model_config
from flaxlm.models.sharding import logical_axis_rules, make_mesh
from flaxlm.train import checkpoint as ckpt_lib
from flaxlm.train import pretrain
from flaxlm.train.checkpoint import CORRUPT_DIR, Checkpointer, CheckpointError
from flaxlm.train.optim import make_optimizer
from flaxlm.train.state import abstract_state, state_shardings, unbox

STEPS = 4


def _config(**overrides):
    c = pretrain_config.get_config("variant=tiny,runlocal=True,data=markov")
    return override(c, {"progress_bar": False, "eval_at_start": False, "eval_every": 0,
                        "log_every": 2, "total_steps": STEPS, "ckpt_every": 2, "keep_ckpts": 0,
                        "opt.warmup_steps": 1, "opt.mu_dtype": "bfloat16",
                        **overrides})  # fmt: skip


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(workdir, final state on the host) of a 4-step run on data=8, async saves at 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("source"))
    state, _ = pretrain.run(_config(), workdir)
    assert Checkpointer(workdir).all_steps() == [2, STEPS]
    return workdir, jax.device_get(state)


def _copy(src, dest) -> str:
    shutil.copytree(src, dest)
    return str(dest)


def _files(directory) -> dict:
    out = {}
    for path in glob.glob(os.path.join(directory, "**"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _target(config, devices=None):
    mesh = make_mesh(dict(config.mesh), devices=devices)
    task = pretrain.build_task(config, mesh)
    tx, _ = make_optimizer(config.opt, config.total_steps)
    shardings = state_shardings(task.init_params, tx, mesh, logical_axis_rules(config.sharding))
    return abstract_state(task.init_params, tx, shardings), task


# ---------------------------------------------------------------------------------------------
# Bitwise restore on other meshes, dtypes preserved


@pytest.mark.parametrize(
    "mesh, sharding, devices",
    [((1, 4, 2), "fsdp_tp", 8), ((1, 1, 1), "fsdp", 1)],
    ids=["fsdp4xtensor2", "one-device"],
)
def test_restore_on_another_mesh_is_bitwise_in_every_dtype(source, mesh, sharding, devices):
    workdir, final = source
    data, fsdp, tensor = mesh
    config = _config(**{"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor,
                        "sharding": sharding})  # fmt: skip
    target, task = _target(config, jax.devices()[:devices])
    ckpt = Checkpointer(workdir)
    step, state, data_state, meta = ckpt.restore_latest(target, expect_meta={
        "task": task.name, **task.model_meta})  # fmt: skip
    ckpt.close()
    assert step == int(state.step) == STEPS
    assert data_state == {"index": STEPS, "seed": 0}  # MarkovStream: the next batch is #4
    assert meta["config"]["mesh"] == {"data": -1, "fsdp": 1, "context": 1, "tensor": 1}  # data=8
    got = jax.tree_util.tree_flatten_with_path(state)[0]
    want, tree = jax.tree.flatten(final)
    assert jax.tree.structure(state) == tree
    dtypes = set()
    for (path, leaf), ref, spec in zip(got, want, jax.tree.leaves(target)):
        name = jax.tree_util.keystr(path)
        assert leaf.dtype == ref.dtype == spec.dtype, name
        assert leaf.sharding == spec.sharding, name  # landed in the target's shards
        np.testing.assert_array_equal(np.asarray(jax.device_get(leaf)), ref, err_msg=name)
        dtypes.add(str(leaf.dtype))
    # fp32 masters, bf16 first moments (opt.mu_dtype), int32 counters, uint32 RNG key.
    assert dtypes == {"float32", "bfloat16", "int32", "uint32"}, dtypes
    assert jax.device_get(state.opt_state[1][0].mu["embed"]["embedding"]).dtype == "bfloat16"
    assert int(state.guard["n_accepted"]) == STEPS and float(state.guard["loss_mean"]) > 0


# ---------------------------------------------------------------------------------------------
# Another run's checkpoints in the workdir


@pytest.mark.parametrize(
    "overrides, key",
    [
        (
            {"model.param_dtype": "bfloat16"},
            "model_config.param_dtype: checkpoint 'float32', this run 'bfloat16'",
        ),  # fmt: skip
        (
            {"model.rope_theta": 500.0},
            "model_config.rope_theta: checkpoint 10000.0, this run 500.0",
        ),  # fmt: skip
        ({"model.vocab_size": 512}, "model_config.vocab_size: checkpoint 256, this run 512"),
        ({"model.scan_layers": True}, "model_config.scan_layers: checkpoint False, this run True"),
    ],
    ids=["param_dtype", "rope_theta", "vocab", "scan_layers"],
)
def test_resuming_another_model_config_names_the_key_and_changes_nothing(
    source, tmp_path, overrides, key
):
    """Before: param_dtype and rope_theta resumed silently (fp32 masters cast to bf16, another
    model); vocab and scan_layers failed on every step naming no key."""
    run = _copy(source[0], tmp_path / "run")
    before = _files(run)
    with pytest.raises(CheckpointError) as err:
        pretrain.run(_config(total_steps=STEPS + 2, **overrides), run)
    msg = str(err.value)
    assert f"checkpoint {run}/checkpoints/{STEPS} was written by another run" in msg, msg
    assert key in msg and "Nothing was moved" in msg, msg
    assert msg.count("\n  ") == 1, msg  # only the changed key is named
    assert _files(run) == before and not os.path.exists(os.path.join(run, CORRUPT_DIR))


def test_execution_only_model_keys_and_another_task_on_restore(source):
    workdir, final = source
    config = _config(**{"model.remat_policy": "full", "model.attention_impl": "xla"})
    target, task = _target(config)
    expect = {"task": task.name, **task.model_meta}
    ckpt = Checkpointer(workdir)
    step, state, _, _ = ckpt.restore_latest(target, expect_meta=expect)  # remat: how, not what
    np.testing.assert_array_equal(jax.device_get(state.params["lm_head"]["kernel"]),
                                  final.params["lm_head"]["kernel"])  # fmt: skip
    with pytest.raises(CheckpointError, match=r"task: checkpoint 'pretrain', this run 'sft'"):
        ckpt.restore_latest(target, expect_meta={**expect, "task": "sft"})
    ckpt.close()


def test_meta_mismatch_reference_cases():
    cfg = to_model_config(_config().model).to_dict()
    lora = {"rank": 2, "alpha": 16.0, "targets": "attn/(q|v)"}
    saved = {"task": "sft", "model_config": cfg, "head": "lm", "lora": lora, "data_report": {}}
    same = {**saved, "data_report": {"x": 1}, "config": {"opt": {"lr": 9.0}}}
    assert ckpt_lib.meta_mismatch(saved, same) == []  # data report, run config: not compared
    assert ckpt_lib.meta_mismatch(saved, {**saved, "lora": {**lora, "alpha": 32.0}}) == [
        "lora.alpha: checkpoint 16.0, this run 32.0"
    ]
    assert ckpt_lib.meta_mismatch(saved, {**saved, "lora": {}}) == [
        "lora.alpha: checkpoint 16.0, this run '<absent>'",
        "lora.rank: checkpoint 2, this run '<absent>'",
        "lora.targets: checkpoint 'attn/(q|v)', this run '<absent>'",
    ]
    # An older checkpoint's model_config without a newer key: its default, not a mismatch.
    old = {k: v for k, v in cfg.items() if k != "sliding_window"}
    assert ckpt_lib.meta_mismatch({**saved, "model_config": old}, saved) == []
    # HF import (no head / lora) resumed as pretraining: the task is named.
    hf = {"task": "hf_import", "model_config": cfg}
    assert ckpt_lib.meta_mismatch(hf, {"task": "pretrain", "model_config": cfg}) == [
        "task: checkpoint 'hf_import', this run 'pretrain'"
    ]


# ---------------------------------------------------------------------------------------------
# --step N, readers during a save


def test_step_that_is_not_there_is_named_with_the_steps_there(source, tmp_path):
    run = _copy(source[0], tmp_path / "run")
    tmp = os.path.join(run, "checkpoints", "6" + ocp.path.step.TMP_DIR_SUFFIX)
    shutil.copytree(os.path.join(run, "checkpoints", str(STEPS)), tmp)  # a save in progress
    want = (
        rf"cannot read checkpoint {re.escape(run)}/checkpoints/{{0}}: FileNotFoundError: "
        rf"there is no step {{0}}; steps there: \[2, 4\]$"
    )
    for step in (99, 6, -1):
        with pytest.raises(CheckpointError, match=want.format(step)):
            ckpt_lib.read_meta(run, step)
    with pytest.raises(CheckpointError, match=want.format(6)):
        ckpt_lib.load_model(run, 6)
    assert ckpt_lib.read_meta(run)[0] == STEPS  # the unfinished save is no step for readers
    from flaxlm import generate

    with pytest.raises(SystemExit, match=want.format(99)):
        generate.load(run, step=99)


def _save_lands_after_read_meta(monkeypatch, run):
    """After the first read_meta, step 8 (a copy of step 2's files) appears, as when the
    training run writing `run` saves while a reader loads it."""
    real = ckpt_lib.read_meta

    def read_meta(ckpt_dir, step=None):
        out = real(ckpt_dir, step)
        new = os.path.join(run, "checkpoints", "8")
        if not os.path.exists(new):
            shutil.copytree(os.path.join(run, "checkpoints", "2"), new)
        return out

    monkeypatch.setattr(ckpt_lib, "read_meta", read_meta)


def test_readers_take_params_from_the_step_whose_meta_they_read(source, tmp_path, monkeypatch):
    """Before: load_policy and init_from resolved "latest" twice (meta, then params)."""
    workdir, final = source
    run = _copy(workdir, tmp_path / "run")
    _save_lands_after_read_meta(monkeypatch, run)
    _, params, _ = common.load_policy(run)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), final.params)

    shutil.rmtree(os.path.join(run, "checkpoints", "8"))
    init = pretrain.model_fns(to_model_config(_config().model))[0]
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
                          unbox(jax.eval_shape(init, jax.random.PRNGKey(0))))  # fmt: skip
    params = pretrain.init_loader(init)(run, target)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), final.params)


def test_scan_layers_and_unrolled_do_not_load_into_each_other(source):
    init = pretrain.model_fns(to_model_config(_config(**{"model.scan_layers": True}).model))[0]
    target = unbox(jax.eval_shape(init, jax.random.PRNGKey(0)))
    with pytest.raises(CheckpointError, match=r"does not fit config.model; it has no \['layers'\]"):
        pretrain.init_loader(init)(source[0], target)


# ---------------------------------------------------------------------------------------------
# Retention around a fallback; a save in flight


def test_keep_rotates_saves_but_never_the_moved_unreadable_step(source, tmp_path):
    run = _copy(source[0], tmp_path / "run")
    state_dir = os.path.join(run, "checkpoints", str(STEPS), "state")
    for path in glob.glob(os.path.join(state_dir, "**", "d", "*"), recursive=True):
        os.remove(path)  # the newest step lost its array data
    evidence = _files(os.path.join(run, "checkpoints", str(STEPS)))
    target, _ = _target(_config())
    ckpt = Checkpointer(run, keep=2, async_save=True)
    step, state, data_state, _ = ckpt.restore_latest(target)
    assert step == 2 and data_state["index"] == 2
    for s in (4, 6, 8):  # the run saves on; keep=2 deletes the oldest after each commit
        ckpt.save(s, state, data_state)
        ckpt.wait()
    ckpt.close()
    assert Checkpointer(run).all_steps() == [6, 8]
    (moved,) = glob.glob(os.path.join(run, CORRUPT_DIR, "*"))
    assert os.path.basename(moved).startswith(f"{STEPS}-") and _files(moved) == evidence


def test_reader_during_an_async_save_sees_a_whole_step(source, tmp_path):
    workdir, final = source
    run = _copy(workdir, tmp_path / "run")
    target, _ = _target(_config())
    writer = Checkpointer(run, async_save=True)
    _, state, data_state, meta = writer.restore_latest(target)
    writer.save(6, state, data_state, meta)  # returns while the write goes on
    step, meta = ckpt_lib.read_meta(run)
    cfg, params, _ = ckpt_lib.load_model(run, step)
    assert step in (STEPS, 6) and meta["task"] == "pretrain"
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), final.params)
    writer.close()
    assert ckpt_lib.read_meta(run)[0] == 6


def test_saving_a_saved_step_is_a_no_op_and_a_hidden_denial_is_named(tmp_path, monkeypatch):
    """A second save of a step (a preemption right after the periodic save) keeps the first
    (orbax raised StepAlreadyExistsError). A restore error that does not carry the
    PermissionError behind it still names the file this user may not read, and nothing moves."""
    import jax.numpy as jnp

    from flaxlm.train import checkpointer as checkpointer_lib

    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(2, {"w": jnp.ones(3)}, {"pos": 1})
    ckpt.save(2, {"w": jnp.zeros(3)}, {"pos": 9})
    ckpt.wait()
    assert ckpt.all_steps() == [2]
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"w": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=one)}
    state, data, _ = ckpt.restore(2, target)
    np.testing.assert_array_equal(state["w"], 1.0)
    assert data == {"pos": 1}
    hidden = str(tmp_path / "checkpoints" / "2" / "state" / "a_file")

    def unreadable(self, step, target):
        raise ValueError("could not read the state")

    monkeypatch.setattr(checkpointer_lib, "permission_denied", lambda path, err=None: hidden)
    monkeypatch.setattr(Checkpointer, "_restore", unreadable)
    with pytest.raises(CheckpointError, match=rf"permission denied: {re.escape(hidden)}(.|\n)*"
                                              "Nothing was moved"):  # fmt: skip
        ckpt.restore_latest(target)
    assert ckpt.all_steps() == [2] and not os.path.exists(tmp_path / CORRUPT_DIR)
