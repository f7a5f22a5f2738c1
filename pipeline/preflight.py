"""Pre-flight: every check of a job that can run before Ray starts, so a mistake costs seconds and
one line, not an engine start-up and a traceback from inside an actor.

`check_job` needs only the job (and vLLM's argument classes, when installed): units built from
their names and parameters, domains, sampling accepted by `vllm.SamplingParams`, engine kwargs
that are `vllm` engine arguments, the judge's template. `submit` runs it on the submitting
machine. `check_models` looks at the model folders (or Hugging Face ids) and their tokenizers, so
it runs where the job runs. Every failure is a ConfigError whose message is one line.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from pipeline.config import ConfigError, EngineSpec, JobConfig, closest
from pipeline.errors import scrub
from pipeline.schemas import domains, reason_codes

HUB_ID = re.compile(r"[\w.-]{1,96}(/[\w.-]{1,96})?")
ENGINE_SET = ("seed", "output_kind")
"""Sampling keys the engine stage sets itself per request (seed derived per prompt)."""


def preflight(job: JobConfig) -> None:
    """All checks; raises ConfigError naming the key at fault."""
    check_job(job)
    check_models(job)


def check_job(job: JobConfig) -> None:
    """The checks that need no model files and no cluster."""
    check_units(job)
    _check_domains(job)
    _check_chat_template(job.render.chat_template)
    if job.judge.enabled:
        _check_judge(job)
    try:
        import vllm  # noqa: F401
    except ImportError:  # a thin client (e.g. `submit` from a laptop): the job's own pre-flight checks
        return
    check_sampling("sampling", job.sampling, engine_stage=True)
    check_engine("engine", job.engine, judge=False)
    if job.judge.enabled:
        check_sampling("judge.sampling", job.judge.sampling, engine_stage=False)
        check_engine("judge.engine", job.judge.engine, judge=True)


def check_units(job: JobConfig) -> None:
    """Build every verifier and filter the job names, as the check stage will."""
    from pipeline.filter import FILTERS
    from pipeline.verify import VERIFIERS

    for domain, spec in job.verify.domains.items():
        try:
            VERIFIERS.build(spec.name, **spec.params)
        except ValueError as e:
            raise ConfigError(f"verify.domains.{domain}: {e}") from None
    for i, spec in enumerate(job.filters):
        try:
            FILTERS.build(spec.name, **spec.params)
        except ValueError as e:
            raise ConfigError(f"filters[{i}]: {e}") from None


def _check_domains(job: JobConfig) -> None:
    known = list(domains())
    named = [("verify.domains", d) for d in job.verify.domains] + [("render.instructions", d) for d in job.render.instructions]
    if job.judge.enabled:
        named += [("judge.domains", d) for d in job.judge.domains]
    for where, domain in named:
        if domain not in known:
            raise ConfigError(f"{where}: {domain!r} is not a domain (one of {', '.join(known)}){closest(domain, known)}")


def _check_chat_template(template: str | None) -> None:
    if template is None:
        return
    import jinja2

    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"render.chat_template: line {e.lineno}: {e.message}") from None


def _check_judge(job: JobConfig) -> None:
    from pipeline.verify.judge import DEFAULT_PROMPT

    template = job.judge.prompt or DEFAULT_PROMPT
    try:
        template.format(prompt="", reference="", answer="")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"judge.prompt: cannot fill the template ({type(e).__name__}: {e}); it may use "
                          "{prompt}, {reference} and {answer}, and must write other braces as {{ }}") from None
    codes = sorted(reason_codes())
    for reason in job.judge.reasons:
        if reason not in codes:
            raise ConfigError(f"judge.reasons: {reason!r} is not a reason code (schemas/reasons.json){closest(reason, codes)}")


def check_sampling(where: str, sampling: dict[str, Any], engine_stage: bool) -> None:
    """`vllm.SamplingParams(**sampling)` as the stage will build it."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    fields = [f for f in SamplingParams.__struct_fields__ if not f.startswith("_")]
    for key in sampling:
        if key not in fields:
            raise ConfigError(f"{where}.{key}: not an argument of vllm.SamplingParams{closest(key, fields)}")
    args = dict(sampling)
    if engine_stage:
        if "output_kind" in args:
            raise ConfigError(f"{where}.output_kind: set by the pipeline (it collects each request's final output)")
        seed = args.pop("seed", None)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"{where}.seed: must be an integer (each prompt's seed is derived from it), got {seed!r}")
        args.update(seed=0 if seed is not None else None, output_kind=RequestOutputKind.FINAL_ONLY)
    from vllm.exceptions import VLLMError

    try:
        SamplingParams(**args)
    except (TypeError, ValueError, VLLMError) as e:
        raise ConfigError(f"{where}: {scrub(str(e))}") from None


def _engine_argument_types() -> dict[str, Any]:
    """vLLM's engine arguments and their types (from the dataclass's annotations, where they resolve)."""
    import vllm.engine.arg_utils as arg_utils

    out: dict[str, Any] = {}
    for f in dataclasses.fields(arg_utils.AsyncEngineArgs):
        try:
            # vLLM's own annotations (strings under `from __future__ import annotations`)
            out[f.name] = eval(f.type, vars(arg_utils)) if isinstance(f.type, str) else f.type  # noqa: S307
        except Exception:
            out[f.name] = Any  # an annotation that does not resolve here: the name alone is checked
    return out


def check_engine(where: str, spec: EngineSpec, judge: bool) -> None:
    """Every `engine.kwargs` key is an argument of vLLM's engine (`vllm.LLM` for the judge) and
    its value fits the argument's type; a typo names the closest valid key."""
    import inspect

    from pydantic import TypeAdapter, ValidationError

    types = _engine_argument_types()
    if judge:
        from vllm import LLM

        own = [p for p in inspect.signature(LLM.__init__).parameters if p not in ("self", "kwargs")]
        types.update({p: Any for p in own if p not in types})
    names = sorted(types)
    for key, value in spec.llm_kwargs("").items():
        if key == "model":
            continue
        key_path = f"{where}.{key}" if key in EngineSpec.model_fields else f"{where}.kwargs.{key}"
        if key not in types:
            raise ConfigError(f"{key_path}: not a vLLM engine argument{closest(key, names)}")
        try:
            adapter = TypeAdapter(types[key])
        except Exception:
            continue  # a type pydantic cannot describe: vLLM checks it at start
        try:
            adapter.validate_python(value)
        except Exception as e:
            problem = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
            raise ConfigError(f"{key_path}: {value!r} is not valid ({problem})") from None


def check_models(job: JobConfig) -> None:
    """The generating model (and the judge's) can be loaded: a local folder with a config and a
    tokenizer whose chat template renders, or a Hugging Face id that is cached or on the Hub."""
    folder = model_folder("model.path", job.model.path)
    if folder is not None:
        _check_tokenizer("model.path", folder, job.render.chat_template)
    if job.judge.enabled and job.judge.model is not None:
        judge = model_folder("judge.model.path", job.judge.model.path)
        if judge is not None:
            _check_tokenizer("judge.model.path", judge, None)


def model_folder(where: str, path: str) -> str | None:
    """The local folder holding the model, None for a Hub id the engines will download (or a
    remote URI), ConfigError for a model that cannot be found. Relative paths are relative to the
    current directory (config.py made those that exist absolute)."""
    if "://" in path:
        return None
    if os.path.isabs(path) or os.path.exists(path):
        if os.path.isfile(path) and path.endswith(".gguf"):
            return None
        if not os.path.isdir(path):
            raise ConfigError(f"{where}: model not found: {path} (run `make setup` for the default model)")
        if not any(os.path.exists(os.path.join(path, f)) for f in ("config.json", "params.json")):
            raise ConfigError(f"{where}: {path} has no config.json: not a Hugging Face model folder")
        return path
    if not HUB_ID.fullmatch(path):
        raise ConfigError(f"{where}: model not found: {path} (relative to {os.getcwd()})")
    return _hub_model(where, path)


def _hub_model(where: str, repo_id: str) -> str | None:
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return os.path.dirname(cached)
    here = f"{where}: {repo_id!r} is not a folder (relative to {os.getcwd()}) and not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{here}, and HF_HUB_OFFLINE is set: download it first (`hf download {repo_id}`) or give its folder")
    try:
        HfApi().model_info(repo_id, timeout=10)
    except GatedRepoError:
        raise ConfigError(f"{where}: {repo_id!r} is gated on the Hugging Face Hub: accept its terms and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{here}, nor a model on the Hugging Face Hub (a private one needs HF_TOKEN)") from None
    except Exception as e:
        raise ConfigError(f"{here}, and the Hub cannot be reached to fetch it ({type(e).__name__}): download it "
                          f"where the Hub is reachable (`hf download {repo_id}`) or give its folder") from None
    return None  # on the Hub: the engines download it


def _check_tokenizer(where: str, folder: str, chat_template: str | None) -> None:
    """What the render stage does first: load the tokenizer and render one chat turn."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise ConfigError(f"{where}: cannot load a tokenizer from {folder} ({type(e).__name__}: {scrub(str(e))[:300]})") from None
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True,
                                      chat_template=chat_template)
    except Exception as e:
        raise ConfigError(f"{where}: the chat template cannot render a prompt ({scrub(str(e))[:300]}); "
                          "set render.chat_template") from None
