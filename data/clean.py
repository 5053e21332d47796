"""Document cleaning: quality filters, a word-list filter and PII redaction.

``Cleaner(clean_config())`` runs a fixed chain of filters over each document; the first filter that
rejects a document names the reason, is counted, and keeps a few examples for the report. Surviving
documents have PII replaced by placeholders (``<EMAIL>``, ``<PHONE>``, ``<IP>``, ``<CARD>``,
``<ID>``). Thresholds follow the Gopher rules (Rae et al. 2021, appendix A) unless a comment says
otherwise.

Phone numbers redacted: Chinese mobiles (bare or with 86 / +86 / 0086), North American numbers
("(415) 555-2671", "1-800-555-1234"), any number in international form ('+', then 8 to 15 digits
in any grouping), and other 2-4 + 3-4 + 3-4 digit groups. Digit groups are ambiguous: "12 345 678"
and "12.345.678" (thousands separators) and three 4-digit years in a row ("1999 2000 2001") are
redacted as phones; national numbers written in pairs without '+' ("01 23 45 67 89") are not. An
extension after a number ("555-123-4567x89", "... ext. 89") is redacted with it.
Card numbers are 13-19 digits (single spaces or dashes between them) that pass the Luhn check
and do not start with 1 or 9 (millisecond timestamps, ISBN-13s: one in ten passes Luhn).

Thresholds are strict: "above"/"below" a threshold fails, a statistic equal to it passes (a page
with exactly 30% duplicated lines passes ``max_dup_line_frac=0.3``); tests/data/test_prep_audit.py
recomputes every statistic from these definitions. The word list ("toxic") matches whole words
of spaced scripts, so benign words containing an entry are not hits, and CJK entries as
substrings, with '!' exceptions for benign words that contain one (``load_word_list``).

Text without spaces (Chinese, Japanese, Korean) is handled by counting each CJK character as one
word: "word" counts, n-gram repetition and stop words then mean the same thing in both scripts.
Mean word length is measured on non-CJK words only (a CJK "word" is one character by construction).
The language check is a script check (Han, Latin, Cyrillic, ...: the script with the most words,
each word counted for the script of most of its letters) plus stop words, English for Latin text
and Chinese for Han text; it is not a statistical language-ID model, and Latin-script text in
another language fails the English stop words (``min_stop_words=0`` keeps it).

Line cleaning (``strip_boilerplate``) removes web boilerplate lines by phrase ("This site uses
cookies", "Subscribe to our newsletter", a line that is only "Read more"), never by a single word
("cookie", "javascript"), and prose-like phrases ("privacy policy") only on short lines.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import unicodedata
from collections import Counter

import ml_collections
import numpy as np

RESOURCES = os.path.join(os.path.dirname(__file__), "resources")
MAX_EXAMPLES = 3  # removed-document examples kept per reason (first 200 characters each)

# Scripts written without spaces: every character is a word.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
# CJK punctuation and full-width forms are not words.
_CJK_PUNCT = "\u3000-\u303f\uff00-\uffef"
_WORD_RE = re.compile(rf"[{_CJK}]|[^\s{_CJK}{_CJK_PUNCT}]+")
_CJK_RE = re.compile(rf"[{_CJK}]")
_SCRIPTS = {  # name → regex of its letters (Latin includes accented letters)
    "latin": re.compile(r"[A-Za-z\u00c0-\u024f]"),
    "han": re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"),
    "kana": re.compile(r"[\u3040-\u30ff]"),
    "hangul": re.compile(r"[\uac00-\ud7af]"),
    "cyrillic": re.compile(r"[\u0400-\u04ff]"),
    "greek": re.compile(r"[\u0370-\u03ff]"),
    "arabic": re.compile(r"[\u0600-\u06ff]"),
    "devanagari": re.compile(r"[\u0900-\u097f]"),
}
STOP_WORDS = {  # Gopher's English list; frequent Chinese function characters
    "en": {"the", "be", "to", "of", "and", "that", "have", "with"},
    "zh": set("的了是在和有不这也就都我他们"),
}
_BULLETS = ("•", "●", "◦", "▪", "‣", "-", "*", "·", "–")
_ELLIPSES = ("...", "…", "。。。")


def clean_config() -> ml_collections.ConfigDict:
    """Default cleaning thresholds (a ``clean`` config section)."""
    c = ml_collections.ConfigDict()
    c.min_words = 50  # fewer words (CJK: characters) → "too_short"
    c.max_words = 100_000  # more words → "too_long"
    c.min_mean_word_len = 3.0  # mean length of non-CJK words below → "mean_word_len"
    c.max_mean_word_len = 10.0  # ... or above
    c.max_symbol_ratio = 0.1  # ('#' + ellipses) per word above → "symbol_ratio"
    c.max_bullet_lines = 0.9  # fraction of lines starting with a bullet above → "bullet_lines"
    c.max_ellipsis_lines = 0.3  # fraction of lines ending in an ellipsis above → "ellipsis_lines"
    c.max_dup_line_frac = 0.3  # fraction of duplicated lines above → "repetition"
    c.max_dup_para_frac = 0.3  # fraction of duplicated paragraphs above → "repetition"
    c.max_dup_line_char_frac = 0.2  # characters in duplicated lines above → "repetition"
    c.max_dup_para_char_frac = 0.2  # characters in duplicated paragraphs above → "repetition"
    # Characters covered by the most frequent n-gram (ties: the one occurring first), for
    # n = 2, 3, 4 (Gopher: .20 .18 .16).
    c.max_top_ngram_char_frac = (0.20, 0.18, 0.16)
    # Characters covered by any repeated n-gram, for n = 5..10 (Gopher: .15 down to .10).
    c.max_dup_ngram_char_frac = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)
    c.min_alpha_words = 0.8  # fraction of words with a letter (CJK counts) below → "alpha_ratio"
    # Distinct stop words of the detected language below → "stop_words". The language is the
    # script's: all Latin-script text is checked against the English list, so with the default
    # scripts French, German, Spanish (any non-English Latin-script) documents are dropped as
    # "stop_words". min_stop_words=0 keeps them.
    c.min_stop_words = 2
    c.scripts = ("latin", "han")  # dominant script must be one of these → else "script"
    c.toxic_lists = "default"  # comma-separated word-list files ("default" = the bundled ones)
    c.max_toxic_hits = 0  # word-list hits above → "toxic"
    c.redact_pii = True  # replace emails, phones, IPs, card and ID numbers by placeholders
    # C4-style line cleaning before the filters: drop web boilerplate lines (cookie banners,
    # "click here", navigation bars) and lines made only of symbols.
    c.strip_boilerplate_lines = True
    c.max_boilerplate_char_frac = 0.5  # stripped lines held more of the text → "boilerplate"
    return c


class DocStats:
    """Per-document measurements, computed lazily and shared by all filters."""

    def __init__(self, text: str):
        self.text = text

    @functools.cached_property
    def words(self) -> list[str]:
        return _WORD_RE.findall(self.text.lower())

    @functools.cached_property
    def lines(self) -> list[str]:
        return [ln.strip() for ln in self.text.split("\n") if ln.strip()]

    @functools.cached_property
    def paragraphs(self) -> list[str]:
        return [p.strip() for p in re.split(r"\n\s*\n", self.text) if p.strip()]

    @functools.cached_property
    def script(self) -> str:
        """The script with the most words (CJK characters one each, other words by the script
        most of their letters are in; words without letters count for none)."""
        # Counted in words, as every other filter counts: counted in letters, a Chinese tutorial
        # with English terms (99 Han characters, 30 words of 232 Latin letters) was "latin", so
        # judged by English stop words and dropped.
        per_word = Counter(map(_word_script, self.words))
        counts = {name: per_word[name] for name in _SCRIPTS}  # ties: the first in _SCRIPTS
        if counts["kana"] and counts["kana"] >= 0.05 * counts["han"]:
            counts["kana"] += counts.pop("han")  # Japanese mixes kanji with kana
        best = max(counts, key=counts.get)
        return best if counts[best] else "none"

    @functools.cached_property
    def language(self) -> str:
        """'zh' for Han text, 'en' for Latin text (stop words then judge), else the script."""
        return {"han": "zh", "latin": "en"}.get(self.script, self.script)


_SCRIPT_RUN_RE = re.compile("|".join(f"(?P<{k}>{rx.pattern}+)" for k, rx in _SCRIPTS.items()))


@functools.lru_cache(maxsize=1 << 16)  # word frequencies are Zipfian: most lookups hit
def _word_script(word: str) -> str | None:
    """The script most of the word's letters are in (ties: the first in ``_SCRIPTS``)."""
    letters: Counter = Counter()
    for m in _SCRIPT_RUN_RE.finditer(word):
        letters[m.lastgroup] += m.end() - m.start()
    return max(_SCRIPTS, key=lambda k: letters[k]) if letters else None


def count_words(text: str) -> int:
    """Words as the filters count them: CJK characters one each, other runs by whitespace."""
    return len(_WORD_RE.findall(text))


def _dup_frac(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of characters in them)."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_n = dup_chars = 0
    for it in items:
        if it in seen:
            dup_n += 1
            dup_chars += len(it)
        seen.add(it)
    return dup_n / len(items), dup_chars / max(1, sum(len(i) for i in items))


def _ngram_fracs(words: list[str], top_ns, dup_ns) -> tuple[list[float], list[float]]:
    """Gopher n-gram repetition: chars in the top n-gram, chars covered by repeated n-grams."""
    # Python's hash is salted per process: only equality within this document may depend on it.
    h = np.fromiter((hash(w) for w in words), np.int64, len(words)).astype(np.uint64)
    wlen = np.fromiter((len(w) for w in words), np.int64, len(words))
    total = max(1, int(wlen.sum()))
    mult = np.uint64(0x9E3779B97F4A7C15)
    tops, dups = [], []
    no_repeats_from = None  # a repeated (n+1)-gram implies a repeated n-gram: skip the rest
    for n in sorted(set(top_ns) | set(dup_ns)):
        if no_repeats_from is not None and n > no_repeats_from and n not in top_ns:
            dups.append(0.0)
            continue
        if len(words) < n:
            if n in top_ns:
                tops.append(0.0)
            if n in dup_ns:
                dups.append(0.0)
            continue
        g = h[: len(h) - n + 1].copy()  # rolling combination of n word hashes
        for k in range(1, n):
            g = g * mult + h[k : len(h) - n + 1 + k]
        uniq, first, inv, cnt = np.unique(
            g, return_index=True, return_inverse=True, return_counts=True
        )
        if len(uniq) == len(g):
            no_repeats_from = n if no_repeats_from is None else min(no_repeats_from, n)
        if n in top_ns:
            top = int(cnt.max())
            if top > 1:
                # Ties: the n-gram that occurs first (Counter.most_common's order). np.unique
                # sorts by hash, and Python's hash is salted per process: picking by that order
                # kept or dropped the same document depending on PYTHONHASHSEED.
                start = int(first[cnt == top].min())
                tops.append(int(wlen[start : start + n].sum()) * top / total)
            else:
                tops.append(0.0)
        if n in dup_ns:
            starts = np.flatnonzero(cnt[inv] > 1)  # every occurrence of a repeated n-gram
            cover = np.zeros(len(words) + 1, np.int64)
            np.add.at(cover, starts, 1)
            np.add.at(cover, starts + n, -1)
            covered = np.cumsum(cover[:-1]) > 0
            dups.append(int(wlen[covered].sum()) / total)
    return tops, dups


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


# ---------------------------------------------------------------------------------------------
# PII. Order matters: longer number patterns first, so a card number is not read as a phone.

_NB = r"(?<![\dA-Za-z])"  # "not inside a number/word"; \b fails next to CJK (also \w)
_NA = r"(?![\dA-Za-z])"
# A phone's extension ("555-123-4567x89", "... ext. 89", "..., extension 12"), redacted with it: the
# letter after the number failed the pattern's end, and "555-123-4567x89" was not redacted at all.
_EXT = r"(?:,?[ ]?(?:[xX]|[eE]xt\.?|[eE]xtension)[ ]?\d{1,6})?"
_NUMERIC = [  # (kind, pattern), tried in this order at each position
    (
        "IP",
        r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?!\d|\.\d)",
    ),
    # Chinese resident ID: 6-digit region, birth date, 3 digits, check digit or X.
    (
        "ID",
        _NB
        + r"[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]"
        + _NA,
    ),
    # Kept only if Luhn-valid; a Luhn-invalid run is searched again with the patterns after it
    # (a Chinese mobile written "86 138 1234 5678" is 13 digits, as long as a short card number).
    # Not starting with 1 or 9 (ISO 7812 major industry: airlines, national use; no payment
    # network issues those): one in ten 13-digit millisecond timestamps (1.7e12) and ISBN-13s
    # (978/979...) passes the Luhn check by chance and was redacted as a card.
    ("CARD", _NB + r"[02-8](?:[ -]?\d){12,18}" + _NA),
    ("ID", _NB + r"(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}" + _NA),  # US SSN
    ("PHONE", _NB + r"(?:(?:\+|00)?86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}" + _NA),  # Chinese mobile
    # Other phones; not part of a longer digit-group run (e.g. a Luhn-invalid 16-digit number).
    # "1-800-555-1234" / "1 415 555 2671": North American numbers with the trunk prefix 1.
    (
        "PHONE",
        r"(?<![\dA-Za-z+])(?<!\d[ .-])"
        r"(?:\+\d{1,3}[ .-]?|1[ .-](?=\(?\d{3}\)?[ .-]?\d{3}[ .-]?\d{4}))?"
        r"(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}"
        + _EXT
        + r"(?![\dA-Za-z]|[ .-]\d)",
    ),
    # International numbers in any grouping ("+33 1 23 45 67 89", "+91 98765 43210"): a '+', then
    # 8 to 15 digits (E.164's limit) with single separators.
    ("PHONE", r"(?<![\dA-Za-z+])\+[1-9](?:[ .-]?\d){7,14}" + _EXT + r"(?![\dA-Za-z]|[ .-]\d)"),
]
_CARD_AT = next(i for i, (k, _) in enumerate(_NUMERIC) if k == "CARD")
# Emails: local part and domain labels in letters of any script ("müller@firma.de",
# "josé.garcía@example.es", "john@münchen.de"). With ASCII-only classes the match started after
# the last accented letter ("josé.garcí<EMAIL>", the start of the address left in the text) or
# found no domain. The lookbehind starts a match where the run of local-part characters starts
# (combining accents U+0300-036F count: NFD text), never inside it; one class there, so the scan
# tries each word once. CJK is not part of an address: in Chinese text nothing separates it from
# the words before it ("我的邮箱是zhangsan@qq.com"; redact_pii keeps the run's text up to its last
# CJK character), and a CJK top-level domain would take in the words after it.
_EMAIL_CH = "\\w.%+\u0300-\u036f-"
_EMAIL_LABEL = rf"(?:[^\W_{_CJK}]|[\u0300-\u036f-])+"
_EMAIL = (
    rf"(?<![{_EMAIL_CH}])[{_EMAIL_CH}]+@{_EMAIL_LABEL}(?:\.{_EMAIL_LABEL})*"
    rf"\.[^\W\d_{_CJK}]{{2,}}"
)
_CJK_PREFIX_RE = re.compile(rf".*[{_CJK}]")  # an EMAIL match's text up to its last CJK character
# An IPv4 address as the last 32 bits of an IPv6 one ("::ffff:192.168.1.1", "64:ff9b::1.2.3.4").
_V4 = r"(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)"
# One pass per family (a pass costs ~40 us per KB): named groups say which pattern matched.
_PII = [
    (
        "@",
        re.compile(f"(?P<EMAIL>{_EMAIL})"),
    ),
    (
        "::",
        # IPv6: all 8 groups, or "::" standing for zeros in the middle ("2001:db8::1"), at the
        # start ("::1") or at the end ("fe80::"). Not a lone "::" and not "std::vector" (a group
        # must be hex digits, bounded by non-word characters). A "::" match is then checked by
        # _plausible_ipv6 (slices "a[1::2]" and names "ee::ff" match the pattern too).
        # The forms ending in an IPv4 address come first: "::ffff:192.168.1.1" matched as
        # "::ffff:192" and became "<IP>.168.1.1"; a match may not end before ".<digit>" now.
        re.compile(
            rf"(?P<IP>(?<![:\w])(?:(?:[0-9A-Fa-f]{{1,4}}:){{6}}{_V4}"
            rf"|::(?:[0-9A-Fa-f]{{1,4}}:){{0,5}}{_V4}"
            rf"|(?:[0-9A-Fa-f]{{1,4}}:){{1,5}}:(?:[0-9A-Fa-f]{{1,4}}:){{0,4}}{_V4}"
            r"|(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}"
            r"|(?:[0-9A-Fa-f]{1,4}:){1,6}(?::[0-9A-Fa-f]{1,4}){1,6}"
            r"|::(?:[0-9A-Fa-f]{1,4}:){0,6}[0-9A-Fa-f]{1,4}"
            r"|(?:[0-9A-Fa-f]{1,4}:){1,7}:)(?![:\w]|\.\d))"
        ),
    ),
    # The leading lookahead lets the engine skip positions that cannot start a number quickly.
    (
        "00",
        re.compile(
            "(?=[\\d+(])(?:"
            + "|".join(f"(?P<{k}{i}>{p})" for i, (k, p) in enumerate(_NUMERIC))
            + ")"
        ),
    ),
]


# The numeric patterns after CARD, for the span of a Luhn-invalid CARD match.
_AFTER_CARD = re.compile(
    "|".join(f"(?P<{k}{i}>{p})" for i, (k, p) in enumerate(_NUMERIC) if i > _CARD_AT)
)
# Every numeric pattern needs two digits with at most one separator between them: "8.8.8.8"
# (one-digit octets) has no two adjacent digits, and r"\d\d" here skipped it.
_DIGITS_RE = re.compile(r"\d[ .-]?\d")
_IPV6_RE = dict(_PII)["::"]
# The last label of an EMAIL match that makes it a file name, not an address ("logo@2x.png",
# "node@latest.tgz"): common extensions that are no top-level domain (.zip, .mov, .md, .py, .pl,
# .sh are domains, and addresses there are left to the pattern).
_FILE_EXTENSIONS = frozenset(
    "png jpg jpeg gif webp svg ico bmp tif tiff avif heic pdf tgz gz bz2 xz zst tar rar 7z js "
    "mjs cjs ts tsx jsx css scss less html htm xhtml json jsonl xml txt csv tsv yaml yml toml "
    "ini cfg conf lock log bak tmp mp3 mp4 m4a wav ogg webm mkv avi woff woff2 ttf otf eot map "
    "exe dll whl jar apk dmg iso deb rpm msi bin dat".split()
)


def _plausible_ipv6(addr: str) -> bool:
    """Whether an IPv6 match with "::" is an address rather than code or a name.

    Leading "::": two groups or more ("::ffff:a00:1"), or loopback "::1"; one group is a Python
    slice ("a[::2]"). Otherwise a decimal digit somewhere (not "ee::ff", "def::abc", "bad::")
    and a first group of 4 hex digits ("fe80::1", "2001:db8::"; addresses in use start with
    one, from 2000::/3 or fc00::/7 up) or three groups or more ("1080::8:800:200c:417a"); not
    the slice "a[1::2]" nor "1::".
    """
    if "::" not in addr or "." in addr:
        return True  # all eight groups, or an IPv4 tail (no slice or name has one)
    groups = [g for g in addr.split(":") if g]
    if addr.startswith("::"):
        return len(groups) >= 2 or groups == ["1"]
    return any(c.isdigit() for c in addr) and (len(groups[0]) == 4 or len(groups) >= 3)


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def redact_pii(text: str) -> tuple[str, Counter]:
    """Replaces PII with ``<KIND>`` placeholders; returns the text and counts per kind."""
    counts: Counter = Counter()

    def sub(m):
        kind = m.lastgroup.rstrip("0123456789")
        if m.re is _IPV6_RE and not _plausible_ipv6(m.group()):
            return m.group()
        if kind == "EMAIL":
            if m.group().rpartition(".")[2].lower() in _FILE_EXTENSIONS:
                return m.group()
            prefix = _CJK_PREFIX_RE.match(m.group())  # text before the address (CJK)
            if prefix is not None:
                if m.group()[prefix.end()] == "@":
                    return m.group()  # an all-CJK local part ("张三@example.com"): not matched
                counts[kind] += 1
                return f"{prefix.group()}<{kind}>"
        if kind == "CARD" and not _luhn_ok(re.sub(r"\D", "", m.group())):
            # Not a card: the span may still hold a phone or ID number. Searched in the whole
            # text (pos/endpos), so lookbehinds see what precedes the span.
            out, last = [], m.start()
            for m2 in _AFTER_CARD.finditer(m.string, m.start(), m.end()):
                out += [m.string[last : m2.start()], sub(m2)]
                last = m2.end()
            return "".join(out) + m.string[last : m.end()]
        counts[kind] += 1
        return f"<{kind}>"

    for guard, rx in _PII:
        # Cheap guards: no '@' → no email; IPv6 needs "::" or 6 colons (7 without an IPv4 tail);
        # numbers two digits.
        if guard == "@" and "@" not in text:
            continue
        if guard == "::" and "::" not in text and text.count(":") < 6:
            continue
        if guard == "00" and _DIGITS_RE.search(text) is None:
            continue
        text = rx.sub(sub, text)
    return text, counts


# ---------------------------------------------------------------------------------------------


# Characters removed from text before anything reads it (``normalize_text``) and before dedup
# and decontamination compare it (``dedup.normalize``, ``dedup.match_words``): C0/C1 controls
# except tab and newline, lone surrogates, every format character (category Cf: zero-width
# spaces and joiners, soft hyphen U+00AD, direction marks, embeddings and isolates U+2066-2069,
# Mongolian vowel separator U+180E, BOM, tags ...) and the other invisible characters Unicode
# lists as default-ignorable: combining grapheme joiner U+034F, variation selectors (U+FE00-FE0F,
# U+E0100-E01EF, Mongolian U+180B-180F), Hangul fillers, Khmer inherent vowels U+17B4-17B5.
# The list of zero-width and direction characters missed the soft hyphen (&shy; in web text),
# the isolates and the variation selectors, so a copy carrying them was neither an exact
# duplicate nor a decontamination hit and evaded the word list.
# Kept: the Cf characters that are visible signs (prepended concatenation marks: Arabic number
# signs U+0600-0605, end of ayah U+06DD, Syriac U+070F, U+0890-0891, U+08E2, Kaithi U+110BD,
# U+110CD). Removed too: the zero-width joiner U+200D (and non-joiner U+200C), as before. Nothing
# here reads emoji sequences, and without it a ZWJ sequence shows its members (a family emoji
# becomes its people); kept, a ZWJ inside a word ("ru\u200dns") would make a different word for
# dedup, the word list and the model. (Persian and Indic text lose the joiner's shaping hint.)
_CONTROL_RE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\xad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f"
    "\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufffb"
    "\ud800-\udfff\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0000-\U000e0fff]"
)
_ALPHA_RE = re.compile(r"[^\W\d_]")


# Boilerplate lines, matched by phrase, never by a single word: "cookie", "subscribe",
# "advertisement", "read more" and "javascript" matched anywhere, so a cookie recipe was dropped
# as boilerplate, a news paragraph on subscribers and advertisement revenue lost 3 of its 4 lines
# and a JavaScript explainer half of its lines. Words are separated by any whitespace run:
# extracted web text often has doubled spaces or no-break spaces (U+00A0, which NFC keeps) in
# exactly these footer/navigation lines.
# Banner phrases: boilerplate on a line of any length.
_BANNER_RE = re.compile(
    r"\b(?:(?:web)?site\s+uses\s+cookies|our\s+use\s+of\s+cookies|"
    r"we\s+use\s+cookies\s+(?:and\s+similar|on\s+(?:our|this)\s+(?:web)?site|to\s+(?:improve|"
    r"give|ensure|provide|enhance|personali[sz]e|analy[sz]e|understand|offer|measure|remember))|"
    r"(?:accept|reject|allow)\s+all\s+cookies|"
    r"subscribe\s+to\s+(?:our|the|my)\s+(?:free\s+)?(?:newsletter|channel|mailing\s+list)|"
    r"sign\s?up\s+(?:for|to)\s+(?:our|the)\s+(?:free\s+)?newsletter|"
    r"(?:enable|turn\s+on|activate)\s+javascript|javascript\s+(?:is\s+)?(?:required|disabled)|"
    r"skip\s+to\s+(?:main\s+)?content)\b",
    re.IGNORECASE,
)
# Phrases that prose uses too ("the company changed its privacy policy", "never accept cookies
# from strangers"): boilerplate only on a short line (footers, navigation bars, buttons).
_SHORT_LINE_WORDS = 20
_FOOTER_RE = re.compile(
    r"\b(?:cookies?\s+(?:policy|settings|preferences|consent|notice)|"
    r"(?:accept|reject|decline)\s+cookies|privacy\s+policy|terms\s+of\s+(?:use|service)|"
    r"all\s+rights\s+reserved|forgot\s+(?:your\s+)?password|click\s+here|"
    r"share\s+(?:on|to)\s+(?:facebook|twitter|x|linkedin|whatsapp|pinterest|reddit|email))\b|"
    r"\blog\s?in\s*(?:\||to\b|$)|\bsign\s?(?:up|in)\s*(?:\||$|now\b|(?:for\s+)?free\b)|"
    r"\bhome\s+\|\s",
    re.IGNORECASE,
)
# Lines that are nothing but a link or a label ("Read more >>", "Advertisement").
_STUB_LINE_RE = re.compile(
    r"[\W_]*(?:read\s+more|continue\s+reading|advertisement|sponsored(?:\s+content)?|"
    r"subscribe(?:\s+now)?|newsletter|back\s+to\s+top)[\W_]*",
    re.IGNORECASE,
)
_SYMBOL_LINE_RE = re.compile(r"^[\W_]{3,}$")


def _is_boilerplate(line: str) -> bool:
    return bool(
        _BANNER_RE.search(line)
        or _STUB_LINE_RE.fullmatch(line)
        or _SYMBOL_LINE_RE.match(line)
        or (len(line.split()) <= _SHORT_LINE_WORDS and _FOOTER_RE.search(line))
    )


def strip_boilerplate(text: str) -> tuple[str, int, float]:
    """Removes boilerplate and symbol-only lines.

    Returns (text, lines removed, fraction of the characters they held), characters counted on
    each line stripped of its leading and trailing whitespace (inner spaces count).
    """
    lines = text.split("\n")
    keep = [ln for ln in lines if not (ln.strip() and _is_boilerplate(ln.strip()))]
    out = "\n".join(keep).strip("\n")
    total = sum(len(ln.strip()) for ln in lines)
    # removed / total, not 1 - kept / total: 1 - 0.7 is 0.30000000000000004, so a page with
    # exactly 30% stripped was "above" a 0.3 threshold.
    frac = (total - sum(len(ln.strip()) for ln in keep)) / total if total else 0.0
    return out, len(lines) - len(keep), frac


def normalize_text(text: str) -> str:
    """Unified newlines, control and invisible characters (``_CONTROL_RE``) removed, then NFC.

    Removed before NFC, so a letter and its accent that a soft hyphen separated compose
    ("e<U+00AD><U+0301>" → "é", not the decomposed "e<U+0301>").
    """
    text = _CONTROL_RE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    return unicodedata.normalize("NFC", text)


def first_failure(s: DocStats, c: ml_collections.ConfigDict) -> str | None:
    """The reason the first failing filter gives, or None if the document passes all."""
    n = len(s.words)
    if n < max(c.min_words, 1):  # a document without words is too short even at min_words=0
        return "too_short"
    if n > c.max_words:
        return "too_long"
    if c.scripts and s.script not in c.scripts:
        return "script"
    spaced = [w for w in s.words if not _CJK_RE.match(w)]
    if spaced and len(spaced) >= 0.5 * n:  # mostly spaced text: word length is meaningful
        mean = sum(map(len, spaced)) / len(spaced)
        if not c.min_mean_word_len <= mean <= c.max_mean_word_len:
            return "mean_word_len"
    symbols = s.text.count("#") + sum(s.text.count(e) for e in _ELLIPSES)
    if symbols / n > c.max_symbol_ratio:
        return "symbol_ratio"
    if s.lines:
        if sum(ln.startswith(_BULLETS) for ln in s.lines) / len(s.lines) > c.max_bullet_lines:
            return "bullet_lines"
        if sum(ln.endswith(_ELLIPSES) for ln in s.lines) / len(s.lines) > c.max_ellipsis_lines:
            return "ellipsis_lines"
    line_frac, line_chars = _dup_frac(s.lines)
    para_frac, para_chars = _dup_frac(s.paragraphs)
    if (
        line_frac > c.max_dup_line_frac
        or para_frac > c.max_dup_para_frac
        or line_chars > c.max_dup_line_char_frac
        or para_chars > c.max_dup_para_char_frac
    ):
        return "repetition"
    top_ns = range(2, 2 + len(c.max_top_ngram_char_frac))
    dup_ns = range(5, 5 + len(c.max_dup_ngram_char_frac))
    tops, dups = _ngram_fracs(s.words, tuple(top_ns), tuple(dup_ns))
    if any(f > t for f, t in zip(tops, c.max_top_ngram_char_frac)) or any(
        f > t for f, t in zip(dups, c.max_dup_ngram_char_frac)
    ):
        return "repetition"
    if sum(1 for w in s.words if _ALPHA_RE.search(w)) / n < c.min_alpha_words:
        return "alpha_ratio"
    stops = STOP_WORDS.get(s.language)
    if stops is not None and len(stops.intersection(s.words)) < c.min_stop_words:
        return "stop_words"
    if c.toxic_lists and toxic_hits(s.text, c.toxic_lists) > c.max_toxic_hits:
        return "toxic"
    return None


@dataclasses.dataclass
class Cleaner:
    """Applies the filter chain and redaction; counts and keeps examples per reason.

    ``__call__(text)`` returns the cleaned text, or None (the reason is counted in ``removed``).
    Counters can be merged across workers with ``merge``.
    """

    cfg: ml_collections.ConfigDict = dataclasses.field(default_factory=clean_config)
    seen: int = 0
    removed: Counter = dataclasses.field(default_factory=Counter)
    examples: dict = dataclasses.field(default_factory=dict)
    pii: Counter = dataclasses.field(default_factory=Counter)
    lines_stripped: int = 0  # boilerplate / symbol-only lines removed from kept and dropped docs

    def __post_init__(self):
        # A misspelt script ("cyrilic") dropped every document of that script as "script".
        unknown = sorted(set(self.cfg.scripts) - set(_SCRIPTS))
        if unknown:
            raise ValueError(f"clean.scripts: unknown {unknown} (known: {sorted(_SCRIPTS)})")

    def __call__(self, text: str, loc: str = "") -> str | None:
        self.seen += 1
        text = original = normalize_text(text)
        reason = None
        if self.cfg.strip_boilerplate_lines:
            text, n_removed, char_frac = strip_boilerplate(text)
            self.lines_stripped += n_removed
            if char_frac > self.cfg.max_boilerplate_char_frac:
                reason = "boilerplate"
        reason = reason or first_failure(DocStats(text), self.cfg)
        if reason is not None:
            self.removed[reason] += 1
            ex = self.examples.setdefault(reason, [])
            if len(ex) < MAX_EXAMPLES:
                shown = original if reason == "boilerplate" else text
                ex.append(f"{loc}: {shown[:200]!r}" if loc else repr(shown[:200]))
            return None
        if self.cfg.redact_pii:
            text, counts = redact_pii(text)
            self.pii.update(counts)
        return text

    def merge(self, other: Cleaner) -> None:
        self.seen += other.seen
        self.removed.update(other.removed)
        self.pii.update(other.pii)
        self.lines_stripped += other.lines_stripped
        for k, v in other.examples.items():
            self.examples.setdefault(k, []).extend(v[: MAX_EXAMPLES - len(self.examples[k])])

    def report(self) -> dict:
        return {
            "in": self.seen,
            "out": self.seen - sum(self.removed.values()),
            "removed": dict(self.removed),
            "examples": self.examples,
            "pii_redacted": dict(self.pii),
            "boilerplate_lines_stripped": self.lines_stripped,
        }
