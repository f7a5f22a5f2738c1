"""Readability filters on realistic English and Chinese reasoning, positive and negative."""

import pytest

from corpus.readability import CLEAN_EN, CLEAN_ZH, CODE_REASONING, LONG_PARAGRAPH_EN, LOOPS, MIXED
from pipeline.check import Checker
from pipeline.config import load_job
from pipeline.filter import FILTERS
from pipeline.filter.readability import Repetition

EN_PROMPT = "What is the sum of all positive divisors of 36?"
ZH_PROMPT = "求36的所有正因数之和。"


def sample(reasoning, prompt=EN_PROMPT, final="The answer is $\\boxed{91}$.", **kw):
    completion = f"<think>\n{reasoning}\n</think>\n\n{final}" if reasoning is not None else final
    return {"prompt": prompt, "domain": "math", "reasoning": reasoning, "final": final, "completion": completion,
            "think_closes": 1 if reasoning is not None else 0, "finish_reason": "stop", **kw}


def run(name, s, **params):
    return FILTERS.build(name, **params)(s)


@pytest.mark.parametrize("text", CLEAN_EN)
def test_clean_english_reasoning_passes_every_filter(text):
    for name in ("format", "language_mixing", "repetition", "long_paragraph", "code_in_reasoning"):
        assert run(name, sample(text)).ok, name


@pytest.mark.parametrize("text", CLEAN_ZH)
def test_clean_chinese_reasoning_passes_every_filter(text):
    for name in ("format", "language_mixing", "repetition", "long_paragraph", "code_in_reasoning"):
        assert run(name, sample(text, prompt=ZH_PROMPT, final="答案是 $\\boxed{91}$。")).ok, name


def test_english_reasoning_that_switches_to_chinese_is_rejected():
    v = run("language_mixing", sample(MIXED[0]))
    assert v.reason == "language_mixing" and v.details["expected"] == "latin" and v.details["foreign_share"] > 0.5


def test_chinese_prompt_with_english_reasoning_is_rejected():
    v = run("language_mixing", sample(MIXED[1], prompt=ZH_PROMPT))
    assert v.reason == "language_mixing" and v.details["expected"] == "cjk"


def test_reasoning_in_the_wrong_language_for_the_prompt():
    assert run("language_mixing", sample(CLEAN_EN[0], prompt=ZH_PROMPT)).reason == "language_mixing"
    assert run("language_mixing", sample(CLEAN_ZH[0], prompt=EN_PROMPT)).reason == "language_mixing"


def test_target_language_overrides_the_prompt():
    assert run("language_mixing", sample(CLEAN_ZH[0], prompt=EN_PROMPT), target="zh").ok
    assert run("language_mixing", sample(CLEAN_EN[0], prompt=EN_PROMPT), target="zh").reason == "language_mixing"


def test_math_latex_greek_and_code_do_not_count_as_another_language():
    text = ("设 $\\alpha + \\beta = \\pi$，则 $\\sin\\alpha = \\sin\\beta$。我们用 `gcd(a, b)` 计算最大公约数，"
            "再代入 $f(x) = \\frac{x^2 + 1}{x - 1}$ 得到结果。") * 2
    assert run("language_mixing", sample(text, prompt=ZH_PROMPT)).ok


def test_other_scripts_work_with_the_same_mechanism():
    ru = "Сначала разложим число на простые множители, затем применим формулу суммы делителей и проверим ответ."
    assert run("language_mixing", sample(ru, prompt="Найдите сумму делителей числа 36.")).ok
    assert run("language_mixing", sample(ru, prompt=EN_PROMPT)).reason == "language_mixing"


@pytest.mark.parametrize("text", LOOPS)
def test_degenerate_loops_are_rejected(text):
    assert run("repetition", sample(text)).reason == "repetition"


def test_a_loop_at_the_end_of_a_long_good_trace_is_caught_by_the_tail_window():
    text = "\n\n".join(CLEAN_EN) + "\n\n" + "Wait, maybe I made a mistake. " * 80
    v = run("repetition", sample(text))
    assert v.reason == "repetition" and v.details["tail_ratio"] < 0.18


def test_a_loop_with_a_period_longer_than_the_short_window_is_caught():
    """Real long traces loop over whole paragraphs (periods of 315-10,668 characters, half over
    1,385): a 2,000-character window cannot hold such a loop twice, the 6,000 one can. Real prose
    here: CPython's reference docs, 20k characters, then one 2,100-character passage four times."""
    from pydoc_data.topics import topics

    prose = "\n\n".join(topics[k] for k in sorted(topics))
    passage = topics["try"][:2100]
    text = prose[:20000] + "\n\n" + (passage + "\n\n") * 4
    assert Repetition.ratio(passage) > 0.35 and Repetition.ratio(text) > 0.15  # prose; the whole text passes
    assert run("repetition", sample(text), windows=(2000,)).ok
    v = run("repetition", sample(text))
    assert v.reason == "repetition" and v.details["tail_ratio"] < 0.18


def test_math_with_many_short_repeated_phrases_is_not_a_loop():
    lines = [f"For n = {n}: n^2 + n = {n * n + n}, and {n * n + n} mod 6 = {(n * n + n) % 6}." for n in range(1, 40)]
    assert run("repetition", sample("Let me tabulate small cases.\n" + "\n".join(lines))).ok
    assert Repetition.ratio("\n".join(lines)) > 0.2


def test_long_paragraph():
    assert run("long_paragraph", sample(LONG_PARAGRAPH_EN)).reason == "long_paragraph"
    assert run("long_paragraph", sample(LONG_PARAGRAPH_EN), max_words=5000).ok
    assert run("long_paragraph", sample("很长的段落" * 200, prompt=ZH_PROMPT)).reason == "long_paragraph"


def test_code_blocks_in_reasoning_only_outside_code_domains():
    assert run("code_in_reasoning", sample(CODE_REASONING)).reason == "code_in_reasoning"
    assert run("code_in_reasoning", sample(CODE_REASONING, domain="code")).ok
    untagged = CODE_REASONING.replace("```python", "```")
    assert run("code_in_reasoning", sample(untagged)).reason == "code_in_reasoning"  # a program all the same


def test_a_fenced_grid_or_written_multiplication_is_layout_not_code():
    """As real long traces use fences (2 of 181 finished Sky-T1 traces)."""
    grid = "Let's visualize the grid:\n\n```\n1 2 3\n4 5 6\n7 8 9\n```\n\nHere, each number is a square."
    product = "Let me set it up:\n\n```\n  6_8\nx 7_8\n------\n```\n\nFirst, multiply 6 by 7."
    for text in (grid, product):
        assert run("code_in_reasoning", sample(text)).ok
    assert run("code_in_reasoning", sample(grid.replace("```\n1", "```text\n1"))).reason == "code_in_reasoning"


def test_format():
    assert run("format", sample(CLEAN_EN[0])).ok
    assert run("format", sample("", final="\\boxed{1}")).details["problem"] == "empty or near-empty reasoning"
    assert run("format", sample(CLEAN_EN[0], final="")).details["problem"] == "empty final answer"
    assert run("format", sample(CLEAN_EN[0], think_closes=2)).details["problem"] == "2 </think> tags"


def test_length_bounds():
    assert run("length", sample("x", completion_tokens=5), min_tokens=10).reason == "too_short"
    assert run("length", sample("x", completion_tokens=50), max_tokens=10).reason == "too_long"
    assert run("length", sample("x", completion_tokens=10), min_tokens=5, max_tokens=20).ok


def test_checker_applies_reasoning_checks_only_to_reasoning_samples():
    checker = Checker(load_job(None, verify={"domains": {"math": {"name": "accept"}}}))
    with_code = checker.parse({"prompt": EN_PROMPT, "domain": "math", "finish_reason": "stop",
                               "completion": f"<think>\n{CODE_REASONING}\n</think>\n\nThere are 25."})
    plain = checker.parse({"prompt": EN_PROMPT, "domain": "math", "finish_reason": "stop",
                           "completion": CODE_REASONING})  # a non-reasoning model may answer with code
    unclosed = checker.parse({"prompt": EN_PROMPT, "domain": "math", "finish_reason": "stop",
                              "completion": "<think>\nLet me think about it for a while"})
    assert [v.reason for v in checker([with_code, plain, unclosed])] == ["code_in_reasoning", None, "truncated"]


def test_a_sentence_in_another_language_is_mixing_a_term_is_not():
    """The run check: share alone misses an English sentence in Chinese (English takes ~3x the
    characters per word unit); a single English term or variable name stays fine."""
    base = "\n\n".join(CLEAN_ZH)  # long enough that one English sentence stays under the share threshold
    with_term = base + "\n\n这里用到 modulo 运算和 GCD 的性质，所以结果不变。"
    assert run("language_mixing", sample(with_term, prompt=ZH_PROMPT)).ok
    switched = base + "\n\nWait, let me double check this again because the divisor sum should be computed carefully."
    v = run("language_mixing", sample(switched, prompt=ZH_PROMPT))
    assert v.reason == "language_mixing" and "double check" in v.details["foreign_run"]
    en_switch = CLEAN_EN[0] + "\n\n所以我们需要重新计算这个数的所有正因数并把它们加起来。"
    assert run("language_mixing", sample(en_switch)).reason == "language_mixing"


def test_real_long_traces_keep_good_traces_and_catch_loops():
    """440 real Sky-T1 traces (../shared/real_traces; bench/calibrate_real_traces.py): of 169
    correct, complete, non-looping traces none is rejected by a filter, and none may be (before
    the retune: 1, a fenced grid); 150 of the 153 that end in a verbatim loop are caught by `repetition`
    (133 with the 2,000-character window alone); no complete trace trips it."""
    from corpus.real_traces import figures

    f = figures()["filters"]
    good = f["false_rejects_of_correct_complete_non_looping"]
    assert good["of"] >= 150 and good["rejected"] == 0, good
    assert f["complete_traces_rejected_each_filter_alone"]["repetition"] == 0
    loops = f["loops_caught"]
    assert loops["of"] >= 140 and loops["repetition"] >= 0.95 * loops["of"], loops
