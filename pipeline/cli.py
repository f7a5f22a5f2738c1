"""`python -m pipeline ...`: generate, curate, prepare, submit, mix.

Errors a user can act on are one line on stderr and no traceback: a user error (bad job, bad
input, storage that cannot be reached) exits 2, a run that could not finish exits 1 and says
what to do. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NoReturn, Optional

import typer

from pipeline import console
from pipeline.config import DEFAULT_JOB, ConfigError, load_job, load_yaml, parse_sets, split_pairs
from pipeline.errors import RunFailed, StorageError, scrub, storage_error
from pipeline.read import InputError, split_spec
from pipeline.storage import LeaseHeld, NotOwned

if TYPE_CHECKING:
    from ray.job_submission import JobDetails

# No locals in tracebacks: they could hold credentials. Plain (click) help: flags without a type column.
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Distillation data pipeline.",
                  pretty_exceptions_show_locals=False, rich_markup_mode=None)


def _fail(code: int, message: str) -> NoReturn:
    typer.echo(f"error: {scrub(message)}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _errors(uris: list[str]) -> Iterator[None]:
    """User errors -> one line, exit 2; storage errors name `uris` (filled in as they are known)."""
    from botocore.exceptions import BotoCoreError

    try:
        yield
    except RunFailed as e:
        _fail(1, str(e))
    except (ConfigError, InputError, LeaseHeld, NotOwned, StorageError) as e:
        _fail(2, str(e))
    except (OSError, BotoCoreError) as e:
        _fail(2, str(storage_error(", ".join(uris) or "storage", e)))


@app.callback()
def main(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Also show engine, Ray and library logs (always in the run's log file)."),
    progress_every: float = typer.Option(console.PROGRESS_EVERY_S, "--progress-every", metavar="SECONDS", min=1,
                                         help="Without a terminal: a progress line this often."),
) -> None:
    console.setup(verbose, progress_every)
    ctx.call_on_close(console.teardown)  # the console's stream is this command's (a test runner's is closed after it)


@app.command()
def generate(
    job: Path = typer.Option(DEFAULT_JOB, "--job", metavar="PATH", show_default="jobs/demo.yaml", help="Job spec (YAML)."),
    shards: Optional[str] = typer.Option(None, metavar="GLOB", help="Glob or comma-separated list of local paths / s3:// URIs."),
    output: Optional[str] = typer.Option(None, metavar="URI", help="Output folder or s3:// URI."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a job key, e.g. --set sampling.n=8 (repeatable)."),
    new_version: bool = typer.Option(False, "--new-version",
                                     help="Publish a version made only with this configuration where the output "
                                          "holds one made with another (otherwise refused)."),
) -> None:
    """Generate, verify, filter and publish; prints the dataset URI last."""
    from pipeline.run import generate as run_generate

    uris: list[str] = []
    with _errors(uris):
        cfg = load_job(job, parse_sets(set_), shards=split_spec(shards) if shards else None, output=output)
        uris += [cfg.output, *cfg.shards]
        uri = run_generate(cfg, new_version=new_version)
    typer.echo(uri)


@app.command()
def curate(
    input: str = typer.Argument(..., metavar="INPUT", help="Parquet file(s): path, glob, comma list or s3:// URI."),
    output: str = typer.Argument(..., metavar="OUTPUT", help="A .parquet file or a folder (local or s3://)."),
    job: Optional[Path] = typer.Option(None, "--job", metavar="PATH", help="Job spec for verifier/filter settings."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a job key, e.g. --set verify.timeout_s=5."),
) -> None:
    """Verify and filter existing completions: every input row plus accepted/reject_reason."""
    from pipeline.run import curate as run_curate

    with _errors([output, *split_spec(input)]):
        cfg = load_job(job, parse_sets(set_))
        uri = run_curate(cfg, split_spec(input), output)
    typer.echo(uri)


def _numeric(items: list[str]) -> dict[str, str]:
    """`["level=int", "score"]` -> {"level": "int", "score": "float"}."""
    return {k.strip(): (v.strip() or "float") for k, _, v in (i.partition("=") for i in items)}


@app.command()
def prepare(
    source: str = typer.Argument(..., help="JSONL/JSON/CSV/TSV (also .gz), Parquet files (glob, comma list, s3://) or a datasets folder."),
    output: str = typer.Argument(..., help="Folder (local or s3://) for the prompt shards."),
    format: str = typer.Option(..., "--format", help="math | gsm8k | code-stdio | humaneval | choice | generic"),
    name: Optional[str] = typer.Option(None, help="Source name (ids, `source` column); default: the source's file name."),
    rows_per_shard: int = typer.Option(10_000, "--rows-per-shard", min=1),
    shard_name: str = typer.Option("prompts", "--shard-name", help="Shards are named SHARD_NAME-00000.parquet, ..."),
    map_: list[str] = typer.Option([], "--map", help="FIELD=COLUMN: add (generic: also prompt/answer/...) a field from a column."),
    const: list[str] = typer.Option([], "--const", help="FIELD=VALUE: a field with one value for every row, e.g. --const domain=math."),
    numeric: list[str] = typer.Option([], "--numeric", help="COLUMN[=int|float]: the column holds numbers (CSV/TSV cells are text otherwise)."),
    mapping_file: Optional[Path] = typer.Option(None, "--mapping", help="YAML with `map:`, `const:` and `numeric:`."),
    id_column: str = typer.Option("id", help="The source's own id column, if any."),
    strict: bool = typer.Option(False, "--strict", help="Fail on the first bad row instead of skipping and reporting it."),
    no_dedup: bool = typer.Option(False, "--no-dedup", help="Keep duplicate prompts."),
    decontaminate: list[str] = typer.Option([], help="Benchmark files whose problems must not leak in (repeatable)."),
    ngram: int = typer.Option(8, help="n-gram size for decontamination (8-13 as open-r1/OpenThoughts)."),
) -> None:
    """Turn prompt sources into validated prompt shards for `generate` (replacing an earlier prepare's)."""
    from pipeline.prepare import Converter, PrepareOptions
    from pipeline.prepare import prepare as run_prepare

    with _errors([source, output]):
        spec: Any = load_yaml(mapping_file, "mapping file") if mapping_file else {}
        if not isinstance(spec, dict) or not all(isinstance(spec.get(k) or {}, dict) for k in ("map", "const", "numeric")):
            raise ConfigError(f"{mapping_file}: expected a mapping with `map:`, `const:` and `numeric:` mappings")
        convert = Converter(format, {**(spec.get("map") or {}), **split_pairs(map_)},
                            {**(spec.get("const") or {}), **split_pairs(const)},
                            {**(spec.get("numeric") or {}), **_numeric(numeric)})
        source_name = name or split_spec(source)[0].rstrip("/").rsplit("/", 1)[-1].split(".")[0]
        with console.Progress(None, unit="rows", kept="written", tokens=False) as progress:
            opts = PrepareOptions(source_name=source_name, id_column=id_column or None, rows_per_shard=rows_per_shard,
                                  shard_name=shard_name, strict=strict, dedup=not no_dedup, decontaminate=decontaminate,
                                  ngram=ngram, progress=progress.set)
            report = run_prepare(source, output, convert, opts)
            progress.set(report.read, report.written)
    console.prepare_summary(report.read, report.written, report.dropped, report.shards, report.bad_rows,
                            f"{output.rstrip('/')}/_prepare_report.json" if report.written else None)
    if not report.written:
        why = "every row was dropped (see above; check --format)" if report.read else "the source holds no rows"
        _fail(2, f"nothing written to {output}: {why}; an earlier prepare's shards there are unchanged")
    typer.echo(output)


def running_twin(jobs: list["JobDetails"], job_hash: str) -> "JobDetails | None":
    """The cluster's pending or running submission of the same job, if any (by the hash in its metadata)."""
    for j in jobs:
        if (j.metadata or {}).get("distill_job_hash") == job_hash and not j.status.is_terminal():
            return j
    return None


@app.command()
def submit(
    job: Path = typer.Option(DEFAULT_JOB, "--job", metavar="PATH", show_default="jobs/demo.yaml",
                             help="Job spec (YAML), relative to the repo root."),
    shards: Optional[str] = typer.Option(None, metavar="GLOB", help="Glob or comma-separated list of local paths / s3:// URIs."),
    output: Optional[str] = typer.Option(None, metavar="URI", help="Output folder or s3:// URI."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a job key (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the submission command instead of running it."),
) -> None:
    """Submit `generate` to the Ray cluster at RAY_ADDRESS; rerun the command to resume a run.

    Each submission gets a fresh id carrying a hash of the resolved job (Ray never reuses an id);
    the hash also goes into the job's metadata, and a submission is refused while a job with the
    same hash is pending or running on the cluster."""
    import hashlib
    import json
    import os
    import shlex
    import subprocess
    import time
    import uuid

    from pipeline.preflight import check_job

    with _errors([]):
        cfg = load_job(job, parse_sets(set_), shards=split_spec(shards) if shards else None, output=output)
        check_job(cfg)
    job_hash = hashlib.sha1(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]
    submission_id = f"distill-{cfg.name}-{job_hash}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:4]}"
    job_arg = os.path.relpath(job) if os.path.abspath(job).startswith(os.getcwd() + os.sep) else str(job)
    entry = ["python3", "-m", "pipeline", "generate", "--job", job_arg]
    entry += ["--shards", shards] if shards else []
    entry += ["--output", output] if output else []
    for item in set_:
        entry += ["--set", item]
    runtime_env = {"working_dir": ".", "excludes": [".venv", ".cache", "out", ".git", "bench/tmp"]}
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [ray_cli if os.path.exists(ray_cli) else "ray", "job", "submit", "--submission-id", submission_id,
           "--metadata-json", json.dumps({"distill_job_hash": job_hash, "distill_job": cfg.name}),
           "--runtime-env-json", json.dumps(runtime_env), "--", *entry]
    address = os.environ.get("RAY_ADDRESS")
    if dry_run or not address:
        if not dry_run:
            typer.echo("RAY_ADDRESS is not set: nothing submitted; the command would be:", err=True)
        typer.echo(shlex.join(cmd))
        return
    from ray.job_submission import JobSubmissionClient

    try:
        jobs = JobSubmissionClient(address).list_jobs()
    except Exception as e:  # unreachable address, no job server (dashboard) on it
        _fail(2, f"cannot list the jobs of the Ray cluster at RAY_ADDRESS={address} ({type(e).__name__}: {e})")
    twin = running_twin(jobs, job_hash)
    if twin is not None:
        sid = twin.submission_id
        _fail(2, f"job {sid} runs this same job on the cluster ({twin.status.value}): follow it with "
                 f"`ray job logs -f {sid}`, or stop it with `ray job stop {sid}` and submit again")
    typer.echo(f"submission id {submission_id} (after it stops, rerun this command to resume)", err=True)
    raise typer.Exit(subprocess.call(cmd))


@app.command()
def mix(
    mix_file: Path = typer.Argument(..., metavar="MIX.yaml", help="Mix spec (YAML), e.g. mixes/r1-style.yaml."),
    output: Optional[str] = typer.Option(None, help="Output folder or s3:// URI (overrides the file's `output`)."),
) -> None:
    """Assemble one dataset from several published ones (weights, filters, cross-source dedup and
    decontamination); prints the dataset URI last."""
    from pipeline.mix import mix as run_mix
    from pipeline.mixconfig import load_mix

    uris: list[str] = []
    with _errors(uris):
        cfg = load_mix(mix_file, output)
        uris += [cfg.output, *(s.dataset for s in cfg.sources)]
        uri = run_mix(cfg)
    typer.echo(uri)
