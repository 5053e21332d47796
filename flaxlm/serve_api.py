"""The OpenAI API of `python -m flaxlm.serve` as plain data: request bodies parsed and checked
into `CompletionRequest` / `ChatRequest`, errors as `ApiError` (OpenAI's error object), and the
logprobs objects of a response built from per-token values. No jax and no model here: what the
server (flaxlm/serve.py) does with a request is there, what a request may say is here.

Checks follow OpenAI's documented ranges where flaxlm can honour them, and refuse the rest by
name rather than ignore it: a field this server does not know (a typo: "temprature") is a 400
listing the unknown fields; a known OpenAI field the server does not implement is accepted only
at a value that changes nothing (`null`, `logit_bias: {}`, `best_of` equal to `n`, ...).
A JSON `null` reads as the field left out, as OpenAI's API reads it.
"""

from __future__ import annotations

import dataclasses
import json
import math

# The sampling fields both endpoints take (vLLM's top_k, min_p and repetition_penalty too).
_SAMPLING = ("model", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
             "presence_penalty", "frequency_penalty", "top_k", "min_p", "repetition_penalty",
             "stream", "user")  # fmt: skip
COMPLETION_FIELDS = frozenset(_SAMPLING + ("prompt", "logprobs", "echo"))
CHAT_FIELDS = frozenset(_SAMPLING + ("messages", "max_completion_tokens", "logprobs",
                                     "top_logprobs"))  # fmt: skip
# OpenAI fields not implemented, each accepted at the values that ask for nothing.
_INERT = {
    "best_of": lambda v, obj: v in (1, obj.get("n") or 1),
    "logit_bias": lambda v, obj: v == {},
    "suffix": lambda v, obj: v == "",
    "stream_options": lambda v, obj: False,  # (only null, read as absent, passes)
    "tools": lambda v, obj: v == [],
    "tool_choice": lambda v, obj: v == "none",
    "response_format": lambda v, obj: v == {"type": "text"},
    "parallel_tool_calls": lambda v, obj: isinstance(v, bool),
}
_INERT_COMPLETION = ("best_of", "logit_bias", "suffix", "stream_options")
_INERT_CHAT = ("logit_bias", "stream_options", "tools", "tool_choice", "response_format",
               "parallel_tool_calls")  # fmt: skip
MAX_N = 128  # choices per prompt; more is a typo or a job for a batch script
MAX_STOP = 16  # stop strings per request


class ApiError(Exception):
    """A request the server refuses: HTTP `status` and OpenAI's error object
    {"error": {"message", "type", "param", "code"}} (`body`)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.param, self.kind, self.code = status, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What both endpoints ask of the decoder. `max_tokens` None: the rest of the context (chat's
    default); `logprobs` None: none reported, else the alternatives per token (0..)."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    prompts: list  # each a str or a list of token ids
    echo: bool
    sampling: Sampling


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    messages: list  # [{"role", "content": str}, ...]
    sampling: Sampling


def parse_json(body: bytes) -> dict:
    """The request body as a JSON object; malformed JSON (its line, column and character
    position), NaN/Infinity (not JSON) or another type is an ApiError."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(f"the request body is not UTF-8 (byte {e.start})") from None

    def no_constant(name):  # Python's json reads NaN and Infinity; JSON has neither
        raise ValueError(f"{name} is not valid JSON")

    try:
        obj = json.loads(text, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise ApiError(f"malformed JSON body: {e.msg} at line {e.lineno} column {e.colno} "
                       f"(char {e.pos})") from None  # fmt: skip
    except ValueError as e:
        raise ApiError(f"malformed JSON body: {e}") from None
    if not isinstance(obj, dict):
        raise ApiError(f"the request body must be a JSON object, got {_kind(obj)}")
    return obj


def _kind(v) -> str:
    """A JSON value's type as JSON names it."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(v), type(v).__name__)


def _fields(obj: dict, allowed: frozenset, inert: tuple) -> dict:
    """`obj` less its nulls, after refusing unknown fields (all of them named) and OpenAI
    fields that would ask for what the server does not do."""
    unknown = sorted(k for k in obj if k not in allowed and k not in inert)
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise ApiError(f"unknown field(s) {names}; this endpoint takes "
                       f"{', '.join(sorted(allowed))}", unknown[0])  # fmt: skip
    for k in inert:
        if obj.get(k) is not None and not _INERT[k](obj[k], obj):
            raise ApiError(f"{k}={json.dumps(obj[k])} is not supported by flaxlm.serve", k)
    return {k: v for k, v in obj.items() if v is not None and k not in inert}


def _int(obj: dict, key: str, default, lo=None, hi=None, why: str = ""):
    if key not in obj:
        return default
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(f"{key} must be an integer, got {_kind(v)}", key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        span = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
        raise ApiError(f"{key} must be {span}{why}, got {v}", key)
    return v


def _number(obj: dict, key: str, default: float, ok, span: str) -> float:
    v = obj.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(f"{key} must be a number, got {_kind(v)}", key)
    if not (math.isfinite(v) and ok(v)):
        raise ApiError(f"{key} must be {span}, got {v}", key)
    return float(v)


def _bool(obj: dict, key: str, default: bool) -> bool:
    v = obj.get(key, default)
    if not isinstance(v, bool):
        raise ApiError(f"{key} must be true or false, got {_kind(v)}", key)
    return v


def _stop(obj: dict) -> tuple[str, ...]:
    v = obj.get("stop", [])
    v = [v] if isinstance(v, str) else v
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ApiError("stop must be a string or an array of strings", "stop")
    if any(not s for s in v):
        raise ApiError("stop strings must be non-empty", "stop")
    if len(v) > MAX_STOP:
        raise ApiError(f"at most {MAX_STOP} stop strings, got {len(v)}", "stop")
    return tuple(dict.fromkeys(v))


def _model(obj: dict, model_name: str) -> None:
    name = obj.get("model", model_name)
    if not isinstance(name, str):
        raise ApiError(f"model must be a string, got {_kind(name)}", "model")
    if name != model_name:
        raise ApiError(f"the model {name!r} does not exist; this server serves {model_name!r}",
                       "model", 404, code="model_not_found")  # fmt: skip


def _penalty(p: float) -> bool:  # OpenAI's range for presence and frequency penalties
    return -2 <= p <= 2


def _positive(r: float) -> bool:
    return r > 0


def _sampling(obj: dict, max_tokens, logprobs, vocab_size: int) -> Sampling:
    """The sampling fields (OpenAI's ranges; top_k -1 or 0: off, as vLLM reads it)."""
    top_k = _int(obj, "top_k", 0, lo=-1, hi=vocab_size, why=" (the model's vocabulary)")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(obj, "temperature", 1.0, lambda t: t >= 0, ">= 0 (0: greedy)"),
        top_p=_number(obj, "top_p", 1.0, lambda p: 0 < p <= 1, "in (0, 1]"),
        top_k=max(top_k, 0),
        min_p=_number(obj, "min_p", 0.0, lambda p: 0 <= p < 1, "in [0, 1)"),
        n=_int(obj, "n", 1, lo=1, hi=MAX_N),
        stop=_stop(obj),
        seed=_int(obj, "seed", None, lo=-(2**63), hi=2**63 - 1),
        presence_penalty=_number(obj, "presence_penalty", 0.0, _penalty, "in [-2, 2]"),
        frequency_penalty=_number(obj, "frequency_penalty", 0.0, _penalty, "in [-2, 2]"),
        repetition_penalty=_number(obj, "repetition_penalty", 1.0, _positive, "> 0 (1: off)"),
        logprobs=logprobs,
    )


def _common(obj: dict, model_name: str) -> None:
    if obj.get("stream", False) is not False:
        if obj["stream"] is True:
            raise ApiError("stream is not supported by flaxlm.serve: send stream: false (or "
                           "leave it out) for the whole response at once", "stream")  # fmt: skip
        _bool(obj, "stream", False)
    if not isinstance(obj.get("user", ""), str):
        raise ApiError(f"user must be a string, got {_kind(obj['user'])}", "user")
    _model(obj, model_name)


def parse_completion(obj: dict, model_name: str, vocab_size: int, max_logprobs: int):
    """A /v1/completions body as a CompletionRequest (module docstring for what is refused)."""
    obj = _fields(obj, COMPLETION_FIELDS, _INERT_COMPLETION)
    _common(obj, model_name)
    echo = _bool(obj, "echo", False)
    prompts = _prompts(obj, vocab_size)
    max_tokens = _int(obj, "max_tokens", 16, lo=0)
    if max_tokens == 0 and not echo:
        raise ApiError("max_tokens must be >= 1 (0, a scoring call, needs echo: true)",
                       "max_tokens")  # fmt: skip
    logprobs = _int(obj, "logprobs", None, lo=0, hi=max_logprobs,
                    why=" (the server's --max_logprobs)")  # fmt: skip
    return CompletionRequest(prompts, echo, _sampling(obj, max_tokens, logprobs, vocab_size))


def _prompts(obj: dict, vocab_size: int) -> list:
    """`prompt`: a string, strings, token ids, or lists of token ids, as a list of prompts."""
    if "prompt" not in obj:
        raise ApiError("prompt is required", "prompt")
    p = obj["prompt"]
    if isinstance(p, str):
        return [p]
    if not isinstance(p, list) or not p:
        raise ApiError("prompt must be a string, an array of strings, an array of token ids "
                       "or an array of arrays of token ids (non-empty)", "prompt")  # fmt: skip
    if all(isinstance(x, str) for x in p):
        return list(p)
    if all(_is_id(x) for x in p):
        return [_checked_ids(p, "prompt", vocab_size)]
    if all(isinstance(x, list) for x in p):
        return [_checked_ids(x, f"prompt[{i}]", vocab_size) for i, x in enumerate(p)]
    raise ApiError("prompt mixes types: give strings, token ids or arrays of token ids, one "
                   "kind", "prompt")  # fmt: skip


def _is_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _checked_ids(ids: list, where: str, vocab_size: int) -> list[int]:
    if not ids:
        raise ApiError(f"{where} is an empty array of token ids", "prompt")
    for j, t in enumerate(ids):
        if not _is_id(t):
            raise ApiError(f"{where}[{j}] must be a token id (an integer), got {_kind(t)}",
                           "prompt")  # fmt: skip
        if not 0 <= t < vocab_size:
            raise ApiError(f"{where}[{j}] = {t} is outside the model's vocabulary [0, "
                           f"{vocab_size})", "prompt")  # fmt: skip
    return list(ids)


def parse_chat(obj: dict, model_name: str, vocab_size: int, max_logprobs: int) -> ChatRequest:
    """A /v1/chat/completions body as a ChatRequest (module docstring for what is refused)."""
    obj = _fields(obj, CHAT_FIELDS, _INERT_CHAT)
    _common(obj, model_name)
    messages = _messages(obj)
    key = "max_completion_tokens" if "max_completion_tokens" in obj else "max_tokens"
    if "max_completion_tokens" in obj and "max_tokens" in obj:
        raise ApiError("give max_tokens or max_completion_tokens, not both", "max_tokens")
    max_tokens = _int(obj, key, None, lo=1)
    top = _int(obj, "top_logprobs", None, lo=0, hi=max_logprobs,
               why=" (the server's --max_logprobs)")  # fmt: skip
    wants = _bool(obj, "logprobs", False)
    if top is not None and not wants:
        raise ApiError("top_logprobs needs logprobs: true", "top_logprobs")
    sampling = _sampling(obj, max_tokens, (top or 0) if wants else None, vocab_size)
    return ChatRequest(messages, sampling)


def _messages(obj: dict) -> list[dict]:
    """`messages` as [{"role", "content": text}]: a content of text parts is joined; other
    part types, tool calls and keys the chat template would not render are refused."""
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError("messages must be a non-empty array of {role, content} objects",
                       "messages")  # fmt: skip
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(f"{where} must be an object, got {_kind(m)}", "messages")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise ApiError(f"{where} has field(s) {extra} that flaxlm.serve does not render; "
                           "a message is {role, content}", "messages")  # fmt: skip
        if not isinstance(m.get("role"), str):
            raise ApiError(f"{where}.role must be a string", "messages")
        out.append({"role": m["role"], "content": _content(m.get("content"), where)})
    return out


def _content(c, where: str) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                   and isinstance(p.get("text"), str) for p in c):  # fmt: skip
        return "".join(p["text"] for p in c)
    raise ApiError(f"{where}.content must be a string or an array of text parts "
                   '[{"type": "text", "text": ...}]', "messages")  # fmt: skip


# --- response pieces ------------------------------------------------------------------------


def logprob_value(x) -> float:
    """A logprob as JSON can hold it: the shortest decimal that reads back as the same float32
    (as generate --json writes them); -inf (JSON has none) as -9999.0, vLLM's stand-in."""
    import numpy as np

    x = float(str(np.float32(x)))
    return x if math.isfinite(x) else -9999.0


def legacy_logprobs(entries: list, start: int = 0) -> dict:
    """/v1/completions' `logprobs` of tokens `entries`: each (text, logprob, [(text, logprob),
    ...] the alternatives most likely first), or (text, None, None) for a prompt's first token
    (echo). `text_offset`: where each token's text starts, counting the token texts' characters
    from `start` (the echoed prompt's length, for the generated tokens). A position's
    `top_logprobs` holds its alternatives and the token itself, up to K + 1 entries as OpenAI
    documents them (one per distinct text; the more likely first)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    at = start
    for text, lp, top in entries:
        out["tokens"].append(text)
        out["text_offset"].append(at)
        at += len(text)
        out["token_logprobs"].append(None if lp is None else logprob_value(lp))
        if top is None:
            out["top_logprobs"].append(None)
            continue
        alts: dict = {}
        for t, v in [*top, (text, lp)]:
            alts.setdefault(t, logprob_value(v))
        out["top_logprobs"].append(alts)
    return out


def chat_logprobs(entries: list) -> dict:
    """/v1/chat/completions' `logprobs`: {"content": [{"token", "logprob", "bytes",
    "top_logprobs": [{"token", "logprob", "bytes"}, ...]}]} of `entries` as `legacy_logprobs`
    takes them (every one with its logprob)."""

    def one(text, lp) -> dict:
        return {"token": text, "logprob": logprob_value(lp), "bytes": list(text.encode())}

    return {"content": [{**one(t, lp), "top_logprobs": [one(a, b) for a, b in top]}
                        for t, lp, top in entries]}  # fmt: skip
