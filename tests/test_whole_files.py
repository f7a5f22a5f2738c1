"""Whole files only: a streaming write that fails, is dropped or is killed leaves nothing that looks
like a file (locally a temp file never renamed, on S3 a multipart upload aborted or never completed);
prepare's shards appear all at once and replace the earlier prepare's; curate never reads its own
output. Local folder and the real SeaweedFS server the tests start."""

import gc
import json
import os
import signal
import subprocess
import sys

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import wait_for
from pipeline.config import REPO_ROOT, ConfigError, load_job
from pipeline.prepare import Converter, PrepareOptions, prepare
from pipeline.read import InputError, check_prepared, resolve
from pipeline.storage import Storage

SCHEMA = pa.schema([("blob", pa.binary())])


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def where(request, tmp_path):
    """An output location: a local folder or a prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "out")
    return f"s3://{request.getfixturevalue('bucket')}/out"


def files(uri):
    """Every file under `uri`, relative, as a reader listing the location would see them."""
    storage = Storage(uri)
    storage.fs.invalidate_cache()
    try:
        found = storage.fs.find(storage.root)
    except FileNotFoundError:
        return []
    return sorted(f[len(storage.root) + 1:] for f in found)


def uploads_in_progress(uri):
    if not uri.startswith("s3://"):
        return []
    bucket = uri[5:].split("/", 1)[0]
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def random_batch(mb):
    return pa.table({"blob": [os.urandom(1 << 20) for _ in range(mb)]}, schema=SCHEMA)  # incompressible


def test_a_failing_streaming_write_leaves_no_file(where):
    storage = Storage(where)
    if not storage.local:
        storage.fs.default_block_size = 5 * 2**20  # parts of 5 MiB: the upload becomes multipart after a few MiB
    with pytest.raises(RuntimeError, match="writer died"):
        with storage.parquet_writer("big.parquet", SCHEMA) as w:
            for _ in range(3):
                w.write_table(random_batch(4))
            if not storage.local:
                assert len(uploads_in_progress(where)) == 1  # parts were sent: this is the multipart path
            raise RuntimeError("writer died")
    with pytest.raises(ValueError, match="small writer died"):
        with storage.parquet_writer("small.parquet", SCHEMA) as w:
            w.write_table(random_batch(1))
            raise ValueError("small writer died")
    assert files(where) == [] and uploads_in_progress(where) == []
    with storage.parquet_writer("ok.parquet", SCHEMA) as w:
        w.write_table(random_batch(6))
    assert files(where) == ["ok.parquet"] and storage.read_table("ok.parquet").num_rows == 6


def test_a_streaming_writer_dropped_without_closing_leaves_no_file(where):
    """What prepare used to do on an error: the writer's context was never exited, and at garbage
    collection (or interpreter exit, where it hung) fsspec closed the file, completing the upload
    of a valid Parquet file with the first batch's rows."""
    storage = Storage(where)
    cm = storage.parquet_writer("dropped.parquet", SCHEMA)
    cm.__enter__().write_table(random_batch(2))
    del cm
    gc.collect()
    assert files(where) == [] and uploads_in_progress(where) == []


def gsm_lines(n, start=0):
    return "".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}) + "\n" for i in range(start, start + n))


def test_prepare_reruns_replace_and_generate_checks_them(where, tmp_path):
    (tmp_path / "a.jsonl").write_text(gsm_lines(25))
    (tmp_path / "b.jsonl").write_text(gsm_lines(12, 100))
    prepare(str(tmp_path / "a.jsonl"), where, Converter("gsm8k"), PrepareOptions("a", rows_per_shard=10))
    assert files(where) == ["_prepare_report.json", "prompts-00000.parquet", "prompts-00001.parquet", "prompts-00002.parquet"]
    prepare(str(tmp_path / "b.jsonl"), where, Converter("gsm8k"), PrepareOptions("b", rows_per_shard=10))
    assert files(where) == ["_prepare_report.json", "prompts-00000.parquet", "prompts-00001.parquet"]
    fs, shards = resolve([f"{where}/*.parquet"])
    assert [s.rows for s in shards] == [10, 2]
    check_prepared(fs, shards)
    storage = Storage(where)
    first = storage.read_table("prompts-00000.parquet")
    storage.write_table("prompts-00001.parquet", first.slice(0, 1))  # valid Parquet, wrong rows
    with pytest.raises(InputError, match="prompts-00001.parquet: 1 rows, but prepare wrote 2"):
        check_prepared(*resolve([f"{where}/*.parquet"]))


def start_prepare(fifo, where, *args):
    return subprocess.Popen([sys.executable, "-m", "pipeline", "prepare", str(fifo), where, "--format", "gsm8k", *args],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)



def test_a_killed_prepare_leaves_the_earlier_shards_and_no_partial_one(where, tmp_path):
    """The source is a pipe the test feeds: prepare has written shards (and is streaming the next)
    when it is killed, and the pipe keeps it there until then: no timing involved."""
    (tmp_path / "a.jsonl").write_text(gsm_lines(25))
    prepare(str(tmp_path / "a.jsonl"), where, Converter("gsm8k"), PrepareOptions("a", rows_per_shard=10))
    before = {f: Storage(where).read_bytes(f) for f in files(where)}
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    proc = start_prepare(fifo, where, "--rows-per-shard", "5000")
    with open(fifo, "w") as feed:
        feed.write(gsm_lines(9000, 1000))  # the first 8192-row batch goes to the shard writer
        feed.flush()
        wait_for(lambda: any(f.endswith("/prompts-00000.parquet") for f in files(where)), "the first staged shard", timeout_s=120)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert {f: Storage(where).read_bytes(f) for f in files(where) if not f.startswith("_prepare-")} == before
    assert uploads_in_progress(where) == [] or all("_prepare-" in u["Key"] for u in uploads_in_progress(where))
    check_prepared(*resolve([f"{where}/*.parquet"]))
    # the next prepare goes through and removes what the killed one staged
    (tmp_path / "c.jsonl").write_text(gsm_lines(3, 500))
    prepare(str(tmp_path / "c.jsonl"), where, Converter("gsm8k"), PrepareOptions("c"))
    assert files(where) == ["_prepare_report.json", "prompts-00000.parquet"]


@pytest.mark.slow
def test_prepare_to_s3_exits_promptly_after_a_row_error_past_the_first_batch(s3, bucket, tmp_path):
    """It used to hang forever: the open shard writer was finalised at interpreter exit, when
    s3fs's event loop was gone (and would have completed a partial upload)."""
    storage = Storage(f"s3://{bucket}/out")
    src = tmp_path / "src.jsonl"
    src.write_text(gsm_lines(9000) + json.dumps({"answer": "#### 1"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "prepare", str(src), storage.url(), "--format", "gsm8k", "--strict"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if " INFO " not in line] == [f"error: {src}:9001: missing field 'question'"]
    assert files(storage.url()) == [] and uploads_in_progress(storage.url()) == []
    # a row a format cannot use (not a number) is that row's error, not a crash
    rows = [{"question": f"Echo {i}.", "input_output": json.dumps({"inputs": ["1"], "outputs": ["1"]}),
             **({"time_limit_s": "abc"} if i == 8500 else {})} for i in range(9000)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "prepare", str(src), storage.url(), "--format", "code-stdio"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "read 9,000, written 8,999" in proc.stderr and f"{src}:8501: time_limit_s 'abc' is not a number" in proc.stderr


def curated_rows():
    return [{"id": "a", "prompt": "What is 2+3?", "domain": "math", "answer": "5", "finish_reason": "stop",
             "completion": "<think>\nTwo plus three makes five.\n</think>\n\nThe answer is $\\boxed{5}$."},
            {"id": "b", "prompt": "What is 2+3?", "domain": "math", "answer": "5", "finish_reason": "stop", "completion": "\\boxed{6}"}]


def test_curate_refuses_to_read_its_own_output(tmp_path):
    from pipeline.run import curate

    folder = tmp_path / "gen"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(curated_rows()), folder / "gen.parquet")
    pq.write_table(pa.Table.from_pylist(curated_rows()), folder / "curated-00000.parquet")  # an earlier curate's
    os.symlink(folder, tmp_path / "alias")
    for inputs, output in ((f"{folder}/*.parquet", str(folder)), (str(folder / "gen.parquet"), str(folder / "gen.parquet")),
                           (f"{tmp_path}/alias/*.parquet", str(folder))):
        with pytest.raises(ConfigError, match=r"curate: input .* is this curate's own output"):
            curate(load_job(None), [inputs], output)


@pytest.mark.slow
def test_curate_into_the_same_place_twice_replaces_its_output(tmp_path):
    src = tmp_path / "gen.parquet"
    pq.write_table(pa.Table.from_pylist(curated_rows()), src)
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", "pipeline", "curate", str(src), str(tmp_path / "cur")],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "cur").iterdir()) == ["curated-00000.parquet"]
    assert [r["id"] for r in pq.read_table(tmp_path / "cur").to_pylist()] == ["a", "b"]
