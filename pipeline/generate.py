"""The vLLM engine stage: one `vllm.LLM` per actor, n samples per prompt from one prefill."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import pyarrow as pa

from pipeline.config import JobConfig
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
_INTERNAL = ("rendered", "prompt_token_ids")


def request_seed(job_seed: int, prompt_id: str) -> int:
    """A per-prompt seed independent of batching, so reruns reproduce the same samples."""
    digest = hashlib.blake2b(f"{job_seed}:{prompt_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2**31 - 1)


def sample_rows(row: dict[str, Any], n: int, model: str, seed: int | None, outputs: list[Any] | None, reason: str | None) -> list[dict[str, Any]]:
    """Expand a prompt row into its n sample rows (completion null when nothing was generated)."""
    base = {k: v for k, v in row.items() if k not in _INTERNAL and k != "reject_reason"}
    rows = []
    for i in range(n):
        out = outputs[i] if outputs is not None and i < len(outputs) else None
        rows.append(
            {
                **base,
                "sample_index": i,
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
    """Ray Data actor UDF holding one vLLM engine (tensor_parallel_size GPUs)."""

    def __init__(self, job: JobConfig) -> None:
        from vllm import LLM, SamplingParams

        self.job = job
        self.n = job.n
        self.model_name = job.model.display_name
        self.sampling = dict(job.sampling)
        self.job_seed = self.sampling.pop("seed", None)
        self._params = SamplingParams
        self.llm = LLM(**job.engine.llm_kwargs(job.model.path))

    def _seed(self, prompt_id: str) -> int | None:
        return None if self.job_seed is None else request_seed(int(self.job_seed), prompt_id)

    def _generate(self, rows: list[dict[str, Any]]) -> list[tuple[list[Any] | None, str | None]]:
        """Outputs per row; if the batch fails, rows are retried one by one to isolate the bad one."""
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in rows]
        params = [self._params(**self.sampling, seed=self._seed(r["id"])) for r in rows]
        try:
            results = self.llm.generate(prompts, params, use_tqdm=False)
            return [(list(res.outputs), None) for res in results]
        except Exception as batch_error:  # one bad request must not sink the batch
            if len(rows) == 1:
                log.warning("engine error on id=%s: %s", rows[0].get("id"), batch_error)
                return [(None, "engine_error")]
        return [self._generate([r])[0] for r in rows]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [r for r in rows if r["reject_reason"] is None]
        generated = dict(zip((r["id"] for r in todo), self._generate(todo))) if todo else {}
        out: list[dict[str, Any]] = []
        for r in rows:
            outputs, reason = generated.get(r["id"], (None, r["reject_reason"]))
            out.extend(sample_rows(r, self.n, self.model_name, self._seed(r["id"]), outputs, reason))
        schema = _sample_schema(batch.schema)
        return pa.Table.from_pylist(out, schema=schema)


def _sample_schema(prompt_batch: pa.Schema) -> pa.Schema:
    fields = [f for f in prompt_batch if f.name not in _INTERNAL]
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
