"""Code answers: the last Python block of the final part, run against the row's tests in the sandbox.

`tests` is a JSON object (schemas/code_tests.schema.json); every kind may carry a `prelude`
(e.g. the prompt's imports, `from typing import List`) that runs just before the program:
  {"kind": "stdio", "cases": [{"stdin": "...", "stdout": "..."}], "time_limit_s": 2, "tolerance": 1e-6}
  {"kind": "assert", "code": "<python that raises on failure>", "time_limit_s": 5}
  {"kind": "call", "fn_name": "add", "cases": [{"args": [1, 2], "expected": 3}], "time_limit_s": 2}

stdio: the program runs as `__main__` once per case; exit status 0 (`sys.exit(0)` after printing
is fine) and the right output pass. assert and call: the program and the tests run in two
sandboxes joined by a pipe (pipeline/verify/harness.py says why and how); only the harness's
completion record, carrying this run's nonce, passes a sample.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from pipeline.units import Sample, Verdict
from pipeline.verify.registry import VERIFIERS
from pipeline.verify.sandbox import Limits, Result, Run, Sandbox, SandboxUnavailable

HARNESS = (Path(__file__).parent / "harness.py").read_text()


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Tests(_Spec):
    prelude: str = Field(
        "", description="Python run just before the program, in its namespace (e.g. the prompt's imports).")


class StdioCase(_Spec):
    stdin: str = ""
    stdout: str


class StdioTests(_Tests):
    """Feed each case's stdin; stdout must match line by line, ASCII decimal numbers compared as numbers."""

    kind: Literal["stdio"]
    cases: list[StdioCase] = Field(min_length=1)
    time_limit_s: float = Field(2.0, gt=0, le=60)
    tolerance: float | None = Field(
        None, ge=0, description="Absolute or relative error allowed between non-integer numbers; "
        "with a tolerance, exponent notation (1e-5) counts as a number too.",
    )  # fmt: skip


class AssertTests(_Tests):
    """`code` runs in a harness process of its own and calls the program's functions across a
    boundary of plain values; it passes when it runs to its end."""

    kind: Literal["assert"]
    code: str
    time_limit_s: float = Field(5.0, gt=0, le=60)


class CallCase(_Spec):
    args: list[Any]
    expected: Any


class CallTests(_Tests):
    """APPS-style `fn_name` tests: `fn_name(*args)` (or `Solution().fn_name(*args)`) must return
    `expected` exactly: same type and value (a list also matches a tuple; `[result]` matching
    `expected` counts, as in APPS)."""

    kind: Literal["call"]
    fn_name: str = Field(min_length=1)
    cases: list[CallCase] = Field(min_length=1)
    time_limit_s: float = Field(2.0, gt=0, le=60)


TestSpec = Annotated[Union[StdioTests, AssertTests, CallTests], Field(discriminator="kind")]
_SPEC = TypeAdapter(TestSpec)


def parse_tests(text: str) -> StdioTests | AssertTests | CallTests:
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


_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_SCIENTIFIC = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _number(token: str, scientific: bool) -> Decimal | None:
    """The token's value if it is an ASCII decimal number (`1e1`, `١٠`, `1_000`, `inf` are not:
    a judge reads them as text), with an exponent only when the spec gives a tolerance."""
    return Decimal(token) if (_SCIENTIFIC if scientific else _DECIMAL).fullmatch(token) else None


def _same_token(want: str, got: str, tolerance: float | None) -> bool:
    if want == got:
        return True
    a, b = _number(want, tolerance is not None), _number(got, tolerance is not None)
    if a is None or b is None:
        return False
    if a == b or tolerance is None:
        return a == b  # exact: 0.5 = 0.50000, 3 = 3.0; integers of any size
    if not any(c in want + got for c in ".eE"):
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
    """The verdict for a program run that did not end cleanly, or None when it exited 0."""
    if result.memory_exceeded:
        return Verdict.reject("runtime_error", error="memory limit (the run's processes together)", **where)
    if result.timed_out:
        return Verdict.reject("tests_timeout", wall_s=round(result.wall_s, 3), **where)
    if result.output_exceeded:
        return Verdict.reject("runtime_error", error="output limit exceeded", **where)
    if result.returncode != 0:
        return Verdict.reject("runtime_error", exit=result.returncode, stderr=_excerpt(result.stderr, 400), **where)
    return None


RECORD_REASONS = frozenset({"tests_failed", "runtime_error", "early_exit", "unsupported_value", "bad_tests"})
"""What the harness may report (schemas/reasons.json)."""


class CodeVerifier:
    """Runs the final answer's program against the row's tests; every run is sandboxed, and
    nothing runs where the sandbox is unavailable (the probe's finding is the reason)."""

    name = "code"
    concurrent = True  # waits on sandboxed processes: the check stage runs samples in threads

    def __init__(
        self,
        memory_mb: int = 1024,
        processes: int = 32,
        file_mb: int = 16,
        scratch_mb: int = 64,
        scratch_inodes: int = 4096,
        output_mb: float = 1.0,
        python: str | None = None,
    ) -> None:
        self.sandbox = Sandbox(python=python)
        self.limits = Limits(memory_mb=memory_mb, processes=processes, file_mb=file_mb, scratch_mb=scratch_mb,
                             scratch_inodes=scratch_inodes, output_bytes=int(output_mb * 1024 * 1024))

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
            if isinstance(spec, StdioTests):
                return self._check_stdio(program, spec, limits)
            return self._check_functions(program, spec, limits)
        except SandboxUnavailable as e:
            return Verdict.reject("verifier_error", error=f"sandbox unavailable (isolation level none): {e}")

    def _check_stdio(self, program: str, spec: StdioTests, limits: Limits) -> Verdict:
        source = f"{spec.prelude}\n{program}" if spec.prelude else program
        wall = 0.0
        for i, case in enumerate(spec.cases):
            result = self.sandbox.run(source, case.stdin.encode(), limits)
            wall += result.wall_s
            failed = _failure(result, case=i)
            if failed:
                return failed
            got = result.stdout.decode(errors="replace")
            if not same_output(case.stdout, got, spec.tolerance):
                return Verdict.reject("tests_failed", case=i, expected=_excerpt(case.stdout), got=_excerpt(got))
        return Verdict.accept(cases=len(spec.cases), wall_s=round(wall, 3))

    def _check_functions(self, program: str, spec: AssertTests | CallTests, limits: Limits) -> Verdict:
        """Program and tests in two sandboxes; the verdict is the harness's record (see harness.py)."""
        nonce = secrets.token_hex(16)
        req_r, req_w = os.pipe2(os.O_CLOEXEC)  # harness -> program
        resp_r, resp_w = os.pipe2(os.O_CLOEXEC)  # program -> harness
        rec_r, rec_w = os.pipe2(os.O_CLOEXEC)  # harness -> here: the completion record
        serve = {"role": "serve", "prelude": spec.prelude, "program": program, "req_fd": req_r, "resp_fd": resp_w}
        tests = {"role": "test", "tests": spec.model_dump(exclude={"prelude", "time_limit_s"}), "nonce": nonce,
                 "req_fd": req_w, "resp_fd": resp_r, "record_fd": rec_w}  # fmt: skip
        try:
            prog, harness = self.sandbox.run_group(
                [Run(HARNESS, json.dumps(serve).encode(), (req_r, resp_w)),
                 Run(HARNESS, json.dumps(tests).encode(), (req_w, resp_r, rec_w))],
                limits, primary=1,
            )  # fmt: skip
            record = _read_record(rec_r, nonce)
        finally:
            os.close(rec_r)
        output = {"stdout": _excerpt(prog.stdout, 400)} if prog.stdout.strip() else {}
        if record is not None and record.get("passed") is True:
            return Verdict.accept(wall_s=round(harness.wall_s, 3))
        # the program's own limits first: the harness only sees them as the program vanishing
        if prog.memory_exceeded:
            return Verdict.reject("runtime_error", error="memory limit (the run's processes together)")
        if prog.timed_out or harness.timed_out:
            return Verdict.reject("tests_timeout", wall_s=round(harness.wall_s, 3))
        if prog.output_exceeded:
            return Verdict.reject("runtime_error", error="output limit exceeded")
        if record is not None and record.get("reason") in RECORD_REASONS:
            details = record.get("details") if isinstance(record.get("details"), dict) else {}
            if record["reason"] == "early_exit" and prog.returncode >= 0:  # it ended by itself (not killed here)
                details = {**details, "exit": prog.returncode, "stderr": _excerpt(prog.stderr, 400), **output}
            return Verdict.reject(record["reason"], **details)
        return Verdict.reject("verifier_error", error="the test harness ended without a record",
                              exit=harness.returncode, stderr=_excerpt(harness.stderr, 400))


def _read_record(fd: int, nonce: str) -> dict[str, Any] | None:
    """The harness's record if it is one, for this run; the harness's sandbox has ended, so this
    reads to EOF at once."""
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    try:
        record = json.loads(b"".join(chunks))
    except ValueError:
        return None
    return record if isinstance(record, dict) and record.get("nonce") == nonce else None


VERIFIERS.register("code")(CodeVerifier)
