"""Publishing commits as versions: data files, card, manifest last, readers never see a mix."""

from __future__ import annotations

import glob
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.commits import CommitWriter
from pipeline.config import SelectSpec
from pipeline.prompts import judged
from pipeline.publish import publish, to_training_rows
from pipeline.storage import Fenced, Lease, Storage

FP = "fp0"


def samples(unit: str, n: int, accepted_every: int = 2, per_prompt: int = 1) -> pa.Table:
    """`n` prompts `{unit}-{i}` with `per_prompt` samples each; every `accepted_every`-th prompt accepted."""
    rows = []
    for i in range(n):
        ok = i % accepted_every == 0
        for k in range(per_prompt):
            rows.append({"id": f"{unit}-{i}", "prompt": f"What is {i}+{i}?", "domain": "math", "answer": str(2 * i),
                         "source": "t", "prompt_hash": f"h-{unit}-{i}", "sample_index": k,
                         "completion": f"<think>\n{i}+{i} ({k})\n</think>\n\n\\boxed{{{2 * i}}}",
                         "reasoning": f"{i}+{i} ({k})", "final": f"\\boxed{{{2 * i}}}", "finish_reason": "stop",
                         "prompt_tokens": 10, "completion_tokens": 20 + k, "model": "m", "seed": 1,
                         "accepted": ok, "reject_reason": None if ok else "answer_mismatch", "reject_details": None})
    return pa.Table.from_pylist(rows)


def held(storage: Storage, attempt: str = "att1") -> Fenced:
    lease = Lease(storage, attempt, ttl_s=600)
    lease.acquire()
    return Fenced(storage, lease)


def committed(fenced: Fenced, table: pa.Table, fp: str = FP) -> None:
    """Commit a table of complete prompts through the real writer."""
    keys = set(zip(table.column("id").to_pylist(), table.column("prompt_hash").to_pylist()))
    per_prompt = table.num_rows // len(keys)
    writer = CommitWriter(fenced, fp, fenced.lease.attempt, range(per_prompt), keys)
    writer.add(table)
    writer.flush()
    assert not writer.missing()


def run_publish(fenced: Fenced, rows_per_file: int = 100_000, select: SelectSpec | None = None, run_id: str = "r") -> dict:
    settings = {"rows_per_file": rows_per_file, "select": (select or SelectSpec()).model_dump()}
    manifest = {"run_id": run_id, "output": fenced.storage.url(), "job": {"name": "t"}, "model": "m"}
    return publish(fenced, FP, manifest, settings, time.time(), select, rows_per_file)


def test_training_rows_are_trl_conversations():
    rows = to_training_rows(samples("u", 3)).to_pylist()
    assert len(rows) == 2
    assert rows[0]["messages"] == [
        {"role": "user", "content": "What is 0+0?"},
        {"role": "assistant", "content": "<think>\n0+0 (0)\n</think>\n\n\\boxed{0}"},
    ]
    assert rows[1]["id"] == "u-2" and rows[1]["completion_tokens"] == 20


class Recording(Storage):
    """Storage that remembers the order of its writes."""

    writes: list[str]

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.writes.append(rel)
        super().write_bytes(rel, data)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        self.writes.append(rel)
        return super().create_exclusive(rel, data)

    def parquet_writer(self, rel: str, schema: pa.Schema):
        self.writes.append(rel)
        return super().parquet_writer(rel, schema)


def test_publish_writes_a_version_then_the_card_report_and_manifest_last(tmp_path):
    storage = Recording(str(tmp_path / "out"))
    storage.writes = []
    fenced = held(storage)
    committed(fenced, samples("b", 10))
    committed(fenced, samples("a", 10))
    storage.writes.clear()
    manifest = run_publish(fenced, rows_per_file=4)
    version = manifest["version"]
    names = [f"data/{version}/train-0000{i}-of-00003.parquet" for i in range(3)]
    assert manifest["files"]["data"] == names
    ids = sorted(r["id"] for rel in names for r in storage.read_table(rel).to_pylist())
    assert ids == sorted([f"a-{i}" for i in range(0, 10, 2)] + [f"b-{i}" for i in range(0, 10, 2)])
    assert manifest["stats"]["domains"]["math"] == {
        "samples": 20, "accepted": 10, "accept_rate": 0.5, "prompts": 20, "prompts_with_accepted": 10,
        "reasons": {"answer_mismatch": 10}}
    # order: every version file, then the version claim, then card, report, manifest (last)
    claim = storage.writes.index(f"_pipeline/versions/{1:08d}.json")
    version_files = [w for w in storage.writes if version in w and not w.startswith("_pipeline")]
    assert all(storage.writes.index(w) < claim for w in version_files) and len(version_files) == 3 + 2 + 2 + 3
    assert storage.writes[-3:] == ["README.md", "report.md", "_manifest.json"]
    assert storage.read_json("_manifest.json") == manifest
    assert storage.list("data") == []  # nothing directly under data/: a listing of data/*.parquet mixes nothing
    card = storage.read_bytes("README.md").decode()
    assert card.startswith("---\nconfigs:") and f"path: data/{version}/train-*.parquet" in card
    assert "num_examples: 10" in card
    rep = storage.read_bytes("report.md").decode()
    assert "| math | `answer_mismatch` | 10 | 50.0% |" in rep and f"(plots/{version}/lengths.png)" in rep
    assert storage.read_bytes(f"plots/{version}/reasons.png").startswith(b"\x89PNG")


def test_publishing_the_same_commits_again_writes_nothing(tmp_path):
    storage = Recording(str(tmp_path / "out"))
    storage.writes = []
    fenced = held(storage)
    committed(fenced, samples("a", 4))
    first = run_publish(fenced)
    storage.writes.clear()
    again = run_publish(fenced, run_id="r2")
    assert again == first and storage.writes == []


def test_versions_are_pruned_by_their_own_records_and_user_files_survive(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    fenced = held(storage)
    committed(fenced, samples("a", 6))
    v1 = run_publish(fenced, rows_per_file=100)
    (tmp_path / "out" / "data" / "NOTES.md").write_text("mine")  # a user's file in the output
    (tmp_path / "out" / "data" / v1["version"] / "extra.parquet").write_text("also mine")
    v2 = run_publish(fenced, rows_per_file=2)
    assert all(storage.exists(f) for f in v1["files"]["data"])  # the predecessor stays for late readers
    v3 = run_publish(fenced, rows_per_file=1)
    assert v1["seq"] < v2["seq"] < v3["seq"]
    assert not any(storage.exists(f) for f in v1["files"]["data"] + v1["files"]["samples"] + v1["files"]["plots"])
    assert all(storage.exists(f) for f in v2["files"]["data"] + v3["files"]["data"])
    assert (tmp_path / "out" / "data" / "NOTES.md").read_text() == "mine"
    assert (tmp_path / "out" / "data" / v1["version"] / "extra.parquet").read_text() == "also mine"
    assert storage.read_json("_manifest.json")["version"] == v3["version"]


def test_overlapping_commits_publish_each_prompt_once(tmp_path):
    """A resumed holder and its successor may commit groups that share prompts."""
    storage = Storage(str(tmp_path / "out"))
    fenced = held(storage)
    both = samples("a", 6, per_prompt=2)
    committed(fenced, both.slice(0, 8))   # prompts a-0..a-3
    committed(fenced, both.slice(4, 8))   # prompts a-2..a-5: a-2 and a-3 twice
    manifest = run_publish(fenced)
    keys = [(r["id"], r["sample_index"]) for rel in manifest["files"]["samples"] for r in storage.read_table(rel).to_pylist()]
    assert sorted(keys) == sorted((f"a-{i}", k) for i in range(6) for k in range(2))


def test_no_accepted_sample_still_publishes_a_loadable_empty_file(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    fenced = held(storage)
    committed(fenced, samples("a", 3, accepted_every=99).slice(1))
    manifest = run_publish(fenced, rows_per_file=10)
    (rel,) = manifest["files"]["data"]
    t = storage.read_table(rel)
    assert t.num_rows == 0 and "messages" in t.column_names


def select(table: pa.Table, spec: SelectSpec) -> pa.Table:
    """Final verdicts of one table holding all samples of its prompts (the one-pass path)."""
    ((out, _),) = judged(lambda: [table], spec)
    return out


def test_rejection_sampling_keeps_k_per_prompt_and_drops_identical_completions():
    rows = []
    for pid, comps in {"p": ["A long answer, 4.", "a long answer 4", "Short: 4.", "Another way: 4."], "q": ["x=1", "wrong"]}.items():
        for i, c in enumerate(comps):
            ok = c != "wrong"
            rows.append({"id": pid, "sample_index": i, "accepted": ok, "reject_reason": None if ok else "answer_mismatch",
                         "completion": c, "completion_tokens": len(c)})
    t = pa.Table.from_pylist(rows)
    out = select(t, SelectSpec(keep_per_prompt=2, policy="shortest")).to_pylist()
    assert [(r["id"], r["sample_index"], r["accepted"], r["reject_reason"]) for r in out] == [
        ("p", 0, False, "not_selected"), ("p", 1, False, "duplicate_completion"), ("p", 2, True, None),
        ("p", 3, True, None), ("q", 0, True, None), ("q", 1, False, "answer_mismatch")]
    first = select(t, SelectSpec(keep_per_prompt=1)).to_pylist()
    assert [r["accepted"] for r in first] == [True, False, False, False, True, False]
    unchanged = select(t, SelectSpec(dedup_completions=False))
    assert unchanged.select(t.column_names).equals(t)


def test_random_selection_is_spread_and_does_not_depend_on_row_order():
    rows = [{"id": f"p{p}", "sample_index": i, "accepted": True, "reject_reason": None,
             "completion": f"answer {p} way {i}", "completion_tokens": 10}
            for p in range(200) for i in range(4)]
    spec = SelectSpec(keep_per_prompt=1, policy="random")

    def chosen(rs: list[dict]) -> dict[str, int]:
        out = select(pa.Table.from_pylist(rs), spec).to_pylist()
        picked = {r["id"]: r["sample_index"] for r in out if r["accepted"]}
        assert len(picked) == 200  # exactly one per prompt
        return picked

    picked = chosen(rows)
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    assert chosen(shuffled) == picked  # keyed by the sample, not by its position
    counts = [list(picked.values()).count(i) for i in range(4)]
    assert min(counts) > 25, counts  # each index chosen for roughly a quarter of the prompts, not always the first


# -- readers during a republish that is killed --------------------------------------------------

def _visible(root: str, fs_open, glob_fn) -> tuple[int, int, set[str]] | None:
    """What a reader following the card sees: (rows read, rows the card promises, folders read)."""
    try:
        card = fs_open(f"{root}/README.md").decode()
    except FileNotFoundError:
        return None
    front = yaml.safe_load(card.split("---")[1])
    pattern = front["configs"][0]["data_files"][0]["path"]
    promised = front["dataset_info"]["splits"][0]["num_examples"]
    files = glob_fn(f"{root}/{pattern}")
    rows = sum(pq.read_table(pa.BufferReader(fs_open(f))).num_rows for f in files)
    return rows, promised, {f.rsplit("/", 2)[-2] for f in files}


PUBLISHER = """
import sys, time
sys.path.insert(0, {tests!r})
from test_publish import held, run_publish
from pipeline.storage import Storage
fenced = held(Storage({uri!r}), "republisher")
run_publish(fenced, rows_per_file={rows})
"""


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_a_reader_polling_during_a_killed_republish_sees_one_whole_version(tmp_path, request, where):
    if where == "local":
        uri = str(tmp_path / "out")
        storage = Storage(uri)
        fs_open = lambda p: Path(p).read_bytes()  # noqa: E731
        glob_fn = glob.glob
    else:
        bucket = request.getfixturevalue("bucket")
        uri = f"s3://{bucket}/out"
        storage = Storage(uri)
        fs_open = lambda p: storage.fs.cat_file(p)  # noqa: E731
        glob_fn = lambda p: sorted(storage.fs.glob(p))  # noqa: E731
        uri_root = storage.root
    root = uri if where == "local" else uri_root
    fenced = held(storage)
    for u in "abcdefgh":
        committed(fenced, samples(u, 40))
    first = run_publish(fenced, rows_per_file=100)
    fenced.lease.release()

    seen: list[tuple[int, int, set[str]]] = []
    problems: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                got = _visible(root, fs_open, glob_fn)
            except FileNotFoundError as e:  # a file the card named vanished: only allowed for pruned versions
                problems.append(f"missing: {e}")
                continue
            if got is not None:
                seen.append(got)
                rows, promised, folders = got
                if rows != promised or len(folders) != 1:
                    problems.append(f"mix: {got}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        script = PUBLISHER.format(tests=str(Path(__file__).parent), uri=uri, rows=7)
        proc = subprocess.Popen([sys.executable, "-c", script], env=env)
        # kill it once the new version's files are being written (an event, not a delay)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if [p for p in storage.list("_pipeline/versions") if "pending-" in p]:
                pending = [p for p in storage.list("_pipeline/versions") if "pending-" in p][0]
                version = pending.rsplit("pending-", 1)[1][:-5]
                if storage.list(f"samples/{version}"):
                    break
            time.sleep(0.01)
        assert proc.poll() is None, "the republish ended before it could be killed mid-way"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = _visible(root, fs_open, glob_fn)
        assert killed is not None and killed[2] == {first["version"]}  # still the first version, whole
        # the next run repairs: a new version, and the interrupted one's files are gone
        fenced = held(storage, "next")
        second = run_publish(fenced, rows_per_file=7)
        assert storage.list(f"samples/{version}") == [] and storage.list(f"data/{version}") == []
    finally:
        stop.set()
        thread.join()
    assert not problems, problems[:5]
    versions_seen = set().union(*(s[2] for s in seen))
    assert versions_seen <= {first["version"], second["version"]} and len(seen) > 3
    final = _visible(root, fs_open, glob_fn)
    assert final == (first["stats"]["accepted"], first["stats"]["accepted"], {second["version"]})
