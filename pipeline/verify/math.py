"""Math answers: extract from the final part, cheap exact checks first, then Math-Verify."""

from __future__ import annotations

import logging
import re
from fractions import Fraction

from pipeline.units import Sample, Verdict
from pipeline.verify.extract import extract_answer
from pipeline.verify.registry import VERIFIERS

# Math-Verify warns on every call that its own timeout is off; ours is the worker pool's hard kill.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_SPACE = re.compile(r"\s+|\\[,;! ]|\\quad|\\qquad")
_WRAPPERS = re.compile(r"^\\(?:text|textbf|mathrm|mathbf)\{(.*)\}$")
_NUMBER = re.compile(r"^[+-]?\d+(?:\.\d+)?$")
_FRACTION = re.compile(r"^([+-]?)\\[dt]?frac\{([+-]?\d+)\}\{([+-]?\d+)\}$")


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


_UNIT = re.compile(r"\\(?:text|mathrm|mbox)\{\s*([A-Za-z][A-Za-z/ ]*?)\s*\}\s*(?:\^\{?\d\}?)?\s*$")


def trailing_unit(ans: str) -> str | None:
    """The unit word ending an answer (`5\\text{ cm}` -> `cm`), singular; None without one."""
    m = _UNIT.search(ans.strip().strip("$"))
    if not m:
        return None
    unit = m.group(1).lower()
    return unit[:-1] if len(unit) > 2 and unit.endswith("s") else unit


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
        units = trailing_unit(str(gold)), trailing_unit(pred)
        if all(units) and units[0] != units[1]:  # 5 cm is not 5 m; a unit on one side only is dropped
            return Verdict.reject("answer_mismatch", extracted=pred, path="units")
        fast = fast_compare(str(gold), pred)
        if fast is not None:
            return Verdict(fast, None if fast else "answer_mismatch", {"extracted": pred, "path": "fast"})
        ok = self._math_verify(str(gold), pred)
        return Verdict(ok, None if ok else "answer_mismatch", {"extracted": pred, "path": "math_verify"})

    def _math_verify(self, gold: str, pred: str) -> bool:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

        # Internal SIGALRM timeouts off: the caller's worker pool enforces a hard kill instead.
        configs = [LatexExtractionConfig(), ExprExtractionConfig()]
        g = parse(f"$\\boxed{{{gold}}}$", extraction_config=configs, parsing_timeout=None)
        p = parse(f"$\\boxed{{{pred}}}$", extraction_config=configs, parsing_timeout=None)
        if not g or not p:
            return False
        import sympy

        if isinstance(g[0], sympy.Equality) and isinstance(p[0], sympy.Equality):
            return _same_equation(g[0], p[0])  # equations are compared as equations
        if not verify(g, p, float_rounding=self.float_rounding, timeout_seconds=None):
            return False
        return not vetoed(g[0], p[0], _decimals(gold, pred))


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
        return bool(sympy.simplify(a - b) == 0)
    diff, scale = abs(x - y), max(abs(x), abs(y))
    relative = 1e-6 if absolute else 1e-40
    return bool(diff <= absolute or diff <= relative * scale)


def _same_equation(a: object, b: object) -> bool:
    import sympy

    if not (a.free_symbols or b.free_symbols):  # 1=1 vs 2=2: only numbers, compare the sides
        return (_close(a.lhs, b.lhs) and _close(a.rhs, b.rhs)) or (_close(a.lhs, b.rhs) and _close(a.rhs, b.lhs))
    if isinstance(a.lhs, sympy.Symbol) and a.lhs == b.lhs:  # x = ... against x = ...: the values decide
        return bool(sympy.simplify(a.rhs - b.rhs) == 0)
    da, db = a.lhs - a.rhs, b.lhs - b.rhs
    if db == 0:
        return da == 0
    ratio = sympy.simplify(da / db)  # the same equation up to a non-zero factor
    return bool(ratio.is_number and ratio != 0)


VERIFIERS.register("math")(MathVerifier)
