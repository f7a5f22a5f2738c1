"""Submit one distillation RayJob and wait for it: never two runs (two GPU clusters) at once.

Run nightly by infra/k8s/cronjob.yaml, or by hand with kubectl configured:
    python3 infra/k8s/nightly.py --template infra/k8s/rayjob.yaml --shards 's3://b/prompts/*.parquet' --output s3://b/ds

1. Refuses (exit 3) while any RayJob labelled app.kubernetes.io/name=distill-pipeline is not finished:
   the CronJob's `concurrencyPolicy: Forbid` only sees this process, and a RayJob outlives it (KubeRay
   retries, a killed submitter, a run started by hand).
2. Creates the RayJob from the template with this run's --shards/--output appended to the entrypoint
   (the job file in the image names no bucket). Two submitters racing past step 1 both see two active
   runs; the younger deletes its own and refuses.
3. Waits until KubeRay reports it finished (exit 0 if the job succeeded, else 1), then deletes finished
   RayJobs beyond the newest --keep (KubeRay leaves them, and their submitter Jobs, behind).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from typing import Any

import yaml

LABEL_KEY, LABEL_VALUE = "app.kubernetes.io/name", "distill-pipeline"
# JobDeploymentStatus values after which KubeRay does nothing more with the RayJob (retries happen before).
FINISHED = {"Complete", "Failed", "ValidationFailed"}
REFUSED = 3


def kubectl(*args: str, stdin: str | None = None) -> str:
    return subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True, check=True).stdout


def list_rayjobs() -> list[dict[str, Any]]:
    return json.loads(kubectl("get", "rayjobs", "-l", f"{LABEL_KEY}={LABEL_VALUE}", "-o", "json"))["items"]


def deployment_status(rayjob: dict[str, Any]) -> str:
    return rayjob.get("status", {}).get("jobDeploymentStatus", "")


def is_active(rayjob: dict[str, Any]) -> bool:
    """Not finished: new, initializing, running, retrying, suspended... (holds or will hold a cluster)."""
    return deployment_status(rayjob) not in FINISHED


def age_order(rayjob: dict[str, Any]) -> tuple[str, str]:
    meta = rayjob["metadata"]
    return meta.get("creationTimestamp", ""), meta["name"]


def render(template: dict[str, Any], shards: str, output: str) -> dict[str, Any]:
    """The template with this run's data locations appended to its entrypoint (shell-quoted: KubeRay
    pastes the entrypoint into the submitter's bash command line)."""
    if not shards or not output:
        raise SystemExit("--shards and --output are required (the job file names no bucket)")
    entry = template["spec"]["entrypoint"]
    if {"--shards", "--output"} & set(shlex.split(entry)):
        raise SystemExit("the template's entrypoint already names --shards/--output; they are passed here")
    rayjob = json.loads(json.dumps(template))
    rayjob["spec"]["entrypoint"] = f"{entry.strip()} {shlex.join(['--shards', shards, '--output', output])}"
    rayjob["metadata"].setdefault("labels", {})[LABEL_KEY] = LABEL_VALUE
    return rayjob


def loses_race(active: list[dict[str, Any]], mine: str) -> bool:
    """Of several active runs only the oldest may go on."""
    return min(active, key=age_order)["metadata"]["name"] != mine


def to_prune(rayjobs: list[dict[str, Any]], keep: int) -> list[str]:
    finished = sorted((r for r in rayjobs if not is_active(r)), key=age_order, reverse=True)
    return [r["metadata"]["name"] for r in finished[keep:]]


def succeeded(rayjob: dict[str, Any]) -> bool:
    status = rayjob.get("status", {})
    return status.get("jobDeploymentStatus") == "Complete" and status.get("jobStatus") == "SUCCEEDED"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--template", required=True, help="RayJob manifest (infra/k8s/rayjob.yaml).")
    p.add_argument("--shards", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--keep", type=int, default=7, help="Finished RayJobs to keep for inspection.")
    p.add_argument("--poll-s", type=float, default=60)
    a = p.parse_args(argv)
    with open(a.template) as f:
        rayjob = render(yaml.safe_load(f), a.shards, a.output)

    active = [r["metadata"]["name"] for r in list_rayjobs() if is_active(r)]
    if active:
        print(f"refusing: a distillation run is still active: {', '.join(active)}", file=sys.stderr)
        return REFUSED
    name = kubectl("create", "-f", "-", "-o", "jsonpath={.metadata.name}", stdin=json.dumps(rayjob)).strip()
    print(f"created rayjob/{name}", file=sys.stderr)
    active_now = [r for r in list_rayjobs() if is_active(r)]
    if loses_race(active_now, name):
        kubectl("delete", "rayjob", name, "--wait=false")
        print(f"refusing: another run started at the same time; deleted rayjob/{name}", file=sys.stderr)
        return REFUSED

    last = None
    while True:
        current = json.loads(kubectl("get", "rayjob", name, "-o", "json"))
        status = (deployment_status(current), current.get("status", {}).get("jobStatus", ""))
        if status != last:
            print(f"rayjob/{name}: deployment {status[0] or 'New'}, job {status[1] or '-'}", file=sys.stderr)
            last = status
        if not is_active(current):
            break
        time.sleep(a.poll_s)
    for old in to_prune(list_rayjobs(), a.keep):
        kubectl("delete", "rayjob", old, "--wait=false")
        print(f"deleted finished rayjob/{old}", file=sys.stderr)
    message = current.get("status", {}).get("message", "")
    print(f"rayjob/{name} finished: {status} {message}".rstrip(), file=sys.stderr)
    return 0 if succeeded(current) else 1


if __name__ == "__main__":
    sys.exit(main())
