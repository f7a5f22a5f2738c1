"""Text normalisation and word n-grams, shared by prompt dedup and benchmark decontamination."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Iterable

_WORD = re.compile(r"\w+", re.UNICODE)


def normalize(text: str) -> str:
    """Case-, accent- and punctuation-insensitive form: near-identical prompts map to one string."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_WORD.findall(text))


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def ngram_digests(text: str, n: int) -> set[bytes]:
    """Digests of the word n-grams of the normalised text (the whole text if it is shorter)."""
    words = normalize(text).split()
    if len(words) < n:
        return {digest(" ".join(words))} if words else set()
    return {digest(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}


class Contamination:
    """Benchmark n-grams; a text sharing any n-gram with a benchmark problem is contaminated
    (the open-r1 / OpenThoughts rule, n = 8..13)."""

    def __init__(self, benchmark_texts: Iterable[str], n: int = 8) -> None:
        self.n = n
        self.grams: set[bytes] = set()
        for t in benchmark_texts:
            self.grams |= ngram_digests(t, n)

    def hits(self, text: str) -> int:
        return len(ngram_digests(text, self.n) & self.grams)
