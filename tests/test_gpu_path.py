"""What a first GPU run depends on, shown on CPU with the real engine and real processes: a clean
console, results that stream out of the engine, a clear error for actors that cannot be placed, and
an engine whose death restarts its actor instead of failing the run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from conftest import engine_cores, wait_for, write_shard
from pipeline.config import REPO_ROOT, ConfigError, load_job

pytestmark = pytest.mark.slow


def test_the_first_samples_leave_the_engine_long_before_the_slowest_sequence_ends(ray_local, model_dir):
    """Four prompts whose engine runs to max_model_len: short prompts get ~500 new tokens, long ones ~110
    (ignore_eos, no max_tokens), all running at once; each prompt's samples must leave as it ends."""
    import functools

    import ray
    from transformers import AutoTokenizer

    from pipeline.run import EngineReports, _report, add_engines

    job = load_job(REPO_ROOT / "jobs" / "demo.yaml", sets={"engine.max_model_len": 512, "resources.batch_size": 1},
                   sampling={"n": 1, "temperature": 0.0, "ignore_eos": True, "max_tokens": None})
    words = AutoTokenizer.from_pretrained(model_dir)("many words " * 400, add_special_tokens=False)["input_ids"]
    rows = [{"id": f"{kind}{i}", "prompt": kind, "domain": "math", "reject_reason": None,
             "prompt_token_ids": words[:400] if kind == "long" else words[:8]} for i in range(2) for kind in ("short", "long")]
    reports = ray.remote(num_cpus=0)(EngineReports).remote()
    ds = add_engines(ray.data.from_items(rows), job, False, functools.partial(_report, reports))
    arrivals = [(time.monotonic(), b.to_pylist()) for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)]
    samples = [s for _, batch in arrivals for s in batch]
    assert sorted(s["id"] for s in samples) == sorted(r["id"] for r in rows)
    slowest = max(s["completion_tokens"] for s in samples)
    assert slowest > 480 and all(s["completion_tokens"] < 120 for s in samples if s["id"].startswith("long"))
    first_t, first = arrivals[0]
    last_t, last = arrivals[-1]
    assert all(s["completion_tokens"] < slowest / 4 for s in first), "the first results waited for the slowest"
    assert max(s["completion_tokens"] for s in last) == slowest
    # ~380 more decode steps of the long generations after the first came out (~12 s here): results
    # held back and released together would be milliseconds apart
    assert last_t - first_t > 0.3


@pytest.mark.timeout(600)
def test_actors_that_cannot_start_fail_the_run_with_the_reason_instead_of_waiting(tiny_job, ray_local, monkeypatch):
    import ray

    from pipeline.run import generate

    ctx = ray.data.DataContext.get_current()  # the run sets its 5 s start timeout there: later tests get theirs back
    monkeypatch.setattr(ctx, "wait_for_min_actors_s", ctx.wait_for_min_actors_s)

    class Hog:  # another job, holding the cluster's free CPUs
        def ready(self) -> bool:
            return True

    total = ray.cluster_resources()["CPU"]
    wait_for(lambda: ray.available_resources().get("CPU", 0) == total, "the earlier tests' actors gone", timeout_s=120)
    hog = ray.remote(num_cpus=total)(Hog).remote()
    try:
        ray.get(hog.ready.remote())
        # nothing left for an engine actor to start on (the view the cluster reports catches up)
        wait_for(lambda: ray.available_resources().get("CPU", 0) == 0, "the hog holding every CPU", timeout_s=60)
        tiny_job.resources.start_timeout_s = 5
        with pytest.raises(ConfigError, match=r"did not all start within resources.start_timeout_s=5s"):
            generate(tiny_job)
    finally:
        ray.kill(hog)


def test_vllm_ray_workers_get_a_placement_group_of_the_engines_gpus_on_one_node(ray_local):
    from ray.util.placement_group import remove_placement_group

    from pipeline.run import _placement

    strategy = _placement(4, 2.0)["scheduling_strategy"]
    try:
        assert strategy.placement_group.bundle_specs == [{"GPU": 1, "CPU": 2.0}, {"GPU": 1}, {"GPU": 1}, {"GPU": 1}]
        assert strategy.placement_group_capture_child_tasks
    finally:
        remove_placement_group(strategy.placement_group)


PROMPTS = ["What is 1 + 1?", "What is 2 + 3?", "What is 5 - 2?", "What is 2 times 3?", "What is 10 + 10?",
           "What is 8 divided by 2?", "What is 7 + 6?", "What is 9 - 4?", "What is 3 times 3?", "What is 12 + 1?"]


def engines_up(log: Path) -> list[int]:
    """The pids of the engine actors the run reported up (each logs its settings once its engine is
    ready), in order: the event these tests act on, whatever the stages after the engine are doing."""
    return [int(pid) for pid in re.findall(r"generator engine \(pid (\d+)\): max_num_seqs", log.read_text(errors="replace"))]


def start_run(tmp_path: Path, restarts: int) -> tuple[subprocess.Popen, Path, Path]:
    """Ten prompts, one (2 sequences of 96 tokens) in the engine at a time, each committed alone:
    the engine is busy until the end. Returns the run (its own session), its output and its log."""
    for i in range(5):
        write_shard(tmp_path / "in" / f"p-{i}.parquet",
                    [{"id": f"q{i}-{j}", "prompt": PROMPTS[2 * i + j], "answer": "0"} for j in range(2)])
    out, log = tmp_path / "out", tmp_path / "run.log"
    cmd = [sys.executable, "-m", "pipeline", "generate", "--job", "jobs/demo.yaml", "--shards", str(tmp_path / "in" / "*.parquet"),
           "--output", str(out), "--set", "sampling.n=2", "--set", "sampling.max_tokens=96", "--set", "sampling.ignore_eos=true",
           "--set", "resources.batch_size=1", "--set", "engine.kwargs.max_num_seqs=2",
           "--set", f"resources.engine_restarts={restarts}", "--set", "commit.max_prompts=1"]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=open(log, "wb")), out, log


def kill_the_first_engine_core(run: subprocess.Popen, log: Path) -> int:
    """Once the engine is up (its ten prompts all ahead of it), SIGKILL its engine core, as a CUDA
    error ends one; returns the engine actor's pid."""
    wait_for(lambda: bool(engines_up(log)), "an engine up", run, log)
    actor = engines_up(log)[0]
    cores = engine_cores(under=actor)
    assert len(cores) == 1, f"engine actor {actor} has engine cores {cores}"
    cores[0].send_signal(signal.SIGKILL)
    return actor


def end_session(run: subprocess.Popen) -> None:
    try:
        os.killpg(run.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_killing_the_engine_core_then_its_actor_mid_run_restarts_it_and_every_sample_is_published_once(tmp_path):
    run, out, log = start_run(tmp_path, restarts=3)
    try:
        actor = kill_the_first_engine_core(run, log)
        # then the restarted actor itself, once its engine is up, as the OOM killer would kill it:
        # Ray restarts it again, and its watcher ends the engine core it leaves behind
        wait_for(lambda: len(engines_up(log)) > 1, "a restarted engine up", run, log)
        second = engines_up(log)[1]
        cores = engine_cores(under=second)
        assert second != actor and len(cores) == 1, f"engine actor {second} has engine cores {cores}"
        orphan = cores[0]
        os.kill(second, signal.SIGKILL)
        _, alive = psutil.wait_procs([orphan], timeout=300)
        assert not alive, "the killed actor's engine core outlived it"
        stdout, _ = run.communicate(timeout=1200)
    finally:
        end_session(run)
    text = log.read_text()
    assert f"generator engine (pid {actor}) died" in text and "killed by SIGKILL" in text
    assert len(engines_up(log)) == 3  # the first, and a restart after each kill
    assert run.returncode == 0, text[-3000:]
    assert stdout.decode().splitlines() == [str(out)]  # Ray's notices of the restarts went to the log, not stdout
    published = [(s["id"], s["sample_index"]) for s in pq.read_table(f"{out}/samples").to_pylist()]
    assert sorted(published) == sorted((f"q{i}-{j}", k) for i in range(5) for j in range(2) for k in range(2))


def test_an_engine_death_with_no_restart_allowed_fails_the_run_with_its_root_cause(tmp_path):
    run, out, log = start_run(tmp_path, restarts=0)
    try:
        actor = kill_the_first_engine_core(run, log)
        run.communicate(timeout=1200)
    finally:
        end_session(run)
    text = log.read_text()
    assert run.returncode != 0 and not (out / "_manifest.json").exists()
    assert f"generator engine (pid {actor}) died" in text and "resources.engine_restarts=0: its tasks fail" in text
    assert ("the run failed after 1 engine death(s) (resources.engine_restarts=0 restarts per actor); last root cause: "
            "EngineDeadError") in text and "killed by SIGKILL" in text
