"""Per-prompt verdicts and statistics, decided over all of a prompt's samples at once.

For each prompt, in this order: samples without a reference vote on their answer (pipeline/vote.py);
the pass rate is the share of samples that passed (verification and vote); rejection sampling
keeps prompts in a pass-rate band and some of their passed samples (pipeline/select.py). What
comes out is every sample's final verdict, its prompt's pass rate, and one row per prompt for
the `prompts/` table (samples, passed, accepted, pass rate, rounds, tokens, reasons, the vote).

`decide` works on light rows only (ids, indexes, verdicts, token counts, answers and an 8-byte
digest of each completion), so it can see a prompt whose adaptive rounds lie in different commit
files: publish reads the light columns of every commit first, decides, then streams the commits
and applies the verdicts by row position (`apply`). Measured (bench/adaptive.py): about 125 bytes
per sample for the light rows and up to 90 more while deciding, plus ~130 MB for the chunk of
rows turned into Python objects at a time: about 2 GB for 10 million samples.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.commits import KEY_COLUMN, ROUND_COLUMN
from pipeline.config import SelectSpec
from pipeline.select import completion_digest, select_prompt
from pipeline.vote import ANSWER_READERS, Equivalence, Tally, vote

LIGHT = pa.schema([
    ("id", pa.string()), (KEY_COLUMN, pa.string()), (ROUND_COLUMN, pa.int64()), ("sample_index", pa.int64()),
    ("domain", pa.string()), ("accepted", pa.bool_()), ("reject_reason", pa.string()),
    ("completion_tokens", pa.int64()), ("prompt_tokens", pa.int64()), ("extracted_answer", pa.string()),
    ("pass_rate", pa.float64()), ("digest", pa.binary(8)),
])
"""What verdicts are decided on; `digest` stands for the completion (only when dedup needs it);
`pass_rate` is set when the samples come from a published dataset (a mix): it is kept."""
READ = [f.name for f in LIGHT if f.name != "digest"]
"""The sample columns `light` reads (plus `completion` for digests)."""

PROMPTS = pa.schema([
    ("id", pa.string()), (KEY_COLUMN, pa.string()), ("domain", pa.string()),
    ("samples", pa.int64()), ("passed", pa.int64()), ("accepted", pa.int64()), ("pass_rate", pa.float64()),
    ("rounds", pa.int64()), ("completion_tokens", pa.int64()), ("prompt_tokens", pa.int64()),
    ("reasons", pa.string()), ("votes", pa.int64()), ("votes_cast", pa.int64()), ("vote_margin", pa.float64()),
    ("pseudo_label", pa.string()),
])
"""One row per prompt: `passed` samples passed verification (or the vote), `accepted` ones are in
`data/` after selection; `prompt_tokens` counts the prompt once per round (one prefill per request);
`reasons` maps each reject reason to its samples (JSON); the vote columns are null without a vote."""

NO_ANSWER, NO_REFERENCE = "no_answer", "no_reference"


@dataclass
class Voting:
    """Majority vote settings (verify.vote) and the domains whose verifier reads answers."""

    min_votes: int
    min_share: float
    kinds: dict[str, str]
    """Domain -> verifier name."""
    equivalence: Equivalence = field(default_factory=Equivalence)

    def votes_in(self, domain: str | None) -> bool:
        return self.kinds.get(domain or "") in ANSWER_READERS


def light(table: pa.Table, digests: bool) -> pa.Table:
    """A sample table's light rows (absent columns null; `digest` from `completion` when asked)."""
    arrays = []
    for f in LIGHT:
        if f.name == "digest" and digests and "completion" in table.column_names:
            arrays.append(pa.array([completion_digest(c) for c in table.column("completion").to_pylist()], f.type))
        elif f.name in table.column_names:
            arrays.append(table.column(f.name).cast(f.type))
        else:
            arrays.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(arrays, schema=LIGHT)


@dataclass
class Decisions:
    """Final verdicts by row position of the light rows they were decided on, and the prompts."""

    accepted: np.ndarray
    reason: np.ndarray
    """Index into `vocabulary`; -1 for none."""
    vocabulary: list[str]
    details: dict[int, str]
    pass_rate: np.ndarray
    prompts: pa.Table
    first: np.ndarray
    """Each prompt's first row position, ascending (prompts are in that order)."""

    def prompts_between(self, lo: int, hi: int) -> pa.Table:
        """The prompts whose first row lies in [lo, hi)."""
        a, b = np.searchsorted(self.first, [lo, hi])
        return self.prompts.slice(int(a), int(b - a))


def decide(rows: pa.Table, selection: SelectSpec, voting: Voting | None = None, chunk: int = 65536) -> Decisions:
    """Every sample's final verdict and every prompt's statistics; `rows` (light) holds all
    samples of each of its prompts, in any order."""
    n = rows.num_rows
    order = pc.sort_indices(rows, [("id", "ascending"), (KEY_COLUMN, "ascending"), ("sample_index", "ascending")])
    order = order.to_numpy()
    tallies = _votes(rows, voting) if voting is not None else {}
    accepted = np.zeros(n, dtype=bool)
    codes = pc.dictionary_encode(rows.column("reject_reason").combine_chunks())
    vocabulary: list[str] = codes.dictionary.to_pylist()
    reason = codes.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int16)
    pass_rate = np.zeros(n, dtype=np.float64)
    details: dict[int, str] = {}
    prompt_parts: list[pa.Table] = []
    firsts: list[int] = []

    def code(r: str | None) -> int:
        if r is None:
            return -1
        if r not in vocabulary:
            vocabulary.append(r)
        return vocabulary.index(r)

    start = 0
    while start < n:
        stop = min(n, start + chunk)
        ids = rows.column("id").take(pa.array(order[start:stop])).to_pylist()
        hashes = rows.column(KEY_COLUMN).take(pa.array(order[start:stop])).to_pylist()
        last = (ids[-1], hashes[-1])
        if stop < n:  # end the chunk at a prompt boundary
            back = next((i for i in range(len(ids) - 1, -1, -1) if (ids[i], hashes[i]) != last), None)
            stop = start + back + 1 if back is not None else _prompt_end(rows, order, stop, last)
        positions = order[start:stop]
        part = rows.take(pa.array(positions)).to_pylist()
        columns: dict[str, list[Any]] = {f.name: [] for f in PROMPTS}  # a chunk's prompts, as Arrow soon
        i = 0
        while i < len(part):
            key = (part[i]["id"], part[i][KEY_COLUMN])
            j = i
            while j < len(part) and (part[j]["id"], part[j][KEY_COLUMN]) == key:
                j += 1
            prompt = _Prompt(part[i:j], tallies.get(key), selection)
            for pos, ok, why, info in zip(positions[i:j], prompt.ok, prompt.why, prompt.details):
                accepted[pos], reason[pos], pass_rate[pos] = ok, code(why), prompt.pass_rate
                if info is not None:
                    details[int(pos)] = info
            for name, value in prompt.row().items():
                columns[name].append(value)
            firsts.append(int(positions[i:j].min()))
            i = j
        prompt_parts.append(pa.table(columns, schema=PROMPTS))
        start = stop
    by_first = np.argsort(np.array(firsts, dtype=np.int64), kind="stable")
    prompts = pa.concat_tables(prompt_parts or [PROMPTS.empty_table()]).take(pa.array(by_first))
    return Decisions(accepted, reason, vocabulary, details, pass_rate, prompts,
                     np.array(firsts, dtype=np.int64)[by_first])


def _prompt_end(rows: pa.Table, order: np.ndarray, stop: int, key: tuple[str, str]) -> int:
    """The end of the prompt `key` that runs past `stop` (a prompt longer than a chunk)."""
    while stop < len(order):
        r = int(order[stop])
        if (rows.column("id")[r].as_py(), rows.column(KEY_COLUMN)[r].as_py()) != key:
            break
        stop += 1
    return stop


class _Prompt:
    """One prompt's samples (light rows by sample index) -> final verdicts and its statistics row."""

    def __init__(self, rows: list[dict[str, Any]], tally: tuple[Tally, dict[int, bool | None]] | None,
                 selection: SelectSpec) -> None:
        self.rows, self.tally = rows, tally
        self.ok = [bool(r["accepted"]) for r in rows]
        self.why: list[str | None] = [r["reject_reason"] for r in rows]
        self.details: list[str | None] = [None] * len(rows)
        if tally is not None:
            self._vote(*tally)
        self.passed = sum(self.ok)
        recorded = next((r["pass_rate"] for r in rows if r["pass_rate"] is not None), None)
        # where the samples were generated, over all of the prompt's samples (a mix takes some of them)
        self.pass_rate = recorded if recorded is not None else self.passed / len(rows)
        judged = [{**r, "accepted": ok} for r, ok in zip(rows, self.ok)]
        for i, why in select_prompt(judged, self.pass_rate, selection).items():
            self.ok[i], self.why[i] = False, why

    def _vote(self, tally: Tally, agree: dict[int, bool | None]) -> None:
        for i, r in enumerate(self.rows):
            if r["sample_index"] not in agree:
                continue
            verdict = agree[r["sample_index"]]
            counts = {"votes": tally.votes, "cast": tally.cast}
            if verdict is None:
                self.why[i] = NO_ANSWER
            elif not tally.decided:
                self.why[i] = "no_majority"
                self.details[i] = json.dumps({"answer": r["extracted_answer"], **counts}, ensure_ascii=False)
            elif verdict:
                self.ok[i], self.why[i] = True, None
                self.details[i] = json.dumps({"verified_by": "majority", "answer": tally.label, **counts},
                                             ensure_ascii=False)
            else:
                self.why[i] = "minority_answer"
                self.details[i] = json.dumps({"answer": r["extracted_answer"], "majority": tally.label, **counts},
                                             ensure_ascii=False)

    def row(self) -> dict[str, Any]:
        first = self.rows[0]
        rounds: dict[int, int] = {}
        for r in self.rows:  # one prefill per round's request
            rounds.setdefault(r[ROUND_COLUMN] or 0, r["prompt_tokens"] or 0)
        tally = self.tally[0] if self.tally is not None else None
        return {
            "id": first["id"], KEY_COLUMN: first[KEY_COLUMN], "domain": first["domain"],
            "samples": len(self.rows), "passed": self.passed, "accepted": sum(self.ok),
            "pass_rate": round(self.pass_rate, 6), "rounds": len(rounds),
            "completion_tokens": sum(r["completion_tokens"] or 0 for r in self.rows),
            "prompt_tokens": sum(rounds.values()),
            "reasons": json.dumps(dict(sorted(Counter(w for w in self.why if w is not None).items()))),
            "votes": tally.votes if tally else None, "votes_cast": tally.cast if tally else None,
            "vote_margin": round(tally.margin, 6) if tally else None, "pseudo_label": tally.label if tally else None,
        }


def _votes(rows: pa.Table, voting: Voting) -> dict[tuple[str, str], tuple[Tally, dict[int, bool | None]]]:
    """The vote of every prompt with samples left without a reference, all prompts at once (the
    math comparisons are batched across them)."""
    mask = pc.fill_null(pc.equal(rows.column("reject_reason"), NO_REFERENCE), False)
    cand = rows.filter(mask).select(["id", KEY_COLUMN, "sample_index", "domain", "extracted_answer"]).to_pylist()
    cand.sort(key=lambda r: (r["id"], r[KEY_COLUMN], r["sample_index"]))
    prompts: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in cand:
        if voting.votes_in(r["domain"]):
            prompts.setdefault((r["id"], r[KEY_COLUMN]), []).append(r)
    keys = list(prompts)
    tallies = vote([(voting.kinds[prompts[k][0]["domain"]], [r["extracted_answer"] for r in prompts[k]]) for k in keys],
                   voting.min_votes, voting.min_share, voting.equivalence)
    return {k: (t, {r["sample_index"]: a for r, a in zip(prompts[k], t.agree)}) for k, t in zip(keys, tallies)}


def apply(table: pa.Table, decisions: Decisions, lo: int = 0) -> pa.Table:
    """`table` (the samples at light-row positions lo.., in the same order) with its final
    verdicts and its prompts' pass rate."""
    hi = lo + table.num_rows
    vocabulary = pa.array(decisions.vocabulary, pa.string())
    codes = pa.array(decisions.reason[lo:hi].astype(np.int32), mask=decisions.reason[lo:hi] < 0)
    reasons = vocabulary.take(codes) if len(vocabulary) else pa.nulls(table.num_rows, pa.string())
    columns: dict[str, pa.Array] = {"accepted": pa.array(decisions.accepted[lo:hi], pa.bool_()),
                                    "reject_reason": reasons.cast(pa.string()),
                                    "pass_rate": pa.array(decisions.pass_rate[lo:hi], pa.float64())}
    changed = {i: decisions.details[lo + i] for i in range(table.num_rows) if lo + i in decisions.details}
    if changed or "reject_details" in table.column_names:
        old = (table.column("reject_details").to_pylist() if "reject_details" in table.column_names
               else [None] * table.num_rows)
        columns["reject_details"] = pa.array([changed.get(i, d) for i, d in enumerate(old)], pa.string())
    for name, values in columns.items():
        if name in table.column_names:
            table = table.set_column(table.schema.get_field_index(name), name, values)
        else:
            table = table.append_column(name, values)
    return table


def judged(groups: Callable[[], Iterable[pa.Table]], selection: SelectSpec, voting: Voting | None = None,
           light_rows: Callable[[], Iterable[pa.Table]] | None = None) -> Iterator[tuple[pa.Table, pa.Table]]:
    """(samples with final verdicts, their prompts' rows) for each table of `groups()`.

    Without `light_rows` each table must hold all samples of its prompts and is decided alone
    (one pass). With it (a prompt's rounds in several tables), `light_rows()` yields the same rows
    as `groups()` in the same order, with only the light columns: all of them are decided first,
    then `groups()` is streamed and each prompt's row goes with the table holding its first sample."""
    dedup = selection.dedup_completions
    if light_rows is None:
        try:
            for table in groups():
                decisions = decide(light(table, dedup), selection, voting)
                yield apply(table, decisions), decisions.prompts
        finally:
            if voting is not None:
                voting.equivalence.close()
        return
    parts = [light(t, dedup) for t in light_rows()]
    try:
        decisions = decide(pa.concat_tables(parts) if parts else LIGHT.empty_table(), selection, voting)
    finally:
        if voting is not None:
            voting.equivalence.close()
    total, lo = sum(t.num_rows for t in parts), 0
    del parts
    for table in groups():
        yield apply(table, decisions, lo), decisions.prompts_between(lo, lo + table.num_rows)
        lo += table.num_rows
    if lo != total:
        raise RuntimeError(f"the commits changed between publish's two reads ({total} then {lo} samples)")
