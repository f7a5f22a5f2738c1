"""Rejection sampling: per prompt, keep prompts in a pass-rate band, drop near-identical accepted
completions, then keep up to `keep_per_prompt` by a policy. Dropped samples stay in `samples/`
with their reason.

Works on a prompt's light rows (id, sample_index, accepted, completion_tokens and a digest of the
completion), so that it can run over prompts whose samples lie in many files (pipeline/prompts.py).
"""

from __future__ import annotations

import hashlib
from typing import Any

from pipeline.config import SelectSpec
from pipeline.ngrams import digest, normalize


def completion_digest(completion: str | None) -> bytes:
    """Equal for completions identical up to case, spacing and punctuation."""
    return digest(normalize(completion or ""))


def _rank(row: dict[str, Any], policy: str) -> tuple[Any, ...]:
    if policy == "shortest":
        return (row.get("completion_tokens") or 0, row["sample_index"])
    if policy == "random":  # seeded by the sample's key: the same choice on every rerun
        key = f"{row['id']}:{row['sample_index']}".encode()
        return (hashlib.blake2b(key, digest_size=8).digest(),)
    return (row["sample_index"],)


def select_prompt(rows: list[dict[str, Any]], pass_rate: float, spec: SelectSpec) -> dict[int, str]:
    """Which of one prompt's accepted samples to drop, and why: position in `rows` -> reason."""
    accepted = sorted((i for i, r in enumerate(rows) if r["accepted"]), key=lambda i: rows[i]["sample_index"])
    if spec.pass_rate is not None and not spec.pass_rate[0] <= pass_rate <= spec.pass_rate[1]:
        return {i: "pass_rate_band" for i in accepted}
    reasons: dict[int, str] = {}
    if spec.dedup_completions:
        seen: set[bytes] = set()
        unique = []
        for i in accepted:
            if rows[i]["digest"] in seen:
                reasons[i] = "duplicate_completion"
            else:
                seen.add(rows[i]["digest"])
                unique.append(i)
        accepted = unique
    if spec.keep_per_prompt is not None:
        for i in sorted(accepted, key=lambda i: _rank(rows[i], spec.policy))[spec.keep_per_prompt:]:
            reasons[i] = "not_selected"
    return reasons
