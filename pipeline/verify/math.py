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
    return s.rstrip(".")


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
        return rg == rp
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
        return bool(verify(g, p, float_rounding=self.float_rounding, timeout_seconds=None))


VERIFIERS.register("math")(MathVerifier)
