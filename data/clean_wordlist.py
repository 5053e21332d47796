"""The word-list ("toxic") filter: bundled and user word lists, matched as whole words.

Entries of spaced scripts match whole words (letter runs), so benign words containing an entry
are not hits, and multi-word entries match as phrases; CJK entries match as substrings, with '!'
exceptions for benign words that contain one (``load_word_list``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

from flaxlm.data.clean_text import _CJK_RE

RESOURCES = os.path.join(os.path.dirname(__file__), "resources")


_LETTERS_RE = re.compile(r"[^\W\d_]+")  # the "words" of the word-list match: letter runs


@dataclasses.dataclass(frozen=True)
class WordList:
    """A loaded word list (``load_word_list``).

    ``words``: one-word entries of spaced scripts; ``phrases``: longer ones as tuples of their
    letter runs ("son of a" and "son-of-a" are the same 3-tuple), by first word. ``cjk``: a
    regex of CJK entries and exceptions, longest first; ``allowed``: the exceptions it may
    match, which count 0.
    """

    words: frozenset
    phrases: dict
    cjk: re.Pattern | None
    allowed: frozenset


@functools.lru_cache(maxsize=8)
def load_word_list(spec: str) -> WordList:
    """Word-list files (comma-separated; ``default`` = the bundled lists) → a ``WordList``.

    One entry per line, ``#`` starts a comment, case-insensitive. Entries of spaced scripts
    match whole words: a text matches where its letter runs equal the entry's, consecutively,
    so a multi-word entry ("piece of crap") matches too (it never could when the text was split
    into single words and compared with whole lines). CJK entries match as substrings, which
    also hits benign words that contain them (the Scunthorpe problem: 傻瓜 in 傻瓜相机, a
    point-and-shoot camera); a line ``!傻瓜相机`` names such a word, and an exception that
    contains an entry and starts at or before it hides that occurrence. ('!' lines of spaced
    scripts are ignored: whole-word matching needs none.)
    """
    if not spec:
        return WordList(frozenset(), {}, None, frozenset())
    bundled = ",".join(os.path.join(RESOURCES, f) for f in ("toxic_en.txt", "toxic_zh.txt"))
    # "default" names the bundled lists, alone or next to your own files ("default,mine.txt").
    paths = [bundled if p.strip() == "default" else p for p in spec.split(",")]
    phrases: set[tuple[str, ...]] = set()
    cjk: set[str] = set()
    allowed: set[str] = set()
    for path in ",".join(paths).split(","):
        with open(path.strip(), encoding="utf-8") as f:
            for line in f:
                w = line.split("#", 1)[0].strip().lower()
                exception = w.startswith("!")
                w = w.removeprefix("!").strip()
                if w and _CJK_RE.search(w):
                    (allowed if exception else cjk).add(w)
                elif w and not exception and _LETTERS_RE.search(w):
                    phrases.add(tuple(_LETTERS_RE.findall(w)))
    alts = sorted(cjk | allowed, key=lambda x: (-len(x), x))
    rx = re.compile("|".join(map(re.escape, alts))) if cjk else None
    words = frozenset(p[0] for p in phrases if len(p) == 1)
    by_first: dict[str, set] = {}
    for p in phrases:
        if len(p) > 1:
            by_first.setdefault(p[0], set()).add(p)
    return WordList(words, by_first, rx, frozenset(allowed - cjk))


def toxic_hits(text: str, spec: str = "default") -> int:
    """Occurrences of list entries: whole words for spaced scripts, substrings for CJK."""
    wl = load_word_list(spec)
    hits = 0
    if wl.words or wl.phrases:
        words = _LETTERS_RE.findall(text.lower())
        hits += sum(1 for w in words if w in wl.words)
        for i, w in enumerate(words) if wl.phrases else ():
            hits += sum(tuple(words[i : i + len(p)]) == p for p in wl.phrases.get(w, ()))
    if wl.cjk is not None:
        hits += sum(1 for m in wl.cjk.finditer(text) if m.group() not in wl.allowed)
    return hits
