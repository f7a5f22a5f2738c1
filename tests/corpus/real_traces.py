"""The real long-trace calibration (bench/calibrate_real_traces.py), measured once per test session.

The traces live outside the repository (../shared/real_traces, or $REAL_TRACES); tests that need
them skip with a message saying where they were looked for.
"""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType
from typing import Any

import pytest

from pipeline.config import REPO_ROOT


def calibration() -> ModuleType:
    spec = importlib.util.spec_from_file_location("calibrate_real_traces", REPO_ROOT / "bench" / "calibrate_real_traces.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=1)
def _figures() -> dict[str, Any] | str:
    cal = calibration()
    path = cal.traces_dir() / cal.TRACES_FILE
    if not path.exists():
        return f"real traces not found at {path} (set REAL_TRACES to the folder holding {cal.TRACES_FILE})"
    return cal.measure(cal.load(path))


def figures() -> dict[str, Any]:
    """Every figure of the calibration; skips the calling test when the traces are absent."""
    out = _figures()
    if isinstance(out, str):
        pytest.skip(out)
    return out
