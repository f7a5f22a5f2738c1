"""The code sandbox under attack (issue #13): every test checks what the program saw or managed AND
the host afterwards (or during the run): processes, files, SysV IPC objects, listeners, memory,
uids. The probe's isolation level decides only what the host allows; on the CI host (root, cgroup
v1 memory and pids) it is the full "bwrap+seccomp+cgroup" level, which test_probe pins.
"""

from __future__ import annotations

import ast
import errno
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hostcheck import descendants, host, sysv_keys  # noqa: F401  (host is a fixture)
from pipeline.config import REPO_ROOT
from pipeline.verify.code import CodeVerifier
from pipeline.verify.sandbox import CGROUP, RLIMITS, SANDBOX_UID, Limits, Run, Sandbox, Uids, probe, uid_range


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    box = Sandbox()
    assert box.unavailable is None, box.unavailable
    return box


# --- the probe and the uids ---------------------------------------------------------------------


def test_probe(caplog):
    """The level is found once per process and logged once; on a root host with a writable memory
    cgroup (CI's) it is the full level, and runs there hold a uid of their own, never root."""
    from pipeline.verify import sandbox as sb

    sb._probe_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="pipeline.verify.sandbox"):
        first, second = probe(), probe()
    assert first is second
    assert [r.getMessage() for r in caplog.records] == [f"code sandbox: {first.level} ({first.detail})"]
    assert first.level in (CGROUP, RLIMITS), first.detail
    if os.geteuid() == 0 and sb._find_cgroups()[0] is not None:
        assert first.level == CGROUP


def test_runs_hold_their_own_uid_and_are_first_for_the_oom_killer(sandbox, host):
    """Seen from the host during a run: the sandboxed python is not root (as root, a uid from the
    sandbox range), its oom_score_adj is 1000, and it sits in the run's own cgroup."""
    # the program waits (up to 20 s) for the host's SIGUSR1, sent once the host has looked at it
    program = ("import signal, sys, time\nsignal.signal(signal.SIGUSR1, lambda *_: sys.exit(0))\nprint('up', flush=True)\n"
               "time.sleep(20)\nsys.exit(1)")
    result: list = []
    runner = threading.Thread(target=lambda: result.append(sandbox.run(program, limits=Limits(wall_s=30))))
    runner.start()
    deadline = time.monotonic() + 25
    seen = None
    while seen is None and runner.is_alive() and time.monotonic() < deadline:
        for pid in descendants():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"/dev/fd/" not in cmdline or b"bwrap" in cmdline:
                    continue
                status = Path(f"/proc/{pid}/status").read_text()
                caught = int(status.split("\nSigCgt:")[1].split()[0], 16)
                if caught & (1 << (signal.SIGUSR1 - 1)):  # the program itself is running: its handler is set
                    seen = (status, Path(f"/proc/{pid}/oom_score_adj").read_text(), Path(f"/proc/{pid}/cgroup").read_text())
                    os.kill(pid, signal.SIGUSR1)
            except OSError:
                continue
        time.sleep(0.01)
    runner.join()
    assert seen is not None, "the sandboxed python never showed up"
    status, oom, cgroup = seen
    uid = int(status.split("\nUid:")[1].split()[0])
    assert uid != 0 and int(oom) == 1000
    assert "CapEff:\t0000000000000000" in status and "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status
    if os.geteuid() == 0:
        assert uid in uid_range(Path("/proc/self/uid_map").read_text())
    if sandbox.level == CGROUP:
        assert f"distill-sandbox/run-{uid}" in cgroup
    assert result[0].ok


def test_uids_are_allocated_host_wide(tmp_path):
    """Two check actors (here two allocators and another process) never hold the same uid."""
    first = uid_range(Path("/proc/self/uid_map").read_text())[0]
    a, b = Uids(tmp_path), Uids(tmp_path)
    ua, fa = a.acquire()
    ub, fb = b.acquire()
    assert ua != ub
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl, os, sys\nfd = os.open({str(tmp_path / f'{first + 2}.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\nsys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline() == "held\n"
    uc, fc = a.acquire()
    assert uc not in (ua, ub, first + 2)
    Uids.release(fa)
    assert b.acquire()[0] == ua  # freed: the lowest free uid again
    holder.stdin.close()
    holder.wait()
    assert a.acquire()[0] == first + 2  # its holder died: the kernel dropped the lock
    for fd in (fb, fc):
        Uids.release(fd)


def test_uid_range_fits_the_user_namespace():
    """A host or a plain container maps every uid; a `hostUsers: false` pod only 0-65535, where
    setuid to 200000 would fail: runs then take the top of what is mapped, below nobody (65534)."""
    assert uid_range("         0          0 4294967295\n") == range(200_000, 265_536)
    pod = uid_range("         0 1879048192      65536\n")
    assert pod == range(61_438, 65_534) and 65_534 not in pod and 0 not in pod


# --- processes, time and output ------------------------------------------------------------------


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
    # the host fixture asserts no process of the run is left


def test_cpu_spin_is_killed(sandbox, host):
    start = time.monotonic()
    r = sandbox.run("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: pass", limits=Limits(wall_s=1))
    assert r.timed_out
    assert time.monotonic() - start < 2.5


# --- memory --------------------------------------------------------------------------------------


def test_one_huge_allocation_fails_in_the_program(sandbox, host):
    r = sandbox.run("x = bytearray(8 * 1024 ** 3)\nprint(len(x))", limits=Limits(wall_s=5, memory_mb=512))
    assert r.returncode != 0 and b"MemoryError" in r.stderr


def test_memory_is_capped_per_run_not_per_process(sandbox, host):
    """Six children of 150 MB each under a 400 MB run: the run's cgroup stops them (per-process
    limits alone would allow 6 x 400 MB). The OOM kill stays inside the run."""
    if sandbox.level != CGROUP:
        pytest.skip(f"per-run memory needs the cgroup level; this host gives {sandbox.level!r} (test_probe pins CI's)")
    code = """
import os, time
pids = []
for i in range(6):
    pid = os.fork()
    if pid == 0:
        block = bytearray(150 * 1024 * 1024)
        for j in range(0, len(block), 4096):
            block[j] = 1
        print("child", i, "holds 150 MB", flush=True)
        time.sleep(2)
        os._exit(0)
    pids.append(pid)
codes = [os.waitpid(p, 0)[1] for p in pids]
print("statuses", codes)
"""
    r = sandbox.run(code, limits=Limits(wall_s=8, memory_mb=400))
    assert r.memory_exceeded and not r.ok, r
    assert r.stdout.count(b"holds 150 MB") < 6
    v = CodeVerifier(memory_mb=400)(
        {"final": f"```python\n{code}\n```", "tests": json.dumps({"kind": "stdio", "cases": [{"stdout": "x"}], "time_limit_s": 8})})
    assert v.reason == "runtime_error" and "memory limit" in v.details["error"]


# --- files ---------------------------------------------------------------------------------------


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


def test_inode_flood_is_capped(sandbox, host):
    """Empty files cost kernel memory, not bytes: the scratch (/tmp and /dev/shm share it) is
    capped in inodes too. The host's /tmp gets none of them."""
    tag = secrets.token_hex(4)
    code = f"""
n = 0
try:
    for i in range(300000):
        open(("/tmp/" if i % 2 else "/dev/shm/") + "{tag}-%d" % i, "w").close()
        n += 1
except OSError as e:
    print("stopped", n, e.errno)
"""
    r = sandbox.run(code, limits=Limits(wall_s=10, scratch_inodes=500))
    out = r.stdout.split()
    assert out[0] == b"stopped" and 400 < int(out[1]) <= 500 and int(out[2]) == 28, r  # ENOSPC
    assert not any(p.name.startswith(tag) for p in Path("/tmp").iterdir())
    assert not any(p.name.startswith(tag) for p in Path("/dev/shm").iterdir())


def test_host_files_are_invisible_and_untouched(sandbox, host):
    """Not only private files: a 0644 file in the repo, /etc, /root, the pipeline's code and its
    venv do not exist in there; writes land nowhere on the host."""
    base = REPO_ROOT / ".cache" / "sandbox-test"
    base.mkdir(parents=True, exist_ok=True)
    public = base / "public.txt"
    public.write_text("PUBLIC-CONTENT-123")
    public.chmod(0o644)
    open_dir = base / "open"
    open_dir.mkdir(exist_ok=True)
    open_dir.chmod(0o777)
    code = f"""
import os
for path in ({str(public)!r}, "/root/.bashrc", "/etc/passwd", "/etc/hostname", {str(REPO_ROOT / 'pipeline' / 'config.py')!r},
             {sys.prefix + '/pyvenv.cfg'!r}, "/proc/1/root/etc/passwd"):
    try:
        open(path).read()
        print("READ", path)
    except OSError as e:
        print("denied", path, e.errno)
for path in ({str(open_dir / 'pwned')!r}, "/tmp/../../../etc/pwned", "/var/tmp/pwned", "/pwned", "/usr/pwned"):
    try:
        with open(path, "w") as f:
            f.write("x")
        print("WROTE", path)
    except OSError as e:
        print("denied", path, e.errno)
with open("/dev/shm/pwned", "w") as f:
    f.write("its own /dev/shm")
print("WROTE /dev/shm/pwned")
"""
    r = sandbox.run(code, limits=Limits(wall_s=3))
    out = r.stdout.decode()
    assert "READ" not in out and out.count("denied") == 12, out
    assert "WROTE /dev/shm/pwned" in out  # the run's own /dev/shm, on its scratch
    assert not (open_dir / "pwned").exists() and not Path("/etc/pwned").exists() and not Path("/var/tmp/pwned").exists()
    assert not Path("/dev/shm/pwned").exists() and not Path("/pwned").exists()
    assert public.read_text() == "PUBLIC-CONTENT-123"


def test_a_host_input_file_cannot_give_the_answer(host):
    """A stdio program that looks for the expected outputs on disk (the curate input, a credentials
    file) finds nothing, fails, and no byte of those files reaches reject_details."""
    base = REPO_ROOT / ".cache" / "sandbox-test"
    base.mkdir(parents=True, exist_ok=True)
    answers = base / "curate-input.jsonl"
    answers.write_text(json.dumps({"expected": "SECRET-ANSWER-42"}) + "\n")
    answers.chmod(0o644)
    creds = base / "credentials"
    creds.write_text("aws_secret_access_key = HOSTSECRET99\n")
    creds.chmod(0o644)
    code = f"""
import os
found = [os.path.join(d, f) for d, dirs, files in os.walk("/") if not d.startswith("/proc") for f in files if f.endswith(".jsonl")]
for path in [{str(answers)!r}, {str(creds)!r}, "/root/.aws/credentials"] + found:
    try:
        print(open(path).read())
    except OSError as e:
        print("no", e.errno)
"""
    tests = {"kind": "stdio", "cases": [{"stdin": "", "stdout": "SECRET-ANSWER-42"}], "time_limit_s": 5}
    v = CodeVerifier()({"final": f"```python\n{code}\n```", "tests": json.dumps(tests)})
    assert v.reason == "tests_failed"
    assert "SECRET-ANSWER" not in v.details["got"] and "HOSTSECRET" not in json.dumps(v.details)


def test_dev_is_minimal_and_read_only_and_sys_is_absent(sandbox, host):
    code = """
import json, os
print(sorted(os.listdir("/dev")))
print(os.path.exists("/sys"), os.path.exists("/dev/kmsg"), os.path.exists("/dev/mem"))
try:
    open("/dev/newfile", "w")
    print("WROTE /dev")
except OSError as e:
    print("denied", e.errno)
with open("/dev/null", "w") as f:
    f.write("x" * 1000)
with open("/dev/urandom", "rb") as f:
    print(len(f.read(16)))
"""
    r = sandbox.run(code.replace("print(sorted(os.listdir", "print(json.dumps(sorted(os.listdir").replace('"/dev")))', '"/dev"))))'), limits=Limits(wall_s=3))
    lines = r.stdout.decode().splitlines()
    devices = set(json.loads(lines[0])) - {"core", "fd", "ptmx", "pts", "shm", "stderr", "stdin", "stdout"}
    assert devices == {"full", "null", "random", "tty", "urandom", "zero"}, lines[0]
    assert lines[1:] == ["False False False", "denied 30", "16"], lines
    assert not Path("/dev/newfile").exists()


# --- network, sockets, credentials ----------------------------------------------------------------


def test_no_network_no_host_sockets_no_credentials(sandbox, host, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.1)
    port = server.getsockname()[1]
    path = REPO_ROOT / ".cache" / f"sandbox-{secrets.token_hex(4)}.sock"  # outside /tmp, where the old sandbox hid sockets
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(path))
    unix.listen()
    unix.settimeout(0.1)
    abstract_name = f"\0distill-test-{secrets.token_hex(4)}"
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(abstract_name)
    abstract.listen()
    abstract.settimeout(0.1)
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
for name in ({str(path)!r}, {abstract_name!r}):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(name)
        print("CONNECTED unix")
    except OSError as e:
        print("no unix socket", e.errno)
"""
    try:
        r = sandbox.run(code, limits=Limits(wall_s=5))
        out = r.stdout.decode()
        assert "s3cr3t-value" not in out and "AWS_SECRET_ACCESS_KEY" not in out
        assert "CONNECTED" not in out and out.count("no network") == 3 and out.count("no unix socket") == 2, out
        for listener in (server, unix, abstract):
            with pytest.raises(socket.timeout):
                listener.accept()  # nothing reached the host's listeners
    finally:
        for s in (server, unix, abstract):
            s.close()
        path.unlink()


# --- SysV IPC ------------------------------------------------------------------------------------

_IPC = """
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
KEY = {key}
def msgget(flags):
    q = libc.msgget(KEY, flags)
    return q if q >= 0 else -ctypes.get_errno()
"""


def test_sysv_ipc_does_not_outlive_a_run(sandbox, host):
    """A message queue and a shared memory segment made in one run are gone for the next run and
    never appear on the host (the old sandbox shared the host's IPC namespace)."""
    key = 0x5EED0000 + secrets.randbelow(0xFFFF)
    make = _IPC.format(key=key) + """
q = msgget(0o1666)  # IPC_CREAT | 0666
class Msg(ctypes.Structure):
    _fields_ = [("mtype", ctypes.c_long), ("mtext", ctypes.c_char * 32)]
print("queue", q, libc.msgsnd(q, ctypes.byref(Msg(1, b"hello next run")), 32, 0))
print("shm", libc.shmget(KEY + 1, 64 * 1024 * 1024, 0o1666))
"""
    first = sandbox.run(make, limits=Limits(wall_s=5))
    assert first.stdout.split()[1] != b"-" and first.stdout.split()[2] == b"0" and b"shm -" not in first.stdout, first
    assert {key, key + 1}.isdisjoint(sysv_keys())
    second = sandbox.run(_IPC.format(key=key) + "print(msgget(0), -ctypes.get_errno() if libc.shmget(KEY + 1, 0, 0) < 0 else 'FOUND')",
                         limits=Limits(wall_s=5))  # fmt: skip
    assert second.stdout.split() == [b"-2", b"-2"], second  # ENOENT for both
    assert {key, key + 1}.isdisjoint(sysv_keys())


def test_parallel_runs_cannot_talk_over_sysv_ipc(sandbox, host):
    """The seeker looks for the maker's queue every 20 ms for 2.5 s; the maker holds it for 3 s. The
    host's monotonic clock (no time namespace) shows the seeker looked while the queue existed,
    however late either started on a loaded machine, and never found it (ENOENT)."""
    key = 0x5EED0000 + secrets.randbelow(0xFFFF)
    maker = _IPC.format(key=key) + ("made = msgget(0o1666) >= 0\nt = time.monotonic()\ntime.sleep(3)\n"
                                    "print(made, t, time.monotonic())")
    seeker = _IPC.format(key=key) + ("looks, end = [], time.monotonic() + 2.5\nwhile time.monotonic() < end:\n"
                                     "    looks.append((time.monotonic(), msgget(0)))\n    time.sleep(0.02)\n"
                                     "print(repr(looks))")
    made, sought = sandbox.run_group([Run(maker), Run(seeker)], Limits(wall_s=10))
    created, start, stop = made.stdout.split()
    looks = ast.literal_eval(sought.stdout.decode())
    assert created == b"True" and {found for _, found in looks} == {-errno.ENOENT}, (made, sought)
    assert any(float(start) < t < float(stop) for t, _ in looks), "the seeker never looked while the queue existed"
    assert key not in sysv_keys()


# --- the kernel's surface ----------------------------------------------------------------------------


def test_seccomp_denies_namespaces_and_the_large_kernel_surfaces(sandbox, host):
    """No nested user namespace (the old sandbox let a program become root in one), no mounts,
    bpf, keyrings, perf, userfaultfd, io_uring, ptrace, and no socket families but AF_UNIX."""
    code = """
import ctypes, errno, os, socket
libc = ctypes.CDLL(None, use_errno=True)
def call(name, nr, *args):
    rc = libc.syscall(nr, *args)
    print(name, -ctypes.get_errno() if rc < 0 else "ALLOWED")
call("unshare_user", 272, 0x10000000)
call("unshare_ns", 272, 0x00020000)
call("clone3", 435, 0, 0)
call("setns", 308, 0, 0)
call("mount", 165, b"none", b"/tmp", b"tmpfs", 0, 0)
call("bpf", 321, 0, 0, 0)
call("keyctl", 250, 0, 0)
call("perf_event_open", 298, 0, 0, -1, -1, 0)
call("userfaultfd", 323, 0)
call("io_uring_setup", 425, 1, 0)
call("ptrace", 101, 0, 0, 0, 0)
call("process_vm_readv", 310, 1, 0, 0, 0, 0, 0)
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print("fork", "ok")
for family in (socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK, socket.AF_PACKET, 38):
    try:
        socket.socket(family, socket.SOCK_RAW if family == socket.AF_PACKET else socket.SOCK_DGRAM)
        print("socket", family, "ALLOWED")
    except OSError as e:
        print("socket", family, -e.errno)
a, b = socket.socketpair()
print("unix", "ok")
"""
    r = sandbox.run(code, limits=Limits(wall_s=5))
    lines = dict(line.split(" ", 1) for line in r.stdout.decode().splitlines() if not line.startswith("socket"))
    eperm, enosys, eafnosupport = str(-1), str(-38), str(-97)
    assert lines == {"unshare_user": eperm, "unshare_ns": eperm, "clone3": enosys, "setns": eperm, "mount": eperm,
                     "bpf": eperm, "keyctl": eperm, "perf_event_open": eperm, "userfaultfd": eperm,
                     "io_uring_setup": eperm, "ptrace": eperm, "process_vm_readv": eperm, "fork": "ok", "unix": "ok"}, r  # fmt: skip
    sockets = [line.split()[2] for line in r.stdout.decode().splitlines() if line.startswith("socket")]
    assert sockets == [eafnosupport] * 5, r.stdout


def test_user_namespace_via_clone_flags_is_denied(sandbox, host):
    """glibc's clone path: a raw clone(CLONE_NEWUSER) fails too (seccomp checks its flags)."""
    code = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
rc = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)  # clone(CLONE_NEWUSER | SIGCHLD)
print(-ctypes.get_errno() if rc < 0 else ("CHILD" if rc == 0 else "PARENT"))
"""
    r = sandbox.run(code, limits=Limits(wall_s=3))
    assert r.stdout.split() == [b"-1"], r


def test_inside_it_is_an_unprivileged_uid(sandbox, host):
    r = sandbox.run("import os\nprint(os.getuid(), os.getgid(), os.getgroups(), open('/proc/self/oom_score_adj').read().strip())",
                    limits=Limits(wall_s=3))  # fmt: skip
    assert r.stdout.decode().split("\n")[0] == f"{SANDBOX_UID} {SANDBOX_UID} [{SANDBOX_UID}] 1000" or \
        r.stdout.decode().startswith(f"{SANDBOX_UID} {SANDBOX_UID} [] 1000"), r


# --- concurrency ----------------------------------------------------------------------------------


def test_runs_in_parallel(sandbox):
    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: sandbox.run("import time\ntime.sleep(1)", limits=Limits(wall_s=3)), range(4)))
    assert all(r.ok for r in results)
    assert time.monotonic() - start < 2.8  # four 1 s sleeps overlap


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

    stdio = {"kind": "stdio", "cases": [{"stdin": "2 3\n", "stdout": "5\n"}], "time_limit_s": 2}
    checker = Checker(load_job(None, filters=[], verify={"workers": 4}))
    slow_ok = "import time\ntime.sleep(0.8)\na, b = map(int, input().split())\nprint(a + b)"
    rows = [{"id": "p", "domain": "code", "final": f"```python\n{c}\n```", "tests": json.dumps(stdio)} for c in [slow_ok] * 4 + ["print(0)"]]
    rows.append({"id": "m", "domain": "math", "answer": "4", "final": "\\boxed{4}"})
    rows = [{**checker.parse({**r, "completion": r["final"], "finish_reason": "stop"}), "final": r["final"]} for r in rows]
    checker(rows[-2:])  # probe the sandbox and start the math worker pool outside the timing
    start = time.monotonic()
    verdicts = checker(rows)
    elapsed = time.monotonic() - start
    checker.close()
    assert [v.reason for v in verdicts] == [None, None, None, None, "tests_failed", None]
    assert elapsed < 2.8  # four 0.8 s programs overlapped
