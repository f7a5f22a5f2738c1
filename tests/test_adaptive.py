"""Adaptive sampling, per-prompt statistics and answer votes: round planning from commits, the
stop rule, votes over equivalent answers, publishing prompts whose rounds lie in several commits,
and (slow) a real adaptive run killed in its second round and resumed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import commit_count, run_log, wait_for, write_shard
from pipeline.commits import CommitWriter, commit_files, committed_prompts
from pipeline.config import REPO_ROOT, AdaptiveSpec, ConfigError, SelectSpec, load_job
from pipeline.prompts import Voting, judged
from pipeline.publish import publish
from pipeline.read import resolve, scan_prompts
from pipeline.rounds import Rounds, wants_more
from pipeline.storage import Fenced, Lease, Storage
from pipeline.vote import Equivalence, vote
from test_commits import fenced  # noqa: F401  (fixture)

FP = "fp"
SPEC = AdaptiveSpec(initial_n=2, round_n=2, max_n=6, target_accepted=1)


def sample(pid: str, index: int, round: int, ok: bool, reason: str | None = None, answer: str | None = None,
           completion: str | None = None, domain: str = "math") -> dict:
    return {"id": pid, "prompt_hash": f"h{pid}", "prompt": f"Q {pid}", "domain": domain, "answer": None, "source": "t",
            "round": round, "sample_index": index,
            "completion": completion if completion is not None else f"{pid} sample {index}",
            "reasoning": None, "final": completion if completion is not None else f"{pid} sample {index}",
            "finish_reason": "stop", "prompt_tokens": 10, "completion_tokens": 100 + index, "model": "m", "seed": None,
            "accepted": ok, "reject_reason": None if ok else (reason or "answer_mismatch"),
            "reject_details": None, "extracted_answer": answer}


def commit(fenced: Fenced, rows: list[dict], round: int, spec: AdaptiveSpec = SPEC) -> None:
    """Commit one round of some prompts through the real writer, as a run would."""
    keys = {(r["id"], r["prompt_hash"]) for r in rows}
    writer = CommitWriter(fenced, FP, "att", spec.samples(round), keys, round=round)
    writer.add(pa.Table.from_pylist(rows))
    writer.flush()
    assert not writer.missing()


def first_round(fenced: Fenced) -> None:
    commit(fenced, [
        sample("easy", 0, 0, True), sample("easy", 1, 0, False),
        sample("hard", 0, 0, False), sample("hard", 1, 0, False, "truncated"),
        sample("hard2", 0, 0, False), sample("hard2", 1, 0, False),
        sample("empty", 0, 0, False, "empty_prompt"), sample("empty", 1, 0, False, "empty_prompt"),
        sample("noref", 0, 0, False, "no_reference"), sample("noref", 1, 0, False, "no_reference"),
    ], 0)


# -- configuration ---------------------------------------------------------------------------------

def test_adaptive_settings_leave_sampling_for_their_own_typed_spec():
    job = load_job(REPO_ROOT / "jobs" / "demo.yaml", {"sampling.adaptive.initial_n": 2, "sampling.adaptive.round_n": 3,
                                                     "sampling.adaptive.max_n": 8})
    assert "adaptive" not in job.sampling and job.sampling["n"] == 2  # what vLLM's SamplingParams receives
    assert job.rounds == 3 and [job.round_samples(r) for r in range(3)] == [range(0, 2), range(2, 5), range(5, 8)]
    assert job.for_round(1).n == 3 and job.for_round(1).sampling["temperature"] == job.sampling["temperature"]
    with pytest.raises(ConfigError, match="whole number of rounds"):
        load_job(REPO_ROOT / "jobs" / "demo.yaml", {"sampling.adaptive.max_n": 7})
    fixed = load_job(REPO_ROOT / "jobs" / "demo.yaml")
    assert fixed.adaptive is None and fixed.rounds == 1 and fixed.round_samples(0) == range(4)


# -- rounds: the stop rule and planning from what is committed -------------------------------------

def test_the_stop_rule():
    assert not wants_more(SPEC, samples=2, passed=1, reasons={})  # k reached
    assert wants_more(SPEC, samples=4, passed=0, reasons={"answer_mismatch": 4})
    assert not wants_more(SPEC, samples=6, passed=0, reasons={"answer_mismatch": 6})  # max_n used
    assert not wants_more(SPEC, samples=2, passed=0, reasons={"empty_prompt": 2})  # the prompt itself
    assert not wants_more(SPEC, samples=2, passed=0, reasons={"no_reference": 2})  # nothing can verify it
    patient = SPEC.model_copy(update={"give_up_after": 4})
    assert wants_more(patient, samples=2, passed=0, reasons={}) and not wants_more(patient, samples=4, passed=0, reasons={})
    assert wants_more(patient.model_copy(update={"target_accepted": 2}), samples=4, passed=1, reasons={})


def test_rounds_are_planned_from_committed_verdicts_and_resume_mid_round(fenced):
    first_round(fenced)
    rounds = Rounds(SPEC, fenced.storage, FP)
    assert rounds.todo(1) == ({("hard", "hhard"), ("hard2", "hhard2")}, 0)
    commit(fenced, [sample("hard", 2, 1, False), sample("hard", 3, 1, True)], 1)  # then the run was killed
    assert rounds.todo(1) == ({("hard2", "hhard2")}, 1)  # only the unfinished prompt of round 1 again
    commit(fenced, [sample("hard2", 2, 1, False), sample("hard2", 3, 1, False)], 1)
    assert rounds.todo(2) == ({("hard2", "hhard2")}, 0)  # hard reached k in round 1
    commit(fenced, [sample("hard2", 4, 2, False), sample("hard2", 5, 2, False)], 2)
    assert rounds.todo(3) == (set(), 0)  # max_n used


def test_a_later_round_reads_only_its_prompts_with_their_round_and_first_index(tmp_path, fenced):
    rows = [{"id": f"q{i}", "prompt": f"What is {i}?", "answer": str(i)} for i in range(6)]
    write_shard(tmp_path / "in" / "a.parquet", rows[:3])
    write_shard(tmp_path / "in" / "b.parquet", rows[3:] + rows[:1])  # q0 again: a copy, read once
    fs, shards = resolve([str(tmp_path / "in" / "*.parquet")])
    keys = {pid: h for pid, h in scan_prompts(fs, shards).todo}
    from pipeline.read import iter_shard, plan_round, unified_schema

    plan = plan_round(fs, shards, {("q0", keys["q0"]), ("q4", keys["q4"])}, 2, 6)
    schema = unified_schema(shards)
    read = [t for s in plan.shards(shards)
            for t in iter_shard(fs, s.path, schema, 100, plan.skip[s.path], plan.constants())]
    got = pa.concat_tables(read).select(["id", "prompt_hash", "round", "first_sample"]).to_pylist()
    assert sorted(got, key=lambda r: r["id"]) == [
        {"id": "q0", "prompt_hash": keys["q0"], "round": 2, "first_sample": 6},
        {"id": "q4", "prompt_hash": keys["q4"], "round": 2, "first_sample": 6}]


def test_the_writer_takes_only_its_round_and_its_indexes(fenced):
    writer = CommitWriter(fenced, FP, "att", SPEC.samples(1), {("a", "ha")}, round=1)
    rows = [sample("a", 0, 1, True), sample("a", 2, 0, True), sample("a", 2, 1, True), sample("a", 3, 1, False)]
    assert writer.add(pa.Table.from_pylist(rows)) == 2
    assert writer.duplicates == 1 and writer.unexpected == 1  # index 0 is round 0's; a row of round 0
    writer.flush()
    (rel,) = writer.commits
    assert fenced.storage.read_table(rel).column("sample_index").to_pylist() == [2, 3]
    round0 = CommitWriter(fenced, FP, "att", SPEC.samples(0), {("a", "ha")})
    round0.add(pa.Table.from_pylist([sample("a", 0, 0, True), sample("a", 1, 0, True)]))
    round0.flush()
    assert round0.commits != writer.commits  # the same prompt's rounds are commits of their own


def test_an_engine_round_continues_sample_indexes_and_seeds():
    from test_generate_unit import stage

    from pipeline.generate import request_seed

    batch = pa.Table.from_pylist(
        [{"id": "a", "prompt": "x", "domain": "math", "prompt_token_ids": [1, 2], "reject_reason": None,
          "round": 2, "first_sample": 6}],
        schema=pa.schema([("id", pa.string()), ("prompt", pa.string()), ("domain", pa.string()),
                          ("prompt_token_ids", pa.list_(pa.int32())), ("reject_reason", pa.string()),
                          ("round", pa.int64()), ("first_sample", pa.int64())]))
    table = asyncio.run(stage(n=2, seed=5)(batch))
    rows = table.to_pylist()
    assert [(r["round"], r["sample_index"]) for r in rows] == [(2, 6), (2, 7)]
    assert rows[0]["seed"] == request_seed(5, "a") + 6  # round 0 used base..base+5 for indexes 0..5
    assert "first_sample" not in table.column_names


# -- answer votes -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def equivalence():
    eq = Equivalence(workers=2)
    yield eq
    eq.close()


def test_equivalent_math_answers_in_other_notations_vote_together(equivalence):
    half = ["\\frac{1}{2}", "0.5", "1/2", "\\dfrac{1}{2}"]
    (t,) = vote([("math", [*half, "3", None])], 3, 0.6, equivalence)
    assert t.decided and t.label == "\\frac{1}{2}" and (t.votes, t.cast, t.runner_up) == (4, 5, 1)
    assert t.agree == [True, True, True, True, False, None]
    # a group of spellings with more votes than the most common single spelling wins
    (t,) = vote([("math", ["7", "7", "7", "x^2-1", "(x-1)(x+1)", "x^{2}-1", "(x+1)(x-1)", "-1+x^2"])], 3, 0.6,
                equivalence)
    assert t.decided and t.votes == 5 and t.agree[:3] == [False] * 3 and all(t.agree[3:])
    (t,) = vote([("math", ["1", "2", "3", "1"])], 2, 0.6, equivalence)  # 2 of 4 is below 60%
    assert not t.decided and t.agree == [False] * 4
    (t,) = vote([("math", ["2", "2"])], 3, 0.6, equivalence)
    assert not t.decided  # fewer than min_votes


def test_choice_letters_vote_exactly(equivalence):
    (t,) = vote([("choice", ["B", "B", "C", "B", None])], 3, 0.6, equivalence)
    assert t.label == "B" and t.agree == [True, True, False, True, None] and t.margin == pytest.approx(0.5)


def voting(equivalence: Equivalence) -> Voting:
    return Voting(3, 0.6, {"math": "math", "choice": "choice", "general": "accept"}, equivalence)


def test_votes_accept_the_majority_and_reject_the_rest_with_the_vote_recorded(equivalence):
    rows = [sample("p", i, 0, False, "no_reference", a) for i, a in enumerate(["0.5", "\\frac12", "1/2", "2", None])]
    rows += [sample("q", i, 0, False, "no_reference", a) for i, a in enumerate(["1", "2", "3"])]
    rows += [sample("r", 0, 0, False, "truncated", "5"), sample("r", 1, 0, True)]  # a filter's verdict stands
    ((out, prompts),) = judged(lambda: [pa.Table.from_pylist(rows)], SelectSpec(dedup_completions=False),
                               voting(equivalence))
    got = [(r["id"], r["accepted"], r["reject_reason"]) for r in out.to_pylist()]
    assert got == [("p", True, None), ("p", True, None), ("p", True, None), ("p", False, "minority_answer"),
                   ("p", False, "no_answer"), ("q", False, "no_majority"), ("q", False, "no_majority"),
                   ("q", False, "no_majority"), ("r", False, "truncated"), ("r", True, None)]
    assert json.loads(out.column("reject_details")[0].as_py()) == {"verified_by": "majority", "answer": "0.5",
                                                                   "votes": 3, "cast": 4}
    by_id = {r["id"]: r for r in prompts.to_pylist()}
    assert (by_id["p"]["votes"], by_id["p"]["votes_cast"], by_id["p"]["pseudo_label"]) == (3, 4, "0.5")
    assert by_id["p"]["vote_margin"] == pytest.approx(0.5) and by_id["p"]["pass_rate"] == pytest.approx(0.6)
    assert by_id["q"]["pseudo_label"] is None and by_id["r"]["votes"] is None
    assert out.column("pass_rate").to_pylist()[:5] == [pytest.approx(0.6)] * 5


def test_a_vote_keeps_a_prompt_sampling_until_decided(fenced, equivalence):
    spec = AdaptiveSpec(initial_n=2, round_n=2, max_n=6, target_accepted=2)
    commit(fenced, [sample("v", 0, 0, False, "no_reference", "4"), sample("v", 1, 0, False, "no_reference", "5")],
           0, spec)
    rounds = Rounds(spec, fenced.storage, FP, voting(equivalence))
    assert rounds.todo(1)[0] == {("v", "hv")}  # undecided: one vote each
    commit(fenced, [sample("v", 2, 1, False, "no_reference", "4.0"), sample("v", 3, 1, False, "no_reference", "4")],
           1, spec)
    assert rounds.todo(2)[0] == set()  # 3 of 4 say 4: decided, and 3 samples passed >= k = 2
    assert Rounds(spec, fenced.storage, FP).todo(1)[0] == set()  # without a vote, no reference stops at once


# -- publishing prompts whose rounds lie in several commits ----------------------------------------

def published(fenced: Fenced, selection: SelectSpec, rounds: bool = True, votes: Voting | None = None) -> dict:
    manifest = {"run_id": "r", "output": fenced.storage.url(), "job": {"name": "t"}, "model": "m"}
    return publish(fenced, FP, manifest, {"select": selection.model_dump(), "rounds": rounds}, time.time(), selection,
                   voting=votes, rounds=rounds)


def read_all(storage: Storage, files: list[str]) -> list[dict]:
    return [r for rel in files for r in storage.read_table(rel).to_pylist()]


def test_two_pass_publish_decides_over_all_rounds_of_a_prompt(fenced, equivalence):
    first_round(fenced)
    # round 1 of `hard`: two passing samples with the same completion up to case and punctuation
    commit(fenced, [sample("hard", 2, 1, True, completion="hard sample 9"),
                    sample("hard", 3, 1, True, completion="HARD  sample 9!")], 1)
    commit(fenced, [sample("hard2", 2, 1, True), sample("hard2", 3, 1, True)], 1)
    # `wide` (k = 2 in its run): round 0 passed once; round 1 repeats that completion and passes once more
    commit(fenced, [sample("wide", 0, 0, True, completion="the same way"), sample("wide", 1, 0, False)], 0)
    commit(fenced, [sample("wide", 2, 1, True, completion="The same way."), sample("wide", 3, 1, True)], 1)
    assert len(commit_files(fenced.storage, FP)) == 5
    manifest = published(fenced, SelectSpec(keep_per_prompt=1, policy="first"))
    samples = read_all(fenced.storage, manifest["files"]["samples"])
    keys = [(r["id"], r["sample_index"]) for r in samples]
    assert len(keys) == len(set(keys)) == 18
    verdict = {(r["id"], r["sample_index"]): (r["accepted"], r["reject_reason"]) for r in samples}
    assert verdict[("hard", 2)] == (True, None) and verdict[("hard", 3)] == (False, "duplicate_completion")
    assert verdict[("hard2", 2)] == (True, None) and verdict[("hard2", 3)] == (False, "not_selected")
    # decided across commits: a duplicate of round 0's completion, and k = 1 kept from round 0
    assert [verdict[("wide", i)] for i in range(4)] == [(True, None), (False, "answer_mismatch"),
                                                        (False, "duplicate_completion"), (False, "not_selected")]
    prompts = {r["id"]: r for r in read_all(fenced.storage, manifest["files"]["prompts"])}
    assert len(prompts) == 6 and manifest["files"]["prompts"][0].startswith(f"prompts/{manifest['version']}/")
    hard = prompts["hard"]
    assert (hard["samples"], hard["passed"], hard["accepted"], hard["rounds"]) == (4, 2, 1, 2)
    assert hard["pass_rate"] == 0.5 and hard["prompt_tokens"] == 20 and hard["completion_tokens"] == 406
    assert json.loads(hard["reasons"]) == {"answer_mismatch": 1, "duplicate_completion": 1, "truncated": 1}
    assert {r["pass_rate"] for r in samples if r["id"] == "hard"} == {0.5}
    math = manifest["stats"]["domains"]["math"]  # each prompt counted once, though in two commits
    assert (math["samples"], math["prompts"], math["prompts_with_accepted"]) == (18, 6, 4)
    stats = manifest["stats"]["prompts"]
    assert stats["prompts"] == 6 and stats["rounds"] == {"1": 3, "2": 3}
    assert stats["pass_rate_histogram"]["0.5-0.6"] == 3 and stats["pass_rate_histogram"]["0.0-0.1"] == 2
    assert stats["pass_rate_histogram"]["0.7-0.8"] == 1  # wide: 3 of 4
    card = fenced.storage.read_bytes("README.md").decode()
    assert f"path: prompts/{manifest['version']}/*.parquet" in card and "prompts by pass rate" in card
    report = fenced.storage.read_bytes("report.md").decode()
    assert "## Prompts by pass rate" in report and f"plots/{manifest['version']}/pass_rate.png" in report


def test_one_pass_and_two_pass_agree_when_every_prompt_has_one_round(tmp_path, equivalence):
    outs = []
    for rounds in (False, True):
        storage = Storage(str(tmp_path / f"out-{rounds}"))
        lease = Lease(storage, "att", 600)
        lease.acquire()
        fenced = Fenced(storage, lease)
        first_round(fenced)
        commit(fenced, [sample("v", i, 0, False, "no_reference", a) for i, a in enumerate(["1", "1"])], 0)
        manifest = published(fenced, SelectSpec(keep_per_prompt=1), rounds, voting(equivalence))
        outs.append(sorted((r["id"], r["sample_index"], r["accepted"], r["reject_reason"], r["pass_rate"])
                           for r in read_all(storage, manifest["files"]["samples"])))
    assert outs[0] == outs[1]


def test_deciding_in_chunks_of_rows_changes_nothing():
    import random

    from pipeline.prompts import decide, light

    rng = random.Random(5)
    rows = [sample(f"p{p}", i, i // 3, rng.random() < 0.4, completion=f"c{rng.randint(0, 3)}")
            for p in range(7) for i in range(rng.randint(1, 9))]
    rng.shuffle(rows)
    table = light(pa.Table.from_pylist(rows), digests=True)
    spec = SelectSpec(keep_per_prompt=2, policy="shortest")
    whole = decide(table, spec)
    for chunk in (1, 2, 5):  # chunks end at prompt boundaries, a prompt longer than a chunk included
        part = decide(table, spec, chunk=chunk)
        assert part.accepted.tolist() == whole.accepted.tolist() and part.pass_rate.tolist() == whole.pass_rate.tolist()
        assert [part.vocabulary[c] if c >= 0 else None for c in part.reason] == \
               [whole.vocabulary[c] if c >= 0 else None for c in whole.reason]
        assert part.prompts.equals(whole.prompts)


def test_a_pass_rate_band_keeps_prompts_for_a_curriculum():
    rows = [sample("all", i, 0, True) for i in range(4)]
    rows += [sample("half", i, 0, i < 2) for i in range(4)]
    rows += [sample("none", i, 0, False) for i in range(4)]
    ((out, prompts),) = judged(lambda: [pa.Table.from_pylist(rows)], SelectSpec(pass_rate=(0.1, 0.6)))
    kept = {r["id"] for r in out.to_pylist() if r["accepted"]}
    assert kept == {"half"}
    assert {r["reject_reason"] for r in out.to_pylist() if r["id"] == "all"} == {"pass_rate_band"}
    assert {r["id"]: (r["passed"], r["accepted"]) for r in prompts.to_pylist()} == {
        "all": (4, 0), "half": (2, 2), "none": (0, 0)}


def test_samples_from_a_published_dataset_keep_their_pass_rate():
    """A mix takes some samples of a prompt: only its source saw them all."""
    rows = [{**sample("m", i, 0, True), "pass_rate": 0.25} for i in range(2)]
    ((out, prompts),) = judged(lambda: [pa.Table.from_pylist(rows)], SelectSpec(dedup_completions=False))
    assert out.column("pass_rate").to_pylist() == [0.25, 0.25] and prompts.column("pass_rate").to_pylist() == [0.25]


def test_committed_prompt_rounds_are_each_taken_once(fenced):
    first_round(fenced)
    rows = [sample("hard", 2, 1, False), sample("hard", 3, 1, False)]
    commit(fenced, rows, 1)
    # a resumed stale holder committed the same round of `hard` in another group
    commit(fenced, rows + [sample("hard2", 2, 1, False), sample("hard2", 3, 1, False)], 1)
    keys = [(r["id"], r["sample_index"]) for t in committed_prompts(fenced.storage, FP) for r in t.to_pylist()]
    assert len(keys) == len(set(keys)) == 14


# -- end to end on the real engine -------------------------------------------------------------------

E2E_PROMPTS = [f"What is {i} + {i + 3}?" for i in range(12)]


def adaptive_command(shards: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "generate", "--job", "jobs/demo.yaml", "--shards", shards,
            "--output", str(out), "--set", "sampling.max_tokens=24", "--set", "resources.batch_size=1",
            "--set", "resources.cpu_batch_size=1", "--set", "commit.max_prompts=1",
            # one batch at a time: a round's shards finish, and commit, one after another
            "--set", "resources.engine_batches_in_flight=1",
            "--set", "sampling.adaptive={initial_n: 1, round_n: 1, max_n: 3, target_accepted: 1}"]


class CommittedRounds:
    """(prompt id, round) -> the commit files holding its samples, read from the files themselves;
    each file once (commits never change), so that polling stays fast while a run commits."""

    def __init__(self, out: Path) -> None:
        self.storage = Storage(str(out))
        self.keys: dict[str, list[tuple[str, int]]] = {}

    def __call__(self) -> dict[tuple[str, int], list[str]]:
        try:
            (fp,) = [p.rsplit("/", 1)[-1] for p in self.storage.fs.ls(self.storage.path("_pipeline/commits"))]
        except (FileNotFoundError, ValueError):
            return {}
        found: dict[tuple[str, int], list[str]] = {}
        for rel in commit_files(self.storage, fp):
            if rel not in self.keys:
                t = self.storage.read_table(rel, columns=["id", "round"])
                self.keys[rel] = sorted(set(zip(t.column("id").to_pylist(), t.column("round").to_pylist())))
            for key in self.keys[rel]:
                found.setdefault(key, []).append(rel)
        return found


@pytest.mark.slow
def test_a_real_adaptive_run_killed_in_round_2_resumes_with_every_sample_once(tmp_path):
    # The demo model rarely gets an answer right: most prompts need every round, and the references
    # are plain numbers (a prompt without one stops after round 0: nothing could verify more samples).
    # 12 prompts in 6 shards, one batch at a time in the engine: a round's prompts commit a few at
    # a time (a shard's rows travel as one block).
    for shard in range(6):
        write_shard(tmp_path / "in" / f"p-{shard:02d}.parquet",
                    [{"id": f"q{i:02d}", "prompt": E2E_PROMPTS[i], "answer": str(2 * i + 3)}
                     for i in range(2 * shard, 2 * shard + 2)])
    shards, out = str(tmp_path / "in" / "*.parquet"), tmp_path / "out"
    log = tmp_path / "first.log"
    first = subprocess.Popen(adaptive_command(shards, out), cwd=REPO_ROOT, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    try:
        # the event: round 1's first commit, i.e. one more commit file than round 0 left (counted,
        # not read, so that the kill follows within milliseconds, before the driver commits the rest)
        wait_for(lambda: "round 1: " in run_log(out), "round 1 planned", first, log, timeout_s=900)
        round_0 = commit_count(out)
        wait_for(lambda: commit_count(out) > round_0, "a round-1 commit", first, log, timeout_s=900)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        before = CommittedRounds(out)()
        assert not (out / "_manifest.json").exists()
        round_1_before = sum(r == 1 for _, r in before)
        again = subprocess.run(adaptive_command(shards, out), cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=1800, start_new_session=True)
        assert again.returncode == 0, again.stderr[-3000:]
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    storage = Storage(str(out))
    manifest = storage.read_json("_manifest.json")
    samples = read_all(storage, manifest["files"]["samples"])
    by_prompt: dict[str, list[tuple[int, int]]] = {}
    for r in samples:
        by_prompt.setdefault(r["id"], []).append((r["sample_index"], r["round"]))
    assert sorted(by_prompt) == [f"q{i:02d}" for i in range(len(E2E_PROMPTS))]
    assert 0 < round_1_before < sum(len(v) >= 2 for v in by_prompt.values())  # the kill came mid-round
    prompts = {r["id"]: r for r in read_all(storage, manifest["files"]["prompts"])}
    for pid, got in by_prompt.items():
        got.sort()
        assert [i for i, _ in got] == list(range(len(got))), (pid, got)  # each index once, contiguous
        assert [rnd for _, rnd in got] == list(range(len(got)))  # one sample per round
        passed = [r["accepted"] or r["reject_reason"] in ("not_selected", "duplicate_completion")
                  for r in sorted((r for r in samples if r["id"] == pid), key=lambda r: r["sample_index"])]
        # the stop rule: sampled until the first pass, or max_n
        assert len(got) == 3 or (any(passed) and passed[-1] and not any(passed[:-1])), (pid, got, passed)
        assert prompts[pid]["samples"] == len(got) and prompts[pid]["rounds"] == len(got)
    after = CommittedRounds(out)()
    assert all(len(files) == 1 for files in after.values())  # every prompt round committed exactly once
    assert set(after) == {(pid, rnd) for pid, got in by_prompt.items() for _, rnd in got}
    assert all(after[key] == files for key, files in before.items())  # what the killed run committed was kept
    assert manifest["stats"]["samples"] == len(samples)
    rerun = manifest["run"]["rounds"]
    assert rerun[0]["prompts_to_generate"] == 0 and rerun[1]["prompts_already_committed"] == round_1_before
    print("samples per prompt:", {pid: len(v) for pid, v in sorted(by_prompt.items())},
          "| round 1 committed before the kill:", round_1_before, "| rerun:", rerun)
