"""What adaptive sampling saves: fixed n against rounds, with a fake engine whose prompts are as
hard as real ones.

Difficulty: the per-problem pass rates of the real long-CoT traces (../shared/real_traces, or
$REAL_TRACES): 130 competition problems (AIME24, AMC23, MATH-500) each solved by 1 to 6 Sky-T1
checkpoints, graded by the source. A beta-binomial fitted by maximum likelihood to those counts
gives the spread of per-prompt success probability: U-shaped, as pass rates of one model family
on mixed-difficulty math are (many prompts almost always or almost never solved). The few
observations per problem are why a fitted distribution is used rather than the raw rates.
Lengths: each sample's completion tokens are drawn from the real traces' lengths, correct and
incorrect ones apart (failures are much longer: they loop or run to the token limit).

Compared, on the same random draws (a prompt's i-th sample is the same in every policy):
fixed n = N, and rounds stopping at k passed samples (pipeline/rounds.py's rule). With max_n = N a
prompt reaches k under rounds exactly when it does under fixed n: equal yield by construction.
Also tried: giving up on prompts with no pass in N/4 or N/2 samples and spending up to 2N on the
rest. Each configuration's setting is chosen on one simulated world and measured on a second
(fresh prompts and samples of the same difficulty), so the figures are not tuned to their own noise. Also estimated: what the barrier between rounds costs in engine time against
streaming rounds (a prompt's next round queued as soon as its verdicts are in), with list
scheduling on `SLOTS` concurrent sequences, and the memory publish's first pass needs per sample.

Writes bench/results/adaptive.json. Run: `python bench/adaptive.py`.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = 20_000
SLOTS = 256
"""Sequences an engine runs at once (vLLM's default max_num_seqs on GPUs under 70 GB)."""
AGGREGATE_TOKENS_PER_S = 5_000.0
"""Decode throughput of one engine with all slots busy (a 7B model on one H100, order of magnitude);
only the engine restart cost depends on it, the tail's share does not."""
ENGINE_START_S = 90.0
"""A GPU vLLM engine's start (weights, CUDA graphs) for a 7B model, order of magnitude; paid per round."""
PROMPT_TOKENS = 150
MAX_TOKENS = 32_768
"""The source's generation limit: no sample is longer (our tokenizer counts some loops longer)."""
TARGET = {"token_savings": 0.30}


def traces_path() -> Path:
    return Path(os.environ.get("REAL_TRACES") or ROOT.parent / "shared" / "real_traces") / "skythought_sky_t1_math.jsonl"


def load_traces() -> list[dict[str, Any]]:
    """Problem, graded outcome and length of each real trace (read in place, never copied)."""
    out = []
    with open(traces_path()) as f:
        for line in f:
            r = json.loads(line)
            out.append({"problem": r["problem"], "correct": bool(r["labels"]["score"]), "chars": len(r["output"])})
    return out


def chars_per_token(traces: list[dict[str, Any]]) -> float:
    """Measured with the default model's tokenizer on the traces themselves (math-heavy English)."""
    from transformers import AutoTokenizer

    from pipeline.config import DEFAULT_MODEL_DIR

    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    with open(traces_path()) as f:
        texts = [json.loads(line)["output"] for line in f][:60]
    chars = sum(len(t) for t in texts)
    tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return chars / tokens


def fit_beta(counts: list[tuple[int, int]]) -> tuple[float, float, float]:
    """Maximum-likelihood beta-binomial (a, b) for (successes, trials) per problem; and its log-likelihood."""

    def loglik(a: float, b: float) -> float:
        lb = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
        return sum(math.lgamma(s + a) + math.lgamma(n - s + b) - math.lgamma(n + a + b) - lb for s, n in counts)

    grid = [math.exp(x / 20) for x in range(-80, 61)]  # 0.018 .. 20
    best = max(((loglik(a, b), a, b) for a in grid for b in grid))
    _, a, b = best
    for step in (1.05, 1.01, 1.002):  # local refinement
        improved = True
        while improved:
            improved = False
            for da, db in ((step, 1), (1 / step, 1), (1, step), (1, 1 / step)):
                ll = loglik(a * da, b * db)
                if ll > best[0] + 1e-12:
                    best, a, b, improved = (ll, a * da, b * db), a * da, b * db, True
    return a, b, best[0]


def difficulty(traces: list[dict[str, Any]]) -> dict[str, Any]:
    per: dict[str, list[bool]] = defaultdict(list)
    for t in traces:
        per[t["problem"]].append(t["correct"])
    counts = [(sum(v), len(v)) for v in per.values()]
    a, b, ll = fit_beta(counts)
    multi = [s / n for s, n in counts if n >= 5]
    return {"problems": len(counts), "observations": len(traces), "beta_a": round(a, 4), "beta_b": round(b, 4),
            "loglik": round(ll, 2), "mean_p": round(a / (a + b), 4),
            "observed_rates_of_problems_with_5plus_checkpoints": {
                "n": len(multi), "share_0": round(sum(r == 0 for r in multi) / len(multi), 3),
                "share_1": round(sum(r == 1 for r in multi) / len(multi), 3),
                "share_between": round(sum(0 < r < 1 for r in multi) / len(multi), 3)}}


class World:
    """PROMPTS fake prompts: a success probability each, and for each its first `depth` samples'
    outcomes and completion tokens, fixed in advance so that every policy sees the same samples."""

    def __init__(self, a: float, b: float, lengths: dict[bool, np.ndarray], depth: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.p = rng.beta(a, b, PROMPTS)
        self.ok = rng.random((PROMPTS, depth)) < self.p[:, None]
        right = rng.choice(lengths[True], (PROMPTS, depth))
        wrong = rng.choice(lengths[False], (PROMPTS, depth))
        self.tokens = np.where(self.ok, right, wrong)

    def run(self, k: int, initial_n: int, round_n: int, max_n: int, give_up_after: int | None = None) -> dict[str, Any]:
        """The stop rule of pipeline/rounds.py (fixed n: initial_n = max_n): what each prompt generates."""
        passed = np.cumsum(self.ok[:, :max_n], axis=1)
        used = np.full(PROMPTS, max_n)
        stopped = np.zeros(PROMPTS, dtype=bool)
        boundaries = list(range(initial_n, max_n + 1, round_n))
        for end in boundaries:  # the first round end at which a prompt stops
            stop = passed[:, end - 1] >= k
            if give_up_after is not None and end >= give_up_after:
                stop |= passed[:, end - 1] == 0
            used[stop & ~stopped] = end
            stopped |= stop
        reached = passed[np.arange(PROMPTS), used - 1] >= k
        rounds = np.searchsorted(boundaries, used) + 1
        gen = np.where(np.arange(max_n)[None, :] < used[:, None], self.tokens[:, :max_n], 0).sum(axis=1)
        tokens = gen.sum() + PROMPT_TOKENS * rounds.sum()
        return {"samples": int(used.sum()), "completion_tokens": int(gen.sum()), "tokens": int(tokens),
                "reached": int(reached.sum()), "yield": round(float(reached.mean()), 4),
                "tokens_per_prompt_reaching_k": round(float(tokens / max(reached.sum(), 1)), 1),
                "rounds": rounds, "used": used}


def schedule(lengths: list[float], slots: int) -> float:
    """Makespan of sequences (in token-times) on `slots` slots, each taken by the next free slot."""
    free = [0.0] * slots
    for length in lengths:
        heapq.heapreplace(free, free[0] + length)
    return max(free)


def stream(world: World, k: int, initial_n: int, round_n: int, max_n: int, give_up: int | None, slots: int) -> float:
    """Makespan when a prompt's next round is queued as soon as its round's samples are done."""
    rng = random.Random(1)
    order = list(range(PROMPTS))
    rng.shuffle(order)
    queue: list[tuple[int, int]] = [(p, i) for p in order for i in range(initial_n)]  # (prompt, sample index)
    head = 0
    left = {p: initial_n for p in order}
    passed = defaultdict(int)
    done_at = defaultdict(int)
    events: list[tuple[float, int, int]] = []  # (end time, prompt, index)
    now, running = 0.0, 0
    while head < len(queue) or events:
        while running < slots and head < len(queue):
            p, i = queue[head]
            head += 1
            heapq.heappush(events, (now + float(world.tokens[p, i]), p, i))
            running += 1
        now, p, i = heapq.heappop(events)
        running -= 1
        passed[p] += int(world.ok[p, i])
        done_at[p] = max(done_at[p], i + 1)
        left[p] -= 1
        hopeless = give_up is not None and passed[p] == 0 and done_at[p] >= give_up
        if left[p] == 0 and passed[p] < k and done_at[p] < max_n and not hopeless:
            first = done_at[p]
            queue.extend((p, first + j) for j in range(round_n))
            left[p] = round_n
    return now


def barrier_cost(world: World, k: int, n: int, setting: tuple[int, int, int, int | None]) -> dict[str, Any]:
    """Engine time with a barrier per round (and an engine start per round) against streaming rounds
    and against fixed n (one round)."""
    initial_n, round_n, max_n, give_up = setting
    rate = AGGREGATE_TOKENS_PER_S / SLOTS  # tokens per second of one sequence
    res = world.run(k, initial_n, round_n, max_n, give_up)
    used = res["used"]
    rng = random.Random(2)
    rounds_s = []
    start = 0
    for end in range(initial_n, max_n + 1, round_n):
        todo = [float(world.tokens[p, i]) for p in range(PROMPTS) if used[p] >= end for i in range(start, end)]
        if not todo:
            break
        rng.shuffle(todo)
        rounds_s.append(schedule(todo, SLOTS) / rate)
        start = end
    fixed = [float(world.tokens[p, i]) for p in range(PROMPTS) for i in range(n)]
    rng.shuffle(fixed)
    fixed_s = schedule(fixed, SLOTS) / rate + ENGINE_START_S
    streamed = stream(world, k, initial_n, round_n, max_n, give_up, SLOTS) / rate + ENGINE_START_S
    barrier = sum(rounds_s) + ENGINE_START_S * len(rounds_s)
    return {"setting": dict(zip(("initial_n", "round_n", "max_n", "give_up_after"), setting)),
            "token_savings_vs_fixed": round(1 - res["tokens_per_prompt_reaching_k"]
                                            / world.run(k, n, n, n)["tokens_per_prompt_reaching_k"], 4),
            "rounds": len(rounds_s), "round_s": [round(x) for x in rounds_s],
            "all_slots_busy_s": round(res["completion_tokens"] / rate / SLOTS),
            "fixed_n_s": round(fixed_s), "barrier_s": round(barrier), "streaming_s": round(streamed),
            "barrier_over_streaming": round(barrier / streamed - 1, 4),
            "engine_time_savings_vs_fixed": round(1 - barrier / fixed_s, 4),
            "engine_time_savings_vs_fixed_if_streaming": round(1 - streamed / fixed_s, 4)}


def _decide_rss(samples: int, per_prompt: int = 8) -> dict[str, float]:
    """In a fresh process: the light table's bytes, and how far `decide` raises the resident set
    above it (sampled every 5 ms), for `samples` synthetic light rows."""
    import threading

    import psutil
    import pyarrow as pa

    from pipeline.config import SelectSpec
    from pipeline.prompts import LIGHT, decide

    rng = random.Random(3)
    reasons = [None if rng.random() < 0.4 else rng.choice(["answer_mismatch", "truncated", "repetition"])
               for _ in range(samples)]
    table = pa.table({
        "id": [f"openr1-math-{i // per_prompt:07d}" for i in range(samples)],
        "prompt_hash": [f"{(i // per_prompt) * 2654435761 % 16**24:024x}" for i in range(samples)],
        "round": [(i % per_prompt) // 4 for i in range(samples)],
        "sample_index": [i % per_prompt for i in range(samples)],
        "domain": ["math"] * samples,
        "accepted": [r is None for r in reasons],
        "reject_reason": reasons,
        "completion_tokens": [rng.randint(500, 32000) for _ in range(samples)],
        "prompt_tokens": [150] * samples,
        "extracted_answer": [str(rng.randint(0, 999)) for _ in range(samples)],
        "pass_rate": [None] * samples,  # generate's commits carry none (a mix's sources do)
        "digest": [rng.randbytes(8) for _ in range(samples)],
    }, schema=LIGHT)
    del reasons
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def watch() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], proc.memory_info().rss)

    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.perf_counter()
    decide(table, SelectSpec(keep_per_prompt=2))
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    return {"light_bytes": table.get_total_buffer_size(), "decide_rss_bytes": peak[0] - base, "seconds": seconds}


def publish_memory(per_prompt: int = 8) -> dict[str, Any]:
    """Bytes per sample of publish's first pass: the light rows, and what `decide` adds on top as
    the slope between two sizes (a chunk of rows decided at a time is a constant on top)."""
    import subprocess

    def measure(n: int) -> dict[str, float]:
        code = f"import sys; sys.path[:0] = {[str(ROOT), str(ROOT / 'bench')]!r}; import adaptive, json; " \
               f"print(json.dumps(adaptive._decide_rss({n}, {per_prompt})))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    small, large = 300_000, 900_000
    a, b = measure(small), measure(large)
    slope = (b["decide_rss_bytes"] - a["decide_rss_bytes"]) / (large - small)
    return {"samples": [small, large], "samples_per_prompt": per_prompt,
            "light_bytes_per_sample": round(b["light_bytes"] / large, 1),
            "decide_bytes_per_sample": round(slope, 1),
            "decide_constant_mb": round((a["decide_rss_bytes"] - slope * small) / 2**20, 1),
            "decide_s_per_million_samples": round(b["seconds"] / large * 1e6, 1)}


def settings(k: int, n: int) -> list[tuple[int, int, int, int | None]]:
    """The adaptive settings tried against fixed n: rounds up to n or 2n, with or without giving up."""
    out = []
    for max_n in (n, 2 * n):
        for give_up in (None, n // 4, n // 2):
            for initial in sorted({k, 2 * k, 4}):
                for step in sorted({1, 2, k, 4}):
                    if initial <= max_n and not (max_n - initial) % step:
                        out.append((initial, step, max_n, give_up))
    return out


def compare(worlds: tuple[World, World], k: int, n: int, rule: str) -> dict[str, Any]:
    """The cheapest setting with at least fixed n's yield, chosen on one world and measured on another
    (fresh prompts and samples of the same difficulty): `rule` "plain" is the stop rule alone at
    max_n = n (equal yield by construction), "give_up" also tries give_up_after and max_n = 2n."""
    pick, check = worlds
    base = pick.run(k, n, n, n)
    tried = settings(k, n) if rule == "give_up" else [s for s in settings(k, n) if s[2] == n and s[3] is None]
    feasible = [(pick.run(k, *s)["tokens_per_prompt_reaching_k"], s) for s in tried
                if pick.run(k, *s)["yield"] >= base["yield"]]
    _, best = min(feasible)
    fixed, ada = check.run(k, n, n, n), check.run(k, *best)
    keys = ("samples", "tokens", "reached", "yield", "tokens_per_prompt_reaching_k")
    return {
        "k": k, "n": n, "rule": rule,
        "fixed": {x: fixed[x] for x in keys},
        "adaptive": {**dict(zip(("initial_n", "round_n", "max_n", "give_up_after"), best)),
                     "rounds_max": int(ada["rounds"].max()), "rounds_mean": round(float(ada["rounds"].mean()), 2),
                     **{x: ada[x] for x in keys}},
        "token_savings": round(1 - ada["tokens_per_prompt_reaching_k"] / fixed["tokens_per_prompt_reaching_k"], 4),
        "yield_change": round(ada["yield"] - fixed["yield"], 4),
    }


def main() -> None:
    traces = load_traces()
    diff = difficulty(traces)
    cpt = chars_per_token(traces)
    lengths = {ok: np.array([min(MAX_TOKENS, max(1, round(t["chars"] / cpt))) for t in traces if t["correct"] == ok])
               for ok in (True, False)}
    worlds = (World(diff["beta_a"], diff["beta_b"], lengths, depth=32, seed=0),
              World(diff["beta_a"], diff["beta_b"], lengths, depth=32, seed=1))
    configs = ((1, 8), (2, 8), (1, 16), (2, 16), (4, 16))
    comparisons = [compare(worlds, k, n, rule) for rule in ("plain", "give_up") for k, n in configs]
    best = {}
    for c in comparisons:  # per configuration, the cheaper rule that keeps the yield
        key = (c["k"], c["n"])
        if c["yield_change"] >= 0 and (key not in best or c["token_savings"] > best[key]["token_savings"]):
            best[key] = c
    headline = best[(2, 16)]["adaptive"]
    steps = sorted({headline["round_n"], 2, 4})
    barrier = [barrier_cost(worlds[1], 2, 16, (headline["initial_n"], step, headline["max_n"], headline["give_up_after"]))
               for step in steps if not (headline["max_n"] - headline["initial_n"]) % step]
    result = {
        "what": "fixed n vs adaptive rounds on a fake engine with the real traces' difficulty and lengths",
        "prompts": PROMPTS, "difficulty": diff, "chars_per_token": round(cpt, 3),
        "completion_tokens": {"correct_mean": round(float(lengths[True].mean())),
                              "incorrect_mean": round(float(lengths[False].mean()))},
        "comparisons": comparisons,
        "barrier": {"k": 2, "n": 16, "slots": SLOTS, "aggregate_tokens_per_s": AGGREGATE_TOKENS_PER_S,
                    "engine_start_s": ENGINE_START_S, "settings": barrier},
        "publish_memory": publish_memory(),
        "targets": TARGET,
        "best_per_config": {f"k={k},n={n}": {"rule": c["rule"], "token_savings": c["token_savings"],
                                             "yield_change": c["yield_change"]} for (k, n), c in sorted(best.items())},
        "meets_target": len(best) == len(configs) and all(c["token_savings"] >= TARGET["token_savings"]
                                                          for c in best.values()),
    }
    out = ROOT / "bench" / "results" / "adaptive.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("best_per_config", "barrier", "publish_memory", "meets_target")}, indent=2))


if __name__ == "__main__":
    main()
