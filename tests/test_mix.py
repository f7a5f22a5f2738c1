"""`pipeline mix`: composition, cross-source dedup and decontamination, determinism, provenance,
and the output guarantees under a kill. Fast tests mix synthetic published datasets (made by the
real publish); the slow ones mix datasets the real pipeline (vLLM on CPU) generated in the test."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import yaml

from pipeline.config import REPO_ROOT, ConfigError, load_job
from pipeline.mix import (ALL, CAPPED, ELIGIBLE, OUTCOME, MixError, Plan, mark, mix, quotas, removals, threshold,
                          whole_prompts)
from pipeline.mixconfig import MixConfig, SourceSpec, load_mix
from pipeline.storage import NotOwned, Storage
from test_publish import committed, held, run_publish

APPLES = [f"Problem number {i}: how many apples are left?" for i in range(10)]
FOX = "The quick brown fox jumps over the lazy dog near the river bank at dawn."


def rows(prefix: str, prompts: list[str], n: int, domain: str = "math", outcome=None, tokens=None,
         extra: dict[str, Any] | None = None) -> pa.Table:
    """Samples of complete prompts; `outcome(i, k)` gives a sample's reject reason (None: accepted)."""
    out = []
    for i, p in enumerate(prompts):
        for k in range(n):
            reason = outcome(i, k) if outcome else None
            out.append({"id": f"{prefix}-{i}", "prompt": p, "domain": domain, "answer": "1", "source": prefix,
                        "prompt_hash": f"h-{prefix}-{i}", "sample_index": k,
                        "completion": f"<think>\nidea {prefix} {i} {k}\n</think>\n\nanswer {i}",
                        "reasoning": f"idea {prefix} {i} {k}", "final": f"answer {i}", "finish_reason": "stop",
                        "prompt_tokens": 12, "completion_tokens": tokens(i, k) if tokens else 100 + k,
                        "model": f"model-{prefix}", "seed": 1, "accepted": reason is None, "reject_reason": reason,
                        "reject_details": None, **(extra or {})})
    return pa.Table.from_pylist(out)


def publish_source(path: Path, *tables: pa.Table, run_id: str = "run") -> str:
    """A published dataset of these samples: one commit per table, then the real publish."""
    fenced = held(Storage(str(path)))
    for t in tables:
        committed(fenced, t)
    run_publish(fenced, run_id=run_id)
    fenced.lease.release()
    return str(path)


def config(tmp_path: Path, sources: list[dict[str, Any]], out: str = "mix", **kw: Any) -> MixConfig:
    return MixConfig.model_validate({"output": str(tmp_path / out), "resources": {"actors": 0},
                                     "sources": sources, **kw})


def manifest(uri: str) -> dict[str, Any]:
    return Storage(uri).read_json("_manifest.json")


def data_rows(uri: str) -> list[dict[str, Any]]:
    storage = Storage(uri)
    return [r for rel in manifest(uri)["files"]["data"] for r in storage.read_table(rel).to_pylist()]


def sample_rows(uri: str) -> list[dict[str, Any]]:
    storage = Storage(uri)
    return [r for rel in manifest(uri)["files"]["samples"] for r in storage.read_table(rel).to_pylist()]


def by_source(uri: str) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in manifest(uri)["sources"]}


@pytest.fixture
def two_sources(tmp_path: Path) -> tuple[str, str, str]:
    """A: 10 math prompts x 4 samples. B: 10 general prompts x 2, of which two repeat A's prompts
    exactly, one nearly (case, punctuation), one holds a benchmark sentence; six are new.
    Returns A, B and the benchmark file."""
    a = publish_source(tmp_path / "a", rows("a", APPLES[:5], 4), rows("a5", APPLES[5:], 4), run_id="run-a")
    b_prompts = [APPLES[0], APPLES[1], APPLES[2].upper().replace(":", " -"), f"Explain this: {FOX}"]
    b_prompts += [f"Write a short poem about the colour {c}." for c in ("red", "blue", "green", "gold", "grey", "teal")]
    b = publish_source(tmp_path / "b", rows("b", b_prompts, 2, domain="general"), run_id="run-b")
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"problem": f"Yesterday {FOX}"}) + "\n")
    return a, b, str(bench)


def r1_mix(tmp_path: Path, a: str, b: str, bench: str, out: str = "mix", **kw: Any) -> MixConfig:
    sources = [{"name": "math", "dataset": a, "count": 12, "max_per_prompt": 2},
               {"name": "general", "dataset": b, "weight": 1}]
    return config(tmp_path, sources, out, **{"total": 20, "decontaminate": [bench], **kw})


def test_weights_caps_duplicates_and_contamination_give_exact_counts(tmp_path, two_sources):
    a, b, bench = two_sources
    uri = mix(r1_mix(tmp_path, a, b, bench))
    src = by_source(uri)
    # math: 40 read, the cap keeps 2 of each prompt's 4 (20 capped), 12 of the 20 left are asked for
    assert src["math"]["removed"] | {"capped": src["math"]["removed"]["capped"]} == {
        "outcome": 0, "domain": 0, "completion_tokens": 0, "pass_rate": 0, "capped": 20, "contaminated": 0,
        "duplicate": 0, "near_duplicate": 0, "not_selected": 8}
    assert (src["math"]["samples_read"], src["math"]["available"], src["math"]["selected"]) == (40, 20, 12)
    # general: its two exact and one near copy of math's prompts and the contaminated one go (2 samples each);
    # 12 remain and the weight gets total - count = 8 of them
    assert src["general"]["removed"] == {
        "outcome": 0, "domain": 0, "completion_tokens": 0, "pass_rate": 0, "capped": 0, "contaminated": 2,
        "duplicate": 4, "near_duplicate": 2, "not_selected": 4}
    assert (src["general"]["available"], src["general"]["requested"], src["general"]["selected"]) == (12, 8, 8)
    data = data_rows(uri)
    assert len(data) == 20 == manifest(uri)["stats"]["samples"]
    per_prompt: dict[str, int] = {}
    for r in data:
        per_prompt[r["id"]] = per_prompt.get(r["id"], 0) + 1
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
    assert max(n for pid, n in per_prompt.items() if pid.startswith("a")) <= 2
    assert not {"b-0", "b-1", "b-2", "b-3"} & set(per_prompt)
    assert sum(n for pid, n in per_prompt.items() if pid.startswith("b-")) == 8
    samples = sample_rows(uri)
    assert sorted((s["id"], s["sample_index"]) for s in samples) == sorted((r["id"], r["sample_index"]) for r in data)
    assert {s["mix_source"] for s in samples} == {"math", "general"} and all(s["accepted"] for s in samples)


def test_the_card_and_report_name_each_source_with_its_provenance_and_counts(tmp_path, two_sources):
    a, b, bench = two_sources
    uri = mix(r1_mix(tmp_path, a, b, bench))
    card = Storage(uri).read_bytes("README.md").decode()
    report = Storage(uri).read_bytes("report.md").decode()
    for src, dataset in (("math", a), ("general", b)):
        m = manifest(dataset)
        line = next(li for li in card.splitlines() if li.startswith(f"| {src} |"))
        assert m["run_id"] in line and m["version"] in line and m["model"] in line
        assert line.endswith(f"| {by_source(uri)[src]['selected']} | {by_source(uri)[src]['prompts_selected']} |")
    assert "num_examples: 20" in card and "decontaminated against `bench.jsonl`" in card
    assert "| general | 20 | 0 | 0 | 0 | 0 | 0 | 2 | 4 | 2 | 4 | 8 | 8 |" in report
    m = manifest(uri)
    assert m["kind"] == "mix" and [s["run_id"] for s in m["sources"]] == ["run-a", "run-b"]
    assert m["sources"][0]["version"] == manifest(a)["version"]


def test_the_same_mix_file_gives_the_same_bytes_and_another_seed_another_choice(tmp_path, two_sources):
    a, b, bench = two_sources
    first, second = mix(r1_mix(tmp_path, a, b, bench, "one")), mix(r1_mix(tmp_path, a, b, bench, "two"))

    def digests(uri: str, kind: str) -> list[str]:
        return [hashlib.sha256(Storage(uri).read_bytes(rel)).hexdigest() for rel in manifest(uri)["files"][kind]]

    assert digests(first, "data") == digests(second, "data")
    assert digests(first, "samples") == digests(second, "samples")
    other = mix(r1_mix(tmp_path, a, b, bench, "three", seed=1))
    keys = lambda uri: {(r["id"], r["sample_index"]) for r in data_rows(uri)}  # noqa: E731
    assert len(keys(other)) == 20 and keys(other) != keys(first)


def test_selection_follows_sample_content_not_file_layout(tmp_path):
    """Keys hash the sample's identity: the same samples committed in other groups are chosen alike."""
    table = rows("a", APPLES, 3)
    one = publish_source(tmp_path / "one", table)
    three = publish_source(tmp_path / "three", table.slice(0, 9), table.slice(9, 12), table.slice(21))
    picks = []
    for name, src in (("x", one), ("y", three)):
        uri = mix(config(tmp_path, [{"name": "s", "dataset": src, "count": 7}], name))
        picks.append(sorted((r["id"], r["sample_index"]) for r in data_rows(uri)))
    assert picks[0] == picks[1] and len(picks[0]) == 7


def test_filters_judge_samples_on_their_own_columns(tmp_path):
    def outcome(i: int, k: int) -> str | None:
        return {0: None, 1: "not_selected", 2: "answer_mismatch"}[k % 3]

    # prompt i: samples k=0..5 -> accepted, not_selected, answer_mismatch, accepted, not_selected, answer_mismatch
    src = publish_source(tmp_path / "s", rows("s", APPLES[:6], 6, outcome=outcome, tokens=lambda i, k: 50 * (k + 1)),
                         rows("g", ["Say hello."], 6, domain="general"))
    uri = mix(config(tmp_path, [{"name": "s", "dataset": src, "filter": {
        "reasons": ["accepted", "not_selected"], "domains": ["math"], "completion_tokens": {"min": 100, "max": 250}}}]))
    removed = by_source(uri)["s"]["removed"]
    # each step counts what it removed first: the 12 answer_mismatch samples, then general's 6,
    # then math's 50-token ones (k=0); k=1, 3, 4 (100, 200, 250 tokens) remain
    assert removed["outcome"] == 12 and removed["domain"] == 6 and removed["completion_tokens"] == 6
    assert sorted({r["sample_index"] for r in data_rows(uri)}) == [1, 3, 4]
    assert by_source(uri)["s"]["selected"] == 18 and by_source(uri)["s"]["samples_read"] == 42


def test_pass_rate_comes_from_the_column_when_present_else_from_the_prompts_samples(tmp_path):
    def outcome(i: int, k: int) -> str | None:
        return None if k < i else "answer_mismatch"  # prompt i passes i of 4 samples

    computed = publish_source(tmp_path / "c", rows("c", APPLES[:5], 4, outcome=outcome))
    uri = mix(config(tmp_path, [{"name": "c", "dataset": computed, "filter": {
        "reasons": ["accepted", "answer_mismatch"], "pass_rate": {"min": 0.25, "max": 0.75}}}], "m1"))
    assert sorted({r["id"] for r in data_rows(uri)}) == ["c-1", "c-2", "c-3"]
    assert by_source(uri)["c"]["removed"]["pass_rate"] == 8
    column = publish_source(tmp_path / "p", rows("p", APPLES[:2], 2, extra={"pass_rate": 0.9}),
                            rows("q", APPLES[2:4], 2, extra={"pass_rate": 0.1}))
    uri = mix(config(tmp_path, [{"name": "p", "dataset": column, "filter": {"pass_rate": {"max": 0.5}}}], "m2"))
    assert sorted({r["id"] for r in data_rows(uri)}) == ["q-0", "q-1"]


def test_weights_alone_make_the_largest_mix_at_their_proportions(tmp_path):
    a = publish_source(tmp_path / "a", rows("a", APPLES, 3))  # 30 samples
    b = publish_source(tmp_path / "b", rows("b", [f"Poem {i} about rain." for i in range(4)], 2))  # 8 samples
    uri = mix(config(tmp_path, [{"name": "a", "dataset": a, "weight": 3}, {"name": "b", "dataset": b, "weight": 1}]))
    assert [s["selected"] for s in manifest(uri)["sources"]] == [24, 8]  # 3:1, as large as b allows


def test_a_source_asked_for_more_than_it_has_gives_all_and_says_so(tmp_path):
    a = publish_source(tmp_path / "a", rows("a", APPLES[:2], 2))
    uri = mix(config(tmp_path, [{"name": "a", "dataset": a, "count": 10}]))
    assert (by_source(uri)["a"]["requested"], by_source(uri)["a"]["selected"]) == (10, 4)


def test_quotas_apportion_weights_exactly():
    specs = [SourceSpec(name=n, dataset="x", **kw) for n, kw in
             (("c", {"count": 5}), ("w1", {"weight": 1}), ("w2", {"weight": 1}), ("w3", {"weight": 1}), ("all", {}))]
    assert quotas(specs, [9, 100, 100, 100, 7], total=22) == [5, 4, 3, 3, 7]  # 10 shared by thirds, remainders in order
    assert quotas(specs, [9, 100, 2, 100, 7], total=None) == [5, 2, 2, 2, 7]
    r1 = [SourceSpec(name=n, dataset="x", weight=w) for n, w in (("math", 4), ("code", 2), ("general", 2))]
    assert quotas(r1, [10**6] * 3, total=800_000) == [400_000, 200_000, 200_000]
    with pytest.raises(MixError, match="smaller"):
        quotas(specs, [9, 100, 100, 100, 7], total=11)


def test_duplicates_are_kept_by_the_earliest_source_and_told_exact_from_near():
    ordinal = np.array([30, 10, 20, 40, 50], np.uint64)
    near = np.array([1, 1, 1, 2, 2], np.uint64)
    exact = np.array([7, 8, 7, 9, 9], np.uint64)
    contaminated = np.array([False, False, False, True, False])
    got = removals(ordinal, near, exact, contaminated, "near").tolist()
    # ordinal 10 keeps group 1; 20 and 30 differ from its text (near); 40 is contaminated, so 50 keeps group 2
    assert got == [3, 0, 3, 1, 0]
    assert removals(ordinal, near, exact, contaminated, "exact").tolist() == [2, 0, 0, 1, 0]
    assert removals(ordinal, near, exact, contaminated, "none").tolist() == [0, 0, 0, 1, 0]


def test_threshold_takes_exactly_k_even_on_tied_keys():
    keys = np.array([5, 3, 3, 3, 9], np.uint64)
    ords = np.array([1, 4, 2, 3, 0], np.uint64)
    assert threshold(keys, ords, 2) == (3, 3)  # (3,2), (3,3): ties broken by ordinal
    assert threshold(keys, ords, 0) is None and threshold(keys, ords, 5) == ALL


def test_whole_prompts_never_split_a_prompt():
    t = pa.table({"id": list("aaabbbbccd"), "prompt_hash": ["h"] * 10, "x": list(range(10))})
    pieces = [t.slice(i, 3) for i in range(0, 10, 3)]
    out = list(whole_prompts(pieces, ("id", "prompt_hash"), rows=2))
    assert [p.column("id").to_pylist() for p in out] == [list("aaa"), list("bbbb"), list("cc"), list("d")]
    assert pa.concat_tables(out).equals(t)


def test_marks_cap_per_prompt_by_seeded_key_after_the_filters():
    table = rows("a", APPLES[:2], 4, outcome=lambda i, k: "no_answer" if k == 0 else None)
    spec = SourceSpec(name="a", dataset="x", max_per_prompt=2)
    m = mark(table, 0, 0, 0, spec, seed=0)
    assert m.status.tolist().count(OUTCOME) == 2 and m.status.tolist().count(CAPPED) == 2
    for start in (0, 4):  # in each prompt the two eligible samples have the smallest keys among the three accepted
        ok = [i for i in range(start + 1, start + 4)]
        kept = [i for i in ok if m.status[i] == ELIGIBLE]
        assert sorted(ok, key=lambda i: m.key[i])[:2] == sorted(kept, key=lambda i: m.key[i])
    assert mark(table, 0, 0, 0, spec, seed=1).key.tolist() != m.key.tolist()


def test_the_plan_joins_a_prompt_split_across_blocks():
    plan = Plan(1)
    block = pa.table({"status": np.zeros(4, np.uint8), "key": np.arange(4, dtype=np.uint64),
                      "ordinal": np.arange(4, dtype=np.uint64), "prompt": np.array([0, 0, 0, 0], np.uint64),
                      "near": np.ones(4, np.uint64), "exact": np.ones(4, np.uint64), "contaminated": np.zeros(4, bool)})
    plan.add(block.slice(0, 3))
    plan.add(block.slice(3))
    cfg = config(Path("/nonexistent"), [{"name": "s", "dataset": "x"}])
    decision = plan.decide(cfg)
    assert decision.report[0]["removed"]["duplicate"] == 0 and decision.selected == [4]
    assert decision.report[0]["prompts_read"] == 1 and decision.report[0]["prompts_selected"] == 1


def test_rerunning_the_same_mix_publishes_nothing_new_and_an_edited_one_a_new_version(tmp_path, two_sources):
    a, b, bench = two_sources
    first = manifest(mix(r1_mix(tmp_path, a, b, bench)))
    storage = Storage(str(tmp_path / "mix"))
    before = {p: os.stat(storage.path(p)).st_mtime_ns for p in ("README.md", "_manifest.json")}
    sample_file = Path(a) / manifest(a)["files"]["samples"][0]
    sample_file.rename(sample_file.with_suffix(".away"))  # an unchanged mix does not even read its sources
    again = manifest(mix(r1_mix(tmp_path, a, b, bench)))
    sample_file.with_suffix(".away").rename(sample_file)
    assert again == first and before == {p: os.stat(storage.path(p)).st_mtime_ns for p in before}
    edited = manifest(mix(r1_mix(tmp_path, a, b, bench, total=16)))
    assert edited["seq"] == first["seq"] + 1 and edited["stats"]["samples"] == 16


def test_a_source_is_read_at_its_pinned_version(tmp_path, two_sources):
    a, b, bench = two_sources
    v1 = manifest(a)["version"]
    fenced = held(Storage(a), "republish")
    run_publish(fenced, rows_per_file=7)  # a second version of A (same samples, other data files)
    fenced.lease.release()
    assert manifest(a)["version"] != v1
    cfg = config(tmp_path, [{"name": "a", "dataset": a, "version": v1, "count": 3}])
    assert manifest(mix(cfg))["sources"][0]["version"] == v1
    with pytest.raises(ConfigError, match="not .or no longer. kept"):
        mix(config(tmp_path, [{"name": "a", "dataset": a, "version": "v000099-x"}], "other"))


def test_outputs_that_are_not_the_mixes_own_are_refused(tmp_path, two_sources):
    a, b, bench = two_sources
    with pytest.raises(ConfigError, match="overlap"):
        mix(config(tmp_path, [{"name": "a", "dataset": a}], "a"))
    Storage(str(tmp_path / "generated")).claim("dataset")  # what `generate` marks as its own
    with pytest.raises(NotOwned, match="holds a dataset output, not a mix"):
        mix(config(tmp_path, [{"name": "a", "dataset": a}], "generated"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(NotOwned):
        mix(config(tmp_path, [{"name": "a", "dataset": a}], "foreign"))
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="no _manifest.json"):
        mix(config(tmp_path, [{"name": "x", "dataset": str(tmp_path / "foreign")}], "m"))


def test_a_mix_that_selects_nothing_publishes_nothing(tmp_path, two_sources):
    a, b, bench = two_sources
    with pytest.raises(MixError, match="selects no sample"):
        mix(config(tmp_path, [{"name": "a", "dataset": a, "filter": {"domains": ["code"]}}]))
    assert not Storage(str(tmp_path / "mix")).exists("_manifest.json")


def test_mix_files_are_typed_and_unknown_keys_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output: out\nsources:\n  - {name: a, dataset: x, wieght: 2}\n")
    with pytest.raises(ConfigError, match=r"sources\.0\.wieght: unknown key; did you mean 'weight'\?"):
        load_mix(bad)
    for body, problem in (("{name: a, dataset: x, weight: 1, count: 2}", "a count or a weight"),
                          ("{name: a, dataset: x, filter: {reasons: [acepted]}}", "unknown outcomes"),
                          ("{name: 'a b', dataset: x}", "letters, digits")):
        bad.write_text(f"output: out\nsources:\n  - {body}\n")
        with pytest.raises(ConfigError, match=problem):
            load_mix(bad)
    bad.write_text("output: out\ntotal: 5\nsources:\n  - {name: a, dataset: x, count: 2}\n")
    with pytest.raises(ConfigError, match="needs at least one source with a `weight`"):
        load_mix(bad)
    good = tmp_path / "good.yaml"
    good.write_text("output: out\nsources:\n  - {name: a, dataset: data/a}\n")
    cfg = load_mix(good, output="elsewhere")
    assert cfg.output == str(Path.cwd() / "elsewhere") and cfg.sources[0].dataset == str(Path.cwd() / "data/a")


def test_shipped_mixes_and_jobs_validate_and_r1_style_keeps_r1s_proportions():
    cfg = load_mix(REPO_ROOT / "mixes" / "r1-style.yaml")
    specs = {s.name: s for s in cfg.sources}
    reasoning = sum(quotas(cfg.sources, [10**7] * len(cfg.sources), cfg.total)[i]
                    for i, s in enumerate(cfg.sources) if s.name != "general")
    assert (reasoning, cfg.total - reasoning) == (600_000, 200_000) and "general" in specs
    for name in ("r1-distill-qwen-7b-math", "r1-distill-qwen-7b-code", "r1-distill-qwen-7b-general"):
        job = load_job(REPO_ROOT / "jobs" / f"{name}.yaml")
        assert job.model.reasoning
    general = load_job(REPO_ROOT / "jobs" / "r1-distill-qwen-7b-general.yaml")
    assert not general.think_prefill and general.render.max_reasoning_words == 0 and general.judge.enabled
    assert set(general.verify.domains) == {"general"} and "general" in general.judge.domains


def test_the_cli_mixes_and_refuses_a_bad_mix_file_in_one_line(tmp_path, two_sources):
    a, b, bench = two_sources
    spec = r1_mix(tmp_path, a, b, bench).model_dump(mode="json")
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump({**spec, "output": "ignored"}))
    bad.write_text(yaml.safe_dump({**spec, "totl": 3}))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    def run(f: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pipeline", "mix", str(f), *args], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=300)

    done = run(good, "--output", str(tmp_path / "cli"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == str(tmp_path / "cli") and len(data_rows(str(tmp_path / "cli"))) == 20
    refused = run(bad)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"error: {bad}: totl: unknown key; did you mean 'total'?"]


@pytest.mark.slow
def test_sources_and_output_on_s3(tmp_path, two_sources, bucket):
    import fsspec

    a, b, bench = two_sources
    fs = fsspec.filesystem("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for local, name in ((a, "a"), (b, "b")):
        fs.put(local, f"{bucket}/datasets/{name}", recursive=True)
    local = mix(r1_mix(tmp_path, a, b, bench))
    remote = mix(r1_mix(tmp_path, f"s3://{bucket}/datasets/a", f"s3://{bucket}/datasets/b", bench).model_copy(
        update={"output": f"s3://{bucket}/mixes/r1"}))
    assert remote == f"s3://{bucket}/mixes/r1"
    assert data_digests(remote) == data_digests(local)
    assert [s["selected"] for s in manifest(remote)["sources"]] == [12, 8]


@pytest.mark.parametrize("most,completion,reasoning", [
    (None, "<think>\nlet me see, hello back\n</think>\n\nHello!", "let me see, hello back"),
    (0, "<think>\nlet me see, hello back\n</think>\n\nHello!", None),
    (8, "<think>\nlet me see, hello back\n</think>\n\nHello!", "let me see, hello back"),
    (3, "<think>\nlet me see, hello back\n</think>\n\nHello!", None),
    (8, "<think>\n\n</think>\n\nHello!", None),  # an empty think block is no reasoning to keep
    (0, "<think>\nstill thinking", "still thinking"),  # unclosed: kept, so `truncated` rejects it
])
def test_non_reasoning_samples_keep_no_reasoning_or_a_short_one(most, completion, reasoning):
    from pipeline.check import Checker
    from pipeline.publish import to_training_rows

    job = load_job(None, render={"think_prefill": False, "max_reasoning_words": most},
                   verify={"domains": {"general": {"name": "accept"}}}, filters=[{"name": "truncated"}])
    checker = Checker(job)
    sample = checker.parse({"id": "p", "prompt": "Hi", "domain": "general", "completion": completion,
                            "finish_reason": "stop"})
    assert sample["reasoning"] == reasoning
    (verdict,) = checker([sample])
    assert verdict.ok == (sample["final"] is not None)
    if verdict.ok:
        table = pa.Table.from_pylist([{**sample, "accepted": True}])
        content = to_training_rows(table).to_pylist()[0]["messages"][1]["content"]
        assert content == ("Hello!" if reasoning is None else f"<think>\n{reasoning}\n</think>\n\nHello!")
    checker.close()


# -- with datasets the real pipeline generated (vLLM on CPU, Ray) ----------------------------------

GENERAL = ["Say hello to a new colleague.", "Name a colour of the sky.", "Write one word about rain.",
           "Give a greeting for the morning.", "Name a fruit that is yellow.", "Say something kind.",
           "Name an animal that can fly.", "Write a word that rhymes with cat."]
OTHERS = [GENERAL[0], GENERAL[1], "WRITE one word, about rain!", f"Explain this: {FOX}",
          "Name a small bird.", "Say thanks to a friend.", "Name a cold drink.", "Write a word about snow."]


def _generate(tmp: Path, name: str, prompts: list[str]) -> str:
    from conftest import write_shard
    from pipeline.run import generate

    write_shard(tmp / f"{name}-prompts" / "p-0.parquet",
                [{"id": f"{name}{i}", "prompt": p, "domain": "general"} for i, p in enumerate(prompts)])
    job = load_job(REPO_ROOT / "jobs" / "demo.yaml", name=f"gen-{name}", output=str(tmp / name),
                   shards=[str(tmp / f"{name}-prompts" / "*.parquet")],
                   sampling={"n": 2, "temperature": 0.6, "top_p": 0.95, "max_tokens": 24, "seed": 7},
                   filters=[], verify={"domains": {"general": {"name": "accept"}}},
                   select={"dedup_completions": False})  # every sample accepted: the counts below are exact
    return generate(job)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory, model_dir: Path):
    """Two datasets published by `generate`: A (8 prompts x 2) and B (8 x 2) with two of A's prompts,
    a near copy of a third and a contaminated one; and the benchmark file."""
    import ray

    tmp = tmp_path_factory.mktemp("generated")
    ours = not ray.is_initialized()
    a, b = _generate(tmp, "a", GENERAL), _generate(tmp, "b", OTHERS)
    bench = tmp / "bench.jsonl"
    bench.write_text(json.dumps({"question": f"Yesterday {FOX}"}) + "\n")
    yield a, b, str(bench)
    if ours:
        ray.shutdown()


def real_mix(out: Path, a: str, b: str, bench: str, total: int = 12, actors: int = 1) -> Path:
    """A: 6 samples, at most one per prompt; B: the rest of `total` by weight."""
    spec = {"name": "real", "output": str(out), "total": total, "decontaminate": [bench],
            "resources": {"actors": actors, "actor_cpus": 0.5},
            "sources": [{"name": "a", "dataset": a, "count": 6, "max_per_prompt": 1},
                        {"name": "b", "dataset": b, "weight": 1}]}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def data_digests(uri: str) -> list[str]:
    return [hashlib.sha256(Storage(uri).read_bytes(rel)).hexdigest() for rel in manifest(uri)["files"]["data"]]


@pytest.mark.slow
def test_a_mix_of_generated_datasets_on_ray_is_exact_deterministic_and_traceable(tmp_path, generated):
    a, b, bench = generated
    assert manifest(a)["stats"]["accepted"] == manifest(b)["stats"]["accepted"] == 16
    one = mix(load_mix(real_mix(tmp_path / "one", a, b, bench)))
    src = by_source(one)
    assert (src["a"]["removed"]["capped"], src["a"]["available"], src["a"]["selected"]) == (8, 8, 6)
    assert src["b"]["removed"] == {"outcome": 0, "domain": 0, "completion_tokens": 0, "pass_rate": 0, "capped": 0,
                                       "contaminated": 2, "duplicate": 4, "near_duplicate": 2, "not_selected": 2}
    assert (src["b"]["available"], src["b"]["selected"]) == (8, 6)
    rows_ = data_rows(one)
    assert len(rows_) == 12 and len({r["id"] for r in rows_ if r["id"].startswith("a")}) == 6
    assert not {"b0", "b1", "b2", "b3"} & {r["id"] for r in rows_}
    assert all(r["model"] == "SmolLM2-135M-Instruct" and r["messages"][1]["content"] for r in rows_)
    # the same mix again, on Ray and in one process: the same data files, byte for byte
    two = mix(load_mix(real_mix(tmp_path / "two", a, b, bench)))
    local = mix(load_mix(real_mix(tmp_path / "local", a, b, bench, actors=0)))
    assert data_digests(one) == data_digests(two) == data_digests(local)
    card = Storage(one).read_bytes("README.md").decode()
    for name, dataset in (("a", a), ("b", b)):
        m = manifest(dataset)
        line = next(li for li in card.splitlines() if li.startswith(f"| {name} |"))
        assert all(str(v) in line for v in (m["run_id"], m["version"], m["model"], m["fingerprint"]["generation"]))
        assert line.endswith(f"| {src[name]['selected']} | {src[name]['prompts_selected']} |")


@pytest.mark.slow
def test_a_mix_killed_mid_publish_then_rerun_publishes_one_whole_version(tmp_path, generated):
    a, b, bench = generated
    out = tmp_path / "out"
    first = manifest(mix(load_mix(real_mix(out, a, b, bench, total=10, actors=0))))
    storage = Storage(str(out))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pipeline", "mix", str(real_mix(out, a, b, bench, total=12))]
    log = tmp_path / "killed.log"
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(log, "wb"))
    try:
        deadline = time.time() + 600
        pending: list[str] = []
        written: list[str] = []
        while time.time() < deadline and not written:  # the event: the new version has its first samples file
            assert proc.poll() is None, log.read_text()[-3000:]
            pending = pending or [p for p in storage.list("_pipeline/versions") if "pending-" in p]
            written = storage.list(f"samples/{pending[0].rsplit('pending-', 1)[1][:-5]}") if pending else []
            time.sleep(0.01)
        assert written, "the mix never began to write its version"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its local Ray cluster
        except ProcessLookupError:
            pass
    version = pending[0].rsplit("pending-", 1)[1][:-5]
    assert manifest(str(out)) == first  # readers still see the first version, whole
    assert len(data_rows(str(out))) == 10
    rerun = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    second = manifest(str(out))
    assert second["seq"] == first["seq"] + 1 and second["stats"]["samples"] == 12
    assert [p for p in storage.list("_pipeline/versions") if "pending-" in p] == []
    assert all(storage.list(f"{kind}/{version}") == [] for kind in ("data", "samples", "plots"))
    keys = [(r["mix_source"], r["id"], r["sample_index"]) for r in sample_rows(str(out))]
    assert len(keys) == len(set(keys)) == 12
    assert sorted((r["id"], r["sample_index"]) for r in data_rows(str(out))) == sorted(k[1:] for k in keys)
    clean = mix(load_mix(real_mix(tmp_path / "clean", a, b, bench, total=12, actors=0)))
    assert data_digests(str(out)) == data_digests(clean)  # the same rows as a run never killed
