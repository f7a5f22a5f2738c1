"""A real multi-node Ray cluster on this machine (`ray start`: a head and worker nodes, each with its own
resources), the pipeline run on it through RAY_ADDRESS and through `submit` (`ray job submit`), and a
worker node killed mid-run as a spot preemption does: the run, or its rerun, publishes every prompt
exactly `n` times.

The cluster is private: on loopback, its own ports, its own --temp-dir, token auth with its own token
file (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH: never ~/.ray/auth_token), every Ray call given the
address explicitly; other Ray clusters on the machine are never touched (no `ray stop`: each node is
one `ray start --block` process tree, killed by pid). Ray replaces a node IP of 127.0.0.1 with the
host's routable address, so the nodes use 127.0.0.2 (loopback too); the dashboard binds 127.0.0.1.
The GCS listens on all interfaces whatever the node IP: the token is what keeps others out.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import psutil
import pyarrow.parquet as pq
import pytest

from conftest import engine_cores, frozen, run_log, wait_for, write_shard
from pipeline.config import DEFAULT_MODEL_DIR, REPO_ROOT
from pipeline.devs3 import free_ports
from pipeline.storage import Storage

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
PROMPTS = ["What is 1 + 1?", "What is 2 + 3?", "What is 5 - 2?", "What is 2 times 3?", "What is 10 + 10?",
           "What is 8 divided by 2?", "What is 7 + 6?", "What is 9 - 4?"]
SHARDS, PER_SHARD, N = 4, 2, 2
# The engine may only run where `gpu_node` is advertised: the "GPU node" has exactly the engine's one CPU
# and advertises a GPU (which vLLM's CPU build ignores), so Ray keeps the CPU stages (read tasks, render
# and check actors) off it as it does on a real cluster (RAY_scheduler_avoid_gpu_nodes): with only a
# custom resource, a render actor could take a quarter of its CPU and leave the engine unplaceable.
# One prompt at a time through the engine, every sample 48 tokens: the check stage's node is killed while
# the engine still has prompts ahead of it.
JOB_SETS = ["sampling.n=2", "sampling.max_tokens=48", "sampling.min_tokens=48", "resources.batch_size=1",
            "resources.engine_batches_in_flight=1", "resources.cpu_batch_size=2", "commit.max_prompts=2",
            "resources.engine_cpus=1", "resources.engine_resources={gpu_node: 1}", "resources.background_nice=0",
            f"model.path={DEFAULT_MODEL_DIR}"]
DEADLINE_S = 600
NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "runtime-env-agent-port", "metrics-export-port")
NODE_IP = "127.0.0.2"


class Node:
    """One `ray start --block` process tree: killing the tree is the node disappearing."""

    def __init__(self, name: str, proc: subprocess.Popen, log: Path) -> None:
        self.name, self.proc, self.log = name, proc, log

    @property
    def tag(self) -> str:
        return node_tag(self.name)

    def workers(self) -> list[str]:
        """The titles of this node's Ray worker processes (`ray::MapWorker(MapBatches(EngineStage))`, ...)."""
        return [t.strip() for t in map(_cmdline, psutil.Process(self.proc.pid).children(recursive=True))
                if t.startswith("ray::")]

    def kill(self) -> None:
        """SIGKILL the raylet first (what the cluster sees when a spot node vanishes), then everything else."""
        if self.proc.poll() is not None:
            return
        tree = psutil.Process(self.proc.pid).children(recursive=True)
        tree.sort(key=lambda p: "raylet" not in _cmdline(p))
        for p in [*tree, psutil.Process(self.proc.pid)]:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()


def node_tag(name: str) -> str:
    """A custom resource only node `name` advertises: how the test finds its node id."""
    return f"node_{name}"


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


class LocalCluster:
    """A head (no CPUs: it schedules, and runs `ray job` drivers) and worker nodes added by the test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        token = root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.temp_dir = root / "ray"
        self.gcs_port = self.dashboard_port = 0  # chosen with the head's other ports
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONPATH": str(REPO_ROOT)}
        self.nodes: list[Node] = []
        # each node's worker ports: 100 of its own, below the ephemeral range, apart from the other nodes'
        self.worker_ports = 20000 + secrets.randbelow(60) * 100

    def start_head(self) -> None:
        self.gcs_port, self.dashboard_port, client, *node = free_ports(3 + len(NODE_PORTS))  # all distinct
        self._start("head", ["--head", f"--port={self.gcs_port}", "--num-cpus=0", "--num-gpus=0", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                             f"--ray-client-server-port={client}"], {}, node)

    @property
    def address(self) -> str:
        return f"{NODE_IP}:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], resources: dict[str, float], ports: list[int]) -> Node:
        """Start node `name` on `ports` (one per NODE_PORTS flag)."""
        flags = [f"--{flag}={port}" for flag, port in zip(NODE_PORTS, ports, strict=True)]
        base = self.worker_ports + 100 * len(self.nodes)
        log = self.root / f"{name}.log"
        proc = subprocess.Popen(
            [RAY, "start", "--block", f"--node-ip-address={NODE_IP}", f"--temp-dir={self.temp_dir}",
             "--object-store-memory=100000000", "--disable-usage-stats",
             f"--min-worker-port={base}", f"--max-worker-port={base + 99}", *flags, *args,
             f"--resources={json.dumps({**resources, node_tag(name): 1})}"],
            env=self.env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, proc, log)
        self.nodes.append(node)
        wait_for(lambda: node.tag in self.node_ids(), f"node {name} alive in the cluster", node.proc, log,
                 timeout_s=DEADLINE_S)
        return node

    def add_node(self, name: str, cpus: int, resources: dict[str, float] | None = None, gpus: int = 0) -> Node:
        return self._start(name, [f"--address={self.address}", f"--num-cpus={cpus}", f"--num-gpus={gpus}"], resources or {},
                           free_ports(len(NODE_PORTS)))

    def ray_cli(self, *args: str) -> str:
        return subprocess.run([RAY, *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              check=True, timeout=120).stdout

    def node_ids(self) -> dict[str, str]:
        """{node tag: node id} of the live nodes (the state API, through the dashboard)."""
        try:
            nodes = json.loads(self.ray_cli("list", "nodes", "--address", self.dashboard, "--filter", "state=ALIVE",
                                            "--format", "json", "--detail"))
        except (subprocess.CalledProcessError, json.JSONDecodeError):  # the dashboard is not up yet
            return {}
        return {tag: n["node_id"] for n in nodes for tag in n.get("resources_total", {}) if tag.startswith("node_")}

    def shutdown(self) -> None:
        for node in reversed(self.nodes):
            node.kill()


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    root = Path(tempfile.mkdtemp(prefix="rmn-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    c = LocalCluster(root)
    try:
        c.start_head()
        c.add_node("gpu1", cpus=2, resources={"gpu_node": 1}, gpus=1)
        c.add_node("cpu1", cpus=2)
        yield c
    finally:
        c.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def shards(tmp_path: Path) -> tuple[str, set[tuple[str, int]]]:
    for i in range(SHARDS):
        write_shard(tmp_path / "in" / f"p-{i}.parquet",
                    [{"id": f"q{i}-{j}", "prompt": PROMPTS[PER_SHARD * i + j], "answer": "0"} for j in range(PER_SHARD)])
    expected = {(f"q{i}-{j}", k) for i in range(SHARDS) for j in range(PER_SHARD) for k in range(N)}
    return str(tmp_path / "in" / "*.parquet"), expected


def published(out: Path) -> list[tuple[str, int]]:
    """(id, sample_index) of every sample the current version lists."""
    storage = Storage(str(out))
    files = storage.read_json("_manifest.json")["files"]["samples"]
    return [(r["id"], r["sample_index"]) for rel in files for r in storage.read_table(rel, columns=["id", "sample_index"]).to_pylist()]


def committed_prompts(out: Path) -> int:
    return len({i for f in out.glob("_pipeline/commits/*/*.parquet") for i in pq.read_table(f, columns=["id"]).column(0).to_pylist()})


def resource_in_use(cluster: LocalCluster, name: str) -> float:
    """How much of a custom resource the cluster's actors hold (`ray status`: "1.0/1.0 gpu_node")."""
    found = re.search(rf"([\d.]+)/[\d.]+ {name}\b", cluster.ray_cli("status", "--address", cluster.address))
    return float(found.group(1)) if found else 0.0


def submitted_driver(cluster: LocalCluster) -> psutil.Process | None:
    """The driver `ray job submit` started on the head node (`python3 -m pipeline generate`), if up."""
    for proc in psutil.Process(cluster.nodes[0].proc.pid).children(recursive=True):
        try:
            if proc.cmdline()[1:4] == ["-m", "pipeline", "generate"]:
                return proc
        except psutil.Error:
            pass
    return None


def kill_mid_run(run: subprocess.Popen, log: Path, out: Path, driver: psutil.Process, victim: Node, stage: str,
                 event: str, engine: Node, holds: tuple[LocalCluster, str] | None = None) -> int:
    """Wait for `event` (a line of the driver's own run log), at once stop the `driver` (it commits)
    and then the engine core on node `engine` (the prompts still in it stay there, however fast the
    machine), check that the victim node runs `stage` and that prompts are still uncommitted (work
    in flight), kill the victim node, then let both go on; returns how many prompts were committed
    then. `holds` names a custom resource the stage must be holding (it asked for it: it did not
    land there by chance)."""
    wait_for(lambda: event in run_log(out), repr(event), run, log, timeout_s=DEADLINE_S)
    with frozen([driver]):
        cores = engine_cores(under=engine.proc.pid)
        assert cores, f"no engine core on {engine.name}"
        with frozen(cores):
            on_victim = victim.workers()
            done = committed_prompts(out)
            assert any(stage in title for title in on_victim), f"{victim.name} runs no {stage}: {on_victim}"
            assert not holds or resource_in_use(*holds) == 1, f"{stage} does not hold {holds[1]}"
            assert done < SHARDS * PER_SHARD, "every prompt was committed before the kill: nothing was in flight"
            victim.kill()
    return done


def test_generate_through_ray_address_survives_losing_the_engine_node(cluster, tmp_path):
    """RAY_ADDRESS: the driver joins the cluster; the node holding the engine dies mid-run and a new
    GPU node joins (as the autoscaler replaces a preempted spot node)."""
    spec, expected = shards(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline", "generate", "--job", "jobs/demo.yaml", "--shards", spec,
           "--output", str(out), *[a for s in JOB_SETS for a in ("--set", s)]]
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    log = tmp_path / "driver.log"
    run = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=open(log, "wb"), text=True,
                           start_new_session=True)
    try:
        gpu = next(n for n in cluster.nodes if n.name.startswith("gpu") and n.proc.poll() is None)
        # as soon as the engine is up (the run logs its settings): its eight prompts are all ahead of it
        done = kill_mid_run(run, log, out, psutil.Process(run.pid), gpu, "EngineStage", "generator engine (pid", gpu,
                            holds=(cluster, "gpu_node"))
        cluster.add_node(f"gpu{len(cluster.nodes)}", cpus=2, resources={"gpu_node": 1}, gpus=1)
        stdout, _ = run.communicate(timeout=DEADLINE_S)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    if run.returncode != 0:  # the contract allows a rerun; it must finish what the first run left
        print(f"first run failed after the kill (rerunning): {log.read_text()[-2000:]}")
        again = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
        assert again.returncode == 0, again.stderr[-3000:]
    keys = published(out)
    assert len(keys) == len(set(keys)) and set(keys) == expected
    print(f"prompts committed before the kill: {done}/{SHARDS * PER_SHARD}; first run exit {run.returncode}")


def test_submit_survives_losing_the_cpu_stage_node(cluster, tmp_path):
    """`python -m pipeline submit` (`ray job submit`; the driver runs on the head): the node holding the
    render and check actors dies mid-run and a new CPU node joins."""
    spec, expected = shards(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline", "submit", "--job", "jobs/demo.yaml", "--shards", spec,
           "--output", str(out), *[a for s in JOB_SETS for a in ("--set", s)]]
    env = {**cluster.env, "RAY_ADDRESS": cluster.dashboard}
    log = tmp_path / "submit.log"
    run = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        cpu = next(n for n in cluster.nodes if n.name.startswith("cpu") and n.proc.poll() is None)
        gpu = next(n for n in cluster.nodes if n.name.startswith("gpu") and n.proc.poll() is None)
        # the driver runs on the head node, not in this process tree: found before the event, to stop it at once
        wait_for(lambda: submitted_driver(cluster) is not None, "the submitted driver", run, log, timeout_s=DEADLINE_S)
        driver = submitted_driver(cluster)
        # once the first checked samples reached the driver: the engine and the CPU stages are all flowing
        done = kill_mid_run(run, log, out, driver, cpu, "CheckStage", "first samples after", gpu)
        cluster.add_node(f"cpu{len(cluster.nodes)}", cpus=2)
        run.wait(timeout=DEADLINE_S)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    text = log.read_text()
    submission = re.search(r"submission id (\S+)", text).group(1)
    status = subprocess.run([RAY, "job", "status", "--address", cluster.dashboard, submission], env=cluster.env,
                            capture_output=True, text=True, timeout=120)
    status = status.stdout + status.stderr
    if f"Job '{submission}' succeeded" not in status:  # the contract allows a rerun (`submit` refuses the same id: run it directly)
        print(f"the submitted run did not succeed after the kill (rerunning): {status[-1000:]} {text[-2000:]}")
        generate = ["generate" if a == "submit" else a for a in cmd]
        again = subprocess.run(generate, cwd=REPO_ROOT, env={**cluster.env, "RAY_ADDRESS": cluster.address},
                               capture_output=True, text=True, timeout=DEADLINE_S)
        assert again.returncode == 0, again.stderr[-3000:]
    keys = published(out)
    assert len(keys) == len(set(keys)) and set(keys) == expected, text[-3000:]
    print(f"prompts committed before the kill: {done}/{SHARDS * PER_SHARD}; submit exit {run.returncode}; {status.strip()[-80:]}")
