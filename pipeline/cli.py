"""`python -m pipeline ...`: generate, curate."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from pipeline.config import DEFAULT_JOB, ConfigError, load_job, parse_sets
from pipeline.read import InputError, split_spec

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Distillation data pipeline.")


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def generate(
    job: Path = typer.Option(DEFAULT_JOB, "--job", help="Job spec (YAML)."),
    shards: Optional[str] = typer.Option(None, help="Glob or comma-separated list of local paths / s3:// URIs."),
    output: Optional[str] = typer.Option(None, help="Output folder or s3:// URI."),
    set_: list[str] = typer.Option([], "--set", help="Override a job key, e.g. --set sampling.n=8 (repeatable)."),
) -> None:
    """Generate, verify, filter and publish; prints the dataset URI last."""
    from pipeline.run import generate as run_generate

    try:
        cfg = load_job(job, parse_sets(set_), shards=split_spec(shards) if shards else None, output=output)
        uri = run_generate(cfg)
    except (ConfigError, InputError) as e:
        _fail(e)
    typer.echo(uri)


@app.command()
def curate(
    input: str = typer.Argument(..., help="Parquet file(s): path, glob, comma list or s3:// URI."),
    output: str = typer.Argument(..., help="A .parquet file or a folder (local or s3://)."),
    job: Optional[Path] = typer.Option(None, "--job", help="Job spec for verifier/filter settings."),
    set_: list[str] = typer.Option([], "--set", help="Override a job key, e.g. --set verify.timeout_s=5."),
) -> None:
    """Verify and filter existing completions: every input row plus accepted/reject_reason."""
    from pipeline.run import curate as run_curate

    try:
        cfg = load_job(job, parse_sets(set_))
        uri = run_curate(cfg, split_spec(input), output)
    except (ConfigError, InputError) as e:
        _fail(e)
    typer.echo(uri)
