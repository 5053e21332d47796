"""The word-list ("toxic") filter: bundled and user word lists, matched as whole words.

Entries of spaced scripts match whole words (a letter, then letters and combining marks), so
benign words containing an entry are not hits, and multi-word entries match as phrases;
entries spelled with digits or symbols ("a55", "b!tch", "a_s_s", common in public lists)
match whitespace-separated tokens that are spelled the same (``_spelled_tokens``); CJK
entries match as substrings, with '!' exceptions for benign words that contain one
(``load_word_list``). Words of text and entries are compared case-folded, in NFKC, without the
optional Arabic and Hebrew vowel marks (``_match_words``), so look-alike letters (full-width,
mathematical) and vowelled spellings match.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import unicodedata

from flaxlm.data.clean_text import _CJK_RE

RESOURCES = os.path.join(os.path.dirname(__file__), "resources")


# Optional vowel and cantillation marks of Arabic (harakat, Quranic signs; tatweel, the
# stretching stroke) and Hebrew (niqqud): words are written with and without them, and
# "كَلْب" did not match the entry "كلب". Removed from text and entries before matching.
_OPTIONAL_MARKS_RE = re.compile(
    "[\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7\u0610-\u061a\u0640\u064b-\u065f"
    "\u0670\u06d6-\u06dc\u06df-\u06e4\u06e7\u06e8\u06ea-\u06ed]"
)


# _letters_re on text without marks (ASCII, NFC Latin, Chinese), where it is 2-3x slower.
_RUN_RE = re.compile(r"[^\W\d_]+")
_ASTRAL_RE = re.compile("[\U00010000-\U0010ffff]")


@functools.cache
def _mark_classes() -> tuple[str, str]:
    """Regex classes of the combining marks (Mn, Mc, Me): those of the BMP, and those of plane
    1 with the variation selectors of plane 14; built on first use (tens of ms). Apart: ``re``
    looks a class of BMP characters up in a table, but scans the ~300 ranges of a class with
    any character above U+FFFF (a search through 11 KB of French took 1.6 ms, not 30 us)."""
    codes = [*range(0x20000), *range(0xE0100, 0xE01F0)]
    marks = [c for c in codes if unicodedata.category(chr(c))[0] == "M"]
    ranges, start = [], marks[0]
    for a, b in zip(marks, [*marks[1:], None]):
        if b != a + 1:
            ranges.append((start, a))
            start = b

    def cls(rs):
        return "[" + "".join(re.escape(chr(a)) + f"-{re.escape(chr(b))}" for a, b in rs) + "]"

    return cls(r for r in ranges if r[1] <= 0xFFFF), cls(r for r in ranges if r[1] > 0xFFFF)


@functools.cache
def _letters_re(astral: bool) -> re.Pattern:
    r"""A word of the word-list match: a letter, then letters and combining marks (those above
    U+FFFF too with ``astral``). Split at each mark (letter runs, ``[^\W\d_]+``), Indic words
    broke into pieces at their vowel signs and the entry "मार" matched inside "बीमारी" and
    "कुमार"."""
    bmp, other = _mark_classes()
    mark = f"(?:{bmp}|{other})" if astral else bmp
    return re.compile(rf"[^\W\d_]+(?:{mark}+[^\W\d_]*)*")


@functools.cache
def _mark_re(astral: bool) -> re.Pattern:
    return re.compile(_mark_classes()[1] if astral else _mark_classes()[0])


def _words_re(text: str) -> re.Pattern:
    """The regex that finds the words of ``text``: letter runs where it has no mark."""
    astral = _ASTRAL_RE.search(text) is not None
    if _mark_re(False).search(text) or (astral and _mark_re(True).search(text)):
        return _letters_re(astral)
    return _RUN_RE


def _match_words(text: str) -> list[str]:
    """The words of a text or an entry as the word list compares them (``_words_re``),
    case-folded, in NFKC (full-width "ＩＤＩＯＴ" and mathematical "𝐢𝐝𝐢𝐨𝐭" are "idiot"; they
    evaded the list), optional Arabic and Hebrew marks removed (``_OPTIONAL_MARKS_RE``).

    NFKC per word, where a word is not in it already: on the whole text it cost more than the
    rest of the match (Chinese text is never NFKC, its full-width punctuation changes)."""
    text = _OPTIONAL_MARKS_RE.sub("", text.casefold())
    if text.isascii():
        return _RUN_RE.findall(text)
    rx = _words_re(text)
    if unicodedata.is_normalized("NFKC", text):
        return rx.findall(text)
    words = []
    for w in rx.findall(text):
        if w.isascii() or unicodedata.is_normalized("NFKC", w):
            words.append(w)
        else:  # NFKC may split a word ("ﬁ" stays one, U+FDFA becomes four)
            nfkc = unicodedata.normalize("NFKC", w).casefold()
            nfkc = _OPTIONAL_MARKS_RE.sub("", nfkc)
            words += _words_re(nfkc).findall(nfkc)
    return words


def _is_outer_punct(c: str) -> bool:
    return unicodedata.category(c)[0] == "P"


def _spelled_tokens(text: str) -> list[str]:
    """The whitespace-separated tokens of a text or an entry, case-folded, in NFKC, without
    optional marks and outer punctuation ("B!TCH!" → "b!tch"): how entries spelled with digits
    or symbols are matched. Split into letter runs, "a55" was the word "a" (so the article hit
    in nearly every English text) and "b!tch" the phrase ("b", "tch")."""
    text = _OPTIONAL_MARKS_RE.sub("", unicodedata.normalize("NFKC", text.casefold()))
    tokens = []
    for t in text.split():
        i, j = 0, len(t)
        while i < j and _is_outer_punct(t[i]):
            i += 1
        while j > i and _is_outer_punct(t[j - 1]):
            j -= 1
        if i < j:
            tokens.append(t[i:j])
    return tokens


def _is_spelled(tokens: list[str]) -> bool:
    """Whether an entry's tokens hold a character that is not a letter, a mark, a hyphen or an
    apostrophe (so that ``_match_words`` would drop it)."""
    return any(not (unicodedata.category(c)[0] in "LM" or c in "-'’") for t in tokens for c in t)


@dataclasses.dataclass(frozen=True)
class WordList:
    """A loaded word list (``load_word_list``).

    ``words``: one-word entries of spaced scripts; ``phrases``: longer ones as tuples of their
    words (``_match_words``; "son of a" and "son-of-a" are the same 3-tuple), by first word.
    ``cjk``: a regex of CJK entries and exceptions, longest first; ``allowed``: the exceptions
    it may match, which count 0. ``spelled``: entries spelled with digits or symbols, as tuples
    of their ``_spelled_tokens``, by first token.
    """

    words: frozenset
    phrases: dict
    cjk: re.Pattern | None
    allowed: frozenset
    spelled: dict = dataclasses.field(default_factory=dict)


@functools.lru_cache(maxsize=8)
def load_word_list(spec: str) -> WordList:
    """Word-list files (comma-separated; ``default`` = the bundled lists) → a ``WordList``.

    One entry per line, ``#`` starts a comment, case-insensitive. Entries of spaced scripts
    match whole words: a text matches where its words (``_match_words``: a letter, then letters
    and combining marks; NFKC, optional Arabic/Hebrew marks removed) equal the entry's,
    consecutively, so a multi-word entry ("piece of crap") matches too (it never could when the
    text was split into single words and compared with whole lines). CJK entries match as
    substrings, which also hits benign words that contain them (the Scunthorpe problem: 傻瓜 in
    傻瓜相机, a point-and-shoot camera); a line ``!傻瓜相机`` names such a word, and an exception
    that contains an entry and starts at or before it hides that occurrence. ('!' lines of spaced
    scripts are ignored: whole-word matching needs none.) An entry spelled with a digit or a
    symbol inside ("a55", "5h1t", "b!tch", "a_s_s") matches tokens spelled the same
    (``_spelled_tokens``: split at whitespace, outer punctuation dropped), never its letter runs.
    """
    if not spec:
        return WordList(frozenset(), {}, None, frozenset())
    bundled = ",".join(os.path.join(RESOURCES, f) for f in ("toxic_en.txt", "toxic_zh.txt"))
    # "default" names the bundled lists, alone or next to your own files ("default,mine.txt").
    paths = [bundled if p.strip() == "default" else p for p in spec.split(",")]
    phrases: set[tuple[str, ...]] = set()
    cjk: set[str] = set()
    allowed: set[str] = set()
    spelled: dict[str, set] = {}
    for path in ",".join(paths).split(","):
        with open(path.strip(), encoding="utf-8") as f:
            for line in f:
                w = line.split("#", 1)[0].strip()
                exception = w.startswith("!")
                w = w.removeprefix("!").strip()
                if w and _CJK_RE.search(w):
                    (allowed if exception else cjk).add(w.lower())
                elif w and not exception and _is_spelled(tokens := _spelled_tokens(w)):
                    spelled.setdefault(tokens[0], set()).add(tuple(tokens))
                elif w and not exception and (entry := tuple(_match_words(w))):
                    phrases.add(entry)
    alts = sorted(cjk | allowed, key=lambda x: (-len(x), x))
    rx = re.compile("|".join(map(re.escape, alts))) if cjk else None
    words = frozenset(p[0] for p in phrases if len(p) == 1)
    by_first: dict[str, set] = {}
    for p in phrases:
        if len(p) > 1:
            by_first.setdefault(p[0], set()).add(p)
    return WordList(words, by_first, rx, frozenset(allowed - cjk), spelled)


def toxic_hits(text: str, spec: str = "default") -> int:
    """Occurrences of list entries: whole words for spaced scripts, substrings for CJK."""
    wl = load_word_list(spec)
    hits = 0
    if wl.words or wl.phrases:
        words = _match_words(text)
        hits += sum(1 for w in words if w in wl.words)
        for i, w in enumerate(words) if wl.phrases else ():
            hits += sum(tuple(words[i : i + len(p)]) == p for p in wl.phrases.get(w, ()))
    if wl.spelled:
        tokens = _spelled_tokens(text)
        for i, t in enumerate(tokens):
            hits += sum(tuple(tokens[i : i + len(p)]) == p for p in wl.spelled.get(t, ()))
    if wl.cjk is not None:
        hits += sum(1 for m in wl.cjk.finditer(text) if m.group() not in wl.allowed)
    return hits
