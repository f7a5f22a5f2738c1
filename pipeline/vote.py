"""Answer agreement for prompts without a reference: a majority vote over the samples' answers.

A prompt's samples that passed every filter but could not be verified (`no_reference`) vote with
their final answer. Math answers name the same thing when the math verifier says so (one answer
taken as the reference for the other); choice answers when their letters are equal. The winning
answer needs `min_votes` samples and a share of the answering samples above one half
(`min_share`); its samples are accepted as verified by the majority, the others rejected
(`minority_answer`); without a winner all are rejected (`no_majority`).

Plain Python like the units: no Ray, no files, no configs. Math comparisons run in killable
workers (verify/pool.py), batched across prompts and remembered, so the planner of adaptive
rounds and the publisher pay for each pair once.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from pipeline.verify.basic import choice_letter
from pipeline.verify.extract import extract_answer
from pipeline.verify.math import MathVerifier, normalize
from pipeline.verify.pool import IsolatedRunner


def _choice(final: str | None) -> str | None:
    return choice_letter(extract_answer(final))


ANSWER_READERS: dict[str, Callable[[str | None], str | None]] = {"math": extract_answer, "choice": _choice}
"""Verifier name -> how it reads a sample's answer from `final`: the kinds of answers that can vote."""


def extracted_answer(verifier: str | None, final: str | None) -> str | None:
    """The answer the domain's verifier would compare (None for verifiers without answers)."""
    reader = ANSWER_READERS.get(verifier or "")
    return reader(final) if reader is not None else None


@dataclass(frozen=True)
class Tally:
    """One prompt's vote. `agree[i]`: sample i's answer is the winner's (None: it cast no vote)."""

    label: str | None
    """The winning answer as its most common spelling; None when undecided."""
    votes: int
    """Samples for the winner (undecided: for the largest group found)."""
    cast: int
    runner_up: int
    """Samples for the most common other answer (by normalised spelling)."""
    agree: list[bool | None] = field(default_factory=list)

    @property
    def decided(self) -> bool:
        return self.label is not None

    @property
    def margin(self) -> float:
        return (self.votes - self.runner_up) / self.cast if self.cast else 0.0


class Equivalence:
    """Whether two math answers name the same thing, by the math verifier in killable workers
    (a timeout or crash counts as different: a split vote only costs samples). Results are kept
    for the life of the object; the workers from the first comparison until `close` (the caller
    closes after each batch of votes: a round's plan, a publish)."""

    def __init__(self, workers: int = 1, timeout_s: float = 10.0, memory_mb: int = 2048) -> None:
        self.workers, self.timeout_s, self.memory_mb = workers, timeout_s, memory_mb
        self.known: dict[tuple[str, str], bool] = {}
        self._runner: IsolatedRunner | None = None
        self.compared = 0

    def same(self, pairs: list[tuple[str, str]]) -> None:
        """Decide the pairs not decided yet (in parallel); read the results from `known`."""
        todo = sorted({p for p in pairs if p not in self.known})
        if not todo:
            return
        if self._runner is None:
            self._runner = IsolatedRunner(self.workers, self.timeout_s, self.memory_mb)
        samples = [{"answer": gold, "final": f"\\boxed{{{pred}}}"} for gold, pred in todo]
        for pair, verdict in zip(todo, self._runner.run(MathVerifier(), samples)):
            self.known[pair] = verdict.ok
        self.compared += len(todo)

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None


class _Prompt:
    """The vote of one prompt in progress: groups are formed around the most common remaining
    answer until one has enough votes or the rest could not reach them."""

    def __init__(self, kind: str, answers: list[str | None], min_votes: int, min_share: float) -> None:
        self.kind = kind
        self.keys = [None if a is None else (a if kind == "choice" else normalize(a)) for a in answers]
        self.counts = Counter(k for k in self.keys if k is not None)
        spellings: dict[str, Counter[str]] = {}
        for a, k in zip(answers, self.keys):
            if k is not None:
                spellings.setdefault(k, Counter())[a] += 1  # type: ignore[index]
        self.spelling = {k: c.most_common(1)[0][0] for k, c in spellings.items()}
        self.cast = sum(self.counts.values())
        self.needed = max(min_votes, math.ceil(min_share * self.cast - 1e-9))
        self.remaining = [k for k, _ in sorted(self.counts.items(), key=lambda kv: -kv[1])]  # stable: first seen first
        self.winner: set[str] = set()
        self.lead: str | None = None
        self.largest = max(self.counts.values(), default=0)
        self.done = self._hopeless()

    def _hopeless(self) -> bool:
        return sum(self.counts[k] for k in self.remaining) < self.needed

    def pairs(self) -> list[tuple[str, str]]:
        """The comparisons the next step needs: the leading answer against every other remaining one."""
        if self.done or self.kind == "choice":
            return []
        lead = self.spelling[self.remaining[0]]
        return [(lead, self.spelling[k]) for k in self.remaining[1:]]

    def step(self, known: dict[tuple[str, str], bool]) -> None:
        lead = self.remaining[0]
        group = {lead} | {k for k in self.remaining[1:] if self.kind != "choice"
                          and known.get((self.spelling[lead], self.spelling[k]), False)}
        votes = sum(self.counts[k] for k in group)
        self.largest = max(self.largest, votes)
        if votes >= self.needed:
            self.winner, self.lead, self.done = group, lead, True
            return
        self.remaining = [k for k in self.remaining if k not in group]
        self.done = self._hopeless()

    def tally(self) -> Tally:
        agree = [None if k is None else k in self.winner for k in self.keys]
        if self.lead is None:
            second = sorted(self.counts.values(), reverse=True)[1:2]
            return Tally(None, self.largest, self.cast, sum(second), agree)
        others = [c for k, c in self.counts.items() if k not in self.winner]
        return Tally(self.spelling[self.lead], self.largest, self.cast, max(others, default=0), agree)


def vote(prompts: list[tuple[str, list[str | None]]], min_votes: int, min_share: float,
         equivalence: Equivalence) -> list[Tally]:
    """The vote of each (answer kind, the samples' answers) prompt; math comparisons of all
    prompts are batched step by step, so the workers stay busy."""
    states = [_Prompt(kind, answers, min_votes, min_share) for kind, answers in prompts]
    while True:
        active = [s for s in states if not s.done]
        if not active:
            return [s.tally() for s in states]
        equivalence.same([p for s in active for p in s.pairs()])
        for s in active:
            s.step(equivalence.known)
