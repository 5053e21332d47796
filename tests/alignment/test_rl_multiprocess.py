"""GRPO and PPO in a multi-process job: two processes × 4 CPU devices train, evaluate and
checkpoint as one process × 8 does (every process draws the whole rollout, judges its share of
the samples, and trains on its part of each minibatch: alignment/rl_rollout.py)."""

import importlib.util
import os
import sys

import jax
import numpy as np
import pytest

from flaxlm.alignment.common import load_policy
from flaxlm.train.metrics import read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


H = _load("rl_helpers", os.path.join(HERE, "rl_helpers.py"))
mp = _load("multiprocess", os.path.join(os.path.dirname(HERE), "multiprocess.py"))
SCRIPT = os.path.join(HERE, "multiprocess_tasks.py")
RL = _load("multiprocess_tasks", SCRIPT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    return H.fake_runs(str(tmp_path_factory.mktemp("mp_runs")), cache_dir)


TASKS = ("grpo", "ppo", "online_dpo")


@pytest.fixture(scope="module")
def trained(runs, cache_dir, tmp_path_factory):
    """(root, configs): every task run by two processes into root/two/TASK (one start of the
    two for all of them) and, meanwhile, by this process into root/one/TASK; the reward
    function's calls of each in root/rewards_{one,two}/TASK.calls.<process>."""
    sft, rm = runs
    root = tmp_path_factory.mktemp("rl")
    rewards = {"one": root / "rewards_one", "two": root / "rewards_two"}
    for d in rewards.values():  # each run's reward function logs its calls next to itself
        d.mkdir()
        RL.write_rewards(str(d))
    configs = {t: RL.config_for(t, sft, rm, str(cache_dir)) for t in TASKS}
    port = mp.free_port()
    args = [root / "two", ",".join(TASKS), sft, rm, cache_dir, rewards["two"]]

    def one_process():  # the reference, here, while the two processes run
        with pytest.MonkeyPatch.context() as m:
            m.syspath_prepend(str(rewards["one"]))
            m.delitem(sys.modules, "counted_rewards", raising=False)  # (a former test's)
            RL.run_all(TASKS, configs, str(root / "one"), str(rewards["one"]))

    mp.run_processes(lambda i: [SCRIPT, port, i, 2, *args], timeout=400,
                     during=one_process)  # fmt: skip
    return root, configs, rewards


@pytest.mark.parametrize("task", TASKS)
def test_two_processes_train_like_one(task, trained):
    assert jax.device_count() == 8
    root, configs, rewards = trained
    c, two = configs[task], root / "two" / task
    one, both = read_metrics(root / "one" / task), read_metrics(two)
    losses = [r for r in one if "loss" in r]
    assert len(losses) == c.total_steps and [r for r in both if "loss" in r]
    # The rollouts and evaluations (decoded, judged, scored on the host of each process) are
    # the same; the losses up to the order of the gradient reductions over processes.
    for a, b in zip(one, both, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if k.startswith(("rollout/", "eval/")) and not k.endswith("_s"):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)
            elif k in ("loss", "pg_loss", "kl", "grad_norm"):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)
    assert any("eval/sft_heldout/accuracy" in r for r in both)
    if task == "grpo":
        assert any("eval/sft_heldout/sampled_accuracy" in r for r in both)
    assert len({r["rollout/iteration"] for r in one if "rollout/iteration" in r}) == 2
    if task != "ppo":  # each sample judged once, by one process: half of them each
        calls_one = (rewards["one"] / f"{task}.calls.0").read_text().splitlines()
        calls_two = [(rewards["two"] / f"{task}.calls.{i}").read_text().splitlines()
                     for i in (0, 1)]  # fmt: skip
        assert len(calls_one) == len(calls_two[0]) + len(calls_two[1])
        # process p judges samples p, p + 2, ... of a rollout's judged ones (empty answers are
        # not judged): process 0 takes the odd one of each of the 2 rollouts with an odd count
        assert 0 <= len(calls_two[0]) - len(calls_two[1]) <= 2 and calls_two[1]
        assert sorted(calls_one) == sorted(calls_two[0] + calls_two[1])
    # The checkpoint the two processes wrote holds the policy the one process trained.
    # (atol 1e-5: Adam divides by sqrt(v), so where a gradient is ~0 the reduction order's
    # last bits move that weight by a few thousandths of lr = 1e-3: jax 0.11.2 moved 1 of 32768
    # by 6.5e-6)
    (_, want, _), (_, got, _) = (load_policy(str(d)) for d in (root / "one" / task, two))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
