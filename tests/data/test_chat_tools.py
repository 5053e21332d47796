"""Tool use in chat data: records with tool schemas (`tools`), assistant turns that call tools
(`tool_calls`) and tool results (role "tool") render through a tokenizer's own Jinja chat
template, which is the only place such turns have a format.

References are written here by hand: TOOLS_TEMPLATE is a template written for this test (not a
copy of any model's), the expected texts are string literals, and the tokenizer maps every
byte to its own id (tests/conftest.py `byte_chat_tokenizer`), so trained ids decode to exactly
the trained text. FLAXLM_HF_LIVE=1 (with .venv-hf) re-checks that transformers'
apply_chat_template(conversation, tools=...) renders the same text.
"""

import json

import numpy as np
import pytest

from flaxlm.data import formats as F

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c, **kw: {"role": "assistant", "content": c, **kw}  # noqa: E731

# Schemas in the system turn; a call as <call>{function as JSON}</call> inside the assistant
# turn; a tool result as a user turn wrapped in <result>.
TOOLS_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\nTools:' }}"
    "{%- for t in tools %}{{- '\\n' + (t | tojson) }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + (m.content if m.content is string else '') }}"
    "{%- if m.tool_calls is defined %}{%- for c in m.tool_calls %}"
    "{{- '<call>' + (c.function | tojson) + '</call>' }}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}{{- '<|im_start|>user\\n<result>' + m.content + "
    "'</result><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "add", "description": "a + b",
                                           "parameters": {"a": "int", "b": "int"}}}]  # fmt: skip
CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
CONV = [U("2+2?"), A(None, tool_calls=[CALL]), {"role": "tool", "content": "4", "name": "add"},
        A("It is 4.")]  # fmt: skip
SCHEMA = '{"type": "function", "function": {"name": "add", "description": "a + b", ' \
         '"parameters": {"a": "int", "b": "int"}}}'  # fmt: skip
CALL_TEXT = '<call>{"name": "add", "arguments": {"a": 2, "b": 2}}</call>'
TEXT = (
    f"<|im_start|>system\nTools:\n{SCHEMA}<|im_end|>\n"
    "<|im_start|>user\n2+2?<|im_end|>\n"
    f"<|im_start|>assistant\n{CALL_TEXT}<|im_end|>\n"
    "<|im_start|>user\n<result>4</result><|im_end|>\n"
    "<|im_start|>assistant\nIt is 4.<|im_end|>\n"
)


@pytest.fixture
def tool_tok(tmp_path, byte_chat_tokenizer):
    from flaxlm.models.hf_tokenizer import load_tokenizer

    tok = load_tokenizer(byte_chat_tokenizer(str(tmp_path / "tok"), TOOLS_TEMPLATE))
    return tok, F.training_template(tok)


def _text(tok, ids) -> str:
    return tok.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _trained_spans(tok, ids, mask) -> list[str]:
    """The trained text, one string per contiguous run of targets."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(int(i))
        elif cur:
            runs.append(cur)
            cur = []
    return [_text(tok, r) for r in runs + ([cur] if cur else [])]


def test_tool_calls_are_trained_and_tool_results_are_context(tool_tok):
    tok, t = tool_tok
    report = F.DataReport()
    (ex,) = F.render_sft([({"messages": CONV, "tools": TOOLS}, "t:1")], t, 512, report=report)
    assert ex["ids"].tolist() == tok.encode(TEXT)  # its final "\n": the untrained close id
    assert _trained_spans(tok, ex["ids"], ex["mask"]) == [f"{CALL_TEXT}<|im_end|>",
                                                          "It is 4.<|im_end|>"]  # fmt: skip
    assert report.used == 1 and report.log.total == 0
    # the generation prompt a rollout / `generate` would use for the same turn
    prompt, _ = F.generation_prompt(CONV[:3], tok, tools=TOOLS)
    want = TEXT[: TEXT.index("It is 4.")]
    assert _text(tok, prompt) == want
    ids, cut = F.render_prompt(CONV[:3], t, 10_000, tools=TOOLS)
    assert ids.tolist() == prompt and cut == 0


def test_a_preference_pair_after_a_tool_call_trains_only_the_responses(tool_tok):
    tok, t = tool_tok
    rec = {"prompt": CONV[:3], "chosen": "It is 4.", "rejected": "It is 5.", "tools": TOOLS}
    (pair,) = F.render_preferences([(rec, "p:1")], t, 512)
    for side in ("chosen", "rejected"):
        ids, mask = pair[side]
        assert _text(tok, ids) == TEXT.replace("It is 4.", rec[side])
        assert _trained_spans(tok, ids, mask) == [f"{rec[side]}<|im_end|>"]


def test_bad_tool_records_are_counted_and_flaxlms_template_refuses_tools(tmp_path, tool_tok):
    _, t = tool_tok
    bad = [
        {"messages": CONV, "tools": {"add": 1}},  # tools not a list
        {"messages": [U("x"), A("y", tool_calls={"a": 1})]},  # tool_calls not a list
        {"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}, A("y")]},
        {"messages": [U("x"), A(None)]},  # no content and no call
    ]  # fmt: skip
    report = F.DataReport()
    assert F.render_sft([(r, f"b:{i + 1}") for i, r in enumerate(bad)], t, 512,
                        report=report) == []  # fmt: skip
    assert report.log.counts == {"bad_tools": 1, "bad_messages": 3}
    # flaxlm's own template has no format for tools: an error naming the record
    from flaxlm.data.tokenizer import train as train_tokenizer

    own = F.ChatTemplate(train_tokenizer(["2 plus 2 is 4 and the answer"] * 50, 300))
    with pytest.raises(F.TemplateError, match=r"^t:1: tool calls need\(s\) the tokenizer's"):
        F.render_sft([({"messages": CONV}, "t:1")], own, 512)
    with pytest.raises(F.TemplateError, match=r"^t:2: tool schemas"):
        F.render_sft([({"messages": [U("a"), A("b")], "tools": TOOLS}, "t:2")], own, 512)


def test_rl_prompts_carry_their_tools(tmp_path, tool_tok):
    import ml_collections

    from flaxlm.alignment import rl_common

    tok, t = tool_tok
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": CONV[:3], "tools": TOOLS}) + "\n")
    c = ml_collections.ConfigDict({"data": {"fields": F.fields_config(), "overlength": "drop",
                                            "world": "", "world_seed": 0},
                                   "rollout": {"max_prompt_len": 4096}})  # fmt: skip
    (p,) = rl_common.load_prompts(str(path), c, t, F.DataReport())
    want, _ = F.generation_prompt(CONV[:3], tok, tools=TOOLS)
    assert p["ids"].tolist() == want and np.asarray(p["ids"]).dtype == np.int32


LIVE = """
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(json.loads(sys.argv[1]))
conv, tools = json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(json.dumps([tok.apply_chat_template(conv, tools=tools, tokenize=False),
                  tok.apply_chat_template(conv[:3], tools=tools, tokenize=False,
                                          add_generation_prompt=True)]))
"""


def test_live_transformers_renders_the_same_text(tmp_path, hf_live, byte_chat_tokenizer):
    d = byte_chat_tokenizer(str(tmp_path / "live"), TOOLS_TEMPLATE)
    assert hf_live(LIVE, d, CONV, TOOLS) == [TEXT, TEXT[: TEXT.index("It is 4.")]]


def test_flaxlms_template_ignores_a_speaker_name_and_refuses_reasoning():
    """OpenAI-style messages may name their speaker ({"role": "user", "name": "alice"}): that is
    no tool call, and flaxlm's template renders the turn as without it (it used to stop the run
    with "tool calls need(s) the tokenizer's own Jinja chat template"). An answer's
    `reasoning_content` has no place in flaxlm's template: an error naming the record, as a
    tool call is (it used to be dropped silently, training the answer without its reasoning)."""
    from flaxlm.data.tokenizer import train as train_tokenizer

    own = F.ChatTemplate(train_tokenizer(["2 plus 2 is 4 and the answer"] * 50, 300))
    plain = [U("Hi"), A("Hello")]
    named = [{**U("Hi"), "name": "alice"}, {**A("Hello"), "name": "bot"}]
    report = F.DataReport()
    (ex,) = F.render_sft([({"messages": named}, "n:1")], own, 128, report=report)
    want, mask = F.render_chat(plain, own)
    assert ex["ids"].tolist() == want.tolist() and ex["mask"].tolist() == mask.tolist()
    assert report.used == 1 and report.log.total == 0
    prompt, _ = F.generation_prompt(named[:1], own.tok)
    assert prompt == F.generation_prompt(plain[:1], own.tok)[0]
    reasoned = [U("2+2?"), A("The answer is 4.", reasoning_content="2 plus 2 is 4")]
    with pytest.raises(F.TemplateError, match=r"^r:1: reasoning \(`reasoning_content`\) "
                       r"need\(s\) the tokenizer's own Jinja chat template"):  # fmt: skip
        F.render_sft([({"messages": reasoned}, "r:1")], own, 128)
    with pytest.raises(F.TemplateError, match=r"^r:2: reasoning"):
        rec = {"prompt": "2+2?", "chosen": reasoned[1:], "rejected": "5"}
        F.render_preferences([(rec, "r:2")], own, 128)
    blank = [U("2+2?"), A("The answer is 4.", reasoning_content="")]  # nothing to lose
    assert len(F.render_sft([({"messages": blank}, "r:3")], own, 128)) == 1
    # a reasoning_content (or name) that is not text is bad input counted with its record, not
    # an AttributeError from inside the template
    report = F.DataReport()
    for k, bad in enumerate([["step 1", "step 2"], {"a": 1}, 7]):
        listed = [U("2+2?"), A("The answer is 4.", reasoning_content=bad)]
        assert F.render_sft([({"messages": listed}, f"r:{4 + k}")], own, 128, report=report) == []
    named_badly = [{**U("Hi"), "name": ["alice"]}, A("Hello")]
    assert F.render_sft([({"messages": named_badly}, "r:7")], own, 128, report=report) == []
    assert report.log.counts == {"bad_messages": 4}, report.log.counts
    assert "r:4: bad_messages (messages[1] reasoning_content is not a string)" in str(
        report.to_dict()
    )
