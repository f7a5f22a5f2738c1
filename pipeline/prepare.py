"""`pipeline prepare`: turn the prompt sources people have into validated prompt shards.

Sources: JSONL, JSON, CSV and TSV files (each also gzip/bz2/xz-compressed), Parquet and Arrow files
(local or s3://, globs), or a Hugging Face `datasets` folder saved with `save_to_disk`. Values are
kept as written: text is decoded as UTF-8 (with or without a BOM) or UTF-16/32 by their BOM and
anything else is refused naming the byte, CSV/TSV cells stay text unless a column is declared
numeric, and a row that is not an object, has NaN/Infinity or breaks the prompt schema is a
per-row error. Rows stream in batches (memory stays flat except for the dedup digests, 8 bytes per
kept prompt), are converted by a format, checked, deduplicated, optionally decontaminated, and
written as `OUTPUT/<name>-00000.parquet`, ... in order.

Whole files only: shards are staged in `OUTPUT/_prepare-<token>/`, each file complete or absent
(Storage.parquet_writer), and moved into place only when all are written, replacing the shards of
the folder's earlier prepare (the files its `_prepare_report.json` names, never any other). The
report records each shard's rows and sha256, which `generate` checks (pipeline/read.py).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import math
import os
import posixpath
import re
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, TextIO

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.compression import compr
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import infer_compression

from pipeline.config import ConfigError
from pipeline.errors import storage_errors
from pipeline.ngrams import Contamination, digest, normalize
from pipeline.read import PREPARE_REPORT, InputError, file_sha256, split_spec
from pipeline.schemas import arrow_fields, domains, reserved_prompt_columns
from pipeline.storage import Storage, filesystem
from pipeline.verify.code import parse_tests
from pipeline.verify.extract import boxed_answers

BATCH_ROWS = 8192
PROGRESS_ROWS = 1000
PROMPT_FIELDS = [f for f in arrow_fields("prompt")]
PROMPT_SCHEMA = pa.schema([pa.field(f.name, f.type) for f in PROMPT_FIELDS])
DOMAINS = domains()
TEXT_TYPES = (".jsonl", ".json", ".csv", ".tsv")
BINARY_TYPES = (".parquet", ".arrow")
STAGING = "_prepare-"
_TOKEN = re.compile(r"\d{8}T\d{6}-[0-9a-f]{8}")


class BadRow(InputError):
    """A source row that cannot become a prompt; the message says why."""


class SourceError(InputError):
    """A source file that cannot be read as written (encoding, structure); names the file."""


# -- reading sources ---------------------------------------------------------------------------
Located = tuple[str, int, "dict[str, Any] | BadRow"]
"""(file, 1-based row or line number, the row or why it is not one)."""


def file_type(path: str) -> tuple[str, str | None]:
    """(type suffix, fsspec compression) of a source file: `x.jsonl.gz` -> ('.jsonl', 'gzip')."""
    compression = infer_compression(path)
    stem = path.rsplit(".", 1)[0] if compression else path
    return posixpath.splitext(stem)[1].lower(), compression


def _is_source(path: str) -> bool:
    kind, compression = file_type(path)
    return kind in TEXT_TYPES or (kind in BINARY_TYPES and compression is None)


def iter_rows(source: str, output: Storage | None = None) -> Iterator[Located]:
    """Every row of every file the source names, with where it came from. Files inside `output`
    (an earlier prepare's shards) are never sources: a folder skips them, a pattern is refused."""
    for pattern in split_spec(source):
        proto = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
        with storage_errors(pattern):
            fs, path = filesystem(pattern)
            if fs.isdir(path) and fs.exists(posixpath.join(path, "state.json")):
                state = json.loads(fs.cat_file(posixpath.join(path, "state.json")))
                paths = [posixpath.join(path, f["filename"]) for f in state["_data_files"]]
            elif fs.isdir(path):
                paths = sorted(p for p in fs.find(path) if _is_source(p) and not _inside(fs, p, output))
            elif any(c in path for c in "*?["):
                paths = sorted(fs.glob(path))
            else:
                paths = [path]
        if not paths:
            raise FileNotFoundError(f"{pattern}: no source files")
        for p in paths:
            uri = f"{proto}{p}"
            if _inside(fs, p, output):
                raise SourceError(f"{uri}: is in the output folder; prepare does not read its own shards")
            with storage_errors(uri):
                yield from ((uri, n, row) for n, row in _read_file(fs, p, uri))


def _inside(fs: Any, path: str, output: Storage | None) -> bool:
    if output is None or type(fs) is not type(output.fs):
        return False
    real = os.path.realpath if output.local else str
    return real(path).startswith(real(output.root).rstrip("/") + "/")


def _read_file(fs: Any, path: str, uri: str) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    kind, compression = file_type(path)
    if kind in TEXT_TYPES:
        with _decoded(fs, path, uri, compression) as text:
            if kind == ".jsonl":
                yield from _jsonl(text)
            elif kind == ".json":
                yield from _json(text, uri)
            else:
                yield from _delimited(text, uri, kind)
        return
    if kind not in BINARY_TYPES or compression is not None:
        raise SourceError(f"{uri}: unknown file type (jsonl, json, csv, tsv, optionally .gz/.bz2/.xz; parquet, arrow)")
    n = 0
    with fs.open(path, "rb") as f:
        batches = pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS) if kind == ".parquet" else pa.ipc.open_stream(f)
        for batch in batches:
            for row in batch.to_pylist():
                n += 1
                yield n, row


def _open(fs: Any, path: str, compression: str | None) -> Any:
    """The file's bytes; a local pipe (`<(zcat ...)`, /dev/stdin) is read as it streams, where
    fsspec's local files need to seek."""
    if isinstance(fs, LocalFileSystem) and os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        f = open(path, "rb")
        return compr[compression](f, mode="rb") if compression else f
    return fs.open(path, "rb", compression=compression)


@contextlib.contextmanager
def _decoded(fs: Any, path: str, uri: str, compression: str | None) -> Iterator[TextIO]:
    """The file decoded strictly: UTF-8 (a BOM is dropped) or UTF-16/32 by their BOM. Bytes that
    are not valid in that encoding stop the file with their offset; nothing is ever replaced."""
    with _open(fs, path, compression) as raw:
        stream = io.BufferedReader(raw)
        head = stream.peek(64)[:64]
        if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
            encoding = "utf-32"
        elif head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            encoding = "utf-16"
        elif b"\x00" in head:
            raise SourceError(f"{uri}: NUL bytes at the start: UTF-16 or UTF-32 without a byte-order mark? "
                              "Save it as UTF-8 (or with a BOM)")
        else:
            encoding = "utf-8-sig"
        try:
            yield io.TextIOWrapper(stream, encoding=encoding, errors="strict", newline="")
        except UnicodeDecodeError:
            raise SourceError(f"{uri}: {_bad_bytes(fs, path, compression, encoding)}") from None


def _bad_bytes(fs: Any, path: str, compression: str | None, encoding: str) -> str:
    """Where the first byte that is invalid in `encoding` is (a second pass, on the error path only)."""
    name = {"utf-8-sig": "UTF-8", "utf-16": "UTF-16", "utf-32": "UTF-32"}[encoding]
    where = " of the decompressed data" if compression else ""
    if isinstance(fs, LocalFileSystem) and not os.path.isfile(path):
        return f"not valid {name} (a pipe: it cannot be read again to find the byte); save the data as UTF-8"
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    offset = 0
    with fs.open(path, "rb", compression=compression) as f:
        while True:
            chunk = f.read(1 << 20)
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                at = offset - pending + e.start
                bad = e.object[e.start:e.start + 1].hex()
                return (f"not valid {name}: byte 0x{bad} at offset {at}{where}; save the file as UTF-8 "
                        f"(e.g. `iconv -f latin1 -t utf-8`) or as UTF-16 with a byte-order mark")
            if not chunk:
                return f"not valid {name}"
            offset += len(chunk)


NON_FINITE = "NaN or Infinity is not a JSON value"


def _no_constant(literal: str) -> Any:
    raise ValueError(literal)  # json calls this only for NaN/Infinity, which JSON does not have


def _json_row(value: Any) -> dict[str, Any] | BadRow:
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
        return BadRow(f"a JSON value that is {kind}, not an object")
    return value


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_non_finite(v) for v in value)
    return False


def _jsonl(text: TextIO) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    n = 0
    for line in text:
        n += 1
        if line.strip():
            try:
                yield n, _json_row(json.loads(line, parse_constant=_no_constant))
            except json.JSONDecodeError as e:
                yield n, BadRow(f"invalid JSON: {e.msg} (column {e.colno})")
            except ValueError:
                yield n, BadRow(NON_FINITE)


def _json(text: TextIO, uri: str) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    """A JSON array of objects, `{"data": [...]}` / `{"rows": [...]}`, one object, or JSON Lines
    in a .json file (as many datasets ship them)."""
    raw = text.read()
    constants: list[str] = []
    try:
        data = json.loads(raw, parse_constant=lambda c: constants.append(c) or float(c))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            yield from _jsonl(io.StringIO(raw, newline=""))
            return
        raise SourceError(f"{uri}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if isinstance(data, dict):
        inner = next((data[k] for k in ("data", "rows") if isinstance(data.get(k), list)), None)
        data = inner if inner is not None else [data]
    if not isinstance(data, list):
        raise SourceError(f"{uri}: expected a JSON array of objects (or {{\"data\": [...]}}), got {type(data).__name__}")
    for n, value in enumerate(data, 1):
        yield n, BadRow(NON_FINITE) if constants and _non_finite(value) else _json_row(value)


def _delimited(text: TextIO, uri: str, kind: str) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    """CSV (RFC 4180 quoting) or TSV (tab-separated, no quoting: IANA text/tab-separated-values).
    Cells stay text exactly as written; rows are numbered by the line they start on."""
    csv.field_size_limit(2**31 - 1)  # prompts and test specs can be far longer than the 128 KiB default
    options: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if kind == ".tsv" else {}
    reader = csv.reader(text, **options)
    try:
        header = next(reader, None)
        if header is None:
            return
        twice = sorted({h for h in header if header.count(h) > 1})
        if twice:
            raise SourceError(f"{uri}: column {twice[0]!r} appears twice in the header")
        start = reader.line_num + 1
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not cells:
                continue
            if len(cells) != len(header):
                yield line, BadRow(f"{len(cells)} fields, the header has {len(header)}")
            else:
                yield line, dict(zip(header, cells))
    except csv.Error as e:
        raise SourceError(f"{uri}:{reader.line_num}: {e}") from None


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


def _time_limit(row: dict[str, Any]) -> float:
    value = row.get("time_limit_s")
    if value in (None, ""):
        return 2.0
    try:
        limit = float(value)
    except (TypeError, ValueError):
        raise BadRow(f"time_limit_s {value!r} is not a number") from None
    if not math.isfinite(limit) or limit <= 0:
        raise BadRow(f"time_limit_s {value!r} is not a positive number")
    return limit


def fmt_code_stdio(row: dict[str, Any]) -> dict[str, Any]:
    """APPS/TACO/CodeContests: `question` + `input_output` JSON (stdin/stdout, or `fn_name` calls)."""
    io_spec = _json_field(_need(row, "input_output"), "input_output")
    if not isinstance(io_spec, dict) or not io_spec.get("inputs") or "outputs" not in io_spec:
        raise BadRow("input_output needs non-empty 'inputs' and 'outputs'")
    if len(io_spec["inputs"]) != len(io_spec["outputs"]):
        raise BadRow("input_output has different numbers of inputs and outputs")
    limit = _time_limit(row)
    if io_spec.get("fn_name"):
        tests = _fn_call_tests(io_spec["fn_name"], io_spec["inputs"], io_spec["outputs"], limit)
    else:
        cases = [{"stdin": _lines(i), "stdout": _lines(o)} for i, o in zip(io_spec["inputs"], io_spec["outputs"])]
        tests = {"kind": "stdio", "cases": cases, "time_limit_s": limit}
    return {"prompt": _need(row, "question", "problem", "description"), "domain": "code", "tests": json.dumps(tests)}


def _lines(v: Any) -> str:
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
        if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
            raise BadRow("test_list is not a list of assert lines")
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
    if len(options) > len(LETTERS):
        raise BadRow(f"more than {len(LETTERS)} options")
    answer = _need(row, "answer", "label")
    if isinstance(answer, int) or (isinstance(answer, str) and answer.isdigit()):
        index = int(answer)
        if not 0 <= index < len(options):
            raise BadRow(f"answer index {index} is not one of the {len(options)} options")
        answer = LETTERS[index]
    answer = str(answer).strip().strip("()").upper()
    if answer not in LETTERS[: len(options)]:
        raise BadRow(f"answer {answer!r} is not one of the option letters")
    body = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    prompt = f"{_need(row, 'question')}\n\n{body}"
    return {"prompt": prompt, "domain": "choice", "answer": answer}


FORMATS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "math": fmt_math,
    "gsm8k": fmt_gsm8k,
    "code-stdio": fmt_code_stdio,
    "humaneval": fmt_humaneval,
    "choice": fmt_choice,
}
_WITH_ANSWER, _WITH_TESTS = ("prompt", "domain", "answer"), ("prompt", "domain", "tests")
SETS = {"math": _WITH_ANSWER, "gsm8k": _WITH_ANSWER, "choice": _WITH_ANSWER, "code-stdio": _WITH_TESTS,
        "humaneval": _WITH_TESTS, "generic": ()}
"""The fields each format fills itself; --map/--const may add any other."""
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
NUMERIC = {"int": pa.int64(), "float": pa.float64()}


def _number(value: Any, column: str, kind: str) -> int | float | None:
    """A declared-numeric cell as a number: `007` -> 7, `0.50` -> 0.5 (only when declared)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        text = value.strip()
        if kind == "int" and _INT.fullmatch(text):
            return int(text)
        if kind == "float" and _FLOAT.fullmatch(text):
            return float(text)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if kind == "float" and math.isfinite(value):
            return float(value)
        if kind == "int" and (isinstance(value, int) or value.is_integer()):
            return int(value)
    want = "an integer" if kind == "int" else "a finite number"
    raise BadRow(f"column {column!r} is declared numeric ({kind}) but {value!r} is not {want}")


def _as_text(value: Any, name: str) -> str | None:
    """A value for a text field: strings as they are, other JSON values as JSON text."""
    if value is None or isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        raise BadRow(f"field {name!r}: {value!r} is not text (NaN, Infinity or not JSON)") from None


class Converter:
    """A format plus the fields the user adds: `--map FIELD=COLUMN`, `--const FIELD=VALUE` and
    `--numeric COLUMN[=int|float]`. Construction refuses what can never work (unknown format,
    a field the format or the pipeline sets, a domain outside the schema's set); a call turns a
    source row into a prompt row or raises BadRow. `schema` is the shards' Arrow schema: the
    prompt columns, then the added fields (text, or numbers from a numeric column or constant)."""

    def __init__(self, fmt: str, mapping: dict[str, str] | None = None, constants: dict[str, Any] | None = None,
                 numeric: dict[str, str] | None = None) -> None:
        if fmt not in SETS:
            raise ConfigError(f"unknown format {fmt!r}; one of {', '.join(SETS)}")
        self.fmt, self.base = fmt, FORMATS.get(fmt)
        self.mapping, self.constants, self.numeric = dict(mapping or {}), dict(constants or {}), dict(numeric or {})
        if fmt == "generic" and "prompt" not in self.mapping:
            raise ConfigError("generic format needs --map prompt=COLUMN")
        for column, kind in self.numeric.items():
            if kind not in NUMERIC:
                raise ConfigError(f"--numeric {column}={kind}: the type is int or float")
        declared = {f.name: f.type for f in PROMPT_FIELDS}
        reserved = reserved_prompt_columns()
        extra: list[pa.Field] = []
        for target in [*self.mapping, *self.constants]:
            how = f"--map {target}" if target in self.mapping else f"--const {target}"
            if target in self.mapping and target in self.constants:
                raise ConfigError(f"{target!r} is both mapped and constant")
            if target == "id":
                raise ConfigError(f"{how}: prepare sets 'id' itself (from --id-column, else a hash of the prompt)")
            if target == "source":
                raise ConfigError(f"{how}: prepare sets 'source' itself (--name)")
            if target in reserved:
                raise ConfigError(f"{how}: {target!r} is a column the pipeline adds to samples; choose another name")
            if target in SETS[fmt]:
                raise ConfigError(f"{how}: the {fmt} format sets {target!r} itself")
            if target in declared:
                continue
            column_kind = self.numeric.get(self.mapping.get(target, ""))
            extra.append(pa.field(target, NUMERIC[column_kind] if column_kind else
                                  _const_type(self.constants[target]) if target in self.constants else pa.string()))
        for name, value in self.constants.items():
            if name in declared:
                self.constants[name] = _as_text(value, name) if not isinstance(value, str) else value
            elif isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--const {name}: {value} is not a finite number")
        domain = self.constants.get("domain")
        if domain is not None and domain not in DOMAINS:
            raise ConfigError(f"--const domain={domain}: not a domain; one of {', '.join(DOMAINS)}")
        self.schema = pa.schema([*PROMPT_SCHEMA, *extra])
        self._numbers = {f.name for f in extra if f.type in NUMERIC.values()}

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.numeric:
            row = {**row, **{c: _number(row[c], c, kind) for c, kind in self.numeric.items() if c in row}}
        try:
            out = self.base(row) if self.base else {}
        except BadRow:
            raise
        except Exception as e:  # a format meeting a value it cannot use: that row's problem
            raise BadRow(f"{type(e).__name__}: {e}") from None
        for target, column in self.mapping.items():
            value = row.get(column)
            out[target] = value if target in self._numbers else _as_text(value, target)
        out.update(self.constants)
        if self.fmt == "generic" and "domain" not in self.mapping and "domain" not in self.constants:
            out["domain"] = "general"
        return self.validate(out)

    def validate(self, out: dict[str, Any]) -> dict[str, Any]:
        prompt = out.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRow("empty prompt" if prompt in (None, "") or isinstance(prompt, str) else "prompt is not text")
        if out.get("domain") not in DOMAINS:
            raise BadRow(f"domain {out.get('domain')!r} is not one of {', '.join(DOMAINS)}")
        for name in ("answer", "tests"):
            if out.get(name) is not None and not isinstance(out[name], str):
                raise BadRow(f"{name} is not text")
        if out.get("tests") is not None:
            try:
                parse_tests(out["tests"])
            except ValueError as e:
                raise BadRow(f"tests do not follow schemas/code_tests.schema.json: {' '.join(str(e).split())[:300]}") from None
        return out


def _const_type(value: Any) -> pa.DataType:
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    return pa.string()


# -- the run -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardFile:
    name: str
    rows: int
    sha256: str


@dataclass
class Report:
    read: int = 0
    written: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    files: list[ShardFile] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    """URIs of the shards, once they are in place."""
    bad_rows: list[dict[str, Any]] = field(default_factory=list)
    MAX_BAD_ROWS = 1000

    def bad(self, where: str, line: int, error: str) -> None:
        if len(self.bad_rows) < self.MAX_BAD_ROWS:
            self.bad_rows.append({"file": where, "row": line, "error": error})

    def as_dict(self) -> dict[str, Any]:
        return {"rows_read": self.read, "rows_written": self.written, "dropped": dict(self.dropped),
                "shards": [asdict(f) for f in self.files], "bad_rows": self.bad_rows}


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
    """Writes rows into `folder/<name>-00000.parquet`, ... of `rows_per_shard` rows each, streaming.

    Each file is complete or absent (Storage.parquet_writer); leaving the `with` block on an error
    aborts the file being written. `files` lists the finished ones with their rows and sha256."""

    def __init__(self, storage: Storage, folder: str, name: str, rows_per_shard: int, schema: pa.Schema) -> None:
        self.storage, self.folder, self.name = storage, folder, name
        self.rows_per_shard, self.schema = rows_per_shard, schema
        self.files: list[ShardFile] = []
        self._file: contextlib.ExitStack | None = None
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self._finish()
        elif self._file is not None:
            self._file.__exit__(*exc)

    def _rel(self) -> str:
        return f"{self.folder}/{self.name}-{len(self.files):05d}.parquet"

    def write(self, rows: list[dict[str, Any]]) -> None:
        while rows:
            if self._writer is None:
                self._file = contextlib.ExitStack()
                self._writer = self._file.enter_context(self.storage.parquet_writer(self._rel(), self.schema))
            take = rows[: self.rows_per_shard - self._rows]
            self._writer.write_table(pa.Table.from_pylist(take, schema=self.schema))
            self._rows += len(take)
            rows = rows[len(take):]
            if self._rows == self.rows_per_shard:
                self._finish()

    def _finish(self) -> None:
        if self._file is None:
            return
        self._file.close()  # the file appears, whole
        rel = self._rel()
        sha256 = file_sha256(self.storage.fs, self.storage.path(rel))  # of what was stored, read back
        self.files.append(ShardFile(posixpath.basename(rel), self._rows, sha256))
        self._file, self._writer, self._rows = None, None, 0


def benchmark_ngrams(paths: list[str], n: int) -> Contamination:
    """The n-grams of the benchmark problems in `paths` (their `prompt`/`problem`/`question`)."""
    texts = (r.get("prompt") or r.get("problem") or r.get("question") or ""
             for p in paths for _, _, r in iter_rows(p) if isinstance(r, dict))
    return Contamination(texts, n)


def stable_id(source: str, prompt: str) -> str:
    return f"{source}-{digest(source + chr(0) + normalize(prompt)).hex()}"


def owned_files(storage: Storage, shard_name: str) -> set[str]:
    """The files an earlier prepare wrote here (named in its report, even if it was interrupted
    while moving them into place). Refuses shard-named files that no prepare recorded: replacing
    them would destroy something prepare did not write."""
    try:
        earlier = storage.read_json(PREPARE_REPORT)
    except FileNotFoundError:
        earlier = {}
    owned = {posixpath.basename(s if isinstance(s, str) else s["name"]) for s in earlier.get("shards", [])}
    owned |= set(earlier.get("replaces", []))
    ours = re.compile(rf"{re.escape(shard_name)}-\d{{5}}\.parquet")
    foreign = [rel for rel in storage.list("") if ours.fullmatch(rel) and rel not in owned]
    if foreign:
        raise ConfigError(f"{storage.url(foreign[0])} exists and no earlier prepare into {storage.url()} wrote it "
                          f"({PREPARE_REPORT} does not name it): move it away, or choose another output or --shard-name")
    return owned


def publish_shards(storage: Storage, staging: str, report: Report, owned: set[str]) -> None:
    """Move the staged shards into place, replacing the earlier prepare's. The report says
    `publishing` (with the files being replaced) until every move is done, so a crash in between
    leaves a folder that `generate` refuses and the next prepare cleans up."""
    record = report.as_dict()
    new = {f.name for f in report.files}
    storage.write_json(PREPARE_REPORT, {**record, "state": "publishing", "replaces": sorted(owned)})
    for rel in sorted(owned - new):
        storage.remove(rel)
    for f in report.files:
        storage.fs.mv(storage.path(f"{staging}/{f.name}"), storage.path(f.name))
    storage.write_json(PREPARE_REPORT, {**record, "state": "complete"})
    report.shards = [storage.url(f.name) for f in report.files]
    for rel in storage.folders(""):  # this staging folder and any a killed prepare left
        if rel.startswith(STAGING) and _TOKEN.fullmatch(rel[len(STAGING):]):
            storage.remove_folder(rel)


def prepare(source: str, output: str, convert: Converter, opts: PrepareOptions) -> Report:
    """Convert, check, dedup, decontaminate and write shards; returns the summary report.

    Nothing in `output` changes unless at least one row is written and every shard is complete."""
    report = Report()
    storage = Storage(output)
    with storage_errors(storage.url()):
        owned = owned_files(storage, opts.shard_name)
    staging = f"{STAGING}{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    try:
        with ShardWriter(storage, staging, opts.shard_name, opts.rows_per_shard, convert.schema) as shards:
            _convert_all(source, convert, opts, report, shards)
        report.files = shards.files
        if report.written:
            with storage_errors(storage.url()):
                publish_shards(storage, staging, report, owned)
    finally:
        with contextlib.suppress(Exception):  # best effort: the next prepare removes what is left
            storage.remove_folder(staging)
    return report


def _convert_all(source: str, convert: Converter, opts: PrepareOptions, report: Report, shards: ShardWriter) -> None:
    contamination = benchmark_ngrams(opts.decontaminate, opts.ngram) if opts.decontaminate else None
    # Dedup state is 8-byte digests as ints (~70 bytes a prompt in a set); rows themselves stream
    # to the shard being written, a row group at a time, so memory does not grow with the source.
    seen_exact: set[int] = set()
    seen_near: set[int] = set()
    seen_ids: set[str] = set()  # only for the source's own ids; hash ids are unique once deduped
    pending: list[dict[str, Any]] = []
    for where, line, row in iter_rows(source, shards.storage):
        if opts.progress is not None and report.read % PROGRESS_ROWS == 0:
            opts.progress(report.read, report.written)
        report.read += 1
        try:
            if isinstance(row, BadRow):
                raise row
            out = convert(row)
        except BadRow as e:
            report.dropped["bad_row"] += 1
            report.bad(where, line, str(e))
            if opts.strict:
                raise BadRow(f"{where}:{line}: {e}") from None
            continue
        prompt = out["prompt"]
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
                report.bad(where, line, f"duplicate id {pid}")
                continue
            seen_ids.add(pid)
        else:
            pid = stable_id(opts.source_name, prompt)
        pending.append({**out, "id": pid, "source": opts.source_name})
        report.written += 1
        if len(pending) >= BATCH_ROWS:
            shards.write(pending)
            pending = []
    shards.write(pending)
