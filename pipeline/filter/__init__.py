"""Readability filters: pure units over a parsed sample, looked up by name."""

from pipeline.filter import basic, readability  # noqa: F401  (registration)
from pipeline.filter.registry import FILTERS

__all__ = ["FILTERS"]
