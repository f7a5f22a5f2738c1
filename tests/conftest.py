"""Shared fixtures: the default model, prompt shards, a real S3 server, a local Ray cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DEFAULT_MODEL_DIR, REPO_ROOT, JobConfig, load_job

PROMPT_SCHEMA = pa.schema(
    [("id", pa.string()), ("prompt", pa.string()), ("domain", pa.string()), ("answer", pa.string()),
     ("tests", pa.string()), ("source", pa.string())]
)


def write_shard(path: Path, rows: list[dict[str, Any]], schema: pa.Schema = PROMPT_SCHEMA) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    full = [{"answer": None, "tests": None, "source": "test", "domain": "math", **r} for r in rows]
    pq.write_table(pa.Table.from_pylist(full, schema=schema), path)
    return path


def wait_for(reached: Callable[[], bool], what: str, proc: subprocess.Popen | None = None, log: Path | None = None,
             timeout_s: float = 600) -> None:
    """Poll for an event (a file, a log line, a node in the GCS) every 10 ms until `timeout_s`, never
    a fixed sleep; fail at once, with the end of `log`, if `proc` ends first. Polled this often, a
    test acts on an event before a fast machine has moved far past it."""
    deadline = time.monotonic() + timeout_s
    while not reached():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended before {what}:\n" + (log.read_text(errors="replace")[-3000:] if log else ""))
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(0.01)


def run_log(out: Path) -> str:
    """What a run's driver wrote to its own log in a local output (`_pipeline/logs/*.log`)."""
    return "".join(f.read_text(errors="replace") for f in out.glob("_pipeline/logs/*.log"))


def commit_count(out: Path) -> int:
    """Commit files in a local output, counted from the listing alone (no file is read)."""
    return len(list(out.glob("_pipeline/commits/*/*.parquet")))


def engine_cores(session: int | None = None, under: int | None = None) -> list[psutil.Process]:
    """vLLM's engine core processes in a run's session (a local run), or below a process (a node)."""
    procs = psutil.Process(under).children(recursive=True) if under is not None else psutil.process_iter()
    cores = []
    for proc in procs:
        try:
            if proc.name().startswith("VLLM::EngineCor") and (session is None or os.getsid(proc.pid) == session):
                cores.append(proc)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    return cores


@contextmanager
def frozen(procs: list[psutil.Process]) -> Iterator[None]:
    """Stop these processes (SIGSTOP), in order, while the test acts, then let those still alive go
    on: a driver stopped on an event commits nothing more, an engine stopped on one finishes no more
    prompts, before the test's next step, however fast the machine."""
    for proc in procs:
        proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for proc in procs:
            try:
                proc.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        pytest.fail(f"default model missing at {DEFAULT_MODEL_DIR}: run `make setup`")
    return DEFAULT_MODEL_DIR


@pytest.fixture
def tiny_job(tmp_path: Path, model_dir: Path) -> JobConfig:
    """The demo job, cut down to seconds of generation."""
    return load_job(
        REPO_ROOT / "jobs" / "demo.yaml",
        output=str(tmp_path / "out"),
        sampling={"n": 2, "temperature": 0.6, "top_p": 0.95, "max_tokens": 48, "seed": 7},
    )


@pytest.fixture(scope="session")
def s3() -> Iterator[dict[str, str]]:
    """A real SeaweedFS S3 server on 127.0.0.1 with its own credentials; env vars set for the session."""
    import tempfile

    from pipeline.devs3 import S3Server

    creds = {"AWS_ACCESS_KEY_ID": "pipeline-test", "AWS_SECRET_ACCESS_KEY": "pipeline-test-secret-0123456789"}
    with tempfile.TemporaryDirectory() as d, S3Server(d, creds["AWS_ACCESS_KEY_ID"], creds["AWS_SECRET_ACCESS_KEY"]) as srv:
        env = {**creds, "AWS_ENDPOINT_URL": srv.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture
def bucket(s3: dict[str, str], request: pytest.FixtureRequest) -> str:
    import boto3

    import re

    name = "t-" + re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:50].strip("-")
    boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3: dict[str, str]) -> Iterator[None]:
    """Local Ray, started after the S3 env vars are set so that its workers inherit them."""
    import ray

    from pipeline.run import init_ray

    init_ray()
    yield
    ray.shutdown()
