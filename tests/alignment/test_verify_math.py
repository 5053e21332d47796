"""Math answer verification (alignment/verify_math.py): a table of equal and unequal answers
(traps included; tuples, matrices, unions of intervals, ± answers, lists), a table of answers
equal or unequal by value (alignment/math_expr.py: closed forms, expressions at random points,
inside tuples and lists), answer extraction from responses, references (GSM8K / MATH
solutions), the registered `math_verify` and `boxed_format` rewards through `parse_rewards` and
the rollouts' `call_reward_fns`, the check that prompts carry meta.answer, and evaluation's
`"scoring": "math"` (pass@k, maj@k) through a stand-in decoder. Pure Python: no model, no
world."""

import random
from fractions import Fraction

import pytest

from flaxlm.alignment import math_expr as M
from flaxlm.alignment import verify_math as V
from flaxlm.alignment.grpo_rewards import REWARDS, check_references, parse_rewards
from flaxlm.alignment.rl_rollout import call_reward_fns

# (answer as written, reference, equal): one case a line
ANSWERS = [
    # fractions, decimals, integers
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac12", "1/2", True),
    ("\\dfrac{3}{4}", "0.75", True),
    ("\\tfrac34", "3/4", True),
    ("1/2", "12", False),  # a slash is no digit separator
    (".5", "0.5", True),
    ("3.0", "3", True),
    ("3.00", "3", True),
    # repeating decimals: the exact fraction; a truncation is not it
    ("0.\\overline{3}", "\\frac13", True),
    ("0.1\\overline{6}", "1/6", True),
    ("2.\\overline{09}", "\\frac{23}{11}", True),
    ("1.2\\overline{34}", "611/495", True),
    ("-.\\overline{142857}", "-1/7", True),
    ("0.\\overline 6", "x = \\frac23", True),
    ("0.\\dot{3}", "1/3", True),
    ("0.\\overline{9}", "1", True),
    ("0.\\overline{3}", "0.333", False),
    ("0.\\overline{3}", "0.\\overline{33}", True),
    ("0.\\overline{12}", "0.\\overline{21}", False),
    ("\\overline{AB}", "AB", False),  # a segment, not a period
    ("3.01", "3", False),
    ("0.333", "1/3", False),  # not without a tolerance
    ("0.3333333333", "\\frac{1}{3}", False),
    ("-0", "0", True),
    ("-0.0", "0", True),
    ("-5", "5", False),
    ("\u22125", "-5", True),  # a Unicode minus
    ("-\\frac{1}{2}", "\\frac{-1}{2}", True),
    ("\\frac{-1}{2}", "-1/2", True),
    ("\\frac{1}{-2}", "-0.5", True),
    ("\\frac{1}{0}", "0", False),  # no number: compared as text
    ("2\\frac{1}{2}", "5/2", True),  # a mixed number (MATH's convention)
    ("2 1/2", "2.5", True),
    ("-1\\frac{1}{4}", "-1.25", True),
    ("1 2", "12", False),  # two numbers are not one
    # separators, notation, arithmetic
    ("1,000,000", "1000000", True),
    ("1{,}000", "1000", True),
    ("1\\,000", "1000", True),
    ("1,234", "1234", True),
    ("1.5e3", "1500", True),
    ("1.5 \\times 10^{3}", "1500", True),
    ("2.5\\cdot10^{-2}", "0.025", True),
    ("10^{3}", "1000", True),
    ("2^{10}", "1024", True),
    ("3+4", "7", True),
    ("10^{999999}", "1", False),  # too large to evaluate: text, and unequal
    ("9^{9^{9}}", "9", False),
    ("1e999999999", "1", False),
    # decorations
    ("\\$5.00", "5", True),
    ("$\\frac{1}{2}$", "1/2", True),
    ("\\left( 1, 2 \\right)", "(1,2)", True),
    ("30^\\circ", "30", True),
    ("30^{\\circ}", "30", True),
    ("90°", "90", True),
    ("10\\%", "10", True),
    ("10%", "10", True),
    ("50%", "0.5", False),  # a percentage is not its fraction
    ("5 \\text{cm}", "5", True),
    ("5\\mbox{ cm}", "5", True),
    ("12 \\text{ cm}^2", "12", True),
    ("5 apples", "5", True),
    ("2 pi", "2", False),  # pi is no unit
    ("2\\pi", "2 \\pi", True),
    ("\\boxed{2}", "2", True),
    ("\\boxed{\\boxed{2}}", "2", True),
    ("**7**", "7", True),
    ("7.", "7", True),
    # assignments, tuples, intervals, lists, sets
    ("x = 5", "5", True),
    ("x=5", "x = 5", True),
    ("y = \\frac12", "0.5", True),
    ("\\theta = 30^\\circ", "30", True),
    ("x = 3 + 2 = 5", "5", True),
    ("(1, 2)", "(1,2)", True),
    ("(1, 2)", "(2, 1)", False),  # a tuple is ordered
    ("(1,2)", "[1,2]", False),  # open and closed intervals differ
    ("[0, \\infty)", "[0,\\infty)", True),
    ("(0.5, 3)", "(\\frac{1}{2}, 3)", True),  # element-wise numbers
    ("(1, 2, 3)", "(1, 2)", False),
    ("(5)", "5", True),
    ("(A)", "A", True),
    ("x = 2, 3", "3, 2", True),  # the solutions, in any order
    ("x=2, x=3", "2,3", True),
    ("x = -1 \\text{ or } x = 3", "-1, 3", True),
    ("2, 3", "2, 3, 3", False),  # a multiset
    ("2, 3", "2", False),
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("x \\in [1, 2]", "[1,2]", True),
    # unions of intervals, in any order, interval by interval
    ("(-\\infty,1)\\cup(2,\\infty)", "(2, \\infty) \\cup (-\\infty, 1)", True),
    ("(-\\infty, \\frac12) \\cup (3, \\infty)", "(-\\infty,0.5)\\cup(3,\\infty)", True),
    ("(-\\infty,1)\\cup(2,\\infty)", "(-\\infty,1)\\cup[2,\\infty)", False),  # closed at 2
    ("x \\in (-\\infty,1)\\cup(2,\\infty)", "(-\\infty,1)\\cup(2,\\infty)", True),
    ("(1,2)\\cup(3,4)", "(1,2), (3,4)", False),  # a union is not a list of two tuples
    ("(1,2)\\cup(3,4)", "(1,2)", False),
    ("\\{1\\}\\cup[2,3]", "[2,3]\\cup\\{1\\}", True),
    # one ± is both answers
    ("\\frac{1 \\pm \\sqrt5}{2}", "\\frac{1+\\sqrt5}{2}, \\frac{1-\\sqrt5}{2}", True),
    ("x = \\pm 3", "3, -3", True),
    ("\u00b13", "-3, 3", True),
    ("\\pm 3", "3", False),  # one of the two is not the answer
    ("2 \\pm 1", "1, 3", True),
    ("\\pm \\frac{1}{2}", "0.5, -0.5", True),
    ("\\sqrt{2} \\pm 1", "1 \\pm \\sqrt2", False),
    ("x \\pmod{5}", "x \\pmod{5}", True),  # (a \pmod is no \pm)
    # vectors and matrices (MATH's precalculus answers), cell by cell
    ("\\begin{pmatrix}1\\\\-2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}", True),
    (
        "\\begin{pmatrix} -\\frac{1}{2} \\\\ 0 \\end{pmatrix}",
        "\\begin{pmatrix}-0.5\\\\0\\end{pmatrix}",
        True,
    ),
    (
        "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
        "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}",
        True,
    ),
    (
        "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
        "\\begin{pmatrix}1&3\\\\2&4\\end{pmatrix}",
        False,
    ),
    (
        "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
        "\\begin{pmatrix} 1 & 2 \\end{pmatrix}",
        False,
    ),  # shape
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "(1, 2)", False),  # a tuple is no vector
    (
        "\\begin{pmatrix} \\sqrt{2}/2 \\\\ 1 \\end{pmatrix}",
        "\\begin{pmatrix}\\frac{1}{\\sqrt2}\\\\1\\end{pmatrix}",
        True,
    ),
    (
        "\\mathbf{v} = \\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
        "\\begin{pmatrix}1\\\\2\\end{pmatrix}",
        True,
    ),
    ("\\begin{pmatrix} 1 \\\\ 2 \\\\ \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    (
        "\\begin{pmatrix} 1 & \\\\ 3 & 4 \\end{pmatrix}",
        "\\begin{pmatrix}1&0\\\\3&4\\end{pmatrix}",
        False,
    ),
    (
        "\\begin{vmatrix} 1 & 2 \\\\ 3 & 4 \\end{vmatrix}",
        "\\begin{vmatrix}1&2\\\\3&4\\end{vmatrix}",
        True,
    ),
    (
        "\\begin{vmatrix} 1 & 2 \\\\ 3 & 4 \\end{vmatrix}",
        "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}",
        False,
    ),
    # symbols and text
    ("\\sqrt{2}", "\\sqrt2", True),
    ("\\sqrt 2", "\u221a2", True),
    ("\\sqrt{2}", "1.41421356", False),  # a decimal is not the irrational it approximates
    ("\\sqrt{4}", "2", True),  # by value (math_expr: the table below)
    ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2", True),
    ("\\frac{\\pi}{2}", "\\pi/2", True),
    ("x^{2}", "x^2", True),
    ("\\sqrt[3]{8}", "\\sqrt[3]{8}", True),
    ("\\text{Monday}", "monday", True),
    ("\\textbf{(C)}", "C", True),
    ("Tuesday", "Monday", False),
    ("10 \\text{ and } 12", "1012", False),
    ("x \\le 3", "x \\leq 3", True),  # one spelling of a symbol
    ("x \\geqslant 2", "x\\ge 2", True),
    ("x \\ne 1", "x \\neq 1", True),
    ("x \\lt 3", "x<3", True),
    ("\\varnothing", "\\emptyset", True),
    ("x \\le 3", "x \\ge 3", False),
]


@pytest.mark.parametrize("pred,gold,equal", ANSWERS, ids=[f"{p}~{g}" for p, g, _ in ANSWERS])
def test_answers_compare_as_the_table_says(pred, gold, equal):
    assert V.answers_equal(pred, gold) is equal
    assert V.answers_equal(gold, pred) is equal  # (symmetric)


def test_the_table_is_large_and_has_both_kinds():
    assert len(ANSWERS) >= 60
    assert sum(e for _, _, e in ANSWERS) >= 20 and sum(not e for _, _, e in ANSWERS) >= 20


def test_a_relative_tolerance_makes_close_numbers_equal_and_only_numbers():
    assert V.answers_equal("0.333", "1/3", rel_tol=1e-3)
    assert not V.answers_equal("0.33", "1/3", rel_tol=1e-3)
    assert V.answers_equal("(0.333, 2)", "(1/3, 2)", rel_tol=1e-3)  # element-wise too
    assert not V.answers_equal("\\sqrt{2}", "1.414", rel_tol=1e-2)  # a symbol stays one


# --- equivalence by value (alignment/math_expr.py) -----------------------------------------

# (answer, reference, equal): pairs the string and number rules find unequal
BY_VALUE = [
    # closed forms
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\frac{2\\pi}{4}", "\\frac{\\pi}{2}", True),
    ("\\frac{2\\pi}{4}", "\\pi/2", True),
    ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("\\frac{3}{\\sqrt{3}}", "\\sqrt{3}", True),
    ("\\sqrt{2}\\sqrt{8}", "4", True),
    ("\\sqrt[3]{8}", "2", True),
    ("\\sqrt[3]{-8}", "-2", True),  # a real odd root
    ("\\sin\\frac{\\pi}{6}", "\\frac{1}{2}", True),
    ("\\sin(\\pi/6)", "0.5", True),  # a decimal that is the exact value
    ("\\cos(\\pi/2)", "0", True),  # rounding, not value, tells them apart
    ("e^{\\ln 2}", "2", True),
    ("\\log_2 8", "3", True),
    ("\\log_{10} 1000", "3", True),
    ("\\log 2 + \\log 3", "\\log 6", True),  # true in any base
    ("\\binom{5}{2}", "10", True),
    ("5!+1", "121", True),  # (a final "!" is punctuation to clean)
    ("|-3|", "3", True),
    ("2 pi", "2\\pi", True),  # "pi" spelt plainly
    ("\\frac{\\pi}{3}", "\\frac{\\pi}{2}", False),
    ("\\sqrt{2}", "1.41421356", False),  # a decimal approximation is a different answer
    ("\\sqrt{2}", "1.4142135623730950488016887", False),  # however many digits it has
    ("\\pi", "3.14159265358979323846264338327950288", False),
    ("e", "2.718281828459045", False),
    ("\\sqrt{3}", "\\sqrt{2}", False),
    ("\\log 100", "2", False),  # \log's base is unknown
    ("\\log 100", "2\\ln 10", False),
    ("\\sin 30^\\circ", "\\frac{1}{2}", False),  # radians: not handled
    ("1+10^{-80}", "1", False),  # below the first precision, not below the second
    ("\\frac{1}{0}", "\\frac{2}{0}", False),  # no value
    ("10^{999999}", "10^{999999}+1", False),
    ("9^{9^{9}}", "9^{9^{9}}", True),  # (the text rule: same text)
    # expressions with variables
    ("2x+1", "1+2x", True),
    ("x^2-1", "(x-1)(x+1)", True),
    ("(x+1)^2", "x^2+2x+1", True),
    ("\\frac{x^2-1}{x-1}", "x+1", True),
    ("\\frac{1}{2}x", "\\frac{x}{2}", True),
    ("0.5x", "\\frac{x}{2}", True),
    ("2^{x+1}", "2\\cdot 2^x", True),
    ("2\\sin x\\cos x", "\\sin 2x", True),
    ("\\tan x", "\\frac{\\sin x}{\\cos x}", True),
    ("\\ln x^2", "2\\ln x", True),  # equal where both are defined
    ("a_1+a_2", "a_2 + a_1", True),
    ("\\theta + 1", "1 + \\theta", True),
    ("3xy", "3yx", True),
    ("y = 2x + 3", "3 + 2x", True),  # (the assignment is dropped first)
    ("X+1", "1+x", True),  # text without LaTeX is read in lower case, as the text rule does
    ("x+1", "y+1", False),
    ("x^2", "2x", False),  # they meet at 0 and 2: no random point is either
    ("x^3", "x", False),  # ... at -1, 0, 1
    ("x(x-1)(x-2)+x", "x", False),
    ("x^2", "x^2+1", False),
    ("\\sqrt{x^2}", "x", False),  # |x|: the negative points tell
    ("x^y", "y^x", False),
    ("x+y", "x+y+z", False),
    ("x-x", "0", False),  # the variables must be the same
    ("i^2", "-1", False),  # i is a variable
    ("1/2x", "\\frac{x}{2}", False),  # ambiguous: no expression
    ("1/2x", "\\frac{1}{2x}", False),
    ("\\sin^{-1} x", "\\arcsin x", False),
    ("dog", "god", False),  # words, not products of letters
    ("2\\frac{1}{2}", "1", False),  # a mixed number (5/2), not 2·(1/2)
    # inside tuples, intervals and lists, element by element
    ("(\\frac{\\sqrt{2}}{2}, 2x)", "(\\frac{1}{\\sqrt{2}}, x+x)", True),
    ("(\\sqrt{4}, 3)", "(2, 3)", True),
    ("[\\frac{\\pi}{2}, \\pi)", "[\\frac{2\\pi}{4}, \\pi)", True),
    ("[\\frac{\\pi}{2}, \\pi)", "(\\frac{2\\pi}{4}, \\pi)", False),  # the brackets still count
    ("\\sqrt{2}, -\\sqrt{2}", "-\\frac{2}{\\sqrt{2}}, \\frac{2}{\\sqrt{2}}", True),
    ("\\sqrt{2}, \\sqrt{2}", "\\sqrt{2}, \\frac{2}{\\sqrt{2}}, 1", False),  # still multisets
]


@pytest.mark.parametrize("pred,gold,equal", BY_VALUE, ids=[f"{p}~{g}" for p, g, _ in BY_VALUE])
def test_answers_compare_by_value_as_the_table_says(pred, gold, equal):
    assert V.answers_equal(pred, gold) is equal
    assert V.answers_equal(gold, pred) is equal  # (symmetric: the points' seed is too)


def test_value_equality_has_no_tolerance_but_its_own():
    assert not V.answers_equal("\\sqrt{2}", "1.41421356", rel_tol=1e-3)  # rel_tol: numbers only
    assert not V.answers_equal("\\frac{\\pi}{3}", "1.0471975512", rel_tol=1e-6)
    assert V.answers_equal("\\frac{4}{\\sqrt{4}}", "2.0", rel_tol=1e-6)  # an exact value


def test_no_random_point_passes_two_different_polynomials():
    # p and q agree at small integers (where a careless identity test would look), never at the
    # drawn points; every variable name draws its own points
    for name in "abcdfghjkmnpqrstuvwxyz":
        assert V.answers_equal(f"{name}^2", f"2{name}") is False
        assert V.answers_equal(f"{name}^2", f"{name}*{name}") is True
    x = "x(x-1)(x+1)(x-2)(x+2)"
    assert M.equivalent(x + "+x", "x") is False
    assert M.equivalent("x^2y", "xy^2") is False  # equal where x = y only


def test_the_expression_language():
    for text in (
        "2x+1",
        "\\frac{\\sqrt{2}}{2}",
        "\\sqrt[3]{x}",
        "\\sin^2 x",
        "\\log_2(x)",
        "e^{-x}",
        "2^-1",
        "|x-1|",
        "\\binom{n}{2}",
        "x_1 x_{2}",
        "3!",
        "\\alpha\\beta",
    ):
        assert M.parse_expr(text) is not None, text  # fmt: skip
    for text in (
        "1/2x",
        "2\\frac{1}{2}",
        "1 2",
        "x 2",
        "\\sin^{-1}x",
        "Monday",
        "x=1",
        "x<1",
        "\\pm 1",
        "\\infty",
        "\\arcsin x",
        "(1",
        "x^",
        "",
        "2x" * 200,
    ):
        assert M.parse_expr(text) is None, text  # fmt: skip
    assert M.variables(M.parse_expr("x^2 + \\theta y_1")) == {"x", "\\theta", "y_1"}
    assert M.variables(M.parse_expr("\\log x")) == {"x", M._LOG_BASE}  # the unknown base
    assert M.variables(M.parse_expr("e^{\\pi}")) == set()  # constants
    assert M.equivalent("x+1", "1+x") is True and M.equivalent("Monday", "x") is None
    assert M.equivalent("x", "\\frac{2x}{2}") is True and M.equivalent("ab", "ba") is None


def test_exact_values_are_the_number_rules():
    """rational_value: what verify_math reads as a number, exactly (one parser for both)."""
    F = Fraction
    for text, want in (
        ("1.5 \\times 10^{3}", F(1500)),
        ("\\frac{1}{3}+\\frac{1}{6}", F(1, 2)),
        ("2^{-2}", F(1, 4)),
        ("-(3+4)*2", F(-14)),
        ("0.1+0.2", F(3, 10)),  # exact: no binary floating point
        ("2e-3", F(1, 500)),
        ("(2)(3)", F(6)),
    ):
        assert M.rational_value(M.parse_expr(text)) == want, text
        assert V.to_number(text) == want, text
    for text in ("\\pi", "\\sqrt{4}", "x", "2^{1/2}", "1/0", "9^{9^{9}}", "2^{100000}", "3!"):
        assert M.rational_value(M.parse_expr(text)) is None, text
    assert M.rational_value(M.parse_expr("2^{1000}")) == 2**1000  # within MAX_BITS


def test_pathological_expressions_neither_raise_nor_hang():
    import time

    heavy = [
        ("10^{10^{10}}", "10^{10^{10}}+1"),
        ("e^{e^{e^{e^{e}}}}", "1"),
        ("9!!!", "1"),
        ("\\binom{1000}{500}", "\\binom{1000}{499}"),
        ("\\sin(10^{100})", "0"),
        ("0^{0}", "1"),
        ("(-8)^{\\frac{1}{3}}", "-2"),  # a fractional power of a negative: undefined
        ("\\sqrt{-1}", "i"),
        ("\\frac{x}{x-x}", "x"),
        ("(" * 300 + "x" + ")" * 300, "x"),
        ("\\sqrt{" * 80 + "2" + "}" * 80, "1"),
        ("+".join(["\\sin(\\ln(x^{3}))"] * 15), "x"),
        ("1" * 900, "1" * 900 + "+x-x"),
        ("x^{1000}", "x^{999}x"),
    ]
    for a, b in heavy:
        start = time.perf_counter()
        assert V.answers_equal(a, b) in (True, False)
        assert time.perf_counter() - start < 5, (a, b)  # (loose: a loaded machine)
    rng = random.Random(1)
    alphabet = list("0123456789xyze+-*/^()[]{}|!_. ,=") + [
        "\\frac", "\\sqrt", "\\sqrt[", "\\pi", "\\sin", "\\cos", "\\tan", "\\ln", "\\log",
        "\\log_", "\\exp", "\\binom", "\\cdot", "\\theta", "\\lvert", "10^{", "^{-", "999",
        "\\infty", "\\left(", "\\right)",
    ]  # fmt: skip
    for _ in range(600):
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert V.answers_equal(a, b) in (True, False)
        assert M.equivalent(a, b) in (True, False, None)
        assert V.answers_equal(a, a) in (True, False)


# (response, the answer extracted; None: no answer)
EXTRACTIONS = [
    ("so the answer is \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}"),
    ("\\boxed{1} at first, then \\boxed{4}", "4"),  # two boxes: the last
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces inside
    ("nested \\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
    ("\\fbox{7}", "7"),
    ("$\\boxed 5$", "5"),
    ("\\boxed{3", None),  # unbalanced: no answer
    ("\\boxed{2} then \\boxed{3", None),  # the final box is unreadable: not the earlier one
    ("\\boxed{}", None),
    ("\\boxed{3 and then \\boxed{4}", "4"),  # an unclosed box, a closed one later
    ("#### 42", "42"),
    ("She has 3 + 4 = 7.\n#### 7\n", "7"),
    ("\\boxed{5}\n#### 6", "5"),  # a box comes first
    ("The answer is $3.5$. So we are done", "$3.5$"),
    ("The answer is: 12", "12"),
    ("**Answer:** 7", "7"),
    ("Final answer: x = 2", "x = 2"),
    ("we get 5 and then 6", None),  # no stated answer (last_number is off)
    ("", None),
]


@pytest.mark.parametrize("text,want", EXTRACTIONS)
def test_the_final_answer_is_extracted(text, want):
    assert V.extract_answer(text) == want


def test_the_last_number_is_an_opt_in_fallback():
    assert V.extract_answer("we get 5 and then 1,200.5") is None
    assert V.extract_answer("we get 5 and then 1,200.5", last_number=True) == "1,200.5"
    assert V.extract_answer("so 3/4 of them", last_number=True) == "3/4"
    assert V.extract_answer("\\boxed{2} then 9", last_number=True) == "2"  # forms first
    assert V.verify("... so she pays 18 dollars", "18", last_number=True) == (True, "18")
    assert V.verify("... so she pays 18 dollars", "18") == (False, None)


def test_references_may_be_solutions_numbers_or_lists():
    gsm8k = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert V.reference_answer(gsm8k) == ["72"]
    assert V.reference_answer("so $\\boxed{\\frac{3}{4}}$.") == ["\\frac{3}{4}"]
    assert V.reference_answer(0.75) == ["0.75"] and V.reference_answer(3) == ["3"]
    assert V.verify("\\boxed{0.75}", ["3/4", "75%"]) == (True, "0.75")  # any one accepted
    for bad in (None, True, {"a": 1}, []):
        with pytest.raises(TypeError, match="meta.answer must be a string, a number"):
            V.verify("\\boxed{1}", bad)


GSM8K = [  # (GSM8K-style record, response, correct)
    ({"answer": "48 / 2 = <<48/2=24>>24\n#### 72"}, "48 + 24 = 72 clips.\n#### 72", True),
    ({"answer": "#### 1,000"}, "So the total is \\boxed{1000}.", True),
    ({"answer": "#### 1000"}, "The answer is $1,000.", True),
    ({"answer": "#### 18"}, "She makes 9 * 2 = $18 every day.\n#### 18 dollars", True),
    ({"answer": "#### 18"}, "#### 19", False),
    ({"answer": "#### -3"}, "The temperature drops to \\boxed{-3^\\circ}", True),
    ({"answer": "#### 0.5"}, "\\boxed{\\frac{1}{2}}", True),
    ({"answer": "#### 72"}, "I think it is 72", False),  # no stated answer
]


@pytest.mark.parametrize("meta,response,correct", GSM8K)
def test_gsm8k_records(meta, response, correct):
    assert V.math_verify(meta, response) == float(correct)


def test_bad_model_output_never_raises():
    rng = random.Random(0)
    alphabet = list("0123456789{}()[]\\/^,.-+ =$%xe") + [
        "\\frac",
        "\\boxed",
        "\\sqrt",
        "\\text",
        "\\left",
        "####",
        "answer is",
        "10^",
    ]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert V.math_verify({"answer": "1/2"}, text) in (0.0, 1.0)
        V.verify(text, "\\frac{1}{2}", last_number=True, rel_tol=1e-3)
    deep = "\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}"
    assert V.math_verify({"answer": "1"}, deep) == 1.0
    assert V.math_verify({"answer": "1"}, "\\boxed{" + "1" * 5000 + "}") == 0.0  # too long
    assert V.math_verify({"answer": "1"}, None) == 0.0


def test_the_registered_reward_through_parse_rewards():
    rewards = parse_rewards("math_verify,format:0.1")
    assert [(n, w) for n, _, w in rewards] == [("math_verify", 1.0), ("format", 0.1)]
    assert rewards[0][1] is REWARDS["math_verify"]
    metas = [{"answer": "#### 72"}, {"answer": "\\frac{1}{2}"}, {"answer": "3"}, {}]
    texts = ["so \\boxed{72}", "The answer is 1/2.", "\\boxed{4}", "\\boxed{3}"]
    got, valid, errors = call_reward_fns([fn for _, fn, _ in rewards],
                                         [w for _, _, w in rewards], metas, texts)  # fmt: skip
    # "The answer is 1/2." is also the world's well-formed sentence: + 0.1
    assert got[:3].tolist() == pytest.approx([1.0, 1.1, 0.0])
    assert valid.tolist() == [True, True, True, False]  # no meta.answer: the sample is invalid
    assert len(errors) == 1 and "math_verify needs the prompt record's meta.answer" in errors[0]


def test_boxed_format_pays_for_a_closed_box_whatever_the_answer():
    rewards = parse_rewards("math_verify,boxed_format:0.1")
    assert rewards[1][1] is REWARDS["boxed_format"] is V.boxed_format
    metas = [{"answer": "3"}] * 5
    texts = ["so \\boxed{3}", "so \\boxed{4}", "The answer is 3.", "\\boxed{3", "\\boxed{ }"]
    got, valid, _ = call_reward_fns([fn for _, fn, _ in rewards], [w for _, _, w in rewards],
                                    metas, texts)  # fmt: skip
    assert got.tolist() == pytest.approx([1.1, 0.1, 1.0, 0.0, 0.0]) and valid.all()
    check_references(rewards, [{"meta": {"answer": "1"}, "loc": "p:1"}], "grpo.rewards")


def test_prompts_without_meta_answer_are_refused_for_math_verify(caplog):
    import logging

    from flaxlm.data.source_errors import DataError

    rewards = parse_rewards("math_verify")
    none = [{"meta": {"solution": "4"}, "loc": f"p.jsonl:{i}"} for i in (1, 2)]
    want = (
        r"data.train: 2 of 2 prompts \(e.g. p.jsonl:1\) have no meta.answer, the reference "
        r"grpo.rewards's math_verify judges by"
    )
    with pytest.raises(DataError, match=want):
        check_references(rewards, none, "grpo.rewards")
    with caplog.at_level(logging.WARNING):
        check_references(rewards, none + [{"meta": {"answer": "4"}, "loc": "p.jsonl:3"}],
                         "grpo.rewards")  # fmt: skip
    assert "2 of 3 prompts (e.g. p.jsonl:1) have no meta.answer" in caplog.text


# --- evaluation: "scoring": "math" ---------------------------------------------------------


class ByteTok:
    """A stand-in tokenizer: UTF-8 bytes, EOS 256, no BOS."""

    bos_id, eos_id, vocab_size = -1, 256, 257

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode("utf-8", "replace")


def test_math_scoring_in_evaluation_with_a_stand_in_decoder():
    from flaxlm.evaluation import generate_tasks as G
    from flaxlm.evaluation.tasks import Example, TaskSpec

    spec = TaskSpec("gsm", "generation", "unused.jsonl", scoring="math", temperature=0.7,
                    num_samples=2, stop=("\n\nQuestion:",))  # fmt: skip
    examples = [Example({"prompt": "q1", "answer": "24 + 48 = 72\n#### 72"}, "f:1", 0),
                Example({"prompt": "q2", "answer": "\\frac{1}{2}"}, "f:2", 1)]  # fmt: skip
    prompts = [("q1", [1, 2]), ("q2", [3])]
    tok = ByteTok()
    responses = ["Step one.\n\nSo \\boxed{72}.\n\nQuestion: more", "I guess 72",  # q1
                 "#### 0.50", "The answer is 1/3."]  # q2  # fmt: skip

    def fake_sampler(prompt_ids, max_new_tokens, temperature=0.0):
        return [tok.encode(r) + [tok.eos_id] for r in responses]

    metrics, samples = G.generation(spec, examples, prompts, fake_sampler, tok,
                                    max_prompt_len=100, stop_tokens=(tok.eos_id,))  # fmt: skip
    assert [s["scores"]["exact_match"] for s in samples] == [0.5, 0.5]
    assert [s["scores"]["pass@2"] for s in samples] == [1.0, 1.0]
    # maj@2: q1's one stated answer (72) wins; q2's 1-1 tie goes to the first given (0.50)
    assert [s["scores"]["maj@2"] for s in samples] == [1.0, 1.0] and metrics["maj@2"] == 1.0
    assert samples[0]["scores"]["extracted"] == 0.5  # "I guess 72" states no answer
    assert metrics["exact_match"] == 0.5 and metrics["extracted"] == 0.75
    lenient = spec.replace(math_last_number=True, math_rel_tol=0.01)
    assert G.score_response(lenient, examples[0].fields, "I guess 72")["exact_match"] == 1.0
    assert G.score_response(lenient, {"answer": "0.3333"}, "\\boxed{1/3}")["exact_match"] == 1.0


@pytest.mark.parametrize("boxed,gold,maj", [
    (["5", "4", "4.0"], "5", 0.0),  # right once, but 4 = 4.0 is the majority (pass@3 is 1)
    (["1/2", "3", "0.5"], "\\frac12", 1.0),  # 1/2 = 0.5: two votes
    (["3", "5"], "5", 0.0),  # a tie: the answer given first
    (["5", "3"], "5", 1.0),
    ([None, None, "5"], "5", 1.0),  # no answer stated: no vote
    ([None, None], "5", 0.0),
    (["(1, 2)", "(1,2)", "(2, 1)"], "(1,2)", 1.0),
])  # fmt: skip
def test_maj_at_k_is_the_majority_answer_grouped_as_math_compares(boxed, gold, maj):
    from flaxlm.evaluation import generate_tasks as G
    from flaxlm.evaluation.tasks import Example, TaskSpec

    k = len(boxed)
    spec = TaskSpec("m", "generation", "unused.jsonl", scoring="math", temperature=1.0,
                    num_samples=k)  # fmt: skip
    tok = ByteTok()
    texts = ["no idea" if b is None else f"so \\boxed{{{b}}}" for b in boxed]
    fake = lambda ids, n, temperature=0.0: [tok.encode(t) for t in texts]
    _, samples = G.generation(spec, [Example({"prompt": "q", "answer": gold}, "f:1", 0)],
                              [("q", [1])], fake, tok, max_prompt_len=10)  # fmt: skip
    scores = samples[0]["scores"]
    assert scores[f"maj@{k}"] == maj
    assert scores[f"pass@{k}"] == float(any(b is not None and V.answers_equal(b, gold)
                                            for b in boxed))  # fmt: skip


def test_math_spec_keys_are_checked_naming_the_key():
    from flaxlm.evaluation.tasks import TaskSpec

    spec = TaskSpec.from_dict({"name": "m", "type": "generation", "file": "x.jsonl",
                               "scoring": "math", "math_rel_tol": 1e-6})  # fmt: skip
    assert spec.math_rel_tol == 1e-6 and not spec.math_last_number
    with pytest.raises(ValueError, match=r"spec\[0\]: task 'm': math_rel_tol and "
                                         r"math_last_number are for scoring='math'"):  # fmt: skip
        TaskSpec.from_dict({"name": "m", "type": "generation", "file": "x.jsonl",
                            "math_last_number": True}, where="spec[0]")  # fmt: skip
    with pytest.raises(ValueError, match=r"math_rel_tol=-1.0 must be >= 0"):
        TaskSpec("m", "generation", "x.jsonl", scoring="math", math_rel_tol=-1.0)
    with pytest.raises(ValueError, match=r"math_rel_tol='0.1' must be of type float"):
        TaskSpec.from_dict({"name": "m", "type": "generation", "file": "x.jsonl",
                            "scoring": "math", "math_rel_tol": "0.1"})  # fmt: skip
    with pytest.raises(ValueError, match=r"scoring='maths'; expected one of .*'math'"):
        TaskSpec("m", "generation", "x.jsonl", scoring="maths")


def test_the_majority_groups_answers_as_they_compare():
    """majority_sample (maj@k in evaluation and in the RL held-out eval): votes grouped by
    answers_equal, samples without an answer left out, a tie to the answer given first."""
    assert V.majority_sample(["41", "0.5", "\\frac12", None]) == 1  # 0.5 = 1/2: two votes
    assert V.majority_sample(["0.5", "41", "41", "\\frac12"]) == 0  # a tie: the first given
    assert V.majority_sample(["41", "0.5", "1/2"], str.__eq__) == 0  # as strings: no majority
    assert V.majority_sample([None, None]) is None and V.majority_sample([]) is None
    assert REWARDS["math_verify"].vote({}, "so \\boxed{42}.") == "42"
