"""Run untrusted Python (generated solutions) so that it cannot touch the host.

Each run is a fresh set of Linux namespaces built with util-linux tools, no compiler and no
daemon needed (the pipeline runs as root in its container, which may create namespaces):

    unshare --net --mount --pid --fork --mount-proc   own network (no interfaces up), mounts, pids
      sh: every mount remounted read-only; a size-capped tmpfs on /tmp (the scratch dir,
          also the disk-fill cap) and on /dev/shm
      setpriv: an unprivileged uid of its own, no groups, no capabilities, no_new_privs
      prlimit: CPU seconds, address space, processes, file size, open files, no core dumps
      timeout -s KILL: the wall clock, enforced inside even if the host side dies
      python -I /dev/fd/N   the program comes in on a memfd; the environment is scrubbed

`timeout` is the namespace's pid 1: when it exits, the kernel kills every process left in the
namespace (forks, orphans, daemons), so nothing outlives a run. The host side reads at most
`output_bytes` of output and kills the namespace's init itself on its own deadline.
"""

from __future__ import annotations

import math
import os
import queue
import selectors
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from functools import cached_property

_SETUP = r"""
while read -r _dev mnt _rest; do
  case "$mnt" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) ;;
    *) mount -o remount,ro,bind "$mnt" 2>/dev/null || { echo "sandbox: cannot make $mnt read-only" >&2; exit 121; } ;;
  esac
done < /proc/self/mounts
mount -t tmpfs -o "size=$1,mode=1777,nosuid,nodev" tmpfs /tmp || exit 121
if [ -d /dev/shm ]; then mount -t tmpfs -o size=1m,nosuid,nodev tmpfs /dev/shm || exit 121; fi
cd /tmp || exit 121
shift
exec "$@"
"""
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}
_UID_BASE = 200_000


@dataclass(frozen=True)
class Limits:
    """What one program may use. `cpu_s` defaults to the wall limit rounded up, plus one."""

    wall_s: float = 2.0
    cpu_s: int | None = None
    memory_mb: int = 1024
    processes: int = 32
    file_mb: int = 16
    scratch_mb: int = 64
    output_bytes: int = 1 << 20


@dataclass(frozen=True)
class Result:
    """How a run ended. `returncode` is negative for a signal (as in subprocess)."""

    returncode: int
    stdout: bytes
    stderr: bytes
    wall_s: float
    timed_out: bool
    output_exceeded: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not (self.timed_out or self.output_exceeded)


class SandboxUnavailable(RuntimeError):
    """This host cannot build the sandbox (not root, no namespaces): code is never run unconfined."""


def _python() -> str:
    """An interpreter every uid may execute (a venv under /root is not one)."""
    for path in ("/usr/local/bin/python3", "/usr/bin/python3"):
        if os.access(path, os.X_OK):
            return path
    return os.path.realpath(shutil.which("python3") or "python3")


class Sandbox:
    """Thread-safe runner; `slots` runs at once, each under its own uid (processes of one run
    never count against, signal or trace another's)."""

    def __init__(self, slots: int | None = None, python: str | None = None) -> None:
        self.python = python or _python()
        self.slots = slots or os.cpu_count() or 1
        base = _UID_BASE + (os.getpid() % 100_000) * 64  # distinct per process on one host, mostly
        self._uids: queue.Queue[int] = queue.Queue()
        for i in range(self.slots):
            self._uids.put(base + i)

    @cached_property
    def unavailable(self) -> str | None:
        """Why runs cannot be confined here, or None; checked once by running a tiny program."""
        if os.geteuid() != 0:
            return "needs root (or CAP_SYS_ADMIN) to create namespaces; run in the pipeline image"
        missing = [t for t in ("unshare", "setpriv", "prlimit", "timeout", "mount") if not shutil.which(t)]
        if missing:
            return f"missing tools: {', '.join(missing)} (util-linux, coreutils)"
        try:
            r = self._run("pass", b"", Limits(wall_s=10))
        except OSError as e:
            return f"cannot start the sandbox: {e}"
        if r.returncode != 0:
            return f"sandbox self-test failed (exit {r.returncode}): {r.stderr.decode(errors='replace')[-300:]}"
        return None

    def run(self, source: str, stdin: bytes = b"", limits: Limits = Limits()) -> Result:
        """Run `source` as a Python program with `stdin`; raises SandboxUnavailable, never
        runs the code unconfined."""
        if self.unavailable:
            raise SandboxUnavailable(self.unavailable)
        return self._run(source, stdin, limits)

    def _run(self, source: str, stdin: bytes, limits: Limits) -> Result:
        uid = self._uids.get()
        try:
            return self._run_as(uid, source, stdin, limits)
        finally:
            self._uids.put(uid)

    def _command(self, uid: int, limits: Limits, program_fd: int) -> list[str]:
        cpu = limits.cpu_s or math.ceil(limits.wall_s) + 1
        mb = 1024 * 1024
        return [
            "unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
            "--", "sh", "-c", _SETUP, "sandbox", f"{limits.scratch_mb}m",
            "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
            "--inh-caps=-all", "--bounding-set=-all", "--",
            "prlimit", f"--cpu={cpu}", f"--as={limits.memory_mb * mb}", f"--nproc={limits.processes}",
            f"--fsize={limits.file_mb * mb}", "--nofile=256", "--core=0", "--",
            "timeout", "-s", "KILL", f"{limits.wall_s:g}",
            self.python, "-I", "-B", f"/dev/fd/{program_fd}",
        ]  # fmt: skip

    def _run_as(self, uid: int, source: str, stdin: bytes, limits: Limits) -> Result:
        program = os.memfd_create("program", 0)
        try:
            os.write(program, source.encode())
            start = time.monotonic()
            proc = subprocess.Popen(
                self._command(uid, limits, program),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(program,),
                env=_ENV,
                start_new_session=True,
            )
        finally:
            os.close(program)
        feeder = threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True)
        feeder.start()
        deadline = start + limits.wall_s + 1.0  # the inner `timeout` should fire first
        out, err, exceeded = _collect(proc, deadline, limits.output_bytes)
        _kill_tree(proc)
        feeder.join(timeout=1.0)
        wall = time.monotonic() - start
        rc = proc.returncode
        timed_out = wall >= limits.wall_s or rc in (124, 128 + signal.SIGXCPU, -signal.SIGXCPU)
        return Result(rc, out, err, wall, timed_out and not exceeded, exceeded)


def _feed(pipe: object, data: bytes) -> None:
    try:
        pipe.write(data)  # type: ignore[attr-defined]
        pipe.close()  # type: ignore[attr-defined]
    except (BrokenPipeError, OSError, ValueError):
        pass  # the program exited or closed stdin without reading it all


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, bool]:
    """Read stdout/stderr until both close, the deadline passes or the output passes `cap`."""
    chunks: dict[int, list[bytes]] = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}  # type: ignore[union-attr]
    total = 0
    with selectors.DefaultSelector() as sel:
        for fd in chunks:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in sel.select(timeout=left):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fd)
                    continue
                total += len(data)
                chunks[key.fd].append(data)
                if total > cap:
                    return _joined(chunks, proc, cap) + (True,)
    return _joined(chunks, proc, cap) + (False,)


def _joined(chunks: dict[int, list[bytes]], proc: subprocess.Popen, cap: int) -> tuple[bytes, bytes]:
    return (
        b"".join(chunks[proc.stdout.fileno()])[:cap],  # type: ignore[union-attr]
        b"".join(chunks[proc.stderr.fileno()])[:cap],  # type: ignore[union-attr]
    )


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the namespace's init (the kernel then kills everything in it), then unshare."""
    try:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            children = [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        children = []
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        try:
            proc.wait(timeout=0.5)  # usually gone already: its child (pid 1 inside) has exited
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass
