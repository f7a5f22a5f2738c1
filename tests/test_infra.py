"""Cluster manifests parse, carry what KubeRay/Kubernetes need, and run a command the CLI accepts."""

import shlex
import subprocess
import sys

import typer.main
import yaml

from pipeline.cli import app
from pipeline.config import REPO_ROOT, load_job

INFRA = REPO_ROOT / "infra"


def docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def check_cli_command(command: str) -> None:
    """`python -m pipeline SUB --opt ...`: SUB exists, every option is one of SUB's, the job loads."""
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "pipeline"], argv
    group = typer.main.get_command(app)
    sub = group.commands[argv[3]]
    ctx = sub.make_context(argv[3], argv[4:], resilient_parsing=False)  # raises on unknown options
    assert ctx.params["job"], "the entrypoint must name a job spec"
    load_job(REPO_ROOT / ctx.params["job"])


def test_rayjob_manifest():
    (job,) = docs(INFRA / "k8s" / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    check_cli_command(spec["entrypoint"])
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    (workers,) = cluster["workerGroupSpecs"]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    # the job's engines fit the worker group
    run = load_job(REPO_ROOT / shlex.split(spec["entrypoint"])[5])
    gpus = workers["replicas"] * int(limits["nvidia.com/gpu"])
    assert run.resources.engine_actors * run.engine.tensor_parallel_size <= gpus
    # the code sandbox needs to create namespaces where the check stage runs
    assert "SYS_ADMIN" in workers["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]


def test_cronjob_forbids_overlap_and_has_rbac():
    kinds = {d["kind"]: d for d in docs(INFRA / "k8s" / "cronjob.yaml")}
    assert set(kinds) == {"ServiceAccount", "Role", "RoleBinding", "CronJob"}
    cron = kinds["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"]
    (rule,) = kinds["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and "rayjobs" in rule["resources"] and "create" in rule["verbs"]
    assert kinds["RoleBinding"]["roleRef"]["name"] == kinds["Role"]["metadata"]["name"]
    assert pod["containers"][0]["command"][-1] == "/manifests/rayjob.yaml"


def test_vm_cluster_config():
    (cfg,) = docs(INFRA / "ray" / "cluster.yaml")
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}


def test_dockerfile_pins_vllm_and_ray():
    text = (INFRA / "docker" / "Dockerfile.gpu").read_text()
    assert "FROM vllm/vllm-openai:v0.32.0" in text and '"ray[data,default]==2.60.0"' in text


def test_submit_ids_are_fresh_and_carry_the_job_hash():
    """Ray never reuses a submission id, so each submission gets a fresh one; the job's hash in the
    id and in the metadata is what a rerun checks for a twin still running (test_cli_errors.py)."""
    import json

    def dry(*args):
        out = subprocess.run([sys.executable, "-m", "pipeline", "submit", "--dry-run", *args], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        return shlex.split(out)

    a, b = dry("--shards", "s3://b/p/*.parquet"), dry("--shards", "s3://b/p/*.parquet")
    c = dry("--shards", "s3://b/q/*.parquet")
    sid = lambda cmd: cmd[cmd.index("--submission-id") + 1]  # noqa: E731
    meta = lambda cmd: json.loads(cmd[cmd.index("--metadata-json") + 1])  # noqa: E731
    assert sid(a) != sid(b) and meta(a) == meta(b) != meta(c)
    job_hash = meta(a)["distill_job_hash"]
    assert sid(a).startswith(f"distill-demo-{job_hash}-") and sid(b).startswith(f"distill-demo-{job_hash}-")
    entry = a[a.index("--") + 1:]
    assert entry[:4] == ["python", "-m", "pipeline", "generate"]
    check_cli_command(shlex.join(entry))
