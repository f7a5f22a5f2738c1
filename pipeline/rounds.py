"""Adaptive sampling rounds: which prompts get another round, decided from what the commits hold.

Round 0 samples `initial_n` per prompt. Round r >= 1 samples `round_n` more for each prompt that
took part in round r-1 and still wants more: fewer than `target_accepted` samples passed
(verification, or the answer vote: an undecided vote passes none), fewer than `max_n` samples,
not `give_up_after` samples without a pass, and nothing about the prompt itself rules out more passes (a render rejection, no verifier for
its domain, no reference without a vote). The decision for round r reads only rounds < r, so a
rerun after a kill makes the same decision, and generates only the prompts whose round r is not
committed yet.
"""

from __future__ import annotations

import json
from functools import lru_cache

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.commits import KEY_COLUMN, ROUND_COLUMN, Key, committed_prompts
from pipeline.config import AdaptiveSpec, SelectSpec
from pipeline.prompts import LIGHT, READ, Voting, decide, light
from pipeline.read import Plan, Shard, plan_round
from pipeline.schemas import load
from pipeline.storage import Storage

NO_SELECTION = SelectSpec(dedup_completions=False)
"""Rounds count samples that passed, before rejection sampling picks among them."""


@lru_cache(maxsize=1)
def prompt_faults() -> frozenset[str]:
    """Reasons that say more samples of the prompt cannot pass: the prompt was not generated
    (render-stage reasons), no verifier for its domain, or no reference (unless a vote replaced it)."""
    reasons = load("reasons")["reasons"]
    return frozenset({r for r, spec in reasons.items() if spec["stage"] == "render"} | {"unknown_domain", "no_reference"})


def wants_more(spec: AdaptiveSpec, samples: int, passed: int, reasons: dict[str, int]) -> bool:
    """The stop rule: another round for a prompt short of k passed samples with samples to spare,
    unless none passed in `give_up_after` samples."""
    hopeless = spec.give_up_after is not None and passed == 0 and samples >= spec.give_up_after
    return passed < spec.target_accepted and samples < spec.max_n and not hopeless and not prompt_faults() & set(reasons)


class Rounds:
    """Plans rounds 1.. of one configuration's commits (one object per run: the answer vote's
    equivalence results are kept from round to round)."""

    def __init__(self, spec: AdaptiveSpec, storage: Storage, fp: str, voting: Voting | None = None) -> None:
        self.spec, self.storage, self.fp, self.voting = spec, storage, fp, voting

    def committed(self) -> pa.Table:
        """The light rows of every committed prompt round."""
        parts = [light(t, digests=False) for t in committed_prompts(self.storage, self.fp, READ)]
        return pa.concat_tables(parts) if parts else LIGHT.empty_table()

    def todo(self, round: int, rows: pa.Table | None = None) -> tuple[set[Key], int]:
        """The prompts round `round` still has to generate, and how many it has already committed."""
        rows = self.committed() if rows is None else rows
        rounds = pc.fill_null(rows.column(ROUND_COLUMN), 0)
        try:
            before = decide(rows.filter(pc.less(rounds, round)), NO_SELECTION, self.voting)
        finally:
            if self.voting is not None:
                self.voting.equivalence.close()
        p = before.prompts.to_pydict()
        wanted = {(pid, h) for pid, h, took, samples, passed, reasons in zip(
                      p["id"], p[KEY_COLUMN], p["rounds"], p["samples"], p["passed"], p["reasons"])
                  if took == round and wants_more(self.spec, samples, passed, json.loads(reasons))}
        this = rows.filter(pc.equal(rounds, round)).select(["id", KEY_COLUMN]).to_pylist()
        done = {(r["id"], r[KEY_COLUMN]) for r in this}
        return wanted - done, len(wanted & done)

    def plan(self, fs: fsspec.AbstractFileSystem, shards: list[Shard], round: int) -> Plan:
        todo, done = self.todo(round)
        plan = plan_round(fs, shards, todo, round, self.spec.samples(round).start)
        plan.done = done
        return plan
