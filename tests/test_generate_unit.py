"""The engine stage's own logic around vLLM (sample expansion, honest seeds, a bounded offer, a failing
request, a dead engine) and rendering with DeepSeek's published R1-distill chat templates."""

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest

from pipeline import generate
from pipeline.config import load_job
from pipeline.generate import Engine, EngineStage, request_seed

TEMPLATES = Path(__file__).parent / "data" / "r1_distill"


def vllm_config(max_num_seqs: int = 4) -> SimpleNamespace:
    """The parts of vLLM's VllmConfig the engine reads after start-up."""
    return SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs, max_num_batched_tokens=2048),
        cache_config=SimpleNamespace(kv_cache_size_tokens=4096, num_gpu_blocks=256, enable_prefix_caching=True),
        model_config=SimpleNamespace(max_model_len=2048),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1, distributed_executor_backend="uni"),
    )


class FakeLLM:
    """Stands in for vLLM's AsyncLLM in a unit test: refuses the poisoned prompt, answers the others
    with n completions (handed over out of order), and counts the requests it holds at once."""

    errored = False

    def __init__(self, max_num_seqs: int = 4) -> None:
        self.vllm_config = vllm_config(max_num_seqs)
        self.running = self.peak = 0

    def shutdown(self, timeout=None):
        pass

    async def generate(self, prompt, params, request_id):
        if prompt["prompt_token_ids"] == [666]:
            raise ValueError("engine rejected a request")
        self.running += 1
        self.peak = max(self.peak, self.running)
        for _ in range(3):  # let every other request that may start, start
            await asyncio.sleep(0)
        self.running -= 1
        yield SimpleNamespace(outputs=[])  # a partial output first, as the engine streams
        yield SimpleNamespace(outputs=[SimpleNamespace(index=i, text=f"out{i}", finish_reason="stop", token_ids=[1, 2])
                                       for i in reversed(range(params.n))])


def stage(n: int = 2, seed: int | None = 5, llm: FakeLLM | None = None) -> EngineStage:
    s = EngineStage.__new__(EngineStage)
    s.n, s.model_name, s.sampling, s.job_seed = n, "m", {"n": n, "max_tokens": 4}, seed
    s.engine = Engine(llm or FakeLLM(), "generator", n)
    return s


PROMPT_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("domain", pa.string()),
                           ("prompt_token_ids", pa.list_(pa.int32())), ("reject_reason", pa.string())])


def prompts(ids_and_tokens) -> pa.Table:
    return pa.Table.from_pylist([{"id": i, "prompt": "x", "domain": "math", "prompt_token_ids": t,
                                  "reject_reason": None if t else "empty_prompt"} for i, t in ids_and_tokens],
                                schema=PROMPT_SCHEMA)


def test_one_bad_request_gets_engine_error_and_the_task_goes_on():
    table = asyncio.run(stage()(prompts([("a", [1, 2, 3]), ("b", [666]), ("c", None)])))
    rows = table.to_pylist()
    assert [(r["id"], r["sample_index"]) for r in rows] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1)]
    assert [r["reject_reason"] for r in rows] == [None, None, "engine_error", "engine_error", "empty_prompt", "empty_prompt"]
    assert rows[0]["completion"] == "out0" and rows[1]["completion"] == "out1"  # by vLLM's sample index
    assert rows[0]["completion_tokens"] == 2 and rows[0]["prompt_tokens"] == 3 and rows[2]["completion"] is None
    assert "prompt_token_ids" not in rows[0] and "rendered" not in rows[0]


def test_each_sample_records_the_seed_it_ran_with():
    rows = asyncio.run(stage(n=3)(prompts([("a", [1, 2])]))).to_pylist()
    base = request_seed(5, "a")
    assert [r["seed"] for r in rows] == [base, base + 1, base + 2]  # vLLM: child i runs with seed + i
    unseeded = asyncio.run(stage(n=2, seed=None)(prompts([("a", [1, 2])]))).to_pylist()
    assert [r["seed"] for r in unseeded] == [None, None]


def test_seeds_are_per_prompt_and_stable():
    assert request_seed(1, "a") == request_seed(1, "a") != request_seed(1, "b") != request_seed(2, "b")


def test_the_engine_is_offered_one_and_a_half_times_what_it_runs():
    llm = FakeLLM(max_num_seqs=4)
    s = stage(n=2, llm=llm)  # 4 running sequences -> 6 offered -> 3 prompts of 2 samples
    asyncio.run(s(prompts([(f"p{i}", [1, 2]) for i in range(20)])))
    assert s.engine.offered == 3 and llm.peak == 3


def test_a_dead_engine_ends_the_process_with_its_root_cause(monkeypatch):
    from vllm.v1.engine.exceptions import EngineDeadError

    class DeadLLM(FakeLLM):
        errored = True
        engine_core = SimpleNamespace(resources=SimpleNamespace(engine_manager=SimpleNamespace(
            processes=[SimpleNamespace(name="EngineCore_DP0", pid=4242, exitcode=-9)])))

        async def generate(self, prompt, params, request_id):
            raise EngineDeadError()
            yield

    exits, reports = [], []

    def exit_(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(generate.os, "_exit", exit_)
    s = stage(llm=DeadLLM())
    s.engine.report = reports.append
    with pytest.raises(SystemExit):
        asyncio.run(s(prompts([("a", [1, 2])])))
    assert exits == [1]
    assert reports[-1]["event"] == "died" and "EngineCore_DP0 (pid 4242) killed by SIGKILL" in reports[-1]["cause"]


def renderer(template: str | None, reasoning: bool = True):
    from transformers import AutoTokenizer

    from pipeline.config import DEFAULT_MODEL_DIR
    from pipeline.render import Renderer

    job = load_job(None, model={"reasoning": reasoning}, render={"chat_template": template})
    return Renderer(AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR), job)


@pytest.mark.parametrize("version", ["2025-01", "2025-02"])
def test_a_prompt_rendered_with_the_r1_distill_templates_holds_one_think(model_dir, version):
    template = (TEMPLATES / f"chat_template_{version}.jinja").read_text(encoding="utf-8")
    text = renderer(template)({"id": "q", "prompt": "What is 2+2?", "domain": "math"}).text
    assert text.count("<think>") == 1 and text.endswith("<｜Assistant｜><think>\n")
    assert "<｜User｜>What is 2+2?\nPlease reason step by step" in text
    plain = renderer(template, reasoning=False)({"id": "q", "prompt": "What is 2+2?", "domain": "math"}).text
    assert plain.count("<think>") == (1 if version == "2025-02" else 0)  # the template's own, never ours


def test_the_two_published_templates_differ_only_by_the_think_of_the_generation_prompt():
    first, current = ((TEMPLATES / f"chat_template_{v}.jinja").read_text(encoding="utf-8") for v in ("2025-01", "2025-02"))
    assert current == first.replace("{{'<｜Assistant｜>'}}{% endif %}", "{{'<｜Assistant｜><think>\\n'}}{% endif %}")
    assert current != first
