"""Fault tests with the real engine: kill -9 of the driver mid-run, then the same command again.

Every kill waits on an event that proves work was in flight (the driver's "first samples" log
line, or commit files appearing), never on a fixed delay, and stops or kills the driver the
moment it sees it: the driver commits, and a fast engine may already have handed it every result."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import commit_count, engine_cores, frozen, wait_for, write_shard
from pipeline.commits import commit_files
from pipeline.config import REPO_ROOT
from pipeline.storage import Storage

pytestmark = pytest.mark.slow
PROMPTS = ["What is 1 + 1?", "What is 2 + 3?", "What is 5 - 2?", "What is 2 times 3?", "What is 10 + 10?",
           "What is 8 divided by 2?", "What is 7 + 6?", "What is 9 - 4?", "What is 3 times 3?", "What is 12 + 1?"]
SHARDS = 5


def command(shards: str, out: Path, *sets: str) -> list[str]:
    cmd = [sys.executable, "-m", "pipeline", "generate", "--job", "jobs/demo.yaml", "--shards", shards,
           "--output", str(out), "--set", "sampling.n=2", "--set", "sampling.max_tokens=24",
           "--set", "resources.batch_size=1", "--set", "resources.cpu_batch_size=2"]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def kill_session(proc: subprocess.Popen) -> None:
    """Remove what the killed driver left behind (its local Ray cluster and engines)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def inputs(tmp_path: Path, shards: int = SHARDS, per_shard: int = 2) -> tuple[str, Path]:
    """`shards` shards of `per_shard` prompts each; returns the shard glob and the output."""
    for i in range(shards):
        write_shard(tmp_path / "in" / f"p-{i}.parquet",
                    [{"id": f"q{i}-{j}", "prompt": PROMPTS[(per_shard * i + j) % len(PROMPTS)] + f" (#{i}-{j})",
                      "answer": "0"} for j in range(per_shard)])
    return str(tmp_path / "in" / "*.parquet"), tmp_path / "out"



def committed_prompts(out: Path) -> dict[str, int]:
    """Committed prompts per commit file (read from the files themselves)."""
    storage = Storage(str(out))
    try:
        (fp,) = [p.rsplit("/", 1)[-1] for p in storage.fs.ls(storage.path("_pipeline/commits"))]
    except (FileNotFoundError, ValueError):
        return {}
    return {rel: len(set(storage.read_table(rel, columns=["id"]).column("id").to_pylist()))
            for rel in commit_files(storage, fp)}


def published(out: Path) -> list[tuple[str, int]]:
    storage = Storage(str(out))
    manifest = storage.read_json("_manifest.json")
    return [(r["id"], r["sample_index"]) for rel in manifest["files"]["samples"] for r in storage.read_table(rel).to_pylist()]


def rerun(shards: str, out: Path, *sets: str) -> dict:
    again = subprocess.run(command(shards, out, *sets), cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                           start_new_session=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip().splitlines()[-1] == str(out)
    return Storage(str(out)).read_json("_manifest.json")


def test_kill_9_of_the_driver_then_rerun_publishes_every_sample_exactly_once(tmp_path):
    """Killed with samples at the driver and none committed (killed after commits: the 80% test)."""
    shards, out = inputs(tmp_path)
    log = tmp_path / "first.log"
    # results reach the driver but commits wait (large group, long age); one prompt at a time in the engine
    first = subprocess.Popen(command(shards, out, "commit.max_prompts=1000", "commit.max_age_s=3600",
                                     "resources.engine_batches_in_flight=1"),
                             cwd=REPO_ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    try:
        wait_for(lambda: "first samples after" in log.read_text(), "samples at the driver", first, log)
        driver = psutil.Process(first.pid)
        with frozen([driver]):  # it holds every result that left the engine: it commits nothing more
            cores = engine_cores(session=first.pid)
            assert cores, "no engine core in the run's session"
            driver.kill()  # the driver dies; its Ray workers are orphaned, not killed
            first.wait()
        # ...and so are their engine cores, which their watchers end (pipeline.reaper)
        _, alive = psutil.wait_procs(cores, timeout=300)
        assert not alive, f"engine cores outlived their killed run: {alive}"
        assert committed_prompts(out) == {} and not (out / "_manifest.json").exists()  # all of it was in flight
        # the rerun starts while the first run's orphaned workers may still be alive: only a driver
        # holding the lease commits, so they cannot add anything
        manifest = rerun(shards, out)
    finally:
        kill_session(first)
    keys = published(out)
    expected = {(f"q{i}-{j}", k) for i in range(SHARDS) for j in range(2) for k in range(2)}
    assert len(keys) == len(set(keys)) and set(keys) == expected
    assert manifest["stats"]["samples"] == 4 * SHARDS
    assert manifest["run"]["prompts_already_committed"] == 0 and manifest["run"]["prompts_to_generate"] == 2 * SHARDS


def test_a_run_killed_at_80_percent_resumes_with_at_most_30_percent_of_the_work(tmp_path):
    prompts = 30
    shards, out = inputs(tmp_path, shards=1, per_shard=prompts)  # one shard: finer than shard-level commits
    log = tmp_path / "first.log"
    # one prompt in the engine at a time, each committed on its own by the driver: the kill lands between commits
    first = subprocess.Popen(command(shards, out, "commit.max_prompts=1", "resources.engine_batches_in_flight=1"),
                             cwd=REPO_ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    try:
        # counting the commit files (one prompt each, not reading them) lets the kill follow within
        # milliseconds: a fast machine commits a few more in that time, out of the 30% left
        wait_for(lambda: commit_count(out) >= 0.7 * prompts,
                 "70% of the prompts committed", first, log)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        kill_session(first)
    committed = committed_prompts(out)
    done = sum(committed.values())
    assert 0.7 * prompts <= done < prompts and not (out / "_manifest.json").exists(), done
    before = {rel: Storage(str(out)).read_bytes(rel) for rel in committed}
    manifest = rerun(shards, out)
    assert manifest["run"]["prompts_already_committed"] == done
    assert all(Storage(str(out)).read_bytes(rel) == data for rel, data in before.items())  # kept byte for byte
    # what the rerun generated, counted from the samples its own commits hold
    storage = Storage(str(out))
    fp = manifest["fingerprint"]["generation"]
    rerun_samples = 0
    for rel in commit_files(storage, fp):
        meta = json.loads(storage.read_metadata(rel)[b"pipeline.commit"])
        if meta["attempt"] == manifest["run_id"]:
            rerun_samples += meta["rows"]
    assert manifest["run"]["prompts_to_generate"] == prompts - done
    assert rerun_samples == (prompts - done) * 2 <= 0.3 * prompts * 2, rerun_samples
    keys = published(out)
    assert sorted(keys) == sorted((f"q0-{j}", k) for j in range(prompts) for k in range(2))
    print(f"killed with {done}/{prompts} prompts committed; the rerun generated {rerun_samples} samples")
