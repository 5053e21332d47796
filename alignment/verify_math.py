"""Math answer verification: a response's final answer against a reference, in pure Python.

Used by GRPO's / online DPO's / best-of-N's `math_verify` reward (alignment/grpo_rewards.py) and
by evaluation's `"scoring": "math"` generation tasks (evaluation/generate_tasks.py), so training
rewards and evaluation agree on what "right" means. No sympy: answers are compared as exact
rationals (`fractions.Fraction`) when both sides are numbers, element-wise when they are tuples,
intervals or lists, as normalised strings otherwise (so `\\sqrt{2}` equals `\\sqrt2`), and where
those rules find two scalars unequal, by value when both are expressions of
alignment/math_expr.py's language (so `\\frac{\\pi}{2}` equals `\\frac{2\\pi}{4}` and `2x+1`
equals `1+2x`, but `\\sqrt{2}` does not equal `1.41421356`).

Extraction (`extract_answer`), the first form present wins:
  1. the last `\\boxed{...}` / `\\fbox{...}` (braces balanced, nested, escaped `\\{` skipped;
     `\\boxed 5` too). A last box that never closes is no answer: the model's final answer is
     unreadable, and falling back to an earlier box would reward an answer it took back;
  2. GSM8K's `#### 42` (the last one, to the end of its line);
  3. "The answer is X" / "Answer: X" (the last one; X ends at the line's end or at a "." that
     ends a sentence, so "3.5" stays whole);
  4. only with `last_number=True`: the last number in the text. Off by default, for the
     rewards above all: a policy rewarded for its last number learns nothing about stating an
     answer, and is paid for any derivation whose last step happens to print the right number
     (or for ending on it by chance); the strict forms make the answer format part of what is
     learnt, as R1-Zero's and Tülu 3's RLVR rewards do. Turn it on for base-model evaluation
     with free-form answers (lm-eval's GSM8K "flexible-extract").

The reference (`reference_answer`, from `meta["answer"]`) may be the answer itself ("3/4",
"\\frac{3}{4}", 0.75), a GSM8K solution ("... #### 72"), a MATH solution holding a `\\boxed{}`,
or a list of accepted answers (any one matches).

Normalisation (both sides): `$`, `\\(` `\\)`, `\\left` / `\\right`, `\\!` `\\,` `\\;` spaces,
`\\displaystyle`, `^\\circ` / `°`, `\\%` / `%`, currency signs and a trailing "." are dropped;
`\\text{...}` / `\\mbox{...}` / `\\mathrm{...}` holding no digit are units and dropped (with a
power: "\\text{cm}^2") when they follow something (a lone `\\text{Monday}` is the answer), and
so are plain unit words after a number ("5 apples", "12 cm^2"; not "pi"); `\\dfrac` / `\\tfrac`
are `\\frac`, `\\frac12` is `\\frac{1}{2}`, `\\sqrt2` is `\\sqrt{2}`; a leading single-variable
assignment ("x = 5", "\\theta = 30", "y \\in [0, 1]") is dropped. Then:
  numbers  integers, decimals (".5"), thousands separators ("1,000,000", "1{,}000", "1\\,000"),
           scientific notation ("1.5e3", "1.5 \\times 10^{3}"), fractions ("\\frac{1}{2}",
           "1/2", "-\\frac{1}{2}" = "\\frac{-1}{2}"), mixed numbers ("2\\frac{1}{2}", "2 1/2":
           5/2, the MATH convention, not 2·(1/2)), and + - * / ^ over them ("3+4" is 7),
           evaluated exactly: 0.5 == 1/2 == \\frac{1}{2}, 3.0 == 3, -0 == 0; "0.333" is not
           1/3 unless `rel_tol` allows it (|a − b| <= rel_tol · max(|a|, |b|); for two numbers
           only);
  repeats  a repeating decimal is its exact fraction: "0.\\overline{3}" == "\\frac13",
           "0.1\\overline{6}" == "1/6", "2.\\overline{09}" == "23/11" (also `\\dot{3}`); a
           truncation ("0.333") is not, unless `rel_tol` allows it;
  percent  the sign is dropped: "10\\%" == "10%" == "10", but "50%" != "0.5" — a percentage
           and a fraction are different written answers, and accepting x, x/100 and 100x (as
           some graders do) lets "0.5" match a reference of 50;
  tuples   "(1, 2)", "[0, \\infty)": same brackets (an open and a closed interval differ), then
           element-wise; "(5)" is 5;
  matrices "\\begin{pmatrix} 1 \\\\ -\\frac12 \\end{pmatrix}" (MATH's vectors and matrices; also
           matrix, bmatrix, Bmatrix, smallmatrix: the same matrix in other brackets): the same
           shape, then cell by cell; a tuple "(1, -1/2)" is not the column vector, and
           vmatrix (a determinant) is text;
  unions   "(-\\infty, 1) \\cup (2, \\infty)": its intervals (each as a tuple above), in any order;
  lists    "2, 3", "x = 2, 3", "\\{2, 3\\}", "x = -1 \\text{ or } x = 3": compared as multisets (the
           order of an equation's solutions is not part of the answer); "1,234" is one number;
  ±        an answer with one `\\pm` (or "±") is the list of its two answers:
           "\\frac{1 \\pm \\sqrt5}{2}" == "\\frac{1+\\sqrt5}{2}, \\frac{1-\\sqrt5}{2}",
           "x = \\pm 3" == "3, -3" (and != "3"); with two or more, or with `\\mp`, the signs pair
           up, and the answer is text;
  text     the rest: whitespace removed, one spelling of a symbol (`\\le` is `\\leq`, `\\ne`
           `\\neq`, `\\varnothing` `\\emptyset`, `\\lt` `<`), `^{2}` is `^2`, `(a)/(b)` of atoms
           is `a/b`, and lower case when it holds no LaTeX command ("\\text{Monday}" == "monday");
  values   two scalars (numbers or text, also as elements of tuples, intervals and lists) that
           the rules above find unequal, both in the expression language of
           alignment/math_expr.py (numbers, + - * / ^, implicit products, \\frac, \\sqrt,
           \\sqrt[n], \\pi, e, \\sin \\cos \\tan \\ln \\log \\exp, single-letter variables;
           its docstring has the details), are equal when they have the same variables and the
           same value: closed forms evaluated in high-precision decimals, expressions at seeded
           random points ("\\frac{\\sqrt{2}}{2}" == "\\frac{1}{\\sqrt{2}}", "\\sqrt{4}" == "2",
           "x^2-1" == "(x-1)(x+1)"; "x^2" != "2x"). A decimal is not the irrational it
           approximates ("1.41421356" != "\\sqrt{2}", whatever `rel_tol`), and text without a
           LaTeX command is read in lower case, as the text rule reads it ("X+1" == "1+x").

Nothing here raises on a model's text (a malformed `\\boxed{` is just wrong); a bad reference
(not a string or number) is a TypeError naming it. Not handled: equivalence outside
math_expr's language (equations, complex numbers: i is a variable, inverse
trigonometric functions, degrees: "\\sin 30^\\circ" is sin of 30 radians), identities that drop a
variable ("x - x" vs "0"), inequalities against intervals, units conversion.
"""

from __future__ import annotations

import re
import unicodedata
from fractions import Fraction

from flaxlm.alignment import math_expr

MAX_ANSWER_CHARS = 1000  # a longer "final answer" is no answer (and bounds the work per sample)

# --- extraction ------------------------------------------------------------------------------

_BOX = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_GSM8K = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS = re.compile(r"\banswer\b\**[ \t]*(?:is\b|[:=])[ \t]*:?([^\n]*)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def braced(text: str, i: int) -> tuple[str, int] | None:
    """(content, index after) of the brace group opening at text[i] == "{"; None when it never
    closes. An escaped brace (`\\{`, `\\}`) and anything after a backslash does not count."""
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j], j + 1
        j += 1
    return None


def last_boxed(text: str) -> tuple[bool, str | None]:
    """(whether any box is present, the content of the last top-level one). The content is None
    when that box is malformed (it never closes, or is empty). A box inside a box is part of its
    content ("\\boxed{\\boxed{2}}": "\\boxed{2}", unwrapped by normalisation)."""
    seen, found, pos = False, None, 0
    while m := _BOX.search(text, pos):
        seen, j = True, m.end()
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            got = braced(text, j)
            if got is None:  # unbalanced: look on past the command for a later, closed box
                found, pos = None, m.end()
                continue
            found, pos = got
        else:  # "\boxed 5": the token up to a space or "$"
            tok = re.match(r"[^\s$]+", text[j:])
            found, pos = (tok.group(0), j + tok.end()) if tok else (None, j)
        found = found if found and found.strip() else None
    return seen, found


def _answer_is(text: str) -> str | None:
    """X of the last "answer is X" / "Answer: X", cut at the end of its sentence."""
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    x = matches[-1].group(1)
    if end := _SENTENCE_END.search(x):
        x = x[: end.start()]
    x = x.strip().strip("*").strip()
    return x or None


def extract_answer(text: str, *, last_number: bool = False) -> str | None:
    """The final answer a response states (the module docstring's order), or None."""
    if not isinstance(text, str):
        return None
    seen, boxed = last_boxed(text)
    if seen:
        return boxed
    if hashes := _GSM8K.findall(text):
        return hashes[-1].strip() or None
    if said := _answer_is(text):
        return said
    if last_number and (numbers := _NUMBER.findall(text)):
        return numbers[-1]
    return None


def reference_answer(answer) -> list[str]:
    """The accepted answers of a `meta["answer"]`: a number, an answer string, a GSM8K solution
    ("... #### 72" → "72"), a MATH solution (its last `\\boxed{}`), or a list of those."""
    if isinstance(answer, (list, tuple)) and answer:
        return [a for x in answer for a in reference_answer(x)]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float, Fraction)):
        raise TypeError(f"meta.answer must be a string, a number or a non-empty list of them, "
                        f"got {type(answer).__name__} {answer!r}")  # fmt: skip
    if not isinstance(answer, str):
        return [str(answer)]
    seen, boxed = last_boxed(answer)
    if seen and boxed is not None:
        return [boxed]
    if hashes := _GSM8K.findall(answer):
        return [hashes[-1].strip()]
    return [answer]


# --- normalisation ---------------------------------------------------------------------------

_UNICODE = {"\u2212": "-", "\u2013": "-", "\u00d7": r"\times ", "\u22c5": r"\cdot ",
            "\u00b1": r"\pm ", "\u00f7": "/", "\u221a": r"\sqrt", "\u03c0": r"\pi ",
            "\u221e": r"\infty ", "\u00b0": "", "\u2009": " ", "\u00a0": " ",
            "\u202f": " "}  # fmt: skip
# Spacing and invisible commands; `\,` `\!` between digits were thousands separators (below).
_DROP = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])\.?|\\displaystyle|\\limits"
                   r"|\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|\\%|%")  # fmt: skip
# (a matrix's row break `\\` is matched whole first and kept: its second backslash and the
# space after it are no `\ `)
# One command for each symbol LaTeX spells two ways ("x \\le 3" is "x \\leq 3")
_ALIASES = {"le": r"\leq", "leqslant": r"\leq", "ge": r"\geq", "geqslant": r"\geq",
            "ne": r"\neq", "lt": "<", "gt": ">", "varnothing": r"\emptyset"}  # fmt: skip
_ALIAS = re.compile(r"\\(" + "|".join(_ALIASES) + r")(?![a-zA-Z])")
_SPACES = re.compile(r"\\\\|\\[,;:! ]|\\q?quad(?![a-zA-Z])|~")
_THOUSANDS_TEX = re.compile(r"(?<=\d)(?:\{,\}|\\,|\\!|\\ )(?=\d{3}(?!\d))")
_TEXT_CMDS = ("text", "mbox", "mathrm", "textrm", "textnormal", "textit", "textbf", "mathbf",
              "operatorname", "mathit", "boxed", "fbox")  # fmt: skip
_TEXT_CMD = re.compile(r"\\(" + "|".join(_TEXT_CMDS) + r")(?![a-zA-Z])\s*(?=\{)")
_ASSIGN = re.compile(r"^\s*(?:[a-zA-Z](?:_\{?\w+\}?)?|\\[a-zA-Z]+(?:_\{?\w+\}?)?)\s*"
                     r"(?:=|\\in(?![a-zA-Z])|\\approx(?![a-zA-Z]))(?!=)")  # fmt: skip
_MATH_WORDS = {"pi", "e", "i", "sqrt", "infty", "inf", "infinity", "frac", "and", "or"}
# (one word, then words each after a space: no two ways to split a word, no backtracking blowup)
_UNIT_WORD = r"[a-zA-Z]{2,}(?:\^\{?\d\}?)?"
_UNIT_TAIL = re.compile(r"\s*" + _UNIT_WORD + r"(?:\s+" + _UNIT_WORD + r")*\.?")


def _command_args(s: str, i: int, n: int) -> tuple[list[str], int] | None:
    """The `n` arguments of a command whose name ends at s[i]: each a brace group, or one
    character / one `\\name` ("\\frac12", "\\frac1{2}", "\\sqrt\\pi"); None when malformed."""
    args = []
    for _ in range(n):
        while i < len(s) and s[i] == " ":
            i += 1
        if i >= len(s):
            return None
        if s[i] == "{":
            got = braced(s, i)
            if got is None:
                return None
            args.append(got[0])
            i = got[1]
        elif s[i] == "\\" and (m := re.match(r"\\[a-zA-Z]+", s[i:])):
            args.append(m.group(0))
            i += m.end()
        elif s[i] in "}^_[":  # ("\sqrt[3]{x}" is left as it is)
            return None
        else:
            args.append(s[i])
            i += 1
    return args, i


def _rewrite_commands(s: str, name: str, n: int, fn) -> str:
    """Every `\\name` with `n` arguments replaced by fn(*args) (inner ones first, so nested
    fractions are rewritten too); a malformed one is left as it is."""
    pat = re.compile(r"\\" + name + r"(?![a-zA-Z])")
    out, pos = [], 0
    while m := pat.search(s, pos):
        got = _command_args(s, m.end(), n)
        if got is None:
            out.append(s[pos : m.end()])
            pos = m.end()
            continue
        args, end = got
        out.append(s[pos : m.start()] + fn(*(_rewrite_commands(a, name, n, fn) for a in args)))
        pos = end
    return "".join(out) + s[pos:]


def _unwrap_text(s: str) -> str:
    """`\\text{...}`-like groups: units (no digit, after something) dropped, the rest
    unwrapped to their content; `\\boxed{x}` is x."""

    def drop_units(t: str) -> str:
        out, pos = [], 0
        while m := _TEXT_CMD.search(t, pos):
            got = braced(t, m.end())
            if got is None:
                break
            content, end = got
            # (a connective is no unit: "x = 1 \text{ or } x = 2")
            wrapper = m.group(1) in ("boxed", "fbox") or content.strip() in ("or", "and")
            unit = not wrapper and not re.search(r"\d", content)
            power = re.match(r"\s*\^\s*(?:\{[^{}]*\}|\w)", t[end:])
            keep = not unit or not t[: m.start()].strip(" .,")  # (a unit follows its number)
            if not keep and power:  # "\text{cm}^2": the power is the unit's
                end += power.end()
            out.append(t[pos : m.start()] + (f" {content} " if keep else " "))
            pos = end
        return "".join(out) + t[pos:]

    prev = None
    while prev != s:  # nested: "\boxed{\text{5 cm}}"
        prev, s = s, drop_units(s)
    return s


def clean(s: str) -> str:
    """The textual normalisation (the module docstring), before any parsing."""
    s = "".join(_UNICODE.get(c, c) for c in s if unicodedata.category(c) != "Sc" or c == "$")
    s = s.replace("\\$", "").replace("$", "").strip()
    s = re.sub(r"^\\[(\[]|\\[)\]]$", "", s).strip()
    s = _THOUSANDS_TEX.sub("", s)
    s = _DROP.sub("", s)
    s = _ALIAS.sub(lambda m: _ALIASES[m.group(1)], s)
    s = _SPACES.sub(lambda m: m.group(0) if m.group(0) == "\\\\" else " ", s)
    s = _unwrap_text(s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = _rewrite_commands(s, "frac", 2, lambda a, b: r"\frac{" + a + "}{" + b + "}")
    s = re.sub(r"\\sqrt\s*(?=[^\s{\[])", r"\\sqrt", s)  # "\sqrt 2" → "\sqrt2" (then braced)
    s = _rewrite_commands(s, "sqrt", 1, lambda a: r"\sqrt{" + a + "}")
    s = _REPEATING.sub(_repeating_fraction, s)
    s = " ".join(s.split())
    s = s.strip().rstrip(".,;!").strip()
    if s.startswith("**") or s.endswith("**"):  # markdown bold around the answer
        s = s.strip("*").strip()
    return s


# A repeating decimal: digits, a point, digits, then the period under \overline (or a \dot
# over one digit; the British dots over a longer period's first and last digits are not read).
_REPEATING = re.compile(
    r"(?<![\d.])(\d*)\.(\d*)\s*\\(?:overline|dot)\s*(?:\{\s*(\d+)\s*\}|(\d))(?![\d.])"
)


def _repeating_fraction(m: re.Match) -> str:
    """`\\frac{p}{q}`, the exact value of a repeating decimal: 0.1\\overline{6} = 1/6 (the
    integer part a, the digits n before the period, the period r: a + (nr - n) / (10^|n| ·
    (10^|r| − 1)))."""
    whole, head, period = m.group(1) or "0", m.group(2), m.group(3) or m.group(4)
    q = 10 ** len(head) * (10 ** len(period) - 1)
    x = int(whole) + Fraction(int(head + period) - int(head or "0"), q)
    return rf"\frac{{{x.numerator}}}{{{x.denominator}}}"


def strip_assignment(s: str) -> str:
    """The right side of a leading single variable's "=" (or `\\in`, `\\approx`): "x = 5" is
    "5", "x = 3 + 2 = 5" is "5"; anything else as it is."""
    m = _ASSIGN.match(s)
    if not m:
        return s
    rest = s[m.end() :]
    if "=" in rest and len(_split_top(rest)) == 1:  # (not "2, x = 3": a list, split first)
        return rest.rsplit("=", 1)[-1].strip()
    return rest.strip()


# --- numbers ---------------------------------------------------------------------------------

_MIXED = re.compile(r"(-?)(\d+)\s*(?:\\frac\{(\d+)\}\{(\d+)\}|\s(\d+)\s*/\s*(\d+))")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def to_number(s: str) -> Fraction | None:
    """The exact value of a cleaned scalar answer, or None when it is not a plain number
    expression (a symbol, `\\sqrt`, `\\pi`, text)."""
    s = s.strip()
    if m := _MIXED.fullmatch(s):  # "2\frac{1}{2}", "2 1/2": 2 + 1/2 (the MATH convention)
        a, b = int(m.group(3) or m.group(5)), int(m.group(4) or m.group(6))
        if 0 <= a < b:
            x = int(m.group(2)) + Fraction(a, b)
            return -x if m.group(1) else x
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if "," in s or not s:
        return None
    tree = math_expr.parse_expr(s)  # (one parser for numbers and expressions)
    return None if tree is None else math_expr.rational_value(tree)


# --- structure and comparison ----------------------------------------------------------------

_OPEN, _CLOSE = "([", ")]"


def _matching(s: str, i: int) -> int:
    """Index of the bracket closing the one at s[i] (any of ( [ { with any of ) ] }, so the
    half-open "[0, 1)" closes), or -1."""
    depth = 0
    for j in range(i, len(s)):
        if s[j] in "([{":
            depth += 1
        elif s[j] in ")]}":
            depth -= 1
            if depth == 0:
                return j
    return -1


def _split_top(s: str, seps: str = ",") -> list[str]:
    """`s` split at the separators outside any brackets."""
    parts, depth, start = [], 0, 0
    for j, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c in seps and depth == 0:
            parts.append(s[start:j])
            start = j + 1
    return parts + [s[start:]]


_CUP = re.compile(r"\\cup(?![a-zA-Z])")


def _split_union(s: str) -> list[str]:
    """`s` split at the `\\cup`s outside any brackets (`_split_top`, each `\\cup` made one
    separator character); [s] when there is none, or a side is empty."""
    if "\0" in s:
        return [s]
    parts = _split_top(_CUP.sub("\0", s), "\0")
    return parts if len(parts) > 1 and all(p.strip() for p in parts) else [s]


def parse(s: str):
    """A cleaned answer as a value: ("num", Fraction), ("seq", brackets, [values]) for a tuple
    or an interval, ("mat", [[values] per row]) for a matrix or vector, ("set", [values]) for a
    list of answers, ("union", [values]) for intervals joined by \\cup (compared as a set too),
    or ("str", canonical text, the cleaned text itself)."""
    words = re.split(r"\s+(?:or|and)\s+", s.strip())
    if len(words) > 1 and all(to_number(strip_assignment(w)) is not None for w in words):
        return ("set", [parse(w) for w in words])  # "x = -1 \text{ or } x = 3": a list
    s = strip_assignment(s.strip())
    if len(_PM.findall(s)) == 1 and not _MP.search(s):  # both signs: a list of two answers
        return ("set", [parse(_PM.sub(sign, s).strip()) for sign in "+-"])
    if len(parts := _split_union(s)) > 1:  # intervals joined by \cup: in any order
        return ("union", [parse(p) for p in parts])
    if (rows := _matrix_cells(s)) is not None:
        return ("mat", [[parse(cell) for cell in row] for row in rows])
    if s.startswith(r"\{") and s.endswith(r"\}"):
        return ("set", [parse(p) for p in _split_top(s[2:-2]) if p.strip()])
    if s and s[0] in _OPEN and _matching(s, 0) == len(s) - 1 and s[-1] in _CLOSE:
        parts = _split_top(s[1:-1])
        if len(parts) == 1:  # "(5)", "(A)": just that
            return parse(parts[0])
        return ("seq", s[0] + s[-1], [parse(p) for p in parts])
    if _THOUSANDS.fullmatch(s):
        return ("num", to_number(s))
    parts = _split_top(s)
    if len(parts) > 1:
        return ("set", [parse(p) for p in parts if p.strip()])
    if (x := to_number(s)) is not None:
        return ("num", x)
    if (x := _without_units(s)) is not None:
        return ("num", x)
    return ("str", canonical_text(s), s)


_PM, _MP = re.compile(r"\\pm(?![a-zA-Z])"), re.compile(r"\\mp(?![a-zA-Z])")
# pmatrix, bmatrix, ... are one matrix in different brackets; vmatrix / Vmatrix are determinants
# (a number, not a matrix), left to the text rule
_MATRIX = re.compile(
    r"\\begin\{(matrix|pmatrix|bmatrix|Bmatrix|smallmatrix)\}(.*)\\end\{\1\}", re.S
)


def _matrix_cells(s: str) -> list[list[str]] | None:
    """The cells of a cleaned `\\begin{pmatrix} a & b \\\\ c & d \\end{pmatrix}`, row by row (a
    trailing row break ends the last row); None when `s` is no such matrix, has a nested one,
    an empty cell or rows of different lengths."""
    m = _MATRIX.fullmatch(s)
    if m is None or r"\begin" in m.group(2):
        return None
    rows = [row.split("&") for row in m.group(2).split("\\\\")]
    if len(rows) > 1 and not "".join(rows[-1]).strip():
        rows.pop()
    cells = [[c.strip() for c in row] for row in rows]
    if len({len(row) for row in cells}) != 1 or not all(map(all, cells)):
        return None
    return cells


def _without_units(s: str) -> Fraction | None:
    """The number before trailing unit words ("5 apples", "12 cm^2"); None if there is none, or
    if a word is a mathematical one ("2 pi" is not 2)."""
    if len(s) > 200:
        return None
    m = re.match(r"(.*?\d)(" + _UNIT_TAIL.pattern + r")$", s)
    if not m:
        return None
    words = re.findall(r"[a-zA-Z]+", m.group(2))
    if any(w.lower() in _MATH_WORDS for w in words):
        return None
    return to_number(m.group(1))


def canonical_text(s: str) -> str:
    """A non-numeric answer as a comparable string (the module docstring's "text")."""
    s = _rewrite_commands(s, "frac", 2, lambda a, b: f"({a})/({b})")
    # Whitespace goes, but for a space between two digits: "1 2" is not "12".
    s = re.sub(r"(?<=\d)\s+(?=\d)", "\0", s)
    s = "".join(s.split()).replace("\0", " ")
    s = re.sub(r"([\^_])\{(\w)\}", r"\1\2", s)
    atom = r"-?(?:\d+(?:\.\d+)?|[a-zA-Z]|\\[a-zA-Z]+(?:\{[^{}]*\})?)"
    s = re.sub(r"\((" + atom + r")\)", r"\1", s)  # "(\pi)/(2)" → "\pi/2"
    return s if "\\" in s else s.lower()


def _close(a: Fraction, b: Fraction, rel_tol: float) -> bool:
    if a == b:
        return True
    return rel_tol > 0 and abs(a - b) <= Fraction(rel_tol) * max(abs(a), abs(b))


def _expression(v) -> str:
    """A scalar `parse` value as math_expr reads it: a number as its exact fraction, text in
    lower case where the text rule reads it so (no LaTeX command)."""
    if v[0] == "num":
        return f"({v[1].numerator})/({v[1].denominator})"
    return v[2] if "\\" in v[2] else v[2].lower()


def values_equal(a, b, rel_tol: float = 0.0) -> bool:
    """Whether two `parse` values are the same answer (numbers within `rel_tol`; scalars by
    value when the rules find them unequal: the module docstring's "values")."""
    if a[0] == b[0] == "num":
        return _close(a[1], b[1], rel_tol)
    if a[0] in ("num", "str") and b[0] in ("num", "str"):
        if a[0] == b[0] == "str" and a[1] == b[1]:
            return True
        return math_expr.equivalent(_expression(a), _expression(b)) is True
    if a[0] != b[0]:
        return False
    if a[0] == "seq":
        same = a[1] == b[1] and len(a[2]) == len(b[2])
        return same and all(values_equal(x, y, rel_tol) for x, y in zip(a[2], b[2]))
    if a[0] == "mat":
        same = [len(row) for row in a[1]] == [len(row) for row in b[1]]
        return same and all(values_equal(x, y, rel_tol)
                            for ra, rb in zip(a[1], b[1]) for x, y in zip(ra, rb))  # fmt: skip
    left = list(b[1])  # a multiset: each element of a matches a distinct element of b
    for x in a[1]:
        hit = next((j for j, y in enumerate(left) if values_equal(x, y, rel_tol)), None)
        if hit is None:
            return False
        left.pop(hit)
    return not left


def answers_equal(pred: str, gold: str, *, rel_tol: float = 0.0) -> bool:
    """Whether the answer `pred` equals the reference answer `gold` (both as written, e.g. the
    content of a box); never raises on a model's text."""
    if len(pred) > MAX_ANSWER_CHARS:
        return False
    try:
        pred, gold = clean(pred), clean(gold)
        return bool(pred and gold) and values_equal(parse(pred), parse(gold), rel_tol)
    except RecursionError:  # absurdly nested brackets: no answer we can read
        return False


def verify(response: str, answer, *, rel_tol: float = 0.0,
           last_number: bool = False) -> tuple[bool, str | None]:  # fmt: skip
    """(correct, the extracted answer or None): the response's final answer against the
    reference `answer` (`meta["answer"]`: see `reference_answer`)."""
    golds = reference_answer(answer)
    got = extract_answer(response, last_number=last_number)
    if got is None:
        return False, None
    return any(answers_equal(got, g, rel_tol=rel_tol) for g in golds), got


def math_verify(meta: dict, response: str) -> float:
    """GRPO reward: 1.0 when the response's final answer (`extract_answer`: the last
    `\\boxed{}`, else "#### X", else "The answer is X") equals `meta["answer"]` as this module
    compares answers, else 0.0. A missing `meta["answer"]` is a KeyError naming it (the prompt
    data's fault, checked before training by grpo_rewards.check_references)."""
    if "answer" not in meta:
        raise KeyError("math_verify needs the prompt record's meta.answer (the reference)")
    return float(verify(response, meta["answer"])[0])


math_verify.reference_keys = ("answer",)  # (grpo_rewards.check_references)
# What a sample votes for in self-consistency's majority (maj@k: rl_eval.reward_metrics), and
# when two votes are one answer: the answer math_verify judges, compared as it compares them
# (`vote(meta, response)`; a reward's vote may also take the response alone).
math_verify.vote = lambda meta, response: extract_answer(response)
math_verify.same_answer = answers_equal


def majority_sample(votes, same=answers_equal) -> int | None:
    """The index of the first sample giving the answer most samples give (maj@k, Wang et al.
    2022's self-consistency): `votes` are the samples' answers (None: it gives none and does not
    vote), grouped by `same`; a tie goes to the answer given first; None when no sample gives
    one. The majority is right when that sample is."""
    groups = []  # [votes, index of the first sample giving it]
    for i, v in enumerate(votes):
        if v is None:
            continue
        for g in groups:
            if same(v, votes[g[1]]):
                g[0] += 1
                break
        else:
            groups.append([1, i])
    return max(groups, key=lambda g: (g[0], -g[1]))[1] if groups else None


def boxed_format(meta: dict, response: str) -> float:
    """GRPO reward: 1.0 when the response states its final answer in a closed, non-empty
    `\\boxed{}` (what math_verify reads first, and what the benchmark prompts ask for), else
    0.0 — a format reward in the manner of R1-Zero's, to weight small beside math_verify
    ("math_verify,boxed_format:0.1"): it pays for the form, whatever the answer. Needs no
    meta."""
    del meta
    seen, boxed = last_boxed(response)
    return float(seen and boxed is not None and bool(boxed.strip()))
