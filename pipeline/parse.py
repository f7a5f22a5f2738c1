"""Split a completion into reasoning (inside <think>...</think>) and the final answer."""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class Parsed:
    reasoning: str | None
    """Text of the think block, stripped; None when the completion has no reasoning."""
    final: str | None
    """What follows </think> (the whole completion without reasoning); None if the reasoning never closed."""
    closed: bool
    """False when a think block was opened (or prefilled) but never closed: a truncated trace."""
    think_closes: int
    """How many </think> the completion holds (format checks reject more than one)."""


def split_reasoning(completion: str, prefilled: bool = False) -> Parsed:
    """Parse a completion; `prefilled` means the prompt already ended with '<think>\\n'.

    The first </think> ends the reasoning, as R1's own parser does.
    """
    closes = completion.count(THINK_CLOSE)
    text = completion
    if not prefilled:
        stripped = completion.lstrip()
        if not stripped.startswith(THINK_OPEN):
            if closes == 0:
                return Parsed(None, completion.strip(), True, 0)
            # Some distills omit the opening tag; everything before </think> is reasoning.
        else:
            text = stripped[len(THINK_OPEN):]
    head, sep, tail = text.partition(THINK_CLOSE)
    if not sep:
        return Parsed(head.strip(), None, False, 0)
    return Parsed(head.strip(), tail.strip(), True, closes)


def assistant_content(reasoning: str | None, final: str | None) -> str:
    """The assistant turn for fine-tuning, in R1's format."""
    if reasoning is None:
        return final or ""
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{final or ''}"
