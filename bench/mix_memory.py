"""Memory of `pipeline mix` over 1M source samples: flat but for the selection state.

Two synthetic published datasets (written by the real `publish_version`, no vLLM): "reasoning",
150k prompts x 4 samples, and "general", 200k prompts x 2, of which 10k repeat reasoning prompts
exactly and 5k nearly; 100 reasoning prompts hold a benchmark problem. About 70% of the samples
are accepted. The mix takes 3:1 (cap 3 per reasoning prompt) with cross-source dedup and
decontamination, on Ray Data with two actors.

The driver's private memory (USS) is read at every block a pass hands it; memory_soak's sampler
reads every process's every 2 s for the peaks by role (the mix's actors count as `ray::other`)
and the publish step. Flat, per pass: the driver's peak over the second half of the rows is at most 10% (+32 MB) above
its peak over the first half, after the first 10%. The selection state the driver keeps
(`Plan.state_bytes`) is reported per sample. Usage: `bench/mix_memory.py [SCALE [ACTORS]]`.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pyarrow as pa

from pipeline import mix as mixmod
from pipeline.config import SelectSpec
from pipeline.mixconfig import MixConfig
from pipeline.publish import publish_version
from pipeline.storage import Fenced, Lease, Storage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_soak import MB, Sampler  # noqa: E402

WORDS = ("the sum of both sides gives a value that we check against the constraint so the next step "
         "follows from the previous one and we verify each case before writing the final answer").split()


def texts(rng: random.Random, count: int, words: int) -> list[str]:
    return [" ".join(rng.choices(WORDS, k=words)) + f" {rng.random():.6f}" for _ in range(count)]


def source_tables(prefix: str, prompts: list[str], n: int, domain: str, seed: int) -> Iterator[pa.Table]:
    """Samples of complete prompts, 2048 prompts a table."""
    rng = random.Random(seed)
    pool = texts(rng, 4096, 60)
    for start in range(0, len(prompts), 2048):
        cols: dict[str, list[Any]] = {k: [] for k in ("id", "prompt", "prompt_hash", "sample_index", "reasoning",
                                                        "final", "completion", "completion_tokens", "accepted",
                                                        "reject_reason")}
        for i in range(start, min(start + 2048, len(prompts))):
            for k in range(n):
                reasoning, final = pool[rng.randrange(4096)], f"The answer is {i + k}."
                ok = rng.random() < 0.7
                cols["id"].append(f"{prefix}-{i}")
                cols["prompt"].append(prompts[i])
                cols["prompt_hash"].append(f"{prefix}{i:08d}")
                cols["sample_index"].append(k)
                cols["reasoning"].append(reasoning)
                cols["final"].append(final)
                cols["completion"].append(f"<think>\n{reasoning}\n</think>\n\n{final}")
                cols["completion_tokens"].append(80 + rng.randrange(400))
                cols["accepted"].append(ok)
                cols["reject_reason"].append(None if ok else "answer_mismatch")
        rows = len(cols["id"])
        table = pa.table(cols)
        for name, value in (("domain", domain), ("source", prefix), ("answer", "0"), ("finish_reason", "stop"),
                            ("model", f"model-{prefix}")):
            table = table.append_column(name, pa.array([value] * rows))
        yield table.append_column("prompt_tokens", pa.array([20] * rows, pa.int64()))


def publish_source(path: Path, prefix: str, prompts: list[str], n: int, domain: str, seed: int) -> str:
    storage = Storage(str(path))
    storage.claim("dataset")
    lease = Lease(storage, f"bench-{prefix}", 600)
    lease.acquire()
    manifest = {"run_id": f"bench-{prefix}", "model": f"model-{prefix}", "job": {"name": prefix},
                "fingerprint": {"generation": f"fp-{prefix}"}}
    publish_version(Fenced(storage, lease), prefix, lambda: source_tables(prefix, prompts, n, domain, seed),
                    manifest, time.time(), SelectSpec(dedup_completions=False))
    lease.release()
    return str(path)


def flat(samples: list[tuple[int, dict[str, float]]], total: int, who: str) -> dict[str, Any]:
    """Peak USS by quarter of the rows a pass handled, after its first 10%; flat as in memory_soak."""
    quarters = []
    for q in range(4):
        lo, hi = total * max(q / 4, 0.1), total * (q + 1) / 4
        vals = [u[who] for done, u in samples if lo <= done <= hi and who in u]
        quarters.append(round(max(vals), 1) if vals else None)
    first = max((v for v in quarters[:2] if v is not None), default=None)
    last = max((v for v in quarters[2:] if v is not None), default=None)
    return {"uss_mb_by_quarter_of_rows": quarters,
            "flat": None if first is None or last is None else last <= first * 1.1 + 32}


def main(scale: float = 1.0, actors: int = 2) -> dict[str, Any]:
    rng = random.Random(0)
    k = lambda x: int(x * scale)  # noqa: E731
    reasoning = [f"Problem {i}: " + " ".join(rng.choices(WORDS, k=12)) for i in range(k(150_000))]
    general = [f"Question {i}: " + " ".join(rng.choices(WORDS, k=10)) for i in range(k(200_000))]
    general[:k(10_000)] = reasoning[:k(10_000)]  # exact copies across sources
    general[k(10_000):k(15_000)] = [p.upper() + "?!" for p in reasoning[k(10_000):k(15_000)]]  # near copies
    bench_problems = [f"Benchmark item {i} asks whether the ratio of the two areas is rational or not"
                      for i in range(100)]
    for i, b in enumerate(bench_problems):
        reasoning[k(20_000) + i] = f"{reasoning[k(20_000) + i]} {b}"
    with tempfile.TemporaryDirectory(prefix="bench-mix-") as tmp:
        t0 = time.monotonic()
        a = publish_source(Path(tmp) / "reasoning", "r", reasoning, 4, "math", 1)
        b = publish_source(Path(tmp) / "general", "g", general, 2, "general", 2)
        build_s = time.monotonic() - t0
        bench = Path(tmp) / "bench.jsonl"
        bench.write_text("".join(json.dumps({"problem": p}) + "\n" for p in bench_problems))
        cfg = MixConfig.model_validate({
            "name": "bench", "output": f"{tmp}/mix", "total": k(480_000), "decontaminate": [str(bench)],
            "resources": {"actors": actors, "actor_cpus": 0.5},
            "sources": [{"name": "reasoning", "dataset": a, "weight": 3, "max_per_prompt": 3},
                        {"name": "general", "dataset": b, "weight": 1}]})
        sampler = Sampler()  # memory_soak's: USS of the driver and its Ray workers every 2 s
        began: dict[str, int] = {}  # phase -> index of its first timed sample
        driver: dict[str, list[tuple[int, dict[str, float]]]] = {"scan": [], "pick": []}  # at each block
        add, counted = mixmod.Plan.add, mixmod._counted
        state: dict[str, int] = {}
        me = psutil.Process()

        def scanned(plan: mixmod.Plan, block: pa.Table) -> None:
            add(plan, block)
            began.setdefault("scan", len(sampler.samples))
            sampler.written += block.num_rows
            driver["scan"].append((sampler.written, {"driver": me.memory_full_info().uss / MB}))
            state["bytes"] = plan.state_bytes()

        def picked(blocks: Any, selected: Any) -> Iterator[pa.Table]:
            began["pick"], sampler.written = len(sampler.samples), 0
            for t in counted(blocks, selected):
                sampler.written += t.num_rows
                driver["pick"].append((sampler.written, {"driver": me.memory_full_info().uss / MB}))
                yield t
            began["publish"] = len(sampler.samples)  # data files, plots: publish_version's own work

        mixmod.Plan.add = scanned  # type: ignore[method-assign]  # the counters: benchmark only
        mixmod._counted = picked  # type: ignore[assignment]
        sampler.start()
        t0 = time.monotonic()
        uri = mixmod.mix(cfg)
        wall = time.monotonic() - t0
        sampler.stop.set()
        sampler.join()
        manifest = Storage(uri).read_json("_manifest.json")
    bounds = sorted((i, ph) for ph, i in began.items()) + [(len(sampler.samples), "end")]
    phases = {ph: sampler.samples[i:j] for (i, ph), (j, _) in zip(bounds, bounds[1:])}
    read = sum(s["samples_read"] for s in manifest["sources"])
    eligible = sum(s["samples_read"] - sum(v for k, v in s["removed"].items()
                                           if k in mixmod.SAMPLE_STEPS) for s in manifest["sources"])
    selected = manifest["stats"]["samples"]
    return {
        "samples_read": read, "samples_selected": selected, "build_sources_s": round(build_s, 1),
        "mix_wall_s": round(wall, 1), "samples_read_per_s": round(read / wall),
        "timings": manifest["timings"],
        "selection_state_bytes": state.get("bytes"), "eligible_samples": eligible,
        "selection_state_bytes_per_eligible_sample": round(state.get("bytes", 0) / max(eligible, 1), 1),
        "driver": {"scan": flat(driver["scan"], read, "driver"),
                   "pick": flat(driver["pick"], selected, "driver"),
                   "peak_mb_by_phase": {ph: round(max((u.get("driver", 0) for _, u in phases.get(ph, [])),
                                                      default=0), 1) for ph in ("scan", "pick", "publish")}},
        "peak_mb_by_role": {r: round(max(u.get(r, 0) for _, u in sampler.samples), 1)
                            for r in sorted({r for _, u in sampler.samples for r in u})},
        "sources": [{k: s[k] for k in ("name", "samples_read", "removed", "requested", "selected")}
                    for s in manifest["sources"]],
    }


if __name__ == "__main__":
    print(json.dumps(main(*(float(a) for a in sys.argv[1:2]), *(int(a) for a in sys.argv[2:3])), indent=2))
