import pytest

from pipeline.verify import VERIFIERS
from pipeline.verify.extract import boxed_answers, extract_answer
from pipeline.verify.math import fast_compare


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $\\boxed{5}$.", "5"),
        ("\\boxed{\\frac{1}{2}} and then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\fbox{x^{2}}", "x^{2}"),
        ("The final answer is 42.", "42"),
        ("Therefore, the answer is $\\frac{7}{2}$.", "\\frac{7}{2}"),
        ("No answer stated here, just 3 and 4.", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_nested_boxes():
    assert boxed_answers("\\boxed{\\sqrt{\\frac{a}{b}}}") == ["\\sqrt{\\frac{a}{b}}"]


@pytest.mark.parametrize(
    "gold, pred, same",
    [("5", "5", True), ("5", "5.0", True), ("1/2", "\\frac{1}{2}", True), ("0.5", "\\frac12", None),
     ("1,000", "1000", True), ("3", "4", False), ("\\frac{1}{3}", "0.333", None), ("1/2", "\\frac{1}{3}", False)],
)
def test_fast_compare(gold, pred, same):
    assert fast_compare(gold, pred) is same


def verdict(answer, final):
    return VERIFIERS.build("math")({"answer": answer, "final": final})


def test_math_verifier_accepts_equivalent_and_rejects_wrong():
    assert verdict("5", "The answer is \\boxed{5}.").ok
    assert verdict("\\frac{1}{2}", "\\boxed{0.5}").ok
    assert verdict("x^2+2x+1", "\\boxed{(x+1)^2}").ok
    v = verdict("6", "\\boxed{7}")
    assert not v.ok and v.reason == "answer_mismatch"


def test_math_verifier_never_reads_the_reasoning():
    # The final part has no answer: numbers in the reasoning must not be picked up.
    v = VERIFIERS.build("math")({"answer": "5", "reasoning": "2+3=5", "final": "I am done."})
    assert v.reason == "no_answer"


def test_math_verifier_needs_a_reference():
    assert verdict(None, "\\boxed{1}").reason == "no_reference"


def test_choice_verifier():
    v = VERIFIERS.build("choice")
    assert v({"answer": "B", "final": "The answer is (B)."}).ok
    assert v({"answer": "B", "final": "\\boxed{C}"}).reason == "answer_mismatch"
    assert v({"answer": "B", "final": "I think so."}).reason == "no_answer"


@pytest.mark.parametrize(
    "gold, pred, same",
    [
        # equations are compared as equations, not as their sides' values
        ("x^2+1=0", "x^2+2=0", False), ("1=1", "2=2", False), ("2x+2=4", "x+1=2", True),
        ("y=2x+1", "y=1+2x", True), ("x=3", "x=4", False), ("x^2=1", "x=1", False),
        # an equation is not the number Math-Verify reduces it to (its right-hand side)
        ("6", "2x+3y=6", False), ("0", "x+y-3=0", False), ("x+y=0", "0", False), ("5", "x=5", True),
        # tiny quantities that Math-Verify's rounding makes equal
        ("\\frac{1}{100!}", "\\frac{1}{101!}", False), ("2^{-60}", "2^{-61}", False), ("2^{-60}", "\\frac{1}{2^{60}}", True),
        # sets versus intervals; inequalities as the sets they describe
        ("\\{1,2\\}", "[1,2]", False), ("(1,2)", "\\{1,2\\}", False), ("[0,1)", "[0,1]", False),
        ("(-1, \\infty)", "y > -1", True), ("y > -1", "[-1, \\infty)", False),
        # trailing units versus variables; multi-part answers part by part, units included
        ("5\\text{ cm}", "5", True), ("5", "5x", False), ("15\\mbox{ cm}^2", "15\\text{ cm}", False),
        ("3\\text{ m} \\times 4\\text{ m}", "3\\text{ m} \\times 5\\text{ m}", False),
        ("3\\text{ m} \\times 4\\text{ m}", "3\\text{ m} \\times 4\\text{ m}", True),
        # radicals of symbols, complex exponentials, degrees against radians
        ("\\sqrt{a/b}", "\\sqrt{a}/\\sqrt{b}", True), ("|x|", "x", False),
        ("e^{i\\pi/2}", "i", True), ("e^{i\\pi/2}", "-i", False),
        ("45^\\circ", "\\frac{\\pi}{4}", True), ("\\frac{\\pi}{4}", "45", False),
        # "find all": a part of the solutions is not the answer
        ("-2, 1", "1", False), ("\\pm 2021", "2021", False), ("1, 2, 3", "1, 2", False),
        # the ordinary cases stay right
        ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}", True), ("0.5", "\\frac12", True), ("1/3", "0.3333333", True), ("y = 2x+1", "2x+1", True),
    ],
)
def test_guards_for_math_verify_blind_spots(gold, pred, same):
    assert verdict(gold, f"\\boxed{{{pred}}}").ok is same


def test_a_bare_reference_is_in_degrees_when_the_problem_is():
    unit = VERIFIERS.build("math")
    posed = {"answer": "60", "final": "\\boxed{\\frac{\\pi}{3}}"}
    assert unit({**posed, "prompt": "Each angle of an equilateral triangle measures how many degrees?"}).ok
    assert unit({**posed, "prompt": "How many minutes are in an hour?"}).reason == "answer_mismatch"


@pytest.mark.parametrize("gold, pred", [("1, 2, \\ldots, n", "1, 3, 5, \\ldots, 2n-1"), ("204_5", "204")])
def test_pairs_it_cannot_decide_are_rejected_with_their_own_reason(gold, pred):
    """Math-Verify reads `1, 2, \\ldots, n` (and the other pattern) as 2 and `204_5` as 204: "equal"
    would be a guess."""
    v = verdict(gold, f"\\boxed{{{pred}}}")
    assert not v.ok and v.reason == "answer_unverifiable", v


@pytest.mark.parametrize(
    "final, expected",
    [("The answer is **5**.", "5"), ("**Final Answer:** 6", "6"), ("**Answer: 5**", "5"),
     ("In conclusion:\n\n$$\\tan A = 2$$", "2"), ("Therefore, the number of divisors of 196 is 9.", "9"),
     ("So, m + n = 194.\n\nI think that's the answer.", "194"), ("Therefore, the mistake is in step 2.", None)],
)
def test_extraction_from_bold_display_math_and_concluding_sentences(final, expected):
    assert extract_answer(final) == expected


def test_labelled_pairs_meet_the_accuracy_targets():
    """387 hard gold/prediction pairs (tests/corpus/math_pairs.py), through the verifier's own path:
    every non-equivalent pair rejected (a false accept puts a wrong answer in the data: no slack),
    and the equivalent ones accepted as measured (190 of 192; the 2 misses are `0.\\overline{3}`
    and `C_n^3`, which Math-Verify cannot read)."""
    from corpus.math_pairs import PAIRS, sample

    unit = VERIFIERS.build("math")
    verdicts = [(c, g, p, eq, unit(sample(g, p, eq))) for c, g, p, eq in PAIRS]
    false_accepts = [(c, g, p) for c, g, p, eq, v in verdicts if v.ok and not eq]
    false_rejects = [(c, g, p, v.reason) for c, g, p, eq, v in verdicts if eq and not v.ok]
    n_eq = sum(eq for *_, eq in PAIRS)
    assert len(PAIRS) >= 300 and len(PAIRS) - n_eq >= 150
    assert false_accepts == []
    assert len(false_rejects) <= 2, false_rejects
    assert 1 - len(false_rejects) / n_eq >= 0.97


def test_real_long_traces_agree_with_their_labels():
    """440 real Sky-T1 traces (../shared/real_traces; bench/calibrate_real_traces.py): the
    verifier reads only the final part, the source's grader the whole text. On the 211 complete
    traces the two agree on 205 (97.2%); of the 6 differences, 2 are the source's label errors
    (read by hand) and 4 answers stated in a way we do not extract; no labelled-wrong trace is
    accepted except those 2."""
    from corpus.real_traces import figures

    m = figures()["math_verifier"]
    assert m["complete"]["n"] >= 200 and m["complete"]["agreement"] >= 0.96, m["complete"]
    assert m["all"]["agreement"] >= 0.95, m["all"]
    assert m["complete_after_audit"]["accepted_but_wrong"] == 0
    wrongly_accepted = [d for d in m["disagreements"] if d["ours"] == "accepted"]
    assert all(d["source_label_error"] for d in wrongly_accepted), wrongly_accepted
