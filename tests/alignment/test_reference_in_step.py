"""DPO (`dpo.ref_logps=online`) and KTO score their frozen reference inside the jitted step
(`loop.Task.frozen`), not in the batch iterator: drawing a training batch makes no device
read (the host never waits on the device for it), the batches carry no `ref_*` fields, and
the step's loss and metrics equal those of the old data-path reference (`dpo.RefLogps`,
computed here explicitly) within 1e-5."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from flaxlm.alignment import dpo, kto
from flaxlm.configs import dpo as dpo_config
from flaxlm.configs import kto as kto_config
from flaxlm.models import sharding
from flaxlm.models.sharding import logical_axis_rules, make_mesh, shard_batch, use_mesh
from flaxlm.train.pretrain import model_fns
from flaxlm.train.step import finish_metrics

_spec = importlib.util.spec_from_file_location(
    "rl_helpers", os.path.join(os.path.dirname(__file__), "rl_helpers.py")
)
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

SMALL = {"batch_size": 8, "seq_len": 64, "data.eval": ""}
CASES = {
    "dpo": (dpo, dpo_config, {"dpo.ref_logps": "online"}),
    "kto": (kto, kto_config, {}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    return H.fake_runs(str(tmp_path_factory.mktemp("ref_step_runs")), cache_dir)


def _task(name, sft, cache_dir):
    module, cfg_module, extra = CASES[name]
    c = H.tiny(cfg_module, cache_dir, init_from=sft, **SMALL, **extra)
    mesh = make_mesh(dict(c.mesh))
    return c, mesh, module.build_task(c, mesh, None)


@pytest.mark.parametrize("name", sorted(CASES))
def test_drawing_a_batch_reads_nothing_from_the_device(name, runs, cache_dir, monkeypatch):
    """The reviewer's finding: every KTO / online-DPO batch ran the reference and waited for
    its log-probabilities (a device_get per step, 40% of a tiny model's step time)."""
    _, _, task = _task(name, runs[0], cache_dir)
    reads = []
    real = jax.device_get

    def spy(x):
        reads.append(1)
        return real(x)

    monkeypatch.setattr(jax, "device_get", spy)
    monkeypatch.setattr(sharding, "local_rows", lambda t: reads.append(1) or real(t))
    monkeypatch.setattr(dpo, "local_rows", sharding.local_rows)
    batches = [next(task.train_batches) for _ in range(3)]
    assert reads == []
    assert not any(k.startswith("ref_") for b in batches for k in b)
    assert task.frozen is not None


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_step_loss_equals_the_data_path_reference(name, runs, cache_dir):
    """task.frozen is the init_from run's params, and the step's loss and metrics with them
    equal the old mechanism's: the reference's log-probabilities scored per batch by
    `dpo.RefLogps` and read from the batch by the 3-argument loss."""
    c, mesh, task = _task(name, runs[0], cache_dir)
    cfg = H.get_variant("tiny", vocab_size=H.VOCAB)
    init, apply = model_fns(cfg)
    want = H.random_params(init, 0)  # fake_runs' SFT weights
    for a, b in zip(jax.tree.leaves(jax.device_get(task.frozen)), jax.tree.leaves(want),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A policy away from the reference (at the reference every Δ is 0).
    policy = jax.tree.map(lambda a, b: a + 0.5 * (b - a), task.frozen, H.random_params(init, 5))
    rules = logical_axis_rules(c.sharding)
    prefixes = dpo.PAIR if name == "dpo" else kto.ROWS
    old_ref = dpo.RefLogps(apply, task.frozen, mesh, rules, cache=False, prefixes=prefixes)
    old_loss = (dpo.dpo_loss_fn(apply, c.dpo) if name == "dpo"
                else kto.kto_loss_fn(apply, c.kto))  # fmt: skip
    for _ in range(2):
        batch = next(task.train_batches)
        with_ref = old_ref.add(batch)
        with use_mesh(mesh, rules):
            got = jax.jit(task.loss_fn)(policy, shard_batch(batch, mesh), None, task.frozen)
            old = jax.jit(old_loss)(policy, shard_batch(with_ref, mesh), None)
        got, old = jax.device_get((got, old))
        np.testing.assert_allclose(got[0], old[0], rtol=1e-5, atol=1e-5)
        m_got, m_old = finish_metrics(got[1]), finish_metrics(old[1])
        assert m_got.keys() == m_old.keys()
        for k in m_old:
            np.testing.assert_allclose(m_got[k], m_old[k], rtol=1e-5, atol=1e-5, err_msg=k)
        assert abs(float(m_old["rewards/margin"])) > 1e-3  # (the reference mattered)
