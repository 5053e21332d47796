"""Chat template, loss masks, SFT packing and preference pairs — the data side of alignment.

The template (token ids, not text, so no merge ever crosses a boundary):

    [BOS] <|system|> system <|end|> <|user|> question <|end|> <|assistant|> answer <|end|> ... [EOS]

  * BOS opens every conversation, as it opens every pretraining document (none if the
    tokenizer has no BOS, as Qwen2's).
  * Each turn is its role token, the content (SentencePiece-encoded on its own) and `<|end|>`.
  * Loss: on assistant content and the assistant's `<|end|>` only — `<|end|>` is how the model
    learns to stop, and it is the generation stop token (`ChatTemplate.stop_tokens`). Role tokens,
    system and user turns are never targets; every assistant turn of a multi-turn conversation is.
  * EOS closes the rendered conversation and is never a target (nothing is predicted after a
    conversation). Its job: the last *input* token of a conversation is then the final `<|end|>`,
    which is where a reward model reads its score (models/heads.py), the same place a generated
    response that stopped at `<|end|>` ends.
  * `add_generation_prompt=True` renders the prompt up to and including `<|assistant|>`, no EOS.
  * Tokenizers without the chat tokens (an imported Llama tokenizer) fall back to text headers
    ("<|user|>\\n" encoded as text) with EOS as the end-of-turn (stop) token: the last answer
    then ends "EOS EOS", the first trained (the stop token), the second the untrained close.
  * A tokenizer with its own Jinja `chat_template` (an imported HF instruct model) trains on
    that template instead (`JinjaChatTemplate`, picked by `training_template`, which every
    alignment stage uses): what generation, chat-mode evaluation and RL rollouts prompt with.
    See "Jinja templates" below.
  * As text (the exported HF template, models/hf_tokenizer.py) a turn is `<|role|> content<|end|>`:
    the space is the content's own leading "▁". Content is never merged with template text.

Jinja templates (`JinjaChatTemplate`): the conversation is rendered once as text and tokenized
once with character offsets (models/hf_tokenizer.py). Each assistant turn i starts where the
text of messages[:i] with add_generation_prompt=True ends and its turn ends where the text of
messages[:i+1] ends; both must be prefixes of the whole text. A template that rewrites
earlier turns once later ones follow (Qwen3, DeepSeek-R1: an earlier answer's reasoning is
dropped) trains a multi-turn SFT conversation one assistant turn per example, each in the
context it is generated in, counted as `split_by_turn` in the data report (`render_sft`);
where even the final turn cannot be located it is a `TemplateError` (a hard error naming the
template and record — nothing falls back silently). The prompt's ids must equal the prefix text
tokenized alone (what `generation_prompt` gives), else the record is dropped as
"template_boundary" (a merge across the turn boundary). The mask covers the assistant content
and the template text after it up to and including the first stop id (`tok.stop_ids`, EOS and
generation_config.json's: `<|eot_id|>`, `<|im_end|>`, Gemma's `<end_of_turn>`); a turn without
a stop id is a `TemplateError`. `end_id` is the stop id the template ends a turn with (found
by rendering a probe turn), which closes a response scored outside a rendered conversation
(win rate). The rendered ids
are then closed as flaxlm's template closes them: exactly one untrained id after the final
stop id (the template's next id, else EOS), so the last input is the stop id (the reward
model's score position). Truncation cuts after a leading BOS and keeps the final assistant
turn(s) from the end of the preceding message (its header included); a preference pair's
shared prompt is its add_generation_prompt render, identical ids on both sides, and only the
responses are trained (assistant turns inside the prompt are context, with either template).
The data report names the template (`chat_template`: "jinja:<sha256 prefix>"). A template that fails
on a record (its `raise_exception`, an undefined value used) is an error naming the record's
file:line (`naming_record`), as a not prefix-stable one is.

Tool use (Jinja templates only): a record's `tools` (a list of tool schemas) reaches the
template as `tools`; messages keep `tool_calls` (assistant turns; content may then be empty or
null), `tool_call_id`, `name` and `reasoning_content`, and role "tool" (a tool's result) is
context like a user turn. An assistant turn that calls a tool is trained like any answer (the
call is its text); flaxlm's own template has no format for these, so they are a
`TemplateError` with it.

`render_chat` returns (ids, loss_mask) aligned with ids: `loss_mask[i] = 1` when `ids[i]` is a
target. A row then holds `tokens = ids[:-1]`, `targets = ids[1:]`, `loss_mask = mask[1:]`.

SFT records must end with an assistant turn; a blank system/user turn (like a blank `prompt`)
is bad input ("empty"), as are missing/unknown roles and non-string content (file:line).

Overlength (a conversation of n ids needs n − 1 <= seq_len): policy "truncate_left" keeps BOS
and the final assistant turn whole and drops tokens from the left of what precedes it (oldest
context first; an earlier answer cut in part keeps its remaining tokens trained); if the final
turn alone does not fit, or with policy "drop", the example is dropped. A preference pair is
cut only inside the prompt both sides share (same ids on both), else dropped. Truncations
and drops are counted in the `DataReport` with file:line examples; a drop is bad input
(raises in strict mode), a truncation is the stated policy.

SFT examples are packed first-fit into fixed rows (segment ids 1, 2, ... per example, positions
restarting at 0, no example split across rows), so attention never crosses examples. Preference
pairs are one pair per row: `chosen_*` and `rejected_*` fields plus `margin` (B,) and `valid`
(B,); both responses share the prompt, truncated identically.

Records come from jsonl or parquet (`read_records`), with configurable field names
(`fields_config`): `messages` (a list of {role, content}), or `prompt` (text or messages) plus
`completion`; preferences: `prompt` + `chosen` + `rejected` (+ optional `margin`). A null
field is an absent one (`has`): parquet stores a mixed file's rows with every column, null
where a row has none. `meta`, when present, must be a JSON object ("bad_meta" otherwise).

Unpaired feedback (KTO, `render_unpaired`): a chat record with a boolean `label` (true =
desirable, false = undesirable; anything else is bad input "bad_label"), its trailing assistant
turns the completion and what precedes them the prompt; or a preference record without a
label, split into its chosen answer (desirable) and its rejected one (undesirable), rendered
and truncated as the pair is. One example per row (`UnpairedBatches`), each with a mismatched
row for KTO's KL estimate: its completion after the prompt of another row of the batch
(`kl_partners`, `mismatched`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Iterator, Sequence

import ml_collections
import numpy as np

from flaxlm.data import sources as S
from flaxlm.data.lookahead import Lookahead
from flaxlm.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")  # flaxlm's own template's roles
TOOL_ROLE = "tool"  # a tool's result: context, rendered only by a Jinja chat template
# message keys passed to a Jinja template besides role and content (tool use, reasoning)
MESSAGE_EXTRAS = ("tool_calls", "tool_call_id", "name", "reasoning_content")
OVERLENGTH = ("truncate_left", "drop")


def fields_config() -> ml_collections.ConfigDict:
    """Field names of chat/preference records (the `data.fields` config section)."""
    c = ml_collections.ConfigDict()
    c.messages = "messages"  # list of {role, content} (a whole conversation)
    c.prompt = "prompt"  # text (one user turn) or a list of messages
    c.completion = "completion"  # assistant answer to `prompt` (when there is no `messages`)
    c.chosen = "chosen"  # preferred answer (text or a list of assistant-ending messages)
    c.rejected = "rejected"  # dispreferred answer
    c.margin = "margin"  # optional per-pair margin (number); absent = 0
    c.label = "label"  # unpaired feedback (KTO): true = desirable answer, false = undesirable
    c.meta = "meta"  # optional dict carried along for evaluation (the world's judge)
    c.role = "role"  # key of a message's role
    c.content = "content"  # key of a message's content
    c.tools = "tools"  # optional list of tool (function) schemas, for a Jinja chat template
    return c


class ChatTemplate:
    """Token ids of the template for one tokenizer (see the module docstring)."""

    jinja = False  # JinjaChatTemplate: the tokenizer's own Jinja template

    def __init__(self, tok: Tokenizer):
        self.tok, self.bos_id, self.eos_id = tok, tok.bos_id, tok.eos_id
        self.prefix = [tok.bos_id] if tok.bos_id >= 0 else []  # tokenizers without BOS: none
        ids = tok.special_ids()
        names = {r: f"<|{r}|>" for r in ROLES}
        self.special = all(n in ids for n in (*names.values(), "<|end|>"))
        if self.special:
            self.headers = {r: [ids[n]] for r, n in names.items()}
            self.end_id = ids["<|end|>"]
        else:
            if self.eos_id < 0:
                raise ValueError(f"{tok.name}: no chat tokens and no EOS to end a turn with")
            self.headers = {r: tok.encode(f"{n}\n") for r, n in names.items()}
            self.end_id = self.eos_id

    @property
    def stop_tokens(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys((self.end_id, self.eos_id)))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)


class TemplateError(ValueError):
    """A Jinja chat template no loss mask can be derived from (not prefix-stable, no stop id)."""


class PrefixUnstable(TemplateError):
    """The template renders a conversation's first messages differently once more follow (it
    rewrites history: Qwen3 and DeepSeek-R1 drop earlier turns' reasoning)."""


@contextlib.contextmanager
def naming_record(loc: str):
    """Re-raises a Jinja chat template's error on one record with the record's file:line first:
    a template that is not prefix-stable (TemplateError) or that fails on the record — its own
    `raise_exception` or a failed render (models/hf_tokenizer.py HFError). Not counted drops:
    the template, not the data, fixes the format (one that rejects system turns would drop
    every record holding one), so the run stops at the first such record."""
    from flaxlm.models.hf_tokenizer import HFError

    try:
        yield
    except (TemplateError, HFError) as e:
        raise type(e)(f"{loc}: {e}") from None


class JinjaChatTemplate(ChatTemplate):
    """A tokenizer's own Jinja chat template as the training template (module docstring,
    "Jinja templates"). `stop_tokens` are the tokenizer's stop ids; `end_id` the one the
    template ends an assistant turn with (Gemma: <end_of_turn>, not its EOS <eos>; the first
    stop id when a probe conversation does not show it)."""

    jinja = True

    def __init__(self, tok):
        import hashlib

        self.tok, self.bos_id, self.eos_id = tok, tok.bos_id, tok.eos_id
        self.special, self.prefix, self.headers = False, [], {}
        self.stops = tuple(int(i) for i in getattr(tok, "stop_ids", ()) if i >= 0)
        if not self.stops:
            raise TemplateError(f"{tok.name}: chat template but no EOS/stop id to end a turn")
        self.end_id = self._turn_end_id()
        # the template and the variables it renders with (enable_thinking changes the text)
        kwargs = json.dumps(getattr(tok, "template_kwargs", {}), sort_keys=True)
        key = tok.chat_template if kwargs == "{}" else tok.chat_template + kwargs
        self.name = "jinja:" + hashlib.sha256(key.encode()).hexdigest()[:12]

    @property
    def stop_tokens(self) -> tuple[int, ...]:
        return self.stops

    def _turn_end_id(self) -> int:
        """The first stop id after the answer of a rendered probe conversation: what a scored
        response (win rate, demo report) is closed with, as training closed its answers."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            prompt = self.tok.encode(self.text(probe[:1], add_generation_prompt=True))
            full = self.tok.encode(self.text(probe, add_generation_prompt=False))
        except Exception:  # a template with demands the probe misses: keep the tokenizer's
            return self.stops[0]
        after = full[len(prompt) :] if full[: len(prompt)] == prompt else []
        return next((i for i in after if i in self.stops), self.stops[0])

    def text(self, msgs, add_generation_prompt: bool, tools=None) -> str:
        return self.tok.render_chat_text(msgs, add_generation_prompt=add_generation_prompt,
                                         tools=tools)  # fmt: skip

    def head(self, ids) -> int:
        """Leading ids never cut: the template's BOS."""
        return int(len(ids) > 0 and self.bos_id >= 0 and ids[0] == self.bos_id)

    def describe(self) -> str:
        return f"{self.name} ({self.tok.name})"


def split_reasoning(text: str, marker: str) -> tuple[str, str, bool]:
    """(reasoning, answer, unfinished) of a reasoning model's response ("<think> ... </think>
    answer"): the text before and after the last `marker`, the answer's leading whitespace
    dropped; without the marker the reasoning never ended (budget spent, or a model that
    stopped inside it): all of the text is reasoning and the answer is ""."""
    reasoning, found, answer = text.rpartition(marker)
    if not found:
        return text, "", True
    return reasoning, answer.lstrip(), False


def training_template(tok) -> ChatTemplate:
    """The template a stage trains (and prompts) with: the tokenizer's own Jinja chat template
    when it has one (`JinjaChatTemplate`), else flaxlm's (`ChatTemplate`)."""
    if getattr(tok, "chat_template", ""):
        return JinjaChatTemplate(tok)
    return ChatTemplate(tok)


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
    for i, m in enumerate(value):
        if not isinstance(m, dict) or fields.role not in m or fields.content not in m:
            raise FormatError(
                "bad_messages", f"{what}[{i}] lacks {fields.role!r}/{fields.content!r}"
            )
        role, content = m[fields.role], m[fields.content]
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


def _needs_jinja(msgs: list[dict], tools) -> str:
    """Why flaxlm's own template cannot render `msgs` ("" if it can): tool turns, tool calls
    and tool schemas exist only in a tokenizer's Jinja chat template."""
    if tools:
        return "tool schemas (`tools`)"
    for m in msgs:
        if m["role"] == TOOL_ROLE:
            return "a tool turn"
        if any(k in m for k in MESSAGE_EXTRAS if k != "reasoning_content"):
            return "tool calls"
    return ""


def record_tools(obj, fields):
    """A record's tool schemas (`fields.tools`): None, or a list of objects."""
    tools = obj.get(fields.tools) if isinstance(obj, dict) else None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict)
                                                                  for t in tools)):  # fmt: skip
        raise FormatError("bad_tools", f"{fields.tools} is not a list of objects")
    return tools or None


def render_chat(
    messages: Sequence[dict],
    template: ChatTemplate | Tokenizer,
    add_generation_prompt=False,
    tools=None,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, loss_mask float32) of a conversation; see the module docstring.

    Raises FormatError on unknown roles, empty assistant turns, a conversation with no assistant
    turn (without `add_generation_prompt`) or one ending in an assistant turn (with it).
    """
    t = template if isinstance(template, ChatTemplate) else ChatTemplate(template)
    msgs = _messages(list(messages), fields_config(), "messages")
    if t.jinja:
        if add_generation_prompt:
            if msgs[-1]["role"] == "assistant":
                raise FormatError("bad_messages", "generation prompt after an assistant turn")
            ids = t.tok.encode(t.text(msgs, True, tools))
            return np.asarray(ids, np.int32), np.zeros(len(ids), np.float32)
        ids, mask, _, _ = _render_jinja(msgs, t, tools=tools)
        return ids, mask
    if _needs_jinja(msgs, tools):
        raise TemplateError(f"{_needs_jinja(msgs, tools)} need(s) the tokenizer's own Jinja "
                            "chat template; flaxlm's template has none")  # fmt: skip
    ids, mask = list(t.prefix), [0.0] * len(t.prefix)
    for m in msgs:
        body = t.encode(m["content"]) + [t.end_id]
        train = 1.0 if m["role"] == "assistant" else 0.0
        ids += t.headers[m["role"]] + body
        mask += [0.0] * len(t.headers[m["role"]]) + [train] * len(body)
    if add_generation_prompt:
        if msgs[-1]["role"] == "assistant":
            raise FormatError("bad_messages", "generation prompt after an assistant turn")
        ids += t.headers["assistant"]
        mask += [0.0] * len(t.headers["assistant"])
    else:
        if not any(m["role"] == "assistant" for m in msgs):
            raise FormatError("no_assistant_turn", "conversation has no assistant turn")
        ids.append(t.eos_id)
        mask.append(0.0)
    return np.asarray(ids, np.int32), np.asarray(mask, np.float32)


def generation_prompt(
    messages: Sequence[dict], tok, tools=None
) -> tuple[list[int], tuple[int, ...]]:
    """(prompt ids ending where the assistant's reply starts, the ids that end that reply) of a
    conversation: through the tokenizer's own Jinja chat template and stop ids when it has one
    (an imported HF instruct model's tokenizer_config.json: what that model was tuned on), else
    flaxlm's chat template. `tools`: tool schemas for the Jinja template."""
    if getattr(tok, "chat_template", ""):
        text = tok.render_chat_text(list(messages), add_generation_prompt=True, tools=tools)
        return [int(i) for i in tok.encode(text)], tuple(tok.stop_ids)
    template = ChatTemplate(tok)
    ids, _ = render_chat(messages, template, add_generation_prompt=True, tools=tools)
    return [int(i) for i in ids], template.stop_tokens


def _render_jinja(msgs: list[dict], t: JinjaChatTemplate, n_prompt: int | None = None,
                  train_from: int = 0, tools=None):  # fmt: skip
    """(ids, mask, keep_from, head) of a conversation through a Jinja template (module
    docstring, "Jinja templates"): `keep_from` is where truncation must stop cutting — the end of
    the message before the trailing assistant turns, or with `n_prompt` the end of the shared
    prompt's generation-prompt ids — and `head` the leading ids never cut (BOS). Assistant
    turns before message `train_from` are context, not located or trained."""
    if not any(m["role"] == "assistant" for m in msgs):
        raise FormatError("no_assistant_turn", "conversation has no assistant turn")
    text = t.text(msgs, False, tools)
    ids, offsets = t.tok.encode_offsets(text)
    starts = np.asarray([a for a, _ in offsets], np.int64)
    at = lambda char: int(np.searchsorted(starts, char, side="left"))  # noqa: E731
    stops, mask, last = set(t.stops), np.zeros(len(ids), np.float32), -1

    def prefix(k: int, gen: bool) -> str:
        part = t.text(msgs[:k], gen, tools)
        if not text.startswith(part):
            kwargs = getattr(t.tok, "template_kwargs", {})
            hint = (f"; with chat_template_kwargs {kwargs} the generation prompt may pre-fill "
                    "text the answer does not start with (e.g. an empty think block before an "
                    "answer that has reasoning)") if gen and kwargs else ""  # fmt: skip
            raise PrefixUnstable(
                f"chat template {t.describe()} is not prefix-stable: messages[:{k}] rendered "
                f"with add_generation_prompt={gen} is not a prefix of the whole conversation, "
                f"so the assistant turns (the loss mask) cannot be located{hint}"
            )
        return part

    def prompt_ids(k: int, gen: bool) -> int:
        want = t.tok.encode(prefix(k, gen))
        if ids[: len(want)] != want:
            why = f"messages[:{k}] tokenize differently alone (a merge across the turn)"
            raise FormatError("template_boundary", why)
        return len(want)

    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or i < train_from:
            continue
        k0, k1 = prompt_ids(i, True), at(len(prefix(i + 1, False)))
        stop = next((j for j in range(k0, k1) if ids[j] in stops), None)
        if stop is None:
            raise TemplateError(f"chat template {t.describe()}: assistant turn {i} has no stop "
                                f"id {sorted(stops)} after its content to train")  # fmt: skip
        mask[k0 : stop + 1] = 1.0
        last = stop
    if msgs[-1]["role"] == "assistant":  # close: exactly one untrained id after the last stop
        ids = ids[: last + 2] + ([] if len(ids) > last + 1 else [t.eos_id if t.eos_id >= 0
                                                                    else t.end_id])  # fmt: skip
        mask = np.r_[mask[: last + 1], 0.0].astype(np.float32)
    if n_prompt is not None:
        gen = msgs[n_prompt - 1]["role"] != "assistant"
        keep = prompt_ids(n_prompt, gen) if n_prompt else 0
    else:
        j = len(msgs)
        while j > 0 and msgs[j - 1]["role"] == "assistant":
            j -= 1
        keep = at(len(prefix(j, False))) if j else 0
    return np.asarray(ids, np.int32), mask, keep, t.head(ids)


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


def sft_messages(obj, fields) -> list[dict]:
    """The conversation of a chat record: `messages`, or `prompt` + `completion` (the same
    turns, so the same ids and mask). `render_sft` also requires it to end with an assistant
    turn; RL eval sets (alignment/rl_common.py) accept a trailing user turn."""
    if not isinstance(obj, dict):
        raise FormatError("bad_record", "record is not a JSON object")
    if has(obj, fields.messages):
        return _messages(obj[fields.messages], fields, fields.messages, record=True)
    prompt = prompt_messages(_get(obj, fields.prompt, "prompt"), fields)
    completion = _get(obj, fields.completion, "completion")
    if not isinstance(completion, str) or not completion.strip():
        raise FormatError("empty_assistant", "completion is empty or not a string")
    return prompt + [{"role": "assistant", "content": completion}]


def preference_parts(obj, fields) -> tuple[list[dict], list[dict], list[dict], float]:
    """(prompt messages, chosen turns, rejected turns, margin) of a preference record.

    `chosen`/`rejected` are answer texts, or message lists (then the prompt may be absent and
    the longest common prefix of the two lists is the prompt)."""
    if not isinstance(obj, dict):
        raise FormatError("bad_record", "record is not a JSON object")
    sides = []
    for key in (fields.chosen, fields.rejected):
        v = _get(obj, key, key)
        if isinstance(v, str):
            if not v.strip():
                raise FormatError("empty_assistant", f"{key} is empty")
            v = [{"role": "assistant", "content": v}]
        sides.append(_messages(v, fields, key, record=True))
    prompt = prompt_messages(obj[fields.prompt], fields) if obj.get(fields.prompt) else []
    if not prompt:  # full conversations: split off their common prefix
        n = 0
        while n < min(map(len, sides)) - 1 and sides[0][n] == sides[1][n]:
            n += 1
        prompt, sides = sides[0][:n], [s[n:] for s in sides]
    for key, s in zip((fields.chosen, fields.rejected), sides):
        if s[-1]["role"] != "assistant":
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
    chat record with a boolean `label` — one example, its trailing assistant turns the
    completion — or a preference record without one: two examples, chosen (desirable) and
    rejected (undesirable), sharing the prompt."""
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


def read_records(patterns: str | Sequence[str], report: DataReport) -> Iterator[tuple[dict, str]]:
    """(record, "file:line") from jsonl (gzip/zstd too) / parquet files; a line that cannot be
    read goes to the report as the pretraining reader counts it (`sources.jsonl_record`): a
    UTF-8 BOM is skipped, invalid UTF-8 and a lone surrogate escape are "invalid_utf8",
    malformed JSON "malformed_json"."""
    for path in S.expand_paths(patterns):
        fmt = S.file_format(path)
        if fmt == "jsonl":
            with S.open_bytes(path) as f:
                for i, raw in enumerate(f):
                    if not raw.strip():
                        continue
                    loc = f"{path}:{i + 1}"
                    report.read += 1
                    ok, obj = S.jsonl_record(raw, loc, report.log)
                    if ok:
                        yield obj, loc
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            for i, row in enumerate(pq.read_table(path).to_pylist()):
                report.read += 1
                yield row, f"{path}:{i + 1}"
        else:
            raise S.DataError(f"{path}: chat/preference data must be .jsonl or .parquet")


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
) -> list[dict]:
    """Rendered SFT examples {"ids", "mask", "meta", "loc", "messages"}, each fitting a row.

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
            out.append({"ids": ids, "mask": mask, "meta": meta, "loc": loc, "messages": conv,
                        "tools": tools})  # fmt: skip
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


def render_prompt(
    messages: Sequence[dict], template: ChatTemplate, max_len: int, tools=None
) -> tuple[np.ndarray, int]:
    """Generation-prompt ids of a conversation (its last assistant turn, if any, removed),
    truncated from the left (BOS kept) to at most `max_len`. Returns (ids, n_cut). `tools`:
    tool schemas for a Jinja template."""
    msgs = list(messages)
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
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


# ---------------------------------------------------------------------------------------------
# Batching


def empty_rows(b: int, t: int, pad_id: int, prefix: str = "") -> dict[str, np.ndarray]:
    return {
        f"{prefix}tokens": np.full((b, t), pad_id, np.int32),
        f"{prefix}targets": np.full((b, t), pad_id, np.int32),
        f"{prefix}loss_mask": np.zeros((b, t), np.float32),
        f"{prefix}segment_ids": np.zeros((b, t), np.int32),
        f"{prefix}positions": np.zeros((b, t), np.int32),
    }


def place(out: dict, r: int, start: int, seg: int, ids, mask, prefix: str = "") -> int:
    """Writes one example's (tokens, targets, mask) at row r from `start`; returns its length."""
    n = len(ids) - 1
    sl = slice(start, start + n)
    out[f"{prefix}tokens"][r, sl] = ids[:-1]
    out[f"{prefix}targets"][r, sl] = ids[1:]
    out[f"{prefix}loss_mask"][r, sl] = mask[1:]
    out[f"{prefix}segment_ids"][r, sl] = seg
    out[f"{prefix}positions"][r, sl] = np.arange(n)
    return n


class _EpochOrder:
    """Every example in a per-epoch shuffled order (the same on every process); state is
    (epoch, position)."""

    def __init__(self, n, *, seed, shuffle, num_epochs):
        self.idx = np.arange(n)
        if n == 0:
            raise ValueError("no examples")
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        self.epoch, self.pos = 0, 0
        self._order = self._make(0)

    def _make(self, epoch):
        if not self.shuffle:
            return self.idx
        return np.random.default_rng([self.seed, epoch]).permutation(self.idx)

    def peek(self) -> int | None:
        if self.pos == len(self._order):
            if self.num_epochs and self.epoch + 1 >= self.num_epochs:
                return None
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._make(self.epoch)
        return int(self._order[self.pos])

    def advance(self) -> None:
        self.pos += 1

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def set_state(self, st: dict) -> None:
        self.epoch, self.pos = int(st["epoch"]), int(st["pos"])
        self._order = self._make(self.epoch)


class _GlobalOrder:
    """Items for one-item-per-row batches of `chunk` rows per process: the global order is each
    epoch's permutation of all items, back to back, the same on every process; global batch k
    holds its items k·C … (k + 1)·C − 1 (C = chunk × process_count), and process p takes the
    p-th `chunk` of them. So the global batches are the ones a single process draws, whatever
    the number of processes (one process: the `_EpochOrder` of every item). State (epoch, pos):
    where this process's next item sits in the global order."""

    def __init__(self, n, *, seed, shuffle, num_epochs, process_index, process_count, chunk):
        if n == 0:
            raise ValueError("no examples")
        self.n, self.seed, self.shuffle, self.num_epochs = n, seed, shuffle, num_epochs
        self.p, self.chunk, self.width = process_index, chunk, chunk * process_count
        self.taken = 0  # items this process has taken
        self._perm_epoch, self._perm = -1, None

    def _at(self) -> tuple[int, int]:  # (epoch, position) of this process's next item
        k, r = divmod(self.taken, self.chunk)
        return divmod(k * self.width + self.p * self.chunk + r, self.n)

    def peek(self) -> int | None:
        epoch, pos = self._at()
        if self.num_epochs and epoch >= self.num_epochs:
            return None
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
            self._perm_epoch = epoch
        return int(self._perm[pos])

    def advance(self) -> None:
        self.taken += 1

    def get_state(self) -> dict:
        epoch, pos = self._at()
        return {"epoch": epoch, "pos": pos}

    def set_state(self, st: dict) -> None:
        # A state this layout saved sits in this process's chunk of a global batch (or at its
        # end); another one (an older per-process order) resumes at the nearest chunk.
        k, r = divmod(int(st["epoch"]) * self.n + int(st["pos"]), self.width)
        self.taken = k * self.chunk + min(max(r - self.p * self.chunk, 0), self.chunk)


class _Batches(Lookahead):
    """Shared by the batch iterators: this process's rows of each global batch, exact
    get_state/set_state. `num_epochs=0` repeats forever, else StopIteration at the end
    (`finite`; `prefetch(n)` draws batches ahead, data/lookahead.py). A subclass builds a
    batch of `rows` rows in `_build(rows)`.

    The global batches do not depend on the number of processes: with one item per row
    (`ONE_PER_ROW`) each process draws just its part of each global batch (`_GlobalOrder`);
    otherwise (packed rows, rows that refer to each other) every process builds the whole
    global batch from the same global order and keeps its rows, as pretraining does."""

    ONE_PER_ROW = False  # each row holds one item, built independently of the others

    def __init__(self, items, *, seq_len, batch, pad_id, seed=0, shuffle=True, num_epochs=0,
                 process_index=0, process_count=1, with_index=False):  # fmt: skip
        self.items, self.seq_len, self.batch, self.pad_id = items, seq_len, batch, pad_id
        # with_index: rows carry `index` (B,) int32, the item each row holds (-1: none), so an
        # evaluation can group rows gathered from every process by their items' metadata
        self.with_index = with_index
        self.process_index, self.process_count = process_index, process_count
        kw = dict(seed=seed, shuffle=shuffle, num_epochs=num_epochs)
        if self.ONE_PER_ROW:
            self.order = _GlobalOrder(len(items), chunk=batch, process_index=process_index,
                                      process_count=process_count, **kw)  # fmt: skip
            self.build_rows = batch
        else:  # the whole global batch, this process's rows kept (`_next_batch`)
            self.order = _EpochOrder(len(items), **kw)
            self.build_rows = batch * process_count
        self.finite = bool(num_epochs)

    def _next_batch(self) -> dict[str, np.ndarray]:
        out = self._build(self.build_rows)
        if self.build_rows == self.batch:
            return out
        lo = self.process_index * self.batch
        return {k: v[lo : lo + self.batch] for k, v in out.items()}

    def _build(self, rows: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _local_state(self) -> dict:
        return self.order.get_state()

    def _set_local_state(self, state: dict) -> None:
        self.order.set_state(state)


class SFTBatches(_Batches):
    """Packed SFT batches: each example goes into the first of the `batch` rows it fits (never
    split); the batch is done when the next example fits no row."""

    def __init__(self, examples, **kw):
        super().__init__(examples, **kw)
        longest = max((len(ex["ids"]) - 1 for ex in examples), default=0)
        if longest > self.seq_len:
            raise ValueError(f"an example has {longest} tokens > seq_len {self.seq_len}")

    def blank(self, rows: int | None = None) -> dict[str, np.ndarray]:
        """A batch with no example (no tokens, no loss weight)."""
        return empty_rows(rows or self.batch, self.seq_len, self.pad_id)

    def _build(self, rows: int) -> dict[str, np.ndarray]:
        out = self.blank(rows)
        fill = np.zeros(rows, np.int64)
        segs = np.zeros(rows, np.int64)
        while (i := self.order.peek()) is not None:
            ex = self.items[i]
            rows = np.flatnonzero(fill + len(ex["ids"]) - 1 <= self.seq_len)
            if len(rows) == 0:
                break
            r = rows[0]
            segs[r] += 1
            fill[r] += place(out, r, fill[r], segs[r], ex["ids"], ex["mask"])
            self.order.advance()
        if not fill.any():
            raise StopIteration
        return out


class PreferenceBatches(_Batches):
    """One preference pair per row: `chosen_*`, `rejected_*` (B, T), `margin` and `valid` (B,);
    a final partial batch has `valid = 0` rows (evaluation)."""

    ONE_PER_ROW = True

    def blank(self, rows: int | None = None) -> dict[str, np.ndarray]:
        """A batch with no pair (`valid` 0 everywhere)."""
        b, t = rows or self.batch, self.seq_len
        out = {**empty_rows(b, t, self.pad_id, "chosen_"), **empty_rows(b, t, self.pad_id,
               "rejected_")}  # fmt: skip
        out["margin"] = np.zeros(b, np.float32)
        out["valid"] = np.zeros(b, np.float32)
        return {**out, "index": np.full(b, -1, np.int32)} if self.with_index else out

    def _build(self, rows: int) -> dict[str, np.ndarray]:
        out, b = self.blank(rows), rows
        index = np.full(b, -1, np.int32)
        r = 0
        while r < b and (i := self.order.peek()) is not None:
            p = self.items[i]
            place(out, r, 0, 1, *p["chosen"], prefix="chosen_")
            place(out, r, 0, 1, *p["rejected"], prefix="rejected_")
            out["margin"][r], out["valid"][r], index[r] = p["margin"], 1.0, i
            self.order.advance()
            r += 1
        if r == 0:
            raise StopIteration
        return {**out, "index": index} if self.with_index else out


def kl_partners(prompt_keys: Sequence) -> list[int]:
    """For each row k, the row whose prompt its KL row takes: the next row after k (cyclically)
    whose prompt differs from k's — row k + 1 when prompts are distinct, a shift by one, so the
    mismatched rows hold the batch's own completions, each once — or -1 when no other row has
    another prompt (one row; all rows one prompt). A completion after its own prompt again
    (the two halves of a preference pair, adjacent in an unshuffled order) would estimate
    nothing but the matched reward."""
    n, out = len(prompt_keys), []
    for k in range(n):
        j = next((j % n for j in range(k + 1, k + n) if prompt_keys[j % n] != prompt_keys[k]), -1)
        out.append(j)
    return out


def mismatched(prompt_ex: dict, completion_ex: dict, seq_len: int):
    """(ids, mask) of `completion_ex`'s completion after `prompt_ex`'s prompt (its ids[:split]),
    the prompt cut from the left (its BOS head kept) until the row fits: the completion is
    always whole (it fitted after its own prompt, whose head is as long). None if it cannot."""
    p = prompt_ex["ids"][: prompt_ex["split"]]
    c = completion_ex["ids"][completion_ex["split"] :]
    ids = np.concatenate([p, c]).astype(np.int32)
    mask = np.concatenate([np.zeros(len(p), np.float32), completion_ex["mask"][completion_ex[
        "split"] :]]).astype(np.float32)  # fmt: skip
    ids, mask, cut = fit_length(ids, mask, len(p), seq_len + 1, prompt_ex["head"])
    return None if cut < 0 else (ids, mask)


class UnpairedBatches(_Batches):
    """One unpaired example per row: `tokens`, `targets`, `loss_mask`, `segment_ids`,
    `positions` (B, T), `label` (1 desirable, 0 undesirable), `valid` (B,); and per row its
    mismatched row for KTO's KL estimate, `kl_*` (B, T) — its completion after the prompt of
    row `kl_partners(...)[k]` of the same global batch — with `kl_valid` (B,) 1 where there
    is one. A final partial batch has `valid = 0` rows (evaluation)."""

    def blank(self, rows: int | None = None) -> dict[str, np.ndarray]:
        """A batch with no example (`valid` 0 everywhere)."""
        b, t = rows or self.batch, self.seq_len
        out = {**empty_rows(b, t, self.pad_id), **empty_rows(b, t, self.pad_id, "kl_")}
        for k in ("label", "valid", "kl_valid"):
            out[k] = np.zeros(b, np.float32)
        return {**out, "index": np.full(b, -1, np.int32)} if self.with_index else out

    def _build(self, n_rows: int) -> dict[str, np.ndarray]:
        out, b, t = self.blank(n_rows), n_rows, self.seq_len
        rows, index = [], np.full(b, -1, np.int32)
        while len(rows) < b and (i := self.order.peek()) is not None:
            index[len(rows)] = i
            rows.append(self.items[i])
            self.order.advance()
        if not rows:
            raise StopIteration
        partners = kl_partners([ex["ids"][: ex["split"]].tobytes() for ex in rows])
        for r, (ex, j) in enumerate(zip(rows, partners)):
            place(out, r, 0, 1, ex["ids"], ex["mask"])
            out["label"][r], out["valid"][r] = float(ex["label"]), 1.0
            kl = mismatched(rows[j], ex, t) if j >= 0 else None
            if kl is not None:
                place(out, r, 0, 1, *kl, prefix="kl_")
                out["kl_valid"][r] = 1.0
        return {**out, "index": index} if self.with_index else out
