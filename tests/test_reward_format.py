"""R_format and the answer-location helpers, with hand-worked cases."""
import time

import pytest

from reward.format_scorer import answer_section, last_boxed, score_format, stated_answer


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<think>2+2 is 4</think>The answer is \\boxed{4}.", 1.0),
        ("  \n<think>r</think>\\boxed{x^{2}}", 1.0),  # leading whitespace allowed
        ("\\boxed{4}", 0.0),  # no think block
        ("<think>  </think>\\boxed{4}", 0.0),  # empty reasoning
        ("<think>a</think><think>b</think>\\boxed{4}", 0.0),  # two think blocks
        ("Sure. <think>a</think>\\boxed{4}", 0.0),  # think not at the start
        ("<think>a</think>The answer is 4.", 0.0),  # no box
        ("<think>\\boxed{4}</think>The answer is 4.", 0.0),  # box only inside the reasoning
        ("<think>a</think>\\boxed{4", 0.0),  # unbalanced box
        ("<think>a</think>\\boxed{ }", 0.0),  # empty box
        ("<think>a\\boxed{4}", 0.0),  # never closed
    ],
)
def test_score_format(response, expected):
    assert score_format(response) == expected


def test_last_boxed_takes_last_balanced_box():
    assert last_boxed("\\boxed{1} and \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{3} then \\boxed{4") == "3"  # the last one never closes
    assert last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"  # escaped braces are literal
    assert last_boxed("\\boxed {7}") == "7"
    assert last_boxed("no box {here}") is None


def test_last_boxed_is_linear_on_hostile_input():
    start = time.monotonic()
    assert last_boxed("\\boxed{" * 50_000) is None
    assert time.monotonic() - start < 1.0


def test_answer_section_and_stated_answer():
    assert answer_section("<think>x is \\boxed{1}</think> so \\boxed{2}") == " so \\boxed{2}"
    assert answer_section("no think here") == "no think here"
    assert stated_answer("work\nAnswer: 12 cm\nthanks") == " 12 cm"
    assert stated_answer("**Answer**: B") == " B"
    assert stated_answer("Answer: 3\n\\boxed{5}") == "5"  # a box wins over an Answer line
    assert stated_answer("nothing stated") is None
