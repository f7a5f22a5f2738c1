"""Code answers: the last Python block of the final part, run against the row's tests in the sandbox.

`tests` is a JSON object (schemas/prompt.schema.json):
  {"kind": "stdio", "cases": [{"stdin": "...", "stdout": "..."}], "time_limit_s": 2, "tolerance": 1e-6}
  {"kind": "assert", "code": "<python that raises on failure>", "time_limit_s": 5}
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from decimal import Decimal, InvalidOperation
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from pipeline.units import Sample, Verdict
from pipeline.verify.registry import VERIFIERS
from pipeline.verify.sandbox import Limits, Result, Sandbox, SandboxUnavailable


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StdioCase(_Spec):
    stdin: str = ""
    stdout: str


class StdioTests(_Spec):
    """Feed each case's stdin; stdout must match line by line, numbers compared as numbers."""

    kind: Literal["stdio"]
    cases: list[StdioCase] = Field(min_length=1)
    time_limit_s: float = Field(2.0, gt=0, le=60)
    tolerance: float | None = Field(None, ge=0, description="Absolute or relative error allowed between non-integer numbers.")


class AssertTests(_Spec):
    """The program and `code` run as one script; exit 0 within the limits passes."""

    kind: Literal["assert"]
    code: str
    time_limit_s: float = Field(5.0, gt=0, le=60)


TestSpec = Annotated[Union[StdioTests, AssertTests], Field(discriminator="kind")]
_SPEC = TypeAdapter(TestSpec)


def parse_tests(text: str) -> StdioTests | AssertTests:
    """The typed test spec of a row; ValueError says what is wrong."""
    try:
        return _SPEC.validate_python(json.loads(text))
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"tests is not JSON: {e}") from None
    except ValidationError as e:
        raise ValueError(f"tests: {e.errors()[0]['msg']} at {'.'.join(map(str, e.errors()[0]['loc']))}") from None


def tests_json_schema() -> dict:
    """The JSON Schema of `tests` (committed as schemas/code_tests.schema.json; a test keeps them equal)."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "tests", **_SPEC.json_schema()}


_FENCE = re.compile(r"```[ \t]*(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)```", re.DOTALL)


def last_python_block(final: str | None) -> str | None:
    """The last ```python (or ```py / ```python3) block; an untagged block if none is tagged."""
    if not final:
        return None
    blocks = [(m.group("lang").lower(), m.group("body")) for m in _FENCE.finditer(final)]
    tagged = [body for lang, body in blocks if lang in ("python", "py", "python3")]
    untagged = [body for lang, body in blocks if not lang]
    chosen = tagged or untagged
    return chosen[-1] if chosen and chosen[-1].strip() else None


def _number(token: str) -> Decimal | None:
    try:
        d = Decimal(token)
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def _same_token(want: str, got: str, tolerance: float | None) -> bool:
    if want == got:
        return True
    a, b = _number(want), _number(got)
    if a is None or b is None:
        return False
    if a == b or tolerance is None:
        return a == b  # exact: 0.5 = 0.50000, 1e-5 = 0.00001; integers of any size
    if "." not in want + got and "e" not in (want + got).lower():
        return False  # two integers: never approximately equal
    tol = Decimal(str(tolerance))
    return abs(a - b) <= tol or abs(a - b) <= tol * max(abs(a), abs(b))


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def same_output(want: str, got: str, tolerance: float | None = None) -> bool:
    """Judge-style comparison: line by line, trailing whitespace/CRLF/final newline ignored,
    tokens compared as numbers where both parse; a missing or extra line fails."""
    w, g = _lines(want), _lines(got)
    if len(w) != len(g):
        return False
    for lw, lg in zip(w, g):
        tw, tg = lw.split(), lg.split()
        if len(tw) != len(tg) or not all(_same_token(a, b, tolerance) for a, b in zip(tw, tg)):
            return False
    return True


def _excerpt(data: bytes | str, n: int = 200) -> str:
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return text if len(text) <= n else text[: n // 2] + " ... " + text[-n // 2 :]


def _failure(result: Result, **where: object) -> Verdict | None:
    """The verdict for a run that did not end cleanly, or None when it exited 0."""
    if result.timed_out:
        return Verdict.reject("tests_timeout", wall_s=round(result.wall_s, 3), **where)
    if result.output_exceeded:
        return Verdict.reject("runtime_error", error="output limit exceeded", **where)
    if result.returncode != 0:
        return Verdict.reject("runtime_error", exit=result.returncode, stderr=_excerpt(result.stderr, 400), **where)
    return None


class CodeVerifier:
    """Runs the final answer's program against the row's tests; every run is sandboxed."""

    name = "code"
    concurrent = True  # waits on sandboxed processes: the check stage runs samples in threads

    def __init__(
        self,
        memory_mb: int = 1024,
        processes: int = 32,
        file_mb: int = 16,
        scratch_mb: int = 64,
        output_mb: float = 1.0,
        python: str | None = None,
        slots: int | None = None,
    ) -> None:
        self.sandbox = Sandbox(slots=slots, python=python)
        self.limits = Limits(memory_mb=memory_mb, processes=processes, file_mb=file_mb, scratch_mb=scratch_mb,
                             output_bytes=int(output_mb * 1024 * 1024))

    def __call__(self, sample: Sample) -> Verdict:
        if not sample.get("tests"):
            return Verdict.reject("no_reference")
        try:
            spec = parse_tests(sample["tests"])
        except ValueError as e:
            return Verdict.reject("bad_tests", error=str(e))
        program = last_python_block(sample.get("final"))
        if program is None:
            return Verdict.reject("no_code")
        limits = replace(self.limits, wall_s=spec.time_limit_s)
        try:
            if isinstance(spec, AssertTests):
                return self._check_assert(program, spec, limits)
            return self._check_stdio(program, spec, limits)
        except SandboxUnavailable as e:
            return Verdict.reject("verifier_error", error=f"sandbox unavailable: {e}")

    def _check_assert(self, program: str, spec: AssertTests, limits: Limits) -> Verdict:
        result = self.sandbox.run(f"{program}\n\n{spec.code}\n", b"", limits)
        failed = _failure(result)
        if failed and failed.reason == "runtime_error" and b"AssertionError" in result.stderr[-2000:]:
            return Verdict.reject("tests_failed", stderr=_excerpt(result.stderr, 400))
        return failed or Verdict.accept(wall_s=round(result.wall_s, 3))

    def _check_stdio(self, program: str, spec: StdioTests, limits: Limits) -> Verdict:
        wall = 0.0
        for i, case in enumerate(spec.cases):
            result = self.sandbox.run(program, case.stdin.encode(), limits)
            wall += result.wall_s
            failed = _failure(result, case=i)
            if failed:
                return failed
            got = result.stdout.decode(errors="replace")
            if not same_output(case.stdout, got, spec.tolerance):
                return Verdict.reject("tests_failed", case=i, expected=_excerpt(case.stdout), got=_excerpt(got))
        return Verdict.accept(cases=len(spec.cases), wall_s=round(wall, 3))


VERIFIERS.register("code")(CodeVerifier)
