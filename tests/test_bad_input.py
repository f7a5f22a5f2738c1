"""The bad-input corpus: every case fails before GPU work naming file/row/column (or the job key),
or gets a per-row reason. The job-level cases go through the real pre-flight, `pipeline.preflight`."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import PROMPT_SCHEMA, write_shard
from pipeline.commits import Committed
from pipeline.config import REPO_ROOT, ConfigError, load_job
from pipeline.read import InputError, resolve, scan_prompts, unified_schema
from pipeline.render import Renderer
from pipeline.storage import Storage


def validate_shards(*patterns):
    """What generate does with its shards before any GPU work: resolve, read footers, scan ids."""
    fs, shards = resolve([str(p) for p in patterns])
    scan_prompts(fs, shards)
    return shards


def test_missing_shard(tmp_path):
    with pytest.raises(InputError, match="nope.parquet: no such shard"):
        validate_shards(tmp_path / "nope.parquet")
    with pytest.raises(InputError, match="no such shard"):
        validate_shards(tmp_path / "*.parquet")


def test_empty_shard_is_valid_and_has_no_rows(tmp_path):
    (s,) = validate_shards(write_shard(tmp_path / "empty.parquet", []))
    assert s.rows == 0


def test_corrupt_parquet(tmp_path):
    p = tmp_path / "corrupt.parquet"
    good = write_shard(tmp_path / "good.parquet", [{"id": "a", "prompt": "x"}])
    p.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(InputError, match="corrupt.parquet: not a readable Parquet file"):
        validate_shards(p)


def test_missing_column_and_wrong_type(tmp_path):
    p = tmp_path / "missing.parquet"
    pq.write_table(pa.table({"id": ["a"], "domain": ["math"]}), p)
    with pytest.raises(InputError, match="missing.parquet: missing required column 'prompt'"):
        validate_shards(p)
    q = tmp_path / "wrongtype.parquet"
    pq.write_table(pa.table({"id": [1], "prompt": ["x"], "domain": ["math"]}), q)
    with pytest.raises(InputError, match="wrongtype.parquet: column 'id' has type int64, expected string"):
        validate_shards(q)


def test_binary_prompt_column_is_rejected(tmp_path):
    p = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": pa.array([b"\xff\xfe bad"], pa.binary()), "domain": ["math"]}), p)
    with pytest.raises(InputError, match="column 'prompt' has type binary"):
        validate_shards(p)


def test_all_null_column_with_arrow_null_type_reads_as_strings(tmp_path):
    a = write_shard(tmp_path / "a.parquet", [{"id": "a", "prompt": "x", "answer": "1"}])
    b = tmp_path / "b.parquet"
    pq.write_table(pa.table({"id": ["b"], "prompt": ["y"], "domain": ["math"], "answer": pa.array([None], pa.null())}), b)
    shards = validate_shards(a, b)
    assert unified_schema(shards).field("answer").type == pa.string()


def test_duplicate_ids_across_shards(tmp_path):
    a = write_shard(tmp_path / "a.parquet", [{"id": "p1", "prompt": "x"}])
    b = write_shard(tmp_path / "b.parquet", [{"id": "p2", "prompt": "y"}, {"id": "p1", "prompt": "z"}])
    with pytest.raises(InputError, match=r"b.parquet: row 1: id 'p1' is also used by a different prompt in .*a.parquet"):
        validate_shards(a, b)


def test_null_id(tmp_path):
    p = write_shard(tmp_path / "a.parquet", [{"id": None, "prompt": "x"}])
    with pytest.raises(InputError, match="row 0: column 'id' is empty"):
        validate_shards(p)


def test_reserved_column(tmp_path):
    schema = PROMPT_SCHEMA.append(pa.field("completion", pa.string()))
    p = write_shard(tmp_path / "a.parquet", [{"id": "a", "prompt": "x", "completion": "y"}], schema)
    with pytest.raises(InputError, match="'completion' is reserved"):
        validate_shards(p)


class CharTokenizer:
    """Stands in for a tokenizer in the render unit: one token per character."""

    model_max_length = 2048

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, chat_template=None):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def __call__(self, text, add_special_tokens):
        return {"input_ids": [ord(c) % 50000 for c in text]}


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "", "domain": "math"}, "empty_prompt"),
        ({"prompt": "   \n", "domain": "math"}, "empty_prompt"),
        ({"prompt": "x" * 1_000_000, "domain": "math"}, "prompt_too_long"),
        ({"prompt": "What is 2+2?", "domain": "astrology"}, "unknown_domain"),
        ({"prompt": "What is 2+2?", "domain": "math"}, None),
        ({"prompt": "Sum two ints.", "domain": "math", "tests": "{not json"}, "bad_tests"),
        ({"prompt": "Sum two ints.", "domain": "math", "tests": "[1, 2]"}, "bad_tests"),
        ({"prompt": "Sum two ints.", "domain": "code", "tests": '{"kind": "stdio", "cases": []}'}, "bad_tests"),
        ({"prompt": "Sum two ints.", "domain": "code", "tests": '{"kind": "assert", "code": "assert f()", "timeout": 1}'}, "bad_tests"),
        ({"prompt": "Sum two ints.", "domain": "code", "tests": '{"kind": "stdio", "cases": [{"stdin": "1 2", "stdout": "3"}]}'}, None),
    ],
)
def test_row_level_problems_become_reasons(row, reason):
    renderer = Renderer(CharTokenizer(), load_job(None, engine={"max_model_len": 4096}))
    assert renderer(row).reject_reason == reason


def test_render_applies_r1_rules():
    job = load_job(None, model={"path": "m", "reasoning": True})
    r = Renderer(CharTokenizer(), job)({"prompt": "What is 2+2?", "domain": "math"})
    assert r.text == "<user>What is 2+2?\nPlease reason step by step, and put your final answer within \\boxed{}.<assistant><think>\n"
    assert "<system>" not in r.text


@pytest.mark.slow
def test_denied_access_is_a_clear_error_without_the_secret(s3, bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-123456")
    with pytest.raises(OSError, match=f"output s3://{bucket}/out is not writable") as e:
        Storage(f"s3://{bucket}/out").check_writable()
    assert "wrong-secret-value" not in str(e.value) and s3["AWS_SECRET_ACCESS_KEY"] not in str(e.value)


def test_duplicate_and_contaminated_prompts_are_flagged_before_generation(tmp_path):
    from pipeline.ngrams import Contamination

    a = write_shard(tmp_path / "a.parquet", [{"id": "1", "prompt": "What is 2+2?"}, {"id": "2", "prompt": "Find all real x with x^2 - 5x + 6 = 0 and sum them."}])
    b = write_shard(tmp_path / "b.parquet", [{"id": "3", "prompt": "what is 2 + 2"}, {"id": "4", "prompt": "What is 3+3?"}])
    fs, shards = resolve([str(a), str(b)])
    bench = Contamination(["Find all real x with x^2 - 5x + 6 = 0 and sum them."], n=8)
    assert scan_prompts(fs, shards, Committed(), True, bench).flagged == {"2": "contaminated", "3": "duplicate"}
    assert scan_prompts(fs, shards, Committed(), False, None).flagged == {}
    renderer = Renderer(CharTokenizer(), load_job(None), {"3": "duplicate"})
    assert renderer({"id": "3", "prompt": "what is 2 + 2", "domain": "math"}).reject_reason == "duplicate"


def test_shards_stream_in_blocks_in_one_schema(tmp_path):
    """The generate/curate reader: blocks of at most `rows` rows, columns a shard lacks come back null."""
    import fsspec

    from pipeline.read import iter_shard

    pq.write_table(pa.table({"id": [f"a{i}" for i in range(5)], "prompt": ["p"] * 5, "domain": ["math"] * 5}),
                   tmp_path / "a.parquet", row_group_size=2)
    pq.write_table(pa.table({"id": ["b0"], "prompt": ["q"], "domain": ["code"], "tests": ['{"kind": "assert", "code": ""}']}),
                   tmp_path / "b.parquet")
    fs, shards = resolve([str(tmp_path / "*.parquet")])
    schema = unified_schema(shards)
    local = fsspec.filesystem("file")
    blocks = list(iter_shard(local, shards[0].path, schema, rows=2, skip=frozenset({"a1"})))
    assert [b.num_rows for b in blocks] == [1, 2, 1]  # a1 skipped (already done)
    assert all(b.schema.names == [*schema.names, "prompt_hash"] for b in blocks)
    assert blocks[0].column("tests").to_pylist() == [None]
    assert [len(h) for b in blocks for h in b.column("prompt_hash").to_pylist()] == [24] * 4


# -- the job-level pre-flight (pipeline/preflight.py): what used to fail inside Ray actors -----------
def demo_job(monkeypatch, **overrides):
    """The demo job as `make generate` loads it (relative paths from the repo root), with overrides."""
    monkeypatch.chdir(REPO_ROOT)
    sets = {k: v for k, v in overrides.items() if "." in k}
    return load_job(REPO_ROOT / "jobs" / "demo.yaml", sets, **{k: v for k, v in overrides.items() if "." not in k})


def preflight_error(job):
    from pipeline.preflight import preflight

    with pytest.raises(ConfigError) as e:
        preflight(job)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_preflight_accepts_the_demo_job(monkeypatch, model_dir):
    from pipeline.preflight import preflight

    preflight(demo_job(monkeypatch))


@pytest.mark.parametrize("path, message", [
    ("/nonexistent/model", "model.path: model not found: /nonexistent/model"),
    ("./models/missing", f"model.path: model not found: {REPO_ROOT}/models/missing"),
    ("models/a/b", f"model.path: model not found: models/a/b (relative to {REPO_ROOT})"),
    ("schemas", f"model.path: {REPO_ROOT}/schemas has no config.json"),
])
def test_preflight_model_paths_relative_or_absolute(monkeypatch, path, message):
    assert preflight_error(demo_job(monkeypatch, **{"model.path": path})).startswith(message)


def test_preflight_hub_ids_without_a_local_folder(monkeypatch):
    from huggingface_hub import constants

    job = demo_job(monkeypatch, **{"model.path": "models/mine"})  # relative and missing: looks like a Hub id
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    msg = preflight_error(job)
    assert msg.startswith(f"model.path: 'models/mine' is not a folder (relative to {REPO_ROOT}) and not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE is set" in msg
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no Hub access
    assert "and the Hub cannot be reached to fetch it" in preflight_error(job)


def test_preflight_loads_the_tokenizer_and_renders_the_chat_template(monkeypatch, model_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(model_dir / "config.json", bare / "config.json")  # a model folder without tokenizer files
    assert preflight_error(demo_job(monkeypatch, **{"model.path": str(bare)})).startswith(f"model.path: cannot load a tokenizer from {bare}")
    assert preflight_error(demo_job(monkeypatch, **{"render.chat_template": "{% for m in messages %}{{ m.content }"})).startswith(
        "render.chat_template: line 1:")
    msg = preflight_error(demo_job(monkeypatch, **{"render.chat_template": "{{ raise_exception('no system role') }}"}))
    assert msg.startswith("model.path: the chat template cannot render a prompt (no system role)")


@pytest.mark.parametrize("sets, message", [
    ({"sampling.temprature": 0.5}, "sampling.temprature: not an argument of vllm.SamplingParams; did you mean 'temperature'?"),
    ({"sampling.top_p": 5}, "sampling: top_p must be in (0, 1], got 5"),
    ({"sampling.max_tokens": 0}, "sampling: max_tokens must be at least 1"),
    ({"sampling.seed": "abc"}, "sampling.seed: must be an integer"),
    ({"sampling.output_kind": 2}, "sampling.output_kind: set by the pipeline"),
    ({"engine.kwargs.max_num_batched_token": 8192}, "engine.kwargs.max_num_batched_token: not a vLLM engine argument; did you mean 'max_num_batched_tokens'?"),
    ({"engine.kwargs.max_num_seqs": "lots"}, "engine.kwargs.max_num_seqs: 'lots' is not valid"),

    ({"engine.dtype": "float33"}, "engine.dtype: 'float33' is not valid"),
    ({"filters": [{"name": "repetitions"}]}, "filters[0]: unknown filter 'repetitions'"),
    ({"filters": [{"name": "long_paragraph", "params": {"max_wrds": 3}}]},
     "filters[0]: filter 'long_paragraph': unknown parameter 'max_wrds'; did you mean 'max_words'?"),
    ({"filters": [{"name": "long_paragraph", "params": {"max_words": "400"}}]},
     "filters[0]: filter 'long_paragraph': parameter max_words='400' is not of type int"),
    ({"verify.domains.math": {"name": "math", "params": {"float_rounding": 2.5}}},
     "verify.domains.math: verifier 'math': parameter float_rounding=2.5 is not of type int"),
    ({"verify.domains.code": {"name": "sandboxed"}}, "verify.domains.code: unknown verifier 'sandboxed'"),
    ({"verify.domains.maths": {"name": "math"}}, "verify.domains: 'maths' is not a domain (one of math, code, choice, general); did you mean 'math'?"),
    ({"judge.enabled": True, "judge.sampling": {"temperature": -1}}, "judge.sampling: temperature must be non-negative"),
    ({"judge.enabled": True, "judge.prompt": "Grade {answr}"}, "judge.prompt: cannot fill the template (KeyError: 'answr')"),
    ({"judge.enabled": True, "judge.reasons": ["answer_mismatch", "wrong"]}, "judge.reasons: 'wrong' is not a reason code"),
    ({"judge.enabled": True, "judge.engine": {"kwargs": {"enable_prefix_cachin": True}}},
     "judge.engine.kwargs.enable_prefix_cachin: not a vLLM engine argument; did you mean 'enable_prefix_caching'?"),
])
def test_preflight_checks_units_sampling_and_engine_arguments_before_ray(monkeypatch, sets, message):
    top = {k: v for k, v in sets.items() if "." not in k}
    job = demo_job(monkeypatch, **{k: v for k, v in sets.items() if "." in k}, **top)
    assert preflight_error(job).startswith(message)


def test_the_model_is_not_an_engine_keyword():
    with pytest.raises(ConfigError, match=r"engine.kwargs: .*set model.path instead of engine.kwargs.model"):
        load_job(None, {"engine.kwargs.model": "x"})


def test_sampling_n_null_is_a_config_error():
    with pytest.raises(ConfigError, match=r"sampling.n must be an integer >= 1, got None"):
        load_job(None, {"sampling.n": None})
    with pytest.raises(ConfigError, match=r"sampling.n must be an integer >= 1, got 2.5"):
        load_job(None, {"sampling.n": 2.5})
