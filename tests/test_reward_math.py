"""math-verify scorer, in-process (the sandbox is tested separately)."""
import pytest

from reward.math_scorer import score_math


@pytest.mark.parametrize(
    "response, gold, accuracy, parsed",
    [
        ("<think>half</think>\\boxed{\\frac{1}{2}}", "0.5", 1.0, "\\frac{1}{2}"),
        ("\\boxed{\\frac{1}{\\sqrt{4}}}", "1/2", 1.0, "\\frac{1}{\\sqrt{4}}"),  # nested braces
        ("\\boxed{3} no wait \\boxed{4}", "4", 1.0, "4"),  # the last box counts
        ("\\boxed{3} no wait \\boxed{4}", "3", 0.0, "4"),
        ("<think>\\boxed{4}</think> so \\boxed{5}", "4", 0.0, "5"),  # boxes in the reasoning don't count
        ("so\nAnswer: 12", "12", 1.0, "12"),  # Answer-line fallback
        ("**Answer:** $\\frac{3}{4}$.", "0.75", 1.0, "$\\frac{3}{4}$"),
        ("\\boxed{1+x^2}", "x^2+1", 1.0, "1+x^2"),  # ground truth wrapped in $…$
        ("\\boxed{7}", "8", 0.0, "7"),
    ],
)
def test_score_math(response, gold, accuracy, parsed):
    result = score_math(response, gold)
    assert (result.parts["accuracy"], result.score, result.parsed) == (accuracy, accuracy, parsed)
    assert result.error is None


@pytest.mark.parametrize("response", ["I am not sure.", "<think>\\boxed{4}</think> I give up", "\\boxed{}"])
def test_no_answer_scores_zero_with_error(response):
    result = score_math(response, "4")
    assert (result.parts["accuracy"], result.parsed, result.error) == (0.0, None, "no answer")
