"""Stop strings inside the decode loop: a row ends at the first token after which its generated
text contains one of the strings (`generate(..., stop_strings=StopStrings.build(tok, [...]))`).

Few-shot generation tasks end an answer at "\\n\\n" or "\\n\\nQuestion:", and base models rarely
emit EOS: cutting the text after generating all `max_new_tokens` spends most of the decode on
text that is thrown away. Here the loop tracks, per row and string, how much of the string
the text ends with — a Knuth–Morris–Pratt automaton over characters, advanced a whole token at
a time: `table[s, q, t]` is the state after token t's text from state q (q = characters of
string s matched so far; q = len(s): found, absorbing). Built once per tokenizer and strings
on the host (numpy, all tokens at once); a step is one gather per row and string, so the
loop's "every row stopped" exit works for strings as it does for stop tokens.

Token texts: a token's text is what it adds to a decoded text — `decode([a, t])` after
`decode([a])` for a plain anchor token a (SentencePiece's word-start "▁" becomes the space it
decodes to in mid-text) — and the first generated token's is `decode([t])` (the leading
space a decode of the response alone drops): each string's automaton starts in a state of its
own, "nothing decoded yet", which the first token that decodes to anything in mid-text leaves
through its first-token text (SentencePiece's lone "▁" is such a token: "" first, " " after).
A token that decodes to nothing (special tokens) leaves the states as they are; ids past the
tokenizer's vocab count as the tokenizer decodes them (ours: its unknown piece). A byte of a
multi-byte character split over tokens decodes to "\\ufffd" alone, so a string with such a
character may be found late or not at all (the row then runs on: callers cut the text at the
strings anyway); a string is never found where the decoded text does not contain it, for
tokenizers whose decode is the concatenation of those texts (SentencePiece; byte-level BPE).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

STATE_BLOCK = 8  # states per string padded to a multiple of this: fewer distinct programs


def _kmp_delta(s: str) -> tuple[np.ndarray, dict]:
    """(delta (m + 1, k + 2) int, char -> column): the KMP automaton of `s` over its k distinct
    characters; column 0 is any other character, column k + 1 "no character" (padding: the
    state stays). State m (found) is absorbing."""
    m = len(s)
    cols = {c: i + 1 for i, c in enumerate(dict.fromkeys(s))}
    fail = [0] * (m + 1)  # fail[q]: the longest proper border of s[:q]
    for q in range(1, m):
        k = fail[q]
        while k and s[q] != s[k]:
            k = fail[k]
        fail[q + 1] = k + (s[q] == s[k])
    delta = np.zeros((m + 1, len(cols) + 2), np.int32)
    for q in range(m):
        for c, j in cols.items():
            k = q
            while k and s[k] != c:
                k = fail[k]
            delta[q, j] = k + (s[k] == c)
    delta[m, :] = m
    delta[:, -1] = np.arange(m + 1)
    return delta, cols


def _advance(delta, cols, texts: Sequence[str], states: np.ndarray) -> np.ndarray:
    """(len(states), len(texts)): the state after each text from each start state, every text
    at once — a character position at a time over the texts padded to one length."""
    pad = delta.shape[1] - 1
    width = max((len(t) for t in texts), default=0)
    chars = np.full((len(texts), width), pad, np.int32)
    for i, t in enumerate(texts):
        if t:
            chars[i, : len(t)] = [cols.get(c, 0) for c in t]
    out = np.broadcast_to(states[:, None], (len(states), len(texts))).copy()
    for p in range(width):
        out = delta[out, chars[None, :, p]]
    return out


def token_texts(tok, vocab_size: int) -> tuple[list[str], list[str]]:
    """(each id's text in mid-text, its text as a response's first token) for ids 0..V-1 (see
    the module docstring). Ids past the tokenizer's vocab decode as the tokenizer decodes them,
    or to "" where it refuses them."""
    anchor = tok.encode("a")[-1:]  # a plain one-character token
    head = tok.decode(anchor)
    try:
        first = tok.decode_batch([[i] for i in range(vocab_size)])
        joined = tok.decode_batch([anchor + [i] for i in range(vocab_size)])
    except Exception:  # a tokenizer that refuses ids past its vocab
        n = min(vocab_size, tok.vocab_size)
        first = tok.decode_batch([[i] for i in range(n)]) + [""] * (vocab_size - n)
        joined = tok.decode_batch([anchor + [i] for i in range(n)]) + [head] * (vocab_size - n)
    mid = [_mid_text(j, f, head) for j, f in zip(joined, first)]
    return mid, first


def _mid_text(joined: str, first: str, head: str) -> str:
    """A token's mid-text text from `decode(anchor + [t])`, `decode([t])` and `decode(anchor)`:
    what it adds after the anchor, or its text alone where the anchor's text changed."""
    return joined[len(head) :] if joined.startswith(head) else first


def token_text(tok):
    """id -> its text in mid-text, as `token_texts` spells it (" Paris", where a decode of the
    id alone drops SentencePiece's leading space), one id at a time and remembered: for
    showing the few ids a generation produced or considered (flaxlm/generate.py's
    --top_logprobs) without decoding the whole vocabulary. An id the tokenizer refuses reads
    as ""."""
    anchor = tok.encode("a")[-1:]
    head = tok.decode(anchor)

    @functools.cache
    def text(i: int) -> str:
        try:
            return _mid_text(tok.decode(anchor + [i]), tok.decode([i]), head)
        except Exception:  # (as `token_texts`: a tokenizer that refuses ids past its vocab)
            return ""

    return text


@dataclasses.dataclass(frozen=True, eq=False)
class StopStrings:
    """Device-ready tables for `generate(..., stop_strings=)`.

    table (S, Q, V) int32: the state after a token from each state — for string s of length
    m, states 0..m-1 (characters matched), m (found, absorbing) and m + 1 (nothing decoded
    yet); start (S,) int32: that last state, where a row begins; found (S,) int32: m (-1 for
    padding strings: never reached). S is padded to a power of two, Q to STATE_BLOCK.
    """

    strings: tuple
    table: np.ndarray
    start: np.ndarray
    found: np.ndarray

    @classmethod
    def build(cls, tok, strings: Sequence[str], vocab_size: int | None = None) -> StopStrings:
        """Tables for `strings` over `tok` (our SentencePiece Tokenizer or an HFTokenizer: any
        object with encode / decode / decode_batch / vocab_size). `vocab_size`: the model's
        (default the tokenizer's); a model may have more ids than its tokenizer. A bare str is
        one stop string (not one per character, as iterating it would give)."""
        strings = tuple(dict.fromkeys([strings] if isinstance(strings, str) else strings))
        if not strings or any(not isinstance(s, str) or not s for s in strings):
            raise ValueError(f"stop strings must be non-empty strings, got {strings!r}")
        V = int(vocab_size or tok.vocab_size)
        mid, first = token_texts(tok, V)
        S = 1 << (len(strings) - 1).bit_length()
        Q = max(len(s) for s in strings) + 2
        Q += -Q % STATE_BLOCK
        table = np.zeros((S, Q, V), np.int32)
        start, found = np.zeros((S,), np.int32), np.full((S,), -1, np.int32)
        empty = np.asarray([not t for t in mid])  # decodes to nothing anywhere: transparent
        for i, s in enumerate(strings):
            delta, cols = _kmp_delta(s)
            m = len(s)
            table[i, : m + 1] = _advance(delta, cols, mid, np.arange(m + 1))
            after_first = _advance(delta, cols, first, np.zeros(1, np.int32))[0]
            table[i, m + 1] = np.where(empty, m + 1, after_first)
            start[i], found[i] = m + 1, m
        return cls(strings, table, start, found)

    def arrays(self) -> tuple:
        return self.table, self.start, self.found


def advance(table, state_BS, tok_B):
    """One token per row: the states (B, S) after `tok_B` (B,)."""
    import jax.numpy as jnp

    S = table.shape[0]
    return table[jnp.arange(S)[None, :], state_BS, tok_B[:, None]]


def found_any(state_BS, found_S):
    """(B,) bool: a row's text contains one of the strings."""
    import jax.numpy as jnp

    return jnp.any(state_BS == found_S[None, :], axis=-1)
