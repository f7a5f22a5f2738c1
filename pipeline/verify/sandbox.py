"""Run untrusted Python (generated solutions) so that it sees and reaches nothing of the host.

Isolation is bubblewrap (`bwrap`, Debian's `bubblewrap`) in an *unprivileged* user namespace:
no CAP_SYS_ADMIN, no setuid helper, so it works in a plain container (see
docs/verification-code.md for the pod settings). One run is this chain of execs, every link a
well-kept tool:

    sh        host side: oom_score_adj 1000 (the OOM killer takes a sandboxed process before the
              pipeline or vLLM), joins the run's memory cgroup (a cap for the whole run)
    setpriv   when the pipeline is root: drop to a uid allocated host-wide for this run
    unshare   a user + mount namespace of our own (uid 0 there, no privilege on the host) ...
    sh        ... where a tmpfs capped in bytes *and* inodes is mounted for the scratch dir
              (bwrap 0.8 can cap a tmpfs's size but not its inodes)
    bwrap     new user/pid/net/ipc/uts/cgroup/mount namespaces; an empty read-only root holding
              only the interpreter, its stdlib (no site-packages) and the shared libraries they
              load; its own /proc, a minimal read-only /dev (null zero full random urandom tty),
              no /sys; /tmp and /dev/shm on the capped scratch; uid 1000 without capabilities;
              the seccomp filter of `pipeline.verify.seccomp`; no further user namespaces;
              environment cleared; killed with its parent
    python -I -S -B   the boot script below: rlimits (address space, processes, CPU seconds,
              file size, open files, no core), then the program as `__main__`

`probe()` finds out once per process which level this host allows and logs it:
"bwrap+seccomp+cgroup", "bwrap+seccomp (rlimits)" (no writable cgroup: memory is capped per
process and processes per run, so a run holds at most processes x memory), or "none", when
nothing runs at all: code is never run unconfined.

The host enforces the wall clock: at the deadline it kills bwrap, whose pid-1 child dies with it,
and the kernel then kills every process of the run's pid namespace; the cgroup, when there is one,
is killed and removed as well.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from pipeline.verify.seccomp import SeccompUnavailable, bpf_program

log = logging.getLogger(__name__)

CGROUP, RLIMITS, NONE = "bwrap+seccomp+cgroup", "bwrap+seccomp (rlimits)", "none"
SANDBOX_UID = 1000  # the program's uid inside its user namespace
UID_LOCKS = Path("/run/distill-sandbox")
STARTUP_S = 0.5  # allowed on top of the wall limit for building the sandbox and starting Python

_BOOT = r"""
import os, resource, sys
cpu, memory, nproc, fsize, program_fd = map(int, sys.argv[1:6])
for res, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory), (resource.RLIMIT_NPROC, nproc),
                   (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NOFILE, 256), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(res, (value, value))
with open(program_fd, "rb") as f, open("/tmp/main.py", "wb") as copy:
    source = f.read()
    copy.write(source)  # tracebacks quote the program's lines from here
import builtins, _sitebuiltins
builtins.exit, builtins.quit = _sitebuiltins.Quitter("exit", "Ctrl-D"), _sitebuiltins.Quitter("quit", "Ctrl-D")
sys.argv = ["/tmp/main.py"]
code = compile(source, "/tmp/main.py", "exec")
main = type(sys)("__main__")
main.__file__ = "/tmp/main.py"
sys.modules["__main__"] = main
del os, resource, builtins, _sitebuiltins, f, copy, source, res, value
try:
    exec(code, main.__dict__)
except SystemExit:
    raise
except BaseException as e:  # the traceback starts at the program's own frame
    e = e.with_traceback(e.__traceback__.tb_next)
    sys.excepthook(type(e), e, e.__traceback__)
    sys.exit(1)
"""
_OUTER = (
    'echo 1000 > /proc/self/oom_score_adj || exit 121; '
    'if [ -n "$1" ]; then echo $$ > "$1" || exit 121; fi; shift; exec "$@"'
)
_INNER = (
    'mount -t tmpfs -o "size=$1,nr_inodes=$2,mode=1777,nosuid,nodev" sandbox-scratch /tmp || exit 121; '
    'shift 2; exec "$@"'
)
# ^ in the run's own mount namespace: the host's /tmp is untouched; bwrap shows it as /tmp and /dev/shm
_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


@dataclass(frozen=True)
class Limits:
    """What one run may use. `memory_mb` caps the run as a whole where a cgroup is available and
    each process's address space always; `cpu_s` defaults to the wall limit rounded up, plus one."""

    wall_s: float = 2.0
    cpu_s: int | None = None
    memory_mb: int = 1024
    processes: int = 32
    file_mb: int = 16
    scratch_mb: int = 64
    scratch_inodes: int = 4096
    output_bytes: int = 1 << 20


@dataclass(frozen=True)
class Result:
    """How a run ended. `returncode` is bwrap's: the program's exit code, or 128 + a signal that
    killed it; negative when the host killed the run (deadline, output cap, its group ended)."""

    returncode: int
    stdout: bytes
    stderr: bytes
    wall_s: float
    timed_out: bool
    output_exceeded: bool
    memory_exceeded: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not (self.timed_out or self.output_exceeded or self.memory_exceeded)


@dataclass(frozen=True)
class Run:
    """One sandboxed process of a group: its program, stdin, and host fds it inherits (same numbers)."""

    program: str
    stdin: bytes = b""
    fds: tuple[int, ...] = ()


class SandboxUnavailable(RuntimeError):
    """This host cannot build the sandbox: code is never run unconfined."""


@dataclass(frozen=True)
class Probe:
    """What this host allows, found once per process: the level and the pieces it uses."""

    level: str
    detail: str
    python: str = ""
    binds: tuple[str, ...] = ()
    cgroups: "Cgroups | None" = None


# --- the interpreter the sandbox shows --------------------------------------------------------


def _world_readable(path: str) -> bool:
    """Every uid can reach and run `path` (a venv under a 0700 /root is not such a path)."""
    p = Path(path)
    try:
        if not p.stat().st_mode & stat.S_IXOTH:
            return False
        return all(d.stat().st_mode & stat.S_IXOTH for d in p.parents)
    except OSError:
        return False


def _interpreter(python: str | None) -> str:
    """The interpreter to show: the given one, else the pipeline's own base interpreter (not the
    venv: no site-packages), else a system python3 when the pipeline's lies under a private dir."""
    if python:
        return os.path.realpath(python)
    own = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    if os.geteuid() != 0 or _world_readable(own):  # not root: the run keeps the pipeline's uid
        return own
    for path in ("/usr/local/bin/python3", "/usr/bin/python3"):
        if _world_readable(os.path.realpath(path)):
            return os.path.realpath(path)
    raise SandboxUnavailable(f"{own} is not readable by other uids and no system python3 is")


_LAYOUT = (
    "import json, sys, sysconfig; "
    "print(json.dumps([sysconfig.get_path('stdlib'), sysconfig.get_path('platstdlib'), sys.version.split()[0]]))"
)


UNUSED_EXTENSIONS = frozenset({"nis", "readline", "_curses", "_curses_panel", "_dbm", "_gdbm", "_tkinter"})
"""Stdlib extension modules whose libraries are not shown (a terminal, NIS, Berkeley DB, Tk mean
nothing in a sandbox; `nis` alone pulls in nine Kerberos/RPC libraries): importing them fails."""


def _bind_args(python: str) -> tuple[str, ...]:
    """bwrap arguments that show the interpreter, its stdlib (site-packages masked) and exactly the
    shared libraries the interpreter and its extension modules load (from `ldd`)."""
    out = subprocess.run([python, "-I", "-S", "-c", _LAYOUT], capture_output=True, text=True, timeout=30, check=True)
    stdlib, platstdlib, _ = json.loads(out.stdout)
    dirs = sorted({os.path.realpath(stdlib), os.path.realpath(platstdlib)})
    extensions = [str(p) for d in dirs for p in Path(d, "lib-dynload").glob("*.so")
                  if p.name.split(".")[0] not in UNUSED_EXTENSIONS]
    ldd = subprocess.run(["ldd", python, *extensions], capture_output=True, text=True, timeout=60)
    libs = set()
    for line in ldd.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "=>":  # libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)
            path = parts[2]
        else:  # /lib64/ld-linux-x86-64.so.2 (0x...), or a file's "/path/module.so:" header
            path = parts[0] if parts else ""
        if path.startswith("/") and not path.endswith(":"):
            libs.add(path)
    args = ["--ro-bind", python, python]
    for lib in sorted(libs):
        args += ["--ro-bind", os.path.realpath(lib), lib]
    for d in dirs:
        args += ["--ro-bind", d, d]
        for masked in ("site-packages", "dist-packages"):
            if Path(d, masked).is_dir():
                args += ["--tmpfs", f"{d}/{masked}", "--remount-ro", f"{d}/{masked}"]
    return tuple(args)


# --- host-wide uids -------------------------------------------------------------------------------


def uid_range(uid_map: str) -> range:
    """The uids runs get when the pipeline is root: 200000 on, where this user namespace maps them
    (a host, a plain container); else the top 4096 uids it maps below the overflow uid 65534 (a
    `hostUsers: false` pod maps only 0-65535)."""
    top = max(int(inside) + int(count) for inside, _, count in (line.split() for line in uid_map.splitlines()))
    return range(200_000, 265_536) if top >= 265_536 else range(max(1000, min(top, 65_534) - 4096), min(top, 65_534))


class Uids:
    """Host-wide uid allocation for root pipelines: uid n is taken while a process holds an
    exclusive flock on UID_LOCKS/n.lock, so two check actors on one host never share a uid (the
    kernel frees the lock if the holder dies). Lowest free uid first: few lock files."""

    def __init__(self, directory: Path = UID_LOCKS, uids: range | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.uids = uids or uid_range(Path("/proc/self/uid_map").read_text())
        self._lock = threading.Lock()

    def acquire(self) -> tuple[int, int]:
        """(uid, lock fd); release with `release(fd)`."""
        with self._lock:  # flock is per open file: threads of one process must not race for one uid
            for uid in self.uids:
                fd = os.open(self.dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return uid, fd
                except BlockingIOError:
                    os.close(fd)
        raise SandboxUnavailable(f"all {len(self.uids)} sandbox uids are in use")

    @staticmethod
    def release(fd: int) -> None:
        os.close(fd)


# --- per-run cgroups ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cgroups:
    """Where per-run memory cgroups go: a cgroup v2 directory with the memory controller, or the v1
    memory hierarchy (this machine's kind of host); `v2` tells which files to write. Processes need
    no cgroup: RLIMIT_NPROC already counts per run, because every run has a user namespace of its
    own (and joining a second v1 hierarchy would cost a second RCU grace period per run)."""

    v2: bool
    base: Path

    def create(self, name: str, limits: Limits) -> "RunCgroup":
        d = self.base / name
        if d.exists():
            _remove_cgroup(d)  # left by a killed pipeline process that held the same uid
        d.mkdir()
        memory = str(limits.memory_mb * 1024 * 1024)
        if self.v2:
            _write(d / "memory.max", memory)
            _write(d / "memory.swap.max", "0", optional=True)
        else:
            _write(d / "memory.limit_in_bytes", memory)
            _write(d / "memory.memsw.limit_in_bytes", memory, optional=True)  # no swap either
        return RunCgroup(self.v2, d)


@dataclass(frozen=True)
class RunCgroup:
    v2: bool
    dir: Path

    @property
    def procs(self) -> str:
        return str(self.dir / "cgroup.procs")

    def oom_kills(self) -> int:
        """Processes the kernel killed for the run's memory cap."""
        text = (self.dir / ("memory.events" if self.v2 else "memory.oom_control")).read_text()
        return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("oom_kill ")), 0)

    def remove(self) -> None:
        _remove_cgroup(self.dir)


def _write(path: Path, value: str, optional: bool = False) -> None:
    try:
        path.write_text(value)
    except FileNotFoundError:
        if not optional:
            raise


def _remove_cgroup(d: Path) -> None:
    """Kill what is left in the cgroup, then remove it (rmdir fails while a task remains)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
        time.sleep(0.001)  # killed tasks take a moment to leave


def _own_cgroup_dirs() -> tuple[dict[str, Path], Path | None, bool]:
    """This process's cgroup directory per v1 controller, its v2 directory, and whether that is
    the v2 hierarchy's root."""
    mounts: dict[str, tuple[str, Path]] = {}
    v2_mount: tuple[str, Path] | None = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if rfields[0] == "cgroup2":
            v2_mount = (fields[3], Path(fields[4]))
        elif rfields[0] == "cgroup":
            for opt in rfields[2].split(","):
                mounts.setdefault(opt, (fields[3], Path(fields[4])))
    v1: dict[str, Path] = {}
    v2, v2_root = None, False
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "" and v2_mount:
            rel = os.path.relpath(path, v2_mount[0])
            v2, v2_root = (v2_mount[1] / rel).resolve(), rel == "."
        for c in controllers.split(","):
            if c in mounts:
                v1[c] = mounts[c][1] / os.path.relpath(path, mounts[c][0])
    return v1, v2, v2_root


def _find_cgroups() -> tuple[Cgroups | None, str]:
    """A place for per-run memory cgroups, or None and why not. Needs root (or a delegated,
    writable hierarchy): v2 with memory enabled for a `distill-sandbox` child of our cgroup's parent
    (of our own cgroup, if it is the root: a non-root cgroup with processes cannot have children
    with controllers), else the v1 memory hierarchy below our own cgroup."""
    if os.geteuid() != 0:
        return None, "not root: per-run cgroups need a writable cgroup hierarchy"
    v1, v2, v2_root = _own_cgroup_dirs()
    try:
        if v2 and "memory" in (v2 / "cgroup.controllers").read_text().split():
            parent = v2 if v2_root else v2.parent
            _write(parent / "cgroup.subtree_control", "+memory")
            base = parent / "distill-sandbox"
            base.mkdir(exist_ok=True)
            _write(base / "cgroup.subtree_control", "+memory")
            return Cgroups(True, base), f"cgroup v2 {base}"
        if "memory" in v1:
            base = v1["memory"] / "distill-sandbox"
            base.mkdir(exist_ok=True)
            return Cgroups(False, base), f"cgroup v1 {base}"
    except OSError as e:
        return None, f"cannot create cgroups: {e}"
    return None, "no cgroup hierarchy with the memory controller"


# --- the probe --------------------------------------------------------------------------------


_PROBING = threading.Lock()


def probe(python: str | None = None) -> Probe:
    """The isolation level this host allows (found once per process and interpreter, logged)."""
    with _PROBING:  # check threads start together: one probe, one log line
        return _probe_once(python)


@cache
def _probe_once(python: str | None) -> Probe:
    result = _probe(python)
    (log.warning if result.level == NONE else log.info)("code sandbox: %s (%s)", result.level, result.detail)
    return result


def _probe(python: str | None) -> Probe:
    for tool in ("bwrap", "unshare", "mount", "sh", "ldd") + (("setpriv",) if os.geteuid() == 0 else ()):
        if not shutil.which(tool):
            return Probe(NONE, f"{tool} not found (packages bubblewrap, util-linux, libc-bin)")
    try:
        bpf_program()
        interpreter = _interpreter(python)
        binds = _bind_args(interpreter)
    except (SeccompUnavailable, SandboxUnavailable, OSError, subprocess.SubprocessError, ValueError) as e:
        return Probe(NONE, str(e))
    cgroups, cg_detail = _find_cgroups()
    tried = []
    for cg in ([cgroups] if cgroups else []) + [None]:
        candidate = Probe(CGROUP if cg else RLIMITS, cg_detail, interpreter, binds, cg)
        failure = _self_test(candidate)
        if failure is None:
            return candidate
        tried.append(failure)
    return Probe(NONE, "; ".join(tried))


_SELF_TEST = """
import os
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
assert os.getuid() == os.geteuid() == %d, os.getuid()
assert status["CapEff"].strip() == "0" * 16, status["CapEff"]
assert status["Seccomp"].strip() == "2" and status["NoNewPrivs"].strip() == "1"
for hidden in ("/sys", "/etc", %r):
    assert not os.path.exists(hidden), hidden
print("sandbox ok")
"""


def _self_test(candidate: Probe) -> str | None:
    """Why a tiny program does not run as expected at this level, or None."""
    here = str(Path(__file__).resolve().parent)  # the pipeline's own code
    try:
        r = Sandbox(candidate)._run_group([Run(_SELF_TEST % (SANDBOX_UID, here))], Limits(wall_s=20))[0]
    except OSError as e:
        return f"{candidate.level}: cannot start: {e}"
    if r.returncode != 0 or b"sandbox ok" not in r.stdout:
        return f"{candidate.level}: self-test failed (exit {r.returncode}): {r.stderr.decode(errors='replace')[-300:]}"
    return None


# --- running ----------------------------------------------------------------------------------------


@dataclass
class _Box:
    """One started sandbox: its process and what to release after it."""

    proc: subprocess.Popen
    uid_fd: int | None = None
    cgroup: RunCgroup | None = None
    out: list[bytes] = field(default_factory=list)
    err: list[bytes] = field(default_factory=list)
    exceeded: bool = False


class Sandbox:
    """Thread-safe runner; every run gets its own namespaces, uid (root pipelines) and cgroup."""

    def __init__(self, probed: Probe | None = None, python: str | None = None) -> None:
        self._probe = probed  # None: probe this host at first use
        self._python = python
        self._uids: Uids | None = None

    @property
    def probe(self) -> Probe:
        if self._probe is None:
            self._probe = probe(self._python)
        return self._probe

    @property
    def level(self) -> str:
        return self.probe.level

    @property
    def python(self) -> str:
        return self.probe.python

    @property
    def unavailable(self) -> str | None:
        """Why runs cannot be confined here, or None."""
        return self.probe.detail if self.level == NONE else None

    def run(self, source: str, stdin: bytes = b"", limits: Limits = Limits()) -> Result:
        """Run `source` as a Python program; raises SandboxUnavailable, never runs it unconfined."""
        return self.run_group([Run(source, stdin)], limits)[0]

    def run_group(self, runs: list[Run], limits: Limits, primary: int | None = None) -> list[Result]:
        """Start every run at once (each in its own sandbox, under its own uid and cgroup), wait
        until all have ended (or only run `primary`), or the wall limit passes, then kill whatever
        is left. The runs' fds are closed here once the sandboxes hold them."""
        if self.unavailable:
            for run in runs:
                for fd in run.fds:
                    os.close(fd)
            raise SandboxUnavailable(self.unavailable)
        return self._run_group(runs, limits, primary)

    def _run_group(self, runs: list[Run], limits: Limits, primary: int | None = None) -> list[Result]:
        boxes: list[_Box] = []
        try:
            try:
                for run in runs:
                    boxes.append(self._start(run, limits))
            finally:
                for run in runs:
                    for fd in run.fds:
                        os.close(fd)  # only the sandboxes hold them now: a side that dies shows as EOF
            start = time.monotonic()
            feeders = [threading.Thread(target=_feed, args=(b.proc.stdin, r.stdin), daemon=True)
                       for b, r in zip(boxes, runs)]
            for t in feeders:
                t.start()
            deadline = start + limits.wall_s + STARTUP_S
            timed_out = _collect(boxes, deadline, limits.output_bytes, None if primary is None else boxes[primary])
            wall = time.monotonic() - start
            for b in reversed(boxes) if primary is None else [boxes[primary], *boxes]:
                _kill(b.proc)  # the primary first: it must not see the others die
            for t in feeders:
                t.join(timeout=1.0)
            return [self._result(b, wall, timed_out, limits) for b in boxes]
        finally:
            for b in boxes:
                self._release(b)

    def _start(self, run: Run, limits: Limits) -> _Box:
        p = self.probe
        box = _Box(proc=None)  # type: ignore[arg-type]
        try:
            drop: list[str] = []
            if os.geteuid() == 0:  # a uid of the run's own; cgroups are only found for root (_find_cgroups)
                if self._uids is None:
                    self._uids = Uids()
                uid, box.uid_fd = self._uids.acquire()
                drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
                if p.cgroups:
                    box.cgroup = p.cgroups.create(f"run-{uid}", limits)
            boot, program = _memfd("boot", _BOOT.encode()), _memfd("program", run.program.encode())
            seccomp = _memfd("seccomp", bpf_program())
            try:
                cpu = limits.cpu_s or math.ceil(limits.wall_s) + 1
                mb = 1024 * 1024
                argv = [
                    "sh", "-c", _OUTER, "sandbox", box.cgroup.procs if box.cgroup else "", *drop,
                    "unshare", "--user", "--map-root-user", "--mount", "--",
                    "sh", "-c", _INNER, "sandbox", str(limits.scratch_mb * mb), str(limits.scratch_inodes),
                    "bwrap", "--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                    "--unshare-cgroup", "--die-with-parent", "--new-session", "--clearenv",
                    "--setenv", "LANG", "C.UTF-8", "--setenv", "HOME", "/tmp", "--setenv", "PATH", "/usr/bin:/bin",
                    "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
                    *p.binds, "--proc", "/proc", "--dev", "/dev",
                    "--bind", "/tmp", "/tmp", "--bind", "/tmp", "/dev/shm",
                    "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp",
                    "--disable-userns", "--seccomp", str(seccomp), "--",
                    p.python, "-I", "-S", "-B", f"/dev/fd/{boot}",
                    str(cpu), str(limits.memory_mb * mb), str(limits.processes), str(limits.file_mb * mb), str(program),
                ]  # fmt: skip
                box.proc = subprocess.Popen(
                    argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    pass_fds=(boot, program, seccomp, *run.fds), env=_ENV, start_new_session=True,
                )  # fmt: skip
            finally:
                for fd in (boot, program, seccomp):
                    os.close(fd)
        except BaseException:
            self._release(box)
            raise
        return box

    def _result(self, box: _Box, wall: float, killed_at_deadline: bool, limits: Limits) -> Result:
        rc = box.proc.returncode
        oom = bool(box.cgroup and box.cgroup.oom_kills())
        timed_out = killed_at_deadline or rc == 128 + signal.SIGXCPU
        cap = limits.output_bytes
        return Result(rc, b"".join(box.out)[:cap], b"".join(box.err)[:cap], wall,
                      timed_out and not box.exceeded, box.exceeded, oom)  # fmt: skip

    def _release(self, box: _Box) -> None:
        if box.proc is not None:
            _kill(box.proc)
        if box.cgroup is not None:
            box.cgroup.remove()
        if box.uid_fd is not None:
            Uids.release(box.uid_fd)


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _feed(pipe: object, data: bytes) -> None:
    try:
        pipe.write(data)  # type: ignore[attr-defined]
        pipe.close()  # type: ignore[attr-defined]
    except (BrokenPipeError, OSError, ValueError):
        pass  # the program exited or closed stdin without reading it all


def _collect(boxes: list[_Box], deadline: float, cap: int, primary: _Box | None) -> bool:
    """Read every box's stdout/stderr until all close (or the primary box's do) or the deadline
    passes (then True); a box whose output passes `cap` is killed at once."""
    with selectors.DefaultSelector() as sel:
        for box in boxes:
            sel.register(box.proc.stdout.fileno(), selectors.EVENT_READ, (box, box.out))  # type: ignore[union-attr]
            sel.register(box.proc.stderr.fileno(), selectors.EVENT_READ, (box, box.err))  # type: ignore[union-attr]
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            for key, _ in sel.select(timeout=left):
                if key.fd not in sel.get_map():
                    continue  # its box was killed for its output a moment ago
                box, chunks = key.data
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fd)
                    if primary is box and not any(k.data[0] is box for k in sel.get_map().values()):
                        return False
                    continue
                chunks.append(data)
                if sum(map(len, box.out)) + sum(map(len, box.err)) > cap:
                    box.exceeded = True
                    for k in [k for k in sel.get_map().values() if k.data[0] is box]:
                        sel.unregister(k.fd)
                    _kill(box.proc)
                    if primary is box:
                        return False
    return False


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher chain (by then bwrap); its pid-1 child dies with it (--die-with-parent)
    and takes the run's whole pid namespace along."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass
