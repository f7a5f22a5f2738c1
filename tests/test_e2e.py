"""End to end with the real vLLM CPU engine, the default model and Ray Data: local and S3."""

import json
import os
import threading
from pathlib import Path

import fsspec
import psutil
import pyarrow.parquet as pq
import pytest

from pipeline.config import REPO_ROOT
from pipeline.parse import assistant_content
from pipeline.run import generate
from pipeline.storage import Storage

pytestmark = pytest.mark.slow
DEMO = REPO_ROOT / "demo" / "shards"
LEASE = "_pipeline/lease/"  # the lease log gains a record per run by design


class EngineWatch:
    """Engine actor processes started among this test process's descendants while the block runs
    (Ray titles them after the EngineStage class): proof that a run did or did not start an engine,
    scoped to this process so that another run on the machine cannot change the answer."""

    def __init__(self) -> None:
        self.before = self._engines()
        self.started: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def _engines() -> set[int]:
        found = set()
        for p in psutil.Process().children(recursive=True):
            try:
                if "EngineStage" in " ".join(p.cmdline()):
                    found.add(p.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return found

    def _watch(self) -> None:
        while not self._stop.is_set():  # an engine lives for seconds at least: a 50 ms scan cannot miss one
            self.started |= self._engines() - self.before
            self._stop.wait(0.05)

    def __enter__(self) -> "EngineWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of a local output but the lease log, by relative path."""
    files = (p for p in root.rglob("*") if p.is_file())
    return {rel: p.read_bytes() for p in files if not (rel := p.relative_to(root).as_posix()).startswith(LEASE)}


def shard_prompts() -> dict[str, str]:
    return {r["id"]: r["prompt"] for r in pq.read_table(DEMO).to_pylist()}


def check_published(storage: Storage, n_prompts: int, n: int) -> tuple[dict, list[dict]]:
    """The current version: every planned sample exactly once, accepted ones in `data/`, the card."""
    manifest = storage.read_json("_manifest.json")
    samples = [r for rel in manifest["files"]["samples"] for r in storage.read_table(rel).to_pylist()]
    keys = [(s["id"], s["sample_index"]) for s in samples]
    assert len(keys) == len(set(keys)) == n_prompts * n == manifest["stats"]["samples"]
    for s in samples:
        assert s["finish_reason"] in ("stop", "length")
        assert s["completion_tokens"] >= 1 and s["prompt_tokens"] > 10 and s["seed"] is not None
        assert s["accepted"] == (s["reject_reason"] is None)
    assert sum(s["accepted"] for s in samples) == manifest["stats"]["accepted"]
    assert storage.read_bytes("README.md").startswith(b"---\n")
    return manifest, samples


def check_training_rows(rows: list[dict], samples: list[dict]) -> None:
    """Loaded rows are the accepted samples as TRL conversations: the shard's prompt, then the
    verified completion in R1's format, nothing else."""
    accepted = {(s["id"], s["sample_index"]): s for s in samples if s["accepted"]}
    prompts = shard_prompts()
    assert sorted((r["id"], r["sample_index"]) for r in rows) == sorted(accepted)
    for r in rows:
        s = accepted[(r["id"], r["sample_index"])]
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["messages"][0]["content"] == prompts[r["id"]]
        assert r["messages"][1]["content"] == assistant_content(s["reasoning"], s["final"]) != ""
        assert r["model"] == "SmolLM2-135M-Instruct" and r["domain"] == "math"


def test_generate_publishes_accepted_samples_locally_and_a_rerun_redoes_nothing(tiny_job, ray_local, tmp_path):
    import datasets

    with EngineWatch() as first:
        uri = generate(tiny_job)
    assert uri == tiny_job.output and first.started, "the first run must start an engine (the watch works)"
    manifest, samples = check_published(Storage(uri), n_prompts=12, n=2)
    assert manifest["stats"]["accepted"] >= 1, manifest["stats"]
    # The dataset loads with the standard tools: `datasets.load_dataset(OUTPUT)` follows the card.
    ds = datasets.load_dataset(uri, split="train", cache_dir=str(tmp_path / "hf"))
    check_training_rows(ds.to_list(), samples)

    before = snapshot(Path(uri))
    assert any(rel.startswith("_pipeline/commits/") for rel in before)
    with EngineWatch() as rerun:
        assert generate(tiny_job) == uri
    after = snapshot(Path(uri))
    # Rerunning the same job redoes nothing: no engine, no new or changed commit, sample or data
    # file, the same version published (its manifest and card untouched, byte for byte).
    assert not rerun.started
    assert [rel for rel in before if after.get(rel) != before[rel]] == []
    new = sorted(set(after) - set(before))
    assert not [rel for rel in new if rel.endswith(".parquet") or not rel.startswith("_pipeline/")], new


def test_generate_reads_and_writes_s3(tiny_job, ray_local, bucket, tmp_path):
    import datasets

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    fs = fsspec.filesystem("s3", endpoint_url=endpoint)
    shard = sorted(DEMO.glob("*.parquet"))[0]
    fs.put_file(str(shard), f"{bucket}/prompts/{shard.name}")
    tiny_job.shards = [f"s3://{bucket}/prompts/*.parquet"]
    tiny_job.output = f"s3://{bucket}/datasets/demo"
    uri = generate(tiny_job)
    assert uri == f"s3://{bucket}/datasets/demo"
    manifest, samples = check_published(Storage(uri), n_prompts=6, n=2)
    assert manifest["job"]["shards"] == [f"s3://{bucket}/prompts/*.parquet"]
    assert "vllm" in json.dumps(manifest["versions"])
    # the accepted samples load with `datasets` straight from S3, as the hand-off section shows
    files = [f"{uri}/{rel}" for rel in manifest["files"]["data"]]
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"),
                               storage_options={"endpoint_url": endpoint})
    check_training_rows(ds.to_list(), samples)


def test_curate_existing_generations_keeps_every_row_in_order(tmp_path, ray_local):
    import subprocess
    import sys

    import pyarrow as pa

    rows = [
        {"id": "a", "prompt": "What is 2+3?", "domain": "math", "answer": "5",
         "completion": "<think>\nTwo plus three makes five, I am sure.\n</think>\n\nThe answer is $\\boxed{5}$."},
        {"id": "b", "prompt": "What is 2+3?", "domain": "math", "answer": "5", "completion": "\\boxed{6}"},
        {"id": "c", "prompt": "What is 2+3?", "domain": "math", "answer": "5", "completion": "Five.", "finish_reason": "length"},
        {"id": "d", "prompt": "Say hi", "domain": "general", "answer": None, "completion": "Hi there!"},
        {"id": "e", "prompt": "What is 2+3?", "domain": "math", "answer": "5",
         "completion": "<think>\nLet me think. " + "Wait, let me check again. " * 60 + "\n</think>\n\n\\boxed{5}"},
    ]
    rows = [{"finish_reason": None, **r} for r in rows]  # null = "stop", as curate documents
    src = tmp_path / "gen.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "curate", str(src), str(tmp_path / "cur.parquet")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(tmp_path / "cur.parquet")
    out = pq.read_table(tmp_path / "cur.parquet").to_pylist()
    assert [r["id"] for r in out] == list("abcde")
    assert [r["reject_reason"] for r in out] == [None, "answer_mismatch", "truncated", None, "repetition"]
    assert out[0]["reasoning"] == "Two plus three makes five, I am sure." and out[0]["accepted"]
