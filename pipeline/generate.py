"""The vLLM engine stages: one async engine per Ray actor, n samples per prompt from one prefill.

What an engine actor does, and why (each against vLLM 0.32 and Ray 2.60's own sources):
- Its engine resolves its scheduler settings the way `vllm.LLM` does for the hardware it runs on
  (`UsageContext.LLM_CLASS`: 1,024 running sequences and 16,384 batched tokens on a >=70 GB GPU,
  256 and 8,192 on smaller ones), not the 128 and 2,048 `AsyncLLM.from_engine_args` would pick
  (vllm/engine/arg_utils.py: EngineArgs.get_batch_defaults, _set_default_max_num_seqs_and_batched_tokens_args).
- The engine is offered about OFFERED_PER_RUNNING times what it runs at once; further requests
  wait in the actor. A deeper queue only holds memory and work a restart would replay (ray.data.llm
  caps pending requests near max_num_seqs for the same reason: vllm_engine_stage.py:vLLMEngineWrapper).
- A task is a small group of prompts and returns as soon as its prompts are done, keeping only
  text, finish reason and token counts.
- A dead engine ends the actor's process, so that Ray restarts the actor and replays its in-flight
  tasks on a new engine (ray.data.llm does the same: vllm_engine_stage.py:_generate_with_error_handling).
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import hashlib
import logging
import math
import os
import signal
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa

from pipeline import priority, reaper
from pipeline.config import EngineSpec, JobConfig
from pipeline.parse import split_reasoning
from pipeline.render import THINK_PREFILL, chat_text
from pipeline.schemas import RENDER_COLUMNS
from pipeline.verify.judge import DEFAULT_PROMPT, JudgeVerdict, judge_prompt, parse_verdict

log = logging.getLogger(__name__)

# Sequences offered to an engine per sequence it runs at once (max_num_seqs x pipeline stages).
OFFERED_PER_RUNNING = 1.5
# The most sequences vLLM runs at once by default under UsageContext.LLM_CLASS (on GPUs with >=70 GB,
# vllm/engine/arg_utils.py:EngineArgs.get_batch_defaults): what the driver plans for when the job does
# not set max_num_seqs, since only the engine's own node knows its GPU.
LARGEST_DEFAULT_MAX_NUM_SEQS = 1024

# vLLM's engine processes get this long to exit after SIGTERM before they are killed (its default, 5 s,
# is shorter than a busy CPU host needs: vllm/v1/utils.py:shutdown).
SHUTDOWN_TIMEOUT_S = 60.0

Report = Callable[[dict[str, Any]], None]
"""Sends one event (an engine's resolved settings, an engine's death) to the driver."""

# Columns the engine adds to each sample row (the prompt columns are carried over).
GENERATED = pa.schema(
    [
        ("sample_index", pa.int64()),
        ("completion", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("model", pa.string()),
        ("seed", pa.int64()),
    ]
)


def request_seed(job_seed: int, prompt_id: str) -> int:
    """A per-prompt seed independent of batching, so reruns reproduce the same samples."""
    digest = hashlib.blake2b(f"{job_seed}:{prompt_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2**31 - 1)


def sample_seed(request: int | None, index: int) -> int | None:
    """The seed sample `index` of a request actually runs with: vLLM gives the i-th of n samples
    seed + i (vllm/v1/engine/parallel_sampling.py:ParentRequest._get_child_sampling_params)."""
    return None if request is None else request + index


@dataclass(frozen=True)
class Completion:
    """What an actor keeps of a finished sequence (not its token ids: ~36 bytes a token)."""

    text: str
    finish_reason: str | None
    tokens: int


def sample_rows(row: dict[str, Any], n: int, model: str, seed: int | None, outputs: list[Completion] | None,
                reason: str | None) -> list[dict[str, Any]]:
    """Expand a prompt row into its n sample rows (completion null when nothing was generated);
    a sampling round's indexes start at the row's `first_sample`."""
    base = {k: v for k, v in row.items() if k not in RENDER_COLUMNS and k != "reject_reason"}
    first = row.get("first_sample") or 0
    rows = []
    for i in range(n):
        out = outputs[i] if outputs is not None and i < len(outputs) else None
        rows.append(
            {
                **base,
                "sample_index": first + i,
                "completion": out.text if out is not None else None,
                "finish_reason": out.finish_reason if out is not None else None,
                "prompt_tokens": len(row["prompt_token_ids"]) if row.get("prompt_token_ids") else None,
                "completion_tokens": out.tokens if out is not None else None,
                "model": model,
                "seed": sample_seed(seed, i),
                "reject_reason": reason if out is None else None,
            }
        )
    return rows


def sampling_params(sampling: dict[str, Any], **extra: Any) -> Any:
    """`vllm.SamplingParams` from a job's `sampling:` mapping. A `structured_outputs` mapping (e.g.
    {choice: [...]}, {regex: ...}) becomes vLLM's StructuredOutputsParams, as ray.data.llm does
    (vllm_engine_stage.py:_prepare_llm_request): SamplingParams keeps a plain dict as it is."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    args = {**sampling, **extra}
    if isinstance(args.get("structured_outputs"), dict):
        args["structured_outputs"] = StructuredOutputsParams(**args["structured_outputs"])
    return SamplingParams(**args)


def engine_settings(vllm_config: Any) -> dict[str, Any]:
    """What the engine resolved at start-up, for the log and the run's manifest."""
    sched, cache, model, par = (vllm_config.scheduler_config, vllm_config.cache_config, vllm_config.model_config,
                                vllm_config.parallel_config)
    return {
        "max_num_seqs": sched.max_num_seqs,
        "max_num_batched_tokens": sched.max_num_batched_tokens,
        "max_model_len": model.max_model_len,
        "kv_cache_tokens": getattr(cache, "kv_cache_size_tokens", None),
        "kv_cache_blocks": cache.num_gpu_blocks,
        "tensor_parallel_size": par.tensor_parallel_size,
        "pipeline_parallel_size": par.pipeline_parallel_size,
        "executor": str(par.distributed_executor_backend),
        "prefix_caching": cache.enable_prefix_caching,
    }


class Engine:
    """One vLLM `AsyncLLM` in this process, offered at most `offered` prompts at a time."""

    def __init__(self, llm: Any, role: str, n: int, report: Report | None = None) -> None:
        self.llm = llm
        self.role = role
        self.report = report
        self.settings = engine_settings(llm.vllm_config)
        running = self.settings["max_num_seqs"] * self.settings["pipeline_parallel_size"]
        self.offered = max(1, math.floor(OFFERED_PER_RUNNING * running / n))
        self._slots = asyncio.Semaphore(self.offered)
        self._loop: asyncio.AbstractEventLoop | None = None  # where vLLM's output handler runs, once started
        log.info("%s engine on pid %d: %s; offered %d prompts x n=%d at a time", role, os.getpid(), self.settings,
                 self.offered, n)
        if report is not None:
            try:
                report({"event": "started", "role": role, "pid": os.getpid(), **self.settings})
            except Exception as e:  # a report lost must not fail the engine's start (a restart would not retry it)
                log.warning("could not report the engine's start: %s", e)
        atexit.register(self.close)

    @classmethod
    def start(cls, spec: EngineSpec, model: str, role: str, n: int, report: Report | None = None) -> "Engine":
        """Start vLLM with `vllm.LLM`'s scheduler defaults for this node's hardware (see the module docstring)."""
        from vllm import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(**spec.llm_kwargs(model))
        reaper.watch_children()  # vLLM's engine processes must not outlive this process, however it ends
        llm = AsyncLLM.from_engine_args(args, usage_context=UsageContext.LLM_CLASS)
        reaper.watch_children()  # they exist now
        return cls(llm, role, n, report)

    async def complete(self, token_ids: list[int], params: Any, request_id: str) -> list[Completion]:
        """The request's completions in sample order. A request the engine refuses raises; a dead
        engine ends this process (Ray restarts the actor and replays its in-flight tasks)."""
        from vllm.inputs import TokensPrompt

        self._loop = asyncio.get_running_loop()
        async with self._slots:
            final = None
            try:
                async for final in self.llm.generate(TokensPrompt(prompt_token_ids=token_ids), params, request_id):
                    pass
            except Exception as e:
                if self._dead(e):
                    self._exit(e)
                raise
        if final is None:
            raise RuntimeError(f"request {request_id} ended without output")
        return [Completion(o.text, o.finish_reason, len(o.token_ids)) for o in sorted(final.outputs, key=lambda o: o.index)]

    def _dead(self, error: Exception) -> bool:
        from vllm.v1.engine.exceptions import EngineDeadError

        return isinstance(error, EngineDeadError) or bool(getattr(self.llm, "errored", False))

    def root_cause(self, error: Exception) -> str:
        """Why the engine died, as far as this process can tell: vLLM's exception and the exit of
        its engine core process (a killed core leaves no traceback of its own)."""
        cause = f"{type(error).__name__}: {error}"
        if error.__cause__ is not None:
            cause += f" (caused by {type(error.__cause__).__name__}: {error.__cause__})"
        manager = getattr(getattr(getattr(self.llm, "engine_core", None), "resources", None), "engine_manager", None)
        for proc in getattr(manager, "processes", []):
            code = proc.exitcode
            if code:
                cause += f"; {proc.name} (pid {proc.pid}) {_ended(code)}"
        return cause

    def _exit(self, error: Exception) -> None:
        """End this actor's process: Ray restarts it (resources.engine_restarts times) and replays its
        tasks. `os._exit` is a system error to Ray, so its tasks are retried; `ray.actor.exit_actor()`
        would be an intended exit and fail them (see ray.data.llm's vllm_engine_stage.py)."""
        cause = self.root_cause(error)
        log.error("%s engine on pid %d died: %s; ending the actor so that Ray restarts it and replays its tasks",
                  self.role, os.getpid(), cause)
        if self.report is not None:
            try:
                self.report({"event": "died", "role": self.role, "pid": os.getpid(), "cause": cause})
            except Exception as e:  # the restart matters more than the report
                log.warning("could not report the engine's death: %s", e)
        sys.stderr.flush()
        os._exit(1)

    def close(self) -> None:
        """Stop vLLM's engine processes and release their shared memory, in order, while this
        process still runs (registered with atexit: the actor's process exits through sys.exit).

        Not from the UDF's `__del__` (Ray Data's `_MapWorker.__ray_shutdown__` drops the UDF): vLLM
        keeps the UDF alive until the interpreter's teardown, when vLLM's own modules are gone
        (vllm/multimodal/media/audio.py stores the ImportError of its optional torchcodec backend in
        a module global; its traceback holds the frames of the import, among them the UDF's
        `__init__`). Nor should Ray kill the processes first: see run.ACTOR_ENV.

        The shutdown runs on the event loop of vLLM's output handler: from another thread,
        `AsyncLLM.shutdown` cancels the client's socket task before the handler task, and the handler
        may see the socket task's EngineDeadError first and log it as a failure
        (vllm/v1/engine/async_llm.py:AsyncLLM.shutdown, core_client.py:BackgroundResources.__call__)."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        loop = self._loop
        if loop is not None and loop.is_running() and not _in(loop):
            asyncio.run_coroutine_threadsafe(_shutdown(llm), loop).result()
        else:
            llm.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
        del llm
        gc.collect()  # vLLM's AsyncLLM.__del__ shuts down again; let it run while its modules exist


def _ended(exitcode: int) -> str:
    if exitcode > 0:
        return f"exit code {exitcode}"
    try:
        return f"killed by {signal.Signals(-exitcode).name}"
    except ValueError:
        return f"killed by signal {-exitcode}"


async def _shutdown(llm: Any) -> None:
    llm.shutdown(timeout=SHUTDOWN_TIMEOUT_S)  # blocks the loop: nothing else runs on it any more


def _in(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class EngineStage:
    """Ray Data actor UDF holding one vLLM async engine (engine.gpus GPUs on one node).

    Ray Data runs many tasks of `resources.batch_size` prompts on one actor at once; each is a
    coroutine, all share the engine. A task returns its prompts' samples (same columns as the
    prompt rows, plus GENERATED) when its last prompt is done; every sample of a prompt is in the
    same output. A request the engine refuses fails alone as `engine_error`.
    """

    def __init__(self, job: JobConfig, report: Report | None = None) -> None:
        priority.restore()  # before vLLM starts its engine processes: they inherit it
        self.n = job.n
        self.model_name = job.model.display_name
        self.sampling = dict(job.sampling)
        self.job_seed = self.sampling.pop("seed", None)
        self.engine = Engine.start(job.engine, job.model.path, "generator", self.n, report)

    def _seed(self, row: dict[str, Any]) -> int | None:
        """The request's seed, offset by the round's first sample index: no two rounds repeat a sample."""
        if self.job_seed is None:
            return None
        return request_seed(int(self.job_seed), row["id"]) + (row.get("first_sample") or 0)

    async def _generate(self, row: dict[str, Any]) -> tuple[list[Completion] | None, str | None]:
        from vllm.sampling_params import RequestOutputKind

        # FINAL_ONLY: one output holding all n completions, no per-token streaming to this process
        params = sampling_params(self.sampling, seed=self._seed(row), output_kind=RequestOutputKind.FINAL_ONLY)
        try:
            return await self.engine.complete(row["prompt_token_ids"], params, f"{row['id']}-{uuid.uuid4().hex}"), None
        except Exception as e:
            log.warning("engine error on id=%s: %s", row.get("id"), e)
            return None, "engine_error"

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [r for r in rows if r["reject_reason"] is None]
        results = await asyncio.gather(*(self._generate(r) for r in todo))
        generated = {r["id"]: res for r, res in zip(todo, results)}
        out: list[dict[str, Any]] = []
        for r in rows:
            outputs, reason = generated.get(r["id"], (None, r["reject_reason"]))
            out.extend(sample_rows(r, self.n, self.model_name, self._seed(r), outputs, reason))
        return pa.Table.from_pylist(out, schema=_sample_schema(batch.schema))


def _sample_schema(prompt_batch: pa.Schema) -> pa.Schema:
    fields = [f for f in prompt_batch if f.name not in RENDER_COLUMNS]
    return pa.schema(fields + list(GENERATED))


class JudgeStage:
    """Ray Data actor UDF holding the judge's vLLM async engine; may overturn rule verdicts.

    Candidates: samples whose reject_reason is one the job lets the judge decide, and accepted
    samples of domains without references. CORRECT accepts; INCORRECT rejects (keeping the rule's
    reason, or `judge_rejected`); a reply without a verdict changes nothing. Verdict and rationale
    are recorded on every judged sample. A reasoning judge's verdict is read after its </think>.
    """

    def __init__(self, job: JobConfig, report: Report | None = None) -> None:
        from transformers import AutoTokenizer

        priority.restore()
        model = job.judge_model
        self.spec = job.judge
        self.template = self.spec.prompt or DEFAULT_PROMPT
        self.reasoning = model.reasoning
        self.params = sampling_params(self.spec.sampling)
        self.tokenizer = AutoTokenizer.from_pretrained(model.path)
        self.engine = Engine.start(job.judge_engine, model.path, "judge", self.params.n, report)

    def candidate(self, row: dict[str, Any]) -> bool:
        if row["completion"] is None:
            return False
        if row["accepted"]:
            return row.get("domain") in self.spec.domains
        return row.get("reject_reason") in self.spec.reasons

    async def verdict(self, row: dict[str, Any]) -> JudgeVerdict | None:
        """The judge's verdict on one sample; None when the engine refused the request."""
        text = chat_text(self.tokenizer, [{"role": "user", "content": judge_prompt(row, self.template)}],
                         THINK_PREFILL if self.reasoning else "")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        try:
            (reply, *_) = await self.engine.complete(ids, self.params, f"judge-{row['id']}-{uuid.uuid4().hex}")
        except Exception as e:
            log.warning("judge engine error on id=%s: %s", row.get("id"), e)
            return None
        if self.reasoning:  # drafts inside the thinking are not the verdict; an unfinished thought has none
            return parse_verdict(split_reasoning(reply.text, prefilled=True).final or "")
        return parse_verdict(reply.text)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        idx = [i for i, r in enumerate(rows) if self.candidate(r)]
        verdicts: dict[int, tuple[str, str]] = {}
        for i, v in zip(idx, await asyncio.gather(*(self.verdict(rows[i]) for i in idx))):
            if v is None:
                continue
            r = rows[i]
            if v.correct is True:
                r["accepted"], r["reject_reason"] = True, None
            elif v.correct is False:
                r["accepted"], r["reject_reason"] = False, r["reject_reason"] or "judge_rejected"
            verdicts[i] = ({True: "correct", False: "incorrect", None: "unparsed"}[v.correct], v.rationale)
        table = pa.Table.from_pylist(rows, schema=batch.schema)
        return (table.append_column("judge_verdict", pa.array([verdicts.get(i, (None, None))[0] for i in range(len(rows))], pa.string()))
                .append_column("judge_rationale", pa.array([verdicts.get(i, (None, None))[1] for i in range(len(rows))], pa.string())))
