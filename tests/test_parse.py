from pipeline.parse import assistant_content, split_reasoning


def test_reasoning_and_final_are_split():
    p = split_reasoning("<think>\nLet me add 2 and 3.\n</think>\n\nThe answer is $\\boxed{5}$.")
    assert p.reasoning == "Let me add 2 and 3."
    assert p.final == "The answer is $\\boxed{5}$."
    assert p.closed and p.think_closes == 1


def test_prefilled_completion_starts_inside_the_think_block():
    p = split_reasoning("First, 2+3=5.\n</think>\n\\boxed{5}", prefilled=True)
    assert p.reasoning == "First, 2+3=5."
    assert p.final == "\\boxed{5}"


def test_unclosed_reasoning_has_no_final():
    p = split_reasoning("<think>\nwait, wait, wait", prefilled=False)
    assert p.reasoning == "wait, wait, wait"
    assert p.final is None and not p.closed


def test_no_reasoning_means_the_whole_completion_is_final():
    p = split_reasoning("2 + 3 = 5, so the answer is 5.")
    assert p.reasoning is None
    assert p.final == "2 + 3 = 5, so the answer is 5."


def test_missing_opening_tag_still_splits_and_counts_closes():
    p = split_reasoning("thinking...</think>answer</think>more")
    assert p.reasoning == "thinking..."
    assert p.final == "answer</think>more"
    assert p.think_closes == 2


def test_assistant_content_is_r1_format():
    assert assistant_content("r", "f") == "<think>\nr\n</think>\n\nf"
    assert assistant_content(None, "f") == "f"
