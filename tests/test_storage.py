"""The storage layer on a local folder and on a real S3 server (SeaweedFS, started by the tests)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pyarrow as pa
import pytest

from pipeline.storage import Fenced, Lease, LeaseHeld, LeaseLost, NotOwned, Storage


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


def test_tables_round_trip_and_listing(storage):
    t = pa.table({"x": [1, 2, 3]})
    storage.write_table("samples/a.parquet", t)
    storage.write_table("samples/b.parquet", t)
    assert storage.read_table("samples/a.parquet").equals(t)
    assert storage.list("samples") == ["samples/a.parquet", "samples/b.parquet"]
    storage.remove("samples/a.parquet")
    storage.remove("samples/a.parquet")  # already gone: nothing to do
    assert storage.list("samples") == ["samples/b.parquet"]
    assert storage.list("nothing-here") == []


def test_streamed_parquet_appears_only_when_complete(storage):
    t = pa.table({"x": list(range(10))})
    with storage.parquet_writer("data/big.parquet", t.schema) as w:
        w.write_table(t)
        assert not storage.exists("data/big.parquet")
        w.write_table(t)
    assert storage.read_table("data/big.parquet").num_rows == 20


# -- ownership -------------------------------------------------------------------------------------

def test_an_empty_or_own_output_is_claimed_and_a_foreign_one_is_left_untouched(storage, tmp_path):
    storage.claim("dataset")
    storage.claim("dataset")  # ours: fine again
    with pytest.raises(NotOwned, match="holds a dataset output, not a curate"):
        storage.claim("curate")
    foreign = Storage(storage.url() + "-theirs")
    foreign.write_bytes("data/train.parquet", b"their data")
    foreign.write_bytes("README.md", b"their card")
    with pytest.raises(NotOwned, match="did not write"):
        foreign.claim("dataset")
    assert foreign.fs.find(foreign.root) == sorted(foreign.path(p) for p in ("README.md", "data/train.parquet"))
    assert foreign.read_bytes("README.md") == b"their card"


def test_an_empty_output_name_is_refused():
    for bad in ("", "  "):
        with pytest.raises(NotOwned, match="empty"):
            Storage(bad)


def test_shards_inside_the_output_are_recognised(tmp_path):
    out = Storage(str(tmp_path / "out"))
    (tmp_path / "out" / "data").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "out" / "data", tmp_path / "elsewhere" / "link")
    assert out.contains(out.fs, str(tmp_path / "out" / "data" / "p.parquet"))
    assert out.contains(out.fs, str(tmp_path / "elsewhere" / "link" / "p.parquet"))  # through a symlink
    assert not out.contains(out.fs, str(tmp_path / "out-2" / "p.parquet"))


# -- the lease ------------------------------------------------------------------------------------

def _lease(storage: Storage, attempt: str, ttl_s: float = 600) -> Lease:
    lease = Lease(storage, attempt, ttl_s)
    lease.acquire()
    return lease


def _fake_holder(storage: Storage, epoch: int, ttl_s: float, wall: float, host: str = "other-node", pid: int = 1) -> None:
    """A lease record as a holder on another machine would have written it."""
    storage.write_bytes(Lease._rec(epoch), json.dumps({
        "attempt": f"other-{epoch}", "epoch": epoch, "ttl_s": ttl_s, "created": wall,
        "holder": {"host": host, "pid": pid, "boot_id": "another-kernel", "pidns": "pid:[1]", "start": "1"}}).encode())
    storage.write_bytes(Lease._beat(epoch), json.dumps({"seq": 1, "wall": wall, "released": False}).encode())


def test_a_second_run_on_the_same_output_stops_clearly(storage):
    a = _lease(storage, "run-a")
    with pytest.raises(LeaseHeld, match=r"another run \(attempt run-a on .* pid \d+\) is writing"):
        _lease(storage, "run-b")
    a.renew()
    a.release()
    b = _lease(storage, "run-b")  # released: free at once
    assert b.epoch == a.epoch + 1
    with pytest.raises(LeaseLost):
        a.check()
    with pytest.raises(LeaseLost):
        Fenced(storage, a).write_bytes("README.md", b"stale")
    assert not storage.exists("README.md")


def test_a_lease_left_by_a_killed_driver_on_this_machine_is_taken_over_at_once(storage):
    dead = subprocess.Popen([sys.executable, "-c", "import sys; sys.path[:0] = " + repr(sys.path) + textwrap.dedent("""
        from pipeline.storage import Lease, Storage
        Lease(Storage(%r), "killed", 600).acquire()
        import os; os._exit(0)  # dies holding it
    """) % storage.uri], env=os.environ)
    assert dead.wait() == 0
    waited: list[str] = []
    lease = Lease(storage, "rerun", 600)
    lease.acquire(on_wait=waited.append)
    assert lease.epoch == 2 and not waited  # taken at once: no watching of a heartbeat


def test_racing_takers_of_a_stale_lease_exactly_one_wins(storage):
    _fake_holder(storage, 1, ttl_s=2, wall=time.time() - 3600)
    results: list[str] = []

    def take(i: int) -> None:
        try:
            _lease(storage, f"taker-{i}")
            results.append("won")
        except LeaseHeld:
            results.append("lost")

    threads = [threading.Thread(target=take, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["lost"] * 5 + ["won"]
    assert storage.list(Lease.DIR)[-2:] == [Lease._beat(2), Lease._rec(2)]


def test_the_ttl_is_the_holders_not_the_takers(storage):
    _fake_holder(storage, 1, ttl_s=600, wall=time.time() - 60)  # alive: beat a minute ago, TTL 600 s
    with pytest.raises(LeaseHeld, match="TTL 600s"):
        Lease(storage, "impatient", ttl_s=10).acquire()


def test_skewed_clocks_never_hand_over_a_live_lease(storage):
    # holder's clock an hour behind ours, but alive: its counter moves while the taker watches (half
    # of a 20 s TTL: the taker refuses at the first move it sees, however slow the machine's writes)
    _fake_holder(storage, 1, ttl_s=20, wall=time.time() - 3600)
    stop = threading.Event()

    def beat() -> None:
        seq = 1
        while not stop.wait(0.2):
            seq += 1
            storage.write_bytes(Lease._beat(1), json.dumps({"seq": seq, "wall": time.time() - 3600}).encode())

    t = threading.Thread(target=beat)
    t.start()
    try:
        with pytest.raises(LeaseHeld, match="heartbeat moved"):
            Lease(storage, "taker", ttl_s=20).acquire()
    finally:
        stop.set()
        t.join()
    # holder's clock ahead of ours: looks fresh, so refused at once
    _fake_holder(storage, 1, ttl_s=2, wall=time.time() + 3600)
    with pytest.raises(LeaseHeld, match="heartbeat"):
        Lease(storage, "taker", ttl_s=2).acquire()
    # the same lagging holder, dead: taken over after watching half its TTL
    _fake_holder(storage, 1, ttl_s=2, wall=time.time() - 3600)
    t0 = time.monotonic()
    assert _lease(storage, "taker", ttl_s=2).epoch == 2
    assert time.monotonic() - t0 >= 1.0


HOLDER = """
import sys, time
sys.path[:0] = {path!r}
from pipeline.storage import Fenced, Lease, LeaseLost, Storage
storage = Storage({uri!r})
lease = Lease(storage, "paused", {ttl})
lease.acquire()
with lease.hold(print):
    fenced = Fenced(storage, lease)
    print("holding", flush=True)
    sys.stdin.readline()  # the test stops us here (SIGSTOP), takes over, resumes us, then says go
    try:
        fenced.write_bytes("README.md", b"from the paused holder")
        print("wrote", flush=True)
    except LeaseLost as e:
        print("fenced:", e, flush=True)
"""


def test_a_paused_holder_resumed_after_takeover_changes_nothing(storage):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(path=sys.path, uri=storage.uri, ttl=2)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ)
    try:
        assert proc.stdout.readline().strip() == "holding"
        os.kill(proc.pid, signal.SIGSTOP)  # a GC pause, a frozen VM
        # a holder on "another machine": make the record look foreign so only the TTL decides
        rec = storage.read_json(Lease._rec(1))
        rec["holder"]["boot_id"] = "elsewhere"
        storage.write_bytes(Lease._rec(1), json.dumps(rec).encode())
        deadline = time.monotonic() + 60
        while True:  # its heartbeat is fresh until the TTL passes
            try:
                successor = _lease(storage, "successor", ttl_s=600)
                break
            except LeaseHeld:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        Fenced(storage, successor).write_bytes("README.md", b"from the successor")
        os.kill(proc.pid, signal.SIGCONT)
        out, _ = proc.communicate("go\n", timeout=60)
    finally:
        proc.kill()
    assert "fenced: lost the lease" in out and "wrote" not in out
    assert storage.read_bytes("README.md") == b"from the successor"
    successor.check()  # still ours
