"""Structural filters every sample gets."""

from __future__ import annotations

from pipeline.filter.registry import FILTERS
from pipeline.units import Sample, Verdict


class Truncated:
    """The engine stopped for a reason other than a natural end, or the reasoning never closed."""

    name = "truncated"

    def __call__(self, sample: Sample) -> Verdict:
        finish = sample.get("finish_reason") or "stop"
        if finish != "stop":
            return Verdict.reject("truncated", finish_reason=finish)
        if sample.get("reasoning") is not None and sample.get("final") is None:
            return Verdict.reject("truncated", finish_reason=finish, think_closed=False)
        return Verdict.accept()


FILTERS.register("truncated")(Truncated)
