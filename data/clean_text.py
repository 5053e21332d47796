"""Text units shared by the cleaning filters and dedup: characters, words, scripts.

``normalize_text`` is the first thing every document goes through (unified newlines, separating
controls as line breaks, other control and invisible characters removed, NFC); dedup and
decontamination compare text in that form too.

Text without spaces (Chinese, Japanese, Korean) is handled by counting each CJK character as one
word (``_WORD_RE``); ``clean.first_failure`` reads the n-gram repetition rules' n words as about
1.5 characters there (``clean_config().cjk_chars_per_word``). ``_SCRIPTS`` names the scripts
the language check knows (``clean_stats``).
"""

from __future__ import annotations

import re
import unicodedata

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
# Controls that separate text, mapped to whitespace before _CONTROL_RE removes the others:
# deleted, they glued the words on either side ("first line\x0bsecond line" → "linesecond").
# A carriage return (dedup reads text the Cleaner may not have seen), vertical tab, form feed
# (page breaks in extracted PDFs), the file/group/record separators U+001C-001E, next line U+0085
# and the line/paragraph separators U+2028/2029 (kept before, but line cleaning splits on "\n"
# only) end a line; the unit separator U+001F (between fields) becomes a space.
_SPACE_CONTROLS = dict.fromkeys("\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029", "\n") | {"\x1f": " "}
# One pass for both (str.translate costs ~0.1 us a character on non-ASCII text); the function
# runs per match only, and most text has none.
_CONTROL_OR_SPACE_RE = re.compile(_CONTROL_RE.pattern[:-1] + "\u2028\u2029]")
_ALPHA_RE = re.compile(r"[^\W\d_]")


def count_words(text: str) -> int:
    """Words as the filters count them: CJK characters one each, other runs by whitespace."""
    return len(_WORD_RE.findall(text))


def remove_controls(text: str) -> str:
    """Separating controls to whitespace (``_SPACE_CONTROLS``), then the other control and
    invisible characters (``_CONTROL_RE``) removed: what ``normalize_text`` and dedup's
    ``normalize``/``match_words`` do before Unicode normalisation."""
    return _CONTROL_OR_SPACE_RE.sub(lambda m: _SPACE_CONTROLS.get(m.group(), ""), text)


def normalize_text(text: str) -> str:
    """Unified newlines (separating controls such as form feed become line breaks), control and
    invisible characters (``_CONTROL_RE``) removed, then NFC.

    Removed before NFC, so a letter and its accent that a soft hyphen separated compose
    ("e<U+00AD><U+0301>" → "é", not the decomposed "e<U+0301>").
    """
    text = remove_controls(text.replace("\r\n", "\n").replace("\r", "\n"))
    return unicodedata.normalize("NFC", text)
