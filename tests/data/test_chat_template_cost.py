"""Host-CPU cost of rendering chat data, counted as work (encode calls and characters encoded,
template renders), never as wall time, at a size n and 4n.

flaxlm's own template: `render_sft` and `render_preferences` read back the lengths of the final
answer / the shared prompt (`_final_len`, the pair's prompt length in data/chat_examples.py)
through `ChatTemplate.encode`. That used to encode those contents a second time (a final answer
~11% of rendering time); the template now remembers the contents of the conversation it
rendered last, so every content is encoded once. The ids and masks must not change: they are
compared with the old behaviour (every `encode` a fresh tokenization) on varied records.
"""

import numpy as np
import pytest

from flaxlm.data import formats as F

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731
WORDS = "where does Kavo live in Brel the city of 42 yes no a number say or".split()


def _text(n: int, seed: int = 0) -> str:
    return " ".join(WORDS[(seed + 7 * i) % len(WORDS)] for i in range(n))


@pytest.fixture
def template(chat_tokenizer):
    return F.ChatTemplate(chat_tokenizer[1])


class _Counting:
    """Wraps a tokenizer's encode: calls and characters encoded."""

    def __init__(self, monkeypatch, tok):
        self.calls, self.chars, encode = 0, 0, tok.encode

        def counted(text, **kw):
            self.calls += 1
            self.chars += len(text)
            return encode(text, **kw)

        monkeypatch.setattr(tok, "encode", counted)


def _sft(template, answer_words: int):
    conv = [S(_text(5, 1)), U(_text(6, 2)), A(_text(8, 3)), U(_text(6, 4)),
            A(_text(answer_words, 5))]  # fmt: skip
    return conv, F.render_sft([({"messages": conv}, "c:1")], template, 4096)


def test_sft_encodes_each_content_once_not_the_final_answer_twice(template, monkeypatch):
    """Characters encoded = the conversation's characters: growing the final answer from n to
    4n words grows the work by 3x its growth, not 6x (the old code encoded it again in
    `_final_len`)."""
    seen = {}
    for n in (50, 200):
        count = _Counting(monkeypatch, template.tok)
        conv, (ex,) = _sft(F.ChatTemplate(template.tok), n)  # (nothing remembered yet)
        assert count.calls == len(conv)
        assert count.chars == sum(len(m["content"]) for m in conv)
        seen[n] = count.chars
    grew = len(_text(200, 5)) - len(_text(50, 5))
    assert seen[200] - seen[50] == grew  # old code: 2 * grew


def test_preference_pair_encodes_its_shared_prompt_once(template, monkeypatch):
    """A pair's prompt was encoded three times (each side, then its length): now once; its
    cost grows once with the prompt, not three times."""
    seen = {}
    for n in (40, 160):
        prompt = [S(_text(4, 1)), U(_text(n, 2))]
        rec = {"prompt": prompt, "chosen": [A(_text(9, 3))], "rejected": [A(_text(7, 4))]}
        count = _Counting(monkeypatch, template.tok)
        (pair,) = F.render_preferences([(rec, "p:1")], F.ChatTemplate(template.tok), 4096)
        assert count.calls == 4  # system, user, chosen, rejected
        seen[n] = count.chars
    assert seen[160] - seen[40] == len(_text(160, 2)) - len(_text(40, 2))  # old code: 3x


def _records():
    """Varied SFT records and preference pairs: repeated contents, consecutive assistant turns,
    empty-ish prompts, long answers, records that need truncation."""
    sft = [
        [U("where"), A("yes")],
        [S(_text(3)), U(_text(9, 1)), A(_text(30, 2))],
        [U(_text(4, 3)), A(_text(5, 4)), U(_text(4, 3)), A(_text(5, 4))],  # repeated contents
        [U(_text(6, 5)), A(_text(3, 6)), A(_text(12, 7))],  # trailing assistant run
        [U(_text(120, 8)), A(_text(10, 9))],  # truncated at seq_len 64
        [U("a"), A(_text(200, 10))],  # final answer alone too long
    ]
    pairs = [
        {
            "prompt": [U(_text(5, i))],
            "chosen": [A(_text(4 + i, 1))],
            "rejected": [A(_text(3 + 2 * i, 2))],
        }  # fmt: skip
        for i in range(4)
    ] + [
        {
            "prompt": [S("say"), U(_text(90, 3)), A(_text(6, 4)), U("no")],
            "chosen": [A(_text(5, 5))],
            "rejected": [A(_text(5, 5))],
        },  # fmt: skip
        {"prompt": [U(_text(8, 6))], "chosen": [A(_text(80, 7))], "rejected": [A("no")]},
    ]
    return sft, pairs


def _plain(v):
    """Arrays as lists, recursively (for ==)."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _render_all(template):
    sft, pairs = _records()
    out = []
    for seq_len in (64, 4096):
        report = F.DataReport()
        out += [(e["ids"].tolist(), e["mask"].tolist(), e["loc"]) for e in F.render_sft(
            [({"messages": c}, f"s:{i}") for i, c in enumerate(sft)], template, seq_len,
            report=report)]  # fmt: skip
        out += [
            _plain(p)
            for p in F.render_preferences(
                [(r, f"p:{i}") for i, r in enumerate(pairs)], template, seq_len, report=report
            )
        ]
        out.append(report.to_dict())
    for c in sft[:4]:
        ids, mask = F.render_chat(c, template)
        out.append((ids.tolist(), mask.tolist()))
        ids, mask = F.render_chat(c[:-1], template, add_generation_prompt=True) if (
            c[-2]["role"] != "assistant") else (ids, mask)  # fmt: skip
        out.append((ids.tolist(), mask.tolist()))
    return out


def test_ids_and_masks_are_the_old_codes(template, monkeypatch):
    """The same records rendered with every `encode` a fresh tokenization (the old code) and
    with the remembered contents give identical examples, masks and reports."""
    new = _render_all(template)
    monkeypatch.setattr(F.ChatTemplate, "encode", lambda self, text: self.tok.encode(text))
    old = _render_all(F.ChatTemplate(template.tok))
    assert new == old
