"""A stage actor's subprocesses end with it, even when it is killed with -9 (pipeline.reaper)."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil

from pipeline.config import REPO_ROOT
from pipeline.reaper import reap

# A stand-in for an engine actor: starts its watcher, then a child that ignores SIGTERM (SIGKILL
# is needed) with a grandchild of its own, reports their pids and waits to be killed.
ACTOR = textwrap.dedent("""
    import subprocess, sys, time
    from pipeline import reaper
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, subprocess, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "g = subprocess.Popen(['sleep', '1000']); print(g.pid, flush=True); signal.pause()"],
        stdout=subprocess.PIPE, text=True)
    grandchild = int(child.stdout.readline())
    reaper.watch_children(grace_s=1.0)
    print(child.pid, grandchild, reaper._watcher.pid, flush=True)
    signal_pause = __import__("signal").pause()
""")


def test_the_children_of_an_actor_killed_with_9_are_ended_by_its_watcher():
    actor = subprocess.Popen([sys.executable, "-c", ACTOR], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
                             env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    started: list[psutil.Process] = []
    try:
        started += (psutil.Process(int(p)) for p in actor.stdout.readline().split())
        child, grandchild, watcher = started
        assert child.is_running() and grandchild.is_running()
        actor.send_signal(signal.SIGKILL)
        actor.wait()
        gone, alive = psutil.wait_procs([child, grandchild, watcher], timeout=120)
        assert not alive, f"still running after the actor's death: {alive}"
    finally:
        for proc in started:  # only this test's own processes: others on the machine are not ours
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


def test_a_reused_pid_is_not_taken_for_the_actor():
    me = psutil.Process()
    assert reap(me.pid, me.create_time() - 60.0) == []  # started a minute earlier: another process


def test_an_actor_that_stopped_its_children_itself_leaves_nothing_to_end():
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys; subprocess.run(['true']); sys.stdin.read()"],
                              stdin=subprocess.PIPE)
    proc = psutil.Process(parent.pid)
    created = proc.create_time()
    parent.stdin.close()
    assert reap(parent.pid, created, refresh_s=0.1) == []
    parent.wait()


def test_an_actor_dying_between_its_question_and_the_answer_still_has_its_children_ended():
    """The watcher's answer meets a closed pipe: it must go on watching, not crash and leave orphans."""
    actor = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.Popen(['sleep', '1000']); sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    proc = psutil.Process(actor.pid)
    requests_r, requests_w = os.pipe()
    os.write(requests_w, b"look\n")
    deadline = time.monotonic() + 60
    while not proc.children():  # the actor has started its child
        assert time.monotonic() < deadline, "the actor never started its child"
        time.sleep(0.01)
    (child,) = proc.children()

    class GonePipe:
        """The actor's end of the answers, closed: writing fails as a broken pipe does, once the
        watcher has looked (which is when the actor dies here)."""

        answered = threading.Event()

        def write(self, _: str) -> int:
            self.answered.set()
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            pass

    acks = GonePipe()
    ended: list[int] = []
    with os.fdopen(requests_r) as requests:
        watcher = threading.Thread(target=lambda: ended.extend(reap(actor.pid, proc.create_time(), requests, acks,  # type: ignore[arg-type]
                                                                    refresh_s=0.1, grace_s=1.0)))
        watcher.start()
        assert acks.answered.wait(60), "the watcher never answered"
        actor.stdin.close()  # the actor ends
        watcher.join(60)
    os.close(requests_w)
    actor.wait()
    gone, _ = psutil.wait_procs([child], timeout=5)  # ended (a zombie until its new parent collects it)
    assert ended == [child.pid] and gone
