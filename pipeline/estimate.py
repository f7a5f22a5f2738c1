"""What one vLLM engine can decode per second on a GPU, from first principles, as a range.

Why not a table of benchmark numbers: published vLLM figures use short outputs. R1-style traces are
thousands of tokens long, so the KV cache, not the weights, fills the GPU and bounds how many sequences
decode at once. The model (docs/gpu-estimates.md has the derivation and every assumption):

    kv_bytes_per_token  k = 2 (K and V) x layers x kv_heads x head_dim x dtype bytes
    live tokens per seq L = prompt / n + output / 2     (n samples share one prompt via prefix caching;
                                                         in steady state a trace is half written on average)
    KV memory         C = tp x (gpu_memory x utilization - weights / tp - overhead)
    sequences         B = min(max_num_seqs, C / (L x k))
    one decode step   t = max((weights + B x L x k) / (tp x bandwidth x eff_bw),          # read it all once
                              B x flops_per_token / (tp x peak_flops x eff_flops))        # or compute-bound
    tokens/s          = B / t

The range comes from the two quantities measured runs vary most in: the fraction of peak HBM bandwidth
decode kernels reach (eff_bw) and the memory vLLM keeps for activations/CUDA graphs (overhead).
`make bench-gpu` measures the real figure on one GPU node.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1, "float8": 1}


@dataclass(frozen=True)
class Model:
    """The config.json fields that set decode cost (plus the vocabulary, for the parameter count)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    dtype_bytes: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params(self) -> float:
        """Dense decoder parameters (attention with GQA, SwiGLU MLP, embeddings; norms and biases are <0.1%)."""
        attn = self.hidden * self.heads * self.head_dim * 2 + self.hidden * self.kv_heads * self.head_dim * 2
        mlp = 3 * self.hidden * self.intermediate
        embed = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * (attn + mlp) + embed

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def flops_per_token(self, context: float) -> float:
        """2 per weight, plus attention over `context` tokens (QK^T and AV: 4 x layers x context x heads x head_dim)."""
        return 2 * self.params + 4 * self.layers * context * self.heads * self.head_dim

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Model":
        """From a Hugging Face config.json (Qwen2, Llama and most dense decoders name these fields alike)."""
        heads = config["num_attention_heads"]
        return cls(layers=config["num_hidden_layers"], hidden=config["hidden_size"], heads=heads,
                   kv_heads=config.get("num_key_value_heads", heads), intermediate=config["intermediate_size"],
                   vocab=config["vocab_size"], tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                   dtype_bytes=DTYPE_BYTES.get(str(config.get("torch_dtype", "bfloat16")), 2))


# The R1 distills' config.json values (deepseek-ai/DeepSeek-R1-Distill-*, bf16).
MODELS = {
    "r1-distill-qwen-1.5b": Model(layers=28, hidden=1536, heads=12, kv_heads=2, intermediate=8960, vocab=151936),
    "r1-distill-qwen-7b": Model(layers=28, hidden=3584, heads=28, kv_heads=4, intermediate=18944, vocab=152064),
    "r1-distill-llama-8b": Model(layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
    "r1-distill-qwen-14b": Model(layers=48, hidden=5120, heads=40, kv_heads=8, intermediate=13824, vocab=152064),
    "r1-distill-qwen-32b": Model(layers=64, hidden=5120, heads=40, kv_heads=8, intermediate=27648, vocab=152064),
    "r1-distill-llama-70b": Model(layers=80, hidden=8192, heads=64, kv_heads=8, intermediate=28672, vocab=128256),
}


@dataclass(frozen=True)
class Gpu:
    """Datasheet figures: memory (GB), peak HBM bandwidth (GB/s), dense bf16 tensor TFLOPS."""

    memory_gb: float
    bandwidth_gbs: float
    tflops: float


GPUS = {
    "h100": Gpu(80, 3350, 989),     # H100 SXM
    "h200": Gpu(141, 4800, 989),
    "a100": Gpu(80, 2039, 312),     # A100 80GB SXM
    "l40s": Gpu(48, 864, 362),
    "l4": Gpu(24, 300, 121),
}


@dataclass(frozen=True)
class Assumptions:
    """Every knob of the estimate; the defaults are vLLM's defaults and typical measured efficiencies."""

    utilization: float = 0.9        # vLLM gpu_memory_utilization
    max_num_seqs: int = 256         # vLLM's default cap on sequences per step
    eff_flops: float = 0.5          # fraction of peak tensor FLOPS a decode step reaches when compute-bound
    tp_efficiency: float = 0.9      # bandwidth kept across tensor-parallel GPUs (all-reduce per layer)
    # (low, high) ends of the range
    eff_bw: tuple[float, float] = (0.6, 0.85)        # fraction of peak HBM bandwidth decode kernels reach
    overhead_gb: tuple[float, float] = (6.0, 3.0)    # activations, CUDA graphs, fragmentation per GPU


def decode_rate(model: Model, gpu: Gpu, tp: int, prompt_tokens: float, output_tokens: float, n: int,
                eff_bw: float, overhead_gb: float, a: Assumptions = Assumptions()) -> dict[str, float]:
    """Tokens/s of one engine (tp GPUs) with its KV cache full of traces of this length."""
    live = prompt_tokens / n + output_tokens / 2
    kv = model.kv_bytes_per_token
    cache = tp * (gpu.memory_gb * 1e9 * a.utilization - model.weight_bytes / tp - overhead_gb * 1e9)
    if cache <= 0:
        raise ValueError(f"the weights ({model.weight_bytes / 1e9:.0f} GB) leave no KV cache on {tp} GPU(s)")
    seqs = max(1, min(a.max_num_seqs, math.floor(cache / (live * kv))))
    bandwidth = tp * gpu.bandwidth_gbs * 1e9 * eff_bw * (a.tp_efficiency if tp > 1 else 1)
    memory_s = (model.weight_bytes + seqs * live * kv) / bandwidth
    compute_s = seqs * model.flops_per_token(live) / (tp * gpu.tflops * 1e12 * a.eff_flops)
    step = max(memory_s, compute_s)
    return {"sequences": seqs, "step_ms": step * 1e3, "tokens_per_s": seqs / step,
            "bound": "memory" if memory_s >= compute_s else "compute", "kv_cache_gb": cache / 1e9}


def estimate(model: Model, gpu: Gpu, tp: int = 1, prompt_tokens: float = 200, output_tokens: float = 8000,
             n: int = 4, a: Assumptions = Assumptions()) -> dict[str, Any]:
    """The low and high ends, and what they mean for a run."""
    low = decode_rate(model, gpu, tp, prompt_tokens, output_tokens, n, a.eff_bw[0], a.overhead_gb[0], a)
    high = decode_rate(model, gpu, tp, prompt_tokens, output_tokens, n, a.eff_bw[1], a.overhead_gb[1], a)
    return {
        "params_b": round(model.params / 1e9, 2),
        "kv_kib_per_token": round(model.kv_bytes_per_token / 1024, 1),
        "live_tokens_per_sequence": prompt_tokens / n + output_tokens / 2,
        "sequences": (low["sequences"], high["sequences"]),
        "tokens_per_s": (round(low["tokens_per_s"]), round(high["tokens_per_s"])),
        "bound": high["bound"],
        "gpu_hours_per_1m_tokens": (round(tp / high["tokens_per_s"] * 1e6 / 3600, 2),
                                    round(tp / low["tokens_per_s"] * 1e6 / 3600, 2)),
    }


# The engines docs/gpu-estimates.md tabulates: (model, tensor_parallel_size per GPU type).
TABLE = [("r1-distill-qwen-1.5b", {"h100": 1, "h200": 1, "l40s": 1}),
         ("r1-distill-qwen-7b", {"h100": 1, "h200": 1, "l40s": 1}),
         ("r1-distill-llama-8b", {"h100": 1, "h200": 1, "l40s": 1}),
         ("r1-distill-qwen-14b", {"h100": 1, "h200": 1, "l40s": 1}),
         ("r1-distill-qwen-32b", {"h100": 2, "h200": 1, "l40s": 4}),
         ("r1-distill-llama-70b", {"h100": 4, "h200": 2, "l40s": 8})]


def table(output_tokens: float = 8000, prompt_tokens: float = 200, n: int = 4) -> str:
    gpus = list(TABLE[0][1])
    head = "| model | KiB KV/token | " + " | ".join(f"{g.upper()}: TP, seqs, tok/s per engine" for g in gpus) + " |"
    lines = [head, "|" + "---|" * (2 + len(gpus))]
    for name, tps in TABLE:
        cells = []
        for g in gpus:
            e = estimate(MODELS[name], GPUS[g], tps[g], prompt_tokens, output_tokens, n)
            lo, hi = e["tokens_per_s"]
            cells.append(f"{tps[g]}, {e['sequences'][0]}-{e['sequences'][1]}, {lo:,}-{hi:,}")
        lines.append(f"| {name} | {MODELS[name].kv_bytes_per_token / 1024:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Decode throughput of one vLLM engine for long traces (a range).")
    p.add_argument("--model", default="r1-distill-qwen-7b", help=f"one of {', '.join(MODELS)}, or a config.json path")
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    p.add_argument("--prompt-tokens", type=float, default=200)
    p.add_argument("--output-tokens", type=float, default=8000, help="mean completion length")
    p.add_argument("--n", type=int, default=4, help="samples per prompt (they share the prompt's KV)")
    p.add_argument("--table", action="store_true", help="the Markdown table of docs/gpu-estimates.md")
    a = p.parse_args(argv)
    if a.table:
        print(table(a.output_tokens, a.prompt_tokens, a.n))
        return
    model = MODELS.get(a.model) or Model.from_config(json.loads(Path(a.model).read_text()))
    print(json.dumps(estimate(model, GPUS[a.gpu], a.tp, a.prompt_tokens, a.output_tokens, a.n), indent=2))


if __name__ == "__main__":
    main()
