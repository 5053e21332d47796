"""The chat template — flaxlm's own (`ChatTemplate`) or a tokenizer's Jinja one
(`JinjaChatTemplate`) — and rendering a conversation into (ids, loss_mask) (`render_chat`), or
into a generation prompt (`generation_prompt`).

Separate from the records (data/chat_records.py: what a valid record is) and from fitting
examples into rows (data/chat_examples.py: overlength policy, counting): this is the one place
that decides which ids a conversation becomes and which of them are targets, used alike by
training, generation, chat evaluation and RL rollouts. `data/formats.py` re-exports every name.

The template (token ids, not text, so no merge ever crosses a boundary):

    [BOS] <|system|> system <|end|> <|user|> question <|end|> <|assistant|> answer <|end|> ... [EOS]

  * BOS opens every conversation, as it opens every pretraining document (none if the
    tokenizer has no BOS, as Qwen2's).
  * Each turn is its role token, the content (encoded on its own, as text: a chat or special
    token's string in it never becomes that token, with an HF tokenizer.json too) and `<|end|>`.
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
and the template text after it up to and including the first stop id after the content's text
(`tok.stop_ids`, EOS and generation_config.json's: `<|eot_id|>`, `<|im_end|>`, Gemma's
`<end_of_turn>`): an answer that spells a stop token ("ends with <|im_end|>", which the
tokenizer turns into that id) is trained whole. Where the template does not render the content
as it is (stripped), the turn ends at the first stop id after its start, and an answer holding a
stop token's text is dropped ("stop_in_content": its end cannot be located); a turn without a
stop id is a `TemplateError`. `end_id` is the stop id the template ends a turn with (found
by rendering a probe turn), which closes a response scored outside a rendered conversation
(the demo report). The rendered ids
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
null), `tool_call_id`, `name` and `reasoning_content` (read from `reasoning` or `thinking` when
so named; the template gets it as `reasoning_content` and `thinking`), and role "tool" (a tool's
result) is context like a user turn. An assistant turn that calls a tool is trained like any
answer (the call is its text); flaxlm's own template has no format for tools nor for an answer's
`reasoning_content` (GRPO and evaluation read reasoning from the response text, with a marker
the run names: `grpo.reasoning_end`), so these are a `TemplateError` with it, naming the record;
a speaker's `name` is ignored by it (the turn renders the same).

`render_chat` returns (ids, loss_mask) aligned with ids: `loss_mask[i] = 1` when `ids[i]` is a
target. A row then holds `tokens = ids[:-1]`, `targets = ids[1:]`, `loss_mask = mask[1:]`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence

import numpy as np

from flaxlm.data.chat_records import (
    ROLES,
    TOOL_ROLE,
    FormatError,
    _messages,
    fields_config,
)
from flaxlm.data.tokenizer import Tokenizer, text_encoder


class ChatTemplate:
    """Token ids of the template for one tokenizer (see the module docstring)."""

    jinja = False  # JinjaChatTemplate: the tokenizer's own Jinja template
    # content -> ids of the conversation `render_chat` last rendered for training, without a
    # generation prompt (replaced, never mutated)
    _recent: dict[str, list[int]] = {}

    def __init__(self, tok: Tokenizer):
        self.tok, self.bos_id, self.eos_id = tok, tok.bos_id, tok.eos_id
        # Contents are text: an HF tokenizer's special token spelled inside one ("<|eot_id|>"
        # in a question about Llama 3) is encoded as its characters, never as the special id,
        # as flaxlm's SentencePiece tokenizer encodes its chat tokens (data/tokenizer.py)
        self.text_tok = text_encoder(tok)
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
        """`text`'s ids. The contents of the conversation rendered last are not tokenized again:
        rendering a training example reads back the length of its final answer
        (data/chat_examples.py `_final_len`) and a preference pair the length of its shared
        prompt, which re-encoded them (a final answer was ~11% of rendering time). Keyed by the
        text itself, so the ids are the tokenizer's whatever was rendered before."""
        ids = self._recent.get(text)
        return list(ids) if ids is not None else self.text_tok.encode(text)


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

        self.tok, self.eos_id = tok, tok.eos_id
        # (a rendered Jinja template is text whose special tokens are the template's: its
        # `encode` keeps them special, as transformers' apply_chat_template does)
        self.text_tok = tok
        # the template's BOS: the token it writes ({{ bos_token }}), whether or not the
        # tokenizer adds it to plain text (HFTokenizer.bos_token_id vs bos_id)
        self.bos_id = getattr(tok, "bos_token_id", tok.bos_id)
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
        response (the demo report) is closed with, as training closed its answers."""
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


def _needs_jinja(msgs: list[dict], tools) -> str:
    """Why flaxlm's own template cannot render `msgs` ("" if it can): tool turns, tool calls,
    tool schemas and an answer's reasoning (`reasoning_content`) have a format only in a
    tokenizer's Jinja chat template — rendered without them, a turn would train or prompt with
    less than the record says. A speaker's `name` (OpenAI's messages carry one on any turn)
    changes nothing the template shows: ignored."""
    if tools:
        return "tool schemas (`tools`)"
    for m in msgs:
        if m["role"] == TOOL_ROLE:
            return "a tool turn"
        if "tool_calls" in m or "tool_call_id" in m:
            return "tool calls"
        if (m.get("reasoning_content") or "").strip():  # (a blank one loses nothing)
            return "reasoning (`reasoning_content`)"
    return ""


def _default_fields():
    """The default record field names, built once: `fields_config()` is an ml_collections
    ConfigDict whose every setattr calls dir(), and building one per conversation was a third
    of rendering 200k preference pairs (two conversations each). Only read here."""
    global _DEFAULT_FIELDS
    if _DEFAULT_FIELDS is None:
        _DEFAULT_FIELDS = fields_config()
    return _DEFAULT_FIELDS


_DEFAULT_FIELDS = None


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
    msgs = _messages(list(messages), _default_fields(), "messages")
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
    encoded: dict[str, list[int]] = {}  # becomes t._recent (`ChatTemplate.encode`)
    for m in msgs:
        if m["content"] not in encoded:
            encoded[m["content"]] = t.encode(m["content"])
        body = encoded[m["content"]] + [t.end_id]
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
        t._recent = encoded  # (a training render: its lengths are read back)
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


def _content_end(text: str, start: int, end: int, msg: dict) -> int | None:
    """Where an assistant message's content ends in `text`, searched in text[start:end] (its
    turn after the generation prompt) after its reasoning (a template that renders
    `reasoning_content` puts it first); None when the template does not render the content
    as it is (stripped: templates trim it)."""
    for key in ("reasoning_content", "content"):
        part = (msg.get(key) or "").strip()
        j = text.find(part, start, end) if part else start
        if j < 0 and key == "content":
            return None
        if j >= 0:
            start = j + len(part)
    return start


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
    parts: dict[tuple[int, bool], str] = {}  # (k, gen) -> text of msgs[:k], rendered once

    def prefix(k: int, gen: bool) -> str:
        if (k, gen) in parts:
            return parts[k, gen]
        part = t.text(msgs[:k], gen, tools)
        eos = "" if gen else getattr(t.tok, "special_tokens", {}).get("eos_token") or ""
        if (eos and not text.startswith(part) and part.endswith(eos)
                and text.startswith(part[: -len(eos)])):  # fmt: skip
            # Phi-3/Phi-4-mini end a render without the generation prompt with EOS
            # ({% else %}{{ eos_token }}): the turns before it are the prefix; only the close is
            # the render's own
            part = part[: -len(eos)]
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
        parts[k, gen] = part
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
        k0, end = prompt_ids(i, True), len(prefix(i + 1, False))
        # the turn's end: the first stop id after the answer's text, not after its start (an
        # answer may spell a stop token, "<|im_end|>", which the tokenizer makes that id)
        c = _content_end(text, len(prefix(i, True)), end, m)
        said = (m["content"] or "") + (m.get("reasoning_content") or "")
        if c is None and any(j in stops for j in t.tok.encode(said)):
            raise FormatError("stop_in_content", f"assistant turn {i} holds a stop token's "
                              f"text and the chat template {t.describe()} does not render it "
                              "as it is, so where the turn ends cannot be located")  # fmt: skip
        after = k0 if c is None else max(k0, at(c))  # (None: no stop id inside the content)
        stop = next((j for j in range(after, at(end)) if ids[j] in stops), None)
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
