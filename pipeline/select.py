"""Rejection sampling: per prompt, drop near-identical accepted completions, then keep up to
`keep_per_prompt` by a policy. Dropped samples stay in `samples/` with their reason."""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa

from pipeline.config import SelectSpec
from pipeline.ngrams import digest, normalize


def _rank(row: dict[str, Any], policy: str) -> tuple[Any, ...]:
    if policy == "shortest":
        return (row.get("completion_tokens") or 0, row["sample_index"])
    if policy == "random":  # seeded by the sample's key: the same choice on every rerun
        key = f"{row['id']}:{row['sample_index']}".encode()
        return (hashlib.blake2b(key, digest_size=8).digest(),)
    return (row["sample_index"],)


def select(samples: pa.Table, spec: SelectSpec) -> pa.Table:
    """Update `accepted` / `reject_reason` of a shard's samples (all samples of a prompt are in it)."""
    if not spec.dedup_completions and spec.keep_per_prompt is None:
        return samples
    rows = samples.select(["id", "sample_index", "accepted", "reject_reason", "completion", "completion_tokens"]).to_pylist()
    by_prompt: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if r["accepted"]:
            by_prompt.setdefault(r["id"], []).append(i)
    reasons: dict[int, str] = {}
    for idx in by_prompt.values():
        idx.sort(key=lambda i: rows[i]["sample_index"])
        if spec.dedup_completions:
            seen: set[bytes] = set()
            unique = []
            for i in idx:
                d = digest(normalize(rows[i]["completion"] or ""))
                if d in seen:
                    reasons[i] = "duplicate_completion"
                else:
                    seen.add(d)
                    unique.append(i)
            idx = unique
        if spec.keep_per_prompt is not None:
            for i in sorted(idx, key=lambda i: _rank(rows[i], spec.policy))[spec.keep_per_prompt:]:
                reasons[i] = "not_selected"
    if not reasons:
        return samples
    accepted = [False if i in reasons else r["accepted"] for i, r in enumerate(rows)]
    reason = [reasons.get(i, r["reject_reason"]) for i, r in enumerate(rows)]
    samples = samples.set_column(samples.schema.get_field_index("accepted"), "accepted", pa.array(accepted, pa.bool_()))
    return samples.set_column(samples.schema.get_field_index("reject_reason"), "reject_reason", pa.array(reason, pa.string()))
