"""The RL held-out evaluation's sampled accuracy (`rl_common.make_policy_eval`): samples of a
prompt share its prefill (`generate(..., num_samples=)`), each prompt's samples follow its own
keys, and near temperature 0 they are the greedy answers."""

import importlib.util
import os

import pytest

from flaxlm.alignment import grpo, rl_common, sft
from flaxlm.configs import grpo as grpo_config
from flaxlm.models.sharding import logical_axis_rules, make_mesh
from flaxlm.train.pretrain import model_fns

_spec = importlib.util.spec_from_file_location(
    "rl_helpers", os.path.join(os.path.dirname(__file__), "rl_helpers.py")
)
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)


def test_sampled_accuracy_shares_prefills_and_follows_each_prompts_keys(
    tmp_path, cache_dir, monkeypatch
):
    sft_dir, _ = H.fake_runs(str(tmp_path), cache_dir)
    c = H.tiny(grpo_config, cache_dir, init_from=sft_dir, **{
        "batch_size": 8, "rollout.batch": 8, "grpo.group_size": 4, "seq_len": 48,
        "rollout.max_prompt_len": 32, "rollout.max_new_tokens": 6,
    })  # fmt: skip
    mesh, rules = make_mesh(dict(c.mesh)), logical_axis_rules("fsdp")
    source = grpo.build_task(c, mesh, None, rewards=[("one", lambda m, t: 1.0, 1.0)]).train_batches
    init, _ = model_fns(source.cfg)
    params = H.placed_params(init, mesh, rules)
    examples = [{"ids": p["ids"], "meta": p["meta"], "answer": ""} for p in source.prompts[:6]]
    # A random model answers nothing right: score a property of the text instead (its first
    # character's code parity), so the accuracies below are not all zero.
    monkeypatch.setattr(sft, "score", lambda meta, text, answer: (ord((text or " ")[0]) % 2, 0))

    def evaluate(**gen):
        g = c.eval_gen.copy_and_resolve_references()
        with g.unlocked():
            g.update(gen)
        return rl_common.make_policy_eval(source.cfg, source.template, {"x": examples}, g,
                                          mesh, rules)(params)  # fmt: skip

    hot = [evaluate(batch=b, samples=4, sample_temperature=2.0) for b in (8, 16)]
    # The batch (prompts per call: 2 or 4) does not change a prompt's samples.
    assert hot[0]["x/sampled_accuracy"] == hot[1]["x/sampled_accuracy"]
    # Near temperature 0 every sample is the greedy answer.
    cold = evaluate(batch=8, samples=4, sample_temperature=1e-4)
    assert cold["x/sampled_accuracy"] == pytest.approx(cold["x/accuracy"])
    assert 0 < cold["x/accuracy"] < 1  # the stand-in score is not constant
