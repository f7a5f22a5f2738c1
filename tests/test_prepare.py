"""`pipeline prepare`: each built-in format on realistic rows, bad rows, dedup, decontamination."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import REPO_ROOT
from pipeline.prepare import FORMATS, BadRow, PrepareOptions, generic, prepare
from pipeline.read import resolve


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run(tmp_path, fmt, rows, **opts):
    src = jsonl(tmp_path / "src.jsonl", rows)
    out = tmp_path / "shards"
    report = prepare(src, str(out), FORMATS[fmt] if isinstance(fmt, str) else fmt, PrepareOptions("src", **opts))
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
    report, out = run(tmp_path, generic({"prompt": "instruction", "answer": "ref"}, {"domain": "general"}), rows)
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
    rows = [{"question": "What is 5+5?", "answer": "#### 10"}]
    (tmp_path / "a.csv").write_text("question,answer\n\"What is 5+5?\",\"#### 10\"\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    ds = tmp_path / "saved"
    ds.mkdir()
    with pa.ipc.new_stream(ds / "data-00000-of-00001.arrow", pa.Table.from_pylist(rows).schema) as w:
        w.write_table(pa.Table.from_pylist(rows))
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    for src in (tmp_path / "a.csv", tmp_path / "a.parquet", ds):
        out = tmp_path / ("out-" + src.name)
        report = prepare(str(src), str(out), FORMATS["gsm8k"], PrepareOptions("x"))
        assert report.written == 1, src


def test_cli_prepare_then_shards_validate(tmp_path):
    src = jsonl(tmp_path / "gsm.jsonl", [{"question": "What is 1+1?", "answer": "#### 2"}, {"question": "", "answer": "#### 0"}])
    proc = subprocess.run([sys.executable, "-m", "pipeline", "prepare", src, str(tmp_path / "out"), "--format", "gsm8k"],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(tmp_path / "out")
    assert "read 2, written 1" in proc.stderr and "gsm.jsonl:2: missing field 'question'" in proc.stderr
