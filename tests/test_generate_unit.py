"""The engine stage's own logic around vLLM: sample expansion, seeds, isolating a failing request."""

from types import SimpleNamespace

import pyarrow as pa

from pipeline.generate import EngineStage, request_seed


class FlakyLLM:
    """Stands in for vllm.LLM in a unit test: fails any call that contains the poisoned prompt."""

    def generate(self, prompts, params, use_tqdm=False):
        if any(p["prompt_token_ids"] == [666] for p in prompts):
            raise ValueError("engine rejected a request")
        return [SimpleNamespace(outputs=[SimpleNamespace(text=f"out{i}", finish_reason="stop", token_ids=[1, 2])
                                         for i in range(sp.n)]) for sp in params]


def stage(n=2, seed=5):
    from vllm import SamplingParams

    s = EngineStage.__new__(EngineStage)
    s.n, s.model_name, s.sampling, s.job_seed = n, "m", {"n": n, "max_tokens": 4}, seed
    s._params, s.llm = SamplingParams, FlakyLLM()
    return s


def test_one_bad_request_gets_engine_error_and_the_batch_goes_on():
    batch = pa.Table.from_pylist([
        {"id": "a", "prompt": "x", "domain": "math", "prompt_token_ids": [1, 2, 3], "reject_reason": None},
        {"id": "b", "prompt": "y", "domain": "math", "prompt_token_ids": [666], "reject_reason": None},
        {"id": "c", "prompt": "", "domain": "math", "prompt_token_ids": None, "reject_reason": "empty_prompt"},
    ], schema=pa.schema([("id", pa.string()), ("prompt", pa.string()), ("domain", pa.string()),
                         ("prompt_token_ids", pa.list_(pa.int32())), ("reject_reason", pa.string())]))
    rows = stage()(batch).to_pylist()
    assert [(r["id"], r["sample_index"]) for r in rows] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1)]
    assert [r["reject_reason"] for r in rows] == [None, None, "engine_error", "engine_error", "empty_prompt", "empty_prompt"]
    assert rows[0]["completion"] == "out0" and rows[1]["completion"] == "out1" and rows[0]["completion_tokens"] == 2
    assert rows[0]["prompt_tokens"] == 3 and rows[2]["completion"] is None
    assert rows[0]["seed"] == request_seed(5, "a") == rows[1]["seed"]
    assert "prompt_token_ids" not in rows[0]


def test_seeds_are_per_prompt_and_stable():
    assert request_seed(1, "a") == request_seed(1, "a") != request_seed(1, "b") != request_seed(2, "b")
