"""An OpenAI-compatible HTTP server for one flaxlm run or HF checkpoint directory, for the clients
that speak vLLM's API: lm-evaluation-harness (`local-completions`, `local-chat-completions`),
chat UIs, RL environments.

    python -m flaxlm.serve runs/sft --port 8000      # http://127.0.0.1:8000/v1
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "Kavo lives in", "max_tokens": 16, "temperature": 0}'

Endpoints: GET /v1/models, GET /health, POST /v1/completions, POST /v1/chat/completions. The
model is loaded as `python -m flaxlm.generate` loads it (`--tokenizer`, `--step`, `--ema`,
`--dtype`, `--chat_template_kwargs`; `--mesh`/`--sharding` split it over this host's devices)
and decoded by `models.decode.generate`; the request fields (flaxlm/serve_api.py checks them):

  both       model (absent, or --served_model_name: the run directory's name by default),
             max_tokens, temperature (default 1; 0 = greedy), top_p, n, stop (a string or up to
             16: the text is cut before the first one found, finish_reason "stop"), seed,
             presence_penalty, frequency_penalty, and vLLM's top_k, min_p, repetition_penalty
  completions  prompt (a string, strings, token ids or lists of token ids; a string gets the
             BOS the tokenizer adds, as generate's plain prompts; ids are used as given),
             max_tokens (default 16), logprobs K (0..--max_logprobs: per token its logprob and
             the K most likely alternatives, the legacy tokens / token_logprobs / top_logprobs /
             text_offset), echo (the prompt's text first; with logprobs its tokens' logprobs
             too, the first null). `echo: true, max_tokens: 0` scores the prompt and decodes
             nothing (lm-eval-harness's loglikelihood requests send max_tokens 1 and drop the
             last token: both work).
  chat       messages, rendered as `generate --chat` renders a prompt (the tokenizer's Jinja
             chat template, else flaxlm's; the template's end-of-turn tokens end the answer;
             a conversation the template refuses is a 400 naming it), max_tokens or
             max_completion_tokens (default: the rest of the model's context), logprobs (bool)
             with top_logprobs K.
Choices are ordered prompt-major, then the n samples of each. `usage` counts each prompt once
and every generated token of every choice, the stop token included.

What differs from OpenAI (and vLLM):
  * `"stream": true` is refused (400): responses come whole.
  * logprobs are the model's at temperature 1, whatever temperature, top-k/p or penalty the
    token was drawn with (models/decode.py, "Logprobs"), and list every generated token: the
    stop token that ended a choice too (the text leaves it out; an RL trainer needs its
    logprob) and the tokens of a cut stop string. A position's legacy `top_logprobs` dict holds
    its K alternatives and the token itself, keyed by token text. `text_offset` counts token
    texts' characters (a token's text as it reads mid-text, models/stop_strings.py
    `token_text`) from the end of the echoed prompt; within an echoed prompt, those can differ
    from the prompt's own characters around BOS and SentencePiece's leading spaces.
  * Unknown fields are a 400 that lists them (a typo is never ignored); OpenAI fields the
    server does not implement (logit_bias, best_of, suffix, tools, ...) pass only at values
    that ask for nothing. No tool calls, no multimodal content, no chat `echo`.
  * seed: the samples of prompt i of a request come from fold_in(PRNGKey(seed), i) and sample
    k of it from fold_in(that, k): `generate --seed S --num_samples K` draws the same ones.
    Without a seed each request draws a fresh one.
  * A prompt whose tokens plus max_tokens exceed the model's max_seq_len is a 400 naming both
    numbers; nothing is truncated.

Serving: one model in one process. ThreadingHTTPServer accepts connections concurrently; the
devices run one call at a time, under one lock (GET /health and /v1/models answer meanwhile).
Requests that decode (completions with max_tokens >= 1, chat) are queued, and one worker thread
(flaxlm/serve_batch.py) runs concurrent ones as one batched `generate` call when they agree on
every value generate takes once per call: temperature, top_k, top_p, min_p, the penalties, n,
the stop tokens and strings, and the top-logprobs K bucket (`_batch_key`). Prompts, seeds and
max_tokens may differ: the batch decodes to the largest max_tokens bucket and each request's
rows are cut to its own (finish_reason "length" as if alone), and each prompt samples from its
own request's keys (above, seed), so a request draws the tokens it draws alone, up to the
float rounding of another program ("Compilation", the last sentence). A batch starts with the
oldest request, takes the compatible ones queued behind it while their rows (prompts x n) fit
--max_batch_rows (64; a bigger request runs alone), and waits --batch_wait_ms (5; 0: not at
all) for more before it runs; requests arriving while a batch runs join the next. An exception
in a batch is a 500 for each of its requests; the worker serves on. Not batched: prompt
scoring (echo with logprobs; `max_tokens: 0` decodes nothing), one forward under the lock.

Compilation: decode programs are compiled per shape, so a request's shape is rounded up to a
few buckets, and a stream of requests of varying sizes reuses a handful of programs: the
prompts to a power of two (rows past the batch's repeat its last prompt and are dropped),
max_tokens (a batch's largest) to a power of two (the output is cut back to the max_tokens
asked, finish_reason "length"; the steps dropped may run past max_seq_len, where RoPE
extrapolates, but the tokens kept never attend to them), the top-logprobs K to a power of
two; prompt lengths are bucketed by `generate` itself (powers of two from 8). Prompt scoring
(echo with logprobs) runs one jitted forward per (rows, length, K) bucket. The first request
of each bucket logs "compiling ..." and its time to stderr. Greedy and seeded tokens can
differ from another bucket's (or batch's) in a near tie (models/decode.py, "Sampling noise":
up to float rounding).

Requests are served by `handle(state, method, path, body)` -> (status, JSON object), which the
HTTP handler wraps (testable without sockets). A bad request is a 400 (malformed JSON with its
position, a field of the wrong type or out of range, an id outside the vocabulary; a wrong
path 404, a wrong method 405) in OpenAI's error shape {"error": {"message", "type", "param",
"code"}}; an exception while serving is a 500 with its message (the traceback on stderr), and
the server serves on.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import secrets
import sys
import threading
import time
import traceback
import uuid
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from flaxlm.serve_api import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Sampling,
    chat_logprobs,
    legacy_logprobs,
    parse_chat,
    parse_completion,
    parse_json,
)
from flaxlm.serve_batch import Batcher

MAX_BODY = 64 << 20  # bytes of a request body
SCORE_TOKENS = 8192  # about how many tokens one scoring forward holds (rows x length)
STOP_CACHE = 32  # stop-string tables kept (each decodes the vocabulary once to build)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _log(msg: str) -> None:
    print(f"flaxlm.serve: {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass(eq=False)
class ServeState:
    """The model a server serves and what it remembers between requests: the program shapes
    run so far (`programs`: key -> seconds of its first call, compile included) and the stop
    strings' tables. `lock` serialises the device work; `tok_lock` the tokenizer's (request
    threads encode and decode text concurrently). `batcher` queues the decode requests and
    runs compatible ones as one `generate` call (module docstring, "Serving")."""

    cfg: Any
    params: Any
    tok: Any
    model_name: str
    max_logprobs: int = 20
    mesh: Any = None
    rules: Any = None
    cache_dtype: str | None = None
    quantize: str = "none"
    log: Any = _log
    max_batch_rows: int = 64
    batch_wait_ms: float = 5.0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    tok_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    programs: dict = dataclasses.field(default_factory=dict)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        from flaxlm.models.stop_strings import token_text

        self.max_logprobs = min(self.max_logprobs, self.cfg.vocab_size)
        self.text_of = token_text(self.tok)
        self._stops: collections.OrderedDict = collections.OrderedDict()
        self.batcher = Batcher(functools.partial(_decode_batch, self), self.lock,
                               self.max_batch_rows, self.batch_wait_ms / 1000,
                               log=lambda msg: self.log(msg))  # fmt: skip


# --- the device work ------------------------------------------------------------------------


def _timed(state: ServeState, key: tuple, call):
    """`call()`, logging the first call of each program shape `key` (it compiles) with its
    seconds."""
    if key in state.programs:
        return call()
    state.log(f"compiling {key[0]} program {dict(key[1:])}")
    start = time.perf_counter()
    out = call()
    state.programs[key] = time.perf_counter() - start
    state.log(f"{key[0]} program compiled and ran in {state.programs[key]:.1f} s "
              f"({len(state.programs)} programs)")  # fmt: skip
    return out


def _stop_strings(state: ServeState, strings: tuple):
    """The StopStrings tables of `strings` (None for none), kept for the next request with the
    same ones: building them decodes the whole vocabulary."""
    if not strings:
        return None
    from flaxlm.models.stop_strings import StopStrings

    if strings not in state._stops:
        state._stops[strings] = StopStrings.build(state.tok, list(strings), state.cfg.vocab_size)
        if len(state._stops) > STOP_CACHE:
            state._stops.popitem(last=False)
    state._stops.move_to_end(strings)
    return state._stops[strings]


def seed_key(seed: int):
    """PRNGKey(seed) for a seed of up to 64 bits: the low 32 bits as jax reads them (a seed
    < 2**32 gives generate --seed's key), the high 32 folded in when set (jax without x64
    drops them: 2**32 + 1 and 1 would draw alike)."""
    import jax

    key = jax.random.PRNGKey(seed & 0xFFFFFFFF)
    high = (seed >> 32) & 0xFFFFFFFF
    return jax.random.fold_in(key, high) if high else key


@dataclasses.dataclass
class Row:
    """One choice's generated tokens (cut to max_tokens), their logprobs and, per token, the
    alternatives [(id, logprob), ...] most likely first."""

    ids: list
    logprobs: list
    top: list


@dataclasses.dataclass(eq=False)
class _Work:
    """One request's decode, as it waits in the batcher's queue: its prompts (token ids),
    sampling, max_tokens, stop ids and stop-string tables, and seed."""

    prompts: list
    s: Sampling
    max_tokens: int
    stops: tuple
    strings: Any
    seed: int


def _top_k(state: ServeState, logprobs: int | None) -> int:
    """The top-logprobs K a decode program computes: `logprobs` up to a power of two."""
    return min(_pow2(logprobs), state.cfg.vocab_size) if logprobs else 0


def _batch_key(state: ServeState, s: Sampling, stops: tuple) -> tuple:
    """What requests must share to decode in one `generate` call: every value generate takes
    once per call (temperature, top_k/p, min_p, penalties, n, stop tokens and strings) and the
    top-logprobs K the program computes. The per-row values may differ: prompts, seeds
    (each request's own keys) and max_tokens (the batch runs to the largest bucket, each
    request cut to its own)."""
    per_call = dataclasses.replace(s, max_tokens=None, seed=None, logprobs=None)
    return per_call, tuple(stops), _top_k(state, s.logprobs)


def _decode(state: ServeState, prompts: list, s: Sampling, max_tokens: int, stops, seed: int):
    """The rows (prompt-major, s.n per prompt) of a request's prompts, decoded by the batcher
    in one `generate` call with the compatible requests queued beside it (blocks until then).
    The stop-string tables are built here, on the request's thread, under the tokenizer lock."""
    with state.tok_lock:
        strings = _stop_strings(state, s.stop)
    work = _Work(prompts, s, max_tokens, tuple(stops), strings, seed)
    return state.batcher.submit(_batch_key(state, s, work.stops), len(prompts) * s.n, work)


def _decode_batch(state: ServeState, works: list) -> list:
    """Per request of `works` (equal `_batch_key`s), its rows: one `generate` call over all
    their prompts, bucketed (module docstring, "Compilation"). Each prompt samples from its
    own request's keys, prompt_keys(seed_key(seed), its index in the request), wherever it
    sits in the batch; each request's rows are cut to its own max_tokens and K."""
    import jax
    import numpy as np

    from flaxlm.models.decode import prompt_bucket, prompt_keys

    s, stops, strings = works[0].s, works[0].stops, works[0].strings
    prompts = [p for w in works for p in w.prompts]
    B, G = len(prompts), s.n
    idx = list(range(B)) + [B - 1] * (_pow2(B) - B)  # (the rows past B are dropped)
    keys = jax.numpy.concatenate([prompt_keys(seed_key(w.seed), range(len(w.prompts)))
                                  for w in works])[np.asarray(idx)]  # fmt: skip
    longest = max(len(p) for p in prompts)
    N = _pow2(max(w.max_tokens for w in works))  # (steps past a max_tokens are dropped)
    K = _top_k(state, s.logprobs)
    penalized = (s.repetition_penalty != 1 or s.frequency_penalty != 0
                 or s.presence_penalty != 0)  # fmt: skip
    key = ("decode", ("rows", len(idx)), ("prompt_bucket", prompt_bucket(longest)),
           ("max_new_tokens", N), ("n", G), ("greedy", s.temperature == 0),
           ("top_k", s.top_k), ("top_p", s.top_p < 1), ("min_p", s.min_p > 0),
           ("penalties", penalized), ("stop_tokens", len(stops) and _pow2(max(len(stops), 4))),
           ("stop_strings", None if strings is None else strings.table.shape[:2]),
           ("top_logprobs", K))  # fmt: skip

    def call():
        with warnings.catch_warnings():  # (past max_seq_len only where the output is dropped)
            warnings.filterwarnings("ignore", "generate: prompt .* past the model's max_seq_len")
            out = _generate(state, [prompts[i] for i in idx], s, N, keys, stops, strings, G, K)
        tops = (out.top_ids, out.top_logprobs) if K else ()
        return jax.device_get((out.tokens, out.logprobs, out.lengths, *tops))

    toks, lps, lengths, *tops = _timed(state, key, call)
    out, start = [], 0
    for w in works:
        rows = []
        for r in range(start, start + len(w.prompts) * G):
            n = min(int(lengths[r]), w.max_tokens)
            top = [[]] * n
            if K:
                k = w.s.logprobs
                top = [list(zip(tops[0][r, j, :k].tolist(), tops[1][r, j, :k]))
                       for j in range(n)]  # fmt: skip
            rows.append(Row([int(t) for t in toks[r, :n]], list(lps[r, :n]), top))
        out.append(rows)
        start += len(w.prompts) * G
    return out


def _generate(state: ServeState, prompts, s: Sampling, N: int, keys, stops, strings, G, K):
    """`generate` over the bucketed batch, each prompt's samples from its key in `keys`."""
    from flaxlm.models.decode import generate

    return generate(
        state.cfg, state.params, prompts, max_new_tokens=N, rng=keys,
        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
        stop_tokens=stops, pad_id=0, mesh=state.mesh, rules=state.rules,
        cache_dtype=state.cache_dtype, quantize=state.quantize, num_samples=G,
        stop_strings=strings, repetition_penalty=s.repetition_penalty,
        frequency_penalty=s.frequency_penalty, presence_penalty=s.presence_penalty,
        top_logprobs=K,
    )  # fmt: skip


@functools.lru_cache(maxsize=8)
def _score_fn(cfg, k: int, mesh=None, rules=None):
    """Jitted (params, tokens (B, T)) -> (logprob of tokens[:, 1:], their top-k ids, logprobs),
    each (B, T - 1[, k]): the prompt scoring of echo. A mixture of experts scores dropless, as
    `generate` decodes it and evaluation/loglik.py scores. (mesh, rules: cache keys; the model
    reads the rules when traced.)"""
    del mesh, rules
    import jax

    from flaxlm.models.sampling import top_tokens
    from flaxlm.models.transformer import forward
    from flaxlm.train.losses import token_logprobs

    cfg = cfg.replace(moe_capacity_factor=0.0)

    def score(params, tokens):
        logits = forward(cfg, params, tokens)[:, :-1]
        B, T, V = logits.shape
        ids, top = top_tokens(logits.reshape(B * T, V), k)
        return token_logprobs(logits, tokens[:, 1:]), ids.reshape(B, T, k), top.reshape(B, T, k)

    return jax.jit(score)


def _score(state: ServeState, prompts: list, k: int) -> list:
    """Per prompt, per token after the first: (logprob, [(id, logprob), ...] its k most likely
    alternatives). Rows are right-padded to a power-of-two length (<= max_seq_len) and batched
    about SCORE_TOKENS tokens at a time, in power-of-two row counts."""
    import jax
    import numpy as np

    from flaxlm.models.sharding import batch_divisor, fetch, global_batch, use_mesh

    cfg = state.cfg
    K = min(_pow2(max(k, 1)), cfg.vocab_size)
    T = min(max(_pow2(max(len(p) for p in prompts)), 16), cfg.max_seq_len)
    rules = tuple(state.rules or ()) if state.mesh is not None else ()
    fn = _score_fn(cfg, K, state.mesh, rules)
    per = 1 << (max(1, SCORE_TOKENS // T).bit_length() - 1)
    out = []
    for start in range(0, len(prompts), per):
        chunk = prompts[start : start + per]
        rows = _pow2(len(chunk))
        if state.mesh is not None:
            rows += -rows % batch_divisor(state.mesh)
        tokens = np.zeros((rows, T), np.int32)  # (padding id 0: in the table, never attended)
        for r, p in enumerate(chunk):
            tokens[r, : len(p)] = p

        def call(tokens=tokens):
            if state.mesh is None:
                return jax.device_get(fn(state.params, tokens))
            with use_mesh(state.mesh, rules):
                return fetch(fn(state.params, global_batch({"t": tokens}, state.mesh)["t"]))

        key = ("score", ("rows", rows), ("length", T), ("top_logprobs", K))
        lp, ids, top = _timed(state, key, call)
        for r, p in enumerate(chunk):
            n = len(p) - 1
            out.append([(lp[r, j], list(zip(ids[r, j, :k].tolist(), top[r, j, :k])))
                        for j in range(n)])  # fmt: skip
    return out


# --- the endpoints --------------------------------------------------------------------------


def _check_context(state: ServeState, prompts: list, max_tokens: int, param: str) -> None:
    """A 400 for the first prompt whose tokens plus max_tokens pass the model's max_seq_len."""
    limit = state.cfg.max_seq_len
    for i, p in enumerate(prompts):
        if len(p) + max_tokens > limit:
            what = "the messages render to" if param == "messages" else f"prompt {i} has"
            raise ApiError(f"{what} {len(p)} tokens and max_tokens is {max_tokens}: "
                           f"{len(p) + max_tokens} > the model's context of {limit} tokens "
                           "(max_seq_len)", param)  # fmt: skip


def _finish(state: ServeState, row: Row, stops, strings) -> tuple[str, str]:
    """(text, finish_reason) of a row as `generate` prints a completion: the stop token left
    out, the text cut before the first stop string found."""
    stopped = bool(row.ids) and row.ids[-1] in stops
    text = state.tok.decode(row.ids[:-1] if stopped else row.ids)
    cut = min((i for i in (text.find(s) for s in strings) if i >= 0), default=-1)
    if cut >= 0:
        text, stopped = text[:cut], True
    return text, "stop" if stopped else "length"


def _entries(state: ServeState, row: Row) -> list:
    """A row's tokens as (text, logprob, [(text, logprob), ...]) for the logprobs objects."""
    t = state.text_of
    return [(t(i), lp, [(t(a), b) for a, b in top])
            for i, lp, top in zip(row.ids, row.logprobs, row.top)]  # fmt: skip


def _prompt_entries(state: ServeState, ids: list, scored: list) -> list:
    """A prompt's tokens for echo's logprobs: the first without a logprob (null)."""
    t = state.text_of
    head = [(t(ids[0]), None, None)]
    return head + [(t(i), lp, [(t(a), b) for a, b in top]) for i, (lp, top) in
                   zip(ids[1:], scored)]  # fmt: skip


def _seed(s: Sampling) -> int:
    return s.seed if s.seed is not None else secrets.randbits(32)


def _usage(prompts: list, rows: list) -> dict:
    p, c = sum(len(x) for x in prompts), sum(len(r.ids) for r in rows)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def complete(state: ServeState, req: CompletionRequest) -> dict:
    """The /v1/completions response of a checked request (module docstring): its decode
    queued for a batch, its scoring (echo with logprobs) under the device lock, its text
    under the tokenizer lock."""
    from flaxlm.generate import encode_prompts

    tok, s = state.tok, req.sampling
    strs = [p for p in req.prompts if isinstance(p, str)]
    with state.tok_lock:
        encoded, stops = encode_prompts(tok, strs, chat=False)
    it = iter(encoded)
    prompts = [next(it) if isinstance(p, str) else p for p in req.prompts]
    for i, ids in enumerate(prompts):
        if not ids:
            raise ApiError(f"prompt {i} encodes to no tokens", "prompt")
    _check_context(state, prompts, s.max_tokens, "prompt")
    seed = _seed(s)
    if s.max_tokens:
        rows = _decode(state, prompts, s, s.max_tokens, stops, seed)
    else:  # echo: a scoring call, nothing decoded
        rows = [Row([], [], []) for _ in range(len(prompts) * s.n)]
    scored = None
    if req.echo and s.logprobs is not None:  # (not batched: one forward per call)
        with state.lock:
            scored = _score(state, prompts, s.logprobs)
    with state.tok_lock:
        choices = _completion_choices(state, req, prompts, rows, stops, scored)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": state.model_name, "choices": choices,
            "usage": _usage(prompts, rows)}  # fmt: skip


def _completion_choices(state: ServeState, req, prompts, rows, stops, scored) -> list:
    """The choices of a /v1/completions response: rows' text, echo and logprobs."""
    tok, s = state.tok, req.sampling
    choices = []
    for r, row in enumerate(rows):
        i = r // s.n
        text, reason = _finish(state, row, stops, s.stop)
        head = ""
        if req.echo:
            given = req.prompts[i]
            head = given if isinstance(given, str) else tok.decode(prompts[i])
        lp = None
        if s.logprobs is not None:  # (the generated tokens' offsets count from the echo's end)
            lp = legacy_logprobs(_entries(state, row), len(head))
            if scored is not None:
                echoed = legacy_logprobs(_prompt_entries(state, prompts[i], scored[i]))
                lp = {k: echoed[k] + v for k, v in lp.items()}
        text = head + text
        choices.append({"index": r, "text": text, "logprobs": lp, "finish_reason": reason})
    return choices


def chat(state: ServeState, req: ChatRequest) -> dict:
    """The /v1/chat/completions response of a checked request (module docstring): its decode
    queued for a batch, its text under the tokenizer lock."""
    from flaxlm.generate import encode_prompts

    s = req.sampling
    try:
        with state.tok_lock:
            prompts, stops = encode_prompts(state.tok, [req.messages], chat=True)
    except ValueError as e:  # the template's own error, or no chat template at all
        name = getattr(state.tok, "name", "the tokenizer")
        raise ApiError(f"messages: the chat template of {name} cannot render them: {e}",
                       "messages") from None  # fmt: skip
    if not prompts[0]:
        raise ApiError("the messages render to no tokens", "messages")
    max_tokens = s.max_tokens or state.cfg.max_seq_len - len(prompts[0])
    if max_tokens < 1:
        raise ApiError(f"the messages render to {len(prompts[0])} tokens: no room is left in "
                       f"the model's context of {state.cfg.max_seq_len}", "messages")  # fmt: skip
    _check_context(state, prompts, max_tokens, "messages")
    rows = _decode(state, prompts, s, max_tokens, stops, _seed(s))
    choices = []
    with state.tok_lock:
        for g, row in enumerate(rows):
            text, reason = _finish(state, row, stops, s.stop)
            lp = chat_logprobs(_entries(state, row)) if s.logprobs is not None else None
            choices.append({"index": g, "message": {"role": "assistant", "content": text},
                            "logprobs": lp, "finish_reason": reason})  # fmt: skip
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": state.model_name, "choices": choices,
            "usage": _usage(prompts, rows)}  # fmt: skip


def _completions(state: ServeState, body: bytes) -> dict:
    vocab = state.cfg.vocab_size
    req = parse_completion(parse_json(body), state.model_name, vocab, state.max_logprobs)
    return complete(state, req)  # (complete takes the locks it needs: the batcher decodes)


def _chat(state: ServeState, body: bytes) -> dict:
    vocab = state.cfg.vocab_size
    req = parse_chat(parse_json(body), state.model_name, vocab, state.max_logprobs)
    return chat(state, req)


def _models(state: ServeState, body: bytes) -> dict:
    return {"object": "list", "data": [{"id": state.model_name, "object": "model",
            "created": state.created, "owned_by": "flaxlm",
            "max_model_len": state.cfg.max_seq_len}]}  # fmt: skip


def _health(state: ServeState, body: bytes) -> dict:
    return {"status": "ok"}


ROUTES = {
    "/v1/completions": ("POST", _completions),
    "/v1/chat/completions": ("POST", _chat),
    "/v1/models": ("GET", _models),
    "/health": ("GET", _health),
}


def handle(state: ServeState, method: str, path: str, body: bytes = b"") -> tuple[int, dict]:
    """(HTTP status, JSON object) of one request; never raises (module docstring)."""
    path = path.split("?", 1)[0].rstrip("/") or "/"
    try:
        if path not in ROUTES:
            raise ApiError(f"no such path {path!r}; this server answers "
                           f"{', '.join(ROUTES)}", status=404)  # fmt: skip
        want, fn = ROUTES[path]
        if method != want:
            raise ApiError(f"{method} {path}: method not allowed, use {want}", status=405)
        return 200, fn(state, body)
    except ApiError as e:
        return e.status, e.body()
    except Exception as e:  # a server-side failure: say what it was, keep serving
        state.log(f"{method} {path} failed:\n{traceback.format_exc()}")
        err = ApiError(f"internal error: {type(e).__name__}: {e}", status=500,
                       kind="server_error")  # fmt: skip
        return 500, err.body()


# --- HTTP -----------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """Reads the body (Content-Length), answers with `handle`'s JSON. HTTP/1.1: connections
    stay open between requests (aiohttp and requests pool them)."""

    protocol_version = "HTTP/1.1"
    server_version = "flaxlm.serve"

    def _answer(self, method: str) -> None:
        status, obj, close = self._read_and_handle(method)
        try:
            data = json.dumps(obj, ensure_ascii=False, allow_nan=False).encode()
        except ValueError as e:  # (a NaN or inf that escaped logprob_value)
            status, obj = 500, ApiError(f"internal error: {e}", kind="server_error").body()
            data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client left; the batch ran
            self.close_connection = True

    def _read_and_handle(self, method: str) -> tuple[int, dict, bool]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            err = ApiError("chunked request bodies are not supported: send Content-Length")
            return 411, err.body(), True
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_BODY:
            err = ApiError(f"Content-Length must be an integer in [0, {MAX_BODY}]")
            return (413 if n > MAX_BODY else 400), err.body(), True
        body = self.rfile.read(n)
        status, obj = handle(self.server.state, method, self.path, body)
        return status, obj, False

    def do_GET(self):
        self._answer("GET")

    def do_POST(self):
        self._answer("POST")

    def do_PUT(self):
        self._answer("PUT")

    def do_DELETE(self):
        self._answer("DELETE")

    def do_PATCH(self):
        self._answer("PATCH")


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer whose `server_close` also stops the state's batch worker (queued
    requests fail; a later request, e.g. through `handle`, starts a new worker)."""

    def server_close(self):
        super().server_close()
        self.state.batcher.stop()


def make_server(state: ServeState, host: str = "127.0.0.1", port: int = 8000):
    """A ThreadingHTTPServer serving `state` (port 0: a free port, `server.server_address`)."""
    server = _Server((host, port), _Handler)
    server.daemon_threads = True
    server.state = state
    return server


# --- command line ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from flaxlm.generate import DTYPES

    p = argparse.ArgumentParser(prog="python -m flaxlm.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("model", help="flaxlm run directory or HF checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    p.add_argument("--served_model_name", default="",
                   help="the model's name in the API (default: the directory's name)")  # fmt: skip
    p.add_argument("--max_logprobs", type=int, default=20,
                   help="the most alternatives per token a request may ask for")  # fmt: skip
    p.add_argument("--tokenizer", default="", help="tokenizer file or directory (default: auto)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--ema", action="store_true", help="the run's EMA weights")
    p.add_argument("--dtype", default="", choices=("", *DTYPES),
                   help="compute/param dtype (default: the checkpoint's)")  # fmt: skip
    p.add_argument("--chat_template_kwargs", default="",
                   help="JSON object of chat-template variables (default: the run's)")  # fmt: skip
    p.add_argument("--quantize", default="none", choices=("none", "int8"),
                   help="int8 projection weights (models/quant.py)")  # fmt: skip
    p.add_argument("--cache_dtype", default="", choices=("", "int8", "bfloat16", "float32"),
                   help="KV cache dtype ('' = the model's compute dtype)")  # fmt: skip
    p.add_argument("--mesh", default="",
                   help="split the model over this host's devices, e.g. fsdp=-1 "
                   "(flaxlm/cli_mesh.py; default: one device)")  # fmt: skip
    p.add_argument("--sharding", default="fsdp", choices=("dp", "fsdp", "fsdp_tp"),
                   help="logical-rules preset for --mesh")  # fmt: skip
    p.add_argument("--max_batch_rows", type=int, default=64,
                   help="the most rows (prompts x n) one batched decode call holds")  # fmt: skip
    p.add_argument("--batch_wait_ms", type=float, default=5.0,
                   help="how long a batch waits for more requests before it runs (0: no "
                   "wait; requests arriving during a batch join the next one anyway)")  # fmt: skip
    return p


def load_state(args) -> ServeState:
    """The ServeState of parsed command-line `args` (the model loaded as generate loads it)."""
    from flaxlm.cli_mesh import build_mesh
    from flaxlm.generate import load
    from flaxlm.models import quant
    from flaxlm.models.decode_options import check_weight_options, checked_cache_dtype

    mesh = rules = None
    if args.mesh:
        try:
            mesh, rules = build_mesh(args.mesh, args.sharding)
        except (ValueError, KeyError) as e:
            raise SystemExit(f"--mesh {args.mesh}: {e.args[0] if e.args else e}") from None
    cfg, params, tok = load(args.model, args.tokenizer, args.step, args.dtype,
                            args.chat_template_kwargs, args.ema, mesh, rules)  # fmt: skip
    try:
        check_weight_options(cfg, "xla", args.quantize, "xla", quant.is_quantized(params))
        cache_dtype = checked_cache_dtype(args.cache_dtype, cfg) if args.cache_dtype else None
    except ValueError as e:
        raise SystemExit(f"{args.model}: {e}") from None
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    return ServeState(cfg, params, tok, name, max_logprobs=args.max_logprobs, mesh=mesh,
                      rules=rules, cache_dtype=cache_dtype, quantize=args.quantize,
                      max_batch_rows=args.max_batch_rows,
                      batch_wait_ms=args.batch_wait_ms)  # fmt: skip


def main(argv=None) -> None:
    p = _parser()
    args = p.parse_args(argv)
    if args.max_logprobs < 0:
        p.error("--max_logprobs must be >= 0")
    if not 0 <= args.port < 65536:
        p.error("--port must be in [0, 65535]")
    if args.max_batch_rows < 1 or args.batch_wait_ms < 0:
        p.error("--max_batch_rows must be >= 1 and --batch_wait_ms >= 0")
    state = load_state(args)
    try:
        server = make_server(state, args.host, args.port)
    except OSError as e:  # (the port taken, an address not of this host)
        raise SystemExit(f"--host {args.host} --port {args.port}: {e}") from None
    host, port = server.server_address[:2]
    print(f"flaxlm.serve: {state.model_name} at http://{host}:{port}/v1 (max_seq_len "
          f"{state.cfg.max_seq_len}); Ctrl-C stops", flush=True)  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
