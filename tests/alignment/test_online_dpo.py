"""Online DPO: pairs from groups of two (the higher reward chosen, ties and invalid samples
without a preference), reference log-probabilities at temperature 1 whatever the sampling
temperature, and a run through the shared loop whose checkpoint reads back as a policy."""

import importlib.util
import os

import jax
import ml_collections
import numpy as np
import pytest

from flaxlm.alignment import common, online_dpo, rl_common
from flaxlm.alignment.rl_rollout import lm_logprobs
from flaxlm.configs import online_dpo as odpo_config
from flaxlm.models.sharding import logical_axis_rules, make_mesh
from flaxlm.train.metrics import read_metrics
from flaxlm.train.pretrain import model_fns

_spec = importlib.util.spec_from_file_location(
    "rl_helpers", os.path.join(os.path.dirname(__file__), "rl_helpers.py")
)
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)


def test_preference_pairs_rank_by_reward_and_drop_ties():
    T = 6
    rows = {k: np.arange(8 * T).reshape(8, T) + 1000 * i
            for i, k in enumerate(online_dpo.ROW_KEYS)}  # fmt: skip
    mask = np.zeros((8, T), np.float32)
    mask[:, 2:5] = 1.0
    mask[7] = 0.0  # an invalid sample: no loss tokens
    rows["loss_mask"] = mask
    adv = np.array([-1.0, 1.0, 0.7, -0.7, 0.0, 0.0, 1.0, -1.0])  # pair 2 ties; pair 3: row 7 bad
    ref = np.arange(8 * T, dtype=np.float32).reshape(8, T) / 10
    pairs, valid = online_dpo.preference_pairs(rows, adv, ref)
    np.testing.assert_array_equal(valid, [True, True, False, False])
    chosen, rejected = [1, 2, 4, 6], [0, 3, 5, 7]
    for k in online_dpo.ROW_KEYS:
        np.testing.assert_array_equal(pairs[f"chosen_{k}"], rows[k][chosen])
        np.testing.assert_array_equal(pairs[f"rejected_{k}"], rows[k][rejected])
    np.testing.assert_allclose(pairs["ref_chosen_logps"], (ref * mask).sum(1)[chosen], rtol=1e-6)
    np.testing.assert_allclose(pairs["ref_rejected_logps"], (ref * mask).sum(1)[rejected])
    np.testing.assert_array_equal(pairs["valid"], valid.astype(np.float32))


def test_a_pair_of_an_answer_and_an_empty_one_keeps_its_preference(caplog):
    """Regression: the rollout's reward functions (GRPO's `_judged`) were called on empty
    answers too, and one that raised on "" made the sample invalid: the pair "good answer vs
    empty" lost its preference (valid 0), and the policy never learnt to prefer answering. The
    empty one is now not judged: rollout.empty_reward, rejected, the pair valid."""
    T, n = 12, 4
    config = ml_collections.ConfigDict({"seq_len": T, "batch_size": 2})
    config.rollout = rl_common.rollout_config(n)
    config.rollout.empty_reward = -1.0
    config.online = odpo_config.online_config()
    texts, lengths = ["7", "", "7", "3"], np.array([2, 1, 2, 2])  # pair 0: an answer, empty
    prompts = [np.full(3, 5 + b, np.int32) for b in range(n)]
    rows = rl_common.rollout_rows(prompts, np.full((n, 2), 9, np.int32), lengths, T, 0)
    sample = {
        "rows": rows, "texts": texts, "empty": np.array([not t for t in texts]),
        "stopped": np.ones(n, bool), "lengths": lengths, "gen_s": 0.0,
        "metas": [{"answer": "7"}] * n, "messages": [None] * n,
        "sample_logprobs": np.zeros((n, T), np.float32),
    }  # fmt: skip

    def last_word(meta, response):  # a plausible user reward: IndexError on ""
        return float(response.split()[-1] == meta["answer"])

    src = object.__new__(online_dpo.OnlineDPOSource)  # decoder and scoring replaced
    src.config, src.iteration, src.errors_logged, src.spec = config, 0, 0, None
    src.cursor = type("Cursor", (), {"take": lambda self, k: list(range(k))})()
    src.sample = lambda params, idx, rng, num_samples=1: sample
    lp = np.full((n, T), -2.0, np.float32)
    src.score, src._score = (lambda fn, *args: (lp, lp, lp)), None
    src.rewards, src.ref_params = [("last_word", last_word, 1.0)], None
    pairs, stats = src.make_rollout(None, None)
    np.testing.assert_array_equal(pairs["valid"], [1.0, 1.0])
    np.testing.assert_array_equal(pairs["chosen_tokens"][0], rows["tokens"][0])
    np.testing.assert_array_equal(pairs["rejected_tokens"][0], rows["tokens"][1])
    assert stats["pairs_valid"] == 1.0 and stats["bad_reward"] == 0

    # every pair tied (both answers right): warned, and the rollout's pairs carry no weight
    # (it raised a RuntimeError, ending the run with a traceback at that rollout)
    texts[:] = ["7"] * n
    sample["empty"] = np.zeros(n, bool)
    with caplog.at_level("WARNING"):
        pairs, stats = src.make_rollout(None, None)
    np.testing.assert_array_equal(pairs["valid"], [0.0, 0.0])
    assert stats["pairs_valid"] == 0.0
    assert any("no pair with a preference" in r.getMessage() for r in caplog.records)


def test_dpo_loss_settings_are_refused_when_the_task_is_built(cache_dir):
    """The `dpo` loss settings were first read when the loss was traced, after the reference's
    load and a whole rollout; cDPO's ε (dpo.label_smoothing) >= 0.5, which trains towards the
    rejected answers, never. Refused first, naming the key (init_from names no run)."""
    c = H.tiny(odpo_config, cache_dir, init_from="/no/such/run", **{
        "dpo.loss_type": "conservative", "dpo.label_smoothing": 0.5})  # fmt: skip
    with pytest.raises(ValueError, match="dpo.label_smoothing=0.5"):
        online_dpo.build_task(c, None, None, rewards=LENGTH)
    c = H.tiny(odpo_config, cache_dir, init_from="/no/such/run", **{"dpo.beta": 0.0})
    with pytest.raises(ValueError, match="dpo.beta=0.0 must be > 0"):
        online_dpo.build_task(c, None, None, rewards=LENGTH)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    return H.fake_runs(str(tmp_path_factory.mktemp("odpo_runs")), cache_dir)


def _length_reward(meta, response):  # varies between a random model's samples
    return float(len(response) % 5)


LENGTH = [("length", _length_reward, 1.0)]


class _State:
    def __init__(self, params):
        self.params = params


def test_reference_logps_are_at_temperature_one(runs, cache_dir):
    """Sampling at T = 0.7, the pairs' reference log-probabilities are the frozen model's at
    T = 1 (DPO's objective), summed over each response's tokens."""
    sft, _ = runs
    c = H.tiny(odpo_config, cache_dir, init_from=sft, **{
        "batch_size": 8, "rollout.batch": 32, "seq_len": 48, "rollout.max_prompt_len": 32,
        "rollout.max_new_tokens": 6, "rollout.temperature": 0.7,
    })  # fmt: skip
    mesh, rules = make_mesh(dict(c.mesh)), logical_axis_rules("fsdp")
    source = online_dpo.build_task(c, mesh, None, rewards=LENGTH).train_batches
    init, _ = model_fns(source.cfg)
    params = H.placed_params(init, mesh, rules)
    source.before_step(_State(params))
    mbs = [next(source) for _ in range(2)]  # 16 pairs, 8 per minibatch
    _, ref_apply, ref_params = rl_common.frozen_lm(sft, mesh, rules)
    for mb in mbs:
        for side in ("chosen", "rejected"):
            rows = {k: mb[f"{side}_{k}"] for k in online_dpo.ROW_KEYS}
            lp = np.asarray(jax.jit(lm_logprobs, static_argnums=0)(ref_apply, ref_params, rows))
            want = (lp * rows["loss_mask"]).sum(1)
            np.testing.assert_allclose(mb[f"ref_{side}_logps"], want, rtol=1e-5, atol=1e-4)
        assert set(np.unique(mb["valid"])) <= {0.0, 1.0}
    assert mbs[0]["rollout/pairs_valid"][0] > 0


def test_online_dpo_trains_in_the_loop(runs, cache_dir, tmp_path):
    sft, _ = runs
    c = H.tiny(odpo_config, cache_dir, init_from=sft, **{
        "batch_size": 8, "rollout.batch": 32, "seq_len": 48, "rollout.max_prompt_len": 32,
        "rollout.max_new_tokens": 6, "opt.lr": 1e-3,
        "online.dynamic_sampling": 2, "ckpt_every": 4, "async_ckpt": False,
    })  # fmt: skip
    state, summary = online_dpo.run(c, str(tmp_path), rewards=LENGTH)
    assert summary["train"]["n_skipped"] == 0
    recs = [r for r in read_metrics(str(tmp_path)) if "loss" in r]
    for key in ("loss", "rewards/margin", "rewards/accuracy", "logps/chosen",
                "rollout/pairs_valid", "rollout/reward_mean", "rollout/kl",
                "rollout/sample_calls"):  # fmt: skip
        assert np.isfinite(recs[-1][key]), key
    assert recs[-1]["rollout/iteration"] == 1  # 2 rollouts: 16 pairs each, 2 steps per rollout
    _, base, _ = common.load_policy(sft)
    _, trained, meta = common.load_policy(str(tmp_path))
    assert meta["head"] == "lm"
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(trained)))  # fmt: skip
    with c.unlocked():
        c.online.group_size = 3
    with pytest.raises(ValueError, match="online.group_size=3"):
        online_dpo.build_task(c, make_mesh(dict(c.mesh)), None, rewards=LENGTH)
    with c.unlocked():
        c.online.group_size, c.batch_size = 2, 32
    with pytest.raises(ValueError, match="16 pairs is not a multiple of batch_size=32"):
        online_dpo.build_task(c, make_mesh(dict(c.mesh)), None, rewards=LENGTH)
