"""The bad-input corpus: every case fails before GPU work naming file/row/column, or gets a per-row reason."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import PROMPT_SCHEMA, write_shard
from pipeline.config import load_job
from pipeline.read import InputError, resolve, scan_prompts, unified_schema
from pipeline.render import Renderer
from pipeline.storage import Storage


def preflight(*patterns):
    fs, shards = resolve([str(p) for p in patterns])
    scan_prompts(fs, shards, {})
    return shards


def test_missing_shard(tmp_path):
    with pytest.raises(InputError, match="nope.parquet: no such shard"):
        preflight(tmp_path / "nope.parquet")
    with pytest.raises(InputError, match="no such shard"):
        preflight(tmp_path / "*.parquet")


def test_empty_shard_is_valid_and_has_no_rows(tmp_path):
    (s,) = preflight(write_shard(tmp_path / "empty.parquet", []))
    assert s.rows == 0


def test_corrupt_parquet(tmp_path):
    p = tmp_path / "corrupt.parquet"
    good = write_shard(tmp_path / "good.parquet", [{"id": "a", "prompt": "x"}])
    p.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(InputError, match="corrupt.parquet: not a readable Parquet file"):
        preflight(p)


def test_missing_column_and_wrong_type(tmp_path):
    p = tmp_path / "missing.parquet"
    pq.write_table(pa.table({"id": ["a"], "domain": ["math"]}), p)
    with pytest.raises(InputError, match="missing.parquet: missing required column 'prompt'"):
        preflight(p)
    q = tmp_path / "wrongtype.parquet"
    pq.write_table(pa.table({"id": [1], "prompt": ["x"], "domain": ["math"]}), q)
    with pytest.raises(InputError, match="wrongtype.parquet: column 'id' has type int64, expected string"):
        preflight(q)


def test_binary_prompt_column_is_rejected(tmp_path):
    p = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": pa.array([b"\xff\xfe bad"], pa.binary()), "domain": ["math"]}), p)
    with pytest.raises(InputError, match="column 'prompt' has type binary"):
        preflight(p)


def test_all_null_column_with_arrow_null_type_reads_as_strings(tmp_path):
    a = write_shard(tmp_path / "a.parquet", [{"id": "a", "prompt": "x", "answer": "1"}])
    b = tmp_path / "b.parquet"
    pq.write_table(pa.table({"id": ["b"], "prompt": ["y"], "domain": ["math"], "answer": pa.array([None], pa.null())}), b)
    shards = preflight(a, b)
    assert unified_schema(shards).field("answer").type == pa.string()


def test_duplicate_ids_across_shards(tmp_path):
    a = write_shard(tmp_path / "a.parquet", [{"id": "p1", "prompt": "x"}])
    b = write_shard(tmp_path / "b.parquet", [{"id": "p2", "prompt": "y"}, {"id": "p1", "prompt": "z"}])
    with pytest.raises(InputError, match=r"b.parquet: row 1: id 'p1' is also used by a different prompt in .*a.parquet"):
        preflight(a, b)


def test_null_id(tmp_path):
    p = write_shard(tmp_path / "a.parquet", [{"id": None, "prompt": "x"}])
    with pytest.raises(InputError, match="row 0: column 'id' is empty"):
        preflight(p)


def test_reserved_column(tmp_path):
    schema = PROMPT_SCHEMA.append(pa.field("completion", pa.string()))
    p = write_shard(tmp_path / "a.parquet", [{"id": "a", "prompt": "x", "completion": "y"}], schema)
    with pytest.raises(InputError, match="'completion' is reserved"):
        preflight(p)


class CharTokenizer:
    """Stands in for a tokenizer in the render unit: one token per character."""

    model_max_length = 2048

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, chat_template=None):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def __call__(self, text, add_special_tokens):
        return {"input_ids": [ord(c) % 50000 for c in text]}


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "", "domain": "math"}, "empty_prompt"),
        ({"prompt": "   \n", "domain": "math"}, "empty_prompt"),
        ({"prompt": "x" * 1_000_000, "domain": "math"}, "prompt_too_long"),
        ({"prompt": "What is 2+2?", "domain": "astrology"}, "unknown_domain"),
        ({"prompt": "What is 2+2?", "domain": "math"}, None),
        ({"prompt": "Sum two ints.", "domain": "math", "tests": "{not json"}, "bad_tests"),
        ({"prompt": "Sum two ints.", "domain": "math", "tests": "[1, 2]"}, "bad_tests"),
        ({"prompt": "Sum two ints.", "domain": "code", "tests": '{"kind": "stdio", "cases": []}'}, "bad_tests"),
        ({"prompt": "Sum two ints.", "domain": "code", "tests": '{"kind": "assert", "code": "assert f()", "timeout": 1}'}, "bad_tests"),
        ({"prompt": "Sum two ints.", "domain": "code", "tests": '{"kind": "stdio", "cases": [{"stdin": "1 2", "stdout": "3"}]}'}, None),
    ],
)
def test_row_level_problems_become_reasons(row, reason):
    renderer = Renderer(CharTokenizer(), load_job(None, engine={"max_model_len": 4096}))
    assert renderer(row).reject_reason == reason


def test_render_applies_r1_rules():
    job = load_job(None, model={"path": "m", "reasoning": True})
    r = Renderer(CharTokenizer(), job)({"prompt": "What is 2+2?", "domain": "math"})
    assert r.text == "<user>What is 2+2?\nPlease reason step by step, and put your final answer within \\boxed{}.<assistant><think>\n"
    assert "<system>" not in r.text


@pytest.mark.slow
def test_denied_access_is_a_clear_error_without_the_secret(s3, bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-123456")
    with pytest.raises(OSError, match=f"output s3://{bucket}/out is not writable") as e:
        Storage(f"s3://{bucket}/out").check_writable()
    assert "wrong-secret-value" not in str(e.value) and s3["AWS_SECRET_ACCESS_KEY"] not in str(e.value)


def test_duplicate_and_contaminated_prompts_are_flagged_before_generation(tmp_path):
    from pipeline.ngrams import Contamination

    a = write_shard(tmp_path / "a.parquet", [{"id": "1", "prompt": "What is 2+2?"}, {"id": "2", "prompt": "Find all real x with x^2 - 5x + 6 = 0 and sum them."}])
    b = write_shard(tmp_path / "b.parquet", [{"id": "3", "prompt": "what is 2 + 2"}, {"id": "4", "prompt": "What is 3+3?"}])
    fs, shards = resolve([str(a), str(b)])
    bench = Contamination(["Find all real x with x^2 - 5x + 6 = 0 and sum them."], n=8)
    assert scan_prompts(fs, shards, {}, True, bench).flagged == {"2": "contaminated", "3": "duplicate"}
    assert scan_prompts(fs, shards, {}, False, None).flagged == {}
    renderer = Renderer(CharTokenizer(), load_job(None), {"3": "duplicate"})
    assert renderer({"id": "3", "prompt": "what is 2 + 2", "domain": "math"}).reject_reason == "duplicate"


def test_shards_stream_in_blocks_in_one_schema(tmp_path):
    """The generate/curate reader: blocks of at most `rows` rows, columns a shard lacks come back null."""
    import fsspec

    from pipeline.read import iter_shard

    pq.write_table(pa.table({"id": [f"a{i}" for i in range(5)], "prompt": ["p"] * 5, "domain": ["math"] * 5}),
                   tmp_path / "a.parquet", row_group_size=2)
    pq.write_table(pa.table({"id": ["b0"], "prompt": ["q"], "domain": ["code"], "tests": ['{"kind": "assert", "code": ""}']}),
                   tmp_path / "b.parquet")
    fs, shards = resolve([str(tmp_path / "*.parquet")])
    schema = unified_schema(shards)
    local = fsspec.filesystem("file")
    blocks = list(iter_shard(local, shards[0].path, schema, rows=2, skip=frozenset({"a1"})))
    assert [b.num_rows for b in blocks] == [1, 2, 1]  # a1 skipped (already done)
    assert all(b.schema.names == [*schema.names, "prompt_hash"] for b in blocks)
    assert blocks[0].column("tests").to_pylist() == [None]
    assert [len(h) for b in blocks for h in b.column("prompt_hash").to_pylist()] == [24] * 4
