"""Publishing from commit records: data files, card, manifest last, idempotent."""

import time

import pyarrow as pa

from pipeline.publish import data_file_names, publish, to_training_rows
from pipeline.storage import Commit, Storage


def samples(unit: str, n: int, accepted_every: int = 2) -> pa.Table:
    rows = []
    for i in range(n):
        ok = i % accepted_every == 0
        rows.append({"id": f"{unit}-{i}", "prompt": f"What is {i}+{i}?", "domain": "math", "answer": str(2 * i),
                     "source": "t", "sample_index": 0, "completion": f"<think>\n{i}+{i}\n</think>\n\n\\boxed{{{2 * i}}}",
                     "reasoning": f"{i}+{i}", "final": f"\\boxed{{{2 * i}}}", "finish_reason": "stop",
                     "prompt_tokens": 10, "completion_tokens": 20, "model": "m", "seed": 1,
                     "accepted": ok, "reject_reason": None if ok else "answer_mismatch", "reject_details": None})
    return pa.Table.from_pylist(rows)


def committed(storage: Storage, unit: str, table: pa.Table) -> None:
    rel = storage.part_path("att1", unit, 0)
    storage.write_table(rel, table)
    storage.commit(Commit(unit, "att1", [rel], table.num_rows, sum(table.column("accepted").to_pylist()), f"{unit}.parquet"))


def test_training_rows_are_trl_conversations():
    rows = to_training_rows(samples("u", 3)).to_pylist()
    assert len(rows) == 2
    assert rows[0]["messages"] == [
        {"role": "user", "content": "What is 0+0?"},
        {"role": "assistant", "content": "<think>\n0+0\n</think>\n\n\\boxed{0}"},
    ]
    assert rows[1]["id"] == "u-2" and rows[1]["completion_tokens"] == 20


def test_publish_splits_data_files_and_writes_the_manifest_last(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    committed(storage, "b", samples("b", 10))
    committed(storage, "a", samples("a", 10))
    storage.write_table(storage.part_path("dead-attempt", "a", 0), samples("a", 10))  # never committed
    manifest = publish(storage, {"run_id": "r", "job": {"name": "t"}, "model": "m"}, rows_per_file=4, started=time.time())
    assert manifest["files"]["data"] == data_file_names(10, 4) == [
        "data/train-00000-of-00003.parquet", "data/train-00001-of-00003.parquet", "data/train-00002-of-00003.parquet"]
    ids = [r["id"] for rel in manifest["files"]["data"] for r in storage.read_table(rel).to_pylist()]
    assert ids == [f"a-{i}" for i in range(0, 10, 2)] + [f"b-{i}" for i in range(0, 10, 2)]
    assert manifest["stats"]["domains"]["math"] == {
        "samples": 20, "accepted": 10, "accept_rate": 0.5, "prompts": 20, "prompts_with_accepted": 10,
        "reasons": {"answer_mismatch": 10}}
    assert storage.read_json("_manifest.json")["files"] == manifest["files"]
    assert storage.list("_pipeline/attempts") == ["_pipeline/attempts/att1"]
    assert storage.read_bytes("reasons.png").startswith(b"\x89PNG") and storage.read_bytes("lengths.png").startswith(b"\x89PNG")
    rep = storage.read_bytes("report.md").decode()
    assert "| math | `answer_mismatch` | 10 | 50.0% |" in rep and "![lengths](lengths.png)" in rep
    card = storage.read_bytes("README.md").decode()
    assert card.startswith("---\nconfigs:") and "path: data/train-*.parquet" in card and "num_examples: 10" in card
    # publishing again gives the same files, and stale data files from another layout are removed
    again = publish(storage, {"run_id": "r2", "job": {"name": "t"}, "model": "m"}, rows_per_file=100, started=time.time())
    assert again["files"]["data"] == ["data/train-00000-of-00001.parquet"]
    assert storage.list("data") == ["data/train-00000-of-00001.parquet"]


def test_no_accepted_sample_still_publishes_a_loadable_empty_file(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    committed(storage, "a", samples("a", 3, accepted_every=99).slice(1))
    manifest = publish(storage, {"run_id": "r", "job": {}, "model": "m"}, rows_per_file=10, started=time.time())
    (rel,) = manifest["files"]["data"]
    t = storage.read_table(rel)
    assert t.num_rows == 0 and "messages" in t.column_names


def test_rejection_sampling_keeps_k_per_prompt_and_drops_identical_completions():
    from pipeline.config import SelectSpec
    from pipeline.select import select

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
    rnd1 = select(t, SelectSpec(keep_per_prompt=1, policy="random")).column("accepted").to_pylist()
    assert rnd1 == select(t, SelectSpec(keep_per_prompt=1, policy="random")).column("accepted").to_pylist()
    assert sum(rnd1[:4]) == 1
    assert select(t, SelectSpec(dedup_completions=False)).equals(t)
