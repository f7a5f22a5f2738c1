"""Verifiers: pure units judging whether a sample's answer is right, looked up by name."""

from pipeline.verify import basic, code, math  # noqa: F401  (registration)
from pipeline.verify.registry import VERIFIERS

__all__ = ["VERIFIERS"]
