"""What the sandbox tests check on the host after (or during) a run: no process of a run is
left, no SysV IPC object of a run appears, a host process survives."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


def descendants() -> list[int]:
    """Every live process below this one (sandboxed processes are, until they are gone)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def sysv_keys() -> set[int]:
    """Keys of the host's SysV shared memory segments, message queues and semaphore sets."""
    keys = set()
    for kind in ("shm", "msg", "sem"):
        for line in Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]:
            keys.add(int(line.split()[0]))
    return keys


@pytest.fixture
def host():
    """A sentinel process that must survive; afterwards no process started during the test may be
    left (processes other tests left behind, e.g. worker pools, are not this test's)."""
    before = set(descendants())
    sentinel = subprocess.Popen(["sleep", "300"])
    yield sentinel
    assert sentinel.poll() is None, "the sandboxed program killed a host process"
    sentinel.kill()
    sentinel.wait()
    assert set(descendants()) - before == set(), "a sandboxed process outlived its run"
