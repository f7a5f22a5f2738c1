"""The check stage: parse each completion, run the filters, then the domain's verifier.

Shared by `generate` (as a Ray Data UDF) and `curate`. The first failing unit decides the
`reject_reason`; cheap filters run first so expensive verification is spent on survivors.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from pipeline import priority, reaper
from pipeline.config import JobConfig
from pipeline.filter import FILTERS
from pipeline.filter.readability import Format
from pipeline.parse import split_reasoning
from pipeline.units import Unit, Verdict
from pipeline.verify import VERIFIERS
from pipeline.verify.pool import IsolatedRunner
from pipeline.vote import extracted_answer

CHECK_COLUMNS = pa.schema(
    [
        ("reasoning", pa.string()),
        ("final", pa.string()),
        ("accepted", pa.bool_()),
        ("reject_reason", pa.string()),
        ("reject_details", pa.string()),
        ("extracted_answer", pa.string()),
    ]
)


class Checker:
    """Verdicts for sample dicts; owns the filter units and the verifier worker pool."""

    def __init__(self, job: JobConfig, prefilled: bool | None = None) -> None:
        self.prefilled = job.think_prefill if prefilled is None else prefilled
        self.max_reasoning_words = job.render.max_reasoning_words
        self.filters: list[Unit] = [FILTERS.build(f.name, **f.params) for f in job.filters]
        self.verifiers: dict[str, Unit] = {
            d: VERIFIERS.build(spec.name, **spec.params) for d, spec in job.verify.domains.items()
        }
        self.kinds = {d: spec.name for d, spec in job.verify.domains.items()}
        self.threads = ThreadPoolExecutor(job.verify_workers, thread_name_prefix="verify")
        needs_pool = any(getattr(v, "isolate", False) for v in self.verifiers.values())
        self.pool = (
            IsolatedRunner(job.verify_workers, job.verify.timeout_s, job.verify.memory_mb) if needs_pool else None
        )

    def parse(self, sample: dict[str, Any]) -> dict[str, Any]:
        completion = sample.get("completion")
        if completion is None:
            return {**sample, "reasoning": None, "final": None}
        p = split_reasoning(completion, prefilled=self.prefilled)
        reasoning, most = p.reasoning, self.max_reasoning_words
        if most is not None and reasoning is not None and p.closed and not 0 < Format._words(reasoning) <= most:
            reasoning = None  # R1's non-reasoning sample: the answer alone (`completion` keeps the trace)
        return {**sample, "reasoning": reasoning, "final": p.final, "think_closes": p.think_closes}

    def answer(self, sample: dict[str, Any]) -> str | None:
        """The final answer the domain's verifier reads (what answer votes count), for every sample."""
        return extracted_answer(self.kinds.get(sample.get("domain") or ""), sample.get("final"))

    def __call__(self, samples: list[dict[str, Any]]) -> list[Verdict]:
        verdicts: list[Verdict | None] = [None] * len(samples)
        pending: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            if s.get("completion") is None:  # nothing generated: keep the render/engine reason
                verdicts[i] = Verdict.reject(s.get("reject_reason") or "no_answer")
                continue
            reasons = s.get("reasoning") is not None
            for f in self.filters:
                if getattr(f, "reasoning_only", False) and not reasons:
                    continue  # checks of the chain of thought: only for samples that have one
                v = f(s)
                if not v.ok:
                    verdicts[i] = v
                    break
            else:
                domain = s.get("domain")
                verifier = self.verifiers.get(domain)
                if verifier is None:
                    verdicts[i] = Verdict.reject("unknown_domain", domain=domain)
                elif getattr(verifier, "isolate", False) or getattr(verifier, "concurrent", False):
                    pending.setdefault(domain, []).append(i)
                else:
                    verdicts[i] = verifier(s)
        for domain, idx in pending.items():
            for i, v in zip(idx, self._run_many(self.verifiers[domain], [samples[i] for i in idx])):
                verdicts[i] = v
        return [v for v in verdicts if v is not None]

    def _run_many(self, verifier: Unit, samples: list[dict[str, Any]]) -> list[Verdict]:
        """Isolated units go to the killable worker pool; concurrent ones (they wait on
        sandboxed processes) to threads, `verify.workers` at a time."""
        if getattr(verifier, "isolate", False):
            assert self.pool is not None
            return self.pool.run(verifier, samples)
        return list(self.threads.map(verifier, samples))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.threads.shutdown()


class CheckStage:
    """Ray Data UDF: sample rows in, the same rows with reasoning/final and a verdict out."""

    def __init__(self, job: JobConfig, prefilled: bool | None = None) -> None:
        priority.lower(job.resources.background_nice)  # verifier workers and sandboxes inherit it
        self.checker = Checker(job, prefilled)
        reaper.watch_children()  # verifier pools and sandboxes must not outlive this actor

    def __call__(self, batch: pa.Table) -> pa.Table:
        samples = [self.checker.parse(s) for s in batch.to_pylist()]
        verdicts = self.checker(samples)
        keep = [c for c in batch.column_names if c not in CHECK_COLUMNS.names]
        table = batch.select(keep)
        columns = {
            "reasoning": [s["reasoning"] for s in samples],
            "final": [s["final"] for s in samples],
            "accepted": [v.ok for v in verdicts],
            "reject_reason": [v.reason for v in verdicts],
            "reject_details": [v.details_json() for v in verdicts],
            "extracted_answer": [self.checker.answer(s) for s in samples],
        }
        for field in CHECK_COLUMNS:
            table = table.append_column(field, pa.array(columns[field.name], field.type))
        return table
