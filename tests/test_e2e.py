"""End to end with the real vLLM CPU engine, the default model and Ray Data: local and S3."""

import json
import os

import fsspec
import pyarrow.parquet as pq
import pytest

from pipeline.config import REPO_ROOT
from pipeline.run import generate
from pipeline.storage import Storage

pytestmark = pytest.mark.slow
DEMO = REPO_ROOT / "demo" / "shards"


def published_keys(storage: Storage) -> list[tuple[str, int]]:
    keys = []
    for rel in storage.read_json("_manifest.json")["files"]["samples"]:
        t = storage.read_table(rel)
        keys += list(zip(t.column("id").to_pylist(), t.column("sample_index").to_pylist()))
    return keys


def check_published(storage: Storage, n_prompts: int, n: int) -> dict:
    manifest = storage.read_json("_manifest.json")
    keys = published_keys(storage)
    assert len(keys) == len(set(keys)) == n_prompts * n
    assert manifest["stats"]["samples"] == n_prompts * n
    data = [storage.read_table(rel) for rel in manifest["files"]["data"]]
    rows = [r for t in data for r in t.to_pylist()]
    assert len(rows) == manifest["stats"]["accepted"]
    for r in rows:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"] and r["messages"][1]["content"]
        assert r["model"] == "SmolLM2-135M-Instruct" and r["domain"] == "math"
    assert storage.exists("README.md") and storage.read_bytes("README.md").startswith(b"---\n")
    return manifest


def test_generate_publishes_accepted_samples_locally(tiny_job, ray_local):
    uri = generate(tiny_job)
    assert uri == tiny_job.output
    manifest = check_published(Storage(uri), n_prompts=12, n=2)
    assert manifest["stats"]["accepted"] >= 1, manifest["stats"]
    samples = pq.read_table(f"{uri}/samples/{manifest['version']}").to_pylist()
    for s in samples:
        assert s["finish_reason"] in ("stop", "length")
        assert s["completion_tokens"] >= 1 and s["prompt_tokens"] > 10
        assert s["accepted"] == (s["reject_reason"] is None)
        assert s["seed"] is not None
    # Rerunning the same job redoes nothing and republishes the same dataset.
    again = generate(tiny_job)
    assert again == uri
    assert Storage(uri).read_json("_manifest.json")["stats"] == manifest["stats"]


def test_generate_reads_and_writes_s3(tiny_job, ray_local, bucket):
    fs = fsspec.filesystem("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for shard in sorted(DEMO.glob("*.parquet"))[:1]:
        fs.put_file(str(shard), f"{bucket}/prompts/{shard.name}")
    tiny_job.shards = [f"s3://{bucket}/prompts/*.parquet"]
    tiny_job.output = f"s3://{bucket}/datasets/demo"
    uri = generate(tiny_job)
    assert uri == f"s3://{bucket}/datasets/demo"
    check_published(Storage(uri), n_prompts=6, n=2)
    # the dataset loads with the standard tools straight from S3 (pyarrow over s3fs here)
    manifest = Storage(uri).read_json("_manifest.json")
    assert manifest["job"]["shards"] == [f"s3://{bucket}/prompts/*.parquet"]
    assert "vllm" in json.dumps(manifest["versions"])


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
