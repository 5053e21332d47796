"""Stepwise-supervision records for process reward models (alignment/prm.py): reading and
checking them, rendering them with the chat template with one label position per step, fitting
them to the row length, and their batches.

Records (jsonl, .json arrays, parquet, Arrow: data/chat_records.py `read_records`):

    {"prompt": "Add 3, 2 and 4.", "steps": ["3 + 2 = 5", "5 + 4 = 9"], "labels": [true, true]}

`prompt` is a text (one user turn) or messages (not ending with an assistant turn), `steps` a
non-empty list of non-blank texts, `labels` one per step, each true/false, 1/0, or a probability
in [0, 1] (a soft label: Math-Shepherd's "soft estimation", the fraction of rollouts from that
step that reach the right answer; 1.0 and 0.0 are the hard labels). Whether a soft label counts
as a right step is the trainer's threshold (alignment/prm.py, `prm.label_threshold`). TRL's
stepwise-supervision layout, `completions` for `steps`, is read alike (a record with both is
"ambiguous_record"). Field names: `data.fields.steps` / `data.fields.labels` (`step_fields`).
Bad input, each a report reason with file:line: "no_steps" (absent or []), "bad_steps" (not a
list of texts), "empty_step", "separator_in_step" (a step holding the separator would be split
in two when a completion is scored), "label_count" (len(labels) != len(steps)), "bad_label"
(not a list; an element that is not a bool, 0/1 or a number in [0, 1]: "good", 2, -0.1, NaN —
an integer other than 0/1 could be a rating on any scale, so it is not read as one), naming the
field and the index, "missing_field" (no `labels`, no prompt), and the prompt's own reasons
(data/chat_records.py).

Rendering (`render_steps`): the prompt turns, then one assistant turn whose content is every
step followed by the separator (`prm.step_separator`, "\\n" by default: "s0\\ns1\\ns2\\n", TRL's
layout). Step i's label sits on the last token of the separator that closes it. Why there and
not on the step's own last token: that token cannot tell a finished step from one still going
("3 + 4 = 1" and "3 + 4 = 12" share it); the separator has seen the whole step and that it
ended, it is the same token after every step (one place for the head to learn), and since
attention is causal a step's score never depends on the steps after it — a partial solution
scores its steps exactly as the whole one does (what guided search needs). The place does not
move with tokenization: with flaxlm's own template each step and its separator are encoded
together, on their own (`encode(step + separator)`), so the label is that chunk's last id
whatever the tokenizer merges; with a tokenizer's Jinja template the conversation is rendered
as text and tokenized once, and the label is the token holding the separator's last character,
which must end there ("step_boundary" otherwise: a token that also holds the next step's first
characters would score a step after seeing part of the next). A Jinja template that trims the
answer (Llama 3's `| trim`) drops the final separator: the last step is then read at the
turn's stop id. Training and scoring (evaluation/prm_scorer.py) both render through here.

Overlength (`fit_steps`, rows of seq_len tokens): "truncate_left" keeps the whole prompt and
as many leading steps as fit, the later steps' labels dropped (never a label on a step that was
cut: the kept labels are those of the full render, a prefix of it); when not even the first
step fits, the prompt is cut from the left after its BOS until it does (the other stages'
truncation), else the example is dropped ("too_long"). "drop" drops every example that does
not fit whole. Cut steps and cut prompts are counted in the report (`StepReport`:
`steps_cut`, `truncated`, with file:line examples).

Batches (`StepBatches`, one example per row, right-padded): `tokens`, `positions`,
`segment_ids` (B, T) — the rendered ids themselves, no shift: the value at a label's position
is read from the hidden state of that very token — `step_labels` (B, T) float32 (the labels, soft
ones as they are), `step_mask` (B, T) float32 (1 at each labelled position), `final_step` (B, T)
float32 (1 at the label position of the solution's final step, when truncation kept it: what an
outcome-only run, `prm.train_on="last"`, trains on — a kept last step of a cut solution is not
the outcome), `valid` (B,) (0: a padding row of a last partial batch).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from flaxlm.data import sources as S
from flaxlm.data.chat_batches import _Batches
from flaxlm.data.chat_examples import OVERLENGTH
from flaxlm.data.chat_records import (
    DataReport,
    FormatError,
    fields_config,
    has,
    prompt_messages,
    record_meta,
    record_tools,
)
from flaxlm.data.chat_template import ChatTemplate, PrefixUnstable, naming_record, render_chat

STEP_ALIASES = ("completions",)  # TRL's stepwise-supervision name of the steps field


def step_fields():
    """`fields_config()` plus the stepwise fields (the PRM config's `data.fields`)."""
    c = fields_config()
    c.steps = "steps"  # list of step texts (TRL's `completions` read alike)
    c.labels = "labels"  # one per step: true/false, 1/0 or a probability in [0, 1] (1 = right)
    return c


class StepReport(DataReport):
    """A DataReport that also counts steps: labelled (kept), positive (labelled at least the
    threshold `render_stepwise` was given), soft (labelled strictly between 0 and 1: a file
    meant to hold soft labels that holds none shows here), and cut by truncation."""

    def __init__(self, strict: bool = False):
        super().__init__(strict)
        self.steps = self.positive = self.soft = self.steps_cut = 0
        self.steps_cut_examples: list[str] = []

    def cut_steps(self, loc: str, cut: int, total: int) -> None:
        self.steps_cut += cut
        if len(self.steps_cut_examples) < S.MAX_EXAMPLES:
            self.steps_cut_examples.append(f"{loc}: the last {cut} of {total} steps cut "
                                           "(their labels dropped)")  # fmt: skip

    def to_dict(self) -> dict:
        return {**super().to_dict(), "steps": self.steps, "positive_steps": self.positive,
                "soft_steps": self.soft, "steps_cut": self.steps_cut,
                "steps_cut_examples": self.steps_cut_examples}  # fmt: skip


def check_separator(separator, key: str = "prm.step_separator") -> str:
    """`separator` when it is a non-empty string; a ValueError naming `key` otherwise."""
    if not isinstance(separator, str) or not separator:
        raise ValueError(f"{key}={separator!r} must be a non-empty string")
    return separator


def label_value(y) -> float | None:
    """A step label as a float in [0, 1]: a bool, the integers 0/1, or a finite number in [0, 1]
    (a soft label); None for anything else (NaN fails both comparisons)."""
    if isinstance(y, bool) or (type(y) is int and y in (0, 1)):
        return float(y)
    if isinstance(y, float) and 0.0 <= y <= 1.0:
        return float(y)
    return None


def step_parts(obj, fields, separator: str) -> tuple[list[dict], list[str], list[float]]:
    """(prompt turns, steps, labels in [0, 1]) of a stepwise record; FormatError (module
    docstring)."""
    if not isinstance(obj, dict):
        raise FormatError("bad_record", "record is not a JSON object")
    names = [k for k in (fields.steps, *STEP_ALIASES) if has(obj, k)]
    if len(names) > 1:
        raise FormatError("ambiguous_record", f"record has both {names[0]!r} and {names[1]!r}: "
                          "one list of steps, not two")  # fmt: skip
    if not names:
        raise FormatError("no_steps", f"no {fields.steps!r} field (nor TRL's "
                          f"{STEP_ALIASES[0]!r})")  # fmt: skip
    key, steps = names[0], obj[names[0]]
    if not isinstance(steps, list):
        raise FormatError("bad_steps", f"{key} is not a list of step texts")
    if not steps:
        raise FormatError("no_steps", f"{key} is empty")
    for i, s in enumerate(steps):
        if not isinstance(s, str):
            raise FormatError("bad_steps", f"{key}[{i}] is not a string")
        if not s.strip():
            raise FormatError("empty_step", f"{key}[{i}] is blank")
        if separator in s:
            raise FormatError("separator_in_step", f"{key}[{i}] holds the step separator "
                              f"{separator!r}: scored, it would be split in several")  # fmt: skip
    if not has(obj, fields.labels):
        raise FormatError("missing_field", f"no {fields.labels!r} field (one label per step)")
    labels = obj[fields.labels]
    if not isinstance(labels, list):
        raise FormatError("bad_label", f"{fields.labels} is not a list (one label per step)")
    if len(labels) != len(steps):
        raise FormatError("label_count", f"{len(labels)} {fields.labels} for {len(steps)} steps")
    values = [label_value(y) for y in labels]
    for i, (y, v) in enumerate(zip(labels, values)):
        if v is None:
            raise FormatError("bad_label", f"{fields.labels}[{i}]={y!r} is not true/false, 1/0 "
                              "or a probability in [0, 1]")  # fmt: skip
    prompt = prompt_messages(obj.get(fields.prompt), fields)
    if prompt[-1]["role"] == "assistant":
        raise FormatError("bad_messages", "the prompt ends with an assistant turn: the steps "
                          "are the assistant's answer to it")  # fmt: skip
    return prompt, list(steps), values


class Rendered(NamedTuple):
    """`ids`: the model's inputs (the generation prompt, the steps, the turn's stop id);
    `pos`: each step's label position in them; ids[:head] is never cut (BOS), and the prompt
    may be cut from the left up to `keep`."""

    ids: np.ndarray
    pos: np.ndarray
    keep: int
    head: int


def render_steps(prompt: Sequence[dict], steps: Sequence[str], template: ChatTemplate,
                 separator: str, tools=None) -> Rendered:  # fmt: skip
    """The rendered example of `prompt` (checked turns) and `steps` (module docstring)."""
    if not steps:
        raise FormatError("no_steps", "no steps")
    if template.jinja:
        return _render_jinja_steps(list(prompt), list(steps), template, separator, tools)
    gen, _ = render_chat(prompt, template, add_generation_prompt=True, tools=tools)
    ids, pos = [int(i) for i in gen], []
    for s in steps:
        ids += template.encode(s + separator)
        pos.append(len(ids) - 1)
    ids.append(template.end_id)
    keep = len(gen) - len(template.headers["assistant"])
    return Rendered(np.asarray(ids, np.int32), np.asarray(pos, np.int32), keep,
                    len(template.prefix))  # fmt: skip


def _render_jinja_steps(prompt, steps, t, separator, tools) -> Rendered:
    body = separator.join(steps)
    msgs = prompt + [{"role": "assistant", "content": body + separator}]
    gen_text, text = t.text(prompt, True, tools), t.text(msgs, False, tools)
    if not text.startswith(gen_text):
        raise PrefixUnstable(f"chat template {t.describe()}: the generation prompt is not a "
                             "prefix of the conversation")  # fmt: skip
    ids, offsets = t.tok.encode_offsets(text)
    k0 = len(want := t.tok.encode(gen_text))
    if ids[:k0] != want:
        raise FormatError("template_boundary", "the prompt tokenizes differently alone (a merge "
                          "across the turn)")  # fmt: skip
    c0 = text.find(body, len(gen_text))
    if c0 < 0:
        raise FormatError("step_boundary", f"the chat template {t.describe()} does not render "
                          "the steps as they are")  # fmt: skip
    starts = np.asarray([a for a, _ in offsets], np.int64)
    stops, pos, end = set(t.stops), [], c0 + len(body)
    stop = next((j for j in range(int(np.searchsorted(starts, end)), len(ids)) if ids[j] in stops),
                None)  # fmt: skip
    if stop is None:
        raise FormatError("step_boundary", f"no stop id {sorted(stops)} after the steps")
    e = c0
    for i, s in enumerate(steps):
        e += len(s) + len(separator)  # the separator after step i ends at char e
        if i == len(steps) - 1 and text[e - len(separator) : e] != separator:
            pos.append(stop)  # the template trimmed the final separator: read at the stop id
            break
        j = int(np.searchsorted(starts, e, side="left")) - 1  # the token holding char e − 1
        if j < k0 or offsets[j][1] != e:
            raise FormatError("step_boundary", f"the separator after step {i} shares a token "
                              "with the text after it")  # fmt: skip
        pos.append(j)
    ids = np.asarray(ids[: stop + 1], np.int32)
    return Rendered(ids, np.asarray(pos, np.int32), k0, t.head(ids))


def fit_steps(r: Rendered, seq_len: int, overlength: str):
    """(ids, label positions, steps cut, prompt ids cut) of `r` fitted to `seq_len` tokens
    (module docstring, "Overlength"); FormatError "too_long" when it cannot be."""
    ids, pos = r.ids, r.pos
    if len(ids) <= seq_len:
        return ids, pos, 0, 0
    if overlength == "drop":
        raise FormatError("too_long", f"{len(ids)} tokens > seq_len {seq_len}")
    k = int(np.sum(pos < seq_len))  # steps whose label position fits the row
    if k:
        return ids[: pos[k - 1] + 1], pos[:k], len(pos) - k, 0
    over = int(pos[0]) + 1 - seq_len
    if over > r.keep - r.head:
        raise FormatError("too_long", f"the first step alone exceeds seq_len {seq_len}")
    sel = np.r_[np.arange(r.head), np.arange(r.head + over, pos[0] + 1)]
    return ids[sel], pos[:1] - over, len(pos) - 1, over


def render_stepwise(records: Iterable[tuple[dict, str]], template: ChatTemplate, seq_len: int,
                    *, separator: str = "\n", fields=None, overlength: str = "truncate_left",
                    report: StepReport | None = None,
                    threshold: float = 0.5) -> list[dict]:  # fmt: skip
    """Rendered examples {"ids", "pos", "labels" (float32), "final" (the last label is the
    solution's final step: no step cut), "meta", "loc"}, each fitting a row of `seq_len` tokens;
    bad records are counted in `report` (module docstring), a step as positive when its label
    is at least `threshold` (the trainer's `prm.label_threshold`)."""
    if overlength not in OVERLENGTH:
        raise ValueError(f"data.overlength={overlength!r}; expected one of {OVERLENGTH}")
    check_separator(separator)
    fields = fields or step_fields()
    report = report if report is not None else StepReport()
    if template.jinja:
        report.chat_template = template.name
    out = []
    for obj, loc in records:
        try:
            prompt, steps, labels = step_parts(obj, fields, separator)
            tools, meta = record_tools(obj, fields), record_meta(obj, fields)
            with naming_record(loc):
                r = render_steps(prompt, steps, template, separator, tools)
            ids, pos, cut, prompt_cut = fit_steps(r, seq_len, overlength)
        except FormatError as e:
            report.bad(e.reason, loc, str(e))
            continue
        if prompt_cut:
            report.truncation(loc, prompt_cut)
        elif cut:
            report.truncated += 1
        if cut:
            report.cut_steps(loc, cut, len(steps))
        kept = np.asarray(labels[: len(pos)], np.float32)
        report.used += 1
        report.tokens += len(ids)
        report.loss_tokens += len(pos)
        report.steps += len(pos)
        report.positive += int(np.sum(kept >= np.float32(threshold)))
        report.soft += int(np.sum((kept > 0) & (kept < 1)))
        out.append({"ids": ids, "pos": pos, "labels": kept, "final": not cut, "meta": meta,
                    "loc": loc})  # fmt: skip
    return out


class StepBatches(_Batches):
    """One stepwise example per row (module docstring, "Batches")."""

    ONE_PER_ROW = True

    def blank(self, rows: int | None = None) -> dict[str, np.ndarray]:
        """A batch with no example (`valid` 0 everywhere)."""
        b, t = rows or self.batch, self.seq_len
        out = {
            "tokens": np.full((b, t), self.pad_id, np.int32),
            "positions": np.zeros((b, t), np.int32),
            "segment_ids": np.zeros((b, t), np.int32),
            "step_labels": np.zeros((b, t), np.float32),
            "step_mask": np.zeros((b, t), np.float32),
            "final_step": np.zeros((b, t), np.float32),
            "valid": np.zeros(b, np.float32),
        }
        return {**out, "index": np.full(b, -1, np.int32)} if self.with_index else out

    def _build(self, rows: int) -> dict[str, np.ndarray]:
        out = self.blank(rows)
        index = np.full(rows, -1, np.int32)
        r = 0
        while r < rows and (i := self.order.peek()) is not None:
            ex = self.items[i]
            n = len(ex["ids"])
            if n > self.seq_len:
                raise ValueError(f"{ex.get('loc', i)}: {n} tokens > seq_len {self.seq_len}")
            out["tokens"][r, :n], out["segment_ids"][r, :n] = ex["ids"], 1
            out["positions"][r, :n] = np.arange(n)
            out["step_labels"][r, ex["pos"]] = ex["labels"]
            out["step_mask"][r, ex["pos"]] = 1.0
            out["final_step"][r, ex["pos"][-1]] = float(ex["final"])
            out["valid"][r], index[r] = 1.0, i
            self.order.advance()
            r += 1
        if r == 0:
            raise StopIteration
        return {**out, "index": index} if self.with_index else out
