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


def test_init_from_another_function_is_refused_naming_each_key(source, tmp_path, monkeypatch):
    """A run whose model config has the source's shapes but computes another function (GeGLU on
    a SwiGLU run, another norm epsilon) used to load and train silently; now an error names each
    key with both values, before the state is built (nothing is read or compiled)."""
    from flaxlm.train import loop

    def no_state(*a, **k):
        raise AssertionError("the state was built before the model configs were compared")

    monkeypatch.setattr(loop, "create_train_state", no_state)
    c = _config(init_from=source, **{"model.mlp_activation": "gelu", "model.norm_eps": 0.1,
                                     "model.remat_policy": "full"})  # fmt: skip
    with pytest.raises(ValueError) as e:
        pretrain.run(c, str(tmp_path / "run"))
    msg = str(e.value)
    assert f"model.mlp_activation: init_from={source} has 'silu', this run 'gelu'" in msg
    assert f"model.norm_eps: init_from={source} has 1e-05, this run 0.1" in msg
    assert "remat_policy: init_from" not in msg  # (how, not what, it computes: free)


def test_init_from_with_other_execution_and_context_keys_is_logged_and_recorded(source, tmp_path,
                                                                              caplog):  # fmt: skip
    """The keys that may differ from the source (execution, context length: long-context
    training from a run) are logged, and recorded in events.jsonl; they used to go unsaid."""
    import json

    c = _config(init_from=source, **{"model.max_seq_len": 512, "model.init_std": 0.01})
    with caplog.at_level("INFO", logger="flaxlm"):
        pretrain.run(c, str(tmp_path))
    assert (f"init_from={source}: this run's model config differs from the source's: "
            "model.init_std: 0.02 there, 0.01 here; model.max_seq_len: 256 there, 512 here"
            ) in caplog.text  # fmt: skip
    assert any(r.levelname == "WARNING" and "max_seq_len" in r.message for r in caplog.records)
    (event,) = [json.loads(x) for x in open(tmp_path / "events.jsonl")
                if json.loads(x)["event"] == "init_from_model_changed"]  # fmt: skip
    assert event["changes"] == {"model.init_std": {"init_from": 0.02, "run": 0.01},
                                "model.max_seq_len": {"init_from": 256, "run": 512}}  # fmt: skip


def test_scaling_turned_on_without_the_original_context_is_refused(monkeypatch, caplog):
    """Pretraining continued from a 256-token run with model.rope_scaling=yarn but no
    model.rope_original_max_len used to train with ModelConfig's default 8192 silently (another
    extension than meant); the model is built from the config before init_from is read, so it
    is an error naming the value to set. Set larger than the source's context: a warning."""
    import types

    from flaxlm.train import checkpoint as ckpt_lib
    from flaxlm.train import loop

    source = to_model_config(_config().model).to_dict()  # max_seq_len 256, no scaling
    monkeypatch.setattr(ckpt_lib, "read_meta", lambda run, *a, **k: (1, {"model_config": source}))

    def changes(**model):
        c = _config(init_from="runs/pt", **{"model.max_seq_len": 512, "model.rope_scaling": "yarn",
                                            "model.rope_scaling_factor": 2.0, **model})  # fmt: skip
        ours = to_model_config(c.model).to_dict()
        task = types.SimpleNamespace(model_meta={"model_config": ours})
        return loop._init_from_model_changes(c, task)

    want = r"init_from=runs/pt: model.rope_scaling='yarn' .* set --config.model.rope_original_"
    with pytest.raises(ValueError, match=want + "max_len=256"):
        changes()
    with caplog.at_level("WARNING", logger="flaxlm"):
        changed = changes(**{"model.rope_original_max_len": 256})
        assert changed["rope_original_max_len"] == (8192, 256)
        assert "is more than the max_seq_len" not in caplog.text
        changes(**{"model.rope_original_max_len": 1024})
    assert "model.rope_original_max_len=1024 is more than the max_seq_len 256" in caplog.text


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


def _write(workdir, params, meta):
    from flaxlm.train.checkpoint import Checkpointer

    ck = Checkpointer(workdir, async_save=False)
    ck.save(1, {"params": params}, {}, meta)
    ck.close()
    return workdir


def test_pretraining_starts_from_a_lora_ppo_or_reward_model_run(source, tmp_path):
    """Pretraining's init_from read only a plain LM tree: a LoRA run (params under base/ and
    lora/), a PPO run (policy/) and a reward model (transformer/) were refused as "has no
    params [...]; it holds a different model". It now reads them as every alignment stage
    does: the adapters merged, the policy, the backbone."""
    import numpy as np

    from flaxlm.models import lora as lora_lib

    c = _config(init_from=source)
    target = _target(c)
    base = jax.device_get(load_params(source, target))
    spec = lora_lib.LoraSpec(rank=2)
    adapters = jax.tree.map(lambda s: np.full(s.shape, 0.05, s.dtype),
                            lora_lib.abstract_adapters(target, spec))  # fmt: skip
    _, meta = read_meta(source)
    meta = {"model_config": meta["model_config"], "lora": {}}
    lora = _write(str(tmp_path / "lora"), {"base": base, "lora": adapters},
                  {**meta, "head": "lm", "lora": spec.to_dict()})  # fmt: skip
    ppo = _write(str(tmp_path / "ppo"), {"policy": base, "value": {"w": np.ones(3, np.float32)}},
                 {**meta, "head": "policy_value"})  # fmt: skip
    load = pretrain.build_task(c, make_mesh(dict(c.mesh))).load_init_params
    merged = lora_lib.merge({"base": base, "lora": adapters}, spec)
    got = jax.device_get(load(lora, target))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, merged)
    assert not np.allclose(got["layers_0"]["attn"]["q"]["kernel"],
                           base["layers_0"]["attn"]["q"]["kernel"])  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(load(ppo, target)), base)

    # A reward model: its backbone, which is a whole LM when the LM head is the embedding.
    tied = _config(init_from=source, **{"model.tie_embeddings": True})
    tied_target = _target(tied)
    backbone = {k: v for k, v in base.items() if k != "lm_head"}
    rm_meta = {**meta, "head": "scalar", "model_config": to_model_config(tied.model).to_dict()}
    rm = _write(str(tmp_path / "rm"), {"transformer": backbone, "head": {"w": np.ones(3)}},
                rm_meta)  # fmt: skip
    load_tied = pretrain.build_task(tied, make_mesh(dict(tied.mesh))).load_init_params
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(load_tied(rm, tied_target)),
                 backbone)  # fmt: skip
    # With an untied head the reward model lacks one: named, not "a different model".
    rm_untied = _write(str(tmp_path / "rm_untied"), {"transformer": backbone},
                       {**meta, "head": "scalar"})  # fmt: skip
    with pytest.raises(CheckpointError, match=r"reward-model run .* no LM head \(lm_head\)"):
        load(rm_untied, target)
    # load_params, which reads a plain LM tree, says where such a run keeps its weights.
    with pytest.raises(CheckpointError, match=r"LoRA run: .* under params/base,.*load_lm_params"):
        load_params(lora, target)
    with pytest.raises(CheckpointError, match=r"PPO run: .* under params/policy"):
        load_params(ppo, target)


def test_init_from_a_run_stopped_short_of_its_total_steps_is_warned_about(source, tmp_path, caplog):
    """A preempted run (SIGTERM: checkpoint saved, exit 0) or a killed one was read as
    init_from (and reward_from, ref_from, a teacher) with only "initialised params from RUN": a
    chain `pretrain && sft` went on from a barely trained model. Its latest step short of its
    own total_steps, not at the end of its data, is now warned about, with the stop's reason."""
    import json
    import logging

    from flaxlm.alignment.common import load_lm_params
    from flaxlm.alignment.rl_frozen import _source_meta
    from flaxlm.train import checkpoint_read

    caplog.set_level(logging.INFO, logger="flaxlm")
    target = _target(_config())
    base = jax.device_get(load_params(source, target))  # a finished run (1 of 1 steps)
    assert "stopped at step" not in caplog.text
    assert f"init_from: read {source}/checkpoints/1" in caplog.text

    _, meta = read_meta(source)
    meta = {"model_config": meta["model_config"], "config": {"total_steps": 200}}
    run = _write(str(tmp_path / "cut"), base, meta)
    events = os.path.join(run, "events.jsonl")
    with open(events, "w") as f:
        f.write(json.dumps({"event": "preempted", "reason": "SIGTERM: checkpoint saved at step 1",
                            "step": 1}) + "\n")  # fmt: skip
    said = f"{run} stopped at step 1 of its total_steps=200 (SIGTERM: checkpoint saved at step 1)"
    reads = {"init_from": lambda: load_params(run, target),
             "init_from ": lambda: load_lm_params(run, target),  # (SFT and the other stages)
             f"ref_from={run}": lambda: _source_meta(run, None, f"ref_from={run}")}  # fmt: skip
    for key, read in reads.items():
        caplog.clear()
        checkpoint_read._WARNED_UNFINISHED.clear()
        read()
        assert f"{key.strip()}: {said}; reading that checkpoint" in caplog.text, key
    caplog.clear()
    _source_meta(run, None, "ref_from")  # once per run and step (a policy and its reference)
    _source_meta(run, 1, "ref_from")  # a step named on purpose
    assert "stopped at step" not in caplog.text

    def warned():  # what a read of the latest step says now
        caplog.clear()
        checkpoint_read._WARNED_UNFINISHED.clear()
        checkpoint_read.warn_if_unfinished(run, 1, meta, "init_from")
        return caplog.text

    os.remove(events)  # killed: no event at all
    assert "stopped at step 1 of its total_steps=200 (preempted or killed?)" in warned()
    with open(events, "w") as f:  # its finite data ended there: the run's end
        f.write(json.dumps({"event": "data_end", "reason": "data ended", "step": 1}) + "\n")
    assert "stopped at step" not in warned()
