"""Render prompt rows into engine inputs with the model's own chat template and R1's usage rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline import priority
from pipeline.config import JobConfig
from pipeline.verify.code import parse_tests

THINK_PREFILL = "<think>\n"


def chat_text(tokenizer: Any, messages: list[dict[str, str]], prefill: str = "", chat_template: str | None = None) -> str:
    """The model's chat template applied with the generation prompt, then `prefill`, unless the
    template already ends the prompt with it: DeepSeek's R1-distill templates end with
    '<｜Assistant｜><think>\\n' since February 2025 (their first release ended with '<｜Assistant｜>'),
    and a second '<think>' would put a stray tag in every prompt."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=chat_template)
    if prefill and not text.rstrip().endswith(prefill.strip()):
        text += prefill
    return text


@dataclass(frozen=True)
class Rendered:
    text: str | None
    token_ids: list[int] | None
    reject_reason: str | None = None


class Renderer:
    """Row -> chat-templated prompt tokens. No system prompt unless the job sets one (R1's advice)."""

    def __init__(self, tokenizer: Any, job: JobConfig, flagged: dict[str, str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.flagged = flagged or {}
        self.system_prompt = job.render.system_prompt
        self.instructions = job.render.instructions
        self.prefill = THINK_PREFILL if job.think_prefill else ""
        self.chat_template = job.render.chat_template
        self.max_model_len = job.engine.max_model_len or getattr(tokenizer, "model_max_length", None)
        self.min_new_tokens = max(1, int(job.sampling.get("min_tokens", 1) or 1))
        self.domains = set(job.verify.domains)

    def user_turn(self, prompt: str, domain: str) -> str:
        """The prompt with the domain's instruction suffix (math: the \\boxed{} instruction)."""
        suffix = self.instructions.get(domain)
        return f"{prompt.rstrip()}\n{suffix}" if suffix else prompt

    def __call__(self, row: dict[str, Any]) -> Rendered:
        prompt = row.get("prompt")
        if prompt is None or not prompt.strip():
            return Rendered(None, None, "empty_prompt")
        if row.get("id") in self.flagged:  # duplicate or contaminated (pre-flight scan)
            return Rendered(None, None, self.flagged[row["id"]])
        if row.get("domain") not in self.domains:  # no GPU time for rows nothing can verify
            return Rendered(None, None, "unknown_domain")
        if row.get("tests") is not None and not _valid_tests(row["tests"]):
            return Rendered(None, None, "bad_tests")
        messages = [{"role": "user", "content": self.user_turn(prompt, row.get("domain") or "")}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        text = chat_text(self.tokenizer, messages, self.prefill, self.chat_template)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.max_model_len and len(ids) + self.min_new_tokens > self.max_model_len:
            return Rendered(text, None, "prompt_too_long")
        return Rendered(text, ids, None)


def _valid_tests(tests: str) -> bool:
    """A test spec the code verifier can run (pipeline/verify/code.py); checked before generating."""
    try:
        parse_tests(tests)
    except ValueError:
        return False
    return True


class RenderStage:
    """Ray Data UDF: adds `rendered`, `prompt_token_ids` and a render-time `reject_reason`."""

    def __init__(self, job: JobConfig, flagged: dict[str, str] | None = None) -> None:
        from transformers import AutoTokenizer

        priority.lower(job.resources.background_nice)
        self.renderer = Renderer(AutoTokenizer.from_pretrained(job.model.path), job, flagged)

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = [self.renderer(row) for row in batch.to_pylist()]
        return (
            batch.append_column("rendered", pa.array([r.text for r in results], pa.string()))
            .append_column("prompt_token_ids", pa.array([r.token_ids for r in results], pa.list_(pa.int32())))
            .append_column("reject_reason", pa.array([r.reject_reason for r in results], pa.string()))
        )
