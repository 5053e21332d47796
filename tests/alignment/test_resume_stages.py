"""The supervised alignment stages resume bit for bit and do not depend on the mesh: SFT, DPO,
KTO, the reward model and the process reward model, each interrupted by SIGTERM at step 3 (the
loop saves and stops) and resumed, end with the uninterrupted run's whole TrainState (params,
optimizer state, rng, guard) and per-step metrics; the same run over data=2 x fsdp=4 logs
data=8's metrics up to float rounding. (GRPO, PPO, distillation and pretraining have their own
resume tests.)"""

import importlib
import os
import signal

import jax
import numpy as np
import pytest

from flaxlm.models.sharding import make_mesh
from flaxlm.train import loop
from flaxlm.train.metrics import read_metrics
from tests.alignment import rl_helpers as H


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    return H.fake_runs(str(tmp_path_factory.mktemp("resume_runs")), cache_dir)


def _config(stage, cache_dir, sft, **overrides):
    settings = {"batch_size": 8, "seq_len": 64, "total_steps": 6, "eval_every": 0,
                "ckpt_every": 6, "log_every": 1, "async_ckpt": False, "opt.lr": 1e-2,
                "data.eval": "", **({"init_from": sft} if stage in ("dpo", "kto") else {}),
                **overrides}  # fmt: skip
    return H.tiny(importlib.import_module(f"flaxlm.configs.{stage}"), cache_dir, **settings)


def _metrics(workdir):
    """{step: {key: value}} of the loss lines' numbers, timings left out."""
    out = {}
    for r in read_metrics(workdir):
        if "loss" in r:
            out[r["step"]] = {k: v for k, v in r.items() if isinstance(v, float)
                              and not k.endswith("_s") and "per_s" not in k
                              and k not in ("mfu", "mfu_causal", "time")}  # fmt: skip
    return out


@pytest.mark.parametrize("stage", ["sft", "dpo", "kto", "reward", "prm"])
def test_a_stage_resumes_bit_for_bit_and_another_mesh_logs_the_same(stage, runs, cache_dir,
                                                                    tmp_path):  # fmt: skip
    sft, _ = runs
    mod = importlib.import_module(f"flaxlm.alignment.{stage}")
    c = _config(stage, cache_dir, sft)
    straight, _ = mod.run(c, str(tmp_path / "straight"))

    wd = str(tmp_path / "resumed")
    mesh = make_mesh(dict(c.mesh))
    task = mod.build_task(c, mesh, wd)
    before = task.before_step

    def stop_at_3(state):
        if before:
            before(state)
        if int(state.step) == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    task.before_step = stop_at_3
    _, summary = loop.run(c, wd, task, mesh=mesh)
    assert summary["preempted"] and summary["step"] < 6
    resumed, summary = mod.run(c, wd)
    assert summary["step"] == 6
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    want = _metrics(str(tmp_path / "straight"))
    assert sorted(want) == list(range(1, 7)) and _metrics(wd) == want

    other = _config(stage, cache_dir, sft, **{"mesh.data": 2, "mesh.fsdp": 4})
    mod.run(other, str(tmp_path / "d2f4"))
    got = _metrics(str(tmp_path / "d2f4"))
    assert sorted(got) == sorted(want)
    for step, row in want.items():
        for k, v in row.items():
            np.testing.assert_allclose(got[step][k], v, rtol=2e-4, atol=2e-5, err_msg=f"{k}@{step}")
