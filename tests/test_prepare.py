"""`pipeline prepare`: each built-in format on realistic rows, bad rows, dedup, decontamination;
values kept exactly (text, encodings, non-objects, NaN), compressed/TSV sources, mapped and constant
fields; whole shard sets that replace an earlier prepare's, with rows and sha256 `generate` checks."""

import json
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import REPO_ROOT
from pipeline.prepare import BadRow, Converter, PrepareOptions, SourceError, prepare
from pipeline.read import resolve


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run(tmp_path, fmt, rows, **opts):
    src = jsonl(tmp_path / "src.jsonl", rows)
    out = tmp_path / "shards"
    report = prepare(src, str(out), Converter(fmt) if isinstance(fmt, str) else fmt, PrepareOptions("src", **opts))
    table = pq.read_table(out, schema=None) if report.shards else None
    return report, (table.to_pylist() if table is not None else [])


def test_math_with_worked_solutions(tmp_path):
    rows = [
        {"problem": "Find $x$ if $2x+3=7$.", "solution": "Subtract 3: $2x=4$, so $x=\\boxed{2}$."},
        {"problem": "Compute $\\frac{1}{2}+\\frac{1}{3}$.", "solution": "Common denominator 6: $\\frac{3}{6}+\\frac{2}{6}=\\boxed{\\frac{5}{6}}$."},
        {"problem": "How many primes are below 10?", "solution": "They are 2, 3, 5 and 7, four of them."},
    ]
    report, out = run(tmp_path, "math", rows)
    assert [r["answer"] for r in out] == ["2", "\\frac{5}{6}"]
    assert all(r["domain"] == "math" and r["source"] == "src" for r in out)
    assert report.bad_rows == [{"file": str(tmp_path / "src.jsonl"), "row": 3, "error": "no \\boxed{} answer in the solution"}]


def test_gsm8k(tmp_path):
    rows = [
        {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
         "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
        {"question": "A store sells 1,200 pens a day. How many in 2 days?", "answer": "1,200*2=2,400\n#### 2,400"},
    ]
    _, out = run(tmp_path, "gsm8k", rows)
    assert [r["answer"] for r in out] == ["72", "2400"]


def test_code_stdio_and_fn_name_variants(tmp_path):
    rows = [
        {"question": "Read two integers and print their sum.", "input_output": json.dumps({"inputs": ["1 2\n", "10 20\n"], "outputs": ["3\n", "30\n"]})},
        {"question": "Write a function add(a, b).", "input_output": json.dumps({"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [[3], [7]]})},
        {"question": "Broken tests", "input_output": "{not json"},
    ]
    report, out = run(tmp_path, "code-stdio", rows)
    stdio, fn = (json.loads(r["tests"]) for r in out)
    assert stdio == {"kind": "stdio", "cases": [{"stdin": "1 2\n", "stdout": "3\n"}, {"stdin": "10 20\n", "stdout": "30\n"}], "time_limit_s": 2.0}
    assert fn["kind"] == "assert"
    # the generated assert code really checks a solution
    ok = subprocess.run([sys.executable, "-c", "def add(a, b):\n    return a + b\n" + fn["code"]])
    bad = subprocess.run([sys.executable, "-c", "def add(a, b):\n    return a - b\n" + fn["code"]], capture_output=True)
    assert ok.returncode == 0 and bad.returncode != 0
    assert "unparsable input_output JSON" in report.bad_rows[0]["error"]


def test_humaneval_and_mbpp(tmp_path):
    rows = [
        {"task_id": "HumanEval/0", "prompt": "def inc(x: int) -> int:\n    \"\"\"Return x + 1.\"\"\"\n", "entry_point": "inc",
         "test": "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-1) == 0\n"},
        {"task_id": 2, "text": "Write a function to double a number.", "test_list": ["assert double(2) == 4", "assert double(0) == 0"]},
    ]
    _, out = run(tmp_path, "humaneval", rows, id_column="task_id")
    assert [r["id"] for r in out] == ["src-HumanEval/0", "src-2"]
    he, mbpp = (json.loads(r["tests"])["code"] for r in out)
    assert subprocess.run([sys.executable, "-c", "def inc(x):\n    return x + 1\n" + he]).returncode == 0
    assert subprocess.run([sys.executable, "-c", "def double(x):\n    return 2 * x\n" + mbpp]).returncode == 0
    assert "```python\ndef inc" in out[0]["prompt"] and "assert double(2) == 4" in out[1]["prompt"]


def test_multiple_choice(tmp_path):
    rows = [
        {"question": "Which gas do plants absorb?", "options": ["Oxygen", "Carbon dioxide", "Helium", "Neon"], "answer": "B"},
        {"question": "Boiling point of water at sea level?", "A": "50 C", "B": "100 C", "C": "150 C", "answer": "(b)"},
        {"question": "Index-labelled", "choices": {"text": ["yes", "no"], "label": ["A", "B"]}, "answer": 1},
        {"question": "Bad letter", "options": ["x", "y"], "answer": "E"},
    ]
    report, out = run(tmp_path, "choice", rows)
    assert [r["answer"] for r in out] == ["B", "B", "B"]
    assert out[0]["prompt"].endswith("A. Oxygen\nB. Carbon dioxide\nC. Helium\nD. Neon")
    assert all(r["domain"] == "choice" for r in out)
    assert "not one of the option letters" in report.bad_rows[0]["error"]


def test_generic_mapping(tmp_path):
    rows = [{"instruction": "Write a haiku about rain.", "ref": None}, {"instruction": "", "ref": None}]
    report, out = run(tmp_path, Converter("generic", {"prompt": "instruction", "answer": "ref"}, {"domain": "general"}), rows)
    assert out[0]["prompt"] == "Write a haiku about rain." and out[0]["domain"] == "general"
    assert report.dropped["bad_row"] == 1


def test_stable_ids_dedup_and_near_duplicates(tmp_path):
    rows = [{"question": "What is 2+2?", "answer": "#### 4"}, {"question": "What is 2+2?", "answer": "#### 4"},
            {"question": "what is 2 + 2 ?", "answer": "#### 4"}, {"question": "What is 3+3?", "answer": "#### 6"}]
    report, out = run(tmp_path, "gsm8k", rows)
    assert len(out) == 2 and report.dropped == {"duplicate": 1, "near_duplicate": 1}
    _, again = run(tmp_path, "gsm8k", rows)
    assert [r["id"] for r in out] == [r["id"] for r in again]  # stable across runs


def test_decontamination_against_benchmark_files(tmp_path):
    bench = jsonl(tmp_path / "bench.jsonl", [{"problem": "Let x be the smallest positive integer such that x squared ends in the digits 444. Find x."}])
    rows = [{"question": "Let x be the smallest positive integer such that x squared ends in the digits 444. Find x. Explain.", "answer": "#### 38"},
            {"question": "What is the sum of the first ten positive integers?", "answer": "#### 55"}]
    report, out = run(tmp_path, "gsm8k", rows, decontaminate=[bench])
    assert report.dropped == {"contaminated": 1} and len(out) == 1


def test_strict_fails_with_file_and_line(tmp_path):
    with pytest.raises(BadRow, match=r"src.jsonl:2: missing field 'question'"):
        run(tmp_path, "gsm8k", [{"question": "ok?", "answer": "#### 1"}, {"answer": "#### 2"}], strict=True)


def test_shards_are_sized_ordered_and_valid_for_generate(tmp_path):
    rows = [{"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"} for i in range(25)]
    report, _ = run(tmp_path, "gsm8k", rows, rows_per_shard=10)
    assert [s.rsplit("/", 1)[-1] for s in report.shards] == ["prompts-00000.parquet", "prompts-00001.parquet", "prompts-00002.parquet"]
    _, shards = resolve([str(tmp_path / "shards" / "*.parquet")])  # generate's own validation
    assert [s.rows for s in shards] == [10, 10, 5]


def test_reads_csv_parquet_and_a_saved_datasets_folder(tmp_path):
    import datasets

    rows = [{"question": "What is 5+5?", "answer": "#### 10", "id": "q1"}, {"question": "What is 6+6?", "answer": "#### 12", "id": "q2"}]
    (tmp_path / "a.csv").write_text('question,answer,id\n"What is 5+5?","#### 10",q1\n"What is 6+6?","#### 12",q2\n')
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for src in (tmp_path / "a.csv", tmp_path / "a.parquet", tmp_path / "saved"):
        out = tmp_path / ("out-" + src.name)
        report = prepare(str(src), str(out), Converter("gsm8k"), PrepareOptions("x"))
        got = pq.read_table(out).to_pylist()
        assert [(r["id"], r["prompt"], r["answer"], r["domain"]) for r in got] == [
            ("x-q1", "What is 5+5?", "10", "math"), ("x-q2", "What is 6+6?", "12", "math")], src
        assert report.written == 2 and report.dropped == {}


def test_cli_prepare_then_shards_validate(tmp_path):
    src = jsonl(tmp_path / "gsm.jsonl", [{"question": "What is 1+1?", "answer": "#### 2"}, {"question": "", "answer": "#### 0"}])
    proc = subprocess.run([sys.executable, "-m", "pipeline", "prepare", src, str(tmp_path / "out"), "--format", "gsm8k"],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(tmp_path / "out")
    assert "read 2, written 1" in proc.stderr and "gsm.jsonl:2: missing field 'question'" in proc.stderr


# -- inputs kept exactly -------------------------------------------------------------------------
def prepared(out):
    return pq.read_table(out).to_pylist()


def test_csv_and_tsv_cells_stay_text_unless_a_column_is_declared_numeric(tmp_path):
    (tmp_path / "a.csv").write_text('q,ref,level,score\n"Zip code of the office?",007,007,0.50\n"Half of one?",0.50,2,1e1\n"Third?",x,three,1\n')
    convert = Converter("generic", {"prompt": "q", "answer": "ref", "level": "level", "score": "score"}, {},
                        {"level": "int", "score": "float"})
    report = prepare(str(tmp_path / "a.csv"), str(tmp_path / "out"), convert, PrepareOptions("a"))
    rows = prepared(tmp_path / "out")
    assert [(r["answer"], r["level"], r["score"]) for r in rows] == [("007", 7, 0.5), ("0.50", 2, 10.0)]
    assert pq.read_schema(tmp_path / "out" / "prompts-00000.parquet").field("level").type == pa.int64()
    assert report.bad_rows[0]["row"] == 4 and "'level' is declared numeric (int) but 'three'" in report.bad_rows[0]["error"]
    # TSV: tab-separated, quotes are text (no quoting in text/tab-separated-values)
    (tmp_path / "b.tsv").write_text('question\tanswer\n"Quoted" question, 007?\t#### 0.50\n')
    prepare(str(tmp_path / "b.tsv"), str(tmp_path / "tsv"), Converter("gsm8k"), PrepareOptions("b"))
    assert [(r["prompt"], r["answer"]) for r in prepared(tmp_path / "tsv")] == [('"Quoted" question, 007?', "0.50")]


def test_a_row_with_a_different_number_of_fields_is_a_row_error(tmp_path):
    (tmp_path / "a.csv").write_text('question,answer\n"ok?",#### 1\n"a, b",#### 2,extra\n')
    report = prepare(str(tmp_path / "a.csv"), str(tmp_path / "out"), Converter("gsm8k"), PrepareOptions("a"))
    assert report.written == 1 and report.bad_rows[0]["row"] == 3 and "3 fields, the header has 2" in report.bad_rows[0]["error"]


@pytest.mark.parametrize("encoding, bom", [("utf-8", b"\xef\xbb\xbf"), ("utf-8", b""), ("utf-16-le", b"\xff\xfe"),
                                           ("utf-16-be", b"\xfe\xff"), ("utf-32-le", b"\xff\xfe\x00\x00")])
@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_utf8_with_or_without_bom_and_utf16_by_bom_keep_every_row(tmp_path, encoding, bom, kind):
    rows = [("Café: what is 1+1?", "2"), ("Ünïcödé 2+2 ≠ 5?", "4")]
    if kind == "jsonl":
        text = "".join(json.dumps({"question": q, "answer": f"#### {a}"}, ensure_ascii=False) + "\n" for q, a in rows)
    else:
        text = "question,answer\r\n" + "".join(f'"{q}",#### {a}\r\n' for q, a in rows)
    src = tmp_path / f"src.{kind}"
    src.write_bytes(bom + text.encode(encoding))
    report = prepare(str(src), str(tmp_path / "out"), Converter("gsm8k"), PrepareOptions("s"))
    assert report.bad_rows == []
    assert [(r["prompt"], r["answer"]) for r in prepared(tmp_path / "out")] == rows


@pytest.mark.parametrize("kind", ["jsonl", "csv", "json"])
def test_other_encodings_are_a_file_error_naming_the_byte_never_replacement_characters(tmp_path, kind):
    texts = {"jsonl": '{"question": "Is it ok?", "answer": "#### 1"}\n{"question": "Café au lait: 2+2?", "answer": "#### 4"}\n',
             "csv": 'question,answer\n"Is it ok?",#### 1\n"Café au lait: 2+2?",#### 4\n',
             "json": '[{"question": "Is it ok?", "answer": "#### 1"}, {"question": "Café au lait: 2+2?", "answer": "#### 4"}]'}
    data = texts[kind].encode("latin-1")
    src = tmp_path / f"latin.{kind}"
    src.write_bytes(data)
    offset = data.index("é".encode("latin-1"))
    with pytest.raises(SourceError, match=rf"latin.{kind}: not valid UTF-8: byte 0xe9 at offset {offset};"):
        prepare(str(src), str(tmp_path / "out"), Converter("gsm8k"), PrepareOptions("l"))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("**/*.parquet"))


def test_utf16_without_a_bom_is_a_file_error(tmp_path):
    src = tmp_path / "nobom.jsonl"
    src.write_bytes('{"question": "2+2?", "answer": "#### 4"}\n'.encode("utf-16-le"))
    with pytest.raises(SourceError, match="nobom.jsonl: NUL bytes at the start: UTF-16 or UTF-32 without a byte-order mark"):
        prepare(str(src), str(tmp_path / "out"), Converter("gsm8k"), PrepareOptions("n"))


def test_json_values_that_are_not_objects_and_nan_answers_are_row_errors(tmp_path):
    lines = ['{"question": "ok?", "answer": "#### 1"}', '["question", "answer"]', '"just a string"', "42", "null",
             '{"question": "nan?", "answer": NaN}', '{"question": "inf?", "answer": Infinity}', '{"question": "deep?", "answer": "#### 2", "x": [-Infinity]}',
             "{not json"]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    report = prepare(str(tmp_path / "a.jsonl"), str(tmp_path / "out"), Converter("gsm8k"), PrepareOptions("a"))
    errors = {b["row"]: b["error"] for b in report.bad_rows}
    assert report.written == 1 and sorted(errors) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert errors[2] == "a JSON value that is an array, not an object" and errors[3].endswith("a string, not an object")
    assert errors[4].endswith("a number, not an object") and errors[5].endswith("null, not an object")
    assert {errors[6], errors[7], errors[8]} == {"NaN or Infinity is not a JSON value"}
    assert errors[9].startswith("invalid JSON")
    # the same in a JSON array file, and NaN in a Parquet column (a float answer becomes no text)
    (tmp_path / "b.json").write_text('[{"question": "ok?", "answer": "#### 1"}, [1, 2], {"question": "nan?", "answer": NaN}]')
    report = prepare(str(tmp_path / "b.json"), str(tmp_path / "out-b"), Converter("gsm8k"), PrepareOptions("b"))
    assert [(b["row"], b["error"]) for b in report.bad_rows] == [(2, "a JSON value that is an array, not an object"),
                                                                  (3, "NaN or Infinity is not a JSON value")]
    pq.write_table(pa.table({"q": ["nan?", "ok?"], "ref": [float("nan"), 2.5]}), tmp_path / "c.parquet")
    report = prepare(str(tmp_path / "c.parquet"), str(tmp_path / "out-c"), Converter("generic", {"prompt": "q", "answer": "ref"}),
                     PrepareOptions("c"))
    assert [r["answer"] for r in prepared(tmp_path / "out-c")] == ["2.5"]
    assert report.bad_rows[0]["row"] == 1 and "NaN" in report.bad_rows[0]["error"]


def test_gzipped_jsonl_and_json_tsv_and_json_lines_in_a_json_file_are_read(tmp_path):
    import gzip

    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b'{"question": "gz lines?", "answer": "#### 1"}\n'))
    (tmp_path / "b.json.gz").write_bytes(gzip.compress(b'{"data": [{"question": "gz array?", "answer": "#### 2"}]}'))
    (tmp_path / "c.tsv").write_text("question\tanswer\ntab separated?\t#### 3\n")
    (tmp_path / "d.json").write_text('{"question": "lines in .json?", "answer": "#### 4"}\n{"question": "second?", "answer": "#### 5"}\n')
    (tmp_path / "ignored.txt").write_text("not a source")
    report = prepare(str(tmp_path), str(tmp_path / "out"), Converter("gsm8k"), PrepareOptions("d"))  # a folder: every source in it
    assert sorted(r["prompt"] for r in prepared(tmp_path / "out")) == ["gz array?", "gz lines?", "lines in .json?", "second?", "tab separated?"]
    assert report.read == 5


def test_mapped_and_constant_fields_are_kept_typed_and_validated(tmp_path):
    rows = [{"q": "Name a prime.", "lvl": 3, "tags": ["easy", "nt"], "dom": "math"},
            {"q": "Name a colour.", "lvl": None, "tags": [], "dom": "maths"}]
    convert = Converter("generic", {"prompt": "q", "level": "lvl", "tags": "tags", "domain": "dom"},
                        {"split": "train", "weight": 0.5, "reviewed": True}, {"lvl": "int"})
    report, out = run(tmp_path, convert, rows)
    assert out == [{"id": out[0]["id"], "prompt": "Name a prime.", "domain": "math", "answer": None, "tests": None, "source": "src",
                    "level": 3, "tags": '["easy", "nt"]', "split": "train", "weight": 0.5, "reviewed": True}]
    assert report.bad_rows[0]["error"] == "domain 'maths' is not one of math, code, choice, general"
    schema = pq.read_schema(tmp_path / "shards" / "prompts-00000.parquet")
    assert [(f.name, str(f.type)) for f in schema][6:] == [("level", "int64"), ("tags", "string"), ("split", "string"),
                                                            ("weight", "double"), ("reviewed", "bool")]
    # extra fields on a built-in format too
    _, out = run(tmp_path, Converter("gsm8k", {"difficulty": "level"}, {"split": "test"}),
                 [{"question": "1+1?", "answer": "#### 2", "level": "easy"}])
    assert (out[0]["difficulty"], out[0]["split"], out[0]["answer"]) == ("easy", "test", "2")


@pytest.mark.parametrize("args, message", [
    (("generic", {"prompt": "q"}, {"domain": "maths"}), "--const domain=maths: not a domain; one of math, code, choice, general"),
    (("generic", {"answer": "a"}, {}), "generic format needs --map prompt=COLUMN"),
    (("math", {"answer": "a"}, {}), "--map answer: the math format sets 'answer' itself"),
    (("generic", {"prompt": "q", "id": "k"}, {}), "--map id: prepare sets 'id' itself"),
    (("generic", {"prompt": "q"}, {"source": "x"}), "--const source: prepare sets 'source' itself"),
    (("generic", {"prompt": "q", "accepted": "ok"}, {}), "'accepted' is a column the pipeline adds to samples"),
    (("generic", {"prompt": "q", "x": "a"}, {"x": "b"}), "'x' is both mapped and constant"),
    (("mat", {}, {}), "unknown format 'mat'"),
])
def test_mappings_that_can_never_work_are_refused(args, message):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        Converter(*args)


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "pipeline", "prepare", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, **kw)


def errors_only(stderr):
    return [line for line in stderr.splitlines() if " INFO " not in line]


def test_cli_exits_2_when_nothing_is_written_and_leaves_the_earlier_output(tmp_path):
    src = jsonl(tmp_path / "gsm.jsonl", [{"question": f"What is {i}+{i}?", "answer": f"#### {2 * i}"} for i in range(5)])
    assert cli(src, tmp_path / "out", "--format", "gsm8k").returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    proc = cli(src, tmp_path / "out", "--format", "math")  # the wrong format drops every row
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert errors_only(proc.stderr)[-1].startswith(f"error: nothing written to {tmp_path / 'out'}: every row was dropped")
    assert "gsm.jsonl:1: missing field 'solution'" in proc.stderr
    assert "_prepare_report.json" not in proc.stderr  # the one there is the earlier prepare's: not named as this one's
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = cli(empty, tmp_path / "out2", "--format", "gsm8k")
    assert proc.returncode == 2 and errors_only(proc.stderr)[-1].startswith("error: nothing written") and "holds no rows" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--format", "generic", "--map", "prompt=question", "--const", "domain=maths"], "error: --const domain=maths: not a domain"),
    (["--format", "gsm8k", "--numeric", "answer=decimal"], "error: --numeric answer=decimal: the type is int or float"),
    (["--format", "gsm8k", "--strict"], "gsm.jsonl:2: missing field 'question'"),
])
def test_cli_user_errors_are_one_line_exit_2(tmp_path, args, message):
    src = jsonl(tmp_path / "gsm.jsonl", [{"question": "1+1?", "answer": "#### 2"}, {"answer": "#### 3"}])
    proc = cli(src, tmp_path / "out", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = errors_only(proc.stderr)
    assert line.startswith("error: ") and message in line


def test_cli_latin1_source_is_one_line_naming_file_and_offset(tmp_path):
    src = tmp_path / "latin.csv"
    src.write_bytes('question,answer\n"Café?",#### 1\n'.encode("latin-1"))
    proc = cli(src, tmp_path / "out", "--format", "gsm8k")
    assert proc.returncode == 2 and errors_only(proc.stderr) == [
        f"error: {src}: not valid UTF-8: byte 0xe9 at offset 20; save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`) "
        "or as UTF-16 with a byte-order mark"]


# -- whole files; a rerun replaces ------------------------------------------------------------------
def gsm_rows(n, start=0):
    return [{"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"} for i in range(start, start + n)]


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_rerun_replaces_the_earlier_prepares_shards_and_nothing_else(tmp_path):
    out = tmp_path / "shards"
    src = jsonl(tmp_path / "a.jsonl", gsm_rows(25))
    first = prepare(src, str(out), Converter("gsm8k"), PrepareOptions("a", rows_per_shard=10))
    assert len(first.shards) == 3
    (out / "notes.txt").write_text("mine")
    (out / "mine.parquet").write_bytes(b"not prepare's")
    second = prepare(jsonl(tmp_path / "b.jsonl", gsm_rows(12, 100)), str(out), Converter("gsm8k"),
                     PrepareOptions("b", rows_per_shard=10))
    assert listing(out) == ["_prepare_report.json", "mine.parquet", "notes.txt", "prompts-00000.parquet", "prompts-00001.parquet"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "mine.parquet").read_bytes() == b"not prepare's"
    rows = pq.read_table(out / "prompts-00000.parquet").to_pylist() + pq.read_table(out / "prompts-00001.parquet").to_pylist()
    assert [r["source"] for r in rows] == ["b"] * 12 and second.shards == [str(out / "prompts-00000.parquet"), str(out / "prompts-00001.parquet")]


def test_a_shard_named_file_prepare_did_not_write_is_refused_and_kept(tmp_path):
    from pipeline.config import ConfigError

    out = tmp_path / "shards"
    out.mkdir()
    (out / "prompts-00000.parquet").write_bytes(b"someone else's")
    with pytest.raises(ConfigError, match="prompts-00000.parquet exists and no earlier prepare into .* wrote it"):
        prepare(jsonl(tmp_path / "a.jsonl", gsm_rows(3)), str(out), Converter("gsm8k"), PrepareOptions("a"))
    assert listing(out) == ["prompts-00000.parquet"] and (out / "prompts-00000.parquet").read_bytes() == b"someone else's"


def test_a_failed_prepare_changes_nothing_and_leaves_no_staging(tmp_path):
    out = tmp_path / "shards"
    prepare(jsonl(tmp_path / "a.jsonl", gsm_rows(25)), str(out), Converter("gsm8k"), PrepareOptions("a", rows_per_shard=10))
    before = {p: (out / p).read_bytes() for p in listing(out)}
    rows = gsm_rows(9000) + [{"answer": "#### 1"}]  # a bad row after the first 8192-row batch went to the shard writer
    with pytest.raises(BadRow, match=r"b.jsonl:9001: missing field 'question'"):
        prepare(jsonl(tmp_path / "b.jsonl", rows), str(out), Converter("gsm8k"), PrepareOptions("b", rows_per_shard=5000, strict=True))
    assert {p: (out / p).read_bytes() for p in listing(out)} == before


def test_the_report_records_rows_and_sha256_that_generate_checks(tmp_path):
    import hashlib

    from pipeline.read import InputError, check_prepared, prepared_shards

    out = tmp_path / "shards"
    prepare(jsonl(tmp_path / "a.jsonl", gsm_rows(25)), str(out), Converter("gsm8k"), PrepareOptions("a", rows_per_shard=10))
    fs, shards = resolve([str(out / "*.parquet")])
    records = prepared_shards(fs, str(out))
    assert {k: v.rows for k, v in records.items()} == {"prompts-00000.parquet": 10, "prompts-00001.parquet": 10, "prompts-00002.parquet": 5}
    assert records["prompts-00001.parquet"].sha256 == hashlib.sha256((out / "prompts-00001.parquet").read_bytes()).hexdigest()
    check_prepared(fs, shards)
    # a shard cut short that is still valid Parquet (what an interrupted streaming write used to leave)
    original = (out / "prompts-00000.parquet").read_bytes()
    whole = pq.read_table(out / "prompts-00000.parquet")
    pq.write_table(whole.slice(0, 8), out / "prompts-00000.parquet")
    with pytest.raises(InputError, match=r"prompts-00000.parquet: 8 rows, but prepare wrote 10"):
        check_prepared(*resolve([str(out / "*.parquet")]))
    # same rows, other content
    pq.write_table(whole.set_column(1, "prompt", pa.array(["x"] * 10)), out / "prompts-00000.parquet")
    with pytest.raises(InputError, match=r"prompts-00000.parquet: its content is not what prepare wrote"):
        check_prepared(*resolve([str(out / "*.parquet")]))
    (out / "prompts-00000.parquet").write_bytes(original)
    check_prepared(*resolve([str(out / "*.parquet")]))
    # a leftover beside the prepared set
    pq.write_table(whole, out / "prompts-00007.parquet")
    with pytest.raises(InputError, match=r"prompts-00007.parquet: not one of the 3 shards"):
        check_prepared(*resolve([str(out / "*.parquet")]))


def test_a_prepare_killed_while_moving_shards_in_is_refused_by_generate_then_cleaned_by_a_rerun(tmp_path, monkeypatch):
    from pipeline import storage as storage_module
    from pipeline.read import InputError, prepared_shards

    out = tmp_path / "shards"
    prepare(jsonl(tmp_path / "a.jsonl", gsm_rows(25)), str(out), Converter("gsm8k"), PrepareOptions("a", rows_per_shard=10))
    real_mv = storage_module.LocalFileSystem.mv
    moved = []

    def mv_then_die(self, a, b, **kw):
        if moved:
            raise KeyboardInterrupt  # the process dies between two moves
        moved.append(b)
        return real_mv(self, a, b, **kw)

    monkeypatch.setattr(storage_module.LocalFileSystem, "mv", mv_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(jsonl(tmp_path / "b.jsonl", gsm_rows(12, 100)), str(out), Converter("gsm8k"), PrepareOptions("b", rows_per_shard=5))
    monkeypatch.setattr(storage_module.LocalFileSystem, "mv", real_mv)
    fs, _ = resolve([str(out / "*.parquet")])
    with pytest.raises(InputError, match="the prepare writing these shards did not finish"):
        prepared_shards(fs, str(out))
    prepare(jsonl(tmp_path / "c.jsonl", gsm_rows(4, 200)), str(out), Converter("gsm8k"), PrepareOptions("c", rows_per_shard=10))
    assert listing(out) == ["_prepare_report.json", "prompts-00000.parquet"]
    assert [r["source"] for r in pq.read_table(out / "prompts-00000.parquet").to_pylist()] == ["c"] * 4


def test_prepare_never_reads_its_own_output_as_a_source(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    jsonl(data / "a.jsonl", gsm_rows(3))
    prepare(str(data), str(data / "shards"), Converter("gsm8k"), PrepareOptions("a"))
    again = prepare(str(data), str(data / "shards"), Converter("gsm8k"), PrepareOptions("a"))  # the folder holds shards now
    assert again.read == 3 and len(prepared(data / "shards")) == 3
    with pytest.raises(SourceError, match="prompts-00000.parquet: is in the output folder"):
        prepare(str(data / "**" / "*.parquet"), str(data / "shards"), Converter("gsm8k"), PrepareOptions("a"))
