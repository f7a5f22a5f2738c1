"""The engine stage's own logic around vLLM: sample expansion, seeds, isolating a failing request."""

import asyncio
from types import SimpleNamespace

import pyarrow as pa

from pipeline.generate import EngineStage, request_seed


class FlakyEngine:
    """Stands in for vLLM's async engine in a unit test: refuses the poisoned prompt, streams the others."""

    errored = False

    def shutdown(self):
        pass

    async def generate(self, prompt, params, request_id):
        if prompt["prompt_token_ids"] == [666]:
            raise ValueError("engine rejected a request")
        yield SimpleNamespace(outputs=[])  # a partial output first, as the engine streams
        yield SimpleNamespace(outputs=[SimpleNamespace(text=f"out{i}", finish_reason="stop", token_ids=[1, 2])
                                       for i in range(params.n)])


async def collect(stage, batch):
    return [t async for t in stage(batch)]


def stage(n=2, seed=5):
    from vllm import SamplingParams

    s = EngineStage.__new__(EngineStage)
    s.n, s.model_name, s.sampling, s.job_seed = n, "m", {"n": n, "max_tokens": 4}, seed
    s._params, s.engine = SamplingParams, FlakyEngine()
    return s


def test_one_bad_request_gets_engine_error_and_the_batch_goes_on():
    batch = pa.Table.from_pylist([
        {"id": "a", "prompt": "x", "domain": "math", "prompt_token_ids": [1, 2, 3], "reject_reason": None},
        {"id": "b", "prompt": "y", "domain": "math", "prompt_token_ids": [666], "reject_reason": None},
        {"id": "c", "prompt": "", "domain": "math", "prompt_token_ids": None, "reject_reason": "empty_prompt"},
    ], schema=pa.schema([("id", pa.string()), ("prompt", pa.string()), ("domain", pa.string()),
                         ("prompt_token_ids", pa.list_(pa.int32())), ("reject_reason", pa.string())]))
    (table,) = asyncio.run(collect(stage(), batch))
    rows = table.to_pylist()
    assert [(r["id"], r["sample_index"]) for r in rows] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1)]
    assert [r["reject_reason"] for r in rows] == [None, None, "engine_error", "engine_error", "empty_prompt", "empty_prompt"]
    assert rows[0]["completion"] == "out0" and rows[1]["completion"] == "out1" and rows[0]["completion_tokens"] == 2
    assert rows[0]["prompt_tokens"] == 3 and rows[2]["completion"] is None
    assert rows[0]["seed"] == request_seed(5, "a") == rows[1]["seed"]
    assert "prompt_token_ids" not in rows[0]


def test_seeds_are_per_prompt_and_stable():
    assert request_seed(1, "a") == request_seed(1, "a") != request_seed(1, "b") != request_seed(2, "b")


def test_a_dead_engine_fails_the_batch_so_ray_restarts_the_actor():
    import pytest

    s = stage()
    s.engine.errored = True  # what vLLM reports once its engine core is gone
    batch = pa.Table.from_pylist([{"id": "b", "prompt": "y", "domain": "math", "prompt_token_ids": [666], "reject_reason": None}])
    with pytest.raises(ValueError):
        asyncio.run(collect(s, batch))
