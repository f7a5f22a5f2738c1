"""Commits identified by content: the unit of exactly-once is a set of complete prompts.

A prompt's key is its id and a hash of everything else in its row, so the same prompts reach
the same keys whatever shards, paths or shard sizes carried them. The driver buffers samples
until a prompt has all of its round's sample indexes, then commits groups of complete prompts as
one exclusively created Parquet file (storage.py, invariant 3): a killed attempt keeps every
group it committed, so a rerun generates only what was unfinished. Under adaptive sampling each
round of a prompt is a unit of its own, (id, hash, round): its samples carry the round, and a
commit holds one round of its prompts.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.ngrams import digest, normalize
from pipeline.storage import INTERNAL, Fenced, Storage, table_bytes

KEY_COLUMN = "prompt_hash"
ROUND_COLUMN = "round"
Key = tuple[str, str]
"""(prompt id, prompt content hash)."""


def hash_rows(table: pa.Table) -> list[str]:
    """The content hash of each prompt row: every column but `id`, nulls left out, canonical JSON."""
    cols = [c for c in table.column_names if c != "id"]
    data = table.select(cols).to_pylist()
    return [
        hashlib.sha256(json.dumps({k: v for k, v in row.items() if v is not None}, sort_keys=True,
                                  ensure_ascii=False, default=str).encode()).hexdigest()[:24]
        for row in data
    ]


def commit_dir(fp: str) -> str:
    return f"{INTERNAL}/commits/{fp}"


def group_name(keys: list[Key], round: int = 0) -> str:
    """A commit's name: a hash of the prompt keys it holds (and their round after the first), so
    a retried commit of the same group meets its own earlier copy and never lands twice."""
    suffix = f"\t{round}" if round else ""
    text = "\n".join(f"{pid}\t{h}{suffix}" for pid, h in sorted(keys))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def commit_files(storage: Storage, fp: str) -> list[str]:
    """Every commit of a configuration, in the order publish reads them."""
    return [p for p in storage.list(commit_dir(fp)) if p.endswith(".parquet")]


@dataclass(frozen=True)
class Committed:
    """What the output already holds: each committed prompt's content hash by id, and the digests
    of the committed prompts' normalised texts, against which `prompts.dedup` flags the same
    prompt under a new id (a source re-prepared under another name) as a duplicate. A prompt
    committed as a `duplicate` itself adds no digest: its original may still be uncommitted (a
    killed run), and must not become a duplicate of its own duplicate."""

    keys: dict[str, str] = field(default_factory=dict)
    prompts: frozenset[bytes] = frozenset()


def committed_keys(storage: Storage, fp: str, digests: bool = True, threads: int = 16) -> Committed:
    """Every committed prompt's key and, with `digests` (what `prompts.dedup` needs), its text
    digest: two columns of each commit are read, or four (prompt and reject reason are
    dictionary-encoded, one entry per prompt or reason)."""
    files = commit_files(storage, fp)

    def keys(rel: str) -> tuple[list[tuple[str, str]], set[bytes]]:
        t = storage.read_table(rel, columns=["id", KEY_COLUMN] + (["prompt", "reject_reason"] if digests else []))
        pairs = list(zip(t.column("id").to_pylist(), t.column(KEY_COLUMN).to_pylist()))
        if not digests:
            return pairs, set()
        original = pc.fill_null(pc.not_equal(t.column("reject_reason"), pa.scalar("duplicate")), True)
        texts = pc.unique(t.filter(original).column("prompt").drop_null()).to_pylist()
        return pairs, {digest(normalize(x)) for x in texts}

    out: dict[str, str] = {}
    prompts: set[bytes] = set()
    with ThreadPoolExecutor(threads) as pool:
        for pairs, digests in pool.map(keys, files):
            out.update(pairs)
            prompts |= digests
    return Committed(out, frozenset(prompts))


def rounds_of(table: pa.Table) -> list[int]:
    """Each row's sampling round (commits made before rounds existed hold round 0 only)."""
    if ROUND_COLUMN not in table.column_names:
        return [0] * table.num_rows
    return [r or 0 for r in table.column(ROUND_COLUMN).to_pylist()]


def committed_prompts(storage: Storage, fp: str, columns: list[str] | None = None,
                      files: list[str] | None = None) -> Iterator[pa.Table]:
    """Each commit's samples (only `columns`, if given), every prompt round taken from exactly one
    commit (the first by name), so commits of overlapping groups (a resumed holder racing its
    successor) never duplicate one. Two reads over the same `files` yield the same rows in the
    same order."""
    taken: set[tuple[str, str, int]] = set()
    for rel in commit_files(storage, fp) if files is None else files:
        keyed = None if columns is None else list(dict.fromkeys(["id", KEY_COLUMN, ROUND_COLUMN, *columns]))
        table = storage.read_table(rel, columns=keyed, present_only=True)
        keys = list(zip(table.column("id").to_pylist(), table.column(KEY_COLUMN).to_pylist(), rounds_of(table)))
        fresh = [k not in taken for k in keys]
        taken.update(keys)
        if not all(fresh):
            table = table.filter(pa.array(fresh))
        if columns is not None:
            table = table.select([c for c in columns if c in table.column_names])
        if table.num_rows:
            yield table


class CommitWriter:
    """Buffers result rows per prompt and commits groups of complete prompts exactly once.

    A prompt is complete when every sample index of its round (`samples`, e.g. range(n) for
    round 0) has arrived; a repeated (id, hash, sample_index) from a replayed batch is dropped,
    never counted twice, as is a row of another round. Groups are flushed when `max_prompts` are
    complete or the oldest complete one waited `max_age_s`."""

    def __init__(self, fenced: Fenced, fp: str, attempt: str, samples: range, expected: set[Key],
                 max_prompts: int = 256, max_age_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 round: int = 0) -> None:
        self.fenced, self.fp, self.attempt, self.samples, self.round = fenced, fp, attempt, samples, round
        self.expected = expected
        self.max_prompts, self.max_age_s, self.clock = max_prompts, max_age_s, clock
        self.partial: dict[Key, dict[int, pa.Table]] = defaultdict(dict)
        self.complete: list[tuple[Key, pa.Table]] = []
        self.oldest: float | None = None
        self.done: set[Key] = set()
        self.duplicates = 0
        self.unexpected = 0
        self.commits: list[str] = []

    def add(self, batch: pa.Table) -> int:
        """Take one result batch; returns how many of its rows were new samples."""
        ids = batch.column("id").to_pylist()
        hashes = batch.column(KEY_COLUMN).to_pylist()
        indexes = batch.column("sample_index").to_pylist()
        rounds = rounds_of(batch)
        new = 0
        for row, key in enumerate(zip(ids, hashes)):
            if key not in self.expected or rounds[row] != self.round:
                self.unexpected += 1
                continue
            slots = self.partial[key] if key not in self.done else None
            if slots is None or indexes[row] in slots or indexes[row] not in self.samples:
                self.duplicates += 1
                continue
            slots[indexes[row]] = batch.slice(row, 1)
            new += 1
            if len(slots) == len(self.samples):
                self.complete.append((key, pa.concat_tables([slots[i] for i in self.samples])))
                del self.partial[key]
                self.done.add(key)
                self.oldest = self.oldest if self.oldest is not None else self.clock()
        if self.complete and (len(self.complete) >= self.max_prompts or self.clock() - (self.oldest or 0) >= self.max_age_s):
            self.flush()
        return new

    def flush(self) -> None:
        """Commit the complete prompts buffered so far as one file."""
        if not self.complete:
            return
        keys = [k for k, _ in self.complete]
        table = pa.concat_tables([t for _, t in self.complete], promote_options="default")
        name = group_name(keys, self.round)
        rel = posixpath.join(commit_dir(self.fp), f"{name}.parquet")
        meta = {"pipeline.commit": json.dumps({"attempt": self.attempt, "epoch": self.fenced.lease.epoch,
                                               "round": self.round, "prompts": len(keys), "rows": table.num_rows,
                                               "accepted": int(pc.sum(table.column("accepted")).as_py() or 0)})}
        self.fenced.create_exclusive(rel, table_bytes(table, meta))  # False: this very group is already in
        self.commits.append(rel)
        self.complete, self.oldest = [], None

    def missing(self) -> list[Key]:
        """Expected prompts that did not arrive complete."""
        return sorted(self.expected - self.done)
