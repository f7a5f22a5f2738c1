"""The job spec: a typed model of `jobs/*.yaml`.

Unknown keys are errors everywhere except the two pass-through mappings that mirror vLLM
(`sampling:` -> `SamplingParams`, `engine.kwargs:` -> `LLM`), which vLLM itself validates
in the pre-flight check before any engine starts.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
DEFAULT_JOB = REPO_ROOT / "jobs" / "demo.yaml"

R1_MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Strict):
    """What generates: any Hugging Face id or local folder vLLM can load."""

    path: str = str(DEFAULT_MODEL_DIR)
    name: str | None = Field(None, description="Recorded in samples and the card; defaults to the path's last part.")
    reasoning: bool = Field(False, description="The model thinks in <think>...</think> (R1 and its distills).")

    @property
    def display_name(self) -> str:
        return self.name or self.path.rstrip("/").split("/")[-1]


class EngineSpec(Strict):
    """Arguments of vLLM's engine (`vllm.AsyncEngineArgs`): the common ones typed, the rest in `kwargs`."""

    tensor_parallel_size: int = Field(1, ge=1)
    dtype: str = "auto"
    max_model_len: int | None = Field(None, ge=16)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    enforce_eager: bool = False
    batch_invariant: bool = Field(
        False,
        description="vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT=1, vllm/model_executor/determinism): a "
        "sample depends on its prompt and seed only, not on what the engine batched with it. GPUs only; slower.",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kwargs")
    @classmethod
    def _one_engine(cls, v: dict[str, Any]) -> dict[str, Any]:
        """An engine actor is one engine on one node: typed keys stay typed, data parallelism is
        more actors, and the executor is one that keeps the engine's GPUs with the actor."""
        if "model" in v:
            raise ValueError("set model.path instead of engine.kwargs.model")
        typed = sorted(set(v) & {"tensor_parallel_size", "dtype", "max_model_len", "gpu_memory_utilization",
                                 "enforce_eager"})
        if typed:
            raise ValueError(f"set {', '.join(typed)} as engine.<key>, not in engine.kwargs")
        if v.get("data_parallel_size", 1) != 1:
            raise ValueError("data_parallel_size: each engine actor is one data-parallel replica; "
                             "raise resources.engine_actors (judge.actors for the judge) instead")
        pp = v.get("pipeline_parallel_size", 1)
        if isinstance(pp, bool) or not isinstance(pp, int) or pp < 1:
            raise ValueError(f"pipeline_parallel_size must be an integer >= 1, got {pp!r}")
        backend = v.get("distributed_executor_backend")
        if backend not in (None, "mp", "uni", "ray"):
            raise ValueError(f"distributed_executor_backend {backend!r}: use mp (default) or ray")
        return v

    @property
    def gpus(self) -> int:
        """GPUs one engine uses, all on one node: tensor x pipeline parallel."""
        return self.tensor_parallel_size * int(self.kwargs.get("pipeline_parallel_size", 1))

    @property
    def ray_workers(self) -> bool:
        """vLLM runs its workers as Ray actors (they need a placement group, not the actor's GPUs)."""
        return self.kwargs.get("distributed_executor_backend") == "ray"

    def llm_kwargs(self, model: str) -> dict[str, Any]:
        """Everything `vllm.AsyncEngineArgs(**...)` receives."""
        args: dict[str, Any] = {
            "model": model,
            "tensor_parallel_size": self.tensor_parallel_size,
            "dtype": self.dtype,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "enforce_eager": self.enforce_eager,
        }
        if self.max_model_len is not None:
            args["max_model_len"] = self.max_model_len
        return {**args, **self.kwargs}


class RenderSpec(Strict):
    """R1's usage rules: no system prompt, a per-domain instruction, optional <think> prefill."""

    system_prompt: str | None = None
    instructions: dict[str, str] = Field(default_factory=lambda: {"math": R1_MATH_INSTRUCTION})
    think_prefill: bool | None = Field(None, description="Start the assistant turn with '<think>\\n'; defaults to model.reasoning.")
    chat_template: str | None = Field(None, description="Jinja template overriding the tokenizer's own.")
    max_reasoning_words: int | None = Field(
        None, ge=0,
        description="R1's non-reasoning data: a sample keeps the model's reasoning only when it has 1..this many "
        "words, else only the answer after </think> (0: never; trivial queries get no chain of thought). "
        "None keeps every reasoning.")


class UnitSpec(Strict):
    """One unit from a registry (`pipeline.verify.VERIFIERS`, `pipeline.filter.FILTERS`) and its parameters."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class VoteSpec(Strict):
    """Answer agreement for prompts without a reference: the samples' final answers vote (math
    answers grouped by the math verifier's equivalence, choice letters exactly)."""

    min_votes: int = Field(3, ge=1, description="Samples the winning answer needs.")
    min_share: float = Field(0.6, gt=0.5, le=1, description="Share of the answering samples the winning answer "
                             "needs (above one half, so a vote has at most one winner).")


class VerifySpec(Strict):
    """Which verifier checks which domain. Domains without one are rejected as unknown_domain."""

    domains: dict[str, UnitSpec] = Field(
        default_factory=lambda: {
            "math": UnitSpec(name="math"),
            "choice": UnitSpec(name="choice"),
            "code": UnitSpec(name="code"),
            "general": UnitSpec(name="accept"),
        }
    )
    timeout_s: float = Field(10.0, gt=0, description="Hard wall-clock kill per check.")
    memory_mb: int = Field(2048, ge=512, description="Address-space cap of each verifier worker (below ~512 MB Python itself fails).")
    workers: int | None = Field(
        None, ge=1,
        description="Parallel checks per CPU stage actor (math worker processes, sandboxed test runs); "
        "default: the actor's CPUs (resources.cpu_stage_cpus) rounded up.",
    )
    vote: VoteSpec | None = Field(
        None, description="Majority vote for samples the verifier rejected as no_reference; off when absent.")


class PromptSpec(Strict):
    """Prompt-level curation before generation (no GPU time for duplicates or leaked benchmarks)."""

    dedup: bool = Field(True, description="Skip prompts equal up to case, spacing and punctuation to an earlier one, "
                       "or to one the output already committed under another id.")
    decontaminate: list[str] = Field(default_factory=list, description="Benchmark files (jsonl/json/csv/parquet) to keep out.")
    ngram: int = Field(8, ge=3, le=50, description="n-gram size for decontamination (open-r1 uses 8, OpenThoughts 13).")


class SelectSpec(Strict):
    """Rejection sampling among a prompt's accepted samples."""

    keep_per_prompt: int | None = Field(None, ge=1, description="Keep at most this many accepted samples per prompt.")
    policy: Literal["first", "shortest", "random"] = "first"
    dedup_completions: bool = Field(True, description="Drop accepted completions identical up to case/spacing/punctuation.")
    pass_rate: tuple[float, float] | None = Field(
        None, description="Keep only prompts whose pass rate (passed samples / samples) lies in [low, high], "
        "e.g. [0.1, 0.6] for an RL curriculum; the others' samples are rejected as pass_rate_band.")

    @field_validator("pass_rate")
    @classmethod
    def _band(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 <= v[0] <= v[1] <= 1:
            raise ValueError("select.pass_rate is [low, high] with 0 <= low <= high <= 1")
        return v


class AdaptiveSpec(Strict):
    """Sampling in rounds (`sampling.adaptive`): round 0 samples `initial_n` per prompt; each later
    round samples `round_n` more for every prompt with fewer than `target_accepted` passed samples
    (or an undecided vote) and fewer than `max_n` samples."""

    initial_n: int = Field(4, ge=1)
    round_n: int = Field(4, ge=1)
    max_n: int = Field(16, ge=1)
    target_accepted: int = Field(1, ge=1, description="k: a prompt stops once this many samples passed.")
    give_up_after: int | None = Field(
        None, ge=1, description="Stop a prompt none of whose first this many samples passed: too hard for the "
        "model (on real math, such prompts rarely pass later and their failures are the longest samples; "
        "docs/adaptive-sampling.md has the trade-off).")

    @model_validator(mode="after")
    def _whole_rounds(self) -> "AdaptiveSpec":
        extra = self.max_n - self.initial_n
        if extra < 0 or extra % self.round_n:
            raise ValueError(f"max_n ({self.max_n}) must be initial_n ({self.initial_n}) plus a whole number of "
                             f"rounds of round_n ({self.round_n})")
        return self

    @property
    def rounds(self) -> int:
        return 1 + (self.max_n - self.initial_n) // self.round_n

    def samples(self, round: int) -> range:
        """The sample indexes of a round: rounds continue each other, never repeat an index."""
        if round == 0:
            return range(self.initial_n)
        first = self.initial_n + (round - 1) * self.round_n
        return range(first, first + self.round_n)


class JudgeSpec(Strict):
    """An LLM judge (a second vLLM actor pool) for samples the rules rejected or could not decide,
    and for prompts without a reference (R1 used DeepSeek-V3 this way)."""

    enabled: bool = False
    model: ModelSpec | None = Field(None, description="Defaults to the generating model.")
    engine: EngineSpec | None = Field(
        None, description="The judge's engine: the generator's `engine:` settings, with the keys set here replaced.")
    sampling: dict[str, Any] = Field(default_factory=lambda: {"temperature": 0.0, "max_tokens": 256})
    prompt: str | None = Field(None, description="Template with {prompt}, {reference}, {answer}; see pipeline/verify/judge.py.")
    reasons: list[str] = Field(default_factory=lambda: ["answer_mismatch", "no_answer", "no_reference"],
                               description="Rule verdicts the judge may overturn.")
    domains: list[str] = Field(default_factory=lambda: ["general"], description="Domains judged even when accepted (no reference).")
    actors: int = Field(1, ge=1)
    cpus: float = Field(1, gt=0)
    batch_size: int = Field(64, ge=1)


class ResourceSpec(Strict):
    """How the run uses the cluster: the only place that talks about actors and batches."""

    engine_actors: int = Field(1, ge=1, description="vLLM engines, each on one node with engine.tensor_parallel_size "
                               "x pipeline_parallel_size GPUs.")
    engine_cpus: float = Field(1, gt=0)
    batch_size: int = Field(
        8, ge=1,
        description="Prompts per engine task. A task's samples leave the engine together, when its slowest sequence "
        "ends: small groups stream results out and bound what a restart replays.",
    )
    engine_batches_in_flight: int | None = Field(
        None, ge=1,
        description="Engine tasks each engine actor holds at once; default: enough to offer the engine 1.5x its "
        "running capacity (max_num_seqs). The engine itself is offered at most that many sequences.",
    )
    engine_restarts: int = Field(3, ge=0, description="Times Ray restarts an engine actor whose engine died; "
                                 "in-flight tasks are replayed on the new engine. One death more fails the run.")
    start_timeout_s: float = Field(
        1800, gt=0,
        description="How long the run waits for its actors to start (engines download and load the model) before it "
        "fails with a placement error instead of waiting for resources forever.",
    )
    stall_timeout_s: float = Field(
        7200, gt=0,
        description="Fail the run when nothing moves for this long (Ray Data's no-progress guard). An engine task "
        "returns when its longest sequence ends: tens of minutes for 32k-token traces on a loaded GPU.",
    )
    engine_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each engine actor also requests, e.g. {gpu_node: 1}: engines go only to "
        "nodes that advertise them.",
    )
    cpu_actors: int = Field(1, ge=1, description="Actors for the render and verify stages.")
    cpu_stage_cpus: float = Field(0.5, gt=0, description="CPUs reserved by each render/verify actor.")
    check_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each verify (check) actor requests instead of CPUs, e.g. {sandbox: 1}: "
        "check actors run only on nodes that advertise them (sandbox nodes advertise no CPU, so nothing else does).",
    )
    cpu_batch_size: int = Field(256, ge=1)
    background_nice: int = Field(
        10, ge=0, le=19,
        description="Niceness of everything but the engines (CPU-stage actors; on a local cluster also the driver "
        "and Ray's processes): verification never slows generation on a shared node. 0 turns it off.",
    )


class CommitSpec(Strict):
    """How often finished prompts are committed: what a killed run keeps, against objects written."""

    max_prompts: int = Field(256, ge=1, description="Commit once this many prompts are complete.")
    max_age_s: float = Field(30.0, gt=0, description="Commit once the oldest complete prompt waited this long.")


class JobConfig(Strict):
    """A whole run: inputs, model, sampling, checks, output."""

    name: str = "job"
    shards: list[str] = Field(default_factory=list, description="Globs, paths or s3:// URIs of prompt shards.")
    output: str = str(REPO_ROOT / "out" / "job")
    model: ModelSpec = Field(default_factory=ModelSpec)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    sampling: dict[str, Any] = Field(
        default_factory=lambda: {"n": 4, "temperature": 0.6, "top_p": 0.95, "max_tokens": 32768}
    )
    render: RenderSpec = Field(default_factory=RenderSpec)
    verify: VerifySpec = Field(default_factory=VerifySpec)
    filters: list[UnitSpec] = Field(
        default_factory=lambda: [
            UnitSpec(name=n)
            for n in ("truncated", "format", "language_mixing", "repetition", "long_paragraph", "code_in_reasoning")
        ]
    )
    prompts: PromptSpec = Field(default_factory=PromptSpec)
    judge: JudgeSpec = Field(default_factory=JudgeSpec)
    select: SelectSpec = Field(default_factory=SelectSpec)
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    commit: CommitSpec = Field(default_factory=CommitSpec)
    rows_per_data_file: int = Field(100_000, ge=1)
    lease_ttl_s: float = Field(600, ge=10, description="A run's lease on its output expires this long after its last heartbeat.")
    adaptive: AdaptiveSpec | None = Field(None, description="Written as `sampling.adaptive` (moved here on load).")

    @model_validator(mode="before")
    @classmethod
    def _adaptive_out_of_sampling(cls, raw: Any) -> Any:
        """`sampling:` goes to vLLM's SamplingParams as it is, so `sampling.adaptive` is taken out
        of it into a typed spec."""
        if not isinstance(raw, dict) or not isinstance(raw.get("sampling"), dict) or "adaptive" not in raw["sampling"]:
            return raw
        sampling = dict(raw["sampling"])
        adaptive = sampling.pop("adaptive")
        if raw.get("adaptive") is not None:
            raise ValueError("adaptive sampling is set twice (sampling.adaptive and adaptive)")
        return {**raw, "sampling": sampling, "adaptive": adaptive}

    @model_validator(mode="after")
    def _rounds_set_n(self) -> "JobConfig":
        """Under adaptive sampling each round sets `n`; a fixed `sampling.n` is replaced by round 0's."""
        if self.adaptive is not None:
            self.sampling = {**self.sampling, "n": self.adaptive.initial_n}
        return self

    @field_validator("sampling")
    @classmethod
    def _n_positive(cls, v: dict[str, Any]) -> dict[str, Any]:
        n = v.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"sampling.n must be an integer >= 1, got {n!r}")
        return v

    @property
    def n(self) -> int:
        """Samples per prompt of one request (under adaptive sampling: of the current round)."""
        return int(self.sampling.get("n", 1))

    @property
    def rounds(self) -> int:
        return self.adaptive.rounds if self.adaptive else 1

    def round_samples(self, round: int) -> range:
        """The sample indexes round `round` generates for each of its prompts."""
        if self.adaptive is None:
            return range(self.n) if round == 0 else range(0)
        return self.adaptive.samples(round)

    def for_round(self, round: int) -> "JobConfig":
        """This job with `sampling.n` set to the round's sample count (what the engines request)."""
        return self.model_copy(update={"sampling": {**self.sampling, "n": len(self.round_samples(round))}})

    @property
    def think_prefill(self) -> bool:
        return self.model.reasoning if self.render.think_prefill is None else self.render.think_prefill

    @property
    def judge_model(self) -> ModelSpec:
        return self.judge.model or self.model

    @property
    def judge_engine(self) -> EngineSpec:
        """The judge's engine: the generator's settings (a 70B job's TP and max_model_len), with what
        `judge.engine` sets replaced; its kwargs are merged into the generator's."""
        own = self.judge.engine
        if own is None:
            return self.engine
        update = {k: getattr(own, k) for k in own.model_fields_set if k != "kwargs"}
        return self.engine.model_copy(update={**update, "kwargs": {**self.engine.kwargs, **own.kwargs}})

    @property
    def verify_workers(self) -> int:
        """Checks run in parallel by each CPU stage actor: as many as it reserved CPUs."""
        return self.verify.workers or max(1, math.ceil(self.resources.cpu_stage_cpus))


class ConfigError(ValueError):
    """A job file that cannot run; the message is one line meant for the user."""


# A reasoning judge thinks before its verdict: R1 distills take thousands of tokens for a grading.
REASONING_JUDGE_MIN_TOKENS = 4096
# The grading prompt: template, problem, reference and the answer's last 4,000 characters
# (pipeline/verify/judge.py:judge_prompt), about 1,000-1,500 tokens; the rest of max_model_len is the reply's.
JUDGE_PROMPT_TOKENS = 2048


def judge_problems(job: JobConfig) -> list[str]:
    """Why the job's judge could not work, found before any engine starts (pre-flight calls this;
    `pipeline.run.check_fits` checks that the judge's GPUs can be placed)."""
    if not job.judge.enabled:
        return []
    problems = []
    # vLLM's SamplingParams default is max_tokens=16 (vllm/sampling_params.py).
    budget = int(job.judge.sampling.get("max_tokens") or 16)
    if job.judge_model.reasoning and budget < REASONING_JUDGE_MIN_TOKENS:
        problems.append(
            f"judge: the judge model reasons before its verdict (model.reasoning) but judge.sampling.max_tokens is "
            f"{budget}: replies would end mid-thought and every verdict be `unparsed`; set it >= "
            f"{REASONING_JUDGE_MIN_TOKENS} or judge with a non-reasoning model")
    limit = job.judge_engine.max_model_len
    if limit is not None and budget + JUDGE_PROMPT_TOKENS > limit:
        problems.append(
            f"judge: max_model_len {limit} leaves no room for a grading prompt (~{JUDGE_PROMPT_TOKENS} tokens) and "
            f"judge.sampling.max_tokens {budget}; raise judge.engine.max_model_len or lower max_tokens")
    return problems


def _resolve_relative(cfg: JobConfig, base: Path) -> JobConfig:
    """Relative local paths become absolute (Ray workers run elsewhere), relative to the CWD."""

    cfg.shards = [absolute(s, base) for s in cfg.shards]
    cfg.output = absolute(cfg.output, base)
    if cfg.model.path.startswith((".", "/")) or (base / cfg.model.path).exists():
        cfg.model.path = absolute(cfg.model.path, base)
    return cfg


def absolute(p: str, base: Path) -> str:
    """A local path relative to `base` made absolute; URIs and absolute paths unchanged."""
    if "://" in p or os.path.isabs(p):
        return p
    return str(base / p)


def split_pairs(items: list[str]) -> dict[str, str]:
    """`["a=1", "b.c=x"]` -> {"a": "1", "b.c": "x"}."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`["sampling.n=2", "model.reasoning=true"]` -> {"sampling.n": 2, ...} (values parsed as YAML)."""
    out = {}
    for key, text in split_pairs(items).items():
        try:
            out[key] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}={text}: not a YAML value ({getattr(e, 'problem', None) or e})") from None
    return out


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {p} is not a mapping")
        node = child
    node[leaf] = value


def load_yaml(path: str | os.PathLike[str], what: str = "file") -> Any:
    """A YAML file's content; a missing file or a syntax error is one line naming file:line:column."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"{what} not found: {path}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: YAML error: {' '.join(str(e).split())}") from None


def load_job(path: str | os.PathLike[str] | None = None, sets: dict[str, Any] | None = None, **overrides: Any) -> JobConfig:
    """Read a job YAML (or the defaults), apply overrides (top-level keys, then dotted `sets`), validate."""
    raw = read_mapping(path, "job") if path is not None else {}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    for dotted, value in (sets or {}).items():
        _set_dotted(raw, dotted, value)
    return _resolve_relative(validated(JobConfig, raw, str(path or "job"), list(sets or ())), Path.cwd())


def read_mapping(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (a job or a mix file)."""
    raw = load_yaml(path, f"{what} file") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a {what} file is a YAML mapping")
    return raw


M = TypeVar("M", bound=BaseModel)


def closest(word: str, choices: list[str]) -> str:
    """"; did you mean 'x'?" for the choice nearest a mistyped word, else nothing."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _keys_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys the model takes at `loc` (a nested section), for a mistyped key's suggestion."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):  # an item of a list: the item's model
            continue
        field = current.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        current = next((a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if current is None:
            return []
    return list(current.model_fields)


def validated(model: type[M], raw: dict[str, Any], where: str, sets: list[str] = ()) -> M:
    """The typed model of `raw`; every problem named by its dotted key on one ConfigError line, and
    by the `--set` that brought it when one did (not the file), a mistyped key with a suggestion."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            given = next((s for s in sets if s == key or s.startswith(key + ".") or key.startswith(s + ".")), None)
            if err["type"] == "extra_forbidden":
                msg = f"unknown key{closest(str(err['loc'][-1]), _keys_at(model, err['loc'][:-1]))}"
            else:
                msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{key}: {msg}{f' (from --set {given})' if given else ''}")
        raise ConfigError(f"{where}: {'; '.join(problems)}") from None
