"""Per-document statistics the quality filters read (``DocStats``), after Gopher's rules.

Words, lines and paragraphs; the dominant script (each word counted for the script of most of its
letters, CJK characters one word each); duplicated-line/paragraph fractions and the n-gram
repetition fractions of Rae et al. 2021, appendix A. Computed lazily and shared by all filters
(``clean.first_failure``).
"""

from __future__ import annotations

import functools
import re
from collections import Counter

import numpy as np

from flaxlm.data.clean_lang import identify
from flaxlm.data.clean_text import _SCRIPTS, _WORD_RE


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
        """The language its function words name among its script's (``clean_lang.identify``:
        "en", "fr", ... or "und"); "zh" / "ja" / "ko" for Han / kana / hangul text; other
        scripts' text by the script's name."""
        return identify(self.text, self.script)


_SCRIPT_RUN_RE = re.compile("|".join(f"(?P<{k}>{rx.pattern}+)" for k, rx in _SCRIPTS.items()))


@functools.lru_cache(maxsize=1 << 16)  # word frequencies are Zipfian: most lookups hit
def _word_script(word: str) -> str | None:
    """The script most of the word's letters are in (ties: the first in ``_SCRIPTS``)."""
    letters: Counter = Counter()
    for m in _SCRIPT_RUN_RE.finditer(word):
        letters[m.lastgroup] += m.end() - m.start()
    return max(_SCRIPTS, key=lambda k: letters[k]) if letters else None


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
