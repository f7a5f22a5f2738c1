"""The one contract every verifier and filter follows: a sample in, a `Verdict` out.

Units are plain Python: no Ray, no files, no config parsing. A registry maps the names used
in job YAML to unit factories, so `generate` and `curate` build the same units the same way.
"""

from __future__ import annotations

import json
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
        try:
            return factory(**params)
        except TypeError as e:
            raise ValueError(f"{self.kind} {name!r}: bad parameters {params}: {e}") from None
