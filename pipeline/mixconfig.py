"""The mix spec: a typed model of `mixes/*.yaml` (unknown keys are errors, as in jobs).

A mix names published datasets (their folders or s3:// prefixes, read through `_manifest.json`)
and says how many samples each gives (`count`, or a `weight` of `total`), which of its samples
qualify (`filter`), at most how many per prompt, then what is removed across all of them
(duplicate prompts, benchmark contamination). `pipeline.mix` runs it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config import Strict, absolute, read_mapping, validated
from pipeline.schemas import reason_codes

ACCEPTED = "accepted"
"""The outcome of a sample its source accepted; the other outcomes are its reject reasons."""


class Band(Strict):
    """An inclusive range; an open end is unbounded."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> "Band":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self

    @property
    def open(self) -> bool:
        return self.min is None and self.max is None


class SourceFilter(Strict):
    """Which samples of a source qualify, judged on the samples' own columns."""

    reasons: list[str] = Field(
        default_factory=lambda: [ACCEPTED],
        description="Outcomes taken: `accepted` and/or reject reasons (e.g. `not_selected`: accepted samples the "
        "source's rejection sampling left out).")
    domains: list[str] | None = Field(None, description="Only these domains (default: all).")
    completion_tokens: Band = Field(default_factory=Band, description="Completion length band, in tokens.")
    pass_rate: Band = Field(
        default_factory=Band,
        description="The prompt's pass rate: its `pass_rate` column when the samples carry one, else the share of "
        "its samples that passed verification in the source (accepted, or dropped only by selection).")

    @field_validator("reasons")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - reason_codes() - {ACCEPTED})
        if unknown:
            raise ValueError(f"unknown outcomes {unknown}; use `accepted` or codes from schemas/reasons.json")
        if not v:
            raise ValueError("at least one outcome")
        return v

    @field_validator("pass_rate")
    @classmethod
    def _share(cls, v: Band) -> Band:
        if any(x is not None and not 0 <= x <= 1 for x in (v.min, v.max)):
            raise ValueError("pass rates lie in 0..1")
        return v


class SourceSpec(Strict):
    """One published dataset and what it gives to the mix."""

    name: str = Field(description="Names the source in the card, the report and each sample's `mix_source`.")
    dataset: str = Field(description="A published dataset: the folder or s3:// prefix holding its _manifest.json.")
    version: str | None = Field(None, description="Pin a published version (default: the current one).")
    count: int | None = Field(None, ge=0, description="Exactly this many samples (all, if fewer qualify).")
    weight: float | None = Field(None, gt=0, description="A share of `total` (or of the largest mix weights allow).")
    max_per_prompt: int | None = Field(None, ge=1, description="At most this many samples of one prompt.")
    filter: SourceFilter = Field(default_factory=SourceFilter)

    @field_validator("name")
    @classmethod
    def _plain(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError("letters, digits, '_', '.', '-'")
        return v

    @model_validator(mode="after")
    def _one_size(self) -> "SourceSpec":
        if self.count is not None and self.weight is not None:
            raise ValueError("give a count or a weight, not both")
        return self


class MixResources(Strict):
    """How the two passes over the sources' files run."""

    actors: int = Field(2, ge=0, description="Ray actors reading and checking source files in parallel; "
                                              "0 runs everything in this process without Ray (small mixes).")
    actor_cpus: float = Field(1.0, gt=0)
    batch_rows: int = Field(4096, ge=1, description="Samples read at once from a source file.")


class MixConfig(Strict):
    """A whole mix: sources, composition, cross-source curation, output."""

    name: str = "mix"
    output: str
    seed: int = Field(0, description="Seeds the selection: the same mix file gives the same dataset.")
    total: int | None = Field(None, ge=1, description="Size of the mix; weighted sources share what counts and "
                                                       "take-all sources leave. Default: the largest weights allow.")
    sources: list[SourceSpec] = Field(min_length=1, max_length=255)
    dedup: Literal["near", "exact", "none"] = Field(
        "near", description="Remove prompts equal (exact) or equal up to case, accents, spacing and punctuation "
        "(near) to one already in the mix; the first source (mix order) keeps it.")
    decontaminate: list[str] = Field(default_factory=list,
                                     description="Benchmark files (jsonl/json/csv/parquet) to keep out.")
    ngram: int = Field(8, ge=3, le=50, description="n-gram size for decontamination (open-r1 uses 8, OpenThoughts 13).")
    rows_per_data_file: int = Field(100_000, ge=1)
    lease_ttl_s: float = Field(600, ge=10)
    resources: MixResources = Field(default_factory=MixResources)

    @field_validator("output")
    @classmethod
    def _named(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty; name a folder or s3:// prefix")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "MixConfig":
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
        weighted = [s for s in self.sources if s.weight is not None]
        if self.total is not None:
            if not weighted:
                raise ValueError("`total` needs at least one source with a `weight`")
            counted = sum(s.count or 0 for s in self.sources)
            if counted > self.total:
                raise ValueError(f"the counts ({counted}) exceed total ({self.total})")
        return self

    def content(self) -> dict[str, Any]:
        """What decides the mix's samples and files (not where it goes nor how it runs)."""
        return self.model_dump(mode="json", exclude={"output", "lease_ttl_s", "resources"})


def load_mix(path: str | os.PathLike[str], output: str | None = None) -> MixConfig:
    """Read and validate a mix file; relative local paths are relative to the current directory."""
    raw = read_mapping(path, "mix")
    if output is not None:
        raw["output"] = output
    cfg = validated(MixConfig, raw, str(path))
    base = Path.cwd()
    cfg.output = absolute(cfg.output, base)
    cfg.decontaminate = [absolute(p, base) for p in cfg.decontaminate]
    for s in cfg.sources:
        s.dataset = absolute(s.dataset, base)
    return cfg
