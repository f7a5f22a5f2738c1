"""Answer extraction from the final part of a completion (never from the reasoning)."""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_TRAILING_EQUALS = re.compile(r"=\s*\$?(?P<ans>[-+]?\d[\d,]*(?:\.\d+)?)\$?\s*[.!]?\s*$")
_BARE = re.compile(r"^\$?(?P<ans>[-+]?\d[\d,]*(?:\.\d+)?|\\frac\{\d+\}\{\d+\})\$?\.?$")
_ANSWER_IS = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|:|=)\s*[:\s]*(?P<ans>[^\n]+)", re.IGNORECASE
)


def _balanced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the brace group opening at text[start] == '{', and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            continue
        if c == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif c == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


def boxed_answers(text: str) -> list[str]:
    """Every \\boxed{...} / \\fbox{...} (and `\\boxed 5`) in order, nested braces handled."""
    found: list[str] = []
    i = 0
    while True:
        hits = [(text.find(cmd, i), cmd) for cmd in _BOX_COMMANDS]
        hits = [(pos, cmd) for pos, cmd in hits if pos >= 0]
        if not hits:
            return found
        pos, cmd = min(hits)
        j = pos + len(cmd)
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            group = _balanced(text, j)
            if group is None:
                return found
            found.append(group[0].strip())
            i = group[1]
        elif j > pos + len(cmd) and j < len(text):
            m = re.match(r"[^\s$]+", text[j:])
            if m:
                found.append(m.group(0))
            i = j + 1
        else:
            i = j
            continue


def _strip_sentence(ans: str) -> str:
    ans = ans.strip().rstrip(".").strip()
    ans = re.sub(r"^\$+|\$+$", "", ans).strip()
    ans = re.sub(r"^\\\(|\\\)$", "", ans).strip()
    ans = re.sub(r"^\\\[|\\\]$", "", ans).strip()
    return ans


def extract_answer(final: str | None) -> str | None:
    """The answer in `final`, by priority: the last box; the last 'the answer is ...' phrase;
    a last line that is a bare number or ends in '= number' (how chat models state results).

    Returns None when the final part states no answer; callers must not fall back to the
    reasoning, where intermediate numbers would be mistaken for answers.
    """
    if not final:
        return None
    boxes = [b for b in boxed_answers(final) if b]
    if boxes:
        return boxes[-1]
    matches = list(_ANSWER_IS.finditer(final))
    if matches:
        ans = _strip_sentence(matches[-1].group("ans"))
        inner = boxed_answers(ans)
        return (inner[-1] if inner else ans) or None
    last = final.strip().splitlines()[-1].strip()
    m = _BARE.match(last) or _TRAILING_EQUALS.search(last)
    return m.group("ans") if m else None
