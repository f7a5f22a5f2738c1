"""The vLLM engine stage: one `vllm.LLM` per actor, n samples per prompt from one prefill."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from typing import Any, AsyncIterator

import pyarrow as pa

from pipeline import priority
from pipeline.config import JobConfig
from pipeline.schemas import RENDER_COLUMNS
from pipeline.verify.judge import DEFAULT_PROMPT, judge_prompt, parse_verdict

log = logging.getLogger(__name__)

# Columns the engine adds to each sample row (the prompt columns are carried over).
GENERATED = pa.schema(
    [
        ("sample_index", pa.int64()),
        ("completion", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("model", pa.string()),
        ("seed", pa.int64()),
    ]
)


def request_seed(job_seed: int, prompt_id: str) -> int:
    """A per-prompt seed independent of batching, so reruns reproduce the same samples."""
    digest = hashlib.blake2b(f"{job_seed}:{prompt_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2**31 - 1)


def sample_rows(row: dict[str, Any], n: int, model: str, seed: int | None, outputs: list[Any] | None, reason: str | None) -> list[dict[str, Any]]:
    """Expand a prompt row into its n sample rows (completion null when nothing was generated);
    a sampling round's indexes start at the row's `first_sample`."""
    base = {k: v for k, v in row.items() if k not in RENDER_COLUMNS and k != "reject_reason"}
    first = row.get("first_sample") or 0
    rows = []
    for i in range(n):
        out = outputs[i] if outputs is not None and i < len(outputs) else None
        rows.append(
            {
                **base,
                "sample_index": first + i,
                "completion": out.text if out is not None else None,
                "finish_reason": out.finish_reason if out is not None else None,
                "prompt_tokens": len(row["prompt_token_ids"]) if row.get("prompt_token_ids") else None,
                "completion_tokens": len(out.token_ids) if out is not None else None,
                "model": model,
                "seed": seed,
                "reject_reason": reason if out is None else None,
            }
        )
    return rows


class EngineStage:
    """Ray Data actor UDF holding one vLLM async engine (tensor_parallel_size GPUs).

    `__call__` is a coroutine: the actor runs `resources.engine_batches_in_flight` batches at
    once, so the engine always has queued requests while a batch's long tail decodes and while
    finished batches travel on to verification (as ray.data.llm does). Requests are submitted one
    by one, so a request the engine refuses fails alone as `engine_error`; a dead engine raises,
    and Ray Data restarts the actor and retries its batches.
    """

    def __init__(self, job: JobConfig) -> None:
        from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams

        priority.restore()  # before vLLM starts its engine processes: they inherit it
        self.n = job.n
        self.model_name = job.model.display_name
        self.sampling = dict(job.sampling)
        self.job_seed = self.sampling.pop("seed", None)
        self._params = SamplingParams
        self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**job.engine.llm_kwargs(job.model.path)))

    def _seed(self, row: dict[str, Any]) -> int | None:
        """The request's seed, offset by the round's first sample index: no two rounds repeat a sample."""
        if self.job_seed is None:
            return None
        return request_seed(int(self.job_seed), row["id"]) + (row.get("first_sample") or 0)

    def __del__(self) -> None:
        """Ray Data drops the UDF when it retires the actor: stop vLLM's engine processes
        cleanly instead of leaving them to be killed with the actor."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    async def _request(self, row: dict[str, Any]) -> tuple[list[Any] | None, str | None]:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        # FINAL_ONLY: one output holding all n completions, no per-token streaming to this process
        params = self._params(**self.sampling, seed=self._seed(row), output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        try:
            stream = self.engine.generate(
                TokensPrompt(prompt_token_ids=row["prompt_token_ids"]), params, request_id=f"{row['id']}-{uuid.uuid4().hex}"
            )
            async for final in stream:
                pass
        except Exception as e:
            if getattr(self.engine, "errored", False):
                raise  # the engine itself is gone: let Ray Data restart the actor
            log.warning("engine error on id=%s: %s", row.get("id"), e)
            return None, "engine_error"
        return (list(final.outputs), None) if final is not None else (None, "engine_error")

    async def __call__(self, batch: pa.Table) -> AsyncIterator[pa.Table]:
        rows = batch.to_pylist()
        todo = [r for r in rows if r["reject_reason"] is None]
        results = await asyncio.gather(*(self._request(r) for r in todo))
        generated = {r["id"]: res for r, res in zip(todo, results)}
        out: list[dict[str, Any]] = []
        for r in rows:
            outputs, reason = generated.get(r["id"], (None, r["reject_reason"]))
            out.extend(sample_rows(r, self.n, self.model_name, self._seed(r), outputs, reason))
        yield pa.Table.from_pylist(out, schema=_sample_schema(batch.schema))


def _sample_schema(prompt_batch: pa.Schema) -> pa.Schema:
    fields = [f for f in prompt_batch if f.name not in RENDER_COLUMNS]
    return pa.schema(fields + list(GENERATED))


class JudgeStage:
    """Ray Data actor UDF holding the judge's vLLM engine; may overturn rule verdicts.

    Candidates: samples whose reject_reason is one the job lets the judge decide, and accepted
    samples of domains without references. CORRECT accepts; INCORRECT rejects (keeping the rule's
    reason, or `judge_rejected`); a reply without a verdict changes nothing. Verdict and rationale
    are recorded on every judged sample.
    """

    def __init__(self, job: JobConfig) -> None:
        from vllm import LLM, SamplingParams

        priority.restore()
        spec = job.judge
        model = spec.model or job.model
        self.spec = spec
        self.template = spec.prompt or DEFAULT_PROMPT
        self.params = SamplingParams(**spec.sampling)
        self.llm = LLM(**spec.engine.llm_kwargs(model.path))

    def candidate(self, row: dict[str, Any]) -> bool:
        if row["completion"] is None:
            return False
        if row["accepted"]:
            return row.get("domain") in self.spec.domains
        return row.get("reject_reason") in self.spec.reasons

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        idx = [i for i, r in enumerate(rows) if self.candidate(r)]
        verdicts: dict[int, tuple[str, str]] = {}
        if idx:
            chats = [[{"role": "user", "content": judge_prompt(rows[i], self.template)}] for i in idx]
            for i, out in zip(idx, self.llm.chat(chats, self.params, use_tqdm=False)):
                v = parse_verdict(out.outputs[0].text)
                r = rows[i]
                if v.correct is True:
                    r["accepted"], r["reject_reason"] = True, None
                elif v.correct is False:
                    r["accepted"], r["reject_reason"] = False, r["reject_reason"] or "judge_rejected"
                verdicts[i] = ({True: "correct", False: "incorrect", None: "unparsed"}[v.correct], v.rationale)
        table = pa.Table.from_pylist(rows, schema=batch.schema)
        return (table.append_column("judge_verdict", pa.array([verdicts.get(i, (None, None))[0] for i in range(len(rows))], pa.string()))
                .append_column("judge_rationale", pa.array([verdicts.get(i, (None, None))[1] for i in range(len(rows))], pa.string())))
