"""Training on an HF tokenizer's own Jinja chat template (data/formats.py `JinjaChatTemplate`):
SFT conversations and preference pairs render through the template that generation, chat-mode
evaluation and RL rollouts prompt with, the loss mask on exactly each assistant's content and
the template's end-of-turn text up to and including its first stop id.

References written here, not derived from the code under test: a ChatML/Qwen-style and a
Llama-3-style template on a byte-level BPE tokenizer (the construction of
tests/data/test_chat_audit.py, copied); the mask built piece by piece from the templates' known
text structure; ids and `assistant_masks` frozen from transformers 5.24
apply_chat_template(return_assistant_tokens_mask=True) on the same templates with
`{% generation %}` around the trained text (FLAXLM_HF_LIVE=1 with .venv-hf re-checks them).
"""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

from flaxlm.data import formats as F

_spec = importlib.util.spec_from_file_location(
    "hf_tokenizers", os.path.join(os.path.dirname(os.path.dirname(__file__)), "hf_tokenizers.py")
)
T = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>", "<pad>",
            "<start_of_turn>", "<end_of_turn>"]  # fmt: skip
MERGE_WORDS = ["Ġthe", "Ġriver", "Ġforest", "system", "user", "assistant", "ĊĊ", "Ġis", "Ġa",
               "Hello", "You", "Ġare", "Ġhelpful", "Ġanswer"]  # fmt: skip
# Llama 3's pre-tokenizer split ("\n\n" stays one piece before a word, as at a prompt's end).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
# [[G]] ... [[/G]]: transformers' {% generation %} block for the live assistant-mask check.
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}[[G]]{{- message.content + '<|im_end|>' }}[[/G]]"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}{% for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "[[G]]{{- message['content'] | trim + '<|eot_id|>' }}[[/G]]"
    "{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}{% endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
# Gemma's: a system turn folded into the first user turn, the assistant's role named "model",
# and turns ended by <end_of_turn>, which is not the EOS: generation_config.json lists it.
GEMMA = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<start_of_turn>model\\n' }}[[G]]{{- message['content'] | trim + '<end_of_turn>' }}[[/G]]"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<start_of_turn>' + message['role'] + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{- message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)
TEMPLATES = {
    "chatml": (CHATML, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "llama3": (LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "gemma": (GEMMA, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}),
}
CONVS = [
    [U("Hello, the river?"), A("the forest")],
    [S("You are a river."), U("the river"), A(" the forest "), U("is a river"), A("Hello")],
]


def _hf_dir(d, name, generation=False, llama_split=True):
    """A byte-level BPE tokenizer.json (deterministic) + tokenizer_config.json with `name`'s
    template; the Llama-3-style one gets Llama 3's pre-tokenizer unless `llama_split=False`."""
    from tokenizers import Regex, pre_tokenizers

    split = None
    if name == "llama3" and llama_split:
        split = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])  # fmt: skip
    template, specials = TEMPLATES[name]
    template = template.replace("[[G]]", "{% generation %}" if generation else "")
    template = template.replace("[[/G]]", "{% endgeneration %}" if generation else "")
    T.write_hf_tokenizer(d, template, specials, specials=SPECIALS,
                         merge_words=MERGE_WORDS, pre_tokenizer=split)  # fmt: skip
    if name == "gemma":  # (as Gemma's checkpoints: stop at <eos> or <end_of_turn>)
        with open(os.path.join(d, "tokenizer.json")) as f:
            ids = {t["content"]: t["id"] for t in json.load(f)["added_tokens"]}
        with open(os.path.join(d, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]]}, f)
    return d


def _load(tmp_path, name, **kw):
    from flaxlm.models.hf_tokenizer import load_tokenizer

    return load_tokenizer(_hf_dir(str(tmp_path / name), name, **kw))


@pytest.fixture(params=sorted(TEMPLATES))
def hf(request, tmp_path):
    tok = _load(tmp_path, request.param)
    return request.param, tok, F.training_template(tok)


def _reference(name, tok, msgs):
    """(ids, mask) built piece by piece from the template's text structure: every piece encoded
    on its own (special tokens and newlines split pieces in these tokenizers), trained pieces =
    each assistant's content + its end-of-turn token; closed with one untrained id after."""
    pieces = []  # (text, trained)
    if name == "chatml":
        sys_text = (
            msgs[0]["content"] if msgs[0]["role"] == "system" else "You are a helpful assistant."
        )
        pieces += [("<|im_start|>system\n" + sys_text + "<|im_end|>\n", 0)]
        for m in msgs[1:] if msgs[0]["role"] == "system" else msgs:
            pieces += [(f"<|im_start|>{m['role']}\n", 0)]
            train = int(m["role"] == "assistant")
            pieces += [(m["content"], train), ("<|im_end|>", train), ("\n", 0)]
    elif name == "gemma":
        pieces += [("<bos>", 0)]
        prefix = msgs[0]["content"] + "\n\n" if msgs[0]["role"] == "system" else ""
        for m in msgs[1:] if prefix else msgs:
            if m["role"] == "assistant":
                pieces += [("<start_of_turn>model\n", 0), (m["content"].strip(), 1),
                           ("<end_of_turn>", 1), ("\n", 0)]  # fmt: skip
            else:
                text = prefix + m["content"].strip()
                pieces += [(f"<start_of_turn>{m['role']}\n", 0), (text, 0),
                           ("<end_of_turn>\n", 0)]  # fmt: skip
                prefix = ""
    else:
        pieces += [("<|begin_of_text|>", 0)]
        for m in msgs:
            train = int(m["role"] == "assistant")
            pieces += [(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", 0)]
            pieces += [(m["content"].strip(), train), ("<|eot_id|>", train)]
        pieces += [("<|eot_id|>", 0)]  # the close: EOS (= <|eot_id|>) after the last stop
    ids, mask = [], []
    for text, train in pieces:
        part = tok.encode(text)
        ids += part
        mask += [train] * len(part)
    return ids, mask


# transformers 5.24.0 AutoTokenizer(_hf_dir(..., generation=True)): per conversation
# (apply_chat_template(conv, tokenize=True, return_assistant_tokens_mask=True) input_ids,
#  its assistant_masks, apply_chat_template(conv[:-1], add_generation_prompt=True) input_ids).
FROZEN = {
    'chatml': [
        (
            [311, 274, 198, 295, 297, 289, 304, 220, 285, 13, 312, 198, 311, 277, 198, 293, 11,
             258, 263, 30, 312, 198, 311, 285, 198, 83, 71, 68, 269, 312, 198],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1,
             1, 1, 0],
            [311, 274, 198, 295, 297, 289, 304, 220, 285, 13, 312, 198, 311, 277, 198, 293, 11,
             258, 263, 30, 312, 198, 311, 285, 198],
        ),
        (
            [311, 274, 198, 295, 297, 289, 263, 13, 312, 198, 311, 277, 198, 83, 71, 68, 263,
             312, 198, 311, 285, 198, 258, 269, 220, 312, 198, 311, 277, 198, 72, 82, 289, 263,
             312, 198, 311, 285, 198, 293, 312, 198],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0,
             0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
            [311, 274, 198, 295, 297, 289, 263, 13, 312, 198, 311, 277, 198, 83, 71, 68, 263,
             312, 198, 311, 285, 198, 258, 269, 220, 312, 198, 311, 277, 198, 72, 82, 289, 263,
             312, 198, 311, 285, 198],
        ),
    ],
    'llama3': [
        (
            [313, 314, 277, 315, 286, 293, 11, 258, 263, 30, 316, 314, 285, 315, 286, 83, 71, 68,
             269, 316],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
            [313, 314, 277, 315, 286, 293, 11, 258, 263, 30, 316, 314, 285, 315, 286],
        ),
        (
            [313, 314, 274, 315, 286, 295, 297, 289, 263, 13, 316, 314, 277, 315, 286, 83, 71,
             68, 263, 316, 314, 285, 315, 286, 83, 71, 68, 269, 316, 314, 277, 315, 286, 72, 82,
             289, 263, 316, 314, 285, 315, 286, 293, 316],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1,
             1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1],
            [313, 314, 274, 315, 286, 295, 297, 289, 263, 13, 316, 314, 277, 315, 286, 83, 71,
             68, 263, 316, 314, 285, 315, 286, 83, 71, 68, 269, 316, 314, 277, 315, 286, 72, 82,
             289, 263, 316, 314, 285, 315, 286],
        ),
    ],
    'gemma': [
        (
            [317, 320, 277, 198, 293, 11, 258, 263, 30, 321, 198, 320, 76, 78, 67, 68, 75, 198, 83,
             71, 68, 269, 321, 198],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0],
            [317, 320, 277, 198, 293, 11, 258, 263, 30, 321, 198, 320, 76, 78, 67, 68, 75, 198],
        ),
        (
            [317, 320, 277, 198, 295, 297, 289, 263, 13, 198, 198, 83, 71, 68, 263, 321, 198, 320,
             76, 78, 67, 68, 75, 198, 83, 71, 68, 269, 321, 198, 320, 277, 198, 72, 82, 289, 263,
             321, 198, 320, 76, 78, 67, 68, 75, 198, 293, 321, 198],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1,
             0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
            [317, 320, 277, 198, 295, 297, 289, 263, 13, 198, 198, 83, 71, 68, 263, 321, 198, 320,
             76, 78, 67, 68, 75, 198, 83, 71, 68, 269, 321, 198, 320, 277, 198, 72, 82, 289, 263,
             321, 198, 320, 76, 78, 67, 68, 75, 198],
        ),
    ],
}  # fmt: skip


@pytest.mark.parametrize("i", range(len(CONVS)))
def test_ids_and_mask_are_the_reference_and_transformers(hf, i):
    name, tok, t = hf
    assert isinstance(t, F.JinjaChatTemplate) and t.stop_tokens == tuple(tok.stop_ids)
    ids, mask = F.render_chat(CONVS[i], t)
    ids, mask = ids.tolist(), mask.astype(int).tolist()
    assert (ids, mask) == _reference(name, tok, CONVS[i])
    hf_ids, hf_mask, _ = FROZEN[name][i]
    # The template's own text, its trained tokens exactly transformers' assistant mask; then
    # one untrained closing id (ChatML's "\n"; after Llama 3's final <|eot_id|>, EOS).
    n = len(hf_ids)
    assert ids[:n] == hf_ids and mask[:n] == hf_mask and mask[n:] == [0] * (len(ids) - n)
    stop = t.end_id  # the id the template ends a turn with: Gemma's is not its EOS
    assert (stop != tok.eos_id) == (name == "gemma") and stop in t.stop_tokens
    assert ids[-2] == stop and mask[-2] == 1 and mask[-1] == 0  # the reward score position
    n_turns = sum(m["role"] == "assistant" for m in CONVS[i])
    assert [x for x, m in zip(ids, mask) if m].count(stop) == n_turns  # every turn's stop


@pytest.mark.parametrize("i", range(len(CONVS)))
def test_generation_prompt_is_the_training_prompt(hf, i):
    name, tok, t = hf
    ids, mask = F.render_chat(CONVS[i], t)
    prompt, stops = F.generation_prompt(CONVS[i][:-1], tok)
    assert prompt == FROZEN[name][i][2]  # transformers' add_generation_prompt ids
    assert ids[: len(prompt)].tolist() == prompt and mask[len(prompt)] == 1
    assert stops == t.stop_tokens
    rp, cut = F.render_prompt(CONVS[i], t, 1 << 20)
    assert rp.tolist() == prompt and cut == 0
    assert F.render_chat(CONVS[i][:-1], t, add_generation_prompt=True)[0].tolist() == prompt


def test_truncation_keeps_bos_and_the_final_turn_and_drops_what_cannot_fit(hf, tmp_path):
    name, tok, t = hf
    conv = CONVS[1]
    full, fmask = F.render_chat(conv, t)
    report = F.DataReport()
    seq_len = len(full) - 1 - 9
    (ex,) = F.render_sft([({"messages": conv}, "c:1")], t, seq_len, report=report)
    ids, mask = ex["ids"].tolist(), ex["mask"].tolist()
    head = int(name in ("llama3", "gemma"))  # a template's BOS is kept
    assert ids == full[:head].tolist() + full[head + 9 :].tolist()
    assert mask == fmask[:head].tolist() + fmask[head + 9 :].tolist()
    assert report.truncated == 1 and report.to_dict()["chat_template"] == t.name
    # The final turn whole (its header too): everything after the previous message's end.
    final_header = tok.encode({"chatml": "<|im_start|>assistant\n",
                               "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                               "gemma": "<start_of_turn>model\n"}[name])  # fmt: skip
    tail = final_header + tok.encode("Hello") + [t.end_id]
    assert ids[-len(tail) - 1 : -1] == tail
    # The final turn alone does not fit: dropped under either policy; "drop" drops any overlength.
    for seq_len, policy in ((len(tail) - 1, "truncate_left"), (len(full) - 2, "drop")):
        report = F.DataReport()
        out = F.render_sft([({"messages": conv}, "c:1")], t, seq_len, overlength=policy,
                           report=report)  # fmt: skip
        assert out == [] and report.log.counts == {"too_long": 1}


def test_preference_pairs_share_the_generation_prompt_and_cut_only_it(hf):
    name, tok, t = hf
    prompt = [S("You are a river."), U("the river"), A("a forest"), U("is the river")]
    rec = {"prompt": prompt, "chosen": "the forest is a river", "rejected": "Hello"}
    (pair,) = F.render_preferences([(rec, "p:1")], t, 512)
    want, _ = F.generation_prompt(prompt, tok)
    for side, answer in (("chosen", rec["chosen"]), ("rejected", rec["rejected"])):
        ids, mask = pair[side]
        assert ids[: len(want)].tolist() == want
        full, fmask = F.render_chat(prompt + [A(answer)], t)  # SFT trains the earlier answer;
        assert ids.tolist() == full.tolist() and fmask[: len(want)].any()  # a pair does not:
        assert not mask[: len(want)].any()  # it is context, the same on both sides
        resp = tok.encode(answer) + [t.end_id]
        assert ids[len(want) : len(want) + len(resp)].tolist() == resp
        assert mask[len(want) :].tolist() == [1.0] * len(resp) + [0.0] * (len(ids) - len(want)
                                                                          - len(resp))  # fmt: skip
        assert ids[-2] == t.end_id  # the reward model reads its score at the stop id
    # Overlength: only the shared prompt is cut, by the same tokens on both sides.
    longest = max(len(pair[s][0]) for s in ("chosen", "rejected")) - 1
    report = F.DataReport()
    (cut,) = F.render_preferences([(rec, "p:1")], t, longest - 5, report=report)
    head = int(name in ("llama3", "gemma"))
    for side in ("chosen", "rejected"):
        ids, mask = pair[side]
        keep = np.r_[np.arange(head), np.arange(head + 5, len(ids))]
        assert cut[side][0].tolist() == ids[keep].tolist()
        assert cut[side][1].tolist() == mask[keep].tolist()
    assert report.truncated == 1
    n = len(want) - 5
    assert cut["chosen"][0][:n].tolist() == cut["rejected"][0][:n].tolist()


def test_packed_rows_keep_jinja_examples_apart(hf):
    _, tok, t = hf
    recs = [({"messages": c}, f"c:{i}") for i, c in enumerate(CONVS * 3)]
    examples = F.render_sft(recs, t, 64)
    it = F.SFTBatches(examples, seq_len=64, batch=2, pad_id=0, shuffle=False, num_epochs=1)
    got, trained = [], 0
    for b in it:
        for r in range(2):
            for s in range(1, int(b["segment_ids"][r].max()) + 1):
                sel = b["segment_ids"][r] == s
                assert b["positions"][r][sel].tolist() == list(range(int(sel.sum())))
                got.append(b["tokens"][r][sel].tolist())
            trained += int(b["loss_mask"][r].sum())
    assert sorted(got) == sorted(ex["ids"][:-1].tolist() for ex in examples)
    assert trained == sum(int(ex["mask"][1:].sum()) for ex in examples)


def test_a_template_that_is_not_prefix_stable_is_an_error_naming_it(tmp_path):
    tok = _load(tmp_path, "chatml")
    # The generation prompt opens a block the rendered answer does not have: even the final
    # answer cannot be located, so no mask is derivable. (A template that only rewrites
    # earlier turns trains one turn per example: tests/data/test_chat_history_templates.py.)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>{% endif %}"
    )
    t = F.training_template(tok)
    with pytest.raises(F.TemplateError, match=r"c:1: chat template jinja:\w+ .*not prefix-stable"):
        F.render_sft([({"messages": CONVS[0]}, "c:1"), ({"messages": CONVS[1]}, "c:2")], t, 512)
    with pytest.raises(F.TemplateError, match=r"p:1: chat template jinja:\w+ .*not prefix-stable"):
        rec = {"prompt": "the river", "chosen": "the forest", "rejected": "Hello"}
        F.render_preferences([(rec, "p:1")], t, 512)


def test_a_template_that_fails_on_a_record_is_an_error_naming_its_file_and_line(tmp_path):
    """The template's own raise_exception (or a failed render) on one record of SFT, preference
    or RL prompt data: an HFError that names the data file and the record's line."""
    import re

    import ml_collections

    from flaxlm.alignment import rl_common, rl_eval
    from flaxlm.models.hf_tokenizer import HFError

    tok = _load(tmp_path, "chatml")
    base = CHATML.replace("[[G]]", "").replace("[[/G]]", "")
    tok.chat_template = (
        "{% for m in messages %}{% if m.content == 'is a river' %}"
        "{{ raise_exception('no rivers here') }}{% endif %}{% endfor %}" + base
    )
    t = F.training_template(tok)

    def write(name, records):
        path = str(tmp_path / name)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        return path, re.escape(path)

    sft, sft_re = write("sft.jsonl", [{"messages": CONVS[0]}, {"messages": CONVS[1]}])
    with pytest.raises(HFError, match=rf"^{sft_re}:2: .*chat template: no rivers here$"):
        F.render_sft(F.read_records(sft, F.DataReport()), t, 512)
    pairs, pairs_re = write("pairs.jsonl", [
        {"prompt": "the river", "chosen": "the forest", "rejected": "Hello"},
        {"prompt": "is a river", "chosen": "the forest", "rejected": "Hello"},
    ])  # fmt: skip
    with pytest.raises(HFError, match=rf"^{pairs_re}:2: .*chat template: no rivers here$"):
        F.render_preferences(F.read_records(pairs, F.DataReport()), t, 512)
    prompts, prompts_re = write(
        "prompts.jsonl", [{"prompt": p} for p in ("the river", "is a river")]
    )
    c = ml_collections.ConfigDict({"data": {"fields": F.fields_config(), "overlength": "drop",
                                            "world": "", "world_seed": 0},
                                   "rollout": {"max_prompt_len": 64},
                                   "eval_gen": {"sets": prompts, "examples": 8,
                                                "max_prompt_len": 64}})  # fmt: skip
    with pytest.raises(HFError, match=rf"^{prompts_re}:2: .*chat template: no rivers here$"):
        rl_common.load_prompts(prompts, c, t, F.DataReport())
    with pytest.raises(HFError, match=rf"^{prompts_re}:2: .*chat template: no rivers here$"):
        rl_eval.heldout_sets(c, t, [], F.DataReport())
    # A render that fails in Jinja itself (an undefined value used) names the record too.
    tok.chat_template = "{% for m in messages %}{{ m.content ~ m.meta.x }}{% endfor %}" + base
    with pytest.raises(HFError, match=rf"^{sft_re}:1: .*chat template: UndefinedError: "):
        F.render_sft(F.read_records(sft, F.DataReport()), F.training_template(tok), 512)


def test_a_merge_across_the_turn_boundary_drops_the_record(tmp_path):
    """GPT-2's split makes "\\n\\n" one token at a prompt's end but two before a word: the
    training ids would not be the generation prompt's, so the record is a counted drop."""
    tok = _load(tmp_path, "llama3", llama_split=False)
    report = F.DataReport()
    out = F.render_sft([({"messages": CONVS[0]}, "c:1")], F.training_template(tok), 512,
                       report=report)  # fmt: skip
    assert out == [] and report.log.counts == {"template_boundary": 1}


def test_tokenizers_without_a_jinja_template_keep_flaxlms_template(tmp_path):
    from flaxlm.data.tokenizer import train as train_tokenizer

    tok = _load(tmp_path, "llama3")
    tok.chat_template = ""
    assert type(F.training_template(tok)) is F.ChatTemplate
    sp = train_tokenizer(["the river and the forest"] * 50, 280)
    assert type(F.training_template(sp)) is F.ChatTemplate
    report = F.DataReport()
    F.render_sft([({"messages": CONVS[0]}, "c:1")], F.ChatTemplate(sp), 64, report=report)
    assert "chat_template" not in report.to_dict()


def _stop_text(tok, t) -> str:
    return tok.tok.id_to_token(t.end_id)  # "<|im_end|>", "<|eot_id|>", "<end_of_turn>"


def test_a_stop_token_spelled_inside_an_answer_is_trained_whole(hf):
    """An answer whose text holds the template's end-of-turn token (a tokenizer turns the text
    into the special id) used to be trained only up to that id: the mask ended at the first stop
    id after the answer started, and the rest of the answer was neither trained nor counted.
    The turn ends at the first stop id after the answer's text."""
    name, tok, t = hf
    stop = _stop_text(tok, t)
    conv = [U("the river?"), A(f"Each turn ends with {stop} and then a newline. That is all.")]
    report = F.DataReport()
    (ex,) = F.render_sft([({"messages": conv}, "c:1")], t, 512, report=report)
    assert (ex["ids"].tolist(), ex["mask"].astype(int).tolist()) == _reference(name, tok, conv)
    assert report.truncated == 0 and report.log.total == 0
    # Multi-turn: an earlier answer holding the stop text is trained whole too.
    conv = [U("Q1"), A(f"Write {stop} at the end of each turn."), U("Q2"), A("the forest")]
    ids, mask = F.render_chat(conv, t)
    assert (ids.tolist(), mask.astype(int).tolist()) == _reference(name, tok, conv)
    # Preference pairs: the chosen answer whole, as the rejected one.
    rec = {"prompt": "the river?", "chosen": f"Use {stop} to close a turn, then a newline.",
           "rejected": "No idea."}  # fmt: skip
    (pair,) = F.render_preferences([(rec, "p:1")], t, 512)
    want, _ = F.generation_prompt([U(rec["prompt"])], tok)
    for side in ("chosen", "rejected"):
        ids, mask = pair[side]
        resp = tok.encode(rec[side]) + [t.end_id]
        assert ids[len(want) : len(want) + len(resp)].tolist() == resp
        assert mask[len(want) : len(want) + len(resp)].tolist() == [1.0] * len(resp)
        assert ids[-2] == t.end_id and mask[-1] == 0


def test_a_stop_token_inside_an_answer_the_template_rewrites_is_a_counted_drop(tmp_path):
    """A template that does not render the answer's text as it is (here: it replaces "a" by
    "b"): where the answer ends cannot be found in the text, so an answer holding a stop
    token's text cannot be trained whole; it is dropped, counted with its file:line. An answer
    without one trains as before (up to the first stop id after it starts)."""
    tok = _load(tmp_path, "chatml")
    tok.chat_template = (
        CHATML.replace("[[G]]", "")
        .replace("[[/G]]", "")
        .replace(
            "message.content + '<|im_end|>'", "(message.content | replace('a', 'b')) + '<|im_end|>'"
        )
    )
    t = F.training_template(tok)
    recs = [({"messages": [U("x"), A("a <|im_end|> a")]}, "c:1"),
            ({"messages": [U("x"), A("a forest")]}, "c:2")]  # fmt: skip
    report = F.DataReport()
    (ex,) = F.render_sft(recs, t, 512, report=report)
    assert report.log.counts == {"stop_in_content": 1} and ex["loc"] == "c:2"
    (example,) = report.to_dict()["bad_input"]["examples"]["stop_in_content"]
    assert example.startswith("c:1: stop_in_content (")
    trained = [int(i) for i, m in zip(ex["ids"], ex["mask"]) if m]
    assert trained == tok.encode("b forest") + [t.end_id]


# ---------------------------------------------------------------------------------------------
# End to end: SFT from an imported HF checkpoint whose tokenizer has a chat template

HF_FIXTURE = os.path.join(REPO, "tests", "fixtures", "hf", "qwen2")
WORD_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def test_sft_from_an_hf_checkpoint_trains_on_its_chat_template(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from flaxlm.alignment import sft
    from flaxlm.configs import sft as sft_config
    from flaxlm.configs.common import override
    from flaxlm.models import hf
    from flaxlm.train.checkpoint import read_meta

    src = tmp_path / "src"
    shutil.copytree(HF_FIXTURE, src)  # the Qwen2 test checkpoint: vocab 64
    words = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "system", "user",
             "assistant"] + [f"w{i}" for i in range(40)]  # fmt: skip
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(words[:4])
    tk.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": WORD_TEMPLATE,
    }))  # fmt: skip
    hf.main(["import", str(src), str(tmp_path / "base")])
    rng = np.random.default_rng(0)
    rows = [{"messages": [U(" ".join(f"w{j}" for j in rng.integers(0, 40, 3))),
                          A(" ".join(f"w{j}" for j in rng.integers(0, 40, 2)))]}
            for _ in range(24)]  # fmt: skip
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = sft_config.get_config("variant=tiny,runlocal=True")
    with c.unlocked():
        c.progress_bar, c.eval_at_start, c.async_ckpt = False, False, False
    c = override(c, {
        "init_from": str(tmp_path / "base"), "data.train": str(data), "data.eval": "",
        "eval_gen.sets": "", "seq_len": 32, "batch_size": 8, "total_steps": 3,
        "eval_every": 0, "ckpt_every": 3, "log_every": 1, "opt.warmup_steps": 1,
    })  # fmt: skip
    workdir = str(tmp_path / "sft")
    _, summary = sft.run(c, workdir)
    assert summary["step"] == 3 and np.isfinite(summary["train"]["loss"])
    _, meta = read_meta(workdir)
    report = meta["data_report"]["train"]
    assert report["used"] == 24 and report["chat_template"].startswith("jinja:")
    # What it trained on: the template's ids, answer + <|im_end|> the only targets.
    from flaxlm.models.hf_tokenizer import load_tokenizer

    tok = load_tokenizer(str(src / "tokenizer.json"))
    ex = F.render_sft([(rows[0], "r:1")], F.training_template(tok), 32)[0]
    want = tok.encode("<|im_start|> user " + rows[0]["messages"][0]["content"]
                      + " <|im_end|> <|im_start|> assistant " + rows[0]["messages"][1]["content"]
                      + " <|im_end|>") + [tok.eos_id]  # fmt: skip
    assert ex["ids"].tolist() == want
    assert ex["mask"].tolist() == [0.0] * (len(want) - 4) + [1.0] * 3 + [0.0]
    assert report["loss_tokens"] == 24 * 3


LIVE = """
import json, sys
from transformers import AutoTokenizer
convs, out = json.loads(sys.argv[2]), {}
for name, d in json.loads(sys.argv[1]).items():
    t, out[name] = AutoTokenizer.from_pretrained(d), []
    for c in convs:
        r = t.apply_chat_template(c, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
        p = t.apply_chat_template(c[:-1], tokenize=True, return_dict=True,
                                  add_generation_prompt=True)
        out[name].append([list(r["input_ids"]), list(r["assistant_masks"]), list(p["input_ids"])])
print(json.dumps(out))
"""


def test_live_frozen_ids_and_masks_are_transformers(tmp_path, hf_live):
    dirs = {n: _hf_dir(str(tmp_path / n), n, generation=True) for n in TEMPLATES}
    live = hf_live(LIVE, dirs, CONVS)
    assert live == {n: [list(map(list, c)) for c in v] for n, v in FROZEN.items()}, json.dumps(live)
