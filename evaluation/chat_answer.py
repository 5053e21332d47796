"""A prompt and one assistant answer rendered as training renders them: the ids chat-mode
multiple choice scores (evaluation/harness.py) and the rows win rate reads a reward model on
(evaluation/winrate.py).

SFT and reward training render a conversation whole and train the answer's ids where they sit
(data/chat_examples.py: a Jinja template's text is tokenized once; flaxlm's own template encodes
each turn's content on its own between its header and `<|end|>`). An answer encoded alone and
appended to the generation prompt's ids differs from that with many Jinja templates: a
SentencePiece tokenizer adds "▁" to a text encoded alone (Mistral's `[/INST]Paris`, Zephyr's
`<|assistant|>\\nParis`), and a byte-level one loses the "Ġ" of a template that writes a space
before the answer (`ASSISTANT: {{ content }}`). `render_answer` takes the ids from the training
code itself, as one side of a preference pair (the prompt the shared part, only the answer
trained), so the two evaluations and training cannot drift apart.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RenderedAnswer:
    """`ids`: the conversation closed as training closes it (one untrained id after the
    answer's stop id; a training row's inputs are ids[:-1], the last the stop id, where a reward
    model reads its score). ids[:start] is the generation prompt (what the model answers after),
    ids[start:stop] the answer's ids as the template tokenizes them in place, ids[stop] the stop
    id closing it. `cut`: ids cut to fit `max_len` (after a leading BOS, from the left)."""

    ids: np.ndarray
    start: int
    stop: int
    cut: int = 0


def _uncut(template, msgs: list[dict], answer: str):
    """(ids, mask, keep_from, head) of msgs + the answer, as reward training renders a pair's
    side (data/chat_examples.py `_fitted` with the prompt as the shared prefix, nothing cut)."""
    from flaxlm.data.chat_examples import _fitted
    from flaxlm.data.chat_records import DataReport

    conv = msgs + [{"role": "assistant", "content": answer}]
    if template.jinja or answer.strip():
        fitted = _fitted([conv], template, sys.maxsize, "truncate_left", "", DataReport(),
                         len(msgs), spans=True)  # fmt: skip
        return fitted[0]
    # A blank answer (a model that stopped at once) is never trained (records drop it) and
    # flaxlm's template refuses to render it; rendered as that template renders any answer:
    # its ids (none), `<|end|>`, EOS — the layout `render_chat` gives a non-blank one.
    from flaxlm.data.chat_template import render_chat

    prompt, _ = render_chat(msgs, template, add_generation_prompt=True)
    body = template.encode(answer) + [template.end_id]
    ids = np.asarray([*prompt, *body, template.eos_id], np.int32)
    mask = np.r_[np.zeros(len(prompt)), np.ones(len(body)), 0.0].astype(np.float32)
    keep = len(prompt) - len(template.headers["assistant"])  # as `_fitted` keeps a prompt
    return ids, mask, keep, len(template.prefix)


def render_answer(template, messages: Sequence[dict], answer: str,
                  max_len: int | None = None) -> RenderedAnswer:  # fmt: skip
    """`messages` (the prompt: validated, not ending with an assistant turn) + one assistant
    turn `answer`, through `template` (data/chat_template.py `training_template`).

    `max_len`: the longest row (ids[:-1]) wanted; the prompt is cut from the left after a
    leading BOS as training cuts it (`fit_length`). An answer that alone does not fit, which
    training drops, keeps the leading BOS and its own last ids (its end is where a reward is
    read). Raises data/chat_records.py FormatError (`reason`: bad_messages, unknown_role,
    template_boundary — the generation prompt's ids are not a prefix of the whole render's,
    a merge across the turn, so the answer's ids cannot be told apart —, stop_in_content),
    TemplateError, or models/hf_tokenizer.py HFError (the template failed)."""
    from flaxlm.data.chat_examples import fit_length
    from flaxlm.data.chat_records import FormatError, _messages, fields_config

    msgs = _messages(list(messages), fields_config(), "prompt")
    if msgs[-1]["role"] == "assistant":
        raise FormatError("bad_messages", "the prompt ends with an assistant turn")
    ids, mask, keep, head = _uncut(template, msgs, answer)
    cut = 0
    if max_len is not None and len(ids) - 1 > max_len:
        ids2, mask2, cut = fit_length(ids, mask, keep, max_len + 1, head)
        if cut < 0:  # the answer alone is too long: the BOS head and the row's last ids
            cut = len(ids) - 1 - max_len
            sel = np.r_[np.arange(head), np.arange(head + cut, len(ids))]
            ids2, mask2 = ids[sel], mask[sel]
        ids, mask = ids2, mask2
    trained = np.flatnonzero(mask)  # the answer's ids and its stop id: [start, stop]
    return RenderedAnswer(np.asarray(ids, np.int32), int(trained[0]), int(trained[-1]), cut)
