"""Readability filters and the math verifier on real long chains of thought (`make calibrate-traces`).

The traces: ../shared/real_traces/skythought_sky_t1_math.jsonl beside the repository (override
with REAL_TRACES=/path/to/dir), 440 Sky-T1 math traces on AIME24, AMC23 and MATH-500 with the
source's own correctness labels (see the README there). They stay outside the repository; this
script reads them where they are.

What is measured, on the traces mapped to R1's format (`<think>...</think>` then the solution):
- the filters one by one and in the pipeline's order: false rejects among correct, complete,
  non-looping traces (by reason), loops caught, what happens to cut-off traces;
- the statistics behind each threshold (zlib ratios, loop periods, paragraph lengths);
- the math verifier on the final part against the source's labels (Qwen2.5-Math's `math_equal`
  on its own extraction, which reads the whole output, reasoning included), every disagreement
  listed with both extractions.

Reference labels of our own, so that a filter is not measured against itself:
- complete: the engine stopped on its own: the Stratos end-of-solution marker is present; for
  the 46 rows without any marker (a checkpoint that answered without a thought block), the text
  ends a sentence or a formula (`.`, `!`, `?`, `]`, `}`, `$`) and does not loop;
- loop: the trace's last 300 characters occur at least 3 times in it, verbatim (its period is the
  distance between the last two occurrences). Agreement with the file's own `looping_heuristic`
  is reported.
Writes bench/results/real_traces_calibration.json.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.check import Checker  # noqa: E402
from pipeline.config import load_job  # noqa: E402
from pipeline.filter import FILTERS  # noqa: E402
from pipeline.filter.readability import Repetition  # noqa: E402

TRACES_FILE = "skythought_sky_t1_math.jsonl"
FILTER_NAMES = ("truncated", "format", "language_mixing", "repetition", "long_paragraph", "code_in_reasoning")
MARKERS = {"<|begin_of_thought|>": "<think>", "<|end_of_thought|>": "</think>",
           "<|begin_of_solution|>": "", "<|end_of_solution|>": ""}
LOOP_PROBE, LOOP_TIMES = 300, 3
# Disagreements with the source's labels read by hand, where the label is the one that is wrong.
SOURCE_LABEL_ERRORS = {
    "sky-Sky-T1-math-correct-5K-27B-amc23-0-0": "the last sentence gives 27 miles, the reference is 27; the source's "
                                                "extraction is a run of reasoning text",
    "sky-Sky-T1-math-correct-5K-27B-math500-28-0": "the stated answer is the reference complex number; the source "
                                                   "extracted only its imaginary part",
}


def traces_dir() -> Path:
    """Where the real traces live: $REAL_TRACES, else ../shared/real_traces beside the repository."""
    return Path(os.environ.get("REAL_TRACES") or ROOT.parent / "shared" / "real_traces")


def load(path: Path | None = None) -> list[dict[str, Any]]:
    with open(path or traces_dir() / TRACES_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def loop_period(output: str) -> int | None:
    """The period of a verbatim loop at the end of the text; None if it does not end in one."""
    body = output.replace("<|end_of_solution|>", "").rstrip()
    probe = body[-LOOP_PROBE:]
    if len(body) < LOOP_TIMES * LOOP_PROBE or body.count(probe) < LOOP_TIMES:
        return None
    last = len(body) - len(probe)
    return last - body.rfind(probe, 0, last)


def complete(row: dict[str, Any]) -> bool:
    """The engine stopped on its own (see the module docstring)."""
    out = row["output"]
    if "<|end_of_solution|>" in out:
        return True
    if "<|begin_of_thought|>" in out or "<|begin_of_solution|>" in out:
        return False
    return bool(re.search(r"[.!?\]}$]\s*$", out)) and loop_period(out) is None


def to_sample(row: dict[str, Any]) -> dict[str, Any]:
    """The row as the pipeline sees a finished or cut-off math completion in R1's format."""
    completion = row["output"]
    for marker, r1 in MARKERS.items():
        completion = completion.replace(marker, r1)
    return {"id": row["id"], "prompt": row["problem"], "domain": "math", "answer": str(row["reference_answer"]),
            "completion": completion.strip(), "finish_reason": "stop" if complete(row) else "length"}


def quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)
    at = lambda q: round(v[int(q * (len(v) - 1))], 3)  # noqa: E731
    return {"n": len(v), "min": round(v[0], 3), "p1": at(0.01), "p5": at(0.05), "p50": at(0.5), "p95": at(0.95),
            "p99": at(0.99), "max": round(v[-1], 3)}


def share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def measure(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Every figure of the calibration, from the rows of the traces file."""
    job = load_job(None)
    checker = Checker(job)
    try:
        samples = [checker.parse(to_sample(r)) for r in rows]
        pipeline = checker(samples)  # the real order: filters first, then the verifier in its killable pool
        math = checker.pool.run(checker.verifiers["math"], samples) if checker.pool else []
    finally:
        checker.close()
    units = {n: FILTERS.build(n) for n in FILTER_NAMES}
    rejected: list[dict[str, str]] = []
    for s in samples:
        reasons = {}
        for name, unit in units.items():
            if getattr(unit, "reasoning_only", False) and s.get("reasoning") is None:
                continue
            v = unit(s)
            if not v.ok:
                reasons[name] = v.reason
        rejected.append(reasons)
    label = [bool(r["labels"]["score"]) for r in rows]
    done = [complete(r) for r in rows]
    period = [loop_period(r["output"]) for r in rows]
    loops = [p is not None for p in period]
    clean = [d and not lp for d, lp in zip(done, loops)]
    good = [c and ok for c, ok in zip(clean, label)]
    filters_only = [v.reason if v.reason in FILTER_NAMES else None for v in pipeline]

    def count(mask: list[bool], name: str) -> int:
        return sum(m and name in r for m, r in zip(mask, rejected))

    heuristic = [bool(r["derived"]["looping_heuristic"]) for r in rows]
    finished = [s["finish_reason"] == "stop" for s in samples]
    text = [s["completion"] for s in samples]
    reasoning = [s.get("reasoning") or "" for s, d in zip(samples, done) if d]
    out: dict[str, Any] = {
        "source": str(traces_dir() / TRACES_FILE),
        "rows": len(rows),
        "population": {
            "complete": sum(done), "complete_without_markers": sum(d and "<|" not in r["output"] for d, r in zip(done, rows)),
            "cut_off": len(rows) - sum(done), "loops": sum(loops), "labelled_correct": sum(label),
            "correct_complete_non_looping": sum(good),
            "loop_label_vs_file_heuristic": {"both": sum(a and b for a, b in zip(loops, heuristic)),
                                             "ours_only": sum(a and not b for a, b in zip(loops, heuristic)),
                                             "heuristic_only": sum(b and not a for a, b in zip(loops, heuristic))},
        },
        "filters": {
            "false_rejects_of_correct_complete_non_looping": {
                "first_failing_filter": dict(Counter(f for f, g in zip(filters_only, good) if g and f)),
                "rejected": sum(bool(f) for f, g in zip(filters_only, good) if g),
                "of": sum(good),
                "each_filter_alone": {n: count(good, n) for n in FILTER_NAMES},
            },
            "complete_traces_rejected_each_filter_alone": {n: count(done, n) for n in FILTER_NAMES},
            "loops_caught": {"repetition": count(loops, "repetition"), "any_filter_but_truncated": sum(
                lp and bool(set(r) - {"truncated"}) for lp, r in zip(loops, rejected)),
                "pipeline": sum(lp and f is not None for lp, f in zip(loops, filters_only)), "of": sum(loops)},
            "cut_off_non_looping_first_failing_filter": dict(Counter(
                f for f, d, lp in zip(filters_only, done, loops) if not d and not lp)),
        },
        "statistics": {
            "zlib_ratio_complete": {"whole": quantiles([Repetition.ratio(t) for t, d in zip(text, done) if d]),
                                    **{f"last_{w}": quantiles([Repetition.ratio(t[-w:]) for t, d in zip(text, done) if d])
                                       for w in (2000, 6000)}},
            "zlib_ratio_loops": {"whole": quantiles([Repetition.ratio(t) for t, lp in zip(text, loops) if lp]),
                                 **{f"last_{w}": quantiles([Repetition.ratio(t[-w:]) for t, lp in zip(text, loops) if lp])
                                    for w in (2000, 6000)}},
            "loop_period_chars": quantiles([p for p in period if p is not None]),
            "paragraph_words_complete": quantiles([len(p.split()) for t in reasoning for p in t.split("\n\n")]),
            "longest_paragraph_per_complete_trace": quantiles([max(len(p.split()) for p in t.split("\n\n"))
                                                               for t in reasoning if t]),
            "trace_chars": quantiles([len(r["output"]) for r in rows]),
            "finish_reason_stop": sum(finished),
        },
        "math_verifier": agreement(rows, math, done, pipeline),
    }
    return out


def agreement(rows: list[dict[str, Any]], math: list[Any], done: list[bool], pipeline: list[Any]) -> dict[str, Any]:
    """The math verifier (final part only) against the source's labels, on all and on complete
    traces, and once more with the hand-audited label errors corrected."""
    label = [bool(r["labels"]["score"]) for r in rows]
    ours = [v.ok for v in math]

    def table(mask: list[bool]) -> dict[str, Any]:
        pairs = [(lb, o) for lb, o, m in zip(label, ours, mask) if m]
        agree = sum(lb == o for lb, o in pairs)
        return {"n": len(pairs), "agree": agree, "agreement": share(agree, len(pairs)),
                "label_correct_we_accept": sum(lb and o for lb, o in pairs),
                "label_correct_we_reject": sum(lb and not o for lb, o in pairs),
                "label_wrong_we_accept": sum(o and not lb for lb, o in pairs),
                "label_wrong_we_reject": sum(not lb and not o for lb, o in pairs)}

    # ids and verdicts only: the traces' text stays out of the repository
    disagreements = [
        {"id": r["id"], "label": lb, "complete": d, "ours": v.reason or "accepted",
         "source_label_error": SOURCE_LABEL_ERRORS.get(r["id"])}
        for r, lb, v, d in zip(rows, label, math, done) if lb != v.ok
    ]
    accepted = [v.ok for v in pipeline]
    fixed = [lb != (r["id"] in SOURCE_LABEL_ERRORS) for r, lb in zip(rows, label)]
    return {
        "all": table([True] * len(rows)),
        "complete": table(done),
        "complete_after_audit": {"agree": sum(f == v.ok for f, v, d in zip(fixed, math, done) if d), "n": sum(done),
                                 "accepted_but_wrong": sum(v.ok and not f for f, v in zip(fixed, math))},
        "reasons_on_all": dict(Counter(v.reason for v in math if v.reason)),
        "pipeline_accepts": {"total": sum(accepted), "labelled_correct": sum(a and lb for a, lb in zip(accepted, label)),
                             "labelled_wrong": sum(a and not lb for a, lb in zip(accepted, label))},
        "disagreements": disagreements,
    }


def main() -> dict[str, Any]:
    out = measure(load())
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "real_traces_calibration.json").write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    return out


if __name__ == "__main__":
    if not (traces_dir() / TRACES_FILE).exists():
        sys.exit(f"no real traces at {traces_dir() / TRACES_FILE}: set REAL_TRACES to the folder that holds {TRACES_FILE}")
    print(json.dumps(main(), indent=2, ensure_ascii=False))
