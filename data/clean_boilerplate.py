"""Line cleaning: web boilerplate and symbol-only lines removed before the quality filters.

``strip_boilerplate`` removes lines by phrase ("This site uses cookies", "Subscribe to our
newsletter", a line that is only "Read more"), never by a single word ("cookie", "javascript"),
and prose-like phrases ("privacy policy", "JavaScript is disabled") only on short lines
(C4-style line cleaning), log-in and sign-up links only on navigation-like lines (a few words,
or links separated by '|' or '»'). Separator lines (one symbol repeated: "-----", "* * *") go
too; other lines of symbols (code such as "});", ">>>", "~~~", table rows "|---|---|", emoji)
stay.
"""

from __future__ import annotations

import re
import unicodedata

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
    r"skip\s+to\s+(?:main\s+)?content)\b",
    re.IGNORECASE,
)
# Phrases that prose uses too ("the company changed its privacy policy", "never accept cookies
# from strangers", "if JavaScript is disabled, the form falls back to ..."): boilerplate only on
# a short line (footers, navigation bars, buttons, notices).
_SHORT_LINE_WORDS = 20
_FOOTER_RE = re.compile(
    r"\b(?:cookies?\s+(?:policy|settings|preferences|consent|notice)|"
    r"(?:accept|reject|decline)\s+cookies|privacy\s+policy|terms\s+of\s+(?:use|service)|"
    r"all\s+rights\s+reserved|forgot\s+(?:your\s+)?password|click\s+here|"
    r"share\s+(?:on|to)\s+(?:facebook|twitter|x|linkedin|whatsapp|pinterest|reddit|email)|"
    r"(?:enable|turn\s+on|activate)\s+javascript|javascript\s+(?:is\s+)?(?:required|disabled))\b|"
    r"\bhome\s+\|\s",
    re.IGNORECASE,
)
# Log-in and sign-up links: only on a navigation-like line, one of a few words or one with a
# '|' or '»' between links. On any line of 20 words they took instructions with them ("Students
# must log in to the portal before the exam starts.").
_NAV_LINE_WORDS = 6
_NAV_SEP_RE = re.compile(r"[|»]")
_LOGIN_RE = re.compile(
    r"\blog\s?in\s*(?:\||to\b|$)|\bsign\s?(?:up|in)\s*(?:\||$|now\b|(?:for\s+)?free\b)",
    re.IGNORECASE,
)
# Lines that are nothing but a link or a label ("Read more >>", "Advertisement").
_STUB_LINE_RE = re.compile(
    r"[\W_]*(?:read\s+more|continue\s+reading|advertisement|sponsored(?:\s+content)?|"
    r"subscribe(?:\s+now)?|newsletter|back\s+to\s+top)[\W_]*",
    re.IGNORECASE,
)
# Separator lines: one symbol repeated, 3 times or more, spaces allowed between ("-----",
# "=====", "* * *", "#####", "────"). Any line of 3 non-word characters was one, and code lost
# its closing lines ("  });"), markdown tables their separator row ("|---|---|") and a line of
# emoji went too ("🎉🎉🎉"). Never brackets, '|', quotes or backticks (code: '"""', closing
# fences), nor other symbols of category So (emoji, dingbats) but box drawing U+2500-257F.
# Nor '~' (markdown's other code fence, "~~~"), '<', '>' or '.': Python's empty prompt lines
# ">>>" and "..." are code, and went from every interpreter session in a tutorial.
_SYMBOL_LINE_RE = re.compile(r"([^\w\s]|_)(?:\s*\1){2,}")
_NOT_SEPARATOR = frozenset("|\"'`~<>.")


def _is_separator_line(line: str) -> bool:
    m = _SYMBOL_LINE_RE.fullmatch(line)
    if m is None:
        return False
    ch = m.group(1)
    cat = unicodedata.category(ch)
    return (
        ch not in _NOT_SEPARATOR
        and cat not in ("Ps", "Pe", "Pi", "Pf")
        and (cat != "So" or "\u2500" <= ch <= "\u257f")
    )


def _is_boilerplate(line: str) -> bool:
    if _BANNER_RE.search(line) or _STUB_LINE_RE.fullmatch(line) or _is_separator_line(line):
        return True
    words = len(line.split())
    return (words <= _SHORT_LINE_WORDS and _FOOTER_RE.search(line) is not None) or (
        (words <= _NAV_LINE_WORDS or _NAV_SEP_RE.search(line) is not None)
        and words <= _SHORT_LINE_WORDS
        and _LOGIN_RE.search(line) is not None
    )


def strip_boilerplate(text: str) -> tuple[str, int, float]:
    """Removes boilerplate and separator lines.

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
