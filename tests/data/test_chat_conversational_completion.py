"""TRL's conversational prompt-completion layout: `completion` a list of messages, as `prompt`
may be ({"prompt": [messages], "completion": [messages]}, with a `label` for KTO — the layout
of trl-lib/kto-mix-14k). Was: every such record dropped as "empty_assistant (completion is
empty or not a string)", so a file of them stopped with "no usable examples". Last, the error
of distillation's GKD mix run on prompts alone, which needs such chats' completions."""

import json

import numpy as np
import pytest

from flaxlm.data import formats as F
from flaxlm.data.sources import DataError
from flaxlm.data.tokenizer import train as train_tokenizer
from tests.data.test_chat_tools import CALL_TEXT, TOOLS, TOOLS_TEMPLATE, _text, _trained_spans
from tests.data.test_chat_tools import CONV as TOOL_CONV

WORDS = "where does kavo live lives in brel the river a forest tall trees".split()


def u(text):
    return {"role": "user", "content": text}


def a(text, **kw):
    return {"role": "assistant", "content": text, **kw}


@pytest.fixture(scope="module")
def template():
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(30)) for i in range(200)]
    return F.ChatTemplate(train_tokenizer(texts, 300))


TEXT = {"prompt": "where does kavo live", "completion": "kavo lives in brel"}
CONV = {"prompt": [u("where does kavo live")], "completion": [a("kavo lives in brel")]}


def _same(x, y, keys):
    for k in keys:
        np.testing.assert_array_equal(x[k], y[k])


def test_sft_conversational_completion_renders_as_the_text_record(template):
    report = F.DataReport()
    recs = [(TEXT, "c:1"), (CONV, "c:2"), ({**CONV, "prompt": TEXT["prompt"]}, "c:3")]
    out = F.render_sft(recs, template, 64, report=report)
    assert report.log.total == 0 and report.used == 3
    assert [ex["loc"] for ex in out] == ["c:1", "c:2", "c:3"]
    for ex in out[1:]:
        _same(ex, out[0], ("ids", "mask"))
        assert ex["messages"] == out[0]["messages"]


def test_kto_conversational_completion_renders_as_the_text_record(template):
    report = F.DataReport()
    recs = [({**TEXT, "label": True}, "k:1"), ({**CONV, "label": True}, "k:2"),
            ({**CONV, "label": False}, "k:3")]  # fmt: skip
    out = F.render_unpaired(recs, template, 64, report=report)
    assert report.log.total == 0 and report.used == 3
    assert [(e["loc"], e["label"]) for e in out] == [("k:1", True), ("k:2", True), ("k:3", False)]
    for e in out[1:]:
        _same(e, out[0], ("ids", "mask"))
        assert (e["split"], e["head"], e["prompt"]) == (out[0]["split"], 1, out[0]["prompt"])


def test_a_multi_turn_completion_is_the_judged_answer(template):
    """An explicit completion is the answer, all of it (as a preference record's chosen list
    is), not only the trailing assistant run; an earlier assistant turn in the prompt is
    context."""
    prompt = [u("where does kavo live"), a("the river"), u("a forest")]
    rec = {"prompt": prompt, "completion": [a("tall trees"), a("kavo lives in brel")],
           "label": True}  # fmt: skip
    (e,) = F.render_unpaired([(rec, "k:1")], template, 64)
    (pair,) = F.render_preferences([({"prompt": prompt, "chosen": rec["completion"],
                                      "rejected": [a("brel")]}, "p:1")], template, 64)  # fmt: skip
    ids, mask = pair["chosen"]
    np.testing.assert_array_equal(e["ids"], ids)
    np.testing.assert_array_equal(e["mask"], mask)
    assert e["prompt"] == prompt


def test_a_file_mixing_both_layouts(tmp_path, template):
    path = tmp_path / "kto-mix.jsonl"
    rows = [{**CONV, "label": True}, {**TEXT, "label": False}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = F.DataReport()
    out = F.render_unpaired(F.read_records(str(path), report), template, 64, report=report)
    assert [(e["loc"], e["label"]) for e in out] == [(f"{path}:1", True), (f"{path}:2", False)]
    _same(out[0], out[1], ("ids", "mask", "split"))
    report = F.DataReport()
    out = F.render_sft(F.read_records(str(path), report), template, 64, report=report)
    assert len(out) == 2 and report.log.total == 0


def test_bad_completions_are_counted_by_reason(tmp_path, template):
    tool = {"role": "tool", "content": "4"}
    call = a(None, tool_calls=[{"function": {"name": "f"}}])
    completions = [
        [],  # 1 empty
        "  ",  # 2 blank text
        {"content": "x"},  # 3 neither text nor messages
        7,  # 4 neither
        [u("the river")],  # 5 a user turn
        [a("a"), u("b"), a("c")],  # 6 a user turn inside
        [a("")],  # 7 an empty assistant turn
        ["kavo"],  # 8 not messages
        [tool, a("four")],  # 9 a tool result opening the answer
        [call, tool],  # 10 ends with a tool result
        [{"role": "system", "content": "x"}, a("y")],  # 11 a system turn
    ]
    rows = [{"prompt": "where does kavo live", "completion": c} for c in completions]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = F.DataReport()
    assert F.render_sft(F.read_records(str(path), report), template, 64, report=report) == []
    bad = report.to_dict()["bad_input"]
    assert bad["counts"] == {"empty_assistant": 3, "bad_completion": 6, "bad_messages": 1,
                             "no_assistant_turn": 1}  # fmt: skip
    ex = bad["examples"]["bad_completion"]
    assert ex[0] == (f"{path}:3: bad_completion (completion is neither text nor a list of "
                     "messages)")  # fmt: skip
    assert ex[2].startswith(f"{path}:5: bad_completion (completion[0] is a user turn")
    assert ex[3].startswith(f"{path}:6: bad_completion (completion[1] is a user turn")
    assert bad["examples"]["no_assistant_turn"][0].startswith(f"{path}:10: no_assistant_turn")
    # KTO: the same checks (a labeled record), strict mode stopping at the first, file:line
    path.write_text("".join(json.dumps({**r, "label": True}) + "\n" for r in rows[2:]))
    strict = F.DataReport(strict=True)
    with pytest.raises(DataError, match=r"bad\.jsonl:1: bad_completion \(completion is neither"):
        F.render_unpaired(F.read_records(str(path), strict), template, 64, report=strict)


def test_a_completion_that_calls_a_tool(tmp_path, byte_chat_tokenizer):
    """A completion's tool call and the tool's result (TRL's conversational layout with tools)
    render as the same `messages` conversation does through a Jinja template: the call and the
    answer trained, the result context; KTO judges the whole completion, as it would the same
    turns as a preference record's chosen answer."""
    from flaxlm.models.hf_tokenizer import load_tokenizer

    tok = load_tokenizer(byte_chat_tokenizer(str(tmp_path / "tok"), TOOLS_TEMPLATE))
    t = F.training_template(tok)
    rec = {"prompt": TOOL_CONV[:1], "completion": TOOL_CONV[1:], "tools": TOOLS}
    (want,) = F.render_sft([({"messages": TOOL_CONV, "tools": TOOLS}, "m:1")], t, 512)
    (got,) = F.render_sft([(rec, "c:1")], t, 512)
    _same(got, want, ("ids", "mask"))
    report = F.DataReport()
    (e,) = F.render_unpaired([({**rec, "label": False}, "k:1")], t, 512, report=report)
    assert report.log.total == 0 and e["prompt"] == TOOL_CONV[:1] and not e["label"]
    np.testing.assert_array_equal(e["ids"], want["ids"])
    assert _text(tok, e["ids"][: e["split"]]).endswith("2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert _trained_spans(tok, e["ids"], e["mask"]) == [f"{CALL_TEXT}<|im_end|>",
                                                        "It is 4.<|im_end|>"]  # fmt: skip


def test_gkd_mix_on_prompts_says_it_needs_chats_with_completions(template):
    """Distillation's GKD mix (distill.on_policy_fraction < 1) trains on the data's answers too;
    without data.train (on_policy=True's default: the built-in RL prompts, no completions) every
    record was dropped and the error named only the missing completion field."""
    from flaxlm.alignment import distill
    from flaxlm.configs import distill as distill_config

    c = distill_config.get_config("runlocal=True,on_policy=True")
    c.distill.on_policy_fraction = 0.5
    c.data.world = "small"
    with pytest.raises(ValueError) as e:  # (the data is checked before anything else is used)
        distill._chat_data(c, None, None, None, None, template, None, None)
    msg = str(e.value)
    assert msg.startswith("data.train='builtin:rl_prompts': no usable examples: "
                          "distill.on_policy_fraction=0.5 < 1 also trains on the data's answers, "
                          "so data.train must hold chats with completions")  # fmt: skip
    assert "missing_field (e.g. builtin:rl_prompts:1" in msg  # what happened to the records


def test_a_record_with_messages_and_a_completion_is_ambiguous():
    """`messages` and `completion` in one record name two answers: refused as
    "ambiguous_record" (the completion used to vanish without a word). `messages` beside a
    bare `prompt` (UltraChat's rows repeat their first user turn there) is the conversation."""
    fields = F.fields_config()
    conv = [u("where does kavo live"), a("in brel")]
    with pytest.raises(F.FormatError, match="both 'messages' and 'completion'") as e:
        F.sft_messages({"messages": conv, "prompt": "x", "completion": "y"}, fields)
    assert e.value.reason == "ambiguous_record"
    assert F.sft_messages({"messages": conv, "prompt": "where does kavo live"}, fields) == conv
