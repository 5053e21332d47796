"""Audit of supervised chat data (data/formats.py, models/hf_tokenizer.py chat templates)
against references written here, not derived from the code under test.

* template + loss mask: the conversation is rendered as *text* by hand (the exported HF template's
  form, `<|role|> content<|end|>`), encoded whole by SentencePiece, and the mask is the pieces
  whose bytes fall in an assistant's content or its closing `<|end|>` — render_chat must give the
  same ids and mask: every assistant turn trained with its `<|end|>`, nothing else, EOS never;
* `prompt` + `completion` records equal `messages` records; a blank system/user turn, a missing
  or unknown role, non-string content, and a conversation not ending with an assistant turn are
  counted drops naming file:line (strict: raise); no kept example trains on zero tokens;
* truncation cuts the oldest tokens (BOS kept, final answer whole); packing = concatenation;
* preference pairs: both sides carry the exact same prompt ids, masks cover only responses, and
  an overlength pair is cut only inside the shared prompt;
* HF Jinja templates (a ChatML/Qwen-style and a Llama-3-style one, written here) on a byte-level
  BPE tokenizer written here: ids frozen from transformers 5.24 apply_chat_template
  (FLAXLM_HF_LIVE=1 with .venv-hf re-checks them live), plus transformers' Jinja extras
  (loop controls, non-escaping tojson, strftime_now, the named special tokens) and its
  message normalisation (keys whose value is None dropped; `tools`/`documents` None).
"""

import datetime
import importlib.util
import json
import os

import pytest

from flaxlm.data import formats as F
from flaxlm.data.sources import DataError
from flaxlm.data.tokenizer import train as train_tokenizer

_spec = importlib.util.spec_from_file_location(
    "hf_tokenizers", os.path.join(os.path.dirname(os.path.dirname(__file__)), "hf_tokenizers.py")
)
T = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T)

WORDS = "the river and mountain have a forest of tall trees that grow with light".split()
U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731


@pytest.fixture(scope="module")
def tok():
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(30)) for i in range(200)]
    return train_tokenizer(texts, 320)


@pytest.fixture(scope="module")
def template(tok):
    return F.ChatTemplate(tok)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _reference(tok, msgs):
    """(ids, mask) from the hand-rendered text: BOS, `<|role|> content<|end|>` per turn, EOS."""
    text, spans = "", []
    for m in msgs:
        text += f"<|{m['role']}|>"
        start = len(text.encode())  # the space is the content's own leading "▁"
        text += " " + m["content"] + "<|end|>"
        if m["role"] == "assistant":
            spans.append((start, len(text.encode())))
    pieces = tok.sp.encode(text, out_type="proto").pieces
    if pieces[0].piece == "▁":  # SentencePiece's dummy prefix before the first role token
        pieces = pieces[1:]
    ids = [tok.bos_id] + [p.id for p in pieces] + [tok.eos_id]
    mask = [0] + [int(any(a <= p.begin and p.end <= b for a, b in spans)) for p in pieces] + [0]
    return ids, mask


CONVS = [
    [U("the river"), A("a forest")],
    [S("grow with light"), U("the river and"), A("tall trees"), U("that grow"), A("the light")],
    [U("mountain?"), A("!forest, trees.")],  # punctuation next to the template text
    [U("the  river "), A(" a forest  "), U("x"), A("tall")],  # spaces at the boundaries
]


@pytest.mark.parametrize("conv", CONVS)
def test_mask_is_exactly_every_assistant_turn_and_its_end(tok, template, conv):
    ids, mask = F.render_chat(conv, template)
    want_ids, want_mask = _reference(tok, conv)
    assert ids.tolist() == want_ids and mask.astype(int).tolist() == want_mask
    end = tok.special_ids()["<|end|>"]
    n_asst = sum(m["role"] == "assistant" for m in conv)
    assert [i for i, m in zip(ids, mask) if m].count(end) == n_asst  # each answer's stop token
    assert ids[-1] == tok.eos_id and mask[-1] == 0  # EOS closes, never a target


def test_prompt_completion_equals_messages(tmp_path, template):
    rows = [
        {"prompt": "the river", "completion": "a forest"},
        {"messages": [U("the river"), A("a forest")]},
        {"prompt": [S("grow"), U("the river")], "completion": "a forest"},
        {"messages": [S("grow"), U("the river"), A("a forest")]},
    ]
    report = F.DataReport()
    out = F.render_sft(F.read_records(_write(tmp_path / "c.jsonl", rows), report), template, 64,
                       report=report)  # fmt: skip
    assert len(out) == 4 and report.to_dict()["dropped"] == 0
    for a, b in (out[0], out[1]), (out[2], out[3]):
        assert a["ids"].tolist() == b["ids"].tolist() and a["mask"].tolist() == b["mask"].tolist()


BAD = [
    {"messages": [U("the river"), A("a forest")]},  # 1: fine
    {"messages": [U("the river"), A("a forest"), U("and?")]},  # 2: ends with a user turn
    {"messages": [U("   "), A("a forest")]},  # 3: blank user turn
    {"prompt": "", "completion": "a forest"},  # 4: blank prompt: the same reason as 3
    {"messages": [S(""), U("the river"), A("a forest")]},  # 5: blank system turn
    {"messages": [{"content": "the river"}, A("a forest")]},  # 6: missing role
    {"messages": [{"role": "robot", "content": "x"}, A("a forest")]},  # 7: unknown role
    {"messages": [U(["the", "river"]), A("a forest")]},  # 8: non-string content
    {"messages": [U("the river"), A("")]},  # 9: empty answer
]


def test_malformed_conversations_are_counted_with_file_and_line(tmp_path, template):
    path = _write(tmp_path / "bad.jsonl", BAD)
    report = F.DataReport()
    out = F.render_sft(F.read_records(path, report), template, 64, report=report)
    assert [e["loc"] for e in out] == [f"{path}:1"]
    bad = report.to_dict()["bad_input"]
    want = {"no_assistant_turn": [2], "empty": [3, 4, 5], "bad_messages": [6, 8],
            "unknown_role": [7], "empty_assistant": [9]}  # fmt: skip
    assert bad["counts"] == {k: len(v) for k, v in want.items()}
    for reason, lines in want.items():
        got = [e.split(": ")[0] for e in bad["examples"][reason]]
        assert got == [f"{path}:{n}" for n in lines]
    for n in (2, 3):  # strict mode raises at the first bad record, naming it
        p = _write(tmp_path / f"one{n}.jsonl", [BAD[0], BAD[n - 1]])
        with pytest.raises(DataError, match=rf"one{n}\.jsonl:2: "):
            strict = F.DataReport(strict=True)
            F.render_sft(F.read_records(p, strict), template, 64, report=strict)


def test_no_kept_example_trains_on_nothing(template):
    """A trailing user turn used to be kept; truncation then cut every answer token away and
    the example trained on zero tokens (counted as used)."""
    conv = [U("the river"), A("a forest"), U("tall trees and the river")]
    report = F.DataReport()
    out = F.render_sft([({"messages": conv}, "f:1")], template, 4, report=report)
    assert out == [] and report.log.counts == {"no_assistant_turn": 1} and report.used == 0
    long = [U("the river and " * 8), A("a forest"), U("grow " * 8), A("tall trees")]
    for seq_len in range(8, 50):
        for ex in F.render_sft([({"messages": long}, "f:2")], template, seq_len):
            assert ex["mask"][1:].sum() >= 1 and len(ex["ids"]) - 1 <= seq_len


def test_truncation_cuts_the_oldest_tokens_and_keeps_the_answer(template):
    conv = [S("grow with light " * 6), U("the river"), A("a forest"), U("and"), A("tall trees")]
    full, mask = F.render_chat(conv, template)
    final = len(F.render_chat([A("tall trees")], template)[0]) - 1  # the answer turn + EOS
    for seq_len in range(final, len(full) - 1):
        report = F.DataReport()
        (ex,) = F.render_sft([({"messages": conv}, "f:1")], template, seq_len, report=report)
        keep = seq_len  # BOS + the last seq_len ids: n ids give n - 1 targets
        assert ex["ids"].tolist() == [template.bos_id] + full.tolist()[-keep:]
        assert ex["mask"].tolist() == [0.0] + mask.tolist()[-keep:]
        assert report.truncated == 1 and report.loss_tokens == int(ex["mask"][1:].sum())
    report = F.DataReport()
    assert F.render_sft([({"messages": conv}, "f:1")], template, final - 1, report=report) == []
    assert report.log.counts == {"too_long": 1}


def test_packed_row_is_the_concatenation(template):
    convs = [[U("the river"), A("a forest")], [U("tall"), A("trees grow")],
             [S("light"), U("and"), A("the mountain")]]  # fmt: skip
    exs = F.render_sft([({"messages": c}, f"f:{i}") for i, c in enumerate(convs)], template, 64)
    b = next(F.SFTBatches(exs, seq_len=64, batch=1, pad_id=0, shuffle=False, num_epochs=1))
    toks, tgts, mask, segs, pos = [], [], [], [], []
    for s, e in enumerate(exs, 1):
        ids, m = e["ids"].tolist(), e["mask"].tolist()
        toks += ids[:-1]
        tgts += ids[1:]
        mask += m[1:]
        segs += [s] * (len(ids) - 1)
        pos += list(range(len(ids) - 1))
    n = len(toks)
    assert b["tokens"][0, :n].tolist() == toks and b["targets"][0, :n].tolist() == tgts
    assert b["loss_mask"][0, :n].tolist() == mask and b["segment_ids"][0, :n].tolist() == segs
    assert b["positions"][0, :n].tolist() == pos
    assert not b["loss_mask"][0, n:].any() and not b["segment_ids"][0, n:].any()


def test_preference_sides_share_the_prompt_ids_and_cut_only_it(template):
    prompt = [S("grow with light " * 4), U("the river")]
    chosen = [A("a forest " * 3), U("and"), A("tall trees")]
    rejected = [A("light"), U("and"), A("the mountain have a forest of tall trees that grow")]
    rec = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    p_ids = F.render_chat(prompt, template, add_generation_prompt=True)[0].tolist()[:-1]
    full = {k: F.render_chat(prompt + v, template) for k, v in (("c", chosen), ("r", rejected))}
    longest = max(len(ids) for ids, _ in full.values()) - 1
    for seq_len in range(longest - len(p_ids) - 8, longest + 1):
        report = F.DataReport()
        out = F.render_preferences([(rec, "f:1")], template, seq_len, report=report)
        cut = longest - seq_len
        if cut > len(p_ids) - 1:  # more than the prompt (BOS stays): dropped, not cut into a reply
            assert out == [] and report.log.counts == {"too_long": 1}
            continue
        (pair,) = out
        kept_prompt = [template.bos_id] + p_ids[1 + cut :]
        for side, k in (("chosen", "c"), ("rejected", "r")):
            ids, mask = pair[side]
            n = len(kept_prompt)
            assert ids[:n].tolist() == kept_prompt and not mask[:n].any()
            assert ids[n:].tolist() == full[k][0][len(p_ids) :].tolist()  # the whole response
            assert mask[n:].tolist() == full[k][1][len(p_ids) :].tolist()
            assert len(ids) - 1 <= seq_len


# ---------------------------------------------------------------------------------------------
# HF Jinja chat templates

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]  # fmt: skip
MERGE_WORDS = ["Ġthe", "Ġriver", "Ġforest", "system", "user", "assistant", "ĊĊ", "Ġis", "Ġa",
               "Hello", "You", "Ġare", "Ġhelpful", "Ġanswer"]  # fmt: skip
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
EXTRAS = (  # transformers' Jinja extras: loop controls, its tojson, named special tokens
    "{{ bos_token }}{% for m in messages %}{% if loop.index0 >= 2 %}{% break %}{% endif %}"
    "{{ m.content | tojson }}{{ unk_token }}{% endfor %}{{ pad_token }}"
)
TEMPLATES = {
    "chatml": (CHATML, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "llama3": (LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "extras": (EXTRAS, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                        "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}),
}  # fmt: skip
HF_CONVS = [
    [U("Hello, the river?")],
    [S("You are a river."), U("is a <b> & 'c'"), A(" the forest "), U("the river")],
]
# transformers 5.24.0 AutoTokenizer(...).apply_chat_template(conv, add_generation_prompt=True,
# tokenize=True, return_dict=False): test_live_frozen_ids_are_transformers prints them.
FROZEN = {
    'chatml': [
        [311, 274, 198, 295, 297, 289, 304, 220, 285, 13, 312, 198, 311, 277, 198, 293,
         11, 258, 263, 30, 312, 198, 311, 285, 198],
        [311, 274, 198, 295, 297, 289, 263, 13, 312, 198, 311, 277, 198, 72, 82, 289, 220,
         27, 65, 29, 220, 5, 220, 6, 66, 6, 312, 198, 311, 285, 198, 258, 269, 220, 312,
         198, 311, 277, 198, 83, 71, 68, 263, 312, 198, 311, 285, 198],
    ],
    'llama3': [
        [313, 314, 277, 315, 198, 198, 293, 11, 258, 263, 30, 316, 314, 285, 315, 286],
        [313, 314, 274, 315, 198, 198, 295, 297, 289, 263, 13, 316, 314, 277, 315, 198,
         198, 72, 82, 289, 220, 27, 65, 29, 220, 5, 220, 6, 66, 6, 316, 314, 285, 315,
         198, 198, 83, 71, 68, 269, 316, 314, 277, 315, 198, 198, 83, 71, 68, 263, 316,
         314, 285, 315, 286],
    ],
    'extras': [
        [313, 1, 293, 11, 258, 263, 30, 1, 310, 312],
        [313, 1, 295, 297, 289, 263, 13, 1, 310, 1, 72, 82, 289, 220, 27, 65, 29, 220, 5,
         220, 6, 66, 6, 1, 310, 312],
    ],
}  # fmt: skip


def _hf_dir(d, name, chat_template=None):
    """A byte-level BPE tokenizer.json (written here, deterministic) + tokenizer_config.json
    (`name`'s template and special tokens, or `chat_template` with `name`'s special tokens)."""
    template, specials = TEMPLATES[name]
    return T.write_hf_tokenizer(d, chat_template or template, specials, specials=SPECIALS,
                                merge_words=MERGE_WORDS)  # fmt: skip


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_hf_chat_templates_match_frozen_transformers_ids(tmp_path, name):
    from flaxlm.models.hf_tokenizer import load_tokenizer

    tok = load_tokenizer(_hf_dir(str(tmp_path / name), name))
    got = [tok.render_chat_template(c) for c in HF_CONVS]
    assert got == FROZEN[name]
    if name == "extras":  # tojson must not HTML-escape (<, &, ')
        assert "<b> & 'c'" in tok.tok.decode(got[1], skip_special_tokens=False)


def test_hf_chat_template_strftime_now(tmp_path):
    from flaxlm.models.hf_tokenizer import load_tokenizer

    tok = load_tokenizer(_hf_dir(str(tmp_path / "t"), "llama3"))
    tok.chat_template = "{{ strftime_now('%Y-%m-%d') if strftime_now is defined else 'none' }}"
    before = datetime.date.today().isoformat()
    text = tok.tok.decode(tok.render_chat_template([U("x")]))
    assert text in (before, datetime.date.today().isoformat())


def test_text_header_fallback_on_an_hf_tokenizer_keeps_the_mask_on_the_answer(tmp_path):
    """A tokenizer without flaxlm's chat tokens: text headers, EOS ends each turn; an answer
    whose first word would merge with the header text is encoded on its own."""
    from flaxlm.models.hf_tokenizer import load_tokenizer

    tok = load_tokenizer(_hf_dir(str(tmp_path / "t"), "llama3"))
    t = F.ChatTemplate(tok)
    assert not t.special and t.end_id == tok.eos_id
    conv = [U("the river"), A("assistant the forest"), U("is"), A("Hello")]
    ids, mask = F.render_chat(conv, t)
    trained = [int(i) for i, m in zip(ids, mask) if m]
    eot = tok.eos_id
    first, second = trained[: trained.index(eot) + 1], trained[trained.index(eot) + 1 :]
    assert first == tok.encode("assistant the forest") + [eot]
    assert second == tok.encode("Hello") + [eot]
    assert ids[-1] == eot and mask[-1] == 0  # EOS closes the conversation too, untrained


LIVE = """
import json, sys
from transformers import AutoTokenizer
convs, out = json.loads(sys.argv[2]), {}
for name, d in json.loads(sys.argv[1]).items():
    t = AutoTokenizer.from_pretrained(d)
    out[name] = [list(t.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                            return_dict=False)) for c in convs]
print(json.dumps(out))
"""


def test_live_frozen_ids_are_transformers(tmp_path, hf_live):
    dirs = {n: _hf_dir(str(tmp_path / n), n) for n in TEMPLATES}
    live = hf_live(LIVE, dirs, HF_CONVS)
    assert live == FROZEN, json.dumps(live)


# Messages with keys whose value is None (as OpenAI-style clients send `tool_calls=None`):
# transformers drops those keys before rendering (utils/chat_template_utils.py
# `_normalize_chat_messages`; nested Nones stay) and defines `tools` and `documents` as None.
NONE_KEYS = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role }}:{{ m | length }}"
    "{% if m.content is defined %} {{ m.content }}{% else %} -{% endif %}"
    "{% if m.tool_calls is defined %} calls {{ m.tool_calls | tojson }}{% endif %}"
    "{% if m.name is defined %} ({{ m.name }}){% endif %}{{ '<|im_end|>' }}{% endfor %}"
    "{% if tools is not none %}tools {% endif %}{% if documents is not none %}docs {% endif %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant' }}{% endif %}"
)
NONE_CONVS = [
    [{"role": "user", "content": "the river", "name": None},
     {"role": "assistant", "content": None, "tool_calls": None},
     {"role": "assistant", "content": "the forest", "name": "n",
      "tool_calls": [{"name": "f", "arguments": None}]},
     {"role": "user", "content": "is a river", "tool_calls": None}],
]  # fmt: skip
# transformers 5.24.0 apply_chat_template(conv, add_generation_prompt=True): text, then ids
# (test_live_none_keys_are_transformers prints them).
FROZEN_NONE_TEXT = [
    "<|im_start|>user:2 the river<|im_end|><|im_start|>assistant:1 -<|im_end|>"
    '<|im_start|>assistant:4 the forest calls [{"name": "f", "arguments": null}] (n)<|im_end|>'
    "<|im_start|>user:2 is a river<|im_end|><|im_start|>assistant",
]
FROZEN_NONE_IDS = [
    [311, 277, 25, 17, 258, 263, 312, 311, 285, 25, 16, 220, 12, 312, 311, 285, 25, 19, 258,
     269, 220, 66, 64, 75, 75, 82, 220, 58, 90, 1, 77, 64, 76, 68, 1, 25, 220, 1, 69, 1, 11,
     220, 1, 64, 81, 70, 84, 76, 68, 77, 83, 82, 1, 25, 220, 77, 84, 75, 75, 92, 60, 220, 7,
     77, 8, 312, 311, 277, 25, 17, 288, 289, 263, 312, 311, 285],
]  # fmt: skip


def test_message_keys_with_none_values_are_dropped_as_transformers_does(tmp_path):
    """Before: `{% if m.tool_calls is defined %}` was true for tool_calls=None (rendering
    "calls null"), `m.content is defined` printed "None", and `tools is not none` held."""
    import copy

    from flaxlm.models.hf_tokenizer import load_tokenizer

    tok = load_tokenizer(_hf_dir(str(tmp_path / "t"), "chatml", NONE_KEYS))
    before = copy.deepcopy(NONE_CONVS)
    assert [tok.render_chat_text(c) for c in NONE_CONVS] == FROZEN_NONE_TEXT
    assert [tok.render_chat_template(c) for c in NONE_CONVS] == FROZEN_NONE_IDS
    assert NONE_CONVS == before  # the caller's messages keep their None keys


LIVE_NONE = """
import json, sys
from transformers import AutoTokenizer
t = AutoTokenizer.from_pretrained(json.loads(sys.argv[1]))
convs = json.loads(sys.argv[2])
print(json.dumps([[t.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                   for c in convs],
                  [list(t.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                              return_dict=False)) for c in convs]]))
"""


def test_live_none_keys_are_transformers(tmp_path, hf_live):
    live = hf_live(LIVE_NONE, _hf_dir(str(tmp_path / "t"), "chatml", NONE_KEYS), NONE_CONVS)
    assert live == [FROZEN_NONE_TEXT, FROZEN_NONE_IDS], json.dumps(live)


# Templates made for assistant-only losses wrap each answer in {% generation %} blocks (TRL's
# assistant_only_loss); transformers renders the block's body as it is. Without the tag such a
# template did not compile: rendering, generate --chat and every training record failed.
GEN_TAG = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}"
    "{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}\n"
    "{% else %}{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


GEN_CONV = [U("the river"), A("the forest"), U("is a river"), A("Hello")]
# transformers 5.25.0 apply_chat_template(GEN_CONV, add_generation_prompt=g, tokenize=False) for
# g = True, False (test_live_new_templates_are_transformers prints them): the block renders its
# body, and trim_blocks takes the newline after {% endgeneration %} as after any block tag.
FROZEN_GEN_TEXT = [
    "<|im_start|>user\nthe river<|im_end|>\n<|im_start|>assistant\nthe forest<|im_end|>"
    "<|im_start|>user\nis a river<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>"
    "<|im_start|>assistant\n",
    "<|im_start|>user\nthe river<|im_end|>\n<|im_start|>assistant\nthe forest<|im_end|>"
    "<|im_start|>user\nis a river<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>",
]


def test_generation_blocks_render_their_body(tmp_path):
    from flaxlm.models.hf_tokenizer import load_tokenizer

    tagged = load_tokenizer(_hf_dir(str(tmp_path / "g"), "chatml", GEN_TAG))
    conv = GEN_CONV
    assert [tagged.render_chat_text(conv, g) for g in (True, False)] == FROZEN_GEN_TEXT
    (ex,) = F.render_sft([({"messages": conv}, "f:1")], F.training_template(tagged), 128)
    trained = [int(i) for i, m in zip(ex["ids"], ex["mask"]) if m]
    end = tagged.tok.token_to_id("<|im_end|>")
    assert trained == tagged.encode("the forest") + [end] + tagged.encode("Hello") + [end]


# Phi-3 and Phi-4-mini end a render without the generation prompt with EOS ({% else %}
# {{ eos_token }}), so messages[:j] rendered that way is not a prefix of the conversation. It
# was called not prefix-stable: SFT on such a checkpoint stopped at its first record.
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI3_SPECIALS = ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>")


def _phi3(d):
    from flaxlm.models.hf_tokenizer import load_tokenizer

    T.write_hf_tokenizer(d, PHI3, {"eos_token": "<|endoftext|>"}, specials=PHI3_SPECIALS,
                         merge_words=MERGE_WORDS)  # fmt: skip
    with open(os.path.join(d, "generation_config.json"), "w") as f:  # Phi-3's: <|end|> stops
        json.dump({"eos_token_id": [0, 3]}, f)  # (the specials' ids: 256 bytes first)
    tok = load_tokenizer(d)
    ids = {s: tok.tok.token_to_id(s) for s in PHI3_SPECIALS}
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [ids["<|endoftext|>"], ids["<|end|>"]]}, f)
    return load_tokenizer(d), ids


def test_sft_on_a_template_that_closes_with_eos(tmp_path):
    tok, ids = _phi3(str(tmp_path / "phi3"))
    t = F.training_template(tok)
    end = ids["<|end|>"]
    one = [U("the river"), A("Hello")]
    many = [U("the river"), A("the forest"), U("is a river"), A("Hello")]
    report = F.DataReport()
    got = F.render_sft([({"messages": one}, "f:1"), ({"messages": many}, "f:2")], t, 128,
                       report=report)  # fmt: skip
    assert len(got) == 2 and report.split_by_turn == 0
    for ex, answers in zip(got, (["Hello"], ["the forest", "Hello"])):
        trained = [int(i) for i, m in zip(ex["ids"], ex["mask"]) if m]
        assert trained == sum((tok.encode(a) + [end] for a in answers), [])
        # the conversation as the template writes it, closed one id after the last <|end|>
        whole = tok.encode(tok.render_chat_text(ex["messages"], False))
        assert whole[: len(ex["ids"])] == ex["ids"].tolist() and ex["ids"][-2] == end
    # a prompt of a preference pair is located too (it always was: the generation prompt)
    pair = {"prompt": [U("the river")], "chosen": "Hello", "rejected": "the forest"}
    assert len(F.render_preferences([(pair, "f:3")], t, 128)) == 1


# gpt-oss's template reads an answer's reasoning as `message.thinking`, Qwen3's as
# `reasoning_content`; transformers gives a message's reasoning under both names. flaxlm passed
# `reasoning_content` only (gpt-oss then rendered no reasoning) and a record's `thinking` key
# was dropped: SFT trained without the chain of thought, without a word.
THINKING = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and m.thinking is defined %}think: {{ m.thinking }}\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


THINK_KEYS = ["reasoning_content", "thinking", "reasoning"]
# transformers 5.25.0 renders the reasoning under each of these keys as
FROZEN_THINK_TEXT = ("<|im_start|>user\nthe river<|im_end|>\n<|im_start|>assistant\n"
                     "think: the forest\nHello<|im_end|>\n")  # fmt: skip


def _think_conv(key):
    return [U("the river"), {"role": "assistant", "content": "Hello", key: "the forest"}]


@pytest.mark.parametrize("key", THINK_KEYS)
def test_reasoning_reaches_a_template_under_any_name(tmp_path, key):
    from flaxlm.models.hf_tokenizer import load_tokenizer

    tok = load_tokenizer(_hf_dir(str(tmp_path / "t"), "chatml", THINKING))
    conv = _think_conv(key)
    assert tok.render_chat_text(conv, False) == FROZEN_THINK_TEXT
    (ex,) = F.render_sft([({"messages": conv}, "f:1")], F.training_template(tok), 128)
    assert ex["messages"][-1]["reasoning_content"] == "the forest"
    trained = tok.tok.decode([int(i) for i, m in zip(ex["ids"], ex["mask"]) if m],
                             skip_special_tokens=False)  # fmt: skip
    assert trained == "think: the forest\nHello<|im_end|>"


def test_two_different_reasonings_are_refused(tmp_path):
    from flaxlm.models.hf_tokenizer import load_tokenizer

    tok = load_tokenizer(_hf_dir(str(tmp_path / "t"), "chatml", THINKING))
    conv = [U("the river"), {"role": "assistant", "content": "Hello", "thinking": "a",
                             "reasoning_content": "b"}]  # fmt: skip
    report = F.DataReport()
    assert F.render_sft([({"messages": conv}, "f:1")], F.training_template(tok), 128,
                        report=report) == []  # fmt: skip
    assert report.log.counts == {"bad_messages": 1}
    assert "two different reasonings" in json.dumps(report.log.examples)


LIVE_NEW = """
import json, sys
from transformers import AutoTokenizer
gen, think, conv, keys = json.loads(sys.argv[1])
t = AutoTokenizer.from_pretrained(gen)
out = [[t.apply_chat_template(conv, add_generation_prompt=g, tokenize=False) for g in (1, 0)]]
t = AutoTokenizer.from_pretrained(think)
user = {"role": "user", "content": "the river"}
out.append([t.apply_chat_template([user, {"role": "assistant", "content": "Hello",
                                          k: "the forest"}], tokenize=False) for k in keys])
print(json.dumps(out))
"""


def test_live_new_templates_are_transformers(tmp_path, hf_live):
    dirs = [_hf_dir(str(tmp_path / n), "chatml", t) for n, t in (("g", GEN_TAG), ("t", THINKING))]
    live = hf_live(LIVE_NEW, [*dirs, GEN_CONV, THINK_KEYS])
    assert live == [FROZEN_GEN_TEXT, [FROZEN_THINK_TEXT] * 3], json.dumps(live)
