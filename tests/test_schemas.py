import json
import re
from pathlib import Path

import pyarrow as pa

from pipeline import schemas


def test_prompt_schema_required_columns_and_types():
    ok = pa.schema([("id", pa.string()), ("prompt", pa.large_string()), ("domain", pa.string()), ("answer", pa.null())])
    assert schemas.check_columns("prompt", ok) == []
    bad = pa.schema([("id", pa.int64()), ("prompt", pa.string())])
    problems = schemas.check_columns("prompt", bad)
    assert "missing required column 'domain'" in problems
    assert any("'id' has type int64" in p for p in problems)


def test_all_null_required_string_column_is_rejected():
    bad = pa.schema([("id", pa.string()), ("prompt", pa.null()), ("domain", pa.string())])
    assert any("'prompt'" in p for p in schemas.check_columns("prompt", bad))


def test_reserved_column_is_rejected():
    for col in ("prompt_hash", "rendered", "sample_index", "accepted", "round", "first_sample"):
        s = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("domain", pa.string()), (col, pa.string())])
        assert any(f"column {col!r} is reserved" in p for p in schemas.check_columns("prompt", s)), col


def test_every_reason_the_code_emits_is_documented():
    """Reason codes are a contract: any literal passed to Verdict.reject / reject_reason is in reasons.json."""
    codes = schemas.reason_codes()
    root = Path(schemas.__file__).parent
    used = set()
    for py in root.rglob("*.py"):
        text = py.read_text()
        used |= set(re.findall(r'Verdict\.reject\(\s*"([a-z_]+)"', text))
        used |= set(re.findall(r'Rendered\([^)]*"([a-z_]+)"\)', text))
        used |= set(re.findall(r'Rendered\(None, None, "([a-z_]+)"\)', text))
        used |= set(re.findall(r'"(engine_error|judge_rejected|duplicate_completion|not_selected|pass_rate_band|minority_answer|no_majority)"', text))
    assert used, "the scan found nothing: the test would pass vacuously"
    assert used <= codes, f"undocumented reason codes: {used - codes}"


def test_schema_files_are_valid_json_schema():
    for name in ("prompt", "sample"):
        s = schemas.load(name)
        assert s["type"] == "object" and set(s["required"]) <= set(s["properties"])
    json.loads((schemas.SCHEMA_DIR / "reasons.json").read_text())
