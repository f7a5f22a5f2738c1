"""Memory while streaming 1M prompt rows through `pipeline generate`, with a fake engine.

The engine is swapped for `FakeEngine` (here, in the benchmark only) so that the run measures
the pipeline's own overhead: read, render, check, part writes and commits, publish. A sampler
reads the private memory (USS) of the driver and of every Ray worker every 2 s, and how many
samples the driver has written so far. "Flat": the peak over the last half of the
rows is at most 10% (+32 MB) above the peak over the first half, once the first 10% are through.
Publishing (after the last sample) is reported on its own: it works one committed shard at a time.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import run
from pipeline.config import DEFAULT_JOB, load_job
from pipeline.generate import _sample_schema, sample_rows

MB = 1024 * 1024


class FakeEngine:
    """Answers every prompt at once with a fixed short completion (benchmark only)."""

    def __init__(self, job: Any) -> None:
        self.n = job.n
        self.text = "Adding the two numbers gives the result.\n\nThe answer is 2."
        self.tokens = list(range(16))

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = SimpleNamespace(text=self.text, finish_reason="stop", token_ids=self.tokens)
        rows = []
        for r in batch.to_pylist():
            outputs = [out] * self.n if r["reject_reason"] is None else None
            rows.extend(sample_rows(r, self.n, "fake", None, outputs, r["reject_reason"]))
        return pa.Table.from_pylist(rows, schema=_sample_schema(batch.schema))


def role(p: psutil.Process) -> str:
    name = " ".join(p.cmdline()[:1]) or p.name()
    for label in ("RenderStage", "FakeEngine", "CheckStage", "ReadFiles", "ListFiles"):
        if label in name:
            return label
    if p.pid == psutil.Process().pid:
        return "driver"
    return "ray::other" if name.startswith("ray::") else "ray system"


class Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.written = 0  # samples the driver has written (counted by the wrapped CommitWriter.add)
        self.samples: list[tuple[int, dict[str, float]]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            usage: dict[str, float] = {}
            for p in [me, *me.children(recursive=True)]:
                try:
                    r = role(p)
                    usage[r] = max(usage.get(r, 0.0), p.memory_full_info().uss / MB)
                except (psutil.Error, OSError):
                    pass
            self.samples.append((self.written, usage))
            self.stop.wait(2.0)


def write_shards(folder: Path, rows: int, shards: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    per = rows // shards
    for s in range(shards):
        ids = range(s * per, (s + 1) * per)
        table = pa.table({"id": [f"q{i:07d}" for i in ids], "prompt": [f"What is {i} plus {i % 97}?" for i in ids],
                          "domain": ["general"] * per})
        pq.write_table(table, folder / f"prompts-{s:05d}.parquet")
    return str(folder / "*.parquet")


def summarize(samples: list[tuple[int, dict[str, float]]], rows: int) -> dict[str, Any]:
    """Per role: peak private memory by quarter of the rows written, and whether it stayed flat."""
    out: dict[str, Any] = {}
    for r in sorted({r for _, u in samples for r in u}):
        quarters = []
        for q in range(4):
            lo, hi = rows * max(q / 4, 0.1), rows * (q + 1) / 4
            vals = [u[r] for done, u in samples if lo <= done < hi and r in u]
            quarters.append(round(max(vals), 1) if vals else None)
        first = max((v for v in quarters[:2] if v is not None), default=None)
        last = max((v for v in quarters[2:] if v is not None), default=None)
        flat = None if first is None or last is None else last <= first * 1.1 + 32
        publish = [u[r] for done, u in samples if done >= rows and r in u]
        out[r] = {"uss_mb_by_quarter_of_rows": quarters, "flat": flat,
                  "publish_peak_mb": round(max(publish), 1) if publish else None}
    return out


def main(rows: int = 1_000_000, shards: int = 20) -> dict[str, Any]:
    run.EngineStage = FakeEngine  # the swap: benchmark only
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        spec = write_shards(Path(tmp) / "shards", rows, shards)
        job = load_job(
            DEFAULT_JOB, shards=[spec], output=str(Path(tmp) / "out"),
            sampling={"n": 1, "max_tokens": 16}, prompts={"dedup": False},
            resources={"batch_size": 2048, "cpu_batch_size": 4096, "engine_cpus": 0.25, "cpu_stage_cpus": 0.25},
        )
        sampler = Sampler()
        add = run.CommitWriter.add

        def counted(writer: run.CommitWriter, batch: pa.Table) -> int:
            new = add(writer, batch)
            sampler.written += new
            return new

        run.CommitWriter.add = counted  # type: ignore[method-assign]
        sampler.start()
        start = time.monotonic()
        run.generate(job)
        wall = time.monotonic() - start
        sampler.stop.set()
        sampler.join()
        manifest = json.loads((Path(tmp) / "out" / "_manifest.json").read_text())
    roles = summarize(sampler.samples, rows)
    trace = [(done, round(u.get("driver", 0))) for done, u in sampler.samples]
    return {"prompt_rows": rows, "samples": manifest["stats"]["samples"], "wall_s": round(wall, 1),
            "rows_per_s": round(rows / wall), "roles": roles, "driver_trace": trace[:: max(1, len(trace) // 40)],
            "flat": all(v["flat"] is not False for v in roles.values())}


if __name__ == "__main__":
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    print(json.dumps(main(rows), indent=2))
