"""Find prompt shards (globs, lists, s3:// URIs) and validate them before any GPU work."""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.commits import KEY_COLUMN, Committed, Key, hash_rows
from pipeline.ngrams import Contamination, digest, normalize
from pipeline.schemas import arrow_fields, check_columns
from pipeline.storage import filesystem


PREPARE_REPORT = "_prepare_report.json"
"""Written by `pipeline prepare` beside its shards: each shard's rows and sha256."""


class InputError(ValueError):
    """Input that cannot run; the message names the file (and column) at fault."""


@dataclass(frozen=True)
class Shard:
    uri: str
    """As the user can find it (s3://bucket/key or a local path)."""
    path: str
    """The filesystem path Ray Data reports for its rows."""
    rows: int
    schema: pa.Schema | None = None


def split_spec(spec: str | list[str]) -> list[str]:
    """`a.parquet,b/*.parquet` or a list of such -> individual patterns."""
    items = [spec] if isinstance(spec, str) else spec
    return [p.strip() for item in items for p in item.split(",") if p.strip()]


def resolve(patterns: list[str], allow: frozenset[str] = frozenset()) -> tuple[fsspec.AbstractFileSystem, list[Shard]]:
    """Expand globs in order; every pattern must match something. All shards share one filesystem.

    `allow` lets through columns a prompt shard may not have (curate's completions)."""
    if not patterns:
        raise InputError("no shards given: set `shards:` in the job or pass --shards")
    found: list[Shard] = []
    fs0 = None
    for pattern in patterns:
        fs, path = filesystem(pattern)
        if fs0 is not None and type(fs) is not type(fs0):
            raise InputError(f"{pattern}: all shards of a run must be on one filesystem")
        fs0 = fs
        if any(c in path for c in "*?["):
            matches = sorted(fs.glob(path))
        else:
            matches = [path] if fs.exists(path) else []
        if not matches:
            raise InputError(f"{pattern}: no such shard")
        proto = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
        for m in matches:
            if fs.isdir(m):
                raise InputError(f"{proto}{m}: is a folder; give a glob such as {pattern.rstrip('/')}/*.parquet")
            found.append(Shard(uri=f"{proto}{m}", path=m, rows=-1))
    assert fs0 is not None
    seen: set[str] = set()
    unique = [s for s in found if not (s.path in seen or seen.add(s.path))]
    return fs0, [validate(fs0, s, allow) for s in unique]


def validate(fs: fsspec.AbstractFileSystem, shard: Shard, allow: frozenset[str] = frozenset()) -> Shard:
    """Read the Parquet footer: readable, required columns present with the right types."""
    try:
        with fs.open(shard.path, "rb") as f:
            meta = pq.ParquetFile(f)
            schema = meta.schema_arrow
            rows = meta.metadata.num_rows
    except Exception as e:
        raise InputError(f"{shard.uri}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    problems = check_columns("prompt", schema, allow)
    if "completion" in allow and "completion" not in schema.names:
        problems.append("missing column 'completion' (curate reads existing completions)")
    if problems:
        raise InputError(f"{shard.uri}: " + "; ".join(problems))
    return Shard(shard.uri, shard.path, rows, schema)


def unified_schema(shards: list[Shard]) -> pa.Schema:
    """One read schema for all shards: the prompt columns at their declared types (so an
    all-null column written with Arrow's null type reads as strings), extra columns as first seen."""
    declared = {f.name: f for f in arrow_fields("prompt")}
    fields: dict[str, pa.Field] = {}
    for s in shards:
        assert s.schema is not None
        for f in s.schema:
            if f.name not in fields:
                fields[f.name] = pa.field(f.name, declared[f.name].type) if f.name in declared else f
    return pa.schema(list(fields.values()))


def iter_shard(fs: fsspec.AbstractFileSystem, path: str, schema: pa.Schema, rows: int,
               skip: frozenset[str] | None = None, constants: dict[str, int] | None = None) -> Iterator[pa.Table]:
    """A shard as tables of at most `rows` rows in `schema` (absent columns null), read as it
    streams: downstream stages start on the first rows while the rest of the file is read.

    With `skip` (generation), rows carry their content hash (`prompt_hash`) and those whose id
    is in `skip` (done, or an earlier copy of the same prompt) are left out; `constants` are
    added as int64 columns (the sampling round and its first sample index)."""
    with fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=rows):
            table = pa.Table.from_batches([batch])
            columns = [
                table.column(field.name).cast(field.type) if field.name in table.column_names
                else pa.nulls(table.num_rows, field.type)
                for field in schema
            ]
            table = pa.Table.from_arrays(columns, schema=schema)
            if skip is None:
                yield table
                continue
            table = table.append_column(KEY_COLUMN, pa.array(hash_rows(table), pa.string()))
            if skip:
                table = table.filter(pa.array([pid not in skip for pid in table.column("id").to_pylist()]))
            for name, value in (constants or {}).items():
                table = table.append_column(name, pa.array([value] * table.num_rows, pa.int64()))
            if table.num_rows:
                yield table


@dataclass
class Plan:
    """What a generation run has to do, decided before any GPU work."""

    todo: set[Key] = field(default_factory=set)
    skip: dict[str, frozenset[str]] = field(default_factory=dict)
    """Shard path -> ids not to read again (done, or another copy of an earlier prompt)."""
    flagged: dict[str, str] = field(default_factory=dict)
    """Prompt id -> `duplicate` / `contaminated`: committed without GPU time."""
    done: int = 0
    copies: int = 0
    round: int = 0
    first_sample: int = 0
    """The round's first sample index: rounds continue each other's indexes and seeds."""

    def shards(self, shards: list[Shard]) -> list[Shard]:
        """The shards that still hold a prompt to generate."""
        return [s for s in shards if len(self.skip.get(s.path, ())) < s.rows]

    def constants(self) -> dict[str, int]:
        """The columns each row of this plan carries to the engine and into its samples."""
        return {"round": self.round, "first_sample": self.first_sample}


def scan_prompts(fs: fsspec.AbstractFileSystem, shards: list[Shard], committed: Committed = Committed(),
                 dedup: bool = True, contamination: Contamination | None = None) -> Plan:
    """One pass over the shards before any GPU work: every prompt's key, what is already done.

    Ids must be non-empty; an id seen again with the same content (a symlinked or resharded
    copy) is read once, with other content it is an error, as is a prompt whose content changed
    since it was committed under its id. Prompts equal up to case, spacing and punctuation to an
    earlier one or to a committed one under another id (`duplicate`: the same source re-prepared
    under another name), or sharing an n-gram with a benchmark (`contaminated`), are flagged."""
    schema = unified_schema(shards)
    seen: dict[str, tuple[str, str]] = {}
    prompts_seen: set[bytes] = set(committed.prompts) if dedup else set()
    plan = Plan()
    for s in shards:
        skip: set[str] = set()
        row = 0
        for table in iter_shard(fs, s.path, schema, 8192):
            cols = table.select(["id", "prompt"]).to_pydict()
            for pid, prompt, h in zip(cols["id"], cols["prompt"], hash_rows(table)):
                where = f"{s.uri}: row {row}"
                row += 1
                if pid is None or not str(pid).strip():
                    raise InputError(f"{where}: column 'id' is empty")
                if pid in seen:
                    if seen[pid][1] != h:
                        raise InputError(f"{where}: id {pid!r} is also used by a different prompt in {seen[pid][0]}")
                    skip.add(pid)
                    plan.copies += 1
                    continue
                seen[pid] = (s.uri, h)
                if pid in committed.keys:
                    if committed.keys[pid] != h:
                        raise InputError(f"{where}: prompt {pid!r} differs from the one this output committed under "
                                         "that id; use a new output (or --new-version) for changed prompts")
                    skip.add(pid)
                    plan.done += 1
                    continue
                if prompt and dedup:
                    d = digest(normalize(prompt))
                    if d in prompts_seen:
                        plan.flagged[pid] = "duplicate"
                    prompts_seen.add(d)
                if prompt and pid not in plan.flagged and contamination is not None and contamination.hits(prompt):
                    plan.flagged[pid] = "contaminated"
                plan.todo.add((pid, h))
        plan.skip[s.path] = frozenset(skip)
    return plan


def file_sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Prepared:
    """What `pipeline prepare` recorded for one shard it wrote."""

    rows: int
    sha256: str


def prepared_shards(fs: fsspec.AbstractFileSystem, folder: str) -> dict[str, Prepared] | None:
    """The shards `pipeline prepare` wrote into `folder` (file name -> rows, sha256), or None when
    no prepare recorded them (shards made by other tools, or by a prepare before hashes were kept).

    Raises InputError when the last prepare into the folder did not finish moving its shards in."""
    path = posixpath.join(folder, PREPARE_REPORT)
    fs.invalidate_cache(path)
    try:
        report = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    if "state" not in report:
        return None
    if report["state"] != "complete":
        raise InputError(f"{folder}: the prepare writing these shards did not finish ({PREPARE_REPORT} says "
                         f"{report['state']!r}); rerun `pipeline prepare` into it")
    return {s["name"]: Prepared(int(s["rows"]), s["sha256"]) for s in report["shards"]}


def check_prepared(fs: fsspec.AbstractFileSystem, shards: list[Shard]) -> None:
    """Refuse shards that are not what `prepare` wrote: a stale file beside a rerun's output, one
    cut short (a valid Parquet file with fewer rows), one changed since. Shards in folders without
    a prepare report are not checked. Reads every recorded shard once (sha256)."""
    records: dict[str, dict[str, Prepared] | None] = {}
    for s in shards:
        folder, name = posixpath.split(s.path)
        if folder not in records:
            records[folder] = prepared_shards(fs, folder)
        known = records[folder]
        if known is None:
            continue
        want = known.get(name)
        if want is None:
            raise InputError(f"{s.uri}: not one of the {len(known)} shards `pipeline prepare` last wrote into this "
                             f"folder ({PREPARE_REPORT}); a leftover? remove it or pass only the prepared shards")
        if s.rows != want.rows:
            raise InputError(f"{s.uri}: {s.rows} rows, but prepare wrote {want.rows}: the file was cut short or "
                             f"replaced; rerun `pipeline prepare`")
        if file_sha256(fs, s.path) != want.sha256:
            raise InputError(f"{s.uri}: its content is not what prepare wrote (sha256 differs); rerun `pipeline prepare`")


def plan_round(fs: fsspec.AbstractFileSystem, shards: list[Shard], todo: set[Key], round: int,
               first_sample: int) -> Plan:
    """The plan of a later sampling round: only the prompts in `todo` (found by id: their
    content was checked by round 0's scan), each read from its first copy."""
    wanted = {pid for pid, _ in todo}
    plan = Plan(todo=set(todo), round=round, first_sample=first_sample)
    seen: set[str] = set()
    for s in shards:
        with fs.open(s.path, "rb") as f:
            ids = pq.ParquetFile(f).read(columns=["id"]).column("id").to_pylist()
        plan.skip[s.path] = frozenset(pid for pid in ids if pid not in wanted or pid in seen)
        seen.update(ids)
    return plan
