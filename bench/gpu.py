"""`make bench-gpu`: make bench's GPU mode, run on one GPU node. One engine of the job's model, the
pipeline against raw vLLM (bench/generation.py) with R1-length outputs, next to pipeline/estimate.py's
range for the same model, GPU and trace length. Prints the table row for docs/gpu-estimates.md and
writes bench/results/gpu-<gpu>-<model>.json.

    make bench-gpu                                   # the 7B distill, 128 prompts x 4 samples x 8192 tokens
    make bench-gpu GPU_JOB=my-14b.yaml BENCH_ARGS='--prompts 64 --tokens 16384'
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import generation  # noqa: E402

from pipeline.config import load_job  # noqa: E402
from pipeline.estimate import GPUS, Model, estimate  # noqa: E402


def gpu_kind() -> tuple[str, str]:
    """(estimator key, the GPU's own name) of GPU 0, from nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        raise SystemExit("bench-gpu needs an NVIDIA GPU node (no nvidia-smi); `make bench` is the CPU version")
    name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                          capture_output=True, text=True, check=True).stdout.strip()
    key = next((k for k in sorted(GPUS, key=len, reverse=True) if k in name.lower().replace(" ", "")), None)
    if key is None:
        raise SystemExit(f"{name}: not in pipeline/estimate.py's GPUS; add its datasheet figures there")
    return key, name


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", type=Path, default=ROOT / "jobs" / "r1-distill-qwen-7b-math.yaml")
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--tokens", type=int, default=8192, help="every sample this long (min_tokens = max_tokens)")
    a = p.parse_args(argv)
    gpu, gpu_name = gpu_kind()
    job = load_job(a.job)
    from transformers import AutoConfig

    model = Model.from_config(AutoConfig.from_pretrained(job.model.path).to_dict())
    tp = job.engine.tensor_parallel_size
    started = time.time()
    # One engine on this node, as raw vLLM has one LLM; prompts are short (~40 tokens rendered).
    measured = generation.main(prompts=a.prompts, n=a.n, tokens=a.tokens, job_path=a.job,
                               extra=("resources.engine_actors=1",))
    predicted = estimate(model, GPUS[gpu], tp, prompt_tokens=60, output_tokens=a.tokens, n=a.n)
    lo, hi = predicted["tokens_per_s"]
    result = {"date": time.strftime("%Y-%m-%d"), "gpu": gpu_name, "model": job.model.display_name, "tp": tp,
              "minutes": round((time.time() - started) / 60, 1), "measured": measured, "estimate": predicted}
    slug = job.model.display_name.lower().replace("/", "-")
    out = ROOT / "bench" / "results" / f"gpu-{gpu}-{slug}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    raw, pipe = measured["raw_vllm"]["gen_tokens_per_s"], measured["pipeline"]["gen_tokens_per_s"]
    print("| model | GPU | TP | output tokens | estimate tok/s | raw vLLM tok/s | pipeline tok/s | pipeline / raw |")
    print(f"| {job.model.display_name} | {gpu_name} | {tp} | {a.tokens} | {lo:,}-{hi:,} | {raw:,.0f} | {pipe:,.0f} "
          f"| {measured['ratio_generation']}x |")
    print(f"written: {out.relative_to(ROOT)}")
    return result


if __name__ == "__main__":
    main()
