"""The LLM judge: prompt and verdict parsing (unit), the stage's decisions, and the real engine end to end."""

from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

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


class ScriptedJudge:
    """Stands in for vllm.LLM in a unit test of the stage's decisions: replies by answer text."""

    def chat(self, chats, params, use_tqdm=False):
        replies = {"\\boxed{5.0}": "Same value.\nVERDICT: CORRECT", "Hello!": "Polite.\nVERDICT: CORRECT",
                   "Go away.": "Rude.\nVERDICT: INCORRECT"}
        out = []
        for chat in chats:
            text = next((r for k, r in replies.items() if k in chat[0]["content"]), "no idea")
            out.append(SimpleNamespace(outputs=[SimpleNamespace(text=text)]))
        return out


def test_stage_overturns_only_what_the_job_lets_it_decide():
    from pipeline.config import load_job

    stage = JudgeStage.__new__(JudgeStage)
    stage.spec, stage.template, stage.params, stage.llm = load_job(None).judge, DEFAULT_PROMPT, None, ScriptedJudge()
    rows = [
        {"id": "a", "domain": "math", "prompt": "2+3?", "answer": "5", "completion": "\\boxed{5.0}", "final": "\\boxed{5.0}", "accepted": False, "reject_reason": "answer_mismatch"},
        {"id": "b", "domain": "math", "prompt": "2+3?", "answer": "5", "completion": "\\boxed{7}", "final": "\\boxed{7}", "accepted": False, "reject_reason": "answer_mismatch"},
        {"id": "c", "domain": "math", "prompt": "2+3?", "answer": "5", "completion": "\\boxed{5.0}", "final": "\\boxed{5.0}", "accepted": False, "reject_reason": "repetition"},
        {"id": "d", "domain": "general", "prompt": "Greet me", "answer": None, "completion": "Go away.", "final": "Go away.", "accepted": True, "reject_reason": None},
        {"id": "e", "domain": "general", "prompt": "Greet me", "answer": None, "completion": "Hello!", "final": "Hello!", "accepted": True, "reject_reason": None},
    ]
    out = stage(pa.Table.from_pylist(rows)).to_pylist()
    assert [(r["accepted"], r["reject_reason"], r["judge_verdict"]) for r in out] == [
        (True, None, "correct"), (False, "answer_mismatch", "unparsed"), (False, "repetition", None),
        (False, "judge_rejected", "incorrect"), (True, None, "correct")]
    assert out[0]["judge_rationale"] == "Same value."


@pytest.mark.slow
def test_judge_stage_runs_with_the_real_engine(tiny_job, ray_local):
    from pipeline.run import generate

    tiny_job.judge.enabled = True
    tiny_job.judge.engine = tiny_job.engine.model_copy(update={"gpu_memory_utilization": 0.15})
    tiny_job.judge.sampling = {"temperature": 0.0, "max_tokens": 32}
    tiny_job.judge.cpus = 0.25
    tiny_job.resources.cpu_stage_cpus = 0.125
    tiny_job.shards = tiny_job.shards[:1]
    uri = generate(tiny_job)
    samples = pq.read_table(f"{uri}/samples").to_pylist()
    judged = [s for s in samples if s["judge_verdict"] is not None]
    assert judged, "the judge graded nothing"
    assert all(s["judge_verdict"] in ("correct", "incorrect", "unparsed") for s in judged)
    assert all(s["reject_reason"] in (None, "answer_mismatch", "no_answer", "no_reference", "judge_rejected") for s in judged)
    assert all(s["accepted"] == (s["reject_reason"] is None) for s in samples)
