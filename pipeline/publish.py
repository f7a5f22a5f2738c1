"""Publish committed units as a dataset fine-tuning tools load directly; `_manifest.json` last.

Publishing is a pure function of the commit records, so rerunning it gives the same files: a
crash during publish is repaired by the next run. Readers wait for the manifest.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.card import render_card
from pipeline.config import SelectSpec
from pipeline import report
from pipeline.parse import assistant_content
from pipeline.select import select
from pipeline.storage import Commit, Storage

MANIFEST = "_manifest.json"
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
DATA_METADATA = (
    "id", "domain", "source", "answer", "model", "sample_index", "finish_reason",
    "prompt_tokens", "completion_tokens", "seed",
)


def to_training_rows(samples: pa.Table) -> pa.Table:
    """Accepted samples -> `messages` (TRL conversational format) + metadata columns."""
    accepted = samples.filter(pc.field("accepted"))
    rows = accepted.select(["prompt", "reasoning", "final"]).to_pylist()
    messages = [
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": assistant_content(r["reasoning"], r["final"])}]
        for r in rows
    ]
    table = pa.table({"messages": pa.array(messages, pa.list_(MESSAGE))})
    for col in DATA_METADATA:
        if col in accepted.column_names:
            table = table.append_column(col, accepted.column(col))
    return table


def _rebatch(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """Regroup a stream of tables into tables of exactly `rows` rows (the last one shorter)."""
    buf: list[pa.Table] = []
    size = 0
    for t in tables:
        while t.num_rows:
            take = min(rows - size, t.num_rows)
            buf.append(t.slice(0, take))
            size += take
            t = t.slice(take)
            if size == rows:
                yield pa.concat_tables(buf)
                buf, size = [], 0
    if buf:
        yield pa.concat_tables(buf)


class Stats:
    """Counts by domain and reason, accept rates, prompts with an accepted sample, token lengths.

    Memory stays bounded however large the run: `add` takes one committed shard (it holds all
    samples of its prompts, so prompts are counted per shard), and token lengths are histograms."""

    def __init__(self) -> None:
        self.by_domain: dict[str, Counter[str]] = defaultdict(Counter)
        self.prompts: Counter[str] = Counter()
        self.prompts_ok: Counter[str] = Counter()
        self.tokens: dict[str, Counter[int]] = {"accepted": Counter(), "rejected": Counter()}

    def add(self, shard: pa.Table) -> None:
        cols = shard.select(["id", "domain", "accepted", "reject_reason", "completion_tokens"]).to_pydict()
        prompts: dict[str, set[str]] = defaultdict(set)
        prompts_ok: dict[str, set[str]] = defaultdict(set)
        for pid, dom, ok, reason, toks in zip(*cols.values()):
            self.by_domain[dom][reason or "accepted"] += 1
            prompts[dom].add(pid)
            if ok:
                prompts_ok[dom].add(pid)
            if toks is not None:
                self.tokens["accepted" if ok else "rejected"][toks] += 1
        self.prompts.update({d: len(ids) for d, ids in prompts.items()})
        self.prompts_ok.update({d: len(ids) for d, ids in prompts_ok.items()})

    def summary(self) -> dict[str, Any]:
        domains = {}
        for dom, counts in sorted(self.by_domain.items()):
            total = sum(counts.values())
            domains[dom] = {
                "samples": total,
                "accepted": counts.get("accepted", 0),
                "accept_rate": round(counts.get("accepted", 0) / total, 4) if total else 0.0,
                "prompts": self.prompts[dom],
                "prompts_with_accepted": self.prompts_ok[dom],
                "reasons": dict(sorted((k, v) for k, v in counts.items() if k != "accepted")),
            }
        total = sum(d["samples"] for d in domains.values())
        accepted = sum(d["accepted"] for d in domains.values())
        return {
            "samples": total,
            "accepted": accepted,
            "accept_rate": round(accepted / total, 4) if total else 0.0,
            "domains": domains,
            "completion_tokens": {k: _quantiles(v) for k, v in self.tokens.items()},
        }


def _quantiles(histogram: Counter[int]) -> dict[str, float]:
    n = sum(histogram.values())
    if not n:
        return {}
    values = sorted(histogram.items())

    def q(p: float) -> int:
        seen = 0
        for value, count in values:
            seen += count
            if seen > p * n:
                return value
        return values[-1][0]

    mean = sum(v * c for v, c in values) / n
    return {"mean": round(mean, 1), "p50": q(0.5), "p90": q(0.9), "max": values[-1][0]}


def data_file_names(accepted: int, rows_per_file: int) -> list[str]:
    n = max(1, math.ceil(accepted / rows_per_file))
    return [f"data/train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]


def publish(storage: Storage, manifest: dict[str, Any], rows_per_file: int, started: float,
            selection: SelectSpec | None = None) -> dict[str, Any]:
    """Write samples/, data/, README.md from the commits, then the manifest. Returns the manifest.

    Rejection sampling (`selection`) runs here, per committed shard, because a shard holds all
    samples of its prompts. `started` (epoch seconds) is when the run began."""
    t0 = time.time()
    commits = [c for _, c in sorted(storage.commits().items())]
    storage.remove(MANIFEST)  # a half-republished dataset must not look complete
    stats = Stats()
    sample_files = []
    for c in commits:
        rel = f"samples/{c.unit}.parquet"
        tables = list(storage.committed_tables(c))
        table = pa.concat_tables(tables, promote_options="default") if tables else None
        if table is not None:
            table = select(table, selection or SelectSpec())
            storage.write_table(rel, table)
            stats.add(table)
            sample_files.append(rel)
    summary = stats.summary()
    names = data_file_names(summary["accepted"], rows_per_file)
    _write_data(storage, commits, names, rows_per_file)
    for stale in set(storage.list("data")) - set(names):
        storage.remove(stale)
    for stale in set(storage.list("samples")) - set(sample_files):
        storage.remove(stale)
    manifest = {
        **manifest,
        "units": {c.unit: {"source": c.source, "rows": c.rows, "accepted": c.accepted} for c in commits},
        "stats": summary,
        "files": {"data": names, "samples": sample_files},
    }
    manifest["timings"] = {**manifest.get("timings", {}), "publish_s": round(time.time() - t0, 2),
                           "total_s": round(time.time() - started, 2)}
    storage.write_bytes("README.md", render_card(manifest).encode())
    storage.write_bytes("report.md", report.markdown(manifest).encode())
    for name, png in report.plots(manifest["stats"], stats.tokens).items():
        storage.write_bytes(name, png)
    storage.write_json(MANIFEST, manifest)
    storage.clean_attempts({c.attempt for c in commits})
    return manifest


def _write_data(storage: Storage, commits: list[Commit], names: list[str], rows_per_file: int) -> None:
    def accepted_tables() -> Iterator[pa.Table]:
        for rel in (f"samples/{c.unit}.parquet" for c in commits):
            yield to_training_rows(storage.read_table(rel))

    groups = _rebatch(accepted_tables(), rows_per_file)
    for name in names:
        group = next(groups, None)
        if group is None:  # no accepted sample at all: an empty but loadable file
            group = to_training_rows(_empty_samples())
        storage.write_table(name, group)


def _empty_samples() -> pa.Table:
    from pipeline.schemas import arrow_fields

    return pa.schema(arrow_fields("sample")).empty_table()
