"""The storage layer on a local folder and on a real S3 server (SeaweedFS, started by the tests)."""

import threading

import pyarrow as pa
import pytest

from pipeline.storage import Commit, Storage


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "out"))
    bucket = request.getfixturevalue("bucket")
    return Storage(f"s3://{bucket}/run")


def test_exclusive_create_admits_exactly_one_writer(storage):
    assert storage.create_exclusive("_pipeline/commits/a.json", b"first")
    assert not storage.create_exclusive("_pipeline/commits/a.json", b"second")
    assert storage.read_bytes("_pipeline/commits/a.json") == b"first"


def test_racing_commits_one_wins(storage):
    results = []

    def attempt(i):
        results.append(storage.commit(Commit("shard-1", f"att-{i}", [f"p{i}"], 1, 0, "src")))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    (c,) = storage.commits().values()
    assert c.parts == [f"p{c.attempt.split('-')[1]}"]


def test_tables_round_trip_and_listing(storage):
    t = pa.table({"x": [1, 2, 3]})
    storage.write_table("samples/a.parquet", t)
    storage.write_table("samples/b.parquet", t)
    assert storage.read_table("samples/a.parquet").equals(t)
    assert storage.list("samples") == ["samples/a.parquet", "samples/b.parquet"]
    storage.remove("samples/a.parquet")
    assert storage.list("samples") == ["samples/b.parquet"]
    assert storage.list("nothing-here") == []


def test_streamed_parquet_appears_only_when_complete(storage):
    t = pa.table({"x": list(range(10))})
    with storage.parquet_writer("data/big.parquet", t.schema) as w:
        w.write_table(t)
        assert not storage.exists("data/big.parquet")
        w.write_table(t)
    assert storage.read_table("data/big.parquet").num_rows == 20


def test_clean_attempts_keeps_committed_ones(storage):
    for att in ("keep", "drop"):
        storage.write_table(storage.part_path(att, "u", 0), pa.table({"x": [1]}))
    storage.clean_attempts({"keep"})
    # files, not folders: SeaweedFS keeps listing a folder emptied of its objects
    left = storage.fs.find(storage.path("_pipeline/attempts"))
    assert [p.split("/attempts/", 1)[1].split("/")[0] for p in left] == ["keep"]


def test_a_second_run_on_the_same_output_stops_clearly(storage):
    from pipeline.storage import LeaseHeld

    storage.acquire_lease("run-a", ttl_s=600)
    with pytest.raises(LeaseHeld, match=r"another run \(attempt run-a, .* pid \d+\) is writing"):
        storage.acquire_lease("run-b", ttl_s=600)
    storage.renew_lease("run-a")
    storage.release_lease("run-a")
    storage.acquire_lease("run-b", ttl_s=600)  # free again
    with pytest.raises(LeaseHeld, match="lost the lease"):
        storage.renew_lease("run-a")


def test_a_lease_left_by_a_killed_driver_is_taken_over(storage):
    import json
    import socket
    import subprocess
    import time

    dead = subprocess.Popen(["true"])
    dead.wait()
    storage.write_bytes(storage.LEASE, json.dumps(
        {"attempt": "killed", "host": socket.gethostname(), "pid": dead.pid, "heartbeat": time.time()}).encode())
    storage.acquire_lease("rerun", ttl_s=600)  # same host, holder gone: stale at once
    storage.write_bytes(storage.LEASE, json.dumps(
        {"attempt": "elsewhere", "host": "other-node", "pid": 1, "heartbeat": time.time() - 700}).encode())
    storage.acquire_lease("rerun-2", ttl_s=600)  # another host, heartbeat past the TTL
    assert storage.read_json(storage.LEASE)["attempt"] == "rerun-2"
