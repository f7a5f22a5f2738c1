"""Publish one configuration's commits as a new immutable version; the pointers move last.

A version's files go to fresh folders (`data/<version>/`, `samples/<version>/`,
`prompts/<version>/`, `plots/<version>/`) named in an intent record first, so a crash leaves nothing unaccounted;
the version number is then claimed exclusively, and only then do `README.md` (the card that
`datasets` follows), `report.md` and `_manifest.json` point at it (storage.py, invariant 4).
Publishing the same commits with the same settings again changes nothing.
"""

from __future__ import annotations

import json
import math
import posixpath
import time
import uuid
from collections import Counter, defaultdict
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.card import render_card
from pipeline.config import SelectSpec
from pipeline import report
from pipeline.parse import assistant_content
from pipeline.commits import commit_files, committed_prompts
from pipeline.cost import totals
from pipeline.fingerprint import digest
from pipeline.prompts import READ, Voting, judged
from pipeline.storage import INTERNAL, Fenced, LeaseLost, Storage

MANIFEST = "_manifest.json"
VERSIONS = f"{INTERNAL}/versions"
KEPT_VERSIONS = 2  # the current one and its predecessor, for readers that resolved the card just before a switch
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
DATA_METADATA = (
    "id", "domain", "source", "answer", "model", "sample_index", "finish_reason",
    "prompt_tokens", "completion_tokens", "seed", "pass_rate",
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


PASS_RATE_BINS = 10


class Stats:
    """Counts by domain and reason, accept rates, prompts with an accepted sample, token lengths,
    pass rates and rounds per prompt.

    Memory stays bounded however large the run: `add` takes a table of samples, `add_prompts`
    prompt rows (each prompt once, however many tables its samples lie in), and token lengths
    and pass rates are histograms."""

    def __init__(self) -> None:
        self.by_domain: dict[str, Counter[str]] = defaultdict(Counter)
        self.prompts: Counter[str] = Counter()
        self.prompts_ok: Counter[str] = Counter()
        self.tokens: dict[str, Counter[int]] = {"accepted": Counter(), "rejected": Counter()}
        self.pass_rates: Counter[int] = Counter()
        self.rounds: Counter[int] = Counter()
        self.per_prompt: Counter[str] = Counter()

    def add(self, shard: pa.Table) -> None:
        cols = shard.select(["domain", "accepted", "reject_reason", "completion_tokens"]).to_pydict()
        for dom, ok, reason, toks in zip(*cols.values()):
            self.by_domain[dom][reason or "accepted"] += 1
            if toks is not None:
                self.tokens["accepted" if ok else "rejected"][toks] += 1

    def add_prompts(self, prompts: pa.Table) -> None:
        """Prompt rows (pipeline/prompts.py): prompts per domain, pass rates, rounds, tokens, votes."""
        cols = prompts.select(["domain", "pass_rate", "rounds", "samples", "passed", "accepted", "completion_tokens",
                               "votes", "pseudo_label"]).to_pydict()
        for dom, accepted in zip(cols["domain"], cols["accepted"]):
            self.prompts[dom] += 1
            self.prompts_ok[dom] += accepted > 0
        for rate, rounds, votes, label in zip(cols["pass_rate"], cols["rounds"], cols["votes"], cols["pseudo_label"]):
            self.pass_rates[min(int(rate * PASS_RATE_BINS), PASS_RATE_BINS - 1)] += 1
            self.rounds[rounds] += 1
            if votes is not None:
                self.per_prompt["voted" if label is not None else "vote_undecided"] += 1
        for name in ("samples", "passed", "accepted", "completion_tokens"):
            self.per_prompt[name] += sum(cols[name])
        self.per_prompt["prompts"] += prompts.num_rows

    def prompt_summary(self) -> dict[str, Any]:
        p = self.per_prompt
        return {
            "prompts": p["prompts"],
            "pass_rate_histogram": {f"{i / PASS_RATE_BINS:.1f}-{(i + 1) / PASS_RATE_BINS:.1f}": self.pass_rates[i]
                                    for i in range(PASS_RATE_BINS)},
            "mean_pass_rate": round(p["passed"] / p["samples"], 4) if p["samples"] else 0.0,
            "rounds": {str(k): v for k, v in sorted(self.rounds.items())},
            "completion_tokens": p["completion_tokens"],
            "completion_tokens_per_accepted": round(p["completion_tokens"] / p["accepted"], 1) if p["accepted"] else None,
            "votes": {"decided": p["voted"], "undecided": p["vote_undecided"]},
        }

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
            "prompts": self.prompt_summary(),
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


def data_file_names(folder: str, accepted: int, rows_per_file: int) -> list[str]:
    n = max(1, math.ceil(accepted / rows_per_file))
    return [f"{folder}/train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]


def folders(version: str) -> dict[str, str]:
    """Where a version's files live; nothing else is ever written under these names."""
    return {kind: f"{kind}/{version}" for kind in ("data", "samples", "prompts", "plots")}


def latest_version(storage: Storage) -> dict[str, Any] | None:
    """The record of the newest claimed version, if any."""
    seqs = [posixpath.basename(p)[:-5] for p in storage.list(VERSIONS) if p.endswith(".json")]
    seqs = sorted(s for s in seqs if s.isdigit())
    return storage.read_json(f"{VERSIONS}/{seqs[-1]}.json") if seqs else None


def publish(fenced: Fenced, fp: str, manifest: dict[str, Any], settings: dict[str, Any], started: float,
            selection: SelectSpec | None = None, rows_per_file: int = 100_000, voting: Voting | None = None,
            rounds: bool = False) -> dict[str, Any]:
    """Publish the commits of generation fingerprint `fp` as a new version (or leave the current
    one when nothing changed); returns its manifest. `rounds`: a prompt's samples may lie in
    several commits (adaptive sampling), so verdicts are decided over all commits first."""
    storage = fenced.storage
    files = commit_files(storage, fp)
    inputs = digest({"fp": fp, "commits": files, "settings": settings})

    def cost(summary: dict[str, Any]) -> dict[str, Any]:
        return {"cost": totals(storage, fp, {d: v["accepted"] for d, v in summary["domains"].items()})}

    light = READ + ["completion"] if (selection or SelectSpec()).dedup_completions else READ
    return publish_version(fenced, inputs, lambda: committed_prompts(storage, fp, files=files), manifest, started,
                           selection, rows_per_file, cost, voting=voting,
                           light_rows=(lambda: committed_prompts(storage, fp, light, files)) if rounds else None)


def publish_version(fenced: Fenced, inputs: str, groups: Callable[[], Iterable[pa.Table]], manifest: dict[str, Any],
                    started: float, selection: SelectSpec | None = None, rows_per_file: int = 100_000,
                    annotate: Callable[[dict[str, Any]], dict[str, Any]] | None = None, voting: Voting | None = None,
                    light_rows: Callable[[], Iterable[pa.Table]] | None = None) -> dict[str, Any]:
    """Publish the sample tables `groups()` yields as a new version, unless the newest version
    was made from the same `inputs` (a digest of everything that decides its content).

    Final verdicts (answer votes, pass rates, rejection sampling by `selection`) need all samples
    of a prompt: each table holds all of its prompts' samples, or `light_rows()` yields the same
    rows with light columns only, to decide over before the tables are streamed (pipeline/prompts.py).
    `annotate(stats)` adds fields to the manifest once the statistics are known."""
    storage = fenced.storage
    t0 = time.time()
    latest = latest_version(storage)
    if latest is not None and latest["inputs"] == inputs:
        _point(fenced, latest["manifest"])  # repairs pointers a crash left behind; else writes nothing
        return latest["manifest"]
    seq = (latest["seq"] if latest else 0) + 1
    version = f"v{seq:06d}-{uuid.uuid4().hex[:8]}"
    where = folders(version)
    intent = f"{VERSIONS}/pending-{version}.json"
    fenced.write_json(intent, {"version": version, "epoch": fenced.lease.epoch, "folders": where})
    stats = Stats()
    sample_files, prompt_files = [], []
    for i, (table, prompts) in enumerate(judged(groups, selection or SelectSpec(), voting, light_rows)):
        rel = f"{where['samples']}/samples-{i:05d}.parquet"
        fenced.write_table(rel, table)
        stats.add(table)
        sample_files.append(rel)
        if prompts.num_rows:
            rel = f"{where['prompts']}/prompts-{i:05d}.parquet"
            fenced.write_table(rel, prompts)
            stats.add_prompts(prompts)
            prompt_files.append(rel)
    summary = stats.summary()
    names = data_file_names(where["data"], summary["accepted"], rows_per_file)
    _write_data(fenced, sample_files, names, rows_per_file)
    plots = []
    for name, png in report.plots(summary, stats.tokens).items():
        rel = f"{where['plots']}/{name}"
        fenced.write_bytes(rel, png)
        plots.append(rel)
    manifest = {
        **manifest,
        "version": version,
        "seq": seq,
        "stats": summary,
        "files": {"data": names, "samples": sample_files, "prompts": prompt_files, "plots": plots},
        **(annotate(summary) if annotate else {}),
    }
    manifest["timings"] = {**manifest.get("timings", {}), "publish_s": round(time.time() - t0, 2),
                           "total_s": round(time.time() - started, 2)}
    record = {"seq": seq, "version": version, "inputs": inputs, "epoch": fenced.lease.epoch, "manifest": manifest}
    if not fenced.create_exclusive(f"{VERSIONS}/{seq:08d}.json", json.dumps(record, default=str).encode()):
        _remove_files(fenced, _version_files(manifest))
        fenced.remove(intent)
        raise LeaseLost(f"version {seq} of {storage.uri} was published by another run while this one wrote it")
    fenced.remove(intent)
    _point(fenced, manifest)
    _prune(fenced, seq)
    return manifest


def _point(fenced: Fenced, manifest: dict[str, Any]) -> None:
    """Make the card, the report and the manifest (last) name this version."""
    storage = fenced.storage
    try:
        current = storage.read_json(MANIFEST).get("version")
    except FileNotFoundError:
        current = None
    if current == manifest["version"]:
        return
    fenced.write_bytes("README.md", render_card(manifest).encode())
    fenced.write_bytes("report.md", report.markdown(manifest).encode())
    fenced.write_json(MANIFEST, manifest)


def _version_files(manifest: dict[str, Any]) -> list[str]:
    return [rel for files in manifest["files"].values() for rel in files]


def _remove_files(fenced: Fenced, files: Iterable[str]) -> None:
    for rel in files:
        fenced.remove(rel)


def _prune(fenced: Fenced, seq: int) -> None:
    """Delete versions older than the kept ones and interrupted publishes, file by named file."""
    storage = fenced.storage
    for rel in storage.list(VERSIONS):
        name = posixpath.basename(rel)[:-5]
        if name.isdigit() and int(name) <= seq - KEPT_VERSIONS:
            _remove_files(fenced, _version_files(storage.read_json(rel)["manifest"]))
            fenced.remove(rel)
        elif name.startswith("pending-"):
            pending = storage.read_json(rel)
            if pending.get("epoch", 0) < fenced.lease.epoch:  # a crashed earlier holder's; ours are claimed by now
                for folder in pending["folders"].values():
                    _remove_files(fenced, storage.list(folder))
                fenced.remove(rel)


def _write_data(fenced: Fenced, sample_files: list[str], names: list[str], rows_per_file: int) -> None:
    """Stream the accepted samples into `names`, `rows_per_file` rows each: one samples file at a
    time is in memory, not a data file's worth of long traces."""
    storage = fenced.storage
    schema = to_training_rows(_empty_samples()).schema
    pieces = (to_training_rows(storage.read_table(rel)) for rel in sample_files)
    carry: pa.Table | None = None
    for name in names:  # with no accepted sample at all, one empty but loadable file
        left = rows_per_file
        with fenced.parquet_writer(name, schema) as out:
            while left:
                piece = carry if carry is not None else next(pieces, None)
                if piece is None:
                    break
                out.write_table(piece.slice(0, left).select(schema.names).cast(schema))
                carry = piece.slice(left) if piece.num_rows > left else None
                left -= min(left, piece.num_rows)


def _empty_samples() -> pa.Table:
    from pipeline.schemas import arrow_fields

    return pa.schema(arrow_fields("sample")).empty_table()
