"""Generation throughput: `pipeline generate` against a plain vLLM script, side by side.

Same model, engine arguments, prompts and sampling, with fixed output lengths
(min_tokens = max_tokens) so both runs produce exactly the same number of tokens.

- raw: `bench/raw_vllm.py` times `LLM(...)` (start-up) and one `LLM.generate` on all prompts.
- pipeline: the whole `python -m pipeline generate` command (read, render, engine, verify,
  write, commit, publish). Its start-up is measured by the same command on one prompt and one
  token; generation throughput = tokens / (wall - that start-up), so everything the pipeline
  does besides starting (publishing included) counts against it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import DEFAULT_JOB, load_job

ROOT = Path(__file__).resolve().parent.parent


def write_shards(folder: Path, prompts: int, per_shard: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, prompts, per_shard):
        rows = [{"id": f"p{i:05d}", "prompt": f"What is {i} plus {2 * i + 7}? Explain your steps.", "domain": "math",
                 "answer": str(3 * i + 7)} for i in range(s, min(prompts, s + per_shard))]
        pq.write_table(pa.Table.from_pylist(rows), folder / f"prompts-{s // per_shard:05d}.parquet")
    return str(folder / "*.parquet")


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{done.stderr[-3000:]}")
    return time.monotonic() - start, done.stdout


def pipeline_run(shards: str, output: Path, sampling: dict[str, Any], job: Path = DEFAULT_JOB,
                 extra: tuple[str, ...] = ()) -> tuple[float, int]:
    sets = [f"--set=sampling.{k}={v}" for k, v in {"seed": "null", **sampling}.items()] + [f"--set={s}" for s in extra]
    wall, _ = timed([sys.executable, "-m", "pipeline", "generate", "--job", str(job), "--shards", shards,
                     "--output", str(output), "--set=prompts.dedup=false", *sets])
    tokens = sum(sum(t or 0 for t in pq.read_table(f, columns=["completion_tokens"]).column(0).to_pylist())
                 for f in (output / "samples").glob("*.parquet"))
    return wall, tokens


def main(prompts: int = 32, n: int = 4, tokens: int = 48, job_path: Path = DEFAULT_JOB,
         extra: tuple[str, ...] = ()) -> dict[str, Any]:
    job = load_job(job_path)
    # No seed: vLLM's CPU backend crashes on seeded requests once prefills and decodes interleave
    # ("CPU Generator does not use offset"); throughput does not depend on it.
    sampling = {"n": n, "max_tokens": tokens, "min_tokens": tokens, "temperature": 0.6, "top_p": 0.95}
    with tempfile.TemporaryDirectory(prefix="bench-gen-") as tmp:
        work = Path(tmp)
        texts = [f"What is {i} plus {2 * i + 7}? Explain your steps." for i in range(prompts)]
        spec = work / "raw.json"
        spec.write_text(json.dumps({"model": job.model.path, "prompts": texts, "sampling": sampling,
                                    "llm_kwargs": job.engine.llm_kwargs(job.model.path)}))
        raw_wall, out = timed([sys.executable, str(ROOT / "bench" / "raw_vllm.py"), str(spec)])
        raw = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])

        one = write_shards(work / "one", 1, 1)
        startup, _ = pipeline_run(one, work / "out-startup", {**sampling, "n": 1, "max_tokens": 1, "min_tokens": 1},
                                  job_path, extra)
        shards = write_shards(work / "shards", prompts, max(1, prompts // 2))
        wall, produced = pipeline_run(shards, work / "out", sampling, job_path, extra)

    raw_gen = raw["output_tokens"] / raw["generate_s"]
    pipe_gen = produced / max(wall - startup, 1e-9)
    return {
        "workload": {"prompts": prompts, "n": n, "tokens_per_sample": tokens, "output_tokens": produced},
        "raw_vllm": {"startup_s": round(raw["startup_s"], 1), "generate_s": round(raw["generate_s"], 1),
                     "wall_s": round(raw_wall, 1), "output_tokens": raw["output_tokens"],
                     "gen_tokens_per_s": round(raw_gen, 1), "wall_tokens_per_s": round(raw["output_tokens"] / raw_wall, 1)},
        "pipeline": {"startup_s": round(startup, 1), "wall_s": round(wall, 1), "output_tokens": produced,
                     "gen_tokens_per_s": round(pipe_gen, 1), "wall_tokens_per_s": round(produced / wall, 1)},
        "ratio_generation": round(pipe_gen / raw_gen, 3),
        "ratio_whole_process": round((produced / wall) / (raw["output_tokens"] / raw_wall), 3),
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
