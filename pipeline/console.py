"""What a person sees, and where everything else goes.

The console (stderr) carries the pipeline's own lines only: a header, one progress display (a
bar on a terminal, a line every few seconds in logs), a summary, warnings and errors; stdout
carries the result's URI alone. Engine, Ray and library output goes to the run's log file:
worker stdout/stderr that Ray streams to the driver, the loggers Ray, Ray Data and vLLM give
handlers of their own, Python warnings. `--verbose` shows all of it on the console too, and a
run that fails shows the lines that matter from it.

Nothing here knows Ray's plan; `route_worker_output` is the one place that touches Ray.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Any, Iterable, Iterator, Mapping, Sequence

import pyarrow as pa

from pipeline.storage import INTERNAL, Storage

log = logging.getLogger("pipeline")
WORKERS = "workers"
"""Logger of the worker lines Ray streams to the driver."""
LIBRARIES = ("ray", "ray.data", "vllm")
"""Loggers their libraries give a terminal handler of their own (and stop propagating)."""
FILE_FORMAT = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
PROGRESS_EVERY_S = 30.0


# -- logging set-up --------------------------------------------------------------------------------


class ConsoleHandler(logging.Handler):
    """The pipeline's own records, as plain lines on the console (through tqdm, so they never
    tear a progress bar); with `verbose`, every record. A record logged with
    `extra={"console": False}` goes to the log file only."""

    def __init__(self, stream: IO[str], verbose: bool) -> None:
        super().__init__(logging.DEBUG)
        self.stream, self.verbose = stream, verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "console", True) is False:
            return False
        return _ours(record) or (self.verbose and _not_debug(record))

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info and self.verbose:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        if _ours(record):
            return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"
        return text if record.name == WORKERS else f"[{record.name}] {record.levelname} {text}"

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


class Recent(logging.Handler):
    """The last warnings and errors of engines, Ray and libraries: what a failed run shows."""

    def __init__(self, keep: int = 500) -> None:
        super().__init__(logging.WARNING)
        self.records: collections.deque[logging.LogRecord] = collections.deque(maxlen=keep)

    def emit(self, record: logging.LogRecord) -> None:
        if not _ours(record):
            self.records.append(record)

    def lines(self, most: int = 20) -> list[str]:
        """The last `most` errors (a traceback counts as errors); the last warnings if none."""
        errors = [r for r in self.records if r.levelno >= logging.ERROR]
        chosen = errors or list(self.records)
        return [_plain(r) for r in chosen[-most:]]


class Pending(logging.Handler):
    """Records logged before the run's log file exists; they open it."""

    def __init__(self, keep: int = 10_000) -> None:
        super().__init__(logging.DEBUG)
        self.records: collections.deque[logging.LogRecord] = collections.deque(maxlen=keep)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Session:
    """The console set up by the command line (absent when the pipeline is used as a library)."""

    verbose: bool = False
    every_s: float = PROGRESS_EVERY_S
    stream: IO[str] = field(default_factory=lambda: sys.stderr)
    handlers: list[logging.Handler] = field(default_factory=list)
    recent: Recent = field(default_factory=Recent)
    pending: Pending = field(default_factory=Pending)


_session: Session | None = None


def _ours(record: logging.LogRecord) -> bool:
    return record.name == "pipeline" or record.name.startswith("pipeline.")


def _not_debug(record: logging.LogRecord) -> bool:
    """Libraries' debug records stay out even with --verbose (Ray Data logs its scheduler at DEBUG)."""
    return _ours(record) or record.levelno >= logging.INFO


def _plain(record: logging.LogRecord) -> str:
    return record.getMessage() if record.name == WORKERS else f"[{record.name}] {record.levelname} {record.getMessage()}"


def setup(verbose: bool = False, every_s: float = PROGRESS_EVERY_S, stream: IO[str] | None = None) -> Session:
    """Console logging for a command: the pipeline's lines on `stream` (stderr), everything else
    kept for the run's log file (and shown too when `verbose`)."""
    global _session
    teardown()
    session = Session(verbose=verbose, every_s=every_s, stream=stream or sys.stderr)
    session.handlers = [ConsoleHandler(session.stream, verbose), session.recent, session.pending]
    root = logging.getLogger()
    root.removeHandler(_AFTER)
    root.setLevel(logging.INFO)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in session.handlers:
        root.addHandler(handler)
    logging.captureWarnings(True)  # Python warnings (deprecations) become log records: the log file
    _session = session
    return session


_AFTER = logging.NullHandler()
"""Where records go once a command's console is gone: Ray's workers still report while the driver
shuts Ray down, and without a handler Python would print them on stderr (logging.lastResort)."""


def teardown() -> None:
    """Undo `setup` (the CLI at the end of each command; tests set up several consoles in one process)."""
    global _session
    if _session is not None:
        for handler in _session.handlers:
            logging.getLogger().removeHandler(handler)
        logging.getLogger().addHandler(_AFTER)
        _session = None


def local_log_dir() -> str:
    """Where logs of runs whose output is not a local folder go: DISTILL_LOG_DIR, else the user's cache."""
    if os.environ.get("DISTILL_LOG_DIR"):
        return os.environ["DISTILL_LOG_DIR"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "distill-pipeline", "logs")


def log_path(storage: Storage | None, run: str, kind: str = "generate") -> str:
    """The run's log file: in the output's bookkeeping folder when it is local, else in a local
    folder named after the output (object storage has no appendable files)."""
    if storage is not None and storage.local:
        return storage.path(f"{INTERNAL}/logs/{run}.log")
    where = re.sub(r"[^A-Za-z0-9._-]+", "_", storage.uri.split("://", 1)[-1]).strip("_") if storage else kind
    return os.path.join(local_log_dir(), where, f"{run}.log")


@contextlib.contextmanager
def run_log(path: str) -> Iterator[str]:
    """Everything logged while the run lasts goes to `path`, from the process's first record on.
    If the run fails, the console shows the lines that matter and where the whole log is."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(FILE_FORMAT)
    handler.setLevel(logging.DEBUG if _session and _session.verbose else logging.INFO)
    handler.addFilter(_not_debug)
    root = logging.getLogger()
    if _session is not None:
        _session.recent.records.clear()  # the lines that matter are this run's
        for record in _session.pending.records:
            if record.levelno >= handler.level:
                handler.handle(record)
        root.removeHandler(_session.pending)
    root.addHandler(handler)
    adopt_library_logs()
    try:
        yield path
    except BaseException as e:
        log.error("run failed: %s: %s", type(e).__name__, e, exc_info=True, extra={"console": False})
        if _session is not None and not _session.verbose:
            _show_failure(_session, path)
        raise
    finally:
        root.removeHandler(handler)
        handler.close()
        if _session is not None and _session.pending not in root.handlers:
            _session.pending.records.clear()
            root.addHandler(_session.pending)


def _show_failure(session: Session, path: str) -> None:
    """What engines, Ray and libraries said last, if anything (a bad input fails before they start:
    its one-line error is all there is to say)."""
    lines = session.recent.lines()
    if lines:
        session.stream.write("last errors from engines, Ray and libraries:\n")
        session.stream.writelines(f"  {line}\n" for line in lines)
        session.stream.write(f"full log: {path}\n")
        session.stream.flush()


def adopt_library_logs() -> None:
    """Ray, Ray Data and vLLM attach terminal handlers to their loggers and stop propagation:
    hand their records to the root logger instead (the run's log, the console with --verbose)."""
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is not logging.FileHandler and isinstance(handler, logging.StreamHandler):
                logger.removeHandler(handler)
        logger.propagate = True


# -- worker output ---------------------------------------------------------------------------------

_LEVEL = re.compile(r"\b(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL)\b")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception|Exit|Interrupt|Warning)\b")


class WorkerLines:
    """Turns the batches of worker lines Ray streams to the driver into `workers` log records:
    level from the line's own level word, tracebacks (several lines) as errors, other stderr
    lines as warnings, other stdout lines as info."""

    def __init__(self) -> None:
        self.logger = logging.getLogger(WORKERS)
        self.in_traceback: set[Any] = set()

    def level(self, pid: Any, line: str, is_err: bool) -> int:
        if line.startswith(("Traceback (most recent call last)", "Exception ignored in")):
            self.in_traceback.add(pid)
            return logging.ERROR
        if pid in self.in_traceback:
            if line[:1].isspace() or not line.strip() or line.startswith("During handling"):
                return logging.ERROR
            self.in_traceback.discard(pid)
            if _EXCEPTION_LINE.match(line):
                return logging.ERROR
        word = _LEVEL.search(line[:80])
        if word:
            return {"WARN": logging.WARNING, "FATAL": logging.CRITICAL}.get(word.group(1)) or getattr(logging, word.group(1))
        return logging.WARNING if is_err else logging.INFO

    def __call__(self, data: Mapping[str, Any]) -> None:
        """One batch as Ray's driver gets it: {"pid", "ip", "localhost", "is_err", "lines",
        "actor_name", "task_name"}; the autoscaler's lines are filtered to its events as Ray
        itself does (ray._private.worker.print_worker_logs)."""
        from ray._private import ray_constants
        from ray._private.worker import filter_autoscaler_events
        from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

        pid = data.get("pid")
        lines = data.get("lines", ())
        if pid == "autoscaler":
            lines = filter_autoscaler_events(lines)
        words = re.findall(r"\w+", data.get("actor_name") or data.get("task_name") or "")
        ip = data.get("ip")
        prefix = f"({f'{words[-1]} ' if words else ''}pid={pid}{f' ip={ip}' if ip and ip != data.get('localhost') else ''})"
        for raw in lines:
            if RAY_TQDM_MAGIC in raw:  # progress state of ray.experimental.tqdm_ray, not text
                continue
            line = _ANSI.sub("", raw.split(ray_constants.LOG_PREFIX_INFO_MESSAGE)[-1]).rstrip()
            self.logger.log(self.level(pid, line, bool(data.get("is_err"))), "%s %s", prefix, line)


def route_worker_output() -> None:
    """Ray prints what its workers stream to the driver (`log_to_driver`), and the errors the
    cluster reports to the job (a task retried, an actor restarted: "(raylet) ..."), with coloured
    prefixes on stdout and stderr; send all of it to the `workers` logger instead (the run's log
    file). Called before `ray.init`: stdout carries the dataset's URI alone.

    Ray 2.60 has no public hook for this. Both paths call `ray._private.worker.print_to_stdstream`
    by name (the log thread through the dispatcher handler `ray.init` registers with it, the error
    listener directly), so replacing that function routes both, and nothing reaches Ray's log
    deduplicator, whose leftovers `ray.shutdown` would print."""
    from ray._private import worker

    lines = WorkerLines()

    def to_log(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        if data.get("pid") == "raylet":  # errors the cluster reports to the job: warnings at least
            data = {**data, "is_err": True}
        lines(data)

    worker.print_to_stdstream = to_log


# -- rendering ------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def rate(per_s: float) -> str:
    """Three significant figures at most: 0.987, 30.1, 16,384."""
    return f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.3g}"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], indent: str = "  ") -> list[str]:
    """Plain aligned columns: text left, numbers right."""
    cells = [[str(h) for h in headers]] + [[f"{c:,}" if isinstance(c, int) else str(c) for c in row] for row in rows]
    numeric = [all(_numberish(r[i]) for r in cells[1:]) and len(cells) > 1 for i in range(len(headers))]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return [indent + "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)).rstrip()
            for r in cells]


def _numberish(text: str) -> bool:
    return bool(re.fullmatch(r"[-\d,.]+%?|[-\d,.]+/[\d,]+|-", text))


def _emit(lines: Iterable[str]) -> None:
    for line in lines:
        log.info("%s", line)


def fields(rows: Iterable[tuple[str, str]], indent: str = "  ") -> list[str]:
    rows = list(rows)
    width = max((len(k) for k, _ in rows), default=0)
    return [f"{indent}{k.ljust(width)}  {v}" for k, v in rows]


def generate_header(job: Any, shards: Sequence[Any], plan: Any, output: str, log_file: str) -> None:
    """What the run is about to do: job, model, prompts (and how many were already committed), output, log."""
    sampling = ", ".join(f"{k} {job.sampling[k]}" for k in ("n", "max_tokens", "temperature") if k in job.sampling)
    prompts = len(plan.todo) + plan.done
    flagged = Counter(plan.flagged.values())
    plan_text = f"{len(plan.todo):,} to generate, {plan.done:,} already committed"
    if plan.copies:
        plan_text += f", {plan.copies:,} repeated copies read once"
    if flagged:
        plan_text += " (" + ", ".join(f"{v:,} {k} get no engine time" for k, v in sorted(flagged.items())) + ")"
    _emit([f"generate: job {job.name}, model {job.model.display_name} ({sampling})"] + fields([
        ("prompts", f"{prompts:,} in {len(shards):,} shard{'s' if len(shards) != 1 else ''}: {plan_text}"),
        ("samples", f"{len(plan.todo) * job.n:,} to generate ({job.n} per prompt)"),
        ("output", output),
        ("log", f"{log_file} (engines, Ray; --verbose shows it here)"),
    ]))


@dataclass
class Counts:
    """What a batch of samples adds to the progress."""

    rows: int
    accepted: int
    tokens: int
    reasons: Counter[str]


def batch_counts(batch: pa.Table, rows: int | None = None) -> Counts:
    """Counts of a batch of samples (`rows`: how many of them are new, if not all)."""
    accepted = batch.column("accepted").to_pylist() if "accepted" in batch.column_names else []
    tokens = batch.column("completion_tokens").to_pylist() if "completion_tokens" in batch.column_names else []
    reasons = batch.column("reject_reason").to_pylist() if "reject_reason" in batch.column_names else []
    return Counts(batch.num_rows if rows is None else rows, sum(bool(a) for a in accepted), sum(t or 0 for t in tokens),
                  Counter(r for r in reasons if r))


class Progress:
    """One live progress display: a bar on a terminal, else a line every `every_s` seconds (and
    at the end), which the run's log file gets either way. `kept` names what `accepted` counts."""

    def __init__(self, total: int | None, unit: str = "samples", kept: str = "accepted", tokens: bool = True,
                 every_s: float | None = None, stream: IO[str] | None = None) -> None:
        self.total, self.unit, self.kept, self.show_tokens = total, unit, kept, tokens
        self.every_s = every_s or (_session.every_s if _session else PROGRESS_EVERY_S)
        self.stream = stream or (_session.stream if _session else sys.stderr)
        self.count = self.accepted = self.tokens = 0
        self.reasons: Counter[str] = Counter()
        self.t0 = time.monotonic()
        self.first: tuple[float, int] | None = None
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.bar: Any = None
        self.ticker: threading.Thread | None = None

    def __enter__(self) -> "Progress":
        if _isatty(self.stream):
            from tqdm import tqdm

            # leave=False: the final line below replaces the bar
            self.bar = tqdm(total=self.total, unit=f" {self.unit}", desc=self.unit if self.total else None,
                            file=self.stream, dynamic_ncols=True, smoothing=0.1, leave=False)
        self.ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
        self.ticker.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.ticker is not None:
            self.ticker.join()
        if self.bar is not None:
            self.bar.close()
        if exc[0] is None:
            self._line(console=True)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    @property
    def waiting(self) -> bool:
        """No result has arrived yet."""
        return self.first is None

    def add(self, counts: Counts) -> None:
        with self.lock:
            self.count += counts.rows
            self.accepted += counts.accepted
            self.tokens += counts.tokens
            self.reasons.update(counts.reasons)
            if self.first is None:
                self.first = (time.monotonic(), self.count)
            if self.bar is not None:
                self.bar.set_postfix_str(self._postfix(), refresh=False)
                self.bar.update(counts.rows)

    def set(self, count: int, accepted: int) -> None:
        """Cumulative counts, for work that counts for itself (prepare)."""
        self.add(Counts(count - self.count, accepted - self.accepted, 0, Counter()))

    def _postfix(self) -> str:
        parts = [f"{self.kept} {self.accepted:,} ({self.accepted / max(self.count, 1):.1%})"]
        if self.show_tokens:
            parts.append(f"{rate(self.tokens / max(self.elapsed, 1e-9))} tok/s")
        return ", ".join(parts)

    def line(self) -> str:
        """`samples 24/48 (50%) | accepted 3 (12.5%) | 30.1 tok/s | 0.99 samples/s | elapsed 0:24 | ETA 0:24`."""
        with self.lock:
            elapsed = self.elapsed
            done = f"{self.count:,}/{self.total:,} ({self.count / self.total:.0%})" if self.total else f"{self.count:,}"
            parts = [f"{self.unit} {done}", f"{self.kept} {self.accepted:,} ({self.accepted / max(self.count, 1):.1%})"]
            if self.show_tokens:
                parts.append(f"{rate(self.tokens / max(elapsed, 1e-9))} tok/s")
            parts += [f"{rate(self.count / max(elapsed, 1e-9))} {self.unit}/s", f"elapsed {duration(elapsed)}"]
            if self.total:
                parts.append(f"ETA {duration(self._eta())}")
            if self.first is None:
                parts.append(f"waiting for the first {self.unit}")
        return " | ".join(parts)

    def _eta(self) -> float:
        """Remaining time at the rate since the first results (start-up is not repeated)."""
        if self.total is None or self.first is None:
            return math.nan
        if self.count >= self.total:
            return 0.0
        t, n = self.first
        rate = (self.count - n) / (time.monotonic() - t) if self.count > n else 0.0
        return (self.total - self.count) / rate if rate else math.nan

    def _line(self, console: bool) -> None:
        log.info("%s", self.line(), extra={"console": console})

    def _tick(self) -> None:
        last = time.monotonic()
        while not self.stop.wait(min(1.0, self.every_s)):
            if self.bar is not None:
                with self.lock:
                    self.bar.refresh()
            if time.monotonic() - last >= self.every_s:
                last = time.monotonic()
                self._line(console=self.bar is None)


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def top_reasons(reasons: Mapping[str, int], total: int, most: int = 5) -> str:
    ranked = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{k} {v:,} ({v / max(total, 1):.1%})" for k, v in ranked[:most])
    if len(ranked) > most:
        text += f", {len(ranked) - most} more in the report"
    return text or "none"


def generate_summary(manifest: Mapping[str, Any], storage: Storage, log_file: str, attempt: str) -> None:
    """Accepted samples by domain, the top reject reasons, where the report, card and log are; a
    rerun that changed nothing says the version it found is current, and a version without one
    accepted sample says so loudly (`datasets` cannot load an empty split)."""
    stats = manifest["stats"]
    run = manifest.get("run", {})
    took = manifest.get("timings", {}).get("total_s")
    reasons: Counter[str] = Counter()
    rows = []
    for dom, d in stats["domains"].items():
        reasons.update(d["reasons"])
        rows.append((dom, d["samples"], d["accepted"], f"{d['accept_rate']:.1%}", f"{d['prompts_with_accepted']:,}/{d['prompts']:,}"))
    if len(rows) != 1:
        rows.append(("all", stats["samples"], stats["accepted"], f"{stats['accept_rate']:.1%}",
                     f"{sum(d['prompts_with_accepted'] for d in stats['domains'].values()):,}/"
                     f"{sum(d['prompts'] for d in stats['domains'].values()):,}"))
    where = storage.url()
    load = (f'datasets.load_dataset("{where}")' if storage.local
            else f"the files listed under `files.data` in {storage.url('_manifest.json')}")
    if manifest["run_id"] == attempt:
        made = f"{run.get('prompts_to_generate', 0):,} prompts generated now, {run.get('prompts_already_committed', 0):,} committed earlier"
        head = f"published {manifest['version']}{f' in {duration(took)}' if took is not None else ''} ({made})"
    else:
        head = f"nothing new to generate or publish: {manifest['version']} (run {manifest['run_id']}) is current"
    if not stats["accepted"]:
        log.warning("no sample was accepted: %s has no training rows (see the reject reasons and %s)",
                    manifest["version"], storage.url("report.md"))
    _emit([head]
          + table(("domain", "samples", "accepted", "rate", "prompts with accepted"), rows)
          + fields([("rejected", top_reasons(reasons, stats["samples"])),
                    ("report", storage.url("report.md")),
                    ("card", storage.url("README.md") + (f" (load: {load})" if stats["accepted"] else "")),
                    ("log", log_file)]))


def curate_summary(progress: Progress, output: str, log_file: str) -> None:
    """Rows checked, accepted, the reject reasons; where the output and log are."""
    rejected = progress.count - progress.accepted
    _emit([f"curated {progress.count:,} rows in {duration(progress.elapsed)}"]
          + table(("rows", "accepted", "rejected", "accept rate"),
                  [(progress.count, progress.accepted, rejected, f"{progress.accepted / max(progress.count, 1):.1%}")])
          + fields([("rejected", top_reasons(progress.reasons, progress.count)), ("output", output), ("log", log_file)]))


def prepare_summary(read: int, written: int, dropped: Mapping[str, int], shards: Sequence[str],
                    bad_rows: Sequence[Mapping[str, Any]], report_uri: str | None, most: int = 20) -> None:
    """Rows read, written and dropped per reason, the shards, and the first bad rows with file and
    line; the report's place when one was written (`report_uri`)."""
    total_dropped = sum(dropped.values())
    lines = [f"prepare: read {read:,}, written {written:,}, dropped {total_dropped:,}, shards {len(shards):,}"]
    if dropped:
        lines += table(("dropped", "rows", "share of read"),
                       [(k, v, f"{v / max(read, 1):.1%}") for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])])
    if shards:
        lines += fields([("shards", shards[0] if len(shards) == 1 else f"{shards[0]} ... {shards[-1]}")])
    if bad_rows:
        lines.append("  bad rows (file:line: problem):")
        lines += [f"    {bad['file']}:{bad['row']}: {bad['error']}" for bad in bad_rows[:most]]
        bad_total = dropped.get("bad_row", 0) + dropped.get("duplicate_id", 0)
        if bad_total > min(most, len(bad_rows)):
            where = f" (the first 1,000 are in {report_uri})" if report_uri else ""
            lines.append(f"    ... {bad_total - min(most, len(bad_rows)):,} more{where}")
    if report_uri:
        lines += fields([("report", report_uri)])
    _emit(lines)
