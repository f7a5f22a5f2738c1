"""The LLM judge: prompt and verdict parsing (unit), the stage's decisions, and the real engine end to end."""

import asyncio

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import EngineSpec
from pipeline.generate import JudgeStage
from pipeline.verify.judge import DEFAULT_PROMPT, judge_prompt, parse_verdict


def test_prompt_holds_problem_reference_and_the_end_of_a_long_answer():
    p = judge_prompt({"prompt": "What is 2+3?", "answer": "5", "final": "x" * 5000 + " so \\boxed{5}"})
    assert "What is 2+3?" in p and "Reference answer:\n5" in p and p.rstrip().endswith("VERDICT: INCORRECT.")
    assert "so \\boxed{5}" in p and "x" * 4500 not in p
    assert "(none given)" in judge_prompt({"prompt": "Say hi", "answer": None, "final": "Hi"})


@pytest.mark.parametrize(
    "reply, correct, rationale",
    [
        ("Both equal five.\nVERDICT: CORRECT", True, "Both equal five."),
        ("The answer 6 differs from 5.\nVERDICT: incorrect", False, "The answer 6 differs from 5."),
        ("First I thought VERDICT: CORRECT but no.\n**VERDICT: INCORRECT**", False, "First I thought VERDICT: CORRECT but no.\n**"),
        ("I am not sure.", None, "I am not sure."),
    ],
)
def test_parse_verdict(reply, correct, rationale):
    v = parse_verdict(reply)
    assert v.correct is correct and v.rationale == rationale


class ScriptedEngine:
    """Stands in for the judge's vLLM engine in a unit test of the stage's decisions: replies by the
    answer the grading prompt holds."""

    def __init__(self, replies):
        self.replies = replies

    async def complete(self, token_ids, params, request_id):
        from pipeline.generate import Completion

        prompt = self.tokenizer.decode(token_ids)
        text = next((r for k, r in self.replies.items() if k in prompt), "no idea")
        return [Completion(text, "stop", 3)]


def judge_stage(replies, reasoning=False):
    from transformers import AutoTokenizer

    from pipeline.config import DEFAULT_MODEL_DIR, load_job

    stage = JudgeStage.__new__(JudgeStage)
    stage.spec, stage.template, stage.params, stage.reasoning = load_job(None).judge, DEFAULT_PROMPT, None, reasoning
    stage.tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    stage.engine = ScriptedEngine(replies)
    stage.engine.tokenizer = stage.tokenizer
    return stage


def test_stage_overturns_only_what_the_job_lets_it_decide(model_dir):
    stage = judge_stage({"\\boxed{5.0}": "Same value.\nVERDICT: CORRECT", "Hello!": "Polite.\nVERDICT: CORRECT",
                         "Go away.": "Rude.\nVERDICT: INCORRECT"})
    rows = [
        {"id": "a", "domain": "math", "prompt": "2+3?", "answer": "5", "completion": "\\boxed{5.0}", "final": "\\boxed{5.0}", "accepted": False, "reject_reason": "answer_mismatch"},
        {"id": "b", "domain": "math", "prompt": "2+3?", "answer": "5", "completion": "\\boxed{7}", "final": "\\boxed{7}", "accepted": False, "reject_reason": "answer_mismatch"},
        {"id": "c", "domain": "math", "prompt": "2+3?", "answer": "5", "completion": "\\boxed{5.0}", "final": "\\boxed{5.0}", "accepted": False, "reject_reason": "repetition"},
        {"id": "d", "domain": "general", "prompt": "Greet me", "answer": None, "completion": "Go away.", "final": "Go away.", "accepted": True, "reject_reason": None},
        {"id": "e", "domain": "general", "prompt": "Greet me", "answer": None, "completion": "Hello!", "final": "Hello!", "accepted": True, "reject_reason": None},
    ]
    out = asyncio.run(stage(pa.Table.from_pylist(rows))).to_pylist()
    assert [(r["accepted"], r["reject_reason"], r["judge_verdict"]) for r in out] == [
        (True, None, "correct"), (False, "answer_mismatch", "unparsed"), (False, "repetition", None),
        (False, "judge_rejected", "incorrect"), (True, None, "correct")]
    assert out[0]["judge_rationale"] == "Same value."


def test_a_reasoning_judges_verdict_is_read_after_its_thinking(model_dir):
    stage = judge_stage({"Hello!": "Maybe VERDICT: CORRECT? No, it is rude.\n</think>\nRude.\nVERDICT: INCORRECT",
                         "Hi.": "VERDICT: CORRECT, I think, but let me check"}, reasoning=True)
    rows = [{"id": i, "domain": "general", "prompt": "Greet me", "answer": None, "completion": c, "final": c,
             "accepted": True, "reject_reason": None} for i, c in (("a", "Hello!"), ("b", "Hi."))]
    schema = pa.schema([(k, pa.bool_() if k == "accepted" else pa.string()) for k in rows[0]])
    out = asyncio.run(stage(pa.Table.from_pylist(rows, schema=schema))).to_pylist()
    assert [(r["judge_verdict"], r["accepted"]) for r in out] == [("incorrect", False), ("unparsed", True)]


@pytest.mark.slow
def test_judge_stage_runs_with_the_real_engine(tiny_job, ray_local):
    from pipeline.run import generate

    tiny_job.judge.enabled = True
    tiny_job.judge.engine = EngineSpec(gpu_memory_utilization=0.15)  # the rest as the generator's engine
    # vLLM's structured outputs make even the 135M model answer in the verdict format
    tiny_job.judge.sampling = {"temperature": 0.0, "max_tokens": 48,
                               "structured_outputs": {"regex": "[A-Za-z ,.]{0,40}\nVERDICT: (CORRECT|INCORRECT)"}}
    tiny_job.judge.cpus = 0.25
    tiny_job.resources.cpu_stage_cpus = 0.125
    tiny_job.shards = tiny_job.shards[:1]
    uri = generate(tiny_job)
    samples = pq.read_table(f"{uri}/samples").to_pylist()
    judged = [s for s in samples if s["judge_verdict"] is not None]
    assert judged, "the judge graded nothing"
    assert {s["judge_verdict"] for s in judged} <= {"correct", "incorrect"}, "a reply without a verdict"
    for s in judged:  # the verdict decided the sample
        if s["judge_verdict"] == "correct":
            assert s["accepted"] and s["reject_reason"] is None
        else:
            assert not s["accepted"] and s["reject_reason"] in ("answer_mismatch", "no_answer", "no_reference", "judge_rejected")
    assert all(s["accepted"] == (s["reject_reason"] is None) for s in samples)
