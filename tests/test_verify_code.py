"""Code verification: output comparison, block extraction, test specs, and the sandbox under attack.

Every attack test checks the host, not only the verdict: the pipeline's own process and a
sentinel process live on, no process of a sandbox uid survives the run, files outside the
scratch directory are neither read nor written, and nothing reaches a server on the host.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT
from pipeline.verify.code import CodeVerifier, last_python_block, parse_tests, same_output
from pipeline.verify.sandbox import Limits, Sandbox


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    box = Sandbox(slots=4)
    assert box.unavailable is None, box.unavailable
    return box


@pytest.fixture(scope="module")
def verifier() -> CodeVerifier:
    return CodeVerifier(slots=4)


def leftover_processes() -> list[int]:
    """Processes of any sandbox uid still alive on the host."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            uid = int((entry / "status").read_text().split("\nUid:")[1].split()[0])
        except (OSError, IndexError, ValueError):
            continue
        if uid >= 200_000:
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def host():
    """A sentinel process, checked alive (and no sandbox process left) after each attack."""
    sentinel = subprocess.Popen(["sleep", "300"])
    yield sentinel
    assert sentinel.poll() is None, "the sandboxed program killed a host process"
    sentinel.kill()
    sentinel.wait()
    deadline = time.monotonic() + 2
    while leftover_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftover_processes() == [], "a sandboxed process outlived its run"


def solution(code: str) -> str:
    return f"Here is my solution.\n\n```python\n{code}\n```\n"


def sample(code: str, tests: dict) -> dict:
    return {"id": "p", "domain": "code", "final": solution(code), "tests": json.dumps(tests)}


STDIO = {"kind": "stdio", "cases": [{"stdin": "2 3\n", "stdout": "5\n"}, {"stdin": "10 -4\n", "stdout": "6"}], "time_limit_s": 2}


# --- output comparison --------------------------------------------------------------------


@pytest.mark.parametrize(
    "want,got",
    [
        ("5\n", "5"),
        ("1 2 3\n", "1 2 3   \n\n"),
        ("a\nb\n", "a\r\nb\r\n"),
        ("0.5\n", "0.50000\n"),
        ("1e-5\n", "0.00001\n"),
        ("123456789012345678901234567890\n", "123456789012345678901234567890"),
        ("YES\n", "YES"),
        ("3\n", "3.0\n"),
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
    ],
)
def test_outputs_that_differ(want, got):
    assert not same_output(want, got)


def test_tolerance_applies_to_floats_not_integers():
    assert same_output("0.333333\n", "0.3333333333\n", tolerance=1e-6)
    assert not same_output("0.3333\n", "0.3334\n", tolerance=1e-6)
    assert same_output("1000000.0\n", "1000000.5\n", tolerance=1e-6)  # relative error
    assert not same_output("1000000\n", "1000001\n", tolerance=1e-6)  # integers stay exact


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
    for bad in ['{"kind": "stdio", "cases": []}', '{"kind": "exec"}', "[1]", "{oops", '{"kind": "assert"}',
                '{"kind": "assert", "code": "", "time_limt_s": 1}']:
        with pytest.raises(ValueError):
            parse_tests(bad)


def test_test_spec_schema_file_is_current():
    from pipeline.verify.code import tests_json_schema

    committed = json.loads((REPO_ROOT / "schemas" / "code_tests.schema.json").read_text())
    assert committed == tests_json_schema()


# --- verdicts -------------------------------------------------------------------------------


def test_correct_stdio_program_passes(verifier):
    v = verifier(sample("a, b = map(int, input().split())\nprint(a + b)", STDIO))
    assert v.ok, v
    assert v.details["cases"] == 2


def test_wrong_output_names_the_case(verifier):
    v = verifier(sample("a, b = map(int, input().split())\nprint(a + b if a < 5 else a - b + 1)", STDIO))
    assert (v.ok, v.reason, v.details["case"]) == (False, "tests_failed", 1)
    assert v.details["expected"] == "6" and v.details["got"].strip() == "15"


def test_assert_tests(verifier):
    spec = {"kind": "assert", "code": "assert add(2, 3) == 5\nassert add(-1, 1) == 0", "time_limit_s": 5}
    assert verifier(sample("def add(a, b):\n    return a + b", spec)).ok
    bad = verifier(sample("def add(a, b):\n    return a * b", spec))
    assert (bad.ok, bad.reason) == (False, "tests_failed")
    crash = verifier(sample("def add(a, b):\n    return a + undefined", spec))
    assert crash.reason == "runtime_error" and "NameError" in crash.details["stderr"]


def test_no_code_and_bad_specs(verifier):
    assert verifier({"final": "The answer is 5.", "tests": json.dumps(STDIO)}).reason == "no_code"
    assert verifier({"final": solution("print(1)"), "tests": "{"}).reason == "bad_tests"
    assert verifier({"final": solution("print(1)")}).reason == "no_reference"


def test_runtime_error_and_timeout(verifier):
    assert verifier(sample("raise SystemExit(3)", STDIO)).reason == "runtime_error"
    spec = {**STDIO, "time_limit_s": 0.5}
    start = time.monotonic()
    v = verifier(sample("import time\ntime.sleep(30)", spec))
    assert v.reason == "tests_timeout"
    assert time.monotonic() - start < 3


# --- the sandbox under attack -----------------------------------------------------------------


def test_kills_its_parent_and_everything_it_can(sandbox, host):
    code = f"""
import os, signal
for pid in (os.getppid(), 1, {os.getpid()}, {host.pid}):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError as e:
        print(pid, type(e).__name__)
try:
    os.kill(-1, signal.SIGKILL)
except OSError:
    pass
"""
    r = sandbox.run(code, limits=Limits(wall_s=2))
    assert not r.timed_out
    assert f"{os.getpid()} ProcessLookupError".encode() in r.stdout  # the host's pids don't exist in there


def test_output_flood_is_cut(sandbox, host):
    start = time.monotonic()
    r = sandbox.run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", limits=Limits(wall_s=5, output_bytes=1 << 20))
    assert r.output_exceeded and not r.ok
    assert len(r.stdout) <= 1 << 20
    assert time.monotonic() - start < 3


def test_fork_bomb_is_contained(sandbox, host):
    code = """
import os, time
n = 0
for _ in range(10000):
    try:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
    except OSError:
        break
print(n)
"""
    r = sandbox.run(code, limits=Limits(wall_s=3, processes=16))
    assert int(r.stdout.split()[-1]) < 16


def test_orphans_and_daemons_do_not_survive(sandbox, host):
    code = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(120)
    os._exit(0)
print("parent leaves")
"""
    r = sandbox.run(code, limits=Limits(wall_s=2))
    assert r.ok and b"parent leaves" in r.stdout
    # the host fixture asserts no process of a sandbox uid is left


def test_memory_hog_is_stopped(sandbox, host):
    r = sandbox.run("x = bytearray(8 * 1024 ** 3)\nprint(len(x))", limits=Limits(wall_s=5, memory_mb=512))
    assert r.returncode != 0 and b"MemoryError" in r.stderr


def test_cpu_spin_is_killed(sandbox, host):
    start = time.monotonic()
    r = sandbox.run("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: pass", limits=Limits(wall_s=1))
    assert r.timed_out
    assert time.monotonic() - start < 2.5


def test_disk_fill_stays_in_scratch(sandbox, host):
    free_before = os.statvfs("/").f_bavail
    code = """
import os
written = 0
try:
    with open("fill", "wb") as f:
        while True:
            f.write(b"x" * (1 << 20))
            written += 1
except OSError as e:
    print("stopped", written, type(e).__name__)
"""
    r = sandbox.run(code, limits=Limits(wall_s=5, file_mb=1024, scratch_mb=32))
    assert b"stopped" in r.stdout
    assert int(r.stdout.split()[1]) <= 32
    assert os.statvfs("/").f_bavail >= free_before - 1024  # within 4 MB: nothing landed on the host disk


def test_host_files_neither_readable_when_private_nor_writable(sandbox, host, tmp_path_factory):
    base = Path(REPO_ROOT / ".cache" / "sandbox-test")  # not under /tmp, which the sandbox hides
    base.mkdir(parents=True, exist_ok=True)
    secret = base / "secret.txt"
    secret.write_text("TOKEN-123")
    secret.chmod(0o600)
    open_dir = base / "open"
    open_dir.mkdir(exist_ok=True)
    open_dir.chmod(0o777)  # even a world-writable host folder must stay untouched
    code = f"""
import os
for path in ({str(secret)!r}, "/root/.bashrc", "/etc/shadow"):
    try:
        open(path).read()
        print("READ", path)
    except OSError as e:
        print("denied", path, type(e).__name__)
for path in ({str(open_dir / 'pwned')!r}, "/tmp/../../../etc/pwned", "../../pwned", "/dev/shm/pwned", "/var/tmp/pwned"):
    try:
        with open(path, "w") as f:
            f.write("x")
        print("WROTE", path)
    except OSError as e:
        print("denied", path, type(e).__name__)
"""
    r = sandbox.run(code, limits=Limits(wall_s=3))
    out = r.stdout.decode()
    assert "READ" not in out, out
    assert not (open_dir / "pwned").exists() and not Path("/etc/pwned").exists()
    assert not Path("/var/tmp/pwned").exists() and not Path("/dev/shm/pwned").exists()
    assert "WROTE /dev/shm" in out or "denied /dev/shm" in out  # its own /dev/shm, not the host's
    assert secret.read_text() == "TOKEN-123"


def test_no_network_and_no_credentials(sandbox, host, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.1)
    port = server.getsockname()[1]
    code = f"""
import os, socket, glob
print(sorted(os.environ))
for p in glob.glob("/proc/*/environ"):
    try:
        print(open(p, "rb").read())
    except OSError:
        pass
for host in ("127.0.0.1", "10.0.0.1", "pypi.org"):
    try:
        socket.create_connection((host, {port} if host == "127.0.0.1" else 443), timeout=1)
        print("CONNECTED", host)
    except OSError as e:
        print("no network", host, type(e).__name__)
"""
    r = sandbox.run(code, limits=Limits(wall_s=5))
    out = r.stdout.decode()
    assert "s3cr3t-value" not in out and "AWS_SECRET_ACCESS_KEY" not in out
    assert "CONNECTED" not in out and out.count("no network") == 3, out
    with pytest.raises(socket.timeout):
        server.accept()  # nothing reached the host's server
    server.close()


def test_runs_in_parallel(sandbox):
    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: sandbox.run("import time\ntime.sleep(1)", limits=Limits(wall_s=3)), range(4)))
    assert all(r.ok for r in results)
    assert time.monotonic() - start < 2.5  # four 1 s sleeps overlap


def test_the_pipeline_thread_is_unaffected(sandbox):
    """A run does not block the caller's other threads (the check stage keeps going)."""
    ticks = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.05)

    t = threading.Thread(target=tick)
    t.start()
    sandbox.run("while True: pass", limits=Limits(wall_s=1))
    stop.set()
    t.join()
    assert len(ticks) >= 15


def test_check_stage_runs_code_samples_in_parallel():
    """The path `generate` and `curate` share: Checker routes code samples to the sandbox, `workers` at a time."""
    from pipeline.check import Checker
    from pipeline.config import load_job

    checker = Checker(load_job(None, filters=[], verify={"workers": 4}))
    slow_ok = "import time\ntime.sleep(0.8)\na, b = map(int, input().split())\nprint(a + b)"
    rows = [sample(slow_ok, {**STDIO, "cases": STDIO["cases"][:1]}) for _ in range(4)]
    rows.append(sample("print(0)", STDIO))
    rows.append({"id": "m", "domain": "math", "answer": "4", "final": "\\boxed{4}"})
    rows = [{**checker.parse({**r, "completion": r["final"], "finish_reason": "stop"}), "final": r["final"]} for r in rows]
    start = time.monotonic()
    verdicts = checker(rows)
    elapsed = time.monotonic() - start
    checker.close()
    assert [v.reason for v in verdicts] == [None, None, None, None, "tests_failed", None]
    assert elapsed < 2.5  # four 0.8 s programs overlapped
