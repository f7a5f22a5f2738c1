"""One configuration per dataset: what the fingerprint covers, and reruns with another one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.config import REPO_ROOT, ConfigError, load_job
from pipeline.fingerprint import differences, digest, generation_doc, publish_doc
from pipeline.run import HEAD, adopt_configuration
from pipeline.storage import Fenced, Lease, Storage


def job(**sets):
    return load_job(REPO_ROOT / "jobs" / "demo.yaml", sets)


def fp(j) -> str:
    return digest(generation_doc(j))


def test_what_changes_samples_changes_the_fingerprint_and_nothing_else_does():
    base = job()
    for key, value in [("sampling.temperature", 0.7), ("model.reasoning", True), ("engine.dtype", "bfloat16"),
                       ("engine.max_model_len", 1024), ("engine.kwargs.quantization", "fp8"),
                       ("render.system_prompt", "Be brief."), ("verify.timeout_s", 3),
                       ("prompts.dedup", False), ("filters", [{"name": "truncated"}])]:
        assert fp(job(**{key: value})) != fp(base), key
    for key, value in [("resources.engine_actors", 4), ("engine.gpu_memory_utilization", 0.5),
                       ("engine.tensor_parallel_size", 2), ("engine.kwargs.max_num_seqs", 512),
                       ("output", "/elsewhere"), ("lease_ttl_s", 60), ("name", "other"), ("commit.max_prompts", 5)]:
        assert fp(job(**{key: value})) == fp(base), key
    assert publish_doc(job(**{"select.keep_per_prompt": 1})) != publish_doc(base)


def test_the_model_is_known_by_its_files_not_its_path(tmp_path, model_dir):
    import shutil

    copy = tmp_path / "elsewhere" / model_dir.name  # the name is recorded in every sample: keep it
    shutil.copytree(model_dir, copy)
    assert fp(job(**{"model.path": str(copy)})) == fp(job(**{"model.path": str(model_dir)}))
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text().replace("{", "{ ", 1))
    assert fp(job(**{"model.path": str(copy)})) != fp(job(**{"model.path": str(model_dir)}))


def test_differences_name_dotted_keys():
    assert differences({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 1, "c": 5}, "e": 3}) == ["a.c", "d", "e"]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def output(request: pytest.FixtureRequest, tmp_path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "out"))
    return Storage(f"s3://{request.getfixturevalue('bucket')}/out")


def held(storage: Storage) -> Fenced:
    storage.claim("dataset")
    lease = Lease(storage, "att", 600)
    lease.acquire()
    return Fenced(storage, lease)


def test_a_rerun_with_another_configuration_is_refused_unless_a_new_version_is_asked(output):
    fenced = held(output)
    first = adopt_configuration(fenced, job(), new_version=False)
    assert adopt_configuration(fenced, job(), new_version=False) == first  # the same job: fine
    other = job(**{"sampling.temperature": 0.9, "sampling.top_p": 0.5})
    with pytest.raises(ConfigError, match=r"another configuration \(generation\.sampling\.temperature, "
                                          r"generation\.sampling\.top_p differ\).*--new-version"):
        adopt_configuration(fenced, other, new_version=False)
    assert fenced.storage.read_json(HEAD)["generation"] == first  # refused: nothing changed
    second = adopt_configuration(fenced, other, new_version=True)
    assert second != first and fenced.storage.read_json(HEAD)["generation"] == second
    with pytest.raises(ConfigError, match="another configuration"):  # the old one is now the other one
        adopt_configuration(fenced, job(), new_version=False)


def test_the_cli_refuses_a_foreign_output_and_another_configuration_in_one_line(tmp_path):
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    cmd = [sys.executable, "-m", "pipeline", "generate", "--shards", str(REPO_ROOT / "demo" / "shards" / "*.parquet")]
    proc = subprocess.run(cmd + ["--output", str(foreign)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "did not write" in proc.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    # shards inside the output folder
    inside = tmp_path / "ds"
    (inside / "prompts").mkdir(parents=True)
    import shutil

    for f in (REPO_ROOT / "demo" / "shards").glob("*.parquet"):
        shutil.copy(f, inside / "prompts")
    proc = subprocess.run([*cmd[:-1], str(inside / "prompts" / "*.parquet"), "--output", str(inside)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "inside the output" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in inside.iterdir()) == ["prompts"]
