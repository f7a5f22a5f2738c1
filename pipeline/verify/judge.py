"""The LLM judge, as a unit: the grading prompt and the parsing of the judge's verdict.

R1 used DeepSeek-V3 as a judge where rules cannot decide. The stage that runs the judge model
lives in `pipeline/generate.py` (JudgeStage); what it asks and how it reads the answer is here,
Ray- and vLLM-free, so it is tested in milliseconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.units import Sample

DEFAULT_PROMPT = """You are grading an answer to a problem.

Problem:
{prompt}

Reference answer:
{reference}

Answer to grade:
{answer}

Is the answer to grade correct (equivalent to the reference, or a correct and complete answer when no reference is given)? \
Reply with one line of rationale, then a last line that is exactly VERDICT: CORRECT or VERDICT: INCORRECT."""

_VERDICT = re.compile(r"VERDICT\s*[:：]\s*\**\s*(CORRECT|INCORRECT)", re.IGNORECASE)


@dataclass(frozen=True)
class JudgeVerdict:
    correct: bool | None
    """None when the judge's reply holds no verdict."""
    rationale: str


def judge_prompt(sample: Sample, template: str = DEFAULT_PROMPT, max_answer_chars: int = 4000) -> str:
    """The user turn for the judge; long answers are cut from the front (the end holds the answer)."""
    answer = sample.get("final") or sample.get("completion") or ""
    if len(answer) > max_answer_chars:
        answer = "..." + answer[-max_answer_chars:]
    reference = sample.get("answer")
    return template.format(prompt=sample.get("prompt") or "", reference=reference if reference else "(none given)",
                           answer=answer)


def parse_verdict(text: str) -> JudgeVerdict:
    """The last VERDICT line decides; everything before it is the rationale."""
    matches = list(_VERDICT.finditer(text))
    if not matches:
        return JudgeVerdict(None, text.strip()[-1000:])
    last = matches[-1]
    return JudgeVerdict(last.group(1).upper() == "CORRECT", text[: last.start()].strip()[-1000:])
