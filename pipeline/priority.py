"""Engine first: on a node shared by an engine and CPU work, the engine keeps the CPU.

vLLM's engine processes are CPU-bound on their own (scheduler, sampling, detokenizing; on a
CPU-only host, the model too). Everything else the pipeline runs there (render and check
actors, verifier workers, sandboxed tests, and on a local cluster the driver and Ray's own
processes) runs at a higher niceness, so it takes only what the engine leaves.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def lower(nice: int) -> None:
    """Run this process (and what it starts from now on) at niceness `nice` or lower priority."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice > current:
        os.setpriority(os.PRIO_PROCESS, 0, nice)


def restore() -> None:
    """Back to normal priority for an engine process started under a niced parent.

    Raising priority needs root or CAP_SYS_NICE; without it the engine stays where it is."""
    if os.getpriority(os.PRIO_PROCESS, 0) > 0:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        except PermissionError:
            log.warning("engine runs at niceness %d: no permission to raise it", os.getpriority(os.PRIO_PROCESS, 0))
