"""CPU stages on this machine: readability filters on 8k-token traces, math verification
(throughput and accuracy on the labelled pairs), and the code sandbox's per-execution overhead.

Part of `make bench` (bench/run.py); `make bench-cpu` runs only this file.
Traces are built from varied English and Chinese reasoning sentences (numbers randomised so that
they do not compress like loops) and cut to 8,000 tokens of the default model's tokenizer.
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from corpus.math_pairs import PAIRS, final_text  # noqa: E402
from corpus.readability import CLEAN_EN, CLEAN_ZH  # noqa: E402

from pipeline.check import Checker  # noqa: E402
from pipeline.config import DEFAULT_MODEL_DIR, load_job  # noqa: E402
from pipeline.filter import FILTERS  # noqa: E402
from pipeline.verify import VERIFIERS  # noqa: E402

TARGETS = {"filters_per_s_per_core": 1000, "math_verifications_per_s_per_core": 300, "code_overhead_ms": 50,
           "math_pairs_rejected": 0.95, "math_pairs_accepted": 0.90}


def traces(n: int, tokens: int, zh: bool) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    rng = random.Random(0)
    pool = [s for t in (CLEAN_ZH if zh else CLEAN_EN) for s in t.replace("\n\n", "\n\n|").split("|")]
    out = []
    for _ in range(n):
        parts: list[str] = []
        while True:
            s = rng.choice(pool)
            s = "".join(str(rng.randint(0, 999)) if c.isdigit() else c for c in s)
            parts.append(s)
            text = "".join(parts)
            if len(text) > tokens * (1.2 if zh else 3.0):
                ids = tok(text, add_special_tokens=False)["input_ids"]
                if len(ids) >= tokens:
                    out.append(tok.decode(ids[:tokens]))
                    break
    return out


def reasoning_sample(reasoning: str, prompt: str) -> dict:
    """A finished math sample of a reasoning model with this chain of thought."""
    return {"prompt": prompt, "domain": "math", "reasoning": reasoning, "final": "\\boxed{1}",
            "completion": f"<think>\n{reasoning}\n</think>\n\n\\boxed{{1}}", "think_closes": 1, "finish_reason": "stop"}


def bench_filters(zh: bool) -> dict[str, float]:
    job = load_job(None)
    filters = [FILTERS.build(f.name, **f.params) for f in job.filters]
    samples = [reasoning_sample(t, "求和" if zh else "What is the sum?") for t in traces(40, 8000, zh)]
    rounds = 5
    t0 = time.perf_counter()
    verdicts = []
    for _ in range(rounds):
        for s in samples:
            for f in filters:
                v = f(s)
                if not v.ok:
                    verdicts.append(v.reason)
                    break
    rate = rounds * len(samples) / (time.perf_counter() - t0)
    return {"samples_per_s": round(rate), "rejected_share": round(len(verdicts) / (rounds * len(samples)), 3)}


MATH_CASES = [("42", "The answer is $\\boxed{42}$."), ("\\frac{3}{4}", "So $\\boxed{\\frac{3}{4}}$."),
              ("0.75", "\\boxed{\\frac{3}{4}}"), ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}"), ("x^2+1", "\\boxed{1+x^2}"),
              ("17", "\\boxed{18}"), ("\\pi", "\\boxed{\\pi}"), ("1000", "\\boxed{1,000}")]


def bench_math() -> dict[str, float]:
    """Through the real path: the check stage's isolated worker pool (1 worker = 1 core)."""
    job = load_job(None, verify={"workers": 1}, filters=[])
    checker = Checker(job)
    samples = [{"id": str(i), "domain": "math", "answer": g, "final": f, "completion": f, "finish_reason": "stop"}
               for i, (g, f) in enumerate(MATH_CASES * 100)]
    checker(samples[:20])  # warm the worker (imports sympy)
    t0 = time.perf_counter()
    verdicts = checker(samples)
    rate = len(samples) / (time.perf_counter() - t0)
    checker.close()
    inline = VERIFIERS.build("math")
    t0 = time.perf_counter()
    for s in samples:
        inline(s)
    return {"pool_answers_per_s": round(rate), "in_process_answers_per_s": round(len(samples) / (time.perf_counter() - t0)),
            "accepted_share": round(sum(v.ok for v in verdicts) / len(verdicts), 3)}


def math_accuracy() -> dict[str, float]:
    """Our grader and Math-Verify alone on the labelled pairs (tests/corpus/math_pairs.py)."""
    from math_verify import parse, verify

    ours = VERIFIERS.build("math")
    scores: dict[str, dict[bool, list[bool]]] = {"ours": {True: [], False: []}, "math_verify_alone": {True: [], False: []}}
    for _, gold, pred, same in PAIRS:
        final = final_text(pred)
        scores["ours"][same].append(ours({"answer": gold, "final": final}).ok == same)
        try:
            alone = bool(verify(parse(f"$\\boxed{{{gold}}}$"), parse(final)))
        except Exception:
            alone = False
        scores["math_verify_alone"][same].append(alone == same)
    out: dict[str, float] = {"pairs": len(PAIRS)}
    for who, by in scores.items():
        out[f"{who}_accepted"] = round(sum(by[True]) / len(by[True]), 3)
        out[f"{who}_rejected"] = round(sum(by[False]) / len(by[False]), 3)
    return out


def code_overhead(runs: int = 30) -> dict[str, float | str]:
    """A trivial program in the sandbox vs the same interpreter started directly, and a function
    test (program and harness in two sandboxes) vs the same two interpreters started directly."""
    import json as _json
    import statistics
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.verify.code import CodeVerifier

    verifier = CodeVerifier()
    box = verifier.sandbox
    if box.unavailable:
        return {"error": box.unavailable}

    def timed(fn: object) -> float:
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        return time.perf_counter() - t

    def plain() -> None:
        subprocess.run([box.python, "-I", "-S", "-B", "-c", "pass"], check=True)

    def boxed(_: object = None) -> None:
        assert box.run("pass").ok

    def two_plain() -> None:
        procs = [subprocess.Popen([box.python, "-I", "-S", "-B", "-c", "import json, pickle"]) for _ in range(2)]
        assert all(p.wait() == 0 for p in procs)

    spec = _json.dumps({"kind": "assert", "code": "assert add(2, 3) == 5"})
    function_sample = {"final": "```python\ndef add(a, b):\n    return a + b\n```", "tests": spec}

    def function_test() -> None:
        assert verifier(function_sample).ok

    boxed(), function_test()  # warm: the probe, page cache
    direct = statistics.median(timed(plain) for _ in range(runs))
    sandboxed = statistics.median(timed(boxed) for _ in range(runs))
    direct_pair = statistics.median(timed(two_plain) for _ in range(runs))
    function = statistics.median(timed(function_test) for _ in range(runs))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(boxed, range(4 * runs)))
    parallel = 4 * runs / (time.perf_counter() - t0)
    return {"isolation": box.level, "direct_ms": round(direct * 1000, 1), "sandboxed_ms": round(sandboxed * 1000, 1),
            "overhead_ms": round((sandboxed - direct) * 1000, 1), "executions_per_s_2_slots": round(parallel, 1),
            "function_test_ms": round(function * 1000, 1), "function_test_overhead_ms": round((function - direct_pair) * 1000, 1)}


def main() -> dict:
    results = {
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                    "load_avg_1m": round(os.getloadavg()[0], 1)},  # other work on the machine skews every figure
        "filters_8k_tokens_en": bench_filters(zh=False),
        "filters_8k_tokens_zh": bench_filters(zh=True),
        "math_verify": bench_math(),
        "math_accuracy": math_accuracy(),
        "code_sandbox": code_overhead(),
        "targets": TARGETS,
    }
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_stages.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
