"""Verifiers that need no symbolic work: accept-all and multiple choice."""

from __future__ import annotations

import re

from pipeline.units import Sample, Verdict
from pipeline.verify.extract import extract_answer
from pipeline.verify.registry import VERIFIERS

_LETTER = re.compile(r"^\(?([A-Z])\)?(?:[.:)]|\s|$)")


class AcceptVerifier:
    """For domains without a reference (general chat): correctness is the judge's job, not ours."""

    name = "accept"

    def __call__(self, sample: Sample) -> Verdict:
        return Verdict.accept()


def choice_letter(answer: str | None) -> str | None:
    """The option letter of an extracted answer (`B`, `(b)`, `\\text{C}`, `D. 42`); None if it names none."""
    if answer is None:
        return None
    m = _LETTER.match(re.sub(r"^\\text\{(.*)\}$", r"\1", answer.strip()).upper())
    return m.group(1) if m else None


class ChoiceVerifier:
    """The option letter in the final part (boxed, or 'the answer is (B)') against the reference letter."""

    name = "choice"

    def __call__(self, sample: Sample) -> Verdict:
        gold = (sample.get("answer") or "").strip().strip("()").upper()
        if not gold:
            return Verdict.reject("no_reference")
        pred = extract_answer(sample.get("final"))
        if pred is None:
            return Verdict.reject("no_answer")
        letter = choice_letter(pred)
        if letter is None:
            return Verdict.reject("no_answer", extracted=pred)
        ok = letter == gold
        return Verdict(ok, None if ok else "answer_mismatch", {"extracted": letter})


VERIFIERS.register("accept")(AcceptVerifier)
VERIFIERS.register("choice")(ChoiceVerifier)
