"""The strict multiple-choice reward scorer."""
import pytest

from reward.choice_scorer import option_letters, read_letter, score_choice

OPTIONS = ("cat", "dog", "bird", "fish")


@pytest.mark.parametrize(
    "response",
    [
        "<think>…</think>\\boxed{B}",
        "\\boxed{\\text{B}}",
        "\\boxed{(B)}",
        "\\boxed{B. dog}",
        "\\boxed{\\textbf{B}}",
        "It barks.\nAnswer: B",
        "**Answer:** (B)",
        "Answer: \\(B\\)",
        "Answer: B. dog",
    ],
)
def test_stated_letter_forms(response):
    result = score_choice(response, "B", OPTIONS)
    assert (result.parts["accuracy"], result.parsed, result.error) == (1.0, "B", None)


def test_wrong_letter_scores_zero_without_error():
    result = score_choice("\\boxed{C}", "B", OPTIONS)
    assert (result.parts["accuracy"], result.parsed, result.error) == (0.0, "C", None)


@pytest.mark.parametrize(
    "response, error",
    [
        ("It is probably the dog.", "no answer"),
        ("\\boxed{E}", "answer is not a valid option letter"),  # only four options
        ("\\boxed{A and B}", "answer is not a valid option letter"),
        ("\\boxed{Both}", "answer is not a valid option letter"),
        ("\\boxed{2}\nAnswer: B", "answer is not a valid option letter"),  # the box is what counts
    ],
)
def test_strict_rejections(response, error):
    result = score_choice(response, "B", OPTIONS)
    assert (result.parts["accuracy"], result.parsed, result.error) == (0.0, None, error)


def test_never_guesses():
    # The official evaluator would pick a random letter here; the reward scorer abstains, every time.
    for gold in "ABCD":
        assert score_choice("No idea, sorry.", gold, OPTIONS).parts["accuracy"] == 0.0


def test_not_credited_when_official_parser_reads_another_letter():
    result = score_choice("Option (A) is wrong.\n\\boxed{B}", "B", OPTIONS)
    assert result.parts["accuracy"] == 0.0
    assert result.error == "official parse reads A, not B"


def test_unknown_options_allow_a_to_j():
    assert option_letters(()) == tuple("ABCDEFGHIJ")
    assert score_choice("\\boxed{J}", "J").parts["accuracy"] == 1.0
    assert score_choice("\\boxed{K}", "K").error == "ground truth 'K' is not an option letter"


def test_read_letter():
    assert [read_letter(t) for t in ["B", "(B)", "B)", "B:", "$B$", "Answer: C", "B because", "42", ""]] == [
        "B", "B", "B", "B", "B", "C", None, None, None,
    ]
