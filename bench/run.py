"""`make bench`: every performance figure of the project in one run, targets printed beside them.

Runs the CPU stages (bench/cpu_stages.py), generation against raw vLLM (bench/generation.py)
and the 1M-row memory soak (bench/memory_soak.py, its own process: it swaps in a fake engine).
Writes bench/results/latest.json and latest.md and puts the table into docs/performance.md.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import cpu_stages  # noqa: E402
import generation  # noqa: E402

RESULTS = ROOT / "bench" / "results"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def soak(rows: int) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_soak.py"), str(rows)], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    return json.loads(done.stdout[done.stdout.index("{"):])


def row(name: str, value: str, target: str, ok: bool | None) -> str:
    mark = "" if ok is None else ("pass" if ok else "**below target**")
    return f"| {name} | {value} | {target} | {mark} |"


def table(r: dict[str, Any]) -> str:
    cpu, gen, mem = r["cpu"], r["generation"], r["memory"]
    acc, box = cpu["math_accuracy"], cpu["code_sandbox"]
    lines = [
        f"Measured {r['date']} on {r['machine']} (2 cores, no GPU; SmolLM2-135M on vLLM CPU), {r['minutes']} min.",
        "",
        "| Figure | Measured | Target | |",
        "|---|---|---|---|",
        row("Generation tokens/s, pipeline / raw `LLM.generate`", f"{gen['ratio_generation']}x "
            f"({gen['pipeline']['gen_tokens_per_s']} vs {gen['raw_vllm']['gen_tokens_per_s']} tok/s)", ">= 1.0x",
            gen["ratio_generation"] >= 1.0),
        row("Whole process incl. start-up, pipeline / raw", f"{gen['ratio_whole_process']}x "
            f"({gen['pipeline']['wall_s']} s vs {gen['raw_vllm']['wall_s']} s)", "reported", None),
        row("Math verification (worker pool, 1 core)", f"{cpu['math_verify']['pool_answers_per_s']}/s", ">= 300/s", 
            cpu["math_verify"]["pool_answers_per_s"] >= 300),
        row(f"Math pairs ({acc['pairs']}): non-equivalent rejected", f"{acc['ours_rejected']:.1%}", ">= 95%",
            acc["ours_rejected"] >= 0.95),
        row("Math pairs: equivalent accepted", f"{acc['ours_accepted']:.1%}", ">= 90%", acc["ours_accepted"] >= 0.90),
        row("Math-Verify alone on the same pairs", f"{acc['math_verify_alone_rejected']:.1%} rejected, "
            f"{acc['math_verify_alone_accepted']:.1%} accepted", "for comparison", None),
        row("Readability filters, 8k-token traces (EN / ZH, 1 core)", f"{cpu['filters_8k_tokens_en']['samples_per_s']} / "
            f"{cpu['filters_8k_tokens_zh']['samples_per_s']} samples/s", ">= 1,000/s",
            min(cpu["filters_8k_tokens_en"]["samples_per_s"], cpu["filters_8k_tokens_zh"]["samples_per_s"]) >= 1000),
    ]
    if "overhead_ms" in box:
        lines.append(row("Code sandbox overhead per execution", f"{box['overhead_ms']} ms "
                         f"({box['sandboxed_ms']} vs {box['direct_ms']} ms direct; {box['executions_per_s_2_slots']}/s on 2 slots)",
                         "<= 50 ms", box["overhead_ms"] <= 50))
    if "roles" in mem:
        peaks = ", ".join(f"{k} {v['uss_mb_by_quarter_of_rows'][1]}->{v['uss_mb_by_quarter_of_rows'][3]} MB"
                          for k, v in mem["roles"].items() if k in ("driver", "RenderStage", "FakeEngine", "CheckStage"))
        publish = mem["roles"].get("driver", {}).get("publish_peak_mb")
        lines.append(row(f"Memory streaming {mem['prompt_rows']:,} prompt rows (fake engine; {mem['rows_per_s']:,} rows/s)",
                         f"{'flat' if mem['flat'] else 'grows'}: {peaks} (USS, 2nd -> 4th quarter of the rows); "
                         f"driver while publishing {publish} MB (one shard at a time)", "flat", mem["flat"]))
    return "\n".join(lines)


def main() -> None:
    t0 = time.monotonic()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine()}
    results["cpu"] = cpu_stages.main()
    results["generation"] = generation.main(prompts=48)
    results["memory"] = soak(1_000_000)
    results["minutes"] = round((time.monotonic() - t0) / 60, 1)
    write(results)


def write(results: dict[str, Any]) -> None:
    """Results as JSON and Markdown, and the Markdown table into docs/performance.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    md = table(results)
    (RESULTS / "latest.md").write_text(md + "\n")
    page = ROOT / "docs" / "performance.md"
    text = page.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        page.write_text(f"{head}{START}\n{md}\n{END}{rest.split(END, 1)[1]}")
    print(md)


if __name__ == "__main__":
    if sys.argv[1:] == ["--rewrite"]:  # the table again from latest.json, without measuring
        write(json.loads((RESULTS / "latest.json").read_text()))
    else:
        main()
