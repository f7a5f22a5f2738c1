"""Commit identity by content: the writer's completeness rules and the planner's resume decisions."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import write_shard
from pipeline.commits import CommitWriter, commit_files, committed_keys, committed_prompts, hash_rows
from pipeline.read import InputError, resolve, scan_prompts
from pipeline.storage import Fenced, Lease, Storage

FP = "fp"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def fenced(request: pytest.FixtureRequest, tmp_path: Path) -> Fenced:
    if request.param == "local":
        storage = Storage(str(tmp_path / "out"))
    else:
        storage = Storage(f"s3://{request.getfixturevalue('bucket')}/out")
    lease = Lease(storage, "att", 600)
    lease.acquire()
    return Fenced(storage, lease)


def rows(*keys: tuple[str, int]) -> pa.Table:
    return pa.Table.from_pylist([{"id": pid, "prompt": f"Prompt {pid}", "reject_reason": None, "prompt_hash": f"h{pid}", "sample_index": k, "completion": f"{pid}/{k}",
                                  "accepted": k == 0} for pid, k in keys])


def expect(*ids: str) -> set[tuple[str, str]]:
    return {(pid, f"h{pid}") for pid in ids}


def test_a_replayed_batch_is_not_counted_twice_and_a_missing_sample_keeps_its_prompt_uncommitted(fenced):
    writer = CommitWriter(fenced, FP, "att", samples=range(2), expected=expect("a", "b", "c"), max_prompts=100)
    batch = rows(("a", 0), ("a", 1), ("b", 0))
    assert writer.add(batch) == 3
    assert writer.add(batch) == 0  # the same batch again (an actor restart replays it)
    assert writer.add(rows(("c", 1), ("c", 0))) == 2
    writer.flush()
    assert writer.duplicates == 3 and writer.missing() == [("b", "hb")]
    (rel,) = writer.commits
    table = fenced.storage.read_table(rel)
    assert sorted(zip(table.column("id").to_pylist(), table.column("sample_index").to_pylist())) == [
        ("a", 0), ("a", 1), ("c", 0), ("c", 1)]


def test_prompts_commit_in_groups_by_count_and_by_age(fenced):
    now = [0.0]
    writer = CommitWriter(fenced, FP, "att", samples=range(1), expected=expect(*"abcdefg"), max_prompts=3, max_age_s=10,
                          clock=lambda: now[0])
    writer.add(rows(("a", 0), ("b", 0)))
    assert writer.commits == []  # two complete prompts, group of three not reached, not old enough
    writer.add(rows(("c", 0), ("d", 0)))
    assert len(writer.commits) == 1  # four complete: one group
    now[0] = 5.0
    writer.add(rows(("e", 0)))
    assert len(writer.commits) == 1
    now[0] = 16.0
    writer.add(rows(("f", 0)))  # e waited 11 s > 10 s
    assert len(writer.commits) == 2
    assert writer.missing() == [("g", "hg")]
    assert sorted(committed_keys(fenced.storage, FP).keys) == list("abcdef")


def test_rows_of_prompts_not_planned_and_out_of_range_indexes_are_ignored(fenced):
    writer = CommitWriter(fenced, FP, "att", samples=range(2), expected=expect("a"))
    assert writer.add(rows(("zz", 0), ("a", 5), ("a", 0), ("a", 1))) == 2
    writer.flush()
    assert writer.unexpected == 1 and writer.duplicates == 1 and not writer.missing()


def test_committing_the_same_group_twice_leaves_one_file(fenced):
    for attempt in ("first", "retry"):
        writer = CommitWriter(fenced, FP, attempt, samples=range(1), expected=expect("a", "b"))
        writer.add(rows(("a", 0), ("b", 0)))
        writer.flush()
    assert len(commit_files(fenced.storage, FP)) == 1


def test_content_hash_ignores_the_id_and_nulls_but_not_any_other_value():
    t = pa.Table.from_pylist([
        {"id": "1", "prompt": "p", "answer": "7", "extra": None},
        {"id": "2", "prompt": "p", "answer": "7", "extra": None},
        {"id": "3", "prompt": "p", "answer": "7.0", "extra": None},
        {"id": "4", "prompt": "p", "answer": "7", "extra": "x"},
    ])
    h = hash_rows(t)
    assert h[0] == h[1] and len({h[0], h[2], h[3]}) == 3


# -- planning: what a rerun generates -------------------------------------------------------------

PROMPTS = [{"id": f"q{i}", "prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(10)]


def reshard(folder: Path, size: int) -> str:
    for i in range(0, len(PROMPTS), size):
        write_shard(folder / f"p-{i // size:03d}.parquet", PROMPTS[i:i + size])
    return str(folder / "*.parquet")


def commit_plan(fenced: Fenced, plan, only: set[str], text: dict[str, str] | None = None) -> None:
    """Commit the planned prompts whose id is in `only`, as a run would (flagged ones rejected)."""
    writer = CommitWriter(fenced, FP, "att", samples=range(1), expected=plan.todo)
    keys = sorted(k for k in plan.todo if k[0] in only)
    text = text or {p["id"]: p["prompt"] for p in PROMPTS}
    writer.add(pa.Table.from_pylist([{"id": pid, "prompt": text[pid], "reject_reason": plan.flagged.get(pid),
                                      "prompt_hash": h, "sample_index": 0, "accepted": pid not in plan.flagged}
                                     for pid, h in keys]))
    writer.flush()


def test_resharding_the_same_prompts_neither_loses_nor_duplicates_one(tmp_path, fenced):
    fs, shards = resolve([reshard(tmp_path / "by3", 3)])
    plan = scan_prompts(fs, shards)
    assert len(plan.todo) == 10
    commit_plan(fenced, plan, {"q0", "q1", "q2", "q3", "q7"})  # a killed run committed these
    fs, shards = resolve([reshard(tmp_path / "by4", 4)])  # re-prepared with another shard size
    again = scan_prompts(fs, shards, committed_keys(fenced.storage, FP))
    assert sorted(pid for pid, _ in again.todo) == ["q4", "q5", "q6", "q8", "q9"] and again.done == 5
    assert [len(again.skip[s.path]) for s in shards] == [4, 1, 0]
    assert [s.path for s in again.shards(shards)] == [s.path for s in shards[1:]]  # the first is done
    commit_plan(fenced, again, {pid for pid, _ in again.todo})
    keys = [(r["id"]) for t in committed_prompts(fenced.storage, FP) for r in t.to_pylist()]
    assert sorted(keys) == sorted(p["id"] for p in PROMPTS)


def test_the_same_shard_by_symlink_dot_or_double_slash_is_read_once(tmp_path):
    shard = write_shard(tmp_path / "in" / "p.parquet", PROMPTS[:4])
    os.symlink(shard, tmp_path / "in" / "link.parquet")
    specs = [str(shard), str(tmp_path / "in" / "link.parquet"), f"{tmp_path}/in/./p.parquet", f"{tmp_path}//in//p.parquet"]
    fs, shards = resolve(specs)
    plan = scan_prompts(fs, shards)
    assert len(plan.todo) == 4 and len(plan.shards(shards)) == 1


def test_an_id_reused_for_other_content_is_refused(tmp_path):
    write_shard(tmp_path / "a" / "p.parquet", PROMPTS[:2])
    write_shard(tmp_path / "a" / "q.parquet", [{**PROMPTS[1], "prompt": "Something else"}])
    fs, shards = resolve([str(tmp_path / "a" / "*.parquet")])
    with pytest.raises(InputError, match="id 'q1' is also used by a different prompt"):
        scan_prompts(fs, shards)


def test_committed_prompts_prepared_again_under_new_ids_are_flagged_duplicates_not_generated_twice(tmp_path, fenced):
    """The same source re-prepared under another name: its ids change, its prompts do not. Each
    one already committed is a duplicate (no engine time, never in the data twice); new ones are
    generated; with prompts.dedup off, all are."""
    fs, shards = resolve([reshard(tmp_path / "v1", 5)])
    commit_plan(fenced, scan_prompts(fs, shards), {"q0", "q1", "q2"})
    renamed = [{**p, "id": "again-" + p["id"], "prompt": p["prompt"].upper() + " "} for p in PROMPTS[:4]]
    write_shard(tmp_path / "v2" / "p.parquet", [*renamed, {"id": "new", "prompt": "What is 40 + 2?", "answer": "42"}])
    fs, shards = resolve([str(tmp_path / "v2" / "p.parquet")])
    committed = committed_keys(fenced.storage, FP)
    plan = scan_prompts(fs, shards, committed)
    assert plan.flagged == {"again-q0": "duplicate", "again-q1": "duplicate", "again-q2": "duplicate"}
    assert sorted(pid for pid, _ in plan.todo) == ["again-q0", "again-q1", "again-q2", "again-q3", "new"]
    assert scan_prompts(fs, shards, committed, dedup=False).flagged == {}
    keys_only = committed_keys(fenced.storage, FP, digests=False)  # what a run with dedup off reads
    assert keys_only.keys == committed.keys and keys_only.prompts == frozenset()


def test_a_committed_duplicate_does_not_make_its_uncommitted_original_a_duplicate(tmp_path, fenced):
    """A run killed after committing the duplicate of a prompt, before the prompt itself: the rerun
    generates the prompt (the dataset would otherwise lose it)."""
    both = [{"id": "first", "prompt": "What is 3 + 4?", "answer": "7"}, {"id": "second", "prompt": "what is 3+4", "answer": "7"}]
    write_shard(tmp_path / "p.parquet", both)
    fs, shards = resolve([str(tmp_path / "p.parquet")])
    plan = scan_prompts(fs, shards)
    assert plan.flagged == {"second": "duplicate"}
    commit_plan(fenced, plan, {"second"}, {p["id"]: p["prompt"] for p in both})
    again = scan_prompts(fs, shards, committed_keys(fenced.storage, FP))
    assert again.flagged == {} and sorted(pid for pid, _ in again.todo) == ["first"]


def test_a_prompt_changed_since_it_was_committed_is_refused(tmp_path, fenced):
    fs, shards = resolve([reshard(tmp_path / "v1", 5)])
    commit_plan(fenced, scan_prompts(fs, shards), {"q3"})
    write_shard(tmp_path / "v2" / "p.parquet", [{**PROMPTS[3], "answer": "7"}])
    fs, shards = resolve([str(tmp_path / "v2" / "p.parquet")])
    with pytest.raises(InputError, match="prompt 'q3' differs from the one this output committed"):
        scan_prompts(fs, shards, committed_keys(fenced.storage, FP))
