"""`python -m pipeline ...`: generate, curate, prepare, submit."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from pipeline import console
from pipeline.config import DEFAULT_JOB, ConfigError, load_job, parse_sets, split_pairs
from pipeline.read import InputError, split_spec
from pipeline.storage import LeaseHeld, LeaseLost, NotOwned

# No locals in tracebacks: they could hold credentials. Plain (click) help: flags without a type column.
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Distillation data pipeline.",
                  pretty_exceptions_show_locals=False, rich_markup_mode=None)


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Also show engine, Ray and library logs (always in the run's log file)."),
    progress_every: float = typer.Option(console.PROGRESS_EVERY_S, "--progress-every", metavar="SECONDS", min=1,
                                         help="Without a terminal: a progress line this often."),
) -> None:
    console.setup(verbose, progress_every)


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
    from pipeline.run import RunIncomplete
    from pipeline.run import generate as run_generate

    try:
        cfg = load_job(job, parse_sets(set_), shards=split_spec(shards) if shards else None, output=output)
        uri = run_generate(cfg, new_version=new_version)
    except (LeaseLost, RunIncomplete) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    except (ConfigError, InputError, OSError, LeaseHeld, NotOwned) as e:
        _fail(e)
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

    try:
        cfg = load_job(job, parse_sets(set_))
        uri = run_curate(cfg, split_spec(input), output)
    except (ConfigError, InputError) as e:
        _fail(e)
    typer.echo(uri)


@app.command()
def prepare(
    source: str = typer.Argument(..., help="JSONL/JSON/CSV/Parquet files (glob, comma list, s3://) or a datasets folder."),
    output: str = typer.Argument(..., help="Folder (local or s3://) for the prompt shards."),
    format: str = typer.Option(..., "--format", help="math | gsm8k | code-stdio | humaneval | choice | generic"),
    name: Optional[str] = typer.Option(None, help="Source name (ids, `source` column); default: the source's file name."),
    rows_per_shard: int = typer.Option(10_000, "--rows-per-shard", min=1),
    map_: list[str] = typer.Option([], "--map", help="generic: FIELD=COLUMN, e.g. --map prompt=question."),
    const: list[str] = typer.Option([], "--const", help="generic: FIELD=VALUE, e.g. --const domain=math."),
    mapping_file: Optional[Path] = typer.Option(None, "--mapping", help="generic: YAML with `map:` and `const:`."),
    id_column: str = typer.Option("id", help="The source's own id column, if any."),
    strict: bool = typer.Option(False, "--strict", help="Fail on the first bad row instead of skipping and reporting it."),
    no_dedup: bool = typer.Option(False, "--no-dedup", help="Keep duplicate prompts."),
    decontaminate: list[str] = typer.Option([], help="Benchmark files whose problems must not leak in (repeatable)."),
    ngram: int = typer.Option(8, help="n-gram size for decontamination (8-13 as open-r1/OpenThoughts)."),
) -> None:
    """Turn prompt sources into validated prompt shards for `generate`."""
    import yaml

    from pipeline.prepare import FORMATS, BadRow, PrepareOptions, generic
    from pipeline.prepare import prepare as run_prepare

    try:
        if format == "generic":
            spec = yaml.safe_load(mapping_file.read_text()) if mapping_file else {}
            mapping = {**(spec.get("map") or {}), **split_pairs(map_)}
            if "prompt" not in mapping:
                raise ConfigError("generic format needs --map prompt=COLUMN")
            convert = generic(mapping, {**(spec.get("const") or {}), **split_pairs(const)})
        elif format in FORMATS:
            convert = FORMATS[format]
        else:
            raise ConfigError(f"unknown format {format!r}; one of {', '.join([*FORMATS, 'generic'])}")
        source_name = name or split_spec(source)[0].rstrip("/").rsplit("/", 1)[-1].split(".")[0]
        with console.Progress(None, unit="rows", kept="written", tokens=False) as progress:
            opts = PrepareOptions(source_name=source_name, id_column=id_column or None, rows_per_shard=rows_per_shard,
                                  strict=strict, dedup=not no_dedup, decontaminate=decontaminate, ngram=ngram,
                                  progress=progress.set)
            report = run_prepare(source, output, convert, opts)
            progress.set(report.read, report.written)
    except (BadRow, FileNotFoundError, ConfigError) as e:
        _fail(e)
    console.prepare_summary(report.read, report.written, report.dropped, report.shards, report.bad_rows,
                            f"{output.rstrip('/')}/_prepare_report.json")
    typer.echo(output)



@app.command()
def submit(
    job: Path = typer.Option(DEFAULT_JOB, "--job", metavar="PATH", show_default="jobs/demo.yaml",
                             help="Job spec (YAML), relative to the repo root."),
    shards: Optional[str] = typer.Option(None, metavar="GLOB", help="Glob or comma-separated list of local paths / s3:// URIs."),
    output: Optional[str] = typer.Option(None, metavar="URI", help="Output folder or s3:// URI."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a job key (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the submission command instead of running it."),
) -> None:
    """Submit `generate` to the Ray cluster at RAY_ADDRESS, with a stable submission id.

    The id is a hash of the resolved job, so retrying the same command cannot start a twin run:
    Ray refuses a second job with the same submission id."""
    import hashlib
    import json
    import os
    import shlex
    import subprocess

    try:
        cfg = load_job(job, parse_sets(set_), shards=split_spec(shards) if shards else None, output=output)
    except ConfigError as e:
        _fail(e)
    digest = hashlib.sha1(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]
    submission_id = f"distill-{cfg.name}-{digest}"
    job_arg = os.path.relpath(job) if os.path.abspath(job).startswith(os.getcwd() + os.sep) else str(job)
    entry = ["python", "-m", "pipeline", "generate", "--job", job_arg]
    entry += ["--shards", shards] if shards else []
    entry += ["--output", output] if output else []
    for item in set_:
        entry += ["--set", item]
    runtime_env = {"working_dir": ".", "excludes": [".venv", ".cache", "out", ".git", "bench/tmp"]}
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [ray_cli if os.path.exists(ray_cli) else "ray", "job", "submit", "--submission-id", submission_id,
           "--runtime-env-json", json.dumps(runtime_env), "--", *entry]
    if dry_run or not os.environ.get("RAY_ADDRESS"):
        if not dry_run:
            typer.echo("RAY_ADDRESS is not set: nothing submitted; the command would be:", err=True)
        typer.echo(shlex.join(cmd))
        return
    typer.echo(f"submission id {submission_id} (a retry of this command is refused by Ray)", err=True)
    raise typer.Exit(subprocess.call(cmd))
