"""Run units in worker processes that can be killed: hang-proof, memory-capped, recycled.

Math-Verify's own timeout is a SIGALRM, which only works on a main thread (Ray actor methods may
not run there) and turns a timeout into a silent "not equal". So units run with their internal
timeouts off, in pebble workers with a hard wall-clock kill: a timeout is reported as such, a
killed or crashed worker is replaced, and only that sample is lost.
"""

from __future__ import annotations

import logging
import multiprocessing
import resource
from concurrent.futures import TimeoutError as FutureTimeout
from pebble import ProcessExpired, ProcessPool

from pipeline.units import Sample, Unit, Verdict

log = logging.getLogger(__name__)

def _limit_memory(memory_mb: int) -> None:
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _run(unit: Unit, sample: Sample) -> Verdict:
    return unit(sample)


class IsolatedRunner:
    """A pool of verifier processes; `run` judges many samples concurrently, each under a hard kill."""

    def __init__(self, workers: int = 1, timeout_s: float = 10.0, memory_mb: int = 2048, max_tasks: int = 1000) -> None:
        self.timeout_s = timeout_s
        self._pool = ProcessPool(
            max_workers=workers,
            max_tasks=max_tasks,
            initializer=_limit_memory,
            initargs=(memory_mb,),
            context=multiprocessing.get_context("forkserver"),
        )

    def run(self, unit: Unit, samples: list[Sample]) -> list[Verdict]:
        """Judge each sample with `unit` (picklable) in a worker; never raises for a sample."""
        name = unit.name
        futures = [self._pool.schedule(_run, args=(unit, dict(s)), timeout=self.timeout_s) for s in samples]
        verdicts = []
        for sample, fut in zip(samples, futures):
            try:
                verdicts.append(fut.result())
            except FutureTimeout:
                log.warning("verifier %s timed out after %.1fs on id=%s", name, self.timeout_s, sample.get("id"))
                verdicts.append(Verdict.reject("verifier_timeout", timeout_s=self.timeout_s))
            except ProcessExpired as e:
                verdicts.append(Verdict.reject("verifier_error", error=f"worker died (exit {e.exitcode})"))
            except Exception as e:  # the unit raised: the sample is rejected, the batch goes on
                verdicts.append(Verdict.reject("verifier_error", error=f"{type(e).__name__}: {e}"[:500]))
        return verdicts

    def close(self) -> None:
        self._pool.stop()
        self._pool.join()
