"""From records to training examples: SFT conversations, preference pairs and unpaired
examples rendered (data/chat_template.py) and fitted to the row length by the overlength
policy, every drop and truncation counted in the `DataReport`; and generation prompts cut to a
length (`render_prompt`).

Separate from the template (which only renders one conversation) and from batching
(data/chat_batches.py, which places fitted examples into rows): this module is where a record
becomes zero, one or several examples. `data/formats.py` re-exports every name.

Overlength (a conversation of n ids needs n − 1 <= seq_len): policy "truncate_left" keeps BOS
and the final assistant turn whole and drops tokens from the left of what precedes it (oldest
context first; an earlier answer cut in part keeps its remaining tokens trained); if the final
turn alone does not fit, or with policy "drop", the example is dropped. A preference pair is
cut only inside the prompt both sides share (same ids on both), else dropped. Truncations
and drops are counted in the `DataReport` with file:line examples; a drop is bad input
(raises in strict mode), a truncation is the stated policy.

Unpaired feedback (KTO, `render_unpaired`): a chat record with a boolean `label` (true =
desirable, false = undesirable; anything else is bad input "bad_label"): its `completion` judged
after its `prompt`, or for a `messages` record its trailing assistant turns after what precedes
them (data/chat_records.py `unpaired_parts`); or a preference record without a
label, split into its chosen answer (desirable) and its rejected one (undesirable), rendered
and truncated as the pair is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from flaxlm.data.chat_records import (
    DataReport,
    FormatError,
    fields_config,
    preference_parts,
    record_meta,
    record_tools,
    sft_messages,
    unpaired_parts,
)
from flaxlm.data.chat_template import (
    ChatTemplate,
    PrefixUnstable,
    _render_jinja,
    naming_record,
    render_chat,
)

OVERLENGTH = ("truncate_left", "drop")


def fit_length(ids, mask, keep_from: int, budget: int, head: int = 1):
    """Cuts tokens from the left of ids[head:keep_from] (the BOS head and ids[keep_from:] stay)
    until len(ids) <= budget. Returns (ids, mask, n_cut); n_cut = -1 when it cannot fit."""
    over = len(ids) - budget
    if over <= 0:
        return ids, mask, 0
    if over > keep_from - head:
        return ids, mask, -1
    keep = np.r_[np.arange(head), np.arange(head + over, len(ids))]
    return ids[keep], mask[keep], over


def _final_len(t: ChatTemplate, msgs: list[dict]) -> int:
    """Ids of the trailing assistant turns of `msgs` (header + content + end each) + EOS."""
    n, i = 1, len(msgs) - 1
    while i >= 0 and msgs[i]["role"] == "assistant":
        n += len(t.headers["assistant"]) + len(t.encode(msgs[i]["content"])) + 1
        i -= 1
    return n


def _fitted(convs, template, seq_len, overlength, loc, report, n_prompt=None, train_from=0,
            tools=None, spans=False):  # fmt: skip
    """Renders conversations and cuts each by the same number of tokens so all fit a row (the
    overlength policy); None (counted) when one cannot. One SFT conversation: anything before
    its final assistant turn(s) may be cut. Preference sides (`n_prompt` = the number of
    leading prompt messages they share): only the shared prompt is cut, so both keep the
    exact same prompt ids and their whole responses, and only the responses are trained (an
    assistant turn inside the prompt is context: the same on both sides, it would cancel in
    DPO's sums but count in SimPO's and ORPO's per-token means and the SFT term). `spans`
    (with `n_prompt`): (ids, mask, split, head) each, ids[:split] the prompt after the cut and
    ids[:head] the leading ids a cut never takes (BOS)."""
    if template.jinja:
        train_from = n_prompt if n_prompt is not None else train_from
        rendered = [_render_jinja(c, template, n_prompt, train_from, tools) for c in convs]
        sides = [(ids, mask) for ids, mask, _, _ in rendered]
        if n_prompt is not None and any(r[0][: r[2]].tolist() != rendered[0][0][: rendered[0][2]]
                                        .tolist() for r in rendered[1:]):  # fmt: skip
            raise FormatError("template_boundary", "the two sides render different prompt ids")
    else:
        sides = [render_chat(c, template, tools=tools) for c in convs]
    longest = max(len(ids) for ids, _ in sides) - 1
    if overlength == "drop" and longest > seq_len:
        report.bad("too_long", loc, f"{longest} tokens > seq_len {seq_len}")
        return None
    over = max(longest - seq_len, 0)
    head = len(template.prefix)
    if template.jinja:
        head, keep = rendered[0][3], [k for *_, k, _ in rendered]
    elif n_prompt is None:
        keep = [len(ids) - _final_len(template, c) for (ids, _), c in zip(sides, convs)]
    else:
        prompt = convs[0][:n_prompt]
        n = head + sum(len(template.headers[m["role"]]) + len(template.encode(m["content"])) + 1
                       for m in prompt)  # fmt: skip
        keep = [n] * len(convs)
    if n_prompt is not None:  # the prompt's own assistant turns are not targets
        sides = [(ids, np.where(np.arange(len(mask)) < k, 0.0, mask).astype(np.float32))
                 for (ids, mask), k in zip(sides, keep)]  # fmt: skip
    fitted = [
        fit_length(ids, mask, k, len(ids) - over, head) for (ids, mask), k in zip(sides, keep)
    ]
    if any(cut < 0 for *_, cut in fitted):
        what = "final answer" if n_prompt is None else "a response"
        report.bad("too_long", loc, f"{what} alone exceeds seq_len {seq_len}")
        return None
    if over:
        report.truncation(loc, over)
    for ids, mask, _ in fitted:
        report.tokens += len(ids) - 1
        report.loss_tokens += int(mask[1:].sum())
    if spans:
        return [(ids, mask, k - cut, head) for (ids, mask, cut), k in zip(fitted, keep)]
    return [(ids, mask) for ids, mask, _ in fitted]


def _check_args(overlength, fields, report):
    if overlength not in OVERLENGTH:
        raise ValueError(f"overlength={overlength!r}; expected one of {OVERLENGTH}")
    return fields or fields_config(), report if report is not None else DataReport()


def render_sft(
    records: Iterable[tuple[dict, str]],
    template: ChatTemplate,
    seq_len: int,
    *,
    fields=None,
    overlength: str = "truncate_left",
    report: DataReport | None = None,
    compact: bool = False,
) -> list[dict]:
    """Rendered SFT examples {"ids", "mask", "meta", "loc", "messages", "tools"}, each fitting
    a row; `compact`: {"ids" int32, "mask" bool, "loc"} only.

    `compact` is for a consumer that only packs the examples into rows (SFT's training and
    held-out batches: data/chat_batches.py `SFTBatches` reads ids, mask and, for a resume's
    source check, loc). The record's messages, meta and tools, kept otherwise for whoever
    renders a prompt from them again (distill's GKD mix), were most of what an example held:
    4.9 KB for a 180-token chat, 1.4 KB without them and with a bool mask
    (tests/data/test_sft_example_memory.py). The mask is 0/1, so as bool it places the same
    float32 loss mask in a row; the examples and their order are the same either way.

    A conversation must end with an assistant turn ("no_assistant_turn" otherwise): a trailing
    user turn is never a target, and truncation keeps only the final assistant turn(s) whole,
    so it could cut every trained token away and train on nothing. Every kept example has at
    least one target (its final answer's `<|end|>`).

    A Jinja template that rewrites history (Qwen3 and DeepSeek-R1 drop an earlier answer's
    reasoning once a later user turn follows, so the whole conversation's text does not
    continue messages[:i+1]'s) trains a multi-turn conversation one assistant turn per
    example: messages[:i+1] with turn i last, trained on turn i only — each answer in the
    context the model has when it generates it. Counted in the report (`split_by_turn`)."""
    fields, report = _check_args(overlength, fields, report)
    if template.jinja:
        report.chat_template = template.name
    out = []
    for obj, loc in records:
        try:
            msgs = sft_messages(obj, fields)
            if msgs[-1]["role"] != "assistant":
                raise FormatError("no_assistant_turn", "conversation ends with a " +
                                  f"{msgs[-1]['role']} turn, not an assistant turn")  # fmt: skip
            tools = record_tools(obj, fields)
            meta = record_meta(obj, fields)
            with naming_record(loc):
                pieces = _sft_pieces(msgs, template, seq_len, overlength, loc, report, tools)
        except FormatError as e:
            report.bad(e.reason, loc, str(e))
            continue
        report.used += bool(pieces)
        for (ids, mask), conv in pieces:
            if compact:
                out.append({"ids": ids.astype(np.int32, copy=False), "mask": mask.astype(bool),
                            "loc": loc})  # fmt: skip
            else:
                out.append({"ids": ids, "mask": mask, "meta": meta, "loc": loc,
                            "messages": conv, "tools": tools})  # fmt: skip
    return out


def _assistant_runs(msgs: list[dict]) -> list[tuple[int, int]]:
    """(first, last) index of each run of consecutive assistant turns."""
    runs = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def _sft_pieces(msgs, template, seq_len, overlength, loc, report, tools=None):
    """[((ids, mask), messages)] of one SFT conversation: itself, or with a history-rewriting
    Jinja template one piece per assistant run (`render_sft`); pieces that cannot fit are
    counted drops."""
    try:
        fitted = _fitted([msgs], template, seq_len, overlength, loc, report, tools=tools)
        return [(fitted[0], msgs)] if fitted else []
    except PrefixUnstable:
        runs = _assistant_runs(msgs)
        if len(runs) < 2:  # the final answer itself cannot be located: no mask at all
            raise
    pieces = []
    for first, last in runs:
        conv = msgs[: last + 1]
        fitted = _fitted([conv], template, seq_len, overlength, loc, report, train_from=first,
                         tools=tools)  # fmt: skip
        if fitted:
            pieces.append((fitted[0], conv))
    report.split(loc, len(runs))
    return pieces


def prompt_turns(messages: Sequence[dict]) -> list[dict]:
    """The turns a generation prompt renders: the conversation without its trailing assistant
    turns (an SFT chat reused as an RL prompt ends in its reference answer)."""
    msgs = list(messages)
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    return msgs


def render_prompt(
    messages: Sequence[dict], template: ChatTemplate, max_len: int, tools=None
) -> tuple[np.ndarray, int]:
    """Generation-prompt ids of a conversation (its last assistant turn, if any, removed),
    truncated from the left (BOS kept) to at most `max_len`. Returns (ids, n_cut). `tools`:
    tool schemas for a Jinja template."""
    msgs = prompt_turns(messages)
    if template.jinja:  # the header after the last message is kept; a leading BOS too
        text = template.text(msgs, True, tools)
        ids, offsets = template.tok.encode_offsets(text)
        ids, mask = np.asarray(ids, np.int32), np.zeros(len(ids), np.float32)
        turns = template.text(msgs, False, tools)
        end = len(turns) if text.startswith(turns) else len(text)
        keep_from = sum(a < end for a, _ in offsets)
        head = template.head(ids)
    else:
        ids, mask = render_chat(msgs, template, add_generation_prompt=True, tools=tools)
        keep_from = len(ids) - len(template.headers["assistant"])
        head = len(template.prefix)
    ids, _, cut = fit_length(ids, mask, keep_from, max_len, head)
    if cut < 0:
        raise FormatError("too_long", f"prompt header alone exceeds {max_len} tokens")
    return ids, cut


def render_preferences(
    records: Iterable[tuple[dict, str]],
    template: ChatTemplate,
    seq_len: int,
    *,
    fields=None,
    overlength: str = "truncate_left",
    report: DataReport | None = None,
) -> list[dict]:
    """Rendered pairs {"chosen": (ids, mask), "rejected": (ids, mask), "margin", "meta", "loc",
    "prompt"}; both sides share the prompt, cut by the same number of tokens when too long."""
    fields, report = _check_args(overlength, fields, report)
    if template.jinja:
        report.chat_template = template.name
    out = []
    for obj, loc in records:
        try:
            prompt, chosen, rejected, margin = preference_parts(obj, fields)
            convs = [prompt + chosen, prompt + rejected]
            tools = record_tools(obj, fields)
            meta = record_meta(obj, fields)
            with naming_record(loc):
                fitted = _fitted(convs, template, seq_len, overlength, loc, report, len(prompt),
                                 tools=tools)  # fmt: skip
        except FormatError as e:
            report.bad(e.reason, loc, str(e))
            continue
        report.used += bool(fitted)
        if fitted:
            out.append({
                "chosen": fitted[0], "rejected": fitted[1], "margin": margin,
                "meta": meta, "loc": loc, "prompt": prompt,
            })  # fmt: skip
    return out


def render_unpaired(
    records: Iterable[tuple[dict, str]],
    template: ChatTemplate,
    seq_len: int,
    *,
    fields=None,
    overlength: str = "truncate_left",
    report: DataReport | None = None,
) -> list[dict]:
    """Rendered unpaired examples {"ids", "mask", "split", "head", "label", "meta", "loc",
    "prompt"}: ids[:split] is the prompt, ids[split:] the completion (the only targets: an
    assistant turn inside the prompt is context), ids[:head] what truncation never cuts (BOS).
    The two halves of a split preference record are rendered and cut together, as the pair."""
    fields, report = _check_args(overlength, fields, report)
    if template.jinja:
        report.chat_template = template.name
    out = []
    for obj, loc in records:
        try:
            parts = unpaired_parts(obj, fields)
            convs = [prompt + completion for prompt, completion, _ in parts]
            tools = record_tools(obj, fields)
            meta = record_meta(obj, fields)
            with naming_record(loc):
                fitted = _fitted(convs, template, seq_len, overlength, loc, report,
                                 len(parts[0][0]), tools=tools, spans=True)  # fmt: skip
        except FormatError as e:
            report.bad(e.reason, loc, str(e))
            continue
        report.used += bool(fitted)
        for (ids, mask, split, head), (prompt, _, label) in zip(fitted or [], parts):
            out.append({
                "ids": ids, "mask": mask, "split": split, "head": head, "label": label,
                "meta": meta, "loc": loc, "prompt": prompt,
            })  # fmt: skip
    return out
