"""`schemas/` as code: JSON Schemas of prompt and sample rows, as Arrow schemas and validators."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"

_ARROW = {"string": pa.string(), "integer": pa.int64(), "boolean": pa.bool_(), "number": pa.float64()}
# Columns the pipeline adds on the way (besides the sample schema's own); prompt shards must not carry them.
RENDER_COLUMNS = ("rendered", "prompt_token_ids", "first_sample")
"""What the engine reads besides the prompt (render's chat text and tokens, the round's first
sample index); dropped from sample rows."""
INTERNAL_COLUMNS = RENDER_COLUMNS


@lru_cache(maxsize=None)
def load(name: str) -> dict[str, Any]:
    """A schema file from `schemas/` by name (e.g. 'prompt', 'sample', 'reasons')."""
    fname = f"{name}.schema.json" if name != "reasons" else "reasons.json"
    return json.loads((SCHEMA_DIR / fname).read_text())


def reason_codes() -> set[str]:
    return set(load("reasons")["reasons"])


def domains() -> tuple[str, ...]:
    """The closed set of prompt domains (prompt.schema.json); each selects an instruction and a verifier."""
    return tuple(load("prompt")["properties"]["domain"]["enum"])


def _types(prop: dict[str, Any]) -> tuple[str, bool]:
    t = prop["type"]
    types = [t] if isinstance(t, str) else list(t)
    nullable = "null" in types
    (base,) = [x for x in types if x != "null"]
    return base, nullable


def arrow_fields(name: str) -> list[pa.Field]:
    """The schema's properties as Arrow fields, in declaration order."""
    schema = load(name)
    required = set(schema.get("required", []))
    fields = []
    for col, prop in schema["properties"].items():
        base, nullable = _types(prop)
        fields.append(pa.field(col, _ARROW[base], nullable=nullable or col not in required))
    return fields


def _compatible(actual: pa.DataType, base: str, nullable: bool) -> bool:
    if pa.types.is_null(actual):
        return nullable
    if base == "string":
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if base == "integer":
        return pa.types.is_integer(actual)
    if base == "boolean":
        return pa.types.is_boolean(actual)
    if base == "number":
        return pa.types.is_integer(actual) or pa.types.is_floating(actual)
    return False


def check_columns(name: str, schema: pa.Schema, allow: frozenset[str] = frozenset()) -> list[str]:
    """Problems of an Arrow schema against a JSON schema: missing columns and wrong types."""
    spec = load(name)
    problems = []
    for col in spec.get("required", []):
        if col not in schema.names:
            problems.append(f"missing required column {col!r}")
    for col, prop in spec["properties"].items():
        if col in schema.names:
            base, nullable = _types(prop)
            actual = schema.field(col).type
            if not _compatible(actual, base, nullable):
                want = base + (" or null" if nullable else "")
                problems.append(f"column {col!r} has type {actual}, expected {want}")
    if name == "prompt":
        for col in sorted((reserved_prompt_columns() - allow) & set(schema.names)):
            problems.append(f"column {col!r} is reserved by the pipeline; rename it")
    return problems


def reserved_prompt_columns() -> set[str]:
    """Names a prompt shard may not use: what generation adds to each row."""
    return (set(load("sample")["properties"]) - set(load("prompt")["properties"])) | set(INTERNAL_COLUMNS)


def conform(table: pa.Table, name: str) -> pa.Table:
    """Cast the schema's columns to their declared Arrow types (null-typed ones included), keep the rest."""
    fields = {f.name: f for f in arrow_fields(name)}
    arrays, out_fields = [], []
    for col in table.column_names:
        arr = table.column(col)
        if col in fields:
            arr = arr.cast(fields[col].type)
            out_fields.append(pa.field(col, fields[col].type))
        else:
            out_fields.append(table.schema.field(col))
        arrays.append(arr)
    return pa.table(arrays, schema=pa.schema(out_fields))
