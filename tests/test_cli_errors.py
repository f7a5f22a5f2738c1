"""Errors a user can act on, as the CLI prints them: one line on stderr, no traceback; exit 2 for a
user error (job, input, storage), exit 1 for a run that could not finish; S3 errors name the URI and
never a credential; `submit` resumes with a fresh id and refuses a twin that is still running."""

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pipeline.cli import app, running_twin
from pipeline.config import REPO_ROOT
from pipeline.errors import RunFailed


def pipeline(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def one_error_line(proc, code=2):
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if " INFO " not in line and " WARNING " not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    job = tmp_path / "bad.yaml"
    job.write_text("name: x\nsampling:\n  n: 2\n   temperature: 0.5\n")
    line = one_error_line(pipeline("generate", "--job", job))
    assert line.startswith(f"error: {job}:4:") and "YAML syntax error" in line


@pytest.mark.parametrize("args, message", [
    (["--set", "sampling.n=null"], "sampling.n must be an integer >= 1, got None (from --set sampling.n)"),
    (["--set", "resourcs.engine_actors=1"], "resourcs: unknown key; did you mean 'resources'? (from --set resourcs.engine_actors)"),
    (["--set", "resources.engine_actrs=2"], "resources.engine_actrs: unknown key; did you mean 'engine_actors'? (from --set"),
    (["--set", "sampling.n=["], "--set sampling.n=[: not a YAML value"),
    (["--set", "filters=[{name: repetitions}]"], "filters[0]: unknown filter 'repetitions'"),
    (["--set", "engine.kwargs.max_num_batched_token=8192"], "did you mean 'max_num_batched_tokens'?"),
    (["--set", "model.path=models/mine", "--set", "sampling.temperature=0.5"], "model.path: 'models/mine' is not a folder"),
    (["--shards", "nowhere/*.parquet"], "nowhere/*.parquet: no such shard"),
])
def test_user_errors_in_generate_are_one_line_exit_2_before_ray(tmp_path, args, message):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    line = one_error_line(pipeline("generate", "--job", "jobs/demo.yaml", "--output", tmp_path / "out", *args, env=env))
    assert message in line


def test_a_run_failure_says_what_to_do_and_exits_1(monkeypatch, tmp_path):
    import pipeline.run

    def fail(job, new_version=False):
        raise RunFailed("shards incomplete after the run: s3://b/p/a.parquet; rerun the same command to finish them")

    monkeypatch.setattr(pipeline.run, "generate", fail)
    result = CliRunner().invoke(app, ["generate", "--job", str(REPO_ROOT / "jobs" / "demo.yaml"), "--output", str(tmp_path)])
    assert result.exit_code == 1 and result.exception is not None and isinstance(result.exception, SystemExit)
    assert result.output.strip() == "error: shards incomplete after the run: s3://b/p/a.parquet; rerun the same command to finish them"


def test_submit_refuses_only_a_twin_that_is_pending_or_running():
    from ray.job_submission import JobDetails, JobStatus, JobType

    def job(sid, status, job_hash):
        return JobDetails(type=JobType.SUBMISSION, submission_id=sid, status=status, entrypoint="python -m pipeline generate",
                          metadata={"distill_job_hash": job_hash})

    done = [job("distill-demo-abc-1", JobStatus.FAILED, "abc"), job("distill-demo-abc-2", JobStatus.STOPPED, "abc"),
            job("distill-demo-abc-3", JobStatus.SUCCEEDED, "abc"), job("distill-demo-def-1", JobStatus.RUNNING, "def")]
    assert running_twin(done, "abc") is None  # a rerun after a failure resumes
    for status in (JobStatus.PENDING, JobStatus.RUNNING):
        twin = job("distill-demo-abc-4", status, "abc")
        assert running_twin([*done, twin], "abc") is twin


def test_submit_to_an_unreachable_cluster_is_one_line(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:9"}
    line = one_error_line(pipeline("submit", "--job", "jobs/demo.yaml", "--output", tmp_path / "out", env=env))
    assert line.startswith("error: cannot list the jobs of the Ray cluster at RAY_ADDRESS=http://127.0.0.1:9")


# -- S3: missing credentials, wrong secret, no such bucket -------------------------------------------
def s3_env(s3, **changes):
    env = {**os.environ, **s3, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
           "AWS_EC2_METADATA_DISABLED": "true", **changes}
    return {k: v for k, v in env.items() if v is not None}


@pytest.mark.slow
@pytest.mark.parametrize("side, case", [("read", "no credentials"), ("read", "wrong secret"), ("read", "no bucket"),
                                        ("write", "no credentials"), ("write", "wrong secret")])
def test_s3_error_names_uri_not_secret(s3, bucket, tmp_path, case, side):
    """(Writing to a missing bucket is not here: SeaweedFS creates it, where AWS answers NoSuchBucket.)"""
    import boto3

    boto3.client("s3").put_object(Bucket=bucket, Key="src/a.jsonl", Body=b'{"question": "2+2?", "answer": "#### 4"}\n')
    local = tmp_path / "a.jsonl"
    local.write_text('{"question": "2+2?", "answer": "#### 4"}\n')
    secret = "wrong-secret-value-0123456789"
    env = {"no credentials": s3_env(s3, AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None),
           "wrong secret": s3_env(s3, AWS_SECRET_ACCESS_KEY=secret), "no bucket": s3_env(s3)}[case]
    where = f"s3://{'no-such-bucket-here' if case == 'no bucket' else bucket}"
    uri = f"{where}/src/a.jsonl" if side == "read" else f"{where}/out"
    args = [uri, tmp_path / "out"] if side == "read" else [local, uri]
    proc = pipeline("prepare", *args, "--format", "gsm8k", env=env)
    line = one_error_line(proc)
    assert uri in line or where in line, line
    expected = {"no credentials": "no S3 credentials found", "wrong secret": "access denied", "no bucket": "not found"}[case]
    assert expected in line, line
    assert secret not in proc.stderr and s3["AWS_SECRET_ACCESS_KEY"] not in proc.stderr


@pytest.mark.slow
def test_generate_with_no_s3_credentials_is_one_line_naming_the_output(s3, bucket, tmp_path, model_dir):
    env = s3_env(s3, AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None)
    line = one_error_line(pipeline("generate", "--job", "jobs/demo.yaml", "--output", f"s3://{bucket}/out", env=env))
    assert f"s3://{bucket}/out" in line and "no S3 credentials found" in line
