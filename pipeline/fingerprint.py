"""The configuration fingerprint: everything that changes what a dataset holds, and nothing else.

Two parts. The generation part (model, engine settings that change outputs, sampling and its
adaptive rounds, render, verification and answer voting, filters, prompt curation, judge) names
the folder commits live in: samples made under another generation part are never mixed in. The
publish part (selection, file size) only changes how commits become a version. Options added
later are left out while off, so outputs made before they existed keep their fingerprint. A rerun whose fingerprint differs from the output's is
refused, naming the keys, unless a new version is asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from pipeline.config import JobConfig

# vLLM engine arguments that change speed or memory, not which tokens are sampled.
THROUGHPUT_ONLY = frozenset({
    "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "distributed_executor_backend",
    "gpu_memory_utilization", "enforce_eager", "max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching",
    "enable_chunked_prefill", "swap_space", "cpu_offload_gb", "disable_log_stats", "block_size",
    "max_seq_len_to_capture", "compilation_config", "num_scheduler_steps", "disable_custom_all_reduce",
})
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
               "chat_template.jinja", "special_tokens_map.json")


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def model_identity(path: str) -> dict[str, Any]:
    """A local model folder by its contents (config, tokenizer and chat template hashed, weight
    files by name and size), so the same weights at another path match; a hub id by name."""
    if not os.path.isdir(path):
        return {"id": path}
    files = sorted(os.listdir(path))
    return {
        "files": {f: _file_digest(os.path.join(path, f)) for f in files if f in MODEL_FILES},
        "weights": {f: os.path.getsize(os.path.join(path, f)) for f in files
                    if f.endswith((".safetensors", ".bin", ".pt", ".gguf"))},
    }


def _engine(spec: Any) -> dict[str, Any]:
    args = spec.llm_kwargs("")
    return {k: v for k, v in sorted(args.items()) if k != "model" and k not in THROUGHPUT_ONLY}


def generation_doc(job: JobConfig) -> dict[str, Any]:
    """What decides the samples committed under one fingerprint."""
    decontaminate = [{"file": os.path.basename(p), "sha256": _file_digest(p) if os.path.exists(p) else None}
                     for p in job.prompts.decontaminate]
    doc: dict[str, Any] = {
        "model": {"name": job.model.display_name, "reasoning": job.model.reasoning, **model_identity(job.model.path)},
        "engine": _engine(job.engine),
        "sampling": job.sampling,
        "render": job.render.model_dump(mode="json"),
        "verify": job.verify.model_dump(mode="json", exclude={"workers"} | _off(vote=job.verify.vote)),
        "filters": [f.model_dump(mode="json") for f in job.filters],
        "prompts": {"dedup": job.prompts.dedup, "ngram": job.prompts.ngram, "decontaminate": decontaminate},
    }
    if job.adaptive is not None:  # which prompts get more samples
        doc["adaptive"] = job.adaptive.model_dump(mode="json")
    if job.judge.enabled:
        judge = job.judge.model_dump(mode="json", exclude={"actors", "cpus", "batch_size", "engine"})
        judge["engine"] = _engine(job.judge.engine)
        if job.judge.model is not None:
            judge["model"] = model_identity(job.judge.model.path) | {"name": job.judge.model.display_name}
        doc["judge"] = judge
    return doc


def publish_doc(job: JobConfig) -> dict[str, Any]:
    """What decides how the committed samples become a version."""
    return {"select": job.select.model_dump(mode="json", exclude=_off(pass_rate=job.select.pass_rate)),
            "rows_per_data_file": job.rows_per_data_file}


def _off(**options: Any) -> set[str]:
    """The options that are off (None): left out of the fingerprint."""
    return {k for k, v in options.items() if v is None}


def digest(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two fingerprint documents."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            out += differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if old == new else [prefix or "(all)"]
