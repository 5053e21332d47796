"""Chat, prompt-completion, preference and unpaired-feedback records: field names, the checks
that turn a record into validated messages, the data report and the jsonl/parquet/Arrow reader.

Separate from rendering (data/chat_template.py) because none of it needs a tokenizer: RL prompt
sets and held-out sets (alignment/rl_common.py) check records with these functions without
rendering examples, and every stage counts what happened to its records in a `DataReport`.
`data/formats.py` re-exports every name.

Records come from jsonl, a .json array, parquet or Arrow IPC files (.arrow/.feather, what HF
`datasets` writes) (`read_records`), with configurable field names
(`fields_config`): `messages` (a list of {role, content}), or `prompt` plus `completion` (each
text or messages, TRL's conversational layout: a completion's turns are the assistant's, with
the tool results between them); preferences: `prompt` + `chosen` + `rejected` (+ optional
`margin`; conversations in chosen/rejected may repeat the prompt's turns, which are stripped —
a system turn before them joins the prompt — "prompt_mismatch" when they open with other
user/system turns; a blank prompt next to two conversations is an absent one). A null field is
an absent one (`has`): parquet and Arrow store a mixed file's rows with every column, null where
a row has none. `meta`, when present, must be a JSON object ("bad_meta" otherwise).

SFT records must end with an assistant turn; a blank system/user turn (like a blank `prompt`)
is bad input ("empty"), as are missing/unknown roles and non-string content (file:line).

Messages are checked into [{"role", "content"}] turns (`ROLES`, plus `TOOL_ROLE` for a tool's
result), keeping the tool-use keys `MESSAGE_EXTRAS` a Jinja chat template reads; a record's
`tools` (tool schemas) are checked by `record_tools`. A preference record is split into (prompt,
chosen, rejected, margin) (`preference_parts`), an unpaired one into (prompt, completion, label)
examples (`unpaired_parts`). A record that does not fit is a `FormatError` whose `reason` is the
report's counter name.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import ml_collections

from flaxlm.data import sources as S
from flaxlm.data.source_codecs import numbered_lines
from flaxlm.data.source_readers import (
    arrow_batches,
    field_index,
    holds_json_array,
    open_arrow,
    open_parquet,
    parquet_batches,
    read_json_array,
)

ROLES = ("system", "user", "assistant")  # flaxlm's own template's roles
TOOL_ROLE = "tool"  # a tool's result: context, rendered only by a Jinja chat template
# message keys passed to a Jinja template besides role and content (tool use, reasoning)
MESSAGE_EXTRAS = ("tool_calls", "tool_call_id", "name", "reasoning_content")
# other spellings of `reasoning_content` (gpt-oss's own records say `thinking`): read as it, so
# the reasoning reaches the template (transformers aliases them too) instead of vanishing
REASONING_ALIASES = ("reasoning", "thinking")


def fields_config() -> ml_collections.ConfigDict:
    """Field names of chat/preference records (the `data.fields` config section)."""
    c = ml_collections.ConfigDict()
    c.messages = "messages"  # list of {role, content} (a whole conversation)
    c.prompt = "prompt"  # text (one user turn) or a list of messages
    c.completion = "completion"  # answer to `prompt`: text or assistant turns (no `messages`)
    c.chosen = "chosen"  # preferred answer (text or a list of assistant-ending messages)
    c.rejected = "rejected"  # dispreferred answer
    c.margin = "margin"  # optional per-pair margin (number); absent = 0
    c.label = "label"  # unpaired feedback (KTO): true = desirable answer, false = undesirable
    c.meta = "meta"  # optional dict carried along for evaluation (the world's judge)
    c.role = "role"  # key of a message's role
    c.content = "content"  # key of a message's content
    c.tools = "tools"  # optional list of tool (function) schemas, for a Jinja chat template
    return c


class FormatError(S.DataError):
    """A record that does not fit the chat format; `reason` is the report's counter name."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _messages(value, fields, what: str, record: bool = False) -> list[dict]:
    """Validates a list of messages into [{"role", "content"}] (roles/contents checked).

    `record=True` (training/eval records, not prompts built by code): a blank system or user
    turn is bad input ("empty"), as a blank `prompt` text is — it only teaches the template."""
    if not isinstance(value, list) or not value:
        raise FormatError("bad_messages", f"{what} is not a non-empty list of messages")
    out = []
    # read once: a ConfigDict attribute costs ~2 us, four per message of every record
    role_key, content_key = fields.role, fields.content
    for i, m in enumerate(value):
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            raise FormatError("bad_messages", f"{what}[{i}] lacks {role_key!r}/{content_key!r}")
        role, content = m[role_key], m[content_key]
        calls = m.get("tool_calls")
        if role not in (*ROLES, TOOL_ROLE):
            raise FormatError("unknown_role", f"{what}[{i}] has unknown role {role!r}")
        if calls is not None and (role != "assistant" or not isinstance(calls, list) or not calls
                                  or not all(isinstance(c, dict) for c in calls)):  # fmt: skip
            raise FormatError("bad_messages", f"{what}[{i}] tool_calls must be a non-empty list "
                              "of objects on an assistant turn")  # fmt: skip
        given = content  # None stays None for the template (transformers drops the key)
        if content is None and calls:  # an assistant turn that only calls tools
            content = ""
        if not isinstance(content, str):
            raise FormatError("bad_messages", f"{what}[{i}] content is not a string")
        said = {k: m[k] for k in ("reasoning_content", *REASONING_ALIASES) if m.get(k) is not None}
        if len(set(map(str, said.values()))) > 1:
            raise FormatError("bad_messages", f"{what}[{i}] gives two different reasonings "
                              f"({', '.join(said)}); keep one")  # fmt: skip
        if said:
            m = {**m, "reasoning_content": next(iter(said.values()))}
        for key in ("reasoning_content", "name", "tool_call_id"):  # text, when given at all
            if m.get(key) is not None and not isinstance(m[key], str):
                raise FormatError("bad_messages", f"{what}[{i}] {key} is not a string")
        if role == "system" and i > 0:
            raise FormatError("bad_messages", f"{what}[{i}]: a system message must come first")
        if role == "assistant" and not content.strip() and not calls:
            raise FormatError("empty_assistant", f"{what}[{i}] is an empty assistant turn")
        if record and not content.strip() and not calls:
            raise FormatError("empty", f"{what}[{i}] is an empty {role} turn")
        msg = {"role": role, "content": given}
        msg.update({k: m[k] for k in MESSAGE_EXTRAS if m.get(k) is not None})
        out.append(msg)
    return out


def record_tools(obj, fields):
    """A record's tool schemas (`fields.tools`): None, or a list of objects."""
    tools = obj.get(fields.tools) if isinstance(obj, dict) else None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict)
                                                                  for t in tools)):  # fmt: skip
        raise FormatError("bad_tools", f"{fields.tools} is not a list of objects")
    return tools or None


def has(obj: dict, key: str) -> bool:
    """Whether a record has field `key`: a null value is no value. A parquet file gives every
    row every column, null where the row has none (prompt/completion rows next to messages
    rows, a margin on some pairs only), as a jsonl writer may also write `"margin": null`."""
    return obj.get(key) is not None


def _get(obj: dict, key: str, what: str):
    if not has(obj, key):
        raise FormatError("missing_field", f"no {what} field {key!r}")
    return obj[key]


def record_meta(obj: dict, fields) -> dict:
    """A record's `meta` object ({} when absent or null). Anything else is bad input
    ("bad_meta"): read as {} it would be scored as a record without its reference answer."""
    meta = obj.get(fields.meta)
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise FormatError("bad_meta", f"{fields.meta}={meta!r:.80} is not a JSON object")
    return meta


def prompt_messages(value, fields) -> list[dict]:
    """A record's prompt — a text (one user turn) or messages under `fields.role` /
    `fields.content` — as checked [{"role", "content"}] turns; FormatError otherwise."""
    if value is None:
        raise FormatError("missing_field", f"no prompt field {fields.prompt!r}")
    if isinstance(value, str):
        if not value.strip():
            raise FormatError("empty", "empty prompt")
        return [{"role": "user", "content": value}]
    return _messages(value, fields, "prompt", record=True)


def prompt_record(obj, fields) -> tuple[str, list[dict], list | None, dict]:
    """An RL prompt record read as the RL stages and `generate --prompts_file` read one:
    (the field the prompt came from, its turns, the tool schemas or None, the meta object).
    The prompt is `fields.prompt` (a text or messages) where the record has one, `fields.messages`
    otherwise (a parquet file that mixes both gives each row both columns, one null)."""
    if not isinstance(obj, dict):
        raise FormatError("bad_record", "record is not a JSON object")
    key = fields.prompt if has(obj, fields.prompt) else fields.messages
    turns = prompt_messages(obj.get(key), fields)
    return key, turns, record_tools(obj, fields), record_meta(obj, fields)


def _completion_turns(value, fields) -> list[dict]:
    """A record's `completion` — a text (one assistant turn) or, TRL's conversational layout,
    messages — as checked turns; FormatError otherwise. A list holds what the model says:
    assistant turns (tool calls among them) and the tool results between them, opening and
    ending with an assistant turn (a tool result before the first call is the prompt's)."""
    key = fields.completion
    if _blank(value):
        raise FormatError("empty_assistant", f"{key} is empty")
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if not isinstance(value, list):  # (a dict, a number: not one of the layouts)
        raise FormatError("bad_completion", f"{key} is neither text nor a list of messages")
    turns = _messages(value, fields, key, record=True)
    for i, m in enumerate(turns):
        if m["role"] not in ("assistant", TOOL_ROLE):  # a later question is another record's
            raise FormatError("bad_completion", f"{key}[{i}] is a {m['role']} turn: a "
                              "completion holds assistant turns and tool results")  # fmt: skip
    if turns[0]["role"] != "assistant":
        raise FormatError("bad_completion", f"{key} opens with a tool result, not the "
                          "assistant turn that calls the tool")  # fmt: skip
    if turns[-1]["role"] != "assistant":
        raise FormatError("no_assistant_turn", f"{key} ends with a tool result, not an "
                          "assistant turn")  # fmt: skip
    return turns


def _prompt_completion(obj: dict, fields) -> tuple[list[dict], list[dict]]:
    """(prompt messages, completion turns) of a prompt-completion record."""
    prompt = prompt_messages(_get(obj, fields.prompt, "prompt"), fields)
    return prompt, _completion_turns(_get(obj, fields.completion, "completion"), fields)


def sft_messages(obj, fields) -> list[dict]:
    """The conversation of a chat record: `messages`, or `prompt` + `completion` (the same
    turns, so the same ids and mask, whether each is text or messages). `render_sft` also
    requires it to end with an assistant turn; RL eval sets (alignment/rl_common.py) accept a
    trailing user turn. A record with both `messages` and a `completion` names two answers:
    "ambiguous_record" (the completion was dropped without a word). `messages` beside a bare
    `prompt` is the conversation (UltraChat's rows repeat their first user turn as `prompt`)."""
    if not isinstance(obj, dict):
        raise FormatError("bad_record", "record is not a JSON object")
    if has(obj, fields.messages) and has(obj, fields.completion):
        raise FormatError("ambiguous_record", f"record has both {fields.messages!r} and "
                          f"{fields.completion!r}: one conversation to train on, not two (drop "
                          "one field, or point data.fields at the one meant)")  # fmt: skip
    if has(obj, fields.messages):
        return _messages(obj[fields.messages], fields, fields.messages, record=True)
    prompt, completion = _prompt_completion(obj, fields)
    return prompt + completion


def _without_prompt(side: list[dict], prompt: list[dict], key: str):
    """(system turns, answer turns) of `side` less a leading copy of the record's `prompt` turns
    (compared by role and content, as checked by `_messages`, less surrounding whitespace).
    Conversational datasets (HuggingFaceH4/ultrafeedback_binarized) give `prompt` and full
    `chosen`/`rejected` conversations that repeat it: kept, every pair would render the user
    turn twice. A system turn before the repeated turns (`prompt` a text, the conversation
    [system, user, assistant]) is returned as the first part, to join the prompt. A side that
    opens with a system or user turn that is not the prompt's is a different conversation
    ("prompt_mismatch"); one that opens with an assistant (or a tool result) turn is the answer,
    as before."""
    # Content compared without surrounding whitespace: exports often keep the prompt's trailing
    # newline that the conversation's turn does not (or the other way round).
    # (A tool-call turn's content may be None.)
    strip = lambda c: c.strip() if isinstance(c, str) else c  # noqa: E731
    turns = lambda ms: [(m["role"], strip(m["content"])) for m in ms]  # noqa: E731
    want = turns(prompt)
    # (`_messages` allows a system turn only first: at most one can precede the prompt's turns)
    for k in (0, 1) if side[0]["role"] == "system" and prompt[0]["role"] != "system" else (0,):
        if turns(side[k : k + len(prompt)]) == want:
            return side[:k], side[k + len(prompt) :]
    if side[0]["role"] in ("system", "user"):
        raise FormatError("prompt_mismatch", f"{key} starts with a {side[0]['role']} turn but "
                          "not with the record's prompt turns")  # fmt: skip
    return [], side


def _blank(value) -> bool:
    """A prompt that is there but says nothing: "", whitespace or []."""
    return value == [] or (isinstance(value, str) and not value.strip())


def preference_parts(obj, fields) -> tuple[list[dict], list[dict], list[dict], float]:
    """(prompt messages, chosen turns, rejected turns, margin) of a preference record.

    `chosen`/`rejected` are answer texts, or message lists: then the prompt may be absent (the
    longest common prefix of the two lists is the prompt; a blank `prompt`, "" or [], next to
    two lists is absent too, as a dataset export writes it), or given and repeated at the start
    of either list (HF conversational layout: stripped, `_without_prompt`; a system turn before
    it joins the prompt, and must then be the same on both sides). A blank prompt next to an
    answer text is bad input ("empty"): that answer has no question."""
    if not isinstance(obj, dict):
        raise FormatError("bad_record", "record is not a JSON object")
    sides, texts = [], 0
    for key in (fields.chosen, fields.rejected):
        v = _get(obj, key, key)
        if isinstance(v, str):
            if not v.strip():
                raise FormatError("empty_assistant", f"{key} is empty")
            v, texts = [{"role": "assistant", "content": v}], texts + 1
        sides.append(_messages(v, fields, key, record=True))
    given = obj.get(fields.prompt)  # (null: absent, `has`)
    if _blank(given):
        if texts:  # a presence check: a blank prompt is bad input, not an absent one
            raise FormatError("empty", "empty prompt")
        given = None  # two conversations: their common prefix is the prompt
    prompt = prompt_messages(given, fields) if given is not None else []
    if prompt:
        keys = (fields.chosen, fields.rejected)
        (sys0, sides[0]), (sys1, sides[1]) = (_without_prompt(s, prompt, k)
                                              for k, s in zip(keys, sides))  # fmt: skip
        if sys0 != sys1:  # one conversation's system turn is not the other's
            key, other = keys if sys0 and not sys1 else keys[::-1]
            raise FormatError("prompt_mismatch", f"{key} has a system turn before the prompt "
                              f"that {other} does not share")  # fmt: skip
        prompt = sys0 + prompt
    else:  # full conversations: split off their common prefix
        n = 0
        while n < min(map(len, sides)) - 1 and sides[0][n] == sides[1][n]:
            n += 1
        prompt, sides = sides[0][:n], [s[n:] for s in sides]
    for key, s in zip((fields.chosen, fields.rejected), sides):
        if not s or s[-1]["role"] != "assistant":
            raise FormatError("no_assistant_turn", f"{key} does not end with an assistant turn")
    if not prompt:
        raise FormatError("missing_field", f"no prompt field {fields.prompt!r}")
    if sides[0] == sides[1]:  # no preference to learn: the pair only dilutes the loss
        raise FormatError("identical_pair", f"{fields.chosen} and {fields.rejected} are the same")
    margin = obj.get(fields.margin)
    if margin is None:  # absent, or null in a file where other pairs carry one
        margin = 0.0
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise FormatError("bad_margin", f"{fields.margin}={margin!r} is not a number")
    if not math.isfinite(margin):  # json.loads reads NaN / Infinity
        raise FormatError("bad_margin", f"{fields.margin}={margin!r} is not finite")
    return prompt, sides[0], sides[1], float(margin)


def unpaired_parts(obj, fields) -> list[tuple[list[dict], list[dict], bool]]:
    """[(prompt messages, completion turns, desirable)] of an unpaired-feedback record (KTO): a
    chat record with a boolean `label` — one example: `prompt` and `completion` (each text or
    messages, `_completion_turns`), or `messages`, its trailing assistant turns the completion —
    or a preference record without one: two examples, chosen (desirable) and rejected
    (undesirable), sharing the prompt."""
    if not isinstance(obj, dict):
        raise FormatError("bad_record", "record is not a JSON object")
    if not has(obj, fields.label):
        if has(obj, fields.chosen) or has(obj, fields.rejected):
            prompt, chosen, rejected, _ = preference_parts(obj, fields)
            return [(prompt, chosen, True), (prompt, rejected, False)]
        raise FormatError("missing_field", f"no {fields.label!r} field (nor "
                          f"{fields.chosen!r} / {fields.rejected!r} to split)")  # fmt: skip
    label = obj[fields.label]
    if not isinstance(label, bool):  # 0/1 or "good" could be either convention: say which
        raise FormatError("bad_label", f"{fields.label}={label!r} is not true or false")
    if not has(obj, fields.messages):  # the record says where its completion starts
        return [(*_prompt_completion(obj, fields), label)]
    msgs = sft_messages(obj, fields)
    n = len(msgs)
    while n and msgs[n - 1]["role"] == "assistant":
        n -= 1
    if n == len(msgs):
        raise FormatError("no_assistant_turn", f"conversation ends with a {msgs[-1]['role']} "
                          "turn, not the assistant completion the label judges")  # fmt: skip
    if n == 0:
        raise FormatError("missing_field", "no prompt before the assistant completion")
    return [(msgs[:n], msgs[n:], label)]


# ---------------------------------------------------------------------------------------------
# Reading and the data report


class DataReport:
    """Counts of what happened to every record: used, truncated, dropped (bad input, by
    reason, with file:line examples). Strict mode raises on the first bad record."""

    def __init__(self, strict: bool = False):
        self.log = S.BadInputLog(strict=strict)
        self.read = self.used = self.truncated = 0
        self.truncated_examples: list[str] = []
        self.tokens = self.loss_tokens = 0
        self.chat_template = ""  # a Jinja template's name (JinjaChatTemplate), "" for flaxlm's
        self.split_by_turn = 0  # conversations trained one assistant turn per example
        self.split_examples: list[str] = []

    def bad(self, reason: str, loc: str, detail: str = "") -> None:
        self.log.add(reason, loc, detail)

    def truncation(self, loc: str, n_cut: int) -> None:
        self.truncated += 1
        if len(self.truncated_examples) < S.MAX_EXAMPLES:
            self.truncated_examples.append(f"{loc}: {n_cut} prompt tokens cut from the left")

    def split(self, loc: str, n_pieces: int) -> None:
        self.split_by_turn += 1
        if len(self.split_examples) < S.MAX_EXAMPLES:
            self.split_examples.append(
                f"{loc}: {n_pieces} examples, one per assistant turn (the chat template "
                "rewrites earlier turns once later ones follow)"
            )

    def dropped_summary(self) -> str:
        """What became of the records, for the error of a file that gave nothing usable: how
        many were read and dropped, each reason's count with its first file:line example (a
        prompt file of malformed lines said only "no usable prompts")."""
        if not self.read:
            return "no records read"
        parts = [f"{n} {reason}" + (f" (e.g. {ex[0]})" if (ex := self.log.examples.get(reason))
                                    else "") for reason, n in self.log.counts.items()]  # fmt: skip
        return f"{self.read} record(s) read, {self.log.total} dropped" + (
            ": " + "; ".join(parts) if parts else ""
        )

    def to_dict(self) -> dict:
        return {
            "records": self.read,
            "used": self.used,
            "truncated": self.truncated,
            "truncated_examples": self.truncated_examples,
            "dropped": self.log.total,
            "bad_input": self.log.to_dict(),
            "tokens": self.tokens,
            "loss_tokens": self.loss_tokens,
            **({"chat_template": self.chat_template} if self.chat_template else {}),
            **(
                {"split_by_turn": self.split_by_turn, "split_examples": self.split_examples}
                if self.split_by_turn
                else {}
            ),  # fmt: skip
        }


def _json_array_records(path: str, report: DataReport) -> Iterator[tuple[object, str]]:
    """(element, "file[index]") of a file holding one JSON array (`holds_json_array`, shared
    with the pretraining reader); DataError naming the file when it is not UTF-8 or does not
    parse (`read_json_array`); an element with a lone surrogate escape is "invalid_utf8", as a
    jsonl line's is."""
    rows = read_json_array(path)
    for i, obj in enumerate(rows):
        loc = f"{path}[{i}]"
        report.read += 1
        if where := S.lone_surrogate(obj):
            report.bad("invalid_utf8", loc, where)
            continue
        yield obj, loc


def read_records(patterns: str | Sequence[str], report: DataReport) -> Iterator[tuple[dict, str]]:
    """(record, "file:line") from jsonl (gzip/zstd too) / parquet / Arrow IPC files; a line that
    cannot be read goes to the report as the pretraining reader counts it
    (`sources.jsonl_record`): a UTF-8 BOM is skipped, invalid UTF-8 and a lone surrogate escape
    are "invalid_utf8", malformed JSON "malformed_json". A .json file that holds one JSON array
    (Alpaca style) is its elements, (record, "file[index]"). A parquet or Arrow row is a dict of
    every column, "file:row" (1-based); a parquet or Arrow file (HF `datasets`' .arrow, or
    Feather v2) that cannot be read, or that names a column twice, is a DataError naming the
    file, or the first row it could not read."""
    for path in S.expand_paths(patterns):
        fmt = S.file_format(path)
        if fmt == "jsonl" and holds_json_array(path):
            yield from _json_array_records(path, report)
        elif fmt == "jsonl":
            for i, raw in numbered_lines(path):  # damage names its line, as in pretraining
                if not raw.strip():
                    continue
                loc = f"{path}:{i + 1}"
                report.read += 1
                ok, obj = S.jsonl_record(raw, loc, report.log)
                if ok:
                    yield obj, loc
        elif fmt in ("parquet", "arrow"):
            # Batch by batch, each validated (a corrupt row group, a damaged Arrow batch or
            # invalid UTF-8 is a DataError naming file:row, not a bare pyarrow or Unicode error
            # naming nothing): HF's Arrow files are memory-mapped, and either may be far larger
            # than its rows as Python objects would fit in memory at once.
            if fmt == "parquet":
                pf = open_parquet(path)
                schema, batches = pf.schema_arrow, parquet_batches(path, pf)
            else:
                reader = open_arrow(path)
                schema, batches = reader.schema, arrow_batches(path, reader)
            for name in schema.names:  # a name twice: a row's dict would keep one value unsaid
                field_index(schema, path, name)
            i = 0
            for batch in batches:
                for row in batch.to_pylist():
                    i += 1
                    report.read += 1
                    yield row, f"{path}:{i}"
        else:
            raise S.DataError(f"{path}: chat/preference data must be .jsonl, .json, .parquet or "
                              ".arrow")  # fmt: skip
