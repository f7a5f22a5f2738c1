"""`pipeline prepare`: turn the prompt sources people have into validated prompt shards.

Sources: JSONL, JSON, CSV, Parquet files (local or s3://, globs), or a Hugging Face `datasets`
folder saved with `save_to_disk`. Rows are read in batches (memory stays flat except for the
dedup digests, 8 bytes per kept prompt), converted by a format, checked, deduplicated, optionally
decontaminated, and written as `OUTPUT/<name>-00000.parquet`, ... in order.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from pipeline.ngrams import Contamination, digest, normalize
from pipeline.read import split_spec
from pipeline.schemas import arrow_fields, conform
from pipeline.storage import Storage, filesystem
from pipeline.verify.extract import boxed_answers

BATCH_ROWS = 8192
PROGRESS_ROWS = 1000
PROMPT_FIELDS = [f for f in arrow_fields("prompt")]
PROMPT_SCHEMA = pa.schema([pa.field(f.name, f.type) for f in PROMPT_FIELDS])


class BadRow(ValueError):
    """A source row that cannot become a prompt; the message says why."""


# -- reading sources ---------------------------------------------------------------------------
Located = tuple[str, int, dict[str, Any]]  # (file, 1-based row or line number, row)


def iter_rows(source: str) -> Iterator[Located]:
    """Every row of every file the source names, with where it came from."""
    for pattern in split_spec(source):
        fs, path = filesystem(pattern)
        proto = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
        if fs.isdir(path) and fs.exists(posixpath.join(path, "state.json")):
            files = sorted(f["filename"] for f in json.loads(fs.cat_file(posixpath.join(path, "state.json")))["_data_files"])
            paths = [posixpath.join(path, f) for f in files]
        elif fs.isdir(path):
            paths = sorted(p for p in fs.find(path) if p.endswith((".jsonl", ".json", ".csv", ".parquet", ".arrow")))
        elif any(c in path for c in "*?["):
            paths = sorted(fs.glob(path))
        else:
            paths = [path]
        if not paths:
            raise FileNotFoundError(f"{pattern}: no source files")
        for p in paths:
            yield from ((f"{proto}{p}", n, row) for n, row in _read_file(fs, p))


def _read_file(fs: Any, path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    if path.endswith(".jsonl"):
        with fs.open(path, "rt", encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield n, json.loads(line)
                    except json.JSONDecodeError as e:
                        yield n, {"__error__": f"invalid JSON: {e.msg}"}
        return
    if path.endswith(".json"):
        with fs.open(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
        rows = data if isinstance(data, list) else data.get("data") or data.get("rows") or []
        yield from enumerate(rows, 1)
        return
    n = 0
    for batch in _arrow_batches(fs, path):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def _arrow_batches(fs: Any, path: str) -> Iterator[pa.RecordBatch]:
    with fs.open(path, "rb") as f:
        if path.endswith(".parquet"):
            yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS)
        elif path.endswith(".csv"):
            yield from pcsv.open_csv(f)
        elif path.endswith(".arrow"):
            yield from pa.ipc.open_stream(f)
        else:
            raise ValueError(f"{path}: unknown file type (jsonl, json, csv, parquet, arrow)")


# -- formats -----------------------------------------------------------------------------------
def _need(row: dict[str, Any], *names: str) -> Any:
    for name in names:
        value = row.get(name)
        if value not in (None, ""):
            return value
    raise BadRow(f"missing field {' / '.join(repr(n) for n in names)}")


def _json_field(value: Any, what: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRow(f"unparsable {what} JSON: {e.msg}") from None
    return value


def fmt_math(row: dict[str, Any]) -> dict[str, Any]:
    """NuminaMath/MATH: `problem` + worked `solution`; the answer is the solution's last box."""
    solution = _need(row, "solution")
    boxes = [b for b in boxed_answers(str(solution)) if b]
    if not boxes:
        raise BadRow("no \\boxed{} answer in the solution")
    return {"prompt": _need(row, "problem", "question"), "domain": "math", "answer": boxes[-1]}


def fmt_gsm8k(row: dict[str, Any]) -> dict[str, Any]:
    """GSM8K: `question` + `answer` whose last line is `#### 42`."""
    answer = str(_need(row, "answer"))
    if "####" not in answer:
        raise BadRow("answer has no '#### <number>' line")
    final = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not final:
        raise BadRow("empty answer after '####'")
    return {"prompt": _need(row, "question"), "domain": "math", "answer": final}


def _fn_call_tests(fn_name: str, inputs: list[Any], outputs: list[Any], limit: float) -> dict[str, Any]:
    cases = json.dumps(list(zip(inputs, outputs)))
    code = (
        "import json\n"
        f"_cases = json.loads({cases!r})\n"
        f"_fn = globals().get({fn_name!r}) or getattr(globals()['Solution'](), {fn_name!r})\n"
        "for _args, _want in _cases:\n"
        "    _got = _fn(*_args)\n"
        "    assert _got == _want or [_got] == _want, (_args, _got, _want)\n"
    )
    return {"kind": "assert", "code": code, "time_limit_s": limit}


def fmt_code_stdio(row: dict[str, Any]) -> dict[str, Any]:
    """APPS/TACO/CodeContests: `question` + `input_output` JSON (stdin/stdout, or `fn_name` calls)."""
    io = _json_field(_need(row, "input_output"), "input_output")
    if not isinstance(io, dict) or not io.get("inputs") or "outputs" not in io:
        raise BadRow("input_output needs non-empty 'inputs' and 'outputs'")
    if len(io["inputs"]) != len(io["outputs"]):
        raise BadRow("input_output has different numbers of inputs and outputs")
    limit = float(row.get("time_limit_s") or 2)
    if io.get("fn_name"):
        tests = _fn_call_tests(io["fn_name"], io["inputs"], io["outputs"], limit)
    else:
        cases = [{"stdin": _text(i), "stdout": _text(o)} for i, o in zip(io["inputs"], io["outputs"])]
        tests = {"kind": "stdio", "cases": cases, "time_limit_s": limit}
    return {"prompt": _need(row, "question", "problem", "description"), "domain": "code", "tests": json.dumps(tests)}


def _text(v: Any) -> str:
    return "\n".join(map(str, v)) if isinstance(v, list) else str(v)


def fmt_humaneval(row: dict[str, Any]) -> dict[str, Any]:
    """HumanEval (`prompt`, `test`, `entry_point`) or MBPP (`text`, `test_list`) -> assert tests."""
    if "entry_point" in row:
        stub = _need(row, "prompt")
        code = f"{_need(row, 'test')}\n\ncheck({_need(row, 'entry_point')})\n"
        prompt = f"Complete the following Python function.\n\n```python\n{stub}\n```"
        prelude = stub  # its imports and helpers, as the official harness runs prompt + completion
    else:
        tests = _json_field(_need(row, "test_list"), "test_list")
        prelude = row.get("test_setup_code") or ""  # objects the asserts pass in live next to the program
        code = "\n".join(tests) + "\n"
        prompt = f"{_need(row, 'text', 'prompt')}\nYour code should pass these tests:\n\n" + "\n".join(tests)
    tests_json = json.dumps({"kind": "assert", "code": code, "prelude": prelude, "time_limit_s": 5})
    return {"prompt": prompt, "domain": "code", "tests": tests_json}


LETTERS = "ABCDEFGHIJ"


def fmt_choice(row: dict[str, Any]) -> dict[str, Any]:
    """Multiple choice: `question`, `options` (list, dict or columns A..D), `answer` (letter or index)."""
    options = row.get("options") or row.get("choices")
    options = _json_field(options, "options") if options is not None else None
    if isinstance(options, dict):
        options = [options[k] for k in sorted(options)] if "text" not in options else options["text"]
    if not options:
        options = [row[c] for c in LETTERS if row.get(c) not in (None, "")]
    if len(options) < 2:
        raise BadRow("fewer than two options")
    answer = _need(row, "answer", "label")
    if isinstance(answer, int) or (isinstance(answer, str) and answer.isdigit()):
        answer = LETTERS[int(answer)]
    answer = str(answer).strip().strip("()").upper()
    if answer not in LETTERS[: len(options)]:
        raise BadRow(f"answer {answer!r} is not one of the option letters")
    body = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    prompt = f"{_need(row, 'question')}\n\n{body}"
    return {"prompt": prompt, "domain": "choice", "answer": answer}


def generic(mapping: dict[str, str], constants: dict[str, str]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A column mapping (target field -> source column) plus constant fields (e.g. domain=math)."""

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = dict(constants)
        for target, column in mapping.items():
            value = row.get(column)
            out[target] = None if value is None else (value if isinstance(value, str) else json.dumps(value))
        if not out.get("prompt"):
            raise BadRow(f"missing field {mapping.get('prompt', 'prompt')!r}")
        out.setdefault("domain", "general")
        return out

    return convert


FORMATS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "math": fmt_math,
    "gsm8k": fmt_gsm8k,
    "code-stdio": fmt_code_stdio,
    "humaneval": fmt_humaneval,
    "choice": fmt_choice,
}


# -- the run -----------------------------------------------------------------------------------
@dataclass
class Report:
    read: int = 0
    written: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    shards: list[str] = field(default_factory=list)
    bad_rows: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"rows_read": self.read, "rows_written": self.written, "dropped": dict(self.dropped),
                "shards": self.shards, "bad_rows": self.bad_rows[:1000]}


@dataclass
class PrepareOptions:
    source_name: str
    id_column: str | None = "id"
    rows_per_shard: int = 10_000
    shard_name: str = "prompts"
    strict: bool = False
    dedup: bool = True
    decontaminate: list[str] = field(default_factory=list)
    ngram: int = 8
    progress: Callable[[int, int], None] | None = None
    """Called with (rows read, rows written) every PROGRESS_ROWS rows read."""


class ShardWriter:
    """Writes rows into `<name>-00000.parquet`, ... of `rows_per_shard` rows each, streaming."""

    def __init__(self, storage: Storage, name: str, rows_per_shard: int, report: Report) -> None:
        self.storage, self.name, self.rows_per_shard, self.report = storage, name, rows_per_shard, report
        self._ctx: Any = None
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0

    def write(self, rows: list[dict[str, Any]]) -> None:
        while rows:
            if self._writer is None:
                rel = f"{self.name}-{len(self.report.shards):05d}.parquet"
                self._ctx = self.storage.parquet_writer(rel, PROMPT_SCHEMA)
                self._writer = self._ctx.__enter__()
                self.report.shards.append(self.storage.url(rel))
            take = rows[: self.rows_per_shard - self._rows]
            self._writer.write_table(conform(pa.Table.from_pylist(take, schema=PROMPT_SCHEMA), "prompt"))
            self._rows += len(take)
            rows = rows[len(take):]
            if self._rows == self.rows_per_shard:
                self.close()

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
        self._ctx, self._writer, self._rows = None, None, 0


def benchmark_ngrams(paths: list[str], n: int) -> Contamination:
    """The n-grams of the benchmark problems in `paths` (their `prompt`/`problem`/`question`)."""
    texts = (r.get("prompt") or r.get("problem") or r.get("question") or "" for p in paths for _, _, r in iter_rows(p))
    return Contamination(texts, n)


def stable_id(source: str, prompt: str) -> str:
    return f"{source}-{digest(source + chr(0) + normalize(prompt)).hex()}"


def prepare(source: str, output: str, convert: Callable[[dict[str, Any]], dict[str, Any]], opts: PrepareOptions) -> Report:
    """Convert, check, dedup, decontaminate and write shards; returns the summary report."""
    report = Report()
    storage = Storage(output)
    contamination = benchmark_ngrams(opts.decontaminate, opts.ngram) if opts.decontaminate else None
    # Dedup state is 8-byte digests as ints (~70 bytes a prompt in a set); rows themselves stream
    # to the shard being written, a row group at a time, so memory does not grow with the source.
    seen_exact: set[int] = set()
    seen_near: set[int] = set()
    seen_ids: set[str] = set()  # only for the source's own ids; hash ids are unique once deduped
    pending: list[dict[str, Any]] = []
    shard = ShardWriter(storage, opts.shard_name, opts.rows_per_shard, report)

    for where, line, row in iter_rows(source):
        if opts.progress is not None and report.read % PROGRESS_ROWS == 0:
            opts.progress(report.read, report.written)
        report.read += 1
        try:
            if "__error__" in row:
                raise BadRow(row["__error__"])
            out = convert(row)
            prompt = out.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise BadRow("empty prompt")
        except BadRow as e:
            report.dropped["bad_row"] += 1
            report.bad_rows.append({"file": where, "row": line, "error": str(e)})
            if opts.strict:
                raise BadRow(f"{where}:{line}: {e}") from None
            continue
        if opts.dedup:
            exact = int.from_bytes(digest(prompt.strip()), "big")
            near = int.from_bytes(digest(normalize(prompt)), "big")
            if exact in seen_exact:
                report.dropped["duplicate"] += 1
                continue
            if near in seen_near:
                report.dropped["near_duplicate"] += 1
                continue
            seen_exact.add(exact)
            seen_near.add(near)
        if contamination is not None and contamination.hits(prompt):
            report.dropped["contaminated"] += 1
            continue
        own = row.get(opts.id_column) if opts.id_column else None
        if own not in (None, ""):
            pid = f"{opts.source_name}-{own}"
            if pid in seen_ids:
                report.dropped["duplicate_id"] += 1
                report.bad_rows.append({"file": where, "row": line, "error": f"duplicate id {pid}"})
                continue
            seen_ids.add(pid)
        else:
            pid = stable_id(opts.source_name, prompt)
        pending.append({"answer": None, "tests": None, **out, "id": pid, "source": opts.source_name})
        report.written += 1
        if len(pending) >= BATCH_ROWS:
            shard.write(pending)
            pending = []
    shard.write(pending)
    shard.close()
    storage.write_json("_prepare_report.json", report.as_dict())
    return report
