"""Fault tests with the real engine: kill -9 of the driver mid-run, then the same command again."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import pytest

from conftest import write_shard
from pipeline.config import REPO_ROOT
from pipeline.storage import Storage

pytestmark = pytest.mark.slow
PROMPTS = ["What is 1 + 1?", "What is 2 + 3?", "What is 5 - 2?", "What is 2 times 3?", "What is 10 + 10?",
           "What is 8 divided by 2?", "What is 7 + 6?", "What is 9 - 4?", "What is 3 times 3?", "What is 12 + 1?"]
SHARDS = 5


def command(shards: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "generate", "--job", "jobs/demo.yaml", "--shards", shards,
            "--output", str(out), "--set", "sampling.n=2", "--set", "sampling.max_tokens=24",
            "--set", "resources.batch_size=1", "--set", "resources.cpu_batch_size=2"]


def kill_session(proc: subprocess.Popen) -> None:
    """Remove what the killed driver left behind (its local Ray cluster and engines)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def inputs(tmp_path: Path) -> tuple[str, Path, Path]:
    """SHARDS shards of two prompts each; returns the shard glob, the output and its commit folder."""
    for i in range(SHARDS):
        write_shard(tmp_path / "in" / f"p-{i}.parquet",
                    [{"id": f"q{i}-{j}", "prompt": PROMPTS[2 * i + j], "answer": "0"} for j in range(2)])
    out = tmp_path / "out"
    return str(tmp_path / "in" / "*.parquet"), out, out / "_pipeline" / "commits"


def wait_for(reached: Callable[[], bool], proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.time() + 600
    while time.time() < deadline and not reached():
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    assert reached(), f"never reached {what}"


def engine_actors(proc: subprocess.Popen) -> list[int]:
    """The engine actor processes of the run started as `proc` (its own session: no other run's)."""
    found = subprocess.run(["pgrep", "-s", str(proc.pid), "-f", r"MapBatches\(EngineStage\)"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


@pytest.mark.parametrize("moment", ["while_generating", "after_a_commit"])
def test_kill_9_of_the_driver_then_rerun_publishes_every_sample_exactly_once(tmp_path, moment):
    shards, out, commits = inputs(tmp_path)
    first = subprocess.Popen(command(shards, out), cwd=REPO_ROOT, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=open(tmp_path / "first.log", "wb"))
    try:
        def reached() -> bool:
            if moment == "while_generating":
                return bool(engine_actors(first))
            return commits.exists() and any(commits.iterdir())

        wait_for(reached, first, tmp_path / "first.log", moment)
        if moment == "while_generating":
            time.sleep(15)  # the engine is loading or generating
        os.kill(first.pid, signal.SIGKILL)  # the driver dies
        first.wait()
    finally:
        kill_session(first)
    before = {p.name: p.read_bytes() for p in commits.iterdir()} if commits.exists() else {}
    assert not (out / "_manifest.json").exists()

    again = subprocess.run(command(shards, out), cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                           start_new_session=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip().splitlines()[-1] == str(out)

    storage = Storage(str(out))
    samples = pq.read_table(out / "samples").to_pylist()
    keys = [(s["id"], s["sample_index"]) for s in samples]
    expected = {(f"q{i}-{j}", k) for i in range(SHARDS) for j in range(2) for k in range(2)}
    assert len(keys) == len(set(keys)) and set(keys) == expected
    manifest = storage.read_json("_manifest.json")
    assert manifest["stats"]["samples"] == 4 * SHARDS
    # shards committed before the kill were not redone (their records are untouched) ...
    assert {name: (commits / name).read_bytes() for name in before} == before
    # ... the rest were committed by the rerun, and no stray attempt parts remain
    kept = {c.attempt for c in storage.commits().values()}
    assert {p.rsplit("/", 1)[-1] for p in storage.list("_pipeline/attempts")} <= kept
    print(f"committed before the kill: {len(before)}/{SHARDS}; attempts kept: {len(kept)}")


def test_an_engine_actor_killed_mid_run_is_restarted_and_the_run_completes(tmp_path):
    shards, out, commits = inputs(tmp_path)
    run = subprocess.Popen(command(shards, out), cwd=REPO_ROOT, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=open(tmp_path / "run.log", "wb"), text=True)
    try:
        wait_for(lambda: bool(engine_actors(run)), run, tmp_path / "run.log", "an engine actor")
        time.sleep(20)  # the engine is loading or holding a batch
        engines = engine_actors(run)
        assert engines and run.poll() is None and not (commits.exists() and any(commits.iterdir()))
        for pid in engines:
            os.kill(pid, signal.SIGKILL)  # the engine dies mid-run
        stdout, _ = run.communicate(timeout=900)
    finally:
        kill_session(run)
    assert run.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert stdout.strip().splitlines()[-1] == str(out)
    keys = [(s["id"], s["sample_index"]) for s in pq.read_table(out / "samples").to_pylist()]
    assert len(keys) == len(set(keys)) == 4 * SHARDS
