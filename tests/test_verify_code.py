"""Code verification: output comparison, block extraction, test specs, and verdicts that only a
correct program earns (the attacks of issue #13 that target the verdict, each with its one right
outcome). The sandbox's isolation is tested in tests/test_sandbox.py.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from hostcheck import host  # noqa: F401  (a fixture: a host process survives, no process of a run is left)
from pipeline.config import REPO_ROOT
from pipeline.schemas import reason_codes
from pipeline.verify import harness
from pipeline.verify.code import RECORD_REASONS, CodeVerifier, last_python_block, parse_tests, same_output


@pytest.fixture(scope="module")
def verifier() -> CodeVerifier:
    v = CodeVerifier()
    assert v.sandbox.unavailable is None, v.sandbox.unavailable
    return v


def solution(code: str) -> str:
    return f"Here is my solution.\n\n```python\n{code}\n```\n"


def sample(code: str, tests: dict) -> dict:
    return {"id": "p", "domain": "code", "final": solution(code), "tests": json.dumps(tests)}


STDIO = {"kind": "stdio", "cases": [{"stdin": "2 3\n", "stdout": "5\n"}, {"stdin": "10 -4\n", "stdout": "6"}], "time_limit_s": 2}
ADD = {"kind": "assert", "code": "assert add(2, 3) == 5\nassert add(-1, 1) == 0\nassert abs(add(-2, -3)) == 5", "time_limit_s": 5}
HONEST_ADD = "def add(a, b):\n    return a + b"
WRONG_ADD = "def add(a, b):\n    return a * b"


# --- output comparison --------------------------------------------------------------------


@pytest.mark.parametrize(
    "want,got",
    [
        ("5\n", "5"),
        ("1 2 3\n", "1 2 3   \n\n"),
        ("a\nb\n", "a\r\nb\r\n"),
        ("0.5\n", "0.50000\n"),
        ("123456789012345678901234567890\n", "123456789012345678901234567890"),
        ("YES\n", "YES"),
        ("3\n", "3.0\n"),
        ("-7\n", "-7.000\n"),
    ],
)
def test_outputs_that_match(want, got):
    assert same_output(want, got)


@pytest.mark.parametrize(
    "want,got",
    [
        ("5\n", "6\n"),
        ("1 2 3\n", "1 2\n"),
        ("a\nb\n", "a\n"),
        ("a\n", "a\nb\n"),
        ("123456789012345678901234567890\n", "123456789012345678901234567891\n"),
        ("0.5\n", "0.5000001\n"),
        ("YES\n", "yes\n"),
        ("nan\n", "nan\n" + "x"),
        ("1 2\n", "12\n"),
        # only ASCII decimal numbers are numbers: a judge reads these as text
        ("10\n", "1e1\n"),
        ("1e-5\n", "0.00001\n"),
        ("10\n", "١٠\n"),
        ("1000\n", "1_000\n"),
        ("inf\n", "Infinity\n"),
    ],
)
def test_outputs_that_differ(want, got):
    assert not same_output(want, got)


def test_tolerance_applies_to_floats_not_integers():
    assert same_output("0.333333\n", "0.3333333333\n", tolerance=1e-6)
    assert not same_output("0.3333\n", "0.3334\n", tolerance=1e-6)
    assert same_output("1000000.0\n", "1000000.5\n", tolerance=1e-6)  # relative error
    assert not same_output("1000000\n", "1000001\n", tolerance=1e-6)  # integers stay exact
    assert same_output("0.00001\n", "1e-5\n", tolerance=1e-9)  # with a tolerance, exponents are numbers
    assert not same_output("10\n", "١٠\n", tolerance=1e-6) and not same_output("1000\n", "1_000\n", tolerance=0.5)


# --- extraction and specs -------------------------------------------------------------------


def test_last_python_block_is_taken():
    final = "First try:\n```python\nprint(1)\n```\nFixed:\n```py\nprint(2)\n```\nDone."
    assert last_python_block(final) == "print(2)\n"
    assert last_python_block("```\nprint(3)\n```") == "print(3)\n"
    assert last_python_block("```cpp\nint main(){}\n```\n```python\nprint(4)\n```") == "print(4)\n"
    assert last_python_block("No code here, the answer is 5.") is None
    assert last_python_block("```python\nprint('never closed')") is None


def test_test_specs_are_validated():
    assert parse_tests(json.dumps(STDIO)).kind == "stdio"
    assert parse_tests('{"kind": "assert", "code": "assert f(1) == 2"}').time_limit_s == 5
    assert parse_tests('{"kind": "assert", "code": "", "prelude": "import math"}').prelude == "import math"
    call = parse_tests('{"kind": "call", "fn_name": "f", "cases": [{"args": [1], "expected": [2]}]}')
    assert (call.fn_name, call.cases[0].args, call.cases[0].expected) == ("f", [1], [2])
    for bad in ['{"kind": "stdio", "cases": []}', '{"kind": "exec"}', "[1]", "{oops", '{"kind": "assert"}',
                '{"kind": "assert", "code": "", "time_limt_s": 1}', '{"kind": "call", "fn_name": "f", "cases": []}',
                '{"kind": "call", "fn_name": "f", "cases": [{"args": 1, "expected": 2}]}']:
        with pytest.raises(ValueError):
            parse_tests(bad)


def test_test_spec_schema_file_is_current():
    from pipeline.verify.code import tests_json_schema

    committed = json.loads((REPO_ROOT / "schemas" / "code_tests.schema.json").read_text())
    assert committed == tests_json_schema()
    assert "prelude" in committed["$defs"]["AssertTests"]["properties"]


def test_every_reason_the_harness_reports_is_documented_and_accepted():
    """The harness reports reasons through its record, not Verdict.reject: the host only passes on
    the ones it expects, and each is in schemas/reasons.json."""
    reported = set(re.findall(r'fail\(\s*"([a-z_]+)"', Path(harness.__file__).read_text()))
    reported |= set(re.findall(r'failure = .*\("([a-z_]+)"', Path(harness.__file__).read_text()))
    assert {"early_exit", "unsupported_value", "tests_failed", "runtime_error", "bad_tests"} <= reported
    assert reported <= RECORD_REASONS <= reason_codes()


def test_strict_equality_of_call_results():
    assert harness.same([1, 2], [1, 2]) and harness.same((1, 2), [1, 2]) and harness.same({"a": [1]}, {"a": [1]})
    for got, want in [(1, True), (True, 1), (1.0, 1), (1, 1.0), ("1", 1), ({1: 2}, {"1": 2}), ([1, 2], [1, 2.0]), (None, [])]:
        assert not harness.same(got, want), (got, want)


# --- honest programs pass, in every style --------------------------------------------------


def test_correct_stdio_program_passes(verifier):
    v = verifier(sample("a, b = map(int, input().split())\nprint(a + b)", STDIO))
    assert v.ok, v
    assert v.details["cases"] == 2


@pytest.mark.parametrize(
    "code",
    [
        "import sys\na, b = map(int, input().split())\nprint(a + b)\nsys.exit(0)",
        "def main():\n    a, b = map(int, input().split())\n    print(a + b)\n\nif __name__ == '__main__':\n    main()",
        "import sys\na, b = map(int, sys.stdin.read().split())\nsys.stdout.write(f'{a + b}\\n')\nexit()",
    ],
    ids=["sys_exit_0_after_print", "main_guard", "exit_builtin"],
)
def test_stdio_styles_pass(verifier, code):
    v = verifier(sample(code, STDIO))
    assert v.ok, v


@pytest.mark.parametrize(
    "code",
    [
        HONEST_ADD,
        HONEST_ADD + "\n\nif __name__ == '__main__':\n    print(add(1, 2))\n    raise SystemExit(1)",
        HONEST_ADD + "\n\nimport unittest\nclass T(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(add(1, 1), 2)\n\nunittest.main()",
        HONEST_ADD + "\n\ndef main():\n    print(add(2, 2))\n\nimport sys\nsys.exit(main())",
        HONEST_ADD + "\nprint('demo', add(1, 2))\nexit()",
    ],
    ids=["plain", "main_guard", "trailing_unittest_main", "sys_exit_main", "exit_after_demo"],
)
def test_assert_styles_pass(verifier, code):
    """A final block that exits while loading does not skip the prompt's tests: they still run."""
    v = verifier(sample(code, ADD))
    assert v.ok, v


def test_the_tests_still_run_after_an_exit_while_loading(verifier):
    v = verifier(sample(WRONG_ADD + "\n\nimport unittest\nunittest.main()", ADD))
    assert (v.ok, v.reason) == (False, "tests_failed")


def test_humaneval_with_the_prompts_imports_as_prelude(verifier):
    """The prompt's imports and helpers run before the program (prepare sets them): 2 of 41 correct
    HumanEval solutions were rejected for a NameError on `List` before."""
    from pipeline.prepare import fmt_humaneval

    row = fmt_humaneval({
        "prompt": "from typing import List\n\n\ndef _norm(x: int) -> int:\n    return x\n\n\n"
                  "def below_zero(operations: List[int]) -> bool:\n    \"\"\"True if the balance ever goes below zero.\"\"\"\n",
        "entry_point": "below_zero",
        "test": "def check(candidate):\n    assert candidate([1, 2, -3]) is False\n    assert candidate([1, -2, 3]) is True\n",
    })  # fmt: skip
    body = ("def below_zero(operations: List[int]) -> bool:\n    balance = 0\n    for op in operations:\n"
            "        balance += _norm(op)\n        if balance < 0:\n            return True\n    return False")  # fmt: skip
    assert json.loads(row["tests"])["prelude"].startswith("from typing import List")
    ok = verifier({"final": solution(body), "tests": row["tests"]})
    assert ok.ok, ok
    without = json.dumps({**json.loads(row["tests"]), "prelude": ""})
    missing = verifier({"final": solution(body), "tests": without})
    assert missing.reason == "runtime_error" and "NameError" in missing.details["error"]


def test_mbpp_asserts_with_setup_code(verifier):
    """MBPP's test_setup_code becomes the prelude: the objects it builds live next to the program,
    so the asserts can hand them to the program's function."""
    from pipeline.prepare import fmt_humaneval

    row = fmt_humaneval({
        "text": "Write a function to find the height of a binary tree.",
        "test_list": ["assert max_height(root) == 3", "assert max_height(leaf) == 1"],
        "test_setup_code": "class Node:\n    def __init__(self, left=None, right=None):\n        self.left, self.right = left, right\n"
                           "root = Node(Node(Node()), Node())\nleaf = Node()",
    })  # fmt: skip
    code = "def max_height(node):\n    if node is None:\n        return 0\n    return 1 + max(max_height(node.left), max_height(node.right))"
    assert verifier({"final": solution(code), "tests": row["tests"]}).ok
    wrong = "def max_height(node):\n    return 3"
    assert verifier({"final": solution(wrong), "tests": row["tests"]}).reason == "tests_failed"


def test_apps_fn_name_as_prepare_writes_it(verifier):
    from pipeline.prepare import fmt_code_stdio

    row = fmt_code_stdio({"question": "add", "input_output": json.dumps({"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [[3], [7]]})})
    assert verifier({"final": solution(HONEST_ADD), "tests": row["tests"]}).ok
    leetcode = "class Solution:\n    def add(self, a: int, b: int) -> int:\n        return a + b"
    assert verifier({"final": solution(leetcode), "tests": row["tests"]}).ok
    assert verifier({"final": solution(WRONG_ADD), "tests": row["tests"]}).reason == "tests_failed"


def test_call_tests_compare_type_and_value(verifier):
    spec = {"kind": "call", "fn_name": "pair", "cases": [{"args": [1, 2], "expected": [1, 2]}, {"args": [3, 4], "expected": [3, 4]}]}
    assert verifier(sample("def pair(a, b):\n    return (a, b)", spec)).ok
    assert verifier(sample("class Solution:\n    def pair(self, a, b):\n        return [a, b]", spec)).ok
    floats = verifier(sample("def pair(a, b):\n    return [float(a), float(b)]", spec))
    assert (floats.reason, floats.details["case"], floats.details["got"]) == ("tests_failed", 0, "[1.0, 2.0]")
    bools = {"kind": "call", "fn_name": "f", "cases": [{"args": [0], "expected": False}]}
    assert verifier(sample("def f(x):\n    return 0", bools)).reason == "tests_failed"
    assert verifier(sample("def f(x):\n    return False", bools)).ok


def test_program_exceptions_reach_the_tests(verifier):
    spec = {"kind": "assert", "code": "try:\n    inv(0)\n    assert False, 'no error'\nexcept ZeroDivisionError:\n    pass\n"
            "try:\n    check(-1)\nexcept BadInput:\n    pass\nassert inv(2) == 0.5"}  # fmt: skip
    code = "class BadInput(ValueError):\n    pass\ndef inv(x):\n    return 1 / x\ndef check(x):\n    if x < 0:\n        raise BadInput(x)"
    v = verifier(sample(code, spec))
    assert v.ok, v


# --- wrong programs fail, however they try --------------------------------------------------


def test_wrong_output_names_the_case(verifier):
    v = verifier(sample("a, b = map(int, input().split())\nprint(a + b if a < 5 else a - b + 1)", STDIO))
    assert (v.ok, v.reason, v.details["case"]) == (False, "tests_failed", 1)
    assert v.details["expected"] == "6" and v.details["got"].strip() == "15"


def test_wrong_function_names_the_failing_assert(verifier, host):
    bad = verifier(sample(WRONG_ADD, ADD))
    assert (bad.ok, bad.reason, bad.details["where"]) == (False, "tests_failed", "tests.py:1: assert add(2, 3) == 5")
    crash = verifier(sample("def add(a, b):\n    return a + undefined", ADD))
    assert crash.reason == "runtime_error" and "NameError" in crash.details["error"]
    assert "return a + undefined" in crash.details["trace"]  # the program's own traceback, nothing of the harness
    assert "harness" not in crash.details["trace"] and "_answer" not in crash.details["trace"]


@pytest.mark.parametrize(
    "attack,reason",
    [
        ("import os\nos._exit(0)", "early_exit"),  # at load, before the harness is told its names
        ("import os\n" + WRONG_ADD + "\nos._exit(0)", "early_exit"),
        (WRONG_ADD + "\nraise SystemExit(0)", "tests_failed"),
        (WRONG_ADD + "\nexit()", "tests_failed"),
        (WRONG_ADD + "\nquit(0)", "tests_failed"),
        ("import sys, os\nsys.excepthook = lambda *a: os._exit(0)\n" + WRONG_ADD, "tests_failed"),
        ("import atexit, os\natexit.register(os._exit, 0)\n" + WRONG_ADD, "tests_failed"),
        ("import sys\ndef add(a, b):\n    sys.exit(0)", "early_exit"),
        ("import os\ndef add(a, b):\n    os._exit(0)", "early_exit"),
        ("import os, signal\ndef add(a, b):\n    os.kill(os.getpid(), signal.SIGKILL)", "early_exit"),
        ("class Yes:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\ndef add(a, b):\n    return Yes()", "unsupported_value"),
        ("class Truthy:\n    def __bool__(self):\n        return True\ndef add(a, b):\n    return Truthy()", "unsupported_value"),
        ("import builtins\nbuiltins.abs = lambda x: 5\nbuiltins.AssertionError = SystemExit\n" + WRONG_ADD, "tests_failed"),
    ],
    ids=["os_exit_at_load", "os_exit_after_defs", "raise_systemexit", "exit", "quit", "excepthook", "atexit_os_exit",
         "sys_exit_in_call", "os_exit_in_call", "sigkill_self_in_call", "always_true_eq", "truthy_object", "patched_builtins"],
)  # fmt: skip
def test_gaming_the_verdict_fails(verifier, host, attack, reason):
    """Each of these wrong programs was accepted when program and tests shared one script."""
    v = verifier(sample(attack, ADD))
    assert (v.ok, v.reason) == (False, reason), v


def test_alarm_handler_exiting_mid_test_is_an_early_exit(verifier, host):
    spec = {"kind": "assert", "code": "assert add(2, 3) == 5\nassert add(1, 1) == 2", "time_limit_s": 5}
    for handler in ("os._exit(0)", "sys.exit(0)"):
        code = (f"import os, signal, sys, time\nsignal.signal(signal.SIGALRM, lambda *a: {handler})\nsignal.alarm(1)\n"
                "def add(a, b):\n    time.sleep(3)\n    return a * b")  # fmt: skip
        v = verifier(sample(code, spec))
        assert (v.ok, v.reason) == (False, "early_exit"), v


def test_test_code_that_catches_everything_cannot_hide_an_early_exit(verifier, host):
    spec = {"kind": "assert", "code": "for x in range(3):\n    try:\n        add(x, x)\n    except BaseException:\n        pass\n"}
    assert verifier(sample(HONEST_ADD, spec)).ok
    v = verifier(sample("import os\ndef add(a, b):\n    os._exit(0)", spec))
    assert (v.ok, v.reason) == (False, "early_exit")


def test_reading_the_test_code_finds_nothing(verifier, host):
    """The test code lives only in the harness's sandbox: searching every file, fd and process the
    program can see finds no trace of it, so a program answering from the tests' table fails."""
    marker = "MARKER-7f3a9c"
    spec = {"kind": "assert", "code": f"# {marker}\nassert add(2, 3) == 5\nassert add(40, 2) == 42"}
    code = f"""
import os, re, stat, sys
found, scanned = [], []
def scan(path):
    try:
        if not stat.S_ISREG(os.stat(path).st_mode) and not path.startswith('/proc'):
            return  # a pipe (its own channel) would block
        with open(path, 'rb') as f:
            data = f.read(1 << 22)
        scanned.append(path)
        if b'{marker[:6]}' + b'{marker[6:]}' in data:
            found.append(data.decode(errors='replace'))
    except OSError:
        pass
for root, dirs, files in os.walk('/'):
    if root == '/':
        dirs.remove('proc')
    for name in files:
        scan(os.path.join(root, name))
for pid in [p for p in os.listdir('/proc') if p.isdigit()] + ['self']:
    for name in ('cmdline', 'environ', 'maps'):
        scan('/proc/%s/%s' % (pid, name))
    for fd in os.listdir('/proc/%s/fd' % pid):
        scan('/proc/%s/fd/%s' % (pid, fd))
frame = sys._getframe()
while frame:
    text = repr(frame.f_locals)
    if '{marker[:6]}' + '{marker[6:]}' in text:
        found.append(text)
    frame = frame.f_back
assert len(scanned) > 100, scanned  # the search really ran
TABLE = {{}}
for text in found:  # answer from the tests' own asserts
    for a, b, want in re.findall(r'add\\((\\d+), (\\d+)\\) == (\\d+)', text.replace('\\\\n', '\\n')):
        TABLE[int(a), int(b)] = int(want)
def add(a, b):
    return TABLE.get((a, b))
"""
    v = verifier(sample(code, spec))
    assert (v.ok, v.reason) == (False, "tests_failed"), v


def test_the_harness_is_out_of_the_programs_reach(verifier, host):
    """No signal, ptrace or /proc/<pid>/mem between the two sides: the program sees only its own
    pid namespace and cannot stop the harness from reporting."""
    code = """
import os, signal
mine = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
for pid in range(1, 4096):
    if pid != os.getpid():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
assert len(mine) <= 3, mine
def add(a, b):
    return a * b
"""
    v = verifier(sample(code, ADD))
    assert (v.ok, v.reason) == (False, "tests_failed"), v


def test_no_code_and_bad_specs(verifier):
    assert verifier({"final": "The answer is 5.", "tests": json.dumps(STDIO)}).reason == "no_code"
    assert verifier({"final": solution("print(1)"), "tests": "{"}).reason == "bad_tests"
    assert verifier({"final": solution("print(1)")}).reason == "no_reference"
    assert verifier(sample(HONEST_ADD, {"kind": "assert", "code": "assert add(1, 1) == 2", "prelude": "import no_such_module"})).reason == "bad_tests"
    assert verifier(sample(HONEST_ADD, {"kind": "assert", "code": "assert add(1, 1) == (2"})).reason == "bad_tests"


def test_runtime_error_and_timeout(verifier, host):
    assert verifier(sample("raise SystemExit(3)", STDIO)).reason == "runtime_error"
    spec = {**STDIO, "time_limit_s": 0.5}
    start = time.monotonic()
    v = verifier(sample("import time\ntime.sleep(30)", spec))
    assert v.reason == "tests_timeout"
    assert time.monotonic() - start < 10  # killed, not waited for
    slow = verifier(sample("import time\ndef add(a, b):\n    time.sleep(30)", {**ADD, "time_limit_s": 0.5}))
    assert slow.reason == "tests_timeout"


def test_a_host_without_the_sandbox_runs_nothing():
    """Level none: every code sample is rejected with the probe's finding; nothing is run."""
    from pipeline.verify.sandbox import NONE, Probe

    v = CodeVerifier()
    v.sandbox._probe = Probe(NONE, "bwrap not found (packages bubblewrap, util-linux, libc-bin)")
    for tests, code in ((STDIO, "print(5)"), (ADD, HONEST_ADD)):
        verdict = v(sample(code, tests))
        assert verdict.reason == "verifier_error" and "bwrap not found" in verdict.details["error"]
