"""Answer extraction from the final part of a completion (never from the reasoning)."""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_TRAILING_EQUALS = re.compile(r"=\s*(?P<ans>[-+]?\d[\d,]*(?:\.\d+)?)\s*[.!]?\s*$")
_BARE = re.compile(r"^\$?(?P<ans>[-+]?\d[\d,]*(?:\.\d+)?|\\frac\{\d+\}\{\d+\})\$?\.?$")
# A last sentence that concludes with a number: "Therefore, the number of divisors of 196 is 9."
_CONCLUSION = re.compile(
    r"^(?:so|thus|therefore|hence|finally|in total|altogether)\b[^\n]*?\b(?:is|are|was|were|equals|be)\s+"
    r"(?:equal to\s+|indeed\s+|exactly\s+)?(?P<ans>[-+]?\d[\d,]*(?:\.\d+)?)(?:\s+[A-Za-z]+){0,2}\s*[.!]?$",
    re.IGNORECASE,
)
# A closing remark without a number after the stated result: "I think that's the answer."
_REMARK = re.compile(r"^(?:I think|I'm|I am|I believe|Everything|Yes|That)\b[^\d$\\=]*$", re.IGNORECASE)
# Display or inline math delimiters and Markdown emphasis around a last line or a stated answer.
_DELIMITERS = re.compile(r"^(?:\$+|\\\[|\\\(|\*+|_{2})\s*|\s*(?:\$+|\\\]|\\\)|\*+|_{2})\s*[.!]?$")
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
    """`$\\frac{7}{2}$.`, `**5**.`, `\\( 3 \\)` -> the bare answer."""
    ans = ans.strip().rstrip(".").strip()
    previous = None
    while previous != ans:
        previous, ans = ans, _DELIMITERS.sub("", ans).strip().rstrip(".").strip()
    return ans


def extract_answer(final: str | None) -> str | None:
    """The answer in `final`, by priority: the last box; the last 'the answer is ...' phrase;
    a last line that is a bare number, ends in '= number' or concludes 'so ... is number'
    (how chat models state results; a closing remark such as "I think that's the answer." after
    it is passed over); Markdown bold and math delimiters around it are dropped.

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
    lines = [line for line in final.strip().splitlines() if line.strip()]
    if len(lines) > 1 and _REMARK.match(lines[-1].strip()):
        lines.pop()  # the result is stated on the line before the remark
    last = _strip_sentence(lines[-1])
    m = _BARE.match(last) or _TRAILING_EQUALS.search(last) or _CONCLUSION.match(last)
    return m.group("ans") if m else None
