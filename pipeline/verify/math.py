"""Math answers: extract from the final part, cheap exact checks first, then Math-Verify.

Math-Verify decides most pairs, but it has blind spots where it says "equal" for different
answers (it stops parsing at a unit, reads `1, 2, \\ldots, n` as `2`, takes the right-hand side of
any equation, rounds tiny numbers away). A false accept puts a wrong answer into the training
data, a false reject only costs a sample; so each known blind spot is decided here before or
after it, and a pair that cannot be decided with confidence is rejected as `answer_unverifiable`
rather than guessed. The labelled corpus (tests/corpus/math_pairs.py) pins every rule.
"""

from __future__ import annotations

import logging
import re
from fractions import Fraction
from typing import Any

from pipeline.units import Sample, Verdict
from pipeline.verify.extract import extract_answer
from pipeline.verify.registry import VERIFIERS

# Math-Verify warns on every call that its own timeout is off; ours is the worker pool's hard kill.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_SPACE = re.compile(r"\s+|\\[,;! ]|\\quad|\\qquad")
_WRAPPERS = re.compile(r"^\\(?:text|textbf|mathrm|mathbf)\{(.*)\}$")
_NUMBER = re.compile(r"^[+-]?\d+(?:\.\d+)?$")
_FRACTION = re.compile(r"^([+-]?)\\[dt]?frac\{([+-]?\d+)\}\{([+-]?\d+)\}$")
_ELLIPSIS = re.compile(r"\\[lcv]?dots[bcimo]?\b|\.\.\.|…")
_BASE = re.compile(r"^([0-9A-Fa-f]*\d[0-9A-Fa-f]*)_\{?(\d{1,2})\}?$")
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree\b|\\text\{\s*degrees?\s*\}|\s+degrees?$")
_PROMPT_DEGREES = re.compile(r"\\circ|°|\\degree|\bdegrees\b", re.IGNORECASE)  # not "of degree 3"
_UNIT = re.compile(
    r"\\(?:text|textnormal|mathrm|mbox)\{\s*([A-Za-z][A-Za-z/ ]*?)\s*(?:\^\{?(\d)\}?)?\s*\}\s*(?:\^\{?(\d)\}?)?\s*$"
)
# Top-level separators of a multi-part answer: `3\text{ m} \times 4\text{ m}`, `2 \text{ and } 5`.
_SEPARATOR = re.compile(r"\\times|\\text\{\s*(?:and|by|or)\s*\}|(?<!\\)[,;](?!\d{3}(?!\d))")


def normalize(ans: str) -> str:
    """Whitespace, `$`, `\\left`/`\\right`, text wrappers and thousands separators removed."""
    s = ans.strip().strip("$").strip()
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "")
    s = _SPACE.sub("", s)
    m = _WRAPPERS.match(s)
    if m:
        s = m.group(1)
    if re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    s = s.rstrip(".")
    return s[: -len("\\%")] if s.endswith("\\%") else s.rstrip("%")  # 50\% and 50 name the same answer


def trailing_unit(ans: str) -> str | None:
    """The unit ending an answer, singular, with its power (`5\\text{ cm}^2` -> `cm^2`); None without one."""
    m = _UNIT.search(ans.strip().strip("$"))
    if not m:
        return None
    unit = m.group(1).lower().strip()
    unit = unit[:-1] if len(unit) > 2 and unit.endswith("s") else unit
    power = m.group(2) or m.group(3)
    return f"{unit}^{power}" if power and power != "1" else unit


def without_unit(ans: str) -> str:
    """The answer with its trailing unit removed (`5\\text{ cm}^2` -> `5`)."""
    return _UNIT.sub("", ans.strip().strip("$")).strip()


def as_rational(s: str) -> Fraction | None:
    """An exact rational for plain numbers and \\frac{a}{b}; None for anything else."""
    if _NUMBER.match(s):
        return Fraction(s)
    m = _FRACTION.match(s)
    if m and int(m.group(3)) != 0:
        sign = -1 if m.group(1) == "-" else 1
        return sign * Fraction(int(m.group(2)), int(m.group(3)))
    if re.fullmatch(r"[+-]?\d+/\d+", s) and not s.endswith("/0"):
        return Fraction(s)
    return None


def fast_compare(gold: str, pred: str) -> bool | None:
    """Decide without symbolic work when both sides are plain: True/False, or None = undecided."""
    g, p = normalize(gold), normalize(pred)
    if g == p:
        return True
    rg, rp = as_rational(g), as_rational(p)
    if rg is not None and rp is not None:
        if rg == rp:
            return True
        # a decimal may be a rounded form of the other side: let the numeric comparison decide
        return None if "." in g + p else False
    return None


def split_parts(ans: str) -> list[str]:
    """The top-level parts of a multi-part answer (outside braces, brackets and parentheses)."""
    parts: list[str] = []
    depth = start = i = 0
    s = ans.strip().strip("$")
    while i < len(s):
        c = s[i]
        if c in "{([":
            depth += 1
        elif c in "})]":
            depth -= 1
        elif depth == 0 and (m := _SEPARATOR.match(s, i)):
            parts.append(s[start:i])
            start = i = m.end()
            continue
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts if p.strip()]


def _all(results: list[bool | None]) -> bool | None:
    """Part-by-part outcome: any part wrong -> False; any part undecidable -> None; else True."""
    if any(r is False for r in results):
        return False
    return None if any(r is None for r in results) else True


def _degrees(ans: str) -> str | None:
    """The number of degrees an answer states (`30^\\circ` -> `30`); None if it states none."""
    stripped = _DEGREE.sub("", ans.strip().strip("$")).strip()
    return stripped if stripped != ans.strip().strip("$").strip() else None


class MathVerifier:
    """Reference vs. the answer of the final part; Math-Verify decides what the fast path can't."""

    name = "math"
    isolate = True  # sympy can hang or eat memory: run in killable workers (verify/pool.py)

    def __init__(self, float_rounding: int = 6) -> None:
        self.float_rounding = float_rounding

    def __call__(self, sample: Sample) -> Verdict:
        gold = sample.get("answer")
        if gold is None or not str(gold).strip():
            return Verdict.reject("no_reference")
        pred = extract_answer(sample.get("final"))
        if pred is None:
            return Verdict.reject("no_answer")
        return self.compare(str(gold), pred, str(sample.get("prompt") or ""))

    def compare(self, gold: str, pred: str, prompt: str = "") -> Verdict:
        """Gold vs an extracted answer: accepted, `answer_mismatch`, or `answer_unverifiable`."""
        same, path = self._compare(gold, pred, prompt)
        if same is None:
            return Verdict.reject("answer_unverifiable", extracted=pred, path=path)
        return Verdict(same, None if same else "answer_mismatch", {"extracted": pred, "path": path})

    def _compare(self, gold: str, pred: str, prompt: str) -> tuple[bool | None, str]:
        if _ELLIPSIS.search(gold) or _ELLIPSIS.search(pred):
            # Math-Verify reads `1, 2, \ldots, n` as 2: a pattern is only compared as written
            return (True if normalize(gold) == normalize(pred) else None), "ellipsis"
        angle = self._angle(gold, pred, prompt)
        if angle is not None:
            return angle, "angle"
        gold_parts, pred_parts = split_parts(gold), split_parts(pred)
        if max(len(gold_parts), len(pred_parts)) > 1 and any(map(trailing_unit, gold_parts + pred_parts)):
            # Math-Verify stops at the first unit (`3\text{ m} \times 4\text{ m}` parses as 3): part by part
            if len(gold_parts) != len(pred_parts):
                return False, "parts"
            return _all([self._compare(g, p, prompt)[0] for g, p in zip(gold_parts, pred_parts)]), "parts"
        units = trailing_unit(gold), trailing_unit(pred)
        if all(units) and units[0] != units[1]:  # 5 cm is not 5 m; a unit on one side only is dropped
            return False, "units"
        if _in_base(normalize(gold)) is not None or _in_base(normalize(pred)) is not None:
            return self._base(normalize(gold), normalize(pred)), "base"
        fast = fast_compare(gold, pred)
        if fast is not None:
            return fast, "fast"
        return self._math_verify(without_unit(gold) or gold, without_unit(pred) or pred), "math_verify"

    def _angle(self, gold: str, pred: str, prompt: str) -> bool | None:
        """Degrees against radians: `45^\\circ` = `\\frac{\\pi}{4}` when the problem is in degrees
        (the reference carries `^\\circ`, or the prompt speaks of degrees); None when not an angle pair."""
        gold_deg, pred_deg = _degrees(gold), _degrees(pred)
        if gold_deg is None and "\\pi" not in gold and _PROMPT_DEGREES.search(prompt) and as_rational(normalize(gold)):
            gold_deg = gold  # a bare number in a problem posed in degrees
        if gold_deg is not None and pred_deg is None and "\\pi" in pred:
            return self._math_verify(gold_deg, f"\\frac{{180}}{{\\pi}}\\left({pred}\\right)")
        if gold_deg is None and "\\pi" in gold and pred_deg is not None:
            return self._math_verify(gold, f"\\frac{{\\pi}}{{180}}\\left({pred_deg}\\right)")
        return None

    @staticmethod
    def _base(gold: str, pred: str) -> bool | None:
        """Numbers written in a base (`204_5`): the digits and the base decide; None when the
        reference is in a base and the answer repeats its digits without saying which base."""
        g, p = _in_base(gold), _in_base(pred)
        if g is not None and p is not None:
            return g == p
        if p is not None:  # a base-b answer to a decimal reference: the same number in another base
            return as_rational(gold) == p
        digits = _BASE.match(gold)
        assert digits is not None
        return None if pred.isdigit() and pred.lstrip("0") == digits.group(1).lstrip("0") else False

    def _math_verify(self, gold: str, pred: str) -> bool | None:
        """Math-Verify's decision, with guards for its blind spots; None when it read only a piece
        of an answer or none of the reference."""
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

        # Internal SIGALRM timeouts off: the caller's worker pool enforces a hard kill instead.
        configs = [LatexExtractionConfig(), ExprExtractionConfig()]
        g = parse(f"$\\boxed{{{gold}}}$", extraction_config=configs, parsing_timeout=None)
        p = parse(f"$\\boxed{{{pred}}}$", extraction_config=configs, parsing_timeout=None)
        if not g:
            return None  # a reference we cannot read is not evidence against the answer
        if not p or _partial(pred, p) or _partial(gold, g):
            return None if p else False
        import sympy

        g, p = _imaginary_unit(g), _imaginary_unit(p)
        a, b = g[0], p[0]
        if isinstance(a, sympy.Equality) and isinstance(b, sympy.Equality):
            return _same_equation(a, b)  # equations are compared as equations
        if isinstance(a, sympy.Equality) or isinstance(b, sympy.Equality):
            return self._equation_vs_value(a, b, g, p, _decimals(gold, pred))
        as_sets = _as_sets(a, b)
        if as_sets is not None:
            return as_sets
        if not verify(g, p, float_rounding=self.float_rounding, timeout_seconds=None):
            if getattr(a, "is_number", False) and getattr(b, "is_number", False):
                return _same_number(a, b)  # `2e^{i\pi/3}` = `1+\sqrt{3}i`
            return _same_for_positive_symbols(a, b)
        return not vetoed(a, b, _decimals(gold, pred))

    def _equation_vs_value(self, a: Any, b: Any, g: list[Any], p: list[Any], decimals: int | None) -> bool:
        """`x = 5` against `5`: the value decides only when one side of the equation is a bare
        name (`x`, `f(2)`); a line `2x+3y=6` is not the number 6, nor is `x+y=0` the number 0."""
        from math_verify import verify
        import sympy

        eq = a if isinstance(a, sympy.Equality) else b
        named = [side for side, other in ((eq.rhs, eq.lhs), (eq.lhs, eq.rhs)) if _is_name(other)]
        if not named and eq.free_symbols:
            return False
        value = named[0] if named else eq.rhs  # `1+2=3`: a worked numeric chain ends in its value
        if eq is a:
            g, a = [value, str(value)], value
        else:
            p, b = [value, str(value)], value
        return bool(verify(g, p, float_rounding=self.float_rounding, timeout_seconds=None)) and not vetoed(a, b, decimals)


def _in_base(ans: str) -> int | None:
    """The value of `digits_base` (`204_5` -> 54); None for anything else (`a_1` is a name)."""
    m = _BASE.match(ans)
    if not m or not 2 <= int(m.group(2)) <= 36:
        return None
    try:
        return int(m.group(1), int(m.group(2)))
    except ValueError:
        return None


def _is_name(expr: Any) -> bool:
    import sympy

    return isinstance(expr, (sympy.Symbol, sympy.Indexed)) or (
        isinstance(expr, sympy.Function) and all(arg.is_number or arg.is_Symbol for arg in expr.args))


def _partial(text: str, parsed: list[Any]) -> bool:
    """Math-Verify read only a piece of the answer: the text it matched is a strict piece of the
    answer and digits were left out (`3\\text{ m} \\times 4\\text{ m}` read as `3`)."""
    matched = re.sub(r"\s+", "", str(parsed[-1]))
    whole = re.sub(r"\s+", "", text)
    digits = lambda s: re.findall(r"\d", s)  # noqa: E731
    return matched != whole and matched in whole and digits(matched) != digits(whole)


def _imaginary_unit(parsed: list[Any]) -> list[Any]:
    """`i` is the imaginary unit in competition answers (MATH writes `3+4i`, `e^{i\\pi}`)."""
    import sympy

    expr = parsed[0]
    if not isinstance(expr, sympy.Basic):
        return parsed
    units = {s: sympy.I for s in expr.free_symbols if getattr(s, "name", None) == "i"}  # by name: the parser adds assumptions
    return [expr.subs(units), *parsed[1:]] if units else parsed


def _as_sets(a: Any, b: Any) -> bool | None:
    """An inequality in one variable against an interval or set (`y > -1` vs `(-1, \\infty)`):
    compared as the sets of values they describe; None when the pair is not of that kind."""
    import sympy

    def as_set(x: Any) -> Any:
        if isinstance(x, sympy.Set):
            return x
        if isinstance(x, (sympy.Rel, sympy.And, sympy.Or)) and not isinstance(x, (sympy.Eq, sympy.Ne)):
            if len(x.free_symbols) == 1:
                try:
                    return x.as_set()
                except (NotImplementedError, TypeError, ValueError):
                    return None
        return None

    relational = lambda x: isinstance(x, (sympy.Rel, sympy.And, sympy.Or))  # noqa: E731
    if not (relational(a) or relational(b)):
        return None
    sa, sb = as_set(a), as_set(b)
    if sa is None or sb is None or (relational(a) and relational(b)):
        return None  # two inequalities: Math-Verify compares those itself
    return bool(sa == sb)


def _same_for_positive_symbols(a: Any, b: Any) -> bool:
    """`\\sqrt{a/b}` = `\\sqrt{a}/\\sqrt{b}`: radicals and powers of symbols agree once the symbols
    are taken positive, as lengths and counts in competition problems are. Never with absolute
    values, signs or floors in the answer, where positivity would hide a real difference."""
    import sympy

    if not all(isinstance(x, sympy.Expr) for x in (a, b)):
        return False
    symbols = a.free_symbols | b.free_symbols
    if not symbols or any(x.has(sympy.Abs, sympy.sign, sympy.floor, sympy.ceiling, sympy.Piecewise, sympy.Mod)
                          for x in (a, b)):
        return False
    positive = {s: sympy.Symbol(s.name, positive=True) for s in symbols}
    difference = sympy.simplify(a.subs(positive) - b.subs(positive))
    return bool(difference == 0)


def _decimals(*answers: str) -> int | None:
    """Digits after the point of the most precise decimal in the answers; None if there is none."""
    found = [len(m) for a in answers for m in re.findall(r"\d\.(\d+)", a)]
    return max(found) if found else None


def vetoed(gold: object, pred: object, decimals: int | None = None) -> bool:
    """Math-Verify's known false "equal"s, decided at 50 digits: numbers its rounding makes
    equal (1/100! vs 1/101!, 2^-60 vs 2^-61, 1+10^-12 vs 1) and a set against an interval.
    Exact answers must agree exactly; a decimal may differ by its last digit's rounding."""
    import sympy

    if not isinstance(gold, sympy.Basic) or not isinstance(pred, sympy.Basic):
        return False
    sets = (sympy.FiniteSet, sympy.Interval, sympy.Union)
    if isinstance(gold, sets) and isinstance(pred, sets) and type(gold) is not type(pred):
        return True
    if getattr(gold, "is_number", False) and getattr(pred, "is_number", False):
        return not _close(gold, pred, absolute=0.0 if decimals is None else 0.5 * 10.0**-decimals * (1 + 1e-9))
    return False


def _close(a: object, b: object, absolute: float = 0.0) -> bool:
    """Equal at 50 significant digits, or within `absolute` (a decimal's rounding) or a
    relative 1e-6 when such a tolerance applies."""
    import sympy

    x, y = sympy.N(a, 50), sympy.N(b, 50)
    if not (x.is_real and y.is_real):
        return _same_number(a, b)
    diff, scale = abs(x - y), max(abs(x), abs(y))
    relative = 1e-6 if absolute else 1e-40
    return bool(diff <= absolute or diff <= relative * scale)


def _same_number(a: Any, b: Any) -> bool:
    """Exact equality of two numbers, complex ones included; undefined values (`12:00` read as
    12/0) are equal to nothing."""
    import sympy

    if any(x.has(sympy.zoo, sympy.nan) for x in (a, b)):
        return False
    return bool(sympy.expand_complex(sympy.simplify(a - b)) == 0)


def _same_equation(a: Any, b: Any) -> bool:
    import sympy

    if not (a.free_symbols or b.free_symbols):  # 1=1 vs 2=2: only numbers, compare the sides
        return (_close(a.lhs, b.lhs) and _close(a.rhs, b.rhs)) or (_close(a.lhs, b.rhs) and _close(a.rhs, b.lhs))
    if isinstance(a.lhs, sympy.Symbol) and a.lhs == b.lhs:  # x = ... against x = ...: the values decide
        return bool(sympy.simplify(a.rhs - b.rhs) == 0)
    da, db = a.lhs - a.rhs, b.lhs - b.rhs
    if db == 0:
        return bool(da == 0)
    ratio = sympy.simplify(da / db)  # the same equation up to a non-zero factor
    return bool(ratio.is_number and ratio != 0)


VERIFIERS.register("math")(MathVerifier)
