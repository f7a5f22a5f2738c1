"""R1's readability filters for chains of thought: format, language mixing, repetition, long
paragraphs, code blocks in the reasoning, length bounds.

Every measure is C-speed string work (regex, str.split, zlib) so that all filters together keep
up with thousands of 8k-token traces per second per core. Thresholds are parameters (job YAML
`filters:`); the defaults and the numbers they were calibrated on are documented beside them.
"""

from __future__ import annotations

import re
import zlib
from typing import Sequence

from pipeline.filter.registry import FILTERS
from pipeline.units import Sample, Verdict

# Text that is not natural language: LaTeX math, code, URLs, LaTeX commands, numbers.
_NON_PROSE = re.compile(
    r"```.*?```|`[^`\n]*`|\$\$.*?\$\$|\$[^$\n]*\$|\\\[.*?\\\]|\\\(.*?\\\)|https?://\S+|\\[A-Za-z]+",
    re.DOTALL,
)
# Scripts told apart, by letters. Greek is left out on purpose: α, β, π are mathematics.
SCRIPTS: dict[str, re.Pattern[str]] = {
    "latin": re.compile(r"[\u00C0-\u024F]"),  # accented letters; plain ASCII letters are counted apart
    "cjk": re.compile(r"[\u4E00-\u9FFF\u3400-\u4DBF\uF900-\uFAFF]"),
    "kana": re.compile(r"[\u3040-\u30FF]"),
    "hangul": re.compile(r"[\uAC00-\uD7AF]"),
    "cyrillic": re.compile(r"[\u0400-\u04FF]"),
    "arabic": re.compile(r"[\u0600-\u06FF]"),
    "devanagari": re.compile(r"[\u0900-\u097F]"),
    "thai": re.compile(r"[\u0E00-\u0E7F]"),
}
# Letters per word, so that a "word unit" is comparable across scripts.
LETTERS_PER_WORD = {"latin": 5.0, "cjk": 1.5, "kana": 1.5, "hangul": 2.0, "cyrillic": 6.0, "arabic": 5.0,
                    "devanagari": 5.0, "thai": 4.0}
LANGUAGE_SCRIPT = {"en": "latin", "fr": "latin", "de": "latin", "es": "latin", "zh": "cjk", "ja": "kana",
                   "ko": "hangul", "ru": "cyrillic", "ar": "arabic", "hi": "devanagari", "th": "thai"}
_ASCII_LETTERS = bytes(range(65, 91)) + bytes(range(97, 123))
_ASCII_RUNS = re.compile(r"[\x00-\x7f]+")
_SAMPLE = 600  # non-ASCII characters classified at most (an even sample; ±1.5% at a 15% share)


def prose(text: str) -> str:
    return _NON_PROSE.sub(" ", text)


def script_units(p: str) -> dict[str, float]:
    """Word units per script in prose `p` (text through `prose`: math, code and LaTeX removed)."""
    ascii_part = p.encode("ascii", "ignore")
    letters = {"latin": float(len(ascii_part) - len(ascii_part.translate(None, _ASCII_LETTERS)))}
    if not p.isascii():
        rest = _ASCII_RUNS.sub("", p)
        step = max(1, len(rest) // _SAMPLE)
        sample = rest[::step]
        for name, pattern in SCRIPTS.items():
            n = len(pattern.findall(sample))
            if n:
                letters[name] = letters.get(name, 0.0) + n * step
    out = {k: v / LETTERS_PER_WORD[k] for k, v in letters.items() if v}
    if "kana" in out and "cjk" in out:  # Japanese mixes kanji with kana: one language
        out["kana"] += out.pop("cjk") * LETTERS_PER_WORD["cjk"] / LETTERS_PER_WORD["kana"]
    return out


def dominant_script(text: str) -> str | None:
    units = script_units(prose(text))
    return max(units, key=units.__getitem__) if units else None


def _reasoning(sample: Sample) -> str | None:
    return sample.get("reasoning")


class Format:
    """Exactly one </think>, a reasoning of substance, and a non-empty answer after it."""

    name = "format"
    reasoning_only = True

    def __init__(self, min_reasoning_words: int = 3) -> None:
        self.min_reasoning_words = min_reasoning_words

    def __call__(self, sample: Sample) -> Verdict:
        closes = sample.get("think_closes", 1)
        if closes != 1:
            return Verdict.reject("format", problem=f"{closes} </think> tags")
        reasoning = (_reasoning(sample) or "").strip()
        if len(reasoning) < 40 * self.min_reasoning_words and self._words(reasoning) < self.min_reasoning_words:
            return Verdict.reject("format", problem="empty or near-empty reasoning")
        if not (sample.get("final") or "").strip():
            return Verdict.reject("format", problem="empty final answer")
        return Verdict.accept()


    @staticmethod
    def _words(text: str) -> float:
        cjk = len(SCRIPTS["cjk"].findall(text))
        return len(SCRIPTS["cjk"].sub(" ", text).split()) + cjk / LETTERS_PER_WORD["cjk"]


# A sentence-long run of one script: `max_foreign_run` words of it with nothing else between.
_RUN_CHARS = {"latin": r"A-Za-z\u00C0-\u024F", "cyrillic": r"\u0400-\u04FF", "arabic": r"\u0600-\u06FF",
              "devanagari": r"\u0900-\u097F"}
_RUN_IDEOGRAPHIC = {"cjk": r"\u4E00-\u9FFF\u3400-\u4DBF", "kana": r"\u3040-\u30FF\u4E00-\u9FFF",
                    "hangul": r"\uAC00-\uD7AF", "thai": r"\u0E00-\u0E7F"}


def _run_pattern(script: str, words: int) -> re.Pattern[str]:
    if script in _RUN_CHARS:  # space-separated words of two letters or more
        c = _RUN_CHARS[script]
        return re.compile(rf"(?:[{c}]{{2,}}[\s,;:'’()\-]+){{{words - 1},}}[{c}]{{2,}}")
    c = _RUN_IDEOGRAPHIC[script]  # no spaces: characters, with the script's own punctuation between
    n = int(words * LETTERS_PER_WORD[script])
    return re.compile(rf"(?:[{c}][\u3000-\u303F\uFF00-\uFF65\s]*){{{n},}}")


class LanguageMixing:
    """The reasoning is in the prompt's language (or `target`) and does not mix in another.

    Script-based, after math, code and LaTeX are removed: rejected when the share of word units
    in other scripts is over `max_foreign_share`, or when a sentence-long run of another script
    (`max_foreign_run` words of it in a row) appears: a term in another language is fine, a
    switch into it is not.

    Calibration (`make calibrate`, bench/results/readability_calibration.json, 400 real documents
    of 2-8k characters per language): foreign share of real English (CPython docs) and Chinese
    (People's Daily) text p99 0.000/0.000, max 0.000/0.001; 0 false rejects with both checks.
    A switch into the other language for the last 10% of the characters is caught in 100% (EN)
    and 100% (ZH) of documents; with the share alone (before the run check) only 3% of the
    Chinese ones were, as English takes ~3x the characters per word unit. Hand-written corpus
    (tests/corpus/readability.py): clean 0.00-0.026, switching 0.82-0.86. Defaults 0.15 and 8.
    """

    name = "language_mixing"
    reasoning_only = False

    def __init__(self, max_foreign_share: float = 0.15, target: str | None = None, min_units: int = 8,
                 max_foreign_run: int = 8) -> None:
        self.max_foreign_share = max_foreign_share
        self.target = LANGUAGE_SCRIPT.get(target, target) if target else None
        self.min_units = min_units
        self.runs = {s: _run_pattern(s, max_foreign_run) for s in (*_RUN_CHARS, *_RUN_IDEOGRAPHIC)}

    def __call__(self, sample: Sample) -> Verdict:
        text = _reasoning(sample) if sample.get("reasoning") is not None else sample.get("final")
        if not text:
            return Verdict.accept()
        p = prose(text)
        units = script_units(p)
        total = sum(units.values())
        if total < self.min_units:
            return Verdict.accept()
        expected = self.target or dominant_script(sample.get("prompt") or "") or max(units, key=units.__getitem__)
        share = 1 - units.get(expected, 0.0) / total
        if share > self.max_foreign_share:
            return Verdict.reject("language_mixing", expected=expected, foreign_share=round(share, 3),
                                  scripts={k: round(v) for k, v in units.items()})
        for script in units:
            if script != expected and script in self.runs and (m := self.runs[script].search(p)):
                return Verdict.reject("language_mixing", expected=expected, foreign_run=m.group(0)[:120])
        return Verdict.accept()


class Repetition:
    """Degenerate loops: text that compresses far better than prose does.

    zlib ratio (compressed/raw bytes, level 1) of the whole text and of its last `windows`
    characters, where loops that run into max_tokens sit. A loop is only visible to zlib in a
    window that holds it at least twice, so the windows must cover real loop periods.

    Real long traces (`make calibrate-traces`, 440 Sky-T1 math traces of 1.8k-166k characters,
    bench/results/real_traces_calibration.json): 153 end in a verbatim loop whose period runs
    from 315 to 10,668 characters (p50 1,385, p95 5,236), e.g. a whole paragraph of
    "Alternatively, perhaps considering ..." re-stated every 2-6k characters. With the
    2,000-character window alone, 133 of 153 (87%) were caught: the loops with long periods
    compress to 0.29-0.47 in 2,000 characters. Adding a 6,000-character window catches 150 of 153
    (98%); the 211 complete traces compress to >= 0.164 whole (p1 0.24), >= 0.217 over their
    last 2,000 and >= 0.209 over their last 6,000 characters: 0 false rejects.
    Human text (`make calibrate`, 400 documents of 2-8k characters per language): English (CPython
    docs) whole p1 0.26 / p50 0.43, last 2,000 characters p1 0.15; Chinese (People's Daily) whole
    p1 0.44, tail p1 0.44. False rejects: 1% of the English documents, all ending in an ASCII-art
    table (`+----+` borders), 0% of the Chinese. Hand-written corpus (tests/corpus/readability.py):
    clean English math reasoning 0.59-0.62 and Chinese 0.71-0.74; loops 0.03-0.07. Real model
    output (SmolLM2-135M, 96 demo samples): 0 of 92 finished outputs rejected; its 4 runaway
    ones loop with changing numbers at 0.28-0.38, not separable from prose at 1k characters:
    `truncated` rejects them (they hit max_tokens).
    Defaults: whole < 0.15, or any tail window < 0.18, rejects.
    """

    name = "repetition"
    reasoning_only = False

    def __init__(self, min_ratio: float = 0.15, min_tail_ratio: float = 0.18,
                 windows: Sequence[int] = (2000, 6000), min_chars: int = 400) -> None:
        self.min_ratio = min_ratio
        self.min_tail_ratio = min_tail_ratio
        self.windows = tuple(windows)
        self.min_chars = min_chars

    @staticmethod
    def ratio(text: str) -> float:
        raw = text.encode()
        return len(zlib.compress(raw, 1)) / max(1, len(raw))

    def __call__(self, sample: Sample) -> Verdict:
        text = sample.get("completion") or ""
        if len(text) < self.min_chars:
            return Verdict.accept()
        whole = self.ratio(text)
        tail = min([self.ratio(text[-w:]) for w in self.windows if len(text) > w], default=whole)
        if whole < self.min_ratio or tail < self.min_tail_ratio:
            return Verdict.reject("repetition", ratio=round(whole, 3), tail_ratio=round(tail, 3))
        return Verdict.accept()


class LongParagraph:
    """No paragraph of the reasoning over `max_words` word units (CJK: 1.5 characters a word).

    Calibration (`make calibrate`, 400 real 2-8k-character documents per language): paragraphs of
    real English (CPython docs) run p50 26 / p99 135 words, of real Chinese (People's Daily) p50 67
    / p99 275 units. Documents with a paragraph over the limit, i.e. false rejects of human prose:
    300 -> 5% EN / 19.5% ZH, 400 -> 1% / 4-5.5%, 500 -> 1% / 0.5%. A document run into one paragraph
    (a wall of text) is caught in 100% at 400. Default 400.
    """

    name = "long_paragraph"
    reasoning_only = True

    def __init__(self, max_words: int = 400) -> None:
        self.max_words = max_words

    def __call__(self, sample: Sample) -> Verdict:
        for i, para in enumerate((_reasoning(sample) or "").split("\n\n")):
            if len(para) < self.max_words:  # cannot hold max_words words: skip the count
                continue
            words = len(para.split()) + len(SCRIPTS["cjk"].findall(para)) / 1.5
            if words > self.max_words:
                return Verdict.reject("long_paragraph", paragraph=i, words=int(words))
        return Verdict.accept()


_FENCE = re.compile(r"```([^\n`]*)\n?(.*?)(?:```|$)", re.DOTALL)
# Lines only a program has: statements, calls, blocks, assignments with operators of code.
_CODE_LINE = re.compile(
    r"^\s*(?:def |class |import |from \S+ import |for \S.* in \S.*:|while \S.*:|if \S.*:\s*$|elif |else:|"
    r"return\b|print\(|#include|int main|public |function |var |let |const |using |fn )|"
    r"[;{]\s*$|^\s*}|\w\[[^\]]*\]\s*=|\+=|-=|==|!=|:=",
    re.MULTILINE,
)


class CodeInReasoning:
    """Fenced code blocks in the reasoning, for domains where code is not the answer.

    A fence is code when it names a language (```python) or its body has lines only a program
    has (statements, calls, braces, `==`). Untagged fences around a grid of numbers or a written
    multiplication are layout, not code: real long traces (`make calibrate-traces`) use them so,
    in 2 of 181 finished Sky-T1 traces (a 3x3 grid, a base-8 multiplication), which the former
    "any ```" rule rejected.
    """

    name = "code_in_reasoning"
    reasoning_only = True

    def __init__(self, allowed_domains: tuple[str, ...] = ("code",)) -> None:
        self.allowed_domains = tuple(allowed_domains)

    def __call__(self, sample: Sample) -> Verdict:
        if sample.get("domain") in self.allowed_domains:
            return Verdict.accept()
        reasoning = _reasoning(sample) or ""
        if "```" not in reasoning:
            return Verdict.accept()
        for m in _FENCE.finditer(reasoning):
            language, body = m.group(1).strip(), m.group(2)
            if language or _CODE_LINE.search(body):
                return Verdict.reject("code_in_reasoning", language=language or None)
        return Verdict.accept()


class Length:
    """Completion token bounds: `too_short` below min_tokens, `too_long` above max_tokens."""

    name = "length"
    reasoning_only = False

    def __init__(self, min_tokens: int = 0, max_tokens: int | None = None) -> None:
        self.min_tokens = min_tokens
        self.max_tokens = max_tokens

    def __call__(self, sample: Sample) -> Verdict:
        n = sample.get("completion_tokens")
        if n is None:
            return Verdict.accept()
        if n < self.min_tokens:
            return Verdict.reject("too_short", completion_tokens=n)
        if self.max_tokens is not None and n > self.max_tokens:
            return Verdict.reject("too_long", completion_tokens=n)
        return Verdict.accept()


for _cls in (Format, LanguageMixing, Repetition, LongParagraph, CodeInReasoning, Length):
    FILTERS.register(_cls.name)(_cls)
