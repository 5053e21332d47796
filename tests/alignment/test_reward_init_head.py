"""A reward-model task started from a reward-model run (`init_from`, head == "scalar") takes
its head as well as its backbone (plain and LoRA, source and task); from an LM the head is
fresh."""

import importlib.util
import logging
import os

import jax
import numpy as np
import pytest

from flaxlm.alignment import common
from flaxlm.models import lora as lora_lib
from flaxlm.models.heads import scalar_model_fns
from flaxlm.train import checkpoint as ckpt_lib
from flaxlm.train.state import unbox

_spec = importlib.util.spec_from_file_location(
    "rl_helpers", os.path.join(os.path.dirname(__file__), "rl_helpers.py")
)
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

SPEC = lora_lib.LoraSpec(rank=2, train_extra="^head/")


def _init():
    return scalar_model_fns(H.get_variant("tiny", vocab_size=H.VOCAB))[0]


def _target(init):
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = unbox(jax.eval_shape(init, jax.random.PRNGKey(0)))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), abstract)


def _equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """[(run, its params as a plain scalar-head tree)] of a reward model and a LoRA one (base
    and non-zero adapters, merged), and the LM run fake_runs made with the first."""
    root = str(tmp_path_factory.mktemp("rm_head"))
    sft, rm = H.fake_runs(root, cache_dir)
    plain = jax.device_get(ckpt_lib.load_params(rm, _target(_init())))
    both = {
        "base": H.random_params(_init(), 7),
        "lora": H.random_params(lambda r: lora_lib.init_adapters(r, _init()(r), SPEC), 8),
    }
    meta = {**ckpt_lib.read_meta(rm)[1], "lora": SPEC.to_dict()}
    lora_rm = H.write_run(os.path.join(root, "lora_rm"), both, meta)
    return sft, [(rm, plain), (lora_rm, jax.device_get(lora_lib.merge(both, SPEC)))]


@pytest.mark.parametrize("task_lora", [False, True])
def test_a_reward_model_start_keeps_its_head(runs, task_lora, caplog):
    """Was: the head of a reward-model init_from re-initialised, silently."""
    sft, rms = runs
    spec = SPEC if task_lora else None
    init = lora_lib.with_lora(_init(), spec) if spec else _init()
    fresh = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), _target(init))
    load, transform = common.init_hooks("scalar", spec)
    inner = lambda p: p["base"] if spec else p  # noqa: E731
    for source, want in rms:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="flaxlm"):
            params = transform(load(source, _target(init)), fresh)
        _equal(inner(params), want)
        assert "its backbone and head loaded" in caplog.text
        assert not np.array_equal(want["head"]["kernel"], inner(fresh)["head"]["kernel"])
        if spec:
            assert params["lora"] is fresh["lora"]
    # from a language model: its backbone, and the head stays fresh
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flaxlm"):
        params = transform(load(sft, _target(init)), fresh)
    assert "the scalar head is fresh" in caplog.text
    assert inner(params)["head"] is inner(fresh)["head"]
    _equal(inner(params)["transformer"], rms[0][1]["transformer"])  # fake_runs: the same backbone
