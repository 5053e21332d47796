"""rl_common's question identity: the built-in world's meta groups paraphrases; a user's meta
(often just the reference answer) does not merge different questions. Also common's tokenizer
identity (the check every second model — reference, reward model, teacher — goes through)."""

import os
import re

import numpy as np
import pytest

from flaxlm.alignment import rl_common, rl_eval
from flaxlm.configs import grpo as grpo_config
from flaxlm.configs import online_dpo as online_dpo_config
from flaxlm.configs import ppo as ppo_config
from flaxlm.configs.common import override
from flaxlm.data.synthetic_judge import WORLD_KEY, WORLD_MARK


def _p(ids, meta):
    return {"ids": np.asarray(ids, np.int32), "meta": meta}


def test_question_key_own_meta_is_not_the_question():
    # "2 plus 5" and "3 plus 4": different prompts sharing the reference answer.
    a, b = _p([1, 2, 5], {"answer": "7"}), _p([1, 3, 4], {"answer": "7"})
    assert rl_eval.question_key(a) != rl_eval.question_key(b)
    assert rl_eval.question_key(a) == rl_eval.question_key(_p([1, 2, 5], {"answer": "7"}))
    # The world's paraphrases (other ids, same meta) stay one question.
    world = {"task": "arithmetic", "a": 3, "b": 4, "answer": "7", WORLD_KEY: WORLD_MARK}
    assert rl_eval.question_key(_p([1, 3], world)) == rl_eval.question_key(_p([9, 9], world))
    # Your own records may name a task the world has: their meta is still not the question.
    own = {"task": "arithmetic", "answer": "7"}
    assert rl_eval.question_key(_p([1, 3], own)) != rl_eval.question_key(_p([9, 9], own))
    # Held-out split: 4 own prompts with one shared answer are 4 questions, not 1.
    prompts = [_p([1, i], {"answer": "7"}) for i in range(4)]
    train, held = rl_eval.split_prompts(prompts, 1, seed=0)
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
    sets = rl_eval.heldout_sets(c, None, [], report)
    assert [ex["answer"] for ex in sets["heldout"]] == ["It is 7.", "Hi.", "7", ""]
    assert report.to_dict()["used"] == 4
    assert "1 of 4 examples have no reference answer" in caplog.text


def _fake_render(monkeypatch):
    """F.render_prompt without a tokenizer: one id per call, the roles it saw recorded."""
    from flaxlm.data import formats as F

    seen = []

    def fake_render(msgs, template, max_len, tools=None):
        seen.append([m["role"] for m in msgs])
        return np.asarray([len(seen)], np.int32), 0

    monkeypatch.setattr(F, "render_prompt", fake_render)
    return seen


def _jsonl(path, rows):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_null_fields_are_absent_and_a_bad_meta_is_counted(tmp_path, monkeypatch):
    """Prompts and eval sets from a mixed parquet file (null where a row lacks a column): a
    null prompt next to messages dropped the record as missing_field, a null messages next to
    prompt + completion read it as a prompt record (its completion lost as the reference). A
    meta that is not an object became {} silently; it is now "bad_meta" with file:line."""
    from flaxlm.configs import grpo as grpo_config
    from flaxlm.configs.common import override
    from flaxlm.data import formats as F

    user = [{"role": "user", "content": "What is 3 plus 4?"}]
    rows = [
        {"prompt": "What is 2 plus 5?", "messages": None, "completion": None,
         "meta": {"answer": "7"}},
        {"prompt": None, "messages": user, "completion": None, "meta": None},
        {"prompt": "Hi?", "messages": None, "completion": "Hi.", "meta": None},
        {"prompt": "What is 1 plus 1?", "messages": None, "completion": None, "meta": "2"},
    ]  # fmt: skip
    path = _jsonl(tmp_path / "mixed.jsonl", rows)  # (the rows a mixed parquet file reads as)
    c = override(grpo_config.get_config("runlocal=True"), {"eval_gen.sets": str(path)})
    _fake_render(monkeypatch)
    report = F.DataReport()
    prompts = rl_common.load_prompts(path, c, None, report)
    assert [p["loc"] for p in prompts] == [f"{path}:{i}" for i in (1, 2, 3)]
    assert [p["meta"] for p in prompts] == [{"answer": "7"}, {}, {}]
    assert [m["content"] for m in prompts[1]["messages"]] == ["What is 3 plus 4?"]
    bad = report.to_dict()["bad_input"]
    assert bad["examples"] == {"bad_meta": [f"{path}:4: bad_meta (meta='2' is not a JSON object)"]}
    report = F.DataReport()
    sets = rl_eval.heldout_sets(c, None, [], report)
    assert [ex["answer"] for ex in sets["mixed"]] == ["7", "", "Hi."]
    assert report.to_dict()["bad_input"]["counts"] == {"bad_meta": 1}


def test_eval_set_names_are_unique_and_an_empty_set_is_an_error(tmp_path, monkeypatch):
    """Two sets with one file name (a/heldout.jsonl, b/heldout.jsonl) reported under one name,
    the second's metrics overwriting the first's: they are named with their folder. A set
    whose every record is bad gave no metric (RL) or NaN (SFT) with no word: an error naming
    it, its drops and the first bad line."""
    from flaxlm.alignment import common
    from flaxlm.configs import grpo as grpo_config
    from flaxlm.configs.common import override
    from flaxlm.data import formats as F

    a = _jsonl(tmp_path / "a" / "heldout.jsonl", [{"prompt": "Hi?", "completion": "Hi."}])
    b = _jsonl(tmp_path / "b" / "heldout.jsonl", [{"prompt": "Yo?", "meta": {"answer": "Yo."}}])
    other = _jsonl(tmp_path / "other.jsonl", [{"prompt": "Hey?", "completion": "Hey."}])
    _fake_render(monkeypatch)
    c = override(grpo_config.get_config("runlocal=True"),
                 {"eval_gen.sets": f"{a},{b},{other},builtin:sft_heldout"})  # fmt: skip
    assert common.eval_set_names(c.eval_gen.sets.split(",")) == [
        "a_heldout", "b_heldout", "other", "sft_heldout"]  # fmt: skip
    override(c, {"eval_gen.sets": f"{a},{b}"})
    sets = rl_eval.heldout_sets(c, None, [], F.DataReport())
    assert {k: [ex["answer"] for ex in v] for k, v in sets.items()} == {
        "a_heldout": ["Hi."], "b_heldout": ["Yo."]}  # fmt: skip
    with pytest.raises(ValueError, match=f"eval_gen.sets: {a} and {a} would both report as "
                       "eval/a_heldout/"):  # fmt: skip
        common.eval_set_names([a, a])
    rl = _jsonl(tmp_path / "rl_heldout.jsonl", [{"prompt": "Hi?"}])
    with pytest.raises(ValueError, match=f"{rl} and the rl_heldout prompts of rollout"):
        common.eval_set_names([rl], {"rl_heldout": "the rl_heldout prompts of rollout..."})

    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "Hi?", "meta": 1}, {"prompt": ""}])
    override(c, {"eval_gen.sets": f"{a},{bad}"})
    report = F.DataReport()
    with pytest.raises(ValueError, match=re.escape(
        f"eval_gen.sets: {bad} has no usable example (dropped: 1 bad_meta (e.g. {bad}:1: "
        "meta=1 is not a JSON object), 1 empty (e.g. ")):  # fmt: skip
        rl_eval.heldout_sets(c, None, [], report)
    empty = _jsonl(tmp_path / "empty.jsonl", [])
    override(c, {"eval_gen.sets": empty})
    with pytest.raises(ValueError, match="holds no records"):
        rl_eval.heldout_sets(c, None, [], F.DataReport())


def test_same_size_tokenizers_that_differ_in_one_piece_are_told_apart(tmp_path):
    """Two tokenizers of the same size whose pieces differ only where the probe text never
    reaches (one merge: "Ġzz" against "Ġjj") used to pass check_same_tokenizer, which compared
    the size and the probe's ids: the second model would have scored every "zz" as "jj"."""
    import importlib.util

    from flaxlm.alignment import common
    from flaxlm.models.hf_tokenizer import load_tokenizer

    spec = importlib.util.spec_from_file_location(
        "hf_tokenizers", os.path.join(os.path.dirname(__file__), "..", "hf_tokenizers.py")
    )
    hf_tokenizers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hf_tokenizers)
    ours = hf_tokenizers.write_hf_tokenizer(str(tmp_path / "ours"), "", {}, merge_words=["Ġzz"])
    twin = hf_tokenizers.write_hf_tokenizer(str(tmp_path / "twin"), "", {}, merge_words=["Ġzz"])
    other = hf_tokenizers.write_hf_tokenizer(str(tmp_path / "other"), "", {}, merge_words=["Ġjj"])
    tok, theirs = load_tokenizer(ours), load_tokenizer(other)
    assert tok.vocab_size == theirs.vocab_size
    probe = common.TOKENIZER_PROBE
    assert tok.encode(probe) == theirs.encode(probe)  # what the old check compared

    common.check_same_tokenizer(tok, f"hf:{twin}", "dpo.ref_from")  # the same pieces: accepted
    with pytest.raises(ValueError, match=r"dpo.ref_from=hf:.*other: its tokenizer .* is not "
                       r"this run's .*: id 256 is 'Ġj' there, 'Ġz' here"):  # fmt: skip
        common.check_same_tokenizer(tok, f"hf:{other}", "dpo.ref_from")


def test_a_reward_model_that_learnt_another_chat_layout_is_refused(tmp_path):
    """Same pieces, another chat template (ChatML against '### role:'), flaxlm's own against a
    Jinja one, or other template variables: the reward model would score the policy's rows laid
    out unlike anything it learnt (check_same_tokenizer passed them all)."""
    import importlib.util

    from flaxlm.alignment import common
    from flaxlm.models.hf_tokenizer import load_tokenizer, set_template_kwargs

    spec = importlib.util.spec_from_file_location(
        "hf_tokenizers", os.path.join(os.path.dirname(__file__), "..", "hf_tokenizers.py")
    )
    hf_tokenizers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hf_tokenizers)
    chatml = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    other = ("{% for m in messages %}### {{ m.role }}: {{ m.content }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}### assistant: {% endif %}")  # fmt: skip
    cfg = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    dirs = {name: hf_tokenizers.write_hf_tokenizer(str(tmp_path / name), t, cfg)
            for name, t in (("chatml", chatml), ("twin", chatml), ("other", other),
                            ("plain", ""))}  # fmt: skip
    tok = load_tokenizer(dirs["chatml"])
    for name in dirs:
        common.check_same_tokenizer(tok, f"hf:{dirs[name]}", "reward_from")  # pieces: the same
    common.check_same_chat_template(tok, f"hf:{dirs['twin']}", "reward_from")  # accepted
    with pytest.raises(ValueError, match=r"reward_from=hf:.*other learnt chats rendered with "
                       r"the Jinja chat template sha256:\w{12}; this run renders them with the "
                       r"Jinja chat template sha256:\w{12}, so"):  # fmt: skip
        common.check_same_chat_template(tok, f"hf:{dirs['other']}", "reward_from")
    with pytest.raises(ValueError, match="rendered with flaxlm's own chat template; this run"):
        common.check_same_chat_template(tok, f"hf:{dirs['plain']}", "reward_from")
    set_template_kwargs(tok, '{"enable_thinking": false}')
    with pytest.raises(ValueError, match=r"this run renders them with the Jinja chat template "
                       r"sha256:\w{12} with \{'enable_thinking': False\}"):  # fmt: skip
        common.check_same_chat_template(tok, f"hf:{dirs['twin']}", "reward_from")


@pytest.mark.parametrize("module", [ppo_config, grpo_config, online_dpo_config])
def test_eval_gen_max_prompt_len_follows_a_rollout_max_prompt_len_override(module):
    """The RL configs set eval_gen.max_prompt_len from rollout.max_prompt_len once, so raising
    the latter on the command line left the evaluation's cap behind (and PPO's reward-model
    rows too narrow for the held-out RL prompts). It follows now; set itself, it is its own
    and leaves the rollout's alone."""
    c = module.get_config("runlocal=True,variant=tiny")
    override(c, {"rollout.max_prompt_len": 64, "seq_len": 96})
    assert c.eval_gen.max_prompt_len == 64
    override(c, {"eval_gen.max_prompt_len": 40})
    assert (c.eval_gen.max_prompt_len, c.rollout.max_prompt_len) == (40, 64)
    override(c, {"rollout.max_prompt_len": 50})
    assert (c.eval_gen.max_prompt_len, c.rollout.max_prompt_len) == (40, 50)


@pytest.mark.parametrize("stage", ["sft", "dpo", "kto", "distill"])
def test_generation_eval_prompts_follow_seq_len_in_every_supervised_stage(stage):
    """DPO, KTO and distillation cut their generation-eval prompts to a fixed 256 tokens, as
    SFT did, whatever seq_len: all four follow seq_len − eval_gen.max_new_tokens now."""
    import importlib

    from flaxlm.data import formats as F

    c = importlib.import_module(f"flaxlm.configs.{stage}").get_config("variant=tiny")
    assert c.eval_gen.max_prompt_len == c.seq_len - c.eval_gen.max_new_tokens
    override(c, {"seq_len": 300, "eval_gen.max_new_tokens": 30})
    assert c.eval_gen.max_prompt_len == 270
    override(c, {"seq_len": 16, "eval_gen.max_new_tokens": 16})
    with pytest.raises(ValueError, match=r"eval_gen.max_prompt_len=0: .* raise seq_len"):
        rl_eval.heldout_sets(c, None, [], F.DataReport())


def test_generation_sets_report_in_a_section_of_their_own(tmp_path, monkeypatch):
    from flaxlm.configs import sft as sft_config
    from flaxlm.data import formats as F

    _fake_render(monkeypatch)
    c = sft_config.get_config("variant=tiny,runlocal=True")
    path = _jsonl(tmp_path / "h.jsonl", [{"prompt": "Hi?", "completion": "Yo."}])
    override(c, {"eval_gen.sets": path})
    report = F.DataReport()
    rl_eval.heldout_sets(c, None, [], report)
    assert rl_eval.gen_report_section(report)["eval_gen"]["records"] == 1
    assert rl_eval.gen_report_section(F.DataReport()) == {}


def test_a_prompt_file_with_nothing_usable_says_what_became_of_its_records(tmp_path, monkeypatch):
    """Every record malformed: the error said only "no usable prompts" (the report naming
    file:line is written later, so nothing else did). It is a DataError (one line from the
    trainer CLI) with each reason's count and first file:line; prompts that are all held out
    say so, naming rollout.heldout_prompts."""
    from flaxlm.data.source_errors import DataError

    bad = tmp_path / "onlybad.jsonl"
    bad.write_text('{"prompt": "hi"\n{"text": "no prompt field"}\n')
    c = override(grpo_config.get_config("runlocal=True"), {"data.train": str(bad)})
    _fake_render(monkeypatch)
    with pytest.raises(DataError, match=re.escape(
            f"data.train={str(bad)!r}: no usable prompts: 2 record(s) read, 2 dropped: "
            f"1 malformed_json (e.g. {bad}:1: malformed_json")) as e:  # fmt: skip
        rl_eval.training_prompts(c, None)
    assert f"1 missing_field (e.g. {bad}:2: missing_field" in str(e.value)

    # one question asked three times: holding out one prompt holds out the whole question
    world = {"task": "arithmetic", "a": 1, "b": 1, "answer": "2", WORLD_KEY: WORLD_MARK}
    same = _jsonl(tmp_path / "same.jsonl", [{"prompt": "What is 1 plus 1?", "meta": world}] * 3)
    c = override(c, {"data.train": str(same), "rollout.heldout_prompts": 1})
    with pytest.raises(DataError, match=r"its 3 usable prompts all ask what the "
                       r"rollout.heldout_prompts=1 held-out ones ask"):  # fmt: skip
        rl_eval.training_prompts(c, None)
    c = override(c, {"rollout.heldout_prompts": 3})
    with pytest.raises(DataError, match=r"rollout.heldout_prompts=3 >= 3 prompts"):
        rl_eval.training_prompts(c, None)


def test_an_hf_frozen_model_is_read_into_the_training_shardings():
    """A frozen "hf:DIR" teacher or reference lands in the mesh's shardings, like a run's (its
    weights went to device 0, and the first step on 8 devices failed with "incompatible
    devices"); a jitted forward under the mesh gives the single-device logits."""
    import jax

    from flaxlm.models import hf
    from flaxlm.models.sharding import logical_axis_rules, make_mesh, use_mesh

    fix = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "hf", "llama")
    mesh, rules = make_mesh({"data": 2, "fsdp": 4}), logical_axis_rules("fsdp")
    cfg, apply, params = rl_common.frozen_lm("hf:" + fix, mesh, rules)
    embed = params["embed"]["embedding"]
    assert len(embed.sharding.device_set) == 8 and not embed.sharding.is_fully_replicated
    assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(params))
    tokens = np.arange(16, dtype=np.int32).reshape(2, 8) % cfg.vocab_size
    with use_mesh(mesh, rules):
        got = jax.jit(apply)(params, tokens)
    _, plain = hf.load_pretrained(fix)
    want = apply(plain, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_a_rewards_prompt_is_what_the_policy_was_prompted_with(tmp_path, monkeypatch):
    """An SFT chat reused as an RL prompt ends in its reference answer: the policy's prompt
    drops it (render_prompt), but the `prompt=` a reward gets kept it, so
    `prompt[-1]["content"]` was the answer and a judge reward saw it."""
    from flaxlm.configs import grpo as grpo_config
    from flaxlm.data import formats as F
    from flaxlm.data.chat_examples import prompt_turns

    chat = [{"role": "user", "content": "What is 2 plus 2?"},
            {"role": "assistant", "content": "REFERENCE 4"}]  # fmt: skip
    path = _jsonl(tmp_path / "chats.jsonl", [{"messages": chat, "meta": {"answer": "4"}}])
    _fake_render(monkeypatch)
    prompts = rl_common.load_prompts(path, grpo_config.get_config("runlocal=True"), None,
                                     F.DataReport())  # fmt: skip
    assert prompts[0]["messages"] == chat[:1]
    assert prompt_turns(chat) == chat[:1]  # the turns render_prompt renders
