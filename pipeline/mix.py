"""`pipeline mix`: one training set from several published datasets (R1's ~600k reasoning and
~200k non-reasoning samples), written with `generate`'s guarantees (`publish_version`).

Two streaming passes over the sources' sample files (named by their manifests, never globbed),
one task per file in mix order, then manifest order, each a Ray Data plan:

1. Scan: every sample is judged on its own columns (outcome, domain, token band, the prompt's pass
   rate), capped per prompt, and given a seeded key; each prompt with an eligible sample gets its
   exact and normalised digests and a benchmark n-gram check. The driver keeps 16 bytes per
   eligible sample (key, ordinal) and 33 per eligible prompt (ordinal, two digests, flag, size),
   nothing else; then it removes contaminated prompts and duplicates (the earliest source, file
   and row keeps a prompt) and gives each source its quota: its samples with the smallest keys.
2. Pick: the same files again; a sample goes in when it is eligible, its prompt was kept and its
   key is within its source's threshold. The stream goes to `publish_version`, which writes a
   new version exactly once and moves the pointers last (docs/guarantees.md).

The selection depends only on the mix file and the sources' contents (keys hash the seed, the
source's name and the sample's prompt key and index), so the same mix gives the same rows in the
same order, byte for byte.
"""

from __future__ import annotations

import hashlib
import logging
import math
import posixpath
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import console
from pipeline.config import ConfigError, SelectSpec
from pipeline.errors import RunFailed
from pipeline.fingerprint import digest
from pipeline.mixconfig import ACCEPTED, Band, MixConfig, MixResources, SourceSpec
from pipeline.ngrams import Contamination, normalize
from pipeline.ngrams import digest as text_digest
from pipeline.publish import MANIFEST, VERSIONS, latest_version, publish_version
from pipeline.schemas import arrow_fields, load
from pipeline.storage import Fenced, Storage, filesystem, writing

log = logging.getLogger("pipeline")

# What happened to a sample, in the order the steps run (a sample counts for the first that removed it).
ELIGIBLE, OUTCOME, DOMAIN, TOKENS, PASS_RATE, CAPPED = range(6)
SAMPLE_STEPS = ("eligible", "outcome", "domain", "completion_tokens", "pass_rate", "capped")
KEPT, CONTAMINATED, DUPLICATE, NEAR_DUPLICATE = range(4)
PROMPT_STEPS = ("kept", "contaminated", "duplicate", "near_duplicate")
STEPS = (*SAMPLE_STEPS[1:], *PROMPT_STEPS[1:], "not_selected")

SCAN_COLUMNS = ("id", "prompt_hash", "prompt", "domain", "sample_index", "accepted", "reject_reason",
                "completion_tokens")
PROMPT_KEY = ("id", "prompt_hash")
SELECTION_REASONS = frozenset(c for c, r in load("reasons")["reasons"].items() if r["stage"] == "select")
OUTPUT = pa.schema([*arrow_fields("sample"), pa.field("mix_source", pa.string())])
ALL = (np.iinfo(np.uint64).max, np.iinfo(np.uint64).max)
GROUP_BYTES = 128 * 2**20  # a samples file of the mix holds at most about this much (and whole prompts)


class MixError(ConfigError):
    """The mix file cannot be met by these sources (exit 2); nothing was published."""


# -- sources ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """A published dataset as the mix reads it: its manifest and its samples files."""

    spec: SourceSpec
    storage: Storage
    manifest: dict[str, Any]

    @property
    def files(self) -> list[str]:
        return list(self.manifest["files"]["samples"])

    def provenance(self) -> dict[str, Any]:
        m = self.manifest
        return {"name": self.spec.name, "dataset": self.spec.dataset, "version": m.get("version"),
                "run_id": m.get("run_id"), "model": m.get("model"), "fingerprint": m.get("fingerprint", {}),
                "job": (m.get("job") or {}).get("name")}


def open_source(spec: SourceSpec) -> Source:
    """Read a source's manifest (the current version, or the pinned one from its version log)."""
    storage = Storage(spec.dataset)
    try:
        manifest = storage.read_json(MANIFEST)
    except FileNotFoundError:
        raise ConfigError(f"source {spec.name}: {spec.dataset} holds no {MANIFEST}; name a published dataset") from None
    if spec.version is not None and manifest.get("version") != spec.version:
        records = (storage.read_json(rel) for rel in storage.list(VERSIONS) if posixpath.basename(rel)[:-5].isdigit())
        found = [r["manifest"] for r in records if r["manifest"]["version"] == spec.version]
        if not found:
            raise ConfigError(f"source {spec.name}: version {spec.version} is not (or no longer) kept in "
                              f"{spec.dataset}; its current version is {manifest.get('version')}")
        manifest = found[0]
    return Source(spec, storage, manifest)


def _apart(output: Storage, sources: list[Source]) -> None:
    for s in sources:
        if output.contains(s.storage.fs, s.storage.root) or s.storage.contains(output.fs, output.root):
            raise ConfigError(f"source {s.spec.name} ({s.spec.dataset}) and the output {output.uri} overlap; "
                              "write the mix elsewhere")


def _file_sha(uri: str) -> str:
    fs, path = filesystem(uri)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def inputs_digest(cfg: MixConfig, sources: list[Source]) -> str:
    """Everything that decides the mix's content: the mix file, each source's version, the benchmarks."""
    return digest({"mix": cfg.content(),
                   "sources": [{"dataset": s.spec.dataset, "version": s.manifest["version"]} for s in sources],
                   "benchmarks": [_file_sha(p) for p in cfg.decontaminate]})


# -- reading whole prompts ----------------------------------------------------------------------

def _last_start(table: pa.Table, key: tuple[str, ...]) -> int:
    """The row where the table's last prompt begins."""
    cols = [table.column(c).to_pylist() for c in key]
    rows = list(zip(*cols))
    i = len(rows) - 1
    while i > 0 and rows[i - 1] == rows[-1]:
        i -= 1
    return i


def whole_prompts(tables: Iterable[pa.Table], key: tuple[str, ...], rows: int,
                  max_bytes: int | None = None) -> Iterator[pa.Table]:
    """Regroup a stream whose prompts are contiguous into tables of about `rows` rows (or
    `max_bytes`), each holding every row of its prompts."""
    buf: list[pa.Table] = []
    size = nbytes = 0
    for t in tables:
        if not t.num_rows:
            continue
        buf.append(t)
        size += t.num_rows
        nbytes += t.nbytes
        if size >= rows or (max_bytes is not None and nbytes >= max_bytes):
            whole = pa.concat_tables(buf)
            cut = _last_start(whole, key)
            if cut:
                yield whole.slice(0, cut)
                whole = whole.slice(cut)
            buf, size, nbytes = [whole], whole.num_rows, whole.nbytes
    if buf:
        yield pa.concat_tables(buf)


class Reader:
    """Opens a source's samples files where a task runs (a Storage per source, reused)."""

    def __init__(self, datasets: list[str]) -> None:
        self.datasets = datasets
        self.open: dict[int, Storage] = {}

    def chunks(self, source: int, rel: str, columns: tuple[str, ...] | None, rows: int) -> Iterator[pa.Table]:
        storage = self.open.setdefault(source, Storage(self.datasets[source]))
        with storage.fs.open(storage.path(rel), "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            missing = [c for c in SCAN_COLUMNS if c not in names]
            if missing:
                raise MixError(f"{storage.url(rel)} lacks columns {missing}: not a samples file of a published dataset")
            wanted = None if columns is None else [c for c in (*columns, "pass_rate") if c in names]
            batches = (pa.Table.from_batches([b]) for b in pf.iter_batches(batch_size=rows, columns=wanted))
            yield from whole_prompts(batches, PROMPT_KEY, rows)


# -- judging samples ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Marks:
    """Per sample of a chunk: its step (ELIGIBLE or what removed it), seeded key, ordinal, and
    the ordinal of its prompt (its first row); `starts` are the rows where prompts begin."""

    status: np.ndarray
    key: np.ndarray
    ordinal: np.ndarray
    prompt: np.ndarray
    starts: np.ndarray


def _fail(status: np.ndarray, failed: np.ndarray, step: int) -> None:
    status[(status == ELIGIBLE) & failed] = step


def _within(values: np.ndarray, band: Band) -> np.ndarray:
    ok = ~np.isnan(values)
    if band.min is not None:
        ok &= values >= band.min
    if band.max is not None:
        ok &= values <= band.max
    return ok


def _floats(col: pa.ChunkedArray) -> np.ndarray:
    return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)


def selection_keys(seed: int, source: str, ids: list[str], hashes: list[str], indexes: list[int]) -> np.ndarray:
    """A uniform 64-bit key per sample from the seed, the source's name and the sample's identity."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(f"{seed}\0{source}\0{i}\0{h}\0{k}".encode(), digest_size=8).digest(), "big")
         for i, h, k in zip(ids, hashes, indexes)), dtype=np.uint64, count=len(ids))


def mark(chunk: pa.Table, source: int, file: int, row0: int, spec: SourceSpec, seed: int) -> Marks:
    """Filter, key and cap one chunk of whole prompts of a source file."""
    n = chunk.num_rows
    if file >= 1 << 24 or row0 + n >= 1 << 32:
        raise MixError(f"source {spec.name}: more than 2^24 files or 2^32 rows in a file")
    ids, hashes = chunk.column("id").to_pylist(), chunk.column("prompt_hash").to_pylist()
    starts = np.array([i for i in range(n) if i == 0 or (ids[i], hashes[i]) != (ids[i - 1], hashes[i - 1])], np.int64)
    sizes = np.diff(np.append(starts, n))
    ordinal = np.uint64((source << 56) | (file << 32)) + np.arange(row0, row0 + n, dtype=np.uint64)
    prompt = np.repeat(ordinal[starts], sizes)
    key = selection_keys(seed, spec.name, ids, hashes, chunk.column("sample_index").to_pylist())

    f = spec.filter
    status = np.zeros(n, np.uint8)
    accepted = chunk.column("accepted").fill_null(False).to_numpy(zero_copy_only=False)
    reasons = chunk.column("reject_reason").to_pylist()
    taken = set(f.reasons)
    outcome = ((ACCEPTED if ok else r) in taken for ok, r in zip(accepted, reasons))
    _fail(status, ~np.fromiter(outcome, bool, n), OUTCOME)
    if f.domains is not None:
        domain = pc.is_in(chunk.column("domain"), pa.array(f.domains)).fill_null(False)
        _fail(status, ~domain.to_numpy(zero_copy_only=False), DOMAIN)
    if not f.completion_tokens.open:
        _fail(status, ~_within(_floats(chunk.column("completion_tokens")), f.completion_tokens), TOKENS)
    if not f.pass_rate.open:
        if "pass_rate" in chunk.column_names:
            rate = _floats(chunk.column("pass_rate"))[starts]
        else:
            passed = accepted | np.fromiter((r in SELECTION_REASONS for r in reasons), bool, n)
            rate = np.add.reduceat(passed.astype(np.float64), starts) / sizes
        _fail(status, ~np.repeat(_within(rate, f.pass_rate), sizes), PASS_RATE)
    if spec.max_per_prompt is not None:
        for s, e in zip(starts, np.append(starts[1:], n)):
            ok = np.flatnonzero(status[s:e] == ELIGIBLE) + s
            if len(ok) > spec.max_per_prompt:
                status[ok[np.lexsort((ordinal[ok], key[ok]))][spec.max_per_prompt:]] = CAPPED
    return Marks(status, key, ordinal, prompt, starts)


def _u64(text: str) -> int:
    return int.from_bytes(text_digest(text), "big")


# -- the two passes, as Ray Data UDFs over file tasks -------------------------------------------

class FilePass:
    """A pass over the sources' samples files; as a Ray Data UDF, each input row is one file."""

    def __init__(self, cfg: MixConfig) -> None:
        self.cfg = cfg
        self.reader = Reader([s.dataset for s in cfg.sources])

    def __call__(self, tasks: pa.Table) -> Iterator[pa.Table]:
        for task in tasks.to_pylist():
            yield from self.file(task["source"], task["file"], task["rel"])

    def file(self, source: int, file: int, rel: str) -> Iterator[pa.Table]:
        raise NotImplementedError


class Scan(FilePass):
    """Pass 1 over one file: per sample its step, key and ordinals; per eligible prompt its
    digests (exact: the stripped text; near: `ngrams.normalize`, as `prepare`) and contamination."""

    def __init__(self, cfg: MixConfig, contamination: Contamination | None) -> None:
        super().__init__(cfg)
        self.contamination = contamination

    def file(self, source: int, file: int, rel: str) -> Iterator[pa.Table]:
        spec, row0 = self.cfg.sources[source], 0
        for chunk in self.reader.chunks(source, rel, SCAN_COLUMNS, self.cfg.resources.batch_rows):
            m = mark(chunk, source, file, row0, spec, self.cfg.seed)
            row0 += chunk.num_rows
            n = chunk.num_rows
            near, exact = np.zeros(n, np.uint64), np.zeros(n, np.uint64)
            contaminated = np.zeros(n, bool)
            prompts = chunk.column("prompt")
            for s, e in zip(m.starts, np.append(m.starts[1:], n)):
                if (m.status[s:e] == ELIGIBLE).any():
                    text = prompts[int(s)].as_py() or ""
                    near[s:e], exact[s:e] = _u64(normalize(text)), _u64(text.strip())
                    contaminated[s:e] = self.contamination is not None and self.contamination.hits(text) > 0
            yield pa.table({"status": m.status, "key": m.key, "ordinal": m.ordinal, "prompt": m.prompt,
                            "near": near, "exact": exact, "contaminated": contaminated})


class Pick(FilePass):
    """Pass 2 over one file: the samples that go into the mix, in the output schema."""

    def __init__(self, cfg: MixConfig, removed: np.ndarray, thresholds: list[tuple[int, int] | None]) -> None:
        super().__init__(cfg)
        self.removed, self.thresholds = removed, thresholds

    def file(self, source: int, file: int, rel: str) -> Iterator[pa.Table]:
        spec, row0, limit = self.cfg.sources[source], 0, self.thresholds[source]
        if limit is None:
            return
        for chunk in self.reader.chunks(source, rel, None, self.cfg.resources.batch_rows):
            m = mark(chunk, source, file, row0, spec, self.cfg.seed)
            row0 += chunk.num_rows
            keep = (m.status == ELIGIBLE) & ~_member(m.prompt, self.removed)
            key, at = np.uint64(limit[0]), np.uint64(limit[1])
            keep &= (m.key < key) | ((m.key == key) & (m.ordinal <= at))
            if keep.any():
                rows = output_rows(chunk.filter(pa.array(keep)), spec.name)
                yield rows.append_column("_prompt", pa.array(m.prompt[keep]))


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if not len(sorted_set):
        return np.zeros(len(values), bool)
    i = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[i] == values


def output_rows(samples: pa.Table, source: str) -> pa.Table:
    """Samples in the mix's one schema (the sample schema and `mix_source`), all accepted."""
    n = samples.num_rows
    cols = []
    for f in OUTPUT:
        if f.name == "accepted":
            cols.append(pa.array(np.ones(n, bool)))
        elif f.name == "mix_source":
            cols.append(pa.array([source] * n, pa.string()))
        elif f.name in samples.column_names and f.name not in ("reject_reason", "reject_details"):
            cols.append(samples.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(cols, schema=OUTPUT)


def stream(udf: type[FilePass], args: tuple[Any, ...], tasks: list[dict[str, Any]],
           res: MixResources) -> Iterator[pa.Table]:
    """Run `udf` over the file tasks and yield its tables in task order: on Ray Data (an actor pool,
    order preserved), or in this process when `resources.actors` is 0."""
    if res.actors == 0:
        local = udf(*args)
        for task in tasks:
            yield from local.file(task["source"], task["file"], task["rel"])
        return
    import ray

    from pipeline.run import init_ray

    init_ray()
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False
    try:
        ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
        ds = ds.map_batches(udf, fn_constructor_args=args, batch_size=1, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=res.actors), num_cpus=res.actor_cpus)
        yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


# -- the driver's decisions ---------------------------------------------------------------------

def removals(ordinal: np.ndarray, near: np.ndarray, exact: np.ndarray, contaminated: np.ndarray,
             dedup: str) -> np.ndarray:
    """Per prompt: KEPT, CONTAMINATED, DUPLICATE or NEAR_DUPLICATE. Among prompts sharing a digest
    the smallest ordinal (earliest source, file, row) is kept; a removed one is a DUPLICATE when
    its text equals the kept one's, else a NEAR_DUPLICATE."""
    out = np.where(contaminated, CONTAMINATED, KEPT).astype(np.uint8)
    if dedup == "none":
        return out
    group = near if dedup == "near" else exact
    idx = np.flatnonzero(~contaminated)
    order = idx[np.lexsort((ordinal[idx], group[idx]))]
    g = group[order]
    first = np.ones(len(order), bool)
    first[1:] = g[1:] != g[:-1]
    leader = order[np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))]
    dup, lead = order[~first], leader[~first]
    out[dup] = np.where(exact[dup] == exact[lead], DUPLICATE, NEAR_DUPLICATE)
    return out


def quotas(specs: list[SourceSpec], available: list[int], total: int | None) -> list[int]:
    """How many samples each source is asked for: its count, all it has, or its weight's share
    (largest remainders, so the shares sum exactly) of `total` or of the largest mix the
    weighted sources can fill."""
    want = [s.count if s.count is not None else a for s, a in zip(specs, available)]
    weighted = [i for i, s in enumerate(specs) if s.weight is not None]
    if not weighted:
        return want
    weights = {i: Fraction(specs[i].weight) for i in weighted}  # type: ignore[arg-type]
    whole = sum(weights.values())
    if total is not None:
        size = total - sum(w for i, w in enumerate(want) if i not in weights)
        if size < 0:
            raise MixError(f"total {total} is smaller than what the count and take-all sources give ({total - size})")
    else:
        size = min(math.floor(available[i] * whole / weights[i]) for i in weighted)
    exact = {i: size * weights[i] / whole for i in weighted}
    shares = {i: math.floor(x) for i, x in exact.items()}
    for i in sorted(weighted, key=lambda i: (-(exact[i] - shares[i]), i))[: size - sum(shares.values())]:
        shares[i] += 1
    return [shares.get(i, w) for i, w in enumerate(want)]


def threshold(keys: np.ndarray, ordinals: np.ndarray, k: int) -> tuple[int, int] | None:
    """The largest (key, ordinal) among the k smallest; None when nothing is taken."""
    if k <= 0:
        return None
    if k >= len(keys):
        return ALL
    t = np.lexsort((ordinals, keys))[k - 1]
    return int(keys[t]), int(ordinals[t])


@dataclass
class Decision:
    removed: np.ndarray
    thresholds: list[tuple[int, int] | None]
    report: list[dict[str, Any]]

    @property
    def selected(self) -> list[int]:
        return [r["selected"] for r in self.report]


class Plan:
    """The driver's side of pass 1: compact records of eligible prompts and samples, and counts."""

    def __init__(self, sources: int) -> None:
        self.counts = np.zeros((sources, len(SAMPLE_STEPS)), np.int64)
        self.prompts_read = np.zeros(sources, np.int64)
        self.p: dict[str, list[np.ndarray]] = {k: [] for k in ("ordinal", "near", "exact", "contaminated", "size")}
        self.s: dict[str, list[np.ndarray]] = {"key": [], "ordinal": []}
        self.last: int | None = None  # the last prompt seen, in case a block boundary split it
        self.last_read: int | None = None

    def add(self, t: pa.Table) -> None:
        if not t.num_rows:
            return
        c = {name: t.column(name).to_numpy() for name in t.column_names}
        source = (c["ordinal"] >> np.uint64(56)).astype(np.int64)
        np.add.at(self.counts, (source, c["status"].astype(np.int64)), 1)
        new = np.ones(len(source), bool)
        new[1:] = c["prompt"][1:] != c["prompt"][:-1]
        new[0] = c["prompt"][0] != self.last_read
        np.add.at(self.prompts_read, source[new], 1)
        self.last_read = int(c["prompt"][-1])
        ok = c["status"] == ELIGIBLE
        if not ok.any():
            return
        self.s["key"].append(c["key"][ok])
        self.s["ordinal"].append(c["ordinal"][ok])
        prompt = c["prompt"][ok]
        starts = np.flatnonzero(np.append(True, prompt[1:] != prompt[:-1]))
        sizes = np.diff(np.append(starts, len(prompt)))
        if self.last is not None and prompt[0] == self.last:  # the prompt continues from the last block
            self.p["size"][-1][-1] += sizes[0]
            starts, sizes = starts[1:], sizes[1:]
        self.last = int(prompt[-1])
        self.p["ordinal"].append(prompt[starts])
        self.p["size"].append(sizes.astype(np.int64))
        for name in ("near", "exact", "contaminated"):
            self.p[name].append(c[name][ok][starts])

    def state_bytes(self) -> int:
        """Memory the records hold (what grows with the sources)."""
        return sum(a.nbytes for arrays in (*self.p.values(), *self.s.values()) for a in arrays)

    def decide(self, cfg: MixConfig) -> Decision:
        p = {k: np.concatenate(v) if v else np.zeros(0, np.uint64) for k, v in self.p.items()}
        keys = np.concatenate(self.s["key"]) if self.s["key"] else np.zeros(0, np.uint64)
        ordinals = np.concatenate(self.s["ordinal"]) if self.s["ordinal"] else np.zeros(0, np.uint64)
        fate = removals(p["ordinal"], p["near"], p["exact"], p["contaminated"].astype(bool), cfg.dedup)
        sizes = p["size"].astype(np.int64)
        prompt_of = np.repeat(np.arange(len(fate)), sizes)
        sample_fate = fate[prompt_of]
        source = (ordinals >> np.uint64(56)).astype(np.int64)
        n = len(cfg.sources)
        removed = np.zeros((n, len(PROMPT_STEPS)), np.int64)
        np.add.at(removed, (source, sample_fate.astype(np.int64)), 1)
        candidates = [np.flatnonzero((source == i) & (sample_fate == KEPT)) for i in range(n)]
        available = [len(c) for c in candidates]
        want = quotas(cfg.sources, available, cfg.total)
        report, limits = [], []
        for i, spec in enumerate(cfg.sources):
            take = min(want[i], available[i])
            if take < want[i]:
                log.warning("source %s: %d samples asked for, only %d qualify", spec.name, want[i], take)
            limit = threshold(keys[candidates[i]], ordinals[candidates[i]], take)
            limits.append(limit)
            chosen = candidates[i]
            if limit is not None and limit != ALL:
                k, o = np.uint64(limit[0]), np.uint64(limit[1])
                chosen = chosen[(keys[chosen] < k) | ((keys[chosen] == k) & (ordinals[chosen] <= o))]
            elif limit is None:
                chosen = chosen[:0]
            steps = {SAMPLE_STEPS[s]: int(self.counts[i, s]) for s in range(1, len(SAMPLE_STEPS))}
            steps |= {PROMPT_STEPS[s]: int(removed[i, s]) for s in range(1, len(PROMPT_STEPS))}
            steps["not_selected"] = available[i] - take
            report.append({"samples_read": int(self.counts[i].sum()), "prompts_read": int(self.prompts_read[i]),
                           "removed": steps, "requested": int(want[i]), "available": available[i],
                           "selected": take, "prompts_selected": len(np.unique(prompt_of[chosen]))})
        return Decision(np.sort(p["ordinal"][fate != KEPT]), limits, report)


# -- the run ------------------------------------------------------------------------------------

def _tasks(sources: list[Source]) -> list[dict[str, Any]]:
    return [{"source": i, "file": j, "rel": rel} for i, s in enumerate(sources) for j, rel in enumerate(s.files)]


def _counted(blocks: Iterable[pa.Table], selected: np.ndarray) -> Iterator[pa.Table]:
    for t in blocks:
        source = (t.column("_prompt").to_numpy() >> np.uint64(56)).astype(np.int64)
        np.add.at(selected, source, 1)
        yield t


def mix(cfg: MixConfig) -> str:
    """Make (or keep, when nothing changed) the mix's dataset; returns its URI."""
    started = time.time()
    sources = [open_source(s) for s in cfg.sources]
    storage = Storage(cfg.output)
    _apart(storage, sources)
    inputs = inputs_digest(cfg, sources)
    with writing(storage, "mix", cfg.lease_ttl_s, log) as fenced:
        attempt = fenced.lease.attempt
        latest = latest_version(storage)
        if latest is not None and latest["inputs"] == inputs:
            log.info("%s already holds this mix of these source versions (%s)", storage.uri, latest["version"])
            publish_version(fenced, inputs, lambda: iter(()), latest["manifest"], started)  # repairs pointers only
            return storage.url()
        with console.run_log(console.log_path(storage, attempt)) as log_file:  # Ray's and the workers' output
            log.info("log %s (Ray and its workers; --verbose shows it here)", log_file)
            manifest = _make(cfg, sources, fenced, inputs, attempt, started)
    log.info("published %s: %d samples", manifest["version"], manifest["stats"]["samples"])
    return storage.url()


def _make(cfg: MixConfig, sources: list[Source], fenced: Fenced, inputs: str, attempt: str,
          started: float) -> dict[str, Any]:
    from pipeline.prepare import benchmark_ngrams
    from pipeline.run import versions

    contamination = benchmark_ngrams(cfg.decontaminate, cfg.ngram) if cfg.decontaminate else None
    tasks = _tasks(sources)
    t0 = time.time()
    plan = Plan(len(sources))
    for block in stream(Scan, (cfg, contamination), tasks, cfg.resources):
        plan.add(block)
    decision = plan.decide(cfg)
    log.info("scan: %d files, %d bytes of selection state; taking %s", len(tasks), plan.state_bytes(),
             dict(zip((s.spec.name for s in sources), decision.selected)))
    if not sum(decision.selected):
        raise MixError("the mix selects no sample: check the sources' filters (report: "
                       f"{[{'source': s.spec.name, **r['removed']} for s, r in zip(sources, decision.report)]})")
    scan_s = round(time.time() - t0, 2)
    selected = np.zeros(len(sources), np.int64)

    def groups() -> Iterator[pa.Table]:
        blocks = _counted(stream(Pick, (cfg, decision.removed, decision.thresholds), tasks, cfg.resources), selected)
        for group in whole_prompts(blocks, ("_prompt",), cfg.rows_per_data_file, GROUP_BYTES):
            yield group.drop_columns(["_prompt"])
        if selected.tolist() != decision.selected:  # before the version is claimed: nothing is published
            raise RunFailed(f"picked {selected.tolist()} samples where the scan chose {decision.selected}: "
                            "a source changed while it was read; rerun the same command")

    manifest = {
        "kind": "mix",
        "run_id": attempt,
        "output": fenced.storage.url(),
        "model": ", ".join(dict.fromkeys(str(s.manifest.get("model")) for s in sources)),
        "job": cfg.model_dump(mode="json"),
        "fingerprint": {"mix": inputs},
        "sources": [{**s.provenance(), **r} for s, r in zip(sources, decision.report)],
        "versions": versions(),
        "timings": {"scan_s": scan_s},
    }
    return publish_version(fenced, inputs, groups, manifest, started, SelectSpec(dedup_completions=False),
                           cfg.rows_per_data_file)

