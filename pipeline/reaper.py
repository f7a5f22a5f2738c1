"""The processes a stage actor starts (vLLM's engine core, verifier pools) end when the actor ends,
however it ends.

An actor that exits in order stops its subprocesses itself (generate.Engine.close at exit), which
needs Ray not to SIGKILL them first (run.ACTOR_ENV). An actor that dies abruptly (its driver killed
with -9, the OOM killer, a lost raylet) cannot: its children are orphaned, and an orphaned engine
core keeps its GPU memory (7 GB of RAM on the CPU demo) until the node is recycled. Ray's own
remedies do not cover this: `RAY_process_group_cleanup_enabled` relies on the raylet, which a
killed local driver takes down with it, and the raylet subreaper is deprecated.

So each such actor has a watcher: a small process in a session of its own (outside the actor's
process group, which Ray may kill) that keeps a list of the actor's descendants and, once the actor
is gone, sends SIGTERM to those still running (vLLM's engine core shuts down on it), then SIGKILL
after a grace period. It needs no Ray and no cooperation from the dying actor.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
from typing import IO

import psutil

log = logging.getLogger(__name__)
REFRESH_S = 0.5
"""How often the watcher re-reads the actor's descendants (new engine processes appear at start-up)."""
GRACE_S = 30.0
"""How long orphans get to exit after SIGTERM before SIGKILL."""
SETTLE_S = 1.0
"""How long the actor's subprocesses get to end by themselves before they are signalled."""
ANSWER_S = 30.0
"""How long an actor waits for its watcher to confirm a look (a stopped watcher must not hang it)."""

_watcher: subprocess.Popen | None = None


def watch_children(grace_s: float = GRACE_S) -> None:
    """Have this process's watcher (started on the first call) note the descendants this process
    has now; returns once it has. Call it again after starting subprocesses: later ones are also
    seen by its periodic look, but an actor can die before that."""
    global _watcher
    # run as a file in isolated mode: it needs only psutil, and this folder's select.py is not the stdlib's
    if _watcher is None or _watcher.poll() is not None:
        me = psutil.Process()
        _watcher = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), str(me.pid), repr(me.create_time()), str(grace_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
        )  # its stderr is this actor's, which Ray streams to the run's log
    assert _watcher.stdin is not None and _watcher.stdout is not None
    try:
        _watcher.stdin.write("look\n")
        _watcher.stdin.flush()
        answered, _, _ = select.select([_watcher.stdout], [], [], ANSWER_S)
        if answered and _watcher.stdout.readline():
            return
    except OSError:
        pass
    log.warning("the watcher of process %d did not answer (exit code %s): its subprocesses may outlive it if it "
                "is killed", os.getpid(), _watcher.poll())


def _descendants(parent: psutil.Process) -> dict[tuple[int, float], psutil.Process]:
    found = {}
    try:
        for child in parent.children(recursive=True):
            if child.pid == os.getpid():  # the watcher itself is one of them
                continue
            try:
                found[(child.pid, child.create_time())] = child
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    return found


def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (an actor whose raylet has not collected it yet has ended)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def reap(pid: int, created: float, requests: IO[str] | None = None, acks: IO[str] | None = None,
         refresh_s: float = REFRESH_S, grace_s: float = GRACE_S) -> list[int]:
    """Watch process `pid` (started at `created`, so that a reused pid is not mistaken for it) until
    it ends, then end the descendants it had; returns the pids that were still running then.
    It looks at them every `refresh_s`, and at once for each line on `requests` (answered on `acks`)."""
    try:
        actor = psutil.Process(pid)
        if abs(actor.create_time() - created) > 1.0:  # computed from boot time, which a clock step moves
            return []
    except psutil.NoSuchProcess:
        return []
    known: dict[tuple[int, float], psutil.Process] = {}
    while True:
        known = {key: proc for key, proc in known.items() if proc.is_running()}  # is_running checks the start time
        known.update(_descendants(actor))
        if not _alive(actor):
            break
        readable, _, _ = select.select([requests] if requests is not None else [], [], [], refresh_s)
        if readable and requests is not None:
            try:
                if not requests.readline():  # the actor closed its end: it is ending, or gone
                    requests = None
                    continue
                known.update(_descendants(actor))
                if acks is not None:
                    acks.write("seen\n")
                    acks.flush()
            except OSError:  # the actor died between asking and reading the answer: watch on
                requests = acks = None
    # a moment for what ends by itself once the actor is gone (multiprocessing's resource tracker)
    _, orphans = psutil.wait_procs([proc for proc in known.values() if proc.is_running()], timeout=SETTLE_S)
    for proc in orphans:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:  # gone, or not ours to signal: the others still are
            pass
    _, alive = psutil.wait_procs(orphans, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return [proc.pid for proc in orphans]


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the run, not its watcher
    ended = reap(int(sys.argv[1]), float(sys.argv[2]), sys.stdin, sys.stdout, grace_s=float(sys.argv[3]))
    if ended:
        print(f"watcher of process {sys.argv[1]}: it ended leaving processes {ended} running; sent them SIGTERM "
              f"(SIGKILL after {sys.argv[3]} s)", file=sys.stderr)
    os._exit(0)
