"""The check stage: parse + filters + verifiers over Arrow batches, with hang-proof workers."""

import time

import pyarrow as pa

from pipeline.check import CheckStage
from pipeline.config import load_job
from pipeline.units import Verdict
from pipeline.verify.pool import IsolatedRunner


def batch(rows):
    base = {"id": "p", "prompt": "q", "domain": "math", "answer": "5", "finish_reason": "stop", "reject_reason": None}
    return pa.Table.from_pylist([{**base, **r} for r in rows])


def test_stage_sets_verdict_columns_in_order():
    stage = CheckStage(load_job(None))
    out = stage(
        batch(
            [
                {"id": "a", "completion": "2+3 = 5. The answer is \\boxed{5}."},
                {"id": "b", "completion": "\\boxed{6}"},
                {"id": "c", "completion": "2+3 is ... and so on", "finish_reason": "length"},
                {"id": "d", "completion": None, "reject_reason": "empty_prompt"},
                {"id": "e", "completion": "\\boxed{5}", "domain": "astrology"},
                {"id": "f", "completion": "<think>\nAdding 2 and 3 gives 5.\n</think>\n\n\\boxed{5}"},
            ]
        )
    ).to_pylist()
    assert [r["id"] for r in out] == list("abcdef")
    assert [r["accepted"] for r in out] == [True, False, False, False, False, True]
    assert [r["reject_reason"] for r in out] == [None, "answer_mismatch", "truncated", "empty_prompt", "unknown_domain", None]
    assert out[5]["reasoning"] == "Adding 2 and 3 gives 5." and out[5]["final"] == "\\boxed{5}"
    stage.checker.close()


class Sleepy:
    name = "sleepy"
    isolate = True

    def __call__(self, sample):
        time.sleep(float(sample["sleep"]))
        return Verdict.accept()


class Crashy:
    name = "crashy"

    def __call__(self, sample):
        if sample.get("kill"):
            import os

            os._exit(3)
        raise ValueError("boom")


def test_a_hanging_check_is_killed_and_the_rest_of_the_batch_goes_on():
    runner = IsolatedRunner(workers=2, timeout_s=1.0)
    try:
        t0 = time.monotonic()
        verdicts = runner.run(Sleepy(), [{"sleep": 30}, {"sleep": 0}, {"sleep": 0}])
        elapsed = time.monotonic() - t0
        assert [v.reason for v in verdicts] == ["verifier_timeout", None, None]
        assert elapsed < 10
        # the pool recovered: a new check runs fine
        assert runner.run(Sleepy(), [{"sleep": 0}])[0].ok
    finally:
        runner.close()


def test_a_crashing_or_dying_check_is_a_rejection_not_a_crash():
    runner = IsolatedRunner(workers=1, timeout_s=5.0)
    try:
        verdicts = runner.run(Crashy(), [{"kill": True}, {}])
        assert [v.reason for v in verdicts] == ["verifier_error", "verifier_error"]
        assert "boom" in verdicts[1].details["error"]
    finally:
        runner.close()


class MemoryHog:
    name = "hog"

    def __call__(self, sample):
        blob = bytearray(int(sample["mb"]) * 1024**2)
        return Verdict.accept(size=len(blob))


class AddressSpace:
    name = "address_space"

    def __call__(self, sample):
        import resource

        return Verdict.accept(limit=resource.getrlimit(resource.RLIMIT_AS)[0])


def test_the_memory_cap_is_what_stops_a_memory_hog():
    """The worker's address space is capped at `memory_mb`: an allocation over the cap fails with
    a MemoryError inside the worker (reported as such), the same unit under the cap passes in the
    same pool. A host short of memory, a dead worker or an unpicklable unit would fail both."""
    runner = IsolatedRunner(workers=1, timeout_s=60.0, memory_mb=1024)
    try:
        (limit,) = runner.run(AddressSpace(), [{}])
        assert limit.details["limit"] == 1024 * 1024**2
        over, under = runner.run(MemoryHog(), [{"mb": 1536}, {"mb": 64}])
        assert over.reason == "verifier_error" and over.details["error"].startswith("MemoryError"), over
        assert under.ok and under.details["size"] == 64 * 1024**2, under
    finally:
        runner.close()
