"""What a dataset cost: engine time, GPU time and tokens, per run and per accepted sample.

Each run that generates keeps a ledger in `_pipeline/runs/<attempt>.json` (one per sampling round
after the first: `<attempt>-r<round>.json`), rewritten whenever it commits, so a killed run's
spending up to its last commit is still counted. Engine time is what
the run held engines for (start-up included: it is paid for), GPU time is that times the GPUs
each engine holds; tokens are counted from the samples as they arrive.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import pyarrow as pa

from pipeline.storage import INTERNAL, Fenced, Storage

RUNS = f"{INTERNAL}/runs"


class Ledger:
    """One run's spending, saved through the fenced storage."""

    def __init__(self, fenced: Fenced, attempt: str, fp: str, engines: int, gpus_per_engine: int,
                 round: int = 0) -> None:
        self.fenced, self.attempt, self.fp, self.round = fenced, attempt, fp, round
        self.engines, self.gpus_per_engine = engines, gpus_per_engine
        self.t0 = time.monotonic()
        self.tokens: dict[str, dict[str, int]] = defaultdict(lambda: {"samples": 0, "prompt": 0, "completion": 0})

    def add(self, batch: pa.Table) -> None:
        cols = batch.select(["domain", "prompt_tokens", "completion_tokens"]).to_pydict()
        for domain, p, c in zip(cols["domain"], cols["prompt_tokens"], cols["completion_tokens"]):
            t = self.tokens[domain or "unknown"]
            t["samples"] += 1
            t["prompt"] += p or 0
            t["completion"] += c or 0

    def record(self) -> dict[str, Any]:
        engine_s = round(self.engines * (time.monotonic() - self.t0), 1)  # gpu_s is exactly engine_s x GPUs
        return {"attempt": self.attempt, "round": self.round, "fingerprint": self.fp, "engines": self.engines,
                "gpus_per_engine": self.gpus_per_engine, "engine_s": engine_s,
                "gpu_s": round(engine_s * self.gpus_per_engine, 1), "by_domain": dict(self.tokens)}

    def save(self) -> None:
        name = f"{self.attempt}-r{self.round}" if self.round else self.attempt
        self.fenced.write_json(f"{RUNS}/{name}.json", self.record())


def totals(storage: Storage, fp: str, accepted_by_domain: dict[str, int]) -> dict[str, Any]:
    """Everything the runs of generation fingerprint `fp` spent, overall and per accepted sample."""
    engine_s = gpu_s = 0.0
    runs: set[str] = set()
    by_domain: dict[str, dict[str, int]] = defaultdict(lambda: {"samples": 0, "prompt": 0, "completion": 0})
    for rel in storage.list(RUNS):
        rec = storage.read_json(rel)
        if rec.get("fingerprint") != fp:
            continue
        runs.add(rec["attempt"])
        engine_s += rec["engine_s"]
        gpu_s += rec["gpu_s"]
        for domain, t in rec["by_domain"].items():
            for k, v in t.items():
                by_domain[domain][k] += v
    accepted = sum(accepted_by_domain.values())
    tokens = sum(t["prompt"] + t["completion"] for t in by_domain.values())

    def per(value: float, n: int) -> float | None:
        return round(value / n, 2) if n else None

    return {
        "runs": len(runs),
        "engine_hours": round(engine_s / 3600, 4),
        "gpu_hours": round(gpu_s / 3600, 4),
        "prompt_tokens": sum(t["prompt"] for t in by_domain.values()),
        "completion_tokens": sum(t["completion"] for t in by_domain.values()),
        "per_accepted_sample": {"gpu_s": per(gpu_s, accepted), "engine_s": per(engine_s, accepted),
                                "tokens": per(tokens, accepted)},
        "by_domain": {d: {**t, "accepted": accepted_by_domain.get(d, 0),
                          "tokens_per_accepted": per(t["prompt"] + t["completion"], accepted_by_domain.get(d, 0))}
                      for d, t in sorted(by_domain.items())},
    }
