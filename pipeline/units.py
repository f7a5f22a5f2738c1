"""The one contract every verifier and filter follows: a sample in, a `Verdict` out.

Units are plain Python: no Ray, no files, no config parsing. A registry maps the names used
in job YAML to unit factories, so `generate` and `curate` build the same units the same way.
"""

from __future__ import annotations

import difflib
import inspect
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Mapping, Protocol, TypeVar

Sample = Mapping[str, Any]
"""A sample row: the prompt columns plus completion, reasoning, final, finish_reason, ..."""


@dataclass(frozen=True)
class Verdict:
    """Keep or drop, with a stable reason code (schemas/reasons.json) and free-form details."""

    ok: bool
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def accept(cls, **details: Any) -> "Verdict":
        return cls(True, None, details)

    @classmethod
    def reject(cls, reason: str, **details: Any) -> "Verdict":
        return cls(False, reason, details)

    def details_json(self) -> str | None:
        return json.dumps(self.details, ensure_ascii=False, default=str) if self.details else None


class Unit(Protocol):
    """A verifier or filter. `name` is its registry key; a unit whose class sets `isolate = True`
    (it may hang or exhaust memory) is run in killable worker processes by the check stage."""

    name: str

    def __call__(self, sample: Sample) -> Verdict: ...


U = TypeVar("U", bound=Unit)


class Registry(Generic[U]):
    """Name -> unit factory; `build(name, **params)` is how configs become units."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., U]] = {}

    def register(self, name: str) -> Callable[[Callable[..., U]], Callable[..., U]]:
        def deco(factory: Callable[..., U]) -> Callable[..., U]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._factories[name] = factory
            return factory

        return deco

    def names(self) -> list[str]:
        return sorted(self._factories)

    def build(self, name: str, **params: Any) -> U:
        try:
            factory = self._factories[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None
        self._check_params(name, factory, params)
        try:
            return factory(**params)
        except TypeError as e:
            raise ValueError(f"{self.kind} {name!r}: bad parameters {params}: {e}") from None

    def _check_params(self, name: str, factory: Callable[..., U], params: dict[str, Any]) -> None:
        """Parameters come from YAML: each must be one the factory takes, holding a JSON-like value
        of its annotated type (`"400"` is not an int), or the unit would fail on every sample
        instead of at start."""
        from pydantic import TypeAdapter, ValidationError

        accepted = [p for p in inspect.signature(factory).parameters.values() if p.kind is not p.VAR_KEYWORD]
        names = [p.name for p in accepted]
        hints = typing.get_type_hints(factory.__init__ if isinstance(factory, type) else factory)
        for key, value in params.items():
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(f"{self.kind} {name!r}: unknown parameter {key!r}; {hint}it takes: {', '.join(names) or 'none'}")
            if key not in hints:
                continue
            try:
                TypeAdapter(hints[key]).validate_json(json.dumps(value), strict=True)
            except (TypeError, ValueError, ValidationError):
                want = getattr(hints[key], "__name__", None) or str(hints[key])
                raise ValueError(f"{self.kind} {name!r}: parameter {key}={value!r} is not of type {want}") from None
