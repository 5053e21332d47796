"""The frozen models of a run (reference, reward model, teacher) are read at the step of their
source run that the run started with, also on a resume after that source trained on
(alignment/rl_frozen.py `FrozenSources`); a step gone since is an error naming the key, the run
and both steps, and an older checkpoint that records none resumes from the latest, warned.
Errors about a frozen source name its config key."""

import importlib.util
import logging
import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest

from flaxlm.alignment import distill, ppo, rl_common, rl_frozen
from flaxlm.configs import distill as distill_config
from flaxlm.configs import ppo as ppo_config
from flaxlm.models.config import ModelConfig
from flaxlm.models.heads import scalar_model_fns
from flaxlm.models.sharding import make_mesh
from flaxlm.train import loop
from flaxlm.train.checkpoint import Checkpointer, CheckpointError, read_meta
from flaxlm.train.metrics import read_metrics
from flaxlm.train.pretrain import model_fns
from flaxlm.train.state import unbox

_spec = importlib.util.spec_from_file_location(
    "rl_helpers", os.path.join(os.path.dirname(__file__), "rl_helpers.py")
)
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    return H.fake_runs(str(tmp_path_factory.mktemp("frozen_runs")), cache_dir)


def _save(run_dir: str, step: int, params, meta: dict) -> None:
    """Adds `step` to a run, keeping its other steps (a source run that trained on)."""
    ck = Checkpointer(run_dir, keep=10, async_save=False)
    ck.save(step, {"params": params}, {}, meta)
    ck.wait()
    ck.close()


def _train_on(run_dir: str, step: int, seed: int) -> None:
    """The run gets a newer step with other weights of the same model."""
    meta = read_meta(run_dir)[1]
    cfg = ModelConfig.from_dict(meta["model_config"])
    init = scalar_model_fns(cfg)[0] if meta["head"] == "scalar" else model_fns(cfg)[0]
    _save(run_dir, step, H.random_params(init, seed), meta)


def test_a_fresh_start_pins_the_latest_step_and_a_resume_the_recorded_one(tmp_path, caplog):
    src = str(tmp_path / "src")
    w = {"w": np.zeros(2, np.float32)}
    _save(src, 3, w, {"head": "lm"})
    fresh = rl_frozen.FrozenSources(str(tmp_path / "new"), {"reward_from": src, "x": "hf:/d"})
    assert fresh.step("reward_from") == 3 and fresh.step("x") is None  # (HF: no steps)
    assert fresh.meta() == {"frozen_sources": {"reward_from": {"path": src, "step": 3}}}
    # The run saved a checkpoint with that meta; the source trained on to step 9.
    run = str(tmp_path / "run")
    _save(run, 2, w, {"task": "ppo", **fresh.meta()})
    _save(src, 9, w, {"head": "lm"})
    assert rl_frozen.FrozenSources(run, {"reward_from": src}).step("reward_from") == 3
    assert rl_frozen.FrozenSources(None, {"reward_from": src}).step("reward_from") == 9
    # A checkpoint written before the steps were recorded: the latest, with a warning.
    old = str(tmp_path / "old")
    _save(old, 2, w, {"task": "ppo"})
    caplog.set_level(logging.WARNING, logger="flaxlm")
    assert rl_frozen.FrozenSources(old, {"reward_from": src}).step("reward_from") == 9
    assert f"reward_from={src}: checkpoint 2 of {old} records no step" in caplog.text
    assert "reading that run's latest step 9" in caplog.text
    # The recorded step gone: an error naming the key, the run and both steps.
    shutil.rmtree(os.path.join(src, "checkpoints", "3"))
    with pytest.raises(CheckpointError, match=re.escape(
        f"reward_from={src}: this run read its step 3 (recorded in checkpoint 2 of {run}), "
        "and that step is gone; the run's latest step is now 9"
    )):  # fmt: skip
        rl_frozen.FrozenSources(run, {"reward_from": src})


def test_a_resumed_ppo_run_keeps_its_reference_and_reward_model_after_they_trained_on(
    runs, cache_dir, tmp_path
):  # fmt: skip
    """The reviewer's case in small: PPO from copies of the SFT and reward-model runs is stopped
    at step 2 (a checkpoint there); both sources then save a newer step with other weights; the
    resumed run still reads the steps it started with and ends as the uninterrupted run, bit for
    bit (it resumed silently with the new reference and reward model before). With the started
    step gone, the resume stops, naming the key, the run and both steps."""
    sft, rm = runs
    sft_c, rm_c = str(tmp_path / "sft"), str(tmp_path / "rm")
    shutil.copytree(sft, sft_c)
    shutil.copytree(rm, rm_c)
    over = {
        "batch_size": 8, "rollout.batch": 16, "rollout.epochs": 1, "seq_len": 48,
        "rollout.max_prompt_len": 40, "rollout.max_new_tokens": 6, "ppo.kl_target": 1.0,
        "opt.lr": 1e-3, "total_steps": 4, "ckpt_every": 4, "log_every": 1, "async_ckpt": False,
    }  # fmt: skip
    straight, _ = ppo.run(H.tiny(ppo_config, cache_dir, init_from=sft, reward_from=rm, **over),
                          str(tmp_path / "straight"))  # fmt: skip

    c = H.tiny(ppo_config, cache_dir, init_from=sft_c, reward_from=rm_c, **over)
    wd = str(tmp_path / "resumed")
    mesh = make_mesh(dict(c.mesh))
    task = ppo.build_task(c, mesh, wd)
    before_step = task.before_step

    def sigterm_at_step_2(state):  # (inside the first rollout: saved at its end, step 2)
        if int(state.step) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        before_step(state)

    task.before_step = sigterm_at_step_2
    _, summary = loop.run(c, wd, task, mesh=mesh)
    assert summary["preempted"] and summary["step"] == 2
    assert read_meta(wd)[1]["frozen_sources"] == {
        "reward_from": {"path": rm_c, "step": 1},
        "init_from": {"path": sft_c, "step": 1},
    }
    _train_on(sft_c, 5, seed=7)
    _train_on(rm_c, 5, seed=8)
    resumed, summary = ppo.run(c, wd)
    assert summary["step"] == 4
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kl = {r["step"]: r["rollout/kl"] for r in read_metrics(str(tmp_path / "straight"))
          if "rollout/kl" in r}  # fmt: skip
    assert kl == {r["step"]: r["rollout/kl"] for r in read_metrics(wd) if "rollout/kl" in r}

    shutil.rmtree(os.path.join(rm_c, "checkpoints", "1"))
    with pytest.raises(CheckpointError, match=re.escape(
        f"reward_from={rm_c}: this run read its step 1 (recorded in checkpoint 4 of {wd}), and "
        "that step is gone; the run's latest step is now 5"
    )):  # fmt: skip
        ppo.build_task(c, mesh, wd)


def test_a_reward_model_as_teacher_and_missing_sources_are_named_by_their_key(
    runs, cache_dir, tmp_path
):  # fmt: skip
    """distill.teacher = a reward-model run failed with "init_from: checkpoint ... has no params
    ['transformer']['lm_head']"; a missing reward_from / distill.teacher said only "no
    checkpoint under X/checkpoints". Each now names the config key (before any load)."""
    sft, rm = runs
    mesh = make_mesh({"data": -1})
    c = H.tiny(distill_config, cache_dir, **{"distill.teacher": rm, "model.vocab_size": H.VOCAB})
    with pytest.raises(ValueError, match=re.escape(
        f"distill.teacher={rm}: a reward-model run (scalar head), not a language model"
    )):  # fmt: skip
        distill.build_task(c, mesh, None)
    # the same run as an init_from read by SFT or a LoRA policy (no frozen copy loaded first):
    # it was "checkpoint ... has no params ['transformer']['lm_head']"
    from flaxlm.alignment import common

    lm = model_fns(ModelConfig.from_dict(read_meta(sft)[1]["model_config"]))[0]
    target = jax.eval_shape(lambda: unbox(lm(jax.random.PRNGKey(0))))
    with pytest.raises(ValueError, match=re.escape(
        f"init_from={rm}: a reward-model run (scalar head), not a language model"
    )):  # fmt: skip
        common.load_lm_params(rm, target, key="init_from")
    missing = str(tmp_path / "nothing")
    c = H.tiny(distill_config, cache_dir, **{"distill.teacher": missing})
    with pytest.raises(CheckpointError, match=re.escape(
        f"distill.teacher={missing}: no checkpoint under {missing}/checkpoints"
    )):  # fmt: skip
        distill.build_task(c, mesh, None)
    c = H.tiny(ppo_config, cache_dir, init_from=sft, reward_from=missing)
    with pytest.raises(CheckpointError, match=re.escape(f"reward_from={missing}: no checkpoint")):
        ppo.build_task(c, mesh, None)
    # A frozen read of the wrong kind of run names the key too.
    with pytest.raises(ValueError, match=re.escape(f"reward_from={sft}: not a reward-model run")):
        rl_common.frozen_scalar(sft, mesh, None, source_key="reward_from")


def test_grpo_dpo_kto_and_distill_read_their_frozen_models_at_the_recorded_step(
    runs, cache_dir, tmp_path, monkeypatch
):  # fmt: skip
    """Each task that loads a frozen model from another run on every start (GRPO's reference
    and reward model, DPO's and KTO's reference, the distillation teacher) reads it at the
    step its workdir's checkpoint records — not the source's newer latest — and records that
    step in its own meta."""
    from flaxlm.alignment import dpo, grpo, kto
    from flaxlm.configs import dpo as dpo_config
    from flaxlm.configs import grpo as grpo_config
    from flaxlm.configs import kto as kto_config

    sft, rm = str(tmp_path / "sft"), str(tmp_path / "rm")
    shutil.copytree(runs[0], sft)
    shutil.copytree(runs[1], rm)
    _train_on(sft, 5, seed=7)
    _train_on(rm, 5, seed=8)
    reads = []
    for name in ("frozen_lm", "frozen_scalar"):
        real = getattr(rl_common, name)

        def spy(*a, real=real, **k):
            reads.append((k.get("source_key"), a[0], k.get("step")))
            return real(*a, **k)

        monkeypatch.setattr(rl_common, name, spy)
    small = {"batch_size": 8, "seq_len": 64, "data.eval": ""}
    cases = [
        (grpo, H.tiny(grpo_config, cache_dir, init_from=sft, reward_from=rm, **{
            "grpo.rewards": "rm", "batch_size": 8, "rollout.batch": 16, "seq_len": 48,
            "rollout.max_prompt_len": 32, "rollout.max_new_tokens": 6,
        }), {"init_from": sft, "reward_from": rm}),
        (dpo, H.tiny(dpo_config, cache_dir, init_from=sft, **small,
                     **{"dpo.ref_logps": "online"}), {"init_from": sft}),
        (kto, H.tiny(kto_config, cache_dir, init_from=sft, **small, **{"kto.ref_from": sft}),
         {"kto.ref_from": sft}),
        (distill, H.tiny(distill_config, cache_dir, **small, **{
            "distill.teacher": sft, "model.vocab_size": H.VOCAB,
        }), {"distill.teacher": sft}),
    ]  # fmt: skip
    mesh = make_mesh({"data": -1})
    for i, (module, c, sources) in enumerate(cases):
        wd = str(tmp_path / f"run{i}")
        recorded = {k: {"path": p, "step": 1} for k, p in sources.items()}
        _save(wd, 2, {"w": np.zeros(2, np.float32)}, {"frozen_sources": recorded})
        reads.clear()
        task = module.build_task(c, mesh, wd)
        assert sorted(reads) == sorted((k, p, 1) for k, p in sources.items()), module.__name__
        assert task.model_meta["frozen_sources"] == recorded
        task = module.build_task(c, mesh, None)  # a fresh start: the latest
        assert {k: v["step"] for k, v in task.model_meta["frozen_sources"].items()} == {
            k: 5 for k in sources
        }
