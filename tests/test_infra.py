"""Cluster manifests: valid against pinned schemas (Kubernetes objects strictly, the KubeRay RayJob CRD of
v1.7.0, Ray's cluster-launcher schema), consistent with the image and the pins, and the job's plan fits
the node shapes they declare. The nightly submitter (infra/k8s/nightly.py) refuses a second run."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import typer.main
import yaml

from pipeline.cli import app
from pipeline.config import REPO_ROOT, JobConfig, load_job, parse_sets
from pipeline.run import check_fits

INFRA = REPO_ROOT / "infra"
CRD_SCHEMA = REPO_ROOT / "tests" / "data" / "kuberay-v1.7.0-rayjob.schema.json"
# The oldest Kubernetes the manifests claim (user namespaces on by default since 1.33) and the newest
# kubernetes-validate knows.
K8S_VERSIONS = ("1.33", kubernetes_validate.utils.latest_version())
IMAGE_WORKDIR = "/app"  # the image's WORKDIR: /app/jobs/... in an entrypoint is the repo's jobs/...
# vCPUs and GPUs of the instance types infra/ray/cluster.yaml uses (Ray detects them on the node).
INSTANCE_SHAPES = {"m7i.2xlarge": (8, 0), "g6e.4xlarge": (16, 1), "g6e.xlarge": (4, 1), "c7i.2xlarge": (8, 0)}
SANDBOX_NEEDS = {"unshare", "clone", "clone3", "mount", "umount2", "pivot_root", "setns"}


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def objects(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"].get("name") or d["metadata"].get("generateName")): d for d in docs(path)}


def rayjob() -> dict[str, Any]:
    (job,) = docs(INFRA / "k8s" / "rayjob.yaml")
    return job


def cron() -> dict[tuple[str, str], dict[str, Any]]:
    return objects(INFRA / "k8s" / "cronjob.yaml")


def vm_cluster() -> dict[str, Any]:
    (cfg,) = docs(INFRA / "ray" / "cluster.yaml")
    return cfg


def pod_templates(job: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    spec = job["spec"]
    yield "submitter", spec["submitterPodTemplate"]
    yield "head", spec["rayClusterSpec"]["headGroupSpec"]["template"]
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        yield group["groupName"], group["template"]


def worker_group(job: dict[str, Any], name: str) -> dict[str, Any]:
    return next(g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == name)


# --- schemas -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("manifest", ["k8s/cronjob.yaml", "k8s/seccomp-installer.yaml"])
def test_kubernetes_objects_validate_strictly(manifest, version):
    for obj in docs(INFRA / manifest):
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rayjob_pod_templates_validate_strictly_as_core_objects(version):
    """The CRD embeds Kubernetes' pod schema of the k8s.io/api KubeRay was built with; the pinned core
    schemas also catch fields that are misplaced or unknown to the clusters the manifests claim."""
    for name, template in pod_templates(rayjob()):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
        kubernetes_validate.validate(wrapped, version, strict=True)


def strict(schema: Any) -> Any:
    """The CRD schema as the API server applies it with field validation Strict (kubectl's default):
    unknown fields are errors, except where the schema preserves them."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(strict(json.loads(CRD_SCHEMA.read_text())))


def test_rayjob_validates_against_the_pinned_kuberay_crd():
    validator = crd_validator()
    job = rayjob()
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(job)]
    assert not errors, errors
    # the validator is not a no-op: a misspelt field and a wrong type are both refused
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinish"] = True
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "8"
    assert len(list(validator.iter_errors(bad))) == 2


def kuberay_rules(job: dict[str, Any]) -> list[str]:
    """The RayJob checks KubeRay v1.7.0's controller makes beyond the CRD schema
    (ray-operator/controllers/ray/utils/validation.go), for the fields these manifests use."""
    spec, meta, problems = job["spec"], job["metadata"], []
    name = meta.get("name") or meta["generateName"] + "x" * 5  # the API server appends 5 characters
    if len(name) > 47 or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        problems.append(f"name {name!r}: at most 47 characters, a DNS-1035 label")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    rules = (spec.get("deletionStrategy") or {}).get("deletionRules")
    if rules and spec.get("shutdownAfterJobFinishes"):
        problems.append("deletionRules and shutdownAfterJobFinishes are mutually exclusive")
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if key in spec and spec[key] <= 0:
            problems.append(f"{key} must be positive")
    cluster = spec["rayClusterSpec"]
    if (cluster.get("authOptions") or {}).get("mode", "token" if "authOptions" in cluster else None) == "token":
        if tuple(int(x) for x in cluster["rayVersion"].split(".")) < (2, 52, 0):
            problems.append("authOptions token mode needs rayVersion >= 2.52.0")
    if spec.get("submissionMode") == "SidecarMode" and "submitterPodTemplate" in spec:
        problems.append("SidecarMode takes no submitterPodTemplate")
    return problems


def test_rayjob_passes_the_kuberay_controller_rules():
    assert kuberay_rules(rayjob()) == []
    bad = copy.deepcopy(rayjob())
    bad["spec"]["shutdownAfterJobFinishes"] = False
    bad["spec"]["ttlSecondsAfterFinished"] = 3600
    bad["metadata"]["generateName"] = "distill-r1-distill-qwen-7b-math-nightly-run-"
    assert len(kuberay_rules(bad)) == 2


def test_vm_cluster_config_validates_against_the_installed_ray_schema():
    """What `ray up` does before it touches AWS: fill in the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    full = prepare_config(copy.deepcopy(vm_cluster()))
    validate_config(full)
    assert full["setup_commands"] == [] and full["head_setup_commands"] == []  # no `pip install` of a nightly Ray
    bad = copy.deepcopy(vm_cluster())
    bad["docker"]["run_option"] = ["--gpus all"]
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


# --- the image and the pins --------------------------------------------------------------------------


def dockerfile() -> str:
    return (INFRA / "docker" / "Dockerfile.gpu").read_text()


def pyproject_pin(package: str) -> str:
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    every = deps["dependencies"] + [d for extra in deps["optional-dependencies"].values() for d in extra]
    (pin,) = {m.group(1) for d in every if (m := re.fullmatch(rf"{re.escape(package)}(?:\[[^]]*\])?==(\S+)", d))}
    return pin


def test_versions_agree_between_pyproject_image_and_manifests():
    ray, vllm = pyproject_pin("ray"), pyproject_pin("vllm")
    text = dockerfile()
    assert re.search(rf"^FROM vllm/vllm-openai:v{re.escape(vllm)}$", text, re.M)
    assert re.findall(r'"ray\[[^]]*\]==([^"]+)"', text) == [ray]
    assert f"ray.__version__ == '{ray}'" in text  # the build fails if the base image's Ray wins
    assert rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == ray


def test_the_image_has_what_every_entrypoint_runs():
    text = dockerfile()
    apt = re.search(r"apt-get install -y --no-install-recommends ([^\\&\n]+)", text).group(1).split()
    # the launcher's file sync; the code sandbox (what scripts/setup.sh installs for it)
    assert {"rsync", "openssh-client", "bubblewrap", "libseccomp2", "util-linux", "mount"} <= set(apt)
    assert "COPY --from=kubectl /bin/kubectl /usr/local/bin/kubectl" in text
    copied = {line.split()[1] for line in text.splitlines() if line.startswith("COPY ") and "--from" not in line}
    assert {"pipeline", "schemas", "jobs", "infra/k8s/nightly.py"} <= copied
    assert re.search(rf"^WORKDIR {IMAGE_WORKDIR}$", text, re.M)
    job, jobs = rayjob(), cron()
    commands = [job["spec"]["entrypoint"], shlex.join(
        jobs[("CronJob", "distill-nightly")]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"])]
    commands += vm_cluster()["head_start_ray_commands"] + vm_cluster()["worker_start_ray_commands"]
    for command in commands:
        assert not re.search(r"(^|[\s;])python(\s|$)", command), f"`python` is not in vLLM's image: {command}"
    # the build itself runs every tool an entrypoint needs
    assert re.search(r"python3 -c .*import pipeline.cli, ray, vllm", text)
    assert all(tool in text for tool in ("kubectl version --client", "bwrap --version", "rsync --version", "ssh -V"))


# --- the entrypoint and the plan ---------------------------------------------------------------------


def entrypoint_job(command: str) -> JobConfig:
    """`python3 -m pipeline generate ...` as the image runs it: the subcommand and every option exist, the
    job (with its --set overrides) loads."""
    argv = shlex.split(command)
    assert argv[:4] == ["python3", "-m", "pipeline", "generate"], argv
    sub = typer.main.get_command(app).commands["generate"]
    params = sub.make_context("generate", argv[4:], resilient_parsing=False).params  # unknown options raise
    job = str(params["job"])
    assert job.startswith(IMAGE_WORKDIR + "/"), f"{job}: the image's working directory is not the job's"
    return load_job(REPO_ROOT / os.path.relpath(job, IMAGE_WORKDIR), parse_sets(params["set_"]))


def nightly_module() -> Any:
    sys.path.insert(0, str(INFRA / "k8s"))
    try:
        import nightly
    finally:
        sys.path.pop(0)
    return nightly


def test_the_submitted_entrypoint_names_this_runs_data_and_loads():
    nightly = nightly_module()
    submitted = nightly.render(rayjob(), "s3://b/prompts/*.parquet", "s3://b/out dir")["spec"]["entrypoint"]
    argv = shlex.split(submitted)
    assert argv[argv.index("--shards") + 1] == "s3://b/prompts/*.parquet" and argv[argv.index("--output") + 1] == "s3://b/out dir"
    job = entrypoint_job(submitted)
    assert job.model.path.startswith("/mnt/models/") and job.resources.check_resources == {"sandbox": 1}
    with pytest.raises(SystemExit):
        nightly.render(nightly.render(rayjob(), "a", "b"), "a", "b")  # data locations come from the submission only


@dataclass
class Node:
    name: str
    free: dict[str, float] = field(default_factory=dict)


def rayjob_nodes(job: dict[str, Any]) -> list[Node]:
    """Ray nodes as KubeRay starts them: num-cpus from rayStartParams or the CPU limit, GPUs from the
    nvidia.com/gpu limit, custom resources from the group's `resources`."""
    cluster = job["spec"]["rayClusterSpec"]
    groups = [("head", 1, cluster["headGroupSpec"])] + [(g["groupName"], g["replicas"], g) for g in cluster["workerGroupSpecs"]]
    nodes = []
    for name, replicas, group in groups:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        shape = {"CPU": float(group["rayStartParams"].get("num-cpus", limits["cpu"])),
                 "GPU": float(limits.get("nvidia.com/gpu", 0)),
                 **{k: float(v) for k, v in group.get("resources", {}).items()}}
        nodes += [Node(f"{name}-{i}", dict(shape)) for i in range(replicas)]
    return nodes


def vm_nodes(cfg: dict[str, Any]) -> list[Node]:
    nodes = []
    for name, t in cfg["available_node_types"].items():
        cpus, gpus = INSTANCE_SHAPES[t["node_config"]["InstanceType"]]
        shape = {"CPU": float(cpus), "GPU": float(gpus), **{k: float(v) for k, v in t["resources"].items()}}
        count = 1 if name == cfg["head_node_type"] else t["min_workers"]
        nodes += [Node(f"{name}-{i}", dict(shape)) for i in range(count)]
    return nodes


def plan(job: JobConfig) -> list[tuple[str, dict[str, float]]]:
    """Every actor and task the run holds at once (pipeline/run.py `_execute`), with its Ray request."""
    res = job.resources
    engine = {"CPU": res.engine_cpus, "GPU": job.engine.tensor_parallel_size, **res.engine_resources}
    check = {**res.check_resources} if res.check_resources else {"CPU": res.cpu_stage_cpus}
    items = [("engine", engine)] * res.engine_actors + [("render", {"CPU": res.cpu_stage_cpus})] * res.cpu_actors
    items += [("check", check)] * res.cpu_actors + [("read", {"CPU": res.cpu_stage_cpus})]
    if job.judge.enabled:
        items += [("judge", {"CPU": job.judge.cpus, "GPU": job.judge.engine.tensor_parallel_size})] * job.judge.actors
    return items


def place(items: list[tuple[str, dict[str, float]]], nodes: list[Node]) -> dict[str, list[str]]:
    """First fit, largest first: where each actor can go (Ray places by the same resource arithmetic)."""
    where: dict[str, list[str]] = {n.name: [] for n in nodes}
    for what, need in sorted(items, key=lambda i: (-i[1].get("GPU", 0), -sum(i[1].values()))):
        node = next((n for n in nodes if all(n.free.get(k, 0) >= v for k, v in need.items())), None)
        assert node is not None, f"{what} {need} fits on no node: {[(n.name, n.free) for n in nodes]}"
        for k, v in need.items():
            node.free[k] -= v
        where[node.name].append(what)
    return where


def vm_job() -> JobConfig:
    """The run docs/clusters.md and cluster.yaml's header submit to the VM cluster."""
    header = next(line for line in (INFRA / "ray" / "cluster.yaml").read_text().splitlines() if "--set" in line)
    return load_job(REPO_ROOT / "jobs" / "r1-distill-qwen-7b-math.yaml", parse_sets(shlex.split(header.lstrip("# "))[1::2]))


@pytest.mark.parametrize("target", ["kuberay", "vms"])
def test_the_jobs_plan_fits_the_node_shapes(target):
    if target == "kuberay":
        job, nodes = entrypoint_job(nightly_module().render(rayjob(), "s3://b/p/*.parquet", "s3://b/o")["spec"]["entrypoint"]), rayjob_nodes(rayjob())
    else:
        job, nodes = vm_job(), vm_nodes(vm_cluster())
    check_fits(job, [dict(n.free) for n in nodes], use_gpu=True)  # what the driver checks, per node, before it starts anything
    where = place(plan(job), nodes)
    assert all("check" not in on or node.startswith("sandbox") for node, on in where.items())
    assert all(on == [] for node, on in where.items() if node.startswith("head"))
    assert sum(on.count("engine") for on in where.values()) == job.resources.engine_actors


def test_the_placement_check_refuses_the_old_vm_shape():
    """8 x g6e.xlarge (4 vCPUs) against the 41 CPUs the 7B job plans: what `check_fits` refused on the
    cluster as shipped before."""
    nodes = [Node(f"gpu-{i}", {"CPU": 4.0, "GPU": 1.0}) for i in range(8)]
    job = load_job(REPO_ROOT / "jobs" / "r1-distill-qwen-7b-math.yaml")
    with pytest.raises(AssertionError, match="fits on no node"):
        place(plan(job), nodes)


# --- identities and the sandbox ----------------------------------------------------------------------


def test_ray_pods_get_no_api_token_and_the_submitter_may_only_manage_rayjobs():
    objs, job = cron(), rayjob()
    assert objs[("ServiceAccount", "distill-ray")]["automountServiceAccountToken"] is False
    for name, template in pod_templates(job):
        spec = template["spec"]
        assert spec["serviceAccountName"] == "distill-ray" and spec["automountServiceAccountToken"] is False, name
    (rule,) = objs[("Role", "distill-submitter")]["rules"]
    assert rule == {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list", "delete"]}
    bindings = [o for k, o in objs.items() if k[0] in ("RoleBinding", "ClusterRoleBinding")]
    assert [s["name"] for b in bindings for s in b["subjects"]] == ["distill-submitter"]
    pod = objs[("CronJob", "distill-nightly")]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "distill-submitter"


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def test_no_container_gains_capabilities_and_only_the_sandbox_group_runs_code():
    job = rayjob()
    for name, template in pod_templates(job):
        for c in containers(template["spec"]):
            assert not c.get("securityContext", {}).get("capabilities", {}).get("add"), name
    gpu, sandbox = worker_group(job, "gpu"), worker_group(job, "sandbox")
    assert "sandbox" not in gpu.get("resources", {}) and "sandbox" not in gpu["rayStartParams"].get("resources", "")
    assert sandbox["resources"] == {"sandbox": "2"} and sandbox["rayStartParams"]["num-cpus"] == "0"
    spec = sandbox["template"]["spec"]
    (c,) = spec["containers"]
    assert spec["hostUsers"] is False and "volumes" not in spec and "volumeMounts" not in c
    assert "envFrom" not in c and all("valueFrom" not in e for e in c.get("env", []))  # no S3 credentials
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
    assert "nvidia.com/gpu" not in c["resources"]["limits"] and "tolerations" not in spec
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["allowPrivilegeEscalation"] is False
    assert sc["seccompProfile"]["type"] == "Localhost"


def test_the_sandbox_seccomp_profile_is_installed_and_allows_what_bubblewrap_needs():
    sc = worker_group(rayjob(), "sandbox")["template"]["spec"]["containers"][0]["securityContext"]
    path = sc["seccompProfile"]["localhostProfile"]
    profile = json.loads((INFRA / "k8s" / "seccomp" / Path(path).name).read_text())
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    denied = {n for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ERRNO" for n in rule["names"]}
    assert not denied & SANDBOX_NEEDS
    assert {"keyctl", "bpf", "ptrace", "init_module", "kexec_load", "open_by_handle_at", "io_uring_setup"} <= denied
    (daemonset,) = docs(INFRA / "k8s" / "seccomp-installer.yaml")
    (install,) = daemonset["spec"]["template"]["spec"]["initContainers"]
    host = next(v for v in daemonset["spec"]["template"]["spec"]["volumes"] if "hostPath" in v)["hostPath"]["path"]
    assert host == "/var/lib/kubelet/seccomp/" + str(Path(path).parent)
    assert install["command"][-1].endswith("/" + Path(path).name)


def test_the_vm_sandbox_nodes_hold_no_credentials_and_no_gpus():
    types = vm_cluster()["available_node_types"]
    assert "--gpus all" not in vm_cluster()["docker"]["run_options"]
    assert types["gpu"]["docker"]["worker_run_options"] == ["--gpus all"]
    assert "IamInstanceProfile" not in types["sandbox"]["node_config"] and "--gpus all" not in types["sandbox"]["docker"]["worker_run_options"]
    assert types["sandbox"]["resources"]["CPU"] == 0 and all("sandbox" not in t["resources"] for k, t in types.items() if k != "sandbox")
    assert all("ImageId" in t["node_config"] for t in types.values())
    assert "IamInstanceProfile" in types["gpu"]["node_config"]


# --- lifecycle: one run at a time, nothing left behind ------------------------------------------------


def test_runs_never_overlap_and_clusters_go_when_the_job_ends():
    job, objs = rayjob()["spec"], cron()
    cronjob = objs[("CronJob", "distill-nightly")]["spec"]
    assert cronjob["concurrencyPolicy"] == "Forbid" and cronjob["schedule"] == "0 2 * * *"
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] == 0
    attempts = job["backoffLimit"] + 1
    assert job["activeDeadlineSeconds"] < 24 * 3600  # one attempt fits between two nights
    # the submitter outlives every attempt, so Forbid covers the run; past that it refuses (nightly.py)
    assert cronjob["jobTemplate"]["spec"]["activeDeadlineSeconds"] >= attempts * job["activeDeadlineSeconds"]
    assert cronjob["jobTemplate"]["spec"]["backoffLimit"] == 0
    pod = cronjob["jobTemplate"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "manifests")["mountPath"]
    assert c["command"][:2] == ["python3", f"{IMAGE_WORKDIR}/infra/k8s/nightly.py"]
    assert c["command"][c["command"].index("--template") + 1] == f"{mount}/rayjob.yaml"
    images = {c["image"]} | {k["image"] for _, t in pod_templates(rayjob()) for k in t["spec"]["containers"]}
    assert len(images) == 1, images  # one image: the submitter runs nightly.py and kubectl from it


FAKE_KUBECTL = r'''#!{python}
"""A stand-in API server for nightly.py: RayJobs in a JSON file; each `get` advances one RayJob's status."""
import json, sys
state_path = {state!r}
state = json.load(open(state_path))
args = sys.argv[1:]
if args[:2] == ["get", "rayjobs"]:
    print(json.dumps({{"items": state["rayjobs"]}}))
elif args[:1] == ["create"]:
    obj = json.loads(sys.stdin.read())
    obj["metadata"]["name"] = obj["metadata"].pop("generateName") + "abcde"
    obj["metadata"]["creationTimestamp"] = "2030-01-09T02:00:00Z"
    state["rayjobs"].append(obj)
    print(obj["metadata"]["name"], end="")
elif args[:2] == ["get", "rayjob"]:
    obj = next(r for r in state["rayjobs"] if r["metadata"]["name"] == args[2])
    steps = state["steps"]
    obj["status"] = steps.pop(0) if steps else obj["status"]
    print(json.dumps(obj))
elif args[:2] == ["delete", "rayjob"]:
    state["rayjobs"] = [r for r in state["rayjobs"] if r["metadata"]["name"] != args[2]]
    state.setdefault("deleted", []).append(args[2])
json.dump(state, open(state_path, "w"))
'''


def run_nightly(tmp_path: Path, rayjobs: list[dict[str, Any]], steps: list[dict[str, str]]) -> tuple[int, dict]:
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"rayjobs": rayjobs, "steps": steps}))
    kubectl = tmp_path / "bin" / "kubectl"
    kubectl.parent.mkdir()
    kubectl.write_text(FAKE_KUBECTL.format(python=sys.executable, state=str(state)))
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IEXEC)
    code = subprocess.run([sys.executable, str(INFRA / "k8s" / "nightly.py"), "--template", str(INFRA / "k8s" / "rayjob.yaml"),
                           "--shards", "s3://b/p/*.parquet", "--output", "s3://b/o", "--keep", "1", "--poll-s", "0"],
                          env={**os.environ, "PATH": f"{kubectl.parent}{os.pathsep}{os.environ['PATH']}"},
                          capture_output=True, text=True, timeout=60).returncode
    return code, json.loads(state.read_text())


def old_run(name: str, day: int, deployment: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "creationTimestamp": f"2030-01-0{day}T02:00:00Z"},
            "status": {"jobDeploymentStatus": deployment, "jobStatus": "RUNNING" if deployment == "Running" else "SUCCEEDED"}}


def test_nightly_refuses_while_a_run_is_active(tmp_path):
    code, state = run_nightly(tmp_path, [old_run("distill-r1-math-old", 1, "Retrying")], [])
    assert code == 3 and [r["metadata"]["name"] for r in state["rayjobs"]] == ["distill-r1-math-old"]


def test_nightly_waits_for_its_run_then_prunes_finished_ones(tmp_path):
    finished = [old_run("distill-r1-math-a", 1, "Complete"), old_run("distill-r1-math-b", 2, "Failed")]
    steps = [{"jobDeploymentStatus": "Initializing"}, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
             {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}]
    code, state = run_nightly(tmp_path, finished, steps)
    assert code == 0 and state["steps"] == []  # it polled until the run finished
    (mine,) = [r for r in state["rayjobs"] if r["metadata"]["name"] == "distill-r1-math-abcde"]
    assert "--shards 's3://b/p/*.parquet' --output s3://b/o" in mine["spec"]["entrypoint"]
    assert state["deleted"] == ["distill-r1-math-b", "distill-r1-math-a"]  # only the newest (--keep 1) stays


def test_nightly_reports_a_failed_run(tmp_path):
    code, _ = run_nightly(tmp_path, [], [{"jobDeploymentStatus": "Failed", "jobStatus": "FAILED"}])
    assert code == 1


def test_of_two_racing_submitters_the_younger_withdraws():
    nightly = nightly_module()
    older, younger = old_run("distill-a", 1, "Initializing"), old_run("distill-b", 1, "")
    younger["metadata"]["creationTimestamp"] = "2030-01-01T02:00:01Z"
    assert nightly.loses_race([older, younger], "distill-b") and not nightly.loses_race([older, younger], "distill-a")


# --- `submit` (Ray job submission from a laptop) -----------------------------------------------------


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
    assert entry[:4] == ["python3", "-m", "pipeline", "generate"]
    sub = typer.main.get_command(app).commands["generate"]
    load_job(REPO_ROOT / sub.make_context("generate", entry[4:], resilient_parsing=False).params["job"])
