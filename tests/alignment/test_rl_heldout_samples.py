"""The RL held-out evaluation's sampled accuracy (`rl_eval.make_policy_eval`): samples of a
prompt share its prefill (`generate(..., num_samples=)`), each prompt's samples follow its own
keys, and near temperature 0 they are the greedy answers."""

import importlib.util
import json
import logging
import os

import numpy as np
import pytest

from flaxlm.alignment import grpo, online_dpo, rl_common, rl_eval, sft
from flaxlm.configs import grpo as grpo_config
from flaxlm.configs import online_dpo as odpo_config
from flaxlm.models.sharding import logical_axis_rules, make_mesh
from flaxlm.train.pretrain import model_fns
from tests.alignment.test_grpo import _texts_generate

_spec = importlib.util.spec_from_file_location(
    "rl_helpers", os.path.join(os.path.dirname(__file__), "rl_helpers.py")
)
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)


def _grpo_source(tmp_path, cache_dir):
    """(config, mesh, rules, GRPO batch source, random policy params, reward-model run) of a
    tiny GRPO run over the fake SFT run."""
    sft_dir, rm_dir = H.fake_runs(str(tmp_path), cache_dir)
    c = H.tiny(grpo_config, cache_dir, init_from=sft_dir, **{
        "batch_size": 8, "rollout.batch": 8, "grpo.group_size": 4, "seq_len": 48,
        "rollout.max_prompt_len": 32, "rollout.max_new_tokens": 6,
    })  # fmt: skip
    mesh, rules = make_mesh(dict(c.mesh)), logical_axis_rules("fsdp")
    source = grpo.build_task(c, mesh, None, rewards=[("one", lambda m, t: 1.0, 1.0)]).train_batches
    params = H.placed_params(model_fns(source.cfg)[0], mesh, rules)
    return c, mesh, rules, source, params, rm_dir


def test_sampled_accuracy_shares_prefills_and_follows_each_prompts_keys(
    tmp_path, cache_dir, monkeypatch
):
    c, mesh, rules, source, params, _ = _grpo_source(tmp_path, cache_dir)
    examples = [{"ids": p["ids"], "meta": p["meta"], "answer": ""} for p in source.prompts[:6]]
    # A random model answers nothing right: score a property of the text instead (its first
    # character's code parity), so the accuracies below are not all zero.
    monkeypatch.setattr(sft, "score", lambda meta, text, answer: (ord((text or " ")[0]) % 2, 0))

    def evaluate(**gen):
        g = c.eval_gen.copy_and_resolve_references()
        with g.unlocked():
            g.update(gen)
        return rl_eval.make_policy_eval(source.cfg, source.template, {"x": examples}, g,
                                        mesh, rules)(params)  # fmt: skip

    hot = [evaluate(batch=b, samples=4, sample_temperature=2.0) for b in (8, 16)]
    # The batch (prompts per call: 2 or 4) does not change a prompt's samples.
    assert hot[0]["x/sampled_accuracy"] == hot[1]["x/sampled_accuracy"]
    # Near temperature 0 every sample is the greedy answer.
    cold = evaluate(batch=8, samples=4, sample_temperature=1e-4)
    assert cold["x/sampled_accuracy"] == pytest.approx(cold["x/accuracy"])
    assert 0 < cold["x/accuracy"] < 1  # the stand-in score is not constant


def test_reward_model_rows_hold_prompts_longer_than_eval_gen_max_prompt_len(tmp_path, cache_dir):
    """The reward model's rows were eval_gen.max_prompt_len + max_new_tokens wide, but the
    held-out RL prompts are cut to rollout.max_prompt_len when loaded: PPO with a raised
    rollout.max_prompt_len crashed at its first evaluation ("rollout row 1: 76 tokens > seq_len
    64", a width that was no seq_len). The rows now hold the sets' longest prompt."""
    c, mesh, rules, source, params, rm_dir = _grpo_source(tmp_path, cache_dir)
    examples = [{"ids": p["ids"], "meta": p["meta"], "answer": ""} for p in source.prompts[:8]]
    g = c.eval_gen.copy_and_resolve_references()
    with g.unlocked():
        g.update(batch=8, sample_temperature=0.0, max_prompt_len=8)
    assert max(len(ex["ids"]) for ex in examples) > g.max_prompt_len + g.max_new_tokens
    rm = rl_common.frozen_scalar(rm_dir, mesh, rules)
    out = rl_eval.make_policy_eval(source.cfg, source.template, {"x": examples}, g, mesh,
                                   rules, rm=rm)(params)  # fmt: skip
    assert np.isfinite(out["x/rm_score"])


@pytest.mark.parametrize("module", [grpo_config, odpo_config], ids=["grpo", "online_dpo"])
def test_reasoning_end_scores_the_answer_after_the_reasoning(tmp_path, cache_dir, monkeypatch,
                                                              module):  # fmt: skip
    """With `<section>.reasoning_end`, the held-out eval (greedy and sampled) judged the whole
    response, reasoning included, while the rollouts judged the answer after the marker:
    "<think>...</think>42" was right in rollout/accuracy and wrong in <set>/accuracy. It now
    scores the answer after the marker, a reasoning that never ended is wrong (even one that
    spells the reference) and `<set>/reasoning_unfinished` counts how often."""
    section = "online" if module is odpo_config else "grpo"
    sft_dir, _ = H.fake_runs(str(tmp_path), cache_dir)
    held = tmp_path / "held.jsonl"
    held.write_text(
        "".join(
            json.dumps({"prompt": f"What is {i} plus {42 - i}?", "meta": {"answer": "42"}}) + "\n"
            for i in range(8)
        )
    )
    c = H.tiny(module, cache_dir, init_from=sft_dir, **{
        "batch_size": 8, "rollout.batch": 16, f"{section}.group_size": 2, "seq_len": 64,
        "rollout.max_prompt_len": 40, "rollout.max_new_tokens": 24,
        f"{section}.reasoning_end": "</think>", "eval_every": 1, "eval_gen.sets": str(held),
        "eval_gen.examples": 8, "eval_gen.batch": 8, "eval_gen.max_new_tokens": 24,
        "eval_gen.max_prompt_len": 40, "eval_gen.sample_temperature": 1.0,
        "eval_gen.samples": 4,
    })  # fmt: skip
    mesh = make_mesh(dict(c.mesh))
    task = (online_dpo if module is odpo_config else grpo).build_task(
        c, mesh, None, rewards=[("one", lambda m, t: 1.0, 1.0)])  # fmt: skip
    t = task.train_batches.template
    # right, right, wrong, and an unfinished reasoning that spells the reference
    kinds = ["<think>add</think>42", "<think>add</think> 42", "<think>add</think>41", "42"]
    monkeypatch.setattr(rl_eval, "generate", _texts_generate(t.tok, t.stop_tokens[0], kinds))
    out = task.eval_fn(task.train_batches.ref_params)
    assert out["held/accuracy"] == pytest.approx(0.5)
    assert out["held/sampled_accuracy"] == pytest.approx(0.5)
    assert out["held/reasoning_unfinished"] == pytest.approx(0.25)
    assert out["held/sampled_reasoning_unfinished"] == pytest.approx(0.25)


def test_the_rl_prompt_sets_are_judged_by_the_runs_rewards(tmp_path, cache_dir, monkeypatch,
                                                           caplog):  # fmt: skip
    """GRPO's held-out accuracy is exact match with meta.answer, which a worked solution never
    is; the RL prompt sets (rl_heldout, rl_train) are also judged by the run's own rewards, as
    its rollouts are: reward/<name> per function (math_verify: the held-out math accuracy),
    reward (Σ weight·fn; no answer: rollout.empty_reward), and with samples the sampled means
    and pass@k of each 0/1 function; so is an eval_gen set whose records carry the reference
    (meta.answer), while one whose records lack it (chats: the answer is the last turn) is
    not."""
    sft_dir, _ = H.fake_runs(str(tmp_path), cache_dir)
    prompts = tmp_path / "math.jsonl"
    prompts.write_text("".join(
        json.dumps({"prompt": f"What is {i} plus {42 - i}?", "meta": {"answer": "42"}}) + "\n"
        for i in range(16)))  # fmt: skip
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus {41 - i}?"},
        {"role": "assistant", "content": "41"}]}) + "\n" for i in range(4)))  # fmt: skip
    c = H.tiny(grpo_config, cache_dir, init_from=sft_dir, **{
        "data.train": str(prompts), "rollout.heldout_prompts": 4, "rollout.empty_reward": -1.0,
        "grpo.rewards": "math_verify,boxed_format:0.1", "batch_size": 8, "rollout.batch": 8,
        "grpo.group_size": 4, "seq_len": 64, "rollout.max_prompt_len": 40,
        "rollout.max_new_tokens": 24, "eval_every": 1, "eval_gen.sets": f"{prompts},{chats}",
        "eval_gen.examples": 4, "eval_gen.batch": 8, "eval_gen.max_new_tokens": 24,
        "eval_gen.max_prompt_len": 40, "eval_gen.sample_temperature": 1.0, "eval_gen.samples": 4,
        "eval_gen.at_k": "2,1",
    })  # fmt: skip
    with caplog.at_level(logging.INFO, logger="flaxlm"):
        task = grpo.build_task(c, make_mesh(dict(c.mesh)), None)
    assert f"eval chats: not judged by the rewards (4 examples, e.g. {chats}:1, lack the " \
           "reference math_verify judges by)" in caplog.text  # fmt: skip
    t = task.train_batches.template
    # wrong and boxed, right and boxed, wrong again, no answer at all: each prompt's greedy
    # answer is one of them (4 held-out prompts), and its 4 samples are all four
    kinds = ["so \\boxed{41}", "\\boxed{42}", "it is \\boxed{41}", ""]
    assert [t.tok.decode(t.tok.encode(k)) for k in kinds] == kinds
    monkeypatch.setattr(rl_eval, "generate", _texts_generate(t.tok, t.stop_tokens[0], kinds))
    out = task.eval_fn(task.train_batches.ref_params)
    mean = (0.1 + 1.1 + 0.1 - 1.0) / 4  # Σ weight·fn; no answer: rollout.empty_reward
    for name in ("rl_heldout", "rl_train", "math"):  # (math: the held-out 4 of the file)
        assert out[f"{name}/reward/math_verify"] == pytest.approx(0.25)
        assert out[f"{name}/reward/boxed_format"] == pytest.approx(0.75)
        assert out[f"{name}/reward"] == pytest.approx(mean)
        assert out[f"{name}/sampled_reward/math_verify"] == pytest.approx(0.25)
        assert out[f"{name}/sampled_reward"] == pytest.approx(mean)
        assert out[f"{name}/sampled_pass@4/math_verify"] == 1.0  # every prompt: one right
        assert out[f"{name}/sampled_maj@4/math_verify"] == 0.0  # but most samples say 41
        assert out[f"{name}/sampled_pass@4/boxed_format"] == 1.0
        assert f"{name}/sampled_maj@4/boxed_format" not in out  # (it names no answer)
        # eval_gen.at_k: of 2 samples of 4 with one right, 1 - C(3, 2)/C(4, 2) hold it; of
        # the 6 pairs (41, 42, 41, none), 2 vote 42 first: (42, 41) and (42, none)
        assert out[f"{name}/sampled_pass@2/math_verify"] == pytest.approx(0.5)
        assert out[f"{name}/sampled_pass@1/math_verify"] == pytest.approx(0.25)
        assert out[f"{name}/sampled_maj@2/math_verify"] == pytest.approx(1 / 3)
        assert out[f"{name}/sampled_maj@1/math_verify"] == pytest.approx(0.25)
        assert out[f"{name}/accuracy"] == 0.0  # (exact match: never a worked answer)
        assert f"{name}/reward_invalid" not in out
    judged_by_chats = {k for k in out if k.startswith("chats/")}  # no meta.answer: not judged
    assert judged_by_chats and not any("reward" in k for k in judged_by_chats)
    assert out["chats/accuracy"] == 0.0  # (exact match with the last turn, "41": none is)


def test_exact_match_votes_by_the_answer_it_judges():
    """maj@k for exact_match (the demo's GRPO reward): a world prompt's samples vote by the one
    answer their "The answer is X" spans state, normalised as the world compares them; your
    prompt's by the whole stripped text. A reward's vote may take the answer alone."""
    from flaxlm.alignment.grpo_rewards import exact_match
    from flaxlm.data.synthetic_judge import WORLD_KEY, WORLD_MARK

    world = {"task": "arithmetic", "op": "+", "a": 2, "b": 3, "answer": "5",
             WORLD_KEY: WORLD_MARK}  # fmt: skip
    assert exact_match.vote(world, "Well. The answer is 5.") == "5"
    assert exact_match.vote(world, "The answer is 4. The answer is 5.") is None  # (never right)
    assert exact_match.vote(world, "5") is None  # (no span: loose credit, not exact)
    assert exact_match.vote({"answer": "x"}, " 7 \n") == "7"
    # world: 5 (right) once, 4 twice in two forms, two answers once; yours: "a" (right) once,
    # "b" twice with other spaces, and an empty answer (no vote)
    texts = ["The answer is 5.", "the answer is 4 years old!", "The answer is 4.",
             "The answer is 4. The answer is 5.", "a", " b", "b ", ""]  # fmt: skip
    examples = [{"meta": world}, {"meta": {"answer": "a"}}]
    judge = [("exact_match", exact_match, 1.0)]
    out = rl_eval.reward_metrics(judge, examples, texts, samples=4, prefix="s/")
    assert out["s/pass@4/exact_match"] == 1.0
    assert out["s/maj@4/exact_match"] == 0.0  # both majorities wrong (raw strings: both right)
    texts[1:3] = ["The answer is 5 !", "nothing"]  # world: 5 twice, in two forms
    texts[6] = "a"  # yours: "a" twice
    out = rl_eval.reward_metrics(judge, examples, texts, samples=4, prefix="s/")
    assert out["s/maj@4/exact_match"] == 1.0
    # a reward whose vote takes the answer alone (a user's, as math_verify's once did)

    def first_word(meta, text):
        return float(text.split()[0] == meta["answer"]) if text.split() else 0.0

    first_word.vote = lambda text: text.split()[0] if text.split() else None
    first_word.same_answer = str.__eq__
    out = rl_eval.reward_metrics([("w", first_word, 1.0)], [{"meta": {"answer": "a"}}],
                                 ["b c", "a", "b d", "a e"], samples=4)  # fmt: skip
    assert out["maj@4/w"] == 0.0  # "b" and "a" tie at 2: the first given, "b", wins


def test_smaller_k_metrics_equal_the_mean_over_every_subset():
    """reward_metrics' `ks` (eval_gen.at_k): pass@j and maj@j of each example equal the mean,
    over every j-subset of its samples in their order, of "a sample hits" and of "the
    subset's majority answer (first given on a tie) hits"."""
    import itertools

    from flaxlm.alignment.grpo_rewards import exact_match
    from flaxlm.alignment.verify_math import majority_sample

    rng = np.random.default_rng(0)
    n, answers = 7, ["a", "b", "c"]
    examples = [{"meta": {"answer": "a"}} for _ in range(5)]
    texts = [str(rng.choice([*answers, ""], p=[0.35, 0.3, 0.2, 0.15])) for _ in range(5 * n)]
    out = rl_eval.reward_metrics([("em", exact_match, 1.0)], examples, texts, samples=n,
                                 ks=(1, 2, 3, 5))  # fmt: skip
    for j in (1, 2, 3, 5, n):
        passes, majs = [], []
        for e in range(5):
            got = texts[e * n : (e + 1) * n]
            for sub in itertools.combinations(range(n), j):
                passes.append(any(got[i] == "a" for i in sub))
                votes = [got[i] or None for i in sub]
                first = majority_sample(votes, str.__eq__)
                majs.append(first is not None and votes[first] == "a")
        # (each example has C(n, j) subsets: the mean over all is the mean of the means)
        assert out[f"pass@{j}/em"] == pytest.approx(np.mean(passes)), j
        assert out[f"maj@{j}/em"] == pytest.approx(np.mean(majs)), j
    assert not any("estimated" in k for k in out)


@pytest.mark.parametrize("text,samples,message", [
    ("1,x", 4, "comma-separated ints"),
    ("0", 4, r"in \[1, eval_gen.samples=4\]"),
    ("8", 4, r"in \[1, eval_gen.samples=4\]"),
    ("2", 0, "needs eval_gen.samples > 1"),
])  # fmt: skip
def test_bad_at_k_values_name_the_key(text, samples, message):
    with pytest.raises(ValueError, match=message):
        rl_eval.smaller_ks(text, samples)
    assert rl_eval.smaller_ks(" 2, 1,2 ", 4) == (1, 2)
    assert rl_eval.smaller_ks("", 0) == ()
