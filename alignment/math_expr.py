"""Symbolic equivalence of two math answers, by evaluating them: a small expression language, its
recursive-descent parser (no eval/exec) and `equivalent`, used by alignment/verify_math.py when
two scalar answers are not equal by its own rules ("\\frac{\\sqrt{2}}{2}" vs "\\frac{1}{\\sqrt{2}}",
"\\frac{2\\pi}{4}" vs "\\pi/2", "2x+1" vs "1+2x"). No sympy, no dependency: `decimal` arithmetic.
verify_math's numbers are this parser's trees too, valued exactly (`rational_value`: Fractions
over numbers, + - * / and integer powers), so numbers and expressions read alike.

The language (text as verify_math.clean leaves it; anything else is no expression, not an error):
  numbers     "12", "1.5", ".5", scientific "1.5e3" / "2e-3" (a number, e, an integer: never e·3)
  operators   + - * / ^, \\cdot and \\times (multiply), \\div, unary + -, postfix ! (factorial)
  implicit ×  "2x", "2\\pi", "3\\sqrt{2}", "(x-1)(x+1)", "x y" — but never before a number ("1 2",
              "x 2" are no expressions) nor right after an explicit "/" ("1/2x" is refused: (1/2)x
              or 1/(2x)?), and never a number times a numeric fraction ("2\\frac{1}{2}" is the
              mixed number 5/2 to verify_math, so it is refused here)
  grouping    ( ) and { }; |x| and \\lvert x \\rvert are absolute values
  commands    \\frac{a}{b}, \\sqrt{x}, \\sqrt[n]{x} (real roots: \\sqrt[3]{-8} = -2), \\binom{n}{k}
  powers      right associative (2^3^2 = 2^9); the exponent is one group or one token, a whole
              number included ("x^2y" is x²·y, "2^10" is 1024), with an optional sign ("2^-1")
  constants   \\pi and "pi"; e is Euler's number everywhere but in scientific notation (a
              safe choice: a variable e is rare in answers, and as e is transcendental no
              polynomial identity with rational coefficients holds at e and fails elsewhere)
  functions   \\sin \\cos \\tan \\sec \\csc \\cot (radians: clean drops a degree sign, so
              "\\sin 30^\\circ" is sin 30), \\ln, \\exp, \\log_b (base b); "sin", "ln", ... too.
              The argument is a bracketed group ("\\sin(x)^2" is (sin x)²) or, without one, the
              product that follows ("\\sin 2x" is sin 2x; "\\sin x \\cos x" is two factors).
              "\\sin^2 x" is (sin x)²; "\\sin^{-1}" (inverse or reciprocal?) is refused.
              \\log without a base is a log to an unknown base: the base is one more variable, so
              "\\log 2+\\log 3" equals "\\log 6" but "\\log 100" is not 2 (nor "\\ln 100")
  variables   single letters (case counts), subscripted ("x_1", "a_{n}"), Greek letters but \\pi;
              a run of 2 or 3 letters is a product ("2xy", "abc+1"), a longer one is a word, so
              no expression ("Monday"), and so is a text of letters alone with two together
              ("dog" is not "god", "xy" not "yx": left to verify_math's text rule; "x" is one);
              i is a plain variable (no complex numbers: "i^2" is not -1)
Not in it: = and inequalities, \\pm, \\infty, inverse trigonometric functions, \\sum, square
brackets (but \\sqrt[n]{x}'s).

`equivalent(a, b)`: None when either side is no expression here, else whether they are equal:
  - the same variables on both sides ("x - x" is not "0"), else False;
  - without variables: both values in decimal arithmetic at precision P = 40 + (digits written
    on the two sides) and again at 2P; equal when they agree to within 10 digits of 2P, or their
    difference shrinks by a factor 10^(P/2) from P to 2P (it is rounding: sin π vs 0). Values
    both over 10^(-P/4) and apart by more than 10^(-P/2) of them at P are unequal without the
    second evaluation. A decimal answer approximating an irrational one differs at its last
    written digit, far above either threshold: "1.41421356" is not "\\sqrt{2}" (a decimal
    approximation is a different written answer; verify_math's rel_tol is for two numbers only
    and does not apply here);
  - with variables: the same at seeded random points (Schwartz–Zippel identity testing): each
    variable in [0.25, 3] or [3, 40] by turns, positive at the first 8 points, of either sign
    after, 13 significant digits (the seed is a digest of the two texts, so the result is
    deterministic and symmetric). 12 points are tried, and up to 24 until 4 where both sides are
    defined agree; equal when that many do and none disagrees. A point where either side is
    undefined (\\sqrt{x} at x < 0) is skipped, so equality is on the common real domain:
    "\\ln x^2" equals "2\\ln x", "\\sqrt{x^2}" does not equal "x". Two different rational
    functions agree only on a measure-zero set: "x^2" and "2x" meet at 0 and 2, never drawn.
Guards (a model's text never raises): texts over MAX_EXPR_CHARS or MAX_TOKENS tokens, or nested
deeper than MAX_DEPTH, are no expressions; over MAX_DIGITS digits on the two sides together they
are not compared (not equal); an exponent beyond ±MAX_EXPONENT, a value beyond
10^±MAX_MAGNITUDE, a factorial or binomial of more than MAX_FACTORIAL, a trigonometric argument
beyond 10^6, a division by zero or a value outside a function's domain makes the point undefined
(no point defined: not equal).
"""

from __future__ import annotations

import math
import operator
import random
import re
import zlib
from decimal import (
    ROUND_HALF_EVEN,
    Context,
    Decimal,
    DivisionByZero,
    InvalidOperation,
    Overflow,
    Underflow,
    getcontext,
    localcontext,
)
from fractions import Fraction
from functools import lru_cache

MAX_EXPR_CHARS = 300
MAX_TOKENS = 200
MAX_DIGITS = 120
MAX_DEPTH = 60
MAX_EXPONENT = 1000
MAX_BITS = 20_000  # an exact value's numerator or denominator larger than this: none
MAX_MAGNITUDE = 10_000
MAX_FACTORIAL = 1000
POINTS_POSITIVE, POINTS_TRIED, POINTS_MAX, POINTS_NEEDED = 8, 12, 24, 4

_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)"
    r"|(?P<cmd>\\[a-zA-Z]+)|(?P<word>[a-zA-Z]+)|(?P<op>[-+*/^()\[\]{}|!_]))"
)
_FUNCTIONS = {"sin", "cos", "tan", "sec", "csc", "cot", "ln", "log", "exp"}
_GREEK = set("alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda "
             "mu nu xi rho varrho sigma tau upsilon phi varphi chi psi omega".split())  # fmt: skip
_OPS = {"cdot": "*", "times": "*", "div": "/", "lvert": "|", "rvert": "|", "vert": "|"}
_LOG_BASE = "\\log"  # the variable standing for the unknown base of a plain \log


class _Refused(ValueError):
    """Not an expression of the language."""


class _Undefined(ArithmeticError):
    """No real value at this point."""


def _tokens(text: str) -> list[tuple[str, object]]:
    toks, pos, text = [], 0, text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise _Refused(text[pos:])
        pos, kind, val = m.end(), m.lastgroup, m.group(m.lastgroup)
        if kind == "num":
            d = Decimal(val)
            if abs(d.adjusted()) > MAX_EXPONENT:
                raise _Refused("exponent")
            toks.append(("num", (d, sum(c.isdigit() for c in val))))
        elif kind == "cmd":
            name = val[1:]
            if name in _OPS:
                toks.append(("op", _OPS[name]))
            elif name in _FUNCTIONS or name in ("frac", "sqrt", "binom"):
                toks.append(("fn" if name in _FUNCTIONS else "cmd", name))
            elif name == "pi":
                toks.append(("const", "pi"))
            elif name in _GREEK:
                toks.append(("var", val))
            else:
                raise _Refused(val)
        elif kind == "word":
            if val in _FUNCTIONS or val in ("pi", "sqrt"):
                toks.append(("const", "pi") if val == "pi" else
                            ("fn" if val in _FUNCTIONS else "cmd", val))  # fmt: skip
            elif len(val) <= 3:
                toks.extend(("const", "e") if c == "e" else ("var", c) for c in val)
            else:
                raise _Refused(val)  # a word, not a product of variables
        else:
            toks.append(("op", val))
        if len(toks) > MAX_TOKENS:
            raise _Refused("too long")
    return toks


class _Parser:
    """Recursive descent over `_tokens`; nodes are tuples (kind, *children)."""

    def __init__(self, text: str):
        self.toks, self.i, self.depth, self.in_abs = _tokens(text), 0, 0, 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else (None, None)

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def expect(self, op: str):
        if self.take() != ("op", op):
            raise _Refused(f"expected {op}")

    def parse(self):
        node = self.expr()
        if self.i != len(self.toks):
            raise _Refused("trailing tokens")
        return node

    def expr(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Refused("too deep")
        node = self.term()
        while self.peek() in (("op", "+"), ("op", "-")):
            op = self.take()[1]
            node = ("add" if op == "+" else "sub", node, self.term())
        self.depth -= 1
        return node

    def starts_factor(self) -> bool:
        kind, val = self.peek()
        if kind in ("var", "const", "fn", "cmd"):
            return True
        return kind == "op" and (val in "({" or (val == "|" and not self.in_abs))

    def term(self):
        node = last = self.signed()
        after_div = False
        while True:
            if self.peek() in (("op", "*"), ("op", "/")):
                op = self.take()[1]
                last = self.signed()
                node, after_div = ("mul" if op == "*" else "div", node, last), op == "/"
            elif self.starts_factor():
                if after_div:
                    raise _Refused("a/bc is ambiguous")
                right = self.power()
                while last[0] == "neg":
                    last = last[1]
                if last[0] == "num" and right[0] == "frac" and right[1][0] == right[2][0] == "num":
                    raise _Refused("a mixed number")
                node, last = ("mul", node, right), right
            else:
                return node

    def signed(self):
        if self.peek() in (("op", "+"), ("op", "-")):
            return ("neg", self.signed()) if self.take()[1] == "-" else self.signed()
        return self.power()

    def power(self):
        node = self.primary()
        while self.peek() == ("op", "!"):
            self.take()
            node = ("fact", node)
        if self.peek() == ("op", "^"):
            self.take()
            node = ("pow", node, self.exponent())
        return node

    def exponent(self):
        if self.peek() in (("op", "+"), ("op", "-")):
            return ("neg", self.exponent()) if self.take()[1] == "-" else self.exponent()
        if self.peek()[0] not in ("num", "var", "const", "cmd", "op") or self.peek()[1] == "|":
            raise _Refused("exponent")
        node = self.primary()
        if self.peek() == ("op", "^"):
            self.take()
            node = ("pow", node, self.exponent())
        return node

    def group(self):
        kind, val = self.take()
        if (kind, val) not in (("op", "{"), ("op", "(")):
            raise _Refused("expected a group")
        node = self.expr()
        self.expect("}" if val == "{" else ")")
        return node

    def primary(self):
        kind, val = self.peek()
        if kind == "op" and val in "({":
            return self.group()
        self.take()
        if kind == "num":
            return ("num", *val)
        if kind == "const":
            return ("const", val)
        if kind == "var":
            return ("var", val + self.subscript())
        if (kind, val) == ("op", "|"):
            self.in_abs += 1
            node = self.expr()
            self.expect("|")
            self.in_abs -= 1
            return ("abs", node)
        if kind == "cmd" and val == "sqrt":
            if self.peek() == ("op", "["):
                self.take()
                n = self.expr()
                self.expect("]")
                return ("root", n, self.group())
            return ("sqrt", self.group())
        if kind == "cmd":  # \frac, \binom
            return ("frac" if val == "frac" else "binom", self.group(), self.group())
        if kind == "fn":
            return self.function(val)
        raise _Refused(f"unexpected {val!r}")

    def subscript(self) -> str:
        if self.peek() != ("op", "_"):
            return ""
        self.take()
        braced = self.peek() == ("op", "{")
        if braced:
            self.take()
        kind, val = self.take()
        if kind == "num" and val[0] == val[0].to_integral_value() and val[0] >= 0:
            sub = str(val[0])
        elif kind in ("var", "const") and len(val) == 1:
            sub = val
        else:
            raise _Refused("subscript")
        if braced:
            self.expect("}")
        return "_" + sub

    def function(self, name: str):
        base = None
        if name == "log" and self.peek() == ("op", "_"):
            self.take()
            base = self.exponent()  # one token or one group, like an exponent
        power = None
        if self.peek() == ("op", "^"):
            self.take()
            power = self.exponent()
            if power[0] == "neg":
                raise _Refused("\\sin^{-1}: inverse or reciprocal?")
        if self.peek() in (("op", "("), ("op", "{")):
            arg = self.group()
        else:  # "\sin 2x", "\ln x^2": the product that follows, up to another function
            if self.peek()[0] not in ("num", "var", "const", "cmd"):
                raise _Refused("function argument")
            arg = self.power()
            while self.peek()[0] in ("var", "const", "cmd"):
                arg = ("mul", arg, self.power())
        node = ("log", base, arg) if name == "log" else ("fn", name, arg)
        return ("pow", node, power) if power is not None else node


def parse_expr(text: str):
    """The expression tree of `text`, or None when it is not in the language (module
    docstring) or over the size limits."""
    if not isinstance(text, str) or len(text) > MAX_EXPR_CHARS:
        return None
    try:
        return _Parser(text).parse()
    except (_Refused, RecursionError, ArithmeticError):
        return None


def _walk(node):
    yield node
    for child in node[1:]:
        if isinstance(child, tuple):
            yield from _walk(child)


def variables(tree) -> frozenset[str]:
    """The free variables of a tree; a plain \\log's unknown base is one (`_LOG_BASE`)."""
    return frozenset(n[1] if n[0] == "var" else _LOG_BASE for n in _walk(tree)
                     if n[0] == "var" or (n[0] == "log" and n[1] is None))  # fmt: skip


def _digits(tree) -> int:
    return sum(n[2] for n in _walk(tree) if n[0] == "num")


# --- exact values -----------------------------------------------------------------------------


def rational_value(tree) -> Fraction | None:
    """The exact value of a tree of numbers, + - * / (\\frac too) and integer powers: what
    verify_math reads as a number ("3+4", "1.5 \\times 10^{3}", "\\frac{1}{2}"). None when it
    holds anything else (a variable, \\pi, \\sqrt, a function), divides by zero, or an exponent
    or a value passes MAX_EXPONENT / MAX_BITS (checked before a power is computed: 9^(9^9)
    would hang Fraction arithmetic)."""
    try:
        return _rational(tree)
    except (_Refused, ZeroDivisionError):
        return None


def _rational(node) -> Fraction:
    kind = node[0]
    if kind == "num":
        x = Fraction(node[1])
    elif kind == "neg":
        x = -_rational(node[1])
    elif kind in ("add", "sub", "mul", "div", "frac"):
        x = _BINARY[kind](_rational(node[1]), _rational(node[2]))
    elif kind == "pow":
        x, e = _rational(node[1]), _rational(node[2])
        if e.denominator != 1 or abs(e) > MAX_EXPONENT:
            raise _Refused("exponent")
        if max(x.numerator.bit_length(), x.denominator.bit_length()) * abs(e) > MAX_BITS:
            raise _Refused("too large")
        x = x ** int(e)
    else:
        raise _Refused("not rational")
    if x.numerator.bit_length() > MAX_BITS or x.denominator.bit_length() > MAX_BITS:
        raise _Refused("too large")
    return x


# --- evaluation --------------------------------------------------------------------------------


def _context(prec: int) -> Context:
    return Context(prec=prec, Emax=MAX_MAGNITUDE, Emin=-MAX_MAGNITUDE,
                   traps=[InvalidOperation, DivisionByZero, Overflow, Underflow])  # fmt: skip


def _loose(prec: int) -> Context:
    """For comparing values: no trap, an exponent range no value here leaves."""
    return Context(prec=prec, Emax=100 * MAX_MAGNITUDE, Emin=-100 * MAX_MAGNITUDE, traps=[])


@lru_cache(maxsize=32)
def _pi(prec: int) -> Decimal:
    """π to `prec` digits (Machin: 16·atan(1/5) − 4·atan(1/239))."""

    def atan_inv(n: int) -> Decimal:
        total, power, k, eps = Decimal(0), Decimal(1) / n, 0, Decimal(10) ** -(prec + 12)
        while power > eps:
            term = power / (2 * k + 1)
            total += -term if k % 2 else term
            power /= n * n
            k += 1
        return total

    with localcontext(_context(prec + 10)):
        value = 16 * atan_inv(5) - 4 * atan_inv(239)
    with localcontext(_context(prec)):
        return +value


def _sin_cos(x: Decimal) -> tuple[Decimal, Decimal]:
    """(sin x, cos x) at the current precision, by Taylor series after reducing x to [-π, π]."""
    if abs(x) > 10**6:
        raise _Undefined("trigonometric argument too large")
    with localcontext() as ctx:
        prec = ctx.prec
        ctx.prec += 10
        two_pi = 2 * _pi(ctx.prec)
        x = x - (x / two_pi).to_integral_value(ROUND_HALF_EVEN) * two_pi
        eps = Decimal(10) ** -(prec + 10)
        s, c, term, n = Decimal(0), Decimal(0), Decimal(1), 0  # term = x^n / n!
        while n < 2 or abs(term) > eps:
            if n % 2:
                s += term if n % 4 == 1 else -term
            else:
                c += term if n % 4 == 0 else -term
            n += 1
            term = term * x / n
            if n > 4 * prec + 100:
                break
    return +s, +c


def _power(base: Decimal, e: Decimal) -> Decimal:
    if abs(e) > MAX_EXPONENT:
        raise _Undefined("exponent")
    if e == e.to_integral_value():
        if base == 0 and e <= 0:
            raise _Undefined("0^0 or 1/0")
        return base ** int(e)
    if base < 0 or (base == 0 and e < 0):
        raise _Undefined("a negative base, a fractional exponent; or 1/0")
    return Decimal(0) if base == 0 else base**e


def _integer(x: Decimal) -> int:
    if x != x.to_integral_value() or not 0 <= x <= MAX_FACTORIAL:
        raise _Undefined("factorial or binomial of a non-integer or a too large one")
    return int(x)


def _fn(name: str, x: Decimal) -> Decimal:
    if name == "ln":
        if x <= 0:
            raise _Undefined("log")
        return x.ln()
    if name == "exp":
        if abs(x) > 25 * MAX_MAGNITUDE:
            raise _Undefined("exp")
        return x.exp()
    s, c = _sin_cos(x)
    return {"sin": lambda: s, "cos": lambda: c, "tan": lambda: s / c, "sec": lambda: 1 / c,
            "csc": lambda: 1 / s, "cot": lambda: c / s}[name]()  # fmt: skip


_BINARY = {"add": operator.add, "sub": operator.sub, "mul": operator.mul,
           "div": operator.truediv, "frac": operator.truediv}  # fmt: skip


def _eval(node, env: dict) -> Decimal:
    """The value of a tree at `env` in the current decimal context; _Undefined (or a trapped
    decimal signal) where it has none."""
    kind = node[0]
    if kind == "num":
        v = +node[1]
    elif kind == "var":
        v = env[node[1]]
    elif kind == "const":
        v = _pi(getcontext().prec) if node[1] == "pi" else Decimal(1).exp()
    elif kind == "neg":
        v = -_eval(node[1], env)
    elif kind in ("add", "sub", "mul", "div", "frac"):
        a, b = _eval(node[1], env), _eval(node[2], env)
        v = _BINARY[kind](a, b)
    elif kind == "pow":
        e = _eval(node[2], env)
        if node[1] == ("const", "e"):
            v = _fn("exp", e)
        else:
            v = _power(_eval(node[1], env), e)
    elif kind == "sqrt":
        x = _eval(node[1], env)
        if x < 0:
            raise _Undefined("sqrt")
        v = x.sqrt()
    elif kind == "root":
        n, x = _eval(node[1], env), _eval(node[2], env)
        if n != n.to_integral_value() or not 2 <= n <= MAX_EXPONENT:
            raise _Undefined("root index")
        if x < 0 and n % 2 == 0:
            raise _Undefined("even root of a negative")
        v = Decimal(0) if x == 0 else (abs(x).ln() / n).exp().copy_sign(x)
    elif kind == "abs":
        v = abs(_eval(node[1], env))
    elif kind == "fact":
        v = +Decimal(math.factorial(_integer(_eval(node[1], env))))
    elif kind == "binom":
        n, k = _integer(_eval(node[1], env)), _integer(_eval(node[2], env))
        v = +Decimal(math.comb(n, k))
    elif kind == "fn":
        v = _fn(node[1], _eval(node[2], env))
    else:  # log
        base = env[_LOG_BASE] if node[1] is None else _eval(node[1], env)
        v = _fn("ln", _eval(node[2], env)) / _fn("ln", base)
    if not v.is_finite() or (v and abs(v.adjusted()) > MAX_MAGNITUDE):
        raise _Undefined("not a finite value in range")
    return v


# --- comparison ---------------------------------------------------------------------------------


def _values(trees, env: dict, prec: int) -> tuple[Decimal, Decimal] | None:
    """Both trees' values at `env` and precision `prec`; None where either is undefined."""
    try:
        with localcontext(_context(prec)):
            return _eval(trees[0], env), _eval(trees[1], env)
    except (_Undefined, ArithmeticError, ValueError, KeyError, RecursionError):
        return None


def _same_at(trees, env: dict, prec: int) -> bool | None:
    """Whether the two trees agree at `env` (module docstring: at `prec` and 2·prec); None
    where either is undefined."""
    low = _values(trees, env, prec)
    if low is None:
        return None
    with localcontext(_loose(4 * prec)):
        d1, small = abs(low[0] - low[1]), Decimal(1).scaleb(-(prec // 4))
        if min(abs(low[0]), abs(low[1])) > small and d1 > abs(low[0]).scaleb(-(prec // 2)):
            return False  # both well away from 0 and far apart: no rounding does that
    high = _values(trees, env, 2 * prec)
    if high is None:
        return None
    with localcontext(_loose(4 * prec)):
        d2 = abs(high[0] - high[1])
        scale = max(abs(high[0]), abs(high[1]))
        return d2 == 0 or d2 <= d1.scaleb(-(prec // 2)) or d2 <= scale.scaleb(10 - 2 * prec)


def _point(rng: random.Random, names, k: int) -> dict:
    """The k-th random point: each variable in [0.25, 3] (k even) or [3, 40] (k odd), positive
    for the first POINTS_POSITIVE points, of either sign after; 13 significant digits."""
    env = {}
    for name in names:
        if name == _LOG_BASE:  # a log's base: in [2, 12]
            env[name] = Decimal(rng.randint(2 * 10**12, 12 * 10**12)).scaleb(-12)
            continue
        low, high = (25 * 10**10, 3 * 10**12) if k % 2 == 0 else (3 * 10**12, 40 * 10**12)
        v = Decimal(rng.randint(low, high)).scaleb(-12)
        env[name] = -v if k >= POINTS_POSITIVE and rng.random() < 0.5 else v
    return env


def equivalent(a: str, b: str) -> bool | None:
    """Whether answers `a` and `b` (cleaned text) have the same value (the module docstring);
    None when either is not an expression of the language. Never raises."""
    for t in (a, b):
        if not isinstance(t, str) or len(t) > MAX_EXPR_CHARS:
            return None
        if re.fullmatch(r"[a-zA-Z\s]*", t) and re.search(r"[a-zA-Z]{2}", t):
            return None  # "dog" vs "god", "no" vs "on": words, not products of variables
    trees = parse_expr(a), parse_expr(b)
    if trees[0] is None or trees[1] is None:
        return None
    try:
        return _equal_values(trees, a, b)
    except (ArithmeticError, ValueError, RecursionError):  # (a safety net: none is expected)
        return None


def _equal_values(trees, a: str, b: str) -> bool:
    names = variables(trees[0])
    digits = _digits(trees[0]) + _digits(trees[1])
    if names != variables(trees[1]) or digits > MAX_DIGITS:
        return False
    prec = 40 + digits
    if not names:
        return _same_at(trees, {}, prec) is True
    rng = random.Random(zlib.crc32("\0".join(sorted((a, b))).encode()))
    agreed = 0
    for k in range(POINTS_MAX):
        if k >= POINTS_TRIED and agreed >= POINTS_NEEDED:
            break
        same = _same_at(trees, _point(rng, sorted(names), k), prec)
        if same is False:
            return False
        agreed += same is True
    return agreed >= POINTS_NEEDED
