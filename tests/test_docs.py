"""The docs match the code: every job key, CLI command/option and make target they name exists,
the job reference lists every key of the config model with its default, and the Makefile, the
CLI and the job file use one name per concept."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any, Iterator

import click
import pytest
import typer
import yaml
from typer.testing import CliRunner
from pydantic import BaseModel

from pipeline.cli import app
from pipeline.config import REPO_ROOT, JobConfig

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
REFERENCE = REPO_ROOT / "docs" / "job-reference.md"
MAKEFILE = (REPO_ROOT / "Makefile").read_text()
DEPRECATED_MAKE_VARIABLES = {"OUT"}
# Pages other people write in parallel to this test; the README links them already. Remove this
# set once they are merged: from then on their links are checked like every other.
PENDING_PAGES: set[str] = set()


# -- what the code has ---------------------------------------------------------------------------

def _model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (also inside Optional), unless it holds many (dict or list)."""
    if typing.get_origin(annotation) in (dict, list):
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    found = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return found[0] if found else None


def job_keys(model: type[BaseModel] = JobConfig, prefix: str = "") -> dict[str, Any]:
    """Every key of the job file -> its field: leaves, and the optional sections (`judge.model`);
    a section that is always there (`resources`) is only its keys."""
    keys: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        sub = _model(field.annotation)
        optional = type(None) in typing.get_args(field.annotation)
        if sub is None or optional:
            keys[prefix + name] = field
        if sub is not None:
            keys.update(job_keys(sub, f"{prefix}{name}."))
    return keys


KEYS = job_keys()
OPEN = {k for k, f in KEYS.items() if typing.get_origin(f.annotation) in (dict, list)}
"""Keys whose values are mappings or lists of the user's own (sampling, engine.kwargs, filters...)."""
TOP = {k.split(".")[0] for k in KEYS}


def known_key(key: str) -> bool:
    return key in KEYS or any(key.startswith(k + ".") for k in OPEN)


def cli() -> tuple[click.Group, dict[str, set[str]]]:
    group = typer.main.get_command(app)
    options = {name: {o for p in cmd.params for o in p.opts + p.secondary_opts if o.startswith("-")}
               for name, cmd in group.commands.items()}
    options[""] = {o for p in group.params for o in p.opts + p.secondary_opts if o.startswith("-")}
    return group, options


GROUP, OPTIONS = cli()
TARGETS = set(re.findall(r"^([a-z][\w-]*):", MAKEFILE, re.M))
MAKE_VARIABLES = set(re.findall(r"\$\(([A-Z_]+)\)", MAKEFILE)) | set(re.findall(r"^ifdef ([A-Z_]+)", MAKEFILE, re.M))


# -- what the docs say ---------------------------------------------------------------------------

def code(doc: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every fenced code line and every inline code span."""
    fenced = False
    for n, line in enumerate(doc.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            yield n, line
        else:
            yield from ((n, span) for span in re.findall(r"`([^`]+)`", line))


def spans(doc: Path) -> Iterator[tuple[int, str]]:
    """Inline code spans only."""
    fenced = False
    for n, line in enumerate(doc.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield from ((n, span) for span in re.findall(r"`([^`]+)`", line))


def sections_about_the_cli(doc: Path) -> set[int]:
    """Line numbers of the sections (heading to heading) whose heading names one of this pipeline's
    commands. Elsewhere a lone `--x` may be another tool's option (`ray start --gpus`, bwrap's)."""
    lines = doc.read_text().splitlines()
    starts, fenced = [0], False
    for n, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            starts.append(n)
    ours: set[int] = set()
    for start, end in zip(starts, [*starts[1:], len(lines)]):
        if re.search(r"\b(generate|prepare|curate|submit|mix)\b", lines[start]):
            ours.update(range(start + 1, end + 1))
    return ours


def where(doc: Path, n: int) -> str:
    return f"{doc.relative_to(REPO_ROOT)}:{n}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_job_keys_the_docs_name_exist(doc):
    wrong = []
    for n, text in spans(doc):
        if re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+", text) and text.split(".")[0] in TOP and not known_key(text):
            wrong.append(f"{where(doc, n)}: {text}")
    for n, text in code(doc):
        for key in re.findall(r"--set '?([a-z_][\w.]*)=", text):  # KEY=VALUE is a placeholder
            if not known_key(key):
                wrong.append(f"{where(doc, n)}: --set {key}")
        for value in re.findall(r"\bSET='([^']*)'", text):
            wrong += [f"{where(doc, n)}: SET {item}" for item in value.split()
                      if item[:1].islower() and not known_key(item.split("=")[0])]
    assert not wrong, "job keys that do not exist:\n" + "\n".join(wrong)


def _command_lines(text: str) -> Iterator[list[str]]:
    """The words of each `python -m pipeline ...` invocation in a line (up to a comment or pipe)."""
    for match in re.finditer(r"python -m pipeline(?![.\w])(.*)", text):
        rest = re.split(r"\s(?:#|\||&&|;)\s?", match.group(1))[0]
        yield [w.strip("[]") for w in rest.split()]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_cli_commands_and_options_the_docs_name_exist(doc):
    wrong = []
    for n, text in code(doc):
        for words in _command_lines(text):
            command, i = "", 0
            while i < len(words) and words[i].startswith("-"):  # options of the group itself
                if words[i] not in OPTIONS[""]:
                    wrong.append(f"{where(doc, n)}: global option {words[i]}")
                i += 2 if words[i] == "--progress-every" else 1
            if i < len(words) and words[i] not in ("...", "<command>"):
                command = words[i]
                if command not in GROUP.commands:
                    wrong.append(f"{where(doc, n)}: no command {command!r}")
                    continue
                for word in words[i + 1:]:
                    option = word.split("=")[0]
                    if option.startswith("--") and option not in OPTIONS[command]:
                        wrong.append(f"{where(doc, n)}: {command} has no option {option}")
    every_option = set().union(*OPTIONS.values())
    ours = sections_about_the_cli(doc)
    for n, text in spans(doc):
        if n in ours and text.startswith("--") and text.split()[0].split("=")[0] not in every_option:
            wrong.append(f"{where(doc, n)}: no command has {text.split()[0]}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_make_targets_and_variables_the_docs_name_exist(doc):
    wrong = []
    for n, text in code(doc):
        for target, args in re.findall(r"\bmake ([a-z][\w-]*)((?: +[A-Z_]+=(?:'[^']*'|\S*))*)", text):
            if target not in TARGETS:
                wrong.append(f"{where(doc, n)}: no make target {target!r}")
            for var in re.findall(r"([A-Z_]+)=", args):
                if var not in MAKE_VARIABLES or var in DEPRECATED_MAKE_VARIABLES:
                    wrong.append(f"{where(doc, n)}: make {target} {var}= is not a variable the Makefile uses")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_between_docs_lead_somewhere(doc):
    broken = []
    for target in re.findall(r"\]\(([^)#]+\.md)(?:#[^)]*)?\)", doc.read_text()):
        if "://" in target:
            continue
        path = (doc.parent / target).resolve()
        if not path.exists() and path.name not in PENDING_PAGES:
            broken.append(target)
    assert not broken, f"{doc.name} links to missing pages: {broken}"


# -- the job reference ---------------------------------------------------------------------------

def reference_rows() -> dict[str, str]:
    """Key -> default cell of every table row of docs/job-reference.md that starts with a key."""
    rows = {}
    for line in REFERENCE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"`[a-z_.]+`", cells[0]):
            key = cells[0].strip("`")
            assert key not in rows, f"{key} is listed twice"
            rows[key] = cells[1]
    return rows


def shown(default: Any) -> str | None:
    """A scalar default as the reference writes it (YAML spelling; repository paths relative)."""
    if default is None:
        return "none"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, (int, float)):
        return repr(default)
    if isinstance(default, str):
        return default.replace(f"{REPO_ROOT}/", "")
    return None  # lists, mappings, models: described in words


def test_the_job_reference_lists_every_key_of_the_config_model_with_its_default():
    rows = reference_rows()
    missing = sorted(set(KEYS) - set(rows))
    extra = sorted(set(rows) - set(KEYS))

    def row(key: str) -> str:
        field = KEYS[key]
        default = field.default_factory() if field.default_factory else field.default
        return f"| `{key}` | `{shown(default) or default!r}` | {field.description or '...'} |"

    assert not missing, "add to docs/job-reference.md:\n" + "\n".join(row(k) for k in missing)
    assert not extra, f"docs/job-reference.md lists keys the config model does not have: {extra}"
    wrong = []
    for key, field in KEYS.items():
        default = field.default_factory() if field.default_factory else field.default
        if shown(default) is not None and rows[key] != f"`{shown(default)}`":
            wrong.append(f"{key}: the reference says {rows[key]}, the code {shown(default)}")
    assert not wrong, "\n".join(wrong)


def test_the_job_references_examples_are_valid_jobs():
    blocks = re.findall(r"```yaml\n(.*?)```", REFERENCE.read_text(), re.S)
    assert blocks
    for block in blocks:
        JobConfig.model_validate(yaml.safe_load(block))


# -- one name per concept ------------------------------------------------------------------------

def test_the_makefile_passes_each_variable_to_the_option_of_the_same_name():
    pairs = re.findall(r"--([a-z][\w-]*) '?\$\(([A-Z_]+)\)", MAKEFILE)
    assert ("job", "JOB") in pairs and ("output", "OUTPUT") in pairs
    # the variable is the option's name, or that name qualified (GPU_JOB: the job of bench-gpu)
    assert all(var.lower().split("_")[-len(option.split("-")):] == option.split("-") for option, var in pairs), pairs
    for command, line in re.findall(r"-m pipeline (\w+) ('\$\([A-Z_]+\)'(?: '\$\([A-Z_]+\)')*)", MAKEFILE):
        arguments = [{p.name, (p.metavar or p.name).split(".")[0].lower()}  # mix_file, shown as MIX.yaml
                     for p in GROUP.commands[command].params if p.param_type_name == "argument"]
        variables = [v.lower() for v in re.findall(r"\$\(([A-Z_]+)\)", line)]
        assert len(variables) == len(arguments) and all(v in a for v, a in zip(variables, arguments)), (command, line)


def test_help_shows_no_type_after_flags():
    runner = CliRunner()
    for name in GROUP.commands:
        text = runner.invoke(app, [name, "--help"]).output
        assert "<bool>" not in text and "--no-" not in text.replace("--no-dedup", ""), text
