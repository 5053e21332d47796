"""SFT, reward model, DPO and KTO in a multi-process job: two processes × 4 CPU devices train,
evaluate on held-out data split between them (as many batches on each, padded with empty
ones) and checkpoint as one process × 8 does; the held-out metrics are over every process's
rows, per pair kind too (models/sharding.py: same_batch_count, fetch)."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from flaxlm.alignment import common, rl_common
from flaxlm.models.config import ModelConfig
from flaxlm.models.heads import scalar_model_fns
from flaxlm.train.checkpoint import read_meta
from flaxlm.train.metrics import read_metrics
from flaxlm.train.state import unbox

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


H = _load("rl_helpers", os.path.join(HERE, "rl_helpers.py"))
mp = _load("multiprocess", os.path.join(os.path.dirname(HERE), "multiprocess.py"))
SCRIPT = os.path.join(HERE, "multiprocess_tasks.py")
TASKS = _load("multiprocess_tasks", SCRIPT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    return H.fake_runs(str(tmp_path_factory.mktemp("mp_runs")), cache_dir)


@pytest.fixture(scope="module")
def trained(runs, cache_dir, tmp_path_factory):
    """(root, configs): every offline task run by two processes into root/two/TASK (one start
    of the two for all of them) and, meanwhile, by this process into root/one/TASK."""
    sft, rm = runs
    root = tmp_path_factory.mktemp("offline")
    configs = {t: TASKS.config_for(t, sft, rm, str(cache_dir)) for t in TASKS.OFFLINE}
    port, tasks = mp.free_port(), ",".join(TASKS.OFFLINE)
    args = [root / "two", tasks, sft, rm, cache_dir, root]
    mp.run_processes(lambda i: [SCRIPT, port, i, 2, *args], timeout=400,
                     during=lambda: TASKS.run_all(TASKS.OFFLINE, configs, str(root / "one"),
                                                  str(root)))  # fmt: skip
    return root, configs


@pytest.mark.parametrize("task", TASKS.OFFLINE)
def test_two_processes_evaluate_like_one_and_train(task, trained):
    """The held-out metrics of the starting model, the training and the checkpoint are the
    same whether one process or two run it: the global batches do not depend on the process
    count (data/formats.py `_Batches`)."""
    assert jax.device_count() == 8
    root, configs = trained
    c, two, one = configs[task], root / "two" / task, root / "one" / task
    first = [next(r for r in read_metrics(d) if any(k.startswith("eval/") for k in r))
             for d in (one, two)]  # fmt: skip
    assert first[0]["step"] == first[1]["step"] == 0 and first[0].keys() == first[1].keys()
    for k, v in first[0].items():
        if k.startswith("eval/") and not k.endswith("_s"):  # (not eval/time_s)
            assert first[1][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    if task in ("reward", "dpo", "kto"):  # per pair kind, over both processes' rows
        assert any(k.startswith("eval/acc_") for k in first[1])
    steps = [r for r in read_metrics(two) if "loss" in r]
    assert len(steps) == c.total_steps and all(np.isfinite(r["loss"]) for r in steps)
    last = [r for r in read_metrics(two) if any(k.startswith("eval/") for k in r)][-1]
    assert last["step"] == c.total_steps
    # The same training, up to the order of reductions over processes, and checkpoint.
    for a, b in zip(read_metrics(one), read_metrics(two), strict=True):
        for k in ("loss", "grad_norm"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    want, got = (_trained_params(str(d)) for d in (one, two))
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)


def _trained_params(run_dir: str):
    """A run's params on one device: a language model's, or a reward model's."""
    meta = read_meta(run_dir)[1]
    if meta.get("head") != "scalar":
        return common.load_policy(run_dir)[1]
    init, _ = scalar_model_fns(ModelConfig.from_dict(meta["model_config"]))
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
                          unbox(jax.eval_shape(init, jax.random.PRNGKey(0))))  # fmt: skip
    return rl_common.load_scalar_params(run_dir, target)
