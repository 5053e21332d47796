"""rl_common's question identity: the built-in world's meta groups paraphrases; a user's meta
(often just the reference answer) does not merge different questions."""

import numpy as np

from flaxlm.alignment import rl_common


def _p(ids, meta):
    return {"ids": np.asarray(ids, np.int32), "meta": meta}


def test_question_key_own_meta_is_not_the_question():
    # "2 plus 5" and "3 plus 4": different prompts sharing the reference answer.
    a, b = _p([1, 2, 5], {"answer": "7"}), _p([1, 3, 4], {"answer": "7"})
    assert rl_common.question_key(a) != rl_common.question_key(b)
    assert rl_common.question_key(a) == rl_common.question_key(_p([1, 2, 5], {"answer": "7"}))
    # The world's paraphrases (other ids, same meta) stay one question.
    world = {"task": "arithmetic", "a": 3, "b": 4, "answer": "7"}
    assert rl_common.question_key(_p([1, 3], world)) == rl_common.question_key(_p([9, 9], world))
    # Held-out split: 4 own prompts with one shared answer are 4 questions, not 1.
    prompts = [_p([1, i], {"answer": "7"}) for i in range(4)]
    train, held = rl_common.split_prompts(prompts, 1, seed=0)
    assert (len(train), len(held)) == (3, 1)


def test_heldout_sets_take_the_completion_as_reference(tmp_path, monkeypatch, caplog):
    """DPO/PPO/GRPO eval_gen.sets: a {"prompt", "completion"} chat's reference is its completion
    (as for SFT), a prompt record's is meta.answer; kept examples are counted as used."""
    import json

    from flaxlm.configs import grpo as grpo_config
    from flaxlm.configs.common import override
    from flaxlm.data import formats as F

    path = tmp_path / "heldout.jsonl"
    rows = [
        {"prompt": "What is 2 plus 5?", "completion": "It is 7."},
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi."}]},
        {"prompt": "What is 3 plus 4?", "meta": {"answer": "7"}},
        {"prompt": "What is 1 plus 1?"},  # no reference: warned
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = override(grpo_config.get_config("runlocal=True"), {"eval_gen.sets": str(path)})
    seen = []

    def fake_render(msgs, template, max_len, tools=None):  # no tokenizer: one id per prompt
        seen.append([m["role"] for m in msgs])
        return np.asarray([len(seen)], np.int32), 0

    monkeypatch.setattr(F, "render_prompt", fake_render)
    report = F.DataReport()
    sets = rl_common.heldout_sets(c, None, [], report)
    assert [ex["answer"] for ex in sets["heldout"]] == ["It is 7.", "Hi.", "7", ""]
    assert report.to_dict()["used"] == 4
    assert "1 of 4 examples have no reference answer" in caplog.text
